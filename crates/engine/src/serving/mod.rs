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
//! The decode thread drives the same scheduler as a single-stream [`crate::Session`] (with N
//! slots instead of one), so a request's tokens follow the same rules either way. Requests are
//! prepared on the caller's thread ([`ServeRequest::new`]: tokenized, their sampler and grammar
//! built once), and their events go to an [`EventSink`] of the caller's choice (a std channel by
//! default; the HTTP layer hands a tokio channel, so no thread waits per stream).
//!
//! This is the engine side of `exsa serve` (the HTTP layer is `crate::http`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use crate::backend::BackendModel;
use crate::config::{GenerateRequest, SessionConfig, Speculation};
use crate::engine::{Engine, Sampler, SessionState};
pub use crate::error::SubmitError;
use crate::error::{EngineError, cause};
pub use crate::outcome::PromptProgress;
use crate::outcome::{SlotAction, SlotActionDone};
use crate::scheduler::{Counters, DefaultScales, Ended, Prepared, Scheduler};

pub use crate::outcome::Completion;
pub use crate::token::TokenLogprobs;

mod owned_session;
#[cfg(feature = "tokio")]
mod stream;
pub use owned_session::OwnedSession;
#[cfg(feature = "tokio")]
pub use stream::EventStream;

/// How the serving core runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServingConfig {
    /// Sequences decoded together (`--parallel`).
    pub slots: u32,
    /// Requests waiting for a slot at most; more are refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// The shared context: n_ctx is the KV cache all slots share (one request may use all of
    /// it while the others are idle); n_batch bounds the tokens of one step.
    pub session: SessionConfig,
    /// Most prompt tokens in a step while other requests generate (None: as many as the batch
    /// has room for, as in a step with none generating). A long prompt then delays each
    /// stream's next token by this many tokens' compute, not a whole batch's, and takes more
    /// steps to start: 128 halved the short chats' inter-token p99 beside 2,000-token prompts
    /// on the 2-core Xeon and cost 25 % of the aggregate (docs/benchmarks.md, "long-prompt"),
    /// so it is not the default.
    pub prefill_chunk: Option<u32>,
    /// Recurrent checkpoints each slot keeps, on a model whose memory holds a recurrent state
    /// (LFM2, Mamba: it cannot be cut back to an earlier position). One is taken
    /// [`Self::CHECKPOINT_BEFORE_END`] tokens before the end of each prompt; a later prompt that
    /// extends that far (a chat's next turn) returns to it and decodes only the rest. 0: none
    /// (such a prompt is decoded whole). Ignored on attention-only models.
    pub ctx_checkpoints: u32,
}

impl ServingConfig {
    /// Recurrent checkpoints per slot by default (llama-server's `--ctx-checkpoints` default).
    pub const DEFAULT_CTX_CHECKPOINTS: u32 = crate::scheduler::DEFAULT_CHECKPOINTS as u32;
    /// How many tokens before a prompt's end its recurrent checkpoint is taken: the template's
    /// opening of the reply may tokenize otherwise once a reply follows it.
    pub const CHECKPOINT_BEFORE_END: usize = crate::scheduler::CHECKPOINT_BEFORE_END;

    /// Context each slot should be able to count on, in tokens, when the slot count is chosen
    /// for the context (the cache is shared: one request may still use all of it).
    pub const CONTEXT_PER_SLOT: u32 = 1024;
    /// Most slots chosen for a context: on the 2-core Xeon where it was measured, 16 slots gave
    /// 16 clients 1.26x the aggregate of 8 slots (docs/benchmarks.md, "Filling the machine").
    pub const MAX_DEFAULT_SLOTS: u32 = 16;

