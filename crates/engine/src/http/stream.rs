//! From a request's events to its response. The decode thread sends the events straight into a
//! tokio channel (no thread waits per request); they become an SSE stream of chunks, or one whole
//! body. Both count and log the request, and observe its latencies.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Json;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;

use super::AppState;
use super::error::ApiError;
use super::log;
use super::models::Loaded;
use super::openai::{Delta, Kind, Meta, finish_reason};
use crate::config::CancelToken;
use crate::error::EngineError;
use crate::outcome::ms;
use crate::serving::{Event, EventSink};

impl EventSink for tokio::sync::mpsc::UnboundedSender<Event> {
    fn send(&mut self, event: Event) -> bool {
        tokio::sync::mpsc::UnboundedSender::send(self, event).is_ok()
    }
}

/// Cancels its request when dropped: when axum drops a response stream or a handler future, the
/// client has gone, and the decode loop stops the request at its next step.
pub(super) struct CancelOnDrop(pub(super) CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A submitted request, as its answer needs it.
pub(super) struct Answer {
    pub(super) state: Arc<AppState>,
    /// Held until the answer ends: a model is not unloaded under a request.
    pub(super) model: Arc<Loaded>,
    pub(super) meta: Meta,
    pub(super) kind: Kind,
    pub(super) received: Instant,
    pub(super) include_usage: bool,
    pub(super) logprobs: bool,
    pub(super) events: UnboundedReceiver<Event>,
    /// Cancels the request when the answer is dropped (its client gone).
    pub(super) _cancel: CancelOnDrop,
}

impl Answer {
    /// The answer as an SSE stream: chunks as the text comes, then the end, the usage when asked
    /// for, and `[DONE]`.
    pub(super) fn stream(self) -> Response {
        let mut queue = VecDeque::new();
        if self.kind == Kind::Chat {
            queue.push_back(chunk(self.kind.chunk(&self.meta, Delta::Role)));
        }
        Sse::new(SseBridge { answer: self, queue, last: None, done: false }).into_response()
    }

    /// The answer as one body, once the request has ended.
    pub(super) async fn whole(mut self) -> Response {
        let mut text = String::new();
        let end = loop {
            match self.events.recv().await {
                Some(Event::Delta(d)) => text.push_str(&d),
                Some(Event::Done(c)) => break Ok(c),
                Some(Event::Failed(e)) => break Err(e),
                // The decode loop stopped under the request.
                None => break Err(EngineError::Cancelled),
            }
        };
        let state = &self.state;
        match end {
            Ok(c) => {
                log::finished(state, &self.meta.model, &self.meta.id, &c, self.received);
                // A whole response's first token came after its queue wait and prefill: all of
                // its time but the generation's.
                if c.stats.completion_tokens > 0 {
                    state.metrics.observe_ttft((ms(self.received.elapsed()) - c.stats.generation_ms).max(0.0));
                }
                let logprobs = if self.logprobs {
                    self.kind.logprobs(&c.logprobs, |t| self.model.engine.token_bytes(t).unwrap_or_default())
                } else {
                    serde_json::Value::Null
                };
                Json(self.kind.response(&self.meta, &text, finish_reason(c.finish_reason), &c.stats, logprobs)).into_response()
            }
            Err(e) => log::refused(state, e.into()),
        }
    }
}

fn chunk(value: serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// The SSE side of an answer: each event of the request becomes one or more SSE events.
struct SseBridge {
    answer: Answer,
    queue: VecDeque<SseEvent>,
    /// When the last text went out (inter-token latency).
    last: Option<Instant>,
    /// The request ended: what is queued is the rest of the stream.
    done: bool,
}

impl SseBridge {
    fn on_event(&mut self, event: Option<Event>) {
        let a = &self.answer;
        match event {
            Some(Event::Delta(text)) => {
                let now = Instant::now();
                match self.last {
                    None => a.state.metrics.observe_ttft(ms(now - a.received)),
                    Some(previous) => a.state.metrics.observe_inter_token(ms(now - previous)),
                }
                self.last = Some(now);
                self.queue.push_back(chunk(a.kind.chunk(&a.meta, Delta::Text(&text))));
            }
            Some(Event::Done(c)) => {
                log::finished(&a.state, &a.meta.model, &a.meta.id, &c, a.received);
                self.queue.push_back(chunk(a.kind.chunk(&a.meta, Delta::End(finish_reason(c.finish_reason)))));
                if a.include_usage {
                    self.queue.push_back(chunk(a.kind.usage_chunk(&a.meta, &c.stats)));
                }
                self.end();
            }
            Some(Event::Failed(e)) => self.fail(e),
            // The decode loop stopped under the request.
            None => self.fail(EngineError::Cancelled),
        }
    }

    fn fail(&mut self, e: EngineError) {
        let error = ApiError::from(e);
        self.answer.state.metrics.count_error(error.status);
        self.queue.push_back(chunk(error.body()));
        self.end();
    }

    fn end(&mut self) {
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

impl Stream for SseBridge {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.answer.events.poll_recv(cx) {
                Poll::Ready(event) => this.on_event(event),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
