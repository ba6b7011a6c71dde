//! `exsa serve` as a separate process on an ephemeral port, driven by a real HTTP client over
//! the real default model: the OpenAI-style routes, streaming, concurrency, errors and their
//! status codes, a full queue, a client that walks away, and a graceful shutdown under load.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::{Server, client};
use exsa_engine::*;
use serde_json::{Value, json};

mod common;
mod equivalence;

fn chat_body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({ "messages": [{ "role": "user", "content": content }], "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "stream_options": { "include_usage": true } })
}

/// The `data:` payloads of an SSE body, read as they arrive.
fn sse_events(response: reqwest::blocking::Response) -> Vec<String> {
    BufReader::new(response).lines().map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_owned)).collect()
}

/// The text and finish reason of a streamed chat.
fn streamed_text(events: &[String]) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(choice) = v["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, finish)
}

#[test]
fn chat_and_completions_stream_and_not_as_the_engine_generates() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "2"]);
    let http = client();
    assert_eq!(http.get(server.url("/health")).send().unwrap().json::<Value>().unwrap()["status"], "ok");
    let models: Value = http.get(server.url("/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(models["data"][0]["id"], "gemma-3-270m-q4_k_m");

    let response: Value = http.post(server.url("/v1/chat/completions")).json(&chat_body("Name a colour.", 16, false)).send().unwrap().json().unwrap();
    let text = response["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(response["choices"][0]["finish_reason"], "length");
    assert_eq!(response["usage"]["completion_tokens"], 16);

    // The same chat through the engine in this process, greedy.
    let engine = Engine::load(EngineConfig::new(default_model_path())).unwrap();
    let mut session = engine.session().unwrap();
    let request = GenerateRequest::new(" ").max_tokens(16).sampling(SamplingParams::greedy());
    let alone: String = session.chat(&[ChatMessage::new("user", "Name a colour.")], request.options).unwrap().map(|d| d.unwrap()).collect();
    assert_eq!(text, alone);

    // Streamed: the role first, the same text, the finish reason, usage (with the cached prompt), [DONE].
    let events = sse_events(http.post(server.url("/v1/chat/completions")).json(&chat_body("Name a colour.", 16, true)).send().unwrap());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&events), (alone.clone(), "length".to_string()));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 16);
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{usage}");

    // Four tokens: this model's fifth after the prompt is a near tie (" United" against
    // " country", 0.04 logits apart), which ggml's AMX kernels round either way depending on how
    // the prompt was batched (whole, or its last token after a cached prefix).
    let completion: Value = http
        .post(server.url("/v1/completions"))
        .json(&json!({ "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stop": ["\n"] }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let (want, _) =
        engine.generate(&GenerateRequest::new("The capital of France is").max_tokens(4).stop(["\n"]).sampling(SamplingParams::greedy())).unwrap();
    assert_eq!(completion["choices"][0]["text"].as_str().unwrap(), want);
    assert_eq!(completion["object"], "text_completion");

    // OpenAI's other prompt shapes: the text's token ids give the same text; a list of prompts
    // is a choice each, in order (at most a slot each); text and ids mixed in one prompt is a
    // 400 naming `prompt` (llama-server's /completion takes that).
    let complete = |prompt: Value| {
        let body = json!({ "prompt": prompt, "max_tokens": 4, "temperature": 0, "stop": ["\n"] });
        http.post(server.url("/v1/completions")).json(&body).send().unwrap()
    };
    let ids: Vec<i64> = engine.tokenize("The capital of France is", TokenizeOptions::default()).unwrap().iter().map(|t| i64::from(t.0)).collect();
    let from_ids: Value = complete(json!(ids)).json().unwrap();
    assert_eq!(from_ids["choices"][0]["text"], want, "{from_ids}");
    let listed: Value = complete(json!([ids, "Name a colour:"])).json().unwrap();
    let (other, _) = engine.generate(&GenerateRequest::new("Name a colour:").max_tokens(4).stop(["\n"]).sampling(SamplingParams::greedy())).unwrap();
    let choices: Vec<(i64, &str)> =
        listed["choices"].as_array().unwrap().iter().map(|c| (c["index"].as_i64().unwrap(), c["text"].as_str().unwrap())).collect();
    assert_eq!(choices, [(0, want.as_str()), (1, other.as_str())], "{listed}");
    for prompt in [json!(["a", "b", "c"]), json!([1, "text"]), json!([]), json!({ "prompt_string": "x" })] {
        let response = complete(prompt.clone());
        assert_eq!(response.status(), 400, "{prompt}");
        assert_eq!(response.json::<Value>().unwrap()["error"]["param"], "prompt", "{prompt}");
    }
}

/// One generated token as the server lists it: its id and log-probability.
#[derive(Debug)]
struct Step {
    id: Token,
    logprob: f32,
}

fn chat_with_logprobs(server: &Server, prompt: &str, max_tokens: u32) -> Vec<Step> {
    chat_with_logprobs_and(server, prompt, max_tokens, json!({})).1
}

/// A chat (with `extra` fields) and its text and steps.
fn chat_with_logprobs_and(server: &Server, prompt: &str, max_tokens: u32, extra: Value) -> (String, Vec<Step>) {
    let mut body = chat_body(prompt, max_tokens, false);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(5);
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let response: Value = client().post(server.url("/v1/chat/completions")).json(&body).send().unwrap().json().unwrap();
    let text = response["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{response}")).to_string();
    let steps = response["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Step { id: Token(t["id"].as_i64().unwrap() as i32), logprob: t["logprob"].as_f64().unwrap() as f32 })
        .collect();
    (text, steps)
}

/// The default model in this process, for solo references of what the server (the same model,
/// the same chat template) generated.
struct Reference {
    engine: Engine,
}

impl Reference {
    fn load() -> Reference {
        let mut config = EngineConfig::new(default_model_path());
        config.session = SessionConfig::default().n_ctx(1024).n_threads(2).n_threads_batch(2);
        Reference { engine: Engine::load(config).unwrap() }
    }

    /// Every step of a server's greedy chat reply against a solo decode forced through the same
    /// tokens (see `equivalence`).
    fn check(&self, prompt: &str, steps: &[Step], what: &str) -> equivalence::Checked {
        let tokens: Vec<Token> = steps.iter().map(|s| s.id).collect();
        let logprobs: Vec<exsa_engine::serving::TokenLogprobs> =
            steps.iter().zip(&tokens).map(|(s, &token)| exsa_engine::serving::TokenLogprobs { token, logprob: s.logprob, top: Vec::new() }).collect();
        let prompt = self.engine.chat_tokens(&[ChatMessage::new("user", prompt)], SpecialText::Plain).unwrap();
        equivalence::check(&self.engine, &prompt, &tokens, Some(&logprobs), &[], what)
    }
}

/// Eight requests decoded together, and then each alone, give at every step what a solo decode
/// of the same text gives (see `equivalence`: near ties may swap, logits may round differently,
/// nothing more).
#[test]
fn eight_concurrent_requests_each_give_what_they_give_alone() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "8"]);
    let reference = Reference::load();
    let prompts: Vec<String> = (0..8).map(|i| format!("Write one sentence about the number {i}.")).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(|| chat_with_logprobs(&server, p, 24))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut checked = Vec::new();
    for (p, batched) in prompts.iter().zip(&together) {
        assert_eq!(batched.len(), 24);
        checked.push(reference.check(p, batched, &format!("{p} (batched)")));
        let alone = chat_with_logprobs(&server, p, 24);
        checked.push(reference.check(p, &alone, &format!("{p} (alone)")));
    }
    equivalence::cap_partings(&checked, "eight requests together, then alone");
    assert_eq!(server.metric("exsa_requests_total{status=\"ok\"}"), 16.0);
    // Streaming with several requests at once ends each stream properly too.
    let streams: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let url = server.url("/v1/chat/completions");
                s.spawn(move || sse_events(client().post(url).json(&chat_body(p, 16, true)).send().unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for events in streams {
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(streamed_text(&events).1, "length");
    }
}

/// `--pooling none` (llama-server's): the native `/embeddings` gives a vector per token of each
/// input, as llama.cpp gives them (not normalised); OpenAI's and Ollama's embeddings, one vector
/// per text, are a 400 naming the model.
#[test]
fn a_model_that_pools_none_gives_a_vector_per_token_at_the_native_route_only() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1", "--pooling", "none"]);
    let http = client();
    let tokenized: Value =
        http.post(server.url("/tokenize")).json(&json!({ "content": "hello hello hello", "add_special": true })).send().unwrap().json().unwrap();
    let n_tokens = tokenized["tokens"].as_array().unwrap().len();
    let native: Value = http.post(server.url("/embeddings")).json(&json!({ "input": ["hello hello hello", "hi"] })).send().unwrap().json().unwrap();
    let rows = native[0]["embedding"].as_array().unwrap_or_else(|| panic!("{native}"));
    assert_eq!(rows.len(), n_tokens, "a vector per token: {native}");
    assert_eq!(native[1]["index"], 1);
    for row in rows {
        let row: Vec<f32> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(row.len(), 640);
        assert!((norm(&row) - 1.0).abs() > 1e-3, "a token's vector is given as it is, not normalised");
    }
    for (route, body) in [("/v1/embeddings", json!({ "input": "hi" })), ("/api/embed", json!({ "model": "gemma-3-270m-q4_k_m", "input": "hi" }))] {
        let r = http.post(server.url(route)).json(&body).send().unwrap();
        let status = r.status();
        let body: Value = r.json().unwrap();
        assert_eq!(status, 400, "{route}: {body}");
        assert!(body.to_string().contains("pools nothing"), "{route}: {body}");
    }
}

