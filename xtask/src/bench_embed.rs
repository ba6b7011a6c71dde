//! `cargo xtask bench-embed`: embeddings per second from `exsa serve` against llama.cpp's own
//! `llama-server --embeddings`, on the same model, pooling, batch sizes and threads.
//!
//! The work is what a retrieval stack sends when it indexes: many short texts, in requests of
//! several inputs (`--per-request`, OpenAI's `/v1/embeddings` on both servers), one request
//! after another. Each round starts each server afresh (their order alternates), sends one
//! warm-up request, then times all the texts; the report gives embeddings/s per server with the
//! ratio's bootstrap interval over the paired rounds. Before timing, both servers' vectors of
//! the first text are compared (the same work: same pooling, same normalisation), and the run
//! fails when they are not alike.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench::stats;
use crate::server_process;
use crate::{fetch_model, llama_tools, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Texts embedded per round.
    #[arg(long, default_value_t = 256)]
    texts: usize,
    /// Inputs per request, one level after another.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    per_request: Vec<usize>,
    /// Rounds (each starts both servers afresh, in alternating order).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Pooling both servers apply (the default model's file names none: mean).
    #[arg(long, default_value = "mean")]
    pooling: String,
    /// Tokens per decode (`--batch`; llama-server's -b and -ub).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// llama-server's slots (each input is a task of its own there; its slots decode together).
    #[arg(long, default_value_t = 16)]
    llama_server_slots: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Server {
    Exsa,
    LlamaServer,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Exsa => "exsa serve",
            Server::LlamaServer => "llama-server",
        }
    }
}

#[derive(Serialize)]
struct Sample {
    round: usize,
    server: Server,
    per_request: usize,
    wall_s: f64,
    texts: usize,
}

impl Sample {
    fn per_s(&self) -> f64 {
        self.texts as f64 / self.wall_s
    }
}

/// Short texts of a few words to a sentence, as documents' chunks and queries are.
fn texts(n: usize) -> Vec<String> {
    const SUBJECTS: [&str; 8] =
        ["The harbour", "A small cat", "Our new kettle", "The museum", "Rain", "The night train", "A red kite", "Fresh bread"];
    const PARTS: [&str; 6] = [
        "opens at nine",
        "sleeps on the warm stone wall all afternoon",
        "is loud",
        "was closed for repairs last winter",
        "falls",
        "smells of the bakery on the corner",
    ];
    (0..n).map(|i| format!("{} {} (note {i}).", SUBJECTS[i % SUBJECTS.len()], PARTS[(i / SUBJECTS.len()) % PARTS.len()])).collect()
}

pub fn run(args: &Args) -> Result<()> {
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (the comparison pairs rounds)");
    }
    if args.texts == 0 || args.per_request.contains(&0) {
        bail!("--texts and --per-request must be at least 1");
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };
    let exsa = crate::bench_serve::build_exsa(None)?;
    let llama_server = llama_tools::ensure("llama-server")?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let out = workspace::target_dir().join("bench-embed").join(crate::bench::timestamp());
    std::fs::create_dir_all(&out)?;
    let texts = texts(args.texts);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let mut samples = Vec::new();
    let mut checked = None;
    let started = Instant::now();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [Server::Exsa, Server::LlamaServer] } else { [Server::LlamaServer, Server::Exsa] };
        for server in order {
            let binary = if server == Server::Exsa { &exsa } else { &llama_server };
            let (mut child, base) = start(server, binary, &model, args, threads, &out)?;
            let result = (|| -> Result<()> {
                let first = embed(&http, &base, &texts[..1])?.remove(0);
                check_alike(&mut checked, server, first)?;
                for &per_request in &args.per_request {
                    let timer = Instant::now();
                    for chunk in texts.chunks(per_request) {
                        let vectors = embed(&http, &base, chunk)?;
                        if vectors.len() != chunk.len() {
                            bail!("{} answered {} vectors for {} texts", server.name(), vectors.len(), chunk.len());
                        }
                    }
                    let sample = Sample { round, server, per_request, wall_s: timer.elapsed().as_secs_f64(), texts: texts.len() };
                    eprintln!(
                        "round {}/{} {:<12} {per_request:>3} per request: {:7.1} embeddings/s",
                        round + 1,
                        args.rounds,
                        server.name(),
                        sample.per_s()
                    );
                    samples.push(sample);
                }
                Ok(())
            })();
            let _ = child.kill();
            let _ = child.wait();
            result.with_context(|| format!("{} (log in {})", server.name(), out.display()))?;
        }
    }
    let report = report(args, &model, &samples, started.elapsed(), &exsa, &llama_server);
    std::fs::write(out.join("report.md"), &report)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json!({ "args": {
        "texts": args.texts, "per_request": args.per_request, "rounds": args.rounds, "pooling": args.pooling,
        "batch": args.batch, "llama_server_slots": args.llama_server_slots, "threads": threads,
        "model": model.display().to_string() }, "samples": samples }))?,
    )?;
    println!("{report}");
    println!("reports in {}", out.display());
    Ok(())
}

/// Both servers' vectors of one text must be alike (cosine above 0.99: the same pooling and
/// normalisation; builds round differently), else the run measures different work.
fn check_alike(first: &mut Option<(Server, Vec<f64>)>, server: Server, vector: Vec<f64>) -> Result<()> {
    match first {
        None => *first = Some((server, vector)),
        Some((other, reference)) if *other != server => {
            let cosine = cosine(reference, &vector);
            if cosine.is_nan() || cosine <= 0.99 {
                bail!("{} and {} embed the same text differently (cosine {cosine}): check --pooling", other.name(), server.name());
            }
        }
        Some(_) => {}
    }
    Ok(())
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if a.len() != b.len() { f64::NAN } else { dot / (norm(a) * norm(b)) }
}

