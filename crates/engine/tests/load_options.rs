//! How a model is loaded and adapted: [`EngineConfig::load`] (mmap, a progress callback that can
//! cancel) and [`EngineConfig::lora`] with [`SessionConfig::lora_scales`], on the synthetic
//! llama-tiny and its adapter llama-tiny-lora (`cargo xtask synth-models`: rank 4 on every
//! attention query and output projection, random and large enough to change greedy choices).
//! Each backend runs the same assertions; where one refuses a setting (several adapters on
//! `crate`), the refusal is what is checked.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use exsa_engine::serving::{ServeRequest, ServingConfig, ServingCore, collect};
use exsa_engine::*;

fn synth(name: &str) -> PathBuf {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let path = dir.join(name);
    assert!(path.is_file(), "synthetic model missing at {}: run `cargo xtask synth-models`", path.display());
    path
}

fn adapter() -> PathBuf {
    synth("llama-tiny-lora.gguf")
}

/// llama-tiny with small sessions, and `lora`.
fn config(lora: Vec<LoraConfig>) -> EngineConfig {
    let mut config = EngineConfig::new(synth("llama-tiny.gguf"));
    config.session = SessionConfig::default().n_ctx(256).n_batch(256).n_ubatch(256).n_threads(2).n_threads_batch(2);
    config.lora = lora;
    config
}

fn load(lora: Vec<LoraConfig>) -> Engine {
    Engine::load(config(lora)).unwrap_or_else(|e| panic!("llama-tiny loads: {e}"))
}

const PROMPT: &str = "Once upon a time, in a land far away,";
const TOKENS: usize = 24;

/// TOKENS greedy tokens (an end-of-generation token drawn or not: every run is that long).
fn greedy() -> GenerateRequest {
    let mut request = GenerateRequest::new(PROMPT).max_tokens(TOKENS).sampling(SamplingParams::greedy());
    request.options.ignore_eos = true;
    request
}

/// The greedy tokens of a fresh session with `session`'s parameters.
fn tokens_with(engine: &Engine, session: &SessionConfig) -> Vec<Token> {
    let mut session = engine.session_with(session).unwrap();
    let mut generation = session.generate(&greedy()).unwrap();
    while let Some(delta) = generation.next_text() {
        delta.unwrap();
    }
    generation.tokens().to_vec()
}

fn tokens(engine: &Engine) -> Vec<Token> {
    tokens_with(engine, engine.session_config())
}

fn scales(engine: &Engine, scales: &[f32]) -> SessionConfig {
    engine.session_config().clone().lora_scales(scales.to_vec())
}

/// The greedy tokens of an owned session and of a serving core (two slots) of `engine`.
fn owned_and_served(engine: Engine) -> (Vec<Token>, Vec<Token>) {
    let engine = Arc::new(engine);
    let (_, owned) = engine.owned_session().unwrap().generate_text(&greedy()).unwrap();
    let core = ServingCore::start(Arc::clone(&engine), ServingConfig::new(&engine, 2)).unwrap();
    let (_, served) = collect(core.submit(ServeRequest::new(&engine, &greedy()).unwrap()).unwrap()).unwrap();
    (owned.tokens, served.tokens)
}

/// The adapter at scale 1 changes the greedy tokens, in every kind of context the engine makes
/// (a session, an owned session, a serving core); at scale 0 it changes none of them.
#[test]
fn an_adapter_at_scale_one_changes_greedy_tokens_and_at_scale_zero_changes_none() {
    let base = tokens(&load(Vec::new()));
    assert_eq!(base.len(), TOKENS, "the base model generates {TOKENS} tokens: {base:?}");

    let adapted_engine = load(vec![LoraConfig::new(adapter())]);
    let adapted = tokens(&adapted_engine);
    assert_ne!(adapted, base, "the adapter at scale 1 left every greedy token as it was");
    let (owned, served) = owned_and_served(adapted_engine);
    assert_eq!(owned, adapted, "an owned session applies the adapter too");
    assert_eq!(served, adapted, "a serving core applies the adapter too");

    let zero = load(vec![LoraConfig::new(adapter()).scale(0.0)]);
    assert_eq!(tokens(&zero), base, "the adapter at scale 0 changed the greedy tokens");
    let (owned, served) = owned_and_served(zero);
    assert_eq!((owned, served), (base.clone(), base), "owned sessions and serving cores at scale 0");
}

