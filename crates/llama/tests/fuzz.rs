//! Randomized use of the safe API on the default model: random sampler chains (stages,
//! parameters, grammars that reject everything), random accepts, random batch shapes, sequence
//! ids and positions, random memory and state operations, GGUF headers with flipped bytes,
//! huge counts and truncations, and (feature `chat`) the real chat templates of llama.cpp's corpus
//! mutated, rendered with random messages and tools, their replies parsed from random text. Each
//! case must either work or return a typed error.
//!
//! An abort cannot be caught in-process, so the test re-runs this binary once per group as a
//! child and checks how the child ended: a signal (SIGABRT, SIGSEGV) fails the test with the
//! child's last output. proptest generates the cases from a fixed seed (reproducible in CI);
//! `cargo xtask fuzz --minutes N` runs longer with fresh seeds.
//!
//! Knobs (environment): `LLAMA_FUZZ_CASES` per group, `LLAMA_FUZZ_SECONDS` per group,
//! `LLAMA_FUZZ_SEED` (a number), `LLAMA_FUZZ_IN_PROCESS=1` (run the groups in this process,
//! as the leak check does under valgrind).

mod common;

use std::cell::RefCell;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{model, model_path, temp_path};
use llama::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const GROUP_VAR: &str = "LLAMA_FUZZ_GROUP";
#[cfg(not(feature = "chat"))]
const GROUPS: &[&str] = &["samplers", "batches", "gguf"];
#[cfg(feature = "chat")]
const GROUPS: &[&str] = &["samplers", "batches", "gguf", "templates"];

#[test]
fn random_api_use_never_aborts() {
    if let Ok(group) = std::env::var(GROUP_VAR) {
        run_group(&group);
        return;
    }
    if std::env::var_os("LLAMA_FUZZ_IN_PROCESS").is_some() {
        GROUPS.iter().for_each(|g| run_group(g));
        return;
    }
    for &group in GROUPS {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "random_api_use_never_aborts", "--nocapture", "--test-threads=1"])
            .env(GROUP_VAR, group)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // llama.cpp's own last words (GGML_ASSERT ...), then the end of the output.
        let said: Vec<&str> = stderr.lines().filter(|l| l.contains("GGML_") || l.contains("panicked") || l.contains("terminate called")).collect();
        let tail = format!(
            "{}\n...\n{}",
            said.join("\n"),
            stderr.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        assert!(output.status.success(), "fuzz group {group} ended with {}:\n{tail}\n{}", output.status, stdout.trim());
        let summary =
            stdout.lines().find_map(|l| l.find("fuzz ").map(|at| &l[at..])).unwrap_or_else(|| panic!("group {group} printed no summary:\n{stdout}"));
        println!("{summary}");
        let count = |key: &str| -> usize {
            summary.split(", ").find_map(|part| part.strip_suffix(key).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())).unwrap_or(0)
        };
        assert!(count(" cases") >= 20, "group {group} ran too few cases: {summary}");
        assert!(count(" ok") > 0 && count(" errors") > 0, "group {group} should see both outcomes: {summary}");
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Counts outcomes; every Err is a typed error by construction (the API returns nothing else).
#[derive(Default)]
struct Tally {
    cases: usize,
    ok: usize,
    errors: usize,
}

impl Tally {
    fn note<T, E: std::fmt::Display>(&mut self, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => {
                self.ok += 1;
                Some(v)
            }
            Err(e) => {
                // The message must say something: an error that names nothing is a bug too.
                assert!(!e.to_string().is_empty());
                self.errors += 1;
                None
            }
        }
    }
}

