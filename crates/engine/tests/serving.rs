//! The serving core (continuous batching) on the real default model: concurrent requests give
//! what each gives alone, cancellation and disconnection free their slots, a full queue is
//! refused at once, prefix reuse per slot, shutdown lets accepted requests finish. CI runs this
//! file on every backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exsa_engine::serving::{Completion, Event, ServeRequest, ServingConfig, ServingCore, SubmitError, collect};
use exsa_engine::*;

mod equivalence;

fn engine() -> Arc<Engine> {
    engine_with_ctx(1024)
}

/// The default model with a KV cache of `n_ctx` cells for all slots together.
fn engine_with_ctx(n_ctx: u32) -> Arc<Engine> {
    let path = default_model_path();
    assert!(path.is_file(), "default model missing at {}: run `cargo xtask fetch-model`", path.display());
    let mut config = EngineConfig::new(path);
    config.session = SessionConfig::default().n_ctx(n_ctx).n_batch(256).n_ubatch(256).n_threads(2).n_threads_batch(2);
    Arc::new(Engine::load(config).expect("engine loads"))
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(prompt).max_tokens(max_tokens).sampling(SamplingParams::greedy())
}

fn start(engine: &Arc<Engine>, slots: u32, max_queue: usize) -> Result<ServingCore, EngineError> {
    ServingCore::start(Arc::clone(engine), ServingConfig::new(engine, slots).max_queue(max_queue))
}

const PROMPTS: [&str; 6] = [
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Water boils at",
    "The capital of Japan is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
];

#[test]
fn concurrent_requests_give_what_each_gives_alone() {
    let engine = engine();
    let core = start(&engine, 4, 16).expect("the serving core starts");
    // Six requests for four slots: two wait in the queue, and join as others finish.
    let receivers: Vec<_> = PROMPTS.iter().map(|p| core.submit(traced(&engine, p, 24)).unwrap()).collect();
    let served: Vec<_> = receivers.into_iter().map(|r| collect(r).unwrap()).collect();
    let mut checked = Vec::new();
    for (prompt, (_, completion)) in PROMPTS.iter().zip(&served) {
        assert_eq!(completion.finish_reason, FinishReason::MaxTokens);
        assert_eq!(completion.stats.completion_tokens, 24);
        checked.push(check_served(&engine, prompt, completion, &[]));
    }
    equivalence::cap_partings(&checked, "six requests on four slots");
    let status = core.status();
    assert_eq!((status.queued, status.busy_slots), (0, 0));
    assert_eq!(status.generated_tokens, 6 * 24);
    // Fewer decodes than tokens: requests shared steps.
    assert!(status.steps < status.generated_tokens, "{status:?}");
}

/// Every step of a served greedy request against a solo decode forced through its tokens (see
/// `equivalence`). The request must have asked for log-probabilities.
fn check_served(engine: &Engine, prompt: &str, completion: &Completion, banned: &[Token]) -> equivalence::Checked {
    let tokens = engine.tokenize(prompt, TokenizeOptions::default()).unwrap();
    // The log-probabilities include the end-of-generation step, which the tokens leave out.
    let drawn: Vec<Token> = completion.logprobs.iter().map(|e| e.token).collect();
    assert!(drawn.starts_with(&completion.tokens) && drawn.len() <= completion.tokens.len() + 1, "{prompt:?}: {completion:?}");
    equivalence::check(engine, &tokens, &drawn, Some(&completion.logprobs), banned, prompt)
}

/// A greedy request asking for log-probabilities.
fn traced(engine: &Arc<Engine>, prompt: &str, max_tokens: usize) -> ServeRequest {
    ServeRequest::new(engine, &greedy(prompt, max_tokens).logprobs(5)).unwrap()
}

/// The request with every end-of-generation token banned, so that it runs to `max_tokens`.
fn banning_eog(engine: &Engine, request: GenerateRequest) -> GenerateRequest {
    let sampling = request.options.sampling.clone().logit_bias(engine.end_of_generation_tokens().into_iter().map(|t| (t, f32::NEG_INFINITY)));
    request.sampling(sampling)
}

