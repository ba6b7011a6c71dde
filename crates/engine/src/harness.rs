//! The measurement harness that `cargo xtask bench-compare` runs in every variant's binary:
//! the same code over whichever backend the binary was built with.
//!
//! Tests follow llama-bench so figures compare with llama.cpp's own: `ppN` decodes N prompt
//! tokens, `tgN` generates N tokens one decode at a time, `ppN+tgM` does both in one timing,
//! all on pseudo-random token ids (nothing of the tokenizer or sampler is timed) and a cleared
//! cache. `e2e` is what a user sees: a chat prompt through the engine with sampling,
//! detokenization and streaming, giving generation tokens/s and time to first token.

use std::str::FromStr;
use std::time::Instant;

// The protocol's types are the harness's: what `exsa bench` prints is what xtask reads.
pub use exsa_bench_protocol::{BenchReport, Equivalence, GreedyStep, NEAR_TIE, Sample, TaskSetup, compare};

use crate::backend::{BackendModel, BackendSession, Outputs};
use crate::chat::ChatMessage;
use crate::config::{GenerateOptions, SamplingParams, SessionConfig, Speculation};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::token::{Token, TokenLogprobs};

/// One benchmark test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// `ppN`: decodes N prompt tokens.
    Prompt(usize),
    /// `tgN`: generates N tokens, one decode each.
    Generate(usize),
    /// `ppN+tgM`: N prompt tokens, then M generated, in one timing.
    PromptGenerate(usize, usize),
    /// `e2eN` (`e2e`: 128): a chat of [`E2E_PROMPT`] through the engine, N tokens at most,
    /// sampled with [`e2e_sampling`].
    EndToEnd(usize),
    /// A fixed task a user runs, 128 tokens at most, with speculation (prompt lookup, up to 8
    /// drafted tokens) or without: `task-rewrite`, `task-rewrite-spec`, ... (see
    /// [`Task::request`]).
    Task(Task, bool),
}

/// The fixed tasks of the speculative-decoding comparison: one whose answer quotes its input
/// (rewrite), one that condenses it (summary), one free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Rename a variable in a short Python function: the answer quotes the input.
    Rewrite,
    /// Summarise a paragraph in two sentences.
    Summary,
    /// The e2e test's story prompt: free text.
    Free,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 3] = [Task::Rewrite, Task::Summary, Task::Free];

    /// The task's name in test names (`task-NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Task::Rewrite => "rewrite",
            Task::Summary => "summary",
            Task::Free => "free",
        }
    }

    /// The user's message.
    pub fn prompt(self) -> &'static str {
        match self {
            Task::Rewrite => TASK_REWRITE,
            Task::Summary => TASK_SUMMARY,
            Task::Free => E2E_PROMPT,
        }
    }

    /// Greedy where the answer is determined by the input (rewrite, summary); sampled for the
    /// free answer: the e2e test's seeded sampling with a repetition penalty of 1.15 over the
    /// last 64 tokens. The default model loops on this prompt under greedy decoding, and with
    /// sampling alone too (it repeats the question), which prompt lookup would exploit: free
    /// text must measure honest text, where speculation has little to find.
    pub fn sampling(self) -> SamplingParams {
        match self {
            Task::Rewrite | Task::Summary => SamplingParams::greedy(),
            Task::Free => SamplingParams { repeat_penalty: 1.15, repeat_last_n: 64, ..e2e_sampling() },
        }
    }

    /// The options of the task's request (its prompt is a chat of [`Task::prompt`]), speculating
    /// or not.
    pub fn request(self, speculate: bool) -> GenerateOptions {
        let speculation = if speculate { Speculation::Ngram { max_draft: TASK_MAX_DRAFT } } else { Speculation::Off };
        GenerateOptions { max_tokens: TASK_MAX_TOKENS, sampling: self.sampling(), speculation, ..Default::default() }
    }
}

/// Tokens a task generates at most.
pub const TASK_MAX_TOKENS: usize = 128;
/// Tokens a speculating task drafts per round at most (llama-lookup's default draft length).
pub const TASK_MAX_DRAFT: u32 = 8;

/// What `test` (a task) runs, for a reference program to run the same: the chat prompt as this
/// engine renders it, and the request's sampling.
pub fn task_setup(engine: &Engine, test: Test) -> Result<TaskSetup, EngineError> {
    let Test::Task(task, speculate) = test else {
        return Err(EngineError::InvalidRequest { field: "test", value: test.to_string(), reason: "only task tests have a setup" });
    };
    let request = task.request(speculate);
    let s = &request.sampling;
    Ok(TaskSetup {
        test: test.to_string(),
        prompt: engine.format_chat(&[ChatMessage::new("user", task.prompt())])?,
        max_tokens: request.max_tokens,
        max_draft: request.speculation.max_draft().unwrap_or(0),
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        seed: s.seed,
    })
}

