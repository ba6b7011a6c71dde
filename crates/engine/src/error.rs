//! The engine's errors: one enum whose variants say which step failed, in a form a caller (the
//! server, mapping them to HTTP statuses) can match on, with the binding's own error kept as the
//! `source` so that the chain reaches the root cause.

use std::path::PathBuf;
use std::sync::Arc;

/// The underlying error of a failed step: the backend binding's own error (`llama`'s,
/// `llama-cpp-2`'s) or, for the raw backend, a description of the failed call. Shared, so that an
/// error that ends several requests at once (a failed batch, a lost rpc-server) reaches each of
/// them as itself, not flattened to its message.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A [`Cause`] from an error or a message.
pub(crate) fn cause(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Cause {
    Arc::from(e.into())
}

/// Why a decode failed, for callers that act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeFailure {
    /// The KV cache has no room for the batch: a shorter prompt, fewer parallel sequences or a
    /// larger context helps; retrying the same request does not.
    NoKvSlot,
    /// The batch was refused before it reached llama.cpp (too large, bad tokens or positions):
    /// the request or configuration is at fault.
    InvalidBatch,
    /// llama.cpp failed on a valid batch (an error code, a C++ exception): an internal error.
    Internal,
    /// The step needs the output of a decode, and the last decode produced none.
    NoOutput,
}

impl std::fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecodeFailure::NoKvSlot => "no KV cache slot",
            DecodeFailure::InvalidBatch => "invalid batch",
            DecodeFailure::Internal => "llama.cpp failed",
            DecodeFailure::NoOutput => "no output to read",
        })
    }
}

/// An engine failure. The message says which step failed and why; [`std::error::Error::source`]
/// gives the binding's error where there is one. Cloning shares the cause.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A request's parameter is out of range or cannot be served: the request is at fault.
    #[error("invalid request: {field} = {value}: {reason}")]
    InvalidRequest {
        /// The parameter at fault (`temperature`, `max_tokens`, ...).
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An engine or session parameter is out of range.
    #[error("invalid engine configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The parameter at fault (`n_ctx`, `n_ubatch`, ...).
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The prompt (with the tokens to generate, where they must fit too) does not fit the
    /// context.
    #[error("the prompt is {prompt_tokens} tokens, but the context holds {n_ctx}")]
    PromptTooLong {
        /// The tokens that had to fit.
        prompt_tokens: usize,
        /// The context's size in tokens.
        n_ctx: u32,
    },
    /// A text to embed (or a reranking pair) is longer than one batch, over which its pooling
    /// runs.
    #[error("the text to embed is too large: {tokens} tokens, more than one batch ({n_batch}) pools; raise n_batch or split the text")]
    EmbedTooLong {
        /// The text's length in tokens.
        tokens: usize,
        /// The session's batch size ([`crate::SessionConfig::n_batch`]).
        n_batch: u32,
    },
    /// The prompt (or a text to embed) has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The model file could not be loaded (missing, not a model, or refused by llama.cpp), or its
    /// load was cancelled by [`crate::LoadOptions::progress`] (the message says so).
    #[error("could not load the model {path}: {source}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// Why it could not be loaded.
        source: Cause,
    },
    /// A LoRA adapter of [`crate::EngineConfig::lora`] could not be loaded: the file is missing,
    /// is not a LoRA adapter, or was made for another model (another architecture or shape).
    #[error("could not load the LoRA adapter {path}: {source}")]
    Lora {
        /// The adapter's file.
        path: PathBuf,
        /// Why it could not be loaded.
        source: Cause,
    },
    /// An rpc-server could not be served or reached, or was lost while it held the model's layers.
    #[error("rpc: {0}")]
    Rpc(#[source] Cause),
    /// The draft model cannot draft for the main one (another vocabulary).
    #[error("the draft model {path} does not fit the main model: {reason}")]
    DraftModel {
        /// The draft model's file.
        path: PathBuf,
        /// How it differs from the main model.
        reason: String,
    },
    /// A session (a llama.cpp context, or the decode thread that owns one) could not be created.
    #[error("could not create a session: {0}")]
    Session(#[source] Cause),
    /// Text could not be tokenized, or a token turned into text (a token outside the vocabulary,
    /// say).
    #[error("tokenizer: {0}")]
    Tokenize(#[source] Cause),
    /// A chat could not be formatted with llama.cpp's built-in chat formats.
    #[error("chat template: {0}")]
    ChatTemplate(#[source] Cause),
    /// A chat the model's Jinja template could not render (a bad tool, a `tool_choice` naming no
    /// tool, a template that fails on these messages), or a template that does not parse:
    /// `field` names the request field at fault.
    #[error("{field}: {source}")]
    Chat {
        /// The request field at fault (`tools`, `messages`, `chat_template`, ...).
        field: &'static str,
        /// The chat layer's error.
        source: Cause,
    },
    /// A decode failed; [`EngineError::decode_failure`] says how.
    #[error("decode failed ({kind}): {source}")]
    Decode {
        /// Why it failed, for callers that act on it.
        kind: DecodeFailure,
        /// The binding's error.
        source: Cause,
    },
    /// A sampler chain could not be made, or could not draw a token.
    #[error("sampler: {0}")]
    Sampler(#[source] Cause),
    /// The grammar a request asked for does not parse (or is too large).
    #[error("grammar: {0}")]
    Grammar(#[source] Cause),
    /// A JSON schema given to [`crate::SamplingParams::json_schema`] cannot be made into a
    /// grammar: a keyword that would constrain the output but is not understood, or a bad value.
    /// The [`SchemaError`](crate::json_grammar::SchemaError) names where in the schema.
    #[error("json_schema: {0}")]
    JsonSchema(#[source] crate::json_grammar::SchemaError),
    /// The generation was cancelled: by its [`crate::CancelToken`], or by a server that stopped
    /// under it.
    #[error("the request was cancelled")]
    Cancelled,
    /// A feature this build's backend does not have.
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// The feature asked for.
        what: &'static str,
        /// The backend's name (`source`, `crate` or `raw`).
        backend: &'static str,
    },
    /// A sequence's cache could not be written to or read from a state file (a server's slot
    /// save and restore): the file is not a state of this model and context, holds more tokens
    /// than the context, the cache has no room for it, or the file system failed.
    #[error("could not {action} the slot state file {path}: {source}")]
    SlotFile {
        /// Whether the state was being saved or restored.
        action: SlotFileAction,
        /// The state file.
        path: PathBuf,
        /// What failed.
        source: Cause,
    },
    /// A session's state could not be saved as bytes or restored from them (bytes that are no
    /// state of this model and context, more tokens than the context holds).
    #[error("could not {action} the session state: {source}")]
    State {
        /// Saving or restoring.
        action: SlotFileAction,
        /// Why.
        source: Cause,
    },
    /// A decode loop did not take the request: its queue is full, or it is stopping.
    #[error("the request was not accepted: {0}")]
    NotAccepted(#[from] SubmitError),
}

/// Why a decode loop ([`crate::serving::ServingCore`]) did not accept a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubmitError {
    /// [`crate::serving::ServingConfig::max_queue`] requests wait already: retry later.
    #[error("the queue is full ({capacity} requests wait already); retry later")]
    QueueFull {
        /// The queue's bound.
        capacity: usize,
    },
    /// The core is stopping: it takes no more requests.
    #[error("the server is shutting down")]
    Stopped,
    /// The request was prepared ([`crate::serving::ServeRequest::new`]) for another engine than the core's.
    #[error("the request was prepared for another model")]
    OtherEngine,
}

/// What was being done with a slot state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotFileAction {
    /// Writing a sequence's cache to the file.
    Save,
    /// Reading the file into a sequence's cache.
    Restore,
}

impl std::fmt::Display for SlotFileAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotFileAction::Save => "save",
            SlotFileAction::Restore => "restore",
        })
    }
}

