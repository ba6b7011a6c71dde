//! The decode loop's core: requests in the slots of one context, one batch per step.
//!
//! Single-stream generation ([`crate::Session`]: one slot, driven by the caller's iterator) and
//! the server ([`crate::serving`]: N slots, driven by a decode thread) run every request through
//! this one path, so each rule about a token exists once: [`request`] holds a request's rules
//! (what a drawn token does, the verification of drafts, the room for drafts, the timing of its
//! stats), [`slot`] a sequence's (prefix reuse, cutting back, the recurrent fallback's
//! tokens), and this module the step's (admission, the batch, a full cache, failures).
//!
//! A step decodes one batch: the pending token of every generating slot (with its drafts when it
//! speculates), then chunks of the prompts being prefilled, oldest request first, up to n_batch
//! tokens. After the decode each slot notes what it decoded and draws its outputs. When the KV
//! cache has no room for the batch (llama.cpp places a whole batch before computing any of it, so
//! nothing of it is kept), the step is built again without drafts, then with the caches idle
//! slots keep dropped, then without the newest request, which fails.

mod adapter_plan;
mod decode_cost;
mod drafter;
mod request;
mod slot;
mod slot_file;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

pub(crate) use adapter_plan::AdapterPlan;
use decode_cost::DecodeCost;
pub(crate) use drafter::DraftModel;
pub(crate) use request::Output;
pub(crate) use request::Prepared;
use request::{DraftSource, Drafting, Request, Verified};
pub(crate) use slot::CHECKPOINT_BEFORE_END;
use slot::{Phase, Sequence, Slot};

use crate::backend::{BackendModel, BackendSession, CheckpointOf, SamplerOf};
use crate::config::Speculation;
use crate::error::{DecodeFailure, EngineError};
use crate::outcome::{FinishReason, GenerationStats, SlotAction, SlotActionDone, ms};
use crate::token::{Token, TokenLogprobs};

/// The LoRA adapter scales of requests that set none, shared with whoever may change them
/// while the scheduler runs (a server's `POST /lora-adapters`).
pub(crate) type DefaultScales = Arc<std::sync::RwLock<Vec<f32>>>;

/// Counters of a scheduler, readable from other threads while it runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) queued: AtomicUsize,
    pub(crate) busy_slots: AtomicUsize,
    pub(crate) steps: AtomicU64,
    pub(crate) generated_tokens: AtomicU64,
    pub(crate) prompt_tokens_decoded: AtomicU64,
    pub(crate) prompt_tokens_reused: AtomicU64,
    pub(crate) prompt_tokens_copied: AtomicU64,
    pub(crate) kv_used: AtomicUsize,
    pub(crate) drafted_tokens: AtomicU64,
    pub(crate) accepted_tokens: AtomicU64,
    pub(crate) replayed_tokens: AtomicU64,
    pub(crate) steps_without_drafts: AtomicU64,
    /// Recurrent checkpoints the slots keep, and their bytes (host memory).
    pub(crate) checkpoints: AtomicUsize,
    pub(crate) checkpoint_bytes: AtomicUsize,
    /// Each slot as of the last step (see [`Scheduler::publish_slots`]).
    pub(crate) slots: std::sync::Mutex<Vec<crate::outcome::SlotState>>,
}

/// A slot's cache as [`Scheduler::save_state`] saves it.
pub(crate) struct SavedCache {
    pub(crate) tokens: Vec<Token>,
    /// The LoRA adapter scales its cells were decoded with, by position.
    pub(crate) adapters: AdapterPlan,
    /// llama.cpp's bytes of the cells.
    pub(crate) state: Vec<u8>,
}

/// A request that ended, for its driver to deliver.
#[derive(Debug)]
pub(crate) struct Ended<C> {
    pub(crate) client: C,
    /// The text of its last step (held-back text included when it ended normally).
    pub(crate) delta: String,
    /// How it ended: the reason, or the error that failed it.
    pub(crate) outcome: Result<FinishReason, EngineError>,
    pub(crate) stats: GenerationStats,
    pub(crate) tokens: Vec<Token>,
    pub(crate) logprobs: Vec<TokenLogprobs>,
    /// How many of `tokens` and `logprobs` went out with earlier deltas.
    pub(crate) delivered: (usize, usize),
}

type Running<'e, M, C> = Box<Request<SamplerOf<'e, M>, C>>;

/// Requests in the slots of one context. `C` is what a request's driver needs to deliver its
/// output (the server's event channel; nothing for a single stream).
pub(crate) struct Scheduler<'e, M: BackendModel + 'e, C> {
    model: &'e M,
    session: M::Session<'e>,
    slots: Vec<Slot<Running<'e, M, C>, CheckpointOf<'e, M>>>,
    n_ctx: usize,
    n_batch: usize,
    clock: u64,
    counters: Arc<Counters>,
    /// Set when a batch with drafts found the KV cache full: the step is built again without
    /// them, before anything else gives way.
    without_drafts: bool,
    /// Requests that ended, until their driver takes them.
    ended: Vec<Ended<C>>,
    /// The draft model's context, for requests with [`Speculation::Draft`].
    draft: Option<DraftModel<'e, M>>,
    /// Slots prefilling in this step, oldest request first (kept to reuse its allocation).
    prefilling: Vec<usize>,
    /// What this loop's decodes cost, from its generation steps: whether drafts pay at a
    /// step's occupancy.
    cost: DecodeCost,
    /// Most prompt tokens in a step while any request generates (n_batch: no bound of its own).
    prompt_chunk: usize,
    /// The model's memory holds a recurrent state: a sequence is cut back only to a checkpoint.
    recurrent: bool,
    /// Slots keep recurrent checkpoints (see [`Scheduler::set_checkpoints`]).
    checkpoints: bool,
    /// Most drafts of a round: what the memory can drop of one decode (recurrent snapshots);
    /// no bound where it can drop any tail, or none at all (see `rollback_points`).
    max_drafts: usize,
    /// A recurrent state without snapshots: a round of drafts is preceded by a checkpoint it
    /// returns to after a rejection (see [`Scheduler::rebuild`]).
    rollback_points: bool,
    /// The LoRA adapter scales of requests that set none (at first, those the session was made
    /// with).
    default_scales: DefaultScales,
    /// The scales the session applies now, and those of this step's group of requests (see
    /// [`Scheduler::choose_group`]).
    applied_scales: Vec<f32>,
    step_scales: Vec<f32>,
    /// Steps that built a batch, for taking turns between groups of requests.
    steps: u64,
    /// Steps the step's group has had in a row (see [`Scheduler::choose_group`]).
    turn: usize,
}

