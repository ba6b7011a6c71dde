//! Ollama's API beside OpenAI's, on the same models, slots and decode loops: apps that speak
//! only Ollama (its Python and JS clients, Open WebUI's Ollama connection, editor plugins) work
//! unchanged. A chat or a generation is read into the OpenAI request it means and goes the one
//! generation path (templates, tools, grammars, sampling); only the answer's shape is Ollama's:
//! newline-delimited JSON objects while streaming (the default), one object otherwise, durations
//! in nanoseconds. Errors are `{"error": "..."}` with Ollama's status codes.
//!
//! Model names are strict here, unlike the OpenAI surface's single-model rule: Ollama clients
//! send names they read from `/api/tags`, and a wrong one must say so (`name` or `name:latest`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_stream::Stream;

use super::AppState;
use super::error::ApiError;
use super::handlers::{Choice, submit};
use super::log;
use super::models::Loaded;
use super::openai::{ChatRequest, CompletionRequest};
use super::stream::collect;
use crate::chat::{ChatDelta, ChatReply};
use crate::error::EngineError;
use crate::outcome::{Completion, FinishReason, GenerationStats};
use crate::serving::{Event, EventStream};
use crate::templates::ReplyParser;

/// The Ollama version this surface follows (clients check it for features).
const VERSION: &str = "0.12.6";

/// An error in Ollama's shape.
pub(super) fn error(e: ApiError) -> Response {
    (e.status, Json(json!({ "error": e.message }))).into_response()
}

fn refused(state: &AppState, e: ApiError) -> Response {
    state.metrics.count_error(e.status);
    tracing::info!(status = e.status.as_u16(), "ollama request refused: {}", e.message);
    error(e)
}

/// `GET /` and `HEAD /`: what Ollama answers, which clients probe for.
pub(super) async fn root() -> &'static str {
    "Ollama is running"
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({ "version": VERSION }))
}

/// `/api/pull`, `/api/push`, `/api/create`, `/api/copy`, `/api/delete`: models are not managed
/// through the API here.
pub(super) async fn unmanaged() -> Response {
    error(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_supported_error",
        "models are not pulled, pushed, created, copied or deleted through this server: put a GGUF file in the --models-dir folder (or start it with --model FILE)",
    ))
}

/// A body read as JSON whatever its Content-Type (Ollama's clients send none at times).
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("body", format!("not a valid request: {e}")))
}

/// The served model a request names: its id or an alias, with or without Ollama's `:latest`.
fn resolve(state: &AppState, name: &str) -> Result<String, ApiError> {
    let bare = name.strip_suffix(":latest").unwrap_or(name);
    state.models.sources().find(|s| s.is_named(name) || s.is_named(bare)).map(|s| s.id.clone()).ok_or_else(|| {
        let mut e =
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("model \"{name}\" not found (GET /api/tags lists the models)"));
        e.param = Some("model".into());
        e
    })
}

async fn model(state: &AppState, name: &str) -> Result<Arc<Loaded>, ApiError> {
    let id = resolve(state, name)?;
    state.models.get(Some(&id)).await
}

