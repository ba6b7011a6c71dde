//! The scheduler's decisions on a small fake backend: which slot a prompt goes to, when a
//! request is admitted, what a full cache rolls back and who gives way, how much room drafts get,
//! and the recurrent fallback. The fake checks every batch the way llama.cpp would need it (each
//! token at the next position of its sequence, room in the cache), and its "model" is a table:
//! the logits after token `t` put all weight on `next[t]`, so each slot's output row says whose
//! token it followed, and a mixed-up row shows as a wrong token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::*;
use crate::backend::{BackendModel, BackendSession, ModelInfo, Outputs};
use crate::config::{GenerateOptions, SamplingParams, SessionConfig, Speculation};
use crate::error::{DecodeFailure, EngineError};

const VOCAB: i32 = 32;
/// The fake's end-of-generation token.
const EOG: Token = Token(0);

/// A batch entry as the fake records it: token id, position, sequence, whether it has an output.
type Entry = (i32, i32, i32, bool);

/// A model whose only knowledge is `next`: the token after each token.
struct FakeModel {
    next: Vec<Token>,
    /// Its memory is recurrent: a sequence can only be cut where it ends.
    recurrent: bool,
    /// It keeps recurrent checkpoints (the source backend does; `crate` and `raw` do not).
    checkpoints: bool,
    /// Every batch decoded, for tests that look at them: (token, position, sequence, output).
    batches: Mutex<Vec<Vec<Entry>>>,
    /// The adapter scales each of those batches was decoded with.
    batch_scales: Mutex<Vec<Vec<f32>>>,
    /// Adapter scales it cannot apply (as a backend that fails to).
    refused_scales: Option<Vec<f32>>,
    /// Each adapter's activated-LoRA invocation (none: plain adapters).
    invocations: Vec<Vec<Token>>,
}

impl FakeModel {
    /// `next[t] = t + 1`, wrapping past EOG.
    fn counting() -> Self {
        FakeModel {
            next: (0..VOCAB).map(|t| Token(if t + 1 == VOCAB { 1 } else { t + 1 })).collect(),
            recurrent: false,
            checkpoints: false,
            batches: Mutex::default(),
            batch_scales: Mutex::default(),
            refused_scales: None,
            invocations: Vec::new(),
        }
    }

    /// Its memory recurrent, keeping checkpoints as the source backend does.
    fn recurrent(self) -> Self {
        FakeModel { recurrent: true, checkpoints: true, ..self }
    }

    /// Its memory recurrent, keeping no checkpoints (the `crate` and `raw` backends).
    fn recurrent_without_checkpoints(self) -> Self {
        FakeModel { recurrent: true, ..self }
    }

    /// `next[t] = n` for each pair of ids `(t, n)`.
    fn with_next(mut self, pairs: &[(i32, i32)]) -> Self {
        for &(t, n) in pairs {
            self.next[t as usize] = Token(n);
        }
        self
    }
}

struct FakeSession<'m> {
    model: &'m FakeModel,
    n_ctx: usize,
    n_batch: usize,
    /// Each sequence's cache, position by position.
    kv: Vec<Vec<Token>>,
    batch: Vec<Entry>,
    /// The last decode's rows, by batch index.
    rows: Vec<Option<Vec<f32>>>,
    abort: Option<Arc<AtomicBool>>,
    /// The adapter scales applied: an adapter at a scale other than 0 moves each prediction on
    /// by one token, so that a decode with the wrong adapters shows in the output.
    scales: Vec<f32>,
}

/// Greedy: the row's argmax.
struct FakeSampler;

impl BackendModel for FakeModel {
    type Session<'m> = FakeSession<'m>;

    fn info(&self) -> ModelInfo {
        ModelInfo { architecture: "fake".into(), n_vocab: VOCAB, ..Default::default() }
    }

    fn tokenize(&self, text: &str, _: bool, _: bool, out: &mut Vec<Token>) -> Result<(), EngineError> {
        out.clear();
        out.extend(text.bytes().map(|b| Token(i32::from(b) % VOCAB)));
        Ok(())
    }

    fn piece(&self, token: Token, _special: bool, out: &mut Vec<u8>) -> Result<(), EngineError> {
        out.push(b'a' + (token.0 % 26) as u8);
        Ok(())
    }

    fn is_eog(&self, token: Token) -> bool {
        token == EOG
    }

    fn bos(&self) -> Token {
        Token(1)
    }

    fn n_vocab(&self) -> i32 {
        VOCAB
    }

    fn fim_tokens(&self) -> crate::FimTokens {
        crate::FimTokens::default()
    }

    fn meta(&self, _: &str) -> Option<String> {
        None
    }
    fn adapter_meta(&self, _: usize, _: &str) -> Option<String> {
        None
    }

    fn adapter_invocation(&self, adapter: usize) -> &[Token] {
        self.invocations.get(adapter).map_or(&[], Vec::as_slice)
    }

    fn named_template(&self, _: &str) -> Option<String> {
        None
    }

    fn pair_tokens(&self) -> crate::token::PairTokens {
        crate::token::PairTokens::default()
    }

    fn chat_template(&self) -> Option<String> {
        None
    }

    fn apply_chat_template(&self, _: &str, _: &[(String, String)]) -> Result<String, EngineError> {
        Err(EngineError::Unsupported { what: "chats", backend: "fake" })
    }

    fn sampler(&self, _: &SamplingParams) -> Result<FakeSampler, EngineError> {
        Ok(FakeSampler)
    }

    fn session(&self, config: &SessionConfig) -> Result<FakeSession<'_>, EngineError> {
        Ok(FakeSession {
            model: self,
            n_ctx: config.n_ctx as usize,
            n_batch: config.n_batch as usize,
            kv: vec![Vec::new(); config.n_seq_max as usize],
            batch: Vec::new(),
            rows: Vec::new(),
            abort: None,
            scales: Vec::new(),
        })
    }
}