// A raw literal: a `\` line continuation would eat the code's indentation.
const TASK_REWRITE: &str = r#"Rewrite this Python code with the variable `total` renamed to `acc`. Reply with the code only.

```python
def summarize(values):
    total = 0
    count = 0
    for v in values:
        if v is None:
            continue
        total += v
        count += 1
    if count == 0:
        return 0.0
    mean = total / count
    print(f"total={total} count={count} mean={mean}")
    return mean
```"#;

const TASK_SUMMARY: &str = "Summarise this text in two sentences.\n\n\
The printing press, developed by Johannes Gutenberg around 1440, used movable metal type, oil-based ink and a wooden \
press adapted from those used for wine and olive oil. Before it, books were copied by hand, which made them rare and \
costly. Within fifty years presses were at work in more than two hundred European cities, and millions of books had \
been printed. Cheaper books spread literacy, carried the ideas of the Renaissance and the Reformation across borders, \
and let scientists share and check each other's results. Historians count the press among the inventions that shaped \
the modern world.";

impl FromStr for Test {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num =
            |t: &str, what: &str| t.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{what} in test {s:?} is not a positive number"));
        if let Some((pp, tg)) = s.split_once('+') {
            let pp = pp.strip_prefix("pp").ok_or_else(|| format!("test {s:?}: expected ppN+tgM"))?;
            let tg = tg.strip_prefix("tg").ok_or_else(|| format!("test {s:?}: expected ppN+tgM"))?;
            return Ok(Test::PromptGenerate(num(pp, "the prompt size")?, num(tg, "the generation size")?));
        }
        if let Some(n) = s.strip_prefix("pp") {
            return Ok(Test::Prompt(num(n, "the prompt size")?));
        }
        if let Some(n) = s.strip_prefix("tg") {
            return Ok(Test::Generate(num(n, "the generation size")?));
        }
        if s == "e2e" {
            return Ok(Test::EndToEnd(128));
        }
        if let Some(rest) = s.strip_prefix("task-") {
            let (name, spec) = match rest.strip_suffix("-spec") {
                Some(name) => (name, true),
                None => (rest, false),
            };
            let task = Task::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| format!("unknown task in {s:?}: rewrite, summary or free"))?;
            return Ok(Test::Task(task, spec));
        }
        if let Some(n) = s.strip_prefix("e2e") {
            return Ok(Test::EndToEnd(num(n, "the token count")?));
        }
        Err(format!("unknown test {s:?}: use ppN, tgN, ppN+tgM, e2e[N] or task-NAME[-spec]"))
    }
}

impl std::fmt::Display for Test {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Test::Prompt(n) => write!(f, "pp{n}"),
            Test::Generate(n) => write!(f, "tg{n}"),
            Test::PromptGenerate(p, g) => write!(f, "pp{p}+tg{g}"),
            Test::EndToEnd(128) => write!(f, "e2e"),
            Test::EndToEnd(n) => write!(f, "e2e{n}"),
            Test::Task(task, false) => write!(f, "task-{}", task.name()),
            Test::Task(task, true) => write!(f, "task-{}-spec", task.name()),
        }
    }
}

/// The fixed chat of the e2e test.
pub const E2E_PROMPT: &str = "Write a short story about a lighthouse keeper who finds a message in a bottle.";

/// The sampling of the e2e test (llama.cpp's common defaults, seeded).
pub fn e2e_sampling() -> SamplingParams {
    SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 42, ..Default::default() }
}

/// Deterministic pseudo-random token ids: every variant decodes the same ones.
fn random_tokens(n: usize, n_vocab: i32, bos: Token, seed: u64) -> Vec<Token> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    out.push(bos);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(Token((state % n_vocab as u64) as i32));
    }
    out
}

/// Runs `test` once in `session_config`'s context and times it.
pub fn run(engine: &Engine, session_config: &SessionConfig, test: Test) -> Result<Sample, EngineError> {
    match test {
        Test::EndToEnd(n) => {
            end_to_end(engine, session_config, test, E2E_PROMPT, GenerateOptions { max_tokens: n, sampling: e2e_sampling(), ..Default::default() })
        }
        Test::Task(task, spec) => end_to_end(engine, session_config, test, task.prompt(), task.request(spec)),
        _ => raw_decode(engine, session_config, test),
    }
}

