//! The ceiling of the `distinct` scenario: llama.cpp's own `llama-batched-bench` decoding as
//! many sequences as there are clients, each a prompt of the scenario's length and a reply of
//! `--max-tokens`, with no HTTP, no scheduling and no sampling: what the kernels give. Its
//! aggregate is the generated tokens over the whole time, prompts included, as the servers'.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::Launch;

/// One level of the ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    pub round: usize,
    pub sequences: usize,
    pub prompt_tokens: usize,
    /// Generated tokens per second over the prompts' and the replies' decoding.
    pub tokens_per_s: f64,
}

/// Runs `binary` (llama-batched-bench) with the servers' model, context, batch and threads
/// (`launch`) for each of `levels` sequences of `prompt_tokens` prompt tokens.
pub fn measure(binary: &Path, launch: &Launch, prompt_tokens: usize, levels: &[usize], round: usize) -> Result<Vec<Ceiling>> {
    let levels_arg = levels.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let threads = launch.threads.to_string();
    let out = Command::new(binary)
        .arg("-m")
        .arg(launch.model)
        .args(["-c", &launch.args.ctx.to_string(), "-b", "512", "-ub", "512", "-t", &threads, "-tb", &threads, "-kvu"])
        .args(["-npp", &prompt_tokens.to_string(), "-ntg", &launch.args.max_tokens.to_string(), "-npl", &levels_arg, "--output-format", "jsonl"])
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", binary.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rows = parse(&String::from_utf8_lossy(&out.stdout), round)?;
    if rows.len() != levels.len() {
        bail!("{} gave {} rows for {} levels", binary.display(), rows.len(), levels.len());
    }
    Ok(rows)
}

/// The JSON lines llama-batched-bench writes (`pp`, `tg`, `pl`, `t`: seconds for all of it).
fn parse(stdout: &str, round: usize) -> Result<Vec<Ceiling>> {
    stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("a line that is not JSON: {line}"))?;
            let get = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {line}"));
            let (pp, tg, pl, t) = (get("pp")?, get("tg")?, get("pl")?, get("t")?);
            Ok(Ceiling { round, sequences: pl as usize, prompt_tokens: pp as usize, tokens_per_s: pl * tg / t })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregate_counts_generated_tokens_over_the_whole_time() {
        let out = "build: ...\n{\"n_kv_max\": 16384, \"pp\": 24, \"tg\": 96, \"pl\": 8, \"n_kv\": 960, \"t_pp\": 0.5, \"speed_pp\": 384.0, \"t_tg\": 4.3, \"speed_tg\": 178.6, \"t\": 4.8, \"speed\": 200.0}\n";
        let rows = parse(out, 2).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].round, rows[0].sequences, rows[0].prompt_tokens), (2, 8, 24));
        assert!((rows[0].tokens_per_s - 8.0 * 96.0 / 4.8).abs() < 1e-9);
        assert!(parse("{\"pp\": 1}", 0).is_err());
    }
}
