//! A loaded model: weights (unless vocab-only), vocabulary and metadata.

use std::ffi::{CStr, CString, c_char, c_void};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{LlamaMessages, LoadError, LoadErrorKind};
use crate::vocab::Vocab;
use crate::{backend, gguf, sys};

/// How layers are spread over several GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitMode {
    /// Everything on `main_gpu`.
    None,
    /// Whole layers per GPU.
    #[default]
    Layer,
    /// Rows of each layer across GPUs.
    Row,
}

/// Parameters for [`Model::load`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ModelParams {
    /// Layers to offload to the GPU; negative means all. Ignored without a GPU backend.
    pub n_gpu_layers: i32,
    /// How layers are spread over several GPUs.
    pub split_mode: SplitMode,
    /// The GPU used for the whole model (SplitMode::None) or for intermediate results.
    pub main_gpu: i32,
    /// Map the file instead of reading it (llama.cpp's default where supported).
    pub use_mmap: bool,
    /// Lock the weights in RAM.
    pub use_mlock: bool,
    /// Load only the vocabulary: tokenize and detokenize, but no context can run.
    pub vocab_only: bool,
    /// ggml rpc-servers (`HOST:PORT`) whose devices take offloaded layers beside the local GPUs
    /// (see [`crate::rpc`]); the layers not offloaded stay on the local CPU.
    pub rpc_servers: Vec<String>,
    /// How offloaded layers are shared among the devices (local GPUs first, then the servers'
    /// in the order given), as proportions; empty: by each device's free memory.
    pub tensor_split: Vec<f32>,
}

impl Default for ModelParams {
    fn default() -> Self {
        backend::init();
        // SAFETY: returns a struct by value; no pointers are retained.
        let d = unsafe { sys::llama_model_default_params() };
        ModelParams {
            n_gpu_layers: d.n_gpu_layers,
            split_mode: SplitMode::Layer,
            main_gpu: d.main_gpu,
            use_mmap: d.load_mode != sys::LLAMA_LOAD_MODE_NONE,
            use_mlock: false,
            vocab_only: false,
            rpc_servers: Vec::new(),
            tensor_split: Vec::new(),
        }
    }
}

impl ModelParams {
    /// Sets [`ModelParams::n_gpu_layers`].
    #[must_use]
    pub fn n_gpu_layers(mut self, n_gpu_layers: i32) -> Self {
        self.n_gpu_layers = n_gpu_layers;
        self
    }

    /// Sets [`ModelParams::split_mode`].
    #[must_use]
    pub fn split_mode(mut self, split_mode: SplitMode) -> Self {
        self.split_mode = split_mode;
        self
    }

    /// Sets [`ModelParams::main_gpu`].
    #[must_use]
    pub fn main_gpu(mut self, main_gpu: i32) -> Self {
        self.main_gpu = main_gpu;
        self
    }

    /// Sets [`ModelParams::use_mmap`].
    #[must_use]
    pub fn use_mmap(mut self, use_mmap: bool) -> Self {
        self.use_mmap = use_mmap;
        self
    }

    /// Sets [`ModelParams::use_mlock`].
    #[must_use]
    pub fn use_mlock(mut self, use_mlock: bool) -> Self {
        self.use_mlock = use_mlock;
        self
    }

    /// Sets [`ModelParams::vocab_only`].
    #[must_use]
    pub fn vocab_only(mut self, vocab_only: bool) -> Self {
        self.vocab_only = vocab_only;
        self
    }

    /// Sets [`ModelParams::rpc_servers`].
    #[must_use]
    pub fn rpc_servers(mut self, rpc_servers: Vec<String>) -> Self {
        self.rpc_servers = rpc_servers;
        self
    }

    /// Sets [`ModelParams::tensor_split`].
    #[must_use]
    pub fn tensor_split(mut self, tensor_split: Vec<f32>) -> Self {
        self.tensor_split = tensor_split;
        self
    }

