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
use crate::chat::ChatDelta;
use crate::config::CancelToken;
use crate::error::EngineError;
use crate::outcome::ms;
use crate::serving::{Event, EventSink};
use crate::templates::ReplyParser;

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
    /// Reads a chat's reply as its format says (a chat rendered by its Jinja template).
    pub(super) parser: Option<ReplyParser>,
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
        Sse::new(SseBridge { answer: self, queue, last: None, done: false, called_tools: false }).into_response()
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
        let reply = match (self.parser.take(), end.is_ok()) {
            (Some(parser), true) => match parser.read_whole(&text) {
                Ok(reply) => Some(reply),
                Err(e) => return log::refused(state, e.into()),
            },
            _ => None,
        };
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
                let called_tools = reply.as_ref().is_some_and(|r| !r.tool_calls.is_empty());
                let finish = finish_reason(c.finish_reason, called_tools);
                Json(self.kind.response(&self.meta, &text, reply.as_ref(), finish, &c.stats, logprobs)).into_response()
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
    /// A tool call went out (the finish reason is then `tool_calls`).
    called_tools: bool,
}

impl SseBridge {
    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Delta(text)) => {
                let a = &self.answer;
                let now = Instant::now();
                match self.last {
                    None => a.state.metrics.observe_ttft(ms(now - a.received)),
                    Some(previous) => a.state.metrics.observe_inter_token(ms(now - previous)),
                }
                self.last = Some(now);
                match self.answer.parser.as_mut().map(|p| p.push(&text)) {
                    None => self.queue.push_back(chunk(self.answer.kind.chunk(&self.answer.meta, Delta::Text(&text)))),
                    Some(Ok(deltas)) => self.push_chat(&deltas),
                    Some(Err(e)) => self.fail(e),
                }
            }
            Some(Event::Done(c)) => {
                if let Some(finished) = self.answer.parser.as_mut().map(ReplyParser::finish) {
                    match finished {
                        Ok((deltas, _)) => self.push_chat(&deltas),
                        Err(e) => return self.fail(e),
                    }
                }
                let a = &self.answer;
                log::finished(&a.state, &a.meta.model, &a.meta.id, &c, a.received);
                self.queue.push_back(chunk(a.kind.chunk(&a.meta, Delta::End(finish_reason(c.finish_reason, self.called_tools)))));
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

    /// Chunks for what a chat's parser read.
    fn push_chat(&mut self, deltas: &[ChatDelta]) {
        let a = &self.answer;
        for delta in deltas {
            self.called_tools |= matches!(delta, ChatDelta::ToolCall { .. });
            self.queue.push_back(chunk(a.kind.chunk(&a.meta, Delta::Chat(delta))));
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
