//! Backend `raw`: our llama.cpp build driven by raw llama-sys calls, with no safe wrapper in
//! between. It exists for bench-compare's `B-raw` variant. In the tests that do not sample
//! (ppN, tgN) the difference between `B` and `B-raw` is what the `llama` crate and its checks
//! cost; in e2e it also holds the sampling lever, since this backend samples the way a plain
//! llama.cpp program does (`llama_sampler_sample`, a candidate for every token) while `B`'s
//! sampler preselects the top k from the logits row.

use std::ffi::{CStr, CString, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_sys as sys;

use super::{Backend, BackendModel, BackendSession, BuildInfo, ModelInfo, Outputs, Token};
use crate::config::{EngineConfig, LoadOptions, LoadProgress, SamplerStage, SamplingParams, SessionConfig};
use crate::error::{DecodeFailure, EngineError, SlotFileAction, cause};

#[derive(Debug)]
/// Backend `raw`: our llama.cpp build through raw llama-sys calls, with no safe wrapper in between.
pub struct RawBackend;

/// Runs a llama.cpp call through llama-sys' exception guard (`exsa_*`): a C++ exception becomes
/// an error instead of unwinding into Rust, which would abort.
fn guarded(function: &str, call: impl FnOnce(*mut sys::exsa_error) -> i32) -> Result<(), EngineError> {
    let mut err = sys::exsa_error::new();
    if call(&mut err) == sys::EXSA_OK as i32 {
        return Ok(());
    }
    Err(EngineError::decode(DecodeFailure::Internal, format!("llama.cpp threw a C++ exception in {function}: {}", err.what())))
}

fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // SAFETY: the callback is a plain `extern "C" fn` that lives for the program and never
        // unwinds; it takes no user data.
        unsafe { sys::llama_log_set(Some(forward_log), std::ptr::null_mut()) };
        // SAFETY: one-time global initialisation.
        unsafe { sys::llama_backend_init() }
    });
}

/// llama.cpp's lowest forwarded level, as ggml numbers levels (DEBUG 1 .. ERROR 4; 5 = off).
static MIN_LOG_LEVEL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(sys::GGML_LOG_LEVEL_WARN);
/// The level of the last line, for continuation pieces (GGML_LOG_LEVEL_CONT).
static LAST_LOG_LEVEL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(sys::GGML_LOG_LEVEL_WARN);

/// llama.cpp's log into `tracing` (target `llama_cpp`), as the `llama` crate does for `source`.
extern "C" fn forward_log(level: sys::ggml_log_level, text: *const std::ffi::c_char, _: *mut std::ffi::c_void) {
    use std::sync::atomic::Ordering::Relaxed;
    let level = if level == sys::GGML_LOG_LEVEL_CONT { LAST_LOG_LEVEL.load(Relaxed) } else { level };
    LAST_LOG_LEVEL.store(level, Relaxed);
    if level < MIN_LOG_LEVEL.load(Relaxed) || text.is_null() {
        return;
    }
    // Nothing may unwind into C: a panicking subscriber costs the line, not the process.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
        let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
        let text = text.trim_end();
        match level {
            sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama_cpp", "{text}"),
            sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama_cpp", "{text}"),
            sys::GGML_LOG_LEVEL_INFO => tracing::info!(target: "llama_cpp", "{text}"),
            _ => tracing::debug!(target: "llama_cpp", "{text}"),
        }
    });
}

impl Backend for RawBackend {
    const NAME: &'static str = "raw";
    type Model = RawModel;

    fn set_llama_log_level(level: super::LogLevel) {
        use super::LogLevel as L;
        let min = match level {
            L::Debug => sys::GGML_LOG_LEVEL_DEBUG,
            L::Info => sys::GGML_LOG_LEVEL_INFO,
            L::Warn => sys::GGML_LOG_LEVEL_WARN,
            L::Error => sys::GGML_LOG_LEVEL_ERROR,
            L::Off => sys::GGML_LOG_LEVEL_CONT,
        };
        MIN_LOG_LEVEL.store(min, std::sync::atomic::Ordering::Relaxed);
        init();
    }

