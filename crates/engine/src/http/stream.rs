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
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio_stream::Stream;

use super::AppState;
use super::error::ApiError;
use super::log;
use super::models::Loaded;
use super::openai::{Delta, Kind, Meta, finish_reason};
use super::{anthropic, responses};
use crate::chat::{ChatDelta, ChatReply};
use crate::error::EngineError;
use crate::outcome::Completion;
use crate::outcome::ms;
use crate::serving::{Event, EventStream};
use crate::templates::ReplyParser;

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
    /// The request's events. Dropped before its end (axum drops a response stream or a handler
    /// future when the client has gone), it cancels the request at the decode loop's next step;
    /// a choice that has ended cancels nothing, so the other choices of its request go on.
    pub(super) events: EventStream,
    /// Reads a chat's reply as its format says (a chat rendered by its Jinja template).
    pub(super) parser: Option<ReplyParser>,
    /// llama-server's native response shape (`Kind::Native`).
    pub(super) native: Option<super::native::Shape>,
    /// The same shape, echoed as `__verbose` in an OpenAI response that asked for it.
    pub(super) verbose: Option<super::native::Shape>,
    /// The request's number (ids of Responses API objects are made of it).
    pub(super) serial: u64,
    /// Every streamed chunk carries `timings` (llama-server's `timings_per_token`).
    pub(super) timings_per_token: bool,
    /// The other choices of a request for several (`n`, or a native request's prompts).
    pub(super) siblings: Vec<super::handlers::Choice>,
}

impl Answer {
    /// The answer as an SSE stream: chunks as the text comes, then the end, the usage when asked
    /// for, and `[DONE]`. Several choices (`n`, a native request's prompts; OpenAI and native
    /// shapes) stream side by side, each chunk carrying its choice's index; the usage (over all
    /// choices) and `[DONE]` follow the last choice's end.
    pub(super) fn stream(mut self) -> Response {
        let siblings = std::mem::take(&mut self.siblings);
        if siblings.is_empty() {
            let keep_alive = self.state.config.sse_keep_alive;
            return with_keep_alive(Sse::new(SseBridge::new(self, None)), keep_alive);
        }
        let ended = Arc::new(std::sync::Mutex::new(Vec::with_capacity(1 + siblings.len())));
        let mut bridges = tokio_stream::StreamMap::with_capacity(1 + siblings.len());
        let answers: Vec<Answer> = siblings.into_iter().map(|choice| self.sibling(choice)).collect();
        let keep_alive = self.state.config.sse_keep_alive;
        let tail = Tail { kind: self.kind, meta: self.meta.clone(), include_usage: self.include_usage, ended: Arc::clone(&ended) };
        for (i, answer) in std::iter::once(self).chain(answers).enumerate() {
            bridges.insert(i, SseBridge::new(answer, Some(Several { index: i, ended: Arc::clone(&ended) })));
        }
        with_keep_alive(Sse::new(SeveralChoices { bridges, tail: Some(tail), rest: VecDeque::new() }), keep_alive)
    }

    /// The answer of another choice of the same request.
    fn sibling(&self, choice: super::handlers::Choice) -> Answer {
        let (native, verbose) = if self.kind == Kind::Native { (choice.shape, None) } else { (None, choice.shape) };
        Answer {
            state: Arc::clone(&self.state),
            model: Arc::clone(&self.model),
            meta: self.meta.clone(),
            kind: self.kind,
            received: self.received,
            include_usage: self.include_usage,
            logprobs: self.logprobs,
            events: choice.events,
            parser: choice.parser,
            native,
            verbose,
            serial: self.serial,
            timings_per_token: self.timings_per_token,
            siblings: Vec::new(),
        }
    }

