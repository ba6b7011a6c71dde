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
use crate::outcome::{GenerationStats, SlotAction, SlotActionDone};
use crate::scheduler::{AdapterPlan, Counters, Scheduler};
use crate::token::Token;

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
        let adapter_scales = Arc::new(std::sync::RwLock::new(engine.session_adapter_scales(config)?));
        let session = engine.model().session(config)?;
        Ok(Session { engine, scheduler: Scheduler::new(engine.model(), session, 1, Arc::new(Counters::default()), adapter_scales) })
    }

    /// The context's length in tokens (the KV cache's cells).
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

    /// What the cache holds (its tokens and their attention cells or recurrent state), as bytes
    /// in memory: [`Session::restore_state`] of a session of the same model and context size
    /// returns to it, so a prompt that extends those tokens decodes only the rest.
    ///
    /// # Errors
    /// [`EngineError::Unsupported`] on backend `crate` (state files work on every
    /// backend: [`Session::save_state_file`]); [`EngineError::State`] when llama.cpp cannot write
    /// it (an empty cache).
    pub fn save_state(&mut self) -> Result<SessionState, EngineError> {
        Ok(self.scheduler.save_state(0)?.into())
    }

    /// Replaces the cache with `state` (from [`Session::save_state`]).
    ///
    /// # Errors
    /// [`EngineError::State`] for a state of another model or context size, or of more tokens
    /// than this context holds (the cache is then empty); [`EngineError::Unsupported`] as
    /// [`Session::save_state`].
    pub fn restore_state(&mut self, state: &SessionState) -> Result<(), EngineError> {
        self.scheduler.restore_state(0, &state.tokens, &state.adapters(), &state.state)
    }

    /// Writes what the cache holds to `path`, in llama-server's slot file layout (llama-server
    /// and `exsa serve` restore it into a slot, and this into a session).
    ///
    /// # Errors
    /// [`EngineError::SlotFile`] naming the path when it cannot be written;
    /// [`EngineError::InvalidRequest`] naming `lora_scales` when the cache was decoded with other
    /// LoRA adapter scales than the session's (a request's own), which the file cannot record.
    pub fn save_state_file(&mut self, path: impl Into<std::path::PathBuf>) -> Result<SlotActionDone, EngineError> {
        self.scheduler.slot_action(0, &SlotAction::Save(path.into()))
    }

    /// Replaces the cache with the state file at `path` (from [`Session::save_state_file`], a
    /// server's slot save, or llama.cpp's sequence state files).
    ///
    /// # Errors
    /// [`EngineError::SlotFile`] naming the path for a file that cannot be read or is no state of
    /// this model and context (the cache is then empty).
    pub fn restore_state_file(&mut self, path: impl Into<std::path::PathBuf>) -> Result<SlotActionDone, EngineError> {
        self.scheduler.slot_action(0, &SlotAction::Restore(path.into()))
    }

    /// Gives the scheduler the draft model's context (greedy, this session's length) unless it
    /// has one: made on first use and kept, so that it too decodes only what is new.
    fn open_draft(&mut self) -> Result<(), EngineError> {
        if self.scheduler.has_draft_model() {
            return Ok(());
        }
        let draft = self.engine.draft_context(self.n_ctx()).ok_or(EngineError::InvalidRequest {
            field: "speculation",
            value: "draft".into(),
            reason: "the engine has no draft model (EngineConfig::draft_model, --draft-model)",
        })?;
        self.scheduler.set_draft_model(draft?);
        Ok(())
    }
}

/// A [`Session`]'s cache as bytes ([`Session::save_state`]): the tokens it holds, the LoRA
/// adapter scales they were decoded with (two sets where an activated LoRA applied from its
/// invocation on), and llama.cpp's state of them.
/// [`SessionState::to_bytes`] and [`SessionState::from_bytes`] carry it through a file, a
/// database or the network.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionState {
    pub(crate) tokens: Vec<Token>,
    /// The adapter scales, as the bits of each `f32` (so that states compare as bytes do).
    adapter_scales: Vec<u32>,
    /// Where an activated LoRA applied from, and the scales from there on (bits too).
    activation: Option<(u64, Vec<u32>)>,
    pub(crate) state: Vec<u8>,
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState").field("tokens", &self.tokens.len()).field("state_bytes", &self.state.len()).finish()
    }
}

impl SessionState {
    /// What tells these bytes from others: "exsa" and a format version.
    const MAGIC: [u8; 8] = *b"exsa\0st3";

