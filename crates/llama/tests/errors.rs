//! The error variants no other test produces, each from the input a user could give: a model
//! path that is a folder or holds a NUL, a full KV cache, a text too long for llama.cpp's
//! tokenizer, a sampler used with another model's context, files that are not adapters, and an
//! adapter (the synthetic llama-tiny-lora) used where it does not belong, and an averaging
//! embeddings context whose sizes llama.cpp would abort on
//! (`SamplerError::NothingSelected` comes from a grammar that allows no candidate, in the
//! sampler's unit tests; a chain without a selecting stage is refused when it is built). (`DecodeError::Rejected` and `StateError::SizeMismatch` are
//! defensive: llama.cpp returns no other code for a batch that passed our checks, and writes the
//! size it announced; no input reaches them.)

mod common;

use std::path::{Path, PathBuf};

use common::{model, model_path, temp_path};
use llama::*;

#[test]
fn model_paths_that_are_folders_or_hold_a_nul_are_named_errors() {
    let dir = temp_path("a-folder.gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let err = Model::load(&dir, &ModelParams::default()).unwrap_err();
    assert!(matches!(&err.kind, LoadErrorKind::Io(e) if e.kind() == std::io::ErrorKind::IsADirectory), "{err}");
    let nul = Path::new("model\0.gguf");
    let err = Model::load(nul, &ModelParams::default()).unwrap_err();
    assert!(matches!(err.kind, LoadErrorKind::InvalidPath), "{err}");
}

#[test]
fn a_full_kv_cache_is_no_kv_slot() {
    // Two sequences share 256 cells (one unified cache); each stays within its positions,
    // together they do not fit.
    let params = ContextParams::default().n_ctx(256).n_batch(256).n_ubatch(256).n_seq_max(2).unified_kv(true).n_threads(2).n_threads_batch(2);
    let mut ctx = Context::new(model(), &params).unwrap();
    let tokens: Vec<Token> = model().vocab().tokenize(&"one two three four ".repeat(40), TokenizeOptions::default()).unwrap();
    let fill = &tokens[..120];
    ctx.decode(&Batch::from_tokens(fill, 0, 0).unwrap()).unwrap();
    ctx.decode(&Batch::from_tokens(fill, 0, 1).unwrap()).unwrap();
    let err = ctx.decode(&Batch::from_tokens(&tokens[..40], 120, 0).unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::NoKvSlot), "{err}");
    // Freeing a sequence makes room again.
    ctx.remove_range(1, -1, -1).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens[..40], 120, 0).unwrap()).unwrap();
}

#[test]
fn a_text_longer_than_the_tokenizer_takes_is_too_long() {
    // llama.cpp takes the length as an int32: 2 GiB and more cannot be passed at all.
    let text = "a".repeat(i32::MAX as usize + 1);
    let err = model().vocab().tokenize(&text, TokenizeOptions::default()).unwrap_err();
    assert!(matches!(err, TokenizeError::TooLong { len } if len == text.len()), "{err}");
}

fn synth_model(name: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let path = dir.join(name);
    assert!(path.is_file(), "{} missing: run `cargo xtask synth-models`", path.display());
    path
}

