//! The engine on other architectures than the default model's: random-weight models written
//! by `cargo xtask synth-models`, one per kind of memory. `llama-tiny` has an attention KV
//! cache only; `lfm2-tiny` is LFM2's hybrid (short-convolution blocks with a recurrent state,
//! plus attention blocks); `mamba-tiny` has a recurrent state only. A recurrent state cannot be
//! rewound to an earlier position, so every path that reuses or rewinds the cache must give
//! exactly what a fresh session decoding the same prompt gives. CI runs this file on every
//! backend.

use std::path::PathBuf;

use exsa_engine::*;

const MODELS: [&str; 3] = ["llama-tiny", "lfm2-tiny", "mamba-tiny"];

fn engine(name: &str) -> Engine {
    engine_with(name, |_| {})
}

/// The model with its session settings changed by `adjust`.
fn engine_with(name: &str, adjust: impl FnOnce(&mut SessionConfig)) -> Engine {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let path = dir.join(format!("{name}.gguf"));
    assert!(path.is_file(), "synthetic model missing at {}: run `cargo xtask synth-models`", path.display());
    let mut config = EngineConfig::new(path);
    config.session = SessionConfig::default().n_ctx(512).n_batch(512).n_ubatch(512).n_threads(2).n_threads_batch(2);
    adjust(&mut config.session);
    Engine::load(config).unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(prompt).max_tokens(max_tokens).sampling(SamplingParams::greedy())
}

fn is_recurrent(name: &str) -> bool {
    name != "llama-tiny"
}

#[test]
fn every_synthetic_model_loads_generates_and_chats() {
    for name in MODELS {
        let engine = engine(name);
        let info = engine.model_info();
        assert_eq!(info.architecture, name.split('-').next().unwrap(), "{name}");
        let (text, stats) = engine.generate(&greedy("The weather today is", 12)).unwrap();
        assert!(stats.completion_tokens > 0 && !text.is_empty(), "{name}: {stats:?}");
        let mut session = engine.session().unwrap();
        let mut chat = session.chat(&[ChatMessage::new("user", "Hello!")], greedy("", 8).options).unwrap();
        let reply: String = chat.by_ref().map(|d| d.unwrap()).collect();
        assert!(chat.stats().completion_tokens > 0, "{name}: {reply:?}");
    }
}

/// A longer prompt after a shorter one, the same prompt twice, and a prompt that shares only a
/// beginning: each equals a fresh session's greedy output. On attention-only memory the shared
/// part is reused; on recurrent memory (which llama.cpp cannot cut back) only up to the
/// checkpoint taken just before the end of an earlier prompt, else nothing.
#[test]
fn prefix_reuse_and_rewinds_give_what_a_fresh_session_gives() {
    let first = "The quick brown fox jumps over the lazy dog. The quick brown fox";
    let longer = format!("{first} jumps again and again over the fence");
    let sibling = "The quick brown fox jumps over the lazy dog. A slow green turtle";
    for name in MODELS {
        let engine = engine(name);
        let mut session = engine.session().unwrap();
        let (_, a) = session.generate_text(&greedy(first, 6)).unwrap();
        assert_eq!(a.prompt_tokens_reused, 0);
        let tokens = |p: &str| engine.tokenize(p, TokenizeOptions::default()).unwrap();
        let mut earlier = vec![tokens(first)];
        let mut from_checkpoints = 0;
        for prompt in [longer.as_str(), longer.as_str(), sibling, first] {
            let (fresh, _) = engine.generate(&greedy(prompt, 10)).unwrap();
            let (reused, stats) = session.generate_text(&greedy(prompt, 10)).unwrap();
            assert_eq!(reused, fresh, "{name}: {prompt:?} after reuse of {} tokens", stats.prompt_tokens_reused);
            let now = tokens(prompt);
            if is_recurrent(name) {
                // Every request here needs a cut (the cache ends with generated tokens the next
                // prompt lacks): only a checkpoint taken just before the end of an earlier prompt
                // that this one extends that far can be returned to.
                let reused = stats.prompt_tokens_reused;
                let at = |e: &Vec<Token>| e.len().saturating_sub(exsa_engine::serving::ServingConfig::CHECKPOINT_BEFORE_END);
                let checkpointed = earlier.iter().any(|e| at(e) == reused && now.starts_with(&e[..at(e)]));
                assert!(reused == 0 || checkpointed, "{name}: {prompt:?} reused {reused}");
                from_checkpoints += reused;
                earlier.push(now);
            } else {
                assert!(stats.prompt_tokens_reused >= 10, "{name}: {prompt:?} reused {}", stats.prompt_tokens_reused);
            }
        }
        // The `crate` and `raw` backends keep no checkpoints.
        let checkpoints = is_recurrent(name) && Engine::backend_name() == "source";
        assert_eq!(from_checkpoints > 0, checkpoints, "{name}: the longer prompt returns to the first's checkpoint");
    }
}

