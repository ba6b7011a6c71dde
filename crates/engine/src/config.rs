//! Engine, session and request parameters, validated before anything reaches llama.cpp.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chat::{ChatMessage, ChatOptions};
use crate::error::EngineError;
use crate::token::Token;

/// How to load a model and size its sessions.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Path of the model's GGUF file.
    pub model: PathBuf,
    /// Context parameters of the sessions the engine opens (default: [`SessionConfig::default`]).
    pub session: SessionConfig,
    /// Where the model's layers go: GPUs, rpc-servers (see `llama::rpc` for what a server's
    /// failure does).
    pub placement: Placement,
    /// Template used when the model file has none: a llama.cpp built-in name or template text.
    /// None picks by architecture (gemma → "gemma", llama → "llama3", otherwise "chatml").
    pub chat_template_fallback: Option<String>,
    /// How chats are rendered: llama.cpp's built-in formats, or the model's own Jinja template
    /// (needed for tools and template options).
    pub chat_templating: ChatTemplating,
    /// A smaller model with the same vocabulary, loaded beside the main one, that drafts tokens
    /// for [`Speculation::Draft`] requests.
    pub draft_model: Option<PathBuf>,
    /// How the model's file is read: mmap, mlock, a progress callback (default:
    /// [`LoadOptions::default`]). A draft model is read the same way.
    pub load: LoadOptions,
    /// LoRA adapters loaded with the model, in order, and applied with their scales to every
    /// context the engine makes (sessions, owned sessions, a server's decode loop, embeddings);
    /// [`SessionConfig::lora_scales`] changes the scales of one session. Not applied to a draft
    /// model. Default: none.
    pub lora: Vec<LoraConfig>,
}

impl EngineConfig {
    /// The scales of [`EngineConfig::lora`], in order, checked before any adapter is loaded:
    /// every one finite.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] naming `lora` and the adapter whose scale is not finite.
    pub(crate) fn adapter_scales(&self) -> Result<Vec<f32>, EngineError> {
        match self.lora.iter().find(|l| !l.scale.is_finite()) {
            Some(bad) => Err(EngineError::InvalidConfig {
                field: "lora",
                value: format!("{} at {}", bad.path.display(), bad.scale),
                reason: "a LoRA scale must be finite",
            }),
            None => Ok(self.lora.iter().map(|l| l.scale).collect()),
        }
    }

    /// A configuration for the model at `model`: default session parameters, placement and load
    /// options, built-in chat formats, no fallback template, no draft model and no LoRA adapters.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model: model.into(),
            session: SessionConfig::default(),
            placement: Placement::default(),
            chat_template_fallback: None,
            chat_templating: ChatTemplating::Builtin,
            draft_model: None,
            load: LoadOptions::default(),
            lora: Vec::new(),
        }
    }

    /// Sets [`EngineConfig::model`].
    #[must_use]
    pub fn model(mut self, model: impl Into<PathBuf>) -> Self {
        self.model = model.into();
        self
    }

    /// Sets [`EngineConfig::session`].
    #[must_use]
    pub fn session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Sets [`EngineConfig::placement`].
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Sets [`EngineConfig::chat_template_fallback`].
    #[must_use]
    pub fn chat_template_fallback(mut self, template: impl Into<String>) -> Self {
        self.chat_template_fallback = Some(template.into());
        self
    }

    /// Sets [`EngineConfig::chat_templating`].
    #[must_use]
    pub fn chat_templating(mut self, chat_templating: ChatTemplating) -> Self {
        self.chat_templating = chat_templating;
        self
    }

    /// Sets [`EngineConfig::draft_model`].
    #[must_use]
    pub fn draft_model(mut self, path: impl Into<PathBuf>) -> Self {
        self.draft_model = Some(path.into());
        self
    }

    /// Sets [`EngineConfig::load`].
    #[must_use]
    pub fn load(mut self, load: LoadOptions) -> Self {
        self.load = load;
        self
    }

    /// Sets [`EngineConfig::lora`].
    #[must_use]
    pub fn lora(mut self, lora: impl Into<Vec<LoraConfig>>) -> Self {
        self.lora = lora.into();
        self
    }
}

/// How a model's file is read into memory.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Map the file into memory instead of reading it (default true, llama.cpp's default where
    /// the system can): the weights are paged in from the file as they are used, and several
    /// processes loading the same file share them.
    pub mmap: bool,
    /// Lock the weights in RAM so that the system never pages them out (default false); the
    /// process may need a raised `RLIMIT_MEMLOCK` (llama.cpp warns when it cannot lock).
    pub mlock: bool,
    /// Called with the load's progress (0.0..=1.0) as the weights are read; returning false
    /// cancels the load, which then fails with [`EngineError::Load`] saying so. Called again from
    /// 0.0 for a draft model's load. None (the default): no callback.
    pub progress: Option<LoadProgress>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { mmap: true, mlock: false, progress: None }
    }
}

impl LoadOptions {
    /// Sets [`LoadOptions::mmap`].
    #[must_use]
    pub fn mmap(mut self, mmap: bool) -> Self {
        self.mmap = mmap;
        self
    }

    /// Sets [`LoadOptions::mlock`].
    #[must_use]
    pub fn mlock(mut self, mlock: bool) -> Self {
        self.mlock = mlock;
        self
    }

    /// Sets [`LoadOptions::progress`].
    #[must_use]
    pub fn progress(mut self, progress: LoadProgress) -> Self {
        self.progress = Some(progress);
        self
    }
}

/// A model load's progress callback ([`LoadOptions::progress`]): called with 0.0..=1.0 on the
/// loading thread; returning false cancels the load. A panic in it is caught before it reaches
/// llama.cpp, cancels the load, and resumes once llama.cpp has returned. Cloning shares the
/// callback.
#[derive(Clone)]
pub struct LoadProgress(Arc<dyn Fn(f32) -> bool + Send + Sync>);

impl LoadProgress {
    /// A progress callback: `callback(progress)` returns whether to go on.
    pub fn new(callback: impl Fn(f32) -> bool + Send + Sync + 'static) -> Self {
        LoadProgress(Arc::new(callback))
    }

    /// Calls the callback: whether the load goes on.
    pub fn call(&self, progress: f32) -> bool {
        (self.0)(progress)
    }
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

/// A LoRA adapter ([`EngineConfig::lora`]): a GGUF adapter file made for the engine's model,
/// and the scale it is applied with (1.0: as trained; 0.0: not at all; negative values subtract
/// it).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LoraConfig {
    /// The adapter's GGUF file.
    pub path: PathBuf,
    /// The scale its update is applied with (default 1.0); must be finite.
    pub scale: f32,
}

