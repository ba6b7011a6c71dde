//! Backend `crate`: Option A, the baseline: llama.cpp through the `llama-cpp-2` crate with its
//! default features, as the seed's exsa-engine used it.

use std::ffi::CStr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::LlamaLoraAdapterInitError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;

use super::{Backend, BackendModel, BackendSession, BuildInfo, ModelInfo, Outputs, Token};
use crate::config::{EngineConfig, LoadProgress, SamplerStage, SamplingParams, SessionConfig};
use crate::error::{DecodeFailure, EngineError, SlotFileAction, cause};

/// llama-cpp-2 refuses a second `LlamaBackend::init`, so the one instance lives here.
fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().expect("the only LlamaBackend::init of the process")
    })
}

#[derive(Debug)]
/// Backend `crate` (Option A, the baseline): llama.cpp through the `llama-cpp-2` crate with its
/// default features.
pub struct CrateBackend;

impl Backend for CrateBackend {
    const NAME: &'static str = "crate";
    type Model = CrateModel;

    fn load(config: &EngineConfig) -> Result<CrateModel, EngineError> {
        let (path, placement) = (config.model.as_path(), &config.placement);
        placement.local_only(Self::NAME)?;
        let scales = config.adapter_scales()?;
        if config.lora.len() > 1 {
            // `LlamaContext::lora_adapter_set` replaces the context's set with one adapter.
            return Err(EngineError::Unsupported { what: "more than one LoRA adapter (llama-cpp-2 applies one at a time)", backend: Self::NAME });
        }
        let n_gpu_layers = placement.n_gpu_layers;
        // llama-cpp-2 answers every bad file with "null result"; say at least which file.
        if !path.exists() {
            return Err(EngineError::load(path, "model file not found"));
        }
        if path.is_dir() {
            return Err(EngineError::load(path, "is a directory, not a model file"));
        }
        let mut params = LlamaModelParams::default().with_n_gpu_layers(n_gpu_layers.max(0) as u32);
        if !config.load.mmap || config.load.mlock {
            // Only off the defaults: llama.cpp's own mode (mmap where it can) stays otherwise.
            params = params.with_use_mmap(config.load.mmap).with_use_mlock(config.load.mlock);
        }
        let outcome = std::rc::Rc::new(std::cell::RefCell::new(super::GuardedProgress::default()));
        if let Some(progress) = config.load.progress.clone() {
            params = params.with_progress_callback(guarded_progress(progress, std::rc::Rc::clone(&outcome)));
        }
        let loaded = LlamaModel::load_from_file(backend(), path, &params);
        drop(params);
        let outcome = outcome.take();
        if let Some(panic) = outcome.panic {
            drop(loaded);
            std::panic::resume_unwind(panic);
        }
        let mut model = loaded.map_err(|e| if outcome.cancelled { EngineError::load_cancelled(path) } else { EngineError::load(path, e) })?;
        let adapter = match config.lora.first() {
            Some(lora) => {
                super::check_adapter_file(&lora.path)?;
                let adapter = model.lora_adapter_init(&lora.path).map_err(|e| match e {
                    LlamaLoraAdapterInitError::NullResult => {
                        EngineError::lora(&lora.path, "llama.cpp could not load it (not a LoRA adapter, or one for another model)")
                    }
                    e => EngineError::lora(&lora.path, e),
                })?;
                Some(Mutex::new(adapter))
            }
            None => None,
        };
        Ok(CrateModel { adapter, scales, model, path: path.display().to_string() })
    }

    fn build_info() -> BuildInfo {
        // llama-cpp-sys-2 does not export its flags; its build script's rules are: GGML_NATIVE
        // only with RUSTFLAGS=-C target-cpu=native, otherwise ggml's default ISA list plus
        // whatever rustc target features are on; OpenMP on (default feature); Release unless
        // the cargo profile is debug.
        let rustflags = env!("EXSA_RUSTFLAGS");
        let record = serde_json::json!({
            "llama_cpp": "llama-cpp-2 0.1.160 over llama-cpp-sys-2 0.1.161",
            "features": "default (openmp, common)",
            "ggml_native": rustflags.contains("target-cpu=native"),
            "rustc_target_features": {
                "avx2": cfg!(target_feature = "avx2"),
                "fma": cfg!(target_feature = "fma"),
                "f16c": cfg!(target_feature = "f16c"),
                "avx512f": cfg!(target_feature = "avx512f"),
            },
            "rustflags": rustflags,
        });
        BuildInfo::from_record("crate", record)
    }