impl BackendSession for FakeSession<'_> {
    type Sampler = FakeSampler;
    /// The cache as it stood.
    type Checkpoint = Vec<Token>;

    fn n_ctx(&self) -> u32 {
        self.n_ctx as u32
    }

    fn n_batch(&self) -> u32 {
        self.n_batch as u32
    }

    fn fill(&mut self, tokens: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.batch_clear();
        for (i, &t) in tokens.iter().enumerate() {
            self.batch_push(t, start + i as i32, 0, outputs == Outputs::Last && i + 1 == tokens.len())?;
        }
        Ok(())
    }

    fn decode(&mut self, tokens: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.fill(tokens, start, outputs)?;
        self.batch_decode()
    }

    fn last_logits(&self) -> Result<&[f32], EngineError> {
        self.rows.iter().rev().flatten().next().map(Vec::as_slice).ok_or_else(|| EngineError::decode(DecodeFailure::NoOutput, "no rows"))
    }

    fn set_abort_flag(&mut self, flag: Arc<AtomicBool>) {
        self.abort = Some(flag);
    }

    fn synchronize(&self) {}

    fn sequence_embedding(&self, _: i32) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Unsupported { what: "embeddings", backend: "fake" })
    }
    fn token_embedding(&self, _: i32) -> Result<Vec<f32>, EngineError> {
        Err(EngineError::Unsupported { what: "embeddings", backend: "fake" })
    }

    fn batch_clear(&mut self) {
        self.batch.clear();
    }

    fn batch_push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Result<(), EngineError> {
        if self.batch.len() == self.n_batch {
            return Err(EngineError::decode(DecodeFailure::InvalidBatch, "the batch is full"));
        }
        self.batch.push((token.0, pos, seq, output));
        Ok(())
    }

    fn batch_len(&self) -> usize {
        self.batch.len()
    }

    /// As llama.cpp: refuses a batch the cache has no room for before placing any of it, and
    /// needs each token at the next position of its sequence.
    fn batch_decode(&mut self) -> Result<(), EngineError> {
        if self.abort.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled);
        }
        let used: usize = self.kv.iter().map(Vec::len).sum();
        if used + self.batch.len() > self.n_ctx {
            return Err(EngineError::decode(DecodeFailure::NoKvSlot, "no room"));
        }
        self.model.batches.lock().unwrap().push(self.batch.clone());
        self.model.batch_scales.lock().unwrap().push(self.scales.clone());
        let shift = self.scales.iter().filter(|&&s| s != 0.0).count() as i32;
        self.rows.clear();
        for &(token, pos, seq, output) in &self.batch {
            let cache = &mut self.kv[seq as usize];
            assert_eq!(pos as usize, cache.len(), "token {token} of sequence {seq} at position {pos}, but the sequence holds {} tokens", cache.len());
            cache.push(Token(token));
            self.rows.push(output.then(|| {
                let mut row = vec![0.0; VOCAB as usize];
                row[((self.model.next[token as usize].0 + shift) % VOCAB) as usize] = 1.0;
                row
            }));
        }
        Ok(())
    }

    fn sample_with(&mut self, _: &mut FakeSampler, index: i32) -> Result<Token, EngineError> {
        let row = self.logits_at(index)?;
        Ok(row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(t, _)| Token(t as i32)).unwrap())
    }

    fn logits_at(&self, index: i32) -> Result<&[f32], EngineError> {
        self.rows
            .get(index as usize)
            .and_then(Option::as_deref)
            .ok_or_else(|| EngineError::decode(DecodeFailure::NoOutput, format!("no output at {index}")))
    }

    fn seq_truncate(&mut self, seq: i32, from: i32) -> bool {
        let cache = &mut self.kv[seq as usize];
        if self.model.recurrent && (from as usize) < cache.len() {
            return false;
        }
        cache.truncate(from as usize);
        true
    }

    fn seq_clear(&mut self, seq: i32) {
        self.kv[seq as usize].clear();
    }

    fn seq_copy(&mut self, src: i32, dst: i32) -> bool {
        self.kv[dst as usize] = self.kv[src as usize].clone();
        true
    }

    fn memory_is_recurrent(&self) -> bool {
        self.model.recurrent
    }

    fn keeps_checkpoints(&self) -> bool {
        self.model.checkpoints
    }

    fn seq_checkpoint(&mut self, seq: i32) -> Option<(Vec<Token>, usize)> {
        let cache = &self.kv[seq as usize];
        self.model.checkpoints.then(|| (cache.clone(), 4 * cache.len()))
    }

    /// As llama.cpp's: the checkpoint's positions must still be held (the caller keeps them as
    /// they were); the fake also checks they are the same tokens.
    fn seq_restore_checkpoint(&mut self, seq: i32, checkpoint: &Vec<Token>) -> bool {
        let cache = &mut self.kv[seq as usize];
        let ok = cache.starts_with(checkpoint);
        *cache = if ok { checkpoint.clone() } else { Vec::new() };
        ok
    }

    fn set_adapter_scales(&mut self, scales: &[f32]) -> Result<(), EngineError> {
        if self.model.refused_scales.as_deref() == Some(scales) {
            self.scales = vec![f32::NAN];
            return Err(EngineError::Session(crate::error::cause("the fake cannot apply these scales")));
        }
        self.scales = scales.to_vec();
        Ok(())
    }

    fn sample_listing(&mut self, _: &mut FakeSampler, _: i32, _: usize) -> Result<crate::TokenLogprobs, EngineError> {
        Err(EngineError::Unsupported { what: "post_sampling_probs", backend: "fake" })
    }

    /// The file holds the token list and the cache, as JSON.
    fn seq_save_file(&mut self, seq: i32, path: &std::path::Path, tokens: &[Token]) -> Result<u64, EngineError> {
        let text = serde_json::to_string(&(tokens, &self.kv[seq as usize])).unwrap();
        std::fs::write(path, &text).unwrap();
        Ok(text.len() as u64)
    }

    /// As llama.cpp: refuses a file whose cells the cache has no room for.
    fn seq_load_file(&mut self, seq: i32, path: &std::path::Path, max_tokens: usize) -> Result<Vec<Token>, EngineError> {
        let fail = |why: &str| EngineError::slot_file(crate::error::SlotFileAction::Restore, path, why.to_string());
        let text = std::fs::read_to_string(path).map_err(|e| fail(&e.to_string()))?;
        let (list, cells): (Vec<Token>, Vec<Token>) = serde_json::from_str(&text).map_err(|e| fail(&e.to_string()))?;
        let used: usize = self.kv.iter().map(Vec::len).sum();
        if list.len() > max_tokens || used + cells.len() > self.n_ctx {
            return Err(fail("no room"));
        }
        self.kv[seq as usize] = cells;
        Ok(list)
    }
}

fn scheduler(model: &FakeModel, slots: u32, n_ctx: u32, n_batch: u32) -> Scheduler<'_, FakeModel, &'static str> {
    let config = SessionConfig { n_ctx, n_batch, n_ubatch: n_batch, n_seq_max: slots, ..SessionConfig::default() };
    Scheduler::new(model, model.session(&config).unwrap(), slots as usize, Arc::default(), Arc::default())
}

/// A request for `tokens`, given as tokens or as ids.
fn prepared(tokens: &[impl Copy + Into<Token>], max_tokens: usize, speculation: Speculation) -> Prepared<FakeSampler> {
    Prepared {
        tokens: tokens.iter().map(|&t| t.into()).collect(),
        options: GenerateOptions { max_tokens, speculation, ..Default::default() },
        sampler: FakeSampler,
        arrived: Instant::now(),
    }
}

