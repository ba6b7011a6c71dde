//! `cargo xtask bench-serve`: our `exsa serve` against llama.cpp's own `llama-server` on the
//! same model, slots and threads, under streaming chat load at several concurrencies.
//!
//! llama-server is built by `llama_tools` (llama.cpp's own programs, from the `llama-cpp-python`
//! sdist on PyPI, natively, under `target/llama-server/`). Each
//! round starts each server afresh (their order alternates), runs every load level against it
//! and stops it; the report compares aggregate tokens/s per level with a bootstrap interval over
//! the paired rounds, and gives TTFT and inter-token latency percentiles over all requests.

mod load;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::bench::stats;
use crate::server_process;
use crate::{fetch_model, llama_tools, workspace};
use load::{LevelResult, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent clients, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// Slots of each server (`--parallel` / `-np`).
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Rounds (each starts both servers afresh, in alternating order).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests each client sends per level, one after another.
    #[arg(long, default_value_t = 2)]
    per_client: usize,
    /// Tokens per reply (greedy).
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
    /// Context shared by the slots.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Also serve `exsa` as built from this git revision (a commit, tag or branch), to measure a
    /// change against what came before it ("exsa serve @REV" in the report, each round beside
    /// the others).
    #[arg(long, value_name = "REV")]
    baseline_rev: Option<String>,
    /// Leave llama-server out (with --baseline-rev: this build against the earlier one only).
    #[arg(long)]
    no_llama_server: bool,
}

/// One server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Contender {
    Exsa,
    /// `exsa` built from `--baseline-rev`.
    ExsaBaseline,
    LlamaServer,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Exsa => "exsa serve",
            Contender::ExsaBaseline => "exsa serve @baseline",
            Contender::LlamaServer => "llama-server",
        }
    }
}

/// The servers of a run, and what each is compared with: llama-server when it runs, else the
/// baseline build.
fn servers(args: &Args) -> Result<(Vec<Contender>, Contender)> {
    let mut servers = vec![Contender::Exsa];
    if args.baseline_rev.is_some() {
        servers.push(Contender::ExsaBaseline);
    }
    if !args.no_llama_server {
        servers.push(Contender::LlamaServer);
    }
    let reference = *servers.last().expect("exsa always runs");
    if reference == Contender::Exsa {
        bail!("--no-llama-server leaves nothing to compare with: give --baseline-rev too");
    }
    Ok((servers, reference))
}

#[derive(Serialize)]
struct Sample {
    round: usize,
    server: Contender,
    level: LevelResult,
}

pub fn run(args: &Args) -> Result<()> {
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (the comparison pairs rounds)");
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };
    let (servers, reference) = servers(args)?;
    let exsa = build_exsa(None)?;
    let baseline = args.baseline_rev.as_deref().map(|rev| build_exsa(Some(rev))).transpose()?;
    let llama_server = if args.no_llama_server { PathBuf::from("llama-server") } else { llama_tools::ensure("llama-server")? };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = workspace::target_dir().join("bench-serve").join(crate::bench::timestamp());
    std::fs::create_dir_all(&out)?;
    let mut samples = Vec::new();
    let started = Instant::now();
    for round in 0..args.rounds {
        // Each round starts with another server, so that none always runs first.
        let mut order = servers.clone();
        order.rotate_left(round % servers.len());
        for server in order {
            let binary = match server {
                Contender::Exsa => &exsa,
                Contender::ExsaBaseline => baseline.as_ref().expect("built when asked for"),
                Contender::LlamaServer => &llama_server,
            };
            let (mut child, base) = start(server, binary, &model, args, threads, &out)?;
            let result = (|| -> Result<()> {
                for &c in &args.concurrency {
                    let level = load::run_level(&base, "default", c, args.per_client, args.max_tokens)
                        .with_context(|| format!("{} at concurrency {c}", server.name()))?;
                    eprintln!("round {}/{} {:<12} c={c:<3} {:7.1} t/s aggregate", round + 1, args.rounds, server.name(), level.tokens_per_s());
                    samples.push(Sample { round, server, level });
                }
                Ok(())
            })();
            let _ = child.kill();
            let _ = child.wait();
            result?;
        }
    }
    let builds = build_info(&exsa, baseline.as_deref(), (!args.no_llama_server).then_some(llama_server.as_path()), &model);
    let report = report(args, &model, &samples, &servers, reference, started.elapsed(), &builds);
    std::fs::write(out.join("report.md"), &report)?;
    let json = serde_json::json!({ "build_info": builds, "samples": samples });
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(out.join("samples.csv"), csv(&samples))?;
    std::fs::write(out.join("chart.svg"), svg(args, &samples, &servers))?;
    println!("{report}");
    println!("reports in {}", out.display());
    Ok(())
}

