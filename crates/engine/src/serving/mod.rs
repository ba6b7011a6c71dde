//! The serving core: many requests over one model, decoded together (continuous batching).
//!
//! One decode thread owns a context of N sequences (slots) sharing one KV cache. Every step is
//! one decode carrying the next token of every generating request plus chunks of the prompts of
//! newly admitted ones (bounded by n_batch, so a long prompt does not stall the others); each
//! request is then sampled at its own batch index with its own sampler chain and stop rules.
//! Requests reach the thread through a bounded queue ([`ServingConfig::max_queue`]: a full
//! queue is refused at once, never waited on) and get their [`Event`]s back on a channel of
//! their own. A request is admitted when a slot is free and the KV cache has room for its
//! prompt beside the running ones' (it waits in the queue otherwise); if generation fills the
//! cache, the caches idle slots keep are dropped first, then the newest request fails
//! (`DecodeFailure::NoKvSlot`) so that the older ones finish. A request whose receiver is dropped (its client left) or whose cancel token is
//! set ends at the next step, also during prefill, and frees its slot.
//!
//! A free slot keeps the tokens it decoded: a new request goes to the free slot whose cache
//! shares the longest prefix with its prompt, and only the rest is decoded. Where that needs a
//! cut the memory cannot make (a recurrent state, see docs/architectures.md), the slot starts
//! from empty instead.
//!
//! This is the engine side of `exsa serve` (the HTTP layer is [`crate::http`]); it runs on
//! backends `source` and `crate`. Backend `raw` has no sampler per sequence:
//! [`ServingCore::start`] refuses it with [`EngineError::Unsupported`].

mod scheduler;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use crate::backend::TokenId;
use crate::chat::ChatMessage;
use crate::config::{CancelToken, GenerateRequest, SamplingParams, SessionConfig, Speculation};
use crate::engine::{Engine, FinishReason, GenerationStats};
use crate::error::EngineError;
use exsa_bench_protocol::GreedyStep;

/// How the serving core runs.
#[derive(Clone, Debug)]
pub struct ServingConfig {
    /// Sequences decoded together (`--parallel`).
    pub slots: u32,
    /// Requests waiting for a slot at most; more are refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// The shared context: n_ctx is the KV cache all slots share (one request may use all of
    /// it while the others are idle); n_batch bounds the tokens of one step.
    pub session: SessionConfig,
}

impl ServingConfig {
    /// `slots` slots over the engine's session settings, with a queue of 4 per slot.
    pub fn new(engine: &Engine, slots: u32) -> Self {
        ServingConfig { slots, max_queue: 4 * slots as usize, session: engine.session_config().clone() }
    }
}

/// One request, tokenized.
#[derive(Clone, Debug)]
pub struct ServeRequest {
    pub tokens: Vec<TokenId>,
    pub max_tokens: usize,
    /// Generation stops before any of these; the stop text is not returned.
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    pub cancel: CancelToken,
    /// Record each generated token's log-probability and those of the `n` likeliest
    /// candidates (at most 20) in [`Completion::logprobs`], as OpenAI's `logprobs` asks.
    pub logprobs: Option<usize>,
    /// Prompt lookup ([`Speculation::Ngram`]) or off; a draft model is not served.
    pub speculation: Speculation,
}

impl ServeRequest {
    /// A completion request: the prompt tokenized as [`crate::Session::generate`] does.
    pub fn generate(engine: &Engine, request: &GenerateRequest) -> Result<ServeRequest, EngineError> {
        request.validate()?;
        Ok(Self::from_parts(engine.tokenize(&request.prompt, request.parse_special)?, request))
    }

    /// A chat request: the messages formatted and tokenized as [`crate::Session::chat`] does
    /// (message contents cannot forge control tokens).
    pub fn chat(engine: &Engine, messages: &[ChatMessage], request: &GenerateRequest) -> Result<ServeRequest, EngineError> {
        let tokens = engine.chat_tokens(messages, request.specials_in_messages)?;
        let request = GenerateRequest { prompt: " ".into(), ..request.clone() };
        request.validate()?;
        Ok(Self::from_parts(tokens, &request))
    }