impl LoraConfig {
    /// The adapter at `path`, at scale 1.0.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LoraConfig { path: path.into(), scale: 1.0 }
    }

    /// Sets [`LoraConfig::path`].
    #[must_use]
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// Sets [`LoraConfig::scale`] (instead of 1.0).
    #[must_use]
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }
}

/// How chats become prompts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ChatTemplating {
    /// llama.cpp's built-in formats (`llama_chat_apply_template`), which every backend has; they
    /// know nothing of tools, so chats with tools or template options are
    /// [`EngineError::Unsupported`].
    #[default]
    Builtin,
    /// llama.cpp's built-in format of this name (`llama3`, `chatml`, `command-r`, ... as
    /// `llama_chat_apply_template` knows them) instead of the model's own, as llama-server's
    /// `--chat-template NAME` without `--jinja`; otherwise as [`ChatTemplating::Builtin`].
    Named(String),
    /// The model's own Jinja template, or `override_source` (Jinja source, or `"chatml"`), with
    /// tools, reasoning and template options, through llama.cpp's chat layer, as its server
    /// renders chats: backend `source` with feature `jinja`.
    Jinja {
        /// The template to render with instead of the model's own: Jinja source, or `"chatml"`.
        /// None: the model's own.
        override_source: Option<String>,
    },
}

/// Where a model's layers go.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Placement {
    /// Layers offloaded to GPUs and rpc-servers where the build has them (-1: all, the default).
    pub n_gpu_layers: i32,
    /// ggml rpc-servers (`HOST:PORT`) that take offloaded layers beside the local GPUs (backend
    /// `source` only).
    pub rpc_servers: Vec<String>,
    /// Proportions of the offloaded layers per device: local GPUs, then the servers' devices;
    /// empty: by free memory.
    pub tensor_split: Vec<f32>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement { n_gpu_layers: -1, rpc_servers: Vec::new(), tensor_split: Vec::new() }
    }
}

impl Placement {
    /// Sets [`Placement::n_gpu_layers`].
    #[must_use]
    pub fn n_gpu_layers(mut self, n_gpu_layers: i32) -> Self {
        self.n_gpu_layers = n_gpu_layers;
        self
    }

    /// Sets [`Placement::rpc_servers`].
    #[must_use]
    pub fn rpc_servers(mut self, rpc_servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.rpc_servers = rpc_servers.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Placement::tensor_split`].
    #[must_use]
    pub fn tensor_split(mut self, tensor_split: impl Into<Vec<f32>>) -> Self {
        self.tensor_split = tensor_split.into();
        self
    }

    /// An error for a backend that can only place layers on local devices.
    #[cfg(any(feature = "crate", feature = "raw"))]
    pub(crate) fn local_only(&self, backend: &'static str) -> Result<(), EngineError> {
        if self.rpc_servers.is_empty() && self.tensor_split.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Unsupported { what: "rpc-servers and tensor splits (use backend source)", backend })
        }
    }
}

/// Context parameters of a session.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Context length in tokens; with several sequences, the size of the KV cache they share.
    pub n_ctx: u32,
    /// Logical batch size: the most tokens one decode takes (default 2048). An embedded text must
    /// fit in one batch.
    pub n_batch: u32,
    /// Physical batch size: the most tokens computed at once inside a decode, at most `n_batch`
    /// (default 512).
    pub n_ubatch: u32,
    /// Threads for single-token generation (default: the available parallelism, 4 where it is
    /// unknown).
    pub n_threads: i32,
    /// Threads for prompt batches (default as `n_threads`).
    pub n_threads_batch: i32,
    /// When attention runs as flash attention (default: [`FlashAttention::Auto`], llama.cpp
    /// decides by the model and the device).
    pub flash_attention: FlashAttention,
    /// Compute embeddings (as well as logits). Default false; the engine's embedding and reranking
    /// calls open sessions of their own with it set.
    pub embeddings: bool,
    /// Sequences decoded together in one context (a server's slots), sharing one KV cache of
    /// n_ctx tokens. 1 for a single-stream session.
    pub n_seq_max: u32,
    /// How an embeddings session pools each sequence's token vectors into one. None: as the
    /// model's file says (`<arch>.pooling_type`), mean where it says nothing (a generative model).
    pub pooling: Option<Pooling>,
    /// Element type of the KV cache's keys.
    pub cache_type_k: CacheType,
    /// Element type of the KV cache's values (a quantized one needs flash attention).
    pub cache_type_v: CacheType,
    /// On a model whose memory holds a recurrent state that llama.cpp can snapshot (LFM2; not
    /// Mamba): snapshots kept per sequence, so that a speculative round can drop its rejected
    /// drafts (at most this many tokens of one decode) instead of decoding the sequence again;
    /// drafts are capped at this length there. Ignored elsewhere. 0 (the default): none; a
    /// round of drafts is then preceded by a checkpoint of the recurrent state (about 160 KiB on
    /// the LFM2-1.2B shape, copied on the host), and a rejection returns there and decodes the round's kept tokens again with
    /// the next one. Snapshots are not free: 8 cost 5-12 % of every served token on the
    /// LFM2-1.2B-shaped model, with or without speculation (docs/benchmarks.md, "Speculation on
    /// LFM2").
    pub recurrent_snapshots: u32,
    /// The scales this session applies the engine's LoRA adapters with, one per adapter of
    /// [`EngineConfig::lora`] in its order (0.0 leaves an adapter out). None (the default): the
    /// scales the engine was configured with. A list of another length is
    /// [`EngineError::InvalidConfig`] when the session is made.
    pub lora_scales: Option<Vec<f32>>,
}

/// When attention runs as flash attention: the same three choices as the `llama` crate's
/// `FlashAttention` and llama-server's `--flash-attn`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashAttention {
    /// llama.cpp decides by the model and the device.
    #[default]
    Auto,
    /// Always (a quantized V cache needs it).
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for FlashAttention {
    type Err = EngineError;

    /// `auto`, `on` or `off` (`1`/`true`, `0`/`false` too), as llama-server's `--flash-attn`.
    fn from_str(s: &str) -> Result<Self, EngineError> {
        match s {
            "auto" => Ok(FlashAttention::Auto),
            "on" | "1" | "true" => Ok(FlashAttention::On),
            "off" | "0" | "false" => Ok(FlashAttention::Off),
            other => Err(EngineError::InvalidConfig { field: "flash_attn", value: other.into(), reason: "use on, off or auto" }),
        }
    }
}

/// The element type of the KV cache's keys or values: the types llama-server offers for
/// `--cache-type-k/-v`. The quantized ones hold a token in less memory (q8_0 in about half of
/// f16's, q4_0 in about a quarter) and round what attention reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheType {
    /// 32-bit float (`f32`).
    F32,
    #[default]
    /// 16-bit float (`f16`), the default.
    F16,
    /// bfloat16 (`bf16`).
    Bf16,
    /// 8-bit quantized (`q8_0`).
    Q8_0,
    /// 4-bit quantized (`q4_0`).
    Q4_0,
    /// 4-bit quantized with a minimum per block (`q4_1`).
    Q4_1,
    /// 4-bit non-linear quantized (`iq4_nl`).
    Iq4Nl,
    /// 5-bit quantized (`q5_0`).
    Q5_0,
    /// 5-bit quantized with a minimum per block (`q5_1`).
    Q5_1,
}

impl CacheType {
    /// Every type.
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Iq4Nl,
        CacheType::Q5_0,
        CacheType::Q5_1,
    ];

    /// llama.cpp's name of the type (`q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
        }
    }

    /// Every type but the float ones.
    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.to_ascii_lowercase();
        CacheType::ALL.into_iter().find(|t| t.name() == wanted).ok_or_else(|| {
            let names: Vec<&str> = CacheType::ALL.iter().map(|t| t.name()).collect();
            format!("{s:?} is not a KV cache type ({})", names.join(", "))
        })
    }
}

