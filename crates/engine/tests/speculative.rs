//! Speculative decoding on the real default model: greedy output is the same as without
//! speculation (up to the project's near-tie rule, counted), sampled output has the same
//! distribution (a two-sample test over many seeds on a chain cut to three candidates), drafts are accepted where the answer quotes its prompt, stop sequences
//! and max tokens end the text exactly where they do without speculation, and a draft model
//! drafts only for a model with its vocabulary.

use std::path::PathBuf;

use exsa_engine::serving::BATCH_NEAR_TIE;
use exsa_engine::*;

fn engine() -> Engine {
    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig { n_ctx: 2048, n_threads: 2, n_threads_batch: 2, ..Default::default() };
    Engine::load(config).expect("the default model loads")
}

const REWRITE: &str = "Rewrite this Python function, renaming the variable `total` to `acc`.\n\n```python\n\
def sum_list(values):\n    total = 0\n    for v in values:\n        if v > 0:\n            total += v\n    return total\n```\n\n\
Rewritten:\n```python\n";
const FREE: &str = "Write a short story about a lighthouse keeper who finds a message in a bottle.";

fn request(prompt: &str, max_tokens: usize, speculation: Speculation) -> GenerateRequest {
    GenerateRequest { max_tokens, sampling: SamplingParams::greedy(), speculation, ..GenerateRequest::new(prompt) }
}

/// The plain greedy text of `prompt` from the harness's trace (each step with its margin), cut
/// at the first end-of-generation token, and the number of trace steps it took.
fn plain(engine: &Engine, prompt: &str, n: usize) -> (Vec<harness::GreedyStep>, Vec<String>) {
    let trace = harness::greedy_trace(engine, engine.session_config(), prompt, n).unwrap();
    let eog = engine.end_of_generation_tokens();
    let steps: Vec<_> = trace.into_iter().take_while(|s| !eog.contains(&s.token)).collect();
    let pieces = steps.iter().map(|s| String::from_utf8_lossy(&engine.token_bytes(s.token).unwrap()).into_owned()).collect();
    (steps, pieces)
}

/// The plain trace's step at which `text` parts from `expected` (the pieces' concatenation), or
/// None where it parts after the plain text ended.
fn parting_step<'s>(steps: &'s [harness::GreedyStep], pieces: &[String], text: &str, expected: &str) -> Option<&'s harness::GreedyStep> {
    let common = text.bytes().zip(expected.bytes()).take_while(|(a, b)| a == b).count();
    let mut at = 0;
    let step = pieces.iter().position(|p| {
        at += p.len();
        at > common
    });
    step.map(|i| &steps[i])
}

#[test]
fn greedy_output_is_unchanged_and_quoted_text_is_drafted() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    let mut near_ties = 0;
    let prompts = [
        REWRITE,
        FREE,
        "List the planets of the solar system in order, one per line:",
        "Translate to French: The cat sleeps on the warm windowsill.",
        "def fibonacci(n):",
        "The history of the printing press begins",
        "Q: What is the capital of Australia?\nA:",
        "Write a JSON object describing a book with a title, an author and a year:",
    ];
    for (prompt, n) in prompts.into_iter().map(|p| (p, 64)) {
        let (steps, pieces) = plain(&engine, prompt, n);
        let expected: String = pieces.concat();
        let (text, stats) = session.generate_text(&request(prompt, n, Speculation::Ngram { max_draft: 8 })).unwrap();
        if text != expected {
            // Where they part, the plain decode's top two must be within the near-tie bound.
            let step = parting_step(&steps, &pieces, &text, &expected)
                .unwrap_or_else(|| panic!("{prompt:?}: parted after the plain text ended:\n{text:?}\n{expected:?}"));
            assert!(step.margin < BATCH_NEAR_TIE, "{prompt:?}: parted at a margin of {} (not a near tie):\n{text:?}\n{expected:?}", step.margin);
            near_ties += 1;
        }
        assert!(stats.accepted_tokens <= stats.drafted_tokens, "{stats:?}");
        assert!(stats.generation_decodes <= stats.completion_tokens, "{stats:?}");
        if prompt == REWRITE {
            // The rewrite quotes its input: drafts are taken, and fewer decodes than tokens run.
            assert!(stats.accepted_tokens >= 10, "{stats:?}");
            assert!(stats.generation_decodes + 10 <= stats.completion_tokens, "{stats:?}");
        }
        eprintln!(
            "{:.20}...: {} tokens in {} decodes, {} of {} drafts accepted",
            prompt, stats.completion_tokens, stats.generation_decodes, stats.accepted_tokens, stats.drafted_tokens
        );
    }
    eprintln!("parted at a near tie: {near_ties} of {}", prompts.len());
}

