//! The engine: a model, sessions over it with prefix reuse, and streaming generation.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Active, Backend, BackendModel, BackendSession, ModelInfo, Outputs, TokenId};
use crate::config::{CancelToken, EngineConfig, GenerateRequest, SessionConfig};
use crate::error::EngineError;
use crate::stop::{StopMatcher, StopScan, TOKEN_TEXT_CAPACITY};
use exsa_utf8::Utf8Decoder;

type Model = <Active as Backend>::Model;
type RawSession<'m> = <Model as BackendModel>::Session<'m>;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

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
}

impl GenerationStats {
    /// The share of the generation's time spent outside decoding, in percent (0 before any
    /// generation time was measured).
    pub fn outside_decode_percent(&self) -> f64 {
        if self.generation_ms > 0.0 { 100.0 * (self.generation_ms - self.decode_ms).max(0.0) / self.generation_ms } else { 0.0 }
    }
}

/// A loaded model, ready to make sessions.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    config: EngineConfig,
    /// Resolved once at load: every chat request uses it.
    chat_template: String,
}

impl Engine {
    /// Loads the model named in `config`.
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        config.session.validate()?;
        let model = Active::load(&config.model, config.n_gpu_layers)?;
        let chat_template = resolve_chat_template(&model, config.chat_template_fallback.as_deref());
        Ok(Engine { model, config, chat_template })
    }

    pub fn backend_name() -> &'static str {
        Active::NAME
    }

    pub fn build_info() -> serde_json::Value {
        Active::build_info()
    }

    pub fn system_info() -> String {
        Active::system_info()
    }

    pub fn model_info(&self) -> ModelInfo {
        self.model.info()
    }

    /// A session with the engine's default context parameters.
    pub fn session(&self) -> Result<Session<'_>, EngineError> {
        self.session_with(&self.config.session)
    }

    pub fn session_with(&self, config: &SessionConfig) -> Result<Session<'_>, EngineError> {
        config.validate()?;
        Ok(Session { engine: self, inner: self.model.session(config)?, cached: Vec::new(), scratch: Vec::new() })
    }

    /// One-shot generation to a string, in a fresh session.
    pub fn generate(&self, request: &GenerateRequest) -> Result<(String, GenerationStats), EngineError> {
        self.session()?.generate_text(request)
    }

    /// The mean-pooled embedding of `text`. The whole text must fit one batch (n_batch tokens):
    /// pooling covers one decode, so a longer text would be pooled over its last part only.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let base = &self.config.session;
        // One micro-batch per batch, so models that attend both ways take a whole batch too.
        let config = SessionConfig { embeddings: true, n_ubatch: base.n_batch, ..base.clone() };
        let mut session = self.session_with(&config)?;
        let mut tokens = Vec::new();
        self.model.tokenize(text, true, false, &mut tokens)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if tokens.len() > config.n_batch as usize {
            return Err(EngineError::EmbedTooLong { tokens: tokens.len(), n_batch: config.n_batch });
        }
        session.prefill(&tokens)?;
        session.inner.embedding()
    }

    /// The template for chats: the model's own, the configured fallback, or one chosen by
    /// architecture.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// The prompt tokens of a chat, as [`Session::chat`] decodes them: the template's control
    /// tokens parsed, message contents kept as text unless `specials_in_messages`.
    pub fn chat_tokens(&self, messages: &[ChatMessage], specials_in_messages: bool) -> Result<Vec<TokenId>, EngineError> {
        let rendered = self.format_chat(messages)?;
        let mut tokens = Vec::new();
        crate::chat_tokens::tokenize(&self.model, &rendered, messages, specials_in_messages, &mut tokens)?;
        Ok(tokens)
    }

    /// Tokenizes plain text (BOS added where the model wants one; control-token text parsed
    /// only with `parse_special`).
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, EngineError> {
        let mut tokens = Vec::new();
        self.model.tokenize(text, true, parse_special, &mut tokens)?;
        Ok(tokens)
    }

    /// Formats a chat with [`Engine::chat_template`], opening the assistant's turn.
    pub fn format_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let pairs: Vec<(String, String)> = messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
        self.model.apply_chat_template(&self.chat_template, &pairs)
    }

    pub(crate) fn model(&self) -> &Model {
        &self.model
    }
}

