//! The narrow interface the engine needs from llama.cpp, implemented once per backend:
//!
//! - `source`: our build (crates/llama over llama-sys): Option B;
//! - `crate`: the `llama-cpp-2` crate with its default features: Option A, the baseline;
//! - `raw`: our build through raw llama-sys calls, to make the safe wrapper's cost visible.
//!
//! Exactly one is compiled into a build: each links all of llama.cpp's symbols, and two
//! copies of them must never meet in one binary.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::config::{EngineConfig, SamplingParams, SessionConfig};
use crate::error::EngineError;
pub use crate::token::Token;

#[cfg(any(all(feature = "source", feature = "crate"), all(feature = "source", feature = "raw"), all(feature = "crate", feature = "raw")))]
compile_error!(
    "exsa-engine: enable exactly one backend feature: `source`, `crate` or `raw` \
     (e.g. --no-default-features --features crate); each links its own copy of llama.cpp"
);
#[cfg(not(any(feature = "source", feature = "crate", feature = "raw")))]
compile_error!("exsa-engine: enable one backend feature: `source` (default), `crate` or `raw`");

#[cfg(feature = "crate")]
mod crate_backend;
#[cfg(feature = "raw")]
mod raw;
#[cfg(feature = "source")]
mod source;

#[cfg(feature = "crate")]
pub use crate_backend::CrateBackend as Active;
#[cfg(feature = "raw")]
pub use raw::RawBackend as Active;
#[cfg(feature = "source")]
pub use source::SourceBackend as Active;

/// Which outputs a decode should produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// Logits of the last token only (prompt processing, generation).
    Last,
    /// No logits at all (filling the cache).
    None,
}

pub use crate::info::{BuildInfo, ModelInfo};

/// A llama.cpp backend.
pub trait Backend: 'static {
    /// "source", "crate" or "raw".
    const NAME: &'static str;
    /// The backend's loaded model.
    type Model: BackendModel;

    /// Loads `config.model` with `config.placement`'s layer offload (and rpc-servers, where the
    /// backend can), read as `config.load` says, and then `config.lora`'s adapters, which every
    /// session of the model applies (the rest of the configuration is the engine's).
    ///
    /// # Errors
    ///
    /// [`EngineError::Load`] when the model cannot be loaded or the progress callback cancelled
    /// it, [`EngineError::Lora`] naming an adapter that cannot be loaded for it,
    /// [`EngineError::InvalidConfig`] for a LoRA scale that is not finite,
    /// [`EngineError::Unsupported`] for what the backend cannot do (rpc-servers on `crate` and
    /// `raw`, several adapters on `crate`).
    fn load(config: &EngineConfig) -> Result<Self::Model, EngineError>;

    /// What was compiled (llama.cpp's tree, flags, compiler).
    fn build_info() -> BuildInfo;

    /// Serves this process's devices to other processes' models as a ggml rpc-server on
    /// `endpoint` (`HOST:PORT`) until the process ends; returns only on failure.
    fn serve_rpc(endpoint: &str, cache_dir: Option<&Path>, threads: usize) -> EngineError {
        let _ = (endpoint, cache_dir, threads);
        EngineError::Unsupported { what: "serving as an rpc-server (use backend source)", backend: Self::NAME }
    }

    /// ggml's system-info line.
    fn system_info() -> String;

    /// The lowest level of llama.cpp's own log lines that reach `tracing` (target `llama_cpp`,
    /// or `llama-cpp-2` for the crate baseline, which forwards all of them).
    fn set_llama_log_level(level: LogLevel) {
        let _ = level;
    }
}

/// How much of llama.cpp's log the engine forwards (`exsa --log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Every line, debug output included.
    Debug,
    /// Information, warnings and errors.
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Nothing.
    Off,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "debug" | "trace" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            "off" | "none" => Ok(LogLevel::Off),
            other => Err(format!("{other:?} is not a log level (debug, info, warn, error, off)")),
        }
    }
}

/// A loaded model: tokenizer, templates, and a factory for sessions.
pub trait BackendModel: Send + Sync + Sized {
    /// The model's session: a context that borrows the model.
    type Session<'m>: BackendSession
    where
        Self: 'm;

