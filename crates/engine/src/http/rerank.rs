//! `POST /v1/rerank` and `/rerank`, answered by a reranker model (rank pooling; any other model
//! is a 400 naming `model`), in the two shapes retrieval stacks send, told apart as llama-server
//! tells them apart (by `texts`):
//! - Jina and Cohere: `query`, `documents` (texts, or objects with a `text`), `top_n`,
//!   `return_documents`; answered `{"results": [{"index", "relevance_score", "document"?}], "usage"}`.
//! - Hugging Face's text-embeddings-inference (TEI): `query`, `texts`, `return_text`,
//!   `raw_scores`, `truncate`; answered with the bare list `[{"index", "score", "text"?}]`.
//!
//! Both list the best first. A score is what the model's classification head gives (the raw
//! logit, as llama-server answers in both shapes); TEI's `raw_scores: false` asks for the
//! sigmoid of it, which is given.

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
    /// Jina and Cohere: texts, or objects with a `text` (Cohere's older form).
    documents: Option<Vec<Value>>,
    /// TEI: texts.
    texts: Option<Vec<Value>>,
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
    #[serde(default)]
    return_text: bool,
    raw_scores: Option<bool>,
    truncate: Option<bool>,
    /// llama-server's `lora`: adapter scales for this request; unset or empty, the server's.
    lora: Option<Vec<super::openai::LoraField>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Which API's shape a request came in, and so its answer goes out in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Jina,
    Tei,
}

pub(super) async fn rerank(State(state): State<Arc<AppState>>, Body(body): Body<RerankRequest>) -> Response {
    match answer(&state, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

async fn answer(state: &AppState, body: RerankRequest) -> Result<Value, ApiError> {
    let (shape, documents) = documents(&body)?;
    let lora = super::openai::lora_scales(body.lora.as_deref().unwrap_or_default())?;
    let model = state.models.get(body.model.as_deref()).await?;
    let options = model.embed_options(lora.as_deref())?;
    let (engine, query, texts) = (Arc::clone(&model.engine), body.query.clone(), documents.clone());
    let scored = model
        .pooled
        .run(if shape == Shape::Tei { "texts" } else { "documents" }, move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            engine.rerank_with(&query, &refs, &options)
        })
        .await?;
    let tokens: usize = scored.iter().map(|s| s.tokens).sum();
    // TEI's `raw_scores: false`: the head's logit through a sigmoid, as TEI gives it.
    let squash = body.raw_scores == Some(false);
    let mut results: Vec<(usize, f32)> =
        scored.iter().enumerate().map(|(i, s)| (i, if squash { 1.0 / (1.0 + (-s.score).exp()) } else { s.score })).collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    results.truncate(body.top_n.unwrap_or(results.len()));
    state.metrics.count_ok(&crate::outcome::GenerationStats { prompt_tokens: tokens, ..Default::default() });
    let results = results.into_iter().map(|(index, score)| match shape {
        Shape::Jina => {
            let mut result = json!({ "index": index, "relevance_score": score });
            if body.return_documents {
                result["document"] = json!({ "text": documents[index] });
            }
            result
        }
        Shape::Tei => {
            let mut result = json!({ "index": index, "score": score });
            if body.return_text {
                result["text"] = json!(documents[index]);
            }
            result
        }
    });
    Ok(match shape {
        Shape::Jina => json!({
            "model": model.id,
            "object": "list",
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
            "results": results.collect::<Vec<_>>(),
        }),
        Shape::Tei => Value::Array(results.collect()),
    })
}

/// The request's shape and its documents' texts, or the 400 naming the field that is wrong or
/// that this server would otherwise ignore (a field of the other shape among them).
fn documents(body: &RerankRequest) -> Result<(Shape, Vec<String>), ApiError> {
    let (shape, field, list) = match (&body.documents, &body.texts) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("texts", "send documents (Jina, Cohere) or texts (TEI), not both")),
        (_, Some(texts)) => (Shape::Tei, "texts", texts),
        (Some(documents), None) => (Shape::Jina, "documents", documents),
        (None, None) => return Err(ApiError::invalid("documents", "documents (or TEI's texts) is required")),
    };
    let other_shapes: &[(&str, bool)] = match shape {
        Shape::Jina => &[("return_text", body.return_text), ("raw_scores", body.raw_scores.is_some()), ("truncate", body.truncate.is_some())],
        Shape::Tei => &[("return_documents", body.return_documents)],
    };
    let foreign = other_shapes.iter().find(|(_, given)| *given).map(|(name, _)| name.to_string());
    if let Some(name) = foreign.or_else(|| body.other.keys().find(|k| *k != "user").cloned()) {
        return Err(ApiError::invalid(
            name.clone(),
            format!("{name} is not a field of {field} rerank requests here; it would be ignored, so it is refused"),
        ));
    }
    if body.truncate == Some(true) {
        return Err(ApiError::invalid("truncate", "texts are not truncated here: a pair longer than one batch is refused (truncate false)"));
    }
    if list.is_empty() || list.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid(field, format!("1 to {MAX_DOCUMENTS} {field}")));
    }
    let texts = list
        .iter()
        .enumerate()
        .map(|(i, d)| match (shape, d) {
            (_, Value::String(s)) => Ok(s.clone()),
            (Shape::Jina, Value::Object(o)) => o.get("text").and_then(Value::as_str).map(str::to_owned).ok_or(i),
            _ => Err(i),
        })
        .collect::<Result<_, _>>()
        .map_err(|i| {
            let what = if shape == Shape::Jina { "a text or an object with a text" } else { "a text" };
            ApiError::invalid(field, format!("{field}[{i}] is not {what}"))
        })?;
    Ok((shape, texts))
}
