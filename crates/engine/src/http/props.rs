//! llama-server's `GET /props` (what the server runs and its defaults) and `GET /slots`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::log;

/// The defaults requests get, in llama-server's `params` shape (the fields this server has).
pub(super) fn generation_settings(state: &AppState) -> serde_json::Value {
    let s = &state.config.sampling;
    json!({
        "seed": s.seed,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "n_predict": state.config.max_tokens.map_or(-1, |n| n as i64),
        "speculative": !matches!(state.config.speculation, crate::Speculation::Off),
    })
}

/// `GET /props`: the model (the only one, or the pinned one), its template, the slots and the
/// request defaults. `n_ctx` is what one request may use: the slots share the whole KV cache.
pub(super) async fn props(State(state): State<Arc<AppState>>) -> Response {
    let model = match state.models.get(None).await {
        Ok(model) => model,
        Err(e) => return log::refused(&state, e),
    };
    let info = model.engine.model_info();
    let mut params = generation_settings(&state);
    // The scales requests without `lora` get now (`POST /lora-adapters` sets them).
    params["lora"] = super::lora::scale_entries(&model.core.adapter_scales());
    Json(json!({
        "default_generation_settings": { "n_ctx": model.n_ctx, "params": params },
        "total_slots": state.models.slots(),
        "model_alias": model.id,
        "model_path": info.path,
        "modalities": { "vision": false, "audio": false },
        "chat_template": model.engine.chat_template(),
        "build_info": state.fingerprint,
        "endpoint_slots": state.config.slots_endpoint,
        "endpoint_props": true,
        "endpoint_metrics": true,
    }))
    .into_response()
}

/// `GET /slots` (with `--slots`): each slot of the model's decode loop, as of its last step. Its
/// `n_ctx` is what one request may use: the slots share the whole KV cache. Without `--slots`,
/// 501 as llama-server answers.
pub(super) async fn slots(State(state): State<Arc<AppState>>) -> Response {
    if !state.config.slots_endpoint {
        return ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_supported_error", "this server does not list its slots: start it with --slots")
            .into_response();
    }
    let model = match state.models.get(None).await {
        Ok(model) => model,
        Err(e) => return log::refused(&state, e),
    };
    let speculative = !matches!(state.config.speculation, crate::Speculation::Off);
    let slots: Vec<serde_json::Value> = model
        .core
        .slots()
        .into_iter()
        .map(|s| {
            json!({
                "id": s.id, "n_ctx": model.n_ctx, "speculative": speculative, "is_processing": s.processing,
                "is_prefilling": s.prefilling, "n_cached_tokens": s.cached_tokens, "n_prompt_tokens": s.prompt_tokens,
                "n_decoded": s.generated_tokens,
            })
        })
        .collect();
    Json(slots).into_response()
}
