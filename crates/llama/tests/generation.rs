//! The wrapper end to end on the real default model.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common::{context, model, model_path, small_params, temp_path};
use llama::*;

/// Greedy continuation of `prompt` for `n` tokens; returns the token ids.
fn greedy(ctx: &mut Context<'_>, prompt: &str, n: usize) -> Vec<Token> {
    let vocab = ctx.model().vocab();
    let tokens = vocab.tokenize(prompt, TokenizeOptions::default()).unwrap();
    let mut sampler = SamplerChain::new().greedy().build(ctx.model()).unwrap();
    let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let mut out = Vec::new();
    for pos in (tokens.len() as i32..).take(n) {
        ctx.decode(&batch).unwrap();
        let t = sampler.sample_last(ctx).unwrap();
        out.push(t);
        batch.clear();
        batch.add_output(t, pos, 0).unwrap();
    }
    out
}

#[test]
fn metadata_describes_the_default_model() {
    let m = model();
    assert_eq!(m.architecture().as_deref(), Some("gemma3"));
    assert!(m.n_params() > 200_000_000 && m.n_params() < 400_000_000, "{}", m.n_params());
    assert!(m.size() > 100_000_000);
    assert!(m.n_ctx_train() >= 8192);
    assert_eq!(m.n_embd(), 640);
    assert_eq!(m.n_layer(), 18);
    assert!(m.description().contains("gemma3"), "{}", m.description());
    let meta = m.metadata();
    assert!(meta.iter().any(|(k, v)| k == "general.architecture" && v == "gemma3"));
    // This GGUF ships no chat template: callers fall back to a named one ("gemma").
    assert_eq!(m.chat_template(None), None);
    assert_eq!(m.vocab().n_tokens(), 262_144);
}

#[test]
fn load_progress_is_reported_and_can_cancel() {
    let mut seen = Vec::new();
    let m = Model::load_with_progress(model_path(), &ModelParams::default(), |p| {
        seen.push(p);
        true
    })
    .unwrap();
    drop(m);
    assert!(seen.last().is_some_and(|&p| p >= 1.0), "{seen:?}");
    let err = Model::load_with_progress(model_path(), &ModelParams::default(), |_| false).unwrap_err();
    assert!(matches!(err.kind, LoadErrorKind::Cancelled), "{err}");
}

#[test]
fn a_panic_in_the_progress_callback_is_raised_after_llama_cpp_returns() {
    let caught = std::panic::catch_unwind(|| {
        let _ = Model::load_with_progress(model_path(), &ModelParams::default(), |_| panic!("from the callback"));
    });
    let payload = caught.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"from the callback"));
}

#[test]
fn greedy_decoding_is_deterministic_and_sensible() {
    let a = greedy(&mut context(), "Monday, Tuesday, Wednesday,", 3);
    let b = greedy(&mut context(), "Monday, Tuesday, Wednesday,", 3);
    assert_eq!(a, b);
    let text = model().vocab().detokenize(&a, DetokenizeOptions::default()).unwrap();
    assert!(text.contains("Thursday"), "{text:?}");
}

#[test]
fn tokenize_detokenize_round_trips_multilingual_text() {
    let vocab = model().vocab();
    let text = "Hello, 世界! Ünïcödé 🦀 ok";
    let no_special = TokenizeOptions { add_special: false, parse_special: false };
    let tokens = vocab.tokenize(text, no_special).unwrap();
    assert_eq!(vocab.detokenize(&tokens, DetokenizeOptions::default()).unwrap(), text);
    let with_bos = vocab.tokenize(text, TokenizeOptions::default()).unwrap();
    assert_eq!(with_bos[0], vocab.bos());
    // The buffer is reused: tokenize_into replaces the contents.
    let mut buf = vec![Token(9); 100];
    vocab.tokenize_into("a", no_special, &mut buf).unwrap();
    assert_eq!(buf.len(), 1);
}

