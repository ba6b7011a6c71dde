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
    #[error("invalid request: {field} = {value}: {reason}")]
    InvalidRequest { field: &'static str, value: String, reason: &'static str },
    #[error("invalid engine configuration: {field} = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: &'static str },
    #[error("the prompt is {prompt_tokens} tokens, but the context holds {n_ctx}")]
    PromptTooLong { prompt_tokens: usize, n_ctx: u32 },
    #[error("the text to embed is {tokens} tokens, more than one batch ({n_batch}) pools; raise n_batch or split the text")]
    EmbedTooLong { tokens: usize, n_batch: u32 },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("could not load the model {path}: {source}")]
    Load { path: PathBuf, source: Cause },
    /// An rpc-server could not be served or reached, or was lost while it held the model's layers.
    #[error("rpc: {0}")]
    Rpc(#[source] Cause),
    /// The draft model cannot draft for the main one (another vocabulary).
    #[error("the draft model {path} does not fit the main model: {reason}")]
    DraftModel { path: PathBuf, reason: String },
    #[error("could not create a session: {0}")]
    Session(#[source] Cause),
    #[error("tokenizer: {0}")]
    Tokenize(#[source] Cause),
    #[error("chat template: {0}")]
    ChatTemplate(#[source] Cause),
    /// A chat the model's Jinja template could not render (a bad tool, a `tool_choice` naming no
    /// tool, a template that fails on these messages), or a template that does not parse:
    /// `field` names the request field at fault.
    #[error("{field}: {source}")]
    Chat { field: &'static str, source: Cause },
    #[error("decode failed ({kind}): {source}")]
    Decode { kind: DecodeFailure, source: Cause },
    #[error("sampler: {0}")]
    Sampler(#[source] Cause),
    /// The grammar a request asked for does not parse (or is too large).
    #[error("grammar: {0}")]
    Grammar(#[source] Cause),
    #[error("the request was cancelled")]
    Cancelled,
    #[error("backend {backend} does not support {what}")]
    Unsupported { what: &'static str, backend: &'static str },
    /// A sequence's cache could not be written to or read from a state file (a server's slot
    /// save and restore): the file is not a state of this model and context, holds more tokens
    /// than the context, the cache has no room for it, or the file system failed.
    #[error("could not {action} the slot state file {path}: {source}")]
    SlotFile { action: SlotFileAction, path: PathBuf, source: Cause },
}

/// What was being done with a slot state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotFileAction {
    Save,
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

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