    fn load(config: &EngineConfig) -> Result<RawModel, EngineError> {
        let (path, placement) = (config.model.as_path(), &config.placement);
        placement.local_only(Self::NAME)?;
        let scales = config.adapter_scales()?;
        let n_gpu_layers = placement.n_gpu_layers;
        init();
        let c_path = c_path(path).ok_or_else(|| EngineError::load(path, "the path contains a NUL byte"))?;
        let mut progress = config.load.progress.as_ref().map(|callback| Progress { callback, outcome: Default::default() });
        // SAFETY: default params by value; the path is NUL-terminated and outlives the call; the
        // progress callback's user data is `progress`, alive (and not otherwise touched) until
        // the call returns, and the trampoline matches llama_progress_callback and never unwinds.
        let raw = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = n_gpu_layers;
            p.load_mode = load_mode(&config.load, p.load_mode);
            if let Some(progress) = &mut progress {
                p.progress_callback = Some(progress_trampoline);
                p.progress_callback_user_data = std::ptr::from_mut(progress).cast::<c_void>();
            }
            sys::llama_model_load_from_file(c_path.as_ptr(), p)
        };
        // As the llama crate does (its src/openmp.rs): the load's OpenMP team, if any, ends here.
        // SAFETY: no arguments; ends only this thread's team, outside any parallel region.
        unsafe { sys::exsa_openmp_release_team() };
        let (cancelled, panic) = progress.map_or((false, None), |p| (p.outcome.cancelled, p.outcome.panic));
        if let Some(panic) = panic {
            if let Some(raw) = NonNull::new(raw) {
                // SAFETY: a model we own and nobody else has seen.
                unsafe { sys::llama_model_free(raw.as_ptr()) };
            }
            std::panic::resume_unwind(panic);
        }
        let raw = NonNull::new(raw)
            .ok_or_else(|| if cancelled { EngineError::load_cancelled(path) } else { EngineError::load(path, "llama.cpp could not load it") })?;
        // SAFETY: the vocab belongs to the live model.
        let vocab = unsafe { sys::llama_model_get_vocab(raw.as_ptr()) };
        // Owned from here: on an adapter's failure, the drop frees the model and the adapters
        // loaded before it.
        let mut model = RawModel { raw, vocab, path: path.display().to_string(), adapters: Vec::new(), invocations: Vec::new(), scales };
        for lora in &config.lora {
            let adapter = model.load_adapter(&lora.path)?;
            model.adapters.push(adapter);
            model.invocations.push(alora_invocation(adapter));
        }
        Ok(model)
    }

    fn build_info() -> BuildInfo {
        BuildInfo::from_json("raw", &sys::BUILD_INFO.to_json())
    }

    fn system_info() -> String {
        init();
        // SAFETY: a static NUL-terminated string.
        unsafe { CStr::from_ptr(sys::llama_print_system_info()) }.to_string_lossy().into_owned()
    }
}

/// `path` as C reads it.
fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

/// llama.cpp's load mode for `options` (`default`: llama.cpp's own, which maps the file where it
/// can), as the llama crate's `ModelParams` sets it.
fn load_mode(options: &LoadOptions, default: sys::llama_load_mode) -> sys::llama_load_mode {
    match (options.mmap, options.mlock) {
        (true, false) => default,
        (true, true) => sys::LLAMA_LOAD_MODE_MMAP_MLOCK,
        (false, true) => sys::LLAMA_LOAD_MODE_MLOCK,
        (false, false) => sys::LLAMA_LOAD_MODE_NONE,
    }
}

/// A load's progress callback and what became of it, for [`progress_trampoline`].
struct Progress<'a> {
    callback: &'a LoadProgress,
    outcome: super::GuardedProgress,
}

/// llama.cpp's progress callback: calls the engine's, catching a panic (unwinding into C is
/// undefined), which cancels the load.
///
/// # Safety
/// `user` must point to a live `Progress` that nothing else touches during the call.
unsafe extern "C" fn progress_trampoline(progress: f32, user: *mut c_void) -> bool {
    // SAFETY: `user` is the Progress that RawBackend::load passed with this callback, alive for
    // the load that calls it, on the loading thread, and not touched by anything else meanwhile
    // (the function's contract).
    let state = unsafe { &mut *user.cast::<Progress<'_>>() };
    state.outcome.call(state.callback, progress)
}

#[derive(Debug)]
pub struct RawModel {
    raw: NonNull<sys::llama_model>,
    vocab: *const sys::llama_vocab,
    path: String,
    /// The LoRA adapters loaded for the model ([`EngineConfig::lora`]), freed before it.
    adapters: Vec<NonNull<sys::llama_adapter_lora>>,
    /// Each adapter's activated-LoRA invocation (empty for a plain adapter).
    invocations: Vec<Vec<Token>>,
    /// The engine's scales, one per adapter.
    scales: Vec<f32>,
}

// SAFETY: a loaded llama_model is read-only; llama.cpp supports sharing it across threads. Its
// adapters are read-only too once loaded; the model's set of adapters, which loading and freeing
// one changes, is only changed at load (before the model is shared) and on drop (by its owner).
unsafe impl Send for RawModel {}
// SAFETY: as above.
unsafe impl Sync for RawModel {}

impl Drop for RawModel {
    fn drop(&mut self) {
        // SAFETY: sessions borrow the model, so none is alive, and none applies an adapter; each
        // adapter belongs to this model and is freed once, before the model.
        unsafe {
            for adapter in self.adapters.drain(..) {
                sys::llama_adapter_lora_free(adapter.as_ptr());
            }
            sys::llama_model_free(self.raw.as_ptr());
        }
    }
}

impl RawModel {
    /// Loads the LoRA adapter at `path` for this model (while nothing else uses it: at load).
    fn load_adapter(&mut self, path: &Path) -> Result<NonNull<sys::llama_adapter_lora>, EngineError> {
        super::check_adapter_file(path)?;
        let c_path = c_path(path).ok_or_else(|| EngineError::lora(path, "the path contains a NUL byte"))?;
        let (mut adapter, mut err) = (std::ptr::null_mut(), sys::exsa_error::new());
        // SAFETY: the model is live and not shared yet (`&mut self`); the path is NUL-terminated;
        // `adapter` and `err` are live out-parameters. The guard catches a C++ exception.
        let status = unsafe { sys::exsa_adapter_lora_init(self.raw.as_ptr(), c_path.as_ptr(), &mut adapter, &mut err) };
        if status != sys::EXSA_OK as i32 {
            return Err(EngineError::lora(path, format!("llama.cpp threw a C++ exception: {}", err.what())));
        }
        NonNull::new(adapter).ok_or_else(|| EngineError::lora(path, "llama.cpp could not load it (not a LoRA adapter, or one for another model)"))
    }
}

/// An adapter's activated-LoRA invocation tokens, copied out (empty for a plain adapter).
fn alora_invocation(adapter: NonNull<sys::llama_adapter_lora>) -> Vec<Token> {
    // SAFETY: reads a field of a live adapter, read-only once loaded.
    let n = unsafe { sys::llama_adapter_get_alora_n_invocation_tokens(adapter.as_ptr()) };
    // SAFETY: as above.
    let tokens = unsafe { sys::llama_adapter_get_alora_invocation_tokens(adapter.as_ptr()) };
    let Ok(n) = usize::try_from(n) else { return Vec::new() };
    if n == 0 || tokens.is_null() {
        return Vec::new();
    }
    // SAFETY: the adapter owns `n` tokens at `tokens` (its invocation vector, whose size fits
    // memory), read-only and alive while the adapter is; copied out here.
    unsafe { std::slice::from_raw_parts(tokens, n) }.iter().map(|&t| Token(t)).collect()
}

fn snprintf(mut f: impl FnMut(*mut std::ffi::c_char, usize) -> i32) -> Option<String> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = f(buf.as_mut_ptr().cast(), buf.len());
        if n < 0 {
            return None;
        }
        if (n as usize) < buf.len() {
            buf.truncate(n as usize);
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n as usize + 1, 0);
    }
}