#[test]
fn streaming_pieces_through_the_utf8_decoder_never_breaks_characters() {
    let vocab = model().vocab();
    // Rare scripts have no token of their own and fall back to byte tokens, which is where a
    // character spans several tokens.
    let text = "日本語のテキスト 🦀🎉 émoji 𒀀𓂀𐍈 ꙮ";
    let tokens = vocab.tokenize(text, TokenizeOptions { add_special: false, parse_special: false }).unwrap();
    let mut decoder = Utf8Decoder::new();
    let mut out = String::new();
    let mut piece = Vec::new();
    let mut split_somewhere = false;
    for t in tokens {
        piece.clear();
        vocab.piece_into(t, SpecialTokens::Omit, &mut piece).unwrap();
        split_somewhere |= std::str::from_utf8(&piece).is_err();
        let before = out.len();
        decoder.push(&piece, &mut out);
        assert!(!out[before..].contains('\u{fffd}'), "a character was broken at token {t}");
    }
    decoder.finish(&mut out);
    assert_eq!(out, text);
    assert!(split_somewhere, "no token split a character, so the test proved nothing");
}

#[test]
fn special_tokens_and_end_of_generation() {
    let vocab = model().vocab();
    assert!(vocab.is_eog(vocab.eos()));
    let parsed = vocab.tokenize("<end_of_turn>", TokenizeOptions { add_special: false, parse_special: true }).unwrap();
    assert_eq!(parsed.len(), 1);
    assert!(vocab.is_eog(parsed[0]), "<end_of_turn> ends generation on Gemma");
    let literal = vocab.tokenize("<end_of_turn>", TokenizeOptions { add_special: false, parse_special: false }).unwrap();
    assert!(literal.len() > 1);
}

