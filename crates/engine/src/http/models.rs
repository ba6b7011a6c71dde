//! The models a server offers, loaded on first use and unloaded when idle.
//!
//! `--model PATH` is loaded when the server starts and stays loaded (pinned); every GGUF file
//! of `--models-dir DIR` is listed by `/v1/models` under its file name without `.gguf` and
//! loaded when a request first names it. At most `max_loaded` of those on-demand models are
//! loaded at once: a request for another one unloads the one used longest ago, if nothing runs
//! on it, and is answered 503 (retry) when every loaded one is busy. A model idle for
//! `keep_alive` is unloaded. Each loaded model has its own decode loop ([`ServingCore`]) and
//! slots; a request holds its model (an `Arc`) until its response has ended, so a model with a
//! request in flight is never unloaded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::error::ApiError;
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::serving::{ServingConfig, ServingCore, ServingStatus};

/// One model the server can serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// The id requests name it by, and `/v1/models` lists it under.
    pub id: String,
    /// Other names requests may use for it (llama-server's several `--alias` names; `id` is
    /// one of them).
    pub aliases: Vec<String>,
    /// Labels `/v1/models` lists with it (llama-server's `--tags`).
    pub tags: Vec<String>,
    /// The model's GGUF file.
    pub path: PathBuf,
    /// Loaded at start and never unloaded (`--model`).
    pub pinned: bool,
}

impl ModelSource {
    /// `path`, named `id` and nothing else.
    pub fn new(id: impl Into<String>, path: PathBuf, pinned: bool) -> ModelSource {
        ModelSource { id: id.into(), aliases: Vec::new(), tags: Vec::new(), path, pinned }
    }

    /// Whether a request's `model` names it.
    pub fn is_named(&self, name: &str) -> bool {
        self.id == name || self.aliases.iter().any(|a| a == name)
    }

    /// Every `*.gguf` file directly in `dir`, by file name, each with its file stem as id.
    pub fn scan(dir: &Path) -> std::io::Result<Vec<ModelSource>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                found.push(ModelSource::new(id, path, false));
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }
}

/// How models are loaded and kept.
#[derive(Clone, Debug)]
pub struct ModelPolicy {
    /// The engine settings every model is loaded with (`model` is replaced by each source's path).
    pub engine: EngineConfig,
    /// Slots and queue of each loaded model's decode loop.
    pub slots: u32,
    /// Requests waiting for a slot at most, per model ([`ServingConfig::max_queue`]).
    pub max_queue: usize,
    /// Prompt tokens of a step beside generating requests ([`ServingConfig::prefill_chunk`]).
    pub prefill_chunk: Option<u32>,
    /// Recurrent checkpoints per slot ([`ServingConfig::ctx_checkpoints`]).
    pub ctx_checkpoints: u32,
    /// On-demand models loaded at once, at most (pinned ones not counted).
    pub max_loaded: usize,
    /// An on-demand model unused this long is unloaded.
    pub keep_alive: Duration,
}

/// A loaded model with its decode loop.
pub(crate) struct Loaded {
    pub id: String,
    pub engine: Arc<Engine>,
    pub core: ServingCore,
    /// The KV cache the slots share, in tokens.
    pub n_ctx: usize,
    /// Embeddings and rerank scores: computed apart from the decode loop, each in a context of
    /// its own sized for one batch (the weights are shared), one at a time.
    pub pooled: super::pooled::PooledQueue,
}

impl Loaded {
    /// A `lora` field's scales (one per adapter id up to the highest it listed, see
    /// [`super::openai::lora_scales`]) as one per adapter of the model, the others off.
    ///
    /// # Errors
    ///
    /// A 400 naming `lora` when it lists an adapter the model does not have.
    pub fn adapter_scales(&self, listed: &[f32]) -> Result<Vec<f32>, ApiError> {
        let n = self.engine.lora().len();
        if listed.len() > n {
            return Err(ApiError::invalid("lora", format!("adapter id {} is not loaded (the model has {n}: GET /lora-adapters)", listed.len() - 1)));
        }
        let mut all = listed.to_vec();
        all.resize(n, 0.0);
        Ok(all)
    }

