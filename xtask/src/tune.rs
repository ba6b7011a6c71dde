//! `cargo xtask tune`: finds the fastest llama.cpp build for this machine by successive
//! halving over build and runtime switches, measured with bench-compare's paired method, and
//! writes the winner as the tuned profile that every later llama-sys build on the machine uses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::bench::build::{self, Built};
use crate::bench::run::{self, RunSettings, VariantRuns};
use crate::bench::stats::{self, Ratio, Verdict};
use crate::bench::variants::{self, Variant};
use crate::{fetch_model, setup, vendor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Time to spend, builds included: 30m, 90s, 1h.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    budget: Duration,
    /// Tests the score is made of (geometric mean of the ratios to B).
    #[arg(long, value_delimiter = ',', default_value = "pp512,tg128")]
    tests: Vec<String>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to write the winning profile (default: ~/.config/exsa/tuned.toml, which llama-sys
    /// reads by default).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Measure and report, but write no profile.
    #[arg(long)]
    no_write: bool,
    /// Only list the candidates.
    #[arg(long)]
    list: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(s.trim().len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30m, 90s or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h)")),
    };
    if secs == 0 {
        return Err("the budget must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// One point of the search space, named by the switches it changes from the default build.
fn candidate(name: &str, env: &[(&str, &str)], flash_attn: Option<&str>, threads: Option<u32>) -> Variant {
    let mut v = Variant::builtin(name, "source", "");
    v.env.insert("LLAMA_SYS_PROFILE".into(), "none".into());
    for (k, val) in env {
        v.env.insert((*k).into(), (*val).into());
    }
    v.flash_attn = flash_attn.map(str::to_string);
    v.threads = threads;
    v
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The default build, each switch flipped on its own, and the runtime settings.
pub fn search_space() -> Vec<Variant> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let mut c = vec![
        candidate("default", &[], None, None),
        candidate("generic-isa", &[("LLAMA_SYS_NATIVE", "off")], None, None),
        candidate("O2", &[("LLAMA_SYS_OPT_LEVEL", "2")], None, None),
        candidate("lto", &[("LLAMA_SYS_LTO", "on")], None, None),
        candidate("no-openmp", &[("LLAMA_SYS_OPENMP", "off")], None, None),
        candidate("no-llamafile", &[("LLAMA_SYS_LLAMAFILE", "off")], None, None),
        candidate("no-repack", &[("LLAMA_SYS_REPACK", "off")], None, None),
        candidate("openblas", &[("LLAMA_SYS_BLAS", "on")], None, None),
        candidate("flash-attn-on", &[], Some("on"), None),
        candidate("flash-attn-off", &[], Some("off"), None),
    ];
    if on_path("clang") && on_path("clang++") {
        c.push(candidate("clang", &[("LLAMA_SYS_CC", "clang"), ("LLAMA_SYS_CXX", "clang++")], None, None));
    }
    if cores > 1 {
        c.push(candidate(&format!("threads-{}", cores - 1), &[], None, Some(cores - 1)));
    }
    c
}

/// A candidate built from every flip that was faster than the default on its own.
fn combined(winners: &[&Variant]) -> Option<Variant> {
    if winners.len() < 2 {
        return None;
    }
    let mut v = candidate("combined", &[], None, None);
    v.name = format!("combined({})", winners.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join("+"));
    v.name = v.name.replace(['(', ')', '+'], "_");
    for w in winners {
        v.env.extend(w.env.clone());
        v.flash_attn = v.flash_attn.take().or_else(|| w.flash_attn.clone());
        v.threads = v.threads.or(w.threads);
    }
    Some(v)
}

#[derive(Clone, Debug, Serialize)]
pub struct Standing {
    pub candidate: String,
    pub settings: BTreeMap<String, String>,
    /// Geometric mean over tests of the ratio to default B.
    pub score: Option<f64>,
    pub vs_b: BTreeMap<String, Ratio>,
    pub vs_a: BTreeMap<String, Ratio>,
    pub rounds: usize,
    pub dropped: Option<String>,
}

fn settings_of(v: &Variant) -> BTreeMap<String, String> {
    let mut s: BTreeMap<String, String> =
        v.env.iter().filter(|(k, _)| k.as_str() != "LLAMA_SYS_PROFILE").map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(fa) = &v.flash_attn {
        s.insert("flash_attn".into(), fa.clone());
    }
    if let Some(t) = v.threads {
        s.insert("threads".into(), t.to_string());
    }
    s
}

fn score(vs_b: &BTreeMap<String, Ratio>, tests: &[String]) -> Option<f64> {
    let logs: Option<Vec<f64>> = tests.iter().map(|t| vs_b.get(t).map(|r| r.ratio.ln())).collect();
    let logs = logs?;
    Some((logs.iter().sum::<f64>() / logs.len() as f64).exp())
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let space = search_space();
    if args.list {
        for v in &space {
            println!("{:<16} {:?}", v.name, settings_of(v));
        }
        return Ok(());
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            setup::run(&setup::Args::default())?;
            fetch_model::run(&fetch_model::Args::default())?
        }
    };
    vendor::run(&vendor::Args::default())?;
    let deadline = started + args.budget;
    let out_dir = build::bench_root().join(format!("tune-{}", crate::bench::timestamp()));
    std::fs::create_dir_all(&out_dir)?;

    // References measured in every round: the crate baseline and the default source build.
    let reference: Vec<Variant> = variants::resolve(None, &["A".into(), "B".into()])?;
    eprintln!("tune: building {} candidates and the references A and B", space.len());
    let mut built: Vec<Built> = build::build_all(&reference);
    built.extend(build::build_all(&space[1..]));
    let mut standings: BTreeMap<String, Standing> = space
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                Standing {
                    candidate: v.name.clone(),
                    settings: settings_of(v),
                    score: None,
                    vs_b: BTreeMap::new(),
                    vs_a: BTreeMap::new(),
                    rounds: 0,
                    dropped: None,
                },
            )
        })
        .collect();
    standings.remove("default");
    for b in &built {
        if let (Err(e), Some(s)) = (&b.binary, standings.get_mut(&b.variant.name)) {
            let cause =
                e.lines().find(|l| l.contains("error") && !l.contains("cargo build failed")).unwrap_or_else(|| e.lines().next().unwrap_or_default());
            s.dropped = Some(format!("build failed: {}", cause.trim()));
        }
    }

    let mut alive: Vec<String> = standings.values().filter(|s| s.dropped.is_none()).map(|s| s.candidate.clone()).collect();
    let mut reps = 2;
    let mut last: BTreeMap<String, VariantRuns> = BTreeMap::new();
    let mut tried_combined = false;
    let settings = |reps| RunSettings {
        model: model.clone(),
        tests: args.tests.clone(),
        reps,
        threads: None,
        batch: 2048,
        ubatch: 512,
        flash_attn: "auto".into(),
        gpu_layers: -1,
        greedy_tokens: 32,
        timeout_s: 600,
    };
    while !alive.is_empty() {
        let round_set: Vec<&Built> =
            built.iter().filter(|b| b.variant.name == "A" || b.variant.name == "B" || alive.contains(&b.variant.name)).collect();
        let estimate = Duration::from_secs_f64(10.0 * (round_set.len() * reps) as f64);
        if Instant::now() + estimate > deadline && !last.is_empty() {
            eprintln!("tune: the budget leaves no room for a round of {reps} repetitions; stopping");
            break;
        }
        eprintln!("tune: round with {} candidates, {reps} paired repetitions each", alive.len());
        let round: Vec<Built> =
            round_set.iter().map(|b| Built { variant: b.variant.clone(), binary: b.binary.clone(), seconds: b.seconds }).collect();
        let runs = run::run_all(&round, None, &settings(reps), &out_dir);
        judge(&runs, &mut standings, &alive, &args.tests, reps);
        alive.retain(|n| standings[n].dropped.is_none());
        last = runs;
        // Keep the better half; stop at the winner.
        rank_by_score(&mut alive, &standings);
        if !tried_combined {
            tried_combined = true;
            let winners: Vec<&Variant> = space.iter().filter(|v| alive.contains(&v.name) && helps_alone(&standings[&v.name])).collect();
            if let Some(c) = combined(&winners) {
                eprintln!("tune: adding {}", c.name);
                let b = build::build_all(std::slice::from_ref(&c)).remove(0);
                standings.insert(
                    c.name.clone(),
                    Standing {
                        candidate: c.name.clone(),
                        settings: settings_of(&c),
                        score: None,
                        vs_b: BTreeMap::new(),
                        vs_a: BTreeMap::new(),
                        rounds: 0,
                        dropped: b.binary.as_ref().err().cloned(),
                    },
                );
                if b.binary.is_ok() {
                    alive.insert(0, c.name.clone());
                }
                built.push(b);
                continue;
            }
        }
        if !halve(&mut alive) {
            break;
        }
        reps *= 2;
    }

    let mut ranked: Vec<&Standing> = standings.values().collect();
    ranked.sort_by(|a, b| b.score.unwrap_or(0.0).total_cmp(&a.score.unwrap_or(0.0)));
    let table = table(&ranked, &args.tests);
    println!("{table}");
    let report = serde_json::json!({
        "machine_cpu": crate::bench::machine::describe().cpu,
        "model": model.display().to_string(),
        "tests": args.tests,
        "budget_s": args.budget.as_secs(),
        "elapsed_s": started.elapsed().as_secs(),
        "git_revision": crate::bench::git_revision(),
        "standings": ranked,
    });
    std::fs::write(out_dir.join("tune.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(out_dir.join("tune.md"), format!("# cargo xtask tune\n\n```\n{table}```\n"))?;
    println!("wrote {}", out_dir.join("tune.md").display());

    let winner = winner(&ranked, &args.tests);
    match winner {
        Some(w) if !args.no_write => {
            let path = args.profile.clone().unwrap_or_else(variants::tuned_profile_path);
            write_profile(&path, w, &args.tests)?;
            println!(
                "the winner, {}, is now the tuned profile: {} (llama-sys builds use it from now on; bench-compare's B-tuned \
                 measures it)",
                w.candidate,
                path.display()
            );
        }
        Some(w) => println!("the winner is {} (--no-write: no profile written)", w.candidate),
        None => {
            println!("no candidate was significantly faster than the default build on a test without being slower on another: no profile written")
        }
    }
    println!("tune took {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

/// Best score first (a candidate without one last).
fn rank_by_score(alive: &mut [String], standings: &BTreeMap<String, Standing>) {
    alive.sort_by(|a, b| standings[b].score.unwrap_or(0.0).total_cmp(&standings[a].score.unwrap_or(0.0)));
}

/// Keeps the better half of a ranked list (the odd one in); false when one or none is left,
/// which ends the search.
fn halve(alive: &mut Vec<String>) -> bool {
    if alive.len() <= 1 {
        return false;
    }
    alive.truncate(alive.len().div_ceil(2));
    true
}

/// A flip worth combining with the others: slower nowhere, and faster overall.
fn helps_alone(s: &Standing) -> bool {
    s.vs_b.values().all(|r| r.verdict != Verdict::Slower) && s.score.is_some_and(|score| score > 1.0)
}

/// The best-ranked candidate that is significantly faster than the default build on some test
/// and slower on none, measured on every test.
fn winner<'a>(ranked: &[&'a Standing], tests: &[String]) -> Option<&'a Standing> {
    ranked.iter().copied().find(|s| {
        s.dropped.is_none()
            && s.vs_b.len() == tests.len()
            && s.vs_b.values().all(|r| r.verdict != Verdict::Slower)
            && s.vs_b.values().any(|r| r.verdict == Verdict::Faster)
    })
}

