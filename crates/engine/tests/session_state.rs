//! A session's cache saved (as bytes or a file) and restored into another session: the restored
//! session continues exactly as the saved one does, decoding only what is new; damaged or
//! foreign states are typed errors that leave the cache empty. Runs on every backend: where
//! states as bytes are not served, the refusal is what is checked.

use std::sync::Arc;

use exsa_engine::*;

fn engine() -> Arc<Engine> {
    let path = default_model_path();
    assert!(path.is_file(), "default model missing at {}: run `cargo xtask fetch-model`", path.display());
    let mut config = EngineConfig::new(path);
    config.session = SessionConfig::default().n_ctx(512).n_batch(256).n_ubatch(256).n_threads(2).n_threads_batch(2);
    Arc::new(Engine::load(config).expect("engine loads"))
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(prompt).max_tokens(max_tokens).sampling(SamplingParams::greedy())
}

const PROMPT: &str = "The history of the printing press begins";

/// A saved state, or None where the backend refuses states as bytes (`crate` only, and only
/// with an error that says so).
fn supported(saved: Result<SessionState, EngineError>) -> Option<SessionState> {
    match saved {
        Ok(saved) => Some(saved),
        Err(EngineError::Unsupported { what, .. }) if Engine::backend_name() == "crate" => {
            assert!(what.contains("bytes"), "{what}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The saved session's own continuation, and the number of its cached tokens.
/// `SessionState::to_bytes`'s layout around llama.cpp's `state`: `tokens` (the model has no
/// adapters: no scales, no activated LoRA's position and scales).
fn state_bytes(tokens: &[i32], state: &[u8]) -> Vec<u8> {
    let mut bytes = b"exsa\0st3".to_vec();
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(state);
    bytes
}

/// The length of [`state_bytes`]' header for `tokens` tokens.
fn header_len(tokens: usize) -> usize {
    8 + 8 + 4 * tokens + 8 + 8 + 8
}

fn continued(session: &mut Session<'_>, next: &str) -> (String, GenerationStats) {
    session.generate_text(&greedy(next, 16)).unwrap()
}

#[test]
fn a_state_saved_as_bytes_continues_in_another_session_as_in_the_first() {
    let engine = engine();
    let mut first = engine.session().unwrap();
    let (reply, _) = first.generate_text(&greedy(PROMPT, 12)).unwrap();
    let cached = first.cached_tokens();
    let Some(saved) = supported(first.save_state()) else { return };
    assert_eq!(saved.tokens().len(), cached);
    let bytes = saved.to_bytes();
    let read = SessionState::from_bytes(&bytes).unwrap();
    assert_eq!(read, saved);

    let next = format!("{PROMPT}{reply} In the centuries that followed,");
    let (expected, first_stats) = continued(&mut first, &next);
    let mut second = engine.session().unwrap();
    second.restore_state(&read).unwrap();
    assert_eq!(second.cached_tokens(), cached);
    let (text, stats) = continued(&mut second, &next);
    // The same cells and the same suffix decoded over them: the same computation.
    assert_eq!(text, expected);
    assert_eq!(stats.prompt_tokens_reused, first_stats.prompt_tokens_reused);
    assert!(stats.prompt_tokens_reused >= cached - 1, "reused {} of {cached}", stats.prompt_tokens_reused);
}

#[test]
fn damaged_or_foreign_states_are_refused_and_leave_the_cache_empty() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    session.generate_text(&greedy(PROMPT, 4)).unwrap();
    let Some(saved) = supported(session.save_state()) else { return };
    let bytes = saved.to_bytes();
    // Not a state of exsa, or of its earlier format; a buffer shorter than its token count,
    // than its scale count, than the activated LoRA's position or its scale count.
    let mut earlier = bytes.clone();
    earlier[..8].copy_from_slice(b"exsa\0st2");
    let mut scales = state_bytes(&[], &[]);
    scales.truncate(16);
    scales.extend_from_slice(&1000u64.to_le_bytes());
    let mut activation = state_bytes(&[], &[]);
    activation.truncate(24);
    let no_position = activation.clone();
    activation.extend_from_slice(&3u64.to_le_bytes());
    activation.extend_from_slice(&1000u64.to_le_bytes());
    let damaged_states = [
        (b"GGUF and more".to_vec(), "header"),
        (earlier, "header"),
        (bytes[..20].to_vec(), "token count"),
        (scales, "scale count"),
        (no_position, "activation's position"),
        (activation, "activation's scale count"),
    ];
    for (damaged, why) in damaged_states {
        match SessionState::from_bytes(&damaged) {
            Err(e @ EngineError::State { .. }) => assert!(e.to_string().contains(why), "{e}"),
            other => panic!("{other:?}"),
        }
    }
    // Cut short inside llama.cpp's part: its reader fails (no abort), the cache is emptied.
    let cut = SessionState::from_bytes(&bytes[..bytes.len() - 100]).unwrap();
    let mut other = engine.session().unwrap();
    other.generate_text(&greedy("Water boils at", 4)).unwrap();
    assert!(matches!(other.restore_state(&cut), Err(EngineError::State { .. })));
    assert_eq!(other.cached_tokens(), 0);
    // More tokens than the context holds (the token list rewritten around the real state).
    let state = &bytes[header_len(saved.tokens().len())..];
    assert_eq!(state_bytes(&saved.tokens().iter().map(|t| t.0).collect::<Vec<_>>(), state), bytes, "the layout as to_bytes writes it");
    let long = state_bytes(&vec![2; other.n_ctx() as usize + 1], state);
    let e = other.restore_state(&SessionState::from_bytes(&long).unwrap()).unwrap_err();
    assert!(e.to_string().contains("more than the context"), "{e}");
    // A token list that does not match the state's positions.
    let short = state_bytes(&[saved.tokens()[0].0], state);
    let e = other.restore_state(&SessionState::from_bytes(&short).unwrap()).unwrap_err();
    assert!(e.to_string().contains("positions"), "{e}");
    assert_eq!(other.cached_tokens(), 0);
    // The real one still restores.
    other.restore_state(&saved).unwrap();
    assert_eq!(other.cached_tokens(), saved.tokens().len());
}

#[test]
fn a_state_file_restores_into_a_session_and_an_owned_session() {
    let engine = engine();
    let dir = std::env::temp_dir().join(format!("exsa-session-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("session.bin");
    let mut first = engine.session().unwrap();
    let (reply, _) = first.generate_text(&greedy(PROMPT, 12)).unwrap();
    let saved = first.save_state_file(&file).unwrap();
    assert_eq!(saved.tokens, first.cached_tokens());
    assert!(saved.bytes > 0);
    let next = format!("{PROMPT}{reply} In the centuries that followed,");
    let (expected, _) = continued(&mut first, &next);

    let mut second = engine.session().unwrap();
    assert_eq!(second.restore_state_file(&file).unwrap().tokens, saved.tokens);
    assert_eq!(continued(&mut second, &next).0, expected);

    let owned = engine.owned_session().unwrap();
    assert_eq!(owned.restore_state_file(&file).unwrap().tokens, saved.tokens);
    let (text, completion) = owned.generate_text(&greedy(&next, 16)).unwrap();
    assert_eq!(text, expected);
    assert!(completion.stats.prompt_tokens_reused > 0, "{:?}", completion.stats);
    // A file that is no state: a typed error naming it.
    std::fs::write(dir.join("bad.bin"), b"not a state").unwrap();
    let e = owned.restore_state_file(dir.join("bad.bin")).unwrap_err();
    assert!(matches!(e, EngineError::SlotFile { .. }) && e.to_string().contains("bad.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_owned_session_saves_and_restores_states_as_bytes() {
    let engine = engine();
    let owned = engine.owned_session().unwrap();
    let (reply, _) = owned.generate_text(&greedy(PROMPT, 12)).unwrap();
    let Some(saved) = supported(owned.save_state()) else { return };
    assert!(!saved.tokens().is_empty());
    let next = format!("{PROMPT}{reply} In the centuries that followed,");
    let (expected, _) = owned.generate_text(&greedy(&next, 16)).unwrap();

    // Into a plain session, and back into a fresh owned one: each continues as the first did,
    // from the restored cache.
    let mut session = engine.session().unwrap();
    session.restore_state(&saved).unwrap();
    assert_eq!(session.cached_tokens(), saved.tokens().len());
    assert_eq!(continued(&mut session, &next).0, expected);
    let fresh = engine.owned_session().unwrap();
    fresh.restore_state(&SessionState::from_bytes(&saved.to_bytes()).unwrap()).unwrap();
    let (text, completion) = fresh.generate_text(&greedy(&next, 16)).unwrap();
    assert_eq!(text, expected);
    assert!(completion.stats.prompt_tokens_reused >= saved.tokens().len() - 1, "{:?}", completion.stats);
    // A state of more tokens than the context holds: a typed error.
    let long = state_bytes(&[0; 1000], &[]);
    let e = fresh.restore_state(&SessionState::from_bytes(&long).unwrap()).unwrap_err();
    assert!(matches!(e, EngineError::State { .. }), "{e}");
}
