//! The routes: which handler answers which path, behind which checks.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};

use super::AppState;
use super::{auth, handlers, metrics, native, props, slots};

pub fn router(state: Arc<AppState>) -> Router {
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
        .route("/v1/embeddings", post(handlers::embeddings))
        .route("/embeddings", post(handlers::embeddings))
        .route("/apply-template", post(handlers::apply_template))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route("/metrics", get(metrics::metrics))
        .route("/props", get(props::props))
        .route("/slots", get(props::slots))
        .route("/slots/{id}", post(slots::action))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), auth::require_key));
    Router::new()
        .route("/health", get(handlers::health))
        .merge(api)
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}
