//! The request handlers: one per route, each reading its body, asking the engine, and answering
//! (generation requests through [`super::stream::Answer`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::log;
use super::models::Loaded;
use super::openai::{ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, Kind, Meta, ModelEntry, TokenizeRequest};
use super::stream::{Answer, CancelOnDrop};
use crate::config::{CancelToken, GenerateRequest};
use crate::error::EngineError;
use crate::serving::ServeRequest;

/// 200 while the server can serve; 503 while it loads, or while a model lost an rpc-server and
/// is not loaded again yet: a balancer polling this sends requests elsewhere meanwhile.
pub(super) async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.models.health() {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err((status, reason)) => {
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(json!({ "status": status, "reason": reason }))).into_response()
        }
    }
}

pub(super) async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route {} {}", request.method(), request.uri().path()))
}

pub(super) async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<ModelEntry> = state
        .models
        .ids()
        .map(|id| ModelEntry { id: id.to_string(), object: "model", created: 0, owned_by: "exsa", loaded: state.models.is_loaded(id) })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// JSON bodies whose rejections (bad JSON, wrong types, too large) are OpenAI-shaped errors.
pub(super) struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await.map_err(|e: JsonRejection| ApiError::from(e))?;
        Ok(Body(value))
    }
}

pub(super) async fn chat(State(state): State<Arc<AppState>>, Body(body): Body<ChatRequest>) -> Response {
    let cancel = CancelToken::new();
    let request = body.to_request(state.config.speculation, state.config.reasoning_format, cancel.clone());
    let (stream, usage) = (body.sampling.stream, body.sampling.include_usage());
    generate(state, body.sampling.model.as_deref(), request, cancel, Kind::Chat, stream, usage).await
}

pub(super) async fn completions(State(state): State<Arc<AppState>>, Body(body): Body<CompletionRequest>) -> Response {
    let cancel = CancelToken::new();
    let request = body.to_request(state.config.speculation, cancel.clone());
    let (stream, usage) = (body.sampling.stream, body.sampling.include_usage());
    generate(state, body.sampling.model.as_deref(), request, cancel, Kind::Completion, stream, usage).await
}

