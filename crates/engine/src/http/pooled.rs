//! A model's pooled computations (embeddings, rerank scores): one at a time, off the async
//! workers, behind a bounded queue like the decode loop's.
//!
//! Each computation makes a context of its own and decodes with every thread, so two at once
//! would only split the cores and double the memory; the ones waiting are at most the server's
//! `--max-queue`, and one more is answered 503 (`queue_full`, with `Retry-After`) at once, as a
//! generation is when its queue is full.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::error::EngineError;
use crate::serving::SubmitError;

pub(crate) struct PooledQueue {
    /// The one that runs and the ones that wait: a permit each.
    admitted: Arc<Semaphore>,
    /// The one that runs.
    turn: Arc<Semaphore>,
    max_queue: usize,
}

impl PooledQueue {
    pub(crate) fn new(max_queue: usize) -> PooledQueue {
        PooledQueue { admitted: Arc::new(Semaphore::new(max_queue + 1)), turn: Arc::new(Semaphore::new(1)), max_queue }
    }

    /// Runs `work` when its turn comes; a text longer than one batch is the request's fault,
    /// named by `field`. A request whose client leaves while it waits leaves the queue; one
    /// that runs holds its place until it ends (its context and threads are busy until then).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        field: &'static str,
        work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let admitted = Arc::clone(&self.admitted).try_acquire_owned().map_err(|_| SubmitError::QueueFull { capacity: self.max_queue })?;
        let turn = Arc::clone(&self.turn).acquire_owned().await.map_err(|_| SubmitError::Stopped)?;
        let computed = tokio::task::spawn_blocking(move || {
            let _held = (admitted, turn);
            work()
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?;
        computed.map_err(|e| match e {
            e @ EngineError::EmbedTooLong { .. } => ApiError::invalid(field, e),
            e => ApiError::from(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn one_runs_the_queue_holds_max_queue_and_the_next_is_refused() {
        let queue = Arc::new(PooledQueue::new(1));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let running = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move {
                queue
                    .run("input", move || {
                        let _ = started_tx.send(());
                        held.recv().ok();
                        Ok(1)
                    })
                    .await
            }
        });
        started.await.unwrap();
        let waiting = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.run("input", || Ok(2)).await }
        });
        tokio::task::yield_now().await;
        let refused = queue.run("input", || Ok(3)).await.unwrap_err();
        assert_eq!((refused.status, refused.code), (StatusCode::SERVICE_UNAVAILABLE, Some("queue_full")));
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap().unwrap(), 1);
        assert_eq!(waiting.await.unwrap().unwrap(), 2);
        // The places are free again.
        assert_eq!(queue.run("input", || Ok(4)).await.unwrap(), 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_text_longer_than_a_batch_names_the_field() {
        let queue = PooledQueue::new(1);
        let e = queue.run::<()>("documents", || Err(EngineError::EmbedTooLong { tokens: 9, n_batch: 8 })).await.unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("documents")));
    }
}
