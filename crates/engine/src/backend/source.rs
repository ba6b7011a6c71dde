//! Backend `source`: Option B, our llama.cpp build through the safe `llama` crate.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use llama::{
    Batch, ChatEnding, ChatMessage, Context, ContextParams, FlashAttention, LoraAdapter, Model, ModelParams, Output, Penalties, PenaltyWindow,
    Pooling, Sampler, SamplerChain, SpecialTokens, Token as LlamaToken, TokenizeOptions,
};

use super::{Backend, BackendModel, BackendSession, BuildInfo, ModelInfo, Outputs, Token};
use crate::config::{EngineConfig, GrammarStart, SamplerStage, SamplingParams, SessionConfig};
use crate::error::{DecodeFailure, EngineError, SlotFileAction, cause};

#[derive(Debug)]
/// Backend `source` (Option B): our llama.cpp build through the safe `llama` crate.
pub struct SourceBackend;

impl Backend for SourceBackend {
    const NAME: &'static str = "source";
    type Model = SourceModel;

    fn load(config: &EngineConfig) -> Result<SourceModel, EngineError> {
        let (path, placement) = (config.model.as_path(), &config.placement);
        let scales = config.adapter_scales()?;
        let params = ModelParams::default()
            .n_gpu_layers(placement.n_gpu_layers)
            .rpc_servers(placement.rpc_servers.clone())
            .tensor_split(placement.tensor_split.clone())
            .use_mmap(config.load.mmap)
            .use_mlock(config.load.mlock);
        // (The llama crate catches a panicking callback, cancels the load and resumes the panic
        // once llama.cpp has returned.)
        let loaded = match &config.load.progress {
            Some(progress) => Model::load_with_progress(path, &params, |p| progress.call(p)),
            None => Model::load(path, &params),
        };
        let model = Arc::new(loaded.map_err(|e| EngineError::load(path, e))?);
        if placement.n_gpu_layers != 0 {
            warn_if_no_gpu();
        }
        // SAFETY: the reference is to the model inside the Arc, whose address stays put however
        // the Arc moves, and which nothing frees before the SourceModel holding both goes: the
        // adapters borrowing it are dropped first (on an error below, as locals declared after
        // it; afterwards, as SourceModel's field declared before it), and no adapter with this
        // lifetime leaves the SourceModel (`SourceModel::adapters` shortens it to a borrow of
        // the SourceModel). Shared references only: the Arc is never made mutable.
        let for_adapters: &'static Model = unsafe { &*Arc::as_ptr(&model) };
        let mut adapters = Vec::with_capacity(config.lora.len());
        for lora in &config.lora {
            adapters.push(LoraAdapter::load(for_adapters, &lora.path).map_err(|e| EngineError::lora(&lora.path, e))?);
        }
        let invocations = adapters.iter().map(|a| a.alora_invocation_tokens().into_iter().map(Token::from).collect()).collect();
        Ok(SourceModel { adapters, invocations, scales, model })
    }

    fn build_info() -> BuildInfo {
        let mut info = BuildInfo::from_json("source", &llama::build_info().to_json());
        // Dynamic-backend builds: where the modules were loaded from (null: static, or none found).
        info.details.insert("backend_modules".into(), llama::backend_modules::loaded_from().map(|d| d.display().to_string()).into());
        info.details.insert("cpu_variant".into(), cpu_variant_info());
        info.details.insert("other_backend_modules".into(), other_modules_info());
        info.details.insert("devices".into(), devices_info());
        info
    }

    fn serve_rpc(endpoint: &str, cache_dir: Option<&Path>, threads: usize) -> EngineError {
        match llama::rpc::serve(endpoint, cache_dir, threads) {
            Err(e) => EngineError::Rpc(cause(e)),
            Ok(never) => match never {},
        }
    }

    fn system_info() -> String {
        llama::system_info()
    }

    fn set_llama_log_level(level: super::LogLevel) {
        use super::LogLevel as L;
        llama::set_log_level(match level {
            L::Debug => llama::LogLevel::Debug,
            L::Info => llama::LogLevel::Info,
            L::Warn => llama::LogLevel::Warn,
            L::Error => llama::LogLevel::Error,
            L::Off => llama::LogLevel::Off,
        });
    }
}

