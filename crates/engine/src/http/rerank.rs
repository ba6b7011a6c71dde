//! `POST /v1/rerank` and `/rerank`: the Jina and Cohere shape that retrieval stacks call
//! (`query`, `documents`, `top_n`, `return_documents`), answered by a reranker model (rank
//! pooling); any other model is a 400 naming `model`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::handlers::Body;
use super::log;

/// The most documents one request scores.
const MAX_DOCUMENTS: usize = 256;

#[derive(Deserialize)]
pub(super) struct RerankRequest {
    model: Option<String>,
    query: String,
    /// Texts, or objects with a `text` (Cohere's older form).
    documents: Vec<Value>,
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
    #[serde(flatten)]
    other: Map<String, Value>,
}

pub(super) async fn rerank(State(state): State<Arc<AppState>>, Body(body): Body<RerankRequest>) -> Response {
    match answer(&state, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

async fn answer(state: &AppState, body: RerankRequest) -> Result<Value, ApiError> {
    if let Some(name) = body.other.keys().find(|k| *k != "user") {
        return Err(ApiError::invalid(name.clone(), format!("{name} is not a field of rerank requests here; it would be ignored, so it is refused")));
    }
    if body.documents.is_empty() || body.documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid("documents", format!("1 to {MAX_DOCUMENTS} documents")));
    }
    let documents: Vec<String> = body
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => o.get("text").and_then(Value::as_str).map(str::to_owned).ok_or(i),
            _ => Err(i),
        })
        .collect::<Result<_, _>>()
        .map_err(|i| ApiError::invalid("documents", format!("documents[{i}] is not a text or an object with a text")))?;
    let model = state.models.get(body.model.as_deref()).await?;
    let (engine, query, texts) = (Arc::clone(&model.engine), body.query.clone(), documents.clone());
    let scored = model
        .pooled
        .run("documents", move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            engine.rerank(&query, &refs)
        })
        .await?;
    let tokens: usize = scored.iter().map(|(_, n)| n).sum();
    let mut results: Vec<(usize, f32)> = scored.iter().enumerate().map(|(i, &(score, _))| (i, score)).collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    results.truncate(body.top_n.unwrap_or(results.len()));
    let results: Vec<Value> = results
        .into_iter()
        .map(|(index, score)| {
            let mut result = json!({ "index": index, "relevance_score": score });
            if body.return_documents {
                result["document"] = json!({ "text": documents[index] });
            }
            result
        })
        .collect();
    state.metrics.count_ok(&crate::outcome::GenerationStats { prompt_tokens: tokens, ..Default::default() });
    Ok(json!({ "model": model.id, "object": "list", "usage": { "prompt_tokens": tokens, "total_tokens": tokens }, "results": results }))
}