    fn system_info() -> String {
        backend();
        // SAFETY: returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) }.to_string_lossy().into_owned()
    }
}

/// `progress` as llama-cpp-2 takes it, with what it does recorded in `outcome`: llama-cpp-2's
/// trampoline does not catch a panic, which must not unwind into llama.cpp, so this does (and
/// cancels the load).
fn guarded_progress(progress: LoadProgress, outcome: std::rc::Rc<std::cell::RefCell<super::GuardedProgress>>) -> impl FnMut(f32) -> bool + 'static {
    move |p| outcome.borrow_mut().call(&progress, p)
}

#[derive(Debug)]
pub struct CrateModel {
    /// The LoRA adapter loaded for the model ([`EngineConfig::lora`], one at most), which
    /// llama.cpp frees with the model. Behind a lock because llama-cpp-2 applies an adapter
    /// through `&mut`.
    adapter: Option<Mutex<LlamaLoraAdapter>>,
    /// The engine's scales, one per adapter.
    scales: Vec<f32>,
    model: LlamaModel,
    path: String,
}

impl BackendModel for CrateModel {
    type Session<'m> = CrateSession<'m>;

    fn info(&self) -> ModelInfo {
        let m = &self.model;
        ModelInfo {
            path: self.path.clone(),
            description: m.meta_val_str("general.name").unwrap_or_default(),
            architecture: m.meta_val_str("general.architecture").unwrap_or_default(),
            n_params: m.n_params(),
            size_bytes: m.size(),
            n_vocab: m.n_vocab(),
            n_ctx_train: m.n_ctx_train(),
            n_embd: m.n_embd().max(0) as usize,
            has_chat_template: m.chat_template(None).is_ok(),
            placement: Vec::new(),
        }
    }

    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool, out: &mut Vec<Token>) -> Result<(), EngineError> {
        out.clear();
        out.extend(self.model.vocab().tokenize(text.as_bytes(), add_special, parse_special).into_iter().map(|t| Token(t.0)));
        Ok(())
    }

    fn piece(&self, token: Token, special: bool, out: &mut Vec<u8>) -> Result<(), EngineError> {
        if !token.in_vocab(self.model.n_vocab()) {
            return Err(EngineError::Tokenize(cause(format!("token {token} is outside the vocabulary"))));
        }
        self.model.vocab().token_to_piece_into(LlamaToken(token.0), out, special, None);
        Ok(())
    }

    fn is_eog(&self, token: Token) -> bool {
        self.model.vocab().is_eog(LlamaToken(token.0))
    }

    fn bos(&self) -> Token {
        Token(self.model.vocab().bos().0)
    }

    fn n_vocab(&self) -> i32 {
        self.model.n_vocab()
    }

    fn fim_tokens(&self) -> crate::FimTokens {
        let n_vocab = self.n_vocab();
        let vocab = self.model.vocab();
        // LLAMA_TOKEN_NULL (-1) where the vocabulary has none.
        let some = |t: LlamaToken| Some(Token(t.0)).filter(|t| t.in_vocab(n_vocab));
        crate::FimTokens {
            prefix: some(vocab.fim_pre()),
            suffix: some(vocab.fim_suf()),
            middle: some(vocab.fim_mid()),
            repository: some(vocab.fim_rep()),
            separator: some(vocab.fim_sep()),
        }
    }

    fn meta(&self, key: &str) -> Option<String> {
        self.model.meta_val_str(key).ok()
    }

    fn adapter_meta(&self, _adapter: usize, _key: &str) -> Option<String> {
        // llama-cpp-2 keeps the adapter's handle to itself and reads no adapter metadata.
        None
    }

    fn adapter_invocation(&self, _adapter: usize) -> &[Token] {
        // Nor an activated LoRA's invocation: such an adapter applies to every token here.
        &[]
    }

    fn named_template(&self, name: &str) -> Option<String> {
        self.model.chat_template(Some(name)).ok().and_then(|t| t.to_string().ok())
    }

    /// None: this backend refuses rank pooling (see `session`), the one user of pairs.
    fn pair_tokens(&self) -> crate::token::PairTokens {
        crate::token::PairTokens::default()
    }

    fn chat_template(&self) -> Option<String> {
        self.model.chat_template(None).ok().and_then(|t| t.to_string().ok())
    }

    fn apply_chat_template(&self, template: &str, messages: &[(String, String)]) -> Result<String, EngineError> {
        let tmpl = LlamaChatTemplate::new(template).map_err(|e| EngineError::ChatTemplate(cause(e)))?;
        let msgs = messages
            .iter()
            .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::ChatTemplate(cause(e)))?;
        self.model.apply_chat_template(&tmpl, &msgs, true).map_err(|e| EngineError::ChatTemplate(cause(e)))
    }

    fn sampler(&self, params: &SamplingParams) -> Result<LlamaSampler, EngineError> {
        chain(&self.model, params)
    }

    fn session(&self, config: &SessionConfig) -> Result<CrateSession<'_>, EngineError> {
        let scales = config.lora_scales_for(&self.scales)?;
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(config.n_ctx))
            .with_n_batch(config.n_batch)
            .with_n_ubatch(config.n_ubatch)
            .with_n_threads(config.n_threads)
            .with_n_threads_batch(config.n_threads_batch)
            .with_embeddings(config.embeddings)
            .with_n_seq_max(config.n_seq_max)
            .with_kv_unified(config.n_seq_max > 1)
            .with_type_k(kv_type(config.cache_type_k))
            .with_type_v(kv_type(config.cache_type_v))
            .with_flash_attention_policy(match config.flash_attention {
                crate::FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
                crate::FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                crate::FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            });
        if config.embeddings {
            params = params.with_pooling_type(match config.pooling {
                None => LlamaPoolingType::Unspecified,
                Some(crate::Pooling::Mean) => LlamaPoolingType::Mean,
                Some(crate::Pooling::Cls) => LlamaPoolingType::Cls,
                Some(crate::Pooling::Last) => LlamaPoolingType::Last,
                Some(crate::Pooling::None) => LlamaPoolingType::None,
                // The crate reads every pooled row as n_embd floats; a rank-pooled row is
                // n_cls_out long, so reading it would run past its end.
                Some(crate::Pooling::Rank) => return Err(EngineError::Unsupported { what: "rank pooling (reranking)", backend: "crate" }),
            });
        }
        let ctx = self.model.new_context(backend(), params).map_err(|e| EngineError::Session(cause(e)))?;
        let n_batch = ctx.n_batch() as usize;
        let mut session = CrateSession {
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            pending: Vec::new(),
            outputs: Vec::new(),
            abort: None,
            n_seq_max: config.n_seq_max as i32,
            recurrent: self.model.is_recurrent() || self.model.is_hybrid(),
            adapter: self.adapter.as_ref(),
        };
        super::apply_session_scales(&mut session, scales)?;
        Ok(session)
    }
}