/// A generation request: prepared off the async runtime (tokenizing and building its sampler,
/// a grammar included, can take a while), submitted to the model's decode loop, answered as its
/// events come.
async fn generate(
    state: Arc<AppState>,
    model: Option<&str>,
    request: Result<GenerateRequest, ApiError>,
    cancel: CancelToken,
    kind: Kind,
    stream: bool,
    include_usage: bool,
) -> Response {
    let received = Instant::now();
    // Dropped with the handler's future when the client goes before the answer starts.
    let cancel = CancelOnDrop(cancel);
    let submitted = async {
        let request = request?;
        let model = state.models.get(model).await?;
        let logprobs = request.options.logprobs.is_some();
        let mut prepared = tokio::task::spawn_blocking({
            let model = Arc::clone(&model);
            move || prepare(&model, &request)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))??;
        let parser = prepared.take_reply_parser();
        let (sink, events) = tokio::sync::mpsc::unbounded_channel();
        model.core.submit_to(prepared, sink)?;
        Ok::<_, ApiError>((model, logprobs, events, parser))
    }
    .await;
    let (model, logprobs, events, parser) = match submitted {
        Ok(s) => s,
        Err(e) => return log::refused(&state, e),
    };
    let meta = Meta {
        id: format!("{}-{}", kind.id_prefix(), state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: model.id.clone(),
    };
    let answer = Answer { state, model, meta, kind, received, include_usage, logprobs, events, parser, _cancel: cancel };
    if stream { answer.stream() } else { answer.whole().await }
}

/// The request for `model`'s decode loop: a prompt that does not fit the context is the
/// client's error, and the context bounds `max_tokens` (by default, all of what is left).
fn prepare(model: &Loaded, request: &GenerateRequest) -> Result<ServeRequest, ApiError> {
    let mut prepared = ServeRequest::new(&model.engine, request)?;
    let prompt_tokens = prepared.tokens().len();
    if prompt_tokens >= model.n_ctx {
        return Err(EngineError::PromptTooLong { prompt_tokens, n_ctx: model.n_ctx as u32 }.into());
    }
    prepared.limit_max_tokens(model.n_ctx - prompt_tokens);
    Ok(prepared)
}

/// Embeddings are computed apart from the decode loop, each in a context of its own sized for one
/// batch (the model's weights are shared).
pub(super) async fn embeddings(State(state): State<Arc<AppState>>, Body(body): Body<EmbeddingRequest>) -> Response {
    let result = async {
        let base64 = match body.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(ApiError::invalid("encoding_format", format!("{other:?} is not float or base64"))),
        };
        let texts = body.input.texts(64)?;
        let model = state.models.get(body.model.as_deref()).await?;
        let engine = Arc::clone(&model.engine);
        let computed = tokio::task::spawn_blocking(move || {
            texts.iter().map(|t| Ok::<_, EngineError>((engine.embed(t)?, engine.tokenize(t, false)?.len()))).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
        .map_err(|e| match e {
            e @ EngineError::EmbedTooLong { .. } => ApiError::invalid("input", e),
            e => ApiError::from(e),
        })?;
        let tokens: usize = computed.iter().map(|(_, n)| n).sum();
        let data: Vec<serde_json::Value> = computed
            .into_iter()
            .enumerate()
            .map(|(index, (v, _))| {
                let embedding =
                    if base64 { json!(super::openai::base64(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())) } else { json!(v) };
                json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        Ok((json!({ "object": "list", "data": data, "model": model.id, "usage": { "prompt_tokens": tokens, "total_tokens": tokens } }), tokens))
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

/// llama-server's `/apply-template`: a chat request rendered to its prompt, without generating.
pub(super) async fn apply_template(State(state): State<Arc<AppState>>, Body(body): Body<ChatRequest>) -> Response {
    let rendered = async {
        let (messages, options) = body.chat(state.config.reasoning_format)?;
        let model = state.models.get(body.sampling.model.as_deref()).await?;
        let engine = Arc::clone(&model.engine);
        tokio::task::spawn_blocking(move || engine.format_chat_with(&messages, &options))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
            .map_err(ApiError::from)
    }
    .await;
    match rendered {
        Ok(prompt) => Json(json!({ "prompt": prompt })).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

pub(super) async fn tokenize(State(state): State<Arc<AppState>>, Body(body): Body<TokenizeRequest>) -> Response {
    let defaults = crate::TokenizeOptions::default();
    let options = crate::TokenizeOptions {
        add_special: body.add_special.unwrap_or(defaults.add_special),
        parse_special: body.parse_special.unwrap_or(defaults.parse_special),
    };
    let tokens = match state.models.get(body.model.as_deref()).await {
        Ok(model) => model.engine.tokenize_with(&body.content, options).map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match tokens {
        Ok(tokens) => Json(json!({ "tokens": tokens })).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

pub(super) async fn detokenize(State(state): State<Arc<AppState>>, Body(body): Body<DetokenizeRequest>) -> Response {
    let model = match state.models.get(body.model.as_deref()).await {
        Ok(model) => model,
        Err(e) => return log::refused(&state, e),
    };
    let n_vocab = i64::from(model.engine.model_info().n_vocab);
    if let Some(bad) = body.tokens.iter().find(|&&t| !(0..n_vocab).contains(&t)) {
        return log::refused(&state, ApiError::invalid("tokens", format!("{bad} is not a token of this model (0..{n_vocab})")));
    }
    let mut bytes = Vec::new();
    for &t in &body.tokens {
        match model.engine.token_bytes(t as i32) {
            Ok(b) => bytes.extend(b),
            Err(e) => return log::refused(&state, e.into()),
        }
    }
    Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response()
}
