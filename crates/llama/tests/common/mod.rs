//! Shared by the integration tests: the real default model, loaded once per test binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use llama::{Context, ContextParams, Model, ModelParams};

pub fn model_path() -> PathBuf {
    let path = PathBuf::from(std::env::var("EXSA_MODEL").expect("EXSA_MODEL is set by .cargo/config.toml"));
    assert!(path.is_file(), "default model missing at {}: run `cargo xtask fetch-model`", path.display());
    path
}

pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(model_path(), &ModelParams::default()).expect("default model loads"))
}

pub fn small_params() -> ContextParams {
    ContextParams::default().n_ctx(256).n_batch(64).n_ubatch(64).n_threads(2).n_threads_batch(2)
}

pub fn context() -> Context<'static> {
    Context::new(model(), &small_params()).expect("context")
}

pub fn temp_path(name: &str) -> PathBuf {
    // Under the target directory, one fixed name per file: every run overwrites the last one's
    // files instead of leaving a model-sized copy per process in the system's temp dir.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llama-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The two best tokens of a row.
pub fn top_two(logits: &[f32]) -> (llama::Token, llama::Token) {
    let (mut best, mut second) = (0usize, 1usize);
    if logits[second] > logits[best] {
        std::mem::swap(&mut best, &mut second);
    }
    for (i, &l) in logits.iter().enumerate().skip(2) {
        if l > logits[best] {
            second = best;
            best = i;
        } else if l > logits[second] {
            second = i;
        }
    }
    (llama::Token(best as i32), llama::Token(second as i32))
}
