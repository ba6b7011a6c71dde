//! A slot: one sequence of the shared context, the tokens its cache holds, and the phase of the
//! request it runs.

use super::adapter_plan::AdapterPlan;
use crate::backend::BackendSession;
use crate::token::Token;

/// One sequence of a context and the tokens its cache holds, in position order, with the
/// recurrent checkpoints taken along it. Every change to the cache goes through it, so the list,
/// the checkpoints and the cache cannot drift apart.
#[derive(Debug)]
pub(crate) struct Sequence<K> {
    id: i32,
    tokens: Vec<Token>,
    /// Recurrent checkpoints (see [`Sequence::checkpoint`]): where the cache stood after its
    /// first `len` tokens, by ascending `len`, each of them still a prefix of `tokens`.
    checkpoints: Vec<Checkpoint<K>>,
    /// The most checkpoints kept (0: none taken).
    max_checkpoints: usize,
    /// Where the cache stood before the current round of drafts (see
    /// [`Sequence::mark_rollback`]): outside the bound and the prefix-reuse rule, only for
    /// [`Sequence::return_to_rollback`].
    rollback: Option<Checkpoint<K>>,
    /// The LoRA adapter scales its cells were decoded with, by position (see
    /// [`Sequence::adapt`]): cells of other scales hold other keys and values, so a request
    /// reuses only those its own plan decodes with the same scales.
    adapters: AdapterPlan,
}

/// How many tokens before a prompt's end its checkpoint is taken.
pub(crate) const CHECKPOINT_BEFORE_END: usize = 4;

/// A recurrent checkpoint of a sequence after its first `len` tokens, and its size in bytes.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint<K> {
    len: usize,
    bytes: usize,
    state: K,
}

impl<K: Clone> Sequence<K> {
    /// Sequence `id`, with room for `capacity` tokens (the context: the token loop never grows it).
    pub(crate) fn new(id: i32, capacity: usize) -> Self {
        Sequence {
            id,
            tokens: Vec::with_capacity(capacity),
            checkpoints: Vec::new(),
            max_checkpoints: 0,
            rollback: None,
            adapters: AdapterPlan::default(),
        }
    }

    /// The adapter scales its cells were decoded with, by position.
    pub(crate) fn adapters(&self) -> &AdapterPlan {
        &self.adapters
    }

    /// Notes the plan the cells it holds were decoded with (cells copied from another sequence
    /// carry that sequence's).
    pub(crate) fn set_adapters(&mut self, plan: AdapterPlan) {
        self.adapters = plan;
    }

    /// Makes the sequence one of cells decoded with adapter `plan`: cut back first to the cells
    /// whose positions both plans decode with the same scales (a request with other adapters
    /// cannot reuse the others), as [`Sequence::keep_within`] cuts.
    pub(crate) fn adapt(&mut self, session: &mut impl BackendSession<Checkpoint = K>, plan: &AdapterPlan) {
        if self.adapters == *plan {
            return;
        }
        let agreed = self.adapters.agrees_until(plan);
        if agreed < self.len() {
            self.keep_within(session, agreed);
        }
        self.adapters.clone_from(plan);
    }

    /// Keeps up to `n` recurrent checkpoints (see [`Sequence::checkpoint`]).
    pub(crate) fn keep_checkpoints(&mut self, n: usize) {
        self.max_checkpoints = n;
        let excess = self.checkpoints.len().saturating_sub(n);
        self.checkpoints.drain(..excess);
    }

    pub(crate) fn id(&self) -> i32 {
        self.id
    }

    pub(crate) fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The checkpoints kept: how many, and their bytes.
    pub(crate) fn checkpoint_usage(&self) -> (usize, usize) {
        (self.checkpoints.len(), self.checkpoints.iter().map(|c| c.bytes).sum())
    }

    /// Notes `tokens` as decoded after the others.
    pub(crate) fn extend(&mut self, tokens: &[Token]) {
        self.tokens.extend_from_slice(tokens);
    }

    pub(crate) fn push(&mut self, token: Token) {
        self.tokens.push(token);
    }

    /// `f` of the tokens with `ahead` and then `next` after them (what a step is about to decode:
    /// drafts follow it); the list is as before afterwards.
    pub(crate) fn with_ahead<T>(&mut self, ahead: &[Token], next: Token, f: impl FnOnce(&[Token]) -> T) -> T {
        let len = self.tokens.len();
        self.tokens.extend_from_slice(ahead);
        self.tokens.push(next);
        let out = f(&self.tokens);
        self.tokens.truncate(len);
        out
    }