pub struct CrateSession<'m> {
    ctx: LlamaContext<'m>,
    /// The model's memory holds a recurrent state (see `BackendSession::memory_is_recurrent`).
    recurrent: bool,
    batch: LlamaBatch<'static>,
    /// Batch indexes asking for logits in the batch being built, and in the last decode: the
    /// crate reads logits at any index it is given (llama.cpp aborts on one without), so every
    /// read is checked against these first.
    pending: Vec<i32>,
    outputs: Vec<i32>,
    abort: Option<Arc<AtomicBool>>,
    /// Sequences the context holds (llama.cpp asserts ids below this).
    n_seq_max: i32,
    /// The model's LoRA adapter (one at most), which [`BackendSession::set_adapter_scales`]
    /// applies.
    adapter: Option<&'m Mutex<LlamaLoraAdapter>>,
}

impl std::fmt::Debug for CrateSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrateSession").field("outputs", &self.outputs).finish_non_exhaustive()
    }
}

impl BackendSession for CrateSession<'_> {
    type Sampler = LlamaSampler;
    /// No checkpoints: this binding does not save part of a sequence's memory (a recurrent state
    /// that cannot be cut is decoded again from its tokens).
    type Checkpoint = std::convert::Infallible;

    fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    fn n_batch(&self) -> u32 {
        self.ctx.n_batch()
    }

    fn fill(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.batch_clear();
        for (k, &t) in ids.iter().enumerate() {
            let logits = outputs == Outputs::Last && k + 1 == ids.len();
            self.batch_push(t, start + k as i32, 0, logits)?;
        }
        Ok(())
    }

    fn decode(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.fill(ids, start, outputs)?;
        self.batch_decode()
    }

    fn last_logits(&self) -> Result<&[f32], EngineError> {
        self.logits_at(self.last_output()?)
    }

    fn set_abort_flag(&mut self, flag: Arc<AtomicBool>) {
        self.abort = Some(flag);
    }

    fn synchronize(&self) {
        self.ctx.synchronize();
    }

    fn sequence_embedding(&self, seq: i32) -> Result<Vec<f32>, EngineError> {
        self.ctx.embeddings_seq_ith(seq).map(<[f32]>::to_vec).map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn token_embedding(&self, index: i32) -> Result<Vec<f32>, EngineError> {
        // llama.cpp checks the index (an error, not an abort: null) before the crate reads.
        self.ctx.embeddings_ith(index).map(<[f32]>::to_vec).map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn batch_clear(&mut self) {
        self.batch.clear();
        self.pending.clear();
    }

    fn batch_push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Result<(), EngineError> {
        let index = self.batch.n_tokens();
        self.batch.add(LlamaToken(token.0), pos, &[seq], output).map_err(|e| EngineError::decode(DecodeFailure::InvalidBatch, e))?;
        if output {
            self.pending.push(index);
        }
        Ok(())
    }

    fn batch_len(&self) -> usize {
        self.batch.n_tokens() as usize
    }

    fn batch_decode(&mut self) -> Result<(), EngineError> {
        // The crate has no abort callback: a cancel is seen before a decode starts, and a
        // decode runs to its end.
        if self.abort.as_ref().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err(EngineError::Cancelled);
        }
        self.outputs.clear();
        self.ctx.decode(&mut self.batch).map_err(decode_error)?;
        self.outputs.clone_from(&self.pending);
        Ok(())
    }

    fn sample_with(&mut self, sampler: &mut LlamaSampler, index: i32) -> Result<Token, EngineError> {
        self.check_output(index)?;
        Ok(Token(sampler.sample(&self.ctx, index).0))
    }

    fn sample_listing(&mut self, _: &mut Self::Sampler, _: i32, _: usize) -> Result<crate::TokenLogprobs, EngineError> {
        Err(EngineError::Unsupported { what: "post_sampling_probs (the sampler chain's candidates are not visible here)", backend: "crate" })
    }

    fn logits_at(&self, index: i32) -> Result<&[f32], EngineError> {
        self.check_output(index)?;
        Ok(self.ctx.get_logits_ith(index))
    }

    fn seq_truncate(&mut self, seq: i32, from: i32) -> bool {
        let Ok(seq) = u32::try_from(seq) else { return false };
        self.ctx.clear_kv_cache_seq(Some(seq), Some(from.max(0) as u32), None).unwrap_or(false)
    }

    fn seq_clear(&mut self, seq: i32) {
        if let Ok(seq) = u32::try_from(seq) {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
        }
    }

    fn seq_copy(&mut self, src: i32, dst: i32) -> bool {
        // llama.cpp asserts sequence ids below the context's n_seq_max: checked first.
        if !(0..self.n_seq_max).contains(&src) || !(0..self.n_seq_max).contains(&dst) {
            return false;
        }
        self.ctx.copy_kv_cache_seq(src, dst, None, None).is_ok()
    }

    fn memory_is_recurrent(&self) -> bool {
        self.recurrent
    }

    fn seq_checkpoint(&mut self, _: i32) -> Option<(std::convert::Infallible, usize)> {
        None
    }

    fn seq_restore_checkpoint(&mut self, _: i32, checkpoint: &std::convert::Infallible) -> bool {
        match *checkpoint {}
    }

    fn seq_save_file(&mut self, seq: i32, path: &Path, tokens: &[Token]) -> Result<u64, EngineError> {
        let fail = |e: &dyn std::fmt::Display| EngineError::slot_file(SlotFileAction::Save, path, e.to_string());
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(&why));
        }
        let tokens: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken::new(t.0)).collect();
        self.ctx.state_seq_save_file(path, seq, &tokens).map_err(|e| fail(&e))?;
        Ok(super::file_len(path))
    }

    fn set_adapter_scales(&mut self, scales: &[f32]) -> Result<(), EngineError> {
        let Some(adapter) = self.adapter else { return Ok(()) };
        let applied = super::applied_adapters(std::slice::from_ref(&adapter), scales).next().map(|(_, scale)| scale);
        let mut adapter = adapter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // One adapter: set at its scale, or none applied.
        match applied {
            Some(scale) => self.ctx.lora_adapter_set(&mut adapter, scale).map_err(|e| EngineError::Session(cause(e))),
            None => self.ctx.lora_adapter_remove(&mut adapter).map_err(|e| EngineError::Session(cause(e))),
        }
    }

    fn seq_load_file(&mut self, seq: i32, path: &Path, max_tokens: usize) -> Result<Vec<Token>, EngineError> {
        let fail = |e: &dyn std::fmt::Display| EngineError::slot_file(SlotFileAction::Restore, path, e.to_string());
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(&why));
        }
        self.outputs.clear();
        let (tokens, _) = self.ctx.state_seq_load_file(path, seq, max_tokens).map_err(|e| fail(&e))?;
        Ok(tokens.into_iter().map(|t| Token(t.0)).collect())
    }
}