#[test]
fn chat_templates_format_messages() {
    let msgs = [ChatMessage::new("user", "Hi there")];
    assert!(matches!(model().apply_chat_template(&msgs, ChatEnding::AssistantTurn), Err(ChatError::NoTemplate)));
    let gemma = apply_template("gemma", &msgs, ChatEnding::AssistantTurn).unwrap();
    assert_eq!(gemma, "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n");
    let chatml = apply_template("chatml", &msgs, ChatEnding::AssistantTurn).unwrap();
    assert_eq!(chatml, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
    assert!(builtin_templates().iter().any(|t| t == "llama3"));
}

#[test]
fn logits_are_finite_and_vocabulary_wide() {
    let mut ctx = context();
    let tokens = model().vocab().tokenize("Hello", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    let logits = ctx.last_logits().unwrap();
    assert_eq!(logits.len(), 262_144);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(ctx.outputs(), &[tokens.len() as i32 - 1]);
}

#[test]
fn memory_operations_and_state_restore_reproduce_logits() {
    let mut ctx = context();
    let vocab = model().vocab();
    let tokens = vocab.tokenize("The quick brown fox", TokenizeOptions::default()).unwrap();
    let n = tokens.len() as i32;
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    assert_eq!(ctx.max_position(0).unwrap(), Some(n - 1));
    let state = ctx.save_state().unwrap();

    let next = Token(vocab.tokenize(" jumps", TokenizeOptions { add_special: false, parse_special: false }).unwrap()[0].0);
    let mut step = Batch::new(1, 1).unwrap();
    step.add_output(next, n, 0).unwrap();
    ctx.decode(&step).unwrap();
    let first = ctx.last_logits().unwrap().to_vec();

    // Drop the last position and decode it again: same logits.
    assert!(ctx.remove_range(0, n, -1).unwrap());
    assert_eq!(ctx.max_position(0).unwrap(), Some(n - 1));
    ctx.decode(&step).unwrap();
    assert_eq!(ctx.last_logits().unwrap(), &first[..]);

    // Clear everything, restore the saved state, decode again: same logits.
    ctx.clear_memory(MemoryData::Zero);
    assert_eq!(ctx.max_position(0).unwrap(), None);
    ctx.load_state(&state).unwrap();
    assert_eq!(ctx.max_position(0).unwrap(), Some(n - 1));
    ctx.decode(&step).unwrap();
    assert_eq!(ctx.last_logits().unwrap(), &first[..]);

    // The same through a file, with the tokens saved beside it.
    let path = temp_path("state.bin");
    ctx.remove_range(0, n, -1).unwrap();
    ctx.save_state_file(&path, &tokens).unwrap();
    ctx.clear_memory(MemoryData::Zero);
    assert_eq!(ctx.load_state_file(&path, 64).unwrap(), tokens);
    ctx.decode(&step).unwrap();
    assert_eq!(ctx.last_logits().unwrap(), &first[..]);
}

#[test]
fn sequences_can_be_copied_saved_and_restored() {
    let params = small_params().n_seq_max(2);
    let mut ctx = Context::new(model(), &params).unwrap();
    let tokens = model().vocab().tokenize("one two three", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    ctx.copy_range(0, 1, -1, -1).unwrap();
    assert_eq!(ctx.max_position(1).unwrap(), ctx.max_position(0).unwrap());
    let seq_state = ctx.save_sequence_state(1).unwrap();
    assert!(ctx.remove_range(1, -1, -1).unwrap());
    assert_eq!(ctx.max_position(1).unwrap(), None);
    ctx.load_sequence_state(&seq_state, 1).unwrap();
    assert_eq!(ctx.max_position(1).unwrap(), Some(tokens.len() as i32 - 1));
    ctx.shift_range(1, 0, -1, 10).unwrap();
    assert_eq!(ctx.max_position(1).unwrap(), Some(tokens.len() as i32 - 1 + 10));

    // Per-sequence state through a file, tokens included.
    let path = temp_path("seq-state.bin");
    ctx.save_sequence_state_file(0, &path, &tokens).unwrap();
    assert!(ctx.remove_range(1, -1, -1).unwrap());
    assert_eq!(ctx.load_sequence_state_file(1, &path, 64).unwrap(), tokens);
    assert_eq!(ctx.max_position(1).unwrap(), Some(tokens.len() as i32 - 1));
    assert!(ctx.load_sequence_state_file(1, std::path::Path::new("/no/state.bin"), 64).is_err());

    // A sequence decoded on its own is dropped by keep_only.
    ctx.clear_memory(MemoryData::Zero);
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens[..2], 0, 1).unwrap()).unwrap();
    assert_eq!(ctx.max_position(1).unwrap(), Some(1));
    ctx.keep_only(0).unwrap();
    assert_eq!(ctx.max_position(1).unwrap(), None);
    assert_eq!(ctx.max_position(0).unwrap(), Some(tokens.len() as i32 - 1));
}

#[test]
fn the_abort_flag_cancels_a_decode() {
    let mut ctx = context();
    let flag = Arc::new(AtomicBool::new(true));
    ctx.set_abort_flag(Some(flag.clone()));
    let tokens = model().vocab().tokenize("a b c d e f g", TokenizeOptions::default()).unwrap();
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    assert!(matches!(ctx.decode(&batch), Err(DecodeError::Aborted)));
    flag.store(false, std::sync::atomic::Ordering::Relaxed);
    ctx.clear_memory(MemoryData::Zero);
    ctx.decode(&batch).unwrap();
    ctx.set_abort_flag(None);
}

#[test]
fn an_abort_from_another_thread_stops_a_running_decode() {
    let params = ContextParams::default().n_ctx(1024).n_batch(1024).n_ubatch(1024).n_threads(2).n_threads_batch(2);
    let mut ctx = Context::new(model(), &params).unwrap();
    let tokens = model().vocab().tokenize(&"The quick brown fox jumps over the lazy dog. ".repeat(90), TokenizeOptions::default()).unwrap();
    assert!(tokens.len() > 900, "{}", tokens.len());
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    // How long the whole decode takes here, to know that the abort cut it short.
    let started = std::time::Instant::now();
    ctx.decode(&batch).unwrap();
    let full = started.elapsed();
    ctx.clear_memory(MemoryData::Zero);

    let flag = Arc::new(AtomicBool::new(false));
    ctx.set_abort_flag(Some(flag.clone()));
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(full / 10);
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let started = std::time::Instant::now();
    let result = ctx.decode(&batch);
    let took = started.elapsed();
    setter.join().unwrap();
    assert!(matches!(result, Err(DecodeError::Aborted)), "{result:?}");
    assert!(took < full * 3 / 4, "aborted after {took:?} of a {full:?} decode");
    // The context is usable again once the flag is down and its memory cleared.
    flag.store(false, std::sync::atomic::Ordering::Relaxed);
    ctx.clear_memory(MemoryData::Zero);
    ctx.decode(&Batch::from_tokens(&tokens[..8], 0, 0).unwrap()).unwrap();
    assert!(ctx.logits(7).unwrap().iter().all(|x| x.is_finite()));
}

#[test]
fn seeded_sampling_chains_are_reproducible_and_constrained() {
    let run = |seed| {
        let mut ctx = context();
        let vocab = model().vocab();
        let tokens = vocab.tokenize("Once upon a time", TokenizeOptions::default()).unwrap();
        let mut sampler = SamplerChain::new()
            .penalties(Penalties::default().window(PenaltyWindow::Last(64)).repeat(1.1))
            .dry(Dry::default().multiplier(0.8).base(1.75).allowed_length(2).window(PenaltyWindow::Last(64)).breakers(["\n"]))
            .top_k(40)
            .typical(1.0, 1)
            .top_p(0.95, 1)
            .min_p(0.05, 1)
            .xtc(0.0, 0.1, 1, seed)
            .temp(0.8)
            .dist(seed)
            .build(model())
            .unwrap();
        assert_eq!(sampler.len(), 9);
        let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
        let mut out = Vec::new();
        for i in 0..12 {
            ctx.decode(&batch).unwrap();
            let t = sampler.sample_last(&ctx).unwrap();
            out.push(t);
            batch.clear();
            batch.add_output(t, tokens.len() as i32 + i, 0).unwrap();
        }
        out
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8), "different seeds gave the same 12 tokens");
}