    /// How many leading tokens the cache shares with `prompt`.
    pub(crate) fn common_prefix(&self, prompt: &[Token]) -> usize {
        self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count()
    }

    /// How much of `prompt` this cache can give a request with adapter `plan`: the longest prefix
    /// it shares with it whose cells were decoded with the plan's scales (see
    /// [`Sequence::adapt`]), leaving at least one prompt token to decode (its logits start the
    /// generation). A recurrent state (`recurrent`) is cut back only to a checkpoint, or not at
    /// all where the prompt goes on past all it holds.
    pub(crate) fn reusable(&self, prompt: &[Token], plan: &AdapterPlan, recurrent: bool) -> usize {
        let common = self.common_prefix(prompt).min(self.adapters.agrees_until(plan)).min(prompt.len().saturating_sub(1));
        if !recurrent || common == self.len() {
            return common;
        }
        self.checkpoint_within(common).map_or(0, |c| c.len)
    }

    /// Where a prompt's prefill should stop for a checkpoint: a few tokens before its end (the
    /// next turn of a chat extends the prompt, seldom the reply as decoded, and its last tokens,
    /// the template's opening of the reply, may tokenize otherwise once a reply follows them: a
    /// newline merging with the reply's, as llama-server also allows for), where that is past
    /// what the cache holds. None where no checkpoints are kept.
    pub(crate) fn checkpoint_position(&self, prompt_len: usize) -> Option<usize> {
        let at = prompt_len.checked_sub(CHECKPOINT_BEFORE_END)?;
        (self.max_checkpoints > 0 && at > self.len()).then_some(at)
    }

    /// Records where the cache stands now as a recurrent checkpoint, to come back to. The oldest
    /// goes when more than the bound are kept. Nothing where no checkpoints are kept or the
    /// memory has no recurrent state.
    pub(crate) fn checkpoint(&mut self, session: &mut impl BackendSession<Checkpoint = K>) {
        let len = self.len();
        if self.max_checkpoints == 0 || len == 0 || self.checkpoints.last().is_some_and(|c| c.len == len) {
            return;
        }
        let Some((state, bytes)) = session.seq_checkpoint(self.id) else { return };
        self.push_checkpoint(Checkpoint { len, bytes, state });
    }

    /// Records where the cache stands now as the point a round of drafts decoded after it returns
    /// to (the previous round's point goes): a recurrent state cannot drop a rejected tail, and a
    /// checkpoint costs a copy of the recurrent state (about 160 KiB on the LFM2-1.2B shape)
    /// where decoding the sequence again would cost a prefill. Nothing where the memory keeps no
    /// checkpoints.
    pub(crate) fn mark_rollback(&mut self, session: &mut impl BackendSession<Checkpoint = K>) {
        let len = self.len();
        if len == 0 || self.rollback.as_ref().is_some_and(|c| c.len == len) {
            return;
        }
        self.rollback = session.seq_checkpoint(self.id).map(|(state, bytes)| Checkpoint { len, bytes, state });
    }

    /// Returns the cache to the point marked before the round of drafts, if it still holds it.
    /// The tokens kept, or None without a mark (the cache is then as it was).
    pub(crate) fn return_to_rollback(&mut self, session: &mut impl BackendSession<Checkpoint = K>) -> Option<usize> {
        let mark = self.rollback.take()?;
        Some(self.restore(session, &mark))
    }

    /// Drops the mark of [`Sequence::mark_rollback`] (its request ended: no round to return from).
    pub(crate) fn forget_rollback(&mut self) {
        self.rollback = None;
    }

    /// Keeps `checkpoint`, later than every one kept, as the newest (the oldest goes when more
    /// than the bound would be kept; nothing is kept where the bound is 0). It must be of the
    /// tokens this cache holds.
    pub(crate) fn push_checkpoint(&mut self, checkpoint: Checkpoint<K>) {
        if self.max_checkpoints == 0 {
            return;
        }
        if self.checkpoints.len() == self.max_checkpoints {
            self.checkpoints.remove(0);
        }
        self.checkpoints.push(checkpoint);
    }

    /// The prefix-reuse rule, for every cache that runs requests: keeps the longest prefix the
    /// cache shares with `prompt`, leaving at least one prompt token to decode; where the memory
    /// cannot cut there (a recurrent state), returns to the longest checkpoint within it, else
    /// starts from empty. Returns the tokens kept.
    pub(crate) fn keep_prefix(&mut self, session: &mut impl BackendSession<Checkpoint = K>, prompt: &[Token]) -> usize {
        self.keep_within(session, self.common_prefix(prompt).min(prompt.len().saturating_sub(1)))
    }