/// Steps until every request has ended; each ended request's name, outcome and tokens, in the
/// order they ended.
fn run(s: &mut Scheduler<'_, FakeModel, &'static str>) -> Vec<(&'static str, Result<FinishReason, EngineError>, Vec<Token>)> {
    let mut ended = Vec::new();
    for _ in 0..1000 {
        if s.is_idle() {
            return ended;
        }
        s.step();
        ended.extend(s.take_ended().map(|e| (e.client, e.outcome, e.tokens)));
    }
    panic!("the requests did not end in 1000 steps");
}

/// The `n` tokens with ids from `from` on.
fn tokens(from: i32, n: usize) -> Vec<Token> {
    (from..from + n as i32).map(Token).collect()
}

/// The tokens with these ids.
fn toks(ids: &[i32]) -> Vec<Token> {
    ids.iter().copied().map(Token).collect()
}

#[test]
fn requests_in_one_batch_each_get_the_continuation_of_their_own_sequence() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 64, 16);
    s.admit(prepared(&[1, 2, 3], 5, Speculation::Off), "a").unwrap();
    s.admit(prepared(&[10, 11], 4, Speculation::Off), "b").unwrap();
    s.admit(prepared(&[20], 3, Speculation::Off), "c").unwrap();
    let ended = run(&mut s);
    let by_name = |n| ended.iter().find(|e| e.0 == n).map(|e| e.2.clone()).unwrap();
    assert_eq!(by_name("a"), tokens(4, 5));
    assert_eq!(by_name("b"), tokens(12, 4));
    assert_eq!(by_name("c"), tokens(21, 3));
    assert!(ended.iter().all(|e| e.1.as_ref().ok() == Some(&FinishReason::MaxTokens)));
    // One step for the three prompts, then one per token after the first: they share steps.
    assert_eq!(model.batches.lock().unwrap().len(), 1 + 4);
}

#[test]
fn a_prompt_goes_to_the_slot_with_the_longest_shared_prefix_or_gives_up_the_least_valuable_cache() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 128, 64);
    // Slot 0 caches 1..=8 (and what was generated), slot 1 caches 20..=27; slot 2 is empty.
    assert_eq!(s.admit(prepared(&tokens(1, 8), 1, Speculation::Off), "warm0").unwrap(), 0);
    assert_eq!(s.admit(prepared(&tokens(20, 8), 1, Speculation::Off), "warm1").unwrap(), 1);
    run(&mut s);
    // Half or more of the prompt cached: that slot, reusing all but the last prompt token.
    assert_eq!(s.admit(prepared(&[20, 21, 22, 23, 5], 1, Speculation::Off), "x").unwrap(), 1);
    let (_, stats, _) = s.running(1).unwrap();
    assert_eq!(stats.prompt_tokens_reused, 4);
    // Less than half shared: the empty slot, not a cache worth keeping.
    assert_eq!(s.admit(prepared(&[1, 30, 31, 29], 1, Speculation::Off), "y").unwrap(), 2);
    run(&mut s);
    // No empty slot left: the one used longest ago (slot 0).
    assert_eq!(s.admit(prepared(&[9, 9, 9], 1, Speculation::Off), "z").unwrap(), 0);
    // A prompt that fully repeats a cache still decodes its last token (its logits start it).
    run(&mut s);
    assert_eq!(s.admit(prepared(&[9, 9, 9], 1, Speculation::Off), "again").unwrap(), 0);
    assert_eq!(s.running(0).unwrap().1.prompt_tokens_reused, 2);
}

#[test]
fn a_prompt_waits_until_it_fits_beside_the_running_requests() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 2, 20, 16);
    // Alone, anything shorter than the context is admitted.
    assert!(s.admits(19));
    s.admit(prepared(&tokens(1, 12), 4, Speculation::Off), "a").unwrap();
    // Beside a request holding 12 cells: 8 more fit, 9 do not.
    assert!(s.admits(8));
    assert!(!s.admits(9));
    // The same rule counts what a prefilled request holds once it generates.
    s.step();
    assert!(!s.admits(8), "12 prompt cells and a pending token");
    assert!(s.admits(7));
}

#[test]
fn a_full_cache_rolls_the_step_back_drops_idle_caches_then_fails_the_newest_request() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 24, 16);
    // An idle slot keeps 6 cells.
    s.admit(prepared(&tokens(1, 4), 2, Speculation::Off), "idle").unwrap();
    run(&mut s);
    // Two requests of 4 prompt tokens and 12 generated each: 32 cells, with 24 in all.
    s.admit(prepared(&tokens(10, 4), 12, Speculation::Off), "older").unwrap();
    s.step();
    s.admit(prepared(&[20, 21, 22, 23], 12, Speculation::Off), "newer").unwrap();
    let ended = run(&mut s);
    // The idle cache went first (it is empty now), then the newest request gave way.
    assert!(s.cached(0).is_empty(), "{:?}", s.cached(0));
    let newer = ended.iter().find(|e| e.0 == "newer").unwrap();
    assert_eq!(newer.1.as_ref().err().and_then(EngineError::decode_failure), Some(DecodeFailure::NoKvSlot), "{newer:?}");
    let older = ended.iter().find(|e| e.0 == "older").unwrap();
    // The survivor went on from the rolled-back step with every token in place (the fake
    // checks positions; a lost or doubled token would show in the count).
    assert_eq!((older.1.as_ref().ok(), &older.2), (Some(&FinishReason::MaxTokens), &tokens(14, 12)));
}

#[test]
fn drafts_are_verified_against_the_model_and_get_the_room_that_is_left() {
    // After 5 comes 6, after 6 comes 5: a cycle prompt lookup drafts from, always right.
    let model = FakeModel::counting().with_next(&[(5, 6), (6, 5)]);
    let mut s = scheduler(&model, 2, 64, 64);
    s.admit(prepared(&[5, 6, 5, 6, 5], 9, Speculation::Ngram { max_draft: 8 }), "a").unwrap();
    let ended = run(&mut s);
    assert_eq!(ended[0].2, toks(&[6, 5, 6, 5, 6, 5, 6, 5, 6]));
    // Drafts kept: fewer decodes than tokens (the prompt's, then fewer than 8 more).
    let decodes = model.batches.lock().unwrap().len();
    assert!(decodes < 1 + 8, "{decodes} decodes for 9 tokens");
    assert!(s.counters.accepted_tokens.load(Ordering::Relaxed) >= 4, "{:?}", s.counters);
    // The rule: a position kept for the token after the drafts, max tokens, the batch's room,
    // the draft length.
    let (request, _) = Request::new(prepared(&[1], 10, Speculation::Ngram { max_draft: 8 }), (), 0, 1, 64, AdapterPlan::default());
    assert_eq!(request.draft_room(0, 64, 100), 8, "the draft length");
    assert_eq!(request.draft_room(60, 64, 100), 2, "two positions left after the pending token and one kept");
    assert_eq!(request.draft_room(0, 64, 3), 3, "the batch's room");
    let plain = Request::new(prepared(&[1], 10, Speculation::Off), (), 0, 1, 64, AdapterPlan::default()).0;
    assert_eq!(plain.draft_room(0, 64, 100), 0);
}