fn raw_decode(engine: &Engine, config: &SessionConfig, test: Test) -> Result<Sample, EngineError> {
    let model = engine.model();
    let (n_prompt, n_gen) = match test {
        Test::Prompt(p) => (p, 0),
        Test::Generate(g) => (0, g),
        Test::PromptGenerate(p, g) => (p, g),
        Test::EndToEnd(_) | Test::Task(..) => unreachable!("handled by end_to_end"),
    };
    if n_prompt + n_gen >= config.n_ctx as usize {
        return Err(EngineError::PromptTooLong { prompt_tokens: n_prompt + n_gen, n_ctx: config.n_ctx });
    }
    let mut session = model.session(config)?;
    let prompt = random_tokens(n_prompt.max(1), model.n_vocab(), model.bos(), 1);
    let generated = random_tokens(n_gen.max(1), model.n_vocab(), model.bos(), 2);
    let n_batch = session.n_batch() as usize;
    let start = Instant::now();
    let mut pos = 0i32;
    if n_prompt > 0 {
        for chunk in prompt.chunks(n_batch) {
            session.decode(chunk, pos, Outputs::Last)?;
            pos += chunk.len() as i32;
        }
    }
    for &t in generated.iter().take(n_gen) {
        session.decode(&[t], pos, Outputs::Last)?;
        pos += 1;
    }
    // GPU and RPC backends return from a decode before it has run.
    session.synchronize();
    let seconds = start.elapsed().as_secs_f64();
    Ok(Sample::timed(test.to_string(), n_prompt + n_gen, seconds))
}

/// A chat of one user message through the engine, as a user sees it.
fn end_to_end(engine: &Engine, config: &SessionConfig, test: Test, prompt: &str, options: GenerateOptions) -> Result<Sample, EngineError> {
    let speculating = options.speculation != Speculation::Off;
    let mut session = engine.session_with(config)?;
    let messages = [ChatMessage::new("user", prompt)];
    let mut generation = session.chat(&messages, options)?;
    // Streamed the way an allocation-conscious caller would: deltas are lent, not copied.
    let mut sink = String::new();
    while let Some(delta) = generation.next_text() {
        sink.push_str(delta?);
    }
    let stats = generation.stats();
    std::hint::black_box(&sink);
    Ok(Sample {
        test: test.to_string(),
        tokens: stats.completion_tokens,
        seconds: stats.generation_ms / 1000.0,
        tokens_per_s: stats.generation_tokens_per_s,
        time_to_first_token_ms: Some(stats.time_to_first_token_ms),
        outside_decode_percent: Some(stats.outside_decode_percent()),
        tokens_per_decode: speculating.then(|| stats.completion_tokens as f64 / stats.generation_decodes.max(1) as f64),
        draft_acceptance_percent: speculating.then(|| 100.0 * stats.accepted_tokens as f64 / stats.drafted_tokens.max(1) as f64),
    })
}

/// The prompt of the equivalence check.
pub const EQUIVALENCE_PROMPT: &str = "The history of the printing press begins";

/// The greedy token ids of `prompt`: every variant must produce the same ones.
pub fn greedy_tokens(engine: &Engine, config: &SessionConfig, prompt: &str, n: usize) -> Result<Vec<Token>, EngineError> {
    Ok(greedy_trace(engine, config, prompt, n)?.into_iter().map(|s| Token(s.token)).collect())
}

/// Greedy steps of `prompt` with their margins, for the equivalence check.
pub fn greedy_trace(engine: &Engine, config: &SessionConfig, prompt: &str, n: usize) -> Result<Vec<GreedyStep>, EngineError> {
    trace(engine, config, prompt, n, |_, chosen| chosen)
}

/// The greedy steps of `prompt` while `forced` is decoded instead of each step's own choice
/// (teacher forcing): every step sees the same text as the run that chose `forced`, so two
/// builds stay comparable past a first near-tie swap, where free runs follow different text.
pub fn forced_trace(engine: &Engine, config: &SessionConfig, prompt: &str, forced: &[Token]) -> Result<Vec<GreedyStep>, EngineError> {
    trace(engine, config, prompt, forced.len(), |i, _| forced[i])
}

/// Teacher forcing with log-probabilities, the solo reference that batched and speculative runs
/// are checked against step by step: decodes `prompt` alone in a single-sequence context of
/// `config`, then at each step records `forced[i]`'s log-probability and the `top` likeliest
/// candidates of that step's logits, and decodes `forced[i]` (whatever the step would have
/// chosen), so every step sees the text the checked run saw.
pub fn forced_logprobs(
    engine: &Engine,
    config: &SessionConfig,
    prompt: &[Token],
    forced: &[Token],
    top: usize,
) -> Result<Vec<TokenLogprobs>, EngineError> {
    let model = engine.model();
    if prompt.is_empty() || prompt.len() + forced.len() >= config.n_ctx as usize {
        return Err(EngineError::PromptTooLong { prompt_tokens: prompt.len() + forced.len(), n_ctx: config.n_ctx });
    }
    let mut session = model.session(&SessionConfig { n_seq_max: 1, ..config.clone() })?;
    let n_batch = session.n_batch() as usize;
    let mut pos = 0;
    for chunk in prompt.chunks(n_batch) {
        let outputs = if pos + chunk.len() == prompt.len() { Outputs::Last } else { Outputs::None };
        session.decode(chunk, pos as i32, outputs)?;
        pos += chunk.len();
    }
    let mut out = Vec::with_capacity(forced.len());
    for &token in forced {
        out.push(TokenLogprobs::from_row(session.last_logits()?, token, top));
        session.decode(&[token], pos as i32, Outputs::Last)?;
        pos += 1;
    }
    Ok(out)
}