    fn to_raw(&self) -> sys::llama_model_params {
        // SAFETY: as above.
        let mut p = unsafe { sys::llama_model_default_params() };
        p.n_gpu_layers = self.n_gpu_layers;
        p.split_mode = match self.split_mode {
            SplitMode::None => sys::LLAMA_SPLIT_MODE_NONE,
            SplitMode::Layer => sys::LLAMA_SPLIT_MODE_LAYER,
            SplitMode::Row => sys::LLAMA_SPLIT_MODE_ROW,
        };
        p.main_gpu = self.main_gpu;
        p.load_mode = match (self.use_mmap, self.use_mlock) {
            (true, false) => p.load_mode, // llama.cpp's default picks mmap where it can
            (true, true) => sys::LLAMA_LOAD_MODE_MMAP_MLOCK,
            (false, true) => sys::LLAMA_LOAD_MODE_MLOCK,
            (false, false) => sys::LLAMA_LOAD_MODE_NONE,
        };
        p.vocab_only = self.vocab_only;
        p
    }
}

/// The devices that take offloaded layers when rpc-servers are named (the local GPUs, then each
/// server's devices), null-terminated as llama.cpp reads them; empty without servers, so that
/// llama.cpp picks the local devices itself.
fn offload_devices(params: &ModelParams) -> Result<Vec<sys::ggml_backend_dev_t>, crate::rpc::RpcError> {
    if params.rpc_servers.is_empty() {
        return Ok(Vec::new());
    }
    let mut devices = Vec::new();
    // SAFETY: ggml's device registry is filled once at backend init and read-only after; every
    // index is below the count, and names are NUL-terminated strings owned by the registry.
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            let gpu = matches!(sys::ggml_backend_dev_type(dev), sys::GGML_BACKEND_DEVICE_TYPE_GPU | sys::GGML_BACKEND_DEVICE_TYPE_IGPU);
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            let rpc = !reg.is_null() && std::ffi::CStr::from_ptr(sys::ggml_backend_reg_name(reg)).to_bytes() == b"RPC";
            if gpu && !rpc {
                devices.push(dev);
            }
        }
    }
    for endpoint in &params.rpc_servers {
        devices.extend(crate::rpc::connect(endpoint)?);
    }
    devices.push(std::ptr::null_mut());
    Ok(devices)
}

/// [`ModelParams::tensor_split`] as llama.cpp reads it: `llama_max_devices()` proportions, or
/// empty for its own split.
fn tensor_split(params: &ModelParams) -> Result<Vec<f32>, LoadErrorKind> {
    let split = &params.tensor_split;
    if split.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: returns a constant.
    let max = unsafe { sys::llama_max_devices() };
    let bad = |reason: String| LoadErrorKind::TensorSplit { split: split.clone(), reason };
    if split.len() > max {
        return Err(bad(format!("at most {max} devices")));
    }
    if split.iter().any(|x| !x.is_finite() || *x < 0.0) || split.iter().sum::<f32>() <= 0.0 {
        return Err(bad("proportions must be finite, >= 0 and not all 0".into()));
    }
    let mut out = vec![0.0; max];
    out[..split.len()].copy_from_slice(split);
    Ok(out)
}

/// A model loaded from a GGUF file. Freed on drop; contexts borrow it.
#[derive(Debug)]
pub struct Model {
    raw: NonNull<sys::llama_model>,
    path: PathBuf,
    vocab_only: bool,
    /// llama.cpp keeps a set of the model's LoRA adapters inside the model, written when one is
    /// loaded or freed and read by every decode: writers and readers are serialised here.
    adapters: RwLock<()>,
    /// See [`Model::placement`].
    placement: Vec<String>,
    /// The rpc-server connections the model's remote layers live on (empty without servers, or
    /// where the build does not watch them).
    rpc: Vec<crate::rpc::Connection>,
}

