//! The smallest HTTP server an app would write around the engine: axum over one
//! [`ServingCore`] (continuous batching: concurrent requests share each decode), a
//! `POST /generate` answered as server-sent events, one per text delta. A client that leaves
//! cancels its request: axum drops the response stream, which drops the request's
//! [`EventStream`]. (`exsa serve` is the full server: OpenAI's, Ollama's and llama-server's APIs.)
//!
//!     cargo run -p exsa-engine --example axum_server [-- --model PATH] [--serve]
//!
//! With `--serve` it listens on 127.0.0.1:8090 until Ctrl-C
//! (`curl -N 127.0.0.1:8090/generate -d '{"prompt": "Hello", "max_tokens": 32}'`). Without, it
//! listens on a free port, sends itself two requests at once, checks that each streamed text is
//! what the engine's blocking API gives for it alone, and exits.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use exsa_engine::serving::{Event, EventStream, ServeRequest, ServingConfig, ServingCore};
use exsa_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
use tokio_stream::{Stream, StreamExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(serde::Deserialize)]
struct GenerateBody {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
}

fn default_max_tokens() -> usize {
    64
}

struct AppState {
    engine: Arc<Engine>,
    core: ServingCore,
}

/// `POST /generate`: the prompt's greedy continuation, streamed.
async fn generate(State(state): State<Arc<AppState>>, Json(body): Json<GenerateBody>) -> Response {
    let request = GenerateRequest::new(body.prompt).max_tokens(body.max_tokens).sampling(SamplingParams::greedy());
    // Tokenizing and building the sampler is CPU work: off the async workers.
    let engine = Arc::clone(&state.engine);
    let prepared = match tokio::task::spawn_blocking(move || ServeRequest::new(&engine, &request)).await {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(e)) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    // A full queue is refused at once, never waited on.
    match state.core.stream(prepared) {
        Ok(events) => Sse::new(sse_events(events)).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// A request's events as SSE: `data: <text>` per delta, then `event: done` or `event: error`.
fn sse_events(events: EventStream) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    events.filter_map(|event| match event {
        Event::Delta(delta) => Some(Ok(SseEvent::default().data(delta.text))),
        Event::Progress(_) => None,
        Event::Done(completion) => Some(Ok(SseEvent::default().event("done").data(format!("{:?}", completion.finish_reason)))),
        Event::Failed(e) => Some(Ok(SseEvent::default().event("error").data(e.to_string()))),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut model = exsa_engine::default_model_path();
    let mut serve = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model = args.next().ok_or("--model needs a path")?.into(),
            "--serve" => serve = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(EngineConfig::new(model))).await??);
    let core = ServingCore::start(Arc::clone(&engine), ServingConfig::new(&engine, 2))?;
    let state = Arc::new(AppState { engine: Arc::clone(&engine), core });
    let app = Router::new().route("/generate", post(generate)).with_state(state);
    let address = if serve { "127.0.0.1:8090" } else { "127.0.0.1:0" };
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    if serve {
        eprintln!("listening on http://{address}");
        axum::serve(listener, app).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
        return Ok(());
    }
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Two clients at once (a blocking HTTP client each, on threads of their own).
    let prompts: [&'static str; 2] = ["The capital of France is", "Water boils at"];
    let clients: Vec<_> = prompts.into_iter().map(|prompt| tokio::task::spawn_blocking(move || ask(address, prompt))).collect();
    for (prompt, client) in prompts.iter().zip(clients) {
        let streamed = client.await??;
        let engine = Arc::clone(&engine);
        let request = GenerateRequest::new(*prompt).max_tokens(default_max_tokens()).sampling(SamplingParams::greedy());
        let (alone, _) = tokio::task::spawn_blocking(move || engine.generate(&request)).await??;
        println!("{prompt}{streamed}");
        // A sanity check, not the equivalence test (tests/serving.rs compares every step):
        // decoded beside another request, a greedy text may part from the solo one where two
        // candidates are near a tie (the batch changes llama.cpp's rounding), so only the
        // beginnings must agree.
        let first_words = |text: &str| text.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        if first_words(&streamed) != first_words(&alone) {
            return Err(format!("{prompt:?}: served {streamed:?}, alone {alone:?}").into());
        }
    }
    Ok(())
}

/// Sends one request and reads its event stream to the end: the text of its deltas.
fn ask(address: std::net::SocketAddr, prompt: &str) -> Result<String, Error> {
    let response = reqwest::blocking::Client::new()
        .post(format!("http://{address}/generate"))
        .json(&serde_json::json!({ "prompt": prompt }))
        .send()?
        .error_for_status()?;
    let body = response.text()?;
    let mut text = String::new();
    let mut event = "message";
    // SSE: lines of `event:` and `data:` (several data lines: one text with newlines), a blank
    // line ending each event.
    let mut data: Vec<&str> = Vec::new();
    for line in body.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim_start();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        } else if line.is_empty() {
            match event {
                "message" => text.push_str(&data.join("\n")),
                "done" => return Ok(text),
                _ => return Err(format!("the server failed: {}", data.join("\n")).into()),
            }
            event = "message";
            data.clear();
        }
    }
    Err("the stream ended without its done event".into())
}
