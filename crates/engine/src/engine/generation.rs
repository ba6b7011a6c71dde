//! A generation in progress, why it ended and what it measured.

use std::time::Instant;

use serde::Serialize;

use super::Session;
use crate::backend::{BackendModel, BackendSession, Outputs};
use crate::config::CancelToken;
use crate::error::EngineError;
use crate::token_text::{TokenText, ms};

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfText,
    /// A stop sequence was produced (and not returned).
    StopSequence,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The request's cancel token was triggered.
    Cancelled,
}

/// What a finished generation measured.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens already in the KV cache from the previous request (not decoded again).
    pub prompt_tokens_reused: usize,
    pub completion_tokens: usize,
    /// From the request to the first generated token, prompt processing included.
    pub time_to_first_token_ms: f64,
    pub prompt_ms: f64,
    /// From the end of prompt processing to the last token's text.
    pub generation_ms: f64,
    /// Of `generation_ms`, the time spent in the backend's decode; the rest went to sampling,
    /// detokenizing, stop-sequence checks and streaming (and to the caller between deltas).
    pub decode_ms: f64,
    /// Prompt tokens decoded per second.
    pub prompt_tokens_per_s: f64,
    /// Completion tokens per second as the user sees them: sampled, detokenized, streamed.
    pub generation_tokens_per_s: f64,
    pub finish_reason: Option<FinishReason>,
}

impl GenerationStats {
    /// Records how the generation ended and its generation time (from `prompt_done`) and speed.
    pub(crate) fn end(&mut self, reason: FinishReason, prompt_done: Instant) {
        self.finish_reason = Some(reason);
        self.generation_ms = ms(Instant::now() - prompt_done);
        if self.generation_ms > 0.0 {
            self.generation_tokens_per_s = self.completion_tokens as f64 / (self.generation_ms / 1000.0);
        }
    }

    /// The share of the generation's time spent outside decoding, in percent (0 before any
    /// generation time was measured).
    pub fn outside_decode_percent(&self) -> f64 {
        if self.generation_ms > 0.0 { 100.0 * (self.generation_ms - self.decode_ms).max(0.0) / self.generation_ms } else { 0.0 }
    }
}

/// A generation in progress: an iterator of text deltas, or, without an allocation per token,
/// [`Generation::next_text`].
pub struct Generation<'s, 'e> {
    pub(super) session: &'s mut Session<'e>,
    pub(super) max_tokens: usize,
    pub(super) cancel: CancelToken,
    pub(super) text: TokenText,
    /// What the current step emits (keeps its allocation across steps).
    pub(super) delta: String,
    pub(super) started: Instant,
    pub(super) prompt_done: Instant,
    pub(super) stats: GenerationStats,
    pub(super) finished: bool,
}

impl std::fmt::Debug for Generation<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Generation<'_, '_> {
    /// The measurements so far; complete once the iterator has returned None.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// The next text delta, lent until the next call: what the iterator yields, without
    /// allocating a `String` for it. None once the generation has finished.
    pub fn next_text(&mut self) -> Option<Result<&str, EngineError>> {
        while !self.finished {
            self.delta.clear();
            match self.step() {
                Ok(()) if !self.delta.is_empty() => return Some(Ok(&self.delta)),
                Ok(()) => {}
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }

    /// Ends the generation, appending whatever text was held back to the step's delta.
    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.text.finish(reason, &mut self.delta);
        self.stats.end(reason, self.prompt_done);
    }

    /// One token: sample, detokenize, check stops, decode it for the next step. Text to emit
    /// goes to `self.delta`.
    fn step(&mut self) -> Result<(), EngineError> {
        if self.cancel.is_cancelled() {
            self.finish(FinishReason::Cancelled);
            return Ok(());
        }
        let session = &mut *self.session;
        let token = session.inner.sample()?;
        if self.stats.completion_tokens == 0 {
            self.stats.time_to_first_token_ms = ms(Instant::now() - self.started);
        }
        let model = session.engine.model();
        if model.is_eog(token) {
            self.finish(FinishReason::EndOfText);
            return Ok(());
        }
        self.stats.completion_tokens += 1;
        if self.text.push(model, token, &mut self.delta)? {
            self.finish(FinishReason::StopSequence);
            return Ok(());
        }
        let done = if self.stats.completion_tokens >= self.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if session.cached.len() + 1 >= session.n_ctx() as usize {
            Some(FinishReason::ContextFull)
        } else {
            let pos = session.cached.len() as i32;
            let decode_started = Instant::now();
            let decoded = session.inner.decode(&[token], pos, Outputs::Last);
            self.stats.decode_ms += ms(decode_started.elapsed());
            match decoded {
                Ok(()) => {
                    session.cached.push(token);
                    None
                }
                Err(EngineError::Cancelled) => {
                    session.reset();
                    Some(FinishReason::Cancelled)
                }
                Err(e) => return Err(e),
            }
        };
        if let Some(reason) = done {
            self.finish(reason);
        }
        Ok(())
    }
}

impl Iterator for Generation<'_, '_> {
    type Item = Result<String, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_text().map(|delta| delta.map(str::to_owned))
    }
}