/// `GET /api/tags`: every model served, loaded or not.
pub(super) async fn tags(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .models
        .sources()
        .map(|s| {
            let size = std::fs::metadata(&s.path).map_or(0, |m| m.len());
            let modified = std::fs::metadata(&s.path).and_then(|m| m.modified()).ok();
            json!({
                "name": format!("{}:latest", s.id), "model": format!("{}:latest", s.id),
                "modified_at": rfc3339(modified.unwrap_or(UNIX_EPOCH)), "size": size, "digest": "",
                "details": { "format": "gguf", "family": "", "families": null, "parameter_size": "", "quantization_level": "" },
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

#[derive(Deserialize)]
struct ShowBody {
    model: Option<String>,
    /// Ollama's older name for `model`.
    name: Option<String>,
    /// Ollama's switch for the whole tokenizer in `model_info`; what is shown here is small
    /// either way.
    #[serde(default, rename = "verbose")]
    _verbose: bool,
}

/// `POST /api/show`: the model's family, size, quantization, context length and template (the
/// model is loaded to read them).
pub(super) async fn show(State(state): State<Arc<AppState>>, bytes: Bytes) -> Response {
    let shown = async {
        let body: ShowBody = body(&bytes)?;
        let name = body.model.or(body.name).ok_or_else(|| ApiError::invalid("model", "is required"))?;
        let model = model(&state, &name).await?;
        let info = model.engine.model_info();
        let details = details(&info, file_type(&model));
        let arch = &info.architecture;
        let mut model_info = Map::new();
        model_info.insert("general.architecture".into(), json!(arch));
        model_info.insert("general.parameter_count".into(), json!(info.n_params));
        model_info.insert(format!("{arch}.context_length"), json!(info.n_ctx_train));
        model_info.insert(format!("{arch}.embedding_length"), json!(info.n_embd));
        Ok::<_, ApiError>(json!({
            "modelfile": "", "parameters": "", "license": "",
            "template": model.engine.chat_template(),
            "details": details,
            "model_info": model_info,
            "capabilities": ["completion", "tools"],
            "modified_at": rfc3339(std::fs::metadata(&info.path).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH)),
        }))
    }
    .await;
    match shown {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(&state, e),
    }
}

/// Ollama's `details` of a model: its family, parameter count and quantization (its file's
/// `general.file_type`).
fn details(info: &crate::backend::ModelInfo, file_type: Option<u32>) -> Value {
    json!({
        "parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
        "parameter_size": parameter_size(info.n_params), "quantization_level": file_type.and_then(quantization).unwrap_or(""),
    })
}

/// llama.cpp's file types (`enum llama_ftype`) by the names Ollama shows.
fn quantization(file_type: u32) -> Option<&'static str> {
    const NAMES: [(u32, &str); 30] = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (7, "Q8_0"),
        (8, "Q5_0"),
        (9, "Q5_1"),
        (10, "Q2_K"),
        (11, "Q3_K_S"),
        (12, "Q3_K_M"),
        (13, "Q3_K_L"),
        (14, "Q4_K_S"),
        (15, "Q4_K_M"),
        (16, "Q5_K_S"),
        (17, "Q5_K_M"),
        (18, "Q6_K"),
        (19, "IQ2_XXS"),
        (20, "IQ2_XS"),
        (21, "Q2_K_S"),
        (22, "IQ3_XS"),
        (23, "IQ3_XXS"),
        (24, "IQ1_S"),
        (25, "IQ4_NL"),
        (26, "IQ3_S"),
        (27, "IQ3_M"),
        (28, "IQ2_S"),
        (29, "IQ2_M"),
        (30, "IQ4_XS"),
        (31, "IQ1_M"),
        (32, "BF16"),
    ];
    NAMES.iter().find(|(n, _)| *n == file_type).map(|(_, name)| *name)
}

/// A model's `general.file_type`.
pub(super) fn file_type(model: &Loaded) -> Option<u32> {
    model.engine.meta("general.file_type").and_then(|v| v.trim().parse().ok())
}

/// A parameter count as Ollama writes it: 268.10M, 7.2B.
fn parameter_size(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{n}"),
    }
}

/// `GET /api/ps`: the models loaded now, their size and when they unload (a model given with
/// --model stays: far in the future, as Ollama writes a model kept for ever).
pub(super) async fn ps(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .models
        .loaded()
        .into_iter()
        .map(|m| {
            let expires = m.expires_at.map_or_else(|| "2318-01-01T00:00:00Z".to_string(), rfc3339);
            json!({
                "name": format!("{}:latest", m.id), "model": format!("{}:latest", m.id), "size": m.size_bytes,
                "digest": "", "details": details(&m.info, m.file_type), "expires_at": expires, "size_vram": 0, "context_length": m.n_ctx,
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

/// The fields of `/api/chat` and `/api/generate` this server reads; any other is refused by name.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default = "yes")]
    stream: bool,
    format: Option<Value>,
    options: Option<Map<String, Value>>,
    /// How long the model stays loaded after the request (see [`keep_alive`]).
    keep_alive: Option<Value>,
    think: Option<Value>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    messages: Vec<Map<String, Value>>,
    tools: Option<Value>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Deserialize)]
struct GenerateBody {
    #[serde(flatten)]
    common: Common,
    prompt: Option<String>,
    system: Option<String>,
    /// The prompt as it is, without the chat template.
    #[serde(default)]
    raw: bool,
    images: Option<Vec<Value>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Refuses request fields this server does not honour (each could change the output).
fn check_other(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        if value.is_null() {
            continue;
        }
        let reason = match name.as_str() {
            "images" => "no vision model is served here",
            "suffix" => "fill-in-the-middle is served at llama-server's /infill",
            "template" => "the model's own chat template is used (a per-request template is not supported)",
            "context" => "the conversation context of an earlier /api/generate is not kept; send the text",
            _ => "is not a field this server knows; it would be ignored, so it is refused",
        };
        return Err(ApiError::invalid(name.clone(), format!("{name}: {reason}")));
    }
    Ok(())
}

/// Ollama's `options` as the OpenAI fields they mean. Load-time options (threads, GPU layers,
/// batch, memory mapping) do not change the output and are let through; sampling options this
/// server does not have are refused by name.
fn options(options: Option<Map<String, Value>>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in options.unwrap_or_default() {
        if value.is_null() {
            continue;
        }
        let field = match name.as_str() {
            "temperature" | "top_k" | "top_p" | "min_p" | "seed" | "stop" | "repeat_penalty" | "presence_penalty" | "frequency_penalty" => {
                name.clone()
            }
            "num_predict" => {
                // Ollama: -1 generates without a bound, -2 until the context is full.
                if value.as_i64().is_some_and(|n| n < 0) {
                    continue;
                }
                "max_tokens".into()
            }
            "num_ctx" => {
                chat.insert("__num_ctx".into(), value);
                continue;
            }
            "num_gpu" | "main_gpu" | "num_thread" | "num_batch" | "use_mmap" | "use_mlock" | "numa" | "low_vram" | "num_keep" => continue,
            other => return Err(ApiError::invalid(format!("options.{other}"), format!("options.{other} is not supported here; leave it out"))),
        };
        chat.insert(field, value);
    }
    Ok(())
}

/// `format`: "json" for any JSON object, or a JSON schema, as a grammar.
fn format(format: Option<Value>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    match format {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) if s == "json" => {
            chat.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            chat.insert("response_format".into(), json!({ "type": "json_schema", "json_schema": { "name": "format", "schema": schema } }));
        }
        Some(other) => return Err(ApiError::invalid("format", format!("{other} is not \"json\" or a JSON schema"))),
    }
    Ok(())
}

/// `think`: thinking on or off for a model whose template switches it.
fn think(think: Option<Value>, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    match think {
        None | Some(Value::Null) => {}
        Some(Value::Bool(on)) => {
            chat.insert("chat_template_kwargs".into(), json!({ "enable_thinking": on }));
        }
        Some(level @ Value::String(_)) => {
            chat.insert("reasoning_effort".into(), level);
        }
        Some(other) => return Err(ApiError::invalid("think", format!("{other} is not true, false or an effort level"))),
    }
    Ok(())
}

/// An Ollama message as an OpenAI one: tool calls' arguments (objects) become JSON text, a tool
/// result names its tool; images are refused (no vision model is served).
fn message(mut m: Map<String, Value>, i: usize) -> Result<Value, ApiError> {
    let bad = |why: String| ApiError::invalid("messages", format!("messages[{i}]: {why}"));
    if m.get("images").is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty())) {
        return Err(bad("images: no vision model is served here".into()));
    }
    m.remove("images");
    if let Some(thinking) = m.remove("thinking") {
        m.insert("reasoning_content".into(), thinking);
    }
    if let Some(name) = m.remove("tool_name") {
        m.insert("name".into(), name);
    }
    if let Some(calls) = m.remove("tool_calls") {
        let calls = calls.as_array().cloned().unwrap_or_default();
        let calls: Result<Vec<Value>, ApiError> = calls
            .into_iter()
            .enumerate()
            .map(|(k, call)| {
                let function = &call["function"];
                let name = function["name"].as_str().ok_or_else(|| bad(format!("tool_calls[{k}] has no function name")))?;
                let arguments = match &function["arguments"] {
                    Value::String(s) => s.clone(),
                    Value::Null => "{}".into(),
                    args => args.to_string(),
                };
                Ok(json!({ "id": format!("call_{i}_{k}"), "type": "function", "function": { "name": name, "arguments": arguments } }))
            })
            .collect();
        m.insert("tool_calls".into(), Value::Array(calls?));
    }
    Ok(Value::Object(m))
}

/// Gives each tool result the id of the call it answers: Ollama's results name their tool
/// (`tool_name`, made `name`), OpenAI's name the call. A result answers the earliest unanswered
/// call of its tool, or without a name the earliest unanswered call.
fn answer_calls(mut messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    let mut open: Vec<(String, String)> = Vec::new();
    for (i, m) in messages.iter_mut().enumerate() {
        if let Some(calls) = m["tool_calls"].as_array() {
            open.extend(calls.iter().map(|c| (c["id"].as_str().unwrap_or("").to_owned(), c["function"]["name"].as_str().unwrap_or("").to_owned())));
        }
        if m["role"] != "tool" || m.get("tool_call_id").is_some_and(|id| !id.is_null()) {
            continue;
        }
        let name = m["name"].as_str();
        let answered = open
            .iter()
            .position(|(_, tool)| name.is_none_or(|n| n == tool))
            .ok_or_else(|| ApiError::invalid("messages", format!("messages[{i}]: a tool result with no tool call before it to answer")))?;
        m["tool_call_id"] = json!(open.remove(answered).0);
    }
    Ok(messages)
}

/// The OpenAI request fields `common` stands for, in `chat`.
fn common_fields(common: &mut Common, chat: &mut Map<String, Value>) -> Result<(), ApiError> {
    chat.insert("model".into(), json!(common.model));
    chat.insert("stream".into(), json!(common.stream));
    options(common.options.take(), chat)?;
    format(common.format.take(), chat)?;
    think(common.think.take(), chat)
}

/// A request's bound on the context (`options.num_ctx`), taken out of the OpenAI fields.
fn take_num_ctx(chat: &mut Map<String, Value>) -> Result<Option<usize>, ApiError> {
    match chat.remove("__num_ctx") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| ApiError::invalid("options.num_ctx", format!("{v} is not a positive number"))),
    }
}