#[test]
fn a_sampler_used_with_another_models_context_is_the_wrong_model() {
    let other = Model::load(synth_model("llama-tiny.gguf"), &ModelParams::default()).unwrap();
    let mut sampler = SamplerChain::new().greedy().build(&other).unwrap();
    let mut ctx = common::context();
    let tokens = model().vocab().tokenize("Hello", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    let err = sampler.sample_last(&ctx).unwrap_err();
    assert!(matches!(err, SamplerError::WrongModel), "{err}");
}

#[test]
fn files_that_are_not_adapters_are_lora_errors() {
    let missing = temp_path("no-such-adapter.gguf");
    let _ = std::fs::remove_file(&missing);
    assert!(matches!(LoraAdapter::load(model(), &missing), Err(LoraError::NotFound(p)) if p == missing));
    assert!(matches!(LoraAdapter::load(model(), Path::new("lora\0.gguf")), Err(LoraError::InvalidPath(_))));
    // A model is not an adapter: llama.cpp refuses it, and says why.
    let err = LoraAdapter::load(model(), model_path()).unwrap_err();
    assert!(matches!(&err, LoraError::Load { messages, .. } if !messages.0.is_empty()), "{err}");
}

#[test]
fn a_lora_adapter_changes_the_logits_of_its_own_model_only() {
    let tiny = Model::load(synth_model("llama-tiny.gguf"), &ModelParams::default()).unwrap();
    let adapter = LoraAdapter::load(&tiny, synth_model("llama-tiny-lora.gguf")).unwrap();
    let mut ctx = Context::new(&tiny, &common::small_params()).unwrap();
    let tokens = tiny.vocab().tokenize("Once upon a time", TokenizeOptions::default()).unwrap();
    let logits = |ctx: &mut Context<'_>| {
        ctx.clear_memory(MemoryData::Zero);
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        ctx.logits(tokens.len() as i32 - 1).unwrap().to_vec()
    };
    let base = logits(&mut ctx);
    ctx.set_lora_adapters(&[(&adapter, 1.0)]).unwrap();
    let adapted = logits(&mut ctx);
    let moved = base.iter().zip(&adapted).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "the adapter left the logits as they were (max change {moved})");
    ctx.set_lora_adapters(&[]).unwrap();
    assert_eq!(logits(&mut ctx), base, "without the adapter the model is itself again");

    // Its file's metadata, and no invocation tokens (a plain adapter); the activated LoRA's
    // tokens as its file lists them.
    assert_eq!(adapter.meta("adapter.lora.task_name").as_deref(), Some("tiny-story"));
    assert_eq!(adapter.meta("adapter.lora.prompt_prefix").as_deref(), Some("Story: "));
    assert_eq!(adapter.meta("adapter.no_such_key"), None);
    assert_eq!(adapter.meta("bad\0key"), None);
    assert!(adapter.alora_invocation_tokens().is_empty());
    let alora = LoraAdapter::load(&tiny, synth_model("llama-tiny-alora.gguf")).unwrap();
    assert_eq!(alora.alora_invocation_tokens(), [Token(106), Token(2364)]);

    // Another model's context, another architecture: each refused by name.
    let mut other = common::context();
    assert!(matches!(other.set_lora_adapters(&[(&adapter, 1.0)]), Err(LoraError::WrongModel)));
    let err = LoraAdapter::load(model(), synth_model("llama-tiny-lora.gguf")).unwrap_err();
    assert!(matches!(&err, LoraError::Load { messages, .. } if messages.to_string().contains("arch")), "{err}");
}

/// llama.cpp aborts creating a mean-pooled context whose micro-batch is not a multiple of its
/// sequences (see `ContextParams`): refused by name instead, on the synthetic encoder (CLS in
/// its file, so its own pooling is let through) and on the default model (a decoder).
#[test]
fn an_averaging_embeddings_context_llama_cpp_would_abort_on_is_refused() {
    let bert = Model::load(synth_model("bert-tiny.gguf"), &ModelParams::default()).unwrap();
    let params = |pooling, n_seq_max| {
        ContextParams::default()
            .n_ctx(513)
            .n_batch(512)
            .n_ubatch(512)
            .n_seq_max(n_seq_max)
            .unified_kv(true)
            .embeddings(true)
            .pooling(pooling)
            .n_threads(1)
            .n_threads_batch(1)
    };
    let err = Context::new(&bert, &params(Pooling::Mean, 5)).unwrap_err();
    assert!(matches!(err, ContextError::InvalidParam { name: "n_seq_max", .. }), "{err}");
    Context::new(&bert, &params(Pooling::Mean, 4)).unwrap();
    Context::new(&bert, &params(Pooling::Unspecified, 5)).unwrap();
    let gemma = model();
    let err = Context::new(gemma, &params(Pooling::Mean, 33)).unwrap_err();
    assert!(matches!(err, ContextError::InvalidParam { name: "n_seq_max", .. }), "{err}");
    Context::new(gemma, &params(Pooling::Mean, 32)).unwrap();
}
