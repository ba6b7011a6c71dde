//! Speculative decoding by prompt lookup on the real default model: greedy output is the same
//! as without speculation (up to the project's near-tie rule, counted), drafts are accepted
//! where the answer quotes its prompt, and stop sequences and max tokens end the text exactly
//! where they do without speculation.

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

#[test]
fn greedy_output_is_unchanged_and_quoted_text_is_drafted() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    let mut near_ties = 0;
    for (prompt, n) in [(REWRITE, 64), (FREE, 64)] {
        let (steps, pieces) = plain(&engine, prompt, n);
        let expected: String = pieces.concat();
        let (text, stats) = session.generate_text(&request(prompt, n, Speculation::Ngram { max_draft: 8 })).unwrap();
        if text != expected {
            // Where they part, the plain decode's top two must be within the near-tie bound.
            let common = text.bytes().zip(expected.bytes()).take_while(|(a, b)| a == b).count();
            let mut at = 0;
            let step = pieces.iter().position(|p| {
                at += p.len();
                at > common
            });
            let step = step.map(|i| &steps[i]).unwrap_or_else(|| panic!("{prompt:?}: parted after the plain text ended:\n{text:?}\n{expected:?}"));
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
    eprintln!("parted at a near tie: {near_ties} of 2");
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
fn speculation_refuses_what_it_cannot_keep_lossless() {
    let engine = engine();
    let mut session = engine.session().unwrap();
    for sampling in [
        SamplingParams { temperature: 0.7, ..Default::default() },
        SamplingParams { repeat_penalty: 1.1, ..SamplingParams::greedy() },
        SamplingParams { grammar: Some("root ::= \"a\"".into()), ..SamplingParams::greedy() },
    ] {
        let r = GenerateRequest { sampling, ..request(FREE, 8, Speculation::Ngram { max_draft: 8 }) };
        assert!(matches!(session.generate(&r), Err(EngineError::InvalidRequest { field: "speculation", .. })));
    }
    let r = request(FREE, 8, Speculation::Ngram { max_draft: 0 });
    assert!(matches!(session.generate(&r), Err(EngineError::InvalidRequest { field: "speculation", .. })));
}
