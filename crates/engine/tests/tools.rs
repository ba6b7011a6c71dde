//! Tool calling as agent frameworks use it: the official `openai` Python client against
//! `exsa serve` as a separate process (the checks are in `tools_client.py`): on the default
//! model, whose template knows no tools (our generic JSON format), and on the synthetic LFM2
//! model with an LFM2 template of llama.cpp's corpus (LFM2's own format, parsed by llama.cpp's
//! chat layer). Builds without the chat layer answer tools with a 400 "unsupported".

use std::path::PathBuf;
use std::process::Command;

use common::Server;
use exsa_engine::Engine;

mod common;

fn run_client(server: &Server, model: &str, mode: &str, extra: &[&str]) {
    let args: Vec<&str> = [server.base.as_str(), model, mode].into_iter().chain(extra.iter().copied()).collect();
    common::run_openai_script("tools_client.py", &args);
}

#[test]
fn tool_calls_on_the_default_model_through_the_openai_client() {
    let _one_at_a_time = common::one_at_a_time();
    let server = Server::start(&[]);
    run_client(&server, "gemma-3-270m-q4_k_m", if Engine::has_jinja() { "generic" } else { "unsupported" }, &[]);
}

#[test]
fn tool_calls_in_lfm2s_format_through_the_openai_client() {
    if !Engine::has_jinja() {
        return;
    }
    let _one_at_a_time = common::one_at_a_time();
    let model = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml")).join("lfm2-tiny.gguf");
    let template = PathBuf::from(std::env::var("EXSA_CHAT_TEMPLATES").expect("set by .cargo/config.toml")).join("LFM2.5-Instruct.jinja");
    assert!(template.is_file(), "{} is missing: run `cargo xtask test` (it unpacks the template corpus)", template.display());
    let server = Server::start(&["--model", model.to_str().unwrap(), "--chat-template-file", template.to_str().unwrap()]);
    // The marker that starts a call, one special token of the synthetic model's vocabulary.
    let tokens: serde_json::Value = common::client()
        .post(server.url("/tokenize"))
        .json(&serde_json::json!({ "content": "<|tool_call_start|>", "parse_special": true, "add_special": false }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let marker = tokens["tokens"].as_array().filter(|t| t.len() == 1).unwrap_or_else(|| panic!("not one token: {tokens}"))[0].to_string();
    run_client(&server, "lfm2-tiny", "lfm2", &[&marker]);
}

#[test]
fn a_chat_template_that_does_not_parse_stops_the_server_with_the_reason() {
    if !Engine::has_jinja() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--log", "error", "serve", "--port", "0", "--chat-template", "{% for x in %}{{ x }}"])
        .output()
        .expect("exsa runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("chat_template: the chat template does not parse"), "{stderr}");
}
