//! Streaming from async code: an [`OwnedSession`] (the engine in an `Arc`, so the session is
//! `'static` and `Send`) moved into a tokio task, its reply read as a `Stream` of typed events.
//! A second request is abandoned after a few words: dropping its stream cancels it, and the
//! session is free again at once. Checks that the streamed text is the blocking API's text.
//!
//!     cargo run -p exsa-engine --example async_stream [-- --model PATH]

use std::io::Write;
use std::sync::Arc;

use exsa_engine::serving::Event;
use exsa_engine::{Engine, EngineConfig, GenerateRequest, OwnedSession, SamplingParams};
use tokio_stream::StreamExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let model = match (args.next().as_deref(), args.next()) {
        (Some("--model"), Some(path)) => path.into(),
        _ => exsa_engine::default_model_path(),
    };
    // Loading reads the whole file: off the async workers.
    let engine = tokio::task::spawn_blocking(move || Engine::load(EngineConfig::new(model))).await??;
    let engine = Arc::new(engine);
    let session = engine.owned_session()?;
    let request = GenerateRequest::new("The three primary colours are").max_tokens(48).sampling(SamplingParams::greedy());

    // The session moves into a task; its text comes back through the task's handle.
    let task = tokio::spawn(stream_reply(session, request.clone()));
    let (streamed, session) = task.await??;
    println!();

    // The same request through the blocking API (a borrowed session on this thread) gives the
    // same greedy text.
    let expected = {
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || engine.generate(&request)).await??.0
    };
    if streamed != expected {
        return Err(format!("the stream gave {streamed:?}, the blocking API {expected:?}").into());
    }

    // A reply nobody waits for: read three deltas, then drop the stream. The request stops at
    // the decode loop's next step and the session takes the next one right away.
    let before = session.status().generated_tokens;
    let mut abandoned = session.stream(&GenerateRequest::new("Write a long story about a lighthouse.").max_tokens(400))?;
    let mut deltas = 0;
    while deltas < 3 {
        match abandoned.next().await {
            Some(Event::Delta(_)) => deltas += 1,
            Some(Event::Done(_)) | None => return Err("the long request ended by itself".into()),
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(Event::Progress(_)) => {}
        }
    }
    drop(abandoned);
    let (_, completion) = session.stream(&GenerateRequest::new("Hello").max_tokens(4))?.collect_text().await?;
    // What the abandoned request generated: its three deltas, and the tokens of the steps
    // before the decode loop saw the drop (one or two), not its 400.
    let abandoned_tokens = session.status().generated_tokens - before - completion.stats.completion_tokens as u64;
    println!("abandoned after 3 deltas and {abandoned_tokens} tokens; the next request ran ({} tokens)", completion.stats.completion_tokens);
    if abandoned_tokens > 16 {
        return Err(format!("the abandoned request went on after its stream was dropped ({abandoned_tokens} tokens)").into());
    }
    Ok(())
}

/// Prints the reply as it streams and returns its text (and the session, to go on with).
async fn stream_reply(session: OwnedSession, request: GenerateRequest) -> Result<(String, OwnedSession), Error> {
    let mut events = session.stream(&request)?;
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event {
            Event::Delta(delta) => {
                print!("{}", delta.text);
                std::io::stdout().flush()?;
                text.push_str(&delta.text);
            }
            Event::Progress(_) => {}
            Event::Done(completion) => {
                eprintln!("\n[{} tokens, {:.1} t/s]", completion.stats.completion_tokens, completion.stats.generation_tokens_per_s)
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    Ok((text, session))
}
