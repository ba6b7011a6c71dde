//! How a generation ended and what it measured: the same for a single stream and for a request
//! of the serving loop, which both end through one path (`scheduler`).

use std::time::Duration;

use serde::Serialize;

use crate::token::{Token, TokenLogprobs};

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
    /// The request's cancel token was triggered (or its client left).
    Cancelled,
}

/// What a finished generation measured.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens already in the KV cache from an earlier request (not decoded again).
    pub prompt_tokens_reused: usize,
    /// Tokens generated (an end-of-generation token not counted).
    pub completion_tokens: usize,
    /// From the request's arrival (before tokenizing) to the first generated token: queueing,
    /// tokenizing and prompt processing included.
    pub time_to_first_token_ms: f64,
    /// From the request getting its slot (a server's queue not counted) to the end of prompt
    /// processing.
    pub prompt_ms: f64,
    /// From the end of prompt processing to the last token's text.
    pub generation_ms: f64,
    /// Of `generation_ms`, the time spent in the backend's decodes; the rest went to sampling,
    /// detokenizing, stop-sequence checks and streaming (and to the caller between deltas).
    pub decode_ms: f64,
    /// Prompt tokens decoded per second of `prompt_ms`.
    pub prompt_tokens_per_s: f64,
    /// Completion tokens per second as the user sees them: sampled, detokenized, streamed.
    pub generation_tokens_per_s: f64,
    /// Why the generation ended; None while it has not.
    pub finish_reason: Option<FinishReason>,
    /// Decodes run during generation (prompt processing not counted): with speculation, fewer
    /// than the tokens generated.
    pub generation_decodes: usize,
    /// Speculation: tokens drafted, and of those the ones the model confirmed.
    pub drafted_tokens: usize,
    /// Speculation: of the drafted tokens, the ones the model confirmed.
    pub accepted_tokens: usize,
    /// Speculation on a recurrent state: tokens decoded again because a round's rejected drafts
    /// could not be dropped (the kept part of the round, after its checkpoint).
    pub replayed_tokens: usize,
}

impl GenerationStats {
    /// The share of the generation's time spent outside decoding, in percent (0 before any
    /// generation time was measured).
    pub fn outside_decode_percent(&self) -> f64 {
        if self.generation_ms > 0.0 { 100.0 * (self.generation_ms - self.decode_ms).max(0.0) / self.generation_ms } else { 0.0 }
    }
}

/// How a request ended and what it produced.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// What it measured.
    pub stats: GenerationStats,
    /// The generated tokens (an end-of-generation token is not listed).
    pub tokens: Vec<Token>,
    /// With log-probabilities asked for: one entry per drawn token (the end-of-generation token
    /// included).
    pub logprobs: Vec<TokenLogprobs>,
}

/// How far a request's prompt has been decoded (llama-server's `prompt_progress`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PromptProgress {
    /// Prompt tokens in all.
    pub total: usize,
    /// Of those, the ones the cache held already.
    pub cache: usize,
    /// Of those, the ones in the cache now (the cached ones included).
    pub processed: usize,
    /// Since the request got its slot.
    pub time_ms: f64,
}

/// A slot of a serving loop, as of its last step.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SlotState {
    /// The slot's index (0 to the number of slots - 1).
    pub id: usize,
    /// It has a request.
    pub processing: bool,
    /// Its request's prompt is still being decoded.
    pub prefilling: bool,
    /// Tokens its cache holds (kept after a request for the next one to reuse).
    pub cached_tokens: usize,
    /// Its request's prompt and generated tokens so far (0 without a request).
    pub prompt_tokens: usize,
    /// Tokens its request has generated so far (0 without a request).
    pub generated_tokens: usize,
}

/// What [`crate::serving::ServingCore::slot_action`] does to an idle slot's cache
/// (llama-server's `POST /slots/{id}?action=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotAction {
    /// Writes the cache and its tokens to the file (llama.cpp's sequence state format).
    Save(std::path::PathBuf),
    /// Replaces the cache with a file's (written by `Save`, or by llama-server with the same
    /// model and context settings).
    Restore(std::path::PathBuf),
    /// Empties the cache.
    Erase,
}

/// What a slot action did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotActionDone {
    /// Tokens saved, restored or erased.
    pub tokens: usize,
    /// Bytes of the file written or read (0 for an erase).
    pub bytes: u64,
    /// How long the action took, in milliseconds.
    pub ms: f64,
}

/// Milliseconds, as the engine's statistics count them.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