/// Drafting adapts to occupancy: with every one of 8 slots generating, drafts that half hold
/// (the prior for a request that has not drafted yet) would cost more than they bring on a CPU
/// (`DecodeCost`'s prior), and the lookups made outside the batch fail (the text counts on where
/// the prompt went back), so no step carries any; one request alone drafts.
#[test]
fn no_drafts_when_every_slot_of_a_full_batch_is_busy() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 8, 512, 64);
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for name in names {
        s.admit(prepared(&[5, 6, 5, 6, 5], 6, Speculation::Ngram { max_draft: 8 }), name).unwrap();
    }
    let ended = run(&mut s);
    assert!(ended.iter().all(|e| e.2 == toks(&[6, 7, 8, 9, 10, 11])), "{ended:?}");
    let batches = model.batches.lock().unwrap().clone();
    assert_eq!(batches[0].len(), 8 * 5, "the prompts, together");
    assert!(batches[1..].iter().all(|b| b.len() == 8), "one token per slot, no drafts: {:?}", batches.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(s.counters.drafted_tokens.load(Ordering::Relaxed), 0);
    s.admit(prepared(&[5, 6, 5, 6, 5], 6, Speculation::Ngram { max_draft: 8 }), "alone").unwrap();
    assert_eq!(run(&mut s)[0].2, toks(&[6, 7, 8, 9, 10, 11]));
    assert!(s.counters.drafted_tokens.load(Ordering::Relaxed) > 0, "alone, it drafts");
}

#[test]
fn a_step_whose_drafts_do_not_fit_is_built_again_without_them() {
    let model = FakeModel::counting().with_next(&[(5, 6), (6, 5)]);
    // 16 cells: an idle slot keeps 4; a 5-token prompt and 8 tokens fit beside it, not with
    // drafts on top. Without drafts first, then without the idle cache.
    let mut s = scheduler(&model, 2, 16, 64);
    s.admit(prepared(&[20, 21, 22], 2, Speculation::Off), "idle").unwrap();
    run(&mut s);
    assert_eq!(s.cached(0).len(), 4);
    s.admit(prepared(&[5, 6, 5, 6, 5], 8, Speculation::Ngram { max_draft: 8 }), "a").unwrap();
    let ended = run(&mut s);
    assert_eq!((ended[0].1.as_ref().ok(), &ended[0].2), (Some(&FinishReason::MaxTokens), &toks(&[6, 5, 6, 5, 6, 5, 6, 5])));
    assert!(s.counters.steps_without_drafts.load(Ordering::Relaxed) > 0);
}

/// After the prompt's "5 6" came 9 once: lookup drafts 9 after the next 6, the model says 7. A
/// recurrent state cannot drop the rejected draft.
const REJECTED_ONCE: [(i32, i32); 5] = [(5, 6), (6, 7), (7, 8), (8, 5), (9, 5)];

/// The batches of one request speculating by prompt lookup (at most `max_draft` a round) on
/// `model`, after checking that its tokens are those of a plain run over the same table.
fn speculative_batches(model: &FakeModel, prompt: &[i32], max_tokens: usize, max_draft: u32) -> Vec<Vec<Entry>> {
    let table = FakeModel { next: model.next.clone(), ..FakeModel::counting() };
    let mut plain = scheduler(&table, 1, 64, 64);
    plain.admit(prepared(prompt, max_tokens, Speculation::Off), "plain").unwrap();
    let want = run(&mut plain).remove(0).2;
    let mut s = scheduler(model, 1, 64, 64);
    s.admit(prepared(prompt, max_tokens, Speculation::Ngram { max_draft }), "spec").unwrap();
    assert_eq!(run(&mut s)[0].2, want, "speculation changed the tokens");
    model.batches.lock().unwrap().clone()
}

/// The entries of a batch that have an output: the pending token and its drafts.
fn outputs(batch: &[Entry]) -> usize {
    batch.iter().filter(|e| e.3).count()
}

#[test]
fn a_recurrent_state_returns_to_before_a_rejected_round_and_decodes_only_what_it_kept() {
    let model = FakeModel::counting().with_next(&REJECTED_ONCE).recurrent();
    // One draft a round: a rejection then costs little enough for drafting to go on.
    let batches = speculative_batches(&model, &[5, 6, 9, 5], 24, 1);
    assert!(!batches.iter().skip(1).any(|b| b[0].1 == 0), "the sequence was decoded again from its start");
    // The round after "5 6" drafted 9 at position 5 and got 7: the next batch decodes the pending
    // 6 at position 4 again (no output), then 7 with its output, and drafts go on.
    let round = batches.iter().position(|b| b[..2] == [(6, 4, 0, true), (9, 5, 0, true)]).expect("the round that drafts 9");
    assert_eq!(batches[round + 1][..2], [(6, 4, 0, false), (7, 5, 0, true)]);
    let drafting_after = batches[round + 2..].iter().filter(|b| outputs(b) > 1).count();
    assert!(drafting_after > 0, "no drafts after the rejection");
}

/// A step that decodes a rejected round's kept tokens again drafts nothing: its state is not yet
/// one to mark, and a rejection there would replay the replay as well.
#[test]
fn a_step_that_decodes_a_round_again_drafts_nothing() {
    // The text cycles 1 2 3; the prompt once had 4 after "1 2": the first round drafts 1 2 4 1 after
    // the pending 3 and keeps 1 2. Lookup would draft again at once.
    let pairs = [(1, 2), (2, 3), (3, 1)];
    let prompt = [1, 2, 3, 1, 2, 4, 1, 2];
    let model = FakeModel::counting().with_next(&pairs).recurrent();
    let batches = speculative_batches(&model, &prompt, 12, 4);
    let round = batches.iter().position(|b| b[0] == (3, 8, 0, true)).expect("the first generation step");
    assert_eq!(batches[round][1..], [(1, 9, 0, true), (2, 10, 0, true), (4, 11, 0, true), (1, 12, 0, true)], "the round that keeps two");
    assert_eq!(batches[round + 1], [(3, 8, 0, false), (1, 9, 0, false), (2, 10, 0, false), (3, 11, 0, true)], "decoded again, no drafts");
    assert!(batches[round + 2..].iter().any(|b| outputs(b) > 1), "drafts after it");
}

