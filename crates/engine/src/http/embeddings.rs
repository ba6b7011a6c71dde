//! Embeddings: OpenAI's `POST /v1/embeddings` and llama-server's native `POST /embedding` and
//! `/embeddings`, and [`embed_inputs`], the one path that computes embeddings for every API
//! surface (Ollama's too).
//!
//! Both shapes read llama-server's inputs (OpenAI's are among them): a text, token ids, a list
//! mixing both, an object with a `prompt_string` or with OpenAI `content` parts (text only), or
//! a list of those. OpenAI's answer is `{"data": [{"embedding": [...]}], "usage"}`; the native
//! one is the bare list `[{"index", "embedding": [[...]]}]`: a list of vectors per input, the
//! pooled one, or with `--pooling none` one per token (not normalised), as llama-server answers
//! it. A request with `content` instead of `input` is answered in the native shape wherever it
//! comes, as llama-server answers it; a model that pools none has no OpenAI answer (400).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::handlers::Body;
use super::log;
use super::models::Loaded;
use super::native::prompt_tokens;
use super::openai::{LoraField, lora_scales, prompts};
use crate::{EmbeddingNorm, Pooling, Token};

/// The most inputs one request embeds.
pub(super) const MAX_INPUTS: usize = 64;

/// `POST /v1/embeddings`, `/embedding`, `/embeddings`.
#[derive(Debug, Deserialize)]
pub(super) struct EmbeddingRequest {
    input: Option<Value>,
    /// llama-server's native name for `input` (the answer is then native).
    content: Option<Value>,
    model: Option<String>,
    /// "float" (default) or "base64" (little-endian f32 bytes; OpenAI's shape only).
    encoding_format: Option<String>,
    /// OpenAI's shortened embeddings: refused (this server returns the model's width).
    dimensions: Option<u32>,
    /// llama-server's extension: how the vectors are scaled (see [`EmbeddingNorm`]; default 2,
    /// length 1).
    embd_normalize: Option<i64>,
    /// llama-server's `lora` (as a generation request's): adapter scales for this request;
    /// unset or empty, the scales `POST /lora-adapters` set.
    lora: Option<Vec<LoraField>>,
    /// Any other field: `user` is accepted (a label); the rest is refused by name.
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Which API's answer a request gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    OpenAi,
    Native,
}

/// OpenAI's `POST /v1/embeddings`: L2-normalised vectors, as OpenAI's are (llama-server's
/// `embd_normalize` picks another norm).
pub(super) async fn openai(State(state): State<Arc<AppState>>, Body(body): Body<EmbeddingRequest>) -> Response {
    answer(state, body, Shape::OpenAi).await
}

/// llama-server's native `POST /embedding` and `/embeddings`.
pub(super) async fn native(State(state): State<Arc<AppState>>, Body(body): Body<EmbeddingRequest>) -> Response {
    answer(state, body, Shape::Native).await
}