/// How a sequence's token vectors become one embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Their mean.
    Mean,
    /// The first token's (BERT's CLS token).
    Cls,
    /// The last token's.
    Last,
    /// A reranker's relevance score: its classification head over the sequence (one number per
    /// label, usually one).
    Rank,
    /// None: a vector per token ([`crate::Engine::token_embeddings`]; llama-server's
    /// `--pooling none`). [`crate::Engine::embed`] and its kin, which give one vector per text,
    /// refuse it.
    None,
}

impl Pooling {
    /// A GGUF's `<arch>.pooling_type` (llama.cpp's numbering); None for none or unknown.
    pub fn from_gguf(value: u32) -> Option<Pooling> {
        match value {
            1 => Some(Pooling::Mean),
            2 => Some(Pooling::Cls),
            3 => Some(Pooling::Last),
            4 => Some(Pooling::Rank),
            _ => None,
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "last" => Ok(Pooling::Last),
            "rank" => Ok(Pooling::Rank),
            "none" => Ok(Pooling::None),
            other => Err(format!("{other:?} is not a pooling (mean, cls, last, rank, none)")),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
        SessionConfig {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_threads: threads,
            n_threads_batch: threads,
            flash_attention: FlashAttention::Auto,
            embeddings: false,
            n_seq_max: 1,
            pooling: None,
            cache_type_k: CacheType::F16,
            cache_type_v: CacheType::F16,
            recurrent_snapshots: Self::DEFAULT_RECURRENT_SNAPSHOTS,
            lora_scales: None,
        }
    }
}

impl SessionConfig {
    /// Recurrent snapshots by default: none (see [`SessionConfig::recurrent_snapshots`]).
    pub const DEFAULT_RECURRENT_SNAPSHOTS: u32 = 0;

    /// Sets [`SessionConfig::n_ctx`].
    #[must_use]
    pub fn n_ctx(mut self, n_ctx: u32) -> Self {
        self.n_ctx = n_ctx;
        self
    }

    /// Sets [`SessionConfig::n_batch`].
    #[must_use]
    pub fn n_batch(mut self, n_batch: u32) -> Self {
        self.n_batch = n_batch;
        self
    }

    /// Sets [`SessionConfig::n_ubatch`].
    #[must_use]
    pub fn n_ubatch(mut self, n_ubatch: u32) -> Self {
        self.n_ubatch = n_ubatch;
        self
    }

    /// Sets [`SessionConfig::n_threads`].
    #[must_use]
    pub fn n_threads(mut self, n_threads: i32) -> Self {
        self.n_threads = n_threads;
        self
    }

    /// Sets [`SessionConfig::n_threads_batch`].
    #[must_use]
    pub fn n_threads_batch(mut self, n_threads_batch: i32) -> Self {
        self.n_threads_batch = n_threads_batch;
        self
    }

    /// Sets [`SessionConfig::flash_attention`].
    #[must_use]
    pub fn flash_attention(mut self, flash_attention: FlashAttention) -> Self {
        self.flash_attention = flash_attention;
        self
    }

    /// Sets [`SessionConfig::embeddings`].
    #[must_use]
    pub fn embeddings(mut self, embeddings: bool) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// Sets [`SessionConfig::n_seq_max`].
    #[must_use]
    pub fn n_seq_max(mut self, n_seq_max: u32) -> Self {
        self.n_seq_max = n_seq_max;
        self
    }

    /// Sets [`SessionConfig::pooling`] (None: as the model's file says).
    #[must_use]
    pub fn pooling(mut self, pooling: Option<Pooling>) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets [`SessionConfig::cache_type_k`].
    #[must_use]
    pub fn cache_type_k(mut self, cache_type_k: CacheType) -> Self {
        self.cache_type_k = cache_type_k;
        self
    }

    /// Sets [`SessionConfig::cache_type_v`].
    #[must_use]
    pub fn cache_type_v(mut self, cache_type_v: CacheType) -> Self {
        self.cache_type_v = cache_type_v;
        self
    }

    /// Sets [`SessionConfig::recurrent_snapshots`].
    #[must_use]
    pub fn recurrent_snapshots(mut self, recurrent_snapshots: u32) -> Self {
        self.recurrent_snapshots = recurrent_snapshots;
        self
    }

    /// Sets [`SessionConfig::lora_scales`].
    #[must_use]
    pub fn lora_scales(mut self, lora_scales: impl Into<Vec<f32>>) -> Self {
        self.lora_scales = Some(lora_scales.into());
        self
    }

