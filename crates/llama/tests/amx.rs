//! ggml's AMX kernels, patched at build time (llama-sys build/amx_patch.rs, docs/amx.md), against
//! its AVX-512 ones, on a CPU with AMX; skipped with the reason printed elsewhere.
//!
//! Whether AMX runs is decided once per process (the probe, `EXSA_AMX`), so each side runs in
//! a process of its own: this binary again, running only [`child_process_entry`]. Unpatched, the
//! first batched decode with AMX dies of SIGSEGV or SIGILL, and every comparison here fails with
//! the child's signal.
//!
//! Compared at every step, not up to a first difference: a greedy AMX run against an AVX-512
//! run forced through its tokens (prompt in one batch, then a token per decode, as generation
//! runs), and both forced through the same tokens in one batch (every step through the tile
//! kernels). The AMX and AVX-512 kernels round differently, so logits differ a little. A swap of
//! the top two is allowed when they were within [`NEAR_TIE`] logits, and the log-probability of
//! each token may move by [`LOGPROB_BOUND`] (measured on this project's Xeon: docs/amx.md); a
//! kernel that reads the wrong rows or blocks moves them by whole logits.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::top_two;

use llama::*;

/// The output file of a child process; its presence makes [`child_process_entry`] run.
const OUT_VAR: &str = "EXSA_AMX_TEST_OUT";
const MODEL_VAR: &str = "EXSA_AMX_TEST_MODEL";
/// `sequential` (the prompt, then a token per decode), `batched` (prompt and forced tokens in
/// one decode) or `two-sequences` (the same, as two sequences in one decode: recurrent and
/// hybrid models then multiply weights with 3-D activations, one slice per sequence).
const MODE_VAR: &str = "EXSA_AMX_TEST_MODE";
/// Token ids to force (comma-separated); none: greedy.
const FORCE_VAR: &str = "EXSA_AMX_TEST_FORCE";

const PROMPT: &str = "The history of the printing press begins in Mainz, where Johannes Gutenberg";
const STEPS: usize = 48;
const NEAR_TIE: f32 = 1.0;
const LOGPROB_BOUND: f32 = 0.8;

/// One step as a child saw it: the token taken and its log-probability, the step's two best
/// tokens and the logit margin between them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    token: i32,
    logprob: f32,
    best: i32,
    second: i32,
    margin: f32,
}

impl Step {
    /// The two runs ranked a near-tied top two the other way round (as in the bench protocol's
    /// rule: at least one of them saw the pair within the near tie).
    fn is_near_tie_swap(&self, other: &Step) -> bool {
        self.best == other.second && other.best == self.second && (self.margin < NEAR_TIE || other.margin < NEAR_TIE)
    }
}

struct Run {
    amx_buffer: bool,
    steps: Vec<Step>,
    stderr: String,
}

fn skip_reason() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().collect()).unwrap_or_default();
    if !(flags.contains(&"amx_tile") && flags.contains(&"amx_int8")) {
        return Some("this CPU has no AMX (amx_tile, amx_int8 in /proc/cpuinfo)".into());
    }
    if !build_info().switches.iter().any(|&(name, on)| name == "amx" && on) {
        return Some("this build has AMX off (LLAMA_SYS_AMX)".into());
    }
    None
}

/// The models compared: the default one, its Q8_0 and Q4_0 requantisations (the types of the
/// AMX kernels besides the K-quants), and the synthetic ones that `cargo xtask synth-models` wrote.
fn models() -> Vec<PathBuf> {
    let default = common::model_path();
    let mut out = vec![default.clone()];
    for (name, ty) in [("q8_0", QuantType::Q8_0), ("q4_0", QuantType::Q4_0)] {
        let path = common::temp_path(&format!("amx-default-{name}.gguf"));
        if !path.is_file() {
            quantize(&default, &path, &QuantizeOptions::new(ty).threads(2).requantize(Requantize::Allow))
                .unwrap_or_else(|e| panic!("requantising to {name}: {e}"));
        }
        out.push(path);
    }
    let synth = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml"));
    for name in ["llama-tiny", "lfm2-tiny", "mamba-tiny"] {
        let path = synth.join(format!("{name}.gguf"));
        assert!(path.is_file(), "{} missing: run `cargo xtask synth-models`", path.display());
        out.push(path);
    }
    out
}