/// A round whose four drafts all fail (plus the token decoded again) leaves the request's
/// acceptance at 1 in 7, where drafts stop paying (see `DecodeCost`); the lookups it still makes
/// outside the batch come true once the text repeats, and drafting starts again.
#[test]
fn drafts_that_stopped_paying_start_again_when_lookups_come_true() {
    // After "5 6" the prompt had 9 9 9 5: the first round drafts those; the model says 7, and
    // then cycles 7 8 5 6.
    let pairs = [(5, 6), (6, 7), (7, 8), (8, 5), (9, 9)];
    let prompt = [5, 6, 9, 9, 9, 5];
    let model = FakeModel::counting().with_next(&pairs).recurrent();
    let batches = speculative_batches(&model, &prompt, 24, 4);
    let round = batches.iter().position(|b| b[0] == (6, 6, 0, true)).expect("the first generation step");
    assert_eq!(batches[round], [(6, 6, 0, true), (9, 7, 0, true), (9, 8, 0, true), (9, 9, 0, true), (5, 10, 0, true)], "the failing round");
    let resumed = batches[round + 1..].iter().position(|b| outputs(b) > 1).expect("drafting never started again") + round + 1;
    assert!(resumed > round + 2, "drafts went on at once: the gate did not close");
}

#[test]
fn a_recurrent_state_without_checkpoints_is_decoded_again_and_stops_speculating() {
    let model = FakeModel::counting().with_next(&REJECTED_ONCE).recurrent_without_checkpoints();
    let batches = speculative_batches(&model, &[5, 6, 9, 5], 6, 4);
    // A batch restarting from position 0 of the sequence: the rebuild; no drafts after it.
    let rebuild = batches.iter().skip(1).position(|b| b[0].1 == 0).expect("no sequence was decoded again") + 1;
    assert!(batches[rebuild..].iter().all(|b| outputs(b) <= 1), "drafts after the rebuild");
}

#[test]
fn end_rules_end_of_text_max_tokens_and_a_full_context() {
    let model = FakeModel::counting().with_next(&[(7, EOG.0)]);
    let mut s = scheduler(&model, 1, 64, 64);
    s.admit(prepared(&[4], 10, Speculation::Off), "eog").unwrap();
    let ended = run(&mut s);
    assert_eq!((ended[0].1.as_ref().ok(), &ended[0].2), (Some(&FinishReason::EndOfText), &toks(&[5, 6, 7])));
    // 8 cells: a 3-token prompt, then tokens for positions 3..=7; the one for the last cell
    // leaves no position after it.
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 1, 8, 64);
    s.admit(prepared(&[1, 2, 3], 100, Speculation::Off), "full").unwrap();
    let ended = run(&mut s);
    assert_eq!((ended[0].1.as_ref().ok(), &ended[0].2), (Some(&FinishReason::ContextFull), &tokens(4, 5)));
}

#[test]
fn a_cancelled_request_ends_at_the_next_step_and_frees_its_slot() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 2, 64, 64);
    let cancel = crate::CancelToken::new();
    let mut request = prepared(&[1, 2], 50, Speculation::Off);
    request.options.cancel = Some(cancel.clone());
    s.admit(request, "cancelled").unwrap();
    s.admit(prepared(&[10], 5, Speculation::Off), "other").unwrap();
    s.step();
    s.step();
    cancel.cancel();
    s.step();
    let ended: Vec<_> = s.take_ended().collect();
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].client, ended[0].outcome.as_ref().ok()), ("cancelled", Some(&FinishReason::Cancelled)));
    assert!(s.has_free_slot());
    // A request cancelled before it is admitted is refused.
    let mut late = prepared(&[1], 5, Speculation::Off);
    late.options.cancel = Some(cancel);
    assert!(matches!(s.admit(late, "late"), Err(("late", EngineError::Cancelled))));
    // The other one was not disturbed.
    assert_eq!(run(&mut s)[0].2, tokens(11, 5));
}

#[test]
fn a_prompt_another_slot_is_decoding_waits_for_it_and_copies_its_cells() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 128, 8);
    let prompt = tokens(1, 20);
    let waits = |s: &Scheduler<'_, FakeModel, &'static str>, prompt: &[Token]| s.awaits_shared_prefix(&prepared(prompt, 4, Speculation::Off));
    assert!(!waits(&s, &prompt), "nothing to wait for");
    s.admit(prepared(&prompt, 4, Speculation::Off), "first").unwrap();
    // The first prompt takes three steps of 8 tokens: the same prompt waits while they would
    // bring it more than a few tokens, an unrelated one does not wait, nor the same prompt with
    // other adapter scales (those cells are not its to copy).
    assert!(waits(&s, &prompt));
    assert!(!waits(&s, &tokens(40, 20)));
    let mut adapted = prepared(&prompt, 4, Speculation::Off);
    adapted.options.lora_scales = Some(vec![1.0]);
    assert!(!s.awaits_shared_prefix(&adapted));
    let mut steps = 0;
    while waits(&s, &prompt) {
        s.step();
        steps += 1;
    }
    assert_eq!(steps, 2, "16 of its 20 tokens are in: the last chunk is not worth waiting for");
    let batches_before = model.batches.lock().unwrap().len();
    let second = s.admit(prepared(&prompt, 4, Speculation::Off), "second").unwrap();
    assert_eq!(s.running(second).unwrap().1.prompt_tokens_reused, 16, "the cells in so far are copied");
    assert_eq!(s.counters.prompt_tokens_copied.load(Ordering::Relaxed), 16, "and counted as copied");
    let ended = run(&mut s);
    // It decodes only the rest of its prompt, from its position on.
    let batches = model.batches.lock().unwrap();
    let seq = second as i32;
    let decoded: Vec<Entry> = batches[batches_before..].iter().flatten().filter(|e| e.2 == seq).copied().collect();
    assert_eq!(&decoded[..4], &[(17, 16, seq, false), (18, 17, seq, false), (19, 18, seq, false), (20, 19, seq, true)]);
    drop(batches);
    // Both continue the prompt alike: the copied cells are the same prompt.
    let by_name = |n| ended.iter().find(|e| e.0 == n).map(|e| e.2.clone()).unwrap();
    assert_eq!(by_name("second"), tokens(21, 4));
    // A later prompt extending it goes to a slot that holds it: reused from its own cache, not
    // copied.
    let mut longer = prompt.clone();
    longer.extend(toks(&[90, 91]));
    let third = s.admit(prepared(&longer, 1, Speculation::Off), "third").unwrap();
    assert!(s.running(third).unwrap().1.prompt_tokens_reused >= 20, "{:?}", s.running(third).unwrap().1);
    assert_eq!(s.counters.prompt_tokens_copied.load(Ordering::Relaxed), 16);
}