// SAFETY: a llama_model is immutable once loaded, but for its LoRA adapter set, which is only
// touched under `adapters` (see LoraAdapter); llama.cpp documents using one model from several
// contexts on several threads. Every other method here only reads it.
unsafe impl Send for Model {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for Model {}

impl Model {
    /// Loads a GGUF model. The header is checked in Rust first, so a missing, foreign,
    /// truncated or corrupt file gets an error that says which.
    pub fn load(path: impl AsRef<Path>, params: &ModelParams) -> Result<Model, LoadError> {
        Self::load_with_progress(path, params, |_| true)
    }

    /// As [`Model::load`], calling `progress` with 0.0..=1.0 as the weights load; returning
    /// false cancels the load.
    pub fn load_with_progress(path: impl AsRef<Path>, params: &ModelParams, mut progress: impl FnMut(f32) -> bool) -> Result<Model, LoadError> {
        backend::init();
        let path = path.as_ref();
        gguf::check(path)?;
        if let Some((_, refused)) = crate::backend_modules::refused() {
            return Err(LoadError::new(path, LoadErrorKind::CpuVariant(refused.clone())));
        }
        if crate::backend_modules::is_dynamic() && crate::backend_modules::loaded_from().is_none() {
            let searched = crate::backend_modules::search_dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(LoadError::new(path, LoadErrorKind::NoBackend { searched }));
        }
        let c_path = crate::c_string::path(path).ok_or_else(|| LoadError::new(path, LoadErrorKind::InvalidPath))?;

        let mut devices = offload_devices(params).map_err(|e| LoadError::new(path, e.into()))?;
        let split = tensor_split(params).map_err(|kind| LoadError::new(path, kind))?;
        let mut state = ProgressState { callback: &mut progress, panic: None, cancelled: false };
        let mut raw_params = params.to_raw();
        if !devices.is_empty() {
            raw_params.devices = devices.as_mut_ptr();
        }
        if !split.is_empty() {
            raw_params.tensor_split = split.as_ptr();
        }
        raw_params.progress_callback = Some(progress_trampoline);
        raw_params.progress_callback_user_data = (&raw mut state).cast::<c_void>();
        let mut raw = std::ptr::null_mut();
        let load = |err| {
            // SAFETY: c_path is NUL-terminated and outlives the call; the user data points at
            // `state`, the device list (null-terminated) and the split (llama_max_devices()
            // long) at locals, all of which outlive the call, and the trampoline matches its
            // type. The guard turns ggml's fatal errors on this thread (an rpc-server gone while
            // loading) into an error; llama.cpp reports its own failures as null.
            unsafe { sys::exsa_model_load_from_file(c_path.as_ptr(), raw_params, &mut raw, err) }
        };
        let (guarded, captured) = backend::capture_all(|| crate::cpp::guard("llama_model_load_from_file", load));
        // The load may have run in parallel (weight conversion); this thread need not compute.
        crate::openmp::release_this_threads_team();
        let mut messages = LlamaMessages(captured.messages);
        if let Err(e) = guarded {
            messages.0.push(e.what);
            return Err(LoadError::new(path, LoadErrorKind::Llama(messages)));
        }
        if let Some(panic) = state.panic {
            if let Some(raw) = NonNull::new(raw) {
                // SAFETY: a model we own and nobody else has seen.
                unsafe { sys::llama_model_free(raw.as_ptr()) };
            }
            resume_unwind(panic);
        }
        match NonNull::new(raw) {
            Some(raw) => {
                let rpc = params.rpc_servers.iter().filter_map(|e| crate::rpc::Connection::current(e)).collect();
                let model = Model {
                    raw,
                    path: path.to_path_buf(),
                    vocab_only: params.vocab_only,
                    adapters: RwLock::new(()),
                    placement: captured.placement,
                    rpc,
                };
                // A server lost while the weights went out leaves zeros where they should be.
                model.check_servers().map_err(|e| LoadError::new(path, e.into()))?;
                Ok(model)
            }
            None if state.cancelled => Err(LoadError::new(path, LoadErrorKind::Cancelled)),
            None => Err(LoadError::new(path, LoadErrorKind::Llama(messages))),
        }
    }