    /// The answer as one body, once the request (each of its choices) has ended.
    pub(super) async fn whole(mut self) -> Response {
        let mut choices = Vec::with_capacity(1 + self.siblings.len());
        let first = super::handlers::Choice {
            events: std::mem::replace(&mut self.events, EventStream::finished()),
            parser: self.parser.take(),
            shape: self.native.take(),
        };
        let mut shapes = Vec::new();
        for choice in std::iter::once(first).chain(std::mem::take(&mut self.siblings)) {
            shapes.push(choice.shape);
            match collect(choice.events, choice.parser).await {
                Ok(collected) => choices.push(collected),
                Err(e) => return log::refused(&self.state, e),
            }
        }
        let state = &self.state;
        for (_, _, c) in &choices {
            log::finished(state, &self.meta.model, &self.meta.id, c, self.received);
            // A whole response's first token came after its queue wait and prefill: all of
            // its time but the generation's.
            if c.stats.completion_tokens > 0 {
                state.metrics.observe_ttft((ms(self.received.elapsed()) - c.stats.generation_ms).max(0.0));
            }
        }
        if self.kind == Kind::Native {
            let mut bodies: Vec<serde_json::Value> = choices
                .iter()
                .zip(&shapes)
                .filter_map(|((text, _, c), shape)| shape.as_ref().map(|shape| shape.response(&self.model, text, c, false)))
                .collect();
            // Several choices: llama-server's array of responses, each with its index.
            if bodies.len() == 1 {
                return Json(bodies.remove(0)).into_response();
            }
            for (i, body) in bodies.iter_mut().enumerate() {
                body["index"] = i.into();
            }
            return Json(bodies).into_response();
        }
        let mut bodies = choices.into_iter().map(|(text, reply, c)| self.body(text, reply, &c));
        let mut body = bodies.next().expect("at least one choice");
        for (i, other) in bodies.enumerate() {
            let mut choice = other["choices"][0].clone();
            choice["index"] = (i + 1).into();
            if let Some(choices) = body["choices"].as_array_mut() {
                choices.push(choice);
            }
            // One prompt, several completions: OpenAI counts the prompt once.
            for field in ["completion_tokens", "total_tokens"] {
                let sum = body["usage"][field].as_u64().unwrap_or(0) + other["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                body["usage"][field] = sum.into();
            }
        }
        Json(body).into_response()
    }

    /// The whole response of one choice.
    fn body(&self, text: String, reply: Option<ChatReply>, c: &Completion) -> serde_json::Value {
        if self.kind == Kind::Messages {
            let reply = reply.unwrap_or_else(|| ChatReply { content: text, ..Default::default() });
            return anthropic::message(&anthropic_id(self.serial), &self.meta.model, &reply, c.finish_reason, &c.stats);
        }
        if self.kind == Kind::Responses {
            let reply = reply.unwrap_or_else(|| ChatReply { content: text, ..Default::default() });
            return responses::response(&responses::Ids::new(self.serial), self.meta.created, &self.meta.model, &reply, "completed", Some(&c.stats));
        }
        let logprobs = if self.logprobs {
            self.kind.logprobs(&c.logprobs, |t| self.model.engine.token_bytes(t).unwrap_or_default())
        } else {
            serde_json::Value::Null
        };
        let called_tools = reply.as_ref().is_some_and(|r| !r.tool_calls.is_empty());
        let finish = finish_reason(c.finish_reason, called_tools);
        let mut body = self.kind.response(&self.meta, &text, reply.as_ref(), finish, &c.stats, logprobs);
        if let Some(verbose) = &self.verbose {
            body["__verbose"] = verbose.response(&self.model, &text, c, false);
        }
        body
    }
}

/// The id of an Anthropic message: `msg_` and the request's number.
fn anthropic_id(serial: u64) -> String {
    format!("msg_{serial:024}")
}

/// One choice's whole text, its reply as its chat format reads it, and how it ended.
pub(super) async fn collect(events: EventStream, parser: Option<ReplyParser>) -> Result<(String, Option<ChatReply>, Completion), ApiError> {
    let (text, completion) = events.collect_text().await?;
    let reply = parser.map(|p| p.read_whole(&text)).transpose()?;
    Ok((text, reply, completion))
}

/// An SSE response that sends `: keep-alive` after `every` without an event (none: never).
fn with_keep_alive<S>(sse: Sse<S>, every: Option<std::time::Duration>) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    match every {
        Some(every) => sse.keep_alive(KeepAlive::new().interval(every).text("keep-alive")).into_response(),
        None => sse.into_response(),
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
    /// Log-probabilities of tokens whose text has not gone out yet (a chat's format may hold text
    /// back): they go with the next chunk, or the last.
    pending_logprobs: Vec<crate::TokenLogprobs>,
    /// Tokens streamed so far (the native shape counts them in every chunk).
    predicted: usize,
    /// A Responses API stream: its typed events.
    responses: Option<responses::Events>,
    /// An Anthropic Messages stream: its typed events.
    anthropic: Option<anthropic::Events>,
    /// With `timings_per_token`: the timings so far, for the next chunk that goes out.
    pending_timings: Option<serde_json::Value>,
    /// One of several choices streamed together (see [`Answer::stream`]).
    several: Option<Several>,
}

/// A choice streamed beside others: its index, and where its final statistics go for the usage
/// after the last choice.
struct Several {
    index: usize,
    ended: Arc<std::sync::Mutex<Vec<crate::GenerationStats>>>,
}

impl SseBridge {
    fn new(answer: Answer, several: Option<Several>) -> SseBridge {
        let responses = (answer.kind == Kind::Responses)
            .then(|| responses::Events::new(responses::Ids::new(answer.serial), answer.meta.created, answer.meta.model.clone()));
        let anthropic = (answer.kind == Kind::Messages).then(|| anthropic::Events::new(anthropic_id(answer.serial), answer.meta.model.clone()));
        let mut bridge = SseBridge {
            answer,
            queue: VecDeque::new(),
            last: None,
            done: false,
            called_tools: false,
            pending_logprobs: Vec::new(),
            predicted: 0,
            responses,
            anthropic,
            pending_timings: None,
            several,
        };
        if bridge.answer.kind == Kind::Chat {
            let role = bridge.answer.kind.chunk(&bridge.answer.meta, Delta::Role);
            bridge.emit(role);
        }
        bridge
    }