/// Slot actions: a save holds the cache and its tokens; erase empties the slot; a restore into
/// another slot brings both back, and a request with that prefix decodes only the rest there. A
/// restore the cache has no room for drops what idle slots keep and is tried again; one that
/// still fails leaves its slot empty.
#[test]
fn slot_actions_save_erase_and_restore_caches() {
    let dir = std::env::temp_dir().join(format!("exsa-fake-slots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("slot.json");
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 64, 16);
    s.admit(prepared(&tokens(1, 10), 4, Speculation::Off), "a").unwrap();
    run(&mut s);
    let held = s.cached(0).to_vec();
    assert_eq!(held.len(), 13, "10 prompt tokens and 3 of the 4 generated: {held:?}");

    let saved = s.slot_action(0, &SlotAction::Save(file.clone())).unwrap();
    assert_eq!(saved.tokens, 13);
    assert_eq!(saved.bytes, std::fs::metadata(&file).unwrap().len());
    assert_eq!(s.slot_action(0, &SlotAction::Erase).unwrap().tokens, 13);
    assert!(s.cached(0).is_empty() && s.session.kv[0].is_empty());

    let restored = s.slot_action(2, &SlotAction::Restore(file.clone())).unwrap();
    assert_eq!(restored.tokens, 13);
    assert_eq!((s.cached(2), &s.session.kv[2]), (&held[..], &held));
    let mut prompt = held.clone();
    prompt.push(Token(20));
    assert_eq!(s.admit(prepared(&prompt, 1, Speculation::Off), "b").unwrap(), 2, "the request goes to the slot holding its prefix");
    let ended = run(&mut s);
    assert_eq!(ended[0].1.as_ref().ok(), Some(&FinishReason::MaxTokens));

    // Slot 0 and 1 fill the cache; the restore into slot 2 needs their cells.
    s.slot_action(2, &SlotAction::Erase).unwrap();
    s.admit(prepared(&tokens(1, 30), 1, Speculation::Off), "c").unwrap();
    s.admit(prepared(&tokens(2, 30), 1, Speculation::Off), "d").unwrap();
    run(&mut s);
    assert!(s.session.kv[0].len() + s.session.kv[1].len() + 13 > 64);
    assert_eq!(s.slot_action(2, &SlotAction::Restore(file.clone())).unwrap().tokens, 13);
    assert_eq!(s.cached(2), &held[..]);
    assert!(s.cached(0).is_empty() && s.cached(1).is_empty(), "the idle slots gave up their caches");

    std::fs::write(&file, "not a state").unwrap();
    assert!(matches!(s.slot_action(2, &SlotAction::Restore(file.clone())), Err(EngineError::SlotFile { .. })));
    assert!(s.cached(2).is_empty() && s.session.kv[2].is_empty(), "a failed restore leaves its slot empty");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A request for a slot (`id_slot`) runs there when it is free, and one for a slot the
/// scheduler does not have is refused, naming the field.
#[test]
fn a_request_for_a_slot_runs_in_that_slot() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 3, 64, 16);
    let mut pinned = prepared(&tokens(1, 5), 2, Speculation::Off);
    pinned.options.slot = Some(2);
    assert_eq!(s.admit(pinned, "a").unwrap(), 2);
    run(&mut s);
    assert_eq!(s.cached(2).len(), 6);
    let mut missing = prepared(&tokens(1, 5), 2, Speculation::Off);
    missing.options.slot = Some(7);
    let (_, e) = s.admit(missing, "b").unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest { field: "id_slot", .. }), "{e}");
    assert!(s.slot_free_for(Some(7)) && s.slot_free_for(Some(2)) && s.slot_free_for(None));
}

#[test]
fn a_prompt_takes_at_most_the_prefill_chunk_of_a_step_while_others_generate() {
    let model = FakeModel::counting();
    let mut s = scheduler(&model, 2, 256, 64);
    s.set_prompt_chunk(8);
    // Alone, a prompt fills the batch.
    // 40-token prompts in a 32-token vocabulary.
    let prompt = |shift: usize| -> Vec<Token> { (0..40).map(|i| Token(1 + ((i + shift) % 30) as i32)).collect() };
    let after = |last: i32, n: usize| -> Vec<Token> {
        std::iter::successors(Some(last), |&t| Some(if t + 1 == VOCAB { 1 } else { t + 1 })).skip(1).take(n).map(Token).collect()
    };
    let a = s.admit(prepared(&prompt(0), 30, Speculation::Off), "a").unwrap() as i32;
    s.step();
    assert_eq!(model.batches.lock().unwrap()[0].len(), 40);
    // Beside a generating request: 8 prompt tokens a step, and its token in every step.
    let b = s.admit(prepared(&prompt(7), 2, Speculation::Off), "b").unwrap() as i32;
    let ended = run(&mut s);
    let batches = model.batches.lock().unwrap().clone();
    let per_step: Vec<(usize, usize)> =
        batches[1..7].iter().map(|batch| (batch.iter().filter(|e| e.2 == a).count(), batch.iter().filter(|e| e.2 == b).count())).collect();
    assert_eq!(per_step, [(1, 8), (1, 8), (1, 8), (1, 8), (1, 8), (1, 1)], "(a's tokens, b's tokens) per step");
    let by_name = |n| ended.iter().find(|e| e.0 == n).map(|e| e.2.clone()).unwrap();
    assert_eq!(by_name("a"), after(10, 30));
    assert_eq!(by_name("b"), after(17, 2));
}

/// A chat's next turn on a recurrent state: the prompt extends the last prompt but not the reply
/// as decoded (the template closes it), so the state cannot be cut to the shared prefix; the
/// checkpoint taken just before the last prompt's end is restored and only the rest is decoded,
/// with the same tokens as a fresh decode. Without checkpoints everything is decoded again.
#[test]
fn a_recurrent_state_returns_to_the_checkpoint_near_the_last_prompts_end() {
    let first: Vec<Token> = toks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // Taken a few tokens before the first prompt's end (its tail may tokenize otherwise once a
    // reply follows it).
    let at = first.len() - CHECKPOINT_BEFORE_END;
    let mut next = first.clone();
    next.extend(toks(&[20, 21, 22, 9, 10]));
    let fresh = |checkpoints: usize, slot: Option<usize>| {
        let model = FakeModel::counting().recurrent();
        let counters = Arc::new(Counters::default());
        let config = SessionConfig { n_ctx: 64, n_batch: 64, n_ubatch: 64, n_seq_max: 2, ..SessionConfig::default() };
        let mut s = Scheduler::new(&model, model.session(&config).unwrap(), 2, Arc::clone(&counters), Arc::default());
        s.set_checkpoints(checkpoints);
        s.admit(prepared(&first, 3, Speculation::Off), "first").unwrap();
        run(&mut s);
        assert_eq!(counters.checkpoints.load(Ordering::Relaxed), usize::from(checkpoints > 0));
        let decoded_before = model.batches.lock().unwrap().len();
        let mut second = prepared(&next, 4, Speculation::Off);
        second.options.slot = slot;
        s.admit(second, "next").unwrap();
        let out = run(&mut s).remove(0).2;
        let batches = model.batches.lock().unwrap();
        let start = batches[decoded_before][0].1;
        (out, counters.prompt_tokens_reused.load(Ordering::Relaxed), start)
    };
    let want: Vec<Token> = tokens(11, 4);
    // In the slot that ran the first turn, and in another one (the first slot's cells copied,
    // then returned to its checkpoint).
    for slot in [None, Some(1)] {
        assert_eq!(fresh(8, slot), (want.clone(), at as u64, at as i32), "slot {slot:?}");
    }
    assert_eq!(fresh(0, None), (want, 0, 0), "without checkpoints");
}

