//! `exsa serve`: an OpenAI-style HTTP API over the serving core.
//!
//! axum on a tokio runtime takes requests; the decode loop ([`crate::serving`]) runs on its own
//! thread and each request's events are forwarded to its response. Binds 127.0.0.1 unless told
//! otherwise; bodies are capped; a full admission queue answers 503 with `Retry-After` at once; a
//! client that goes away (a dropped stream or connection) cancels its request at the next
//! decode step; SIGTERM or Ctrl-C stops accepting and lets every accepted request finish.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming as SSE or not),
//! `POST /v1/embeddings` (llama-server's native `/embedding` and `/embeddings` too), `GET /v1/models`, `POST /tokenize`, `POST /detokenize`, `GET /health`
//! (open without the API key; 503 while the model loads), `GET /metrics` (Prometheus),
//! `GET`/`POST /lora-adapters` (the adapters' scales).
//! Several models: see [`ModelSource`] and [`ModelPolicy`].

mod anthropic;
mod auth;
mod cors;
mod embeddings;
mod error;
pub mod fields;
mod handlers;
mod log;
mod lora;
mod metrics;
mod models;
mod native;
mod ollama;
mod openai;
mod pooled;
mod props;
mod rerank;
mod responses;
mod routes;
mod slots;
mod stream;
mod tracking;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use error::ApiError;
pub use models::{ModelPolicy, ModelSource};

/// How the HTTP server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (default 127.0.0.1:8080; port 0 picks a free one, the same for every
    /// address): one or more addresses, each serving the same routes.
    pub addrs: Vec<SocketAddr>,
    /// When set, every route but /health needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Speculation for requests that do not set `speculative` (prompt lookup or off).
    pub speculation: crate::Speculation,
    /// How reasoning text is returned to chats that do not set `reasoning_format`.
    pub reasoning_format: crate::ReasoningFormat,
    /// The sampling of requests that leave a field out (temperature, top-k, top-p, min-p, seed,
    /// repeat penalty and its window); grammar and logit bias come only from requests.
    pub sampling: crate::SamplingParams,
    /// The most tokens a request generates when it does not say (default: the rest of the
    /// context).
    pub max_tokens: Option<usize>,
    /// Every OpenAI response carries `__verbose` (the native response, prompt included) unless
    /// the request sets `verbose`: llama-server's debugging aid.
    pub verbose: bool,
    /// `GET /slots` lists the slots (llama-server's `--slots`); 501 otherwise.
    pub slots_endpoint: bool,
    /// The folder of slot state files: `POST /slots/{id}?action=save|restore|erase` works with
    /// it (files in it only), answers 501 without (llama-server's `--slot-save-path`).
    pub slot_save_path: Option<std::path::PathBuf>,
    /// Origins whose browser pages may call the server (CORS; `*`: any page). Empty: none, and
    /// no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// A request running longer than this (its wait for a slot included) is stopped with an
    /// error and its slot freed (`--request-timeout`); None: no limit.
    pub request_timeout: Option<Duration>,
    /// An SSE stream with nothing to send for this long sends a comment (`: keep-alive`), so
    /// that proxies do not close it while the request waits or thinks; None: never.
    pub sse_keep_alive: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            api_key: None,
            max_body_bytes: 1 << 20,
            speculation: crate::Speculation::Off,
            reasoning_format: crate::ReasoningFormat::Auto,
            sampling: crate::SamplingParams::default(),
            max_tokens: None,
            verbose: false,
            slots_endpoint: false,
            slot_save_path: None,
            cors_origins: Vec::new(),
            request_timeout: None,
            sse_keep_alive: Some(Duration::from_secs(15)),
        }
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    pub models: models::Models,
    pub config: ServerConfig,
    pub next_id: AtomicU64,
    pub metrics: metrics::Metrics,
    /// `system_fingerprint` of every response: llama.cpp's build number and exsa's version.
    pub fingerprint: String,
}