async fn answer(state: Arc<AppState>, body: EmbeddingRequest, shape: Shape) -> Response {
    let result = async {
        let (input, shape) = match (body.input, body.content) {
            (Some(input), None) => (input, shape),
            (None, Some(content)) => (content, Shape::Native),
            (Some(_), Some(_)) => return Err(ApiError::invalid("content", "send input or content, not both")),
            (None, None) => return Err(ApiError::invalid("input", "input (or llama-server's content) is required")),
        };
        let base64 = match body.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") if shape == Shape::OpenAi => true,
            Some("base64") => return Err(ApiError::invalid("encoding_format", "base64 is for OpenAI's shape (/v1/embeddings with input)")),
            Some(other) => return Err(ApiError::invalid("encoding_format", format!("{other:?} is not float or base64"))),
        };
        if body.dimensions.is_some() {
            return Err(ApiError::invalid("dimensions", "embeddings are not shortened here (the model's width is returned); leave it out"));
        }
        if let Some(name) = body.other.keys().find(|k| *k != "user") {
            return Err(ApiError::invalid(
                name.clone(),
                format!("{name} is not a field of embedding requests here; it would be ignored, so it is refused"),
            ));
        }
        let norm = match body.embd_normalize {
            None => EmbeddingNorm::Euclidean,
            Some(n) => EmbeddingNorm::from_llama_server(n).ok_or_else(|| {
                ApiError::invalid("embd_normalize", format!("{n} is none of -1 (unscaled), 0 (max absolute), 1, 2 or more (p-norm)"))
            })?,
        };
        let lora = lora_scales(body.lora.as_deref().unwrap_or_default())?;
        let rows = if shape == Shape::Native { Rows::PerTokenToo } else { Rows::Pooled };
        let (model, computed) = embed_inputs(&state, body.model.as_deref(), EmbedInput::Json(input), lora.as_deref(), rows).await?;
        let tokens: usize = computed.iter().map(|(_, n)| n).sum();
        // Pooled vectors are scaled; a model's vectors per token are given as they are.
        let pooled = model.engine.pooling() != Pooling::None;
        let vectors = computed.into_iter().map(|(mut rows, _)| {
            if pooled {
                rows.iter_mut().for_each(|v| norm.apply(v));
            }
            rows
        });
        let answer = match shape {
            Shape::OpenAi => {
                let data: Vec<Value> = vectors
                    .map(|mut rows| rows.pop().unwrap_or_default())
                    .enumerate()
                    .map(|(index, v)| {
                        let embedding = if base64 {
                            json!(super::openai::base64(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
                        } else {
                            json!(v)
                        };
                        json!({ "object": "embedding", "index": index, "embedding": embedding })
                    })
                    .collect();
                json!({ "object": "list", "data": data, "model": model.id, "usage": { "prompt_tokens": tokens, "total_tokens": tokens } })
            }
            Shape::Native => Value::Array(vectors.enumerate().map(|(index, rows)| json!({ "index": index, "embedding": rows })).collect()),
        };
        Ok((answer, tokens))
    }
    .await;
    match result {
        Ok((v, prompt_tokens)) => {
            state.metrics.count_ok(&crate::outcome::GenerationStats { prompt_tokens, ..Default::default() });
            Json(v).into_response()
        }
        Err(e) => log::refused(&state, e),
    }
}

/// What an embedding request gives to embed.
pub(super) enum EmbedInput {
    /// Texts, tokenized as [`crate::Engine::embed_many`] tokenizes them (Ollama's inputs).
    Texts(Vec<String>),
    /// llama-server's inputs (see the module's description).
    Json(Value),
}

impl EmbedInput {
    /// Each input's tokens; a 400 naming `input` for one of no known shape, or more than
    /// [`MAX_INPUTS`] (counted before any is tokenized).
    fn tokens(&self, model: &Loaded) -> Result<Vec<Vec<Token>>, ApiError> {
        let inputs = match self {
            EmbedInput::Texts(texts) => texts.len(),
            EmbedInput::Json(input) => super::openai::listed_prompts(input).map_or(1, <[Value]>::len),
        };
        if inputs == 0 || inputs > MAX_INPUTS {
            return Err(ApiError::invalid("input", format!("1 to {MAX_INPUTS} inputs")));
        }
        let tokenized = match self {
            EmbedInput::Texts(texts) => {
                texts.iter().map(|t| model.engine.embedding_tokens(t).map_err(ApiError::from)).collect::<Result<Vec<_>, _>>()?
            }
            EmbedInput::Json(input) => prompts(input, "input", |one| match one {
                Value::Object(o) if o.contains_key("content") => content_tokens(&o["content"], model),
                other => prompt_tokens(other, model, "input"),
            })?,
        };
        Ok(tokenized)
    }
}

/// The tokens of OpenAI content parts, text only: their texts joined, tokenized as one text.
fn content_tokens(content: &Value, model: &Loaded) -> Result<Vec<Token>, ApiError> {
    let Value::Array(parts) = content else {
        return Err(ApiError::invalid("input", "content must be a list of parts ({\"type\": \"text\", \"text\": ...})"));
    };
    let mut text = String::new();
    for part in parts {
        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some("text"), None) => return Err(ApiError::invalid("input", "a text part needs its text")),
            (Some(kind), _) => return Err(ApiError::invalid("input", format!("content of type {kind:?}: this server embeds text only"))),
            (None, _) => return Err(ApiError::invalid("input", "a content part needs a type")),
        }
    }
    prompt_tokens(&Value::String(text), model, "input")
}

/// Which rows an answer can give.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Rows {
    /// One pooled vector per input: a model that pools none is refused.
    Pooled,
    /// That, or a vector per token where the model pools none (llama-server's native shape).
    PerTokenToo,
}

/// Each input's embedding rows (decoded together), not normalised, and its token count: one
/// pooled row, or a row per token where the model pools none (`rows` must allow it). `lora`:
/// the request's adapter scales (None: the server's). A reranker's model (rank pooling) gives
/// scores, not embeddings: refused.
pub(super) async fn embed_inputs(
    state: &AppState,
    model: Option<&str>,
    input: EmbedInput,
    lora: Option<&[f32]>,
    rows: Rows,
) -> Result<(Arc<Loaded>, Vec<(Vec<Vec<f32>>, usize)>), ApiError> {
    let model = state.models.get(model).await?;
    let pooling = model.engine.pooling();
    if pooling == Pooling::Rank {
        return Err(ApiError::invalid("model", format!("{} is a reranker (rank pooling): it scores pairs at /v1/rerank", model.id)));
    }
    if pooling == Pooling::None && rows == Rows::Pooled {
        return Err(ApiError::invalid(
            "model",
            format!("{} pools nothing (--pooling none: a vector per token), which this API cannot answer: see /embeddings", model.id),
        ));
    }
    let options = model.embed_options(lora)?;
    // Tokenizing can take a while: off the async workers, and before the pooled queue's turn.
    let tokenized = {
        let model = Arc::clone(&model);
        tokio::task::spawn_blocking(move || input.tokens(&model))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))??
    };
    let counts: Vec<usize> = tokenized.iter().map(Vec::len).collect();
    let engine = Arc::clone(&model.engine);
    let computed = model
        .pooled
        .run("input", move || match pooling {
            Pooling::None => engine.token_embeddings(&tokenized, &options),
            _ => engine.embed_tokens(&tokenized, &options).map(|vectors| vectors.into_iter().map(|v| vec![v]).collect()),
        })
        .await?;
    Ok((model, computed.into_iter().zip(counts).collect()))
}