/// How an Ollama answer looks: a chat's message or a generation's response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Generate,
}

/// `POST /api/chat`.
pub(super) async fn chat(State(state): State<Arc<AppState>>, bytes: Bytes) -> Response {
    let prepared = (|| {
        let mut body: ChatBody = body(&bytes)?;
        check_other(&body.other)?;
        let mut chat = Map::new();
        common_fields(&mut body.common, &mut chat)?;
        let messages: Result<Vec<Value>, ApiError> = body.messages.into_iter().enumerate().map(|(i, m)| message(m, i)).collect();
        chat.insert("messages".into(), Value::Array(answer_calls(messages?)?));
        if let Some(tools) = body.tools.filter(|t| !t.is_null()) {
            chat.insert("tools".into(), tools);
        }
        let num_ctx = take_num_ctx(&mut chat)?;
        let request: ChatRequest = serde_json::from_value(Value::Object(chat)).map_err(|e| ApiError::invalid("body", e.to_string()))?;
        Ok::<_, ApiError>((body.common, request, num_ctx))
    })();
    let (common, request, num_ctx) = match prepared {
        Ok(p) => p,
        Err(e) => return refused(&state, e),
    };
    let generate = request.to_request(&state.config);
    answer(state, common, generate, num_ctx, Shape::Chat).await
}