    /// Slots for a shared context of `n_ctx` tokens when none are asked for: one per
    /// [`Self::CONTEXT_PER_SLOT`] tokens, 1 to [`Self::MAX_DEFAULT_SLOTS`] (4 at 4,096 tokens,
    /// 16 at 16,384).
    pub fn default_slots(n_ctx: u32) -> u32 {
        (n_ctx / Self::CONTEXT_PER_SLOT).clamp(1, Self::MAX_DEFAULT_SLOTS)
    }

    /// `slots` slots over the engine's session settings, with a queue of 4 per slot.
    pub fn new(engine: &Engine, slots: u32) -> Self {
        ServingConfig {
            slots,
            max_queue: 4 * slots as usize,
            session: engine.session_config().clone(),
            prefill_chunk: None,
            ctx_checkpoints: Self::DEFAULT_CTX_CHECKPOINTS,
        }
    }

    /// Sets [`ServingConfig::slots`] ([`ServingConfig::max_queue`] stays as it is).
    #[must_use]
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Sets [`ServingConfig::max_queue`].
    #[must_use]
    pub fn max_queue(mut self, max_queue: usize) -> Self {
        self.max_queue = max_queue;
        self
    }

    /// Sets [`ServingConfig::session`].
    #[must_use]
    pub fn session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Sets [`ServingConfig::prefill_chunk`].
    #[must_use]
    pub fn prefill_chunk(mut self, prefill_chunk: u32) -> Self {
        self.prefill_chunk = Some(prefill_chunk);
        self
    }

    /// Sets [`ServingConfig::ctx_checkpoints`].
    #[must_use]
    pub fn ctx_checkpoints(mut self, ctx_checkpoints: u32) -> Self {
        self.ctx_checkpoints = ctx_checkpoints;
        self
    }
}

/// A request ready for a serving core: tokenized, its options checked, its sampler (and grammar)
/// built, on the caller's thread, so that a bad request is refused before it is queued and the
/// decode loop never parses a grammar.
pub struct ServeRequest {
    // Declared before `engine`: the sampler borrows the engine's model, so it is dropped first.
    prepared: Prepared<Sampler<'static>>,
    engine: Arc<Engine>,
    parser: Option<crate::ReplyParser>,
}

impl std::fmt::Debug for ServeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeRequest").field("prompt_tokens", &self.prepared.tokens.len()).field("options", &self.prepared.options).finish()
    }
}

impl ServeRequest {
    /// Prepares `request` for a core serving `engine`: its prompt tokenized as its kind asks
    /// (chats with the model's template, message contents kept as text), its sampler built.
    pub fn new(engine: &Arc<Engine>, request: &GenerateRequest) -> Result<ServeRequest, EngineError> {
        let (prepared, parser) = engine.prepare(request)?;
        let Prepared { tokens, options, sampler, arrived } = prepared;
        // SAFETY: only the lifetime changes (the same type otherwise, which transmute checks by
        // size). The sampler borrows the model inside `engine`, which this request holds in an Arc
        // declared after it (dropped after it), and which the core it is submitted to holds for as
        // long as it runs the request (`submit_to` refuses a request prepared for another engine):
        // the model outlives the sampler either way. The field is private, so no other code can
        // take the sampler out of that arrangement. (The raw backend's sampler borrows nothing: there
        // the transmute is the identity.)
        #[allow(clippy::useless_transmute)]
        let sampler = unsafe { std::mem::transmute::<Sampler<'_>, Sampler<'static>>(sampler) };
        Ok(ServeRequest { prepared: Prepared { tokens, options, sampler, arrived }, engine: Arc::clone(engine), parser })
    }

    /// The parser of the reply, for a chat rendered by the model's Jinja template (once).
    pub fn take_reply_parser(&mut self) -> Option<crate::ReplyParser> {
        self.parser.take()
    }

    /// The prompt's tokens.
    pub fn tokens(&self) -> &[crate::Token] {
        &self.prepared.tokens
    }

    /// Bounds `max_tokens` by `limit` (a server bounds it by the context that is left).
    pub fn limit_max_tokens(&mut self, limit: usize) {
        self.prepared.options.max_tokens = self.prepared.options.max_tokens.min(limit);
    }
}

