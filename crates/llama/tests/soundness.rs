//! Issue 12's defects, one test each: every case used to abort the process, read out of bounds,
//! or do silently the wrong thing, and now returns a typed error (or the right result).

mod common;

use common::{context, model, model_path, small_params, temp_path};
use llama::*;

/// A grammar that accepts exactly "yes" or "no".
const YES_NO: &str = r#"root ::= "yes" | "no""#;

fn decoded(prompt: &str) -> (Context<'static>, i32) {
    let mut ctx = context();
    let tokens = model().vocab().tokenize(prompt, TokenizeOptions::default()).unwrap();
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    ctx.decode(&batch).unwrap();
    (ctx, batch.len() as i32 - 1)
}

#[test]
fn accepting_a_token_outside_the_vocabulary_into_a_grammar_is_an_error_not_an_abort() {
    // Used to throw std::out_of_range through extern "C": "Rust cannot catch foreign exceptions".
    let mut sampler = SamplerChain::new().grammar(YES_NO, "root").greedy().build(model()).unwrap();
    for bad in [Token(-1), Token(model().vocab().n_tokens()), Token(i32::MAX)] {
        let err = sampler.accept(bad).unwrap_err();
        assert!(matches!(err, SamplerError::TokenOutOfRange { token, .. } if token == bad), "{err}");
    }
}

#[test]
fn accepting_a_token_the_grammar_cannot_take_is_refused() {
    // A token the grammar cannot take made llama.cpp throw ("Unexpected empty grammar stack")
    // and left the grammar broken, so that the next sample aborted (GGML_ASSERT); an
    // end-of-generation token before the grammar is complete aborted at once (GGML_ABORT).
    let mut sampler = SamplerChain::new().grammar(YES_NO, "root").greedy().build(model()).unwrap();
    let x = model().vocab().tokenize("x", TokenizeOptions { add_special: false, parse_special: false }).unwrap()[0];
    for token in [x, model().vocab().eos(), model().vocab().eot()] {
        let err = sampler.accept(token).unwrap_err();
        assert!(matches!(err, SamplerError::GrammarRejects { token: t } if t == token), "{err}");
    }
    // The chain still works afterwards.
    let (ctx, last) = decoded("Answer yes or no: is water wet?");
    let token = sampler.sample(&ctx, last).unwrap();
    let piece = String::from_utf8(model().vocab().piece(token, SpecialTokens::Omit).unwrap()).unwrap();
    assert!("yes".starts_with(piece.trim()) || "no".starts_with(piece.trim()), "{piece:?}");
}

#[test]
fn a_grammar_that_fits_none_of_the_top_k_is_an_error_on_both_sampling_paths() {
    // The grammar rules out all 40 candidates; the selector still picked one, whose accept then
    // threw "Unexpected empty grammar stack".
    let grammar = r#"root ::= "zzqx""#;
    let (ctx, last) = decoded("The capital of France is");
    let mut preselected = SamplerChain::new().top_k(40).grammar(grammar, "root").greedy().build(model()).unwrap();
    assert_eq!(preselected.preselected(), Some(40));
    let err = preselected.sample(&ctx, last).unwrap_err();
    assert!(matches!(err, SamplerError::AllRuledOut { candidates: 40 }), "{err}");
    let mut full = SamplerChain::new().top_k(40).grammar(grammar, "root").greedy().preselect(false).build(model()).unwrap();
    let err = full.sample(&ctx, last).unwrap_err();
    assert!(matches!(&err, SamplerError::Exception(e) if e.function == "llama_sampler_sample" && e.what.contains("grammar")), "{err}");
    // llama.cpp's grammar is broken now (its next apply would abort): refused until reset.
    assert!(matches!(full.sample(&ctx, last).unwrap_err(), SamplerError::Poisoned));
    assert!(matches!(full.accept(Token(0)).unwrap_err(), SamplerError::Poisoned));
    full.reset().unwrap();
    assert!(matches!(full.sample(&ctx, last).unwrap_err(), SamplerError::Exception(_)), "usable again, and still no token fits");
}

#[test]
fn a_broken_grammar_is_a_typed_error() {
    for grammar in [r#"root ::= "unterminated"#, "root ::= [", "root ::= missing-rule", "root ::= root"] {
        let err = SamplerChain::new().grammar(grammar, "root").greedy().build(model()).unwrap_err();
        assert!(matches!(err, SamplerError::Grammar { .. }), "{grammar:?}: {err}");
    }
}