/// Requests admitted while others generate (into a running batch), and requests whose slots
/// reuse a cached prefix while other slots decode beside them, give at every step what a solo
/// decode gives.
#[test]
fn requests_admitted_mid_flight_and_reusing_prefixes_match_solo_runs() {
    let engine = engine();
    let core = start(&engine, 4, 16).expect("the serving core starts");
    const PREFIX: &str = "You are a careful assistant. Answer in one short sentence, plainly, without lists or markdown. Question:";
    let prompt = |q: &str| format!("{PREFIX} {q}");
    // Two slots decode the prefix (with different questions) and keep it.
    let warm: Vec<_> = ["What is rain?", "What is snow?"].iter().map(|q| core.submit(traced(&engine, &prompt(q), 8)).unwrap()).collect();
    for r in warm {
        collect(r).unwrap();
    }
    let prefix_tokens = engine.tokenize(PREFIX, TokenizeOptions::default()).unwrap().len();
    // Two requests reuse those slots' prefixes while a third, unrelated, decodes beside them; a
    // fourth and a fifth are admitted once the batch runs, one of them sharing the prefix.
    let first_wave = [prompt("What is fog?"), prompt("What is hail?"), PROMPTS[4].to_string()];
    let receivers: Vec<_> = first_wave.iter().map(|p| core.submit(traced(&engine, p, 32)).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while core.status().generated_tokens < 2 * 3 + 4 {
        assert!(Instant::now() < deadline, "the first wave did not start: {:?}", core.status());
        std::thread::sleep(Duration::from_millis(1));
    }
    let second_wave = [prompt("What is dew?"), PROMPTS[5].to_string()];
    let late: Vec<_> = second_wave.iter().map(|p| core.submit(traced(&engine, p, 24)).unwrap()).collect();
    let mut checked = Vec::new();
    for (p, r) in first_wave.iter().chain(&second_wave).zip(receivers.into_iter().chain(late)) {
        let (_, completion) = collect(r).unwrap();
        if p.starts_with(PREFIX) && !p.ends_with("dew?") {
            assert!(completion.stats.prompt_tokens_reused >= prefix_tokens, "{p:?} reused only {:?}", completion.stats);
        }
        checked.push(check_served(&engine, p, &completion, &[]));
    }
    equivalence::cap_partings(&checked, "mid-flight admission and prefix reuse");
    assert!(core.status().prompt_tokens_reused as usize >= 2 * prefix_tokens, "{:?}", core.status());
}

#[test]
fn cancellation_and_disconnection_free_the_slot_at_the_next_step() {
    let engine = engine();
    let core = start(&engine, 2, 4).expect("the serving core starts");
    let cancel = CancelToken::new();
    let cancelled = core.submit(ServeRequest::new(&engine, &greedy("Once upon a time", 400).cancel(cancel.clone())).unwrap()).unwrap();
    let dropped = core.submit(ServeRequest::new(&engine, &greedy("In the beginning", 400)).unwrap()).unwrap();
    // Both run: wait for their first text, then cancel one and walk away from the other.
    let first = cancelled.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(matches!(first, Event::Delta(_)), "{first:?}");
    assert!(matches!(dropped.recv_timeout(Duration::from_secs(60)).unwrap(), Event::Delta(_)));
    cancel.cancel();
    drop(dropped);
    let (_, completion) = collect(cancelled).unwrap();
    assert_eq!(completion.finish_reason, FinishReason::Cancelled);
    assert!(completion.stats.completion_tokens < 400);
    let deadline = Instant::now() + Duration::from_secs(30);
    while core.status().busy_slots > 0 {
        assert!(Instant::now() < deadline, "slots still busy: {:?}", core.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    // The slots serve again.
    let (_, again) = collect(core.submit(ServeRequest::new(&engine, &greedy("Hello", 4)).unwrap()).unwrap()).unwrap();
    assert_eq!(again.stats.completion_tokens, 4);
}

/// A long prompt is decoded in n_batch chunks, one per step: a cancel lands between two of them.
#[test]
fn a_cancel_during_prefill_stops_before_the_prompt_is_decoded() {
    let engine = engine();
    let core = start(&engine, 1, 1).expect("the serving core starts");
    let cancel = CancelToken::new();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(80);
    let request = ServeRequest::new(&engine, &greedy(&long, 8).cancel(cancel.clone())).unwrap();
    let prompt_tokens = request.tokens().len() as u64;
    assert!(prompt_tokens > 3 * 256, "{prompt_tokens} tokens: several chunks of n_batch 256");
    let events = core.submit(request).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while core.status().steps == 0 {
        assert!(Instant::now() < deadline, "prefill did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    cancel.cancel();
    let (text, completion) = collect(events).unwrap();
    assert_eq!((text.as_str(), completion.finish_reason), ("", FinishReason::Cancelled));
    assert_eq!(completion.stats.completion_tokens, 0);
    let decoded = core.status().prompt_tokens_decoded;
    assert!(decoded < prompt_tokens, "the whole prompt ({decoded} of {prompt_tokens} tokens) was decoded before the cancel took");
    assert_eq!(core.status().busy_slots, 0);
}

#[test]
fn a_full_queue_is_refused_at_once_and_shutdown_finishes_what_was_accepted() {
    let engine = engine();
    let core = start(&engine, 1, 2).expect("the serving core starts");
    let request = || ServeRequest::new(&engine, &greedy("The quick brown fox", 32)).unwrap();
    let running = core.submit(request()).unwrap();
    // Wait until it occupies the slot, so that the queue's two places are what is left.
    assert!(matches!(running.recv_timeout(Duration::from_secs(60)).unwrap(), Event::Delta(_)));
    let queued: Vec<_> = (0..2).map(|_| core.submit(request()).unwrap()).collect();
    assert_eq!(core.submit(request()).unwrap_err(), SubmitError::QueueFull { capacity: 2 });
    core.shutdown();
    // Every accepted request ran to its end.
    let (_, first) = collect(running).unwrap();
    assert_eq!(first.finish_reason, FinishReason::MaxTokens);
    for q in queued {
        assert_eq!(collect(q).unwrap().1.stats.completion_tokens, 32);
    }
}

/// A prompt whose beginning another slot's cache holds (a shared system prompt) takes those
/// cells by a sequence copy instead of decoding them, on attention memory (the default model,
/// llama-tiny), counted as copied; every step of its reply matches a solo decode. On recurrent
/// memory (lfm2-tiny, mamba-tiny) a state copied from the middle of the donor's sequence cannot
/// be cut back: nothing is copied, the prompt is decoded whole, and the reply is the same.
#[test]
fn a_shared_prefix_is_copied_from_another_slot_and_gives_what_a_fresh_decode_gives() {
    let synth = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    let synth_engine = |name: &str| {
        let mut config = EngineConfig::new(synth.join(format!("{name}.gguf")));
        config.session = SessionConfig::default().n_ctx(1024).n_batch(256).n_ubatch(256).n_threads(2).n_threads_batch(2);
        Arc::new(Engine::load(config).unwrap_or_else(|e| panic!("{name} loads: {e}")))
    };
    let cases = [
        ("gemma-3-270m", engine(), true),
        ("llama-tiny", synth_engine("llama-tiny"), true),
        ("lfm2-tiny", synth_engine("lfm2-tiny"), false),
        ("mamba-tiny", synth_engine("mamba-tiny"), false),
    ];
    const SYSTEM: &str = "You are the support assistant of a shop for hiking gear. Be brief and friendly, answer only what is asked, and never promise a delivery date. Question:";
    let mut checked = Vec::new();
    for (name, engine, copies) in cases {
        let core = start(&engine, 2, 4).expect("the serving core starts");
        let in_slot = |prompt: &str, slot: usize, max_tokens: usize| {
            let mut request = banning_eog(&engine, greedy(prompt, max_tokens).logprobs(5));
            request.options.slot = Some(slot);
            collect(core.submit(ServeRequest::new(&engine, &request).unwrap()).unwrap()).unwrap().1
        };
        let first = format!("{SYSTEM} Do you sell tents?");
        let second = format!("{SYSTEM} Where is my order?");
        in_slot(&first, 0, 4);
        // Slot 1 is empty: what it reuses, it takes from slot 0.
        let completion = in_slot(&second, 1, 24);
        let (a, b) = (engine.tokenize(&first, TokenizeOptions::default()).unwrap(), engine.tokenize(&second, TokenizeOptions::default()).unwrap());
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let status = core.status();
        if copies {
            assert_eq!(completion.stats.prompt_tokens_reused, shared, "{name}: {:?}", completion.stats);
            assert_eq!(status.prompt_tokens_copied, shared as u64, "{name}: {status:?}");
        } else {
            assert_eq!((completion.stats.prompt_tokens_reused, status.prompt_tokens_copied), (0, 0), "{name}: {status:?}");
        }
        assert_eq!(completion.stats.completion_tokens, 24, "{name}");
        let eog = engine.end_of_generation_tokens();
        checked.push(check_served(&engine, &second, &completion, &eog));
    }
    equivalence::cap_partings(&checked, "prefixes copied between slots");
}

/// A chat's next turn on recurrent memory (lfm2-tiny: convolutions beside attention;
/// mamba-tiny: recurrent only): its prompt extends the last turn's prompt but not the reply as it
/// was decoded, and a recurrent state cannot be cut back there. The checkpoint taken just before
/// the end of the last prompt is restored instead, so only the rest is decoded, and every step
/// of the reply matches a solo decode. With no checkpoints kept the prompt is decoded whole.
#[test]
fn a_next_turn_on_recurrent_memory_returns_to_the_last_prompts_checkpoint() {
    let synth = std::path::PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    let mut checked = Vec::new();
    for name in ["lfm2-tiny", "mamba-tiny"] {
        let mut config = EngineConfig::new(synth.join(format!("{name}.gguf")));
        config.session = SessionConfig::default().n_ctx(1024).n_batch(256).n_ubatch(256).n_threads(2).n_threads_batch(2);
        let engine = Arc::new(Engine::load(config).unwrap_or_else(|e| panic!("{name} loads: {e}")));
        let eog = engine.end_of_generation_tokens();
        let first = "User: Which tent suits a rainy week in the hills?\nAssistant:";
        let next = format!("{first} A tunnel tent with a full fly.\nUser: And which stove?\nAssistant:");
        let (a, b) = (engine.tokenize(first, TokenizeOptions::default()).unwrap(), engine.tokenize(&next, TokenizeOptions::default()).unwrap());
        assert!(b.starts_with(&a), "{name}: the next turn's tokens extend the first's");
        // The `crate` and `raw` backends keep none, whatever the setting.
        let kept = |checkpoints: u32| checkpoints > 0 && Engine::backend_name() == "source";
        for checkpoints in [ServingConfig::DEFAULT_CTX_CHECKPOINTS, 0] {
            let core = ServingCore::start(Arc::clone(&engine), ServingConfig::new(&engine, 2).ctx_checkpoints(checkpoints)).unwrap();
            let run = |prompt: &str, max_tokens: usize| {
                let request = banning_eog(&engine, greedy(prompt, max_tokens).logprobs(5));
                collect(core.submit(ServeRequest::new(&engine, &request).unwrap()).unwrap()).unwrap().1
            };
            run(first, 6);
            let status = core.status();
            assert_eq!(status.checkpoints, usize::from(kept(checkpoints)), "{name}: {status:?}");
            assert_eq!(status.checkpoint_bytes > 0, kept(checkpoints), "{name}: {status:?}");
            let completion = run(&next, 16);
            let want = if kept(checkpoints) { a.len() - ServingConfig::CHECKPOINT_BEFORE_END } else { 0 };
            assert_eq!(completion.stats.prompt_tokens_reused, want, "{name}, {checkpoints} checkpoints: {:?}", completion.stats);
            assert_eq!(completion.stats.completion_tokens, 16, "{name}");
            checked.push(check_served(&engine, &next, &completion, &eog));
        }
    }
    equivalence::cap_partings(&checked, "next turns from recurrent checkpoints");
}

#[test]
fn a_slot_reuses_the_longest_cached_prefix() {
    let engine = engine();
    let core = start(&engine, 2, 4).expect("the serving core starts");
    let long = "The quick brown fox jumps over the lazy dog while the cat watches from the window.";
    let (_, first) = collect(core.submit(ServeRequest::new(&engine, &greedy(long, 4)).unwrap()).unwrap()).unwrap();
    assert_eq!(first.stats.prompt_tokens_reused, 0);
    let other = "A completely different prompt about the weather";
    collect(core.submit(ServeRequest::new(&engine, &greedy(other, 4)).unwrap()).unwrap()).unwrap();
    let longer = format!("{long} Then");
    let (text, again) = collect(core.submit(ServeRequest::new(&engine, &greedy(&longer, 8)).unwrap()).unwrap()).unwrap();
    assert!(again.stats.prompt_tokens_reused >= first.stats.prompt_tokens - 1, "{:?}", again.stats);
    let (alone, _) = engine.generate(&greedy(&longer, 8)).unwrap();
    assert_eq!(text, alone);
    // Prompt errors come back as typed errors.
    let too_long = "word ".repeat(2000);
    let e = collect(core.submit(ServeRequest::new(&engine, &greedy(&too_long, 4)).unwrap()).unwrap()).unwrap_err();
    assert!(matches!(e, EngineError::PromptTooLong { n_ctx: 1024, .. }), "{e}");
}

#[test]
fn a_full_kv_cache_fails_the_newest_request_and_the_older_ones_finish() {
    // 384 cache cells (llama.cpp pads that to 512) shared by three slots; each request wants
    // 26 prompt tokens, of which the first 8 are the same (copied between slots, so stored once),
    // and 180 generated ones: two fit, three do not.
    let engine = engine_with_ctx(384);
    let core = start(&engine, 3, 4).expect("the serving core starts");
    let long = |topic: &str| {
        format!("Write a long, detailed essay about {topic}. Cover its history, its science, its culture and its future, with examples.")
    };
    let eog = engine.end_of_generation_tokens();
    let topics = ["the ocean", "mountains", "deserts"];
    let mut receivers = Vec::new();
    for topic in topics {
        // Greedy, with the end of text banned, so that every request wants its 180 tokens.
        let request = ServeRequest::new(&engine, &banning_eog(&engine, greedy(&long(topic), 180).logprobs(5))).unwrap();
        receivers.push(core.submit(request).unwrap());
        // Admitted in this order (the newest is the last).
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcomes: Vec<_> = receivers.into_iter().map(collect).collect();
    let (first_text, first) = outcomes[0].as_ref().expect("the oldest request finishes");
    assert_eq!(first.stats.completion_tokens, 180, "{first_text:?}");
    let last = outcomes[2].as_ref().expect_err("the newest request gives way");
    assert_eq!(last.decode_failure(), Some(DecodeFailure::NoKvSlot), "{last}");
    // The middle one fits beside the first once the newest is gone.
    assert!(outcomes[1].is_ok(), "{:?}", outcomes[1].as_ref().err());
    assert_eq!(core.status().busy_slots, 0);
    // The survivors went on from the rolled-back step as if nothing had happened.
    for (topic, outcome) in topics.iter().zip(&outcomes).take(2) {
        let (_, completion) = outcome.as_ref().unwrap();
        check_served(&engine, &long(topic), completion, &eog);
    }
}

#[test]
fn a_prompt_that_does_not_fit_beside_the_running_ones_waits_for_room_instead_of_failing() {
    // 384 cells: a 250-token prompt runs; a 200-token prompt cannot join it (450 > 384) and
    // waits in the queue until the first is done, then runs alone. Admitted at once, it would
    // have filled the cache and been failed as the newest request.
    let engine = engine_with_ctx(384);
    let core = start(&engine, 2, 4).expect("the serving core starts");
    let words = |n: usize, word: &str| format!("{}.", vec![word; n].join(" "));
    let first = ServeRequest::new(&engine, &greedy(&words(240, "alpha"), 40)).unwrap();
    let second = ServeRequest::new(&engine, &greedy(&words(190, "beta"), 20)).unwrap();
    assert!(
        first.tokens().len() + second.tokens().len() > 384 && first.tokens().len() + 40 < 384,
        "{} + {}",
        first.tokens().len(),
        second.tokens().len()
    );
    let a = core.submit(first).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let b = core.submit(second).unwrap();
    // While the first runs, the second is still queued, not in a slot.
    std::thread::sleep(Duration::from_millis(100));
    let status = core.status();
    assert_eq!((status.busy_slots, status.queued), (1, 1), "{status:?}");
    let (_, done_a) = collect(a).expect("the first request finishes");
    let (_, done_b) = collect(b).expect("the second request runs once there is room");
    assert_eq!((done_a.stats.completion_tokens, done_b.stats.completion_tokens), (40, 20));
}

/// Code to continue: its answer repeats names from the prompt, which prompt lookup drafts.
const QUOTING: &str = "def area(width, height):\n    return width * height\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n\n\
def describe(width, height):\n    return f\"area={area(width, height)} perimeter={perimeter(width, height)}\"\n\n\
def area(width, height):\n    return";

#[test]
fn speculating_requests_give_what_they_give_without_and_take_fewer_decodes() {
    let engine = engine();
    let core = start(&engine, 3, 8).expect("the serving core starts");
    let request = |prompt: &str, speculation| ServeRequest::new(&engine, &greedy(prompt, 40).speculation(speculation).logprobs(5)).unwrap();
    let ngram = Speculation::Ngram { max_draft: 6 };
    // Two speculating requests beside one that does not, in the same steps.
    let prompts = [(QUOTING, ngram), (PROMPTS[1], ngram), (PROMPTS[0], Speculation::Off)];
    let receivers: Vec<_> = prompts.iter().map(|&(p, s)| core.submit(request(p, s)).unwrap()).collect();
    let served: Vec<_> = receivers.into_iter().map(|r| collect(r).unwrap()).collect();
    let mut checked = Vec::new();
    for ((prompt, speculation), (_, completion)) in prompts.iter().zip(&served) {
        checked.push(check_served(&engine, prompt, completion, &[]));
        let stats = &completion.stats;
        assert!(stats.accepted_tokens <= stats.drafted_tokens, "{stats:?}");
        if *speculation == Speculation::Off {
            assert_eq!(stats.drafted_tokens, 0);
        }
    }
    equivalence::cap_partings(&checked, "speculating beside plain");
    // The quoting request kept drafts and so took fewer decodes than tokens.
    let quoting = &served[0].1.stats;
    assert!(quoting.accepted_tokens >= 5, "{quoting:?}");
    assert!(quoting.generation_decodes + 5 <= quoting.completion_tokens, "{quoting:?}");
    let status = core.status();
    assert!(status.drafted_tokens >= status.accepted_tokens && status.accepted_tokens >= 5, "{status:?}");
    assert_eq!((status.queued, status.busy_slots), (0, 0));

    // A draft model is not served; a bad draft length is refused before it is queued.
    let refused = collect(core.submit(request(PROMPTS[2], Speculation::Draft { max_draft: 4 })).unwrap());
    assert!(matches!(refused, Err(EngineError::InvalidRequest { field: "speculation", .. })), "{refused:?}");
    let bad = ServeRequest::new(&engine, &greedy("x", 4).speculation(Speculation::Ngram { max_draft: 0 }));
    assert!(matches!(bad, Err(EngineError::InvalidRequest { field: "speculation", .. })));
}

/// A KV cache too small for a step's drafts: the step is built again without them, the
/// speculating request and a plain one beside it go on, and once even that does not fit, the
/// cache an idle slot kept gives way. Both requests' every step matches a solo decode (drafts
/// decoded, cut back, rebuilt without).
#[test]
fn a_step_whose_drafts_do_not_fit_is_rebuilt_without_them() {
    // 256 cells: an idle slot keeps 70-odd, and the two running requests want 230 between them.
    let engine = engine_with_ctx(256);
    let core = start(&engine, 3, 4).expect("the serving core starts");
    let eog = engine.end_of_generation_tokens();
    let ban_eog = |r: GenerateRequest| ServeRequest::new(&engine, &banning_eog(&engine, r.logprobs(5))).unwrap();
    collect(core.submit(ban_eog(greedy("Write a long essay about the history of bread.", 60))).unwrap()).unwrap();
    // A repeating text is drafted every step, up to 8 tokens.
    let repeating = "red green blue, red green blue, red green blue, red green blue, red green blue, red green";
    let speculating = ban_eog(greedy(repeating, 150).speculation(Speculation::Ngram { max_draft: 8 }));
    let plain = ban_eog(greedy(PROMPTS[4], 40));
    let used = core.status().kv_used;
    assert!(used + speculating.tokens().len() + plain.tokens().len() + 190 > 256, "{used}");
    let a = core.submit(speculating).unwrap();
    let b = core.submit(plain).unwrap();
    let (_, a) = collect(a).expect("the speculating request finishes");
    let (_, b) = collect(b).expect("the plain request finishes");
    assert_eq!((a.stats.completion_tokens, b.stats.completion_tokens), (150, 40));
    assert!(a.stats.accepted_tokens > 20, "{:?}", a.stats);
    let status = core.status();
    assert!(status.steps_without_drafts > 0, "no step was rebuilt without drafts: {status:?}");
    check_served(&engine, repeating, &a, &eog);
    check_served(&engine, PROMPTS[4], &b, &eog);
}

/// An owned session is `'static + Send`: moved into another thread, it gives what a borrowed
/// [`Session`] gives (both decode one sequence), and its next request reuses the cache.
#[test]
fn an_owned_session_moved_into_a_thread_gives_what_a_session_gives_and_reuses_its_cache() {
    let engine = engine();
    let request = banning_eog(&engine, greedy(PROMPTS[3], 24));
    let next = banning_eog(&engine, greedy(&format!("{} Tokyo, and the capital of France is", PROMPTS[3]), 4));
    let (expected, _) = engine.generate(&request).unwrap();
    let owned = engine.owned_session().unwrap();
    let (text, status) = std::thread::spawn(move || {
        let (text, _) = owned.generate_text(&request).unwrap();
        // The next request extends the first prompt: only the rest is decoded.
        let (_, completion) = owned.generate_text(&next).unwrap();
        assert!(completion.stats.prompt_tokens_reused > 0, "{:?}", completion.stats);
        (text, owned.status())
    })
    .join()
    .unwrap();
    assert_eq!(text, expected);
    assert_eq!((status.slots, status.busy_slots, status.generated_tokens), (1, 0, 24 + 4));
}

/// Polled by an async runtime, a request's `EventStream` gives the same events as the blocking
/// receiver; dropped before its end (a task that gives up), it cancels its request, which frees
/// the slot at the next step; a stream that reached its end cancels nothing.
#[test]
fn an_event_stream_gives_the_events_and_cancels_its_request_when_dropped_early() {
    let engine = engine();
    let owned = engine.owned_session().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let request = banning_eog(&engine, greedy(PROMPTS[0], 16));
    let (expected, _) = engine.generate(&request).unwrap();
    let shared = CancelToken::new();
    runtime.block_on(async {
        let mut stream = owned.stream(&request.clone().cancel(shared.clone())).unwrap();
        let mut text = String::new();
        let mut done = None;
        while let Some(event) = stream.recv().await {
            match event {
                Event::Delta(d) => text.push_str(&d.text),
                Event::Done(c) => done = Some(c),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(text, expected);
        assert_eq!(done.expect("the stream ends with Done").stats.completion_tokens, 16);
        // Ended: dropping it leaves the token (shared with other requests) alone.
        drop(stream);
        assert!(!shared.is_cancelled());

        // A long prompt, decoded in n_batch chunks: the stream is dropped once its prefill has
        // begun, before any event could tell the decode loop that nobody listens.
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(80);
        let before = owned.status();
        let stream = owned.stream(&greedy(&long, 400)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while owned.status().steps == before.steps {
            assert!(Instant::now() < deadline, "prefill did not start");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(30);
        while owned.status().busy_slots > 0 {
            assert!(Instant::now() < deadline, "the dropped stream's request still runs: {:?}", owned.status());
            std::thread::sleep(Duration::from_millis(10));
        }
        let decoded = owned.status().prompt_tokens_decoded - before.prompt_tokens_decoded;
        let prompt_tokens = engine.tokenize(&long, TokenizeOptions::default()).unwrap().len() as u64;
        assert!(prompt_tokens > 3 * 256, "{prompt_tokens} tokens: several chunks of n_batch 256");
        assert!(decoded < prompt_tokens, "the whole prompt ({decoded} of {prompt_tokens} tokens) was decoded after its stream was dropped");
        assert_eq!(owned.status().generated_tokens, before.generated_tokens, "the dropped stream's request generated");
    });
    // The session serves again.
    let (_, again) = owned.generate_text(&greedy("Hello", 4)).unwrap();
    assert_eq!(again.stats.completion_tokens, 4);
}

/// A session's [`Generation::logprobs`] lists what a served [`Completion::logprobs`] lists for
/// the same request (one slot each: the same decodes): the same draws with their
/// log-probabilities and candidates, growing while the generation runs; a request that asks for
/// none lists none.
#[test]
fn a_sessions_generation_lists_the_log_probabilities_a_served_completion_lists() {
    let engine = engine();
    let request = greedy(PROMPTS[0], 12).logprobs(3);
    let core = start(&engine, 1, 4).unwrap();
    let (_, served) = collect(core.submit(ServeRequest::new(&engine, &request).unwrap()).unwrap()).unwrap();
    assert!(served.logprobs.len() >= served.tokens.len() && !served.tokens.is_empty(), "{:?}", served.logprobs);

    let mut session = engine.session().unwrap();
    let mut generation = session.generate(&request).unwrap();
    let mut seen = Vec::new();
    while generation.next_text().transpose().unwrap().is_some() {
        seen.push(generation.logprobs().len());
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen[0] >= 1, "drawn so far, step by step: {seen:?}");
    let listed = generation.logprobs().to_vec();
    assert_eq!(listed.len(), served.logprobs.len());
    for (i, (ours, theirs)) in listed.iter().zip(&served.logprobs).enumerate() {
        assert_eq!(ours.token, theirs.token, "draw {i}");
        assert!((ours.logprob - theirs.logprob).abs() < 1e-4, "draw {i}: {} against {}", ours.logprob, theirs.logprob);
        let candidates = |l: &TokenLogprobs| l.top.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!((ours.top.len(), candidates(ours)), (3, candidates(theirs)), "draw {i}");
    }
    drop(generation);
    let mut plain = session.generate(&greedy(PROMPTS[0], 4)).unwrap();
    while plain.next_text().transpose().unwrap().is_some() {}
    assert!(plain.logprobs().is_empty());
}
