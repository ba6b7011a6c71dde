//! The routes: which handler answers which path, behind which checks.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};

use super::AppState;
use super::{auth, embeddings, handlers, lora, metrics, native, ollama, props, rerank, slots, tracking};

/// The routes, behind `cors` where the server allows browser origins (outermost, so that a
/// preflight, which carries no key, is answered for every route).
pub fn router(state: Arc<AppState>, cors: Option<tower_http::cors::CorsLayer>) -> Router {
    // OpenAI's paths, also without `/v1` (as llama-server serves them: clients configured with
    // the bare host call those).
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/chat/completions", post(handlers::chat))
        .route("/v1/chat/completions/input_tokens", post(handlers::chat_input_tokens))
        .route("/chat/completions/input_tokens", post(handlers::chat_input_tokens))
        .route("/v1/completions", post(handlers::completions))
        // llama-server's native completion is at both of these (OpenAI's only under /v1).
        .route("/completion", post(native::completion))
        .route("/completions", post(native::completion))
        .route("/infill", post(native::infill))
        .route("/v1/messages", post(handlers::messages))
        .route("/v1/messages/count_tokens", post(handlers::count_message_tokens))
        .route("/v1/responses", post(handlers::responses))
        .route("/responses", post(handlers::responses))
        .route("/v1/models", get(handlers::models))
        .route("/models", get(handlers::models))
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embeddings", post(embeddings::native))
        .route("/embedding", post(embeddings::native))
        .route("/v1/rerank", post(rerank::rerank))
        .route("/rerank", post(rerank::rerank))
        .route("/apply-template", post(handlers::apply_template))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route("/metrics", get(metrics::metrics))
        .route("/props", get(props::props))
        .route("/slots", get(props::slots))
        .route("/slots/{id}", post(slots::action))
        .route("/lora-adapters", get(lora::list).post(lora::set))
        // Ollama's API (`super::ollama`).
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/pull", post(ollama::unmanaged))
        .route("/api/push", post(ollama::unmanaged))
        .route("/api/create", post(ollama::unmanaged))
        .route("/api/copy", post(ollama::unmanaged))
        .route("/api/delete", axum::routing::delete(ollama::unmanaged))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), auth::require_key));
    let router = Router::new()
        .route("/health", get(handlers::health))
        // Ollama answers its root (clients probe it to find a server), HEAD as GET.
        .route("/", get(ollama::root))
        .merge(api)
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        // Every request, refused ones included, gets its id and time limit.
        .layer(middleware::from_fn_with_state(Arc::clone(&state), tracking::track))
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}
