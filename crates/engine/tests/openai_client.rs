//! The official `openai` Python client (pip-installed by `cargo xtask test` into
//! `.cache/pip/`, see EXSA_OPENAI_SITE) against `exsa serve` as a separate process: models,
//! chat whole and streamed, log-probabilities, text completions, structured output
//! (`response_format`), embeddings, and errors as the client's typed exceptions. The checks are in `openai_client.py`.

use common::Server;
use exsa_engine::Engine;

mod common;

#[test]
fn the_official_openai_client_works_against_the_server() {
    let server = Server::start(&["--parallel", "2", "--api-key", "sekret"]);
    common::run_openai_script("openai_client.py", &[&server.base, "sekret", "gemma-3-270m-q4_k_m", Engine::backend_name()]);
}
