//! A slot: one sequence of the shared context, the tokens its cache holds, and the phase of the
//! request it runs.

use crate::backend::BackendSession;
use crate::token::TokenId;

/// One sequence of a context and the tokens its cache holds, in position order. Every change to
/// the cache goes through it, so the list and the cache cannot drift apart.
#[derive(Debug)]
pub(crate) struct Sequence {
    id: i32,
    tokens: Vec<TokenId>,
}

impl Sequence {
    /// Sequence `id`, with room for `capacity` tokens (the context: the token loop never grows it).
    pub(crate) fn new(id: i32, capacity: usize) -> Self {
        Sequence { id, tokens: Vec::with_capacity(capacity) }
    }

    pub(crate) fn id(&self) -> i32 {
        self.id
    }

    pub(crate) fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Notes `tokens` as decoded after the others.
    pub(crate) fn extend(&mut self, tokens: &[TokenId]) {
        self.tokens.extend_from_slice(tokens);
    }

    pub(crate) fn push(&mut self, token: TokenId) {
        self.tokens.push(token);
    }

    pub(crate) fn pop(&mut self) {
        self.tokens.pop();
    }

    /// How many leading tokens the cache shares with `prompt`.
    pub(crate) fn common_prefix(&self, prompt: &[TokenId]) -> usize {
        self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count()
    }

    /// The prefix-reuse rule, for every cache that runs requests: keeps the longest prefix the
    /// cache shares with `prompt`, leaving at least one prompt token to decode (its logits start
    /// the generation); where the memory cannot cut there (a recurrent state), starts from
    /// empty. Returns the tokens kept.
    pub(crate) fn keep_prefix(&mut self, session: &mut impl BackendSession, prompt: &[TokenId]) -> usize {
        let common = self.common_prefix(prompt).min(prompt.len().saturating_sub(1));
        if self.cut(session, common) {
            common
        } else {
            self.clear(session);
            0
        }
    }

    /// Cuts the cache back to its first `len` tokens, also dropping whatever it holds beyond the
    /// list (drafts a decode placed after it). False when the memory cannot (a recurrent state
    /// can only be cut where it ends): the cache is then as it was, and the caller decides.
    pub(crate) fn cut(&mut self, session: &mut impl BackendSession, len: usize) -> bool {
        if !session.seq_truncate(self.id, len as i32) {
            return false;
        }
        self.tokens.truncate(len);
        true
    }

    /// Empties the cache.
    pub(crate) fn clear(&mut self, session: &mut impl BackendSession) {
        session.seq_clear(self.id);
        self.tokens.clear();
    }

    /// Empties the cache and hands back the tokens it held, to be decoded again (the recurrent
    /// fallback: a state that cannot be cut is rebuilt from its tokens).
    pub(crate) fn take(&mut self, session: &mut impl BackendSession) -> Vec<TokenId> {
        session.seq_clear(self.id);
        let capacity = self.tokens.capacity();
        std::mem::replace(&mut self.tokens, Vec::with_capacity(capacity))
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
    /// last logits.
    Prefilling { request: R, prompt: Vec<TokenId>, done: usize, then: Option<TokenId> },
    /// `pending` was drawn and handed to the request; the next step decodes it (with drafts after
    /// it when the request speculates).
    Generating { request: R, pending: TokenId },
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
pub(crate) struct Slot<R> {
    pub(crate) seq: Sequence,
    pub(crate) phase: Phase<R>,
    /// When the slot last ended a request (for choosing among equally good free slots).
    pub(crate) last_used: u64,
}

impl<R> Slot<R> {
    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }
}