fn run_group(group: &str) {
    let (default_cases, default_seconds) = match group {
        "samplers" => (1500, 60),
        "batches" => (800, 60),
        "templates" => (1500, 20),
        _ => (120, 60),
    };
    let cases = env_num("LLAMA_FUZZ_CASES", default_cases) as u32;
    let budget = Duration::from_secs(env_num("LLAMA_FUZZ_SECONDS", default_seconds));
    let seed = env_num("LLAMA_FUZZ_SEED", 20261126);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..8 + group.len().min(24)].copy_from_slice(&group.as_bytes()[..group.len().min(24)]);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let started = Instant::now();
    let tally = RefCell::new(Tally::default());
    let result = match group {
        "samplers" => {
            let (ctx, index) = sampling_context();
            runner
                .run(&sampler_case(), |case| {
                    if started.elapsed() < budget {
                        let mut tally = tally.borrow_mut();
                        tally.cases += 1;
                        run_sampler_case(&case, &ctx, index, &mut tally);
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())
        }
        "batches" => {
            let params = ContextParams::default().n_ctx(128).n_batch(32).n_ubatch(32).n_seq_max(4).n_threads(2).n_threads_batch(2);
            let ctx = RefCell::new(Context::new(model(), &params).unwrap());
            runner
                .run(&batch_case(), |case| {
                    if started.elapsed() < budget {
                        let mut tally = tally.borrow_mut();
                        tally.cases += 1;
                        run_batch_case(&case, &mut ctx.borrow_mut(), &mut tally);
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())
        }
        "gguf" => {
            let pristine = std::fs::read(model_path()).unwrap();
            let head_len = pristine.len().min(1 << 20);
            let path = temp_path("fuzz-mutant.gguf");
            std::fs::write(&path, &pristine).unwrap();
            let result = runner
                .run(&gguf_case(head_len), |case| {
                    if started.elapsed() < budget {
                        let mut tally = tally.borrow_mut();
                        tally.cases += 1;
                        run_gguf_case(&case, &pristine, &path, &mut tally);
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string());
            // A model-sized file: not left behind.
            let _ = std::fs::remove_file(&path);
            result
        }
        #[cfg(feature = "chat")]
        "templates" => {
            let corpus = templates::corpus();
            runner
                .run(&templates::case(corpus.len()), |case| {
                    if started.elapsed() < budget {
                        let mut tally = tally.borrow_mut();
                        tally.cases += 1;
                        templates::run_case(&case, &corpus, &mut tally);
                    }
                    Ok(())
                })
                .map_err(|e| e.to_string())
        }
        other => panic!("unknown fuzz group {other}"),
    };
    result.unwrap_or_else(|e| panic!("fuzz group {group} (seed {seed}): {e}"));
    let tally = tally.into_inner();
    println!("fuzz {group}: seed {seed}, {} cases, {} ok, {} errors, {:.1} s", tally.cases, tally.ok, tally.errors, started.elapsed().as_secs_f64());
}

// ---- samplers ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Stage {
    Greedy,
    Dist(u32),
    Temp(f32),
    TopK(i32),
    TopP(f32, usize),
    MinP(f32, usize),
    Typical(f32, usize),
    Xtc(f32, f32, usize, u32),
    Penalties(PenaltyWindow, f32, f32, f32),
    Dry(f32, f32, u32, PenaltyWindow, Vec<String>),
    Mirostat(u32, f32, f32, i32),
    MirostatV2(u32, f32, f32),
    Grammar(usize),
    LogitBias(Vec<(i32, f32)>),
}

#[derive(Clone, Debug)]
enum SamplerAction {
    Sample(i32),
    Accept(i32),
    Reset,
}

#[derive(Clone, Debug)]
struct SamplerCase {
    stages: Vec<Stage>,
    preselect: bool,
    actions: Vec<SamplerAction>,
}

/// Grammars that parse and accept little, reject everything the model likes, or do not parse.
const GRAMMARS: &[&str] = &[
    r#"root ::= "yes" | "no""#,
    r#"root ::= [0-9]+"#,
    r#"root ::= "{" ws "\"a\"" ws ":" ws [0-9]+ ws "}"
ws ::= [ \t\n]*"#,
    r#"root ::= "zzqx""#,
    r#"root ::= [^a-zA-Z0-9 ]{3}"#,
    r#"root ::= "unterminated"#,
    "root ::= [",
    "root ::= undefined-rule",
    "root ::= root",
    "",
];

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => 0.0f32..1.0,
        2 => -2.0f32..2.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(0.0f32),
        1 => Just(1.0f32),
        1 => -1e30f32..1e30,
    ]
}

fn int() -> impl Strategy<Value = i32> {
    prop_oneof![4 => -3i32..300, 1 => Just(i32::MIN), 1 => Just(i32::MAX), 1 => Just(-1), 1 => Just(0)]
}

/// A count: small ones, the largest llama.cpp takes (an i32) and one beyond it.
fn count() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..300, 1 => Just(i32::MAX as u32), 1 => Just(u32::MAX)]
}