#[test]
fn embeddings_tokenize_detokenize_and_latency_metrics() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1"]);
    let http = client();
    let floats: Value =
        http.post(server.url("/v1/embeddings")).json(&json!({ "input": ["Hello there", "Good night"] })).send().unwrap().json().unwrap();
    let data = floats["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let first: Vec<f32> = data[0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(first.len(), 640, "Gemma 3 270M's width");
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    assert!((norm(&first) - 1.0).abs() < 1e-4, "OpenAI's embeddings are L2-normalised: {}", norm(&first));
    assert!(floats["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);
    // The same vector in base64 (little-endian f32), and what the engine computes in this process
    // (the same two texts: decoded together, as the server does; a text alone rounds otherwise).
    let b64: Value = http
        .post(server.url("/v1/embeddings"))
        .json(&json!({ "input": ["Hello there", "Good night"], "encoding_format": "base64" }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let decoded = decode_base64(b64["data"][0]["embedding"].as_str().unwrap());
    let from_base64: Vec<f32> = decoded.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(from_base64.len(), 640);
    for (a, b) in from_base64.iter().zip(&first) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
    }
    let engine = Engine::load(EngineConfig::new(default_model_path())).unwrap();
    let local = engine.embed_many(&["Hello there", "Good night"]).unwrap().swap_remove(0);
    let local_norm = norm(&local);
    for (a, b) in local.iter().zip(&first) {
        assert!((a / local_norm - b).abs() <= 1e-4, "{a} / {local_norm} vs {b}");
    }
    // llama-server's `embd_normalize`: -1 the pooled vector as it is, 0 scaled to the i16
    // range; a number it does not define is a 400 naming it.
    let normalized = |n: i64| -> Vec<f32> {
        let body = json!({ "input": ["Hello there", "Good night"], "embd_normalize": n });
        let v: Value = http.post(server.url("/v1/embeddings")).json(&body).send().unwrap().json().unwrap();
        v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let unscaled = normalized(-1);
    for (a, b) in unscaled.iter().zip(&local) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "unscaled: {a} vs {b}");
    }
    let max_abs = normalized(0).iter().fold(0.0_f32, |m, x| m.max(x.abs()));
    assert!((max_abs - 32760.0).abs() < 0.05, "max absolute {max_abs}");
    let r = http.post(server.url("/v1/embeddings")).json(&json!({ "input": "x", "embd_normalize": -2 })).send().unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["error"]["param"], "embd_normalize");
    let vector = |v: &Value| -> Vec<f32> { v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    // llama-server's inputs: the text's token ids (BOS and all, as the text is tokenized), the
    // text as OpenAI content parts, and as a prompt_string object each give the text's vector;
    // a list mixing them is one input each. Its native routes (and `content` instead of
    // `input`) answer the bare list of `[vector]`s.
    let tokenized: Value =
        http.post(server.url("/tokenize")).json(&json!({ "content": "Hello there", "add_special": true })).send().unwrap().json().unwrap();
    let ids = tokenized["tokens"].clone();
    let parts = json!({ "content": [{ "type": "text", "text": "Hello " }, { "type": "text", "text": "there" }] });
    let inputs = json!([ "Hello there", ids, parts, { "prompt_string": "Hello there" }, "Good night" ]);
    let mixed: Value = http.post(server.url("/v1/embeddings")).json(&json!({ "input": inputs })).send().unwrap().json().unwrap();
    let mixed: Vec<Vec<f32>> = mixed["data"].as_array().unwrap().iter().map(&vector).collect();
    assert_eq!(mixed.len(), 5);
    for (i, v) in mixed[1..4].iter().enumerate() {
        let cosine: f32 = v.iter().zip(&mixed[0]).map(|(a, b)| a * b).sum();
        assert!(cosine > 0.999, "input {}: cosine {cosine} with the text's vector", i + 1);
    }
    let cosine: f32 = mixed[4].iter().zip(&mixed[0]).map(|(a, b)| a * b).sum();
    assert!(cosine < 0.999, "another text gave the same vector (cosine {cosine})");
    let one: Value = http.post(server.url("/v1/embeddings")).json(&json!({ "input": ids })).send().unwrap().json().unwrap();
    assert_eq!(one["data"].as_array().unwrap().len(), 1, "token ids are one input: {one}");
    for (route, body) in [
        ("/embedding", json!({ "content": "Hello there" })),
        ("/embeddings", json!({ "input": ["Hello there"] })),
        ("/v1/embeddings", json!({ "content": "Hello there" })),
    ] {
        let native: Value = http.post(server.url(route)).json(&body).send().unwrap().json().unwrap();
        let list = native.as_array().unwrap_or_else(|| panic!("{route}: {native}"));
        assert_eq!((list.len(), &list[0]["index"]), (1, &json!(0)), "{route}: {native}");
        let v: Vec<f32> = list[0]["embedding"][0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let cosine: f32 = v.iter().zip(&mixed[0]).map(|(a, b)| a * b).sum();
        assert!(cosine > 0.999, "{route}: cosine {cosine}");
    }
    for (body, param) in [
        (json!({ "input": [] }), "input"),
        (json!({ "input": [1, 999_999_999] }), "input"),
        (json!({ "input": { "content": [{ "type": "image_url", "image_url": { "url": "data:," } }] } }), "input"),
        (json!({ "input": { "content": "a string" } }), "input"),
        (json!({ "input": "x", "content": "x" }), "content"),
        (json!({ "content": "x", "encoding_format": "base64" }), "encoding_format"),
    ] {
        let r = http.post(server.url("/v1/embeddings")).json(&body).send().unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.json::<Value>().unwrap()["error"]["param"], param, "{body}");
    }
    // More than 64 inputs are refused by their count, before any is tokenized (a bad one among
    // them is not what the answer names).
    let many = [vec![json!([999_999_999])], vec![json!("x"); 64]].concat();
    let r: Value = http.post(server.url("/v1/embeddings")).json(&json!({ "input": many })).send().unwrap().json().unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("1 to 64 inputs"), "{r}");
    // 32 texts in one request (decoded together) give the vectors 32 single requests give, up to
    // the rounding of a batched decode (this model's, amplified: see tests/embeddings.rs'
    // `tolerance`).
    let texts: Vec<String> = (0..32).map(|i| format!("Sentence number {i} is about {}.", ["cats", "rain", "ships", "bread"][i % 4])).collect();
    let many: Value = http.post(server.url("/v1/embeddings")).json(&json!({ "input": texts })).send().unwrap().json().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let one: Value = http.post(server.url("/v1/embeddings")).json(&json!({ "input": text })).send().unwrap().json().unwrap();
        let (batched, single) = (vector(&many["data"][i]), vector(&one["data"][0]));
        let cosine: f32 = batched.iter().zip(&single).map(|(a, b)| a * b).sum();
        assert!(cosine > 0.997, "text {i}: cosine {cosine} between the batched and the single vector");
    }
    let r = http.post(server.url("/v1/embeddings")).json(&json!({ "input": "x", "dimensions": 8 })).send().unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["error"]["param"], "dimensions");

    let tokens: Value = http.post(server.url("/tokenize")).json(&json!({ "content": "Hello there" })).send().unwrap().json().unwrap();
    let ids: Vec<i64> = tokens["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    // llama-server's defaults: no BOS, control-token text parsed.
    let plain = exsa_engine::TokenizeOptions::default().add_special(false).specials(SpecialText::Parse);
    assert_eq!(ids, engine.tokenize("Hello there", plain).unwrap().iter().map(|&t| i64::from(t.0)).collect::<Vec<_>>());
    let with_bos: Value =
        http.post(server.url("/tokenize")).json(&json!({ "content": "Hello there", "add_special": true })).send().unwrap().json().unwrap();
    let with_bos: Vec<i64> = with_bos["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(with_bos.len(), ids.len() + 1, "add_special adds BOS");
    let text: Value = http.post(server.url("/detokenize")).json(&json!({ "tokens": with_bos })).send().unwrap().json().unwrap();
    assert_eq!(text["content"], "Hello there", "BOS renders as nothing");
    let pieces: Value =
        http.post(server.url("/tokenize")).json(&json!({ "content": "Hello there", "with_pieces": true })).send().unwrap().json().unwrap();
    let pieces = pieces["tokens"].as_array().unwrap();
    assert_eq!(pieces.iter().map(|p| p["id"].as_i64().unwrap()).collect::<Vec<_>>(), ids);
    assert_eq!(pieces.iter().map(|p| p["piece"].as_str().unwrap()).collect::<String>(), "Hello there");
    assert_eq!(http.post(server.url("/detokenize")).json(&json!({ "tokens": [1, 99999999] })).send().unwrap().status(), 400);

    http.post(server.url("/v1/chat/completions")).json(&chat_body("Hi", 4, true)).send().unwrap().text().unwrap();
    assert_eq!(server.metric("exsa_time_to_first_token_seconds_count"), 1.0);
    // Four tokens: up to three gaps (a token that completes no character sends nothing).
    assert!((1.0..=3.0).contains(&server.metric("exsa_inter_token_seconds_count")));
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let n = quad.iter().filter(|&&c| c != b'=').fold(0u32, |acc, &c| (acc << 6) | u32::from(value(c)))
            << (6 * quad.iter().filter(|&&c| c == b'=').count());
        let bytes = quad.iter().filter(|&&c| c != b'=').count() - 1;
        out.extend(&n.to_be_bytes()[1..1 + bytes]);
    }
    out
}