/// Scores every candidate of the round against B and A, and drops those whose greedy tokens
/// differ from B's other than at a near-tie.
fn judge(runs: &BTreeMap<String, VariantRuns>, standings: &mut BTreeMap<String, Standing>, alive: &[String], tests: &[String], reps: usize) {
    let b = runs.get("B");
    let a = runs.get("A");
    for name in alive {
        let Some(r) = runs.get(name) else { continue };
        let s = standings.get_mut(name).expect("standing per candidate");
        s.rounds += reps;
        if !r.errors.is_empty() {
            s.dropped = Some(format!("failed: {}", r.errors.join("; ")));
            continue;
        }
        if let Some(exsa_bench_protocol::Equivalence::Differs(k)) = b.and_then(|b| r.equivalence_to(b)) {
            s.dropped = Some(format!("greedy output differs from B's at token {k}, not a near-tie"));
            continue;
        }
        for t in tests {
            let Some(samples) = r.tokens_per_s.get(t) else { continue };
            if let Some(ratio) = b.and_then(|b| b.tokens_per_s.get(t)).and_then(|bs| stats::paired_ratio(samples, bs)) {
                s.vs_b.insert(t.clone(), ratio);
            }
            if let Some(ratio) = a.and_then(|a| a.tokens_per_s.get(t)).and_then(|as_| stats::paired_ratio(samples, as_)) {
                s.vs_a.insert(t.clone(), ratio);
            }
        }
        s.score = score(&s.vs_b, tests);
    }
}