/// A second chat turn in the same session equals the same conversation in a fresh one.
#[test]
fn a_second_chat_turn_equals_a_fresh_session() {
    for name in MODELS {
        let engine = engine(name);
        let mut session = engine.session().unwrap();
        let mut history = vec![ChatMessage::new("user", "Name three colours.")];
        let mut first = session.chat(&history, greedy("", 8).options).unwrap();
        let reply: String = first.by_ref().map(|d| d.unwrap()).collect();
        let first_prompt = first.stats().prompt_tokens;
        drop(first);
        history.push(ChatMessage::new("assistant", reply));
        history.push(ChatMessage::new("user", "And three more?"));
        let mut second = session.chat(&history, greedy("", 8).options).unwrap();
        let again: String = second.by_ref().map(|d| d.unwrap()).collect();
        // The first turn's prompt and reply are a prefix of the second turn's prompt when the
        // reply tokenizes back to the tokens generated: then even a recurrent state is reused
        // as it stands, with no cut; otherwise recurrent memory is decoded again from the start.
        let reused = second.stats().prompt_tokens_reused;
        eprintln!("{name}: second turn reused {reused} of {} prompt tokens", second.stats().prompt_tokens);
        if is_recurrent(name) {
            assert!(reused == 0 || reused >= first_prompt, "{name}: reused {reused} of a {first_prompt}-token first prompt");
        } else {
            assert!(reused >= first_prompt, "{name}: reused {reused} of a {first_prompt}-token first prompt");
        }
        let mut fresh_session = engine.session().unwrap();
        let mut fresh = fresh_session.chat(&history, greedy("", 8).options).unwrap();
        let want: String = fresh.by_ref().map(|d| d.unwrap()).collect();
        assert_eq!(again, want, "{name}");
    }
}

#[test]
fn cancellation_stops_generation_on_every_memory_kind() {
    for name in MODELS {
        let engine = engine(name);
        let cancel = CancelToken::new();
        let mut session = engine.session().unwrap();
        let request = greedy("Once upon a time", 64).cancel(cancel.clone());
        let mut generation = session.generate(&request).unwrap();
        assert!(generation.next().is_some());
        cancel.cancel();
        generation.by_ref().for_each(drop);
        assert_eq!(generation.stats().finish_reason, Some(FinishReason::Cancelled), "{name}");
        assert!(generation.stats().completion_tokens < 64, "{name}");
        drop(generation);
        // A request cancelled before it starts decodes nothing, and the session stays usable.
        let (fresh, _) = engine.generate(&greedy("Once upon a time", 4)).unwrap();
        let before = greedy("Once upon a time", 4).cancel(cancel.clone());
        assert!(matches!(session.generate(&before).map(|_| ()), Err(EngineError::Cancelled)), "{name}");
        let (after, _) = session.generate_text(&greedy("Once upon a time", 4)).unwrap();
        assert_eq!(after, fresh, "{name}");
    }
}

/// Speculation cuts the cache back to the drafts that were kept. A recurrent state cannot be
/// cut: it returns to a checkpoint taken before the round and decodes the round's kept tokens
/// again with the next one (LFM2 and Mamba on the source backend), or, with recurrent snapshots
/// (`SessionConfig::recurrent_snapshots`, LFM2's hybrid memory), drops the rejected tail like an
/// attention cache. The `crate` and `raw` backends keep neither: the sequence is decoded again
/// from its start. Every way, the text is the plain greedy text and a rejection costs no prefill
/// where the backend keeps checkpoints.
#[test]
fn speculation_gives_the_plain_text_on_every_memory_kind() {
    for name in MODELS {
        speculation_matches_plain(name, 0);
    }
    speculation_matches_plain("lfm2-tiny", 8);
}