impl EngineError {
    /// A decode failure of `kind`.
    pub(crate) fn decode(kind: DecodeFailure, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> EngineError {
        EngineError::Decode { kind, source: cause(source) }
    }

    /// A load failure of `path`.
    pub(crate) fn load(path: &std::path::Path, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> EngineError {
        EngineError::Load { path: path.to_path_buf(), source: cause(source) }
    }

    /// The load of `path` cancelled by its progress callback (backends whose binding does not say
    /// so itself).
    #[cfg(any(feature = "crate", feature = "raw"))]
    pub(crate) fn load_cancelled(path: &std::path::Path) -> EngineError {
        EngineError::load(path, "loading was cancelled by the progress callback")
    }

    /// A LoRA adapter load failure of `path`.
    pub(crate) fn lora(path: &std::path::Path, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> EngineError {
        EngineError::Lora { path: path.to_path_buf(), source: cause(source) }
    }

    /// A failure to save or restore a session state as bytes.
    pub(crate) fn state(action: SlotFileAction, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> EngineError {
        EngineError::State { action, source: cause(source) }
    }

    /// A slot state file failure.
    pub(crate) fn slot_file(
        action: SlotFileAction,
        path: &std::path::Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> EngineError {
        EngineError::SlotFile { action, path: path.to_path_buf(), source: cause(source) }
    }

    /// A request for a slot the decode loop does not have (`id_slot`, a slot action).
    pub(crate) fn no_such_slot(slot: usize) -> EngineError {
        EngineError::InvalidRequest {
            field: "id_slot",
            value: slot.to_string(),
            reason: "no such slot (slots are numbered from 0 to --parallel - 1)",
        }
    }

    /// The decode failure's kind, if this is one.
    pub fn decode_failure(&self) -> Option<DecodeFailure> {
        match self {
            EngineError::Decode { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A result whose error is an [`EngineError`] unless another is given.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