impl BackendModel for RawModel {
    type Session<'m> = RawSession<'m>;

    fn info(&self) -> ModelInfo {
        let m = self.raw.as_ptr();
        let meta = |key: &CStr| {
            // SAFETY: snprintf contract on a live model.
            snprintf(|b, l| unsafe { sys::llama_model_meta_val_str(m, key.as_ptr(), b, l) }).unwrap_or_default()
        };
        // SAFETY: field reads of a live model.
        unsafe {
            ModelInfo {
                path: self.path.clone(),
                description: snprintf(|b, l| sys::llama_model_desc(m, b, l)).unwrap_or_default(),
                architecture: meta(c"general.architecture"),
                n_params: sys::llama_model_n_params(m),
                size_bytes: sys::llama_model_size(m),
                n_vocab: sys::llama_vocab_n_tokens(self.vocab),
                n_ctx_train: sys::llama_model_n_ctx_train(m).max(0) as u32,
                n_embd: sys::llama_model_n_embd(m).max(0) as usize,
                has_chat_template: !sys::llama_model_chat_template(m, std::ptr::null()).is_null(),
                placement: Vec::new(),
            }
        }
    }

    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool, out: &mut Vec<Token>) -> Result<(), EngineError> {
        let len = i32::try_from(text.len())
            .map_err(|_| EngineError::Tokenize(cause(format!("a text of {} bytes is more than llama_tokenize takes", text.len()))))?;
        out.clear();
        out.reserve(text.len() + 2);
        // Twice at most: a negative count is the room needed.
        for _ in 0..2 {
            let cap = i32::try_from(out.capacity()).unwrap_or(i32::MAX);
            let mut n = 0;
            // SAFETY: text readable for len bytes; out has `cap` writable slots (Token is
            // repr(transparent) over llama_token); `n` and the error slot are live out-parameters.
            guarded("llama_tokenize", |err| unsafe {
                sys::exsa_tokenize(self.vocab, text.as_ptr().cast(), len, out.as_mut_ptr().cast(), cap, add_special, parse_special, &mut n, err)
            })?;
            if n >= 0 {
                // SAFETY: llama.cpp wrote n tokens.
                unsafe { out.set_len(n as usize) };
                return Ok(());
            }
            if n == i32::MIN {
                break;
            }
            out.reserve(n.unsigned_abs() as usize);
        }
        Err(EngineError::Tokenize(cause("llama_tokenize failed")))
    }

    fn piece(&self, token: Token, special: bool, out: &mut Vec<u8>) -> Result<(), EngineError> {
        if !token.in_vocab(self.n_vocab()) {
            return Err(EngineError::Tokenize(cause(format!("token {token} is outside the vocabulary"))));
        }
        let mut buf = [0u8; 256];
        let mut n = 0;
        // SAFETY: buf is writable for its length; the token is in range.
        guarded("llama_token_to_piece", |err| unsafe {
            sys::exsa_token_to_piece(self.vocab, token.0, buf.as_mut_ptr().cast(), buf.len() as i32, 0, special, &mut n, err)
        })?;
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
            return Ok(());
        }
        // Longer than the stack buffer: -n is its length.
        let start = out.len();
        out.resize(start + n.unsigned_abs() as usize, 0);
        let mut again = 0;
        // SAFETY: out has -n writable bytes from `start`.
        guarded("llama_token_to_piece", |err| unsafe {
            sys::exsa_token_to_piece(self.vocab, token.0, out[start..].as_mut_ptr().cast(), -n, 0, special, &mut again, err)
        })?;
        out.truncate(start + again.max(0) as usize);
        Ok(())
    }

    fn is_eog(&self, token: Token) -> bool {
        // SAFETY: a set look-up.
        unsafe { sys::llama_vocab_is_eog(self.vocab, token.0) }
    }

    fn bos(&self) -> Token {
        // SAFETY: field read.
        Token(unsafe { sys::llama_vocab_bos(self.vocab) })
    }

    fn fim_tokens(&self) -> crate::FimTokens {
        let n_vocab = self.n_vocab();
        // LLAMA_TOKEN_NULL (-1) where the vocabulary has none.
        let some = |t: i32| Some(Token(t)).filter(|t| t.in_vocab(n_vocab));
        // SAFETY: field reads of the live vocab.
        unsafe {
            crate::FimTokens {
                prefix: some(sys::llama_vocab_fim_pre(self.vocab)),
                suffix: some(sys::llama_vocab_fim_suf(self.vocab)),
                middle: some(sys::llama_vocab_fim_mid(self.vocab)),
                repository: some(sys::llama_vocab_fim_rep(self.vocab)),
                separator: some(sys::llama_vocab_fim_sep(self.vocab)),
            }
        }
    }

    fn n_vocab(&self) -> i32 {
        // SAFETY: field read.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) }
    }

    fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        // SAFETY: snprintf contract on a live model; the key is NUL-terminated.
        snprintf(|b, l| unsafe { sys::llama_model_meta_val_str(self.raw.as_ptr(), key.as_ptr(), b, l) })
    }

    fn adapter_meta(&self, adapter: usize, key: &str) -> Option<String> {
        let adapter = self.adapters.get(adapter)?;
        let key = CString::new(key).ok()?;
        // SAFETY: snprintf contract on a live adapter of this model (freed with it), whose
        // metadata is read-only once loaded; the key is NUL-terminated.
        snprintf(|b, l| unsafe { sys::llama_adapter_meta_val_str(adapter.as_ptr(), key.as_ptr(), b, l) })
    }

    fn adapter_invocation(&self, adapter: usize) -> &[Token] {
        self.invocations.get(adapter).map_or(&[], Vec::as_slice)
    }

    fn named_template(&self, name: &str) -> Option<String> {
        let name = CString::new(name).ok()?;
        // SAFETY: null or a NUL-terminated string owned by the model; the name is NUL-terminated.
        let p = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), name.as_ptr()) };
        // SAFETY: as above.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    fn pair_tokens(&self) -> crate::token::PairTokens {
        let n_vocab = self.n_vocab();
        // LLAMA_TOKEN_NULL (-1) where the vocabulary has none.
        let some = |t: i32| Some(Token(t)).filter(|t| t.in_vocab(n_vocab));
        // SAFETY: field reads of the live vocab.
        unsafe {
            let sep = some(sys::llama_vocab_sep(self.vocab));
            crate::token::PairTokens {
                bos: sys::llama_vocab_get_add_bos(self.vocab).then(|| Token(sys::llama_vocab_bos(self.vocab))),
                eos: if sys::llama_vocab_get_add_eos(self.vocab) { some(sys::llama_vocab_eos(self.vocab)).or(sep) } else { None },
                sep: if sys::llama_vocab_get_add_sep(self.vocab) { sep } else { None },
            }
        }
    }

    fn chat_template(&self) -> Option<String> {
        // SAFETY: null or a NUL-terminated string owned by the model.
        let p = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), std::ptr::null()) };
        // SAFETY: as above.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    fn apply_chat_template(&self, template: &str, messages: &[(String, String)]) -> Result<String, EngineError> {
        let nul = |_| EngineError::ChatTemplate(cause("NUL byte in the chat"));
        let tmpl = CString::new(template).map_err(nul)?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|(r, c)| Ok((CString::new(r.as_str())?, CString::new(c.as_str())?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .map_err(nul)?;
        let chat: Vec<sys::llama_chat_message> =
            owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
        let mut buf = vec![0u8; 4096];
        loop {
            let mut n = 0;
            // SAFETY: chat points into `owned`; buf writable for its length.
            guarded("llama_chat_apply_template", |err| unsafe {
                sys::exsa_chat_apply_template(tmpl.as_ptr(), chat.as_ptr(), chat.len(), true, buf.as_mut_ptr().cast(), buf.len() as i32, &mut n, err)
            })?;
            if n < 0 {
                return Err(EngineError::ChatTemplate(cause(format!("template {template:?} could not be applied"))));
            }
            if n as usize <= buf.len() {
                buf.truncate(n as usize);
                return String::from_utf8(buf).map_err(|_| EngineError::ChatTemplate(cause("not UTF-8")));
            }
            buf.resize(n as usize, 0);
        }
    }

    fn sampler(&self, p: &SamplingParams) -> Result<RawSampler, EngineError> {
        p.validate_for(self.n_vocab())?;
        if p.grammar.is_some() {
            return Err(EngineError::Unsupported { what: "grammars", backend: "raw" });
        }
        // SAFETY: the chain takes ownership of each stage as it is added; RawSampler owns the
        // chain from here and frees it once.
        let chain = unsafe { sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params()) };
        let sampler = RawSampler(NonNull::new(chain).ok_or_else(|| EngineError::Sampler(cause("llama.cpp could not make a sampler chain")))?);
        for stage in p.stages() {
            // SAFETY: each init returns a new stage (or null, refused below) that the chain adopts.
            let stage = unsafe {
                match stage {
                    SamplerStage::LogitBias(biases) => {
                        let biases: Vec<sys::llama_logit_bias> =
                            biases.iter().map(|&(token, bias)| sys::llama_logit_bias { token: token.0, bias }).collect();
                        sys::llama_sampler_init_logit_bias(self.n_vocab(), biases.len() as i32, biases.as_ptr())
                    }
                    SamplerStage::Penalties { last_n, repeat, frequency, presence } => {
                        let last_n = super::penalty_window(last_n, sys::llama_model_n_ctx_train(self.raw.as_ptr()));
                        sys::llama_sampler_init_penalties(self.n_vocab(), last_n, repeat, frequency, presence)
                    }
                    SamplerStage::TopK(k) => sys::llama_sampler_init_top_k(k),
                    SamplerStage::TopP(p) => sys::llama_sampler_init_top_p(p, 1),
                    SamplerStage::MinP(p) => sys::llama_sampler_init_min_p(p, 1),
                    SamplerStage::Temp(t) => sys::llama_sampler_init_temp(t),
                    SamplerStage::Dist(seed) => sys::llama_sampler_init_dist(seed),
                    SamplerStage::Greedy => sys::llama_sampler_init_greedy(),
                }
            };
            if stage.is_null() {
                return Err(EngineError::Sampler(cause("llama.cpp could not make a sampler stage")));
            }
            // SAFETY: the live chain adopts the new stage.
            unsafe { sys::llama_sampler_chain_add(sampler.0.as_ptr(), stage) };
        }
        Ok(sampler)
    }

    fn session(&self, config: &SessionConfig) -> Result<RawSession<'_>, EngineError> {
        let scales = config.lora_scales_for(&self.scales)?;
        // SAFETY: default params by value, then a context over the live model.
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = config.n_ctx;
            p.n_batch = config.n_batch;
            p.n_ubatch = config.n_ubatch;
            p.n_threads = config.n_threads;
            p.n_threads_batch = config.n_threads_batch;
            p.n_seq_max = config.n_seq_max;
            p.kv_unified = config.n_seq_max > 1;
            p.embeddings = config.embeddings;
            if config.embeddings {
                p.pooling_type = match config.pooling {
                    None => sys::LLAMA_POOLING_TYPE_UNSPECIFIED,
                    Some(crate::Pooling::Mean) => sys::LLAMA_POOLING_TYPE_MEAN,
                    Some(crate::Pooling::Cls) => sys::LLAMA_POOLING_TYPE_CLS,
                    Some(crate::Pooling::Last) => sys::LLAMA_POOLING_TYPE_LAST,
                    Some(crate::Pooling::Rank) => sys::LLAMA_POOLING_TYPE_RANK,
                    Some(crate::Pooling::None) => sys::LLAMA_POOLING_TYPE_NONE,
                };
            }
            p.type_k = ggml_type(config.cache_type_k);
            p.type_v = ggml_type(config.cache_type_v);
            p.flash_attn_type = match config.flash_attention {
                crate::FlashAttention::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
                crate::FlashAttention::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                crate::FlashAttention::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            };
            sys::llama_init_from_model(self.raw.as_ptr(), p)
        };
        let ctx = NonNull::new(ctx).ok_or_else(|| EngineError::Session(cause("llama.cpp could not create the context")))?;
        // SAFETY: reads a field of the new context; allocates a batch freed in Drop.
        let (n_batch, n_ctx, batch) = unsafe {
            let n_batch = sys::llama_n_batch(ctx.as_ptr());
            (n_batch, sys::llama_n_ctx(ctx.as_ptr()), sys::llama_batch_init(n_batch as i32, 0, 1))
        };
        // Owned from here: on an error below, the drop frees the context and the batch.
        let mut session = RawSession { model: self, ctx, batch, n_batch, n_ctx, n_seq_max: config.n_seq_max as i32, abort: None, has_logits: false };
        super::apply_session_scales(&mut session, scales)?;
        Ok(session)
    }
}