fn speculation_matches_plain(name: &str, snapshots: u32) {
    use exsa_engine::serving::{ServeRequest, ServingConfig, ServingCore, collect};
    const PROMPT: &str = "one two three four one two three four one two three four one two";
    let ngram = Speculation::Ngram { max_draft: 4 };
    let label = format!("{name}, {snapshots} snapshots");
    let engine = std::sync::Arc::new(engine_with(name, |session| session.recurrent_snapshots = snapshots));
    // Random weights seldom repeat themselves: a bias confines the output to the prompt's
    // four words, so that it recurs (drafts) without being periodic (some drafts fail).
    let words = engine.tokenize(" one two three four", TokenizeOptions::default().add_special(false)).unwrap();
    let sampling = SamplingParams::greedy().logit_bias(words.iter().map(|&t| (t, 50.0)));
    let plain = greedy(PROMPT, 48).sampling(sampling);
    let (want, _) = engine.generate(&plain).unwrap();
    let source = Engine::backend_name() == "source";
    // Where a rejected round is replayed from its checkpoint: a recurrent state without snapshots.
    let replays = is_recurrent(name) && source && snapshots == 0;
    let mut session = engine.session().unwrap();
    let (got, stats) = session.generate_text(&plain.clone().speculation(ngram)).unwrap();
    assert_eq!(got, want, "{label}: single stream");
    assert!(stats.drafted_tokens > 0, "{label}: nothing drafted: {stats:?}");
    if is_recurrent(name) {
        // What is checked below needs a rejection (early in the reply, before it turns periodic).
        assert!(stats.drafted_tokens > stats.accepted_tokens, "{label}: no draft was rejected: {stats:?}");
        assert_eq!(stats.replayed_tokens > 0, replays, "{label}: {stats:?}");
    }
    eprintln!("{label}: {} of {} drafts kept in {} decodes", stats.accepted_tokens, stats.drafted_tokens, stats.generation_decodes);
    let core = ServingCore::start(std::sync::Arc::clone(&engine), ServingConfig::new(&engine, 2)).unwrap();
    let speculating = core.submit(ServeRequest::new(&engine, &plain.clone().speculation(ngram)).unwrap()).unwrap();
    // Short: a recurrent model drafts only while it is the one sequence generating.
    let beside = core.submit(ServeRequest::new(&engine, &greedy("Once upon a time", 4)).unwrap()).unwrap();
    let (served, completion) = collect(speculating).unwrap();
    assert_eq!(served, want, "{label}: serving loop");
    let stats = &completion.stats;
    assert!(stats.drafted_tokens > 0, "{label}: {stats:?}");
    let (beside_text, beside_completion) = collect(beside).unwrap();
    let prompts = (stats.prompt_tokens + beside_completion.stats.prompt_tokens) as u64;
    let status = core.status();
    // Prompts decoded once, unless a rejection made a sequence decode again (no checkpoints).
    // Whether the served reply had a rejection depends on when its drafts started.
    let rejected = stats.drafted_tokens > stats.accepted_tokens;
    let rebuilds = rejected && is_recurrent(name) && !source;
    assert_eq!(
        status.prompt_tokens_decoded > prompts,
        rebuilds,
        "{label}: {} prompt tokens decoded for prompts of {prompts}",
        status.prompt_tokens_decoded
    );
    assert!(replays || stats.replayed_tokens == 0, "{label}: replayed where nothing needs it: {stats:?}");
    assert_eq!(status.replayed_tokens, stats.replayed_tokens as u64, "{label}");
    eprintln!("{label} served: {} of {} drafts kept, {} tokens replayed", stats.accepted_tokens, stats.drafted_tokens, stats.replayed_tokens);
    assert_eq!(beside_text, engine.generate(&greedy("Once upon a time", 4)).unwrap().0, "{label}: the request beside");
}
