//! The handlers, and the bridge from the decode loop's events to HTTP responses.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, extract::FromRequest};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::error::ApiError;
use super::models::Loaded;
use super::openai::{
    ChatRequest, CompletionRequest, Delta, DetokenizeRequest, EmbeddingRequest, Kind, Meta, ModelEntry, TokenizeRequest, finish_reason,
};
use crate::config::CancelToken;
use crate::error::EngineError;
use crate::serving::{Completion, Event, ServeRequest, ServingStatus};
use crate::token_text::ms;

/// Counters for `/metrics`, beside the decode loop's own.
#[derive(Debug, Default)]
pub struct Metrics {
    ok: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// From the request's arrival to its first generated token.
    ttft: Histogram,
    /// Between consecutive tokens of a stream, as the forwarder sees them.
    inter_token: Histogram,
}

/// A Prometheus histogram of milliseconds over fixed buckets.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

const BUCKETS_MS: [f64; 12] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0];

impl Histogram {
    fn observe(&self, ms: f64) {
        if let Some(i) = BUCKETS_MS.iter().position(|&b| ms <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    /// The histogram in Prometheus' text format (buckets cumulative, `le` in seconds).
    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, le) in self.buckets.iter().zip(BUCKETS_MS) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", le / 1000.0);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// 200 while the server can serve; 503 while it loads, or while a model lost an rpc-server and
/// is not loaded again yet: a balancer polling this sends requests elsewhere meanwhile.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.models.health() {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err((status, reason)) => {
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(json!({ "status": status, "reason": reason }))).into_response()
        }
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route {} {}", request.method(), request.uri().path()))
}

async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            state.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
            return ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or wrong API key (Authorization: Bearer <key>)")
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(request).await
}

/// Compares keys in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<ModelEntry> = state
        .models
        .ids()
        .map(|id| ModelEntry { id: id.to_string(), object: "model", created: 0, owned_by: "exsa", loaded: state.models.is_loaded(id) })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = &state.metrics;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut body = format!(
        "# TYPE exsa_requests_total counter\n\
         exsa_requests_total{{status=\"ok\"}} {}\n\
         exsa_requests_total{{status=\"client_error\"}} {}\n\
         exsa_requests_total{{status=\"server_error\"}} {}\n\
         # TYPE exsa_prompt_tokens_total counter\nexsa_prompt_tokens_total {}\n\
         # TYPE exsa_completion_tokens_total counter\nexsa_completion_tokens_total {}\n",
        load(&m.ok),
        load(&m.client_errors),
        load(&m.server_errors),
        load(&m.prompt_tokens),
        load(&m.completion_tokens),
    );
    render_decode_loops(&state.models.statuses(), &mut body);
    m.ttft.render("exsa_time_to_first_token_seconds", "From a request's arrival to its first token.", &mut body);
    m.inter_token.render("exsa_inter_token_seconds", "Between consecutive streamed tokens.", &mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// The decode loops' own counters, one series per loaded model.
fn render_decode_loops(loaded: &[(String, ServingStatus, usize)], out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(out, "# TYPE exsa_models_loaded gauge\nexsa_models_loaded {}", loaded.len());
    /// Name, type, help, and how to read it.
    type Series = (&'static str, &'static str, &'static str, fn(&ServingStatus, usize) -> u64);
    let series: [Series; 9] = [
        ("exsa_prompt_tokens_reused_total", "counter", "Prompt tokens found in a slot's cache, not decoded again.", |s, _| s.prompt_tokens_reused),
        ("exsa_decode_steps_total", "counter", "Decodes run (each carries every busy slot's next token).", |s, _| s.steps),
        ("exsa_queue_depth", "gauge", "Requests accepted and waiting for a slot.", |s, _| s.queued as u64),
        ("exsa_busy_slots", "gauge", "Slots with a request.", |s, _| s.busy_slots as u64),
        ("exsa_kv_used_tokens", "gauge", "KV cache cells the slots hold (finished requests' caches kept for reuse included).", |s, _| {
            s.kv_used as u64
        }),
        ("exsa_kv_capacity_tokens", "gauge", "KV cache cells the slots share.", |_, n_ctx| n_ctx as u64),
        ("exsa_slots", "gauge", "Slots of the model's decode loop.", |s, _| s.slots as u64),
        ("exsa_draft_tokens_total", "counter", "Tokens drafted by prompt lookup (speculative requests).", |s, _| s.drafted_tokens),
        ("exsa_draft_tokens_accepted_total", "counter", "Drafted tokens the sampler drew too (kept).", |s, _| s.accepted_tokens),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, status, n_ctx) in loaded {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", id.replace(['\\', '"', '\n'], "_"), value(status, *n_ctx));
        }
    }
}

/// JSON bodies whose rejections (bad JSON, wrong types, too large) are OpenAI-shaped errors.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await.map_err(|e: JsonRejection| ApiError::from(e))?;
        Ok(Body(value))
    }
}