    /// What an embedding or rerank call runs with: the `lora` field's scales
    /// ([`Loaded::adapter_scales`]), else the ones requests get now (`POST /lora-adapters`),
    /// as llama-server's embeddings take them.
    pub fn embed_options(&self, listed: Option<&[f32]>) -> Result<crate::EmbedOptions, ApiError> {
        let scales = match listed {
            Some(listed) => self.adapter_scales(listed)?,
            None => self.core.adapter_scales(),
        };
        Ok(crate::EmbedOptions::default().lora_scales(scales))
    }
}

struct Entry {
    source: ModelSource,
    /// None while unloaded. The lock is held across a load, so requests for a model that is
    /// loading wait for that load instead of starting their own.
    loaded: tokio::sync::Mutex<Option<Arc<Loaded>>>,
    /// The same model for readers that must not wait (metrics, listings); set and cleared with
    /// `loaded`, under its lock. Readers look, never clone, so that a model's strong count
    /// stays 2 while no request holds it.
    view: std::sync::Mutex<Option<Arc<Loaded>>>,
    /// Milliseconds since the registry started, at the last request.
    last_used_ms: AtomicU64,
    /// How long the model stays loaded after its last request, as that request asked
    /// (Ollama's `keep_alive`): milliseconds, or [`KEEP_BY_POLICY`], or [`KEEP_FOREVER`].
    keep_ms: std::sync::atomic::AtomicI64,
    /// Why the model is not loaded now, after it lost an rpc-server and could not be loaded again.
    reload_failed: std::sync::Mutex<Option<String>>,
}

impl Entry {
    /// Sets the model, for the lock holder and for readers.
    fn set(&self, slot: &mut Option<Arc<Loaded>>, model: Option<Arc<Loaded>>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = model.clone();
        *slot = model;
    }

    fn view(&self) -> std::sync::MutexGuard<'_, Option<Arc<Loaded>>> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loaded model, if an rpc-server holding its layers was lost.
    fn lost(&self) -> Option<String> {
        self.view().as_ref().and_then(|m| m.engine.check_servers().err()).map(|e| e.to_string())
    }

    fn reload_failed(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.reload_failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No request holds the model: only the entry's two references remain.
    fn idle(model: &Arc<Loaded>) -> bool {
        Arc::strong_count(model) == 2
    }
}

/// An entry's `keep_ms` when its last request did not say: the policy's keep-alive.
const KEEP_BY_POLICY: i64 = -1;
/// An entry's `keep_ms` when its last request asked to keep it loaded.
const KEEP_FOREVER: i64 = -2;

/// A loaded model, as Ollama's `/api/ps` lists it.
pub(crate) struct LoadedInfo {
    pub id: String,
    pub info: crate::backend::ModelInfo,
    /// Its file's `general.file_type` (the quantization).
    pub file_type: Option<u32>,
    pub size_bytes: u64,
    pub n_ctx: usize,
    /// When it unloads unless used again; None: never (given with --model, or kept for ever).
    pub expires_at: Option<std::time::SystemTime>,
}

/// The server's models.
pub(crate) struct Models {
    entries: Vec<Entry>,
    policy: ModelPolicy,
    /// Serialises loads and unloads, so that `max_loaded` holds.
    gate: tokio::sync::Mutex<()>,
    epoch: Instant,
    /// False until every pinned model has loaded (`/health` answers 503 meanwhile).
    ready: AtomicBool,
    /// Why a pinned model could not be loaded, if it could not.
    failed: OnceLock<String>,
}

impl Models {
    /// A registry over `sources` (ids must be unique: later duplicates are dropped with a warning).
    pub fn new(sources: Vec<ModelSource>, policy: ModelPolicy) -> Models {
        let mut entries: Vec<Entry> = Vec::new();
        for source in sources {
            if entries.iter().any(|e| e.source.id == source.id) {
                tracing::warn!(id = %source.id, path = %source.path.display(), "a model with this id is listed already; this file is not served");
                continue;
            }
            entries.push(Entry {
                source,
                loaded: tokio::sync::Mutex::new(None),
                view: std::sync::Mutex::new(None),
                last_used_ms: AtomicU64::new(0),
                keep_ms: std::sync::atomic::AtomicI64::new(KEEP_BY_POLICY),
                reload_failed: std::sync::Mutex::new(None),
            });
        }
        let ready = !entries.iter().any(|e| e.source.pinned);
        Models { entries, policy, gate: tokio::sync::Mutex::new(()), epoch: Instant::now(), ready: AtomicBool::new(ready), failed: OnceLock::new() }
    }