/// The CPU module a dynamic-backend build runs and why (null in a static build, whose CPU code
/// is built in for the machine that built it): the variant (empty for a module without one),
/// how it was chosen, the flags it was compiled with (null where this build did not record them:
/// a module from elsewhere), every module of the folder with its score on this CPU (0: cannot
/// run here) or why it did not open, and the CPU's instruction sets that decide it. A refused
/// choice (`EXSA_CPU_VARIANT` naming one this CPU cannot run) is reported as `refused`.
fn cpu_variant_info() -> serde_json::Value {
    use llama::backend_modules as modules;
    if let Some(variant) = modules::cpu_variant() {
        let candidates: Vec<serde_json::Value> =
            variant.candidates.iter().map(|c| serde_json::json!({ "variant": c.name, "score": c.score, "load_error": c.load_error })).collect();
        return serde_json::json!({
            "variant": variant.chosen.name,
            "file": variant.chosen.path.display().to_string(),
            "chosen_by": variant.choice.to_string(),
            "flags": llama::build_info().cpu_variant_flags(&variant.chosen.name),
            "candidates": candidates,
            "cpu_features": modules::cpu_features(),
        });
    }
    match modules::refused() {
        Some((_, error)) => serde_json::json!({ "refused": error.to_string(), "cpu_features": modules::cpu_features() }),
        None => serde_json::Value::Null,
    }
}

/// The dynamic-backend folder's modules other than the CPU's (a bundle's `libggml-cuda.so`):
/// each one's backend and file, whether ggml registered it, and if not why (a library it needs,
/// such as the CUDA runtime, is missing).
fn other_modules_info() -> serde_json::Value {
    llama::backend_modules::other_modules()
        .iter()
        .map(|m| serde_json::json!({ "backend": m.backend, "file": m.path.display().to_string(), "registered": m.error.is_none(), "error": m.error }))
        .collect()
}

/// The devices llama.cpp can use: the CPU, and each GPU a registered backend found.
fn devices_info() -> serde_json::Value {
    llama::devices()
        .iter()
        .map(|d| {
            let kind = match d.kind {
                llama::DeviceKind::Cpu => "cpu",
                llama::DeviceKind::Gpu => "gpu",
                llama::DeviceKind::IntegratedGpu => "integrated_gpu",
                llama::DeviceKind::Accelerator => "accelerator",
                llama::DeviceKind::Other => "other",
            };
            serde_json::json!({ "name": d.name, "description": d.description, "kind": kind, "memory_total": d.memory_total })
        })
        .collect()
}

/// A build that can use CUDA (compiled in, or a loaded module beside it) on a machine where no GPU
/// answered runs on the CPU: said once, so that nobody mistakes CPU speed for GPU speed.
fn warn_if_no_gpu() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cuda_built = llama::sys::BUILD_INFO.switch("cuda") == Some(true)
            || llama::backend_modules::loaded_from().is_some_and(|dir| llama::backend_modules::has_module(dir, "cuda"));
        let gpu = llama::devices().iter().any(|d| matches!(d.kind, llama::DeviceKind::Gpu | llama::DeviceKind::IntegratedGpu));
        if cuda_built && !gpu {
            tracing::warn!("this build can use CUDA, but no GPU was found (no NVIDIA driver, or no device): running on the CPU");
        }
    });
}

/// The model and the LoRA adapters loaded for it ([`EngineConfig::lora`]), which borrow it: the
/// adapters hold a `'static` borrow of the model in its Arc, sound because they never leave this
/// struct with that lifetime and are dropped before the model (fields drop in declaration order:
/// keep `adapters` before `model`).
#[derive(Debug)]
pub struct SourceModel {
    /// Freed before `model` (see above).
    adapters: Vec<LoraAdapter<'static>>,
    /// Each adapter's activated-LoRA invocation (empty for a plain adapter).
    invocations: Vec<Vec<Token>>,
    /// The engine's scales, one per adapter.
    scales: Vec<f32>,
    /// In an Arc (never cloned) for a stable address that moving the SourceModel does not
    /// reborrow as unique, as moving a Box would.
    model: Arc<Model>,
}

impl SourceModel {
    /// The safe wrapper's model (for its chat layer).
    #[cfg_attr(not(feature = "jinja"), allow(dead_code))]
    pub(crate) fn llama(&self) -> &Model {
        &self.model
    }