fn table(ranked: &[&Standing], tests: &[String]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<28} {:>7} {:>6}", "candidate", "score", "reps");
    for t in tests {
        let _ = write!(s, " {:>30} {:>30}", format!("{t} vs B [95% CI]"), format!("{t} vs A [95% CI]"));
    }
    s.push('\n');
    let fmt = |r: Option<&Ratio>| {
        r.map_or("-".to_string(), |r| {
            format!(
                "{:.3} [{:.3}, {:.3}] {}",
                r.ratio,
                r.ci_low,
                r.ci_high,
                match r.verdict {
                    Verdict::Faster => "+",
                    Verdict::Slower => "-",
                    Verdict::NoSignificantDifference => "=",
                }
            )
        })
    };
    for st in ranked {
        let _ = write!(s, "{:<28} {:>7} {:>6}", st.candidate, st.score.map_or("-".into(), |x| format!("{x:.3}")), st.rounds);
        for t in tests {
            let _ = write!(s, " {:>30} {:>30}", fmt(st.vs_b.get(t)), fmt(st.vs_a.get(t)));
        }
        if let Some(d) = &st.dropped {
            let _ = write!(s, "  dropped: {d}");
        }
        s.push('\n');
    }
    s.push_str("(+ faster, - slower, = no significant difference; score: geometric mean of the ratios to B)\n");
    s
}