/// Runs the server until SIGTERM or Ctrl-C, then drains: no new connections, every accepted
/// request ends (complete or with an error), the decode loops stop. The socket listens at
/// once (`on_listening` gets each bound address, port 0 resolved) and `/health` answers 503
/// until the pinned models have loaded; if one cannot be loaded, the server stops and the
/// error is returned.
pub fn run(sources: Vec<ModelSource>, policy: ModelPolicy, config: ServerConfig, on_listening: impl FnMut(SocketAddr)) -> std::io::Result<()> {
    if sources.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no model to serve (give --model or a --models-dir with .gguf files)"));
    }
    if config.addrs.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).thread_name("exsa-http").build()?;
    // Checked before anything listens: a bad origin is a configuration error.
    let cors = cors::layer(&config.cors_origins).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    runtime.block_on(async move {
        let listeners = listen(&config, on_listening).await?;
        let keep_alive = policy.keep_alive;
        let state = Arc::new(AppState {
            models: models::Models::new(sources, policy),
            config,
            next_id: AtomicU64::new(1),
            metrics: metrics::Metrics::default(),
            // `b0` where the tree records no build number, as llama-server writes it (clients
            // written for it check the leading `b`).
            fingerprint: format!("b{}-exsa-{}", crate::Engine::build_info().build_number.unwrap_or(0), env!("CARGO_PKG_VERSION")),
        });
        let app = routes::router(Arc::clone(&state), cors);
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let loader = Arc::clone(&state);
        tokio::spawn(async move {
            if let Err(e) = loader.models.load_pinned().await {
                let _ = failed_tx.send(e);
            }
        });
        let reaper = Arc::clone(&state);
        let reaping = tokio::spawn(async move {
            let mut tick = tokio::time::interval(keep_alive.clamp(Duration::from_millis(100), Duration::from_secs(5)));
            loop {
                tick.tick().await;
                reaper.models.unload_expired().await;
                reaper.models.recover_lost().await;
            }
        });
        let failure = Arc::new(std::sync::Mutex::new(None));
        let stop = {
            let failure = Arc::clone(&failure);
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    Ok(e) = failed_rx => {
                        tracing::error!("{e}");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
            }
        };
        // Every address serves until the stop; then each stops taking connections and finishes
        // the ones it has.
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        let servers: Vec<_> = listeners
            .into_iter()
            .map(|listener| {
                let mut stopped = stopped.clone();
                let serve = axum::serve(listener, app.clone()).with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|&s| s).await;
                });
                tokio::spawn(async move { serve.await })
            })
            .collect();
        // The servers hold the routes (and through them the state) from here: the drain below
        // waits until the state is the last reference.
        drop(app);
        stop.await;
        let _ = stopping.send(true);
        for server in servers {
            server.await.map_err(std::io::Error::other)??;
        }
        reaping.abort();
        tracing::info!("no more connections; waiting for the decode loops to end");
        // The last responses may still hold the state for a moment; then dropping it stops every
        // decode loop once its accepted requests have ended.
        let mut state = state;
        loop {
            match Arc::try_unwrap(state) {
                Ok(s) => {
                    let _ = tokio::task::spawn_blocking(move || drop(s)).await;
                    break;
                }
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(std::io::Error::other(e)),
            None => Ok(()),
        }
    })
}

/// Binds every address of `config`, a port 0 resolved once and used for the others too (as
/// llama-server binds one port on each of its hosts); `on_listening` gets each bound address.
async fn listen(config: &ServerConfig, mut on_listening: impl FnMut(SocketAddr)) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(config.addrs.len());
    let mut port = None;
    for &addr in &config.addrs {
        let addr = match port {
            Some(port) if addr.port() == 0 => SocketAddr::new(addr.ip(), port),
            _ => addr,
        };
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr()?;
        port.get_or_insert(bound.port());
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "listening on {bound}, reachable from other machines{}",
                if config.api_key.is_none() { " without an API key" } else { "" }
            );
        }
        on_listening(bound);
        listeners.push(listener);
    }
    Ok(listeners)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
}
