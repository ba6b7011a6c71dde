//! Errors, one enum per concern, gathered into [`Error`]. Each message names the path or
//! parameter at fault; where llama.cpp explained itself in its log, its lines are kept.

use std::path::PathBuf;

use crate::Token;

/// llama.cpp's own error and warning lines, captured while a call ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlamaMessages(pub Vec<String>);

impl std::fmt::Display for LlamaMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("llama.cpp gave no reason")
        } else {
            write!(f, "llama.cpp said: {}", self.0.join(" | "))
        }
    }
}

/// Loading a model file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("model file not found: {path}")]
    NotFound { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{path} is GGUF version {version}, which llama.cpp does not read (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} is truncated: its tensors need {expected} bytes, the file has {actual}")]
    Truncated { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path} is truncated inside its header: the file ends at byte {actual} while reading {what}")]
    TruncatedHeader { path: PathBuf, actual: u64, what: String },
    #[error("{path} has a corrupt GGUF header: {detail}")]
    CorruptHeader { path: PathBuf, detail: String },
    #[error("model path {path:?} contains a NUL byte")]
    InvalidPath { path: PathBuf },
    #[error("loading {path} was cancelled by the progress callback")]
    Cancelled { path: PathBuf },
    #[error("llama.cpp could not load {path}: {messages}")]
    Llama { path: PathBuf, messages: LlamaMessages },
}

/// Creating a context, or changing its settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    #[error("invalid context parameter {name} = {value}: {reason}")]
    InvalidParam { name: &'static str, value: String, reason: &'static str },
    #[error("the model was loaded vocab-only: it has no weights to run a context on")]
    VocabOnly,
    #[error("llama.cpp could not create the context: {0}")]
    Llama(LlamaMessages),
}

/// Decoding or encoding a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("the batch is empty")]
    EmptyBatch,
    #[error("the batch holds {n_tokens} tokens, more than the context's n_batch {n_batch}")]
    BatchTooLarge { n_tokens: usize, n_batch: u32 },
    #[error("batch entry {index}: token {token} is outside the vocabulary (n_vocab {n_vocab})")]
    TokenOutOfRange { index: usize, token: Token, n_vocab: i32 },
    #[error("batch entry {index}: position {pos} is past the context (n_ctx per sequence {n_ctx})")]
    PositionOutOfRange { index: usize, pos: i32, n_ctx: u32 },
    #[error("batch entry {index}: sequence id {seq_id} is invalid for this context (n_seq_max {n_seq_max})")]
    SeqIdOutOfRange { index: usize, seq_id: i32, n_seq_max: u32 },
    #[error("no KV cache slot for the batch: the context is full (clear or shift sequences, or use a larger n_ctx)")]
    NoKvSlot,
    #[error("decoding was aborted by the abort callback")]
    Aborted,
    #[error("llama.cpp rejected the batch (code {code}): {messages}")]
    Rejected { code: i32, messages: LlamaMessages },
}

/// Reading logits or embeddings of an output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    #[error("batch entry {index} did not request an output in the last decode (outputs: {outputs:?})")]
    NotAnOutput { index: i32, outputs: Vec<i32> },
    #[error("nothing was decoded yet, or the last batch requested no outputs")]
    NoOutputs,
    #[error("the context was not created with embeddings enabled")]
    EmbeddingsDisabled,
    #[error("llama.cpp returned no data for output {index}")]
    Missing { index: i32 },
}

/// Adding to a [`crate::Batch`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    #[error("the batch is full (capacity {capacity} tokens)")]
    Full { capacity: usize },
    #[error("{given} sequence ids given, the batch holds at most {max} per token")]
    TooManySeqIds { given: usize, max: usize },
    #[error("a token must belong to at least one sequence")]
    NoSeqId,
    #[error("sequence id {0} is negative")]
    NegativeSeqId(i32),
    #[error("position {0} is negative")]
    NegativePosition(i32),
    #[error("a batch needs a capacity and n_seq_max of at least 1 (got {capacity}, {n_seq_max})")]
    ZeroSize { capacity: usize, n_seq_max: usize },
}

/// Tokenizing or detokenizing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizeError {
    #[error("the text is {len} bytes, more than llama.cpp's tokenizer takes (i32::MAX)")]
    TooLong { len: usize },
    #[error("token {token} is outside the vocabulary (n_vocab {n_vocab})")]
    InvalidToken { token: Token, n_vocab: i32 },
    #[error("llama.cpp failed to tokenize (code {0})")]
    Failed(i32),
}

/// Building a sampler chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SamplerError {
    #[error("invalid {sampler} sampler parameter {name} = {value}: {reason}")]
    InvalidParam { sampler: &'static str, name: &'static str, value: String, reason: &'static str },
    #[error("the grammar does not parse: {messages}")]
    Grammar { messages: LlamaMessages },
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("llama.cpp could not create the {0} sampler")]
    Llama(&'static str),
    #[error("batch entry {index} has no logits to sample from (outputs of the last decode: {outputs:?})")]
    NotAnOutput { index: i32, outputs: Vec<i32> },
    #[error("the sampler was built for another model than the context's")]
    WrongModel,
}

/// Saving or restoring context state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    #[error("llama.cpp could not save the state to {path}")]
    Save { path: PathBuf },
    #[error("llama.cpp could not load the state from {path}: {messages}")]
    Load { path: PathBuf, messages: LlamaMessages },
    #[error("the state holds {needed} tokens, more than the {capacity} the caller allowed")]
    TooManyTokens { needed: usize, capacity: usize },
    #[error("llama.cpp could not restore the state from {len} bytes: {messages}")]
    Restore { len: usize, messages: LlamaMessages },
    #[error("llama.cpp wrote {written} state bytes, {expected} were expected")]
    SizeMismatch { written: usize, expected: usize },
}

/// Applying a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    #[error("the model has no chat template; name one (e.g. \"chatml\", \"llama3\", \"gemma\")")]
    NoTemplate,
    #[error("chat template {0:?} is not one llama.cpp knows or could apply")]
    UnknownTemplate(String),
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("the templated chat is not valid UTF-8")]
    InvalidUtf8,
}

/// Quantizing a model file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    #[error("quantize path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    #[error(transparent)]
    Input(#[from] Box<LoadError>),
    #[error("llama.cpp could not quantize {input} to {output}: {messages}")]
    Llama { input: PathBuf, output: PathBuf, messages: LlamaMessages },
}

/// Loading or applying LoRA adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    #[error("adapter path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    #[error("adapter file not found: {0}")]
    NotFound(PathBuf),
    #[error("llama.cpp could not load the adapter {path}: {messages}")]
    Load { path: PathBuf, messages: LlamaMessages },
    #[error("llama.cpp could not apply the adapters: {0}")]
    Apply(LlamaMessages),
    #[error("an adapter was loaded for another model")]
    WrongModel,
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
