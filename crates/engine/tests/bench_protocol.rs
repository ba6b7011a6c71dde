//! What the `exsa` binary prints for `bench` is what bench-compare parses: the typed protocol
//! round-trips through a real process, and its greedy trace agrees with the harness's own.

use std::process::Command;

use exsa_engine::harness::{BenchReport, Equivalence, NEAR_TIE, compare};
use exsa_engine::*;

#[test]
fn exsa_bench_prints_a_report_that_parses_and_holds_what_was_asked() {
    let model = default_model_path();
    assert!(model.is_file(), "default model missing at {}: run `cargo xtask fetch-model`", model.display());
    let output = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--model", model.to_str().unwrap(), "--threads", "2", "--log", "error"])
        .args(["bench", "--tests", "pp16,tg4,e2e4", "--reps", "2", "--no-warmup", "--greedy-tokens", "6", "--batch", "64", "--ubatch", "64"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = BenchReport::parse(&String::from_utf8(output.stdout).unwrap()).unwrap();
    assert_eq!(report.backend, Engine::backend_name());
    assert_eq!((report.n_batch, report.n_ubatch, report.threads), (64, 64, 2));
    assert!(report.model.n_vocab > 0 && !report.model.description.is_empty());
    let tests: Vec<&str> = report.samples.iter().map(|s| s.test.as_str()).collect();
    assert_eq!(tests, ["pp16", "tg4", "e2e4", "pp16", "tg4", "e2e4"]);
    for s in &report.samples {
        assert!(s.tokens_per_s > 0.0 && s.seconds > 0.0, "{s:?}");
        assert_eq!(s.time_to_first_token_ms.is_some(), s.test.starts_with("e2e"), "{s:?}");
    }
    let greedy = report.greedy.expect("asked for 6 greedy tokens");
    assert_eq!(greedy.len(), 6);
    assert!(greedy.iter().all(|s| s.margin >= 0.0 && s.token != s.runner_up));
    // The same build, in this process, through the harness: the same trace.
    let mut config = EngineConfig::new(model);
    config.session = SessionConfig::default().n_threads(2).n_threads_batch(2).n_batch(64).n_ubatch(64);
    let engine = Engine::load(config.clone()).unwrap();
    let here = harness::greedy_trace(&engine, &config.session, harness::EQUIVALENCE_PROMPT, 6).unwrap();
    assert_eq!(compare(&here, &greedy, NEAR_TIE), Equivalence::Identical);
}