impl<'e, M: BackendModel, C> Scheduler<'e, M, C> {
    /// `slots` slots over `session` (a context of at least that many sequences), which applies
    /// the model's LoRA adapters with `default_scales` (the scales of requests that set none).
    pub(crate) fn new(model: &'e M, session: M::Session<'e>, slots: usize, counters: Arc<Counters>, default_scales: DefaultScales) -> Self {
        let applied = read(&default_scales);
        let n_ctx = session.n_ctx() as usize;
        let n_batch = session.n_batch() as usize;
        let recurrent = session.memory_is_recurrent();
        let snapshots = session.rollback_limit().filter(|&n| n > 0);
        let rollback_points = recurrent && snapshots.is_none() && session.keeps_checkpoints();
        let max_drafts = snapshots.unwrap_or(usize::MAX);
        let mut scheduler = Scheduler {
            model,
            session,
            slots: (0..slots).map(|seq| Slot { seq: Sequence::new(seq as i32, n_ctx), phase: Phase::Idle, last_used: 0 }).collect(),
            n_ctx,
            n_batch,
            clock: 0,
            counters,
            without_drafts: false,
            ended: Vec::with_capacity(slots),
            draft: None,
            prefilling: Vec::with_capacity(slots),
            cost: DecodeCost::default(),
            prompt_chunk: n_batch,
            recurrent,
            checkpoints: false,
            max_drafts,
            rollback_points,
            step_scales: applied.clone(),
            applied_scales: applied,
            default_scales,
            steps: 0,
            turn: 0,
        };
        scheduler.set_checkpoints(DEFAULT_CHECKPOINTS);
        scheduler
    }

    /// Keeps up to `n` recurrent checkpoints per slot where the memory holds a recurrent state
    /// (none elsewhere: attention is cut back instead). Each is taken at the end of a prompt, so
    /// that a later prompt extending it (a chat's next turn) decodes only what follows.
    pub(crate) fn set_checkpoints(&mut self, n: usize) {
        let n = if self.session.keeps_checkpoints() { n } else { 0 };
        self.checkpoints = n > 0;
        for slot in &mut self.slots {
            slot.seq.keep_checkpoints(n);
        }
        self.publish_checkpoints();
    }

    fn publish_checkpoints(&self) {
        let (count, bytes) = self.slots.iter().map(|s| s.seq.checkpoint_usage()).fold((0, 0), |(c, b), (n, m)| (c + n, b + m));
        self.counters.checkpoints.store(count, Ordering::Relaxed);
        self.counters.checkpoint_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Bounds the prompt tokens of a step in which requests generate: each of their next tokens
    /// waits for the whole step, and a step's time grows with its tokens, so a long prompt's
    /// full-batch chunk stalls every stream (about a second for 512 tokens on two cores). A
    /// step with nothing generating still fills the batch with prompts.
    pub(crate) fn set_prompt_chunk(&mut self, tokens: usize) {
        self.prompt_chunk = tokens.clamp(1, self.n_batch);
    }

    pub(crate) fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Gives [`Speculation::Draft`] requests a draft model (one context for the scheduler: meant
    /// for one stream at a time).
    pub(crate) fn set_draft_model(&mut self, draft: DraftModel<'e, M>) {
        self.draft = Some(draft);
    }

    pub(crate) fn has_draft_model(&self) -> bool {
        self.draft.is_some()
    }

    /// No slot runs a request.
    pub(crate) fn is_idle(&self) -> bool {
        self.slots.iter().all(Slot::is_idle)
    }

    pub(crate) fn has_free_slot(&self) -> bool {
        self.slots.iter().any(Slot::is_idle)
    }

    /// Whether a prompt of `prompt_len` tokens may be admitted now. Alone, a request gets the
    /// whole cache (or fails for its length); beside others, it waits until its prompt fits
    /// beside the cells they hold or will hold for their prompts. (What generation adds is not
    /// reserved: a full cache makes the newest request give way, see [`Scheduler::make_room`].)
    pub(crate) fn admits(&self, prompt_len: usize) -> bool {
        self.is_idle() || self.committed_cells() + prompt_len <= self.n_ctx
    }

    fn committed_cells(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match &s.phase {
                Phase::Idle => 0,
                Phase::Prefilling { prompt, .. } => prompt.len().max(s.seq.len()),
                Phase::Generating { request, .. } => s.seq.len() + 1 + request.pending_replay().len(),
            })
            .sum()
    }

    /// Puts a request into the free slot whose cache serves its prompt best (see
    /// [`choose_slot`]), reusing what that cache shares with the prompt. A request that cannot
    /// run is handed back with the reason.
    pub(crate) fn admit(&mut self, prepared: Prepared<SamplerOf<'e, M>>, client: C) -> Result<usize, (C, EngineError)> {
        let tokens = &prepared.tokens;
        let refused = if prepared.options.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            Some(EngineError::Cancelled)
        } else if tokens.is_empty() {
            Some(EngineError::EmptyPrompt)
        } else if tokens.len() >= self.n_ctx {
            Some(EngineError::PromptTooLong { prompt_tokens: tokens.len(), n_ctx: self.n_ctx as u32 })
        } else if matches!(prepared.options.speculation, Speculation::Draft { .. }) && self.draft.is_none() {
            Some(EngineError::InvalidRequest {
                field: "speculation",
                value: "draft".into(),
                reason: "no draft model here (EngineConfig::draft_model, --draft-model)",
            })
        } else {
            None
        };
        let refused = refused.or_else(|| match prepared.options.slot {
            Some(slot) if slot >= self.slots.len() => Some(EngineError::no_such_slot(slot)),
            _ => None,
        });
        let plan = match refused.map_or_else(|| self.plan_of(&prepared), Err) {
            Ok(plan) => plan,
            Err(e) => return Err((client, e)),
        };
        let chosen = match prepared.options.slot {
            Some(slot) => self.slots.get(slot).is_some_and(Slot::is_idle).then_some(slot),
            None => choose_slot(&self.slots, &prepared.tokens, &plan, self.recurrent),
        };
        let Some(index) = chosen else { return Err((client, EngineError::Session(crate::error::cause("no free slot")))) };
        self.clock += 1;
        let single = self.slots.len() == 1;
        let slot = &mut self.slots[index];
        slot.seq.adapt(&mut self.session, &plan);
        let kept = slot.seq.keep_prefix(&mut self.session, &prepared.tokens);
        let copied = self.copy_longer_prefix(index, &prepared.tokens, &plan, kept);
        let reused = copied.unwrap_or(kept);
        let slot = &mut self.slots[index];
        self.counters.busy_slots.fetch_add(1, Ordering::Relaxed);
        self.counters.prompt_tokens_reused.fetch_add(reused as u64, Ordering::Relaxed);
        self.counters.prompt_tokens_copied.fetch_add(copied.unwrap_or(0) as u64, Ordering::Relaxed);
        let (request, prompt) = Request::new(prepared, client, reused, self.clock, self.n_ctx, plan);
        let request = Box::new(request);
        if single {
            // One slot: every decode is this request's, so its cancel aborts a decode in
            // progress (several slots share a decode, and cancel between steps).
            let flag: Arc<AtomicBool> = Arc::clone(&request.cancel_token().0);
            self.session.set_abort_flag(flag);
        }
        let checkpoint_at = slot.seq.checkpoint_position(prompt.len());
        slot.phase = Phase::Prefilling { request, prompt, done: reused, then: None, checkpoint_at };
        Ok(index)
    }

