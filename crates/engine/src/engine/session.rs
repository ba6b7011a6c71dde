//! Sessions: a context that remembers what it decoded, so a request sharing a prefix with the
//! previous one decodes only the new suffix.

use std::time::Instant;

use super::generation::{Generation, GenerationStats, SpeculationState};
use super::{Engine, RawSession};
use crate::backend::{BackendModel, BackendSession, Outputs, TokenId};
use crate::chat::ChatMessage;
use crate::config::{GenerateRequest, Speculation};
use crate::error::EngineError;
use crate::speculative::DraftLength;
use crate::stop::TOKEN_TEXT_CAPACITY;
use crate::token_text::{TokenText, ms};

/// A context with memory of what it decoded: a request that shares a prefix with the previous
/// one decodes only the new suffix.
pub struct Session<'e> {
    pub(super) engine: &'e Engine,
    pub(super) inner: RawSession<'e>,
    /// The tokens in the KV cache, in position order.
    pub(super) cached: Vec<TokenId>,
    pub(super) scratch: Vec<TokenId>,
    /// The draft model's session for [`Speculation::Draft`], made on first use and kept, so
    /// that it too decodes only what is new.
    pub(super) draft: Option<Box<Session<'e>>>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("cached_tokens", &self.cached.len()).finish_non_exhaustive()
    }
}

impl<'e> Session<'e> {
    pub fn n_ctx(&self) -> u32 {
        self.inner.n_ctx()
    }

    /// Tokens held in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Forgets everything decoded.
    pub fn reset(&mut self) {
        self.inner.clear();
        self.cached.clear();
    }

    /// Brings the cache to `tokens`, decoding only what it does not share with the cache.
    /// Returns the number of tokens reused.
    pub(super) fn prefill(&mut self, tokens: &[TokenId]) -> Result<usize, EngineError> {
        if tokens.len() >= self.n_ctx() as usize {
            return Err(EngineError::PromptTooLong { prompt_tokens: tokens.len(), n_ctx: self.n_ctx() });
        }
        // Keep at least one token to decode: its logits start the generation.
        let mut common = self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        if common < self.cached.len() && !self.inner.truncate(common as i32) {
            self.inner.clear();
            common = 0;
        }
        self.cached.truncate(common);
        let n_batch = self.inner.n_batch() as usize;
        let rest = &tokens[common..];
        let n_chunks = rest.len().div_ceil(n_batch);
        for (i, chunk) in rest.chunks(n_batch).enumerate() {
            let outputs = if i + 1 == n_chunks { Outputs::Last } else { Outputs::None };
            if let Err(e) = self.inner.decode(chunk, self.cached.len() as i32, outputs) {
                // The cache may hold part of the chunk: start clean next time.
                self.reset();
                return Err(e);
            }
            self.cached.extend_from_slice(chunk);
        }
        Ok(common)
    }

    /// Starts generating from a raw prompt. The returned iterator yields text deltas, each
    /// valid UTF-8 and free of stop sequences; [`Generation::stats`] says how it went.
    pub fn generate(&mut self, request: &GenerateRequest) -> Result<Generation<'_, 'e>, EngineError> {
        request.validate()?;
        let started = Instant::now();
        let mut tokens = std::mem::take(&mut self.scratch);
        self.engine.model().tokenize(&request.prompt, true, request.parse_special, &mut tokens)?;
        self.start(tokens, request, started)
    }