    /// The adapters, borrowed no longer than the model is.
    fn adapters(&self) -> &[LoraAdapter<'_>] {
        &self.adapters
    }
}

/// The engine's tokens as the `llama` crate's: both are `repr(transparent)` over `i32`.
fn tokens(ids: &[Token]) -> &[LlamaToken] {
    // SAFETY: Token and LlamaToken are both repr(transparent) over i32, so the slices have the
    // same layout.
    unsafe { std::slice::from_raw_parts(ids.as_ptr().cast(), ids.len()) }
}

/// The same allocation seen as tokens: tokenizing into the engine's buffer copies nothing.
fn into_tokens(ids: Vec<Token>) -> Vec<LlamaToken> {
    let mut ids = std::mem::ManuallyDrop::new(ids);
    // SAFETY: Token and LlamaToken are both repr(transparent) over i32 (same size and
    // alignment), so the allocation, its length and capacity describe a valid Vec<LlamaToken>;
    // ManuallyDrop gives up the old owner.
    unsafe { Vec::from_raw_parts(ids.as_mut_ptr().cast(), ids.len(), ids.capacity()) }
}

fn into_ids(tokens: Vec<LlamaToken>) -> Vec<Token> {
    let mut tokens = std::mem::ManuallyDrop::new(tokens);
    // SAFETY: as in into_tokens, the other way round.
    unsafe { Vec::from_raw_parts(tokens.as_mut_ptr().cast(), tokens.len(), tokens.capacity()) }
}

impl BackendModel for SourceModel {
    type Session<'m> = SourceSession<'m>;

