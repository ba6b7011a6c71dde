//! exsa-engine: local LLM inference over llama.cpp.
//!
//! The same engine code runs over one of two backends, chosen by cargo feature: `source`
//! (default; llama.cpp built from source by llama-sys, through the safe `llama` crate) or
//! `crate` (the `llama-cpp-2` crate, the baseline). A third, `raw`, drives llama-sys directly
//! for benchmarks. Comparing builds of this crate is comparing builds and bindings of
//! llama.cpp, nothing else.
//!
//! ```no_run
//! use exsa_engine::{Engine, EngineConfig, GenerateRequest};
//!
//! # fn main() -> Result<(), exsa_engine::EngineError> {
//! let engine = Engine::load(EngineConfig::new("model.gguf"))?;
//! let mut session = engine.session()?;
//! let mut generation = session.generate(&GenerateRequest::new("Once upon a time").max_tokens(64))?;
//! for delta in generation.by_ref() {
//!     print!("{}", delta?);
//! }
//! println!("\n{:.1} t/s", generation.stats().generation_tokens_per_s);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

// The backend interface and the measurement harness are public for the workspace's benches,
// tests and the `exsa` program, not for apps: hidden from the docs and outside the stability
// promise (README, "Stability").
#[doc(hidden)]
pub mod backend;
mod chat;
mod chat_tokens;
mod config;
mod embedding;
mod engine;
mod error;
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod harness;
#[cfg(feature = "server")]
pub mod http;
mod info;
pub mod json_grammar;
pub mod outcome;
mod scheduler;
pub mod serving;
mod speculative;
mod stop;
mod templates;
mod token;
mod token_text;

pub use backend::LogLevel;
pub use chat::{ChatDelta, ChatMessage, ChatOptions, ChatReply, Continuation, ReasoningFormat, Tool, ToolCall, ToolChoice};
pub use config::{
    CacheType, CancelToken, ChatTemplating, EngineConfig, FlashAttention, GenerateOptions, GenerateRequest, GrammarStart, LoadOptions, LoadProgress,
    LoraConfig, Placement, Pooling, Prompt, SamplerStage, SamplingParams, SessionConfig, SpecialText, Speculation,
};
pub use embedding::{EmbedOptions, EmbeddingNorm, RerankScore, l2_normalize};
pub use engine::{Engine, Generation, Session, SessionState, TokenizeOptions, set_llama_log_level};
pub use error::{Cause, DecodeFailure, EngineError, Result, SlotFileAction};
pub use info::{BuildInfo, ModelInfo};
pub use outcome::{Completion, FinishReason, GenerationStats, SlotAction, SlotActionDone};
pub use serving::OwnedSession;
pub use templates::ReplyParser;
pub use token::{FimTokens, Token, TokenLogprobs};
// One UTF-8 stream decoder for the whole workspace, from a crate of its own: the `crate`
// backend must not link llama-sys, so it cannot come through `llama`.
pub use exsa_utf8::Utf8Decoder;

/// Where the default model lives: `EXSA_MODEL`, else the workspace cache (`cargo xtask
/// fetch-model` puts it there).
pub fn default_model_path() -> std::path::PathBuf {
    std::env::var_os("EXSA_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let file = "gemma-3-270m-q4_k_m.gguf";
        // A relocatable build (a release bundle) has no model folder: the current one.
        option_env!("EXSA_DEFAULT_MODEL_DIR").map_or_else(|| std::path::PathBuf::from(file), |dir| std::path::Path::new(dir).join(file))
    })
}