    /// Checks the parameters before any reaches llama.cpp.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidConfig`] naming the first bad field: `n_ctx` under 8, `n_ubatch` not
    /// within 1..=`n_batch`, fewer than one thread, `n_seq_max` outside 1..=256, a quantized V cache
    /// with flash attention off, or a LoRA scale that is not finite (the number of scales is
    /// checked against the engine's adapters when the session is made).
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field, value: String, reason| Err(EngineError::InvalidConfig { field, value, reason });
        if self.n_ctx < 8 {
            return bad("n_ctx", self.n_ctx.to_string(), "must be at least 8");
        }
        if self.n_batch < 1 || self.n_ubatch < 1 || self.n_ubatch > self.n_batch {
            return bad("n_ubatch", format!("{}/{}", self.n_ubatch, self.n_batch), "need 1 <= n_ubatch <= n_batch");
        }
        if self.n_threads < 1 {
            return bad("n_threads", self.n_threads.to_string(), "at least one thread is needed");
        }
        if self.n_threads_batch < 1 {
            return bad("n_threads_batch", self.n_threads_batch.to_string(), "at least one thread is needed");
        }
        if !(1..=256).contains(&self.n_seq_max) {
            return bad("n_seq_max", self.n_seq_max.to_string(), "must be between 1 and 256");
        }
        if self.cache_type_v.is_quantized() && self.flash_attention == FlashAttention::Off {
            return bad("cache_type_v", self.cache_type_v.to_string(), "a quantized V cache needs flash attention (on or auto)");
        }
        if let Some(scales) = self.lora_scales.as_ref().filter(|s| !s.iter().all(|x| x.is_finite())) {
            return bad("lora_scales", format!("{scales:?}"), "LoRA scales must be finite");
        }
        Ok(())
    }

    /// The scales a session of these parameters applies its model's LoRA adapters with:
    /// [`SessionConfig::lora_scales`], else `engine`'s (the engine's configured scales, one per
    /// adapter).
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidConfig`] naming `lora_scales` when it holds another number of scales
    /// than there are adapters.
    pub(crate) fn lora_scales_for<'a>(&'a self, engine: &'a [f32]) -> Result<&'a [f32], EngineError> {
        match &self.lora_scales {
            None => Ok(engine),
            Some(scales) if scales.len() == engine.len() => Ok(scales),
            Some(scales) => Err(EngineError::InvalidConfig {
                field: "lora_scales",
                value: format!("{scales:?}"),
                reason: "needs one scale per LoRA adapter of the engine (EngineConfig::lora)",
            }),
        }
    }
}

/// Sampling parameters of a request. Temperature 0 means greedy.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SamplingParams {
    /// Divides the logits before the draw (default 0.8); 0: greedy, the most likely token.
    pub temperature: f32,
    /// 0: off.
    pub top_k: i32,
    /// 1.0: off.
    pub top_p: f32,
    /// 0.0: off.
    pub min_p: f32,
    /// 1.0: off.
    pub repeat_penalty: f32,
    /// Tokens the repeat, frequency and presence penalties look back over (llama-server's
    /// `repeat_last_n`): 0 none, -1 the whole context (the model's training context), otherwise
    /// that many (at most the training context). Below -1 is refused.
    pub repeat_last_n: i32,
    /// Subtracted from a token's logit once per time it occurred (OpenAI's; 0: off).
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it occurred at all (OpenAI's; 0: off).
    pub presence_penalty: f32,
    /// Added to the given tokens' logits before anything else (-inf bans a token).
    pub logit_bias: Vec<(Token, f32)>,
    /// A GBNF grammar (rule `root` first) every generated token must fit, checked the way
    /// llama.cpp's server does (see `llama::SamplerChain::constrain`). Backend `source` only.
    pub grammar: Option<String>,
    /// When the grammar starts to apply.
    pub grammar_start: GrammarStart,
    /// Seed of the random draw (default 0); unused when greedy.
    pub seed: u32,
}

/// When [`SamplingParams::grammar`] starts to apply.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum GrammarStart {
    /// From the first generated token.
    #[default]
    Immediately,
    /// From the first generated token, the grammar having read these tokens first: the end of
    /// the prompt that a chat format's grammar starts with (the opening of the assistant's turn).
    AfterPrefill(Vec<Token>),
    /// Once the output matches one of `patterns` (regular expressions matched from the output's
    /// start; the grammar reads from the first group on) or one of `tokens` is drawn: a tool call
    /// starting, where the reply may also be prose.
    Lazy {
        /// Regular expressions, each matched from the output's start.
        patterns: Vec<String>,
        /// Tokens whose drawing starts the grammar.
        tokens: Vec<Token>,
    },
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            grammar: None,
            grammar_start: GrammarStart::Immediately,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the most likely token every step.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Sets [`SamplingParams::temperature`].
    #[must_use]
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets [`SamplingParams::top_k`].
    #[must_use]
    pub fn top_k(mut self, top_k: i32) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets [`SamplingParams::top_p`].
    #[must_use]
    pub fn top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// Sets [`SamplingParams::min_p`].
    #[must_use]
    pub fn min_p(mut self, min_p: f32) -> Self {
        self.min_p = min_p;
        self
    }

    /// Sets [`SamplingParams::repeat_penalty`].
    #[must_use]
    pub fn repeat_penalty(mut self, repeat_penalty: f32) -> Self {
        self.repeat_penalty = repeat_penalty;
        self
    }

    /// Sets [`SamplingParams::repeat_last_n`].
    #[must_use]
    pub fn repeat_last_n(mut self, repeat_last_n: i32) -> Self {
        self.repeat_last_n = repeat_last_n;
        self
    }

    /// Sets [`SamplingParams::frequency_penalty`].
    #[must_use]
    pub fn frequency_penalty(mut self, frequency_penalty: f32) -> Self {
        self.frequency_penalty = frequency_penalty;
        self
    }

    /// Sets [`SamplingParams::presence_penalty`].
    #[must_use]
    pub fn presence_penalty(mut self, presence_penalty: f32) -> Self {
        self.presence_penalty = presence_penalty;
        self
    }

    /// Sets [`SamplingParams::logit_bias`].
    #[must_use]
    pub fn logit_bias(mut self, logit_bias: impl IntoIterator<Item = (Token, f32)>) -> Self {
        self.logit_bias = logit_bias.into_iter().collect();
        self
    }

    /// Sets [`SamplingParams::grammar`].
    #[must_use]
    pub fn grammar(mut self, grammar: impl Into<String>) -> Self {
        self.grammar = Some(grammar.into());
        self
    }

    /// Holds the output to JSON that `schema` describes: sets [`SamplingParams::grammar`] to the
    /// schema's grammar, made by [`crate::json_grammar::json_schema_grammar`] (the conversion
    /// `exsa serve` applies to `response_format` and `json_schema`; its notes say which keywords
    /// are understood). Backend `source` only, as every grammar.
    ///
    /// ```
    /// # fn main() -> Result<(), exsa_engine::EngineError> {
    /// let schema = serde_json::json!({ "type": "object", "properties": { "name": { "type": "string" } }, "required": ["name"] });
    /// let sampling = exsa_engine::SamplingParams::greedy().json_schema(&schema)?;
    /// assert!(sampling.grammar.is_some());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`EngineError::JsonSchema`] naming where the schema has a keyword that would constrain
    /// the output but is not understood (`pattern`, `minimum`, ...) or a bad value: it is
    /// refused, never silently dropped.
    pub fn json_schema(mut self, schema: &serde_json::Value) -> Result<Self, EngineError> {
        self.grammar = Some(crate::json_grammar::json_schema_grammar(schema).map_err(EngineError::JsonSchema)?);
        Ok(self)
    }