/// `exsa` in release, from this workspace or (with `rev`) from the tree of that revision, in a
/// target folder of its own.
pub(crate) fn build_exsa(rev: Option<&str>) -> Result<PathBuf> {
    let Some(rev) = rev else {
        eprintln!("building exsa (release)");
        workspace::run(workspace::cargo().args(["build", "--release", "--locked", "-p", "exsa-engine", "--bin", "exsa"]))?;
        return Ok(workspace::target_dir().join("release").join("exsa"));
    };
    eprintln!("building exsa (release) as of {rev}");
    let tree = crate::bench::build::source_tree(rev)?;
    let target = workspace::target_dir().join("bench-serve").join("baseline-target");
    workspace::run(
        workspace::cargo()
            .args(["build", "--release", "--locked", "-p", "exsa-engine", "--bin", "exsa", "--manifest-path"])
            .arg(tree.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env("LLAMA_SYS_BUILD_CACHE", workspace::target_dir().join("llama-cmake")),
    )?;
    Ok(target.join("release").join("exsa"))
}

/// What each server was built from and with: exsa's build info (`exsa info`: llama.cpp
/// version, compiler, flags), the baseline's, and llama-server's `--version` lines.
fn build_info(exsa: &Path, baseline: Option<&Path>, llama_server: Option<&Path>, model: &Path) -> serde_json::Value {
    let exsa_info = |exsa: &Path| {
        Command::new(exsa)
            .arg("--model")
            .arg(model)
            .args(["--log", "error", "info"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .map_or(
                serde_json::Value::Null,
                |v| serde_json::json!({ "backend": v["backend"], "build_info": v["build_info"], "system_info": v["system_info"] }),
            )
    };
    let llama_version = llama_server
        .and_then(|l| Command::new(l).arg("--version").output().ok())
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .chain(String::from_utf8_lossy(&o.stdout).lines())
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    serde_json::json!({
        "exsa serve": exsa_info(exsa),
        "exsa serve @baseline": baseline.map(exsa_info),
        "llama-server": llama_version.trim(),
    })
}

/// Aggregate tokens/s per concurrency level and server, over the rounds.
fn svg(args: &Args, samples: &[Sample], servers: &[Contender]) -> String {
    use crate::bench::chart;
    let series: Vec<String> = servers.iter().map(|s| s.name().to_string()).collect();
    let groups: Vec<chart::Group> = args
        .concurrency
        .iter()
        .map(|&c| chart::Group {
            label: format!("{c} clients"),
            bars: servers
                .iter()
                .enumerate()
                .filter_map(|(i, &server)| {
                    let tps: Vec<f64> =
                        samples.iter().filter(|s| s.server == server && s.level.concurrency == c).map(|s| s.level.tokens_per_s()).collect();
                    Some((i, stats::summarize(&tps)?))
                })
                .collect(),
        })
        .collect();
    chart::bars("aggregate generated tokens/s under streaming chat load (median, whiskers min..max)", "t/s", &series, &groups)
}

/// Starts `server` on a free port and waits until /health answers 200.
fn start(server: Contender, binary: &Path, model: &Path, args: &Args, threads: usize, out: &Path) -> Result<(Child, String)> {
    let port = server_process::free_port()?;
    let (slots, ctx, threads) = (args.slots.to_string(), args.ctx.to_string(), threads.to_string());
    let mut command = match server {
        Contender::Exsa | Contender::ExsaBaseline => {
            let mut c = Command::new(binary);
            c.arg("--model").arg(model).args(["--log", "error", "--ctx", &ctx, "--threads", &threads]);
            c.args(["serve", "--port", &port.to_string(), "--parallel", &slots, "--max-queue", "256", "--model-id", "default"]);
            c
        }
        Contender::LlamaServer => {
            let mut c = Command::new(binary);
            c.arg("-m").arg(model).args(["--port", &port.to_string(), "-np", &slots, "-c", &ctx, "-t", &threads, "-tb", &threads]);
            // Unified KV cache and 512-token batches, as `exsa serve` runs.
            c.args(["--alias", "default", "--no-webui", "-lv", "1", "-kvu", "-b", "512", "-ub", "512"]);
            c
        }
    };
    server_process::start_healthy(&mut command, server.name(), port, &out.join(format!("{}.log", server.name().replace([' ', '@'], "-"))))
}

fn report(
    args: &Args,
    model: &Path,
    samples: &[Sample],
    servers: &[Contender],
    reference: Contender,
    took: Duration,
    builds: &serde_json::Value,
) -> String {
    let machine = crate::bench::machine::describe();
    let machine = format!("{}, {} cores, {}, {:.1} GB/s memory read", machine.cpu, machine.cores, machine.simd.join(" "), machine.memory_read_gb_s);
    let mut md = format!(
        "# bench-serve\n\nCommand: `cargo xtask bench-serve` ({} rounds, concurrency {:?}, {} slots, {} requests per client of {} greedy tokens, ctx {})\n\
         Model: {}\nMachine: {}\n{}Took {:.1} min.\n\n\
         | concurrency | server | aggregate t/s (median) | vs {} [95% CI] | req/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms |\n|---|---|---|---|---|---|---|\n",
        args.rounds,
        args.concurrency,
        args.slots,
        args.per_client,
        args.max_tokens,
        args.ctx,
        model.display(),
        machine,
        args.baseline_rev.as_ref().map_or(String::new(), |rev| format!("Baseline: exsa serve as of `{rev}`.\n")),
        took.as_secs_f64() / 60.0,
        reference.name(),
    );
    for &c in &args.concurrency {
        let per_round = |server: Contender| -> Vec<Option<f64>> {
            (0..args.rounds)
                .map(|r| samples.iter().find(|s| s.round == r && s.server == server && s.level.concurrency == c).map(|s| s.level.tokens_per_s()))
                .collect()
        };
        let baseline = per_round(reference);
        for &server in servers.iter().rev() {
            let levels: Vec<&LevelResult> = samples.iter().filter(|s| s.server == server && s.level.concurrency == c).map(|s| &s.level).collect();
            let tps: Vec<f64> = levels.iter().map(|l| l.tokens_per_s()).collect();
            let rps: Vec<f64> = levels.iter().map(|l| l.requests_per_s()).collect();
            let ttft: Vec<f64> = levels.iter().flat_map(|l| l.ttft_ms()).collect();
            let gaps: Vec<f64> = levels.iter().flat_map(|l| l.gaps_ms()).collect();
            let vs = if server == reference {
                "baseline".to_string()
            } else {
                match stats::paired_ratio(&per_round(server), &baseline) {
                    Some(r) => format!("{:.3} [{:.3}, {:.3}] {}", r.ratio, r.ci_low, r.ci_high, r.verdict),
                    None => "n/a".into(),
                }
            };
            md += &format!(
                "| {c} | {} | {:.1} | {vs} | {:.2} | {:.0} / {:.0} | {:.1} / {:.1} |\n",
                server.name(),
                stats::summarize(&tps).map_or(f64::NAN, |s| s.median),
                stats::summarize(&rps).map_or(f64::NAN, |s| s.median),
                percentile(&ttft, 50.0),
                percentile(&ttft, 99.0),
                percentile(&gaps, 50.0),
                percentile(&gaps, 99.0),
            );
        }
    }
    md += &format!("\nBuilds:\n- exsa serve: `{}`\n", builds["exsa serve"]);
    if servers.contains(&Contender::ExsaBaseline) {
        md += &format!("- exsa serve @baseline: `{}`\n", builds["exsa serve @baseline"]);
    }
    if servers.contains(&Contender::LlamaServer) {
        md += &format!("- llama-server: `{}`\n", builds["llama-server"].as_str().unwrap_or("?").replace('\n', " / "));
    }
    md
}

fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("round,server,concurrency,wall_s,tokens,tokens_per_s,requests,ttft_p50_ms,ttft_p99_ms\n");
    for s in samples {
        let l = &s.level;
        let tokens: usize = l.requests.iter().map(|r| r.tokens).sum();
        out += &format!(
            "{},{},{},{:.3},{tokens},{:.2},{},{:.1},{:.1}\n",
            s.round,
            s.server.name(),
            l.concurrency,
            l.wall_s,
            l.tokens_per_s(),
            l.requests.len(),
            percentile(&l.ttft_ms(), 50.0),
            percentile(&l.ttft_ms(), 99.0)
        );
    }
    out
}