fn window() -> impl Strategy<Value = PenaltyWindow> {
    prop_oneof![4 => count().prop_map(PenaltyWindow::Last), 1 => Just(PenaltyWindow::Off), 1 => Just(PenaltyWindow::WholeContext)]
}

fn token_id() -> impl Strategy<Value = i32> {
    let n_vocab = 262_144;
    prop_oneof![6 => 0i32..n_vocab, 1 => Just(-1), 1 => Just(n_vocab), 1 => Just(i32::MAX), 1 => Just(i32::MIN)]
}

fn stage() -> impl Strategy<Value = Stage> {
    let small = 0usize..4;
    prop_oneof![
        Just(Stage::Greedy),
        any::<u32>().prop_map(Stage::Dist),
        float().prop_map(Stage::Temp),
        int().prop_map(Stage::TopK),
        (float(), small.clone()).prop_map(|(p, k)| Stage::TopP(p, k)),
        (float(), small.clone()).prop_map(|(p, k)| Stage::MinP(p, k)),
        (float(), small.clone()).prop_map(|(p, k)| Stage::Typical(p, k)),
        (float(), float(), small, any::<u32>()).prop_map(|(p, t, k, s)| Stage::Xtc(p, t, k, s)),
        (window(), float(), float(), float()).prop_map(|(n, r, f, p)| Stage::Penalties(n, r, f, p)),
        (float(), float(), count(), window(), prop::collection::vec("[a-z\\n.,]{0,3}", 0..3)).prop_map(|(m, b, a, n, br)| Stage::Dry(m, b, a, n, br)),
        (any::<u32>(), float(), float(), int()).prop_map(|(s, t, e, m)| Stage::Mirostat(s, t, e, m)),
        (any::<u32>(), float(), float()).prop_map(|(s, t, e)| Stage::MirostatV2(s, t, e)),
        (0..GRAMMARS.len()).prop_map(Stage::Grammar),
        prop::collection::vec((token_id(), float()), 0..4).prop_map(Stage::LogitBias),
    ]
}

fn sampler_case() -> impl Strategy<Value = SamplerCase> {
    let action = prop_oneof![
        4 => prop_oneof![4 => Just(-1i32), 1 => int()].prop_map(SamplerAction::Sample),
        3 => token_id().prop_map(SamplerAction::Accept),
        1 => Just(SamplerAction::Reset),
    ];
    (prop::collection::vec(stage(), 0..6), any::<bool>(), prop::collection::vec(action, 0..6)).prop_map(|(stages, preselect, actions)| SamplerCase {
        stages,
        preselect,
        actions,
    })
}

/// A context holding one decoded prompt, and the batch index of its logits.
fn sampling_context() -> (Context<'static>, i32) {
    let mut ctx = common::context();
    let tokens = model().vocab().tokenize("Answer with a number: 2 + 2 =", TokenizeOptions::default()).unwrap();
    let batch = Batch::from_tokens(&tokens, 0, 0).unwrap();
    ctx.decode(&batch).unwrap();
    (ctx, batch.len() as i32 - 1)
}