#[test]
fn preselected_candidates_sample_the_same_tokens_as_llama_cpps_full_array() {
    type ChainFor = fn(u32) -> SamplerChain;
    let chains: [(&str, ChainFor); 4] = [
        ("common", |seed| SamplerChain::new().top_k(40).top_p(0.95, 1).min_p(0.05, 1).temp(0.8).dist(seed)),
        ("hot", |seed| SamplerChain::new().top_k(200).temp(1.5).dist(seed)),
        ("top-k then typical", |seed| SamplerChain::new().top_k(64).typical(0.9, 1).temp(1.0).dist(seed)),
        ("greedy", |_| SamplerChain::new().greedy()),
    ];
    let mut ctx = context();
    let vocab = model().vocab();
    for (name, chain) in chains {
        for (seed, prompt) in [(1, "Once upon a time"), (2, "The recipe calls for"), (3, "def fibonacci(n):")] {
            let mut fast = chain(seed).build(model()).unwrap();
            let mut full = chain(seed).preselect(false).build(model()).unwrap();
            assert!(fast.preselected().is_some() && full.preselected().is_none(), "{name}");
            ctx.clear_memory(MemoryData::Zero);
            let tokens = vocab.tokenize(prompt, TokenizeOptions::default()).unwrap();
            let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
            let mut distinct = std::collections::HashSet::new();
            for pos in (tokens.len() as i32..).take(48) {
                ctx.decode(&batch).unwrap();
                let last = batch.len() as i32 - 1;
                let (a, b) = (fast.sample(&ctx, last).unwrap(), full.sample(&ctx, last).unwrap());
                assert_eq!(a, b, "{name}, seed {seed}, position {pos}");
                distinct.insert(a);
                batch.clear();
                batch.add_output(a, pos, 0).unwrap();
            }
            assert!(distinct.len() > 8, "{name}: only {} distinct tokens: the comparison saw too little", distinct.len());
        }
    }
}