    /// Where another slot's cache holds more of `prompt` than slot `dst` kept of its own (a
    /// shared system prompt, the other choices of one request), its cells are copied into `dst`
    /// (shared, in a unified cache: no decode, no new cells) and cut to the shared prefix.
    /// Only cells decoded with the scales of the request's adapter `plan` are kept (`dst` holds
    /// none of others). Returns the tokens `dst` then holds, or None when it copied nothing and
    /// `dst` holds the `kept` tokens it had.
    fn copy_longer_prefix(&mut self, dst: usize, prompt: &[Token], plan: &AdapterPlan, kept: usize) -> Option<usize> {
        let recurrent = self.recurrent;
        let usable = |s: &Slot<_, _>| s.seq.reusable(prompt, plan, recurrent);
        let donor = (0..self.slots.len()).filter(|&i| i != dst).max_by_key(|&i| usable(&self.slots[i]))?;
        let shared = usable(&self.slots[donor]);
        if shared < kept + MIN_COPIED_PREFIX {
            return None;
        }
        let donor = &self.slots[donor].seq;
        let (src_id, tokens, adapters) = (donor.id(), donor.tokens().to_vec(), donor.adapters().clone());
        // A recurrent state holds one position, the donor's last: copied from the middle of the
        // donor's sequence it is returned to the donor's checkpoint there (see `reusable`),
        // which the copy holds the tokens of.
        let checkpoint = (shared < tokens.len()).then(|| donor.checkpoint_within(shared).cloned()).flatten();
        let seq = &mut self.slots[dst].seq;
        seq.clear(&mut self.session);
        if !self.session.seq_copy(src_id, seq.id()) {
            return Some(0);
        }
        seq.extend(&tokens);
        seq.set_adapters(adapters);
        if let Some(checkpoint) = checkpoint {
            seq.push_checkpoint(checkpoint);
        }
        // The one adapter rule and the one prefix rule, now over the copy.
        seq.adapt(&mut self.session, plan);
        Some(seq.keep_prefix(&mut self.session, prompt))
    }

    /// Whether `prompt` should wait for a slot that is decoding a prompt it shares much of (the
    /// other choices of one request, a common system prompt), to copy those cells once they are
    /// in instead of decoding them again beside it (as far as both decode each position with the
    /// same adapter scales: cells of others are not copied).
    pub(crate) fn awaits_shared_prefix<S>(&self, prepared: &Prepared<S>) -> bool {
        // A request that cannot run is refused at admission, not kept waiting.
        let Ok(plan) = self.plan_of(prepared) else { return false };
        let prompt = &prepared.tokens[..];
        let cached = self.slots.iter().map(|s| s.seq.reusable(prompt, &plan, self.recurrent)).max().unwrap_or(0);
        self.slots.iter().any(|s| match &s.phase {
            Phase::Prefilling { request, prompt: theirs, then: None, .. } => {
                let common = theirs.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(request.adapters.agrees_until(&plan));
                // A recurrent state is copied only up to the checkpoint their prefill takes:
                // waiting pays only where there will be one within what the prompts share.
                let usable = if !self.recurrent {
                    common.min(prompt.len().saturating_sub(1))
                } else {
                    let at = theirs.len().saturating_sub(CHECKPOINT_BEFORE_END);
                    if self.checkpoints && at > 0 && common >= at { at.min(prompt.len().saturating_sub(1)) } else { 0 }
                };
                usable >= cached + MIN_COPIED_PREFIX
            }
            _ => false,
        })
    }