    fn info(&self) -> ModelInfo {
        let m = &self.model;
        ModelInfo {
            path: m.path().display().to_string(),
            description: m.description(),
            architecture: m.architecture().unwrap_or_default(),
            n_params: m.n_params(),
            size_bytes: m.size(),
            n_vocab: m.vocab().n_tokens(),
            n_ctx_train: m.n_ctx_train(),
            n_embd: m.n_embd(),
            has_chat_template: m.chat_template(None).is_some(),
            placement: m.placement().to_vec(),
        }
    }

    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool, out: &mut Vec<Token>) -> Result<(), EngineError> {
        let mut buf = into_tokens(std::mem::take(out));
        let result = self.model.vocab().tokenize_into(text, TokenizeOptions { add_special, parse_special }, &mut buf);
        *out = into_ids(buf);
        result.map_err(|e| EngineError::Tokenize(cause(e)))
    }

    fn piece(&self, token: Token, special: bool, out: &mut Vec<u8>) -> Result<(), EngineError> {
        let specials = if special { SpecialTokens::Render } else { SpecialTokens::Omit };
        self.model.vocab().piece_into(token.into(), specials, out).map_err(|e| EngineError::Tokenize(cause(e)))
    }

    fn is_eog(&self, token: Token) -> bool {
        self.model.vocab().is_eog(token.into())
    }

    fn bos(&self) -> Token {
        self.model.vocab().bos().into()
    }

    fn fim_tokens(&self) -> crate::FimTokens {
        use llama::FimToken;
        let vocab = self.model.vocab();
        let get = |kind| vocab.fim(kind).map(Token::from);
        crate::FimTokens {
            prefix: get(FimToken::Prefix),
            suffix: get(FimToken::Suffix),
            middle: get(FimToken::Middle),
            repository: get(FimToken::Repository),
            separator: get(FimToken::Separator),
        }
    }

    fn n_vocab(&self) -> i32 {
        self.model.vocab().n_tokens()
    }

    fn meta(&self, key: &str) -> Option<String> {
        self.model.meta(key)
    }

    fn adapter_meta(&self, adapter: usize, key: &str) -> Option<String> {
        self.adapters.get(adapter)?.meta(key)
    }

    fn adapter_invocation(&self, adapter: usize) -> &[Token] {
        self.invocations.get(adapter).map_or(&[], Vec::as_slice)
    }

    fn named_template(&self, name: &str) -> Option<String> {
        self.model.chat_template(Some(name))
    }

    fn pair_tokens(&self) -> crate::token::PairTokens {
        let vocab = self.model.vocab();
        let added = vocab.added_specials();
        let sep = vocab.sep();
        let eos = Some(vocab.eos()).filter(|&t| vocab.contains(t)).or(sep);
        crate::token::PairTokens {
            bos: added.bos.then_some(vocab.bos().into()),
            eos: if added.eos { eos.map(Token::from) } else { None },
            sep: if added.sep { sep.map(Token::from) } else { None },
        }
    }

    fn chat_template(&self) -> Option<String> {
        self.model.chat_template(None)
    }

    fn apply_chat_template(&self, template: &str, messages: &[(String, String)]) -> Result<String, EngineError> {
        let msgs: Vec<ChatMessage> = messages.iter().map(|(r, c)| ChatMessage::new(r.as_str(), c.as_str())).collect();
        llama::apply_template(template, &msgs, ChatEnding::AssistantTurn).map_err(|e| EngineError::ChatTemplate(cause(e)))
    }

    fn sampler(&self, params: &SamplingParams) -> Result<Sampler<'_>, EngineError> {
        build_sampler(&self.model, params)
    }

    fn check_servers(&self) -> Result<(), EngineError> {
        self.model.check_servers().map_err(|lost| EngineError::Rpc(cause(lost)))
    }

    fn session(&self, config: &SessionConfig) -> Result<SourceSession<'_>, EngineError> {
        let scales = config.lora_scales_for(&self.scales)?;
        let params = ContextParams::default()
            .n_ctx(config.n_ctx)
            .n_batch(config.n_batch)
            .n_ubatch(config.n_ubatch)
            .n_seq_max(config.n_seq_max)
            .unified_kv(config.n_seq_max > 1)
            .n_threads(config.n_threads)
            .n_threads_batch(config.n_threads_batch)
            .flash_attention(match config.flash_attention {
                crate::FlashAttention::Auto => FlashAttention::Auto,
                crate::FlashAttention::On => FlashAttention::On,
                crate::FlashAttention::Off => FlashAttention::Off,
            })
            .type_k(kv_type(config.cache_type_k))
            .type_v(kv_type(config.cache_type_v))
            .recurrent_snapshots(config.recurrent_snapshots)
            .embeddings(config.embeddings)
            .pooling(match config.pooling {
                _ if !config.embeddings => Pooling::Unspecified,
                None => Pooling::Unspecified,
                Some(crate::Pooling::Mean) => Pooling::Mean,
                Some(crate::Pooling::Cls) => Pooling::Cls,
                Some(crate::Pooling::Last) => Pooling::Last,
                Some(crate::Pooling::Rank) => Pooling::Rank,
                Some(crate::Pooling::None) => Pooling::None,
            });
        let ctx = Context::new(&self.model, &params).map_err(|e| match e {
            llama::ContextError::Rpc(lost) => EngineError::Rpc(cause(lost)),
            e => EngineError::Session(cause(e)),
        })?;
        // Each token of a multi-sequence batch belongs to one sequence: one id per entry is enough.
        let batch = Batch::new(ctx.n_batch() as usize, 1).map_err(|e| EngineError::Session(cause(e)))?;
        let mut session = SourceSession { ctx, batch, adapters: self.adapters() };
        super::apply_session_scales(&mut session, scales)?;
        Ok(session)
    }
}

#[derive(Debug)]
pub struct SourceSession<'m> {
    ctx: Context<'m>,
    batch: Batch,
    /// The model's LoRA adapters, which [`BackendSession::set_adapter_scales`] applies.
    adapters: &'m [LoraAdapter<'m>],
}

impl<'m> BackendSession for SourceSession<'m> {
    type Sampler = Sampler<'m>;
    type Checkpoint = llama::RecurrentCheckpoint;

    fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    fn n_batch(&self) -> u32 {
        self.ctx.n_batch()
    }

    fn fill(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.batch.clear();
        self.batch
            .add_sequence(tokens(ids), start, 0, if outputs == Outputs::Last { Output::Compute } else { Output::Skip })
            .map_err(|e| EngineError::decode(DecodeFailure::InvalidBatch, e))
    }

    fn decode(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.fill(ids, start, outputs)?;
        self.ctx.decode(&self.batch).map_err(decode_error)
    }

