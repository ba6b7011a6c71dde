//! The load: C clients, each sending streaming chat requests one after another, timed from the
//! client side (what a user of the server sees).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

/// What one request saw.
#[derive(Clone, Debug, Serialize)]
pub struct RequestTiming {
    /// From sending the request to its first generated text.
    pub ttft_ms: f64,
    /// Between consecutive chunks of generated text.
    pub gaps_ms: Vec<f64>,
    pub tokens: usize,
}

/// One load level against one server.
#[derive(Clone, Debug, Serialize)]
pub struct LevelResult {
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

/// The prompts, one per client (cycled).
const PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Describe the water cycle to a child.",
    "List some tips for learning a new language.",
    "What makes a good cup of tea?",
    "Tell me about the history of paper.",
    "Why do cats purr?",
    "Summarise the rules of chess.",
];

/// `concurrency` clients, each sending `per_client` streaming chats of `max_tokens` greedy
/// tokens to `base` (an OpenAI-style server).
pub fn run_level(base: &str, model: &str, concurrency: usize, per_client: usize, max_tokens: usize) -> Result<LevelResult> {
    let started = Instant::now();
    let results: Vec<Result<Vec<RequestTiming>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|c| {
                s.spawn(move || {
                    // A new connection per request: a pooled one that the server closed meanwhile
                    // (llama-server's keep-alive) would fail the request, not the server.
                    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).pool_max_idle_per_host(0).build()?;
                    (0..per_client).map(|k| one_request(&client, base, model, PROMPTS[(c + k) % PROMPTS.len()], max_tokens)).collect()
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
    Ok(LevelResult { concurrency, wall_s, requests })
}

fn one_request(client: &reqwest::blocking::Client, base: &str, model: &str, prompt: &str, max_tokens: usize) -> Result<RequestTiming> {
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let sent = Instant::now();
    let response = client.post(format!("{base}/v1/chat/completions")).json(&body).send().context("sending a chat request")?;
    if !response.status().is_success() {
        bail!("{} answered {}: {}", base, response.status(), response.text().unwrap_or_default());
    }
    let mut first = None;
    let mut last = sent;
    let mut gaps_ms = Vec::new();
    let mut tokens = 0;
    for line in BufReader::new(response).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).with_context(|| format!("a chunk that is not JSON: {data}"))?;
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
        tokens += 1;
    }
    let first = first.with_context(|| format!("{base} streamed no text"))?;
    Ok(RequestTiming { ttft_ms: (first - sent).as_secs_f64() * 1000.0, gaps_ms, tokens })
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