    /// The LoRA adapter scales a request runs with, by position: its own, else the default ones
    /// as they are now, an activated LoRA's from its invocation in the prompt on (see
    /// [`AdapterPlan::for_prompt`]).
    fn plan_of<S>(&self, prepared: &Prepared<S>) -> Result<AdapterPlan, EngineError> {
        let scales = prepared.options.lora_scales.clone().unwrap_or_else(|| read(&self.default_scales));
        AdapterPlan::for_model(scales, &prepared.tokens, self.model)
    }

    /// Chooses this step's group: the requests of one set of adapter scales. llama.cpp applies one
    /// set of adapters to a whole decode, so requests of other scales wait for steps of their
    /// own. Groups take turns of [`GROUP_TURN`] steps: the group that has the context keeps it
    /// for its turn while it has requests, then the one whose request waited longest for a step
    /// takes it (the oldest first among equals); none starves. A request's group is that of the
    /// next position it decodes (an activated LoRA's prompt changes group where the adapter
    /// starts). Where all decode with the same scales (no per-request or activated adapters),
    /// the group is every request and never changes.
    fn choose_group(&mut self) {
        let requests = || self.slots.iter().filter_map(|s| Some((s.phase.request()?, group_of(&s.phase)?)));
        if self.turn < GROUP_TURN && requests().any(|(_, group)| group == self.step_scales) {
            self.turn += 1;
            return;
        }
        let lead = requests().min_by_key(|(r, _)| (r.last_step, r.admitted)).map(|(_, group)| group);
        if let Some(lead) = lead
            && lead != self.step_scales
        {
            self.step_scales = lead.to_vec();
        }
        self.turn = 1;
    }