    /// The tokens the cache held.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The LoRA adapter scales the cache was decoded with (one per adapter of the engine), before
    /// an activated LoRA applied where one did ([`SessionState::activation`]): a
    /// restored cache serves a request only where it decodes with the same scales.
    pub fn adapter_scales(&self) -> Vec<f32> {
        floats(&self.adapter_scales)
    }

    /// Where an activated LoRA applied from (the position of the token before its invocation,
    /// see [`crate::Engine::lora_invocation`]), and the scales the cache was decoded with from
    /// there on; None where no such adapter applied.
    pub fn activation(&self) -> Option<(usize, Vec<f32>)> {
        self.activation.as_ref().map(|(at, scales)| (usize::try_from(*at).unwrap_or(usize::MAX), floats(scales)))
    }

    /// The scales of each position, as the scheduler reads them.
    pub(crate) fn adapters(&self) -> AdapterPlan {
        match self.activation() {
            Some((at, scales)) => AdapterPlan::activated(self.adapter_scales(), at, scales),
            None => AdapterPlan::uniform(self.adapter_scales()),
        }
    }

    /// One buffer: a header, the token count and the tokens, the scale count and the scales,
    /// the activation's position (`u64::MAX`: none) with its scale count and scales (all
    /// little-endian), then the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (at, activated) = self.activation.as_ref().map_or((u64::MAX, &[][..]), |(at, scales)| (*at, &scales[..]));
        let words = self.tokens.len() + self.adapter_scales.len() + activated.len();
        let mut bytes = Vec::with_capacity(Self::MAGIC.len() + 32 + 4 * words + self.state.len());
        bytes.extend_from_slice(&Self::MAGIC);
        bytes.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        for token in &self.tokens {
            bytes.extend_from_slice(&token.0.to_le_bytes());
        }
        bytes.extend_from_slice(&(self.adapter_scales.len() as u64).to_le_bytes());
        for scale in &self.adapter_scales {
            bytes.extend_from_slice(&scale.to_le_bytes());
        }
        bytes.extend_from_slice(&at.to_le_bytes());
        bytes.extend_from_slice(&(activated.len() as u64).to_le_bytes());
        for scale in activated {
            bytes.extend_from_slice(&scale.to_le_bytes());
        }
        bytes.extend_from_slice(&self.state);
        bytes
    }

    /// Reads [`SessionState::to_bytes`]'s buffer back. Whether the state fits a session is
    /// checked when it is restored.
    ///
    /// # Errors
    /// [`EngineError::State`] saying what is wrong: another header (another format version
    /// too), or a buffer shorter than its token or scale counts.
    pub fn from_bytes(bytes: &[u8]) -> Result<SessionState, EngineError> {
        let fail = |why: &str| EngineError::state(crate::error::SlotFileAction::Restore, why.to_string());
        let rest = bytes.strip_prefix(&Self::MAGIC).ok_or_else(|| fail("these bytes are no session state of this exsa (another header)"))?;
        let (tokens, rest) = counted_words(rest).ok_or_else(|| fail("the bytes are shorter than their token count says"))?;
        let (scales, rest) = counted_words(rest).ok_or_else(|| fail("the bytes are shorter than their scale count says"))?;
        let (at, rest) = rest.split_first_chunk::<8>().ok_or_else(|| fail("the bytes end before the activation's position"))?;
        let (activated, state) = counted_words(rest).ok_or_else(|| fail("the bytes are shorter than their activation's scale count says"))?;
        let at = u64::from_le_bytes(*at);
        Ok(SessionState {
            tokens: tokens.map(|w| Token(w as i32)).collect(),
            adapter_scales: scales.collect(),
            activation: (at != u64::MAX).then(|| (at, activated.collect())),
            state: state.to_vec(),
        })
    }
}

impl From<crate::scheduler::SavedCache> for SessionState {
    fn from(saved: crate::scheduler::SavedCache) -> SessionState {
        let bits = |scales: &[f32]| scales.iter().map(|s| s.to_bits()).collect();
        let activation = saved.adapters.activation().map(|a| (a.at as u64, bits(&a.scales)));
        SessionState { tokens: saved.tokens, adapter_scales: bits(saved.adapters.base()), activation, state: saved.state }
    }
}

/// The `f32`s of these bits.
fn floats(bits: &[u32]) -> Vec<f32> {
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

/// A little-endian count (8 bytes) and that many 4-byte words, and the bytes after them; None
/// where the bytes end before.
fn counted_words(bytes: &[u8]) -> Option<(impl Iterator<Item = u32> + '_, &[u8])> {
    let (count, rest) = bytes.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*count)).ok()?.checked_mul(4).filter(|&n| n <= rest.len())?;
    let (words, rest) = rest.split_at(len);
    Some((words.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])), rest))
}