    /// Sets [`SamplingParams::grammar_start`].
    #[must_use]
    pub fn grammar_start(mut self, grammar_start: GrammarStart) -> Self {
        self.grammar_start = grammar_start;
        self
    }

    /// Sets [`SamplingParams::seed`].
    #[must_use]
    pub fn seed(mut self, seed: u32) -> Self {
        self.seed = seed;
        self
    }

    /// Whether the temperature is 0: greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The sampler chain these parameters mean, stage by stage (the grammar is not a stage:
    /// it checks the chain's choice). Every backend builds exactly this chain with its own API,
    /// so A and B sample the same way.
    pub fn stages(&self) -> Vec<SamplerStage> {
        let mut stages = Vec::new();
        if !self.logit_bias.is_empty() {
            stages.push(SamplerStage::LogitBias(self.logit_bias.clone()));
        }
        if self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            stages.push(SamplerStage::Penalties {
                last_n: self.repeat_last_n,
                repeat: self.repeat_penalty,
                frequency: self.frequency_penalty,
                presence: self.presence_penalty,
            });
        }
        if self.is_greedy() {
            stages.push(SamplerStage::Greedy);
            return stages;
        }
        if self.top_k > 0 {
            stages.push(SamplerStage::TopK(self.top_k));
        }
        if self.top_p < 1.0 {
            stages.push(SamplerStage::TopP(self.top_p));
        }
        if self.min_p > 0.0 {
            stages.push(SamplerStage::MinP(self.min_p));
        }
        stages.push(SamplerStage::Temp(self.temperature));
        stages.push(SamplerStage::Dist(self.seed));
        stages
    }

    /// [`SamplingParams::validate`], and every biased token inside a vocabulary of `n_vocab`
    /// (llama.cpp's logit-bias stage writes at the token's index unchecked).
    pub fn validate_for(&self, n_vocab: i32) -> Result<(), EngineError> {
        self.validate()?;
        match self.logit_bias.iter().find(|(t, _)| !t.in_vocab(n_vocab)) {
            Some((t, _)) => Err(EngineError::InvalidRequest { field: "logit_bias", value: t.to_string(), reason: "is not a token of this model" }),
            None => Ok(()),
        }
    }

    /// Checks every value's range.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidRequest`] naming the first bad field: a temperature that is negative
    /// or not finite, a negative `top_k`, `top_p` outside (0, 1], `min_p` outside [0, 1], a
    /// `repeat_penalty` that is not finite and positive, `repeat_last_n` under -1, a frequency or
    /// presence penalty outside [-2, 2], a bias outside [-100, 100] (other than -inf), or an empty
    /// grammar.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field, value: f32, reason| Err(EngineError::InvalidRequest { field, value: value.to_string(), reason });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature, "must be finite and >= 0");
        }
        if self.top_k < 0 {
            return bad("top_k", self.top_k as f32, "must be >= 0 (0 = off)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "must be within (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "must be within [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty", self.repeat_penalty, "must be finite and > 0 (1 = off)");
        }
        if self.repeat_last_n < -1 {
            return bad("repeat_last_n", self.repeat_last_n as f32, "must be >= -1");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", self.frequency_penalty, "must be within [-2, 2]");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", self.presence_penalty, "must be within [-2, 2]");
        }
        if let Some(&(_, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b) && *b != f32::NEG_INFINITY) {
            return bad("logit_bias", b, "each bias must be within [-100, 100] (or -inf to ban)");
        }
        if self.grammar.as_deref().is_some_and(str::is_empty) {
            return Err(EngineError::InvalidRequest { field: "grammar", value: "\"\"".into(), reason: "must not be empty when given" });
        }
        Ok(())
    }
}

/// One stage of a sampler chain, in llama.cpp's terms (min_keep is 1 throughout).
#[derive(Clone, Debug, PartialEq)]
pub enum SamplerStage {
    /// Biases added to the logits of single tokens.
    LogitBias(Vec<(Token, f32)>),
    /// Repetition (divides), frequency and presence (subtract) penalties over the last `last_n`
    /// tokens.
    Penalties {
        /// Tokens looked back over (0: none, -1: the whole context).
        last_n: i32,
        /// Repetition penalty (1.0: off).
        repeat: f32,
        /// Subtracted from a token's logit once per occurrence (0.0: off).
        frequency: f32,
        /// Subtracted from a token's logit if it occurred at all (0.0: off).
        presence: f32,
    },
    /// Keeps the k most likely tokens.
    TopK(i32),
    /// Keeps the fewest most likely tokens whose probabilities add up to at least p.
    TopP(f32),
    /// Keeps the tokens at least p times as likely as the most likely one.
    MinP(f32),
    /// Divides the logits by this temperature.
    Temp(f32),
    /// Draw with a seeded RNG.
    Dist(u32),
    /// Picks the most likely token.
    Greedy,
}

/// Cancels a generation from another thread: it ends at the next step. A single stream's decode
/// in progress (a long prompt) is aborted too, where the backend can (not the crate baseline); a
/// server's decodes carry several requests and are not.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(pub(crate) Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the generations that hold this token or a clone of it.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelToken::cancel`] was called on this token or a clone of it.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What becomes of control-token text (`<end_of_turn>`, `<|im_start|>`, ...) in the text a
/// caller gives: a prompt's text, or the contents of a chat's messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecialText {
    /// It stays text, tokenized like any other characters: whoever writes it cannot forge a turn
    /// or a tool call. The default.
    #[default]
    Plain,
    /// It becomes the control token it spells: for trusted callers who write raw prompts for a
    /// template (llama-server's `parse_special`).
    Parse,
}

