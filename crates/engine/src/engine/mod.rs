//! The engine: a loaded model that prepares requests and makes sessions ([`Session`],
//! `session.rs`), which run streaming generations ([`Generation`], `generation.rs`) through the
//! scheduler that serves the server's requests too.

mod generation;
mod session;

use std::time::Instant;

use crate::backend::{Active, Backend, BackendModel, BackendSession, ModelInfo, Outputs, SamplerOf, TokenId};
use crate::chat::ChatMessage;
use crate::config::{EngineConfig, GenerateRequest, Prompt, SessionConfig};
use crate::error::EngineError;
use crate::outcome::GenerationStats;
use crate::scheduler::Prepared;

pub use generation::Generation;
pub use session::Session;

pub(crate) type Model = <Active as Backend>::Model;
/// The sampler type of the engine's backend.
pub(crate) type Sampler<'m> = SamplerOf<'m, Model>;

/// A loaded model, ready to make sessions.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    config: EngineConfig,
    /// Resolved once at load: every chat request uses it.
    chat_template: String,
    /// The model that drafts for [`crate::Speculation::Draft`], its vocabulary checked.
    draft: Option<Box<Engine>>,
}

/// How much of llama.cpp's own log reaches `tracing` (default: warnings and errors), for every
/// backend; `tracing`'s filters apply on top.
pub fn set_llama_log_level(level: crate::backend::LlamaLogLevel) {
    <crate::backend::Active as crate::backend::Backend>::set_llama_log_level(level);
}

