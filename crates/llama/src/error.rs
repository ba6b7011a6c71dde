//! Errors, one enum per concern, gathered into [`Error`]. Each message names the path or
//! parameter at fault; where llama.cpp explained itself in its log, its lines are kept.

use std::path::PathBuf;

use crate::token::Token;

/// llama.cpp's own error and warning lines, captured while a call ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlamaMessages(pub Vec<String>);

impl std::fmt::Display for LlamaMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() { f.write_str("llama.cpp gave no reason") } else { write!(f, "llama.cpp said: {}", self.0.join(" | ")) }
    }
}

/// A C++ exception thrown inside llama.cpp, caught at the FFI boundary by llama-sys' guards
/// instead of unwinding into Rust (which would abort the process).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("llama.cpp threw a C++ exception in {function}: {what}")]
pub struct CppException {
    /// The llama.cpp function that threw.
    pub function: &'static str,
    /// The exception's `what()` text.
    pub what: String,
}

/// Loading a model file failed: which file ([`LoadError::path`]), and why ([`LoadError::kind`]).
#[derive(Debug, thiserror::Error)]
#[error("model {}: {kind}", path.display())]
pub struct LoadError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    #[source]
    pub kind: LoadErrorKind,
}

impl LoadError {
    pub(crate) fn new(path: &std::path::Path, kind: LoadErrorKind) -> LoadError {
        LoadError { path: path.to_path_buf(), kind }
    }
}

/// Why no CPU module could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CpuVariantError {
    /// [`crate::backend_modules::CPU_VARIANT_VAR`] names a variant the folder does not have.
    #[error("EXSA_CPU_VARIANT={name}: {dir} has no such CPU variant (it has: {available})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The folder.
        dir: String,
        /// The variants it has, joined.
        available: String,
    },
    /// [`crate::backend_modules::CPU_VARIANT_VAR`] names a variant this CPU cannot run.
    #[error(
        "EXSA_CPU_VARIANT={name}: this CPU cannot run it (it lacks an instruction set the variant was built for; \
         the CPU has: {features}); variants it can run: {runnable}"
    )]
    CannotRun {
        /// The name asked for.
        name: String,
        /// The CPU's instruction sets that variants are built for, joined.
        features: String,
        /// The folder's variants this CPU runs, joined.
        runnable: String,
    },
    /// No module of the folder runs on this CPU.
    #[error("no CPU module in {dir} runs on this CPU (it has: {features}; the modules: {available})")]
    NoneRuns {
        /// The folder.
        dir: String,
        /// The CPU's instruction sets, joined.
        features: String,
        /// The variants of the folder, joined.
        available: String,
    },
    /// The chosen module did not open, or ggml did not register it.
    #[error("the CPU module {path} could not be loaded: {reason}")]
    LoadFailed {
        /// The module's file.
        path: String,
        /// Why.
        reason: String,
    },
    /// [`crate::backend_modules::CPU_VARIANT_VAR`] is set where this build does not choose
    /// among CPU variants (only x86-64 builds do).
    #[error("EXSA_CPU_VARIANT={name}: CPU variants are chosen on x86-64 only; unset it")]
    NotHere {
        /// The name asked for.
        name: String,
    },
}

