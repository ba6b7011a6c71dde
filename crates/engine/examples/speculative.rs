//! Speculative decoding with the engine as a library: tokens are drafted cheaply, the model
//! checks a whole draft in one decode, and keeps the drafted tokens it would have chosen itself.
//! The same greedy request runs three ways: plain (one decode per token), with prompt lookup
//! (`Speculation::Ngram`: drafts copied from where the last tokens occurred before, good when the
//! answer quotes its prompt) and with a draft model (`Speculation::Draft`: a smaller model with
//! the same vocabulary, `EngineConfig::draft_model`).
//!
//!     cargo run -p exsa-engine --example speculative [-- --model PATH] [--draft PATH]
//!
//! `--draft` defaults to the model itself: that shows the mechanics (it drafts what the model
//! chooses, so nearly every draft is kept) but saves nothing; a real draft model is a smaller one
//! of the same family. Speculation does not change what is generated: the program checks that
//! the three texts are the same and fails otherwise.

use std::path::PathBuf;

use exsa_engine::{Engine, EngineConfig, GenerateRequest, GenerationStats, SamplingParams, Speculation};

/// A prompt whose answer quotes it: prompt lookup finds most of the reply in the prompt.
const PROMPT: &str = "Rewrite this Python function, renaming the variable `total` to `acc`.\n\n```python\n\
def sum_list(values):\n    total = 0\n    for v in values:\n        if v > 0:\n            total += v\n    return total\n```\n\n\
Rewritten:\n```python\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (model, draft) = parse_args()?;
    let mut config = EngineConfig::new(&model);
    // The draft model is loaded beside the main one; the engine checks that its vocabulary is
    // the main model's (drafts are handed over as token ids).
    config.draft_model = Some(draft.unwrap_or(model));
    let engine = Engine::load(config)?;
    let mut session = engine.session()?;

    let mut runs: Vec<(&str, String, GenerationStats)> = Vec::new();
    for (name, speculation) in
        [("plain", Speculation::Off), ("prompt lookup", Speculation::Ngram { max_draft: 8 }), ("draft model", Speculation::Draft { max_draft: 6 })]
    {
        // Up to the end of the code block: the part the model quotes.
        let request = GenerateRequest::new(PROMPT).max_tokens(64).stop(["```"]).sampling(SamplingParams::greedy()).speculation(speculation);
        let (text, stats) = session.generate_text(&request)?;
        println!(
            "{name:>13}: {} tokens in {} decodes, {} of {} drafted tokens kept, {:.1} tokens/s",
            stats.completion_tokens, stats.generation_decodes, stats.accepted_tokens, stats.drafted_tokens, stats.generation_tokens_per_s
        );
        runs.push((name, text, stats));
    }
    println!("---\n{}\n---", runs[0].1);

    // Every kept token is one the model chose: greedy output is the plain output. (A draft is
    // checked in a batched decode, whose float rounding differs a little from one-token decodes:
    // where the model's two best tokens are within rounding of each other, the texts can part.
    // The engine's tests allow that, counted. The code block's tokens are clear choices; the
    // prose after it is not, which is why the request stops at its end.)
    let (_, plain, _) = &runs[0];
    for (name, text, stats) in &runs[1..] {
        if text != plain {
            return Err(format!("{name} changed the text:\n{text}\n--- instead of ---\n{plain}").into());
        }
        if stats.drafted_tokens == 0 || stats.accepted_tokens > stats.drafted_tokens {
            return Err(format!("{name}: {} of {} drafted tokens kept", stats.accepted_tokens, stats.drafted_tokens).into());
        }
        // Kept drafts are tokens that needed no decode of their own.
        if stats.generation_decodes >= stats.completion_tokens {
            return Err(format!("{name} saved no decodes: {} for {} tokens", stats.generation_decodes, stats.completion_tokens).into());
        }
    }
    println!("the same text all three ways");
    Ok(())
}

/// `--model PATH` and `--draft PATH`, each optional.
fn parse_args() -> Result<(PathBuf, Option<PathBuf>), String> {
    let (mut model, mut draft) = (exsa_engine::default_model_path(), None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().map(PathBuf::from).ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model = value,
            "--draft" => draft = Some(value),
            _ => return Err(format!("unknown option {flag}; usage: speculative [--model PATH] [--draft PATH]")),
        }
    }
    Ok((model, draft))
}