    /// Prefills `tokens` (the prompt) and returns the generation that follows it.
    fn start(&mut self, tokens: Vec<TokenId>, request: &GenerateRequest, started: Instant) -> Result<Generation<'_, 'e>, EngineError> {
        let cancel = request.cancel.clone().unwrap_or_default();
        if matches!(request.speculation, Speculation::Draft { .. }) {
            self.open_draft()?;
        }
        self.inner.set_abort_flag(cancel.0.clone());
        self.inner.set_sampler(&request.sampling)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let prompt_tokens = tokens.len();
        let reused = self.prefill(&tokens).map_err(|e| if cancel.is_cancelled() { EngineError::Cancelled } else { e })?;
        // The prompt's time includes its computation (GPU and RPC backends return before it).
        self.inner.synchronize();
        self.scratch = tokens;
        // Room for every token this request may add, so the token loop never grows the cache list.
        let room = (self.n_ctx() as usize).saturating_sub(self.cached.len()).min(request.max_tokens);
        self.cached.reserve(room);
        let prompt_done = Instant::now();
        let prompt_ms = ms(prompt_done - started);
        let decoded = prompt_tokens - reused;
        Ok(Generation {
            session: self,
            max_tokens: request.max_tokens,
            cancel,
            text: TokenText::new(&request.stop),
            // Sized for any token's text at once, so the loop does not grow it piecemeal.
            delta: String::with_capacity(TOKEN_TEXT_CAPACITY),
            started,
            prompt_done,
            stats: GenerationStats {
                prompt_tokens,
                prompt_tokens_reused: reused,
                prompt_ms,
                prompt_tokens_per_s: if prompt_ms > 0.0 { decoded as f64 / (prompt_ms / 1000.0) } else { 0.0 },
                ..Default::default()
            },
            finished: false,
            tokens: Vec::with_capacity(room),
            speculation: request.speculation.max_draft().map(|max_draft| SpeculationState {
                from_model: matches!(request.speculation, Speculation::Draft { .. }),
                length: DraftLength::new(max_draft as usize),
                next: None,
                drafts: Vec::with_capacity(max_draft as usize),
            }),
        })
    }

    /// Makes the draft model's session (greedy, the same context length) unless there is one.
    fn open_draft(&mut self) -> Result<(), EngineError> {
        if self.draft.is_some() {
            return Ok(());
        }
        let draft = self.engine.draft().ok_or(EngineError::InvalidRequest {
            field: "speculation",
            value: "draft".into(),
            reason: "the engine has no draft model (EngineConfig::draft_model, --draft-model)",
        })?;
        let config = crate::SessionConfig { n_ctx: self.n_ctx(), n_seq: 1, embeddings: false, ..draft.session_config().clone() };
        let mut session = draft.session_with(&config)?;
        session.inner.set_sampler(&crate::SamplingParams::greedy())?;
        self.draft = Some(Box::new(session));
        Ok(())
    }

    /// Appends to `out` up to `max_len` tokens the draft model would generate greedily after
    /// `history` (the main session's tokens). Its cache keeps what it decoded, so the next
    /// round decodes only what changed.
    pub(super) fn draft_greedy(&mut self, history: &[TokenId], max_len: usize, out: &mut Vec<TokenId>) -> Result<(), EngineError> {
        self.prefill(history)?;
        while out.len() < max_len {
            let token = self.inner.sample()?;
            out.push(token);
            if out.len() == max_len || self.engine.model().is_eog(token) {
                break;
            }
            if let Err(e) = self.inner.decode(&[token], self.cached.len() as i32, Outputs::Last) {
                self.reset();
                return Err(e);
            }
            self.cached.push(token);
        }
        Ok(())
    }

    /// Generates a chat reply: the messages formatted with the model's template. The template's
    /// own control tokens are parsed; text inside message contents never becomes a control
    /// token (a user cannot forge turns by typing `<end_of_turn>`), unless the request sets
    /// [`GenerateRequest::specials_in_messages`].
    pub fn chat(&mut self, messages: &[ChatMessage], mut request: GenerateRequest) -> Result<Generation<'_, 'e>, EngineError> {
        let started = Instant::now();
        request.prompt = self.engine.format_chat(messages)?;
        request.parse_special = true;
        request.validate()?;
        let mut tokens = std::mem::take(&mut self.scratch);
        crate::chat_tokens::tokenize(self.engine.model(), &request.prompt, messages, request.specials_in_messages, &mut tokens)?;
        self.start(tokens, &request, started)
    }

    /// Runs a request to the end and returns all its text.
    pub fn generate_text(&mut self, request: &GenerateRequest) -> Result<(String, GenerationStats), EngineError> {
        let mut generation = self.generate(request)?;
        let mut text = String::new();
        while let Some(delta) = generation.next_text() {
            text.push_str(delta?);
        }
        Ok((text, generation.stats().clone()))
    }
}
