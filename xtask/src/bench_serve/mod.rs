//! `cargo xtask bench-serve`: our `exsa serve` against llama.cpp's own `llama-server` on the
//! same model, slots and threads, under streaming chat traffic of several kinds
//! ([`Scenario`]) at several concurrencies.
//!
//! Fair by construction: both servers render the same chat template (llama-server gets the
//! template exsa uses when the GGUF has none), which a probe checks before anything is measured
//! ([`parity`]); every reply is exactly `--max-tokens` tokens (`ignore_eos`), counted from each
//! server's `usage`. llama-server is built by `llama_tools` (llama.cpp's own programs, from the
//! `llama-cpp-python` sdist on PyPI, natively, under `target/llama-server/`). Each round starts
//! each server afresh for each scenario (their order alternates), runs the scenario's levels and
//! reads the server's peak RSS; the report compares aggregate tokens/s per scenario and level with
//! a bootstrap interval over the paired rounds, and gives TTFT and inter-token latency percentiles
//! over all requests.

mod ceiling;
mod load;
mod parity;
mod report;
mod scenario;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::server_process;
use crate::{fetch_model, llama_tools, workspace};
use load::LevelResult;
use scenario::Scenario;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The kinds of traffic (all but `rewrite` and `lora` by default).
    #[arg(long, value_delimiter = ',', default_value = "distinct,shared-system,multi-turn,long-prompt")]
    scenario: Vec<Scenario>,
    /// Concurrent clients of the `distinct` scenario, one level after another (the others run
    /// at fixed levels: shared-system 8 and 16, multi-turn 4 and 8, long-prompt 8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// Slots of each server (`--parallel` / `-np`).
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Rounds (each starts every server afresh for each scenario, in alternating order).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Conversations each client holds per level, one after another (multi-turn: one).
    #[arg(long, default_value_t = 2)]
    per_client: usize,
    /// Tokens per reply (`ignore_eos`: every reply exactly this long).
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
    /// Sampling temperature of every reply (0: greedy). Above 0 each request has its own seed,
    /// the same for every server and round.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Context shared by the slots: room for 16 long prompts' worth of traffic without
    /// evictions (shared-system: a 1,500-token prompt in each of 8 slots on a server that does
    /// not share it).
    #[arg(long, default_value_t = 16384)]
    ctx: usize,
    /// Element type of both servers' KV cache, keys and values (`--cache-type-k/-v`; f16, both
    /// servers' default, when not given): q8_0, q4_0 and the others llama.cpp offers.
    #[arg(long, value_name = "TYPE")]
    cache_type: Option<String>,
    /// Also serve `exsa` as built from this git revision (a commit, tag or branch), to measure a
    /// change against what came before it ("exsa serve @REV" in the report, each round beside
    /// the others).
    #[arg(long, value_name = "REV")]
    baseline_rev: Option<String>,
    /// Leave llama-server out (with --baseline-rev: this build against the earlier one only;
    /// with --speculative: speculation against none).
    #[arg(long)]
    no_llama_server: bool,
    /// Also serve this build with `--speculative ngram` (prompt lookup, up to 8 drafts), to
    /// measure speculation under load ("exsa serve +ngram" in the report).
    #[arg(long)]
    speculative: bool,
    /// The LoRA adapter both servers load for the `lora` scenario (default: a random one of the
    /// default model's shape, written by `synth-models`; another model needs its own).
    #[arg(long, value_name = "PATH")]
    lora: Option<PathBuf>,
}

impl Args {
    fn replies(&self) -> load::Replies {
        load::Replies { max_tokens: self.max_tokens, temperature: self.temperature }
    }
}

/// One server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Contender {
    /// This build with `--speculative ngram`.
    ExsaSpeculative,
    Exsa,
    /// `exsa` built from `--baseline-rev`.
    ExsaBaseline,
    LlamaServer,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::ExsaSpeculative => "exsa serve +ngram",
            Contender::Exsa => "exsa serve",
            Contender::ExsaBaseline => "exsa serve @baseline",
            Contender::LlamaServer => "llama-server",
        }
    }
}