#[derive(Debug)]
pub struct RawSession<'m> {
    model: &'m RawModel,
    ctx: NonNull<sys::llama_context>,
    batch: sys::llama_batch,
    n_batch: u32,
    n_ctx: u32,
    /// Sequences the context holds (llama.cpp asserts ids below this).
    n_seq_max: i32,
    abort: Option<Arc<AtomicBool>>,
    has_logits: bool,
}

impl Drop for RawSession<'_> {
    fn drop(&mut self) {
        // SAFETY: each object is ours and freed once.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ctx.as_ptr());
            // The session's OpenMP team on this thread, if any (see the load).
            sys::exsa_openmp_release_team();
        }
    }
}

extern "C" fn abort_trampoline(data: *mut c_void) -> bool {
    // SAFETY: data is the AtomicBool of the Arc the session keeps while it is installed.
    unsafe { &*data.cast::<AtomicBool>() }.load(Ordering::Relaxed)
}

/// A sampler chain of llama.cpp's, owned.
#[derive(Debug)]
pub struct RawSampler(NonNull<sys::llama_sampler>);

// SAFETY: the chain is owned outright, and every use of it takes &mut (sampling) or ownership
// (drop): it is never touched from two threads at once.
unsafe impl Send for RawSampler {}

impl Drop for RawSampler {
    fn drop(&mut self) {
        // SAFETY: the chain (with the stages it adopted) is ours and freed once.
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
    }
}

