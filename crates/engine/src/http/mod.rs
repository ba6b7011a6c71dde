//! `exsa serve`: an OpenAI-style HTTP API over the serving core.
//!
//! axum on a tokio runtime takes requests; the decode loop ([`crate::serving`]) runs on its own
//! thread and each request's events are forwarded to its response. Binds 127.0.0.1 unless told
//! otherwise; bodies are capped; a full admission queue answers 503 with `Retry-After` at once; a
//! client that goes away (a dropped stream or connection) cancels its request at the next
//! decode step; SIGTERM or Ctrl-C stops accepting and lets every accepted request finish.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming as SSE or not),
//! `GET /v1/models`, `GET /health` (open without the API key), `GET /metrics` (Prometheus).

mod error;
mod openai;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::engine::Engine;
use crate::serving::{ServingConfig, ServingCore};

pub use error::ApiError;

/// How the HTTP server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (default 127.0.0.1:8080; port 0 picks a free one).
    pub addr: SocketAddr,
    /// When set, every route but /health needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// The model's id in `/v1/models` and responses.
    pub model_id: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { addr: SocketAddr::from(([127, 0, 0, 1], 8080)), api_key: None, max_body_bytes: 1 << 20, model_id: "default".into() }
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub core: ServingCore,
    pub config: ServerConfig,
    pub n_ctx: usize,
    pub next_id: AtomicU64,
    pub metrics: routes::Metrics,
}

/// Runs the server until SIGTERM or Ctrl-C, then drains: no new connections, every accepted
/// request ends (complete or with an error), the decode loop stops. `on_listening` gets the
/// bound address (port 0 resolved) once the socket listens.
pub fn run(engine: Arc<Engine>, serving: ServingConfig, config: ServerConfig, on_listening: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let n_ctx = serving.session.n_ctx as usize;
    let core = ServingCore::start(Arc::clone(&engine), serving).map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).thread_name("exsa-http").build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!("listening on {addr}, reachable from other machines{}", if config.api_key.is_none() { " without an API key" } else { "" });
        }
        let state = Arc::new(AppState { engine, core, config, n_ctx, next_id: AtomicU64::new(1), metrics: routes::Metrics::default() });
        let app = routes::router(Arc::clone(&state));
        on_listening(addr);
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        tracing::info!("no more connections; waiting for the decode loop to end");
        // The last responses' forwarders may still hold the state for a moment.
        let mut state = state;
        loop {
            match Arc::try_unwrap(state) {
                Ok(s) => break s.core.shutdown(),
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
        Ok(())
    })
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
