//! A safe Rust API over llama.cpp as compiled from source by [`llama_sys`].
//!
//! Lifetimes carry llama.cpp's ownership rules: a [`Context`], [`Vocab`], [`Sampler`] or
//! [`LoraAdapter`] borrows its [`Model`] and cannot outlive it; logits borrow their context
//! and cannot outlive the next decode. Everything is checked before it reaches C: tokens,
//! positions and sequence ids against the context, batch writes against the allocation, output
//! indices against the last decode. Bad input comes back as a typed error that names the
//! cause; llama.cpp's own log lines are kept in the error where it explained itself. C++
//! exceptions never cross into Rust: see [`soundness`] for what is checked before each call,
//! which llama.cpp functions can throw, and the known limits.
//!
//! The load → tokenize → decode → sample loop (on the default model, `cargo xtask fetch-model`):
//!
//! ```
//! use llama::{Batch, Context, ContextParams, Model, ModelParams, SamplerChain, SpecialTokens, TokenizeOptions, Utf8Decoder};
//!
//! # fn main() -> llama::Result<()> {
//! let model = Model::load(std::env::var("EXSA_MODEL").unwrap(), &ModelParams::default())?;
//! let mut ctx = Context::new(&model, &ContextParams::default().n_ctx(512))?;
//! let vocab = model.vocab();
//! let prompt = vocab.tokenize("The three primary colours are", TokenizeOptions::default())?;
//! let mut sampler = SamplerChain::new().greedy().build(&model)?;
//!
//! let mut batch = Batch::from_tokens(&prompt, 0, 0)?;
//! let (mut text, mut utf8, mut piece) = (String::new(), Utf8Decoder::new(), Vec::new());
//! let mut pos = prompt.len() as i32;
//! for _ in 0..16 {
//!     ctx.decode(&batch)?;
//!     let token = sampler.sample_last(&ctx)?;
//!     if vocab.is_eog(token) {
//!         break;
//!     }
//!     piece.clear();
//!     vocab.piece_into(token, SpecialTokens::Omit, &mut piece)?;
//!     utf8.push(&piece, &mut text);
//!     batch.clear();
//!     batch.add_output(token, pos, 0)?;
//!     pos += 1;
//! }
//! utf8.finish(&mut text);
//! assert!(!text.is_empty());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub use llama_sys as sys;

mod backend;
mod batch;
mod c_string;
mod chat;
#[cfg(feature = "chat")]
pub mod chat_templates;
mod context;
mod cpp;
mod error;
mod gguf;
mod lora;
mod model;
mod openmp;
mod quantize;
pub mod rpc;
mod sampler;
pub mod soundness;
mod system;
mod token;
mod top_k;
mod vocab;

pub use backend::modules as backend_modules;
pub use backend::{LogLevel, init, set_log_level};
pub use batch::{Batch, BatchEntry, Output, Pos, SeqId};
pub use chat::{ChatEnding, ChatMessage, apply_template, builtin_templates};
pub use context::{Context, ContextParams, FlashAttention, KvType, MemoryData, PerfCounters, Pooling, RecurrentCheckpoint};
pub use error::{
    BatchError, ChatError, ContextError, CppException, DecodeError, Error, LlamaMessages, LoadError, LoadErrorKind, LoraError, OutputError,
    QuantizeError, Result, SamplerError, StateError, TokenizeError,
};
pub use exsa_utf8::Utf8Decoder;
pub use gguf::{GgufSummary, check as check_gguf};
pub use lora::LoraAdapter;
pub use model::{Model, ModelParams, SplitMode};
pub use quantize::{QuantType, QuantizeOptions, Requantize, quantize};
pub use sampler::{Dry, GrammarTriggers, Penalties, PenaltyWindow, SampledFrom, Sampler, SamplerChain};
pub use system::{Capabilities, Device, DeviceKind, capabilities, devices, system_info};
pub use token::Token;
pub use vocab::{AddedSpecials, DetokenizeOptions, FimToken, SpecialTokens, TokenizeOptions, Vocab};

/// What exactly was compiled: see [`llama_sys::BuildInfo`].
pub fn build_info() -> &'static llama_sys::BuildInfo {
    &llama_sys::BUILD_INFO
}