    /// One step: ends cancelled requests, decodes one batch of one group of requests (see
    /// [`Scheduler::choose_group`]), and lets each slot in it go on. Does nothing when every
    /// slot is idle.
    pub(crate) fn step(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(request) = self.slots[i].phase.request_mut() {
                request.delta.clear();
                if request.is_cancelled() {
                    // Requests whose client left or that were cancelled end here, prefill included.
                    self.end(i, Ok(FinishReason::Cancelled));
                }
            }
        }
        self.choose_group();
        self.steps += 1;
        loop {
            self.session.batch_clear();
            let prompt_tokens = match self.build_batch() {
                Ok(n) => n,
                Err(e) => return self.fail_batch(&e),
            };
            if self.session.batch_len() == 0 {
                return;
            }
            let switched = self.applied_scales != self.step_scales;
            if switched {
                if let Err(e) = self.session.set_adapter_scales(&self.step_scales) {
                    // What llama.cpp applies now is unknown: set again at the next step.
                    self.applied_scales.clear();
                    return self.fail_batch(&e);
                }
                self.applied_scales.clone_from(&self.step_scales);
            }
            let tokens = self.session.batch_len();
            let started = Instant::now();
            let decoded = self.session.batch_decode();
            // Counted as decoding: GPU and RPC backends return before the work is done.
            self.session.synchronize();
            let decode_ms = ms(started.elapsed());
            match decoded {
                Ok(()) => {
                    // A decode after other adapters were applied rebuilds llama.cpp's graphs:
                    // not what a step costs.
                    if prompt_tokens == 0 && !switched {
                        self.cost.observe(tokens, decode_ms);
                    }
                    self.counters.steps.fetch_add(1, Ordering::Relaxed);
                    self.counters.prompt_tokens_decoded.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                    self.without_drafts = false;
                    self.commit(decode_ms);
                    self.counters.kv_used.store(self.slots.iter().map(|s| s.seq.len()).sum(), Ordering::Relaxed);
                    self.publish_checkpoints();
                    return;
                }
                Err(e) if e.decode_failure() == Some(DecodeFailure::NoKvSlot) => {
                    let had_drafts = self.has_drafts();
                    self.roll_back();
                    if had_drafts {
                        self.without_drafts = true;
                        self.counters.steps_without_drafts.fetch_add(1, Ordering::Relaxed);
                    } else if !self.make_room() {
                        return self.fail_batch(&e);
                    }
                }
                Err(e) => return self.fail_batch(&e),
            }
        }
    }

    /// The step's batch, of the step's group: the pending token of every generating slot, with
    /// its drafts, then prompt chunks, oldest request first, up to n_batch tokens. Returns the
    /// prompt tokens in it.
    fn build_batch(&mut self) -> Result<usize, EngineError> {
        let n_slots = self.slots.len();
        let step_scales = &self.step_scales[..];
        let in_group = |phase: &Phase<Running<'e, M, C>>| group_of(phase) == Some(step_scales);
        let generating = self.slots.iter().filter(|s| matches!(s.phase, Phase::Generating { .. }) && in_group(&s.phase)).count();
        for slot in &mut self.slots {
            let Slot { seq, phase, .. } = slot;
            let member = in_group(phase);
            if let Some(request) = phase.request_mut() {
                request.output = None;
                request.chunk = 0;
                if member {
                    request.last_step = self.steps;
                } else if let Some(drafting) = request.drafting.as_mut() {
                    // Its last round's drafts, verified already: not this step's.
                    drafting.drafts.clear();
                }
            }
            if !member {
                continue;
            }
            let Phase::Generating { request, pending } = phase else { continue };
            // The kept part of a rolled-back round first (see `rebuild`): decoded, no outputs.
            let replay = request.pending_replay();
            for (k, &token) in replay.iter().enumerate() {
                self.session.batch_push(token, (seq.len() + k) as i32, seq.id(), false)?;
            }
            let pos = seq.len() + replay.len();
            request.output = Some(self.session.batch_len() as i32);
            self.session.batch_push(*pending, pos as i32, seq.id(), true)?;
            // Room: the batch less a token for every other slot.
            let room = if self.without_drafts {
                0
            } else {
                request.draft_room(pos, self.n_ctx, self.n_batch.saturating_sub(self.session.batch_len() + n_slots)).min(self.max_drafts)
            };
            // Where drafts would not pay at this occupancy (see DecodeCost), a lookup still
            // predicts the next token, outside the batch: whether the draw matches it is free
            // evidence of what drafts would bring (a draft model's prediction would cost a decode).
            // Over a recurrent state llama.cpp splits a batch into micro-batches with as many
            // tokens of every sequence: drafts beside other sequences' single tokens cost a
            // second pass over the weights, which they do not earn on a CPU (measured on the
            // LFM2-1.2B shape: 0.82-0.90 of no drafts at 4 streams). They draft alone.
            let alone = !self.recurrent || generating == 1;
            let pays = alone && self.cost.drafts_pay(generating, request.draft_acceptance());
            let Some(Drafting { source, drafts, replay, shadow, .. }) = request.drafting.as_mut() else { continue };
            drafts.clear();
            *shadow = None;
            // Nor while a rejected round is decoded again: its state is not one to mark (the
            // replay is not in yet), and a rejection would replay the replay too.
            let pays = pays && replay.is_empty();
            let len = match (pays, *source) {
                (true, _) => room,
                (false, DraftSource::Lookup) => room.min(1),
                (false, DraftSource::Model) => 0,
            };
            if len == 0 {
                continue;
            }
            // Drafted after the history with the tokens this batch decodes.
            match (*source, self.draft.as_mut()) {
                (DraftSource::Lookup, _) => seq.with_ahead(replay, *pending, |history| crate::speculative::draft(history, len, drafts)),
                (DraftSource::Model, Some(draft)) => {
                    if seq.with_ahead(replay, *pending, |history| draft.draft(history, len, drafts)).is_err() {
                        // A draft that cannot be made costs the round its drafts, not the request.
                        drafts.clear();
                    }
                }
                (DraftSource::Model, None) => {}
            }
            if !pays {
                *shadow = drafts.pop();
                continue;
            }
            if !drafts.is_empty() && self.rollback_points {
                // Before the decode: where the cache stands now is where a rejection returns.
                seq.mark_rollback(&mut self.session);
            }
            for (i, &draft) in drafts.iter().enumerate() {
                self.session.batch_push(draft, (pos + 1 + i) as i32, seq.id(), true)?;
            }
        }
        self.prefilling.clear();
        self.prefilling.extend((0..n_slots).filter(|&i| matches!(self.slots[i].phase, Phase::Prefilling { .. }) && in_group(&self.slots[i].phase)));
        let slots = &self.slots;
        self.prefilling.sort_by_key(|&i| slots[i].phase.request().map_or(0, |r| r.admitted));
        let mut prompt_tokens = 0;
        let prompt_budget = if generating > 0 { self.prompt_chunk } else { self.n_batch };
        for &i in &self.prefilling {
            let room = (self.n_batch - self.session.batch_len()).min(prompt_budget - prompt_tokens);
            if room == 0 {
                break;
            }
            let Slot { seq, phase, .. } = &mut self.slots[i];
            let Phase::Prefilling { request, prompt, done, then, checkpoint_at } = phase else { continue };
            let end = checkpoint_at.filter(|&at| *done < at).unwrap_or(prompt.len());
            // Not past where its adapter scales change: the rest is another group's.
            let end = request.adapters.change_after(*done).map_or(end, |at| at.min(end));
            let n = room.min(end - *done);
            for (k, &token) in prompt[*done..*done + n].iter().enumerate() {
                // The last prompt token's logits give the first token, unless the sequence is
                // being decoded again and has its next token already.
                let last = *done + k + 1 == prompt.len() && then.is_none();
                if last {
                    request.output = Some(self.session.batch_len() as i32);
                }
                self.session.batch_push(token, (seq.len() + k) as i32, seq.id(), last)?;
            }
            request.chunk = n;
            prompt_tokens += n;
        }
        Ok(prompt_tokens)
    }

    fn has_drafts(&self) -> bool {
        self.slots.iter().any(|s| s.phase.request().and_then(|r| r.drafting.as_ref()).is_some_and(|d| !d.drafts.is_empty()))
    }

    /// After a decode: each slot notes what it decoded and draws its outputs.
    fn commit(&mut self, decode_ms: f64) {
        for i in 0..self.slots.len() {
            let Slot { seq, phase, .. } = &mut self.slots[i];
            let verified = match phase {
                Phase::Idle => continue,
                Phase::Prefilling { request, prompt, done, then, checkpoint_at } => {
                    if request.chunk == 0 {
                        continue;
                    }
                    let start = *done;
                    seq.extend(&prompt[start..start + request.chunk]);
                    *done += request.chunk;
                    // Where a later prompt comes back to, the state being one that cannot be cut
                    // back: the next turn, or, where an activated LoRA starts, a request without
                    // it (the base model's prompt before its invocation is what such an adapter
                    // lets requests share).
                    if *checkpoint_at == Some(*done) || request.adapters.change_after(start) == Some(*done) {
                        seq.checkpoint(&mut self.session);
                    }
                    if then.is_none() {
                        request.prompt_processed(*done, prompt.len());
                    }
                    if *done < prompt.len() {
                        continue;
                    }
                    match *then {
                        // Decoded again after a cut the memory could not make: generation goes on
                        // with the token it had.
                        Some(pending) => Ok(Verified::Next(pending)),
                        // Cancelled while its prompt decoded (a backend that cannot abort a
                        // decode): nothing is generated from it.
                        None if request.is_cancelled() => Ok(Verified::Ended(FinishReason::Cancelled)),
                        None => {
                            request.prompt_done();
                            let first = request.output.expect("a prompt's last token has an output");
                            request.verify(&mut self.session, self.model, first, seq, self.n_ctx, &self.counters)
                        }
                    }
                }
                Phase::Generating { request, pending } => {
                    let Some(first) = request.output else { continue };
                    let round_start = seq.len();
                    if let Some(drafting) = request.drafting.as_mut() {
                        seq.extend(&drafting.replay);
                        drafting.replay.clear();
                    }
                    seq.push(*pending);
                    request.decoded(decode_ms);
                    let drafted = request.drafting.as_ref().is_some_and(|d| !d.drafts.is_empty());
                    let verified = request.verify(&mut self.session, self.model, first, seq, self.n_ctx, &self.counters);
                    // Rejected drafts (and a kept one that ended the request) leave the cache.
                    if drafted
                        && let Ok(kept) = &verified
                        && !seq.cut(&mut self.session, seq.len())
                    {
                        self.rebuild(i, *kept, round_start);
                        continue;
                    }
                    verified
                }
            };
            match verified {
                Ok(Verified::Next(pending)) => {
                    let request = self.slots[i].phase.take_request().expect("a slot that drew has a request");
                    self.slots[i].phase = Phase::Generating { request, pending };
                }
                Ok(Verified::Ended(reason)) => self.end(i, Ok(reason)),
                Err(e) => self.end(i, Err(e)),
            }
        }
    }

    /// A round of drafts whose rejected tail the memory could not drop (a recurrent state): the
    /// sequence returns to the point marked before the round (see [`Sequence::mark_rollback`]),
    /// else to its latest checkpoint within what it keeps, and decodes the rest again. From the
    /// mark (at `round_start`) the rest is the round's kept tokens, decoded in the next step
    /// before the next token: a rejection costs those tokens, never a prefill. From further back
    /// (no mark: a backend that keeps no checkpoints) the rest is a prefill, the next token waits
    /// until it is in, and the request goes on without speculation (every rejected draft would
    /// cost that again).
    fn rebuild(&mut self, i: usize, verified: Verified, round_start: usize) {
        let slot = &mut self.slots[i];
        let tokens = slot.seq.tokens().to_vec();
        let kept = match slot.seq.return_to_rollback(&mut self.session) {
            Some(kept) => kept,
            None => slot.seq.keep_prefix(&mut self.session, &tokens),
        };
        let pending = match verified {
            Verified::Next(pending) => pending,
            // It ended: the cache stays as returned, for a later request.
            Verified::Ended(reason) => return self.end(i, Ok(reason)),
        };
        let mut request = slot.phase.take_request().expect("a slot that drew has a request");
        slot.phase = if kept >= round_start && request.drafting.is_some() {
            request.replay(&tokens[kept..], &self.counters);
            Phase::Generating { request, pending }
        } else {
            request.drafting = None;
            Phase::Prefilling { request, prompt: tokens, done: kept, then: Some(pending), checkpoint_at: None }
        };
    }

    /// The KV cache had no room for the step: every slot stands as before the batch, its cache
    /// cut back to what it noted (llama.cpp kept nothing of the batch; a recurrent state that
    /// cannot be cut there fails its request).
    fn roll_back(&mut self) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            let Some(request) = slot.phase.request_mut() else { continue };
            request.output = None;
            request.chunk = 0;
            if let Some(drafting) = request.drafting.as_mut() {
                drafting.drafts.clear();
            }
            if !slot.seq.cut(&mut self.session, slot.seq.len()) {
                let e = EngineError::decode(DecodeFailure::NoKvSlot, "the KV cache is full and this sequence's state cannot be rolled back");
                self.end(i, Err(e));
            }
        }
    }

    /// Makes room after [`Scheduler::roll_back`]: first by dropping the caches idle slots keep
    /// for reuse, else by failing the newest running request, so that the older ones go on. False
    /// when nothing can give way (a single request that does not fit).
    fn make_room(&mut self) -> bool {
        if self.forget_idle(None) {
            return true;
        }
        let running = self.slots.iter().filter(|s| !s.is_idle()).count();
        let newest = (0..self.slots.len()).max_by_key(|&i| self.slots[i].phase.request().map_or(0, |r| r.admitted));
        match newest {
            Some(i) if running >= 2 => {
                let e = EngineError::decode(
                    DecodeFailure::NoKvSlot,
                    "the KV cache is full; the newest request gives way to the older ones (a larger --ctx or fewer --parallel slots helps)",
                );
                self.end(i, Err(e));
                true
            }
            _ => false,
        }
    }

    /// A failure other than a full cache that [`Scheduler::make_room`] could relieve (an internal
    /// error, an aborted decode, adapters that could not be applied): every running request of
    /// the step's group had tokens in the batch or depends on the cache it may have half written,
    /// so each ends (cancelled ones as cancelled) and its cache is emptied. Requests of other
    /// adapter scales had nothing in it and go on.
    fn fail_batch(&mut self, e: &EngineError) {
        for i in 0..self.slots.len() {
            if group_of(&self.slots[i].phase) != Some(&self.step_scales[..]) {
                continue;
            }
            let Some(request) = self.slots[i].phase.request() else { continue };
            let outcome = if request.is_cancelled() { Ok(FinishReason::Cancelled) } else { Err(e.clone()) };
            self.slots[i].seq.clear(&mut self.session);
            self.end(i, outcome);
        }
    }

    /// Ends slot `i`'s request: the slot is free, and the request waits in [`Scheduler::take_ended`]
    /// for its driver. A failed request's cache may hold part of what failed: emptied.
    fn end(&mut self, i: usize, outcome: Result<FinishReason, EngineError>) {
        let slot = &mut self.slots[i];
        let Some(mut request) = slot.phase.take_request() else { return };
        self.clock += 1;
        slot.last_used = self.clock;
        slot.seq.forget_rollback();
        self.counters.busy_slots.fetch_sub(1, Ordering::Relaxed);
        match &outcome {
            Ok(reason) => request.finish(*reason),
            Err(_) => slot.seq.clear(&mut self.session),
        }
        let (client, delta, stats, tokens, logprobs, delivered) = request.into_parts();
        self.ended.push(Ended { client, delta, outcome, stats, tokens, logprobs, delivered });
    }

    /// The requests that ended since the last call, oldest first.
    pub(crate) fn take_ended(&mut self) -> std::vec::Drain<'_, Ended<C>> {
        self.ended.drain(..)
    }

    /// Hands each running request's text of the last step to `deliver`; a request whose client
    /// is gone (`deliver` says false) ends at the next step, as cancelled.
    pub(crate) fn deliver(&mut self, mut deliver: impl FnMut(&mut C, Output<'_>) -> bool) {
        for slot in &mut self.slots {
            let Some(request) = slot.phase.request_mut() else { continue };
            if request.has_output() {
                let (client, output) = request.take_output();
                if !deliver(client, output) {
                    request.abandon();
                }
            }
        }
    }

    /// Slot `i`'s running request: its text of the last step, stats and tokens so far.
    pub(crate) fn running(&self, i: usize) -> Option<(&str, &GenerationStats, &[Token])> {
        self.slots[i].phase.request().map(|r| (r.delta.as_str(), r.stats(), r.tokens()))
    }

    /// Slot `i`'s running request's log-probabilities so far (empty where it asked for none).
    pub(crate) fn running_logprobs(&self, i: usize) -> &[TokenLogprobs] {
        self.slots[i].phase.request().map_or(&[], |r| r.logprobs())
    }

    /// Whether slot `i` is decoding a prompt.
    pub(crate) fn is_prefilling(&self, i: usize) -> bool {
        matches!(self.slots[i].phase, Phase::Prefilling { .. })
    }

    /// The tokens slot `i`'s cache holds.
    pub(crate) fn cached(&self, i: usize) -> &[Token] {
        self.slots[i].seq.tokens()
    }

    /// Ends slot `i`'s request as cancelled and forgets it (its driver has gone); its cache
    /// stays as decoded, for the next request to reuse.
    pub(crate) fn abandon(&mut self, i: usize) {
        self.end(i, Ok(FinishReason::Cancelled));
        self.ended.clear();
    }

    /// Writes each slot's state where readers of the counters see it (a server's `/slots`).
    pub(crate) fn publish_slots(&self) {
        let states = self
            .slots
            .iter()
            .enumerate()
            .map(|(id, slot)| {
                let request = slot.phase.request();
                crate::outcome::SlotState {
                    id,
                    processing: request.is_some(),
                    prefilling: matches!(slot.phase, Phase::Prefilling { .. }),
                    cached_tokens: slot.seq.len(),
                    prompt_tokens: request.map_or(0, |r| r.stats().prompt_tokens),
                    generated_tokens: request.map_or(0, |r| r.stats().completion_tokens),
                }
            })
            .collect();
        *self.counters.slots.lock().unwrap_or_else(|p| p.into_inner()) = states;
    }

    /// Whether a request that asks for slot `slot` (or any, None) finds it free now; a slot the
    /// scheduler does not have is let through, to be refused.
    pub(crate) fn slot_free_for(&self, slot: Option<usize>) -> bool {
        slot.is_none_or(|slot| slot >= self.slots.len() || self.slot_is_idle(slot))
    }

    /// Whether slot `index` exists and runs no request (a slot action waits for that).
    pub(crate) fn slot_is_idle(&self, index: usize) -> bool {
        self.slots.get(index).is_some_and(Slot::is_idle)
    }

    /// Saves, restores or erases idle slot `index`'s cache (see [`Scheduler::slot_is_idle`]).
    /// A restore replaces what the slot held; when the file does not load and other idle slots
    /// hold cells, they are given up and it is tried once more (the KV cache may have had no
    /// room). A failed restore leaves the slot empty.
    pub(crate) fn slot_action(&mut self, index: usize, action: &SlotAction) -> Result<SlotActionDone, EngineError> {
        debug_assert!(self.slot_is_idle(index));
        let start = Instant::now();
        let (tokens, bytes) = match action {
            SlotAction::Save(path) => {
                let seq = &self.slots[index].seq;
                if self.file_plan(seq.tokens()).agrees_until(seq.adapters()) < seq.len() {
                    // Restored, its cells would count as the default scales' (a file records none).
                    return Err(EngineError::InvalidRequest {
                        field: "lora_scales",
                        value: format!("{:?}", seq.adapters()),
                        reason: "the slot's cache was decoded with other LoRA adapter scales than the default ones, which a slot file cannot record",
                    });
                }
                (seq.len(), self.session.seq_save_file(seq.id(), path, &slot_file::pack(seq.tokens()))?)
            }
            SlotAction::Restore(path) => {
                let mut loaded = self.restore(index, path);
                if loaded.is_err() && self.forget_idle(Some(index)) {
                    loaded = self.restore(index, path);
                }
                let tokens = loaded?;
                (tokens, std::fs::metadata(path).map_or(0, |m| m.len()))
            }
            SlotAction::Erase => {
                let seq = &mut self.slots[index].seq;
                let tokens = seq.len();
                seq.clear(&mut self.session);
                (tokens, 0)
            }
        };
        self.slot_changed();
        Ok(SlotActionDone { tokens, bytes, ms: ms(start.elapsed()) })
    }

    /// Idle slot `index`'s cache as bytes, with the tokens it holds and the adapter scales they
    /// were decoded with.
    pub(crate) fn save_state(&mut self, index: usize) -> Result<SavedCache, EngineError> {
        debug_assert!(self.slot_is_idle(index));
        let seq = &self.slots[index].seq;
        let state = self.session.seq_state(seq.id())?;
        Ok(SavedCache { tokens: seq.tokens().to_vec(), adapters: seq.adapters().clone(), state })
    }

    /// Replaces idle slot `index`'s cache with `state`, saved with `tokens` and adapter
    /// `adapters` by [`Scheduler::save_state`] (of a context of this model). On failure the slot
    /// is empty.
    pub(crate) fn restore_state(&mut self, index: usize, tokens: &[Token], adapters: &AdapterPlan, state: &[u8]) -> Result<(), EngineError> {
        debug_assert!(self.slot_is_idle(index));
        let seq = &mut self.slots[index].seq;
        seq.adapt(&mut self.session, adapters);
        seq.clear(&mut self.session);
        let loaded = if tokens.len() > self.n_ctx {
            Err(EngineError::state(
                crate::error::SlotFileAction::Restore,
                format!("it holds {} tokens, more than the context's {}", tokens.len(), self.n_ctx),
            ))
        } else {
            // Every backend reports the positions it restored; the one check is here.
            self.session.seq_load_state(seq.id(), state).and_then(|held| {
                if held == tokens.len() {
                    Ok(())
                } else {
                    let why = format!("the state holds {held} positions, its token list {}", tokens.len());
                    Err(EngineError::state(crate::error::SlotFileAction::Restore, why))
                }
            })
        };
        match loaded {
            Ok(()) => seq.extend(tokens),
            Err(_) => seq.clear(&mut self.session),
        }
        self.slot_changed();
        loaded
    }

    /// Publishes what a slot action changed: the cells held, the checkpoints, the slots.
    fn slot_changed(&self) {
        self.counters.kv_used.store(self.slots.iter().map(|s| s.seq.len()).sum(), Ordering::Relaxed);
        self.publish_checkpoints();
        self.publish_slots();
    }

    /// Loads `path` into slot `index`'s emptied cache; returns the tokens it holds. The cells
    /// count as decoded as [`Scheduler::file_plan`] says (a slot file records no scales; a save
    /// refuses a cache of others).
    fn restore(&mut self, index: usize, path: &std::path::Path) -> Result<usize, EngineError> {
        let seq = &mut self.slots[index].seq;
        seq.clear(&mut self.session);
        let loaded = self
            .session
            .seq_load_file(seq.id(), path, self.n_ctx + slot_file::OVERHEAD)
            .and_then(|list| slot_file::unpack(list).map_err(|why| EngineError::slot_file(crate::error::SlotFileAction::Restore, path, why)));
        match loaded {
            Ok(tokens) => {
                let plan = self.file_plan(&tokens);
                let seq = &mut self.slots[index].seq;
                seq.extend(&tokens);
                seq.set_adapters(plan);
                Ok(tokens.len())
            }
            Err(e) => {
                seq.clear(&mut self.session);
                Err(e)
            }
        }
    }

    /// The adapter scales a slot file's cells of `tokens` count as decoded with (a file records
    /// none): the default scales', an activated LoRA's from its invocation in them on, as a
    /// request of those tokens would decode them (where that request would be refused, two
    /// activated LoRAs enabled, none of their cells serve anything).
    fn file_plan(&self, tokens: &[Token]) -> AdapterPlan {
        let default = read(&self.default_scales);
        AdapterPlan::for_model(default.clone(), tokens, self.model).unwrap_or(AdapterPlan::uniform(default))
    }

    /// Empties the caches idle slots keep for reuse (but `keep`'s); false when none held any.
    fn forget_idle(&mut self, keep: Option<usize>) -> bool {
        let mut freed = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if Some(i) != keep && slot.is_idle() && slot.seq.len() > 0 {
                slot.seq.clear(&mut self.session);
                freed = true;
            }
        }
        freed
    }

    /// Empties every idle slot's cache.
    pub(crate) fn forget(&mut self) {
        self.forget_idle(None);
    }
}