fn resolve_chat_template(model: &Model, fallback: Option<&str>) -> String {
    if let Some(t) = model.chat_template() {
        return t;
    }
    if let Some(t) = fallback {
        return t.to_string();
    }
    let arch = model.info().architecture;
    if arch.starts_with("gemma") {
        "gemma".into()
    } else if arch.starts_with("llama") {
        "llama3".into()
    } else {
        "chatml".into()
    }
}

/// A context with memory of what it decoded: a request that shares a prefix with the previous
/// one decodes only the new suffix.
pub struct Session<'e> {
    engine: &'e Engine,
    inner: RawSession<'e>,
    /// The tokens in the KV cache, in position order.
    cached: Vec<TokenId>,
    scratch: Vec<TokenId>,
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
    fn prefill(&mut self, tokens: &[TokenId]) -> Result<usize, EngineError> {
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
        self.inner.set_abort_flag(cancel.0.clone());
        self.inner.set_sampler(&request.sampling)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let prompt_tokens = tokens.len();
        let reused = self.prefill(&tokens).map_err(|e| if cancel.is_cancelled() { EngineError::Cancelled } else { e })?;
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
            stop: StopMatcher::new(&request.stop),
            utf8: Utf8Decoder::new(),
            // Sized for any token's text at once, so the loop does not grow them piecemeal.
            piece: Vec::with_capacity(TOKEN_TEXT_CAPACITY),
            decoded: String::with_capacity(TOKEN_TEXT_CAPACITY),
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
        })
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

/// A generation in progress: an iterator of text deltas, or, without an allocation per token,
/// [`Generation::next_text`].
pub struct Generation<'s, 'e> {
    session: &'s mut Session<'e>,
    max_tokens: usize,
    cancel: CancelToken,
    stop: StopMatcher,
    utf8: Utf8Decoder,
    /// The bytes of the current token.
    piece: Vec<u8>,
    /// The complete characters those bytes finished.
    decoded: String,
    /// What the current step emits. All three buffers keep their allocations across steps.
    delta: String,
    started: Instant,
    prompt_done: Instant,
    stats: GenerationStats,
    finished: bool,
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
        self.stats.finish_reason = Some(reason);
        if reason != FinishReason::StopSequence {
            // Held-back text first, then the bytes of an unfinished character, replaced rather
            // than dropped.
            self.stop.flush(&mut self.delta);
            self.utf8.finish(&mut self.delta);
        }
        let generation_ms = ms(Instant::now() - self.prompt_done);
        self.stats.generation_ms = generation_ms;
        if generation_ms > 0.0 {
            self.stats.generation_tokens_per_s = self.stats.completion_tokens as f64 / (generation_ms / 1000.0);
        }
    }

    /// One token: sample, detokenize, check stops, decode it for the next step. Text to emit
    /// goes to `self.delta`.
    fn step(&mut self) -> Result<(), EngineError> {
        if self.cancel.is_cancelled() {
            self.finish(FinishReason::Cancelled);
            return Ok(());
        }
        let session = &mut *self.session;
        let token = session.inner.sample()?;
        if self.stats.completion_tokens == 0 {
            self.stats.time_to_first_token_ms = ms(Instant::now() - self.started);
        }
        let model = session.engine.model();
        if model.is_eog(token) {
            self.finish(FinishReason::EndOfText);
            return Ok(());
        }
        self.stats.completion_tokens += 1;
        self.piece.clear();
        model.piece(token, &mut self.piece)?;
        self.decoded.clear();
        self.utf8.push(&self.piece, &mut self.decoded);
        if self.stop.push(&self.decoded, &mut self.delta) == StopScan::Stop {
            self.finish(FinishReason::StopSequence);
            return Ok(());
        }
        let done = if self.stats.completion_tokens >= self.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if session.cached.len() + 1 >= session.n_ctx() as usize {
            Some(FinishReason::ContextFull)
        } else {
            let pos = session.cached.len() as i32;
            let decode_started = Instant::now();
            let decoded = session.inner.decode(&[token], pos, Outputs::Last);
            self.stats.decode_ms += ms(decode_started.elapsed());
            match decoded {
                Ok(()) => {
                    session.cached.push(token);
                    None
                }
                Err(EngineError::Cancelled) => {
                    session.reset();
                    Some(FinishReason::Cancelled)
                }
                Err(e) => return Err(e),
            }
        };
        if let Some(reason) = done {
            self.finish(reason);
        }
        Ok(())
    }
}

impl Iterator for Generation<'_, '_> {
    type Item = Result<String, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_text().map(|delta| delta.map(str::to_owned))
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