#[test]
fn requests_with_other_adapter_scales_take_turns_and_never_share_cells() {
    let model = FakeModel::counting();
    let config = SessionConfig { n_ctx: 128, n_batch: 64, n_ubatch: 64, n_seq_max: 3, ..SessionConfig::default() };
    // The session applies one adapter at 0: requests without scales of their own run so.
    let mut s: Scheduler<'_, FakeModel, &'static str> =
        Scheduler::new(&model, model.session(&config).unwrap(), 3, Arc::default(), Arc::new(std::sync::RwLock::new(vec![0.0])));
    let with_adapter = |tokens: &[i32], max_tokens| {
        let mut p = prepared(tokens, max_tokens, Speculation::Off);
        p.options.lora_scales = Some(vec![1.0]);
        p
    };
    assert_eq!(s.admit(prepared(&[1, 2, 3, 4], 12, Speculation::Off), "plain").unwrap(), 0);
    assert_eq!(s.admit(with_adapter(&[10, 11, 12, 13], 12), "adapted").unwrap(), 1);
    assert_eq!(s.admit(with_adapter(&[20, 21], 3), "adapted2").unwrap(), 2);
    let ended = run(&mut s);
    let by_name = |n| ended.iter().find(|e| e.0 == n).map(|e| e.2.clone()).unwrap();
    // Each drew from its own adapters at every step (the adapter moves each prediction on by one).
    assert_eq!(by_name("plain"), tokens(5, 12));
    assert_eq!(by_name("adapted"), toks(&[15, 17, 19, 21, 23, 25, 27, 29, 31, 2, 4, 6]));
    assert_eq!(by_name("adapted2"), toks(&[23, 25, 27]));
    // No batch mixed the groups: sequence 0 only in batches without the adapter, 1 and 2 only
    // in batches with it; and the groups took turns of GROUP_TURN steps while both had requests
    // (the first group's turn, the other's, then what each had left).
    let batches = model.batches.lock().unwrap().clone();
    let scales = model.batch_scales.lock().unwrap().clone();
    let adapted: Vec<bool> = scales.iter().map(|s| s == &[1.0]).collect();
    for (batch, &adapted) in batches.iter().zip(&adapted) {
        assert!(batch.iter().all(|e| (e.2 != 0) == adapted), "a batch mixed adapter scales: {batch:?} adapted={adapted}");
    }
    let turns: Vec<bool> = [&[false; GROUP_TURN][..], &[true; GROUP_TURN], &[false; 4], &[true; 4]].concat();
    assert_eq!(adapted, turns, "{scales:?}");

    // A cache decoded with other scales gives a prompt nothing; one with the same scales does.
    let stats = |s: &Scheduler<'_, FakeModel, &'static str>, slot| s.running(slot).unwrap().1.prompt_tokens_reused;
    let slot = s.admit(prepared(&[10, 11, 12, 13, 14], 1, Speculation::Off), "plain-again").unwrap();
    assert_eq!(stats(&s, slot), 0, "cells decoded with the adapter were reused without it");
    run(&mut s);
    let slot = s.admit(with_adapter(&[10, 11, 12, 13, 15], 1), "adapted-again").unwrap();
    assert_eq!((slot, stats(&s, slot)), (1, 4), "the adapter's own cells were not reused");
    run(&mut s);

    // A cache restored from a file counts as the default scales (a file records none), also
    // in a slot that held cells of other scales.
    let file = std::env::temp_dir().join(format!("exsa-fake-adapter-slot-{}.json", std::process::id()));
    s.slot_action(0, &SlotAction::Save(file.clone())).unwrap();
    s.slot_action(0, &SlotAction::Erase).unwrap();
    s.slot_action(1, &SlotAction::Restore(file.clone())).unwrap();
    std::fs::remove_file(&file).unwrap();
    let mut restored = prepared(&[1, 2, 3, 4, 5, 6, 7, 8, 30], 1, Speculation::Off);
    restored.options.slot = Some(1);
    let slot = s.admit(restored, "plain-restored").unwrap();
    assert_eq!((slot, stats(&s, slot)), (1, 8), "the restored cells were not reused at the default scales");
    run(&mut s);
    // A file cannot record scales: a cache decoded with others than the default ones is not saved.
    let adapted_slot = s.admit(with_adapter(&[10, 11], 1), "adapted-last").unwrap();
    run(&mut s);
    match s.slot_action(adapted_slot, &SlotAction::Save(file.clone())) {
        Err(EngineError::InvalidRequest { field: "lora_scales", reason, .. }) => assert!(reason.contains("slot file"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!file.exists());
}

/// Adapters that cannot be applied fail the requests of that step's group only: the others had
/// nothing in its batch, go on, and are decoded with their own scales (applied again).
#[test]
fn adapters_that_cannot_be_applied_fail_only_their_group() {
    let model = FakeModel { refused_scales: Some(vec![2.0]), ..FakeModel::counting() };
    let config = SessionConfig { n_ctx: 128, n_batch: 64, n_ubatch: 64, n_seq_max: 3, ..SessionConfig::default() };
    let mut s: Scheduler<'_, FakeModel, &'static str> =
        Scheduler::new(&model, model.session(&config).unwrap(), 3, Arc::default(), Arc::new(std::sync::RwLock::new(vec![0.0])));
    s.admit(prepared(&[1, 2, 3], 4, Speculation::Off), "plain").unwrap();
    let mut refused = prepared(&[10, 11], 4, Speculation::Off);
    refused.options.lora_scales = Some(vec![2.0]);
    s.admit(refused, "refused").unwrap();
    let mut adapted = prepared(&[20, 21], 3, Speculation::Off);
    adapted.options.lora_scales = Some(vec![1.0]);
    s.admit(adapted, "adapted").unwrap();
    let ended = run(&mut s);
    let outcome = |n| ended.iter().find(|e| e.0 == n).unwrap();
    assert!(matches!(outcome("refused").1, Err(EngineError::Session(_))), "{:?}", outcome("refused").1);
    assert_eq!(outcome("plain").2, tokens(4, 4));
    assert_eq!(outcome("adapted").2, toks(&[23, 25, 27]));
}

/// An activated LoRA applies from the token before its invocation in the prompt on
/// (llama-server's rule): the prompt before that is decoded without the adapter, in a batch of
/// its own, the rest and the generation with it. A cache serves a later request only where both decode with the same
/// scales: all of it for the same invocation, the part before it for a request without the
/// adapter, and a plain prefix for a request whose invocation comes later.
#[test]
fn an_activated_lora_applies_from_its_invocation_and_its_cells_are_reused_where_the_scales_agree() {
    let model = FakeModel { invocations: vec![toks(&[7, 8])], ..FakeModel::counting() };
    let config = SessionConfig { n_ctx: 128, n_batch: 64, n_ubatch: 64, n_seq_max: 1, ..SessionConfig::default() };
    let mut s: Scheduler<'_, FakeModel, &'static str> =
        Scheduler::new(&model, model.session(&config).unwrap(), 1, Arc::default(), Arc::new(std::sync::RwLock::new(vec![0.0])));
    let activated = |tokens: &[i32]| {
        let mut p = prepared(tokens, 4, Speculation::Off);
        p.options.lora_scales = Some(vec![1.0]);
        p
    };
    let reused = |s: &Scheduler<'_, FakeModel, &'static str>| s.running(0).unwrap().1.prompt_tokens_reused;

    s.admit(activated(&[1, 2, 3, 7, 8, 9]), "activated").unwrap();
    // The adapter moves each prediction on by one: 9 -> 11, 11 -> 13, and so on.
    assert_eq!(run(&mut s)[0].2, toks(&[11, 13, 15, 17]));
    let batches = model.batches.lock().unwrap().clone();
    let scales = model.batch_scales.lock().unwrap().clone();
    let ids = |batch: &[Entry]| batch.iter().map(|e| e.0).collect::<Vec<_>>();
    let without = |scales: &[f32]| scales.iter().all(|&s| s == 0.0);
    assert!(ids(&batches[0]) == [1, 2] && without(&scales[0]), "the prompt before the invocation: {batches:?} {scales:?}");
    assert_eq!((ids(&batches[1]), &scales[1]), (vec![3, 7, 8, 9], &vec![1.0]), "the invocation and the rest");
    assert!(scales[2..].iter().all(|s| s == &[1.0]), "the generation: {scales:?}");

    // The same invocation: every cell serves (the drawn tokens 11, 13 and 15 were decoded).
    s.admit(activated(&[1, 2, 3, 7, 8, 9, 11, 13, 20]), "again").unwrap();
    assert_eq!(reused(&s), 8);
    assert_eq!(run(&mut s)[0].2, toks(&[22, 24, 26, 28]));
    // Without the adapter: only the cells before the adapter's.
    s.admit(prepared(&[1, 2, 3, 7, 8, 9, 11, 13, 20], 4, Speculation::Off), "plain").unwrap();
    assert_eq!(reused(&s), 2);
    assert_eq!(run(&mut s)[0].2, tokens(21, 4));
    // Its invocation later: the plain cells before it.
    s.admit(activated(&[1, 2, 3, 7, 8, 9, 11, 13, 20, 7, 8, 5]), "later").unwrap();
    assert_eq!(reused(&s), 8);
    assert_eq!(run(&mut s)[0].2, toks(&[7, 9, 11, 13]));
    // Not in the prompt: the adapter does not apply.
    s.admit(activated(&[1, 2, 3, 7, 9]), "absent").unwrap();
    assert_eq!(run(&mut s)[0].2, tokens(10, 4));
    assert!(without(model.batch_scales.lock().unwrap().last().unwrap()));

    // Enabled by default: a slot file (which records no scales) saves such a cache, and its
    // cells count as a request of their tokens would decode them, so they serve it again.
    let mut d: Scheduler<'_, FakeModel, &'static str> =
        Scheduler::new(&model, model.session(&config).unwrap(), 1, Arc::default(), Arc::new(std::sync::RwLock::new(vec![1.0])));
    d.admit(prepared(&[1, 2, 3, 7, 8, 9], 4, Speculation::Off), "default").unwrap();
    assert_eq!(run(&mut d)[0].2, toks(&[11, 13, 15, 17]));
    let file = std::env::temp_dir().join(format!("exsa-fake-alora-slot-{}.json", std::process::id()));
    d.slot_action(0, &SlotAction::Save(file.clone())).unwrap();
    d.slot_action(0, &SlotAction::Erase).unwrap();
    d.slot_action(0, &SlotAction::Restore(file.clone())).unwrap();
    std::fs::remove_file(&file).unwrap();
    d.admit(prepared(&[1, 2, 3, 7, 8, 9, 11, 13, 15, 20], 1, Speculation::Off), "restored").unwrap();
    assert_eq!(d.running(0).unwrap().1.prompt_tokens_reused, 9);
    assert_eq!(run(&mut d)[0].2, toks(&[22]));
}

/// Over a recurrent state, which is cut back only to a checkpoint, the prefill of a request with
/// an activated LoRA takes one where the adapter starts: a request without the adapter then
/// reuses the base model's prompt before the invocation.
#[test]
fn a_recurrent_state_keeps_a_checkpoint_where_an_activated_lora_starts() {
    let model = FakeModel { invocations: vec![toks(&[7, 8])], ..FakeModel::counting().recurrent() };
    let config = SessionConfig { n_ctx: 128, n_batch: 64, n_ubatch: 64, n_seq_max: 1, ..SessionConfig::default() };
    let mut s: Scheduler<'_, FakeModel, &'static str> =
        Scheduler::new(&model, model.session(&config).unwrap(), 1, Arc::default(), Arc::new(std::sync::RwLock::new(vec![0.0])));
    let mut activated = prepared(&[1, 2, 3, 7, 8, 9, 10, 11, 12], 2, Speculation::Off);
    activated.options.lora_scales = Some(vec![1.0]);
    s.admit(activated, "activated").unwrap();
    assert_eq!(run(&mut s)[0].2, toks(&[14, 16]));
    s.admit(prepared(&[1, 2, 3, 7, 8, 9, 10, 11, 12, 13], 2, Speculation::Off), "plain").unwrap();
    assert_eq!(s.running(0).unwrap().1.prompt_tokens_reused, 2, "the base model's cells before the adapter's");
    assert_eq!(run(&mut s)[0].2, tokens(14, 2));
}