#[test]
fn errors_have_openai_shapes_and_the_right_status() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1", "--ctx", "256", "--max-body", "2000", "--api-key", "sekret"]);
    let http = client();
    let post = |body: String| {
        http.post(server.url("/v1/chat/completions")).bearer_auth("sekret").header("content-type", "application/json").body(body).send().unwrap()
    };
    let status_and_error = |r: reqwest::blocking::Response| {
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string(), "{body}");
        (status, body)
    };
    // The key: /health is open, the rest is not.
    assert_eq!(http.get(server.url("/health")).send().unwrap().status(), 200);
    let (status, body) = status_and_error(http.get(server.url("/v1/models")).send().unwrap());
    assert_eq!((status, body["error"]["type"].as_str().unwrap()), (401, "authentication_error"));
    assert_eq!(http.get(server.url("/v1/models")).bearer_auth("wrong").send().unwrap().status(), 401);
    assert_eq!(http.get(server.url("/v1/models")).bearer_auth("sekret").send().unwrap().status(), 200);
    // Anthropic's clients send the key as X-Api-Key.
    assert_eq!(http.get(server.url("/v1/models")).header("x-api-key", "sekret").send().unwrap().status(), 200);
    assert_eq!(http.get(server.url("/v1/models")).header("x-api-key", "wrong").send().unwrap().status(), 401);

    assert_eq!(status_and_error(post("{not json".into())).0, 400);
    assert_eq!(status_and_error(post(json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": "many" }).to_string())).0, 400);
    for n in [json!(0), json!(17), json!("two")] {
        let (status, body) = status_and_error(post(json!({ "messages": [{ "role": "user", "content": "hi" }], "n": n }).to_string()));
        assert_eq!(status, 400, "n = {n}: {body}");
    }
    assert_eq!(status_and_error(post(json!({ "messages": [] }).to_string())).0, 400);
    // One model served: it answers whatever the name (as llama-server; OpenAI clients send theirs).
    let r = post(json!({ "model": "gpt-9", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 2 }).to_string());
    assert_eq!(r.status(), 200);
    assert_ne!(r.json::<Value>().unwrap()["model"], "gpt-9", "the response names the model that answered");
    let (status, _) = status_and_error(post(chat_body(&"x".repeat(3000), 4, false).to_string()));
    assert_eq!(status, 413);
    let (status, body) = status_and_error(post(chat_body(&"word ".repeat(300), 4, false).to_string()));
    assert_eq!((status, body["error"]["code"].as_str().unwrap()), (400, "context_length_exceeded"));
    assert!(body["error"]["message"].as_str().unwrap().contains("256"), "{body}");
    assert_eq!(status_and_error(http.get(server.url("/v1/nothing")).bearer_auth("sekret").send().unwrap()).0, 404);
}

#[test]
fn a_full_queue_answers_503_at_once_and_loses_nothing_accepted() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1", "--max-queue", "1"]);
    let outcomes: Vec<(u16, Option<String>, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let url = server.url("/v1/chat/completions");
                s.spawn(move || {
                    let r = client().post(url).json(&chat_body(&format!("Count to {i}."), 48, false)).send().unwrap();
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                    (r.status().as_u16(), retry, r.text().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = outcomes.iter().filter(|o| o.0 == 503).count();
    assert!(refused >= 1, "one slot and one queue place for five requests: {outcomes:?}");
    for (status, retry, body) in &outcomes {
        match status {
            200 => assert_eq!(serde_json::from_str::<Value>(body).unwrap()["usage"]["completion_tokens"], 48),
            503 => {
                assert_eq!(retry.as_deref(), Some("1"));
                assert!(body.contains("queue_full"), "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
}

#[test]
fn a_client_that_leaves_frees_its_slot_and_shutdown_drains() {
    let _one_at_a_time = common::one_at_a_time();
    let mut server = Server::start(&["--parallel", "2"]);
    // Leave mid-stream: read a few chunks of a long generation, then drop the connection.
    let mut response = client().post(server.url("/v1/chat/completions")).json(&chat_body("Tell a long story.", 2000, true)).send().unwrap();
    let mut buf = [0u8; 512];
    let _ = response.read(&mut buf).unwrap();
    // The stream opens as the request is queued; the decode thread admits it a moment later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("exsa_busy_slots") < 1.0 {
        assert!(Instant::now() < deadline, "the request never took a slot");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("exsa_busy_slots") > 0.0 {
        assert!(Instant::now() < deadline, "the slot stayed busy after the client left");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Leave during prefill: a long prompt (several n_batch chunks) and a client that gives up
    // after 200 ms; the slot is free long before the prompt could have been decoded.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(150);
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let started = Instant::now();
    assert!(impatient.post(server.url("/v1/chat/completions")).json(&chat_body(&long, 4, false)).send().is_err());
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("exsa_busy_slots") > 0.0 {
        assert!(Instant::now() < deadline, "the slot stayed busy after the client left during prefill");
        std::thread::sleep(Duration::from_millis(20));
    }
    let freed_after = started.elapsed();
    // A prompt as long in full, for comparison (sharing no prefix worth reusing with the first).
    let full = Instant::now();
    let other = long.replace("quick brown fox", "slow green turtle");
    client().post(server.url("/v1/chat/completions")).json(&chat_body(&other, 1, false)).send().unwrap().text().unwrap();
    assert!(freed_after < full.elapsed(), "freed after {freed_after:?}, while the whole prompt takes {:?}", full.elapsed());

    // Shutdown under load: two streams in flight, SIGTERM, both end with [DONE], exit 0.
    let in_flight: Vec<_> = (0..2)
        .map(|i| {
            let url = server.url("/v1/chat/completions");
            std::thread::spawn(move || sse_events(client().post(url).json(&chat_body(&format!("Story number {i}."), 64, true)).send().unwrap()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("exsa_busy_slots") < 2.0 {
        assert!(Instant::now() < deadline, "the two streams did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = libc::pid_t::try_from(server.child.id()).unwrap();
    // SAFETY: sends SIGTERM to our own child process, which is alive (it serves the streams
    // above); no memory is involved. (A `kill` program may not exist on a minimal machine.)
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    for handle in in_flight {
        let events = handle.join().unwrap();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        assert_eq!(streamed_text(&events).1, "length");
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn structured_output_penalties_and_logit_bias() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "2"]);
    let http = client();
    let chat = |extra: Value| {
        let mut body = chat_body("Describe a person as JSON.", 96, false);
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = http.post(server.url("/v1/chat/completions")).json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let schema = json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 24 },
            "age": { "type": "integer" },
            "role": { "enum": ["admin", "user"] }
        },
        "required": ["name", "age", "role"]
    });
    let format = json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "person", "schema": schema } } });
    let (status, body) = chat(format.clone());
    if Engine::backend_name() != "source" {
        // The crate baseline's grammar sampler can abort the process, and raw FFI has none:
        // refused, by name.
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("unsupported")), "{body}");
    } else {
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let person: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        let keys: Vec<&str> = person.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["name", "age", "role"], "{text}");
        assert!(person["name"].as_str().unwrap().chars().count() <= 24 && person["age"].is_i64(), "{text}");
        assert!(["admin", "user"].contains(&person["role"].as_str().unwrap()), "{text}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "the grammar ends the object, the model then ends the text");
        // Streamed, the same text.
        let mut streaming = chat_body("Describe a person as JSON.", 96, true);
        streaming.as_object_mut().unwrap().extend(format.as_object().unwrap().clone());
        let events = sse_events(http.post(server.url("/v1/chat/completions")).json(&streaming).send().unwrap());
        assert_eq!(streamed_text(&events).0, text);
        // A raw GBNF grammar, llama-server's extension.
        let (status, body) = chat(json!({ "grammar": "root ::= (\"yes\" | \"no\") \".\"" }));
        assert_eq!(status, 200, "{body}");
        assert!(["yes.", "no."].contains(&body["choices"][0]["message"]["content"].as_str().unwrap()), "{body}");
    }
    // A schema the converter cannot honour, a grammar that does not parse: 400 naming the field.
    let (status, body) =
        chat(json!({ "response_format": { "type": "json_schema", "json_schema": { "schema": { "type": "string", "pattern": "a+" } } } }));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("response_format")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("pattern"), "{body}");
    if Engine::backend_name() == "source" {
        let (status, body) = chat(json!({ "grammar": "root ::= (" }));
        assert_eq!((status, body["error"]["param"].as_str()), (400, Some("grammar")), "{body}");
    }

    // logit_bias: +100 on one token makes greedy decoding repeat it.
    let tokens: Value =
        http.post(server.url("/tokenize")).json(&json!({ "content": " banana", "add_special": false })).send().unwrap().json().unwrap();
    let banana = tokens["tokens"][0].as_i64().unwrap();
    let (status, body) = chat(json!({ "max_tokens": 3, "logit_bias": { banana.to_string(): 100 } }));
    assert_eq!((status, body["choices"][0]["message"]["content"].as_str()), (200, Some(" banana banana banana")), "{body}");
    // ... and with a presence penalty of 2 the bias still wins (100 - 2), while a bias of -100
    // bans it from a text that would otherwise use it.
    let (_, body) = chat(json!({ "max_tokens": 3, "presence_penalty": 2.0, "logit_bias": { banana.to_string(): 100 } }));
    assert_eq!(body["choices"][0]["message"]["content"], " banana banana banana");
    let (_, unbiased) = chat(json!({ "max_tokens": 8 }));
    let first: Value = http
        .post(server.url("/tokenize"))
        .json(&json!({ "content": unbiased["choices"][0]["message"]["content"], "add_special": false }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let first = first["tokens"][0].as_i64().unwrap();
    let (_, banned) = chat(json!({ "max_tokens": 8, "logit_bias": { first.to_string(): -100 } }));
    assert_ne!(banned["choices"][0]["message"]["content"], unbiased["choices"][0]["message"]["content"]);
    // Out of range: 400 naming the field.
    for bad in [json!({ "logit_bias": { "99999999": 5 } }), json!({ "logit_bias": { "1": 500 } }), json!({ "logit_bias": { "x": 1 } })] {
        let (status, body) = chat(bad.clone());
        assert_eq!((status, body["error"]["param"].as_str()), (400, Some("logit_bias")), "{bad}: {body}");
    }
    let (status, body) = chat(json!({ "presence_penalty": 3.0 }));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("presence_penalty")), "{body}");
    let (status, body) = chat(json!({ "frequency_penalty": -2.5 }));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("frequency_penalty")), "{body}");
    let (status, _) = chat(json!({ "frequency_penalty": 1.5, "presence_penalty": 0.5 }));
    assert_eq!(status, 200);
}

/// Speculation per request (`speculative`, exsa's extension) and as the server's default
/// (`--speculative ngram`): the same text as without, streamed the same, fewer decodes than
/// tokens on an answer that quotes its prompt; bad settings are a 400 naming the field.
#[test]
fn speculative_requests_give_the_same_text() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "2", "--speculative", "ngram", "--draft-max", "6"]);
    let http = client();
    let prompt = "Repeat this line exactly, three times:\nThe quick brown fox jumps over the lazy dog.";
    let chat = |extra: Value, stream: bool| {
        let mut body = chat_body(prompt, 48, stream);
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        http.post(server.url("/v1/chat/completions")).json(&body).send().unwrap()
    };
    let steps_before = server.metric("exsa_decode_steps_total");
    let (_, off) = chat_with_logprobs_and(&server, prompt, 48, json!({ "speculative": { "type": "off" } }));
    let steps_off = server.metric("exsa_decode_steps_total") - steps_before;
    let drafted_before = server.metric("exsa_draft_tokens_total");
    // The server's default (ngram), then asked for explicitly, then streamed.
    let (default_text, default) = chat_with_logprobs_and(&server, prompt, 48, json!({}));
    let steps_default = server.metric("exsa_decode_steps_total") - steps_before - steps_off;
    let (_, explicit) = chat_with_logprobs_and(&server, prompt, 48, json!({ "speculative": { "type": "ngram", "max_draft": 4 } }));
    let reference = Reference::load();
    for (what, steps) in [("off", &off), ("server default", &default), ("explicit", &explicit)] {
        assert_eq!(steps.len(), off.len(), "{what}");
        reference.check(prompt, steps, what);
    }
    // The same request again, streamed: the same steps, so the same text.
    let (streamed, _) = streamed_text(&sse_events(chat(json!({}), true)));
    assert_eq!(streamed, default_text);
    assert!(server.metric("exsa_draft_tokens_total") > drafted_before, "nothing drafted");
    assert!(server.metric("exsa_draft_tokens_accepted_total") > 0.0, "no draft kept");
    assert!(steps_default < steps_off, "speculation took {steps_default} decodes, plain {steps_off}");
    for bad in [json!({ "type": "draft" }), json!({ "type": "ngram", "max_draft": 0 }), json!({ "type": "fast" }), json!({ "kind": "ngram" })] {
        let r = chat(json!({ "speculative": bad }), false);
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        // Named: the field, or (for a misspelt key) the keys it takes.
        assert!(message.contains("specul") || message.contains("expected `type`"), "{bad}: {body}");
    }
}