    /// The raw handle, for calls this crate does not wrap. It stays owned by the model.
    pub fn as_ptr(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the weights went, in llama.cpp's own words as it loaded them: how many layers were
    /// offloaded, and each device's share (`CPU_Mapped model buffer size = 250.2 MiB`,
    /// `RPC0[10.0.0.2:50052] model buffer size = 40.1 MiB`, ...).
    pub fn placement(&self) -> &[String] {
        &self.placement
    }

    /// `Err(RpcError::Lost)` once a connection to one of the rpc-servers holding this model's
    /// layers has failed: the model cannot compute any more (see [`crate::rpc`]). Always Ok for
    /// a model without servers.
    pub fn check_servers(&self) -> Result<(), crate::rpc::RpcError> {
        self.rpc.iter().try_for_each(crate::rpc::Connection::check)
    }

    /// Whether layers of this model live on rpc-servers whose loss [`Model::check_servers`]
    /// reports.
    pub(crate) fn has_watched_servers(&self) -> bool {
        !self.rpc.is_empty()
    }

    /// Whether only the vocabulary was loaded.
    pub fn is_vocab_only(&self) -> bool {
        self.vocab_only
    }

    /// The model's vocabulary.
    pub fn vocab(&self) -> Vocab<'_> {
        // SAFETY: the vocab is owned by the model and lives as long as it; Vocab borrows self.
        let raw = unsafe { sys::llama_model_get_vocab(self.raw.as_ptr()) };
        Vocab::new(NonNull::new(raw.cast_mut()).expect("a loaded model has a vocab"), PhantomData)
    }

    /// `general.architecture`, e.g. "gemma3".
    pub fn architecture(&self) -> Option<String> {
        self.meta("general.architecture")
    }

    /// llama.cpp's one-line description (architecture, size, quantisation).
    pub fn description(&self) -> String {
        // SAFETY: writes at most buf.len() bytes, NUL included, and returns the full length.
        read_c_string(|buf, len| unsafe { sys::llama_model_desc(self.raw.as_ptr(), buf, len) }).unwrap_or_default()
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_params(self.raw.as_ptr()) }
    }

