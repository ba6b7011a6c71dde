//! What every request gets on its way in and out: an id and the server's time limit.
//!
//! The id is the client's `X-Request-Id` (visible ASCII, at most 128 bytes) or a new random one;
//! the response carries it back, and every log line the request causes (its "request done"
//! line included, which a stream writes when it ends) is inside a `request` span naming it, so
//! one grep or one JSON field finds a request's whole story.
//!
//! The time limit (`--request-timeout`) covers the whole request, its wait for a slot included.
//! A request still being prepared or waiting when it passes is answered with an error in its
//! surface's shape (OpenAI's, or Ollama's under `/api/`); a stream already under way ends with
//! an error event (SSE) or an error line (Ollama's NDJSON). Either way the handler or the stream
//! is dropped, which cancels the request and frees its slot at the next decode step.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use tracing::Instrument;

use super::AppState;
use super::error::ApiError;

/// The header that carries a request's id both ways.
pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-chosen id kept (a longer one is replaced, not echoed).
const MAX_CLIENT_ID: usize = 128;

/// Gives the request its id and span, and holds it to the time limit.
pub(super) async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let id = request.headers().get(&X_REQUEST_ID).filter(|v| client_id_is_usable(v)).cloned().unwrap_or_else(new_id);
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or_default(), method = %request.method(), path = request.uri().path());
    let ollama = request.uri().path().starts_with("/api/");
    let limit = state.config.request_timeout;
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let handled = next.run(request).instrument(span.clone());
    let response = match (deadline, limit) {
        (Some(deadline), Some(limit)) => match tokio::time::timeout_at(deadline, handled).await {
            Ok(response) => response,
            Err(_) => span.in_scope(|| {
                let error = timed_out(limit);
                state.metrics.count_error(error.status);
                tracing::warn!("{}", error.message);
                if ollama { super::ollama::error(error) } else { error.into_response() }
            }),
        },
        _ => handled.await,
    };
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(X_REQUEST_ID.clone(), id);
    let stream = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).and_then(StreamShape::of);
    let limit = match (stream, deadline, limit) {
        (Some(shape), Some(deadline), Some(limit)) => Some(StreamLimit { sleep: Box::pin(tokio::time::sleep_until(deadline)), shape, limit }),
        _ => None,
    };
    Response::from_parts(parts, Body::new(Tracked { inner: body, span, limit, ended: false }))
}

/// The error of a request that ran past the time limit.
fn timed_out(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "server_error",
        format!("the request ran past the server's time limit ({} s, --request-timeout) and was stopped; its slot is free", limit.as_secs_f64()),
    )
    .with_code("request_timeout")
}

/// Visible ASCII only (no spaces or control characters: it goes into log lines), 1 to 128 bytes.
fn client_id_is_usable(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_CLIENT_ID).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 32 random hex digits. std's `RandomState` is seeded from the operating system's randomness
/// once per process and stepped for each new state; the counter makes two ids of one process
/// differ even if two states hashed alike.
fn new_id() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    HeaderValue::from_str(&format!("{:016x}{:016x}", half(0), half(1))).expect("hex digits are a header value")
}

/// The streamed bodies the time limit can end with an error of their own kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamShape {
    /// OpenAI's, Anthropic's and llama-server's streams: an `error` event as a stream's other
    /// errors are sent.
    Sse,
    /// Ollama's: an `{"error": ...}` line, as Ollama ends a failed stream.
    Ndjson,
}

impl StreamShape {
    fn of(content_type: &str) -> Option<StreamShape> {
        match content_type.split(';').next().map(str::trim) {
            Some("text/event-stream") => Some(StreamShape::Sse),
            Some("application/x-ndjson") => Some(StreamShape::Ndjson),
            _ => None,
        }
    }

    fn last_frame(self, error: &ApiError) -> Bytes {
        match self {
            StreamShape::Sse => format!("data: {}\n\n", error.body()).into(),
            StreamShape::Ndjson => format!("{}\n", serde_json::json!({ "error": error.message })).into(),
        }
    }
}

struct StreamLimit {
    sleep: Pin<Box<tokio::time::Sleep>>,
    shape: StreamShape,
    limit: Duration,
}

/// A response body polled inside its request's span, ended at the time limit when it streams.
struct Tracked {
    inner: Body,
    span: tracing::Span,
    limit: Option<StreamLimit>,
    /// The time limit ended the stream: its last frame has gone.
    ended: bool,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let _entered = this.span.enter();
        if let Some(limit) = &mut this.limit
            && limit.sleep.as_mut().poll(cx).is_ready()
        {
            let error = timed_out(limit.limit);
            tracing::warn!("{}", error.message);
            this.ended = true;
            // Dropping the stream cancels its request (`serving::EventStream` cancels on drop).
            this.inner = Body::empty();
            return Poll::Ready(Some(Ok(Frame::data(limit.shape.last_frame(&error)))));
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // A stream that may end early has no known length; any other body keeps its own.
        if self.limit.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_printable_and_short() {
        assert!(client_id_is_usable(&HeaderValue::from_static("abc-123_X.y")));
        assert!(!client_id_is_usable(&HeaderValue::from_static("")));
        assert!(!client_id_is_usable(&HeaderValue::from_static("has space")));
        assert!(!client_id_is_usable(&HeaderValue::from_bytes(b"tab\there").unwrap()));
        assert!(!client_id_is_usable(&HeaderValue::from_str(&"x".repeat(MAX_CLIENT_ID + 1)).unwrap()));
        assert!(client_id_is_usable(&HeaderValue::from_str(&"x".repeat(MAX_CLIENT_ID)).unwrap()));
    }

    #[test]
    fn new_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        for id in [a, b] {
            let s = id.to_str().unwrap();
            assert_eq!(s.len(), 32);
            assert!(s.bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn stream_shapes_come_from_the_content_type() {
        assert_eq!(StreamShape::of("text/event-stream"), Some(StreamShape::Sse));
        assert_eq!(StreamShape::of("text/event-stream; charset=utf-8"), Some(StreamShape::Sse));
        assert_eq!(StreamShape::of("application/x-ndjson"), Some(StreamShape::Ndjson));
        assert_eq!(StreamShape::of("application/json"), None);
        let error = timed_out(Duration::from_secs(2));
        let sse = StreamShape::Sse.last_frame(&error);
        let json: serde_json::Value = serde_json::from_slice(sse.strip_prefix(b"data: ").unwrap().trim_ascii_end()).unwrap();
        assert_eq!(json["error"]["code"], "request_timeout");
        let line: serde_json::Value = serde_json::from_slice(&StreamShape::Ndjson.last_frame(&error)).unwrap();
        assert!(line["error"].as_str().unwrap().contains("--request-timeout"));
    }
}