fn run_sampler_case(case: &SamplerCase, ctx: &Context<'_>, index: i32, tally: &mut Tally) {
    let mut chain = SamplerChain::new().preselect(case.preselect);
    for stage in &case.stages {
        chain = match stage {
            Stage::Greedy => chain.greedy(),
            Stage::Dist(s) => chain.dist(*s),
            Stage::Temp(t) => chain.temp(*t),
            Stage::TopK(k) => chain.top_k(*k),
            Stage::TopP(p, k) => chain.top_p(*p, *k),
            Stage::MinP(p, k) => chain.min_p(*p, *k),
            Stage::Typical(p, k) => chain.typical(*p, *k),
            Stage::Xtc(p, t, k, s) => chain.xtc(*p, *t, *k, *s),
            Stage::Penalties(n, r, f, p) => chain.penalties(Penalties::default().window(*n).repeat(*r).frequency(*f).presence(*p)),
            Stage::Dry(m, b, a, n, br) => chain.dry(Dry::default().multiplier(*m).base(*b).allowed_length(*a).window(*n).breakers(br)),
            Stage::Mirostat(s, t, e, m) => chain.mirostat(*s, *t, *e, *m),
            Stage::MirostatV2(s, t, e) => chain.mirostat_v2(*s, *t, *e),
            Stage::Grammar(i) => chain.grammar(GRAMMARS[*i], "root"),
            Stage::LogitBias(b) => chain.logit_bias(&b.iter().map(|(t, v)| (Token(*t), *v)).collect::<Vec<_>>()),
        };
    }
    let Some(mut sampler) = tally.note(chain.build(model())) else { return };
    for action in &case.actions {
        match action {
            SamplerAction::Sample(i) => {
                let i = if *i == -1 { index } else { *i };
                tally.note(sampler.sample(ctx, i));
            }
            SamplerAction::Accept(t) => {
                tally.note(sampler.accept(Token(*t)));
            }
            SamplerAction::Reset => {
                tally.note(sampler.reset());
            }
        }
    }
}

// ---- batches, memory, state ------------------------------------------------------------

#[derive(Clone, Debug)]
enum MemOp {
    Remove(i32, i32, i32),
    Copy(i32, i32, i32, i32),
    Keep(i32),
    Shift(i32, i32, i32, i32),
    MaxPos(i32),
    Clear(MemoryData),
    Logits(i32),
    Embeddings(i32),
    /// Save the state, damage it (flip a byte at a fraction of its length, or cut it), load it.
    State(Option<(f64, u8)>, Option<f64>),
    SeqState(i32, i32),
}

#[derive(Clone, Debug)]
struct BatchCase {
    capacity: usize,
    n_seq_max: usize,
    entries: Vec<(i32, i32, Vec<i32>, bool)>,
    ops: Vec<MemOp>,
}

fn seq() -> impl Strategy<Value = i32> {
    prop_oneof![6 => 0i32..4, 1 => Just(-1), 1 => Just(4), 1 => Just(i32::MAX), 1 => Just(i32::MIN)]
}

fn pos() -> impl Strategy<Value = i32> {
    prop_oneof![6 => 0i32..140, 1 => Just(-1), 1 => Just(i32::MAX), 1 => Just(i32::MIN)]
}