    /// Slots of each loaded model's decode loop.
    pub fn slots(&self) -> u32 {
        self.policy.slots
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.source.id.as_str())
    }

    pub fn sources(&self) -> impl Iterator<Item = &ModelSource> {
        self.entries.iter().map(|e| &e.source)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// What `/health` says: Err(status, reason) while the pinned models load, while a loaded
    /// model has lost an rpc-server, or while a pinned one that did could not be loaded again.
    pub fn health(&self) -> Result<(), (&'static str, String)> {
        if !self.is_ready() {
            return Err(("loading", "the pinned models are loading".into()));
        }
        for entry in &self.entries {
            if let Some(lost) = entry.lost() {
                return Err(("rpc_server_lost", format!("{}: {lost}", entry.source.id)));
            }
            if let Some(failed) = entry.reload_failed().clone() {
                return Err(("model_unavailable", format!("{}: {failed}", entry.source.id)));
            }
        }
        Ok(())
    }

    /// Loads again the models that lost an rpc-server, once no request holds them (requests
    /// that do fail at their next decode and let go); pinned ones whose reload failed are
    /// tried again. Called on the reaper's tick and by requests that find a model lost.
    pub async fn recover_lost(&self) {
        for entry in &self.entries {
            let retry_pinned = entry.source.pinned && entry.reload_failed().is_some();
            if entry.lost().is_none() && !retry_pinned {
                continue;
            }
            let _gate = self.gate.lock().await;
            if entry.lost().is_some() {
                tracing::warn!(model = %entry.source.id, "an rpc-server of this model was lost; loading it again once idle");
                self.unload_if_idle(entry).await;
            }
            // On-demand models load again at their next request.
            if !entry.source.pinned {
                continue;
            }
            let mut slot = entry.loaded.lock().await;
            if slot.is_some() {
                continue;
            }
            match self.load(&entry.source).await {
                Ok(loaded) => {
                    entry.set(&mut slot, Some(loaded));
                    *entry.reload_failed() = None;
                }
                Err(e) => *entry.reload_failed() = Some(e.message),
            }
        }
    }

    /// Loads the pinned models; `/health` turns ready once they are in. The error of the first
    /// that fails is returned (the server should not run without its `--model`).
    pub async fn load_pinned(&self) -> Result<(), String> {
        for entry in self.entries.iter().filter(|e| e.source.pinned) {
            let mut slot = entry.loaded.lock().await;
            match self.load(&entry.source).await {
                Ok(loaded) => entry.set(&mut slot, Some(loaded)),
                Err(e) => {
                    let message = format!("could not load {}: {}", entry.source.path.display(), e.message);
                    let _ = self.failed.set(message.clone());
                    return Err(message);
                }
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The model a request names (None: the pinned model, if there is exactly one way to
    /// choose), loading it if needed.
    pub async fn get(&self, id: Option<&str>) -> Result<Arc<Loaded>, ApiError> {
        let entry = self.entry(id)?;
        entry.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        if entry.lost().is_some() || entry.reload_failed().is_some() {
            self.recover_lost().await;
            if let Some(lost) = entry.lost() {
                // Requests still hold it; they fail at their next decode.
                return Err(ApiError::new(StatusCode::BAD_GATEWAY, "server_error", lost).with_code("rpc_server_lost"));
            }
        }
        {
            let slot = entry.loaded.lock().await;
            if let Some(loaded) = slot.as_ref() {
                return Ok(Arc::clone(loaded));
            }
            if entry.source.pinned {
                // Its load at start failed, or its reload after losing an rpc-server.
                let reason = entry.reload_failed().clone().or_else(|| self.failed.get().cloned()).unwrap_or_else(|| "the model is not loaded".into());
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", reason).with_code("model_unavailable"));
            }
        }
        // Locks are taken gate first, then an entry: the only order in which two are held.
        let _gate = self.gate.lock().await;
        let mut slot = entry.loaded.lock().await;
        if let Some(loaded) = slot.as_ref() {
            // Loaded by the request that held the gate before us.
            return Ok(Arc::clone(loaded));
        }
        self.make_room(entry).await?;
        let loaded = self.load(&entry.source).await?;
        entry.set(&mut slot, Some(Arc::clone(&loaded)));
        Ok(loaded)
    }

    /// The entry a request's `model` names. A server of one model (`--model` without
    /// `--models-dir`) serves it whatever the name, as llama-server does: clients written for
    /// OpenAI send names like `gpt-4o-mini`. With several models, an unknown name is a 404.
    fn entry(&self, id: Option<&str>) -> Result<&Entry, ApiError> {
        let listed = || self.ids().collect::<Vec<_>>().join(", ");
        if let [only] = self.entries.as_slice()
            && only.source.pinned
        {
            return Ok(only);
        }
        match id {
            Some(id) => self.entries.iter().find(|e| e.source.is_named(id)).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("the model {id:?} does not exist here; GET /v1/models lists: {}", listed()),
                )
                .with_code("model_not_found")
            }),
            None => {
                let mut pinned = self.entries.iter().filter(|e| e.source.pinned);
                match (pinned.next(), pinned.next(), self.entries.len()) {
                    (Some(e), None, _) => Ok(e),
                    (None, None, 1) => Ok(&self.entries[0]),
                    _ => Err(ApiError::invalid("model", format!("name one of: {}", listed()))),
                }
            }
        }
    }

    /// Unloads on-demand models until one more fits `max_loaded`: the least recently used
    /// idle one first. 503 when every loaded one has requests in flight.
    async fn make_room(&self, wanted: &Entry) -> Result<(), ApiError> {
        loop {
            let mut loaded = 0;
            let mut idle: Option<(&Entry, u64)> = None;
            // Only the gate holder (this task) loads on-demand models, so the views are exact.
            for e in self.entries.iter().filter(|e| !e.source.pinned && !std::ptr::eq(*e, wanted)) {
                if let Some(model) = e.view().as_ref() {
                    loaded += 1;
                    let used = e.last_used_ms.load(Ordering::Relaxed);
                    if Entry::idle(model) && idle.is_none_or(|(_, u)| used < u) {
                        idle = Some((e, used));
                    }
                }
            }
            if loaded < self.policy.max_loaded {
                return Ok(());
            }
            let Some((victim, _)) = idle else {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    format!("{} models are loaded (--max-loaded) and every one is busy; retry shortly", self.policy.max_loaded),
                )
                .with_code("model_capacity"));
            };
            self.unload_if_idle(victim).await;
        }
    }