    fn from_parts(tokens: Vec<TokenId>, request: &GenerateRequest) -> ServeRequest {
        ServeRequest {
            tokens,
            max_tokens: request.max_tokens,
            stop: request.stop.clone(),
            sampling: request.sampling.clone(),
            cancel: request.cancel.clone().unwrap_or_default(),
            logprobs: None,
            speculation: request.speculation,
        }
    }
}

/// What a request receives, in order: text deltas (valid UTF-8, free of stop sequences), then
/// exactly one `Done` or `Failed`. A request cancelled through its token ends with `Done` and
/// [`FinishReason::Cancelled`].
#[derive(Debug)]
pub enum Event {
    Delta(String),
    Done(Completion),
    Failed(EngineError),
}

/// How a request ended and what it measured.
#[derive(Clone, Debug)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
    /// The generated tokens.
    pub tokens: Vec<TokenId>,
    /// With [`ServeRequest::logprobs`]: one entry per generated token.
    pub logprobs: Vec<TokenLogprobs>,
}

/// A generated token's log-probability under the model (before the sampler's temperature and
/// cuts), and the likeliest candidates at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenId,
    pub logprob: f32,
    /// The `n` likeliest tokens, likeliest first.
    pub top: Vec<(TokenId, f32)>,
}

impl TokenLogprobs {
    /// `token`'s log-probability in a logits row and the row's `n` likeliest candidates (at most
    /// the row's width).
    pub(crate) fn from_row(row: &[f32], token: TokenId, n: usize) -> TokenLogprobs {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
        let mut top: Vec<(TokenId, f32)> = Vec::with_capacity(n + 1);
        for (i, &x) in row.iter().enumerate() {
            if top.len() < n || top.last().is_some_and(|&(_, worst)| x > worst) {
                let at = top.partition_point(|&(_, v)| v >= x);
                top.insert(at, (i as TokenId, x));
                top.truncate(n);
            }
        }
        for entry in &mut top {
            entry.1 -= lse;
        }
        let logit = row.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
        TokenLogprobs { token, logprob: logit - lse, top }
    }

    /// The step as the project's near-tie rule reads it (needs at least two candidates).
    pub fn greedy_step(&self) -> Option<GreedyStep> {
        let [(_, first), (runner_up, second), ..] = self.top[..] else { return None };
        Some(GreedyStep { token: self.token, runner_up, margin: first - second })
    }

    /// Whether `token` was among the listed candidates within `tolerance` of the likeliest.
    pub fn near_top(&self, token: TokenId, tolerance: f32) -> bool {
        let Some(&(_, best)) = self.top.first() else { return false };
        self.top.iter().any(|&(t, lp)| t == token && best - lp <= tolerance)
    }
}

/// How far a batched decode's log-probabilities may stray from a single-sequence decode's of
/// the same tokens. llama.cpp's kernels depend on the batch's size and make-up (matrix-product
/// paths, flash attention's tiling), and the differences grow through the cache. Measured on the
/// default model (Gemma 3 270M Q4_K_M, 8 sequences, 24 tokens, AMD EPYC Zen 4): the chosen
/// token's log-probability moved by up to 0.28 on our build and up to 0.39 on the crate
/// baseline's (AVX2) build, against 1e-3 or less between two single-sequence runs; the margin
/// between two candidates can move by the sum of their shifts. Greedy outputs of batched and
/// single decodes may therefore part where the top candidates are within this much; beyond it,
/// a difference is a bug (mixing up sequences moves logits by whole units).
pub const BATCH_NEAR_TIE: f32 = 1.0;

/// Waits for a request's end: its whole text and how it ended. A stream that ends without
/// `Done` or `Failed` (the core stopped under it) is [`EngineError::Cancelled`].
pub fn collect(events: Receiver<Event>) -> Result<(String, Completion), EngineError> {
    let mut text = String::new();
    for event in events {
        match event {
            Event::Delta(d) => text.push_str(&d),
            Event::Done(c) => return Ok((text, c)),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(EngineError::Cancelled)
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} requests wait already); retry later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    Stopped,
}