    /// What the model is (file, architecture, sizes), as reports and `/v1/models` show it.
    fn info(&self) -> ModelInfo;
    /// Tokenizes `text` into `out`, replacing what it held: `add_special` adds BOS (and EOS) where
    /// the model wants them, `parse_special` turns control-token text into control tokens.
    ///
    /// # Errors
    ///
    /// [`EngineError::Tokenize`] when the text cannot be tokenized.
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool, out: &mut Vec<Token>) -> Result<(), EngineError>;
    /// Appends the bytes of a token's text; special tokens render as empty unless `special`
    /// (a chat format's tool-call markers, which its parser reads).
    fn piece(&self, token: Token, special: bool, out: &mut Vec<u8>) -> Result<(), EngineError>;
    /// Whether `token` ends a generation (EOS, EOT and the model's other end tokens).
    fn is_eog(&self, token: Token) -> bool;
    /// The vocabulary's beginning-of-sequence token.
    fn bos(&self) -> Token;
    /// Number of tokens in the vocabulary.
    fn n_vocab(&self) -> i32;
    /// The vocabulary's fill-in-the-middle tokens.
    fn fim_tokens(&self) -> crate::FimTokens;
    /// A metadata value of the model's file, as text (`general.name`, `<arch>.pooling_type`).
    fn meta(&self, key: &str) -> Option<String>;
    /// A metadata value of the file of LoRA adapter `adapter` ([`EngineConfig::lora`]'s index),
    /// as text; None where the backend cannot read it (`crate`).
    fn adapter_meta(&self, adapter: usize, key: &str) -> Option<String>;
    /// The invocation tokens of adapter `adapter` where it is an activated LoRA (aLoRA: meant
    /// to apply only from where they occur in the prompt on); empty for a plain adapter, and
    /// where the backend cannot read them (`crate`).
    fn adapter_invocation(&self, adapter: usize) -> &[Token];
    /// A named template of the model's file (`tokenizer.chat_template.<name>`: a reranker's
    /// `rerank` prompt, with `{query}` and `{document}`).
    fn named_template(&self, name: &str) -> Option<String>;
    /// The special tokens around the two texts of a pair.
    fn pair_tokens(&self) -> crate::token::PairTokens;
    /// The model's own chat template, if its file has one.
    fn chat_template(&self) -> Option<String>;
    /// Formats messages with a template text or a llama.cpp built-in template name.
    fn apply_chat_template(&self, template: &str, messages: &[(String, String)]) -> Result<String, EngineError>;
    /// A sampler chain for `params` (biases in the vocabulary and a grammar that parses checked;
    /// [`EngineError::Unsupported`] for what the backend cannot sample), for one sequence of
    /// this model's sessions. Built apart from any session, so that a server builds it before a
    /// request is accepted, off the decode loop.
    fn sampler(&self, params: &SamplingParams) -> Result<SamplerOf<'_, Self>, EngineError>;
    /// [`EngineError::Rpc`] once an rpc-server holding the model's layers was lost (the model
    /// cannot compute any more); Ok for a model without servers.
    fn check_servers(&self) -> Result<(), EngineError> {
        Ok(())
    }
    /// A new session (context) of this model with `config`'s parameters, the model's LoRA
    /// adapters applied with their scales (or `config.lora_scales`).
    ///
    /// # Errors
    ///
    /// [`EngineError::Session`] when the context (or its batch) cannot be created or the adapters
    /// cannot be applied, [`EngineError::InvalidConfig`] for `lora_scales` of another length than
    /// the adapters, [`EngineError::Rpc`] when an rpc-server holding the model's layers is lost,
    /// [`EngineError::Unsupported`] for a setting the backend lacks (rank pooling on `crate`).
    fn session(&self, config: &SessionConfig) -> Result<Self::Session<'_>, EngineError>;
}

/// The sampler type of a model's sessions.
pub type SamplerOf<'m, M> = <<M as BackendModel>::Session<'m> as BackendSession>::Sampler;

