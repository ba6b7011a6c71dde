//! The safe wrapper on each kind of model memory, with the random-weight models of `cargo xtask
//! synth-models`: attention only (`llama-tiny`), hybrid (`lfm2-tiny`: short convolutions with a
//! recurrent state, plus attention) and recurrent only (`mamba-tiny`). What a server's slot
//! reuse and speculative decoding's rollback rely on: state save and restore give back exactly
//! the same continuation, and a cut of the cache to an earlier position either happens or is
//! refused without touching the state.

use std::path::PathBuf;

use llama::*;

const MODELS: [&str; 3] = ["llama-tiny", "lfm2-tiny", "mamba-tiny"];

fn load(name: &str) -> Model {
    let dir = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("EXSA_SYNTH_MODELS is set by .cargo/config.toml"));
    let path = dir.join(format!("{name}.gguf"));
    assert!(path.is_file(), "synthetic model missing at {}: run `cargo xtask synth-models`", path.display());
    Model::load(&path, &ModelParams::default()).unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

fn params(n_seq_max: u32) -> ContextParams {
    ContextParams::default().n_ctx(256).n_batch(64).n_ubatch(64).n_seq_max(n_seq_max).n_threads(2).n_threads_batch(2)
}

/// With `recurrent_snapshots`, the memory can be cut back by up to that many positions where
/// llama.cpp supports it.
fn with_snapshots(n: u32) -> ContextParams {
    params(1).recurrent_snapshots(n)
}

fn prompt(model: &Model) -> Vec<Token> {
    model.vocab().tokenize("The quick brown fox jumps over the lazy dog", TokenizeOptions::default()).unwrap()
}

/// `n` greedy tokens of sequence `seq` after the last decode, continuing at `pos`.
fn greedy(ctx: &mut Context<'_>, seq: SeqId, mut pos: Pos, n: usize) -> Vec<Token> {
    let mut sampler = SamplerChain::new().greedy().build(ctx.model()).unwrap();
    let mut batch = Batch::new(1, 1).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let token = sampler.sample_last(ctx).unwrap();
        out.push(token);
        batch.clear();
        batch.add_output(token, pos, seq).unwrap();
        ctx.decode(&batch).unwrap();
        pos += 1;
    }
    out
}

/// A saved state holds the memory (KV cache, recurrent state), not the last decode's outputs:
/// it is saved before the prompt's last token, which is decoded again after a restore. That
/// works on every memory kind, recurrent included, where nothing can be cut back.
#[test]
fn a_restored_state_continues_exactly_as_the_original() {
    for name in MODELS {
        let model = load(name);
        let mut ctx = Context::new(&model, &params(1)).unwrap();
        let tokens = prompt(&model);
        let (head, last) = tokens.split_at(tokens.len() - 1);
        let n = tokens.len() as Pos;
        ctx.decode(&Batch::from_tokens(head, 0, 0).unwrap()).unwrap();
        let whole = ctx.save_state().unwrap();
        let sequence = ctx.save_sequence_state(0).unwrap();
        ctx.decode(&Batch::from_tokens(last, n - 1, 0).unwrap()).unwrap();
        let original = greedy(&mut ctx, 0, n, 8);

        ctx.clear_memory(MemoryData::Zero);
        ctx.load_state(&whole).unwrap();
        assert_eq!(ctx.max_position(0).unwrap(), Some(n - 2), "{name}: whole state");
        ctx.decode(&Batch::from_tokens(last, n - 1, 0).unwrap()).unwrap();
        assert_eq!(greedy(&mut ctx, 0, n, 8), original, "{name}: whole state");

        ctx.clear_memory(MemoryData::Zero);
        ctx.load_sequence_state(&sequence, 0).unwrap();
        ctx.decode(&Batch::from_tokens(last, n - 1, 0).unwrap()).unwrap();
        assert_eq!(greedy(&mut ctx, 0, n, 8), original, "{name}: sequence state");
    }
}

