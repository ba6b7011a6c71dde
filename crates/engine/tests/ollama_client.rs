//! The official `ollama` Python client (pip-installed by `cargo xtask test` into `.cache/pip/`,
//! see EXSA_OLLAMA_SITE) against `exsa serve` as a separate process: chat and generate, streamed
//! and whole, options, JSON format, embed, list, show, ps, a keep_alive 0 unload seen in ps, a
//! tool call round trip, images refused, a bad model name; and the same greedy text through
//! `/api/chat` as through `/v1/chat/completions`. The checks are in `ollama_client.py`.

use common::Server;
use exsa_engine::Engine;

mod common;

#[test]
fn the_official_ollama_client_works_against_the_server() {
    let _one_at_a_time = common::one_at_a_time();
    // One model given with --model (pinned) and the synthetic ones from a folder, loaded on
    // demand (unloaded by keep_alive 0).
    let synth = std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml");
    let model = std::env::var("EXSA_MODEL").expect("set by .cargo/config.toml");
    let server = Server::start(&["--model", &model, "--parallel", "2", "--models-dir", &synth]);
    let jinja = if Engine::has_jinja() { "jinja" } else { "no-jinja" };
    common::run_ollama_script("ollama_client.py", &[&server.base, "gemma-3-270m-q4_k_m", "lfm2-tiny", Engine::backend_name(), jinja]);
}