fn batch_case() -> impl Strategy<Value = BatchCase> {
    let entry = (token_id(), pos(), prop::collection::vec(seq(), 0..3), any::<bool>());
    let op = prop_oneof![
        (seq(), pos(), pos()).prop_map(|(s, a, b)| MemOp::Remove(s, a, b)),
        (seq(), seq(), pos(), pos()).prop_map(|(s, d, a, b)| MemOp::Copy(s, d, a, b)),
        seq().prop_map(MemOp::Keep),
        (seq(), pos(), pos(), int()).prop_map(|(s, a, b, d)| MemOp::Shift(s, a, b, d)),
        seq().prop_map(MemOp::MaxPos),
        prop_oneof![Just(MemoryData::Keep), Just(MemoryData::Zero)].prop_map(MemOp::Clear),
        int().prop_map(MemOp::Logits),
        int().prop_map(MemOp::Embeddings),
        (prop::option::of((0.0f64..1.0, any::<u8>())), prop::option::of(0.0f64..1.0)).prop_map(|(f, c)| MemOp::State(f, c)),
        (seq(), seq()).prop_map(|(s, d)| MemOp::SeqState(s, d)),
    ];
    (0usize..40, 0usize..5, prop::collection::vec(entry, 0..40), prop::collection::vec(op, 0..6))
        .prop_map(|(capacity, n_seq_max, entries, ops)| BatchCase { capacity, n_seq_max, entries, ops })
}

fn run_batch_case(case: &BatchCase, ctx: &mut Context<'_>, tally: &mut Tally) {
    ctx.clear_memory(MemoryData::Zero);
    if let Some(mut batch) = tally.note(Batch::new(case.capacity, case.n_seq_max)) {
        for (token, pos, seq_ids, logits) in &case.entries {
            let output = if *logits { Output::Compute } else { Output::Skip };
            if tally.note(batch.add(Token(*token), *pos, seq_ids, output)).is_none() {
                break;
            }
        }
        tally.note(ctx.decode(&batch));
    }
    for op in &case.ops {
        match op {
            MemOp::Remove(s, a, b) => drop(tally.note(ctx.remove_range(*s, *a, *b))),
            MemOp::Copy(s, d, a, b) => drop(tally.note(ctx.copy_range(*s, *d, *a, *b))),
            MemOp::Keep(s) => drop(tally.note(ctx.keep_only(*s))),
            MemOp::Shift(s, a, b, d) => drop(tally.note(ctx.shift_range(*s, *a, *b, *d))),
            MemOp::MaxPos(s) => drop(tally.note(ctx.max_position(*s))),
            MemOp::Clear(data) => ctx.clear_memory(*data),
            MemOp::Logits(i) => drop(tally.note(ctx.logits(*i).map(|row| row.len()))),
            MemOp::Embeddings(i) => drop(tally.note(ctx.embeddings(*i).map(|row| row.len()))),
            MemOp::State(flip, cut) => {
                let Some(mut state) = tally.note(ctx.save_state()) else { continue };
                if let Some((at, byte)) = flip {
                    let i = ((state.len() as f64) * at) as usize % state.len();
                    state[i] ^= byte | 1;
                }
                if let Some(keep) = cut {
                    state.truncate(((state.len() as f64) * keep) as usize);
                }
                tally.note(ctx.load_state(&state));
            }
            MemOp::SeqState(src, dst) => {
                if let Some(state) = tally.note(ctx.save_sequence_state(*src)) {
                    tally.note(ctx.load_sequence_state(&state, *dst));
                }
            }
        }
    }
}

// ---- GGUF headers ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte at an offset into the first MiB.
    Flip(usize, u8),
    /// Overwrite 8 bytes with a huge or odd little-endian count/length.
    Count(usize, u64),
    /// Keep only the first bytes.
    Truncate(usize),
}