/// The servers of a run, and what each is compared with: llama-server when it runs, else the
/// baseline build, else (speculation measured alone) this build without speculation.
fn servers(args: &Args) -> Result<(Vec<Contender>, Contender)> {
    let mut servers = Vec::new();
    if args.speculative {
        servers.push(Contender::ExsaSpeculative);
    }
    servers.push(Contender::Exsa);
    if args.baseline_rev.is_some() {
        servers.push(Contender::ExsaBaseline);
    }
    if !args.no_llama_server {
        servers.push(Contender::LlamaServer);
    }
    let reference = *servers.last().expect("exsa always runs");
    if servers.len() < 2 {
        bail!("--no-llama-server leaves nothing to compare with: give --baseline-rev or --speculative too");
    }
    Ok((servers, reference))
}

#[derive(Serialize)]
struct Sample {
    round: usize,
    server: Contender,
    level: LevelResult,
    /// The server's peak resident memory over this scenario's levels (VmHWM), in MiB.
    peak_rss_mib: Option<f64>,
}

pub fn run(args: &Args) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number of at least 0, not {}", args.temperature);
    }
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (the comparison pairs rounds)");
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };
    let (servers, reference) = servers(args)?;
    let adapter = match (&args.lora, args.scenario.contains(&Scenario::Lora)) {
        (Some(path), _) => Some(path.clone()),
        (None, true) if args.model.is_none() => Some(crate::synth_models::default_adapter()?),
        (None, true) => bail!("--scenario lora on another model than the default needs --lora PATH (an adapter made for it)"),
        (None, false) => None,
    };
    let exsa = build_exsa(None)?;
    let baseline = args.baseline_rev.as_deref().map(|rev| build_exsa(Some(rev))).transpose()?;
    let llama_server = if args.no_llama_server { PathBuf::from("llama-server") } else { llama_tools::ensure("llama-server")? };
    let binary = |server: Contender| match server {
        Contender::Exsa | Contender::ExsaSpeculative => exsa.as_path(),
        Contender::ExsaBaseline => baseline.as_deref().expect("built when asked for"),
        Contender::LlamaServer => llama_server.as_path(),
    };
    // The kernels' ceiling for the distinct scenario, beside llama-server.
    let batched_bench =
        (!args.no_llama_server && args.scenario.contains(&Scenario::Distinct)).then(|| llama_tools::ensure("llama-batched-bench")).transpose()?;
    let info = exsa_info(&exsa, &model).context("`exsa info` on the model")?;
    let template = llama_server_template(&info)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = workspace::target_dir().join("bench-serve").join(crate::bench::timestamp());
    std::fs::create_dir_all(&out)?;
    let launch = Launch { model: &model, args, threads, template: &template, out: &out, adapter: adapter.as_deref() };
    // Before anything is measured: the servers answer the same prompts.
    let mut probes = Vec::new();
    for &server in &servers {
        let (mut child, base) = launch.start(server, binary(server), Scenario::Distinct)?;
        let probe = parity::probe(&base, "default");
        let _ = child.kill();
        let _ = child.wait();
        probes.push((server.name(), probe?));
    }
    parity::check(&probes)?;
    eprintln!("the servers render the same probe chat into {} prompt tokens", probes[0].1.prompt_tokens);
    let mut samples: Vec<Sample> = Vec::new();
    let mut ceilings = Vec::new();
    let started = Instant::now();
    for round in 0..args.rounds {
        for &scenario in &args.scenario {
            // Each round starts with another server, so that none always runs first.
            let mut order = servers.clone();
            order.rotate_left(round % servers.len());
            for server in order {
                let (mut child, base) = launch.start(server, binary(server), scenario)?;
                let result = (|| -> Result<Vec<LevelResult>> {
                    let mut levels = Vec::new();
                    for c in scenario.levels(&args.concurrency) {
                        let level = load::run_level(&base, "default", scenario, c, args.per_client, args.replies())
                            .with_context(|| format!("{} on {} at concurrency {c}", server.name(), scenario.name()))?;
                        eprintln!(
                            "round {}/{} {:<14} {:<20} c={c:<3} {:7.1} t/s aggregate",
                            round + 1,
                            args.rounds,
                            scenario.name(),
                            server.name(),
                            level.tokens_per_s()
                        );
                        levels.push(level);
                    }
                    Ok(levels)
                })();
                let peak_rss_mib = peak_rss_mib(child.id());
                let _ = child.kill();
                let _ = child.wait();
                samples.extend(result?.into_iter().map(|level| Sample { round, server, level, peak_rss_mib }));
            }
            if let (Scenario::Distinct, Some(binary)) = (scenario, &batched_bench) {
                // The prompts' length as exsa counted them this round (both servers count alike).
                let prompt: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.round == round && s.server == Contender::Exsa && s.level.scenario == scenario)
                    .flat_map(|s| s.level.requests.iter().map(|r| r.prompt_tokens as f64))
                    .collect();
                let prompt_tokens = load::percentile(&prompt, 50.0).round() as usize;
                let levels = scenario.levels(&args.concurrency);
                let measured = ceiling::measure(binary, &launch, prompt_tokens, &levels, round)?;
                for c in &measured {
                    eprintln!(
                        "round {}/{} {:<14} {:<20} c={:<3} {:7.1} t/s aggregate",
                        round + 1,
                        args.rounds,
                        scenario.name(),
                        "llama-batched-bench",
                        c.sequences,
                        c.tokens_per_s
                    );
                }
                ceilings.extend(measured);
            }
        }
    }
    let builds = build_info(&info, baseline.as_deref(), (!args.no_llama_server).then_some(llama_server.as_path()), &model);
    let run = report::Run {
        args,
        model: &model,
        samples: &samples,
        servers: &servers,
        reference,
        took: started.elapsed(),
        builds: &builds,
        template: template.describe(),
        ceilings: &ceilings,
    };
    let report = run.markdown();
    std::fs::write(out.join("report.md"), &report)?;
    let json = serde_json::json!({ "build_info": builds, "llama_server_template": template.describe(), "samples": samples, "ceiling": ceilings });
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(out.join("samples.csv"), run.csv())?;
    std::fs::write(out.join("chart.svg"), run.svg())?;
    println!("{report}");
    println!("reports in {}", out.display());
    Ok(())
}

