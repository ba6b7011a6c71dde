//! A generation in progress, why it ended and what it measured.

use std::time::Instant;

use serde::Serialize;

use super::Session;
use crate::backend::{BackendModel, BackendSession, Outputs, TokenId};
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
    /// Decodes run during generation (prompt processing not counted): with speculation, fewer
    /// than the tokens generated.
    pub generation_decodes: usize,
    /// Speculation: tokens drafted, and of those the ones the model confirmed.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
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
    /// With speculation ([`crate::Speculation`]) on.
    pub(super) speculation: Option<SpeculationState>,
    /// The generated tokens (end of generation not included).
    pub(super) tokens: Vec<TokenId>,
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

    /// The tokens generated so far (an end-of-generation token is not listed).
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
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

    /// One token (or, with speculation, one verified run of tokens): sample, detokenize, check
    /// stops, decode for the next step. Text to emit goes to `self.delta`.
    fn step(&mut self) -> Result<(), EngineError> {
        if self.cancel.is_cancelled() {
            self.finish(FinishReason::Cancelled);
            return Ok(());
        }
        let token = match self.speculation.as_mut().and_then(|s| s.next.take()) {
            Some(token) => token,
            None => self.session.inner.sample()?,
        };
        if self.stats.completion_tokens == 0 {
            self.stats.time_to_first_token_ms = ms(Instant::now() - self.started);
        }
        if self.emit(token)? {
            return Ok(());
        }
        if self.speculation.is_some() { self.speculate(token) } else { self.decode_one(token) }
    }

    /// Handles a generated token before it is decoded: end of text, its text (stop sequences
    /// held back and cut), max tokens, context room. True when the generation ended with it.
    fn emit(&mut self, token: TokenId) -> Result<bool, EngineError> {
        let model = self.session.engine.model();
        let reason = if model.is_eog(token) {
            Some(FinishReason::EndOfText)
        } else {
            self.stats.completion_tokens += 1;
            self.tokens.push(token);
            if self.text.push(model, token, &mut self.delta)? {
                Some(FinishReason::StopSequence)
            } else if self.stats.completion_tokens >= self.max_tokens {
                Some(FinishReason::MaxTokens)
            } else if self.session.cached.len() + 1 >= self.session.n_ctx() as usize {
                Some(FinishReason::ContextFull)
            } else {
                None
            }
        };
        if let Some(reason) = reason {
            self.finish(reason);
        }
        Ok(reason.is_some())
    }

    /// Decodes `token` alone: its logits are the next step's.
    fn decode_one(&mut self, token: TokenId) -> Result<(), EngineError> {
        let session = &mut *self.session;
        let pos = session.cached.len() as i32;
        let decode_started = Instant::now();
        let decoded = session.inner.decode(&[token], pos, Outputs::Last);
        // Counted as decoding: GPU and RPC backends return before the work is done.
        session.inner.synchronize();
        self.stats.decode_ms += ms(decode_started.elapsed());
        self.stats.generation_decodes += 1;
        match decoded {
            Ok(()) => {
                session.cached.push(token);
                Ok(())
            }
            Err(EngineError::Cancelled) => {
                session.reset();
                self.finish(FinishReason::Cancelled);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Decodes `token` with the tokens drafted after it in one batch, then draws each position
    /// with the request's sampler in turn: drafts are kept while they equal what was drawn, and
    /// the first draw that differs is the next step's token. Every emitted token is thus a draw
    /// from the distribution it has without speculation (see [`crate::Speculation`]). The
    /// cache is cut back to what was kept.
    fn speculate(&mut self, token: TokenId) -> Result<(), EngineError> {
        let spec = self.speculation.as_mut().expect("speculating generations have their state");
        let session = &mut *self.session;
        let pos = session.cached.len();
        // Room: the batch, the context (one position kept for the next token), and max tokens
        // (a draft past them would be cut anyway).
        let room = (session.n_ctx() as usize)
            .saturating_sub(pos + 2)
            .min(session.inner.n_batch() as usize - 1)
            .min(self.max_tokens.saturating_sub(self.stats.completion_tokens))
            .min(spec.length.get());
        let mut drafts = std::mem::take(&mut spec.drafts);
        drafts.clear();
        session.cached.push(token);
        if spec.from_model {
            let drafter = session.draft.as_mut().expect("draft sessions are opened when the generation starts");
            if drafter.draft_greedy(&session.cached, room, &mut drafts).is_err() {
                // A draft that cannot be made (its context full, a failed decode) costs the
                // round its drafts, not the request.
                drafts.clear();
            }
        } else {
            crate::speculative::draft(&session.cached, room, &mut drafts);
        }
        session.cached.pop();
        if drafts.is_empty() {
            self.speculation.as_mut().expect("still speculating").drafts = drafts;
            return self.decode_one(token);
        }
        let decode_started = Instant::now();
        let decoded = (|| {
            session.inner.batch_clear();
            for (i, &t) in std::iter::once(&token).chain(&drafts).enumerate() {
                session.inner.batch_push(t, (pos + i) as i32, 0, true)?;
            }
            session.inner.batch_decode()
        })();
        session.inner.synchronize();
        self.stats.decode_ms += ms(decode_started.elapsed());
        self.stats.generation_decodes += 1;
        if let Err(e) = decoded {
            // The cache may hold part of the batch: start clean.
            session.reset();
            if matches!(e, EngineError::Cancelled) {
                self.finish(FinishReason::Cancelled);
                return Ok(());
            }
            return Err(e);
        }
        session.cached.push(token);
        self.stats.drafted_tokens += drafts.len();
        let mut accepted = 0;
        let mut next = None;
        let verified = (|| {
            for i in 0..=drafts.len() {
                let drawn = self.session.inner.sample_at(i as i32)?;
                if drafts.get(i) != Some(&drawn) {
                    next = Some(drawn);
                    break;
                }
                accepted += 1;
                if self.emit(drawn)? {
                    break;
                }
                self.session.cached.push(drawn);
            }
            Ok::<_, EngineError>(())
        })();
        self.stats.accepted_tokens += accepted;
        if let Err(e) = verified {
            // The cache holds drafts `cached` does not list: start clean.
            self.session.reset();
            return Err(e);
        }
        let session = &mut *self.session;
        // Rejected drafts (and an accepted one that ended the generation) leave the cache.
        let keep = session.cached.len();
        if !session.inner.truncate(keep as i32) {
            // A memory that cannot cut back (recurrent state): decode what is kept again.
            let kept = session.cached.clone();
            session.reset();
            session.prefill(&kept)?;
        }
        let spec = self.speculation.as_mut().expect("still speculating");
        spec.length.update(drafts.len(), accepted);
        spec.next = next;
        spec.drafts = drafts;
        Ok(())
    }
}

/// A speculating generation's state between steps.
#[derive(Debug)]
pub(super) struct SpeculationState {
    /// Drafts come from the draft model (else from prompt lookup).
    pub(super) from_model: bool,
    pub(super) length: crate::speculative::DraftLength,
    /// The token the last verification drew after the kept drafts: the next step's.
    pub(super) next: Option<TokenId>,
    /// Reused for every round's drafts.
    pub(super) drafts: Vec<TokenId>,
}

impl Iterator for Generation<'_, '_> {
    type Item = Result<String, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_text().map(|delta| delta.map(str::to_owned))
    }
}