fn gguf_case(head_len: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let big = prop_oneof![Just(u64::MAX), Just(u64::MAX / 2), Just(1u64 << 40), Just(1u64 << 31), Just(0u64), 0u64..100_000];
    let mutation = prop_oneof![
        4 => (0..head_len, 1u8..=255).prop_map(|(at, x)| Mutation::Flip(at, x)),
        // The header's counts are at 8 and 16; keys and lengths follow.
        3 => (prop_oneof![Just(8usize), Just(16usize), 24usize..4096], big).prop_map(|(at, v)| Mutation::Count(at, v)),
        1 => (0..head_len * 2).prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(mutation, 1..4)
}

fn run_gguf_case(mutations: &[Mutation], pristine: &[u8], path: &std::path::Path, tally: &mut Tally) {
    use std::io::{Seek, SeekFrom, Write};
    let head_len = pristine.len().min(1 << 20);
    let mut head = pristine[..head_len].to_vec();
    let mut keep = pristine.len();
    for m in mutations {
        match *m {
            Mutation::Flip(at, x) => head[at] ^= x,
            Mutation::Count(at, v) => {
                let end = (at + 8).min(head.len());
                head[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            Mutation::Truncate(n) => keep = keep.min(n),
        }
    }
    // Rewrite the first MiB in place (and cut the file where asked); restore it afterwards.
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(&head).unwrap();
    file.set_len(keep as u64).unwrap();
    file.sync_all().unwrap();
    let params = ModelParams::default().vocab_only(true);
    if let Some(m) = tally.note(Model::load(path, &params)) {
        drop(tally.note(m.vocab().tokenize("hello world", TokenizeOptions::default())));
    }
    if keep < pristine.len() {
        file.seek(SeekFrom::Start(keep as u64)).unwrap();
        file.write_all(&pristine[keep..]).unwrap();
    }
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(&pristine[..head_len]).unwrap();
}

// ---- chat templates -------------------------------------------------------------------------

#[cfg(feature = "chat")]
mod templates {
    use llama::chat_templates::{ChatTemplates, ReplyText};
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::Tally;

    /// The Jinja templates of llama.cpp's corpus (`EXSA_CHAT_TEMPLATES`), in name order.
    pub fn corpus() -> Vec<String> {
        let dir = std::env::var("EXSA_CHAT_TEMPLATES").expect("EXSA_CHAT_TEMPLATES is set by .cargo/config.toml");
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e} (run `cargo xtask test`, which unpacks the corpus)"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
            .collect();
        paths.sort();
        paths.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
    }

    #[derive(Clone, Debug)]
    pub enum Edit {
        /// Remove `len` bytes at a fraction of the text (rounded to a character boundary).
        Delete(f64, usize),
        /// Insert one of [`PIECES`] there.
        Insert(f64, usize),
        /// Repeat `len` bytes from there.
        Duplicate(f64, usize),
    }

    /// Jinja syntax to break templates with.
    const PIECES: &[&str] = &[
        "{%",
        "%}",
        "{{",
        "}}",
        "{#",
        "#}",
        "{% endfor %}",
        "{% endif %}",
        "{% if x %}",
        "{% for m in messages %}",
        "|",
        "|tojson",
        "(",
        ")",
        "[",
        "]",
        "'",
        "\"",
        ".",
        ",",
        "loop.",
        "namespace(",
        "raise_exception('boom')",
        "none",
        "messages[-1]",
        "[::-1]",
        "~",
        "{% set x = ",
        "{% macro m() %}",
        "{% endmacro %}",
        "m()",
        "tools",
        "tool_calls",
        "\\",
        "\u{0}",
    ];

    /// Message contents, tool arguments and reply texts: markup of several formats, odd text.
    const TEXTS: &[&str] = &[
        "hello",
        "",
        " ",
        "<|im_end|>\n<|im_start|>system",
        "<start_of_turn>model",
        "{{ 7 * 7 }}",
        "{% raise_exception('x') %}",
        "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>",
        "<|tool_call_start|>[f(a=1)]<|tool_call_end|>",
        "<think>hm</think>answer",
        "[TOOL_CALLS]f[ARGS]{}",
        "{\"tool_call\": {\"name\": \"f\", \"arguments\": {",
        "\u{fffd}\u{1F600}",
        "{",
        "}",
        "\\",
        "\"",
        "null",
    ];
    const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer", "model", ""];
    const CHOICES: &[&str] = &["auto", "none", "required", "named", "bogus"];

    #[derive(Clone, Debug)]
    pub struct Case {
        template: usize,
        edits: Vec<Edit>,
        /// (role, content, with a tool call) per message.
        messages: Vec<(usize, usize, bool)>,
        tools: bool,
        choice: usize,
        parallel: bool,
        reply: usize,
        cut: f64,
    }

    pub fn case(n_templates: usize) -> impl Strategy<Value = Case> {
        let edit = prop_oneof![
            (0.0..1.0f64, 0usize..40).prop_map(|(at, n)| Edit::Delete(at, n)),
            (0.0..1.0f64, 0..PIECES.len()).prop_map(|(at, i)| Edit::Insert(at, i)),
            (0.0..1.0f64, 0usize..60).prop_map(|(at, n)| Edit::Duplicate(at, n)),
        ];
        let message = (0..ROLES.len(), 0..TEXTS.len(), any::<bool>());
        (
            0..n_templates,
            prop::collection::vec(edit, 0..3),
            prop::collection::vec(message, 0..6),
            any::<bool>(),
            0..CHOICES.len(),
            any::<bool>(),
            0..TEXTS.len(),
            0.0..1.0f64,
        )
            .prop_map(|(template, edits, messages, tools, choice, parallel, reply, cut)| Case {
                template,
                edits,
                messages,
                tools,
                choice,
                parallel,
                reply,
                cut,
            })
    }

    /// The byte offset at `fraction` of `text`, moved back to a character boundary.
    fn offset(text: &str, fraction: f64) -> usize {
        let mut at = ((text.len() as f64) * fraction) as usize;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    }

    fn edited(source: &str, edits: &[Edit]) -> String {
        let mut text = source.to_owned();
        for edit in edits {
            match *edit {
                Edit::Delete(at, n) => {
                    let start = offset(&text, at);
                    let end = offset(&text, ((start + n) as f64 / text.len().max(1) as f64).min(1.0)).max(start);
                    text.replace_range(start..end, "");
                }
                Edit::Insert(at, i) => {
                    let at = offset(&text, at);
                    text.insert_str(at, PIECES[i]);
                }
                Edit::Duplicate(at, n) => {
                    let start = offset(&text, at);
                    let end = offset(&text, ((start + n) as f64 / text.len().max(1) as f64).min(1.0)).max(start);
                    let copy = text[start..end].to_owned();
                    text.insert_str(end, &copy);
                }
            }
        }
        text
    }

    pub fn run_case(case: &Case, corpus: &[String], tally: &mut Tally) {
        let source = edited(&corpus[case.template], &case.edits);
        let Some(templates) = tally.note(ChatTemplates::from_source(&source)) else { return };
        let messages: Vec<Value> = case
            .messages
            .iter()
            .map(|&(role, text, call)| {
                let mut m = json!({ "role": ROLES[role], "content": TEXTS[text] });
                if call {
                    m["tool_calls"] = json!([{ "id": "c1", "type": "function", "function": { "name": "f", "arguments": TEXTS[text] } }]);
                    m["tool_call_id"] = json!("c1");
                }
                m
            })
            .collect();
        let mut request = json!({ "messages": messages, "parallel_tool_calls": case.parallel });
        if case.tools {
            request["tools"] = json!([{ "type": "function", "function": { "name": "f", "parameters": { "type": "object", "properties": { "a": { "type": "integer" } } } } }]);
        }
        request["tool_choice"] = match CHOICES[case.choice] {
            "named" => json!({ "type": "function", "function": { "name": "f" } }),
            other => json!(other),
        };
        let Some(prompt) = tally.note(templates.apply(&request)) else { return };
        let reply = TEXTS[case.reply];
        let partial = &reply[..offset(reply, case.cut)];
        let previous = tally.note(prompt.parse(partial, ReplyText::Partial)).unwrap_or_default();
        if let Some(whole) = tally.note(prompt.parse(reply, ReplyText::Complete)) {
            drop(tally.note(whole.deltas_since(&previous)));
        }
    }
}