/// `sample_listing` draws the tokens `sample` draws (same chain, same seed, every step, with and
/// without preselection) and lists what the chain left: probabilities after its cuts and
/// temperature, summing to 1 over all it left (so at most 1 over the listed ones), likeliest
/// first, none 0, the drawn token's among them when it is likely enough; a top-k of 5 leaves at
/// most 5, a greedy chain one, certain.
#[test]
fn a_listing_sample_draws_the_same_tokens_and_lists_what_the_chain_left() {
    type ChainFor = fn(u32) -> SamplerChain;
    let chains: [(&str, ChainFor, usize); 4] = [
        ("common", |seed| SamplerChain::new().top_k(40).top_p(0.95, 1).min_p(0.05, 1).temp(1.0).dist(seed), 40),
        ("whole row", |seed| SamplerChain::new().top_k(40).top_p(0.95, 1).temp(1.0).dist(seed).preselect(false), 40),
        ("top 5", |seed| SamplerChain::new().top_k(5).temp(2.0).dist(seed), 5),
        ("greedy", |_| SamplerChain::new().greedy(), 1),
    ];
    let mut ctx = context();
    let vocab = model().vocab();
    for (name, chain, most) in chains {
        let (mut plain, mut listing) = (chain(5).build(model()).unwrap(), chain(5).build(model()).unwrap());
        ctx.clear_memory(MemoryData::Zero);
        let tokens = vocab.tokenize("Today was the day. Today I would finally become a", TokenizeOptions::default()).unwrap();
        let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
        for pos in (tokens.len() as i32..).take(16) {
            ctx.decode(&batch).unwrap();
            let last = batch.len() as i32 - 1;
            let listed = listing.sample_listing(&ctx, last, 10).unwrap();
            assert_eq!(listed.token, plain.sample(&ctx, last).unwrap(), "{name} at {pos}");
            let ps: Vec<f32> = listed.top.iter().map(|&(_, p)| p).collect();
            assert!(!ps.is_empty() && ps.len() <= 10.min(most), "{name} at {pos}: {ps:?}");
            assert!(ps.windows(2).all(|w| w[0] >= w[1]) && ps.iter().all(|&p| p > 0.0 && p <= 1.0), "{name} at {pos}: {ps:?}");
            let sum: f32 = ps.iter().sum();
            assert!(sum <= 1.0 + 1e-4, "{name} at {pos}: {sum}");
            assert!(listed.p > 0.0 && listed.p <= 1.0, "{name} at {pos}: the drawn token's probability {}", listed.p);
            if listed.p >= ps[ps.len() - 1] {
                assert!(listed.top.iter().any(|&(t, p)| t == listed.token && p == listed.p), "{name} at {pos}: {listed:?}");
            }
            if most == 1 {
                assert_eq!(listed.top, vec![(listed.token, 1.0)], "{name}");
            }
            batch.clear();
            batch.add_output(listed.token, pos, 0).unwrap();
        }
    }
}

#[test]
fn a_preselected_chain_draws_from_the_top_k() {
    let mut ctx = context();
    let tokens = model().vocab().tokenize("The best thing about summer is", TokenizeOptions::default()).unwrap();
    let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let mut sampler = SamplerChain::new().top_k(5).temp(2.0).dist(11).build(model()).unwrap();
    assert_eq!(sampler.preselected(), Some(5));
    for pos in (tokens.len() as i32..).take(6) {
        ctx.decode(&batch).unwrap();
        let last = batch.len() as i32 - 1;
        let logits = ctx.logits(last).unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let t = sampler.sample(&ctx, last).unwrap();
        assert!(order[..5].contains(&(t.0 as usize)), "token {t:?} is not among the 5 most likely at {pos}");
        batch.clear();
        batch.add_output(t, pos, 0).unwrap();
    }
}