/// A process's peak resident memory in MiB (Linux: `VmHWM` of /proc/PID/status).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// The chat template llama-server is given so that it renders what exsa renders: none when the
/// GGUF has its own (both use it), else the fallback exsa chose (`exsa info`'s `chat_template`),
/// as exsa's Jinja source of it where exsa has one, else by llama.cpp's name for it.
#[derive(Debug)]
enum LlamaServerTemplate {
    TheModels,
    File(PathBuf),
    Named(String),
}

impl LlamaServerTemplate {
    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            LlamaServerTemplate::TheModels => vec![],
            LlamaServerTemplate::File(f) => vec!["--chat-template-file".into(), f.into()],
            LlamaServerTemplate::Named(n) => vec!["--chat-template".into(), n.into()],
        }
    }

    fn describe(&self) -> String {
        match self {
            LlamaServerTemplate::TheModels => "the model's own".into(),
            LlamaServerTemplate::File(f) => format!("--chat-template-file {}", f.strip_prefix(workspace::root()).unwrap_or(f).display()),
            LlamaServerTemplate::Named(n) => format!("--chat-template {n}"),
        }
    }
}

fn llama_server_template(info: &serde_json::Value) -> Result<LlamaServerTemplate> {
    if info["model"]["has_chat_template"].as_bool() == Some(true) {
        return Ok(LlamaServerTemplate::TheModels);
    }
    let name = info["chat_template"].as_str().context("`exsa info` names no chat template")?;
    let file = workspace::root().join("crates/engine/src/templates_fallback").join(format!("{name}.jinja"));
    Ok(if file.is_file() { LlamaServerTemplate::File(file) } else { LlamaServerTemplate::Named(name.to_owned()) })
}