fn run_child(model: &Path, mode: &str, force: Option<&[Step]>, env: &[(&str, &str)]) -> Run {
    let out = common::temp_path(&format!("amx-child-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1"]);
    cmd.env(OUT_VAR, &out).env(MODEL_VAR, model).env(MODE_VAR, mode).env_remove("EXSA_AMX").env_remove("EXSA_AMX_PROBE_SKIP_CONFIG");
    if let Some(steps) = force {
        cmd.env(FORCE_VAR, steps.iter().map(|s| s.token.to_string()).collect::<Vec<_>>().join(","));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().expect("the test binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{} ({mode}, {env:?}): the child process failed: {}\n{stderr}{}",
        model.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    let text = std::fs::read_to_string(&out).expect("the child wrote its steps");
    let mut lines = text.lines();
    let amx_buffer = lines.next() == Some("amx_buffer=true");
    let steps = lines
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Step {
                token: f[0].parse().unwrap(),
                logprob: f[1].parse().unwrap(),
                best: f[2].parse().unwrap(),
                second: f[3].parse().unwrap(),
                margin: f[4].parse().unwrap(),
            }
        })
        .collect();
    Run { amx_buffer, steps, stderr }
}

/// Every step of two runs forced through the same tokens: the same best token, or a near-tie
/// swap of the top two, and the taken token's log-probability moved by at most the bound.
/// Returns the largest move and the number of swaps, for the record.
fn check_every_step(what: &str, reference: &[Step], other: &[Step]) -> (f32, usize) {
    assert_eq!(reference.len(), other.len(), "{what}: step counts");
    let mut worst = 0f32;
    let mut swaps = 0;
    let mut bad = Vec::new();
    for (i, (r, o)) in reference.iter().zip(other).enumerate() {
        assert_eq!(r.token, o.token, "{what}: step {i} was not forced");
        let moved = (r.logprob - o.logprob).abs();
        worst = worst.max(moved);
        let swapped = r.best != o.best;
        swaps += usize::from(swapped);
        if (swapped && !r.is_near_tie_swap(o)) || moved > LOGPROB_BOUND {
            bad.push(format!(
                "step {i}: token {} logprob {:.3} vs {:.3}; best {} vs {} (margins {:.3}, {:.3})",
                r.token, r.logprob, o.logprob, r.best, o.best, r.margin, o.margin
            ));
        }
    }
    assert!(bad.is_empty(), "{what}: {} of {} steps out of bounds:\n{}", bad.len(), reference.len(), bad.join("\n"));
    (worst, swaps)
}

#[test]
fn amx_kernels_agree_with_the_avx512_ones_at_every_step() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    for model in models() {
        let name = model.file_name().unwrap().to_string_lossy().into_owned();
        let amx = run_child(&model, "sequential", None, &[]);
        assert!(amx.amx_buffer, "{name}: no AMX model buffer with AMX on\n{}", amx.stderr);
        assert_eq!(amx.steps.len(), STEPS, "{name}");
        let avx = run_child(&model, "sequential", Some(&amx.steps), &[("EXSA_AMX", "off")]);
        assert!(!avx.amx_buffer, "{name}: EXSA_AMX=off still used the AMX buffer");
        let (seq_worst, seq_swaps) = check_every_step(&format!("{name}, a token per decode"), &amx.steps, &avx.steps);

        let amx_batch = run_child(&model, "batched", Some(&amx.steps), &[]);
        let avx_batch = run_child(&model, "batched", Some(&amx.steps), &[("EXSA_AMX", "off")]);
        let (batch_worst, batch_swaps) = check_every_step(&format!("{name}, one batch"), &amx_batch.steps, &avx_batch.steps);

        let amx_two = run_child(&model, "two-sequences", Some(&amx.steps), &[]);
        let avx_two = run_child(&model, "two-sequences", Some(&amx.steps), &[("EXSA_AMX", "off")]);
        let (two_worst, two_swaps) = check_every_step(&format!("{name}, two sequences in one batch"), &amx_two.steps, &avx_two.steps);
        eprintln!(
            "{name}: a token per decode: logprob moved up to {seq_worst:.3}, {seq_swaps} near-tie swaps; one batch: up to {batch_worst:.3}, \
             {batch_swaps} swaps; two sequences: up to {two_worst:.3}, {two_swaps} swaps ({STEPS} steps)"
        );
    }
}

#[test]
fn a_cpu_whose_tile_code_faults_falls_back_to_the_avx512_kernels() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let model = common::model_path();
    let avx = run_child(&model, "batched", Some(&forced_prompt_tokens()), &[("EXSA_AMX", "off")]);
    // The probe's child skips the tile configuration, so its first tile load faults (SIGILL),
    // as on a machine that advertises AMX but does not carry its state.
    let faulting = run_child(&model, "batched", Some(&forced_prompt_tokens()), &[("EXSA_AMX_PROBE_SKIP_CONFIG", "1")]);
    assert!(!faulting.amx_buffer, "the AMX buffer type was handed out although the probe faulted");
    assert!(faulting.stderr.contains("tile multiply died of signal"), "the fallback is not reported:\n{}", faulting.stderr);
    assert_eq!(faulting.steps, avx.steps, "the fallback must run exactly the AVX-512 kernels");
}