fn write_profile(path: &Path, winner: &Standing, tests: &[String]) -> Result<()> {
    let mut text = format!(
        "# Written by `cargo xtask tune` (git {}): the fastest llama.cpp build found for this machine.\n\
         # llama-sys applies the env table under the environment; LLAMA_SYS_PROFILE=none ignores this file.\n\
         # Winner: {} (score {:.3} over {}).\n",
        crate::bench::git_revision(),
        winner.candidate,
        winner.score.unwrap_or(0.0),
        tests.join(", ")
    );
    for (t, r) in &winner.vs_b {
        let _ = writeln!(text, "# {t}: {:.3} [{:.3}, {:.3}] x the default build", r.ratio, r.ci_low, r.ci_high);
    }
    text.push_str("\n[env]\n");
    for (k, v) in winner.settings.iter().filter(|(k, _)| k.starts_with("LLAMA_SYS_")) {
        let _ = writeln!(text, "{k} = \"{v}\"");
    }
    text.push_str("\n# Runtime settings that won (not build flags; pass them to the engine).\n[runtime]\n");
    for (k, v) in winner.settings.iter().filter(|(k, _)| !k.starts_with("LLAMA_SYS_")) {
        let _ = writeln!(text, "{k} = \"{v}\"");
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if !path.is_file() {
        bail!("the profile {} was not written", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds of tokens/s: the baseline's `base`, a candidate `factor` times it with a
    /// round-to-round wobble of ±1 % (so that intervals have width).
    fn rounds(base: &[f64], factor: f64) -> Vec<Option<f64>> {
        base.iter().enumerate().map(|(i, b)| Some(b * factor * if i % 2 == 0 { 1.01 } else { 0.99 })).collect()
    }

    fn runs_of(pp: Vec<Option<f64>>, tg: Vec<Option<f64>>) -> VariantRuns {
        let mut r = VariantRuns::default();
        r.tokens_per_s.insert("pp512".into(), pp);
        r.tokens_per_s.insert("tg128".into(), tg);
        r
    }

    fn standing(name: &str) -> Standing {
        Standing {
            candidate: name.into(),
            settings: BTreeMap::new(),
            score: None,
            vs_b: BTreeMap::new(),
            vs_a: BTreeMap::new(),
            rounds: 0,
            dropped: None,
        }
    }

    fn tests() -> Vec<String> {
        vec!["pp512".into(), "tg128".into()]
    }

    /// B, A, and candidates that are: faster on both tests, faster on one and slower on the
    /// other, the same, failed, and greedy-different.
    fn judged() -> BTreeMap<String, Standing> {
        let pp = [400.0, 380.0, 410.0, 395.0, 405.0, 390.0];
        let tg = [60.0, 58.0, 61.0, 59.0, 60.5, 58.5];
        let mut runs = BTreeMap::new();
        runs.insert("B".to_string(), runs_of(pp.map(Some).to_vec(), tg.map(Some).to_vec()));
        runs.insert("A".to_string(), runs_of(rounds(&pp, 0.9), rounds(&tg, 0.95)));
        runs.insert("fast".to_string(), runs_of(rounds(&pp, 1.10), rounds(&tg, 1.05)));
        runs.insert("mixed".to_string(), runs_of(rounds(&pp, 1.30), rounds(&tg, 0.90)));
        runs.insert("same".to_string(), runs_of(rounds(&pp, 1.0), rounds(&tg, 1.0)));
        let mut failed = runs_of(rounds(&pp, 2.0), rounds(&tg, 2.0));
        failed.errors.push("exited with signal 11".into());
        runs.insert("failed".to_string(), failed);
        let step = |token, runner_up, margin| exsa_bench_protocol::GreedyStep { token, runner_up, margin, third: None };
        let mut wrong = runs_of(rounds(&pp, 1.5), rounds(&tg, 1.5));
        wrong.greedy = Some(vec![step(1, 2, 1.0), step(9, 4, 2.0)]);
        runs.insert("wrong".to_string(), wrong);
        runs.get_mut("B").unwrap().greedy = Some(vec![step(1, 2, 1.0), step(3, 4, 2.0)]);
        let alive: Vec<String> = ["fast", "mixed", "same", "failed", "wrong"].map(String::from).to_vec();
        let mut standings: BTreeMap<String, Standing> = alive.iter().map(|n| (n.clone(), standing(n))).collect();
        judge(&runs, &mut standings, &alive, &tests(), 6);
        standings
    }

    #[test]
    fn the_score_is_the_geometric_mean_of_the_ratios() {
        let s = judged();
        let fast = &s["fast"];
        // sqrt(1.10 * 1.05), from the paired ratios of sums.
        assert!((fast.score.unwrap() - (1.10f64 * 1.05).sqrt()).abs() < 2e-3, "{:?}", fast.score);
        assert_eq!(fast.vs_b["pp512"].verdict, Verdict::Faster);
        assert!((fast.vs_a["tg128"].ratio - 1.05 / 0.95).abs() < 5e-3, "against A as well");
        assert_eq!(fast.rounds, 6);
        // A test without a ratio leaves no score (no geometric mean of what is missing).
        let mut partial = BTreeMap::new();
        partial.insert("pp512".to_string(), fast.vs_b["pp512"].clone());
        assert_eq!(score(&partial, &tests()), None);
        assert!((score(&fast.vs_b, &tests()[..1]).unwrap() - fast.vs_b["pp512"].ratio).abs() < 1e-12);
    }

    #[test]
    fn failed_and_greedy_different_candidates_are_dropped_whatever_their_speed() {
        let s = judged();
        assert!(s["failed"].dropped.as_deref().is_some_and(|d| d.contains("signal 11")), "{:?}", s["failed"].dropped);
        assert!(s["wrong"].dropped.as_deref().is_some_and(|d| d.contains("token 1")), "{:?}", s["wrong"].dropped);
        assert!(s["wrong"].score.is_none(), "a dropped candidate is not scored");
        for kept in ["fast", "mixed", "same"] {
            assert!(s[kept].dropped.is_none(), "{kept}");
        }
    }

    #[test]
    fn the_winner_is_faster_somewhere_and_slower_nowhere() {
        let s = judged();
        // "mixed" has the best score (sqrt(1.3 * 0.9) = 1.082 against fast's sqrt(1.10 * 1.05) =
        // 1.075) but is slower on tg128, so it can never win; "same" is faster nowhere.
        let mut ranked: Vec<&Standing> = s.values().collect();
        ranked.sort_by(|a, b| b.score.unwrap_or(0.0).total_cmp(&a.score.unwrap_or(0.0)));
        assert_eq!(ranked[0].candidate, "mixed", "{:?}", ranked.iter().map(|r| (&r.candidate, r.score)).collect::<Vec<_>>());
        assert_eq!(winner(&ranked, &tests()).map(|w| w.candidate.as_str()), Some("fast"));
        // Flips worth combining: slower nowhere and a score above 1 (a neutral flip qualifies
        // only by its score, which ±1 % noise decides; it cannot make the combination slower).
        assert!(helps_alone(&s["fast"]) && !helps_alone(&s["mixed"]));
        assert_eq!(helps_alone(&s["same"]), s["same"].score.unwrap() > 1.0);
        // Without "fast" nothing qualifies: no profile is written.
        let without: Vec<&Standing> = ranked.iter().copied().filter(|r| r.candidate != "fast").collect();
        assert!(winner(&without, &tests()).is_none());
        // Measured on one test of two: not a winner (slower-nowhere is unknown).
        let mut half = s["fast"].clone();
        half.vs_b.remove("tg128");
        assert!(winner(&[&half], &tests()).is_none());
    }

    #[test]
    fn halving_keeps_the_better_half_by_score_until_one_is_left() {
        let s = judged();
        let mut alive: Vec<String> = ["same", "fast", "mixed"].map(String::from).to_vec();
        rank_by_score(&mut alive, &s);
        assert_eq!(alive, ["mixed", "fast", "same"]);
        assert!(halve(&mut alive));
        assert_eq!(alive, ["mixed", "fast"], "the odd one in: ceil(3 / 2)");
        assert!(halve(&mut alive));
        assert_eq!(alive, ["mixed"]);
        assert!(!halve(&mut alive), "one left: the search ends");
        assert!(!halve(&mut Vec::new()));
        // A candidate without a score (dropped or unmeasured) ranks last.
        let mut with_unscored: Vec<String> = ["failed", "same"].map(String::from).to_vec();
        rank_by_score(&mut with_unscored, &s);
        assert_eq!(with_unscored, ["same", "failed"]);
    }

    #[test]
    fn budgets_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0m").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn the_search_space_flips_one_switch_each_and_ignores_any_profile() {
        let space = search_space();
        assert_eq!(space[0].name, "default");
        assert!(space.iter().all(|v| v.env.get("LLAMA_SYS_PROFILE").map(String::as_str) == Some("none")));
        let names: Vec<&str> = space.iter().map(|v| v.name.as_str()).collect();
        for n in ["generic-isa", "O2", "lto", "no-openmp", "no-llamafile", "no-repack", "openblas", "flash-attn-on"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(space[1..].iter().all(|v| settings_of(v).len() == 1 || v.name.starts_with("clang")));
    }

    #[test]
    fn the_combined_candidate_merges_winning_switches() {
        let space = search_space();
        let pick = |n: &str| space.iter().find(|v| v.name == n).unwrap();
        let c = combined(&[pick("lto"), pick("flash-attn-on")]).unwrap();
        let s = settings_of(&c);
        assert_eq!(s.get("LLAMA_SYS_LTO").map(String::as_str), Some("on"));
        assert_eq!(s.get("flash_attn").map(String::as_str), Some("on"));
        assert!(combined(&[pick("lto")]).is_none());
    }

    #[test]
    fn the_profile_holds_build_settings_under_env() {
        let dir = std::env::temp_dir().join(format!("tune-{}", std::process::id()));
        let path = dir.join("tuned.toml");
        let mut settings = BTreeMap::new();
        settings.insert("LLAMA_SYS_LTO".to_string(), "on".to_string());
        settings.insert("flash_attn".to_string(), "on".to_string());
        let st =
            Standing { candidate: "x".into(), settings, score: Some(1.05), vs_b: BTreeMap::new(), vs_a: BTreeMap::new(), rounds: 4, dropped: None };
        write_profile(&path, &st, &["tg128".into()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let env = text.split("[env]").nth(1).unwrap().split("[runtime]").next().unwrap();
        assert!(env.contains("LLAMA_SYS_LTO = \"on\"") && !env.contains("flash_attn"), "{text}");
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["env"]["LLAMA_SYS_LTO"].as_str(), Some("on"));
    }
}