#[test]
fn a_grammar_constrains_the_output() {
    let mut sampler = SamplerChain::new().grammar("root ::= \" yes\" | \" no\"", "root").greedy().build(model()).unwrap();
    let text = model().vocab().detokenize(&generate_with(&mut sampler, "Is the sky green? Answer:", 4), DetokenizeOptions::default()).unwrap();
    assert!(text == " yes" || text == " no", "{text:?}");
}

/// Generates up to `n` tokens greedily-or-not with `sampler`, stopping at end of generation.
fn generate_with(sampler: &mut Sampler<'_>, prompt: &str, n: usize) -> Vec<Token> {
    let mut ctx = context();
    let vocab = model().vocab();
    let tokens = vocab.tokenize(prompt, TokenizeOptions::default()).unwrap();
    let mut batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    let mut out = Vec::new();
    for pos in (tokens.len() as i32..).take(n) {
        ctx.decode(&batch).unwrap();
        let t = sampler.sample_last(&ctx).unwrap();
        if vocab.is_eog(t) {
            break;
        }
        out.push(t);
        batch.clear();
        batch.add_output(t, pos, 0).unwrap();
    }
    out
}

/// Three digits, then "!": the model would rather write words after [`POEM`].
const DIGITS: &str = r#"root ::= [0-9] [0-9] [0-9] "!""#;
const POEM: &str = "Write a short poem about the sea:";

fn is_digits(text: &str, n: usize) -> bool {
    text.len() == n + 1 && text[..n].bytes().all(|c| c.is_ascii_digit()) && text.ends_with('!')
}

#[test]
fn a_constraint_picks_what_a_grammar_stage_picks() {
    let vocab = model().vocab();
    let mut staged = SamplerChain::new().grammar(DIGITS, "root").greedy().build(model()).unwrap();
    let mut constrained = SamplerChain::new().constrain(DIGITS, "root").greedy().build(model()).unwrap();
    assert_eq!(constrained.preselected(), Some(1), "the constraint keeps the chain's preselection");
    let a = generate_with(&mut staged, POEM, 8);
    let b = generate_with(&mut constrained, POEM, 8);
    assert_eq!(a, b, "a greedy chain must choose the same tokens either way");
    let text = vocab.detokenize(&b, DetokenizeOptions::default()).unwrap();
    assert!(is_digits(&text, 3), "{text:?}");
}

