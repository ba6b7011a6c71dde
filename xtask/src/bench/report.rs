//! The report: terminal table, Markdown, JSON (every sample), CSV and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::chart;
use super::machine::Machine;
use super::run::{RunSettings, VariantRuns};
use super::stats::{self, Ratio, Summary};
use super::variants::Variant;

#[derive(Clone, Debug, Serialize)]
pub struct ModelDescription {
    pub path: String,
    pub description: String,
    pub size_bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub variant: String,
    pub test: String,
    pub samples: Vec<Option<f64>>,
    pub summary: Option<Summary>,
    pub vs_baseline: Option<Ratio>,
    /// e2e: time to first token, ms.
    pub ttft: Option<Summary>,
    /// e2e: share of generation time outside decoding, %.
    pub outside_decode: Option<Summary>,
    /// Speculative tests: generated tokens per decode, and drafted tokens accepted (%).
    pub tokens_per_decode: Option<Summary>,
    pub draft_acceptance: Option<Summary>,
    /// Rows of a variant whose greedy output diverged from the baseline's.
    pub diverged: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Equivalence {
    pub variant: String,
    /// None when it matched the baseline token for token (or could not be checked).
    pub diverges_at: Option<usize>,
    pub checked: bool,
    /// The divergence is a near-tie swap: the two builds exchanged their top two tokens, and
    /// at least one saw them within the protocol's NEAR_TIE logits, which different kernels may
    /// legitimately do.
    pub near_tie: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct VariantInfo {
    pub variant: Variant,
    pub build_seconds: f64,
    pub build_info: Option<serde_json::Value>,
    pub system_info: Option<String>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub timestamp: String,
    pub command: String,
    pub git_revision: String,
    pub machine: Machine,
    pub model: ModelDescription,
    pub settings: RunSettings,
    pub baseline: String,
    pub variants: Vec<VariantInfo>,
    pub equivalence: Vec<Equivalence>,
    pub rows: Vec<Row>,
    /// Memory bandwidth / bytes read per token: the fastest tg this machine allows.
    pub tg_ceiling_tokens_per_s: f64,
    /// Per variant: user-visible e2e tokens/s over raw tgN tokens/s, paired by round. What
    /// the engine's sampling, detokenizing and streaming cost on top of decoding.
    pub e2e_over_tg: Vec<(String, Ratio)>,
    /// Per variant and task: tokens/s with speculative decoding over without (`task-X-spec`
    /// over `task-X`), paired by round. What speculation adds on top of the build.
    pub speculation_gain: Vec<(String, String, Ratio)>,
}

/// `numerator` / `denominator` tokens/s per variant, paired by round, where both tests ran.
fn within_variant(order: &[String], runs: &BTreeMap<String, VariantRuns>, numerator: &str, denominator: &str) -> Vec<(String, Ratio)> {
    order
        .iter()
        .filter_map(|name| {
            let r = runs.get(name)?;
            let ratio = stats::paired_ratio(r.tokens_per_s.get(numerator)?, r.tokens_per_s.get(denominator)?)?;
            Some((name.clone(), ratio))
        })
        .collect()
}

/// e2e / tg per variant, when both tests ran.
pub fn e2e_over_tg(settings: &RunSettings, order: &[String], runs: &BTreeMap<String, VariantRuns>) -> Vec<(String, Ratio)> {
    let e2e = settings.tests.iter().find(|t| t.starts_with("e2e"));
    let tg = settings.tests.iter().find(|t| t.starts_with("tg"));
    let (Some(e2e), Some(tg)) = (e2e, tg) else { return Vec::new() };
    within_variant(order, runs, e2e, tg)
}

/// `task-X-spec` / `task-X` per variant, for every task run both ways.
pub fn speculation_gain(settings: &RunSettings, order: &[String], runs: &BTreeMap<String, VariantRuns>) -> Vec<(String, String, Ratio)> {
    let mut out = Vec::new();
    for spec in &settings.tests {
        let Some(plain) = spec.strip_suffix("-spec").filter(|p| p.starts_with("task-") && settings.tests.iter().any(|t| t == p)) else { continue };
        for (variant, ratio) in within_variant(order, runs, spec, plain) {
            out.push((variant, plain.to_string(), ratio));
        }
    }
    out
}

pub fn rows(settings: &RunSettings, order: &[String], baseline: &str, runs: &BTreeMap<String, VariantRuns>, diverged: &[String]) -> Vec<Row> {
    let empty = VariantRuns::default();
    let base = runs.get(baseline).unwrap_or(&empty);
    let mut out = Vec::new();
    for test in &settings.tests {
        for name in order {
            let r = runs.get(name).unwrap_or(&empty);
            if runs.contains_key(name) && !r.tokens_per_s.contains_key(test) {
                // A variant that does not run this test (the llama-lookup reference: tasks only).
                continue;
            }
            let samples = r.tokens_per_s.get(test).cloned().unwrap_or_default();
            let present: Vec<f64> = samples.iter().flatten().copied().collect();
            let present_of = |m: &BTreeMap<String, Vec<Option<f64>>>| -> Vec<f64> {
                m.get(test).map(|v| v.iter().flatten().copied().collect()).unwrap_or_default()
            };
            let ttft = present_of(&r.ttft_ms);
            let outside_decode = present_of(&r.outside_decode_pct);
            let tokens_per_decode = present_of(&r.tokens_per_decode);
            let draft_acceptance = present_of(&r.draft_acceptance_pct);
            let vs_baseline = if name == baseline { None } else { base.tokens_per_s.get(test).and_then(|b| stats::paired_ratio(&samples, b)) };
            out.push(Row {
                variant: name.clone(),
                test: test.clone(),
                summary: stats::summarize(&present),
                vs_baseline,
                ttft: stats::summarize(&ttft),
                outside_decode: stats::summarize(&outside_decode),
                tokens_per_decode: stats::summarize(&tokens_per_decode),
                draft_acceptance: stats::summarize(&draft_acceptance),
                diverged: diverged.contains(name),
                samples,
            });
        }
    }
    out
}

/// The token count of an e2e test name ("e2e" is 128, "e2e64" 64).
fn e2e_tokens(test: &str) -> Option<usize> {
    match test.strip_prefix("e2e")? {
        "" => Some(128),
        n => n.parse().ok().filter(|&n| n > 1),
    }
}

struct Cells {
    n: String,
    mean: String,
    median: String,
    ratio: String,
    verdict: String,
    flag: &'static str,
}

impl Report {
    fn near_tie(&self, variant: &str) -> bool {
        self.equivalence.iter().any(|e| e.variant == variant && e.near_tie)
    }

    /// One row's cells as both the terminal table and the Markdown show them.
    fn cells(&self, r: &Row) -> Cells {
        let (n, mean, median) = match &r.summary {
            Some(x) => (x.n.to_string(), format!("{:.2} ± {:.2}", x.mean, x.sd), format!("{:.2}", x.median)),
            None => ("0".into(), "failed".into(), "-".into()),
        };
        let (ratio, verdict) = match &r.vs_baseline {
            Some(x) => (format!("{:.3} [{:.3}, {:.3}]", x.ratio, x.ci_low, x.ci_high), x.verdict.to_string()),
            None if r.variant == self.baseline => ("baseline".into(), String::new()),
            None => ("-".into(), String::new()),
        };
        let flag = match (r.diverged, self.near_tie(&r.variant)) {
            (true, true) => " (diverged at a near-tie)",
            (true, false) => " (DIVERGED)",
            _ => "",
        };
        Cells { n, mean, median, ratio, verdict, flag }
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let vs = format!("vs {} [95% CI]", self.baseline);
        let _ = writeln!(s, "{:<12} {:<12} {:>4} {:>18} {:>9} {vs:>28}  verdict", "variant", "test", "n", "t/s mean ± sd", "median");
        for r in &self.rows {
            let c = self.cells(r);
            let _ =
                writeln!(s, "{:<12} {:<12} {:>4} {:>18} {:>9} {:>28}  {}{}", r.variant, r.test, c.n, c.mean, c.median, c.ratio, c.verdict, c.flag);
        }
        for r in self.rows.iter().filter(|r| r.ttft.is_some()) {
            let t = r.ttft.as_ref().expect("filtered");
            let _ = writeln!(s, "{:<12} {:<12} time to first token: {:.1} ± {:.1} ms (median {:.1})", r.variant, r.test, t.mean, t.sd, t.median);
        }
        for r in self.rows.iter() {
            if let (Some(t), Some(a)) = (&r.tokens_per_decode, &r.draft_acceptance) {
                let _ = writeln!(
                    s,
                    "{:<12} {:<12} speculation: {:.2} tokens per decode (median; {:.2}..{:.2}), {:.0} % of drafted tokens accepted",
                    r.variant, r.test, t.median, t.min, t.max, a.median
                );
            }
        }
        for r in self.rows.iter().filter(|r| r.outside_decode.is_some()) {
            let o = r.outside_decode.as_ref().expect("filtered");
            let _ = writeln!(
                s,
                "{:<12} {:<12} outside decode: {:.2} ± {:.2} % of generation time (median {:.2}, max {:.2}): sampling, detokenizing, stops, streaming",
                r.variant, r.test, o.mean, o.sd, o.median, o.max
            );
        }
        let _ = writeln!(
            s,
            "tg ceiling: {:.1} GB/s memory read / {:.0} MB of weights = {:.1} t/s",
            self.machine.memory_read_gb_s,
            self.model.size_bytes as f64 / 1e6,
            self.tg_ceiling_tokens_per_s
        );
        for r in self.rows.iter().filter(|r| r.test.starts_with("tg") && !r.test.contains('+')) {
            if let Some(sm) = &r.summary {
                let _ = writeln!(s, "  {} {}: {:.0} % of the ceiling", r.variant, r.test, 100.0 * sm.median / self.tg_ceiling_tokens_per_s);
            }
        }
        for (variant, r) in &self.e2e_over_tg {
            let _ = writeln!(s, "  {variant}: e2e / tg = {:.3} [{:.3}, {:.3}] (user-visible over raw decode)", r.ratio, r.ci_low, r.ci_high);
        }
        for (variant, task, r) in &self.speculation_gain {
            let _ = writeln!(s, "  {variant}: {task} with speculation / without = {:.3} [{:.3}, {:.3}] {}", r.ratio, r.ci_low, r.ci_high, r.verdict);
        }
        if let (Some(n), false) = (self.settings.tests.iter().find_map(|t| e2e_tokens(t)), self.e2e_over_tg.is_empty()) {
            let _ = writeln!(
                s,
                "  (e2e's {n} tokens take {} decodes after the prompt's, tgN's N take N: with nothing outside decoding, e2e / tg would read {:.3})",
                n - 1,
                n as f64 / (n - 1) as f64
            );
        }
        for e in self.equivalence.iter().filter(|e| e.diverges_at.is_some()) {
            let why = if e.near_tie {
                format!(" (a near tie: each build's pick among the other's top three, within {} logits)", exsa_bench_protocol::NEAR_TIE)
            } else {
                " (NOT a near-tie: a real difference)".to_string()
            };
            let _ =
                writeln!(s, "WARNING: {} diverges from {}'s greedy tokens at token {}{why}", e.variant, self.baseline, e.diverges_at.unwrap_or(0));
        }
        for e in self.equivalence.iter().filter(|e| !e.checked) {
            let _ = writeln!(s, "WARNING: {}'s greedy tokens could not be compared", e.variant);
        }
        for v in self.variants.iter().filter(|v| !v.errors.is_empty()) {
            let _ = writeln!(s, "ERROR: {}: {}", v.variant.name, v.errors.join("; "));
        }
        s
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# bench-compare {}\n", self.timestamp);
        let _ = writeln!(s, "Command: `{}` (git {})\n", self.command, self.git_revision);
        let _ = writeln!(
            s,
            "Machine: {}, {} cores, {} GiB, SIMD {}, {} (kernel {}); memory read {:.1} GB/s\n",
            m.cpu,
            m.cores,
            m.memory_bytes >> 30,
            m.simd.join(" "),
            m.os,
            m.kernel,
            m.memory_read_gb_s
        );
        let _ = writeln!(
            s,
            "Model: {} ({}, {:.0} MB, sha256 {})\n",
            self.model.path,
            self.model.description,
            self.model.size_bytes as f64 / 1e6,
            self.model.sha256
        );
        let st = &self.settings;
        let _ = writeln!(
            s,
            "Settings: tests {}, {} interleaved rounds, threads {}, batch {}/{}, flash attention {}\n",
            st.tests.join(" "),
            st.reps,
            st.threads.map_or("all".into(), |t| t.to_string()),
            st.batch,
            st.ubatch,
            st.flash_attn
        );
        let _ = writeln!(s, "| variant | test | n | t/s mean ± sd | median | vs {} [95% CI] | verdict |", self.baseline);
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let c = self.cells(r);
            let _ = writeln!(s, "| {}{} | {} | {} | {} | {} | {} | {} |", r.variant, c.flag, r.test, c.n, c.mean, c.median, c.ratio, c.verdict);
        }
        let _ = writeln!(s, "\n```\n{}```\n", self.table());
        let _ = writeln!(s, "## Builds\n");
        for v in &self.variants {
            let _ = writeln!(
                s,
                "- **{}** (backend `{}`, built in {:.0} s): `{}`",
                v.variant.name,
                v.variant.backend,
                v.build_seconds,
                v.build_info.as_ref().map(|b| b.to_string()).unwrap_or_else(|| "no build info".into())
            );
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from("variant,test,round,tokens_per_s\n");
        for r in &self.rows {
            for (i, x) in r.samples.iter().enumerate() {
                let _ = writeln!(s, "{},{},{},{}", r.variant, r.test, i + 1, x.map(|v| format!("{v:.4}")).unwrap_or_default());
            }
        }
        s
    }

    /// Tokens/s per test and variant: medians as bars, min..max as whiskers.
    pub fn svg(&self) -> String {
        let variants: Vec<String> = self.variants.iter().map(|v| v.variant.name.clone()).collect();
        let groups: Vec<chart::Group> = self
            .settings
            .tests
            .iter()
            .map(|test| chart::Group {
                label: test.clone(),
                bars: self
                    .rows
                    .iter()
                    .filter(|r| &r.test == test)
                    .filter_map(|r| Some((variants.iter().position(|v| *v == r.variant)?, r.summary.clone()?)))
                    .collect(),
            })
            .collect();
        chart::bars(&format!("tokens/s (median, whiskers min..max) — {}", self.model.description), "t/s", &variants, &groups)
    }

    pub fn write(&self, dir: &Path, formats: &[String]) -> Result<Vec<PathBuf>> {
        // All or nothing: a typo in the last format must not leave the first ones written.
        if let Some(other) = formats.iter().find(|f| !["md", "json", "csv"].contains(&f.as_str())) {
            anyhow::bail!("unknown format {other:?} (use md, json, csv)");
        }
        std::fs::create_dir_all(dir)?;
        let mut written = Vec::new();
        for f in formats {
            let (name, text) = match f.as_str() {
                "md" => ("report.md", self.markdown()),
                "json" => ("report.json", serde_json::to_string_pretty(self)?),
                "csv" => ("samples.csv", self.csv()),
                other => anyhow::bail!("unknown format {other:?} (use md, json, csv)"),
            };
            std::fs::write(dir.join(name), text)?;
            written.push(dir.join(name));
        }
        std::fs::write(dir.join("chart.svg"), self.svg())?;
        written.push(dir.join("chart.svg"));
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tests: &[&str]) -> RunSettings {
        RunSettings {
            model: "m.gguf".into(),
            tests: tests.iter().map(|t| t.to_string()).collect(),
            reps: 4,
            threads: Some(2),
            batch: 2048,
            ubatch: 512,
            flash_attn: "auto".into(),
            gpu_layers: 0,
            greedy_tokens: 0,
            timeout_s: 600,
        }
    }

    /// B a baseline with drifting rounds, A 0.8 of it; e2e 0.9 of tg in both.
    fn runs() -> (Vec<String>, BTreeMap<String, VariantRuns>) {
        let tg = [60.0, 57.0, 62.0, 59.0];
        let mut out = BTreeMap::new();
        for (name, factor) in [("B", 1.0), ("A", 0.8)] {
            let mut r = VariantRuns::default();
            r.tokens_per_s.insert("tg128".into(), tg.iter().map(|x| Some(x * factor)).collect());
            r.tokens_per_s.insert("e2e".into(), tg.iter().map(|x| Some(x * factor * 0.9)).collect());
            r.ttft_ms.insert("e2e".into(), vec![Some(50.0); 4]);
            out.insert(name.to_string(), r);
        }
        (vec!["B".to_string(), "A".to_string()], out)
    }

    fn report() -> Report {
        let settings = settings(&["tg128", "e2e"]);
        let (order, runs) = runs();
        let rows = rows(&settings, &order, "B", &runs, &[]);
        let e2e_over_tg = e2e_over_tg(&settings, &order, &runs);
        Report {
            timestamp: "20261126-000000".into(),
            command: "cargo xtask bench-compare".into(),
            git_revision: "abc1234".into(),
            machine: Machine {
                cpu: "Test CPU".into(),
                cores: 2,
                simd: vec!["avx2".into()],
                memory_bytes: 24 << 30,
                os: "Linux".into(),
                kernel: "6.1".into(),
                memory_read_gb_s: 10.0,
            },
            model: ModelDescription { path: "m.gguf".into(), description: "test model".into(), size_bytes: 1, sha256: "00".into() },
            settings,
            baseline: "B".into(),
            variants: order
                .iter()
                .map(|n| VariantInfo {
                    variant: Variant::builtin(n, if n == "A" { "crate" } else { "source" }, ""),
                    build_seconds: 1.0,
                    build_info: None,
                    system_info: None,
                    errors: Vec::new(),
                })
                .collect(),
            equivalence: Vec::new(),
            rows,
            tg_ceiling_tokens_per_s: 100.0,
            e2e_over_tg,
            speculation_gain: Vec::new(),
        }
    }

    #[test]
    fn rows_pair_each_variant_with_the_baseline_and_e2e_with_tg() {
        let r = report();
        assert_eq!(r.rows.len(), 4, "2 tests x 2 variants");
        let a_tg = r.rows.iter().find(|x| x.variant == "A" && x.test == "tg128").unwrap();
        let ratio = a_tg.vs_baseline.as_ref().unwrap();
        assert!((ratio.ratio - 0.8).abs() < 1e-9 && ratio.verdict == stats::Verdict::Slower, "{ratio:?}");
        assert!(r.rows.iter().filter(|x| x.variant == "B").all(|x| x.vs_baseline.is_none()), "the baseline is not compared with itself");
        assert_eq!(r.rows.iter().find(|x| x.test == "e2e").unwrap().ttft.as_ref().unwrap().median, 50.0);
        assert_eq!(r.e2e_over_tg.len(), 2);
        for (_, ratio) in &r.e2e_over_tg {
            assert!((ratio.ratio - 0.9).abs() < 1e-9, "{ratio:?}");
        }
        // Without both an e2e and a tg test there is nothing to pair.
        let (order, runs) = runs();
        assert!(e2e_over_tg(&settings(&["tg128"]), &order, &runs).is_empty());
    }

    #[test]
    fn every_format_writes_what_it_says_and_an_unknown_one_is_refused() {
        let r = report();
        let md = r.markdown();
        assert!(md.contains("| A | tg128 | 4 |") && md.contains("slower") && md.contains("Test CPU, 2 cores"), "{md}");
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 1 + 4 * 4, "a header and a line per row and round");
        assert!(csv.lines().nth(1).unwrap().starts_with("B,tg128,1,60.0000"), "{csv}");
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.contains(">A<") && svg.contains(">B<"), "{svg}");

        let dir = std::env::temp_dir().join(format!("exsa-report-{}", std::process::id()));
        let written = r.write(&dir, &["md".into(), "json".into(), "csv".into()]).unwrap();
        let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["report.md", "report.json", "samples.csv", "chart.svg"]);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(json["rows"].as_array().unwrap().len(), 4);
        assert_eq!(json["baseline"], "B");
        let fresh = dir.join("refused");
        let err = r.write(&fresh, &["md".into(), "xml".into()]).unwrap_err();
        assert!(err.to_string().contains("\"xml\"") && err.to_string().contains("md, json, csv"), "{err}");
        assert!(!fresh.exists(), "nothing is written when a format is unknown");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn e2e_test_names_give_their_token_count() {
        assert_eq!(e2e_tokens("e2e"), Some(128));
        assert_eq!(e2e_tokens("e2e64"), Some(64));
        assert_eq!(e2e_tokens("tg128"), None);
        assert_eq!(e2e_tokens("e2e1"), None);
    }
}