/// Cutting the cache back: attention memory can drop any tail; a recurrent state holds only its
/// latest position, so llama.cpp refuses any cut that is not the whole sequence, and the refused
/// call leaves the state as it was. Callers (the engine's prefix reuse, a server's slots, a
/// speculative rollback) must then decode again from the start or restore a saved state.
#[test]
fn a_cut_back_is_done_on_attention_and_refused_on_recurrent_memory() {
    for name in MODELS {
        let model = load(name);
        let recurrent = name != "llama-tiny";
        let tokens = prompt(&model);
        let n = tokens.len() as Pos;
        let mut ctx = Context::new(&model, &params(1)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        let original = greedy(&mut ctx, 0, n, 6);

        let mut ctx = Context::new(&model, &params(1)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        let extra = greedy(&mut ctx, 0, n, 3);
        // Drop the three generated tokens (positions n..n+3), as a rejected draft would be.
        let cut = ctx.remove_range(0, n, -1).unwrap();
        assert_eq!(cut, !recurrent, "{name}");
        if cut {
            assert_eq!(ctx.max_position(0).unwrap(), Some(n - 1), "{name}");
            ctx.remove_range(0, n - 1, -1).unwrap();
            ctx.decode(&Batch::from_tokens(&tokens[tokens.len() - 1..], n - 1, 0).unwrap()).unwrap();
            assert_eq!(greedy(&mut ctx, 0, n, 6), original, "{name}: after the cut");
        } else {
            // Refused: the state still ends after the extra tokens, and goes on from there.
            assert_eq!(ctx.max_position(0).unwrap(), Some(n + 2), "{name}");
            let mut whole = tokens.clone();
            whole.extend(&extra);
            let mut fresh = Context::new(&model, &params(1)).unwrap();
            fresh.decode(&Batch::from_tokens(&whole, 0, 0).unwrap()).unwrap();
            assert_eq!(greedy(&mut ctx, 0, n + 3, 4), greedy(&mut fresh, 0, n + 3, 4), "{name}: after the refused cut");
        }
        // With snapshots, LFM2's hybrid memory can drop the last tokens of its last decode,
        // which is what speculative decoding needs: a draft is verified in one decode and its
        // rejected tail dropped. Mamba's cannot (llama.cpp has no snapshots for it).
        let mut ctx = Context::new(&model, &with_snapshots(4)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        ctx.decode(&Batch::from_tokens(&original[..3], n, 0).unwrap()).unwrap();
        let rewound = ctx.remove_range(0, n + 1, -1).unwrap();
        assert_eq!(rewound, name != "mamba-tiny", "{name}: cut back with snapshots");
        if rewound {
            assert_eq!(ctx.max_position(0).unwrap(), Some(n), "{name}");
            ctx.decode(&Batch::from_tokens(&original[1..2], n + 1, 0).unwrap()).unwrap();
            assert_eq!(greedy(&mut ctx, 0, n + 2, 4), original[2..6].to_vec(), "{name}: after the rollback");
        }
        // A cut to before the last decode would restore a stale snapshot (llama.cpp accepts it
        // and goes on with a wrong state): the wrapper refuses it, and the state goes on as it was.
        let mut ctx = Context::new(&model, &with_snapshots(4)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        let head = greedy(&mut ctx, 0, n, 3);
        assert_eq!(head, original[..3].to_vec(), "{name}");
        assert_eq!(ctx.remove_range(0, n + 1, -1).unwrap(), !recurrent, "{name}: a cut across decodes");

        // A cut after all the sequence holds removes nothing and is let through on every kind,
        // also when the last decode was another sequence's (no snapshot of this one's involved).
        // (The first cut uses up the sequence's snapshot floor: the second has none.)
        let end = ctx.max_position(0).unwrap().unwrap();
        for _ in 0..2 {
            assert!(ctx.remove_range(0, end + 1, -1).unwrap(), "{name}: a cut after the end");
            assert_eq!(ctx.max_position(0).unwrap(), Some(end), "{name}");
        }

        // Removing the whole sequence works on every kind.
        assert!(ctx.remove_range(0, -1, -1).unwrap(), "{name}");
        assert_eq!(ctx.max_position(0).unwrap(), None, "{name}");
    }
}

/// A recurrent checkpoint returns a sequence that went on to an earlier position: its recurrent
/// state from the checkpoint, its attention cells cut there. What a server's multi-turn reuse
/// relies on (the next turn's prompt extends the last turn's prompt, not its reply), so the
/// continuation from the restored sequence is the one a fresh decode gives, every step of it.
#[test]
fn a_recurrent_checkpoint_returns_the_sequence_to_where_it_was_taken() {
    for name in MODELS {
        let model = load(name);
        let tokens = prompt(&model);
        let n = tokens.len() as Pos;
        let split = tokens.len() / 2;
        let mut ctx = Context::new(&model, &params(2)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens[..split], 0, 0).unwrap()).unwrap();
        let checkpoint = match ctx.save_recurrent_checkpoint(0) {
            Err(StateError::NotRecurrent) if name == "llama-tiny" => continue,
            other => other.unwrap_or_else(|e| panic!("{name}: {e}")),
        };
        assert_eq!(checkpoint.positions(), split as Pos, "{name}");
        assert!(checkpoint.size() > 0, "{name}");
        // The sequence goes on elsewhere (a reply), then comes back to the checkpoint.
        ctx.decode(&Batch::from_tokens(&tokens[split..], split as Pos, 0).unwrap()).unwrap();
        let original = greedy(&mut ctx, 0, n, 6);
        ctx.restore_recurrent_checkpoint(0, &checkpoint).unwrap();
        assert_eq!(ctx.max_position(0).unwrap(), Some(split as Pos - 1), "{name}: cut to the checkpoint");
        ctx.decode(&Batch::from_tokens(&tokens[split..], split as Pos, 0).unwrap()).unwrap();
        assert_eq!(greedy(&mut ctx, 0, n, 6), original, "{name}: after the restore");

        // Into another sequence of the same context, holding the same first tokens (copied).
        ctx.remove_range(1, -1, -1).unwrap();
        ctx.copy_range(0, 1, -1, -1).unwrap();
        ctx.restore_recurrent_checkpoint(1, &checkpoint).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens[split..], split as Pos, 1).unwrap()).unwrap();
        assert_eq!(greedy(&mut ctx, 1, n, 6), original, "{name}: restored into a copy");

        // Refused: a sequence that does not reach the checkpoint, another context's checkpoint.
        ctx.remove_range(1, -1, -1).unwrap();
        assert!(matches!(ctx.restore_recurrent_checkpoint(1, &checkpoint), Err(StateError::CheckpointAhead { held: 0, .. })), "{name}");
        let mut other = Context::new(&model, &params(2)).unwrap();
        other.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        assert!(matches!(other.restore_recurrent_checkpoint(0, &checkpoint), Err(StateError::ForeignCheckpoint)), "{name}");
        assert!(matches!(ctx.save_recurrent_checkpoint(1), Err(StateError::Empty)), "{name}: an empty sequence");
    }
}

/// A sequence returned to a checkpoint right after a decode (a speculating slot whose drafts were
/// rejected) leaves that decode's outputs as they were: the other sequences of the batch still
/// draw from them.
#[test]
fn a_checkpoint_restore_leaves_the_last_decodes_outputs() {
    for name in ["lfm2-tiny", "mamba-tiny"] {
        let model = load(name);
        let tokens = prompt(&model);
        let n = tokens.len() as Pos;
        let mut ctx = Context::new(&model, &params(2)).unwrap();
        for seq in [0, 1] {
            ctx.decode(&Batch::from_tokens(&tokens, 0, seq).unwrap()).unwrap();
        }
        let checkpoint = ctx.save_recurrent_checkpoint(0).unwrap();
        let mut batch = Batch::new(4, 2).unwrap();
        batch.add(tokens[1], n, &[0], Output::Compute).unwrap();
        batch.add(tokens[2], n, &[1], Output::Compute).unwrap();
        ctx.decode(&batch).unwrap();
        let rows: Vec<Vec<f32>> = (0..2).map(|i| ctx.logits(i).unwrap().to_vec()).collect();
        ctx.restore_recurrent_checkpoint(0, &checkpoint).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let after = ctx.logits(i as i32).unwrap_or_else(|e| panic!("{name}: output {i} after the restore: {e}"));
            assert_eq!(after, &row[..], "{name}: output {i} after the restore");
        }
    }
}