/// Why a model file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadErrorKind {
    /// No file at the path.
    #[error("file not found")]
    NotFound,
    /// A dynamic-backend build found no backend module to compute with (see
    /// [`crate::backend_modules`]).
    #[error("no ggml backend module was found (searched {searched}); set EXSA_BACKEND_DIR to the folder holding libggml-cpu*")]
    NoBackend {
        /// The folders searched, joined.
        searched: String,
    },
    /// A dynamic-backend build found CPU modules but could not run one: the one
    /// [`crate::backend_modules::CPU_VARIANT_VAR`] names cannot run on this CPU, or none can.
    #[error(transparent)]
    CpuVariant(CpuVariantError),
    /// The file exists but cannot be read.
    #[error("cannot read it: {0}")]
    Io(#[source] std::io::Error),
    /// The file does not start with the GGUF magic.
    #[error("not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf {
        /// The first bytes found (fewer than 4 for a shorter file).
        magic: Vec<u8>,
    },
    /// A GGUF version llama.cpp cannot read.
    #[error("GGUF version {version}, which llama.cpp does not read (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The tensor data is cut short.
    #[error("truncated: its tensors need {expected} bytes, the file has {actual}")]
    Truncated {
        /// The size the header's tensor infos require.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// The file ends inside its header.
    #[error("truncated inside its header: the file ends at byte {actual} while reading {what}")]
    TruncatedHeader {
        /// The file's size.
        actual: u64,
        /// What was being read.
        what: String,
    },
    /// The header holds impossible values.
    #[error("corrupt GGUF header: {detail}")]
    CorruptHeader {
        /// What is impossible, and where.
        detail: String,
    },
    /// The path cannot be passed to C.
    #[error("the path contains a NUL byte")]
    InvalidPath,
    /// The progress callback returned false.
    #[error("loading was cancelled by the progress callback")]
    Cancelled,
    /// llama.cpp refused the file for a reason of its own.
    #[error("llama.cpp could not load it: {0}")]
    Llama(LlamaMessages),
    /// An rpc-server of [`ModelParams::rpc_servers`](crate::ModelParams::rpc_servers) cannot be
    /// used.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// [`ModelParams::tensor_split`](crate::ModelParams::tensor_split) is unusable.
    #[error("invalid tensor split {split:?}: {reason}")]
    TensorSplit {
        /// The split given.
        split: Vec<f32>,
        /// What is wrong with it.
        reason: String,
    },
}

/// Creating a context, or changing its settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A parameter out of range.
    #[error("invalid context parameter {name} = {value}: {reason}")]
    InvalidParam {
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The model has no weights.
    #[error("the model was loaded vocab-only: it has no weights to run a context on")]
    VocabOnly,
    /// The context's memory cannot shift positions (M-RoPE models, some recurrent ones).
    #[error("this model's memory cannot shift positions (llama_memory_can_shift is false)")]
    CannotShift,
    /// llama.cpp could not create the context.
    #[error("llama.cpp could not create the context: {0}")]
    Llama(LlamaMessages),
    /// An rpc-server holding the model's layers was lost (see [`crate::rpc`]).
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// Decoding or encoding a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Nothing to decode.
    #[error("the batch is empty")]
    EmptyBatch,
    /// More tokens than n_batch.
    #[error("the batch holds {n_tokens} tokens, more than the context's n_batch {n_batch}")]
    BatchTooLarge {
        /// Tokens in the batch.
        n_tokens: usize,
        /// The context's n_batch.
        n_batch: u32,
    },
    /// The batch must fit one micro-batch here (an encoder, a model that attends both ways),
    /// and does not: llama.cpp asserts on it.
    #[error("the batch holds {n_tokens} tokens, more than the context's n_ubatch {n_ubatch}: {why} (raise n_ubatch to n_batch)")]
    ExceedsUbatch {
        /// Tokens in the batch.
        n_tokens: usize,
        /// The context's n_ubatch.
        n_ubatch: u32,
        /// Why the batch must fit one micro-batch.
        why: &'static str,
    },
    /// A token outside the vocabulary.
    #[error("batch entry {index}: token {token} is outside the vocabulary (n_vocab {n_vocab})")]
    TokenOutOfRange {
        /// The batch entry.
        index: usize,
        /// The token.
        token: Token,
        /// Tokens in the vocabulary.
        n_vocab: i32,
    },
    /// A position past the context.
    #[error("batch entry {index}: position {pos} is past the context (n_ctx per sequence {n_ctx})")]
    PositionOutOfRange {
        /// The batch entry.
        index: usize,
        /// The position.
        pos: i32,
        /// Positions per sequence in the context.
        n_ctx: u32,
    },
    /// A sequence id the context does not have.
    #[error("batch entry {index}: sequence id {seq_id} is invalid for this context (n_seq_max {n_seq_max})")]
    SeqIdOutOfRange {
        /// The batch entry.
        index: usize,
        /// The sequence id.
        seq_id: i32,
        /// Sequences the context or batch holds.
        n_seq_max: u32,
    },
    /// The KV cache is full (llama.cpp's code 1).
    #[error("no KV cache slot for the batch: the context is full (clear or shift sequences, or use a larger n_ctx)")]
    NoKvSlot,
    /// The abort flag was set (code 2).
    #[error("decoding was aborted by the abort callback")]
    Aborted,
    /// Any other failure code.
    #[error("llama.cpp rejected the batch (code {code}): {messages}")]
    Rejected {
        /// llama.cpp's return code.
        code: i32,
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
    /// An rpc-server holding the model's layers was lost before or during this decode; its
    /// results are not to be trusted, nor any later decode's (see [`crate::rpc`]).
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// Reading logits or embeddings of an output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The entry requested no logits.
    #[error("batch entry {index} did not request an output in the last decode (outputs: {outputs:?})")]
    NotAnOutput {
        /// The batch entry.
        index: i32,
        /// The entries that did request outputs.
        outputs: Vec<i32>,
    },
    /// No decode with outputs yet.
    #[error("nothing was decoded yet, or the last batch requested no outputs")]
    NoOutputs,
    /// Embeddings were not enabled.
    #[error("the context was not created with embeddings enabled")]
    EmbeddingsDisabled,
    /// llama.cpp returned no data.
    #[error("llama.cpp returned no data for output {index}")]
    Missing {
        /// The batch entry.
        index: i32,
    },
}

/// Adding to a [`crate::Batch`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    /// The batch is at capacity.
    #[error("the batch is full (capacity {capacity} tokens)")]
    Full {
        /// The capacity.
        capacity: usize,
    },
    /// More sequence ids than the batch allocates per token.
    #[error("{given} sequence ids given, the batch holds at most {max} per token")]
    TooManySeqIds {
        /// How many were given.
        given: usize,
        /// The most allowed.
        max: usize,
    },
    /// A token without a sequence.
    #[error("a token must belong to at least one sequence")]
    NoSeqId,
    /// A negative sequence id.
    #[error("sequence id {0} is negative")]
    NegativeSeqId(i32),
    /// A negative position.
    #[error("position {0} is negative")]
    NegativePosition(i32),
    /// `start + len - 1` does not fit a position (i32).
    #[error("{len} tokens from position {start} run past the largest position (i32::MAX)")]
    PositionOverflow {
        /// The first position.
        start: i32,
        /// Tokens to add.
        len: usize,
    },
    /// A batch of no capacity.
    #[error("a batch needs a capacity and n_seq_max of at least 1 (got {capacity}, {n_seq_max})")]
    ZeroSize {
        /// The capacity.
        capacity: usize,
        /// Sequences the context or batch holds.
        n_seq_max: usize,
    },
}

