//! Runs the variants' binaries: the equivalence check, then interleaved timed rounds, each
//! run a separate process.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use exsa_bench_protocol::{BenchReport, Equivalence, GreedyStep, NEAR_TIE, compare};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::build::{self, Built};

/// Runtime settings shared by every variant.
#[derive(Clone, Debug, Serialize)]
pub struct RunSettings {
    pub model: PathBuf,
    pub tests: Vec<String>,
    pub reps: usize,
    pub threads: Option<u32>,
    pub batch: u32,
    pub ubatch: u32,
    pub flash_attn: String,
    pub gpu_layers: i32,
    pub greedy_tokens: usize,
    /// A run that takes longer than this is killed and counted as failed.
    pub timeout_s: u64,
}

/// Everything measured for one variant.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VariantRuns {
    /// tokens/s per test, one entry per round (None where the run failed).
    pub tokens_per_s: BTreeMap<String, Vec<Option<f64>>>,
    /// e2e time to first token (ms), per round.
    pub ttft_ms: BTreeMap<String, Vec<Option<f64>>>,
    /// e2e share of generation time outside decoding (%), per round.
    pub outside_decode_pct: BTreeMap<String, Vec<Option<f64>>>,
    /// Speculative tests: generated tokens per decode, and drafts accepted (%), per round.
    pub tokens_per_decode: BTreeMap<String, Vec<Option<f64>>>,
    pub draft_acceptance_pct: BTreeMap<String, Vec<Option<f64>>>,
    pub errors: Vec<String>,
    /// A timed run failed: the variant is not run again (a crash repeats itself).
    pub crashed: bool,
    /// The last successful run's report: build info, system info, model info.
    pub report: Option<BenchReport>,
    /// The greedy trace of the equivalence prompt.
    pub greedy: Option<Vec<GreedyStep>>,
}

impl VariantRuns {
    /// How this variant's greedy trace compares with `baseline`'s under the near-tie rule, when
    /// both have one.
    pub fn equivalence_to(&self, baseline: &VariantRuns) -> Option<Equivalence> {
        Some(compare(baseline.greedy.as_ref()?, self.greedy.as_ref()?, NEAR_TIE))
    }
}

fn args(settings: &RunSettings, variant_threads: Option<u32>, variant_fa: Option<&str>) -> Vec<String> {
    let mut a = vec!["--model".to_string(), settings.model.display().to_string(), "--log".into(), "error".into()];
    if let Some(t) = variant_threads.or(settings.threads) {
        a.extend(["--threads".into(), t.to_string()]);
    }
    a.extend(["--flash-attn".into(), variant_fa.unwrap_or(&settings.flash_attn).to_string()]);
    a.push(format!("--gpu-layers={}", settings.gpu_layers));
    a.extend(["bench".into(), "--batch".into(), settings.batch.to_string(), "--ubatch".into(), settings.ubatch.to_string()]);
    a
}

/// Runs the binary, kills it past the timeout, and parses its report.
fn run_json(binary: &Path, args: &[String], timeout: Duration, log: &Path) -> Result<BenchReport> {
    let mut child = build::command(&binary.to_path_buf())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(log)?))
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("killed after {} s (see {})", timeout.as_secs(), log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("exited with {status} (see {})", log.display());
    }
    BenchReport::parse(&out).with_context(|| format!("printed no bench report (see {})", log.display()))
}

/// The greedy tokens of every variant, and the rounds.
pub fn run_all(built: &[Built], settings: &RunSettings, out_dir: &Path) -> BTreeMap<String, VariantRuns> {
    let mut runs: BTreeMap<String, VariantRuns> = BTreeMap::new();
    let runnable: Vec<(&Built, &PathBuf)> = built.iter().filter_map(|b| b.binary.as_ref().ok().map(|p| (b, p))).collect();
    for b in built {
        let entry = runs.entry(b.variant.name.clone()).or_default();
        if let Err(e) = &b.binary {
            entry.errors.push(format!("build: {e}"));
        }
        for t in &settings.tests {
            entry.tokens_per_s.insert(t.clone(), vec![None; settings.reps]);
            entry.ttft_ms.insert(t.clone(), vec![None; settings.reps]);
            entry.outside_decode_pct.insert(t.clone(), vec![None; settings.reps]);
            entry.tokens_per_decode.insert(t.clone(), vec![None; settings.reps]);
            entry.draft_acceptance_pct.insert(t.clone(), vec![None; settings.reps]);
        }
    }
    let timeout = Duration::from_secs(settings.timeout_s);

    // The equivalence check, before any timing.
    if settings.greedy_tokens > 0 {
        for (b, bin) in &runnable {
            let v = &b.variant;
            let log = out_dir.join(format!("run-{}.log", v.name));
            let mut a = args(settings, v.threads, v.flash_attn.as_deref());
            a.extend(["--greedy-only".into(), "--greedy-tokens".into(), settings.greedy_tokens.to_string()]);
            let entry = runs.get_mut(&v.name).expect("entry made above");
            match run_json(bin, &a, timeout, &log) {
                Ok(report) => {
                    entry.greedy = report.greedy.clone();
                    entry.report = Some(report);
                }
                Err(e) => entry.errors.push(format!("equivalence run: {e:#}")),
            }
        }
    }

    let bar = ProgressBar::new((settings.reps * runnable.len()) as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} runs [{elapsed_precise}, ~{eta} left] {msg}").expect("valid template"));
    for round in 0..settings.reps {
        // Rotate the order each round so no variant always runs first (or right after another).
        for k in 0..runnable.len() {
            let (b, bin) = runnable[(k + round) % runnable.len()];
            let v = &b.variant;
            bar.set_message(format!("round {} {}", round + 1, v.name));
            let entry = runs.get_mut(&v.name).expect("entry made above");
            if entry.crashed {
                // A variant that crashed once crashes again: don't spend the budget on it.
                bar.inc(1);
                continue;
            }
            let log = out_dir.join(format!("run-{}.log", v.name));
            let mut a = args(settings, v.threads, v.flash_attn.as_deref());
            a.extend(["--tests".into(), settings.tests.join(","), "--reps".into(), "1".into()]);
            match run_json(bin, &a, timeout, &log) {
                Ok(report) => {
                    for s in &report.samples {
                        if let Some(slot) = entry.tokens_per_s.get_mut(&s.test) {
                            slot[round] = Some(s.tokens_per_s);
                        }
                        if let Some(slot) = entry.ttft_ms.get_mut(&s.test) {
                            slot[round] = s.time_to_first_token_ms;
                        }
                        if let Some(slot) = entry.outside_decode_pct.get_mut(&s.test) {
                            slot[round] = s.outside_decode_percent;
                        }
                        if let Some(slot) = entry.tokens_per_decode.get_mut(&s.test) {
                            slot[round] = s.tokens_per_decode;
                        }
                        if let Some(slot) = entry.draft_acceptance_pct.get_mut(&s.test) {
                            slot[round] = s.draft_acceptance_percent;
                        }
                    }
                    if entry.report.is_none() {
                        entry.report = Some(report);
                    }
                }
                Err(e) => {
                    bar.println(format!("variant {} failed in round {}: {e:#}", v.name, round + 1));
                    entry.errors.push(format!("run (round {}): {e:#}", round + 1));
                    entry.crashed = true;
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    runs
}