/// What a request receives, in order: text deltas (valid UTF-8, free of stop sequences), then
/// exactly one `Done` or `Failed`. The deltas' tokens and log-probabilities, in order, are those of
/// the `Done`'s [`Completion`] (log-probabilities only where the request asked for them). A request cancelled through its token (or whose receiver went
/// away) while it runs ends with `Done` and [`crate::FinishReason::Cancelled`]; one cancelled
/// before it got a slot is refused with `Failed(EngineError::Cancelled)`.
#[derive(Debug)]
pub enum Event {
    /// Text and the tokens that made it.
    Delta(Delta),
    /// The prompt's progress, for requests that asked ([`crate::GenerateOptions::prompt_progress`]).
    Progress(PromptProgress),
    /// The request ended: how, with every token and its statistics. The last event.
    Done(Completion),
    /// The request failed (a prompt that does not fit, a decode error, a cancel before it got a
    /// slot). The last event.
    Failed(EngineError),
}

/// Text a request produced, with the tokens drawn since the last delta (a token whose text was
/// held back for a stop-sequence check comes with the text it was held for).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// The text, valid UTF-8 and free of stop sequences.
    pub text: String,
    /// The tokens drawn since the last delta.
    pub tokens: Vec<crate::Token>,
    /// With log-probabilities asked for: one entry per token of `tokens`.
    pub logprobs: Vec<crate::TokenLogprobs>,
    /// The request's statistics so far (the last delta of a request has its final ones in `Done`).
    pub stats: crate::GenerationStats,
}

/// Where a request's events go. The decode loop never waits on it: an implementation must not
/// block (a channel without bound per request is fine: a request sends at most one event per
/// token it generates, and the context bounds those).
pub trait EventSink: Send + 'static {
    /// Delivers an event; false when nobody listens any more (the request is then cancelled).
    fn send(&mut self, event: Event) -> bool;
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        mpsc::Sender::send(self, event).is_ok()
    }
}

/// How far a batched decode's log-probabilities may stray from a single-sequence decode's of
/// the same tokens. llama.cpp's kernels depend on the batch's size and make-up (matrix-product
/// paths, flash attention's tiling), and the differences grow through the cache. Measured on the
/// default model (Gemma 3 270M Q4_K_M, every step of the serving, speculation and server tests,
/// AMD EPYC Zen 4): a token's log-probability moved by up to 0.56, and near-tie swaps happened at
/// solo gaps of up to 0.60, against 1e-3 or less between two single-sequence runs. Greedy outputs
/// of batched and single decodes may therefore part where the top candidates are within this
/// much; beyond it, a difference is a bug (mixing up sequences moves logits by whole units).
pub const BATCH_NEAR_TIE: f32 = 1.0;

/// Waits for a request's end: its whole text and how it ended. A stream that ends without
/// `Done` or `Failed` (the core stopped under it) is [`EngineError::Cancelled`].
pub fn collect(events: Receiver<Event>) -> Result<(String, Completion), EngineError> {
    let mut text = String::new();
    for event in events {
        if let Some(end) = gather(&mut text, event) {
            return end.map(|c| (text, c));
        }
    }
    Err(EngineError::Cancelled)
}

