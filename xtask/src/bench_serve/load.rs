//! The load: C clients, each sending streaming chat requests one after another, timed from the
//! client side (what a user of the server sees).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::scenario::Scenario;

/// What one request saw.
#[derive(Clone, Debug, Serialize)]
pub struct RequestTiming {
    /// From sending the request to its first generated text.
    #[serde(serialize_with = "microseconds")]
    pub ttft_ms: f64,
    /// Between consecutive chunks of generated text.
    #[serde(serialize_with = "each_microseconds")]
    pub gaps_ms: Vec<f64>,
    /// Generated tokens, as the server's usage counts them.
    pub tokens: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens the server took from its cache (`prompt_tokens_details.cached_tokens`), where
    /// it says.
    pub cached_tokens: Option<usize>,
    /// The request's turn in its conversation (0: the first).
    pub turn: usize,
}

/// Milliseconds to the microsecond in the raw report: the clock reads nanoseconds, but the
/// digits past a microsecond are noise that tripled the committed reports' size.
fn microseconds<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((ms * 1000.0).round() / 1000.0)
}

fn each_microseconds<S: serde::Serializer>(ms: &[f64], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ms.iter().map(|v| (v * 1000.0).round() / 1000.0))
}

/// One load level against one server.
#[derive(Clone, Debug, Serialize)]
pub struct LevelResult {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub wall_s: f64,
    pub requests: Vec<RequestTiming>,
}

impl LevelResult {
    pub fn tokens_per_s(&self) -> f64 {
        self.requests.iter().map(|r| r.tokens).sum::<usize>() as f64 / self.wall_s
    }

    pub fn requests_per_s(&self) -> f64 {
        self.requests.len() as f64 / self.wall_s
    }

    pub fn ttft_ms(&self) -> Vec<f64> {
        self.requests.iter().map(|r| r.ttft_ms).collect()
    }

    pub fn gaps_ms(&self) -> Vec<f64> {
        self.requests.iter().flat_map(|r| r.gaps_ms.iter().copied()).collect()
    }
}

/// What every reply of a run is: its length (`ignore_eos`: a reply of another length fails the
/// level, so that every server does the same work) and how its tokens are drawn.
#[derive(Clone, Copy, Debug)]
pub struct Replies {
    pub max_tokens: usize,
    /// 0: greedy. Above 0, each request carries a seed of its own (the same on every server
    /// and round), so a run can be repeated; speculation keeps the distribution, not the draws.
    pub temperature: f32,
}

impl Replies {
    /// "exactly 96 greedy tokens", "exactly 96 tokens sampled at temperature 0.8".
    pub fn describe(&self) -> String {
        if self.temperature > 0.0 {
            format!("exactly {} tokens sampled at temperature {}", self.max_tokens, self.temperature)
        } else {
            format!("exactly {} greedy tokens", self.max_tokens)
        }
    }
}

/// `concurrency` clients against `base` (an OpenAI-style server), each holding the
/// conversations `scenario` gives it (`per_client` of them) and sending their turns in order,
/// every reply as `replies` says.
pub fn run_level(base: &str, model: &str, scenario: Scenario, concurrency: usize, per_client: usize, replies: Replies) -> Result<LevelResult> {
    let started = Instant::now();
    let results: Vec<Result<Vec<RequestTiming>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|c| {
                s.spawn(move || {
                    // A new connection per request: a pooled one that the server closed meanwhile
                    // (llama-server's keep-alive) would fail the request, not the server.
                    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).pool_max_idle_per_host(0).build()?;
                    let mut timings = Vec::new();
                    for (k, conversation) in scenario.conversations(c, per_client).into_iter().enumerate() {
                        let mut messages: Vec<Value> = conversation.system.iter().map(|s| json!({ "role": "system", "content": s })).collect();
                        for (turn, text) in conversation.turns.iter().enumerate() {
                            messages.push(json!({ "role": "user", "content": text }));
                            let seed = (c * per_client + k) * 64 + turn;
                            let mut body = chat_body(model, &messages, replies, seed, true);
                            if let Some(lora) = scenario.lora(c) {
                                body["lora"] = lora;
                            }
                            let (timing, reply) = one_request(&client, base, &body, replies.max_tokens, turn)?;
                            messages.push(json!({ "role": "assistant", "content": reply }));
                            timings.push(timing);
                        }
                    }
                    Ok(timings)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("a client thread panicked"))).collect()
    });
    let wall_s = started.elapsed().as_secs_f64();
    let mut requests = Vec::new();
    for r in results {
        requests.extend(r?);
    }
    Ok(LevelResult { scenario, concurrency, wall_s, requests })
}

/// The body of a chat request whose reply is as `replies` says (`seed`: its draws, when sampled).
pub fn chat_body(model: &str, messages: &[Value], replies: Replies, seed: usize, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": replies.max_tokens,
        "temperature": replies.temperature,
        "ignore_eos": true,
        "stream": stream,
        "stream_options": { "include_usage": true },
    });
    if replies.temperature > 0.0 {
        body["seed"] = json!(seed);
    }
    body
}

/// One streamed request: its timing and the reply's text.
fn one_request(client: &reqwest::blocking::Client, base: &str, body: &Value, max_tokens: usize, turn: usize) -> Result<(RequestTiming, String)> {
    let sent = Instant::now();
    let response = client.post(format!("{base}/v1/chat/completions")).json(body).send().context("sending a chat request")?;
    if !response.status().is_success() {
        bail!("{} answered {}: {}", base, response.status(), response.text().unwrap_or_default());
    }
    let mut first = None;
    let mut last = sent;
    let mut gaps_ms = Vec::new();
    let mut reply = String::new();
    let mut usage = None;
    for line in BufReader::new(response).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).with_context(|| format!("a chunk that is not JSON: {data}"))?;
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"].clone());
        }
        let text = chunk["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = Instant::now();
        match first {
            None => first = Some(now),
            Some(_) => gaps_ms.push((now - last).as_secs_f64() * 1000.0),
        }
        last = now;
        reply += text;
    }
    let first = first.with_context(|| format!("{base} streamed no text"))?;
    let usage = usage.with_context(|| format!("{base} sent no usage (stream_options.include_usage)"))?;
    let count = |v: &Value| v.as_u64().map(|n| n as usize);
    let tokens = count(&usage["completion_tokens"]).with_context(|| format!("{base}: usage without completion_tokens: {usage}"))?;
    if tokens != max_tokens {
        bail!("{base} replied {tokens} tokens where {max_tokens} were asked with ignore_eos: the servers would not do the same work");
    }
    let timing = RequestTiming {
        ttft_ms: (first - sent).as_secs_f64() * 1000.0,
        gaps_ms,
        tokens,
        prompt_tokens: count(&usage["prompt_tokens"]).unwrap_or(0),
        cached_tokens: count(&usage["prompt_tokens_details"]["cached_tokens"]),
        turn,
    };
    Ok((timing, reply))
}

/// The p-th percentile (0-100) by nearest rank.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs, 100.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