/// A stream carries what the whole response gives, step by step: the native `/completion`'s
/// chunks list every generated token (with its probabilities) once, in order, and a streamed
/// chat's chunks carry the log-probabilities of every token of the reply.
#[test]
fn streams_carry_the_tokens_and_logprobs_of_the_whole_response() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1"]);
    let http = client();
    let native = json!({ "prompt": "The capital of France is", "n_predict": 12, "temperature": 0, "n_probs": 3, "return_tokens": true });
    let whole: Value = http.post(server.url("/completion")).json(&native).send().unwrap().json().unwrap();
    let mut streamed = native.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(http.post(server.url("/completion")).json(&streamed).send().unwrap());
    assert!(!events.iter().any(|e| e == "[DONE]"), "the native stream has no [DONE]");
    let chunks: Vec<Value> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let (last, deltas) = chunks.split_last().unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["tokens_predicted"], whole["tokens_predicted"]);
    let mut tokens = Vec::new();
    let mut probabilities = Vec::new();
    let mut text = String::new();
    for chunk in deltas {
        assert_eq!(chunk["stop"], false, "{chunk}");
        tokens.extend(chunk["tokens"].as_array().unwrap().iter().cloned());
        probabilities.extend(chunk["completion_probabilities"].as_array().unwrap().iter().cloned());
        text.push_str(chunk["content"].as_str().unwrap());
    }
    assert_eq!(text, whole["content"].as_str().unwrap());
    assert_eq!(tokens, *whole["tokens"].as_array().unwrap(), "every token, once, in order");
    let whole_probabilities = whole["completion_probabilities"].as_array().unwrap();
    assert_eq!(probabilities.len(), whole_probabilities.len());
    for (i, (s, w)) in probabilities.iter().zip(whole_probabilities).enumerate() {
        assert_eq!(s["id"], w["id"], "step {i}");
        assert!((s["logprob"].as_f64().unwrap() - w["logprob"].as_f64().unwrap()).abs() < 1e-3, "step {i}: {s} vs {w}");
        assert_eq!(s["top_logprobs"].as_array().unwrap().len(), 3, "step {i}");
    }

    // A streamed chat with logprobs: the same tokens as the whole response, every step.
    let (whole_text, whole_steps) = chat_with_logprobs_and(&server, "Name three colours.", 12, json!({}));
    let mut body = chat_body("Name three colours.", 12, true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(5);
    let events = sse_events(http.post(server.url("/v1/chat/completions")).json(&body).send().unwrap());
    let mut ids = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(content) = v["choices"].get(0).and_then(|c| c["logprobs"]["content"].as_array()) {
            ids.extend(content.iter().map(|t| Token(t["id"].as_i64().unwrap() as i32)));
        }
    }
    assert_eq!(streamed_text(&events).0, whole_text);
    assert_eq!(ids, whole_steps.iter().map(|s| s.id).collect::<Vec<_>>(), "every token's log-probability, once, in order");
}