impl CrateSession<'_> {
    fn last_output(&self) -> Result<i32, EngineError> {
        self.outputs.last().copied().ok_or_else(|| EngineError::decode(DecodeFailure::NoOutput, "the last decode produced no logits"))
    }

    fn check_output(&self, index: i32) -> Result<(), EngineError> {
        if self.outputs.contains(&index) {
            Ok(())
        } else {
            Err(EngineError::decode(DecodeFailure::NoOutput, format!("batch index {index} has no logits in the last decode")))
        }
    }
}

fn decode_error(e: llama_cpp_2::DecodeError) -> EngineError {
    let kind = if matches!(e, llama_cpp_2::DecodeError::NoKvCacheSlot) { DecodeFailure::NoKvSlot } else { DecodeFailure::Internal };
    EngineError::decode(kind, e)
}

/// The engine's sampling parameters as a llama-cpp-2 chain. A grammar is refused: the crate's
/// grammar sampler accepts tokens unchecked, and llama.cpp aborts the process on an
/// end-of-generation token the grammar cannot take.
fn chain(model: &LlamaModel, p: &SamplingParams) -> Result<LlamaSampler, EngineError> {
    let n_vocab = model.n_vocab();
    p.validate_for(n_vocab)?;
    if p.grammar.is_some() {
        return Err(EngineError::Unsupported { what: "grammars (response_format)", backend: "crate" });
    }
    let stages = p.stages().into_iter().map(|stage| match stage {
        SamplerStage::LogitBias(biases) => {
            LlamaSampler::logit_bias(n_vocab, &biases.iter().map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t.0), b)).collect::<Vec<_>>())
        }
        SamplerStage::Penalties { last_n, repeat, frequency, presence } => {
            let last_n = super::penalty_window(last_n, i32::try_from(model.n_ctx_train()).unwrap_or(i32::MAX));
            LlamaSampler::penalties(n_vocab, last_n, repeat, frequency, presence)
        }
        SamplerStage::TopK(k) => LlamaSampler::top_k(k),
        SamplerStage::TopP(p) => LlamaSampler::top_p(p, 1),
        SamplerStage::MinP(p) => LlamaSampler::min_p(p, 1),
        SamplerStage::Temp(t) => LlamaSampler::temp(t),
        SamplerStage::Dist(seed) => LlamaSampler::dist(seed),
        SamplerStage::Greedy => LlamaSampler::greedy(),
    });
    Ok(LlamaSampler::chain_simple(stages))
}

fn kv_type(t: crate::CacheType) -> llama_cpp_2::context::params::KvCacheType {
    use crate::CacheType as C;
    use llama_cpp_2::context::params::KvCacheType as K;
    match t {
        C::F32 => K::F32,
        C::F16 => K::F16,
        C::Bf16 => K::BF16,
        C::Q8_0 => K::Q8_0,
        C::Q4_0 => K::Q4_0,
        C::Q4_1 => K::Q4_1,
        C::Iq4Nl => K::IQ4_NL,
        C::Q5_0 => K::Q5_0,
        C::Q5_1 => K::Q5_1,
    }
}