#[test]
fn stop_sequences_and_max_tokens_end_the_text_where_they_do_without_speculation() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    let speculative = Speculation::Ngram { max_draft: 8 };
    for (stop, max_tokens) in [(vec!["return".to_string()], 64), (vec![], 17), (vec!["acc".to_string(), "\n\n".to_string()], 64)] {
        let plain = GenerateRequest { stop: stop.clone(), ..request(REWRITE, max_tokens, Speculation::Off) };
        let spec = GenerateRequest { stop: stop.clone(), ..request(REWRITE, max_tokens, speculative) };
        let (a, sa) = session.generate_text(&plain).unwrap();
        let (b, sb) = session.generate_text(&spec).unwrap();
        assert_eq!((a.as_str(), sa.finish_reason), (b.as_str(), sb.finish_reason), "stop {stop:?}, max {max_tokens}");
        assert_eq!(sa.completion_tokens, sb.completion_tokens);
        // The session's cache holds what was decoded: a follow-up request reuses the prompt.
        let (_, again) = session.generate_text(&spec).unwrap();
        assert!(again.prompt_tokens_reused + 1 >= again.prompt_tokens, "{again:?}");
    }
}

#[test]
fn bad_speculation_settings_are_refused() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    for speculation in [Speculation::Ngram { max_draft: 0 }, Speculation::Draft { max_draft: 65 }] {
        let r = request(FREE, 8, speculation);
        assert!(matches!(session.generate(&r), Err(EngineError::InvalidRequest { field: "speculation", .. })), "{speculation:?}");
    }
    // No draft model loaded.
    let r = request(FREE, 8, Speculation::Draft { max_draft: 4 });
    let err = session.generate(&r).expect_err("refused");
    assert!(err.to_string().contains("no draft model"), "{err}");
}

/// A prompt whose continuation repeats it: prompt lookup drafts from the first token on.
const REPEATING: &str = "red green blue, red green blue, red green blue, red green blue, red green";

/// A request's text as token ids (re-tokenized: a function of the text, the same for both arms
/// of a comparison).
fn sampled_ids(engine: &Engine, session: &mut Session<'_>, r: &GenerateRequest) -> (Vec<i32>, GenerationStats) {
    let mut generation = session.generate(r).unwrap();
    let mut text = String::new();
    while let Some(delta) = generation.next_text() {
        text.push_str(delta.unwrap());
    }
    let stats = generation.stats().clone();
    drop(generation);
    let ids = engine.tokenize_with(&text, TokenizeOptions { add_special: false, parse_special: false }).unwrap();
    (ids, stats)
}

/// Pearson's statistic of two equal-sized samples over the same cells, with its degrees of
/// freedom. Cells too thin for the statistic (fewer than 10 observations in both samples
/// together, so an expected count under 5 in each) are pooled into one.
fn two_sample_chi_square(a: &[u32], b: &[u32]) -> (f64, usize) {
    let (mut cells, mut pooled) = (Vec::new(), (0, 0));
    for (&x, &y) in a.iter().zip(b) {
        if x + y >= 10 {
            cells.push((x, y));
        } else {
            pooled = (pooled.0 + x, pooled.1 + y);
        }
    }
    if pooled.0 + pooled.1 > 0 {
        cells.push(pooled);
    }
    let (na, nb) = (a.iter().sum::<u32>() as f64, b.iter().sum::<u32>() as f64);
    let chi = cells
        .iter()
        .map(|&(x, y)| {
            let total = (x + y) as f64;
            let (ea, eb) = (total * na / (na + nb), total * nb / (na + nb));
            (x as f64 - ea).powi(2) / ea + (y as f64 - eb).powi(2) / eb
        })
        .sum();
    (chi, cells.len().saturating_sub(1))
}

/// Where the chi-square distribution with `df` degrees of freedom leaves 0.1 % above it, by
/// Wilson and Hilferty's cube-root approximation (within 3 % of the tables from df 2 up, and
/// above them: a little lenient, never strict).
fn chi_square_critical_0_001(df: usize) -> f64 {
    const Z: f64 = 3.0902;
    let k = df as f64;
    let c = 2.0 / (9.0 * k);
    k * (1.0 - c + Z * c.sqrt()).powi(3)
}

#[test]
fn the_critical_values_match_the_tables() {
    for (df, table) in [(2, 13.816), (5, 20.515), (10, 29.588), (20, 45.315)] {
        let got = chi_square_critical_0_001(df);
        assert!(got >= table && (got - table) / table < 0.03, "df {df}: {got} vs {table}");
    }
    // Identical samples score 0; disjoint ones score the sample size.
    assert_eq!(two_sample_chi_square(&[50, 50], &[50, 50]).0, 0.0);
    assert!((two_sample_chi_square(&[100, 0], &[0, 100]).0 - 200.0).abs() < 1e-9);
}