    fn last_logits(&self) -> Result<&[f32], EngineError> {
        self.ctx.last_logits().map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn set_abort_flag(&mut self, flag: Arc<AtomicBool>) {
        self.ctx.set_abort_flag(Some(flag));
    }

    fn synchronize(&self) {
        self.ctx.synchronize();
    }

    fn sequence_embedding(&self, seq: i32) -> Result<Vec<f32>, EngineError> {
        self.ctx.sequence_embeddings(seq).map(<[f32]>::to_vec).map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn token_embedding(&self, index: i32) -> Result<Vec<f32>, EngineError> {
        self.ctx.embeddings(index).map(<[f32]>::to_vec).map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn batch_clear(&mut self) {
        self.batch.clear();
    }

    fn batch_push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Result<(), EngineError> {
        self.batch
            .add(token.into(), pos, &[seq], if output { Output::Compute } else { Output::Skip })
            .map_err(|e| EngineError::decode(DecodeFailure::InvalidBatch, e))
    }

    fn batch_len(&self) -> usize {
        self.batch.len()
    }

    fn batch_decode(&mut self) -> Result<(), EngineError> {
        self.ctx.decode(&self.batch).map_err(decode_error)
    }

    fn sample_with(&mut self, sampler: &mut Sampler<'m>, index: i32) -> Result<Token, EngineError> {
        sampler.sample(&self.ctx, index).map(Token::from).map_err(|e| EngineError::Sampler(cause(e)))
    }

    fn sample_listing(&mut self, sampler: &mut Sampler<'m>, index: i32, n: usize) -> Result<crate::TokenLogprobs, EngineError> {
        let drawn = sampler.sample_listing(&self.ctx, index, n).map_err(|e| EngineError::Sampler(cause(e)))?;
        Ok(crate::TokenLogprobs {
            token: drawn.token.into(),
            logprob: drawn.p.ln(),
            top: drawn.top.into_iter().map(|(t, p)| (t.into(), p.ln())).collect(),
        })
    }

    fn logits_at(&self, index: i32) -> Result<&[f32], EngineError> {
        self.ctx.logits(index).map_err(|e| EngineError::decode(DecodeFailure::NoOutput, e))
    }

    fn seq_truncate(&mut self, seq: i32, from: i32) -> bool {
        self.ctx.remove_range(seq, from, -1).unwrap_or(false)
    }

    fn seq_clear(&mut self, seq: i32) {
        let _ = self.ctx.remove_range(seq, -1, -1);
    }

    fn seq_copy(&mut self, src: i32, dst: i32) -> bool {
        self.ctx.copy_range(src, dst, -1, -1).is_ok()
    }

    fn memory_is_recurrent(&self) -> bool {
        self.ctx.model().has_recurrent_state()
    }

    fn rollback_limit(&self) -> Option<usize> {
        self.memory_is_recurrent().then(|| self.ctx.recurrent_snapshots() as usize)
    }

    fn seq_checkpoint(&mut self, seq: i32) -> Option<(llama::RecurrentCheckpoint, usize)> {
        let checkpoint = self.ctx.save_recurrent_checkpoint(seq).ok()?;
        let size = checkpoint.size();
        Some((checkpoint, size))
    }

    fn keeps_checkpoints(&self) -> bool {
        self.memory_is_recurrent()
    }

    fn seq_restore_checkpoint(&mut self, seq: i32, checkpoint: &llama::RecurrentCheckpoint) -> bool {
        self.ctx.restore_recurrent_checkpoint(seq, checkpoint).is_ok()
    }

    fn seq_save_file(&mut self, seq: i32, path: &Path, tokens: &[Token]) -> Result<u64, EngineError> {
        let tokens = self::tokens(tokens);
        self.ctx.save_sequence_state_file(seq, path, tokens).map_err(|e| EngineError::slot_file(SlotFileAction::Save, path, e))?;
        Ok(super::file_len(path))
    }

    fn seq_load_file(&mut self, seq: i32, path: &Path, max_tokens: usize) -> Result<Vec<Token>, EngineError> {
        let tokens =
            self.ctx.load_sequence_state_file(seq, path, max_tokens).map_err(|e| EngineError::slot_file(SlotFileAction::Restore, path, e))?;
        Ok(into_ids(tokens))
    }

    fn seq_state(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
        self.ctx.save_sequence_state(seq).map_err(|e| EngineError::state(SlotFileAction::Save, e))
    }

    fn seq_load_state(&mut self, seq: i32, state: &[u8]) -> Result<usize, EngineError> {
        let fail = |e: String| EngineError::state(SlotFileAction::Restore, e);
        self.ctx.load_sequence_state(state, seq).map_err(|e| fail(e.to_string()))?;
        Ok(self.ctx.max_position(seq).map_err(|e| fail(e.to_string()))?.map_or(0, |last| last as usize + 1))
    }

    fn set_adapter_scales(&mut self, scales: &[f32]) -> Result<(), EngineError> {
        let applied: Vec<(&LoraAdapter<'m>, f32)> = super::applied_adapters(self.adapters, scales).collect();
        self.ctx.set_lora_adapters(&applied).map_err(|e| EngineError::Session(cause(e)))
    }
}

fn decode_error(e: llama::DecodeError) -> EngineError {
    match e {
        llama::DecodeError::Aborted => EngineError::Cancelled,
        llama::DecodeError::Rpc(lost) => EngineError::Rpc(cause(lost)),
        e @ llama::DecodeError::NoKvSlot => EngineError::decode(DecodeFailure::NoKvSlot, e),
        e @ (llama::DecodeError::Rejected { .. } | llama::DecodeError::Exception(_)) => EngineError::decode(DecodeFailure::Internal, e),
        e => EngineError::decode(DecodeFailure::InvalidBatch, e),
    }
}

/// The sampler these parameters ask for; a grammar that does not parse is
/// [`EngineError::Grammar`].
fn build_sampler<'m>(model: &'m Model, p: &SamplingParams) -> Result<Sampler<'m>, EngineError> {
    p.validate_for(model.vocab().n_tokens())?;
    chain(p).build(model).map_err(|e| match e {
        e @ llama::SamplerError::Grammar { .. } => EngineError::Grammar(cause(e)),
        e => EngineError::Sampler(cause(e)),
    })
}

/// The engine's sampling parameters as a chain of the safe wrapper's stages, the grammar as
/// its constraint.
fn chain(p: &SamplingParams) -> SamplerChain {
    let chain = p.stages().into_iter().fold(SamplerChain::new(), |chain, stage| match stage {
        SamplerStage::LogitBias(biases) => chain.logit_bias(&biases.iter().map(|&(t, b)| (t.into(), b)).collect::<Vec<_>>()),
        SamplerStage::Penalties { last_n, repeat, frequency, presence } => {
            // SamplingParams::validate refused a last_n below -1 before the chain was built.
            let window = PenaltyWindow::from_last_n(last_n).unwrap_or(PenaltyWindow::Off);
            chain.penalties(Penalties::default().window(window).repeat(repeat).frequency(frequency).presence(presence))
        }
        SamplerStage::TopK(k) => chain.top_k(k),
        SamplerStage::TopP(p) => chain.top_p(p, 1),
        SamplerStage::MinP(p) => chain.min_p(p, 1),
        SamplerStage::Temp(t) => chain.temp(t),
        SamplerStage::Dist(seed) => chain.dist(seed),
        SamplerStage::Greedy => chain.greedy(),
    });
    let Some(grammar) = &p.grammar else { return chain };
    match &p.grammar_start {
        GrammarStart::Immediately => chain.constrain(grammar, "root"),
        GrammarStart::AfterPrefill(tokens) => chain.constrain(grammar, "root").prefill_constraint(self::tokens(tokens)),
        GrammarStart::Lazy { patterns, tokens } => {
            let triggers = llama::GrammarTriggers { patterns: patterns.clone(), tokens: self::tokens(tokens).to_vec() };
            chain.constrain_lazy(grammar, "root", triggers)
        }
    }
}

fn kv_type(t: crate::CacheType) -> llama::KvType {
    use crate::CacheType as C;
    use llama::KvType as K;
    match t {
        C::F32 => K::F32,
        C::F16 => K::F16,
        C::Bf16 => K::Bf16,
        C::Q8_0 => K::Q8_0,
        C::Q4_0 => K::Q4_0,
        C::Q4_1 => K::Q4_1,
        C::Iq4Nl => K::Iq4Nl,
        C::Q5_0 => K::Q5_0,
        C::Q5_1 => K::Q5_1,
    }
}