/// Decodes `prompt`, then `n` steps: records each step's top three, decodes `next(step, choice)`.
fn trace(
    engine: &Engine,
    config: &SessionConfig,
    prompt: &str,
    n: usize,
    next: impl Fn(usize, Token) -> Token,
) -> Result<Vec<GreedyStep>, EngineError> {
    let model = engine.model();
    let mut session = model.session(config)?;
    let mut greedy = model.sampler(&SamplingParams::greedy())?;
    let mut tokens = Vec::new();
    model.tokenize(prompt, true, false, &mut tokens)?;
    if tokens.is_empty() || tokens.len() + n >= config.n_ctx as usize {
        return Err(EngineError::PromptTooLong { prompt_tokens: tokens.len() + n, n_ctx: config.n_ctx });
    }
    session.decode(&tokens, 0, Outputs::Last)?;
    // The output of a decode with Outputs::Last is its last token's.
    let mut last = tokens.len() as i32 - 1;
    let mut out = Vec::with_capacity(n);
    for (i, pos) in (tokens.len() as i32..).take(n).enumerate() {
        let top = top3(session.last_logits()?);
        let t = session.sample_with(&mut greedy, last)?;
        // The bench protocol carries bare ids.
        out.push(GreedyStep::from_top3(t.0, top.map(|(t, x)| (t.0, x))));
        session.decode(&[next(i, t)], pos, Outputs::Last)?;
        last = 0;
    }
    Ok(out)
}

/// The three best tokens with their logits, best first.
fn top3(logits: &[f32]) -> [(Token, f32); 3] {
    let mut best = [(Token(0), f32::NEG_INFINITY); 3];
    for (i, &x) in logits.iter().enumerate() {
        if let Some(slot) = best.iter().position(|&(_, y)| x > y) {
            best.copy_within(slot..2, slot + 1);
            best[slot] = (Token(i as i32), x);
        }
    }
    best
}

/// What `exsa bench` reports of the model: the engine's facts in the bench protocol's own type
/// (the protocol is versioned apart from the engine's API, which never names it).
#[doc(hidden)]
impl From<crate::ModelInfo> for exsa_bench_protocol::ModelInfo {
    fn from(info: crate::ModelInfo) -> Self {
        let crate::ModelInfo { path, description, architecture, n_params, size_bytes, n_vocab, n_ctx_train, n_embd, has_chat_template, placement } =
            info;
        exsa_bench_protocol::ModelInfo {
            path,
            description,
            architecture,
            n_params,
            size_bytes,
            n_vocab,
            n_ctx_train,
            n_embd,
            has_chat_template,
            placement,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_three_come_best_first() {
        assert_eq!(top3(&[0.5, 3.0, 2.25, -1.0]), [(Token(1), 3.0), (Token(2), 2.25), (Token(0), 0.5)]);
        assert_eq!(top3(&[1.0, 1.0, 1.0, 4.0]), [(Token(3), 4.0), (Token(0), 1.0), (Token(1), 1.0)], "ties keep the first");
        assert_eq!(top3(&[-1.0, 2.0, 5.0]), [(Token(2), 5.0), (Token(1), 2.0), (Token(0), -1.0)]);
    }

    #[test]
    fn test_names_round_trip_and_bad_ones_are_explained() {
        for name in ["pp512", "tg128", "pp512+tg128", "e2e", "e2e64", "task-rewrite", "task-rewrite-spec", "task-summary", "task-free-spec"] {
            assert_eq!(name.parse::<Test>().unwrap().to_string(), name);
        }
        assert_eq!("e2e".parse::<Test>().unwrap(), Test::EndToEnd(128));
        assert_eq!("task-summary-spec".parse::<Test>().unwrap(), Test::Task(Task::Summary, true));
        for bad in ["pp", "tg0", "pp512+", "xx12", "pp5+pp6", "task-poem", "task-", "task-rewrite-fast"] {
            assert!(bad.parse::<Test>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_tokens_are_deterministic_in_range_and_start_with_bos() {
        let a = random_tokens(100, 1000, Token(2), 1);
        assert_eq!(a, random_tokens(100, 1000, Token(2), 1));
        assert_ne!(a, random_tokens(100, 1000, Token(2), 2));
        assert_eq!(a[0], Token(2));
        assert!(a.iter().all(|t| (0..1000).contains(&t.0)));
    }
}