/// What a generation starts from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text, tokenized with BOS where the model wants one. Control-token text becomes control
    /// tokens only with [`SpecialText::Parse`] (raw prompts written for a template need it).
    Text {
        /// The prompt text.
        text: String,
        /// What becomes of control-token text in it.
        specials: SpecialText,
    },
    /// A chat, formatted with the engine's template ([`crate::Engine::chat_template`]). The
    /// template's own control tokens are parsed; text inside message contents never becomes a
    /// control token (a user cannot forge turns by typing `<end_of_turn>`), unless `specials`
    /// is [`SpecialText::Parse`]: that lets whoever writes a message forge turns, so it is only
    /// for trusted callers who build raw prompts through messages.
    /// `options` (tools, ...) need [`ChatTemplating::Jinja`] unless they are the defaults.
    Chat {
        /// The conversation so far, in order.
        messages: Vec<ChatMessage>,
        /// What becomes of control-token text inside message contents (the template's own is
        /// always parsed).
        specials: SpecialText,
        /// Tools and template options ([`ChatOptions::default`]: none).
        options: ChatOptions,
    },
    /// Token ids, decoded as they are.
    Tokens(Vec<Token>),
}

impl Prompt {
    /// Text without control-token parsing.
    pub fn text(text: impl Into<String>) -> Self {
        Prompt::Text { text: text.into(), specials: SpecialText::Plain }
    }

    /// A chat whose message contents stay text.
    pub fn chat(messages: impl Into<Vec<ChatMessage>>) -> Self {
        Prompt::Chat { messages: messages.into(), specials: SpecialText::Plain, options: ChatOptions::default() }
    }

    /// A chat with tools or template options.
    pub fn chat_with(messages: impl Into<Vec<ChatMessage>>, options: ChatOptions) -> Self {
        Prompt::Chat { messages: messages.into(), specials: SpecialText::Plain, options }
    }
}

/// How to generate: everything of a request but its prompt.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// Tokens generated at most (the context bounds it too).
    pub max_tokens: usize,
    /// Generation stops before any of these; the stop text is not returned.
    pub stop: Vec<String>,
    /// How each token is drawn (default: [`SamplingParams::default`]).
    pub sampling: SamplingParams,
    /// Cancels the generation from another thread.
    pub cancel: Option<CancelToken>,
    /// Draft tokens and verify them in one decode (see [`Speculation`]).
    pub speculation: Speculation,
    /// Record each drawn token's log-probability and those of its `n` likeliest alternatives
    /// (at most 20) in [`crate::outcome::Completion::logprobs`], as OpenAI's `logprobs` asks.
    pub logprobs: Option<usize>,
    /// With `logprobs`: list what the sampler drew from instead of the model's distribution:
    /// each token's probability after the chain's cuts and temperature, over the candidates it
    /// left, and the likeliest of those (llama-server's `post_sampling_probs`). The values in
    /// [`crate::TokenLogprobs`] are then the natural logarithms of those probabilities.
    /// Backend `source` only (the others cannot see the chain's candidates).
    pub post_sampling: bool,
    /// Special tokens written into the text as their text rather than left out: a chat format's
    /// tool-call markers, which its parser reads (set by a chat with tools).
    pub preserved_tokens: Vec<Token>,
    /// Never draw an end-of-generation token: the text ends at `max_tokens`, a stop sequence or
    /// a full context.
    pub ignore_eos: bool,
    /// While the prompt decodes, report its progress (a server's [`crate::serving::Event::Progress`]:
    /// once before the first chunk, then after each).
    pub prompt_progress: bool,
    /// Run in this slot of a server's decode loop (llama-server's `id_slot`), waiting until it is
    /// free: its cache, as a slot action saved or restored it, serves the prompt. None: the free
    /// slot whose cache holds most of the prompt.
    pub slot: Option<usize>,
    /// The scales this request applies the engine's LoRA adapters with, one per adapter of
    /// [`EngineConfig::lora`] in its order (0.0 leaves one out; llama-server's per-request
    /// `lora`). None: the default ones, the session's ([`SessionConfig::lora_scales`], else the
    /// engine's; a serving core's as [`crate::serving::ServingCore::set_adapter_scales`] sets
    /// them). An enabled activated LoRA applies from its invocation in the prompt on (see
    /// [`crate::Engine::lora_invocation`]; two enabled are [`crate::EngineError::InvalidRequest`]
    /// naming `lora_scales`). llama.cpp applies one set of adapters to a whole decode, so in a
    /// server's decode loop the groups of requests decoding with equal scales take turns of a few
    /// steps each, and a slot's cache serves a request only where it decoded each position with
    /// the scales the request gives it (a [`crate::SessionState`] records them; a slot file
    /// cannot: a save refuses a cache of other scales than the default ones, and a restored one
    /// counts as decoded with them).
    pub lora_scales: Option<Vec<f32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            cancel: None,
            speculation: Speculation::Off,
            logprobs: None,
            post_sampling: false,
            preserved_tokens: Vec::new(),
            ignore_eos: false,
            prompt_progress: false,
            slot: None,
            lora_scales: None,
        }
    }
}

/// The most candidates [`GenerateOptions::logprobs`] lists per token.
pub const MAX_LOGPROBS: usize = 20;

impl GenerateOptions {
    /// Sets [`GenerateOptions::max_tokens`].
    #[must_use]
    pub fn max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// Sets [`GenerateOptions::stop`].
    #[must_use]
    pub fn stop(mut self, stop: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.stop = stop.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`GenerateOptions::sampling`].
    #[must_use]
    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Sets [`GenerateOptions::cancel`].
    #[must_use]
    pub fn cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Sets [`GenerateOptions::speculation`].
    #[must_use]
    pub fn speculation(mut self, speculation: Speculation) -> Self {
        self.speculation = speculation;
        self
    }

    /// Sets [`GenerateOptions::logprobs`].
    #[must_use]
    pub fn logprobs(mut self, logprobs: usize) -> Self {
        self.logprobs = Some(logprobs);
        self
    }

    /// Sets [`GenerateOptions::post_sampling`].
    #[must_use]
    pub fn post_sampling(mut self, post_sampling: bool) -> Self {
        self.post_sampling = post_sampling;
        self
    }

    /// Sets [`GenerateOptions::preserved_tokens`].
    #[must_use]
    pub fn preserved_tokens(mut self, preserved_tokens: impl Into<Vec<Token>>) -> Self {
        self.preserved_tokens = preserved_tokens.into();
        self
    }

    /// Sets [`GenerateOptions::ignore_eos`].
    #[must_use]
    pub fn ignore_eos(mut self, ignore_eos: bool) -> Self {
        self.ignore_eos = ignore_eos;
        self
    }

    /// Sets [`GenerateOptions::prompt_progress`].
    #[must_use]
    pub fn prompt_progress(mut self, prompt_progress: bool) -> Self {
        self.prompt_progress = prompt_progress;
        self
    }

    /// Sets [`GenerateOptions::slot`].
    #[must_use]
    pub fn slot(mut self, slot: usize) -> Self {
        self.slot = Some(slot);
        self
    }