async fn chat(State(state): State<Arc<AppState>>, Body(body): Body<ChatRequest>) -> Response {
    let result = async {
        let messages = body.messages()?;
        let request = body.sampling.to_request(state.config.speculation)?;
        let logprobs = body.sampling.logprobs()?;
        let model = state.models.get(body.sampling.model.as_deref()).await?;
        let mut serve = ServeRequest::chat(&model.engine, &messages, &request)?;
        serve.logprobs = logprobs;
        Ok::<_, ApiError>((model, serve))
    }
    .await;
    respond(state, result, Kind::Chat, body.sampling.stream, body.sampling.include_usage()).await
}

async fn completions(State(state): State<Arc<AppState>>, Body(body): Body<CompletionRequest>) -> Response {
    let (stream, usage) = (body.sampling.stream, body.sampling.include_usage());
    let result = async {
        let request = body.sampling.to_request(state.config.speculation)?;
        let logprobs = body.sampling.logprobs()?;
        let prompt = body.prompt.into_text()?;
        let model = state.models.get(body.sampling.model.as_deref()).await?;
        let mut serve = ServeRequest::generate(&model.engine, &crate::GenerateRequest { prompt, ..request })?;
        serve.logprobs = logprobs;
        Ok::<_, ApiError>((model, serve))
    }
    .await;
    respond(state, result, Kind::Completion, stream, usage).await
}

/// Cancels its request when dropped: when axum drops a response stream or a handler future,
/// the client has gone, and the decode loop stops the request at its next step.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn respond(
    state: Arc<AppState>,
    request: Result<(Arc<Loaded>, ServeRequest), ApiError>,
    kind: Kind,
    stream: bool,
    include_usage: bool,
) -> Response {
    let received = Instant::now();
    let request = request.and_then(|(model, mut r)| {
        if r.tokens.len() >= model.n_ctx {
            return Err(EngineError::PromptTooLong { prompt_tokens: r.tokens.len(), n_ctx: model.n_ctx as u32 }.into());
        }
        // The context bounds max_tokens (the default is all of what is left).
        r.max_tokens = r.max_tokens.min(model.n_ctx - r.tokens.len());
        // A grammar that does not parse or a bias outside the vocabulary is the client's
        // error, answered before a stream starts.
        model.engine.check_sampling(&r.sampling)?;
        Ok((model, r))
    });
    let (model, request) = match request {
        Ok(r) => r,
        Err(e) => return error_response(&state, e),
    };
    let guard = CancelOnDrop(request.cancel.clone());
    let asked_logprobs = request.logprobs.is_some();
    let events = match model.core.submit(request) {
        Ok(events) => events,
        Err(e) => return error_response(&state, e.into()),
    };
    let meta = Meta {
        id: format!("{}-{}", kind.id_prefix(), state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: model.id.clone(),
    };
    if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
        let forward_state = Arc::clone(&state);
        // The forwarder holds the model until the response has ended: it is not unloaded
        // under a request.
        let held = Arc::clone(&model);
        tokio::task::spawn_blocking(move || {
            let _held = held;
            let send = |value: serde_json::Value| tx.blocking_send(SseEvent::default().data(value.to_string())).is_ok();
            if kind == Kind::Chat && !send(kind.chunk(&meta, Delta::Role)) {
                return;
            }
            let mut last: Option<Instant> = None;
            for event in events {
                match event {
                    Event::Delta(text) => {
                        let now = Instant::now();
                        match last {
                            None => forward_state.metrics.ttft.observe(ms(now - received)),
                            Some(previous) => forward_state.metrics.inter_token.observe(ms(now - previous)),
                        }
                        last = Some(now);
                        if !send(kind.chunk(&meta, Delta::Text(&text))) {
                            return;
                        }
                    }
                    Event::Done(c) => {
                        record(&forward_state, &meta.model, &meta.id, &c, received);
                        let _ = send(kind.chunk(&meta, Delta::End(finish_reason(c.finish_reason))));
                        if include_usage {
                            let _ = send(kind.usage_chunk(&meta, &c.stats));
                        }
                        let _ = tx.blocking_send(SseEvent::default().data("[DONE]"));
                        return;
                    }
                    Event::Failed(e) => {
                        let error = ApiError::from(e);
                        count_error(&forward_state, error.status);
                        let _ = send(error.body());
                        let _ = tx.blocking_send(SseEvent::default().data("[DONE]"));
                        return;
                    }
                }
            }
        });
        let stream = ReceiverStream::new(rx).map(move |event| {
            let _ = &guard;
            Ok::<_, Infallible>(event)
        });
        return Sse::new(stream).into_response();
    }
    let collected = tokio::task::spawn_blocking(move || crate::serving::collect(events)).await;
    drop(guard);
    match collected {
        Ok(Ok((text, c))) => {
            record(&state, &meta.model, &meta.id, &c, received);
            // A whole response's first token came after its queue wait and prefill: all of its
            // time but the generation's.
            if c.stats.completion_tokens > 0 {
                state.metrics.ttft.observe((ms(received.elapsed()) - c.stats.generation_ms).max(0.0));
            }
            let logprobs = if asked_logprobs {
                kind.logprobs(&c.logprobs, |t| model.engine.token_bytes(t).unwrap_or_default())
            } else {
                serde_json::Value::Null
            };
            Json(kind.response(&meta, &text, finish_reason(c.finish_reason), &c.stats, logprobs)).into_response()
        }
        Ok(Err(e)) => error_response(&state, e.into()),
        Err(join) => error_response(&state, ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", join.to_string())),
    }
}

/// Embeddings are computed apart from the decode loop, each in a context of its own sized for one
/// batch (the model's weights are shared).
async fn embeddings(State(state): State<Arc<AppState>>, Body(body): Body<EmbeddingRequest>) -> Response {
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
        Ok(json!({ "object": "list", "data": data, "model": model.id, "usage": { "prompt_tokens": tokens, "total_tokens": tokens } }))
    }
    .await;
    match result {
        Ok(v) => {
            state.metrics.ok.fetch_add(1, Ordering::Relaxed);
            Json(v).into_response()
        }
        Err(e) => error_response(&state, e),
    }
}

