//! llama-server's `GET /lora-adapters` (the model's LoRA adapters and the scales requests get)
//! and `POST /lora-adapters` (sets those scales). A request's own `lora` field overrides them
//! for that request; see [`crate::GenerateOptions::lora_scales`] for how requests of different
//! scales share the decode loop.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::handlers::Body;
use super::log;
use super::openai::{LoraField, lora_scales};

/// Which model (default: the only one, or the pinned one), as llama-server's router takes it.
#[derive(Deserialize)]
pub(super) struct ModelQuery {
    model: Option<String>,
}

/// `GET /lora-adapters`: each adapter by id, with its file, the scale requests without `lora`
/// get, the task name and prompt prefix its file declares (empty when it declares none), and an
/// activated LoRA's invocation.
pub(super) async fn list(State(state): State<Arc<AppState>>, Query(query): Query<ModelQuery>) -> Response {
    let model = match state.models.get(query.model.as_deref()).await {
        Ok(model) => model,
        Err(e) => return log::refused(&state, e),
    };
    let scales = model.core.adapter_scales();
    let adapters: Vec<serde_json::Value> = model
        .engine
        .lora()
        .iter()
        .zip(scales)
        .enumerate()
        .map(|(id, (adapter, scale))| {
            let meta = |key: &str| model.engine.lora_meta(id, key).unwrap_or_default();
            let mut entry = json!({
                "id": id,
                "path": adapter.path.display().to_string(),
                "scale": scale,
                "task_name": meta("adapter.lora.task_name"),
                "prompt_prefix": meta("adapter.lora.prompt_prefix"),
            });
            let invocation = model.engine.lora_invocation(id);
            if !invocation.is_empty() {
                // An activated LoRA: what turns it on, as llama-server lists it (each token's
                // text, control tokens as written).
                entry["alora_invocation_string"] = model.engine.tokens_to_text_with_specials(invocation).unwrap_or_default().into();
                entry["alora_invocation_tokens"] = json!(invocation);
            }
            entry
        })
        .collect();
    Json(adapters).into_response()
}

/// Adapter `scales` as llama-server's `generation_settings` and `/props` list them:
/// `[{"id", "scale"}]`, every adapter in id order.
pub(super) fn scale_entries(scales: &[f32]) -> serde_json::Value {
    scales.iter().enumerate().map(|(id, scale)| json!({ "id": id, "scale": scale })).collect()
}

/// `POST /lora-adapters` with `[{"id": 0, "scale": 0.5}, ...]`: the scales requests without
/// `lora` get from now on; adapters not listed are off. Requests already running keep theirs.
pub(super) async fn set(State(state): State<Arc<AppState>>, Query(query): Query<ModelQuery>, Body(entries): Body<Vec<LoraField>>) -> Response {
    let result = async {
        let model = state.models.get(query.model.as_deref()).await?;
        // An empty list turns every adapter off (not "the server's scales", as in a request).
        let listed = lora_scales(&entries)?.unwrap_or_default();
        model.core.set_adapter_scales(model.adapter_scales(&listed)?)?;
        Ok::<_, super::ApiError>(())
    };
    match result.await {
        Ok(()) => Json(json!({ "success": true })).into_response(),
        Err(e) => log::refused(&state, e),
    }
}