/// Counters of the decode loop, readable while it runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    queued: AtomicUsize,
    busy_slots: AtomicUsize,
    steps: AtomicU64,
    generated_tokens: AtomicU64,
    prompt_tokens_decoded: AtomicU64,
    prompt_tokens_reused: AtomicU64,
    kv_used: AtomicUsize,
    drafted_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    steps_without_drafts: AtomicU64,
}

/// A snapshot of the decode loop's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServingStatus {
    /// Requests accepted and waiting for a slot.
    pub queued: usize,
    /// Slots with a request.
    pub busy_slots: usize,
    /// Decodes run.
    pub steps: u64,
    pub generated_tokens: u64,
    pub prompt_tokens_decoded: u64,
    /// Prompt tokens found in a slot's cache and not decoded again.
    pub prompt_tokens_reused: u64,
    /// KV cache cells the slots hold, finished requests' caches (kept for reuse) included.
    pub kv_used: usize,
    /// The decode loop's slots.
    pub slots: usize,
    /// Speculation: tokens drafted by prompt lookup, and of those the ones kept.
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// Steps built again without their drafts because the KV cache had no room for them.
    pub steps_without_drafts: u64,
}

struct Submission {
    request: ServeRequest,
    events: mpsc::Sender<Event>,
}

/// The running decode loop. Dropping it (or [`ServingCore::shutdown`]) stops admission; requests
/// already accepted run to their end first.
pub struct ServingCore {
    queue: Option<SyncSender<Submission>>,
    max_queue: usize,
    slots: usize,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServingCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCore").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl ServingCore {
    /// Starts the decode thread over `engine`; returns once its context exists (or could not be
    /// made).
    pub fn start(engine: Arc<Engine>, config: ServingConfig) -> Result<ServingCore, EngineError> {
        let session = SessionConfig { n_seq: config.slots, ..config.session.clone() };
        session.validate()?;
        if config.max_queue == 0 {
            return Err(EngineError::InvalidConfig { field: "max_queue", value: "0".into(), reason: "must be at least 1" });
        }
        let (queue, requests) = mpsc::sync_channel(config.max_queue);
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let counters = Arc::new(Counters::default());
        let loop_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("exsa-decode".into())
            .spawn(move || scheduler::run(&engine, &session, requests, &loop_counters, ready_tx))
            .map_err(|e| EngineError::Session(e.into()))?;
        match ready.recv() {
            Ok(Ok(())) => {
                Ok(ServingCore { queue: Some(queue), max_queue: config.max_queue, slots: config.slots as usize, counters, thread: Some(thread) })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Session("the decode thread ended before its context was made".into()))
            }
        }
    }

    /// Queues a request; its events arrive on the returned receiver. Refused at once when the
    /// queue is full.
    pub fn submit(&self, request: ServeRequest) -> Result<Receiver<Event>, SubmitError> {
        let queue = self.queue.as_ref().ok_or(SubmitError::Stopped)?;
        let (events, receiver) = mpsc::channel();
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(Submission { request, events }) {
            Ok(()) => Ok(receiver),
            Err(e) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull { capacity: self.max_queue },
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    pub fn status(&self) -> ServingStatus {
        let c = &self.counters;
        ServingStatus {
            queued: c.queued.load(Ordering::Relaxed),
            busy_slots: c.busy_slots.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            prompt_tokens_decoded: c.prompt_tokens_decoded.load(Ordering::Relaxed),
            prompt_tokens_reused: c.prompt_tokens_reused.load(Ordering::Relaxed),
            kv_used: c.kv_used.load(Ordering::Relaxed),
            slots: self.slots,
            drafted_tokens: c.drafted_tokens.load(Ordering::Relaxed),
            accepted_tokens: c.accepted_tokens.load(Ordering::Relaxed),
            steps_without_drafts: c.steps_without_drafts.load(Ordering::Relaxed),
        }
    }

    /// Stops admission and waits until every accepted request has ended.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServingCore {
    fn drop(&mut self) {
        self.stop();
    }
}