async fn tokenize(State(state): State<Arc<AppState>>, Body(body): Body<TokenizeRequest>) -> Response {
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
        Err(e) => error_response(&state, e),
    }
}

async fn detokenize(State(state): State<Arc<AppState>>, Body(body): Body<DetokenizeRequest>) -> Response {
    let model = match state.models.get(body.model.as_deref()).await {
        Ok(model) => model,
        Err(e) => return error_response(&state, e),
    };
    let n_vocab = i64::from(model.engine.model_info().n_vocab);
    if let Some(bad) = body.tokens.iter().find(|&&t| !(0..n_vocab).contains(&t)) {
        return error_response(&state, ApiError::invalid("tokens", format!("{bad} is not a token of this model (0..{n_vocab})")));
    }
    let mut bytes = Vec::new();
    for &t in &body.tokens {
        match model.engine.token_bytes(t as i32) {
            Ok(b) => bytes.extend(b),
            Err(e) => return error_response(&state, e.into()),
        }
    }
    Json(json!({ "content": String::from_utf8_lossy(&bytes) })).into_response()
}

fn error_response(state: &AppState, error: ApiError) -> Response {
    count_error(state, error.status);
    tracing::info!(status = error.status.as_u16(), "request refused: {}", error.message);
    error.into_response()
}

fn count_error(state: &AppState, status: StatusCode) {
    let counter = if status.is_client_error() { &state.metrics.client_errors } else { &state.metrics.server_errors };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One log line and the counters of a finished request.
fn record(state: &AppState, model: &str, id: &str, c: &Completion, received: Instant) {
    let m = &state.metrics;
    m.ok.fetch_add(1, Ordering::Relaxed);
    m.prompt_tokens.fetch_add(c.stats.prompt_tokens as u64, Ordering::Relaxed);
    m.completion_tokens.fetch_add(c.stats.completion_tokens as u64, Ordering::Relaxed);
    tracing::info!(
        id,
        model,
        prompt_tokens = c.stats.prompt_tokens,
        reused = c.stats.prompt_tokens_reused,
        completion_tokens = c.stats.completion_tokens,
        ttft_ms = format!("{:.1}", c.stats.time_to_first_token_ms),
        tokens_per_s = format!("{:.1}", c.stats.generation_tokens_per_s),
        total_ms = received.elapsed().as_millis() as u64,
        finish = finish_reason(c.finish_reason),
        "request done"
    );
}
