//! The decode loop: admission into slots, one batch per step, sampling per slot.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::time::Instant;

use super::{Completion, Counters, Event, ServeRequest, Submission, TokenLogprobs};
use crate::backend::{BackendModel, BackendSession, TokenId};
use crate::config::{SessionConfig, Speculation};
use crate::engine::{Engine, FinishReason, GenerationStats, Model};
use crate::error::{DecodeFailure, EngineError};
use crate::speculative::DraftLength;
use crate::stop::TOKEN_TEXT_CAPACITY;
use crate::token_text::{TokenText, ms};

type Session<'e> = <Model as BackendModel>::Session<'e>;
type Sampler<'e> = <Session<'e> as BackendSession>::Sampler;

/// One sequence of the shared context.
struct Slot<'e> {
    seq: i32,
    /// The tokens in this sequence's cache, in position order: kept after a request ends, for
    /// the next one to reuse.
    cached: Vec<TokenId>,
    request: Option<Running<'e>>,
    /// When the slot last ended a request (for choosing among equally good free slots).
    last_used: u64,
}

/// A request in a slot.
struct Running<'e> {
    events: mpsc::Sender<Event>,
    prompt: Vec<TokenId>,
    /// Prompt tokens in the cache so far (reused or decoded).
    prefilled: usize,
    /// A sampled token to decode in the next step.
    pending: Option<TokenId>,
    /// This step's batch index of the slot's output, if it has one.
    output: Option<i32>,
    sampler: Sampler<'e>,
    max_tokens: usize,
    cancel: crate::config::CancelToken,
    text: TokenText,
    delta: String,
    tokens: Vec<TokenId>,
    /// With logprobs asked for: how many candidates, and the entries so far.
    logprobs: Option<(usize, Vec<TokenLogprobs>)>,
    /// Prompt lookup ([`Speculation::Ngram`]): how many tokens to draft next.
    speculation: Option<DraftLength>,
    /// This step's drafts, decoded after the pending token at the batch indexes after
    /// `output`, verified in [`sample`].
    drafts: Vec<TokenId>,
    admitted: u64,
    started: Instant,
    prompt_done: Option<Instant>,
    stats: GenerationStats,
}

/// How a slot with a request stood before this step's batch was built: what a failed decode
/// puts back.
#[derive(Clone, Copy, Debug)]
struct Before {
    slot: usize,
    cached: usize,
    pending: Option<TokenId>,
    prefilled: usize,
}

