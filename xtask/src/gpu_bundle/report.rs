//! The report of a GPU bundle's run (run.sh's results folder): the machine, each CUDA module's
//! build, exsa bench's tokens/s per variant (median, mean ± sd over interleaved rounds, and B
//! against A paired by round with a bootstrap interval, as bench-compare reports), and the
//! server's throughput and time to first token at 1 and 8 streams.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use exsa_bench_protocol::BenchReport;
use serde::Deserialize;

use crate::bench::stats;

#[derive(Deserialize)]
struct Run {
    variant: String,
    round: usize,
    stdout: String,
}

#[derive(Deserialize)]
struct Build {
    variant: String,
    archs: String,
    build_s: u64,
    module_bytes: u64,
}

#[derive(Deserialize)]
struct ServeLevel {
    variant: String,
    streams: usize,
    requests: usize,
    errors: Vec<String>,
    tokens_per_s: Option<f64>,
    ttft_ms_p50: Option<f64>,
    ttft_ms_max: Option<f64>,
}

const TESTS: [&str; 3] = ["pp512", "tg128", "e2e"];

/// Writes `report.md` into `results` and returns its text.
pub fn write(results: &Path) -> Result<String> {
    let machine = std::fs::read_to_string(results.join("machine.txt")).unwrap_or_default();
    let builds: Vec<Build> = json_lines(&results.join("builds.jsonl"))?;
    let runs: Vec<Run> = json_lines(&results.join("runs.jsonl"))?;
    let serve: Vec<ServeLevel> = json_lines(&results.join("serve.jsonl")).unwrap_or_default();
    let text = render(&machine, &builds, &runs, &serve)?;
    std::fs::write(results.join("report.md"), &text)?;
    Ok(text)
}

fn json_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display()))).collect()
}

fn render(machine: &str, builds: &[Build], runs: &[Run], serve: &[ServeLevel]) -> Result<String> {
    let mut out = String::new();
    let lines: Vec<&str> = machine.lines().collect();
    writeln!(
        out,
        "GPU: {} (name, driver, compute capability, memory); {}; {}; {} CPU threads\n",
        lines.first().unwrap_or(&"?"),
        lines.get(1).unwrap_or(&"?"),
        lines.get(2).unwrap_or(&"?"),
        lines.get(3).unwrap_or(&"?")
    )?;
    writeln!(out, "| variant | CUDA architectures | module build | libggml-cuda.so |\n|---|---|---|---|")?;
    for b in builds {
        writeln!(out, "| {} | `{}` | {} s | {:.1} MiB |", b.variant, b.archs, b.build_s, b.module_bytes as f64 / (1 << 20) as f64)?;
    }

    // tokens/s per variant and test, one slot per round.
    let rounds = runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    let mut speed: BTreeMap<(String, String), Vec<Option<f64>>> = BTreeMap::new();
    let mut first_report: BTreeMap<String, BenchReport> = BTreeMap::new();
    for run in runs {
        let report = BenchReport::parse(&run.stdout).with_context(|| format!("variant {} round {}: not a bench report", run.variant, run.round))?;
        for s in &report.samples {
            let slots = speed.entry((run.variant.clone(), s.test.clone())).or_insert_with(|| vec![None; rounds]);
            slots[run.round] = Some(s.tokens_per_s);
        }
        first_report.entry(run.variant.clone()).or_insert(report);
    }
    writeln!(out, "\n| test | variant | t/s median | mean ± sd | n | B / A (95 % CI) |\n|---|---|---:|---:|---:|---|")?;
    for test in TESTS {
        for variant in ["A", "B"] {
            let Some(samples) = speed.get(&(variant.to_string(), test.to_string())) else { continue };
            let present: Vec<f64> = samples.iter().flatten().copied().collect();
            let Some(s) = stats::summarize(&present) else { continue };
            let ratio = match (variant, speed.get(&("A".to_string(), test.to_string()))) {
                ("B", Some(a)) => stats::paired_ratio(samples, a)
                    .map_or("-".into(), |r| format!("{:.3} [{:.3}, {:.3}] {}", r.ratio, r.ci_low, r.ci_high, r.verdict)),
                _ => String::new(),
            };
            writeln!(out, "| {test} | {variant} | {:.1} | {:.1} ± {:.1} | {} | {ratio} |", s.median, s.mean, s.sd, s.n)?;
        }
    }
    if let Some(report) = first_report.values().next() {
        let placement: Vec<&str> =
            report.model.placement.iter().map(String::as_str).filter(|l| l.contains("offloaded") || l.contains("CUDA")).collect();
        writeln!(out, "\nModel: {} ({}); placement: {}", report.model.description, report.backend, placement.join("; "))?;
    }
    if !serve.is_empty() {
        writeln!(out, "\n| server | streams | requests | completion t/s | TTFT p50 | TTFT max | errors |\n|---|---:|---:|---:|---:|---:|---|")?;
        for l in serve {
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                l.variant,
                l.streams,
                l.requests,
                l.tokens_per_s.map_or("-".into(), |v| format!("{v:.1}")),
                ms(l.ttft_ms_p50),
                ms(l.ttft_ms_max),
                if l.errors.is_empty() { "none".to_string() } else { l.errors.join("; ") }
            )?;
        }
    }
    Ok(out)
}
