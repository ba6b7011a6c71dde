//! Bad input gets a typed error that names the cause: never a panic, abort or crash.

mod common;

use std::io::Write;

use common::{context, model, model_path, small_params, temp_path};
use llama::*;

fn load(path: &std::path::Path) -> Result<Model, LoadError> {
    Model::load(path, &ModelParams::default())
}

#[test]
fn a_missing_file_is_not_found() {
    let err = load(std::path::Path::new("/no/such/model.gguf")).unwrap_err();
    assert!(matches!(err.kind, LoadErrorKind::NotFound), "{err}");
    assert_eq!(err.path, std::path::Path::new("/no/such/model.gguf"));
    assert!(err.to_string().contains("/no/such/model.gguf"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_says_so() {
    let path = temp_path("not-gguf.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip file, not a model").unwrap();
    let err = load(&path).unwrap_err();
    assert!(matches!(&err.kind, LoadErrorKind::NotGguf { magic } if magic == b"PK\x03\x04"), "{err}");
    let empty = temp_path("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(load(&empty).unwrap_err().kind, LoadErrorKind::NotGguf { .. }));
}

#[test]
fn a_truncated_model_reports_expected_and_actual_size() {
    let full = std::fs::read(model_path()).unwrap();
    let path = temp_path("truncated.gguf");
    let keep = full.len() - 1_000_000;
    std::fs::write(&path, &full[..keep]).unwrap();
    match load(&path).unwrap_err() {
        LoadError { kind: LoadErrorKind::Truncated { expected, actual }, .. } => {
            assert_eq!(actual, keep as u64);
            assert_eq!(expected, full.len() as u64, "the header's tensors end exactly at the real file's end");
        }
        other => panic!("expected Truncated, got {other}"),
    }
    // Cut inside the header (the vocabulary is stored there).
    std::fs::write(&path, &full[..100_000]).unwrap();
    assert!(matches!(load(&path).unwrap_err().kind, LoadErrorKind::TruncatedHeader { .. }));
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut h = b"GGUF".to_vec();
    h.extend(version.to_le_bytes());
    h.extend(n_tensors.to_le_bytes());
    h.extend(n_kv.to_le_bytes());
    h
}

#[test]
fn absurd_counts_and_versions_are_corrupt_or_unsupported() {
    let path = temp_path("absurd.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&header(3, u64::MAX / 2, 1 << 40)).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
    drop(f);
    let err = load(&path).unwrap_err();
    assert!(matches!(err.kind, LoadErrorKind::CorruptHeader { .. }), "{err}");
    assert!(err.to_string().contains("more than"), "{err}");

    std::fs::write(&path, header(7, 0, 0)).unwrap();
    assert!(matches!(load(&path).unwrap_err().kind, LoadErrorKind::UnsupportedVersion { version: 7 }));

    // A key of unknown value type.
    let mut h = header(3, 0, 1);
    h.extend(3u64.to_le_bytes());
    h.extend(b"key");
    h.extend(99u32.to_le_bytes());
    std::fs::write(&path, h).unwrap();
    let err = load(&path).unwrap_err();
    assert!(err.to_string().contains("unknown value type 99"), "{err}");
}

/// A convolution kernel stored as F16: llama.cpp loads it and ggml aborts on the first decode;
/// the header check refuses it first.
#[test]
fn a_recurrent_convolution_kernel_that_is_not_f32_is_refused_at_load() {
    let path = temp_path("f16-conv.gguf");
    let mut h = header(3, 1, 0);
    let name = b"blk.0.shortconv.conv.weight";
    h.extend((name.len() as u64).to_le_bytes());
    h.extend(name);
    h.extend(2u32.to_le_bytes()); // two dimensions
    h.extend(3u64.to_le_bytes());
    h.extend(64u64.to_le_bytes());
    h.extend(1u32.to_le_bytes()); // GGML_TYPE_F16
    h.extend(0u64.to_le_bytes()); // offset
    h.resize(h.len().div_ceil(32) * 32 + 3 * 64 * 2, 0);
    std::fs::write(&path, h).unwrap();
    let err = load(&path).unwrap_err();
    assert!(matches!(err.kind, LoadErrorKind::CorruptHeader { .. }), "{err}");
    assert!(err.to_string().contains("shortconv.conv.weight") && err.to_string().contains("F32"), "{err}");
}

#[test]
fn a_vocab_only_model_tokenizes_but_cannot_decode() {
    let vocab_only = Model::load(model_path(), &ModelParams::default().vocab_only(true)).unwrap();
    let tokens = vocab_only.vocab().tokenize("hello world", TokenizeOptions::default()).unwrap();
    assert!(tokens.len() >= 2);
    let err = Context::new(&vocab_only, &small_params()).unwrap_err();
    assert!(matches!(err, ContextError::VocabOnly), "{err}");
}

#[test]
fn zero_threads_and_bad_sizes_are_invalid_parameters() {
    for (params, name) in [
        (small_params().n_threads(0), "n_threads"),
        (small_params().n_threads_batch(-1), "n_threads_batch"),
        (small_params().n_batch(0), "n_batch"),
        (small_params().n_ubatch(128).n_batch(64), "n_ubatch"),
        (small_params().n_seq_max(0), "n_seq_max"),
    ] {
        match Context::new(model(), &params).unwrap_err() {
            ContextError::InvalidParam { name: got, .. } => assert_eq!(got, name),
            other => panic!("{name}: {other}"),
        }
    }
    let mut ctx = context();
    assert!(matches!(ctx.set_threads(0, 2), Err(ContextError::InvalidParam { name: "n_threads", .. })));
}

#[test]
fn decode_checks_batch_size_positions_sequences_and_tokens() {
    let mut ctx = context();
    let n_ctx = ctx.n_ctx() as i32;

    let mut big = Batch::new(65, 1).unwrap();
    big.add_sequence(&vec![Token(2); 65], 0, 0, Output::Compute).unwrap();
    assert!(matches!(ctx.decode(&big), Err(DecodeError::BatchTooLarge { n_tokens: 65, n_batch: 64 })));

    let mut past = Batch::new(1, 1).unwrap();
    past.add_output(Token(2), n_ctx, 0).unwrap();
    assert!(matches!(ctx.decode(&past), Err(DecodeError::PositionOutOfRange { pos, .. }) if pos == n_ctx));

    let mut seq = Batch::new(1, 1).unwrap();
    seq.add(Token(2), 0, &[3], Output::Compute).unwrap();
    assert!(matches!(ctx.decode(&seq), Err(DecodeError::SeqIdOutOfRange { seq_id: 3, n_seq_max: 1, .. })));

    let mut tok = Batch::new(1, 1).unwrap();
    tok.add_output(Token(i32::MAX), 0, 0).unwrap();
    assert!(matches!(ctx.decode(&tok), Err(DecodeError::TokenOutOfRange { .. })));

    assert!(matches!(ctx.decode(&Batch::new(1, 1).unwrap()), Err(DecodeError::EmptyBatch)));
    assert!(matches!(ctx.last_logits(), Err(OutputError::NoOutputs)));
}

#[test]
fn outputs_that_were_not_requested_cannot_be_read_or_sampled() {
    let mut ctx = context();
    let tokens = model().vocab().tokenize("one two three", TokenizeOptions::default()).unwrap();
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    ctx.decode(&batch).unwrap();
    assert!(matches!(ctx.logits(0), Err(OutputError::NotAnOutput { index: 0, .. })));
    assert!(matches!(ctx.embeddings(0), Err(OutputError::EmbeddingsDisabled)));
    let mut sampler = SamplerChain::new().greedy().build(model()).unwrap();
    assert!(matches!(sampler.sample(&ctx, 0), Err(SamplerError::Output(OutputError::NotAnOutput { index: 0, .. }))));
    assert!(sampler.sample_last(&ctx).is_ok());
}

#[test]
fn a_grammar_that_does_not_parse_is_a_grammar_error() {
    let err = SamplerChain::new().grammar("root ::= (\"unclosed\"", "root").greedy().build(model()).unwrap_err();
    match err {
        SamplerError::Grammar { messages } => assert!(!messages.0.is_empty(), "llama.cpp's reason was not captured"),
        other => panic!("expected a grammar error, got {other}"),
    }
    let err = SamplerChain::new().grammar("root ::= \"a\"", "missing_root").greedy().build(model()).unwrap_err();
    assert!(matches!(err, SamplerError::Grammar { .. }), "{err}");
}

#[test]
fn a_chain_that_picks_no_token_is_refused_before_llama_cpp_would_abort() {
    for (chain, last) in [
        (SamplerChain::new(), None),
        (SamplerChain::new().top_k(40).temp(0.8), Some("temperature")),
        (SamplerChain::new().dist(1).top_k(5), Some("top-k")),
    ] {
        match chain.build(model()) {
            Err(SamplerError::NoSelector { last: got }) => assert_eq!(got, last),
            other => panic!("{last:?}: {other:?}"),
        }
    }
}

#[test]
fn bad_sampling_values_name_the_parameter() {
    for (chain, name) in [
        (SamplerChain::new().temp(-1.0), "t"),
        (SamplerChain::new().top_p(1.5, 1), "p"),
        (SamplerChain::new().min_p(f32::NAN, 1), "p"),
        (SamplerChain::new().penalties(Penalties::default().repeat(0.0)), "repeat"),
        (SamplerChain::new().mirostat_v2(1, -5.0, 0.1), "tau"),
        (SamplerChain::new().logit_bias(&[(Token(-4), 1.0)]), "token"),
    ] {
        match chain.greedy().build(model()).unwrap_err() {
            SamplerError::InvalidParam { name: got, .. } => assert_eq!(got, name),
            other => panic!("{name}: {other}"),
        }
    }
}

#[test]
fn invalid_tokens_and_sequences_are_refused() {
    let vocab = model().vocab();
    assert!(matches!(vocab.piece(Token(-1), SpecialTokens::Omit), Err(TokenizeError::InvalidToken { .. })));
    assert!(matches!(vocab.detokenize(&[Token(1), Token(vocab.n_tokens())], DetokenizeOptions::default()), Err(TokenizeError::InvalidToken { .. })));
    let mut ctx = context();
    assert!(matches!(ctx.remove_range(5, 0, -1), Err(ContextError::InvalidParam { name: "seq_id", .. })));
    assert!(ctx.remove_range(-1, 0, -1).is_ok());
    assert!(matches!(ctx.load_state(b"garbage"), Err(StateError::Restore { .. })));
}

#[test]
fn an_unknown_chat_template_is_an_error() {
    let msgs = [ChatMessage::new("user", "hi")];
    assert!(matches!(apply_template("no-such-template", &msgs, ChatEnding::AssistantTurn), Err(ChatError::UnknownTemplate(_))));
}

#[test]
fn a_missing_or_foreign_lora_adapter_is_an_error() {
    assert!(matches!(LoraAdapter::load(model(), "/no/adapter.gguf"), Err(LoraError::NotFound(_))));
    // The base model is GGUF but not an adapter.
    assert!(matches!(LoraAdapter::load(model(), model_path()), Err(LoraError::Load { .. })));
}

#[test]
fn lazy_constraints_with_bad_triggers_or_prefills_are_typed_errors() {
    let digits = r#"root ::= [0-9]"#;
    // No trigger at all: the grammar could never apply.
    let none = SamplerChain::new().constrain_lazy(digits, "root", GrammarTriggers::default()).greedy().build(model());
    assert!(matches!(none, Err(SamplerError::InvalidParam { name: "triggers", .. })), "{none:?}");
    // A trigger token outside the vocabulary.
    let outside = GrammarTriggers { patterns: vec![], tokens: vec![Token(i32::MAX)] };
    let err = SamplerChain::new().constrain_lazy(digits, "root", outside).greedy().build(model());
    assert!(matches!(err, Err(SamplerError::InvalidParam { name: "trigger token", .. })), "{err:?}");
    // A pattern std::regex cannot compile: llama.cpp throws, and that is an error, not an abort.
    let broken = GrammarTriggers { patterns: vec!["([unclosed".into()], tokens: vec![] };
    let err = SamplerChain::new().constrain_lazy(digits, "root", broken).greedy().build(model());
    assert!(matches!(err, Err(SamplerError::Grammar { .. })), "{err:?}");
    // A prefill the grammar cannot read, and one outside the vocabulary.
    let letters = model().vocab().tokenize("abc", TokenizeOptions { add_special: false, parse_special: false }).unwrap();
    let err = SamplerChain::new().constrain(digits, "root").prefill_constraint(&letters).greedy().build(model());
    assert!(matches!(err, Err(SamplerError::Grammar { .. })), "{err:?}");
    let err = SamplerChain::new().constrain(digits, "root").prefill_constraint(&[Token(-1)]).greedy().build(model());
    assert!(matches!(err, Err(SamplerError::InvalidParam { name: "prefill", .. })), "{err:?}");
}