impl Engine {
    /// Loads the model named in `config`.
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        config.session.validate()?;
        let model = Active::load(&config.model, &config.placement)?;
        let chat_template = chat_template_for(&model, config.chat_template_fallback.as_deref());
        let draft = match &config.draft_model {
            Some(path) => {
                let draft = Engine::load(EngineConfig { model: path.clone(), draft_model: None, ..config.clone() })?;
                if let Some(reason) = vocabulary_difference(&model, &draft.model)? {
                    return Err(EngineError::DraftModel { path: path.clone(), reason });
                }
                Some(Box::new(draft))
            }
            None => None,
        };
        Ok(Engine { model, config, chat_template, draft })
    }

    /// The draft model's engine, when one was loaded.
    pub fn draft(&self) -> Option<&Engine> {
        self.draft.as_deref()
    }

    pub fn backend_name() -> &'static str {
        Active::NAME
    }

    pub fn build_info() -> serde_json::Value {
        Active::build_info()
    }

    /// Serves this process's devices (GPUs, else the CPU with `threads` threads) as a ggml
    /// rpc-server on `endpoint` (`HOST:PORT`), for models loaded elsewhere with
    /// [`EngineConfig::rpc_servers`]. Runs until the process ends; returns only the reason it
    /// could not serve. The protocol has no authentication: see `llama::rpc`.
    pub fn serve_rpc(endpoint: &str, cache_dir: Option<&std::path::Path>, threads: usize) -> EngineError {
        Active::serve_rpc(endpoint, cache_dir, threads)
    }

    pub fn system_info() -> String {
        Active::system_info()
    }

    pub fn model_info(&self) -> ModelInfo {
        self.model.info()
    }

    /// The bytes of a token's text (special tokens render as empty), for token-level output
    /// such as log-probabilities.
    pub fn token_bytes(&self, token: TokenId) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::new();
        self.model.piece(token, &mut out)?;
        Ok(out)
    }

    /// The context parameters sessions get by default.
    pub fn session_config(&self) -> &SessionConfig {
        &self.config.session
    }

    /// A session with the engine's default context parameters.
    pub fn session(&self) -> Result<Session<'_>, EngineError> {
        self.session_with(&self.config.session)
    }

    pub fn session_with(&self, config: &SessionConfig) -> Result<Session<'_>, EngineError> {
        Session::new(self, config)
    }

    /// One-shot generation to a string, in a fresh session.
    pub fn generate(&self, request: &GenerateRequest) -> Result<(String, GenerationStats), EngineError> {
        self.session()?.generate_text(request)
    }

    /// The mean-pooled embedding of `text`. The whole text must fit one batch (n_batch tokens):
    /// pooling covers one decode, so a longer text would be pooled over its last part only.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let base = &self.config.session;
        // One micro-batch per batch, so models that attend both ways take a whole batch too; a
        // context just large enough for one batch, since nothing is kept.
        let config = SessionConfig { embeddings: true, n_ubatch: base.n_batch, n_ctx: base.n_batch.saturating_add(1), n_seq: 1, ..base.clone() };
        config.validate()?;
        let mut session = self.model.session(&config)?;
        let mut tokens = Vec::new();
        self.model.tokenize(text, true, false, &mut tokens)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if tokens.len() > config.n_batch as usize {
            return Err(EngineError::EmbedTooLong { tokens: tokens.len(), n_batch: config.n_batch });
        }
        session.decode(&tokens, 0, Outputs::Last)?;
        session.embedding()
    }

    /// A request ready for a scheduler: its prompt tokenized as its kind asks, its options
    /// checked, its sampler built (a grammar parsed here, once).
    pub(crate) fn prepare(&self, request: &GenerateRequest) -> Result<Prepared<Sampler<'_>>, EngineError> {
        let arrived = Instant::now();
        request.validate()?;
        let tokens = match &request.prompt {
            // BOS alone is no prompt.
            Prompt::Text { text, .. } if text.is_empty() => return Err(EngineError::EmptyPrompt),
            Prompt::Text { text, parse_special } => self.tokenize(text, *parse_special)?,
            Prompt::Chat { messages, specials_in_messages } => self.chat_tokens(messages, *specials_in_messages)?,
            Prompt::Tokens(tokens) => {
                let n_vocab = self.model.n_vocab();
                if let Some(bad) = tokens.iter().find(|t| !(0..n_vocab).contains(*t)) {
                    return Err(EngineError::InvalidRequest { field: "prompt", value: bad.to_string(), reason: "is not a token of this model" });
                }
                tokens.clone()
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let sampler = self.model.sampler(&request.options.sampling)?;
        Ok(Prepared { tokens, options: request.options.clone(), sampler, arrived })
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

    /// Tokenizes a prompt: BOS added where the model wants one; control-token text parsed only
    /// with `parse_special`.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, EngineError> {
        self.tokenize_with(text, TokenizeOptions { parse_special, ..TokenizeOptions::default() })
    }

    /// Tokenizes text with every choice explicit (e.g. a fragment, without BOS).
    pub fn tokenize_with(&self, text: &str, options: TokenizeOptions) -> Result<Vec<TokenId>, EngineError> {
        let mut tokens = Vec::new();
        self.model.tokenize(text, options.add_special, options.parse_special, &mut tokens)?;
        Ok(tokens)
    }

    /// Every token that ends a generation (end of sequence, end of turn, ...): to ban them with
    /// a logit bias when a fixed number of tokens is wanted.
    pub fn end_of_generation_tokens(&self) -> Vec<TokenId> {
        (0..self.model.n_vocab()).filter(|&t| self.model.is_eog(t)).collect()
    }

    /// [`EngineError::Rpc`] once an rpc-server holding the model's layers was lost: every
    /// generation fails from then on, and the model must be loaded again (the server does that
    /// itself, see `exsa serve`). Ok for a model without rpc-servers.
    pub fn check_servers(&self) -> Result<(), EngineError> {
        self.model.check_servers()
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

/// The template for chats: the model's own, else `fallback`, else one chosen by architecture.
fn chat_template_for(model: &Model, fallback: Option<&str>) -> String {
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

/// Why `draft` cannot draft for `target`, or None when it can: its token ids must mean the same
/// text and the same end-of-generation tokens, since drafts are handed over as ids.
fn vocabulary_difference(target: &Model, draft: &Model) -> Result<Option<String>, EngineError> {
    let (n_target, n_draft) = (target.n_vocab(), draft.n_vocab());
    if n_target != n_draft {
        return Ok(Some(format!("its vocabulary has {n_draft} tokens, the main model's {n_target}")));
    }
    if target.bos() != draft.bos() {
        return Ok(Some(format!("its BOS token is {}, the main model's {}", draft.bos(), target.bos())));
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for token in 0..n_target {
        a.clear();
        b.clear();
        target.piece(token, &mut a)?;
        draft.piece(token, &mut b)?;
        if a != b {
            let (a, b) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
            return Ok(Some(format!("token {token} is {b:?} in it, {a:?} in the main model")));
        }
        if target.is_eog(token) != draft.is_eog(token) {
            return Ok(Some(format!("token {token} ends a generation in one model and not in the other")));
        }
    }
    Ok(None)
}

/// How [`Engine::tokenize_with`] treats text. (`llama::TokenizeOptions` says the same for the
/// safe wrapper; the engine has its own because backend `crate` does not link `llama`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Add BOS (and whatever else the model adds around a whole text).
    pub add_special: bool,
    /// Turn control-token text (`<start_of_turn>`, ...) into control tokens.
    pub parse_special: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { add_special: true, parse_special: false }
    }
}