/// llama-server's and OpenAI's other ways to ask for the same generation agree with the plain
/// chat: `n` greedy choices are each the solo reply, the Responses API returns the chat's reply,
/// `input_tokens` counts the chat's prompt, and a last assistant message is continued, not closed.
#[test]
fn choices_responses_and_continuations_agree_with_the_plain_chat() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "2"]);
    let http = client();
    let messages = json!([{ "role": "user", "content": "Name three colours." }]);
    let solo: Value = http
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let solo_text = solo["choices"][0]["message"]["content"].as_str().unwrap();
    let solo_steps = solo["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();

    let two: Value = http
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "messages": messages, "max_tokens": 10, "temperature": 0, "n": 2 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let choices = two["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{two}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], solo_text, "greedy choice {i}");
    }
    assert_eq!(two["usage"]["prompt_tokens"], solo["usage"]["prompt_tokens"], "the prompt counts once");
    assert_eq!(two["usage"]["completion_tokens"].as_u64().unwrap(), 2 * solo["usage"]["completion_tokens"].as_u64().unwrap());

    // Streamed, the two choices go side by side: each chunk names its choice, each choice has
    // the role, the text and its end, and the usage over both and [DONE] come once, last.
    let body = json!({
        "messages": messages, "max_tokens": 10, "temperature": 0, "n": 2, "stream": true, "stream_options": { "include_usage": true },
        "logprobs": true, "top_logprobs": 2,
    });
    let events = sse_events(http.post(server.url("/v1/chat/completions")).json(&body).send().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "the usage chunk is last: {usage}");
    // Each choice's last chunk carries its timings: the usage is their sum.
    let predicted: u64 = chunks
        .iter()
        .filter(|c| c["choices"].get(0).is_some_and(|c| !c["finish_reason"].is_null()))
        .map(|c| c["timings"]["predicted_n"].as_u64().unwrap())
        .sum();
    assert_eq!(usage["usage"]["completion_tokens"], predicted);
    for i in 0..2 {
        let own: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).filter(|c| c["index"] == i).collect();
        assert_eq!(own[0]["delta"]["role"], "assistant", "choice {i} starts with the role");
        let text: String = own.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
        assert!(!text.is_empty(), "streamed choice {i}");
        // Each choice is the solo reply up to a first parting, and parts only where the solo
        // decode's two best tokens were a near tie: batched decodes round otherwise, and how the
        // two choices share steps depends on when each was admitted. A choice mixed up with
        // another sequence parts at once, by whole units. Every step of the same paths is checked
        // by teacher forcing in tests/serving.rs.
        let steps: Vec<&Value> = own.iter().filter_map(|c| c["logprobs"]["content"].as_array()).flatten().collect();
        let parting = (0..steps.len().max(solo_steps.len())).find(|&k| steps.get(k).map(|a| &a["token"]) != solo_steps.get(k).map(|b| &b["token"]));
        let parted = parting.is_some();
        if let Some(at) = parting {
            let solo_step = solo_steps.get(at).unwrap_or_else(|| panic!("streamed choice {i} goes on after the solo reply ended: {text:?}"));
            let top = solo_step["top_logprobs"].as_array().unwrap();
            let gap = top[0]["logprob"].as_f64().unwrap() - top[1]["logprob"].as_f64().unwrap();
            assert!(
                gap < f64::from(exsa_engine::serving::BATCH_NEAR_TIE),
                "streamed choice {i} parts from the solo reply at step {at} by {gap}: {text:?} vs {solo_text:?}"
            );
        } else {
            assert_eq!(text, solo_text, "streamed choice {i}");
        }
        // Each choice runs to its own end, as long as the solo reply: one choice that ends first
        // does not cancel the other (it did, when its stream was dropped, for the one admitted a
        // step later).
        let ends: Vec<&Value> = own.iter().map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
        assert_eq!(ends.len(), 1, "choice {i} ends once: {text:?}");
        assert!(matches!(ends[0].as_str(), Some("stop" | "length")), "choice {i} ends {}: {text:?}", ends[0]);
        if !parted {
            // (After a near-tie parting a choice may end elsewhere.)
            assert_eq!(ends, [&solo["choices"][0]["finish_reason"]], "choice {i} ends as the solo reply: {text:?}");
            assert_eq!(steps.len(), solo_steps.len(), "choice {i}'s tokens: {text:?}");
        }
    }

    // Sampled choices end at different steps (a stop string here): the one that ends first
    // leaves the other to run to its own end.
    let body = json!({ "messages": messages, "max_tokens": 40, "temperature": 1, "seed": 1, "stop": ["."], "n": 2, "stream": true });
    let events = sse_events(http.post(server.url("/v1/chat/completions")).json(&body).send().unwrap());
    let chunks: Vec<Value> = events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let own = |i: usize| chunks.iter().filter_map(|c| c["choices"].get(0)).filter(move |c| c["index"] == i);
    let texts: Vec<String> = (0..2).map(|i| own(i).filter_map(|c| c["delta"]["content"].as_str()).collect()).collect();
    assert_ne!(texts[0].len(), texts[1].len(), "the check needs choices of different lengths: {texts:?}");
    for i in 0..2 {
        let end = own(i).find_map(|c| c["finish_reason"].as_str());
        assert!(matches!(end, Some("stop" | "length")), "choice {i} ends {end:?}: {texts:?}");
    }

    let counted: Value =
        http.post(server.url("/v1/chat/completions/input_tokens")).json(&json!({ "messages": messages })).send().unwrap().json().unwrap();
    assert_eq!(counted["input_tokens"], solo["usage"]["prompt_tokens"]);

    let response: Value = http
        .post(server.url("/v1/responses"))
        .json(&json!({ "input": "Name three colours.", "max_output_tokens": 10, "temperature": 0 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(response["id"].as_str().unwrap().starts_with("resp_"), "{response}");
    assert_eq!(response["output"][0]["content"][0]["text"], solo_text);
    assert_eq!(response["usage"]["input_tokens"], solo["usage"]["prompt_tokens"]);

    // Anthropic's Messages API: the same reply as a text block, whole and streamed.
    let anthropic = json!({ "messages": [{ "role": "user", "content": "Name three colours." }], "max_tokens": 10, "temperature": 0 });
    let message: Value = http.post(server.url("/v1/messages")).json(&anthropic).send().unwrap().json().unwrap();
    assert_eq!((message["type"].as_str(), message["content"][0]["type"].as_str()), (Some("message"), Some("text")), "{message}");
    assert_eq!(message["content"][0]["text"], solo_text);
    assert_eq!(message["usage"]["input_tokens"], solo["usage"]["prompt_tokens"]);
    assert_eq!(message["stop_reason"], if solo["choices"][0]["finish_reason"] == "length" { "max_tokens" } else { "end_turn" });
    let counted: Value = http.post(server.url("/v1/messages/count_tokens")).json(&anthropic).send().unwrap().json().unwrap();
    assert_eq!(counted, json!({ "input_tokens": solo["usage"]["prompt_tokens"] }));
    let mut streamed = anthropic.clone();
    streamed["stream"] = json!(true);
    let events: Vec<Value> =
        sse_events(http.post(server.url("/v1/messages")).json(&streamed).send().unwrap()).iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let deltas = kinds.iter().filter(|k| **k == "content_block_delta").count();
    assert!(deltas > 0, "{kinds:?}");
    let mut expected = vec!["message_start", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(kinds, expected);
    let text: String = events.iter().filter(|e| e["type"] == "content_block_delta").map(|e| e["delta"]["text"].as_str().unwrap()).collect();
    assert_eq!(text, solo_text);

    // A last assistant message is a reply begun: the prompt ends inside it.
    let begun = json!([{ "role": "user", "content": "Name three colours." }, { "role": "assistant", "content": "Red, green and" }]);
    let rendered: Value = http.post(server.url("/apply-template")).json(&json!({ "messages": begun })).send().unwrap().json().unwrap();
    assert!(rendered["prompt"].as_str().unwrap().ends_with("Red, green and"), "{rendered}");
    let closed: Value =
        http.post(server.url("/apply-template")).json(&json!({ "messages": begun, "continue_final_message": false })).send().unwrap().json().unwrap();
    assert!(!closed["prompt"].as_str().unwrap().ends_with("Red, green and"), "{closed}");
    let both = http
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "messages": begun, "continue_final_message": true, "add_generation_prompt": true }))
        .send()
        .unwrap();
    assert_eq!(both.status(), 400);
}

/// `/infill` builds llama-server's fill-in-the-middle prompt (context files, BOS, prefix, the
/// prompt, suffix, middle), on the synthetic LFM2 model that has FIM tokens; a model without them
/// is a 400 naming the model.
#[test]
fn infill_builds_llama_servers_prompt_and_needs_fim_tokens() {
    let _one_at_a_time = common::one_at_a_time();
    let model = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml")).join("lfm2-tiny.gguf");
    let server = Server::start(&["--model", model.to_str().unwrap()]);
    let request = json!({
        "input_prefix": "def add(a, b):\n    ", "input_suffix": "\nprint(add(1, 2))\n",
        "input_extra": [{ "filename": "util.py", "text": "x = 1\n" }], "prompt": "return",
        "n_predict": 4, "temperature": 0, "response_fields": ["prompt", "tokens_evaluated"],
    });
    let body: Value = client().post(server.url("/infill")).json(&request).send().unwrap().json().unwrap();
    // What llama-server (target/llama-server) answered for the same request and model.
    let expected = "\n\n--- snippet ---\n\nx = 1\n<bos><|fim_prefix|>def add(a, b):\n    return<|fim_suffix|>\nprint(add(1, 2))\n<|fim_middle|>";
    assert_eq!(body, json!({ "prompt": expected, "tokens_evaluated": 35 }));
    let r = client().post(server.url("/infill")).json(&json!({ "input_prefix": "x" })).send().unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["error"]["param"], "input_suffix");

    let server = Server::start(&[]);
    let r = client().post(server.url("/infill")).json(&json!({ "input_prefix": "a", "input_suffix": "b" })).send().unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert_eq!((body["error"]["param"].as_str(), body["error"]["code"].as_str()), (Some("model"), Some("not_supported")), "{body}");
}

/// `GET /slots` (with `--slots`) shows a slot busy while a stream runs and idle once its client
/// has gone; without `--slots` it is llama-server's 501.
#[test]
fn slots_show_what_runs_and_are_freed_when_the_client_leaves() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&["--parallel", "1", "--slots"]);
    let http = client();
    let slots = || http.get(server.url("/slots")).send().unwrap().json::<Value>().unwrap();
    assert_eq!(slots()[0]["is_processing"], false, "{}", slots());
    let body = json!({ "prompt": "Once upon a time", "n_predict": 2000, "stream": true, "ignore_eos": true });
    let mut stream = BufReader::new(http.post(server.url("/completion")).json(&body).send().unwrap());
    let mut first = String::new();
    while !first.starts_with("data: ") {
        first.clear();
        stream.read_line(&mut first).unwrap();
    }
    let busy = slots();
    assert_eq!((busy[0]["is_processing"].as_bool(), busy.as_array().unwrap().len()), (Some(true), 1), "{busy}");
    assert!(busy[0]["n_decoded"].as_u64().unwrap() >= 1, "{busy}");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while slots()[0]["is_processing"] == true {
        assert!(Instant::now() < deadline, "the slot of a client that left is still busy: {}", slots());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A stream that asked for it reports its prompt's progress: what the cache had, then each
    // chunk of 8 tokens decoded, up to the whole prompt.
    let server = Server::start(&["--parallel", "1", "--batch", "8"]);
    let body = json!({ "prompt": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty",
                       "n_predict": 2, "stream": true, "return_progress": true });
    let progress: Vec<Value> = sse_events(client().post(server.url("/completion")).json(&body).send().unwrap())
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).unwrap().get("prompt_progress").cloned())
        .collect();
    let total = progress[0]["total"].as_u64().unwrap();
    let processed: Vec<u64> = progress.iter().map(|p| p["processed"].as_u64().unwrap()).collect();
    let mut expected: Vec<u64> = (0..total).step_by(8).collect();
    expected.push(total);
    assert_eq!(processed, expected, "{progress:?}");
    assert!(progress.iter().all(|p| p["total"] == total && p["cache"] == 0));

    let r = client().get(server.url("/slots")).send().unwrap();
    assert_eq!(r.status(), 501);
    assert_eq!(r.json::<Value>().unwrap()["error"]["type"], "not_supported_error");
}