/// [`SessionConfig::lora_scales`] sets one session's scales: an engine's adapter left out of one
/// session, and an adapter loaded at scale 0 applied in another; a list of another length is
/// refused by name, when the session is made and when the engine's own sessions would be.
#[test]
fn sessions_can_apply_the_adapters_at_scales_of_their_own() {
    let base = tokens(&load(Vec::new()));
    let engine = load(vec![LoraConfig::new(adapter())]);
    let adapted = tokens(&engine);
    assert_ne!(adapted, base);
    assert_eq!(tokens_with(&engine, &scales(&engine, &[0.0])), base, "a session at scale 0 is the base model");
    assert_eq!(tokens(&engine), adapted, "the engine's other sessions keep its scale");

    let zero = load(vec![LoraConfig::new(adapter()).scale(0.0)]);
    assert_eq!(tokens_with(&zero, &scales(&zero, &[1.0])), adapted, "a session at scale 1 of an engine at scale 0");

    for wrong in [vec![], vec![1.0, 1.0]] {
        match engine.session_with(&scales(&engine, &wrong)) {
            Err(EngineError::InvalidConfig { field: "lora_scales", .. }) => {}
            other => panic!("{wrong:?}: {other:?}"),
        }
    }
    match engine.session_with(&scales(&engine, &[f32::NAN])) {
        Err(EngineError::InvalidConfig { field: "lora_scales", .. }) => {}
        other => panic!("NaN: {other:?}"),
    }
    let mut bad_default = config(vec![LoraConfig::new(adapter())]);
    bad_default.session.lora_scales = Some(vec![1.0, 0.5]);
    match Engine::load(bad_default) {
        Err(EngineError::InvalidConfig { field: "lora_scales", .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// `request` at adapter `scales` of its own ([`GenerateOptions::lora_scales`]).
fn at_scales(mut request: GenerateRequest, scales: &[f32]) -> GenerateRequest {
    request.options.lora_scales = Some(scales.to_vec());
    request
}

/// [`GenerateOptions::lora_scales`]: requests at other scales, served together by one serving
/// core (submitted at once, so that they share its steps), each get at every step the tokens of
/// a session made with their scales, and a request without scales the engine's; a session
/// applies a request's scales to that request only (the cache it decoded is not reused at other
/// scales); a list of another length is refused by name.
#[test]
fn requests_apply_the_adapters_at_scales_of_their_own_beside_each_other() {
    let engine = Arc::new(load(vec![LoraConfig::new(adapter())]));
    let references: Vec<(f32, Vec<Token>)> = [0.0, 1.0, -0.5].into_iter().map(|s| (s, tokens_with(&engine, &scales(&engine, &[s])))).collect();
    assert_ne!(references[0].1, references[1].1, "the adapter changes nothing at scale 1");
    assert_ne!(references[1].1, references[2].1, "scales 1 and -0.5 give the same tokens");

    let core = ServingCore::start(Arc::clone(&engine), ServingConfig::new(&engine, 4)).unwrap();
    let submit = |request: &GenerateRequest| core.submit(ServeRequest::new(&engine, request).unwrap()).unwrap();
    let streams: Vec<_> = references.iter().map(|(s, _)| submit(&at_scales(greedy(), &[*s]))).collect();
    let engines_own = submit(&greedy());
    for ((scale, reference), stream) in references.iter().zip(streams) {
        let (_, served) = collect(stream).unwrap();
        assert_eq!(&served.tokens, reference, "served at scale {scale} beside the others");
    }
    assert_eq!(collect(engines_own).unwrap().1.tokens, references[1].1, "a request without scales gets the engine's (1)");
    // The core's default scales, for requests without their own.
    assert_eq!(core.adapter_scales(), [1.0]);
    core.set_adapter_scales(vec![0.0]).unwrap();
    assert_eq!(collect(submit(&greedy())).unwrap().1.tokens, references[0].1, "a request without scales after set_adapter_scales(0)");
    for wrong in [vec![], vec![1.0, 1.0], vec![f32::NAN]] {
        match core.set_adapter_scales(wrong.clone()) {
            Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
            other => panic!("{wrong:?}: {other:?}"),
        }
    }

    // Each generation's tokens, and the prompt tokens it took from the cache.
    let generate = |session: &mut Session<'_>, request: &GenerateRequest| {
        let mut generation = session.generate(request).unwrap();
        while let Some(delta) = generation.next_text() {
            delta.unwrap();
        }
        (generation.tokens().to_vec(), generation.stats().prompt_tokens_reused)
    };
    let mut session = engine.session().unwrap();
    assert_eq!(generate(&mut session, &at_scales(greedy(), &[0.0])).0, references[0].1, "a session's request at scale 0");
    assert_eq!(generate(&mut session, &greedy()), (references[1].1.clone(), 0), "the next request, at the session's scale: nothing reused");
    assert_eq!(generate(&mut session, &at_scales(greedy(), &[-0.5])).0, references[2].1, "a session's request at scale -0.5");

    // A saved state records the scales its cache was decoded with: restored, it serves requests
    // of those scales (and no other). Backend `crate` cannot save states as bytes.
    if Engine::backend_name() != "crate" {
        let saved = session.save_state().unwrap();
        assert_eq!(saved.adapter_scales(), [-0.5]);
        let saved = SessionState::from_bytes(&saved.to_bytes()).unwrap();
        assert_eq!(saved.adapter_scales(), [-0.5], "the scales through bytes");
        let mut restored = engine.session().unwrap();
        restored.restore_state(&saved).unwrap();
        let (tokens, reused) = generate(&mut restored, &at_scales(greedy(), &[-0.5]));
        assert_eq!(tokens, references[2].1);
        assert!(reused > 0, "the restored cache served nothing at its own scales");
        restored.restore_state(&saved).unwrap();
        assert_eq!(generate(&mut restored, &greedy()), (references[1].1.clone(), 0), "a restored cache of other scales reused");
    }

    for wrong in [vec![], vec![1.0, 1.0]] {
        match ServeRequest::new(&engine, &at_scales(greedy(), &wrong)) {
            Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
            other => panic!("{wrong:?}: {:?}", other.map(|_| ())),
        }
    }
    match ServeRequest::new(&engine, &at_scales(greedy(), &[f32::INFINITY])) {
        Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
        other => panic!("infinity: {:?}", other.map(|_| ())),
    }
}

/// Several adapters apply together where the backend can (an adapter at scale 0 beside one at
/// scale 1 is that one alone); backend `crate` applies one at a time, and refuses more.
#[test]
fn several_adapters_apply_together_or_are_refused_by_name() {
    let (base, single) = (tokens(&load(Vec::new())), tokens(&load(vec![LoraConfig::new(adapter())])));
    assert_ne!(single, base);
    let two = Engine::load(config(vec![LoraConfig::new(adapter()), LoraConfig::new(adapter()).scale(0.0)]));
    if Engine::backend_name() == "crate" {
        match two {
            Err(EngineError::Unsupported { what, backend: "crate" }) => assert!(what.contains("LoRA"), "{what}"),
            other => panic!("{other:?}"),
        }
        return;
    }
    let two = two.unwrap();
    assert_eq!(tokens(&two), single, "scales [1, 0] are the first adapter alone");
    assert_eq!(tokens_with(&two, &scales(&two, &[0.0, 1.0])), single, "scales [0, 1] are the second (the same file) alone");
    assert_eq!(tokens_with(&two, &scales(&two, &[0.0, 0.0])), base, "scales [0, 0] are the base model");
}

/// A missing adapter file, a file that is a model rather than an adapter, and an adapter made
/// for another architecture are each [`EngineError::Lora`] naming the file; a scale that is
/// not finite is refused before anything loads.
#[test]
fn a_missing_or_foreign_adapter_is_a_lora_error_naming_its_file() {
    let lora_error = |lora: &Path, base: &str| match Engine::load(config(vec![LoraConfig::new(lora)]).model(synth(base))) {
        Err(e @ EngineError::Lora { .. }) => {
            let EngineError::Lora { path, .. } = &e else { unreachable!() };
            assert_eq!(path, lora);
            assert!(e.to_string().contains(&lora.display().to_string()), "{e}");
            e.to_string()
        }
        other => panic!("{} on {base}: {other:?}", lora.display()),
    };
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-adapter.gguf");
    let _ = std::fs::remove_file(&missing);
    let message = lora_error(&missing, "llama-tiny.gguf");
    assert!(message.contains("not found"), "{message}");
    lora_error(&synth("llama-tiny.gguf"), "llama-tiny.gguf");
    lora_error(&adapter(), "mamba-tiny.gguf");

    match Engine::load(config(vec![LoraConfig::new(adapter()).scale(f32::INFINITY)])) {
        Err(EngineError::InvalidConfig { field: "lora", .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Embeddings apply the adapters at the scales the call gives ([`EmbedOptions::lora_scales`]),
/// else at the engine's: at scale 0 the vector is the base model's.
#[test]
fn embeddings_apply_the_adapters_at_the_calls_scales() {
    let base = load(Vec::new()).embed(PROMPT).unwrap();
    let engine = load(vec![LoraConfig::new(adapter()).scale(0.0)]);
    assert_eq!(engine.embed(PROMPT).unwrap(), base, "loaded at scale 0");
    let at = |scale: f32| engine.embed_many_with(&[PROMPT], &EmbedOptions::default().lora_scales(vec![scale])).unwrap().remove(0);
    assert_eq!(at(0.0), base);
    let adapted = at(1.0);
    assert_ne!(adapted, base, "the adapter at scale 1 left the embedding as it was");
    assert_eq!(load(vec![LoraConfig::new(adapter())]).embed(PROMPT).unwrap(), adapted, "loaded at scale 1");
}

/// An adapter's file metadata is readable ([`Engine::lora_meta`]: llama-tiny-lora declares a
/// task name and a prompt prefix), except on backend `crate`, which reads none. An activated
/// LoRA (aLoRA, llama-tiny-alora: the same weights with invocation tokens) loads, and says its
/// invocation where the backend can read it (not `crate`): a prompt without the invocation gets
/// the base model's tokens, one with it others, in a session and in a serving core alike, and
/// its session state carries where the adapter applied from through bytes; two such adapters
/// enabled in one request are refused by name (`http.rs` compares every token with
/// llama-server's).
#[test]
fn adapter_metadata_is_read_and_an_activated_lora_applies_from_its_invocation() {
    let engine = load(vec![LoraConfig::new(adapter())]);
    let (task, prefix) = (engine.lora_meta(0, "adapter.lora.task_name"), engine.lora_meta(0, "adapter.lora.prompt_prefix"));
    assert_eq!(engine.lora_meta(0, "adapter.no_such_key"), None);
    assert_eq!(engine.lora_meta(1, "adapter.lora.task_name"), None, "no adapter 1");
    assert!(engine.lora_invocation(0).is_empty() && engine.lora_invocation(1).is_empty(), "a plain adapter");
    let alora = load(vec![LoraConfig::new(synth("llama-tiny-alora.gguf"))]);
    if Engine::backend_name() == "crate" {
        assert_eq!((task, prefix), (None, None));
        assert!(alora.lora_invocation(0).is_empty());
        return;
    }
    assert_eq!(task.as_deref(), Some("tiny-story"));
    assert_eq!(prefix.as_deref(), Some("Story: "));
    assert_eq!(alora.lora_invocation(0), [Token(106), Token(2364)]);

    let base = load(Vec::new());
    let invoked = format!("{PROMPT}<end_of_turn>user\nGo on");
    // The greedy tokens of `prompt` (control-token text parsed) in `session`, and its stats.
    let generate_in = |session: &mut Session<'_>, prompt: &str| {
        let mut request = greedy();
        request.prompt = Prompt::Text { text: prompt.to_owned(), specials: SpecialText::Parse };
        let mut generation = session.generate(&request).unwrap();
        while let Some(delta) = generation.next_text() {
            delta.unwrap();
        }
        (generation.tokens().to_vec(), generation.stats().clone())
    };
    // Those of a new session, and its state after.
    let run = |engine: &Engine, prompt: &str| {
        let mut session = engine.session().unwrap();
        let (tokens, _) = generate_in(&mut session, prompt);
        (tokens, session.save_state().unwrap())
    };
    assert_eq!(run(&alora, PROMPT).0, run(&base, PROMPT).0, "the adapter applied without its invocation");
    let (with, state) = run(&alora, &invoked);
    assert_eq!(with.len(), TOKENS);
    assert_ne!(with, run(&base, &invoked).0, "the adapter changed nothing after its invocation");
    let restored = SessionState::from_bytes(&state.to_bytes()).unwrap();
    assert_eq!(restored.activation(), state.activation());
    let (at, scales) = state.activation().expect("the state says where the adapter applied from");
    assert_eq!((state.adapter_scales(), scales), (vec![0.0], vec![1.0]));
    assert_eq!(state.tokens()[at + 1..at + 3], [Token(106), Token(2364)], "from the token before the invocation");
    // Restored, it serves the same prompt up to its last token, the adapter's cells included.
    let mut session = alora.session().unwrap();
    session.restore_state(&restored).unwrap();
    let (again, stats) = generate_in(&mut session, &invoked);
    assert_eq!((again, stats.prompt_tokens_reused), (with, stats.prompt_tokens - 1));

    let two = load(vec![LoraConfig::new(synth("llama-tiny-alora.gguf")), LoraConfig::new(synth("llama-tiny-alora.gguf"))]);
    let mut session = two.session().unwrap();
    match session.generate(&greedy()) {
        Err(EngineError::InvalidRequest { field: "lora_scales", .. }) => {}
        other => panic!("two activated adapters: {:?}", other.map(|_| ())),
    }
}

/// Reading the file instead of mapping it gives the same model: the same greedy tokens. On
/// Linux the mapping is seen in `/proc/self/maps` (of a copy of the model that no other test
/// loads): there while a mapped model lives, never for a read one.
#[test]
fn a_model_read_without_mmap_gives_the_same_greedy_tokens() {
    let copy = Path::new(env!("CARGO_TARGET_TMPDIR")).join("load-options-mmap-llama-tiny.gguf");
    std::fs::copy(synth("llama-tiny.gguf"), &copy).unwrap();
    let with = |mmap: bool| {
        let mut config = config(Vec::new()).model(copy.clone());
        // On the CPU, where the weights are read from the mapping for as long as the model lives.
        config.placement.n_gpu_layers = 0;
        config.load.mmap = mmap;
        Engine::load(config).unwrap()
    };
    let mapped_now = || cfg!(target_os = "linux").then(|| std::fs::read_to_string("/proc/self/maps").unwrap().contains(copy.to_str().unwrap()));
    let mapped = with(true);
    let mapped_tokens = tokens(&mapped);
    assert_ne!(mapped_now(), Some(false), "a model loaded with mmap is not mapped");
    drop(mapped);
    let read = with(false);
    assert_ne!(mapped_now(), Some(true), "a model loaded without mmap is mapped");
    assert_eq!(tokens(&read), mapped_tokens);
    assert!(LoadOptions::default().mmap && !LoadOptions::default().mlock, "llama.cpp's defaults");
}

/// The progress callback sees values within 0..=1 that never decrease and end at 1; one that
/// panics has its panic resumed after the load (never unwinding into llama.cpp, which would
/// abort the process).
#[test]
fn a_progress_callback_sees_increasing_values_ending_at_one() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut config = config(Vec::new());
    let record = Arc::clone(&seen);
    config.load.progress = Some(LoadProgress::new(move |p| {
        record.lock().unwrap().push(p);
        true
    }));
    assert_eq!(format!("{:?}", config.load.progress.as_ref().unwrap()), "LoadProgress(..)");
    let engine = Engine::load(config.clone()).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the callback was never called");
    assert!(seen.iter().all(|p| (0.0..=1.0).contains(p)), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went back: {seen:?}");
    assert_eq!(seen.last(), Some(&1.0), "{seen:?}");
    assert_eq!(tokens(&engine), tokens(&load(Vec::new())), "a load with a callback is the same model");

    config.load.progress = Some(LoadProgress::new(|_| panic!("a panicking progress callback")));
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Engine::load(config))).unwrap_err();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"a panicking progress callback"));
}

/// A callback returning false cancels the load: [`EngineError::Load`] saying so, after which the
/// same model loads again.
#[test]
fn a_progress_callback_returning_false_cancels_the_load() {
    let calls = Arc::new(Mutex::new(0));
    let mut config = config(Vec::new());
    let count = Arc::clone(&calls);
    config.load.progress = Some(LoadProgress::new(move |_| {
        *count.lock().unwrap() += 1;
        false
    }));
    match Engine::load(config.clone()) {
        Err(e @ EngineError::Load { .. }) => {
            assert!(e.to_string().contains("cancelled by the progress callback"), "{e}");
            let EngineError::Load { path, .. } = e else { unreachable!() };
            assert_eq!(path, config.model);
        }
        other => panic!("{other:?}"),
    }
    assert!(*calls.lock().unwrap() >= 1);
    config.load.progress = None;
    Engine::load(config).unwrap();
}