/// Two sequences verified in one decode (a serving step with two speculating slots) each drop
/// their own rejected tail: a cut of one does not take the other's snapshots (LFM2; on Mamba,
/// which has none, both are refused), and each goes on as a run that never decoded its tail.
#[test]
fn sequences_of_one_decode_each_drop_their_own_tail() {
    for name in ["lfm2-tiny", "mamba-tiny"] {
        let model = load(name);
        let tokens = prompt(&model);
        let n = tokens.len() as Pos;
        let mut ctx = Context::new(&model, &params(1)).unwrap();
        ctx.decode(&Batch::from_tokens(&tokens, 0, 0).unwrap()).unwrap();
        let original = greedy(&mut ctx, 0, n, 6);

        // llama.cpp keeps a sequence's last snapshots+1 tokens in one micro-batch and asserts so:
        // more snapshots than that is a parameter error, not an abort at the first decode.
        let too_many = params(2).recurrent_snapshots(63);
        assert!(matches!(Context::new(&model, &too_many), Err(ContextError::InvalidParam { name: "recurrent_snapshots", .. })), "{name}");
        let mut ctx = Context::new(&model, &params(2).recurrent_snapshots(4)).unwrap();
        for seq in [0, 1] {
            ctx.decode(&Batch::from_tokens(&tokens, 0, seq).unwrap()).unwrap();
        }
        // One decode: the first generated token and two more after it in each sequence.
        let mut batch = Batch::new(8, 2).unwrap();
        for seq in [0, 1] {
            for (i, &t) in original[..3].iter().enumerate() {
                batch.add(t, n + i as Pos, &[seq], Output::Compute).unwrap();
            }
        }
        ctx.decode(&batch).unwrap();
        let snapshots = ctx.recurrent_snapshots() > 0;
        assert_eq!(snapshots, name == "lfm2-tiny", "{name}");
        for seq in [0, 1] {
            assert_eq!(ctx.remove_range(seq, n + 1, -1).unwrap(), snapshots, "{name}: sequence {seq}'s cut");
        }
        if snapshots {
            for seq in [0, 1] {
                ctx.decode(&Batch::from_tokens(&original[1..2], n + 1, seq).unwrap()).unwrap();
                assert_eq!(greedy(&mut ctx, seq, n + 2, 4), original[2..6].to_vec(), "{name}: sequence {seq} after its cut");
            }
        }
    }
}