/// `POST /api/generate`: a prompt with the model's chat template (as a user message, after
/// `system`), or as it is with `raw`. An empty prompt only loads (or, with `keep_alive: 0`,
/// unloads) the model.
pub(super) async fn generate(State(state): State<Arc<AppState>>, bytes: Bytes) -> Response {
    let prepared = (|| {
        let mut body: GenerateBody = body(&bytes)?;
        if body.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::invalid("images", "images: no vision model is served here"));
        }
        check_other(&body.other)?;
        let mut fields = Map::new();
        common_fields(&mut body.common, &mut fields)?;
        let num_ctx = take_num_ctx(&mut fields)?;
        let prompt = body.prompt.unwrap_or_default();
        if prompt.is_empty() {
            return Ok((body.common, None, num_ctx));
        }
        let request = if body.raw {
            if body.system.is_some() {
                return Err(ApiError::invalid("system", "a raw prompt has no system message (leave out raw or system)"));
            }
            fields.insert("prompt".into(), json!(prompt));
            let request: CompletionRequest = serde_json::from_value(Value::Object(fields)).map_err(|e| ApiError::invalid("body", e.to_string()))?;
            // One text: one prompt.
            request.to_request(&state.config).map(|(request, _)| request)
        } else {
            let mut messages = Vec::new();
            if let Some(system) = body.system {
                messages.push(json!({ "role": "system", "content": system }));
            }
            messages.push(json!({ "role": "user", "content": prompt }));
            fields.insert("messages".into(), Value::Array(messages));
            let request: ChatRequest = serde_json::from_value(Value::Object(fields)).map_err(|e| ApiError::invalid("body", e.to_string()))?;
            request.to_request(&state.config)
        };
        Ok((body.common, Some(request), num_ctx))
    })();
    let (common, request, num_ctx) = match prepared {
        Ok(p) => p,
        Err(e) => return refused(&state, e),
    };
    let Some(request) = request else {
        return load_only(state, common).await;
    };
    answer(state, common, request, num_ctx, Shape::Generate).await
}