/// `POST /slots/{id}?action=` (with `--slot-save-path`): a slot's cache saved to a file, the slot
/// erased, the file restored into the other slot, which then serves the same prompt from it (one
/// token decoded, the same greedy text); file names that are paths, a missing file, a file that
/// is no state, an unknown action and a slot that does not exist are 4xx naming what is wrong;
/// without the folder, llama-server's 501.
#[test]
fn slots_save_restore_and_erase_their_caches_in_the_slot_folder_only() {
    let _one_at_a_time = common::one_at_a_time();
    let dir = std::env::temp_dir().join(format!("exsa-slot-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = Server::start(&["--parallel", "2", "--slots", "--slot-save-path", dir.to_str().unwrap()]);
    let http = client();
    let cached = || -> Vec<u64> {
        let slots: Value = http.get(server.url("/slots")).send().unwrap().json().unwrap();
        slots.as_array().unwrap().iter().map(|s| s["n_cached_tokens"].as_u64().unwrap()).collect()
    };
    let action = |slot: usize, action: &str, body: Value| {
        let r = http.post(server.url(&format!("/slots/{slot}?action={action}"))).json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let complete_in = |slot: i64| -> Value {
        let body = json!({ "prompt": "The capital of France is a city that", "n_predict": 12, "temperature": 0, "id_slot": slot });
        http.post(server.url("/completion")).json(&body).send().unwrap().json().unwrap()
    };
    let complete = || complete_in(-1);
    // `id_slot` puts the request in slot 1 (the scheduler would pick slot 0 of two empty ones).
    let first = complete_in(1);
    let held = cached();
    let slot = 1;
    assert_eq!(held[0], 0, "{held:?}");
    let decoded = first["timings"]["prompt_n"].as_u64().unwrap() + first["tokens_predicted"].as_u64().unwrap() - 1;
    assert_eq!(held[slot], decoded, "the prompt and the generated tokens but the last: {first}");
    // The prompt again, served by this cache: only its last token is decoded, over the cells the
    // first decode wrote. A restored copy of the cache must give exactly this. (A whole-prompt
    // decode, as the first, may part from it at a near tie: batch shapes round differently; on an
    // AVX-512 Xeon without AMX this prompt's first token does.)
    let reused = complete_in(1);
    assert_eq!(reused["timings"]["prompt_n"], 1, "{reused}");
    let tokens = cached()[slot];

    let (status, saved) = action(slot, "save", json!({ "filename": "france.bin" }));
    assert_eq!(status, 200, "{saved}");
    assert_eq!(
        (saved["id_slot"].as_u64(), saved["filename"].as_str(), saved["n_saved"].as_u64()),
        (Some(slot as u64), Some("france.bin"), Some(tokens))
    );
    let written = std::fs::metadata(dir.join("france.bin")).unwrap().len();
    assert_eq!(saved["n_written"].as_u64(), Some(written));

    let (status, erased) = action(slot, "erase", Value::Null);
    assert_eq!((status, erased["n_erased"].as_u64()), (200, Some(tokens)), "{erased}");
    assert_eq!(cached(), vec![0, 0]);

    let other = 1 - slot;
    let (status, restored) = action(other, "restore", json!({ "filename": "france.bin" }));
    assert_eq!(status, 200, "{restored}");
    assert_eq!((restored["n_restored"].as_u64(), restored["n_read"].as_u64()), (Some(tokens), Some(written)));
    assert_eq!(cached()[other], tokens);
    let again = complete();
    assert_eq!(again["content"], reused["content"]);
    assert_eq!(again["timings"]["prompt_n"], 1, "the restored cache serves the prompt: {again}");
    assert_eq!(cached()[other], tokens, "the request ran in the slot holding the restored cache");

    std::fs::write(dir.join("junk.bin"), b"not a state file").unwrap();
    let r = http.post(server.url("/completion")).json(&json!({ "prompt": "x", "n_predict": 1, "id_slot": 5 })).send().unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().unwrap()["error"]["param"].as_str().map(str::to_owned)), (400, Some("id_slot".into())));
    for (slot, act, body, status, param) in [
        (0, "save", json!({ "filename": "../escape.bin" }), 400, "filename"),
        (0, "save", json!({ "filename": "/tmp/escape.bin" }), 400, "filename"),
        (0, "save", json!({}), 400, "filename"),
        (0, "restore", json!({ "filename": "missing.bin" }), 404, "filename"),
        (0, "restore", json!({ "filename": "junk.bin" }), 400, "filename"),
        (0, "compact", json!({}), 400, "action"),
        (7, "erase", json!({}), 400, "id_slot"),
    ] {
        let (got, body) = action(slot, act, body);
        assert_eq!((got, body["error"]["param"].as_str()), (status, Some(param)), "{act}: {body}");
    }
    assert!(!dir.parent().unwrap().join("escape.bin").exists());
    // The failed restores emptied slot 0 (the erased slot 1 is empty too): the prompt is decoded
    // whole again, as the first time.
    let last = complete();
    assert_eq!(
        (&last["content"], &last["timings"]["prompt_n"]),
        (&first["content"], &first["timings"]["prompt_n"]),
        "a failed restore leaves the server serving"
    );

    let server = Server::start(&["--parallel", "2"]);
    let r = client().post(server.url("/slots/0?action=erase")).send().unwrap();
    assert_eq!(r.status(), 501);
    assert_eq!(r.json::<Value>().unwrap()["error"]["type"], "not_supported_error");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Several `--host` addresses serve the same routes on one port (IPv6 loopback where the machine
/// has it); `--model-id` with several names lists the first in sort order as the id and all as
/// aliases, with `--tags`, as llama-server lists them.
#[test]
fn several_addresses_and_names_of_one_model() {
    let _one_at_a_time = common::one_at_a_time();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let hosts = if ipv6 { "127.0.0.1,::1" } else { "127.0.0.1" };
    let server = Server::start(&["--host", hosts, "--model-id", "tiny,code,fim", "--tags", "chat,small"]);
    let models: Value = client().get(server.url("/v1/models")).send().unwrap().json().unwrap();
    let model = &models["data"][0];
    assert_eq!((model["id"].as_str(), &model["aliases"], &model["tags"]), (Some("code"), &json!(["code", "fim", "tiny"]), &json!(["chat", "small"])));
    if ipv6 {
        let port = server.base.rsplit(':').next().unwrap();
        let health = client().get(format!("http://[::1]:{port}/health")).send().unwrap();
        assert_eq!(health.status(), 200);
        let body = json!({ "prompt": "Once upon a time", "n_predict": 4, "temperature": 0 });
        let there: Value = client().post(format!("http://[::1]:{port}/completion")).json(&body).send().unwrap().json().unwrap();
        let here: Value = client().post(server.url("/completion")).json(&body).send().unwrap().json().unwrap();
        assert_eq!(there["content"], here["content"]);
    } else {
        eprintln!("no IPv6 loopback here: the second address is not tested");
    }
}

/// CORS: with `--cors-origin`, a preflight from that origin gets the headers (for a route behind
/// the API key too: a preflight carries none), one from another origin does not; without it,
/// no CORS header at all.
#[test]
fn browser_origins_named_by_cors_origin_may_call_and_no_other() {
    let _one_at_a_time = common::one_at_a_time();
    let preflight = |server: &Server, origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization,content-type")
            .send()
            .unwrap()
    };
    let allowed = |r: &reqwest::blocking::Response| r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
    let server = Server::start(&["--cors-origin", "http://app.example:3000", "--api-key", "sekret"]);
    let r = preflight(&server, "http://app.example:3000");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(allowed(&r).as_deref(), Some("http://app.example:3000"));
    let methods = r.headers().get("access-control-allow-methods").unwrap().to_str().unwrap().to_string();
    assert!(methods.contains("POST"), "{methods}");
    assert!(r.headers().get("access-control-allow-credentials").is_none());
    assert_eq!(allowed(&preflight(&server, "http://evil.example")), None);
    let r = client().get(server.url("/v1/models")).header("Origin", "http://app.example:3000").bearer_auth("sekret").send().unwrap();
    assert_eq!((r.status().as_u16(), allowed(&r).as_deref()), (200, Some("http://app.example:3000")));

    let server = Server::start(&[]);
    let r = preflight(&server, "http://app.example:3000");
    assert_eq!(allowed(&r), None);
    assert!(r.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "{:?}", r.headers());
}

/// `/v1/rerank` (and `/rerank`) on the synthetic reranker, asked the same as llama.cpp's own
/// llama-server (`--reranking`, same file, same threads) in both shapes it answers: Jina/Cohere
/// (`documents`, `top_n`) and TEI (`texts`, `return_text`). Every result in the same order with
/// the same score (within float rounding) and the same token count; our documents and texts
/// come back when asked, TEI's `raw_scores: false` gives the sigmoid of llama-server's score.
/// Fields of the other shape, both lists, `truncate: true` and an empty list are 400s naming
/// them; a model that is no reranker is a 400 naming `model`, and a reranker gives no embeddings.
#[test]
fn rerank_orders_documents_as_llama_server_does() {
    let _one_at_a_time = common::one_at_a_time();
    let synth = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    let model = synth.join("bert-tiny-rerank.gguf");
    let model = model.to_str().unwrap();
    let server = Server::start(&["--model", model]);
    let texts = ["cats purr", "stocks fell", "a kitten", "the weather is mild today", "a cat sat on the mat", "bonds rose"];
    let jina = json!({ "query": "a cat", "documents": texts, "top_n": 4 });
    if Engine::backend_name() == "crate" {
        // Rank pooling is refused on the crate baseline (see tests/embeddings.rs).
        let r = client().post(server.url("/v1/rerank")).json(&jina).send().unwrap();
        assert_eq!((r.status().as_u16(), r.json::<Value>().unwrap()["error"]["code"].as_str().map(str::to_owned)), (400, Some("unsupported".into())));
        return;
    }
    let reference = {
        let llama = common::LlamaServer::start(&["-m", model, "--reranking"]);
        let ask = |body: &Value| client().post(llama.url("/rerank")).json(body).send().unwrap().json::<Value>().unwrap();
        (ask(&jina), ask(&json!({ "query": "a cat", "texts": texts, "return_text": true })))
    };
    // (index, score) of each result, in the order given.
    let ranked = |results: &Value, score: &str| -> Vec<(u64, f64)> {
        results.as_array().unwrap_or_else(|| panic!("{results}")).iter().map(|r| (r["index"].as_u64().unwrap(), r[score].as_f64().unwrap())).collect()
    };
    let same = |ours: &[(u64, f64)], theirs: &[(u64, f64)], what: &str| {
        assert_eq!(ours.iter().map(|r| r.0).collect::<Vec<_>>(), theirs.iter().map(|r| r.0).collect::<Vec<_>>(), "{what}: the order differs");
        for ((i, a), (_, b)) in ours.iter().zip(theirs) {
            assert!((a - b).abs() < 5e-4, "{what}, document {i}: score {a} here, {b} from llama-server");
        }
    };
    let theirs = ranked(&reference.0["results"], "relevance_score");
    assert_eq!(theirs.len(), 4, "{}", reference.0);
    for route in ["/v1/rerank", "/rerank"] {
        let mut body = jina.clone();
        body["return_documents"] = json!(true);
        let r: Value = client().post(server.url(route)).json(&body).send().unwrap().json().unwrap();
        same(&ranked(&r["results"], "relevance_score"), &theirs, route);
        assert_eq!(r["usage"]["prompt_tokens"], reference.0["usage"]["prompt_tokens"], "{r}\n{}", reference.0);
        for result in r["results"].as_array().unwrap() {
            assert_eq!(result["document"]["text"], texts[result["index"].as_u64().unwrap() as usize]);
        }
    }
    let tei = client().post(server.url("/rerank")).json(&json!({ "query": "a cat", "texts": texts, "return_text": true })).send().unwrap();
    let tei: Value = tei.json().unwrap();
    let theirs = ranked(&reference.1, "score");
    same(&ranked(&tei, "score"), &theirs, "TEI");
    assert_eq!(theirs.len(), texts.len());
    for (ours, llama) in tei.as_array().unwrap().iter().zip(reference.1.as_array().unwrap()) {
        assert_eq!((&ours["text"], ours.as_object().unwrap().len()), (&llama["text"], llama.as_object().unwrap().len()), "{ours} vs {llama}");
    }
    let squashed: Value =
        client().post(server.url("/rerank")).json(&json!({ "query": "a cat", "texts": texts, "raw_scores": false })).send().unwrap().json().unwrap();
    let sigmoid: Vec<(u64, f64)> = theirs.iter().map(|&(i, s)| (i, 1.0 / (1.0 + (-s).exp()))).collect();
    same(&ranked(&squashed, "score"), &sigmoid, "TEI raw_scores false");

    let refused = |body: Value| {
        let r = client().post(server.url("/v1/rerank")).json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap()["error"]["param"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(refused(json!({ "query": "a cat", "documents": [] })), (400, "documents".into()));
    assert_eq!(refused(json!({ "query": "a cat", "documents": texts, "texts": texts })), (400, "texts".into()));
    assert_eq!(refused(json!({ "query": "a cat", "texts": texts, "return_documents": true })), (400, "return_documents".into()));
    assert_eq!(refused(json!({ "query": "a cat", "documents": texts, "return_text": true })), (400, "return_text".into()));
    assert_eq!(refused(json!({ "query": "a cat", "texts": texts, "truncate": true })), (400, "truncate".into()));
    assert_eq!(refused(json!({ "query": "a cat", "texts": [{ "text": "a kitten" }] })), (400, "texts".into()));
    assert_eq!(refused(json!({ "input": "a cat" })).0, 400, "no query");
    let r = client().post(server.url("/v1/embeddings")).json(&json!({ "input": "a cat" })).send().unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().unwrap()["error"]["param"].as_str().map(str::to_owned)), (400, Some("model".into())));

    let server = Server::start(&[]);
    let r = client().post(server.url("/v1/rerank")).json(&json!({ "query": "a cat", "documents": ["cats purr"] })).send().unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().unwrap()["error"]["param"].as_str().map(str::to_owned)), (400, Some("model".into())));
}