/// Runs until the queue's sender is gone and every accepted request has ended. `ready` gets
/// the outcome of creating the context, before anything else.
pub(super) fn run(
    engine: &Engine,
    config: &SessionConfig,
    requests: Receiver<Submission>,
    counters: &Counters,
    ready: SyncSender<Result<(), EngineError>>,
) {
    let model = engine.model();
    let mut session = match model.session(config) {
        Ok(session) => session,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // A backend without per-sequence samplers says so here, before any request is accepted.
    if let Some(e) = session.new_sampler(&crate::SamplingParams::greedy()).err() {
        let _ = ready.send(Err(e));
        return;
    }
    let _ = ready.send(Ok(()));
    let n_ctx = session.n_ctx() as usize;
    let n_batch = session.n_batch() as usize;
    let mut slots: Vec<Slot<'_>> =
        (0..config.n_seq as i32).map(|seq| Slot { seq, cached: Vec::with_capacity(n_ctx), request: None, last_used: 0 }).collect();
    let mut clock = 0u64;
    let mut open = true;
    let mut before: Vec<Before> = Vec::with_capacity(slots.len());
    // A request taken from the queue that waits for KV space (it stays counted as queued).
    let mut deferred: Option<Submission> = None;
    // Set when a step with drafts found the KV cache full: the step is built again without
    // drafts before anything else gives way.
    let mut without_drafts = false;
    loop {
        // Admission: fill free slots from the queue while the KV cache has room for the
        // prompts; block only when there is nothing to run.
        while slots.iter().any(|s| s.request.is_none()) {
            let idle = slots.iter().all(|s| s.request.is_none());
            let submission = match deferred.take() {
                Some(s) => s,
                None if !open => break,
                None if idle => match requests.recv() {
                    Ok(s) => s,
                    Err(_) => {
                        open = false;
                        break;
                    }
                },
                None => match requests.try_recv() {
                    Ok(s) => s,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
            };
            // Alone, a request gets the whole cache (or fails for length); beside others, it
            // waits until its prompt fits. A cancelled one is let through to be refused.
            if !idle && !submission.request.cancel.is_cancelled() && committed_cells(&slots) + submission.request.tokens.len() > n_ctx {
                deferred = Some(submission);
                break;
            }
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            clock += 1;
            admit(&mut session, &mut slots, submission, n_ctx, clock, counters);
        }
        if slots.iter().all(|s| s.request.is_none()) {
            if open || deferred.is_some() {
                continue;
            }
            return;
        }

        // Requests whose client left or that were cancelled end here, prefill included.
        for slot in &mut slots {
            if slot.request.as_ref().is_some_and(|r| r.cancel.is_cancelled()) {
                finish(slot, FinishReason::Cancelled, &mut clock, counters);
            }
        }

        session.batch_clear();
        before.clear();
        before.extend(
            slots.iter().enumerate().filter_map(|(slot, s)| {
                s.request.as_ref().map(|r| Before { slot, cached: s.cached.len(), pending: r.pending, prefilled: r.prefilled })
            }),
        );
        let built = build_batch(&mut session, &mut slots, n_ctx, n_batch, without_drafts, &mut clock, counters);
        let had_drafts = slots.iter().any(|s| s.request.as_ref().is_some_and(|r| !r.drafts.is_empty()));
        let decoded = built.and_then(|prompt_tokens| {
            if session.batch_len() > 0 {
                session.batch_decode()?;
                counters.steps.fetch_add(1, Ordering::Relaxed);
                counters.prompt_tokens_decoded.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
            }
            Ok(())
        });
        if let Err(e) = decoded {
            if e.decode_failure() == Some(DecodeFailure::NoKvSlot) {
                roll_back(&mut session, &mut slots, &before, &mut clock, counters);
                if had_drafts {
                    without_drafts = true;
                    counters.steps_without_drafts.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if make_room(&mut session, &mut slots, &mut clock, counters) {
                    continue;
                }
            }
            fail_batch(&mut session, &mut slots, &e, &mut clock, counters);
            continue;
        }
        without_drafts = false;
        for slot in &mut slots {
            if slot.request.as_ref().is_some_and(|r| r.output.is_some())
                && let Err(e) = sample(&mut session, model, slot, n_ctx, &mut clock, counters)
            {
                fail(slot, e, &mut clock, counters);
            }
        }
        counters.kv_used.store(slots.iter().map(|s| s.cached.len()).sum(), Ordering::Relaxed);
    }
}

/// The KV cells the running requests hold or will hold for their prompts (what generation adds
/// is not reserved: a full cache makes the newest request give way, see [`make_room`]).
fn committed_cells(slots: &[Slot<'_>]) -> usize {
    slots.iter().filter_map(|s| s.request.as_ref().map(|r| r.prompt.len().max(s.cached.len()))).sum()
}

/// Puts a request into the free slot whose cache shares the longest prefix with its prompt.
fn admit<'e>(session: &mut Session<'e>, slots: &mut [Slot<'e>], submission: Submission, n_ctx: usize, clock: u64, counters: &Counters) {
    let Submission { request, events } = submission;
    let ServeRequest { tokens, max_tokens, stop, sampling, cancel, logprobs, speculation } = request;
    let refuse = |e: EngineError| {
        let _ = events.send(Event::Failed(e));
    };
    if cancel.is_cancelled() {
        return refuse(EngineError::Cancelled);
    }
    if tokens.is_empty() {
        return refuse(EngineError::EmptyPrompt);
    }
    if tokens.len() >= n_ctx {
        return refuse(EngineError::PromptTooLong { prompt_tokens: tokens.len(), n_ctx: n_ctx as u32 });
    }
    let speculation = match speculation {
        Speculation::Off => None,
        Speculation::Ngram { max_draft } => Some(DraftLength::new(max_draft as usize)),
        Speculation::Draft { .. } => {
            return refuse(EngineError::InvalidRequest {
                field: "speculation",
                value: "draft".into(),
                reason: "the serving loop drafts by prompt lookup (ngram) only",
            });
        }
    };
    let sampler = match session.new_sampler(&sampling) {
        Ok(s) => s,
        Err(e) => return refuse(e),
    };
    let Some(index) = choose_slot(slots, &tokens) else {
        return refuse(EngineError::Session("no free slot".into()));
    };
    let slot = &mut slots[index];
    let common_prefix = |s: &Slot<'_>| s.cached.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
    // Keep one prompt token to decode: its logits start the generation.
    let mut reused = common_prefix(slot).min(tokens.len() - 1);
    if reused < slot.cached.len() && !session.seq_truncate(slot.seq, reused as i32) {
        session.seq_clear(slot.seq);
        reused = 0;
    }
    slot.cached.truncate(reused);
    counters.busy_slots.fetch_add(1, Ordering::Relaxed);
    counters.prompt_tokens_reused.fetch_add(reused as u64, Ordering::Relaxed);
    slot.request = Some(Running {
        events,
        prefilled: reused,
        pending: None,
        output: None,
        sampler,
        max_tokens,
        cancel,
        text: TokenText::new(&stop),
        delta: String::with_capacity(TOKEN_TEXT_CAPACITY),
        tokens: Vec::with_capacity(max_tokens.min(n_ctx)),
        logprobs: logprobs.map(|n| (n.min(20), Vec::new())),
        drafts: Vec::with_capacity(speculation.map_or(0, |s| s.get())),
        speculation,
        admitted: clock,
        started: Instant::now(),
        prompt_done: None,
        stats: GenerationStats { prompt_tokens: tokens.len(), prompt_tokens_reused: reused, ..Default::default() },
        prompt: tokens,
    });
}

/// The free slot for a prompt: the one whose cache shares the longest prefix with it, when
/// that covers at least half the prompt; otherwise the least valuable cache is given up: an
/// empty slot, else the one used longest ago. (A prefix of a token or two, such as BOS, is
/// not worth another prompt's whole cache.)
fn choose_slot(slots: &[Slot<'_>], prompt: &[TokenId]) -> Option<usize> {
    let common = |s: &Slot<'_>| s.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let free = || slots.iter().enumerate().filter(|(_, s)| s.request.is_none());
    let (best, best_common) = free().map(|(i, s)| (i, common(s))).max_by_key(|&(i, c)| (c, std::cmp::Reverse(i)))?;
    if best_common * 2 >= prompt.len() {
        return Some(best);
    }
    free().min_by_key(|(_, s)| (!s.cached.is_empty(), s.last_used)).map(|(i, _)| i)
}

/// The step's batch: first the next token of every generating request (one each, with its
/// drafts when it speculates), then prompt chunks, oldest request first, up to n_batch tokens
/// in all. Returns the prompt tokens in it.
fn build_batch(
    session: &mut Session<'_>,
    slots: &mut [Slot<'_>],
    n_ctx: usize,
    n_batch: usize,
    without_drafts: bool,
    clock: &mut u64,
    counters: &Counters,
) -> Result<usize, EngineError> {
    let mut prompt_tokens = 0;
    let n_slots = slots.len();
    for slot in slots.iter_mut() {
        let Some(r) = slot.request.as_mut() else { continue };
        r.output = None;
        r.drafts.clear();
        // A request decoding its tokens again (see `sample`) keeps its next token until then.
        if r.prefilled < r.prompt.len() {
            continue;
        }
        let Some(token) = r.pending.take() else { continue };
        if slot.cached.len() + 1 >= n_ctx {
            finish(slot, FinishReason::ContextFull, clock, counters);
            continue;
        }
        r.output = Some(session.batch_len() as i32);
        session.batch_push(token, slot.cached.len() as i32, slot.seq, true)?;
        slot.cached.push(token);
        if let Some(length) = r.speculation.filter(|_| !without_drafts) {
            // Room: a position kept for the next token, max tokens, and the batch less a token
            // for every other slot.
            let room = n_ctx
                .saturating_sub(slot.cached.len() + 1)
                .min(r.max_tokens.saturating_sub(r.stats.completion_tokens))
                .min(n_batch.saturating_sub(session.batch_len() + n_slots))
                .min(length.get());
            crate::speculative::draft(&slot.cached, room, &mut r.drafts);
            for (i, &draft) in r.drafts.iter().enumerate() {
                session.batch_push(draft, (slot.cached.len() + i) as i32, slot.seq, true)?;
            }
        }
    }
    let mut prefilling: Vec<usize> = Vec::new();
    prefilling.extend((0..slots.len()).filter(|&i| slots[i].request.as_ref().is_some_and(|r| r.prefilled < r.prompt.len())));
    prefilling.sort_by_key(|&i| slots[i].request.as_ref().map_or(0, |r| r.admitted));
    for i in prefilling {
        let room = n_batch - session.batch_len();
        if room == 0 {
            break;
        }
        let slot = &mut slots[i];
        let r = slot.request.as_mut().expect("a prefilling slot has a request");
        let n = room.min(r.prompt.len() - r.prefilled);
        for k in r.prefilled..r.prefilled + n {
            // The last prompt token's logits give the first token; a request decoding its
            // tokens again has that token already.
            let last = k + 1 == r.prompt.len() && r.pending.is_none();
            if last {
                r.output = Some(session.batch_len() as i32);
            }
            session.batch_push(r.prompt[k], k as i32, slot.seq, last)?;
        }
        slot.cached.extend_from_slice(&r.prompt[r.prefilled..r.prefilled + n]);
        r.prefilled += n;
        prompt_tokens += n;
    }
    Ok(prompt_tokens)
}

/// The KV cache had no room for the step: every slot is put back as it was before the batch
/// (llama.cpp finds room for a whole batch before it computes any of it, so the cache holds
/// nothing of it).
fn roll_back(session: &mut Session<'_>, slots: &mut [Slot<'_>], before: &[Before], clock: &mut u64, counters: &Counters) {
    for b in before {
        let slot = &mut slots[b.slot];
        let Some(r) = slot.request.as_mut() else { continue };
        slot.cached.truncate(b.cached);
        r.pending = b.pending;
        r.prefilled = b.prefilled;
        r.output = None;
        r.drafts.clear();
        if !session.seq_truncate(slot.seq, b.cached as i32) {
            // A memory that cannot cut back (recurrent state): this request cannot go on.
            session.seq_clear(slot.seq);
            slot.cached.clear();
            fail(
                slot,
                EngineError::decode(DecodeFailure::NoKvSlot, "the KV cache is full and this sequence's state cannot be rolled back"),
                clock,
                counters,
            );
        }
    }
}

/// Makes room after [`roll_back`]: first by dropping the caches free slots keep for reuse, else
/// by failing the newest running request, so that the older ones go on. False when nothing can
/// give way (a single request that does not fit): the caller fails it.
fn make_room(session: &mut Session<'_>, slots: &mut [Slot<'_>], clock: &mut u64, counters: &Counters) -> bool {
    let mut freed = false;
    for slot in slots.iter_mut().filter(|s| s.request.is_none() && !s.cached.is_empty()) {
        session.seq_clear(slot.seq);
        slot.cached.clear();
        freed = true;
    }
    if freed {
        return true;
    }
    let running: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].request.is_some()).collect();
    let Some(&newest) = running.iter().max_by_key(|&&i| slots[i].request.as_ref().map_or(0, |r| r.admitted)) else { return false };
    if running.len() < 2 {
        return false;
    }
    let slot = &mut slots[newest];
    session.seq_clear(slot.seq);
    slot.cached.clear();
    let error = EngineError::decode(
        DecodeFailure::NoKvSlot,
        "the KV cache is full; the newest request gives way to the older ones (a larger --ctx or fewer --parallel slots helps)",
    );
    fail(slot, error, clock, counters);
    true
}

/// Samples the slot's output of this step and handles the token as the single-stream
/// generation does: end of text, text with stop sequences held back, max tokens. With drafts,
/// each following output is drawn in turn while the draws equal the drafts (as
/// [`crate::Generation`] verifies them), and the cache is cut back to what was kept.
fn sample<'e>(
    session: &mut Session<'e>,
    model: &Model,
    slot: &mut Slot<'e>,
    n_ctx: usize,
    clock: &mut u64,
    counters: &Counters,
) -> Result<(), EngineError> {
    let r = slot.request.as_mut().expect("sampled slots have a request");
    let index = r.output.take().expect("sampled slots have an output");
    let now = Instant::now();
    if r.prompt_done.is_some() {
        r.stats.generation_decodes += 1;
    } else {
        r.prompt_done = Some(now);
        let prompt_ms = ms(now - r.started);
        let decoded = r.stats.prompt_tokens - r.stats.prompt_tokens_reused;
        r.stats.prompt_ms = prompt_ms;
        r.stats.prompt_tokens_per_s = if prompt_ms > 0.0 { decoded as f64 / (prompt_ms / 1000.0) } else { 0.0 };
    }
    let drafts = std::mem::take(&mut r.drafts);
    // Counted before drawing: a round can end the request, and its stats go out with it.
    r.stats.drafted_tokens += drafts.len();
    let mut kept = 0;
    let mut outcome = Ok(());
    for i in 0..=drafts.len() {
        let r = slot.request.as_mut().expect("checked: the request goes on");
        let token = match draw(session, r, index + i as i32) {
            Ok(token) => token,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        let is_draft = drafts.get(i) == Some(&token);
        if is_draft {
            // Kept, also when it ends the request (counted as the single stream counts it).
            kept += 1;
            slot.request.as_mut().expect("checked: the request goes on").stats.accepted_tokens += 1;
        }
        match take_token(model, slot, token, n_ctx, clock, counters) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
        let r = slot.request.as_mut().expect("take_token said the request goes on");
        if is_draft {
            // Decoded in this step already.
            slot.cached.push(token);
        } else {
            r.pending = Some(token);
            break;
        }
    }
    let drafted = drafts.len();
    if let Some(r) = slot.request.as_mut() {
        // The buffer goes back, empty or not: the next step drafts into it without allocating.
        r.drafts = drafts;
    }
    if drafted == 0 {
        return outcome;
    }
    counters.drafted_tokens.fetch_add(drafted as u64, Ordering::Relaxed);
    counters.accepted_tokens.fetch_add(kept as u64, Ordering::Relaxed);
    if let Some(r) = slot.request.as_mut() {
        if let Some(length) = r.speculation.as_mut() {
            length.update(drafted, kept);
        }
    }
    // Rejected drafts (and a kept one that ended the request) leave the cache.
    if !session.seq_truncate(slot.seq, slot.cached.len() as i32) {
        // A memory that cannot cut back (recurrent state): the sequence is decoded again from
        // its tokens, without speculation from here on; its next token waits (`build_batch`).
        session.seq_clear(slot.seq);
        let tokens = std::mem::take(&mut slot.cached);
        if let Some(r) = slot.request.as_mut() {
            r.prompt = tokens;
            r.prefilled = 0;
            r.speculation = None;
        }
    }
    outcome
}

/// Draws the token at batch `index` with the request's sampler (its log-probabilities noted when
/// asked for).
fn draw<'e>(session: &mut Session<'e>, r: &mut Running<'e>, index: i32) -> Result<TokenId, EngineError> {
    let token = session.sample_with(&mut r.sampler, index)?;
    if let Some((n, entries)) = r.logprobs.as_mut() {
        // llama.cpp's samplers work on a copy of the row, so it still holds the model's logits.
        entries.push(TokenLogprobs::from_row(session.logits_at(index)?, token, *n));
    }
    if r.stats.completion_tokens == 0 {
        r.stats.time_to_first_token_ms = ms(Instant::now() - r.started);
    }
    Ok(token)
}

/// Hands a drawn token to the request: end of text, its text (stop sequences held back) to the
/// client, max tokens, context room. True when the request ended with it.
fn take_token(model: &Model, slot: &mut Slot<'_>, token: TokenId, n_ctx: usize, clock: &mut u64, counters: &Counters) -> Result<bool, EngineError> {
    let r = slot.request.as_mut().expect("a token goes to a running request");
    if model.is_eog(token) {
        finish(slot, FinishReason::EndOfText, clock, counters);
        return Ok(true);
    }
    r.stats.completion_tokens += 1;
    r.tokens.push(token);
    counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
    r.delta.clear();
    let stopped = r.text.push(model, token, &mut r.delta)?;
    if !r.delta.is_empty() && r.events.send(Event::Delta(r.delta.clone())).is_err() {
        // The client left: end the request without a word.
        finish(slot, FinishReason::Cancelled, clock, counters);
        return Ok(true);
    }
    let reason = if stopped {
        Some(FinishReason::StopSequence)
    } else if r.stats.completion_tokens >= r.max_tokens {
        Some(FinishReason::MaxTokens)
    } else if slot.cached.len() + 1 >= n_ctx {
        Some(FinishReason::ContextFull)
    } else {
        None
    };
    if let Some(reason) = reason {
        finish(slot, reason, clock, counters);
    }
    Ok(reason.is_some())
}

/// Ends the slot's request with `reason`: held-back text and `Done` go out, the slot is free.
fn finish(slot: &mut Slot<'_>, reason: FinishReason, clock: &mut u64, counters: &Counters) {
    let Some(mut r) = slot.request.take() else { return };
    counters.busy_slots.fetch_sub(1, Ordering::Relaxed);
    *clock += 1;
    slot.last_used = *clock;
    r.delta.clear();
    r.text.finish(reason, &mut r.delta);
    if !r.delta.is_empty() {
        let _ = r.events.send(Event::Delta(std::mem::take(&mut r.delta)));
    }
    match r.prompt_done {
        Some(done) => r.stats.end(reason, done),
        // Ended before its prompt was in: no generation to time.
        None => r.stats.finish_reason = Some(reason),
    }
    let completion = Completion { finish_reason: reason, stats: r.stats, tokens: r.tokens, logprobs: r.logprobs.map(|(_, e)| e).unwrap_or_default() };
    let _ = r.events.send(Event::Done(completion));
}

/// Ends the slot's request with an error. Its cache may hold part of what failed: emptied.
fn fail(slot: &mut Slot<'_>, e: EngineError, clock: &mut u64, counters: &Counters) {
    let Some(r) = slot.request.take() else { return };
    counters.busy_slots.fetch_sub(1, Ordering::Relaxed);
    *clock += 1;
    slot.last_used = *clock;
    let _ = r.events.send(Event::Failed(e));
}

/// A decode (or batch) failure other than a full cache that [`make_room`] could relieve (an
/// internal error, an aborted decode): every running request had tokens in the batch or
/// depends on the cache it may have half written, so each fails with it and its sequence is
/// emptied.
fn fail_batch(session: &mut Session<'_>, slots: &mut [Slot<'_>], e: &EngineError, clock: &mut u64, counters: &Counters) {
    let kind = e.decode_failure().unwrap_or(DecodeFailure::Internal);
    for slot in slots.iter_mut().filter(|s| s.request.is_some()) {
        session.seq_clear(slot.seq);
        slot.cached.clear();
        // Each slot gets its own copy, of the same kind (a lost rpc-server stays one).
        let error = match e {
            EngineError::Cancelled => EngineError::Cancelled,
            EngineError::Rpc(lost) => EngineError::Rpc(lost.clone()),
            e => EngineError::decode(kind, e.to_string()),
        };
        fail(slot, error, clock, counters);
    }
}