/// `/api/generate` without a prompt: the model loaded (or unloaded with `keep_alive: 0`).
async fn load_only(state: Arc<AppState>, common: Common) -> Response {
    let done = async {
        let id = resolve(&state, &common.model)?;
        let keep = keep_alive(common.keep_alive.as_ref())?;
        let reason = if keep == Some(KeepAlive::UnloadNow) {
            state.models.unload(&id).await?;
            "unload"
        } else {
            state.models.get(Some(&id)).await?;
            state.models.keep(&id, keep);
            "load"
        };
        Ok::<_, ApiError>(
            json!({ "model": common.model, "created_at": rfc3339(SystemTime::now()), "response": "", "done": true, "done_reason": reason }),
        )
    }
    .await;
    match done {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(&state, e),
    }
}

/// What `keep_alive` asks: how long the model stays loaded after the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeepAlive {
    UnloadNow,
    For(std::time::Duration),
    Forever,
}

/// `keep_alive` as Ollama takes it: a duration ("5m", "1h30m", "10s"), a number of seconds, 0
/// (unload now) or a negative number (keep for ever). None: the server's default.
fn keep_alive(value: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    let bad = |v: &Value| ApiError::invalid("keep_alive", format!("{v} is not a duration (\"5m\", \"1h\", \"30s\"), a number of seconds, 0 or -1"));
    let seconds = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(v @ Value::Number(n)) => n.as_f64().ok_or_else(|| bad(v))?,
        Some(v @ Value::String(s)) => duration_seconds(s).ok_or_else(|| bad(v))?,
        Some(v) => return Err(bad(v)),
    };
    Ok(Some(match seconds {
        s if s < 0.0 => KeepAlive::Forever,
        0.0 => KeepAlive::UnloadNow,
        s => KeepAlive::For(std::time::Duration::from_secs_f64(s)),
    }))
}

/// Go's duration text ("1h30m", "5m", "2.5s", "300ms", "-1m") in seconds; a bare number is
/// seconds.
fn duration_seconds(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<f64>() {
        return Some(n);
    }
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit..];
    }
    Some(if negative { -total } else { total })
}

/// Submits a chat or generation and answers it in Ollama's shape.
async fn answer(
    state: Arc<AppState>,
    common: Common,
    request: Result<crate::config::GenerateRequest, ApiError>,
    num_ctx: Option<usize>,
    shape: Shape,
) -> Response {
    let received = Instant::now();
    let submitted = async {
        let request = request?;
        let keep = keep_alive(common.keep_alive.as_ref())?;
        let id = resolve(&state, &common.model)?;
        let model = state.models.get(Some(&id)).await?;
        let choice = submit(&model, request, None, false, common.stream, num_ctx).await?;
        state.models.keep(&id, keep);
        Ok::<_, ApiError>((model, choice))
    }
    .await;
    let (model, Choice { events, parser, .. }) = match submitted {
        Ok(s) => s,
        Err(e) => return refused(&state, e),
    };
    let answer = OllamaAnswer { state, model, name: common.model, shape, received };
    if common.stream {
        let body = NdjsonStream { answer, events, parser, queue: VecDeque::new(), calls: Vec::new(), done: false };
        ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(body)).into_response()
    } else {
        answer.whole(events, parser).await
    }
}

/// A submitted Ollama request, as its answer needs it.
struct OllamaAnswer {
    state: Arc<AppState>,
    /// Held until the answer ends: a model is not unloaded under a request.
    model: Arc<Loaded>,
    /// The name the request used (Ollama answers with it).
    name: String,
    shape: Shape,
    received: Instant,
}

impl OllamaAnswer {
    async fn whole(self, events: EventStream, parser: Option<ReplyParser>) -> Response {
        match collect(events, parser).await {
            Ok((text, reply, c)) => {
                log::finished(&self.state, &self.model.id, "ollama", &c, self.received);
                let reply = reply.unwrap_or_else(|| ChatReply { content: text, ..Default::default() });
                let (calls, unparsed) = ollama_calls(reply.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())));
                let mut body = self.piece(&(reply.content.clone() + &unparsed), &reply.reasoning_content, &calls);
                self.finish(&mut body, &c);
                Json(body).into_response()
            }
            Err(e) => refused(&self.state, e),
        }
    }

    /// An object with some of the reply: a chat's message (content, thinking, tool calls) or a
    /// generation's response.
    fn piece(&self, content: &str, thinking: &str, tool_calls: &[Value]) -> Value {
        let mut body = json!({ "model": self.name, "created_at": rfc3339(SystemTime::now()), "done": false });
        match self.shape {
            Shape::Chat => {
                let mut message = json!({ "role": "assistant", "content": content });
                if !thinking.is_empty() {
                    message["thinking"] = json!(thinking);
                }
                if !tool_calls.is_empty() {
                    message["tool_calls"] = json!(tool_calls);
                }
                body["message"] = message;
            }
            Shape::Generate => {
                body["response"] = json!(content);
                if !thinking.is_empty() {
                    body["thinking"] = json!(thinking);
                }
            }
        }
        body
    }

    /// Makes `body` the last object: done, why, and Ollama's counts and durations (nanoseconds).
    fn finish(&self, body: &mut Value, c: &Completion) {
        let ns = |ms: f64| (ms * 1e6).round() as u64;
        let s: &GenerationStats = &c.stats;
        body["done"] = json!(true);
        body["done_reason"] = json!(match c.finish_reason {
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancel",
            FinishReason::EndOfText | FinishReason::StopSequence => "stop",
        });
        body["total_duration"] = json!(self.received.elapsed().as_nanos() as u64);
        body["load_duration"] = json!(0);
        body["prompt_eval_count"] = json!(s.prompt_tokens);
        body["prompt_eval_duration"] = json!(ns(s.prompt_ms));
        body["eval_count"] = json!(s.completion_tokens);
        body["eval_duration"] = json!(ns(s.generation_ms));
    }
}