/// Every response carries an `X-Request-Id` (the client's, else a new one) that the request's
/// log lines carry too (`--log-format json`: its `request_id`); a stream waiting for a slot sends
/// keep-alive comments; `--request-timeout` ends a stream with an error event, a whole answer
/// with 504, an Ollama stream with an error line, and each frees its slot for the next request.
#[test]
fn requests_carry_ids_keep_streams_alive_and_stop_at_the_time_limit() {
    let _one_at_a_time = common::one_at_a_time();
    let limit = ["--request-timeout", "3", "--sse-keep-alive", "0.3"];
    let (server, log) = Server::start_logged(&[&["--parallel", "1", "--log-format", "json", "--server-log", "info"][..], &limit[..]].concat());
    let http = client();

    let r = http.post(server.url("/v1/chat/completions")).header("X-Request-Id", "client-id-42").json(&chat_body("Hi", 3, false)).send().unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-request-id"].to_str().unwrap()), (200, "client-id-42"));
    let r = http.post(server.url("/v1/chat/completions")).header("X-Request-Id", "has space").json(&chat_body("Hi", 3, false)).send().unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    let r = http.get(server.url("/no/such/route")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-request-id"), "refused requests carry an id too");
    // The "request done" line of each request names its id (JSON lines, the span's field).
    let done_with = |id: &str| {
        log.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["fields"]["message"] == "request done" && l["span"]["request_id"] == id)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(done_with("client-id-42") && done_with(&made)) {
        assert!(Instant::now() < deadline, "no JSON \"request done\" line with each request's id in {:?}", log.lines());
        std::thread::sleep(Duration::from_millis(20));
    }

    // A stream that runs into the limit: its last event is the error, then it ends.
    let long = json!({ "messages": [{ "role": "user", "content": "Count" }], "max_tokens": 100000, "ignore_eos": true, "stream": true });
    let started = Instant::now();
    let mut running = BufReader::new(http.post(server.url("/v1/chat/completions")).json(&long).send().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        running.read_line(&mut line).unwrap();
    }
    // Meanwhile another stream waits for the one slot, kept alive by comments.
    let mut waiting = BufReader::new(http.post(server.url("/v1/chat/completions")).json(&chat_body("Hi", 2, true)).send().unwrap());
    // (Its first event, the assistant's role, goes out at once; no text can come before the slot.)
    let mut line = String::new();
    while line.trim_end() != ": keep-alive" {
        line.clear();
        assert!(waiting.read_line(&mut line).unwrap() > 0, "the waiting stream ended without a keep-alive comment");
        if let Some(event) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(event).unwrap();
            assert!(event["choices"][0]["delta"]["content"].is_null(), "text came before the slot was free: {event}");
        }
    }
    drop(waiting);
    let mut rest = String::new();
    running.read_to_string(&mut rest).unwrap();
    let events: Vec<&str> = rest.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "request_timeout", "{last}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(6), "the stream ended after {took:?}");
    assert!(events.len() > 5, "the stream sent tokens before its limit: {events:?}");

    // A whole answer that runs into it: 504 naming the limit.
    let r = http
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "messages": [{ "role": "user", "content": "Count" }], "max_tokens": 100000, "ignore_eos": true }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--request-timeout"), "{body}");

    // Ollama's stream: an error line last.
    let r = http.post(server.url("/api/generate")).json(&json!({ "model": "gemma-3-270m-q4_k_m", "prompt": "Write a long story about a dragon.", "options": { "num_predict": 100000, "temperature": 0 } })).send().unwrap();
    assert_eq!(r.status(), 200);
    let lines: Vec<Value> = BufReader::new(r).lines().map_while(Result::ok).map(|l| serde_json::from_str(&l).unwrap()).collect();
    assert!(lines.last().unwrap()["error"].as_str().unwrap().contains("--request-timeout"), "{:?}", lines.last());

    // The slot is free: a short request gets it at once and finishes.
    let r = http.post(server.url("/v1/chat/completions")).json(&chat_body("Hi", 3, false)).send().unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text());
}