    /// Queues a chunk as it is (with its choice's index, when several stream together).
    fn emit(&mut self, mut value: serde_json::Value) {
        if let Some(several) = &self.several {
            if self.answer.native.is_some() {
                value["index"] = several.index.into();
            } else if let Some(choice) = value.get_mut("choices").and_then(|c| c.get_mut(0)) {
                choice["index"] = several.index.into();
            }
        }
        self.queue.push_back(chunk(value));
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Delta(delta)) => {
                if self.answer.timings_per_token {
                    self.pending_timings = Some(super::openai::timings(&delta.stats));
                }
                if let Some(native) = &self.answer.native {
                    self.predicted += delta.tokens.len();
                    let value = native.chunk(&self.answer.model, &delta, self.predicted);
                    self.push(value);
                    return;
                }
                let crate::serving::Delta { text, logprobs, stats, .. } = delta;
                self.pending_logprobs.extend(logprobs);
                if self.responses.is_some() || self.anthropic.is_some() {
                    let deltas = match self.answer.parser.as_mut().map(|p| p.push(&text)) {
                        None => vec![ChatDelta::Content(text)],
                        Some(Ok(deltas)) => deltas,
                        Some(Err(e)) => return self.fail(e),
                    };
                    return self.push_events(&deltas, stats.prompt_tokens);
                }
                let a = &self.answer;
                let now = Instant::now();
                match self.last {
                    None => a.state.metrics.observe_ttft(ms(now - a.received)),
                    Some(previous) => a.state.metrics.observe_inter_token(ms(now - previous)),
                }
                self.last = Some(now);
                match self.answer.parser.as_mut().map(|p| p.push(&text)) {
                    None => {
                        let value = self.answer.kind.chunk(&self.answer.meta, Delta::Text(&text));
                        self.push(value);
                    }
                    Some(Ok(deltas)) => self.push_chat(&deltas),
                    Some(Err(e)) => self.fail(e),
                }
            }
            Some(Event::Progress(progress)) => {
                let progress = serde_json::json!({
                    "total": progress.total, "cache": progress.cache, "processed": progress.processed, "time_ms": progress.time_ms,
                });
                let a = &self.answer;
                if let Some(events) = self.responses.as_mut() {
                    self.queue.extend(events.progress(progress));
                    return;
                }
                let mut value = match &a.native {
                    Some(native) => native.progress_chunk(),
                    // A chunk without text (llama-server's shape: the role again, content null).
                    None if a.kind == Kind::Chat => a.kind.chunk(&a.meta, Delta::Role),
                    None => a.kind.chunk(&a.meta, Delta::Text("")),
                };
                value["prompt_progress"] = progress;
                self.emit(value);
            }
            Some(Event::Done(c)) => {
                if self.responses.is_some() || self.anthropic.is_some() {
                    if let Some(finished) = self.answer.parser.as_mut().map(ReplyParser::finish) {
                        match finished {
                            Ok((deltas, _)) => self.push_events(&deltas, c.stats.prompt_tokens),
                            Err(e) => return self.fail(e),
                        }
                    }
                    let a = &self.answer;
                    log::finished(&a.state, &a.meta.model, &a.meta.id, &c, a.received);
                    if let Some(events) = self.responses.as_mut() {
                        self.queue.extend(events.finish(&c.stats, super::openai::timings(&c.stats)));
                    }
                    if let Some(events) = self.anthropic.as_mut() {
                        self.queue.extend(events.finish(c.finish_reason, &c.stats));
                    }
                    self.done = true;
                    return;
                }
                if let Some(native) = &self.answer.native {
                    let a = &self.answer;
                    log::finished(&a.state, &a.meta.model, &a.meta.id, &c, a.received);
                    let last = native.response(&a.model, "", &c, true);
                    self.emit(last);
                    self.note_end(&c);
                    self.done = true;
                    return;
                }
                if let Some(finished) = self.answer.parser.as_mut().map(ReplyParser::finish) {
                    match finished {
                        Ok((deltas, _)) => self.push_chat(&deltas),
                        Err(e) => return self.fail(e),
                    }
                }
                let a = &self.answer;
                log::finished(&a.state, &a.meta.model, &a.meta.id, &c, a.received);
                let end = a.kind.chunk(&a.meta, Delta::End(finish_reason(c.finish_reason, self.called_tools)));
                let mut end = self.with_logprobs(end);
                if let Some(verbose) = &self.answer.verbose {
                    end["__verbose"] = verbose.response(&self.answer.model, "", &c, true);
                }
                let a = &self.answer;
                if a.include_usage && self.several.is_none() {
                    let usage = a.kind.usage_chunk(&a.meta, &c.stats);
                    self.emit(end);
                    self.emit(usage);
                } else {
                    // The timings go on the stream's last chunk, as llama-server sends them.
                    let mut end = end;
                    end["timings"] = super::openai::timings(&c.stats);
                    self.emit(end);
                }
                self.note_end(&c);
                self.end();
            }
            Some(Event::Failed(e)) => self.fail(e),
            // The decode loop stopped under the request.
            None => self.fail(EngineError::Cancelled),
        }
    }

    /// Chunks for what a chat's parser read.
    fn push_chat(&mut self, deltas: &[ChatDelta]) {
        for delta in deltas {
            self.called_tools |= matches!(delta, ChatDelta::ToolCall { .. });
            let value = self.answer.kind.chunk(&self.answer.meta, Delta::Chat(delta));
            self.push(value);
        }
    }

    /// Responses API or Anthropic events for what the reply's parser read.
    fn push_events(&mut self, deltas: &[ChatDelta], prompt_tokens: usize) {
        for delta in deltas {
            if let Some(events) = self.responses.as_mut() {
                let timings = if matches!(delta, ChatDelta::Content(_)) { self.pending_timings.take() } else { None };
                self.queue.extend(events.delta(delta, timings));
            }
            if let Some(events) = self.anthropic.as_mut() {
                self.queue.extend(events.delta(delta, prompt_tokens));
            }
        }
    }

    /// Queues a chunk, with the log-probabilities of the tokens up to its text (and the timings
    /// so far, when asked for).
    fn push(&mut self, value: serde_json::Value) {
        let mut value = self.with_logprobs(value);
        if let Some(timings) = self.pending_timings.take() {
            value["timings"] = timings;
        }
        self.emit(value);
    }

    /// A choice streamed beside others leaves its statistics for the usage after the last.
    fn note_end(&self, c: &Completion) {
        if let Some(several) = &self.several {
            several.ended.lock().unwrap_or_else(|p| p.into_inner()).push(c.stats.clone());
        }
    }

    /// `value` with the pending log-probabilities (in its kind's shape), which are then sent.
    fn with_logprobs(&mut self, mut value: serde_json::Value) -> serde_json::Value {
        let a = &self.answer;
        if a.logprobs && !self.pending_logprobs.is_empty() {
            value["choices"][0]["logprobs"] = a.kind.logprobs(&self.pending_logprobs, |t| a.model.engine.token_bytes(t).unwrap_or_default());
            self.pending_logprobs.clear();
        }
        value
    }

    fn fail(&mut self, e: EngineError) {
        let error = ApiError::from(e);
        self.answer.state.metrics.count_error(error.status);
        self.queue.push_back(chunk(error.body()));
        self.end();
    }

    fn end(&mut self) {
        // OpenAI's chat and completion streams end with [DONE] (after the last of several
        // choices: see `Tail`); the native, Responses and Anthropic ones just end.
        if self.answer.native.is_none() && self.responses.is_none() && self.anthropic.is_none() && self.several.is_none() {
            self.queue.push_back(SseEvent::default().data("[DONE]"));
        }
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

/// Several choices streamed together: each choice's events as they come, then the tail.
struct SeveralChoices {
    bridges: tokio_stream::StreamMap<usize, SseBridge>,
    tail: Option<Tail>,
    rest: VecDeque<SseEvent>,
}

/// What follows the last of several choices: the usage over all of them (the prompt counted
/// once, as OpenAI counts it) when asked for, and an OpenAI stream's `[DONE]`.
struct Tail {
    kind: Kind,
    meta: Meta,
    include_usage: bool,
    ended: Arc<std::sync::Mutex<Vec<crate::GenerationStats>>>,
}

impl Tail {
    fn events(self) -> VecDeque<SseEvent> {
        let mut events = VecDeque::new();
        if self.kind == Kind::Native {
            return events;
        }
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if self.include_usage
            && let Some(first) = ended.first()
        {
            let stats = crate::GenerationStats { completion_tokens: ended.iter().map(|s| s.completion_tokens).sum(), ..first.clone() };
            events.push_back(chunk(self.kind.usage_chunk(&self.meta, &stats)));
        }
        events.push_back(SseEvent::default().data("[DONE]"));
        events
    }
}

impl Stream for SeveralChoices {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.tail.is_some() {
            match Pin::new(&mut this.bridges).poll_next(cx) {
                Poll::Ready(Some((_, event))) => return Poll::Ready(Some(event)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.rest = this.tail.take().map(Tail::events).unwrap_or_default(),
            }
        }
        Poll::Ready(this.rest.pop_front().map(Ok))
    }
}