/// Tool calls (name, arguments as JSON text) in Ollama's shape, whose arguments are an object
/// (none written: an empty one). A call whose arguments are not an object cannot be one there:
/// it is returned as text, `name(arguments)` a line, for the reply's content (nothing the model
/// wrote is dropped).
fn ollama_calls<'a>(calls: impl Iterator<Item = (&'a str, &'a str)>) -> (Vec<Value>, String) {
    let (mut objects, mut text) = (Vec::new(), String::new());
    for (name, arguments) in calls {
        let parsed = if arguments.trim().is_empty() { Ok(json!({})) } else { serde_json::from_str::<Value>(arguments) };
        match parsed {
            Ok(arguments @ Value::Object(_)) => objects.push(json!({ "function": { "name": name, "arguments": arguments } })),
            _ => text.push_str(&format!("{name}({arguments})\n")),
        }
    }
    (objects, text)
}

/// A streamed answer: one JSON object per line as the text comes (tool calls whole, once their
/// arguments are complete), then the last object with `done: true`. A failure is a last line
/// `{"error": "..."}`, as Ollama streams it.
struct NdjsonStream {
    answer: OllamaAnswer,
    /// The request's events: dropped before their end (the client gone), they cancel it.
    events: EventStream,
    parser: Option<ReplyParser>,
    queue: VecDeque<Bytes>,
    /// Tool calls being streamed: name and arguments so far.
    calls: Vec<(String, String)>,
    done: bool,
}

impl NdjsonStream {
    fn line(&mut self, value: Value) {
        let mut text = value.to_string();
        text.push('\n');
        self.queue.push_back(Bytes::from(text));
    }

    fn deltas(&mut self, deltas: Vec<ChatDelta>) {
        for delta in deltas {
            match delta {
                ChatDelta::Content(text) => {
                    let piece = self.answer.piece(&text, "", &[]);
                    self.line(piece);
                }
                ChatDelta::Reasoning(text) => {
                    let piece = self.answer.piece("", &text, &[]);
                    self.line(piece);
                }
                ChatDelta::ToolCall { index, name, arguments, .. } => {
                    if self.calls.len() <= index {
                        self.calls.resize(index + 1, (String::new(), String::new()));
                    }
                    if let Some(name) = name {
                        self.calls[index].0 = name;
                    }
                    self.calls[index].1.push_str(&arguments);
                }
            }
        }
    }

    fn fail(&mut self, e: impl Into<ApiError>) {
        let e: ApiError = e.into();
        self.answer.state.metrics.count_error(e.status);
        self.line(json!({ "error": e.message }));
        self.done = true;
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Delta(delta)) => match self.parser.as_mut().map(|p| p.push(&delta.text)) {
                None => self.deltas(vec![ChatDelta::Content(delta.text)]),
                Some(Ok(deltas)) => self.deltas(deltas),
                Some(Err(e)) => self.fail(e),
            },
            Some(Event::Progress(_)) => {}
            Some(Event::Done(c)) => {
                if let Some(finished) = self.parser.as_mut().map(ReplyParser::finish) {
                    match finished {
                        Ok((deltas, _)) => self.deltas(deltas),
                        Err(e) => return self.fail(e),
                    }
                }
                if !self.calls.is_empty() {
                    let (calls, unparsed) = ollama_calls(self.calls.iter().map(|(name, arguments)| (name.as_str(), arguments.as_str())));
                    let piece = self.answer.piece(&unparsed, "", &calls);
                    self.line(piece);
                }
                let a = &self.answer;
                log::finished(&a.state, &a.model.id, "ollama", &c, a.received);
                let mut last = a.piece("", "", &[]);
                a.finish(&mut last, &c);
                self.line(last);
                self.done = true;
            }
            Some(Event::Failed(e)) => self.fail(e),
            None => self.fail(EngineError::Cancelled),
        }
    }
}