/// llama-server's LoRA surface, on llama-tiny and its synthetic adapter: `GET /lora-adapters`
/// lists the adapter (at scale 0 with `--lora-init-without-apply`); requests at other `lora`
/// scales sent together each get every token they get alone; `POST /lora-adapters` sets the
/// scales of requests without `lora` (an empty `lora` is the server's too, an empty POST turns
/// every adapter off), embeddings' too; `generation_settings` echoes a request's scales; an
/// adapter the model lacks is a 400 naming `lora`.
#[test]
fn lora_adapters_apply_per_request_and_as_the_server_sets_them() {
    let _one_at_a_time = common::one_at_a_time();
    let synth = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    let (model, adapter) = (synth.join("llama-tiny.gguf"), synth.join("llama-tiny-lora.gguf"));
    assert!(adapter.is_file(), "run `cargo xtask synth-models`");
    let (model, adapter) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let server = Server::start(&["--model", model, "--lora", adapter, "--lora-init-without-apply", "--parallel", "4", "--ctx", "1024"]);
    let http = client();
    let listed = |http: &reqwest::blocking::Client| http.get(server.url("/lora-adapters")).send().unwrap().json::<Value>().unwrap();
    // With the task name and prompt prefix its file declares (backend `crate` reads none).
    let (task, prefix) = if Engine::backend_name() == "crate" { ("", "") } else { ("tiny-story", "Story: ") };
    assert_eq!(listed(&http), json!([{ "id": 0, "path": adapter, "scale": 0.0, "task_name": task, "prompt_prefix": prefix }]));

    let complete = |lora: Option<Value>| {
        let mut body = json!({ "prompt": "Once upon a time", "n_predict": 48, "temperature": 0, "ignore_eos": true, "return_tokens": true });
        if let Some(lora) = lora {
            body["lora"] = lora;
        }
        client().post(server.url("/completion")).json(&body).send().unwrap()
    };
    let tokens = |response: reqwest::blocking::Response| {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().unwrap();
        body["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>()
    };
    let at = |scale: f32| Some(json!([{ "id": 0, "scale": scale }]));
    let scales = [0.0, 1.0, -0.5];
    let alone: Vec<Vec<i64>> = scales.iter().map(|&s| tokens(complete(at(s)))).collect();
    assert_eq!(alone[0].len(), 48);
    assert_ne!(alone[0], alone[1], "the adapter at scale 1 changed no token");
    assert_ne!(alone[1], alone[2], "scales 1 and -0.5 gave the same tokens");
    assert_eq!(tokens(complete(None)), alone[0], "loaded without applying: requests without lora get scale 0");

    let together: Vec<Vec<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> = scales.iter().chain(&scales).map(|&scale| s.spawn(move || tokens(complete(at(scale))))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in together.iter().enumerate() {
        assert_eq!(got, &alone[i % 3], "scale {} sent beside the others", scales[i % 3]);
    }

    let set = |body: Value| http.post(server.url("/lora-adapters")).json(&body).send().unwrap();
    let props_lora =
        || http.get(server.url("/props")).send().unwrap().json::<Value>().unwrap()["default_generation_settings"]["params"]["lora"].clone();
    assert_eq!(props_lora(), json!([{ "id": 0, "scale": 0.0 }]), "/props lists the scales requests get");
    let response = set(json!([{ "id": 0, "scale": 1.0, "path": "ignored" }]));
    assert_eq!(response.json::<Value>().unwrap(), json!({ "success": true }));
    assert_eq!(listed(&http)[0]["scale"], 1.0);
    assert_eq!(props_lora(), json!([{ "id": 0, "scale": 1.0 }]));
    assert_eq!(tokens(complete(None)), alone[1], "the server's scale after POST /lora-adapters");
    assert_eq!(tokens(complete(Some(json!([])))), alone[1], "an empty lora is the server's scales");
    assert_eq!(tokens(complete(at(0.0))), alone[0], "a request's own scale over the server's");
    // Embeddings and rerank take the server's scales too (as llama-server's do), or their own.
    let embed = |lora: Option<Value>| {
        let mut body = json!({ "input": "Once upon a time", "embd_normalize": -1 });
        if let Some(lora) = lora {
            body["lora"] = lora;
        }
        let response = http.post(server.url("/v1/embeddings")).json(&body).send().unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().unwrap()["data"][0]["embedding"].clone()
    };
    let (embedded_off, embedded_on) = (embed(at(0.0)), embed(at(1.0)));
    assert_ne!(embedded_off, embedded_on, "the adapter changed no embedding");
    assert_eq!(embed(None), embedded_on, "embeddings take the server's scale");
    // The native response echoes the request's own scales (none: an empty list).
    let settings = |lora| complete(lora).json::<Value>().unwrap()["generation_settings"]["lora"].clone();
    assert_eq!(settings(at(0.5)), json!([{ "id": 0, "scale": 0.5 }]));
    assert_eq!(settings(None), json!([]));
    assert_eq!(set(json!([])).status(), 200);
    assert_eq!(tokens(complete(None)), alone[0], "an empty POST turns the adapter off");
    assert_eq!(embed(None), embedded_off, "embeddings after the empty POST");
    let response = http.post(server.url("/v1/embeddings")).json(&json!({ "input": "x", "lora": [{ "id": 1, "scale": 1.0 }] })).send().unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().unwrap()["error"]["param"], "lora");

    for (response, what) in [(complete(Some(json!([{ "id": 1, "scale": 1.0 }]))), "a request"), (set(json!([{ "id": 1, "scale": 1.0 }])), "the POST")]
    {
        assert_eq!(response.status(), 400, "{what}");
        let body: Value = response.json().unwrap();
        assert_eq!(body["error"]["param"], "lora", "{what}: {body}");
    }
    assert_eq!(set(json!({ "id": 0 })).status(), 400, "not a list");
    // Counting a chat's tokens reads `lora` as generating it does.
    let count = |lora: Value| {
        let body = json!({ "messages": [{ "role": "user", "content": "hi" }], "lora": lora });
        http.post(server.url("/v1/chat/completions/input_tokens")).json(&body).send().unwrap()
    };
    assert_eq!(count(json!([{ "id": 0, "scale": 0.5 }])).status(), 200);
    let refused: Value = count(json!([{ "id": 1, "scale": 0.5 }])).json().unwrap();
    assert_eq!(refused["error"]["param"], "lora", "{refused}");
    drop(server);

    // Adapter ids follow the command line's order of --lora and --lora-scaled, as llama-server
    // numbers them (requests name adapters by id). Backend `crate` applies one adapter at most.
    if Engine::backend_name() == "crate" {
        return;
    }
    let dir = std::env::temp_dir().join(format!("exsa-lora-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copies: Vec<String> = ["first", "second", "third"]
        .iter()
        .map(|name| {
            let copy = dir.join(format!("{name}.gguf"));
            std::fs::copy(adapter, &copy).unwrap();
            copy.to_str().unwrap().to_owned()
        })
        .collect();
    let server = Server::start(&["--model", model, "--lora-scaled", &copies[0], "0.5", "--lora", &copies[1], "--lora-scaled", &copies[2], "-1"]);
    let listed: Value = http.get(server.url("/lora-adapters")).send().unwrap().json().unwrap();
    let ids: Vec<(&str, f64)> = listed.as_array().unwrap().iter().map(|a| (a["path"].as_str().unwrap(), a["scale"].as_f64().unwrap())).collect();
    assert_eq!(ids, [(copies[0].as_str(), 0.5), (copies[1].as_str(), 1.0), (copies[2].as_str(), -1.0)]);
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An activated LoRA (llama-tiny-alora: llama-tiny-lora's weights with the invocation
/// `<end_of_turn>user`, tokens 106 and 2364) applies as llama-server applies it: every token
/// of each completion is llama-server's, for a prompt with the invocation, one without it (the
/// adapter stays off) and one with it twice (from the last on). llama-server's answers are
/// taken without its prompt cache (it reuses cells decoded with the adapter for a prompt whose
/// invocation comes later); ours with the cache, in an order that reuses every kind of cell:
/// the same prompt, a longer one, one without the adapter. `GET /lora-adapters` lists the
/// invocation as llama-server does; embeddings of a text with the invocation are refused by
/// name (they decode a text with one set of adapters). Backend `crate` cannot read an
/// invocation: it applies such an adapter to every token.
#[test]
fn an_activated_lora_applies_from_its_invocation_as_llama_server_applies_it() {
    let _one_at_a_time = common::one_at_a_time();
    if Engine::backend_name() == "crate" {
        return;
    }
    let synth = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    let (model, alora) = (synth.join("llama-tiny.gguf"), synth.join("llama-tiny-alora.gguf"));
    assert!(alora.is_file(), "run `cargo xtask synth-models`");
    let (model, alora) = (model.to_str().unwrap(), alora.to_str().unwrap());
    let once = "Once upon a time, in a land far away,<end_of_turn>user\nTell me what happened next";
    let twice = format!("{once} to the fox<end_of_turn>user\nAnd then");
    let prompts = [once, "Once upon a time, in a land far away, a fox", twice.as_str()];
    let complete = |base: &str, prompt: &str, lora: Option<f32>, cache: bool| {
        let mut body =
            json!({ "prompt": prompt, "n_predict": 24, "temperature": 0, "ignore_eos": true, "return_tokens": true, "cache_prompt": cache });
        if let Some(scale) = lora {
            body["lora"] = json!([{ "id": 0, "scale": scale }]);
        }
        let response = client().post(format!("{base}/completion")).json(&body).send().unwrap();
        assert_eq!(response.status(), 200, "{prompt:?}");
        let body: Value = response.json().unwrap();
        body["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<_>>()
    };
    let (listed, reference, base) = {
        let llama = common::LlamaServer::start(&["-m", model, "--lora", alora, "-c", "1024", "-np", "1"]);
        let listed: Value = client().get(llama.url("/lora-adapters")).send().unwrap().json().unwrap();
        let reference: Vec<Vec<i64>> = prompts.iter().map(|p| complete(&llama.base, p, None, false)).collect();
        (listed, reference, complete(&llama.base, once, Some(0.0), false))
    };
    assert_eq!(listed[0]["alora_invocation_tokens"], json!([106, 2364]), "{listed}");
    assert_ne!(reference[0], base, "the activated adapter changed no token");

    let server = Server::start(&["--model", model, "--lora", alora, "--parallel", "2", "--ctx", "1024"]);
    let ours: Value = client().get(server.url("/lora-adapters")).send().unwrap().json().unwrap();
    for key in ["alora_invocation_tokens", "alora_invocation_string"] {
        assert_eq!(ours[0][key], listed[0][key], "{key}");
    }
    for round in 0..2 {
        for (prompt, reference) in prompts.iter().zip(&reference) {
            assert_eq!(&complete(&server.base, prompt, None, true), reference, "round {round}: {prompt:?}");
        }
        assert_eq!(complete(&server.base, once, Some(0.0), true), base, "round {round}: the adapter off");
    }
    let embed = |input: Value| client().post(server.url("/v1/embeddings")).json(&json!({ "input": input })).send().unwrap();
    assert_eq!(embed(json!(prompts[1])).status(), 200, "without the invocation");
    // With it in the text, at a text's start (where it would apply to every token), or in one
    // text of several.
    for input in [json!(once), json!([106, 2364, 1000, 300]), json!([prompts[1], once])] {
        let refused = embed(input.clone());
        assert_eq!(refused.status(), 400, "{input}");
        let refused: Value = refused.json().unwrap();
        assert_eq!(refused["error"]["param"], "lora", "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains("aLoRA"), "{refused}");
    }
}