/// The vectors of `texts` from `/v1/embeddings`.
fn embed(http: &reqwest::blocking::Client, base: &str, texts: &[String]) -> Result<Vec<Vec<f64>>> {
    let response = http.post(format!("{base}/v1/embeddings")).json(&json!({ "model": "default", "input": texts })).send()?;
    let status = response.status();
    let body: Value = response.json()?;
    if !status.is_success() {
        bail!("/v1/embeddings answered {status}: {body}");
    }
    let data = body["data"].as_array().context("no data in the embeddings answer")?;
    data.iter().map(|d| d["embedding"].as_array().context("no embedding")?.iter().map(|x| x.as_f64().context("not a number")).collect()).collect()
}

/// Starts `server` on a free port with the run's pooling and batch, and waits until /health
/// answers 200.
fn start(server: Server, binary: &Path, model: &Path, args: &Args, threads: usize, out: &Path) -> Result<(Child, String)> {
    let port_number = server_process::free_port()?;
    let port = port_number.to_string();
    let (batch, threads) = (args.batch.to_string(), threads.to_string());
    let mut command = Command::new(binary);
    match server {
        Server::Exsa => {
            command.arg("--model").arg(model).args(["--log", "error", "--threads", &threads, "--pooling", &args.pooling]);
            command.args(["serve", "--port", &port, "--batch", &batch, "--model-id", "default"]);
        }
        Server::LlamaServer => {
            let slots = args.llama_server_slots.to_string();
            let ctx = (args.llama_server_slots * args.batch).to_string();
            command.arg("-m").arg(model).args(["--port", &port, "-t", &threads, "-tb", &threads, "--embeddings", "--pooling", &args.pooling]);
            command.args(["--alias", "default", "--no-webui", "-lv", "1", "-kvu", "-np", &slots, "-c", &ctx, "-b", &batch, "-ub", &batch]);
        }
    }
    server_process::start_healthy(&mut command, server.name(), port_number, &out.join(format!("{}.log", server.name().replace(' ', "-"))))
}

fn report(args: &Args, model: &Path, samples: &[Sample], took: Duration, exsa: &Path, llama_server: &Path) -> String {
    let machine = crate::bench::machine::describe();
    let machine = format!("{}, {} cores, {}", machine.cpu, machine.cores, machine.simd.join(" "));
    let version = |binary: &Path, args: &[&str]| {
        Command::new(binary).args(args).output().map_or(String::new(), |o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().filter(|l| !l.trim().is_empty()).take(2).collect::<Vec<_>>().join(" / ")
        })
    };
    let mut md = format!(
        "# bench-embed\n\nCommand: `cargo xtask bench-embed` ({} rounds, {} texts per level, {:?} per request, pooling {}, batch {}, llama-server -np {} -kvu)\n\
         Model: {}\nMachine: {machine}\nTook {:.1} min.\n\n\
         | inputs per request | server | embeddings/s (median) | vs llama-server [95% CI] |\n|---|---|---|---|\n",
        args.rounds,
        args.texts,
        args.per_request,
        args.pooling,
        args.batch,
        args.llama_server_slots,
        model.display(),
        took.as_secs_f64() / 60.0,
    );
    for &per_request in &args.per_request {
        let per_round = |server: Server| -> Vec<Option<f64>> {
            (0..args.rounds)
                .map(|r| samples.iter().find(|s| s.round == r && s.server == server && s.per_request == per_request).map(Sample::per_s))
                .collect()
        };
        let baseline = per_round(Server::LlamaServer);
        for server in [Server::LlamaServer, Server::Exsa] {
            let rates: Vec<f64> = per_round(server).into_iter().flatten().collect();
            let vs = if server == Server::LlamaServer {
                "baseline".to_string()
            } else {
                match stats::paired_ratio(&per_round(server), &baseline) {
                    Some(r) => format!("{:.3} [{:.3}, {:.3}] {}", r.ratio, r.ci_low, r.ci_high, r.verdict),
                    None => "n/a".into(),
                }
            };
            md += &format!("| {per_request} | {} | {:.1} | {vs} |\n", server.name(), stats::summarize(&rates).map_or(f64::NAN, |s| s.median));
        }
    }
    md += &format!("\nBuilds:\n- exsa serve: `{}`\n- llama-server: `{}`\n", version(exsa, &["--version"]), version(llama_server, &["--version"]));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_texts_are_short_and_distinct() {
        let t = texts(256);
        assert_eq!(t.len(), 256);
        assert_eq!(t.iter().collect::<std::collections::HashSet<_>>().len(), 256);
        assert!(t.iter().all(|s| s.len() < 80), "{t:?}");
    }

    #[test]
    fn servers_whose_vectors_differ_fail_the_run() {
        let mut first = None;
        check_alike(&mut first, Server::Exsa, vec![1.0, 0.0]).unwrap();
        check_alike(&mut first, Server::Exsa, vec![0.0, 1.0]).unwrap();
        check_alike(&mut first, Server::LlamaServer, vec![0.999, 0.01]).unwrap();
        assert!(check_alike(&mut first, Server::LlamaServer, vec![0.0, 1.0]).is_err());
        assert!(check_alike(&mut first, Server::LlamaServer, vec![1.0]).is_err());
    }
}