    /// Sets [`GenerateOptions::lora_scales`].
    #[must_use]
    pub fn lora_scales(mut self, lora_scales: impl Into<Vec<f32>>) -> Self {
        self.lora_scales = Some(lora_scales.into());
        self
    }

    /// Checks the options (and their sampling parameters).
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidRequest`] naming the first bad field: `max_tokens` 0, an empty stop
    /// sequence, a speculation `max_draft` outside 1..=64, more than 20 log-probability
    /// candidates, or a bad sampling value (see [`SamplingParams::validate`]). LoRA scales are
    /// checked against the engine's adapters when the request is prepared.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.max_tokens == 0 {
            return Err(EngineError::InvalidRequest { field: "max_tokens", value: "0".into(), reason: "must be at least 1" });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest { field: "stop", value: "\"\"".into(), reason: "stop sequences must not be empty" });
        }
        if let Some(max_draft) = self.speculation.max_draft()
            && !(1..=64).contains(&max_draft)
        {
            return Err(EngineError::InvalidRequest {
                field: "speculation",
                value: max_draft.to_string(),
                reason: "max_draft must be within 1..=64",
            });
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(EngineError::InvalidRequest { field: "logprobs", value: n.to_string(), reason: "at most 20 candidates per token" });
        }
        self.sampling.validate()
    }
}

/// One generation request: what it starts from, and how to generate.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GenerateRequest {
    /// What the generation starts from.
    pub prompt: Prompt,
    /// How to generate.
    pub options: GenerateOptions,
}

impl GenerateRequest {
    /// A request for `prompt` (text without control-token parsing) with the default options.
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerateRequest { prompt: Prompt::text(prompt), options: GenerateOptions::default() }
    }

    /// A chat request with the default options.
    pub fn chat(messages: impl Into<Vec<ChatMessage>>) -> Self {
        GenerateRequest { prompt: Prompt::chat(messages), options: GenerateOptions::default() }
    }

    /// A request for token ids as they are, with the default options.
    pub fn tokens(tokens: impl Into<Vec<Token>>) -> Self {
        GenerateRequest { prompt: Prompt::Tokens(tokens.into()), options: GenerateOptions::default() }
    }

    /// Sets [`GenerateRequest::prompt`].
    #[must_use]
    pub fn prompt(mut self, prompt: Prompt) -> Self {
        self.prompt = prompt;
        self
    }

    /// These options instead of the current ones (sets [`GenerateRequest::options`]).
    #[must_use]
    pub fn with(self, options: GenerateOptions) -> Self {
        GenerateRequest { options, ..self }
    }

    /// Tokens generated at most ([`GenerateOptions::max_tokens`]).
    #[must_use]
    pub fn max_tokens(mut self, max_tokens: usize) -> Self {
        self.options = self.options.max_tokens(max_tokens);
        self
    }

    /// Stop sequences ([`GenerateOptions::stop`]).
    #[must_use]
    pub fn stop(mut self, stop: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.options = self.options.stop(stop);
        self
    }

    /// Sampling parameters ([`GenerateOptions::sampling`]).
    #[must_use]
    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.options = self.options.sampling(sampling);
        self
    }

    /// A token that cancels the generation ([`GenerateOptions::cancel`]).
    #[must_use]
    pub fn cancel(mut self, cancel: CancelToken) -> Self {
        self.options = self.options.cancel(cancel);
        self
    }

    /// Speculative decoding ([`GenerateOptions::speculation`]).
    #[must_use]
    pub fn speculation(mut self, speculation: Speculation) -> Self {
        self.options = self.options.speculation(speculation);
        self
    }

    /// Log-probabilities of each token and its `n` likeliest alternatives
    /// ([`GenerateOptions::logprobs`]).
    #[must_use]
    pub fn logprobs(mut self, n: usize) -> Self {
        self.options = self.options.logprobs(n);
        self
    }

    /// What becomes of control-token text in the prompt's text (see [`Prompt::Text`]) or its
    /// messages' contents (see [`Prompt::Chat`]). Tokens: no effect.
    #[must_use]
    pub fn specials(mut self, specials: SpecialText) -> Self {
        match &mut self.prompt {
            Prompt::Text { specials: s, .. } | Prompt::Chat { specials: s, .. } => *s = specials,
            Prompt::Tokens(_) => {}
        }
        self
    }

    /// The options' checks (the prompt is checked when it is tokenized: an empty one is
    /// [`EngineError::EmptyPrompt`]).
    pub fn validate(&self) -> Result<(), EngineError> {
        self.options.validate()
    }
}

/// Speculative decoding of a single-stream generation: tokens are drafted cheaply, then the
/// model decodes them all in one batch and the request's own sampler draws each position in
/// turn, keeping drafts while they equal what it drew. Every token of the output is therefore
/// drawn from the distribution it would have had without speculation (greedy or sampled, with
/// penalties, biases or a grammar; see `speculative.rs` for the argument and the rounding
/// caveat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speculation {
    /// One decode per token.
    #[default]
    Off,
    /// Prompt lookup: up to `max_draft` tokens drafted from the continuation of the last few
    /// tokens' most recent earlier occurrence in the prompt or output.
    Ngram {
        /// Most tokens drafted per round (1 to 64).
        max_draft: u32,
    },
    /// Up to `max_draft` tokens drafted greedily by the engine's draft model
    /// ([`EngineConfig::draft_model`]).
    Draft {
        /// Most tokens drafted per round (1 to 64).
        max_draft: u32,
    },
}

impl Speculation {
    /// The most tokens drafted per round; None when off.
    pub fn max_draft(self) -> Option<u32> {
        match self {
            Speculation::Off => None,
            Speculation::Ngram { max_draft } | Speculation::Draft { max_draft } => Some(max_draft),
        }
    }

    /// The name the CLI and reports use: `off`, `ngram`, `draft`.
    pub fn name(self) -> &'static str {
        match self {
            Speculation::Off => "off",
            Speculation::Ngram { .. } => "ngram",
            Speculation::Draft { .. } => "draft",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_types_parse_by_llama_cpps_names_and_a_quantized_v_cache_needs_flash_attention() {
        for t in CacheType::ALL {
            assert_eq!(t.name().parse::<CacheType>(), Ok(t));
        }
        assert_eq!("Q8_0".parse::<CacheType>(), Ok(CacheType::Q8_0));
        let err = "q9".parse::<CacheType>().unwrap_err();
        assert!(err.contains("q9") && err.contains("iq4_nl"), "{err}");
        let off = SessionConfig { flash_attention: FlashAttention::Off, cache_type_v: CacheType::Q4_0, ..Default::default() };
        assert!(matches!(off.validate(), Err(EngineError::InvalidConfig { field: "cache_type_v", .. })));
        let keys_only = SessionConfig { flash_attention: FlashAttention::Off, cache_type_k: CacheType::Q4_0, ..Default::default() };
        assert!(keys_only.validate().is_ok());
        assert!(SessionConfig { cache_type_v: CacheType::Q4_0, ..Default::default() }.validate().is_ok());
    }

    #[test]
    fn bad_sampling_values_are_named() {
        for (p, field) in [
            (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_k: -1, ..Default::default() }, "top_k"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { repeat_penalty: 0.0, ..Default::default() }, "repeat_penalty"),
            (SamplingParams { frequency_penalty: 2.5, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { presence_penalty: f32::NAN, ..Default::default() }, "presence_penalty"),
            (SamplingParams { logit_bias: vec![(Token(5), 101.0)], ..Default::default() }, "logit_bias"),
            (SamplingParams { grammar: Some(String::new()), ..Default::default() }, "grammar"),
        ] {
            match p.validate() {
                Err(EngineError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().is_greedy());
    }

    #[test]
    fn a_json_schema_becomes_the_grammar_or_an_error_naming_where_it_is_bad() {
        let schema = serde_json::json!({ "type": "object", "properties": { "n": { "type": "integer" } }, "required": ["n"] });
        let sampling = SamplingParams::greedy().json_schema(&schema).unwrap();
        assert_eq!(sampling.grammar, Some(crate::json_grammar::json_schema_grammar(&schema).unwrap()));
        assert!(sampling.is_greedy() && sampling.validate().is_ok());
        // A keyword the converter cannot enforce is refused, with where it is.
        let bad = serde_json::json!({ "type": "object", "properties": { "n": { "type": "string", "pattern": "^a" } } });
        match SamplingParams::default().json_schema(&bad) {
            Err(EngineError::JsonSchema(e)) => {
                assert_eq!(e.path, "#/properties/n");
                assert!(e.reason.contains("pattern"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_chain_is_the_usual_order_and_greedy_skips_the_truncations() {
        use SamplerStage::*;
        let p = SamplingParams { repeat_penalty: 1.1, seed: 7, ..Default::default() };
        let penalties = Penalties { last_n: 64, repeat: 1.1, frequency: 0.0, presence: 0.0 };
        assert_eq!(p.stages(), vec![penalties, TopK(40), TopP(0.95), MinP(0.05), Temp(0.8), Dist(7)]);
        // Biases come first, then one penalties stage for all three penalties.
        let p = SamplingParams { logit_bias: vec![(Token(3), -1.0)], presence_penalty: 0.5, ..SamplingParams::greedy() };
        assert_eq!(p.stages(), vec![LogitBias(vec![(Token(3), -1.0)]), Penalties { last_n: 64, repeat: 1.0, frequency: 0.0, presence: 0.5 }, Greedy]);
        assert_eq!(SamplingParams::greedy().stages(), vec![Greedy]);
        let off = SamplingParams { top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() };
        assert_eq!(off.stages(), vec![Temp(0.8), Dist(0)]);
    }

    #[test]
    fn zero_max_tokens_empty_stops_and_too_many_logprobs_are_refused() {
        let bad = |r: GenerateRequest| match r.validate() {
            Err(EngineError::InvalidRequest { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(GenerateRequest::new("x").max_tokens(0)), "max_tokens");
        assert_eq!(bad(GenerateRequest::new("x").stop([""])), "stop");
        assert_eq!(bad(GenerateRequest::new("x").logprobs(21)), "logprobs");
        assert_eq!(bad(GenerateRequest::new("x").speculation(Speculation::Ngram { max_draft: 0 })), "speculation");
        // The prompt is not the options' business: an empty one is found when it is tokenized.
        assert!(GenerateRequest::new("").logprobs(20).validate().is_ok());
    }

    #[test]
    fn setters_set_their_own_fields() {
        let literal = SessionConfig {
            n_ctx: 11,
            n_batch: 12,
            n_ubatch: 13,
            n_threads: 14,
            n_threads_batch: 15,
            flash_attention: FlashAttention::On,
            embeddings: true,
            n_seq_max: 16,
            pooling: Some(Pooling::Cls),
            cache_type_k: CacheType::Q8_0,
            cache_type_v: CacheType::Q4_1,
            recurrent_snapshots: 17,
            lora_scales: Some(vec![0.5, 0.25]),
        };
        let built = SessionConfig::default()
            .n_ctx(11)
            .n_batch(12)
            .n_ubatch(13)
            .n_threads(14)
            .n_threads_batch(15)
            .flash_attention(FlashAttention::On)
            .embeddings(true)
            .n_seq_max(16)
            .pooling(Some(Pooling::Cls))
            .cache_type_k(CacheType::Q8_0)
            .cache_type_v(CacheType::Q4_1)
            .recurrent_snapshots(17)
            .lora_scales(vec![0.5, 0.25]);
        assert_eq!(built, literal);
        let literal = SamplingParams {
            temperature: 0.1,
            top_k: 2,
            top_p: 0.3,
            min_p: 0.4,
            repeat_penalty: 1.5,
            repeat_last_n: 6,
            frequency_penalty: 0.7,
            presence_penalty: 0.8,
            logit_bias: vec![(Token(9), 1.0)],
            grammar: Some("root ::= \"x\"".into()),
            grammar_start: GrammarStart::AfterPrefill(vec![Token(10)]),
            seed: 11,
        };
        let built = SamplingParams::default()
            .temperature(0.1)
            .top_k(2)
            .top_p(0.3)
            .min_p(0.4)
            .repeat_penalty(1.5)
            .repeat_last_n(6)
            .frequency_penalty(0.7)
            .presence_penalty(0.8)
            .logit_bias(vec![(Token(9), 1.0)])
            .grammar("root ::= \"x\"")
            .grammar_start(GrammarStart::AfterPrefill(vec![Token(10)]))
            .seed(11);
        assert_eq!(built, literal);
    }

    #[test]
    fn specials_set_the_prompt_kinds_own_switch() {
        let parse = SpecialText::Parse;
        assert_eq!(GenerateRequest::new("x").specials(parse).prompt, Prompt::Text { text: "x".into(), specials: parse });
        let chat = GenerateRequest::chat(vec![ChatMessage::new("user", "x")]).specials(parse);
        assert!(matches!(chat.prompt, Prompt::Chat { specials: SpecialText::Parse, .. }));
    }
}
