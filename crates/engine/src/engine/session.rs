//! Sessions: one stream of requests over a context that remembers what it decoded, so a request
//! sharing a prefix with the previous one decodes only the new suffix. A session is a scheduler
//! of one slot: the same path as the server's requests, driven by the caller.

use std::sync::Arc;

use super::generation::Generation;
use super::{Engine, Model};
use crate::backend::BackendModel;
use crate::chat::{ChatMessage, ChatOptions, ChatReply};
use crate::config::{GenerateOptions, GenerateRequest, Prompt, SessionConfig, Speculation};
use crate::error::EngineError;
use crate::outcome::GenerationStats;
use crate::scheduler::{Counters, DraftModel, Scheduler};

/// A context with memory of what it decoded: a request that shares a prefix with the previous
/// one decodes only the new suffix.
pub struct Session<'e> {
    pub(super) engine: &'e Engine,
    pub(super) scheduler: Scheduler<'e, Model, ()>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("cached_tokens", &self.cached_tokens()).finish_non_exhaustive()
    }
}

impl<'e> Session<'e> {
    pub(super) fn new(engine: &'e Engine, config: &SessionConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let session = engine.model().session(config)?;
        Ok(Session { engine, scheduler: Scheduler::new(engine.model(), session, 1, Arc::new(Counters::default())) })
    }

    pub fn n_ctx(&self) -> u32 {
        self.scheduler.n_ctx() as u32
    }

    /// Tokens held in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.scheduler.cached(0).len()
    }

    /// Forgets everything decoded.
    pub fn reset(&mut self) {
        self.scheduler.forget();
    }

    /// Starts generating. The returned iterator yields text deltas, each valid UTF-8 and free of
    /// stop sequences; [`Generation::stats`] says how it went. The prompt is decoded before this
    /// returns: a prompt that does not fit, or a cancel during its decode, is an error here.
    pub fn generate(&mut self, request: &GenerateRequest) -> Result<Generation<'_, 'e>, EngineError> {
        let (prepared, parser) = self.engine.prepare(request)?;
        if matches!(request.options.speculation, Speculation::Draft { .. }) {
            self.open_draft()?;
        }
        self.scheduler.admit(prepared, ()).map_err(|(_, e)| e)?;
        Generation::start(self, parser)
    }

    /// Generates a chat reply: the messages formatted with the model's template (see
    /// [`Prompt::Chat`]: message contents stay text).
    pub fn chat(&mut self, messages: &[ChatMessage], options: GenerateOptions) -> Result<Generation<'_, 'e>, EngineError> {
        self.generate(&GenerateRequest { prompt: Prompt::chat(messages.to_vec()), options })
    }

    /// Generates a chat reply with tools or template options (an engine with
    /// [`crate::ChatTemplating::Jinja`]) and reads it as its format says: content, reasoning
    /// text and tool calls. To stream it, [`Session::generate`] a [`Prompt::chat_with`] and feed
    /// the text to [`Generation::take_reply_parser`]'s parser.
    pub fn chat_reply(
        &mut self,
        messages: &[ChatMessage],
        chat: &ChatOptions,
        options: GenerateOptions,
    ) -> Result<(ChatReply, GenerationStats), EngineError> {
        let mut generation = self.generate(&GenerateRequest { prompt: Prompt::chat_with(messages.to_vec(), chat.clone()), options })?;
        let parser = generation.take_reply_parser().ok_or(EngineError::Unsupported {
            what: "reading replies by their chat format without Jinja templates",
            backend: crate::Engine::backend_name(),
        })?;
        let mut text = String::new();
        while let Some(delta) = generation.next_text() {
            text.push_str(delta?);
        }
        Ok((parser.read_whole(&text)?, generation.stats().clone()))
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

    /// Gives the scheduler the draft model's context (greedy, this session's length) unless it
    /// has one: made on first use and kept, so that it too decodes only what is new.
    fn open_draft(&mut self) -> Result<(), EngineError> {
        if self.scheduler.has_draft_model() {
            return Ok(());
        }
        let draft = self.engine.draft().ok_or(EngineError::InvalidRequest {
            field: "speculation",
            value: "draft".into(),
            reason: "the engine has no draft model (EngineConfig::draft_model, --draft-model)",
        })?;
        let config = SessionConfig { n_ctx: self.n_ctx(), ..draft.session_config().clone() };
        self.scheduler.set_draft_model(DraftModel::new(draft.model(), &config)?);
        Ok(())
    }
}