/// The recurrent checkpoint type of a model's sessions.
pub type CheckpointOf<'m, M> = <<M as BackendModel>::Session<'m> as BackendSession>::Checkpoint;

/// A context with its KV cache and a reusable batch. One or several sequences (a server's slots,
/// made with `n_seq_max` > 1); samplers are the caller's, one per sequence, reading outputs by batch
/// index.
pub trait BackendSession {
    /// A sampler chain of its own, for one sequence (see [`BackendModel::sampler`]).
    type Sampler: Send;
    /// A recurrent checkpoint of one of its sequences (see [`BackendSession::seq_checkpoint`]).
    type Checkpoint: Clone + Send;

    /// The context's size in tokens.
    fn n_ctx(&self) -> u32;
    /// The most tokens one decode takes (the context's batch size).
    fn n_batch(&self) -> u32;
    /// Writes `tokens` at positions `start..` of sequence 0 into the session's batch (at most
    /// n_batch of them), without decoding: `decode` is `fill` and then the model run.
    fn fill(&mut self, tokens: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError>;
    /// Decodes `tokens` at positions `start..` in sequence 0 (at most n_batch of them); with
    /// [`Outputs::Last`], the last token's logits are at batch index `tokens.len() - 1`.
    fn decode(&mut self, tokens: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError>;
    /// The logits (n_vocab wide) of the last output of the last decode.
    fn last_logits(&self) -> Result<&[f32], EngineError>;
    /// Cancels a running decode while the flag is set.
    fn set_abort_flag(&mut self, flag: Arc<AtomicBool>);
    /// Waits until the last decode has finished computing (GPU and RPC backends return before
    /// it has; reading logits waits anyway). For timing decodes.
    fn synchronize(&self);
    /// Sequence `seq`'s pooled embedding from the last decode (sessions built with `embeddings`,
    /// pooled as their config says; a rank-pooled one is the classification head's output).
    fn sequence_embedding(&self, seq: i32) -> Result<Vec<f32>, EngineError>;
    /// The embedding of the batch's token at `index` (an output of the last decode) in a
    /// context that pools none.
    fn token_embedding(&self, index: i32) -> Result<Vec<f32>, EngineError>;
    /// Empties the batch (keeping its allocation).
    fn batch_clear(&mut self);
    /// Appends `token` at `pos` of sequence `seq`; `output` asks for its logits, which
    /// [`BackendSession::sample_with`] then reads at this entry's index (the batch length before
    /// the call).
    fn batch_push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Result<(), EngineError>;
    /// Entries in the batch.
    fn batch_len(&self) -> usize;
    /// Decodes the batch built with `batch_push`.
    fn batch_decode(&mut self) -> Result<(), EngineError>;
    /// Samples with `sampler` from the output at batch `index` of the last decode, and accepts
    /// the token into that sampler.
    fn sample_with(&mut self, sampler: &mut Self::Sampler, index: i32) -> Result<Token, EngineError>;
    /// [`BackendSession::sample_with`], also listing what the sampler drew from: the drawn
    /// token's probability after the chain's cuts and temperature, and the `n` likeliest
    /// candidates the chain left, as natural logarithms (see
    /// [`crate::GenerateOptions::post_sampling`]). [`EngineError::Unsupported`] where the
    /// binding cannot see the chain's candidates.
    fn sample_listing(&mut self, sampler: &mut Self::Sampler, index: i32, n: usize) -> Result<crate::TokenLogprobs, EngineError>;
    /// The logits at batch `index` of the last decode.
    fn logits_at(&self, index: i32) -> Result<&[f32], EngineError>;
    /// Drops positions `from..` of sequence `seq`; false if the memory cannot (recurrent state).
    fn seq_truncate(&mut self, seq: i32, from: i32) -> bool;
    /// Empties sequence `seq`.
    fn seq_clear(&mut self, seq: i32);
    /// Makes empty sequence `dst` hold all that sequence `src` holds (in a unified KV cache the
    /// cells are shared, not duplicated); false where the backend cannot.
    fn seq_copy(&mut self, src: i32, dst: i32) -> bool;
    /// Whether the model's memory holds a recurrent state (LFM2's convolutions, Mamba's SSM),
    /// which cannot be cut back to an earlier position.
    fn memory_is_recurrent(&self) -> bool;
    /// How many tokens of its last decode a sequence can drop (a speculative round's rejected
    /// drafts): None for no bound (attention memory), Some(0) where a recurrent state cannot be
    /// cut back at all, Some(n) with n recurrent snapshots ([`crate::SessionConfig::recurrent_snapshots`]).
    fn rollback_limit(&self) -> Option<usize> {
        self.memory_is_recurrent().then_some(0)
    }
    /// The recurrent part of sequence `seq`'s memory as it stands, with its size in bytes: a
    /// checkpoint to return the sequence to once it has gone on. None where the memory has no
    /// recurrent state (attention is cut back instead) or the binding cannot save one.
    fn seq_checkpoint(&mut self, seq: i32) -> Option<(Self::Checkpoint, usize)>;
    /// Whether [`BackendSession::seq_checkpoint`] can give checkpoints here (a recurrent state,
    /// and a binding that saves one).
    fn keeps_checkpoints(&self) -> bool {
        false
    }
    /// Returns sequence `seq`, which still holds the tokens it held when `checkpoint` was taken
    /// and maybe more, to that point: the recurrent state from the checkpoint, the attention cut
    /// there. False when that failed; the sequence is then empty.
    fn seq_restore_checkpoint(&mut self, seq: i32, checkpoint: &Self::Checkpoint) -> bool;
    /// Writes sequence `seq`'s cache and the `tokens` it holds to `path`, in llama.cpp's sequence
    /// state format (the one `llama_state_seq_save_file` writes, which llama-server's slot files
    /// also use); returns the bytes written.
    fn seq_save_file(&mut self, seq: i32, path: &Path, tokens: &[Token]) -> Result<u64, EngineError>;
    /// Loads a sequence state file into empty sequence `seq`; returns the tokens it holds (a file
    /// of more than `max_tokens` is refused). On failure the sequence may hold part of the file:
    /// the caller empties it.
    fn seq_load_file(&mut self, seq: i32, path: &Path, max_tokens: usize) -> Result<Vec<Token>, EngineError>;
    /// Applies the model's LoRA adapters with `scales`, one per adapter in their order (0.0
    /// leaves one out), to every decode from now on, replacing the scales applied before. The
    /// caller passes one scale per adapter.
    fn set_adapter_scales(&mut self, scales: &[f32]) -> Result<(), EngineError>;
    /// Sequence `seq`'s cache (attention cells, recurrent state) as bytes, for
    /// [`BackendSession::seq_load_state`] of a context of the same model.
    fn seq_state(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
        let _ = seq;
        Err(states_as_bytes_unsupported())
    }
    /// Loads bytes of [`BackendSession::seq_state`] into empty sequence `seq`; returns how many
    /// positions the sequence then holds (the caller checks them against the token list saved
    /// beside the state). Bytes that are no state of this model and context, or of another
    /// length, are an error, never read past. On failure the sequence may hold part of it: the
    /// caller empties it.
    fn seq_load_state(&mut self, seq: i32, state: &[u8]) -> Result<usize, EngineError> {
        let _ = (seq, state);
        Err(states_as_bytes_unsupported())
    }
}

/// Sessions as bytes need llama.cpp's state reader behind a C++ exception guard (a damaged
/// state throws): backends `source` and `raw` read through llama-sys' shim, which has one;
/// llama-cpp-2 has none (it restores only the states it made).
fn states_as_bytes_unsupported() -> EngineError {
    EngineError::Unsupported {
        what: "session states as bytes (backends source and raw; state files work on every backend)",
        backend: <Active as Backend>::NAME,
    }
}

/// The adapters a session applies, with their scales: those whose scale is not 0 (an adapter at
/// scale 0 changes nothing, and is left out rather than computed).
fn applied_adapters<'a, A>(adapters: &'a [A], scales: &'a [f32]) -> impl Iterator<Item = (&'a A, f32)> {
    adapters.iter().zip(scales.iter().copied()).filter(|&(_, scale)| scale != 0.0)
}

/// Applies a new session's adapter scales: nothing to do where every scale is 0 (a new context
/// applies no adapter).
fn apply_session_scales(session: &mut impl BackendSession, scales: &[f32]) -> Result<(), EngineError> {
    if scales.iter().all(|&s| s == 0.0) { Ok(()) } else { session.set_adapter_scales(scales) }
}

/// Refuses an adapter file that does not exist, by name: before the binding sees it (`crate`'s
/// asserts that it exists, `raw`'s llama.cpp call only logs).
#[cfg(any(feature = "crate", feature = "raw"))]
fn check_adapter_file(path: &Path) -> Result<(), EngineError> {
    if path.is_file() { Ok(()) } else { Err(EngineError::lora(path, "adapter file not found")) }
}

/// Why sequence `seq` is not one of a context of `n_seq_max` sequences' (llama.cpp asserts
/// on such an id), or None when it is.
// Used by the backends that call llama.cpp directly (`raw`, `crate`); tested on every build.
#[cfg_attr(not(any(feature = "raw", feature = "crate")), allow(dead_code))]
fn no_such_seq(seq: i32, n_seq_max: i32) -> Option<String> {
    (!(0..n_seq_max).contains(&seq)).then(|| format!("no sequence {seq} in a context of {n_seq_max}"))
}

/// The window llama.cpp's penalty sampler gets for [`SamplerStage::Penalties`]' `last_n`
/// (`SamplingParams::repeat_last_n`, validated >= -1) on backends that call it directly: -1 is
/// the whole training context (llama.cpp's samplers would take -1 as 0, off), as the `llama`
/// crate's `PenaltyWindow` reads it, and no window is longer than that context (llama.cpp
/// allocates the window up front).
///
/// [`SamplerStage::Penalties`]: crate::SamplerStage::Penalties
// Used by the backends that call llama.cpp directly (`raw`, `crate`); tested on every build.
#[cfg_attr(not(any(feature = "raw", feature = "crate")), allow(dead_code))]
fn penalty_window(last_n: i32, n_ctx_train: i32) -> i32 {
    if last_n == -1 { n_ctx_train } else { last_n.min(n_ctx_train) }
}

/// The size of a file just written or read, for the slot state calls whose binding does not
/// report it.
#[cfg(any(feature = "source", feature = "crate"))]
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// What a load's progress callback did, for the load to act on once llama.cpp has returned:
/// backends `raw` and `crate` hand llama.cpp the callback through C, where a panic must not
/// unwind (the `llama` crate does the same for backend `source`).
#[cfg(any(feature = "raw", feature = "crate"))]
#[derive(Default)]
struct GuardedProgress {
    /// The callback returned false.
    cancelled: bool,
    /// The callback panicked: resumed once llama.cpp has returned.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

#[cfg(any(feature = "raw", feature = "crate"))]
impl GuardedProgress {
    /// Calls `callback`, catching a panic; false (cancel the load) once it panicked or said so.
    fn call(&mut self, callback: &crate::config::LoadProgress, progress: f32) -> bool {
        if self.panic.is_some() {
            return false;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback.call(progress))) {
            Ok(go_on) => {
                self.cancelled = !go_on;
                go_on
            }
            Err(panic) => {
                self.panic = Some(panic);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_windows_read_minus_one_as_the_context_and_never_exceed_it() {
        assert_eq!(penalty_window(-1, 32_768), 32_768);
        assert_eq!(penalty_window(0, 32_768), 0);
        assert_eq!(penalty_window(64, 32_768), 64);
        assert_eq!(penalty_window(i32::MAX, 32_768), 32_768);
    }

    #[test]
    fn sequence_ids_outside_the_context_are_named() {
        assert_eq!(no_such_seq(0, 1), None);
        assert_eq!(no_such_seq(1, 1).as_deref(), Some("no sequence 1 in a context of 1"));
        assert!(no_such_seq(-1, 4).is_some());
    }
}