/// How every server of a run is started.
struct Launch<'a> {
    model: &'a Path,
    args: &'a Args,
    threads: usize,
    template: &'a LlamaServerTemplate,
    out: &'a Path,
    /// The LoRA adapter both servers load for the `lora` scenario.
    adapter: Option<&'a Path>,
}

impl Launch<'_> {
    /// Starts `server` on a free port for `scenario` (with the LoRA adapter for `lora`) and
    /// waits until /health answers 200.
    fn start(&self, server: Contender, binary: &Path, scenario: Scenario) -> Result<(Child, String)> {
        let port = server_process::free_port()?;
        let (slots, ctx, threads) = (self.args.slots.to_string(), self.args.ctx.to_string(), self.threads.to_string());
        let mut command = Command::new(binary);
        if let (Scenario::Lora, Some(adapter)) = (scenario, self.adapter) {
            // `--lora` is llama-server's name, and a global option of exsa's.
            command.arg("--lora").arg(adapter);
        }
        match server {
            Contender::Exsa | Contender::ExsaBaseline | Contender::ExsaSpeculative => {
                command.arg("--model").arg(self.model).args(["--log", "error", "--ctx", &ctx, "--threads", &threads]);
                command.args(["serve", "--port", &port.to_string(), "--parallel", &slots, "--max-queue", "256", "--model-id", "default"]);
                if server == Contender::ExsaSpeculative {
                    command.args(["--speculative", "ngram", "--draft-max", "8"]);
                }
                if let Some(t) = &self.args.cache_type {
                    command.args(["--cache-type-k", t, "--cache-type-v", t]);
                }
            }
            Contender::LlamaServer => {
                command.arg("-m").arg(self.model).args(["--port", &port.to_string(), "-np", &slots, "-c", &ctx, "-t", &threads, "-tb", &threads]);
                // Unified KV cache and 512-token batches, as `exsa serve` runs.
                command.args(["--alias", "default", "--no-webui", "-lv", "1", "-kvu", "-b", "512", "-ub", "512"]);
                command.args(self.template.args());
                if let Some(t) = &self.args.cache_type {
                    command.args(["-ctk", t, "-ctv", t]);
                }
            }
        }
        let log = self.out.join(format!("{}.log", server.name().replace([' ', '@'], "-")));
        server_process::start_healthy(&mut command, server.name(), port, &log)
    }
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
/// `exsa` is this build's `exsa info`, read once at the start.
fn build_info(exsa: &serde_json::Value, baseline: Option<&Path>, llama_server: Option<&Path>, model: &Path) -> serde_json::Value {
    let builds =
        |v: &serde_json::Value| serde_json::json!({ "backend": v["backend"], "build_info": v["build_info"], "system_info": v["system_info"] });
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
        "exsa serve": builds(exsa),
        "exsa serve @baseline": baseline.map(|b| exsa_info(b, model).map_or(serde_json::Value::Null, |v| builds(&v))),
        "llama-server": llama_version.trim(),
    })
}

/// `exsa info` on `model`: the model, its chat template, the build.
fn exsa_info(exsa: &Path, model: &Path) -> Option<serde_json::Value> {
    let out = Command::new(exsa).arg("--model").arg(model).args(["--log", "error", "info"]).output().ok().filter(|o| o.status.success())?;
    serde_json::from_slice(&out.stdout).ok()
}

#[cfg(test)]
mod tests {
    use clap::{Parser, ValueEnum};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_default_run_has_every_scenario_but_rewrite_and_lora_and_five_rounds() {
        let cli = Cli::try_parse_from(["bench-serve"]).unwrap();
        let default_scenarios: Vec<Scenario> =
            Scenario::value_variants().iter().copied().filter(|&s| s != Scenario::Rewrite && s != Scenario::Lora).collect();
        assert_eq!(cli.args.scenario, default_scenarios);
        assert_eq!(cli.args.rounds, 5);
    }
}