/// With a chain cut to three candidates and flattened (top-k 3, temperature 2), every position
/// is a real three-way draw. Over many seeds, the tokens at each drafted position follow the
/// same distribution with speculation as without: the plain runs and the speculative runs use
/// disjoint seeds, so this compares two samples, not one sample twice. A verifier that kept
/// drafts without drawing would pile the speculative sample onto the drafted tokens.
#[test]
fn sampled_speculation_keeps_the_distribution() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    let sampling = |seed| SamplingParams { temperature: 2.0, top_k: 3, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, seed, ..Default::default() };
    const RUNS: u32 = 300;
    const POSITIONS: usize = 4;
    // Per position, counts per token (keyed by id), for plain and speculative runs.
    let mut counts: Vec<std::collections::BTreeMap<i32, [u32; 2]>> = vec![Default::default(); POSITIONS];
    let (mut drafted, mut accepted) = (0, 0);
    for arm in 0..2 {
        for run in 0..RUNS {
            let seed = 1 + run + arm as u32 * RUNS;
            let speculation = if arm == 1 { Speculation::Ngram { max_draft: 4 } } else { Speculation::Off };
            let r = GenerateRequest { max_tokens: POSITIONS, sampling: sampling(seed), speculation, ..GenerateRequest::new(REPEATING) };
            let (ids, stats) = sampled_ids(&engine, &mut session, &r);
            drafted += stats.drafted_tokens;
            accepted += stats.accepted_tokens;
            for (position, id) in ids.iter().take(POSITIONS).enumerate() {
                counts[position].entry(*id).or_default()[arm] += 1;
            }
        }
    }
    // Both paths of the verifier ran: drafts kept, and drafts replaced by a different draw.
    assert!(accepted > 50 && accepted + 50 < drafted, "{accepted} of {drafted} drafts kept");
    for (position, cells) in counts.iter().enumerate() {
        let plain: Vec<u32> = cells.values().map(|c| c[0]).collect();
        let spec: Vec<u32> = cells.values().map(|c| c[1]).collect();
        let (chi, df) = two_sample_chi_square(&plain, &spec);
        eprintln!("position {position}: plain {plain:?} speculative {spec:?}: chi-square {chi:.2}, df {df}");
        assert!(df >= 1, "position {position} was not a draw: {cells:?}");
        assert!(chi < chi_square_critical_0_001(df), "position {position}: {cells:?}: chi-square {chi:.2} with {df} df");
    }
}

#[test]
fn a_draft_model_drafts_for_a_model_with_its_vocabulary() {
    // The default model as its own draft: the same vocabulary, and greedy drafts that the main
    // model (the same weights) keeps nearly always.
    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig { n_ctx: 2048, n_threads: 2, n_threads_batch: 2, ..Default::default() };
    config.draft_model = Some(default_model_path());
    let engine = Engine::load(config).expect("a model drafts for itself");
    let mut session = engine.session().unwrap();
    let n = 40;
    let (steps, pieces) = plain(&engine, FREE, n);
    let (text, stats) = session.generate_text(&request(FREE, n, Speculation::Draft { max_draft: 6 })).unwrap();
    let expected: String = pieces.concat();
    if text != expected {
        let margin = parting_step(&steps, &pieces, &text, &expected).map_or(f32::INFINITY, |s| s.margin);
        assert!(margin < BATCH_NEAR_TIE, "parted at a margin of {margin}:\n{text:?}\n{expected:?}");
    }
    assert!(stats.drafted_tokens >= 20 && stats.accepted_tokens * 10 >= stats.drafted_tokens * 8, "{stats:?}");
    assert!(stats.generation_decodes * 2 < stats.completion_tokens, "{stats:?}");
    // Sampled: the draft model's argmax is kept only where the sampler draws it.
    let sampled = GenerateRequest {
        max_tokens: 32,
        sampling: harness::e2e_sampling(),
        speculation: Speculation::Draft { max_draft: 6 },
        ..GenerateRequest::new(FREE)
    };
    let (text, stats) = session.generate_text(&sampled).unwrap();
    assert!(!text.is_empty() && stats.drafted_tokens > 0 && stats.accepted_tokens <= stats.drafted_tokens, "{stats:?}");

    // A model with another vocabulary is refused at load, naming the difference.
    let other = PathBuf::from(std::env::var("EXSA_SYNTH_MODELS").expect("set by .cargo/config.toml")).join("llama-tiny-32k.gguf");
    let mut config = EngineConfig::new(default_model_path());
    config.draft_model = Some(other.clone());
    match Engine::load(config) {
        Err(EngineError::DraftModel { path, reason }) => {
            assert_eq!(path, other);
            assert!(reason.contains("32768 tokens") && reason.contains("262144"), "{reason}");
        }
        other => panic!("expected DraftModel, got {other:?}"),
    }
    // A draft model that does not load is the load error of its path.
    let mut config = EngineConfig::new(default_model_path());
    config.draft_model = Some("/nonexistent/draft.gguf".into());
    assert!(matches!(Engine::load(config), Err(EngineError::Load { path, .. }) if path == std::path::Path::new("/nonexistent/draft.gguf")));
}
