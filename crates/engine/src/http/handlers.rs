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
use super::anthropic::MessagesRequest;
use super::error::ApiError;
use super::log;
use super::models::Loaded;
use super::native::{NativeFields, Shape};
use super::openai::{ChatRequest, CompletionRequest, DetokenizeRequest, Kind, Meta, ModelEntry, Sampling, TokenizeRequest};
use super::responses::ResponsesRequest;
use super::stream::Answer;
use crate::config::GenerateRequest;
use crate::error::EngineError;
use crate::serving::ServeRequest;
use crate::token::Token;

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
        .sources()
        .map(|s| ModelEntry {
            id: s.id.clone(),
            object: "model",
            created: 0,
            owned_by: "exsa",
            loaded: state.models.is_loaded(&s.id),
            aliases: s.aliases.clone(),
            tags: s.tags.clone(),
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// JSON bodies whose rejections (bad JSON, wrong types, too large) are OpenAI-shaped errors. The
/// body is read as JSON whatever its `Content-Type` says, as llama-server reads it (`curl -d`
/// sends a form type).
pub(super) struct Body<T>(pub(super) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes =
            axum::body::Bytes::from_request(request, state).await.map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
        let Json(value) = Json::<T>::from_bytes(&bytes).map_err(|e: JsonRejection| ApiError::from(e))?;
        Ok(Body(value))
    }
}

pub(super) async fn chat(State(state): State<Arc<AppState>>, Body(body): Body<ChatRequest>) -> Response {
    answer_chat(state, body, Kind::Chat).await
}

/// A chat (OpenAI's, or what a Responses or Messages request reads as), answered in `kind`'s shape.
async fn answer_chat(state: Arc<AppState>, chat: ChatRequest, kind: Kind) -> Response {
    let request = chat.to_request(&state.config);
    let answering = Answering::new(kind, &chat.sampling, &state.config);
    generate(state, chat.sampling.model.as_deref(), request, answering).await
}

pub(super) async fn completions(State(state): State<Arc<AppState>>, Body(body): Body<CompletionRequest>) -> Response {
    let mut answering = Answering::new(Kind::Completion, &body.sampling, &state.config);
    let request = body.to_request(&state.config).map(|(request, extra_prompts)| {
        answering.extra_prompts = extra_prompts;
        request
    });
    generate(state, body.sampling.model.as_deref(), request, answering).await
}

/// How a generation request is answered.
pub(super) struct Answering {
    pub(super) kind: Kind,
    pub(super) stream: bool,
    /// A stream ends with a usage chunk (OpenAI's `stream_options.include_usage`).
    pub(super) include_usage: bool,
    /// What a native request asks of its response (`Kind::Native`).
    pub(super) native: Option<super::native::NativeFields>,
    /// The response also carries llama-server's `__verbose`: the native response, prompt included.
    pub(super) verbose: bool,
    /// Every streamed chunk carries the timings so far.
    pub(super) timings_per_token: bool,
    /// A request's prompts after the first (a list of prompts): a choice each.
    pub(super) extra_prompts: Vec<crate::config::Prompt>,
    /// Choices (`n`): that many completions of the prompt, each with its own seed (the request's,
    /// then the next ones), decoded side by side.
    pub(super) choices: usize,
}

impl Answering {
    /// The answer a request's fields ask for, in `kind`'s shape. A bad `n` has failed the request
    /// already (one choice is assumed here).
    pub(super) fn new(kind: Kind, sampling: &Sampling, server: &super::ServerConfig) -> Answering {
        Answering {
            kind,
            stream: sampling.stream,
            include_usage: sampling.include_usage(),
            native: None,
            verbose: sampling.verbose(server),
            timings_per_token: sampling.timings_per_token,
            choices: sampling.choices().unwrap_or(1),
            extra_prompts: Vec::new(),
        }
    }
}

/// OpenAI's Responses API: the input items as a chat, answered as output items.
pub(super) async fn responses(State(state): State<Arc<AppState>>, Body(body): Body<ResponsesRequest>) -> Response {
    let chat = match body.into_chat() {
        Ok(chat) => chat,
        Err(e) => return log::refused(&state, e),
    };
    answer_chat(state, chat, Kind::Responses).await
}

/// Anthropic's Messages API: the messages as a chat, answered as content blocks.
pub(super) async fn messages(State(state): State<Arc<AppState>>, Body(body): Body<MessagesRequest>) -> Response {
    let chat = match body.into_chat() {
        Ok(chat) => chat,
        Err(e) => return log::refused(&state, e),
    };
    answer_chat(state, chat, Kind::Messages).await
}

/// Anthropic's `POST /v1/messages/count_tokens`: the prompt's token count.
pub(super) async fn count_message_tokens(State(state): State<Arc<AppState>>, Body(body): Body<MessagesRequest>) -> Response {
    let chat = match body.into_chat() {
        Ok(chat) => chat,
        Err(e) => return log::refused(&state, e),
    };
    match input_tokens(&state, chat).await {
        Ok(n) => Json(json!({ "input_tokens": n })).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

/// `request` prepared for `model`: a `lora` field's scales become one per adapter of the model
/// (unset, the decode loop's default ones apply when it is admitted).
fn serve_request(model: &Loaded, request: &mut GenerateRequest) -> Result<ServeRequest, ApiError> {
    if let Some(listed) = &request.options.lora_scales {
        request.options.lora_scales = Some(model.adapter_scales(listed)?);
    }
    Ok(ServeRequest::new(&model.engine, request)?)
}

/// How many tokens a chat's prompt is, as it would be decoded.
async fn input_tokens(state: &AppState, chat: ChatRequest) -> Result<usize, ApiError> {
    let mut request = chat.to_request(&state.config)?;
    let model = state.models.get(chat.sampling.model.as_deref()).await?;
    tokio::task::spawn_blocking(move || serve_request(&model, &mut request).map(|prepared| prepared.tokens().len()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?
}

/// llama-server's `POST /chat/completions/input_tokens`: how many tokens the chat's prompt is,
/// as it would be decoded (template, tools and all), without generating.
pub(super) async fn chat_input_tokens(State(state): State<Arc<AppState>>, Body(body): Body<ChatRequest>) -> Response {
    match input_tokens(&state, body).await {
        Ok(n) => Json(json!({ "object": "response.input_tokens", "input_tokens": n })).into_response(),
        Err(e) => log::refused(&state, e),
    }
}

/// A generation request: prepared off the async runtime (tokenizing and building its sampler,
/// a grammar included, can take a while), submitted to the model's decode loop, answered as its
/// events come.
pub(super) async fn generate(
    state: Arc<AppState>,
    model: Option<&str>,
    request: Result<GenerateRequest, ApiError>,
    answering: Answering,
) -> Response {
    let Answering { kind, stream, include_usage, native, verbose, timings_per_token, choices, extra_prompts } = answering;
    let received = Instant::now();
    // Each choice's events cancel it, and only it (the request carries no cancel token, so each
    // choice's stream makes its own: a choice whose parser fails mid-stream ends alone), when
    // dropped before its end: with the handler's future when the client goes before the answer
    // starts (a choice submitted while the next one is prepared included), with the answer after.
    let submitted = async {
        let request = request?;
        let model = state.models.get(model).await?;
        // Several choices: the request once per seed (its own, then the next ones), or once per
        // prompt of a native request with several; decoded side by side, so at most a slot each.
        let mut requests = vec![request];
        if !extra_prompts.is_empty() && choices > 1 {
            return Err(ApiError::invalid("n", "several prompts each with several choices are not supported; send n = 1"));
        }
        for prompt in extra_prompts {
            requests.push(GenerateRequest { prompt, options: requests[0].options.clone() });
        }
        for i in 1..choices {
            let mut sibling = requests[0].clone();
            sibling.options.sampling.seed = sibling.options.sampling.seed.wrapping_add(i as u32);
            // Side by side: only the first choice takes a slot the request named.
            sibling.options.slot = None;
            requests.push(sibling);
        }
        if requests.len() > state.models.slots() as usize {
            let field = if choices > 1 { "n" } else { "prompt" };
            return Err(ApiError::invalid(field, format!("at most the server's {} slots (--parallel) of choices", state.models.slots())));
        }
        let logprobs = requests[0].options.logprobs.is_some();
        let mut submitted = Vec::with_capacity(requests.len());
        for request in requests {
            submitted.push(submit(&model, request, native.clone(), verbose, stream, None).await?);
        }
        Ok::<_, ApiError>((model, logprobs, submitted))
    }
    .await;
    let (model, logprobs, mut choices) = match submitted {
        Ok(s) => s,
        Err(e) => return log::refused(&state, e),
    };
    let Choice { events, parser, shape } = choices.remove(0);
    let serial = state.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        id: format!("{}-{serial}", kind.id_prefix()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: model.id.clone(),
        fingerprint: state.fingerprint.clone(),
    };
    let (native, verbose) = if kind == Kind::Native { (shape, None) } else { (None, shape) };
    let answer = Answer {
        state,
        model,
        meta,
        kind,
        received,
        include_usage,
        logprobs,
        events,
        parser,
        native,
        verbose,
        serial,
        timings_per_token,
        siblings: choices,
    };
    if stream { answer.stream() } else { answer.whole().await }
}

/// One choice of a request, submitted: its events, the parser of its reply, and the native shape
/// of its response (or of its `__verbose` echo).
pub(super) struct Choice {
    pub(super) events: crate::serving::EventStream,
    pub(super) parser: Option<crate::ReplyParser>,
    pub(super) shape: Option<Shape>,
}

/// Prepares `request` off the async workers and submits it to `model`'s decode loop. `context`
/// bounds the context one request may use below the model's (Ollama's `num_ctx`).
pub(super) async fn submit(
    model: &Arc<Loaded>,
    request: GenerateRequest,
    native: Option<NativeFields>,
    verbose: bool,
    stream: bool,
    context: Option<usize>,
) -> Result<Choice, ApiError> {
    let (mut prepared, shape) = tokio::task::spawn_blocking({
        let model = Arc::clone(model);
        move || {
            let mut request = request;
            let prepared = prepare(&model, &mut request, context)?;
            // The native shape (or the verbose echo of it) reports the prompt as prepared.
            let shape = match (native, verbose) {
                (Some(fields), _) => Some(Shape::new(&model, prepared.tokens(), &request.options, stream, fields)?),
                (None, true) => Some(Shape::new(&model, prepared.tokens(), &request.options, stream, Default::default())?),
                (None, false) => None,
            };
            Ok::<_, ApiError>((prepared, shape))
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))??;
    let parser = prepared.take_reply_parser();
    let events = model.core.stream(prepared)?;
    Ok(Choice { events, parser, shape })
}

/// The request for `model`'s decode loop: a prompt that does not fit the context (or the
/// request's own bound on it) is the client's error, and the context bounds `max_tokens` (by
/// default, all of what is left).
fn prepare(model: &Loaded, request: &mut GenerateRequest, context: Option<usize>) -> Result<ServeRequest, ApiError> {
    let mut prepared = serve_request(model, request)?;
    let n_ctx = context.map_or(model.n_ctx, |c| c.min(model.n_ctx));
    let prompt_tokens = prepared.tokens().len();
    if prompt_tokens >= n_ctx {
        return Err(EngineError::PromptTooLong { prompt_tokens, n_ctx: n_ctx as u32 }.into());
    }
    prepared.limit_max_tokens(n_ctx - prompt_tokens);
    Ok(prepared)
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
    // llama-server's defaults: no BOS, control-token text parsed.
    let specials = if body.parse_special.unwrap_or(true) { crate::SpecialText::Parse } else { crate::SpecialText::Plain };
    let options = crate::TokenizeOptions { add_special: body.add_special.unwrap_or(false), specials };
    let tokens = async {
        let model = state.models.get(body.model.as_deref()).await?;
        let tokens = model.engine.tokenize(&body.content, options)?;
        if !body.with_pieces {
            return Ok(json!(tokens));
        }
        let pieces = tokens
            .iter()
            .map(|&id| {
                let bytes = model.engine.token_bytes(id)?;
                Ok(match String::from_utf8(bytes) {
                    Ok(text) => json!({ "id": id, "piece": text }),
                    Err(e) => json!({ "id": id, "piece": e.into_bytes() }),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok::<_, ApiError>(json!(pieces))
    }
    .await;
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
        match model.engine.token_bytes(Token(t as i32)) {
            Ok(b) => bytes.extend(b),
            Err(e) => return log::refused(&state, e.into()),
        }
    }
    Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response()
}