/// Adds `event`'s text to `text`; the request's end once it comes (the one rule of [`collect`]
/// and the async `EventStream::collect_text`).
fn gather(text: &mut String, event: Event) -> Option<Result<Completion, EngineError>> {
    match event {
        Event::Delta(d) => {
            text.push_str(&d.text);
            None
        }
        Event::Progress(_) => None,
        Event::Done(c) => Some(Ok(c)),
        Event::Failed(e) => Some(Err(e)),
    }
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
    /// Tokens generated, every request's together.
    pub generated_tokens: u64,
    /// Prompt tokens decoded (those reused from a cache are not).
    pub prompt_tokens_decoded: u64,
    /// Prompt tokens found in a slot's cache and not decoded again.
    pub prompt_tokens_reused: u64,
    /// Of those, the tokens a slot took from another slot's cache by a sequence copy (a shared
    /// system prompt computed once for every slot).
    pub prompt_tokens_copied: u64,
    /// KV cache cells the slots hold, finished requests' caches (kept for reuse) included.
    pub kv_used: usize,
    /// Recurrent checkpoints the slots keep ([`ServingConfig::ctx_checkpoints`]).
    pub checkpoints: usize,
    /// The bytes those checkpoints hold (host memory).
    pub checkpoint_bytes: usize,
    /// The decode loop's slots.
    pub slots: usize,
    /// Speculation: tokens drafted (by prompt lookup, or by the draft model).
    pub drafted_tokens: u64,
    /// Of the drafted tokens, those the verification kept.
    pub accepted_tokens: u64,
    /// Tokens decoded again after rounds whose rejected drafts a recurrent state could not drop.
    pub replayed_tokens: u64,
    /// Steps built again without their drafts because the KV cache had no room for them.
    pub steps_without_drafts: u64,
}

struct Submission {
    request: ServeRequest,
    sink: Box<dyn EventSink>,
}

/// What reaches the decode thread through the queue. (Nearly every job is a request: boxing it
/// to shrink the enum would only add an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Job {
    Generate(Submission),
    Slot(SlotJob),
}

/// Work on one slot's cache: it runs once the slot is idle.
struct SlotJob {
    slot: usize,
    work: SlotWork,
}

/// What a [`SlotJob`] does, with the channel its outcome goes back on.
enum SlotWork {
    Action(SlotAction, SyncSender<Result<SlotActionDone, EngineError>>),
    SaveState(SyncSender<Result<SessionState, EngineError>>),
    RestoreState(SessionState, SyncSender<Result<(), EngineError>>),
}

impl SlotJob {
    fn run<M: BackendModel, C>(self, scheduler: &mut Scheduler<'_, M, C>) {
        let slot = self.slot;
        match self.work {
            SlotWork::Action(action, reply) => drop(reply.send(scheduler.slot_action(slot, &action))),
            SlotWork::SaveState(reply) => drop(reply.send(scheduler.save_state(slot).map(SessionState::from))),
            SlotWork::RestoreState(saved, reply) => drop(reply.send(scheduler.restore_state(slot, &saved.tokens, &saved.adapters(), &saved.state))),
        }
    }
}

