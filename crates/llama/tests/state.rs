//! Context state beyond one context: a state saved in one context continues exactly in a fresh
//! one, a state file written by another process loads here, and every failure a caller can meet
//! is its own `StateError`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{context, model, temp_path};
use llama::*;

const PROMPT: &str = "The history of the printing press begins";

/// Decodes the prompt into a fresh context; returns it with the prompt's tokens.
fn primed() -> (Context<'static>, Vec<Token>) {
    let mut ctx = context();
    let tokens = model().vocab().tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
    (ctx, tokens)
}

/// `n` greedy tokens after a context that holds `prompt`. The last prompt token is decoded
/// again at its position first: a restored context keeps no outputs, so both the original and
/// the restored one sample from logits computed the same way.
fn continue_greedily(ctx: &mut Context<'_>, prompt: &[Token], n: usize) -> Vec<Token> {
    let last_pos = prompt.len() as i32 - 1;
    ctx.remove_range(0, last_pos, -1).unwrap();
    let mut sampler = SamplerChain::new().greedy().build(model()).unwrap();
    let mut batch = Batch::from_tokens(&prompt[prompt.len() - 1..], last_pos, 0).unwrap();
    let mut out = Vec::new();
    for pos in (last_pos + 1..).take(n) {
        ctx.decode(&batch).unwrap();
        let t = sampler.sample_last(ctx).unwrap();
        out.push(t);
        batch = Batch::from_tokens(&[t], pos, 0).unwrap();
    }
    out
}

#[test]
fn a_saved_state_continues_in_a_fresh_context_exactly_as_in_its_own() {
    let (mut original, tokens) = primed();
    let state = original.save_state().unwrap();
    let want = continue_greedily(&mut original, &tokens, 8);

    let mut fresh = context();
    fresh.load_state(&state).unwrap();
    assert_eq!(fresh.max_position(0).unwrap(), Some(tokens.len() as i32 - 1), "the restored memory holds the prompt");
    assert_eq!(continue_greedily(&mut fresh, &tokens, 8), want);
}

/// Not a test of its own: the writer half of the next test, run in a child process.
#[test]
#[ignore = "run by a_state_file_from_another_process_loads_here"]
fn write_state_file_for_parent() {
    let Some(path) = std::env::var_os("EXSA_STATE_FILE") else { return };
    let (mut ctx, tokens) = primed();
    ctx.save_state_file(Path::new(&path), &tokens).unwrap();
}

#[test]
fn a_state_file_from_another_process_loads_here() {
    let path = temp_path("other-process.state");
    let _ = std::fs::remove_file(&path);
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "write_state_file_for_parent", "--quiet"])
        .env("EXSA_STATE_FILE", &path)
        .status()
        .unwrap();
    assert!(status.success() && path.is_file(), "the writer process failed ({status})");

    let (mut here, tokens) = primed();
    let want = continue_greedily(&mut here, &tokens, 6);
    let mut ctx = context();
    let loaded = ctx.load_state_file(&path, 64).unwrap();
    assert_eq!(loaded, tokens, "the file carries the tokens the other process saved");
    assert_eq!(continue_greedily(&mut ctx, &loaded, 6), want);

    // Fewer token slots than the file holds: the counts, not a bare failure.
    let err = context().load_state_file(&path, 2).unwrap_err();
    assert!(matches!(err, StateError::TooManyTokens { needed, capacity: 2 } if needed == tokens.len()), "{err}");
}

#[test]
fn each_state_failure_a_caller_can_meet_is_its_own_error() {
    let (mut ctx, tokens) = primed();
    // A path C cannot take.
    let nul = Path::new("state\0file");
    assert!(matches!(ctx.save_state_file(nul, &tokens), Err(StateError::InvalidPath(p)) if p == nul));
    assert!(matches!(ctx.load_state_file(nul, 8), Err(StateError::InvalidPath(_))));
    // A folder that does not exist: llama.cpp cannot write there.
    let nowhere = temp_path("no-such-folder").join("x.state");
    assert!(matches!(ctx.save_state_file(&nowhere, &tokens), Err(StateError::Save { path }) if path == nowhere));
    assert!(matches!(ctx.save_sequence_state_file(0, &nowhere, &tokens), Err(StateError::Save { .. })));
    // A missing file, and a file that is not a state.
    assert!(matches!(ctx.load_state_file(&nowhere, 8), Err(StateError::Load { path, .. }) if path == nowhere));
    let junk = temp_path("junk.state");
    std::fs::write(&junk, b"this is not a llama.cpp session file").unwrap();
    let err = ctx.load_state_file(&junk, 8).unwrap_err();
    assert!(matches!(&err, StateError::Load { messages, .. } if !messages.0.is_empty()), "{err}");
    assert!(matches!(ctx.load_sequence_state_file(0, &junk, 8), Err(StateError::Load { .. })));
    // Bytes that are not a state of this context.
    let err = ctx.load_state(&[7u8; 64]).unwrap_err();
    assert!(matches!(err, StateError::Restore { len: 64, .. }), "{err}");
    let err = ctx.load_sequence_state(&[7u8; 64], 0).unwrap_err();
    assert!(matches!(err, StateError::Restore { len: 64, .. }), "{err}");
    // The context is still whole: its own state saves and restores.
    let state = ctx.save_state().unwrap();
    ctx.load_state(&state).unwrap();
}