/// A fixed token list (the prompt's own tokens) for runs that need no greedy reference.
fn forced_prompt_tokens() -> Vec<Step> {
    let vocab = common::model().vocab();
    let tokens = vocab.tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    tokens.iter().cycle().take(STEPS).map(|t| Step { token: t.0, logprob: 0.0, best: 0, second: 0, margin: 0.0 }).collect()
}

/// Not a test of its own: the body of the child processes above, a no-op unless they set
/// `EXSA_AMX_TEST_OUT`.
#[test]
fn child_process_entry() {
    let Ok(out) = std::env::var(OUT_VAR) else { return };
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
    let model = Model::load(std::env::var(MODEL_VAR).unwrap(), &ModelParams::default()).unwrap();
    let amx_buffer = model.placement().iter().any(|l| l.starts_with("AMX model buffer"));
    let params = ContextParams::default().n_ctx(512).n_batch(512).n_ubatch(512).n_threads(2).n_threads_batch(2).n_seq_max(2);
    let mut ctx = Context::new(&model, &params).unwrap();
    let prompt = model.vocab().tokenize(PROMPT, TokenizeOptions::default()).unwrap();
    let forced: Option<Vec<Token>> = std::env::var(FORCE_VAR).ok().map(|s| s.split(',').map(|t| Token(t.parse().unwrap())).collect());
    let mut steps = Vec::new();
    match std::env::var(MODE_VAR).unwrap().as_str() {
        "sequential" => {
            let mut batch = Batch::from_tokens(&prompt, 0, 0).unwrap();
            for i in 0..STEPS {
                ctx.decode(&batch).unwrap();
                let logits = ctx.logits(batch.len() as i32 - 1).unwrap();
                let token = forced.as_ref().map_or_else(|| argmax(logits), |f| f[i]);
                steps.push(step(logits, token));
                batch.clear();
                batch.add_output(token, (prompt.len() + i) as i32, 0).unwrap();
            }
        }
        "batched" => {
            let forced = forced.expect("a batched run forces tokens");
            let mut batch = Batch::new(prompt.len() + forced.len(), 1).unwrap();
            let all: Vec<Token> = prompt.iter().chain(&forced).copied().collect();
            for (pos, &t) in all.iter().enumerate() {
                batch.add(t, pos as i32, &[0], if pos + 1 >= prompt.len() { Output::Compute } else { Output::Skip }).unwrap();
            }
            ctx.decode(&batch).unwrap();
            for (i, &token) in forced.iter().enumerate() {
                steps.push(step(ctx.logits((prompt.len() - 1 + i) as i32).unwrap(), token));
            }
        }
        "two-sequences" => {
            // Sequence 0 and sequence 1 decode the same text side by side; the steps are those
            // of sequence 1, whose slice is the second of each multiplication.
            let forced = forced.expect("a batched run forces tokens");
            let all: Vec<Token> = prompt.iter().chain(&forced).copied().collect();
            let mut batch = Batch::new(2 * all.len(), 2).unwrap();
            for seq in 0..2 {
                for (pos, &t) in all.iter().enumerate() {
                    batch.add(t, pos as i32, &[seq], if seq == 1 && pos + 1 >= prompt.len() { Output::Compute } else { Output::Skip }).unwrap();
                }
            }
            ctx.decode(&batch).unwrap();
            for (i, &token) in forced.iter().enumerate() {
                steps.push(step(ctx.logits((all.len() + prompt.len() - 1 + i) as i32).unwrap(), token));
            }
        }
        other => panic!("unknown mode {other}"),
    }
    let mut text = format!("amx_buffer={amx_buffer}\n");
    for s in &steps {
        text.push_str(&format!("{} {} {} {} {}\n", s.token, s.logprob, s.best, s.second, s.margin));
    }
    std::fs::write(out, text).unwrap();
}

fn argmax(logits: &[f32]) -> Token {
    top_two(logits).0
}

fn step(logits: &[f32], token: Token) -> Step {
    let (best, second) = top_two(logits);
    let max = logits[best.0 as usize];
    let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    Step { token: token.0, logprob: logits[token.0 as usize] - log_sum, best: best.0, second: second.0, margin: max - logits[second.0 as usize] }
}