impl Stream for NdjsonStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(line) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(line)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.events.poll_recv(cx) {
                Poll::Ready(event) => this.on_event(event),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[derive(Deserialize)]
struct EmbedBody {
    model: String,
    input: super::openai::Prompt,
    /// Ollama cuts a text longer than the context when true (its default); here such a text is
    /// refused either way (400 naming `input`): nothing is cut silently.
    #[serde(default, rename = "truncate")]
    _truncate: Option<bool>,
    options: Option<Map<String, Value>>,
    keep_alive: Option<Value>,
    dimensions: Option<usize>,
}

/// `POST /api/embed`: L2-normalised embeddings of one text or many, as Ollama returns them.
pub(super) async fn embed(State(state): State<Arc<AppState>>, bytes: Bytes) -> Response {
    let received = Instant::now();
    let answer = async {
        let body: EmbedBody = body(&bytes)?;
        if body.dimensions.is_some() {
            return Err(ApiError::invalid("dimensions", "dimensions: embeddings are not shortened here; leave it out"));
        }
        if body.options.as_ref().is_some_and(|o| !o.is_empty()) {
            return Err(ApiError::invalid("options", "options do not apply to embeddings here; leave them out"));
        }
        let keep = keep_alive(body.keep_alive.as_ref())?;
        let id = resolve(&state, &body.model)?;
        let texts = body.input.texts(super::embeddings::MAX_INPUTS)?;
        let (_, computed) =
            super::embeddings::embed_inputs(&state, Some(&id), super::embeddings::EmbedInput::Texts(texts), None, super::embeddings::Rows::Pooled)
                .await?;
        state.models.keep(&id, keep);
        let tokens: usize = computed.iter().map(|(_, n)| n).sum();
        let embeddings: Vec<Vec<f32>> = computed
            .into_iter()
            .map(|(mut rows, _)| {
                // Pooled: one row each.
                let mut v = rows.pop().unwrap_or_default();
                crate::l2_normalize(&mut v);
                v
            })
            .collect();
        state.metrics.count_ok(&GenerationStats { prompt_tokens: tokens, ..Default::default() });
        Ok::<_, ApiError>(json!({
            "model": body.model, "embeddings": embeddings, "total_duration": received.elapsed().as_nanos() as u64,
            "load_duration": 0, "prompt_eval_count": tokens,
        }))
    }
    .await;
    match answer {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(&state, e),
    }
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    prompt: String,
    options: Option<Map<String, Value>>,
    keep_alive: Option<Value>,
}

/// `POST /api/embeddings`: Ollama's older route, one text, its embedding as the model pools it
/// (not normalised, as Ollama returns it there).
pub(super) async fn embeddings(State(state): State<Arc<AppState>>, bytes: Bytes) -> Response {
    let answer = async {
        let body: EmbeddingsBody = body(&bytes)?;
        if body.options.as_ref().is_some_and(|o| !o.is_empty()) {
            return Err(ApiError::invalid("options", "options do not apply to embeddings here; leave them out"));
        }
        let keep = keep_alive(body.keep_alive.as_ref())?;
        let id = resolve(&state, &body.model)?;
        let (_, mut computed) = super::embeddings::embed_inputs(
            &state,
            Some(&id),
            super::embeddings::EmbedInput::Texts(vec![body.prompt]),
            None,
            super::embeddings::Rows::Pooled,
        )
        .await?;
        state.models.keep(&id, keep);
        let (mut rows, tokens) = computed.pop().unwrap_or_default();
        // Pooled: one row.
        let embedding = rows.pop().unwrap_or_default();
        state.metrics.count_ok(&GenerationStats { prompt_tokens: tokens, ..Default::default() });
        Ok::<_, ApiError>(json!({ "embedding": embedding }))
    }
    .await;
    match answer {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(&state, e),
    }
}

/// A time as RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, hh, mm, ss) = exsa_bench_protocol::utc_civil(d.as_secs());
    format!("{year:04}-{month:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{:09}Z", d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_ollama_writes_them() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + std::time::Duration::new(1_709_251_199, 5);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000005Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(4_102_444_800);
        assert_eq!(rfc3339(t), "2100-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn keep_alive_takes_durations_seconds_zero_and_negatives() {
        let k = |v: Value| keep_alive(Some(&v));
        assert_eq!(k(json!("5m")).unwrap(), Some(KeepAlive::For(std::time::Duration::from_secs(300))));
        assert_eq!(k(json!("1h30m")).unwrap(), Some(KeepAlive::For(std::time::Duration::from_secs(5400))));
        assert_eq!(k(json!("1.5s")).unwrap(), Some(KeepAlive::For(std::time::Duration::from_millis(1500))));
        assert_eq!(k(json!(30)).unwrap(), Some(KeepAlive::For(std::time::Duration::from_secs(30))));
        assert_eq!(k(json!(0)).unwrap(), Some(KeepAlive::UnloadNow));
        assert_eq!(k(json!("0")).unwrap(), Some(KeepAlive::UnloadNow));
        assert_eq!(k(json!(-1)).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(k(json!("-1m")).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(keep_alive(None).unwrap(), None);
        for bad in [json!("soon"), json!("5x"), json!(""), json!([1]), json!("m")] {
            assert_eq!(k(bad.clone()).unwrap_err().param.as_deref(), Some("keep_alive"), "{bad}");
        }
    }

    #[test]
    fn options_map_to_the_fields_they_mean_or_are_refused_by_name() {
        let mut chat = Map::new();
        let given = json!({ "temperature": 0.5, "num_predict": 7, "seed": 3, "num_thread": 8, "stop": ["\n"], "num_ctx": 128 });
        options(given.as_object().cloned(), &mut chat).unwrap();
        assert_eq!(Value::Object(chat.clone()), json!({ "temperature": 0.5, "max_tokens": 7, "seed": 3, "stop": ["\n"], "__num_ctx": 128 }));
        let e = options(json!({ "mirostat": 2 }).as_object().cloned(), &mut chat).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("options.mirostat"));
        let mut chat = Map::new();
        options(json!({ "num_predict": -1 }).as_object().cloned(), &mut chat).unwrap();
        assert!(chat.is_empty(), "-1: no bound");
    }

    #[test]
    fn messages_become_openai_messages() {
        let m = json!({ "role": "assistant", "content": "", "tool_calls": [
            { "function": { "name": "f", "arguments": { "x": 1 } } }, { "function": { "name": "g", "arguments": {} } }] });
        let converted = message(m.as_object().cloned().unwrap(), 0).unwrap();
        assert_eq!(converted["tool_calls"][0]["function"], json!({ "name": "f", "arguments": "{\"x\":1}" }));
        let g = json!({ "role": "tool", "content": "42", "tool_name": "g" });
        let g = message(g.as_object().cloned().unwrap(), 1).unwrap();
        assert_eq!(g["name"], "g");
        let f = message(json!({ "role": "tool", "content": "7" }).as_object().cloned().unwrap(), 2).unwrap();
        let answered = answer_calls(vec![converted, g, f]).unwrap();
        assert_eq!((answered[1]["tool_call_id"].as_str(), answered[2]["tool_call_id"].as_str()), (Some("call_0_1"), Some("call_0_0")));
        let lone = message(json!({ "role": "tool", "content": "7" }).as_object().cloned().unwrap(), 0).unwrap();
        assert!(answer_calls(vec![lone]).unwrap_err().message.contains("no tool call"));
        let m = json!({ "role": "user", "content": "what is this?", "images": ["aGVsbG8="] });
        let e = message(m.as_object().cloned().unwrap(), 2).unwrap_err();
        assert!(e.message.contains("messages[2]") && e.message.contains("vision"), "{}", e.message);
    }

    #[test]
    fn calls_with_object_arguments_are_calls_and_the_rest_is_text() {
        let (calls, text) = ollama_calls([("f", "{\"x\": 1}"), ("g", ""), ("h", "[1, 2]"), ("k", "not json")].into_iter());
        assert_eq!(
            calls,
            vec![json!({ "function": { "name": "f", "arguments": { "x": 1 } } }), json!({ "function": { "name": "g", "arguments": {} } })]
        );
        assert_eq!(text, "h([1, 2])\nk(not json)\n");
    }

    #[test]
    fn parameter_sizes_and_quantizations_read_as_ollama_writes_them() {
        assert_eq!(parameter_size(268_098_176), "268.10M");
        assert_eq!(parameter_size(7_241_732_096), "7.2B");
        let info = crate::backend::ModelInfo { architecture: "gemma3".into(), ..Default::default() };
        assert_eq!(details(&info, Some(15))["quantization_level"], "Q4_K_M");
        assert_eq!(details(&info, Some(7))["quantization_level"], "Q8_0");
        assert_eq!(details(&info, Some(99))["quantization_level"], "");
        assert_eq!(details(&info, None)["family"], "gemma3");
    }
}