/// The running decode loop. Dropping it (or [`ServingCore::shutdown`]) stops admission; requests
/// already accepted run to their end first.
pub struct ServingCore {
    engine: Arc<Engine>,
    queue: Option<SyncSender<Job>>,
    max_queue: usize,
    slots: usize,
    counters: Arc<Counters>,
    /// The LoRA adapter scales of requests that set none, which the decode loop reads.
    adapter_scales: DefaultScales,
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
        let session = SessionConfig { n_seq_max: config.slots, ..config.session.clone() };
        session.validate()?;
        if config.max_queue == 0 {
            return Err(EngineError::InvalidConfig { field: "max_queue", value: "0".into(), reason: "must be at least 1" });
        }
        if config.prefill_chunk == Some(0) {
            return Err(EngineError::InvalidConfig { field: "prefill_chunk", value: "0".into(), reason: "must be at least 1" });
        }
        let tuning = Tuning { prefill_chunk: config.prefill_chunk.map(|n| n as usize), checkpoints: config.ctx_checkpoints as usize };
        let adapter_scales: DefaultScales = Arc::new(std::sync::RwLock::new(engine.session_adapter_scales(&session)?));
        let loop_scales = Arc::clone(&adapter_scales);
        let (queue, requests) = mpsc::sync_channel(config.max_queue);
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let counters = Arc::new(Counters::default());
        let loop_counters = Arc::clone(&counters);
        let loop_engine = Arc::clone(&engine);
        let thread = std::thread::Builder::new()
            .name("exsa-decode".into())
            .spawn(move || decode_loop(&loop_engine, &session, tuning, requests, loop_counters, loop_scales, ready_tx))
            .map_err(|e| EngineError::Session(cause(e)))?;
        match ready.recv() {
            Ok(Ok(())) => Ok(ServingCore {
                engine,
                queue: Some(queue),
                max_queue: config.max_queue,
                slots: config.slots as usize,
                counters,
                adapter_scales,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Session(cause("the decode thread ended before its context was made")))
            }
        }
    }

    /// The engine the core serves.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The LoRA adapter scales requests that set none run with (one per adapter of the engine;
    /// at start, the session's: [`crate::SessionConfig::lora_scales`], else the engine's).
    pub fn adapter_scales(&self) -> Vec<f32> {
        self.adapter_scales.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the LoRA adapter scales of requests that set none ([`crate::GenerateOptions::lora_scales`]),
    /// from the next admission on: running requests keep theirs. A slot file restored from
    /// now on counts as decoded with these.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidRequest`] naming `lora_scales` for another number of scales than the
    /// engine has adapters, or a scale that is not finite.
    pub fn set_adapter_scales(&self, scales: impl Into<Vec<f32>>) -> Result<(), EngineError> {
        let scales = scales.into();
        self.engine.check_adapter_scales(&scales)?;
        *self.adapter_scales.write().unwrap_or_else(|p| p.into_inner()) = scales;
        Ok(())
    }

    /// Each slot as of the last step.
    pub fn slots(&self) -> Vec<crate::outcome::SlotState> {
        self.counters.slots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues a request; its events arrive on the returned receiver. Refused at once when the
    /// queue is full.
    pub fn submit(&self, request: ServeRequest) -> Result<Receiver<Event>, SubmitError> {
        let (events, receiver) = mpsc::channel();
        self.submit_to(request, events)?;
        Ok(receiver)
    }

    /// Queues a request whose events go to `sink`. Refused at once when the queue is full, or
    /// when the request was prepared for another engine.
    pub fn submit_to(&self, request: ServeRequest, sink: impl EventSink) -> Result<(), SubmitError> {
        if !Arc::ptr_eq(&request.engine, &self.engine) {
            return Err(SubmitError::OtherEngine);
        }
        let queue = self.queue.as_ref().ok_or(SubmitError::Stopped)?;
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(Job::Generate(Submission { request, sink: Box::new(sink) })) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull { capacity: self.max_queue },
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Saves, restores or erases slot `slot`'s cache, once no request runs in it (it waits for
    /// the one that does; requests admitted meanwhile may take other slots). The outcome arrives
    /// on the returned receiver. Refused at once when the queue is full; a slot the core does not
    /// have is [`EngineError::InvalidRequest`] (on the receiver).
    pub fn slot_action(&self, slot: usize, action: SlotAction) -> Result<Receiver<Result<SlotActionDone, EngineError>>, SubmitError> {
        self.slot_job(slot, |reply| SlotWork::Action(action, reply))
    }

    /// Slot `slot`'s cache as a [`SessionState`] (as [`crate::Session::save_state`]), once no
    /// request runs in it; queued and answered as [`ServingCore::slot_action`].
    pub fn save_state(&self, slot: usize) -> Result<Receiver<Result<SessionState, EngineError>>, SubmitError> {
        self.slot_job(slot, SlotWork::SaveState)
    }

    /// Replaces slot `slot`'s cache with `state` (as [`crate::Session::restore_state`]), once no
    /// request runs in it; queued and answered as [`ServingCore::slot_action`].
    pub fn restore_state(&self, slot: usize, state: SessionState) -> Result<Receiver<Result<(), EngineError>>, SubmitError> {
        self.slot_job(slot, |reply| SlotWork::RestoreState(state, reply))
    }

    /// Queues the work `work` makes of a reply channel for slot `slot`.
    fn slot_job<T>(
        &self,
        slot: usize,
        work: impl FnOnce(SyncSender<Result<T, EngineError>>) -> SlotWork,
    ) -> Result<Receiver<Result<T, EngineError>>, SubmitError> {
        let (reply, receiver) = mpsc::sync_channel(1);
        if slot >= self.slots {
            let _ = reply.send(Err(EngineError::no_such_slot(slot)));
            return Ok(receiver);
        }
        let queue = self.queue.as_ref().ok_or(SubmitError::Stopped)?;
        match queue.try_send(Job::Slot(SlotJob { slot, work: work(reply) })) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull { capacity: self.max_queue }),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// The decode loop's counters now.
    pub fn status(&self) -> ServingStatus {
        let c = &self.counters;
        ServingStatus {
            queued: c.queued.load(Ordering::Relaxed),
            busy_slots: c.busy_slots.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            prompt_tokens_decoded: c.prompt_tokens_decoded.load(Ordering::Relaxed),
            prompt_tokens_reused: c.prompt_tokens_reused.load(Ordering::Relaxed),
            prompt_tokens_copied: c.prompt_tokens_copied.load(Ordering::Relaxed),
            kv_used: c.kv_used.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            checkpoint_bytes: c.checkpoint_bytes.load(Ordering::Relaxed),
            slots: self.slots,
            drafted_tokens: c.drafted_tokens.load(Ordering::Relaxed),
            accepted_tokens: c.accepted_tokens.load(Ordering::Relaxed),
            replayed_tokens: c.replayed_tokens.load(Ordering::Relaxed),
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

/// How the decode loop's scheduler is tuned (see [`ServingConfig`]).
struct Tuning {
    prefill_chunk: Option<usize>,
    checkpoints: usize,
}

/// The decode thread: admits queued requests into free slots while the KV cache has room for
/// their prompts (blocking only when nothing runs), steps the scheduler, and delivers what each
/// step produced. Runs until the queue's sender is gone and every accepted request has ended.
/// `ready` gets the outcome of creating the context, before anything else.
fn decode_loop(
    engine: &Engine,
    config: &SessionConfig,
    tuning: Tuning,
    requests: Receiver<Job>,
    counters: Arc<Counters>,
    adapter_scales: DefaultScales,
    ready: SyncSender<Result<(), EngineError>>,
) {
    let session = match engine.model().session(config) {
        Ok(session) => session,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut scheduler: Scheduler<'_, _, Box<dyn EventSink>> =
        Scheduler::new(engine.model(), session, config.n_seq_max as usize, Arc::clone(&counters), adapter_scales);
    if let Some(tokens) = tuning.prefill_chunk {
        scheduler.set_prompt_chunk(tokens);
    }
    scheduler.set_checkpoints(tuning.checkpoints);
    scheduler.publish_slots();
    let mut open = true;
    // A request taken from the queue that waits for KV space (it stays counted as queued).
    let mut deferred: Option<Submission> = None;
    // Slot actions waiting for their slot to be idle, oldest first.
    let mut slot_actions: Vec<SlotJob> = Vec::new();
    loop {
        // Before admission: a slot that just became idle is the action's before a request's.
        // (Every action waits for a busy slot: while all slots are idle, none waits.)
        let (ready, waiting): (Vec<SlotJob>, Vec<SlotJob>) = slot_actions.drain(..).partition(|job| scheduler.slot_is_idle(job.slot));
        slot_actions = waiting;
        for job in ready {
            job.run(&mut scheduler);
        }
        while scheduler.has_free_slot() {
            let idle = scheduler.is_idle();
            let job = match deferred.take() {
                Some(s) => Job::Generate(s),
                None if !open => break,
                None if idle => match requests.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open = false;
                        break;
                    }
                },
                None => match requests.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
            };
            let submission = match job {
                Job::Generate(submission) => submission,
                Job::Slot(job) => {
                    if scheduler.slot_is_idle(job.slot) {
                        job.run(&mut scheduler);
                    } else {
                        slot_actions.push(job);
                    }
                    continue;
                }
            };
            // A cancelled request is let through, to be refused.
            let cancelled = submission.request.prepared.options.cancel.as_ref().is_some_and(|c| c.is_cancelled());
            // A prompt much of which another slot is decoding waits for it, to copy its cells.
            let prepared = &submission.request.prepared;
            let pinned = prepared.options.slot;
            if !cancelled
                && (!scheduler.admits(prepared.tokens.len()) || scheduler.awaits_shared_prefix(prepared) || !scheduler.slot_free_for(pinned))
            {
                deferred = Some(submission);
                break;
            }
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            let Submission { request, sink } = submission;
            // The request's own Arc of the engine goes here; this thread's keeps the model alive
            // for the sampler (see `ServeRequest::new`).
            let ServeRequest { prepared, engine: _, parser: _ } = request;
            if matches!(prepared.options.speculation, Speculation::Draft { .. }) && !scheduler.has_draft_model() {
                // The draft model's context, made on first use as a Session makes it (its cache
                // costs memory): one sequence, shared by the slots that draft with it, which
                // follows whichever drafts and re-decodes what differs (made for one stream).
                // Without a draft model the scheduler refuses the request.
                match engine.draft_context(config.n_ctx) {
                    Some(Ok(draft)) => scheduler.set_draft_model(draft),
                    Some(Err(e)) => {
                        let mut sink = sink;
                        sink.send(Event::Failed(e));
                        continue;
                    }
                    None => {}
                }
            }
            if let Err((mut sink, e)) = scheduler.admit(prepared, sink) {
                sink.send(Event::Failed(e));
            }
        }
        if scheduler.is_idle() {
            if open || deferred.is_some() {
                continue;
            }
            return;
        }
        scheduler.step();
        // Before the step's output goes out: a client that sees it sees the slots after it.
        scheduler.publish_slots();
        scheduler.deliver(|sink, output| {
            for progress in output.progress {
                if !sink.send(Event::Progress(progress)) {
                    return false;
                }
            }
            if output.text.is_empty() {
                return true;
            }
            sink.send(Event::Delta(Delta {
                text: output.text.to_owned(),
                tokens: output.tokens.to_vec(),
                logprobs: output.logprobs.to_vec(),
                stats: output.stats,
            }))
        });
        for ended in scheduler.take_ended() {
            deliver_end(ended);
        }
        scheduler.publish_slots();
    }
}

/// A request's last text and its end.
fn deliver_end(ended: Ended<Box<dyn EventSink>>) {
    let Ended { mut client, delta, outcome, stats, tokens, logprobs, delivered } = ended;
    if !delta.is_empty() {
        let (tokens, logprobs) = (tokens[delivered.0..].to_vec(), logprobs[delivered.1..].to_vec());
        client.send(Event::Delta(Delta { text: delta, tokens, logprobs, stats: stats.clone() }));
    }
    client.send(match outcome {
        Ok(finish_reason) => Event::Done(Completion { finish_reason, stats, tokens, logprobs }),
        Err(e) => Event::Failed(e),
    });
}

#[cfg(test)]
mod tests {
    use super::ServingConfig;

    #[test]
    fn the_default_slot_count_gives_each_slot_a_useful_share_of_the_context() {
        assert_eq!(ServingConfig::default_slots(4096), 4);
        assert_eq!(ServingConfig::default_slots(16384), 16);
        assert_eq!(ServingConfig::default_slots(65536), 16);
        assert_eq!(ServingConfig::default_slots(1500), 1);
        assert_eq!(ServingConfig::default_slots(8), 1);
    }
}