#[test]
fn an_encoder_batch_larger_than_n_ubatch_is_refused_before_llama_cpp_asserts() {
    let params = small_params().n_batch(64).n_ubatch(16);
    let mut ctx = Context::new(model(), &params).unwrap();
    assert_eq!(ctx.n_ubatch(), 16);
    let tokens: Vec<Token> = (0..32).map(|i| Token(1000 + i)).collect();
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let err = ctx.encode(&batch).unwrap_err();
    assert!(matches!(err, DecodeError::ExceedsUbatch { n_tokens: 32, n_ubatch: 16, .. }), "{err}");
    // A causal decoder splits the same batch into micro-batches itself.
    assert!(model().is_causal());
    ctx.decode(&batch).unwrap();
}

#[test]
fn penalties_over_the_whole_context_penalise() {
    // The whole context (llama.cpp's last_n = -1) once reached llama.cpp as -1, which it clamps
    // to 0: the stage did nothing.
    let generate = |window: PenaltyWindow| {
        let (mut ctx, mut last) = decoded("one two one two one two one two");
        let mut sampler = SamplerChain::new().penalties(Penalties::default().window(window).repeat(3.0)).greedy().build(model()).unwrap();
        let first = ctx.max_position(0).unwrap().unwrap() + 1;
        let mut out = Vec::new();
        for pos in first..first + 24 {
            let token = sampler.sample(&ctx, last).unwrap();
            out.push(token);
            let batch = Batch::from_tokens(&[token], pos, 0).unwrap();
            ctx.decode(&batch).unwrap();
            last = 0;
        }
        out
    };
    let off = generate(PenaltyWindow::Off);
    let whole = generate(PenaltyWindow::WholeContext);
    let window = generate(PenaltyWindow::Last(64));
    assert_ne!(whole, off, "the whole context must penalise");
    assert_eq!(whole, window, "within 64 tokens, the whole context and a 64-token window agree");
}

#[test]
fn shifting_positions_is_checked_against_what_the_memory_can_do() {
    // Gemma 3's attention cache can shift (the refusal needs an M-RoPE or recurrent model, which
    // llama_memory_can_shift reports; issue 14's synthetic models will cover it).
    let (mut ctx, _) = decoded("a b c d");
    let last = ctx.max_position(0).unwrap().unwrap();
    assert!(ctx.can_shift());
    ctx.shift_range(0, 0, -1, 2).unwrap();
    assert_eq!(ctx.max_position(0).unwrap(), Some(last + 2));
}

#[test]
fn quantizing_a_file_onto_itself_is_refused() {
    let copy = temp_path("self-quantize.gguf");
    std::fs::copy(model_path(), &copy).unwrap();
    let size = std::fs::metadata(&copy).unwrap().len();
    let link = temp_path("self-quantize-link.gguf");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    let dotted = copy.parent().unwrap().join(".").join(copy.file_name().unwrap());
    for output in [&copy, &link, &dotted] {
        let err = quantize(&copy, output, &QuantizeOptions::new(QuantType::Q8_0).threads(1).requantize(Requantize::Allow)).unwrap_err();
        assert!(matches!(err, QuantizeError::SameFile { .. }), "{}: {err}", output.display());
    }
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), size, "the input is untouched");
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(&copy).unwrap();
}

#[test]
fn a_state_with_trailing_bytes_is_refused() {
    let (mut ctx, _) = decoded("state");
    let mut state = ctx.save_state().unwrap();
    assert!(!state.is_empty());
    ctx.load_state(&state).unwrap();
    state.extend_from_slice(b"junk");
    let err = ctx.load_state(&state).unwrap_err();
    assert!(matches!(err, StateError::TrailingBytes { read, len } if len == read + 4), "{err}");
    let err = ctx.save_sequence_state(7).unwrap_err();
    assert!(matches!(err, StateError::InvalidSeqId { seq_id: 7, .. }), "{err}");
}

#[test]
fn a_header_string_length_is_capped_before_allocating() {
    // A key that claims 4 MiB inside a 6 MiB file: within the file, so only the cap stops the
    // check from allocating what a corrupt header says.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend((4u64 << 20).to_le_bytes());
    bytes.resize(6 << 20, b'a');
    let path = temp_path("long-key.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = Model::load(&path, &ModelParams::default()).unwrap_err();
    assert!(matches!(&err.kind, LoadErrorKind::CorruptHeader { detail } if detail.contains("length")), "{err}");
}

#[test]
fn batch_positions_that_would_overflow_are_refused() {
    let mut batch = Batch::new(8, 1).unwrap();
    let tokens = [Token(1); 4];
    let err = batch.add_sequence(&tokens, i32::MAX - 1, 0, Output::Compute).unwrap_err();
    assert_eq!(err, BatchError::PositionOverflow { start: i32::MAX - 1, len: 4 });
    assert!(batch.is_empty(), "nothing was written");
    batch.add_sequence(&tokens, i32::MAX - 3, 0, Output::Compute).unwrap();
}