    /// Size of all weights in bytes.
    pub fn size(&self) -> u64 {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_size(self.raw.as_ptr()) }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_ctx_train(self.raw.as_ptr()) }.max(0) as u32
    }

    /// Embedding width.
    pub fn n_embd(&self) -> usize {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_embd(self.raw.as_ptr()) }.max(0) as usize
    }

    /// Width of the embeddings a context returns: n_embd for most models, another width for
    /// models with an output projection. [`crate::Context::embeddings`] rows have this width.
    pub fn n_embd_out(&self) -> usize {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_embd_out(self.raw.as_ptr()) }.max(0) as usize
    }

    /// Outputs of a classifier head: the width of a rank-pooled (reranker) result.
    pub fn n_cls_out(&self) -> usize {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_cls_out(self.raw.as_ptr()) as usize }
    }

    /// Number of layers.
    pub fn n_layer(&self) -> u32 {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_n_layer(self.raw.as_ptr()) }.max(0) as u32
    }

    /// Whether the model attends causally (each token sees only earlier ones), as decoders do.
    /// Embedding models such as BERT attend both ways; llama.cpp then needs a whole batch in one
    /// micro-batch (n_ubatch). Read from `<arch>.attention.causal`, true when absent.
    pub fn is_causal(&self) -> bool {
        let Some(arch) = self.architecture() else { return true };
        self.meta(&format!("{arch}.attention.causal")).is_none_or(|v| v != "false")
    }

    /// Whether the model's memory is (or includes, for hybrid models such as LFM2) a recurrent
    /// state, which holds only its latest position: such memory cannot be cut back to an
    /// earlier position, except within the last decode with
    /// [`ContextParams::recurrent_snapshots`](crate::ContextParams::recurrent_snapshots).
    pub fn has_recurrent_state(&self) -> bool {
        // SAFETY: reads fields of a live model.
        unsafe { sys::llama_model_is_recurrent(self.raw.as_ptr()) || sys::llama_model_is_hybrid(self.raw.as_ptr()) }
    }

    /// Whether the model has an encoder (encoder-decoder models such as T5).
    pub fn has_encoder(&self) -> bool {
        // SAFETY: reads a field of a live model.
        unsafe { sys::llama_model_has_encoder(self.raw.as_ptr()) }
    }

    /// One metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        // SAFETY: key is NUL-terminated; the buffer contract is snprintf's.
        read_c_string(|buf, len| unsafe { sys::llama_model_meta_val_str(self.raw.as_ptr(), key.as_ptr(), buf, len) })
    }

    /// Every metadata key/value pair, in file order.
    pub fn metadata(&self) -> Vec<(String, String)> {
        // SAFETY: reads a field of a live model.
        let n = unsafe { sys::llama_model_meta_count(self.raw.as_ptr()) };
        (0..n)
            .filter_map(|i| {
                // SAFETY: i < meta_count; snprintf-style buffers as above.
                let key = read_c_string(|b, l| unsafe { sys::llama_model_meta_key_by_index(self.raw.as_ptr(), i, b, l) })?;
                // SAFETY: as above.
                let val = read_c_string(|b, l| unsafe { sys::llama_model_meta_val_str_by_index(self.raw.as_ptr(), i, b, l) })?;
                Some((key, val))
            })
            .collect()
    }

    /// The model's chat template (`name` = None for the default one).
    pub fn chat_template(&self, name: Option<&str>) -> Option<String> {
        let name = name.map(CString::new).transpose().ok()?;
        // SAFETY: name is NUL-terminated or null (default); the result is owned by the model.
        let ptr = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), name.as_ref().map_or(std::ptr::null(), |n| n.as_ptr())) };
        // SAFETY: non-null results are NUL-terminated strings owned by the model.
        (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
    }
}

impl Model {
    /// Held while an adapter is loaded or freed.
    pub(crate) fn adapters_write(&self) -> RwLockWriteGuard<'_, ()> {
        self.adapters.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held while a context of this model builds or runs a graph (which reads the adapter set).
    pub(crate) fn adapters_read(&self) -> RwLockReadGuard<'_, ()> {
        self.adapters.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts, vocabs and samplers borrow it, so none is alive.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

struct ProgressState<'a> {
    callback: &'a mut dyn FnMut(f32) -> bool,
    panic: Option<Box<dyn std::any::Any + Send>>,
    cancelled: bool,
}

extern "C" fn progress_trampoline(progress: f32, user: *mut c_void) -> bool {
    // SAFETY: `user` is the ProgressState that Model::load_with_progress passed in, alive for
    // the duration of the load, and used from this one thread.
    let state = unsafe { &mut *user.cast::<ProgressState<'_>>() };
    if state.panic.is_some() {
        return false;
    }
    match catch_unwind(AssertUnwindSafe(|| (state.callback)(progress))) {
        Ok(go_on) => {
            state.cancelled = !go_on;
            go_on
        }
        Err(panic) => {
            // Re-raised once llama.cpp has returned: unwinding through C is undefined.
            state.panic = Some(panic);
            false
        }
    }
}

/// Calls an snprintf-style function, growing the buffer until the string fits.
pub(crate) fn read_c_string(mut f: impl FnMut(*mut c_char, usize) -> i32) -> Option<String> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = f(buf.as_mut_ptr().cast(), buf.len());
        if n < 0 {
            return None;
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n + 1, 0);
    }
}