/// Steps a group of requests of one set of adapter scales keeps the context for while others
/// wait (see [`Scheduler::choose_group`]). Applying other adapters makes llama.cpp rebuild its
/// graphs at the next decode: on the 2-core Xeon with two groups, switching at every step gave
/// 0.87-0.93 of llama-server's aggregate, turns of 8 steps 0.96-0.98 (docs/benchmarks.md,
/// "Requests of different LoRA adapter scales"). A longer turn makes the waiting group's
/// streams pause longer.
const GROUP_TURN: usize = 8;

/// The adapter scales of the next position a slot's request decodes (its prompt's where it
/// prefills, else its generation's): the group of requests it belongs to now (see
/// [`Scheduler::choose_group`]).
fn group_of<S, C>(phase: &Phase<Box<Request<S, C>>>) -> Option<&[f32]> {
    match phase {
        Phase::Idle => None,
        Phase::Prefilling { request, done, .. } => Some(request.adapters.scales_at(*done)),
        Phase::Generating { request, .. } => Some(request.adapters.scales_at(usize::MAX)),
    }
}

/// The default adapter scales as they are now.
fn read(scales: &DefaultScales) -> Vec<f32> {
    scales.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Fewer shared tokens than this are not worth copying another slot's cells for (or waiting).
const MIN_COPIED_PREFIX: usize = 4;

/// Recurrent checkpoints a slot keeps by default (llama-server's `--ctx-checkpoints` keeps 8).
pub(crate) const DEFAULT_CHECKPOINTS: usize = 8;

/// The free slot for a prompt: the one whose cache shares the longest prefix with it, when that
/// covers at least half the prompt; otherwise the least valuable cache is given up: an empty
/// slot, else the one used longest ago. (A prefix of a token or two, such as BOS, is not worth
/// another prompt's whole cache.)
fn choose_slot<R, K: Clone>(slots: &[Slot<R, K>], prompt: &[Token], plan: &AdapterPlan, recurrent: bool) -> Option<usize> {
    let free = || slots.iter().enumerate().filter(|(_, s)| s.is_idle());
    let (best, best_common) = free().map(|(i, s)| (i, s.seq.reusable(prompt, plan, recurrent))).max_by_key(|&(i, c)| (c, std::cmp::Reverse(i)))?;
    if best_common * 2 >= prompt.len() {
        return Some(best);
    }
    free().min_by_key(|(_, s)| (s.seq.len() > 0, s.last_used)).map(|(i, _)| i)
}
