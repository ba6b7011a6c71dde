//! The servers must answer the same prompts: each renders a chat of every kind the scenarios
//! send (system prompt, user and assistant turns) through `/apply-template`, and counts its
//! tokens (`usage.prompt_tokens` of a one-token reply). A run whose servers differ in either
//! stops before it measures anything: they would be measured on different work.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::load::{Replies, chat_body};

/// What one server makes of the probe chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The prompt its template renders.
    pub prompt: String,
    /// That prompt's length in tokens, as its usage counts it.
    pub prompt_tokens: usize,
}

/// A chat with a turn of every role the scenarios send.
fn probe_messages() -> Vec<Value> {
    vec![
        json!({ "role": "system", "content": "You are a helpful assistant." }),
        json!({ "role": "user", "content": "Why do cats purr?" }),
        json!({ "role": "assistant", "content": "Mostly when they are content." }),
        json!({ "role": "user", "content": "Can you say more about that?" }),
    ]
}

/// Asks the server at `base` for its [`Probe`].
pub fn probe(base: &str, model: &str) -> Result<Probe> {
    let client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(120)).build()?;
    let messages = probe_messages();
    let rendered: Value = client
        .post(format!("{base}/apply-template"))
        .json(&json!({ "model": model, "messages": messages }))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .with_context(|| format!("{base}/apply-template"))?;
    let prompt = rendered["prompt"].as_str().with_context(|| format!("{base}/apply-template answered no prompt: {rendered}"))?.to_owned();
    let answer: Value = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body(model, &messages, Replies { max_tokens: 1, temperature: 0.0 }, 0, false))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .with_context(|| format!("{base}/v1/chat/completions"))?;
    let prompt_tokens =
        answer["usage"]["prompt_tokens"].as_u64().with_context(|| format!("{base} answered no usage.prompt_tokens: {answer}"))? as usize;
    Ok(Probe { prompt, prompt_tokens })
}

/// Fails naming the first server whose probe differs from the first server's, and where.
pub fn check(probes: &[(&str, Probe)]) -> Result<()> {
    let Some(((first, reference), rest)) = probes.split_first() else { return Ok(()) };
    for (name, probe) in rest {
        if probe.prompt != reference.prompt {
            let at = probe.prompt.chars().zip(reference.prompt.chars()).take_while(|(a, b)| a == b).count();
            let around = |s: &str| s.chars().skip(at.saturating_sub(20)).take(60).collect::<String>();
            bail!(
                "{name} and {first} render the same chat differently (from character {at}: {:?} against {:?}): pass both the same chat template",
                around(&probe.prompt),
                around(&reference.prompt)
            );
        }
        if probe.prompt_tokens != reference.prompt_tokens {
            bail!("{name} counts {} prompt tokens where {first} counts {} for the same prompt", probe.prompt_tokens, reference.prompt_tokens);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(prompt: &str, prompt_tokens: usize) -> Probe {
        Probe { prompt: prompt.into(), prompt_tokens }
    }

    #[test]
    fn servers_with_the_same_prompt_and_count_pass() {
        let gemma = "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n";
        check(&[("exsa serve", probe(gemma, 12)), ("llama-server", probe(gemma, 12))]).unwrap();
        check(&[("exsa serve", probe(gemma, 12))]).unwrap();
    }

    #[test]
    fn a_mismatched_template_or_count_fails_naming_the_server() {
        let gemma = "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n";
        let chatml = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n";
        let e = check(&[("exsa serve", probe(gemma, 12)), ("llama-server", probe(chatml, 12))]).unwrap_err().to_string();
        assert!(e.starts_with("llama-server and exsa serve render the same chat differently (from character 1"), "{e}");
        let e = check(&[("exsa serve", probe(gemma, 12)), ("llama-server", probe(gemma, 13))]).unwrap_err().to_string();
        assert!(e.contains("llama-server counts 13 prompt tokens where exsa serve counts 12"), "{e}");
    }
}
