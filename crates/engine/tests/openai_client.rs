//! The official `openai` Python client (pip-installed by `cargo xtask test` into
//! `.cache/pip/`, see EXSA_OPENAI_SITE) against `exsa serve` as a separate process: models,
//! chat whole and streamed, log-probabilities, text completions, structured output
//! (`response_format`), embeddings, and errors as the client's typed exceptions. The checks are in `openai_client.py`.

use std::path::PathBuf;
use std::process::Command;

use common::Server;
use exsa_engine::Engine;

mod common;

#[test]
fn the_official_openai_client_works_against_the_server() {
    let site = PathBuf::from(std::env::var("EXSA_OPENAI_SITE").expect("EXSA_OPENAI_SITE is set by .cargo/config.toml"));
    assert!(site.join("openai").is_dir(), "the openai package is missing at {}: run `cargo xtask test` (it installs it)", site.display());
    let server = Server::start(&["--parallel", "2", "--api-key", "sekret"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
        .env("PYTHONPATH", &site)
        .arg(script)
        .args([&server.base, "sekret", "gemma-3-270m-q4_k_m", Engine::backend_name()])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