impl BackendSession for RawSession<'_> {
    type Sampler = RawSampler;
    /// No checkpoints: this binding does not save part of a sequence's memory (a recurrent state
    /// that cannot be cut is decoded again from its tokens).
    type Checkpoint = std::convert::Infallible;

    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn n_batch(&self) -> u32 {
        self.n_batch
    }

    fn fill(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        if ids.is_empty() || ids.len() > self.n_batch as usize {
            return Err(EngineError::decode(DecodeFailure::InvalidBatch, format!("{} tokens for a batch of {}", ids.len(), self.n_batch)));
        }
        // SAFETY: ids.len() <= n_batch, the capacity the batch was allocated with, with one
        // sequence id per token.
        unsafe {
            let b = &mut self.batch;
            for (i, &t) in ids.iter().enumerate() {
                *b.token.add(i) = t.0;
                *b.pos.add(i) = start + i as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = 0;
                *b.logits.add(i) = i8::from(outputs == Outputs::Last && i + 1 == ids.len());
            }
            b.n_tokens = ids.len() as i32;
        }
        Ok(())
    }

    fn decode(&mut self, ids: &[Token], start: i32, outputs: Outputs) -> Result<(), EngineError> {
        self.fill(ids, start, outputs)?;
        let mut code = 0;
        // SAFETY: the batch was filled within its allocation just above.
        guarded("llama_decode", |err| unsafe { sys::exsa_decode(self.ctx.as_ptr(), self.batch, &mut code, err) })?;
        self.has_logits = code == 0 && outputs == Outputs::Last;
        decode_result(code)
    }

    fn last_logits(&self) -> Result<&[f32], EngineError> {
        if !self.has_logits {
            return Err(EngineError::decode(DecodeFailure::NoOutput, "the last decode produced no logits"));
        }
        // SAFETY: the last decode produced logits for its last token; the row is n_vocab
        // floats, valid until the next decode, which needs &mut self.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), -1);
            if p.is_null() {
                return Err(EngineError::decode(DecodeFailure::NoOutput, "no logits"));
            }
            Ok(std::slice::from_raw_parts(p, self.model.n_vocab() as usize))
        }
    }

    fn set_abort_flag(&mut self, flag: Arc<AtomicBool>) {
        // SAFETY: the data pointer is kept alive by self.abort while installed.
        unsafe { sys::llama_set_abort_callback(self.ctx.as_ptr(), Some(abort_trampoline), Arc::as_ptr(&flag).cast_mut().cast()) };
        self.abort = Some(flag);
    }

    fn synchronize(&self) {
        // SAFETY: the live context; it waits for the backends and throws nothing.
        unsafe { sys::llama_synchronize(self.ctx.as_ptr()) }
    }

    fn sequence_embedding(&self, seq: i32) -> Result<Vec<f32>, EngineError> {
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(EngineError::decode(DecodeFailure::NoOutput, why));
        }
        // SAFETY: null or the pooled row of sequence `seq` (an id of this context, checked).
        let p = unsafe { sys::llama_get_embeddings_seq(self.ctx.as_ptr(), seq) };
        if p.is_null() {
            return Err(EngineError::decode(DecodeFailure::NoOutput, "no pooled embedding"));
        }
        // SAFETY: field reads of the live context and model. Pooled rows are n_embd_out floats,
        // n_cls_out for rank pooling, valid until the next decode, which needs &mut self.
        let width = unsafe {
            if sys::llama_pooling_type(self.ctx.as_ptr()) == sys::LLAMA_POOLING_TYPE_RANK {
                sys::llama_model_n_cls_out(self.model.raw.as_ptr()) as usize
            } else {
                sys::llama_model_n_embd_out(self.model.raw.as_ptr()).max(0) as usize
            }
        };
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts(p, width) }.to_vec())
    }

    fn token_embedding(&self, index: i32) -> Result<Vec<f32>, EngineError> {
        // SAFETY: a live context; llama.cpp checks the index against the last decode's outputs
        // (null, with its exception caught inside, for one that is not).
        let p = unsafe { sys::llama_get_embeddings_ith(self.ctx.as_ptr(), index) };
        if p.is_null() {
            return Err(EngineError::decode(DecodeFailure::NoOutput, format!("no embedding of batch token {index}")));
        }
        // SAFETY: a field read of the live model; a token's row is n_embd_out floats, valid
        // until the next decode, which needs &mut self.
        let width = unsafe { sys::llama_model_n_embd_out(self.model.raw.as_ptr()) }.max(0) as usize;
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts(p, width) }.to_vec())
    }

    fn batch_clear(&mut self) {
        self.batch.n_tokens = 0;
        self.has_logits = false;
    }

    fn batch_push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Result<(), EngineError> {
        let i = self.batch.n_tokens as usize;
        if i >= self.n_batch as usize {
            return Err(EngineError::decode(DecodeFailure::InvalidBatch, format!("the batch holds {} tokens", self.n_batch)));
        }
        // SAFETY: i < n_batch, the capacity the batch was allocated with, one sequence id each.
        unsafe {
            let b = &mut self.batch;
            *b.token.add(i) = token.0;
            *b.pos.add(i) = pos;
            *b.n_seq_id.add(i) = 1;
            **b.seq_id.add(i) = seq;
            *b.logits.add(i) = i8::from(output);
            b.n_tokens += 1;
        }
        Ok(())
    }

    fn batch_len(&self) -> usize {
        self.batch.n_tokens as usize
    }

    fn batch_decode(&mut self) -> Result<(), EngineError> {
        let mut code = 0;
        // SAFETY: every entry below n_tokens was written within the allocation by batch_push.
        guarded("llama_decode", |err| unsafe { sys::exsa_decode(self.ctx.as_ptr(), self.batch, &mut code, err) })?;
        decode_result(code)
    }

    fn sample_with(&mut self, sampler: &mut RawSampler, index: i32) -> Result<Token, EngineError> {
        // llama_sampler_sample aborts on an index without logits: ask for the row first, which
        // llama_get_logits_ith answers with null for such an index.
        self.logits_at(index)?;
        let mut token = 0;
        // SAFETY: batch entry `index` of the last decode has logits (checked just above); the
        // chain is ours (&mut), the context alive.
        guarded("llama_sampler_sample", |err| unsafe { sys::exsa_sampler_sample(sampler.0.as_ptr(), self.ctx.as_ptr(), index, &mut token, err) })?;
        Ok(Token(token))
    }

    fn sample_listing(&mut self, _: &mut Self::Sampler, _: i32, _: usize) -> Result<crate::TokenLogprobs, EngineError> {
        Err(EngineError::Unsupported { what: "post_sampling_probs (the sampler chain's candidates are not visible here)", backend: "raw" })
    }

    fn logits_at(&self, index: i32) -> Result<&[f32], EngineError> {
        // SAFETY: llama_get_logits_ith checks the index and returns null for one without
        // logits (release builds); a row is n_vocab floats, valid until the next decode.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), index);
            if p.is_null() {
                return Err(EngineError::decode(DecodeFailure::NoOutput, format!("no logits at batch index {index}")));
            }
            Ok(std::slice::from_raw_parts(p, self.model.n_vocab() as usize))
        }
    }

    fn seq_truncate(&mut self, seq: i32, from: i32) -> bool {
        // SAFETY: memory handle of the live context; llama.cpp checks the sequence id.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, from, -1) }
    }

    fn seq_clear(&mut self, seq: i32) {
        // SAFETY: as above.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, -1, -1) };
    }

    fn seq_copy(&mut self, src: i32, dst: i32) -> bool {
        if !(0..self.n_seq_max).contains(&src) || !(0..self.n_seq_max).contains(&dst) {
            return false;
        }
        // SAFETY: memory handle of the live context; both ids are below the context's n_seq_max
        // (checked above: llama.cpp asserts that), and a whole sequence (p0 = p1 = -1) may be
        // copied between any two streams.
        unsafe { sys::llama_memory_seq_cp(sys::llama_get_memory(self.ctx.as_ptr()), src, dst, -1, -1) };
        true
    }

    fn memory_is_recurrent(&self) -> bool {
        let m = self.model.raw.as_ptr();
        // SAFETY: reads fields of the live model this session borrows.
        unsafe { sys::llama_model_is_recurrent(m) || sys::llama_model_is_hybrid(m) }
    }

    fn seq_checkpoint(&mut self, _: i32) -> Option<(std::convert::Infallible, usize)> {
        None
    }

    fn seq_restore_checkpoint(&mut self, _: i32, checkpoint: &std::convert::Infallible) -> bool {
        match *checkpoint {}
    }

    fn seq_save_file(&mut self, seq: i32, path: &Path, tokens: &[Token]) -> Result<u64, EngineError> {
        let fail = |reason: String| EngineError::slot_file(SlotFileAction::Save, path, reason);
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(why));
        }
        let c_path = c_path(path).ok_or_else(|| fail("the path contains a NUL byte".into()))?;
        // SAFETY: live context; the id is below its n_seq_max (checked: llama.cpp asserts it);
        // the path is NUL-terminated; `tokens` is readable for its length (Token is
        // repr(transparent) over llama_token). llama_state_seq_save_file catches its own
        // exceptions (returns 0).
        let written = unsafe { sys::llama_state_seq_save_file(self.ctx.as_ptr(), c_path.as_ptr(), seq, tokens.as_ptr().cast(), tokens.len()) };
        if written == 0 {
            return Err(fail("llama.cpp could not write it".into()));
        }
        Ok(written as u64)
    }

    fn seq_load_file(&mut self, seq: i32, path: &Path, max_tokens: usize) -> Result<Vec<Token>, EngineError> {
        let fail = |reason: String| EngineError::slot_file(SlotFileAction::Restore, path, reason);
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(why));
        }
        let c_path = c_path(path).ok_or_else(|| fail("the path contains a NUL byte".into()))?;
        self.has_logits = false;
        let mut tokens: Vec<Token> = vec![Token(0); max_tokens];
        let (mut n, mut read) = (0usize, 0usize);
        guarded("llama_state_seq_load_file", |err| {
            // SAFETY: live context, checked id, NUL-terminated path; `tokens` has `max_tokens`
            // writable slots (of llama_token's layout) and llama.cpp writes at most that many
            // (it refuses a file of more); `n`, `read` and `err` are live out-parameters; the
            // shim catches C++ exceptions.
            unsafe {
                sys::exsa_state_seq_load_file(self.ctx.as_ptr(), c_path.as_ptr(), seq, tokens.as_mut_ptr().cast(), max_tokens, &mut n, &mut read, err)
            }
        })
        .map_err(|e| fail(e.to_string()))?;
        if read == 0 {
            return Err(fail("not a state file of this model and context, or the KV cache has no room for it".into()));
        }
        tokens.truncate(n.min(max_tokens));
        Ok(tokens)
    }

    fn seq_state(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
        let fail = |reason: String| EngineError::state(SlotFileAction::Save, reason);
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(why));
        }
        // SAFETY: size query on the live context for a checked id.
        let size = unsafe { sys::llama_state_seq_get_size(self.ctx.as_ptr(), seq) };
        if size == 0 {
            return Err(fail("the sequence holds nothing".into()));
        }
        let mut state = vec![0u8; size];
        // SAFETY: `state` is writable for `size` bytes; checked id. llama.cpp catches its own
        // exceptions here (returns 0).
        let written = unsafe { sys::llama_state_seq_get_data(self.ctx.as_ptr(), state.as_mut_ptr(), size, seq) };
        if written != size {
            return Err(fail(format!("llama.cpp wrote {written} bytes of {size}")));
        }
        Ok(state)
    }

    fn seq_load_state(&mut self, seq: i32, state: &[u8]) -> Result<usize, EngineError> {
        let fail = |reason: String| EngineError::state(SlotFileAction::Restore, reason);
        if let Some(why) = super::no_such_seq(seq, self.n_seq_max) {
            return Err(fail(why));
        }
        let mut read = 0usize;
        // A whole sequence's state (no partial flags), read through the shim: llama.cpp throws on
        // a damaged state.
        guarded("llama_state_seq_set_data", |err| {
            // SAFETY: `state` is readable for its length; checked id; `read` and `err` are live
            // out-parameters; the shim catches C++ exceptions.
            unsafe { sys::exsa_state_seq_set_data_ext(self.ctx.as_ptr(), state.as_ptr(), state.len(), seq, 0, &mut read, err) }
        })
        .map_err(|e| fail(e.to_string()))?;
        if read == 0 {
            return Err(fail("not a state of this model and context, or the KV cache has no room for it".into()));
        }
        if read != state.len() {
            return Err(fail(format!("llama.cpp read {read} of its {} bytes", state.len())));
        }
        // SAFETY: live context's memory, checked id.
        let last = unsafe { sys::llama_memory_seq_pos_max(sys::llama_get_memory(self.ctx.as_ptr()), seq) };
        Ok(usize::try_from(last + 1).unwrap_or(0))
    }

    fn set_adapter_scales(&mut self, scales: &[f32]) -> Result<(), EngineError> {
        let (mut adapters, mut scales): (Vec<_>, Vec<_>) =
            super::applied_adapters(&self.model.adapters, scales).map(|(a, s)| (a.as_ptr(), s)).unzip();
        let (mut code, mut err) = (0, sys::exsa_error::new());
        // SAFETY: the adapters belong to this context's model, which outlives the context (the
        // session borrows it), and are freed only with it; the two arrays are as long as the
        // count passed (none: llama.cpp clears the set without reading them); `code` and `err`
        // are live out-parameters. The guard catches a C++ exception.
        let status = unsafe {
            sys::exsa_set_adapters_lora(self.ctx.as_ptr(), adapters.as_mut_ptr(), adapters.len(), scales.as_mut_ptr(), &mut code, &mut err)
        };
        if status != sys::EXSA_OK as i32 {
            return Err(EngineError::Session(cause(format!("llama.cpp threw a C++ exception applying the LoRA adapters: {}", err.what()))));
        }
        if code != 0 {
            return Err(EngineError::Session(cause(format!("llama.cpp could not apply the LoRA adapters (code {code})"))));
        }
        Ok(())
    }
}

fn decode_result(code: i32) -> Result<(), EngineError> {
    match code {
        0 => Ok(()),
        2 => Err(EngineError::Cancelled),
        1 => Err(EngineError::decode(DecodeFailure::NoKvSlot, "llama_decode returned 1")),
        c => Err(EngineError::decode(DecodeFailure::Internal, format!("llama_decode returned {c}"))),
    }
}

fn ggml_type(t: crate::CacheType) -> sys::ggml_type {
    use crate::CacheType as C;
    match t {
        C::F32 => sys::GGML_TYPE_F32,
        C::F16 => sys::GGML_TYPE_F16,
        C::Bf16 => sys::GGML_TYPE_BF16,
        C::Q8_0 => sys::GGML_TYPE_Q8_0,
        C::Q4_0 => sys::GGML_TYPE_Q4_0,
        C::Q4_1 => sys::GGML_TYPE_Q4_1,
        C::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
        C::Q5_0 => sys::GGML_TYPE_Q5_0,
        C::Q5_1 => sys::GGML_TYPE_Q5_1,
    }
}