#[test]
fn a_constraint_reaches_past_the_top_k_and_starts_over_on_reset() {
    let vocab = model().vocab();
    let one_digit = r#"root ::= [0-9] "!""#;
    // A grammar stage after top-k sees only the k best and finds no digit among them; the
    // constraint falls back to the whole vocabulary.
    let mut cut = SamplerChain::new().top_k(2).grammar(one_digit, "root").temp(0.5).dist(3).build(model()).unwrap();
    let mut ctx = context();
    let tokens = vocab.tokenize(POEM, TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    assert!(matches!(cut.sample_last(&ctx), Err(SamplerError::AllRuledOut { .. })));
    let mut constrained = SamplerChain::new().constrain(one_digit, "root").top_k(2).temp(0.5).dist(3).build(model()).unwrap();
    let text = vocab.detokenize(&generate_with(&mut constrained, POEM, 4), DetokenizeOptions::default()).unwrap();
    assert!(is_digits(&text, 1), "{text:?}");
    // Reset starts the grammar over; a token it cannot take is refused, not accepted.
    constrained.reset().unwrap();
    let bang = vocab.tokenize("!", TokenizeOptions { add_special: false, parse_special: false }).unwrap()[0];
    assert!(matches!(constrained.accept(bang), Err(SamplerError::GrammarRejects { .. })));
    let again = vocab.detokenize(&generate_with(&mut constrained, POEM, 4), DetokenizeOptions::default()).unwrap();
    assert!(is_digits(&again, 1), "{again:?}");
    // A broken constraint is refused when built.
    assert!(matches!(SamplerChain::new().constrain("root ::= (", "root").greedy().build(model()), Err(SamplerError::Grammar { .. })));
}

#[test]
fn a_logit_bias_forces_a_token_and_mirostat_samples() {
    let mut ctx = context();
    let vocab = model().vocab();
    let forced = vocab.tokenize(" banana", TokenizeOptions { add_special: false, parse_special: false }).unwrap()[0];
    let tokens = vocab.tokenize("My favourite colour is", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    let last = tokens.len() as i32 - 1;
    let mut biased = SamplerChain::new().logit_bias(&[(forced, 100.0)]).greedy().build(model()).unwrap();
    assert_eq!(biased.sample(&ctx, last).unwrap(), forced);
    for mut chain in [
        SamplerChain::new().temp(0.8).mirostat(3, 5.0, 0.1, 100).build(model()).unwrap(),
        SamplerChain::new().temp(0.8).mirostat_v2(3, 5.0, 0.1).build(model()).unwrap(),
    ] {
        assert!(vocab.contains(chain.sample(&ctx, last).unwrap()));
        chain.reset().unwrap();
    }
}

#[test]
fn embeddings_are_produced_when_enabled() {
    let params = small_params().embeddings(true).pooling(Pooling::Mean);
    let mut ctx = Context::new(model(), &params).unwrap();
    let tokens = model().vocab().tokenize("an embedding", TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    let e = ctx.sequence_embeddings(0).unwrap();
    // Rows are as wide as llama.cpp writes them (n_embd_out; issue 12), 640 for this model.
    assert_eq!(e.len(), model().n_embd_out());
    assert_eq!(e.len(), 640);
    assert!(e.iter().all(|x| x.is_finite()) && e.iter().any(|x| *x != 0.0));
}

#[test]
fn threads_and_perf_counters() {
    let mut ctx = context();
    ctx.set_threads(1, 2).unwrap();
    assert_eq!(ctx.threads(), (1, 2));
    greedy(&mut ctx, "Count: one, two,", 3);
    let perf = ctx.perf();
    assert!(perf.n_prompt_tokens > 0 && perf.n_eval_tokens >= 2, "{perf:?}");
    assert!(perf.eval_ms > 0.0);
    ctx.reset_perf();
    // llama.cpp reports at least one evaluated token (it divides by it), but no time.
    assert_eq!(ctx.perf().eval_ms, 0.0);
}

#[test]
fn system_information_shows_the_cpu() {
    assert!(system_info().contains("CPU"));
    let devices = devices();
    assert!(devices.iter().any(|d| d.kind == DeviceKind::Cpu), "{devices:?}");
    assert!(capabilities().mmap);
    let native = build_info().switch("native").unwrap();
    assert_eq!(build_info().define("GGML_NATIVE"), Some(if native { "ON" } else { "OFF" }));
}

#[test]
fn quantizing_a_small_model_runs_clean_under_the_leak_check() {
    // The synthetic llama with a 32k vocabulary (9 MB of F16): small enough that the leak check
    // runs llama.cpp's quantizer under valgrind (the default model's takes minutes there).
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let input = dir.join("llama-tiny-32k.gguf");
    assert!(input.is_file(), "{} missing: run `cargo xtask synth-models`", input.display());
    let out = temp_path("tiny-q8_0.gguf");
    quantize(&input, &out, &QuantizeOptions::new(QuantType::Q8_0).threads(2)).unwrap();
    let q = Model::load(&out, &ModelParams::default()).unwrap();
    assert_eq!(q.meta("general.file_type").as_deref(), Some("7"), "Q8_0 is ftype 7");
    assert!(std::fs::metadata(&out).unwrap().len() < std::fs::metadata(&input).unwrap().len());
    let err = quantize(&input, &input, &QuantizeOptions::new(QuantType::Q8_0).threads(2)).unwrap_err();
    assert!(matches!(err, QuantizeError::SameFile { .. }), "{err}");
    drop(q);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn quantize_writes_a_loadable_model() {
    let out = temp_path("requant-q8_0.gguf");
    quantize(&model_path(), &out, &QuantizeOptions::new(QuantType::Q8_0).threads(2).requantize(Requantize::Allow)).unwrap();
    let q = Model::load(&out, &ModelParams::default().vocab_only(true)).unwrap();
    assert_eq!(q.meta("general.file_type").as_deref(), Some("7"), "Q8_0 is ftype 7");
    let err = quantize(std::path::Path::new("/no/input.gguf"), &out, &QuantizeOptions::new(QuantType::Q4_0).threads(2).requantize(Requantize::Allow))
        .unwrap_err();
    assert!(matches!(err, QuantizeError::Input(_)), "{err}");
    // A failure in the middle (this model's tensors are quantized already) leaves the earlier
    // output as it was and no partial file.
    let before = std::fs::read(&out).unwrap();
    let err = quantize(&model_path(), &out, &QuantizeOptions::new(QuantType::Q4_0).threads(2)).unwrap_err();
    assert!(matches!(err, QuantizeError::Llama { .. }) && err.to_string().contains("requantizing"), "{err}");
    assert!(std::fs::read(&out).unwrap() == before, "the earlier output was changed");
    let partial = format!("{}.partial-", out.file_name().unwrap().to_string_lossy());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&partial))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn a_lazy_constraint_is_free_until_its_trigger_then_holds() {
    let vocab = model().vocab();
    let free = generate_with(&mut SamplerChain::new().greedy().build(model()).unwrap(), POEM, 6);
    // A pattern that never matches: the output is the unconstrained one.
    let never = GrammarTriggers { patterns: vec!["^NEVER_WRITTEN$".into()], tokens: vec![] };
    let mut asleep = SamplerChain::new().constrain_lazy(DIGITS, "root", never).greedy().build(model()).unwrap();
    assert_eq!(generate_with(&mut asleep, POEM, 6), free);
    // Triggered by the first token the free chain draws: the grammar reads from that token on,
    // so a grammar starting with its text and then digits makes the rest digits.
    let first = String::from_utf8(vocab.piece(free[0], SpecialTokens::Omit).unwrap()).unwrap();
    let escaped: String = first.chars().map(|c| if c == '"' || c == '\\' { format!("\\{c}") } else { c.to_string() }).collect();
    let grammar = format!(r#"root ::= "{escaped}" [0-9] [0-9] "!""#);
    let on_first = GrammarTriggers { patterns: vec![], tokens: vec![free[0]] };
    let mut woken = SamplerChain::new().constrain_lazy(&grammar, "root", on_first).greedy().build(model()).unwrap();
    let out = generate_with(&mut woken, POEM, 8);
    assert_eq!(out[0], free[0]);
    let text = vocab.detokenize(&out[1..], DetokenizeOptions::default()).unwrap();
    assert!(is_digits(&text, 2), "{text:?}");
}

#[test]
fn a_prefilled_constraint_reads_its_prefill_first_and_again_after_reset() {
    let vocab = model().vocab();
    let open = vocab.tokenize("Sure:", TokenizeOptions { add_special: false, parse_special: false }).unwrap();
    let grammar = r#"root ::= "Sure:" [0-9] [0-9] "!""#;
    let mut sampler = SamplerChain::new().constrain(grammar, "root").prefill_constraint(&open).greedy().build(model()).unwrap();
    let text = vocab.detokenize(&generate_with(&mut sampler, POEM, 6), DetokenizeOptions::default()).unwrap();
    assert!(is_digits(&text, 2), "{text:?}");
    sampler.reset().unwrap();
    let again = vocab.detokenize(&generate_with(&mut sampler, POEM, 6), DetokenizeOptions::default()).unwrap();
    assert_eq!(again, text);
}