    /// Keeps at most the first `len` tokens: cut there, or where the memory cannot cut (a
    /// recurrent state), returned to the longest checkpoint within them, else emptied. Returns
    /// the tokens kept.
    fn keep_within(&mut self, session: &mut impl BackendSession<Checkpoint = K>, len: usize) -> usize {
        if self.cut(session, len) {
            return len;
        }
        let Some(checkpoint) = self.checkpoint_within(len).cloned() else {
            self.clear(session);
            return 0;
        };
        self.restore(session, &checkpoint)
    }

    /// Returns the cache to one of its checkpoints: the tokens after it leave, and so do later
    /// checkpoints. Returns the tokens kept: the checkpoint's, or none when the restore failed
    /// (the cache is then empty).
    fn restore(&mut self, session: &mut impl BackendSession<Checkpoint = K>, checkpoint: &Checkpoint<K>) -> usize {
        if !session.seq_restore_checkpoint(self.id, &checkpoint.state) {
            self.clear(session);
            return 0;
        }
        self.forget_after(checkpoint.len);
        checkpoint.len
    }

    /// The longest of its checkpoints within its first `len` tokens.
    pub(crate) fn checkpoint_within(&self, len: usize) -> Option<&Checkpoint<K>> {
        self.checkpoints.iter().rev().find(|c| c.len <= len)
    }

    /// The list and the checkpoints after a cut of the cache to its first `len` tokens.
    fn forget_after(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.checkpoints.retain(|c| c.len <= len);
        self.rollback.take_if(|c| c.len > len);
    }

    /// Cuts the cache back to its first `len` tokens, also dropping whatever it holds beyond the
    /// list (drafts a decode placed after it). False when the memory cannot (a recurrent state
    /// can only be cut where it ends): the cache is then as it was, and the caller decides.
    pub(crate) fn cut(&mut self, session: &mut impl BackendSession, len: usize) -> bool {
        if !session.seq_truncate(self.id, len as i32) {
            return false;
        }
        self.forget_after(len);
        true
    }

    /// Empties the cache.
    pub(crate) fn clear(&mut self, session: &mut impl BackendSession) {
        session.seq_clear(self.id);
        self.forget_after(0);
    }
}

/// What a slot is doing.
#[derive(Debug)]
pub(crate) enum Phase<R> {
    /// No request; the cache stays for the next request to reuse.
    Idle,
    /// Decoding `prompt[done..]`, a chunk per step; the sequence holds `prompt[..done]`. `then`
    /// is the token to decode once the prompt is in: set when a sequence is decoded again (the
    /// recurrent fallback), None for a new request, whose first token comes from the prompt's
    /// last logits. `checkpoint_at`: where the prefill stops for a recurrent checkpoint (see
    /// [`Sequence::checkpoint_position`]).
    Prefilling { request: R, prompt: Vec<Token>, done: usize, then: Option<Token>, checkpoint_at: Option<usize> },
    /// `pending` was drawn and handed to the request; the next step decodes it (with drafts after
    /// it when the request speculates).
    Generating { request: R, pending: Token },
}

impl<R> Phase<R> {
    pub(crate) fn request(&self) -> Option<&R> {
        match self {
            Phase::Idle => None,
            Phase::Prefilling { request, .. } | Phase::Generating { request, .. } => Some(request),
        }
    }

    pub(crate) fn request_mut(&mut self) -> Option<&mut R> {
        match self {
            Phase::Idle => None,
            Phase::Prefilling { request, .. } | Phase::Generating { request, .. } => Some(request),
        }
    }

    /// The request, leaving the slot idle.
    pub(crate) fn take_request(&mut self) -> Option<R> {
        match std::mem::replace(self, Phase::Idle) {
            Phase::Idle => None,
            Phase::Prefilling { request, .. } | Phase::Generating { request, .. } => Some(request),
        }
    }
}

/// One sequence of the shared context and what runs in it.
#[derive(Debug)]
pub(crate) struct Slot<R, K> {
    pub(crate) seq: Sequence<K>,
    pub(crate) phase: Phase<R>,
    /// When the slot last ended a request (for choosing among equally good free slots).
    pub(crate) last_used: u64,
}

impl<R, K> Slot<R, K> {
    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }
}