/// Tokenizing or detokenizing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizeError {
    /// Text beyond llama.cpp's i32 lengths.
    #[error("the text is {len} bytes, more than llama.cpp's tokenizer takes (i32::MAX)")]
    TooLong {
        /// The length.
        len: usize,
    },
    /// A token outside the vocabulary.
    #[error("token {token} is outside the vocabulary (n_vocab {n_vocab})")]
    InvalidToken {
        /// The token.
        token: Token,
        /// Tokens in the vocabulary.
        n_vocab: i32,
    },
    /// llama.cpp's tokenizer failed.
    #[error("llama.cpp failed to tokenize (code {0})")]
    Failed(i32),
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
}

/// Building a sampler chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SamplerError {
    /// A sampling parameter out of range.
    #[error("invalid {sampler} sampler parameter {name} = {value}: {reason}")]
    InvalidParam {
        /// The sampler.
        sampler: &'static str,
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The GBNF grammar does not parse.
    #[error("the grammar does not parse: {messages}")]
    Grammar {
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// A string with a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// llama.cpp returned no sampler.
    #[error("llama.cpp could not create the {0} sampler")]
    Llama(&'static str),
    /// The context has no logits for the entry asked for.
    #[error("no logits to sample from: {0}")]
    Output(#[from] OutputError),
    /// Sampler and context belong to different models.
    #[error("the sampler was built for another model than the context's")]
    WrongModel,
    /// The chain's last stage does not pick a token.
    #[error("a sampler chain must end with greedy, dist, mirostat or mirostat-v2 (it ends with {})", last.unwrap_or("nothing: it is empty"))]
    NoSelector {
        /// The last stage, if any.
        last: Option<&'static str>,
    },
    /// The chain ended without choosing a token, for instance because every logit was NaN
    /// and no candidate was left (a chain whose last stage picks no token is refused when built:
    /// `NoSelector`).
    #[error("the sampler chain selected no token from {candidates} candidates (were the logits NaN?)")]
    NothingSelected {
        /// The candidates left when the chain finished.
        candidates: usize,
    },
    /// Every candidate was ruled out (logit -inf), e.g. by a grammar that accepts none of the
    /// top k, and the selector picked one anyway: accepting it would break the grammar.
    #[error("every one of the {candidates} candidates was ruled out (a grammar or bias left no token); widen top-k or fix the grammar")]
    AllRuledOut {
        /// The candidates the chain saw.
        candidates: usize,
    },
    /// A grammar stage of the chain cannot take this token now.
    #[error("token {token} does not fit the chain's grammar here")]
    GrammarRejects {
        /// The token.
        token: Token,
    },
    /// llama.cpp threw inside this chain before, which may have left its state (a grammar's
    /// stacks) broken; [`crate::Sampler::reset`] makes it usable again.
    #[error("the sampler is unusable after an exception inside llama.cpp; reset it")]
    Poisoned,
    /// A token passed to [`crate::Sampler::accept`] is not in the vocabulary.
    #[error("token {token} is outside the vocabulary (n_vocab {n_vocab})")]
    TokenOutOfRange {
        /// The token.
        token: Token,
        /// The vocabulary size.
        n_vocab: i32,
    },
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
}

/// Saving or restoring context state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The path cannot be passed to C.
    #[error("state path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    /// Saving failed.
    #[error("llama.cpp could not save the state to {path}")]
    Save {
        /// The file at fault.
        path: PathBuf,
    },
    /// Loading failed.
    #[error("llama.cpp could not load the state from {path}: {messages}")]
    Load {
        /// The file at fault.
        path: PathBuf,
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// The state holds more tokens than allowed.
    #[error("the state holds {needed} tokens, more than the {capacity} the caller allowed")]
    TooManyTokens {
        /// How many are needed.
        needed: usize,
        /// The capacity.
        capacity: usize,
    },
    /// The bytes are not a state of this context.
    #[error("llama.cpp could not restore the state from {len} bytes: {messages}")]
    Restore {
        /// The length.
        len: usize,
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// llama.cpp wrote another size than it announced.
    #[error("llama.cpp wrote {written} state bytes, {expected} were expected")]
    SizeMismatch {
        /// Bytes written.
        written: usize,
        /// What was expected.
        expected: usize,
    },
    /// llama.cpp reported a state of size 0: there is nothing to save or restore from.
    #[error("llama.cpp reported an empty state (size 0)")]
    Empty,
    /// The bytes hold a state followed by more: not what a save wrote.
    #[error("the state is {len} bytes, but llama.cpp read only {read} of them: trailing bytes")]
    TrailingBytes {
        /// The length given.
        len: usize,
        /// What llama.cpp read.
        read: usize,
    },
    /// The sequence id is not one of this context's.
    #[error("sequence id {seq_id} is not a sequence of this context (n_seq_max {n_seq_max})")]
    InvalidSeqId {
        /// The id.
        seq_id: i32,
        /// The context's sequences.
        n_seq_max: u32,
    },
    /// A recurrent checkpoint was asked of a model whose memory has no recurrent state.
    #[error("the model has no recurrent state to checkpoint (attention-only memory can be cut back instead)")]
    NotRecurrent,
    /// A recurrent checkpoint made by another context.
    #[error("the recurrent checkpoint was made by another context")]
    ForeignCheckpoint,
    /// A recurrent checkpoint beyond what the sequence holds now.
    #[error("the recurrent checkpoint covers {positions} positions, but the sequence holds only {held}")]
    CheckpointAhead {
        /// The checkpoint's positions.
        positions: i32,
        /// What the sequence holds.
        held: i32,
    },
    /// llama.cpp would not drop the attention cells after a restored checkpoint.
    #[error("llama.cpp would not cut the sequence back to the checkpoint's {positions} positions; the sequence was emptied")]
    CheckpointCut {
        /// The checkpoint's positions.
        positions: i32,
    },
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
}

/// Applying a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// No template given and none in the model.
    #[error("the model has no chat template; name one (e.g. \"chatml\", \"llama3\", \"gemma\")")]
    NoTemplate,
    /// A template llama.cpp cannot apply.
    #[error("chat template {0:?} is not one llama.cpp knows or could apply")]
    UnknownTemplate(String),
    /// A string with a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// The output is not UTF-8.
    #[error("the templated chat is not valid UTF-8")]
    InvalidUtf8,
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
}

/// Quantizing a model file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    /// The path cannot be passed to C.
    #[error("quantize path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    /// The output is the input (maybe through a link): llama.cpp would truncate the file it
    /// is reading.
    #[error("the quantize output {output} is the input file itself")]
    SameFile {
        /// The output path given.
        output: PathBuf,
    },
    /// The input is not a loadable model.
    #[error(transparent)]
    Input(#[from] Box<LoadError>),
    /// llama.cpp's quantizer failed.
    #[error("llama.cpp could not quantize {input} to {output}: {messages}")]
    Llama {
        /// The input model.
        input: PathBuf,
        /// The output path.
        output: PathBuf,
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// The quantized model was written beside the output but could not be moved into place.
    #[error("cannot move the quantized model {partial} to {output}: {source}")]
    Rename {
        /// Where the finished model was written.
        partial: PathBuf,
        /// The output path.
        output: PathBuf,
        /// Why the rename failed.
        source: std::io::Error,
    },
}

/// Loading or applying LoRA adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The path cannot be passed to C.
    #[error("adapter path {0:?} contains a NUL byte")]
    InvalidPath(PathBuf),
    /// The adapter file does not exist.
    #[error("adapter file not found: {0}")]
    NotFound(PathBuf),
    /// llama.cpp could not load the adapter.
    #[error("llama.cpp could not load the adapter {path}: {messages}")]
    Load {
        /// The file at fault.
        path: PathBuf,
        /// llama.cpp's own warning and error lines from the call.
        messages: LlamaMessages,
    },
    /// llama.cpp could not apply the adapters.
    #[error("llama.cpp could not apply the adapters: {0}")]
    Apply(LlamaMessages),
    /// The adapter belongs to another model.
    #[error("an adapter was loaded for another model")]
    WrongModel,
    /// llama.cpp threw a C++ exception (caught at the boundary).
    #[error(transparent)]
    Exception(#[from] CppException),
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A load error.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A context error.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A decode error.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A output error.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A batch error.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// A tokenize error.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// A sampler error.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A state error.
    #[error(transparent)]
    State(#[from] StateError),
    /// A chat error.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// A quantize error.
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// A lora error.
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an RPC call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RpcError {
    /// The endpoint is not `HOST:PORT`.
    #[error("{endpoint:?} is not HOST:PORT (a host name or address, and a port 1-65535)")]
    BadEndpoint {
        /// The endpoint given.
        endpoint: String,
    },
    /// This build has no RPC backend (llama-sys' `rpc` switch is off).
    #[error("this build has no RPC backend (llama-sys was built with LLAMA_SYS_RPC=off)")]
    Unavailable,
    /// ggml could not connect, greet or serve; its message says why.
    #[error("rpc-server {endpoint}: {message}")]
    Ggml {
        /// The server's endpoint.
        endpoint: String,
        /// ggml's reason, without its source location.
        message: String,
    },
    /// Nothing answered at the endpoint within [`crate::rpc::CONNECT_TIMEOUT`] (or the name does not
    /// resolve): checked before ggml connects, which would wait for the system's own timeout.
    #[error("rpc-server {endpoint}: cannot connect: {reason}")]
    Unreachable {
        /// The server's endpoint.
        endpoint: String,
        /// What the system said, or that the time ran out.
        reason: String,
    },
    /// The cache directory's path is not valid for C.
    #[error("the cache directory {0:?} contains a NUL byte")]
    BadCacheDir(String),
    /// The connection to a server the model was loaded over failed after loading: the server
    /// stopped, crashed or cannot be reached, and the model's layers there are gone.
    #[error("lost the rpc-server {endpoint} (it closed the connection or stopped answering); load the model again once it is back")]
    Lost {
        /// The server's endpoint.
        endpoint: String,
    },
}
