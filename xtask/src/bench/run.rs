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
use super::lookup::{self, Reference};
use super::rpc_servers;

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

fn args(settings: &RunSettings, variant_threads: Option<u32>, variant_fa: Option<&str>, rpc: &[String]) -> Vec<String> {
    let mut a = vec!["--model".to_string(), settings.model.display().to_string(), "--log".into(), "error".into()];
    if !rpc.is_empty() {
        a.extend(["--rpc".into(), rpc.join(",")]);
    }
    if let Some(t) = variant_threads.or(settings.threads) {
        a.extend(["--threads".into(), t.to_string()]);
    }
    a.extend(["--flash-attn".into(), variant_fa.unwrap_or(&settings.flash_attn).to_string()]);
    a.push(format!("--gpu-layers={}", settings.gpu_layers));
    a.extend(["bench".into(), "--batch".into(), settings.batch.to_string(), "--ubatch".into(), settings.ubatch.to_string()]);
    a
}

/// Waits for `child`, reading all of `output` (its piped stdout or stderr) meanwhile, and kills
/// it past `timeout`. Returns its exit status and what it wrote.
pub(crate) fn wait_reading(
    mut child: std::process::Child,
    mut output: impl Read + Send + 'static,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = output.read_to_string(&mut s);
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
            bail!("killed after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status, reader.join().unwrap_or_default()))
}

/// Runs the binary, kills it past the timeout, and parses its report.
fn run_json(binary: &Path, args: &[String], timeout: Duration, log: &Path) -> Result<BenchReport> {
    let mut child = build::command(&binary.to_path_buf())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(log)?))
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (status, out) = wait_reading(child, stdout, timeout).with_context(|| format!("see {}", log.display()))?;
    if !status.success() {
        bail!("exited with {status} (see {})", log.display());
    }
    BenchReport::parse(&out).with_context(|| format!("printed no bench report (see {})", log.display()))
}

impl VariantRuns {
    /// Empty slots, one per round, for `tests`.
    fn for_tests<'t>(tests: impl Iterator<Item = &'t String>, reps: usize) -> VariantRuns {
        let mut entry = VariantRuns::default();
        for t in tests {
            entry.tokens_per_s.insert(t.clone(), vec![None; reps]);
            entry.ttft_ms.insert(t.clone(), vec![None; reps]);
            entry.outside_decode_pct.insert(t.clone(), vec![None; reps]);
            entry.tokens_per_decode.insert(t.clone(), vec![None; reps]);
            entry.draft_acceptance_pct.insert(t.clone(), vec![None; reps]);
        }
        entry
    }

    /// Files one run's samples under `round`.
    fn record(&mut self, round: usize, samples: &[exsa_bench_protocol::Sample]) {
        for s in samples {
            let slots = [
                (&mut self.tokens_per_s, Some(s.tokens_per_s)),
                (&mut self.ttft_ms, s.time_to_first_token_ms),
                (&mut self.outside_decode_pct, s.outside_decode_percent),
                (&mut self.tokens_per_decode, s.tokens_per_decode),
                (&mut self.draft_acceptance_pct, s.draft_acceptance_percent),
            ];
            for (map, value) in slots {
                if let Some(slot) = map.get_mut(&s.test) {
                    slot[round] = value;
                }
            }
        }
    }
}

/// What runs in a round: a variant's `exsa bench`, or the llama-lookup reference.
#[derive(Clone, Copy)]
enum Runner<'a> {
    Exsa(&'a Built, &'a PathBuf),
    Lookup(&'a Reference),
}

impl Runner<'_> {
    fn name(&self) -> &str {
        match self {
            Runner::Exsa(b, _) => &b.variant.name,
            Runner::Lookup(_) => lookup::NAME,
        }
    }
}

/// The greedy tokens of every variant, and the rounds (with the llama-lookup reference, when
/// given, as one more variant of the task tests).
pub fn run_all(built: &[Built], reference: Option<&Reference>, settings: &RunSettings, out_dir: &Path) -> BTreeMap<String, VariantRuns> {
    let mut runs: BTreeMap<String, VariantRuns> = BTreeMap::new();
    let mut runnable: Vec<Runner<'_>> = built.iter().filter_map(|b| b.binary.as_ref().ok().map(|p| Runner::Exsa(b, p))).collect();
    for b in built {
        let entry = runs.entry(b.variant.name.clone()).or_insert_with(|| VariantRuns::for_tests(settings.tests.iter(), settings.reps));
        if let Err(e) = &b.binary {
            entry.errors.push(format!("build: {e}"));
        }
    }
    if let Some(reference) = reference {
        runs.insert(lookup::NAME.into(), VariantRuns::for_tests(settings.tests.iter().filter(|t| lookup::runs(t)), settings.reps));
        runnable.push(Runner::Lookup(reference));
    }
    let timeout = Duration::from_secs(settings.timeout_s);

    // The equivalence check, before any timing.
    if settings.greedy_tokens > 0 {
        for (b, bin) in runnable.iter().filter_map(|r| if let Runner::Exsa(b, bin) = r { Some((b, bin)) } else { None }) {
            let v = &b.variant;
            let log = out_dir.join(format!("run-{}.log", v.name));
            let entry = runs.get_mut(&v.name).expect("entry made above");
            let run = rpc_servers::start(bin, &v.rpc, v.threads.or(settings.threads)).and_then(|servers| {
                let mut a = args(settings, v.threads, v.flash_attn.as_deref(), &servers.endpoints);
                a.extend(["--greedy-only".into(), "--greedy-tokens".into(), settings.greedy_tokens.to_string()]);
                run_json(bin, &a, timeout, &log)
            });
            match run {
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
            let runner = runnable[(k + round) % runnable.len()];
            let name = runner.name().to_string();
            bar.set_message(format!("round {} {name}", round + 1));
            let entry = runs.get_mut(&name).expect("entry made above");
            if entry.crashed {
                // A variant that crashed once crashes again: don't spend the budget on it.
                bar.inc(1);
                continue;
            }
            let result = match runner {
                Runner::Exsa(b, bin) => {
                    let v = &b.variant;
                    let log = out_dir.join(format!("run-{}.log", v.name));
                    rpc_servers::start(bin, &v.rpc, v.threads.or(settings.threads))
                        .and_then(|servers| {
                            let mut a = args(settings, v.threads, v.flash_attn.as_deref(), &servers.endpoints);
                            a.extend(["--tests".into(), settings.tests.join(","), "--reps".into(), "1".into()]);
                            run_json(bin, &a, timeout, &log)
                        })
                        .map(|report| {
                            entry.record(round, &report.samples);
                            if entry.report.is_none() {
                                entry.report = Some(report);
                            }
                        })
                }
                Runner::Lookup(reference) => settings.tests.iter().filter(|t| lookup::runs(t)).try_for_each(|test| {
                    let sample = lookup::run_once(reference, test, settings, out_dir, timeout)?;
                    entry.record(round, &[sample]);
                    Ok(())
                }),
            };
            if let Err(e) = result {
                bar.println(format!("variant {name} failed in round {}: {e:#}", round + 1));
                entry.errors.push(format!("run (round {}): {e:#}", round + 1));
                entry.crashed = true;
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    runs
}