    /// Unloads `entry` if nothing uses it; its decode thread is joined off the async workers.
    async fn unload_if_idle(&self, entry: &Entry) {
        let taken = {
            let mut slot = entry.loaded.lock().await;
            match slot.as_ref() {
                Some(m) if Entry::idle(m) => {
                    let model = slot.clone();
                    entry.set(&mut slot, None);
                    model
                }
                _ => None,
            }
        };
        if let Some(model) = taken {
            tracing::info!(model = %entry.source.id, "unloading");
            // Out of the entry's lock, which lookups take; the caller's gate keeps loads out
            // until the memory is given back.
            let _ = tokio::task::spawn_blocking(move || drop(model)).await;
        }
    }

    /// How long `entry` stays loaded after its last request; None: for ever.
    fn keep_alive_ms(&self, entry: &Entry) -> Option<u64> {
        match entry.keep_ms.load(Ordering::Relaxed) {
            _ if entry.source.pinned => None,
            KEEP_FOREVER => None,
            KEEP_BY_POLICY => Some(self.policy.keep_alive.as_millis() as u64),
            ms => Some(ms.max(0) as u64),
        }
    }

    /// How long model `id` stays loaded after the request that says so (Ollama's `keep_alive`;
    /// None: the server's `--keep-alive`). A model given with --model stays loaded whatever a
    /// request says.
    pub fn keep(&self, id: &str, keep: Option<super::ollama::KeepAlive>) {
        use super::ollama::KeepAlive;
        let ms = match keep {
            None => KEEP_BY_POLICY,
            Some(KeepAlive::Forever) => KEEP_FOREVER,
            Some(KeepAlive::UnloadNow) => 0,
            Some(KeepAlive::For(d)) => d.as_millis().min(i64::MAX as u128) as i64,
        };
        if let Some(entry) = self.entries.iter().find(|e| e.source.id == id) {
            entry.keep_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Unloads model `id` now if nothing uses it, else as soon as its requests end. A model
    /// given with --model is never unloaded: 400.
    pub async fn unload(&self, id: &str) -> Result<(), ApiError> {
        let entry = self.entry(Some(id))?;
        if entry.source.pinned {
            return Err(ApiError::invalid("keep_alive", format!("the model {id:?} was given with --model and stays loaded")));
        }
        entry.keep_ms.store(0, Ordering::Relaxed);
        let _gate = self.gate.lock().await;
        self.unload_if_idle(entry).await;
        Ok(())
    }

    /// The models loaded now.
    pub fn loaded(&self) -> Vec<LoadedInfo> {
        let now = self.now_ms();
        self.entries
            .iter()
            .filter_map(|e| {
                let expires_at = self.keep_alive_ms(e).map(|keep| {
                    let at = e.last_used_ms.load(Ordering::Relaxed).saturating_add(keep);
                    std::time::SystemTime::now() + Duration::from_millis(at.saturating_sub(now))
                });
                e.view().as_ref().map(|m| {
                    let info = m.engine.model_info();
                    LoadedInfo {
                        id: m.id.clone(),
                        size_bytes: info.size_bytes,
                        info,
                        file_type: super::ollama::file_type(m),
                        n_ctx: m.n_ctx,
                        expires_at,
                    }
                })
            })
            .collect()
    }

    /// Unloads on-demand models idle for longer than their keep-alive.
    pub async fn unload_expired(&self) {
        let now = self.now_ms();
        for entry in self.entries.iter().filter(|e| !e.source.pinned) {
            let Some(keep) = self.keep_alive_ms(entry) else { continue };
            if now.saturating_sub(entry.last_used_ms.load(Ordering::Relaxed)) >= keep {
                let _gate = self.gate.lock().await;
                self.unload_if_idle(entry).await;
            }
        }
    }

    /// Each loaded model's id, decode-loop status and KV cache size, for metrics.
    pub fn statuses(&self) -> Vec<(String, ServingStatus, usize)> {
        self.entries.iter().filter_map(|e| e.view().as_ref().map(|m| (m.id.clone(), m.core.status(), m.n_ctx))).collect()
    }

    /// Whether `id` is loaded now (false while it loads).
    pub fn is_loaded(&self, id: &str) -> bool {
        self.entries.iter().any(|e| e.source.id == id && e.view().is_some())
    }

    async fn load(&self, source: &ModelSource) -> Result<Arc<Loaded>, ApiError> {
        let config = EngineConfig { model: source.path.clone(), ..self.policy.engine.clone() };
        let policy = &self.policy;
        let (slots, max_queue, prefill_chunk, ctx_checkpoints) = (policy.slots, policy.max_queue, policy.prefill_chunk, policy.ctx_checkpoints);
        let id = source.id.clone();
        tracing::info!(model = %id, path = %source.path.display(), "loading");
        let started = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            let engine = Arc::new(Engine::load(config)?);
            let serving = ServingConfig { slots, max_queue, prefill_chunk, ctx_checkpoints, session: engine.session_config().clone() };
            let n_ctx = serving.session.n_ctx as usize;
            let core = ServingCore::start(Arc::clone(&engine), serving)?;
            Ok::<_, EngineError>(Loaded { id, engine, core, n_ctx, pooled: super::pooled::PooledQueue::new(max_queue) })
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
        .map_err(|e| {
            tracing::error!(model = %source.id, "could not load: {e}");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("could not load the model {:?}: {e}", source.id))
                .with_code("model_load_failed")
        })?;
        tracing::info!(model = %source.id, ms = started.elapsed().as_millis() as u64, "loaded");
        Ok(Arc::new(loaded))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}
