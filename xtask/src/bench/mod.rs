//! `cargo xtask bench-compare`: the A/B speed test of the source build against the crate
//! baseline, with paired, interleaved runs and confidence intervals.

pub(crate) mod build;
pub(crate) mod chart;
pub(crate) mod lookup;
pub(crate) mod machine;
pub(crate) mod report;
pub(crate) mod rpc_servers;
pub(crate) mod run;
pub(crate) mod stats;
pub(crate) mod variants;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::{fetch_model, hashing, setup, vendor, workspace};
use report::{Equivalence, ModelDescription, Report, VariantInfo};
use run::RunSettings;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Variants to compare, baseline first (built-in: A, A-native, B, B-tuned, B-raw, B-amx,
    /// B-noamx, B-dist (the release bundle of `cargo xtask dist`), B-rpc).
    #[arg(long, value_delimiter = ',', default_value = "A,B")]
    variants: Vec<String>,
    /// A TOML file of further variants (`[[variant]]` tables; see docs/benchmarks.md).
    #[arg(long)]
    variants_file: Option<PathBuf>,
    /// Tests in llama-bench's terms, plus `e2e[N]` (the engine's user-visible generation).
    #[arg(long, value_delimiter = ',', default_value = "pp512,tg128,e2e")]
    tests: Vec<String>,
    /// Interleaved rounds: each variant runs every test once per round, in its own process.
    #[arg(long, default_value_t = 8)]
    reps: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<u32>,
    #[arg(long, default_value_t = 2048)]
    batch: u32,
    #[arg(long, default_value_t = 512)]
    ubatch: u32,
    /// Flash attention: on, off or auto.
    #[arg(long, default_value = "auto")]
    flash_attn: String,
    #[arg(long, default_value_t = -1)]
    gpu_layers: i32,
    /// Any GGUF model (default: the project's default model, fetched if missing).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Report files to write besides the chart.
    #[arg(long, value_delimiter = ',', default_value = "md,json,csv")]
    format: Vec<String>,
    /// Greedy tokens compared across variants before timing.
    #[arg(long, default_value_t = 32)]
    greedy_tokens: usize,
    /// Seconds after which one run is killed and counted as failed.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// A smoke run: cached builds (built if missing), small tests, 2 rounds.
    #[arg(long)]
    quick: bool,
    /// Run the criterion micro-benchmarks instead: A with --save-baseline, then B against it.
    #[arg(long)]
    micro: bool,
    /// Leave out the llama-lookup reference variant, which otherwise runs the task tests
    /// (`task-*`) beside the variants (built from the llama-cpp-python sdist on first use).
    #[arg(long)]
    no_reference: bool,
}

/// Criterion's own A/B: the same benchmark ids over each backend, B compared with A's baseline.
fn micro() -> Result<()> {
    fetch_model::run(&fetch_model::Args::default())?;
    vendor::run(&vendor::Args::default())?;
    for (backend, args) in micro_runs() {
        eprintln!("micro-benchmarks: backend {backend}");
        workspace::run(workspace::cargo().args(&args))?;
    }
    Ok(())
}

/// The crate baseline saved as criterion's baseline "A", then our build compared with it: the
/// same benchmark ids over both backends.
fn micro_runs() -> [(&'static str, Vec<String>); 2] {
    [("crate", "--save-baseline"), ("source", "--baseline")].map(|(backend, baseline)| {
        let args =
            ["bench", "--locked", "-p", "exsa-benches", "--no-default-features", "--features", backend, "--bench", MICRO_BENCH, "--", baseline, "A"];
        (backend, args.map(String::from).to_vec())
    })
}

/// The criterion bench `--micro` runs (benches/benches/steps.rs).
const MICRO_BENCH: &str = "steps";

/// The tests and rounds to run: `--quick` is three short tests in 2 rounds; fewer than 2 rounds
/// cannot give a paired ratio.
fn tests_and_rounds(args: &Args) -> Result<(Vec<String>, usize)> {
    let (tests, reps) = if args.quick { (vec!["pp64".into(), "tg16".into(), "e2e16".into()], 2) } else { (args.tests.clone(), args.reps) };
    if reps < 2 {
        bail!("--reps must be at least 2: a ratio needs paired rounds");
    }
    Ok((tests, reps))
}

pub fn run(args: &Args) -> Result<()> {
    if args.micro {
        return micro();
    }
    let started = Instant::now();
    let (args_tests, reps) = tests_and_rounds(args)?;
    let variants = variants::resolve(args.variants_file.as_deref(), &args.variants)?;
    if let Some(m) = &args.model {
        llama_header_check(m)?;
    }
    // Both builds need cmake and libclang whatever the model.
    setup::run(&setup::Args::default())?;
    if variants.iter().any(|v| v.backend != "crate" && v.llama_cpp_dir.is_none()) {
        vendor::run(&vendor::Args::default())?;
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };

    let built = match (args.quick, build::cached(&variants)) {
        (true, Some(cached)) => {
            eprintln!("--quick: using the cached builds");
            cached
        }
        _ => build::build_all(&variants),
    };
    if built.iter().all(|b| b.binary.is_err()) {
        bail!("every variant failed to build (logs in {}): {}", build::bench_root().join("logs").display(), build::fix_line(&built));
    }
    let build_done = Instant::now();
    eprintln!("measuring memory-read bandwidth");
    let machine = machine::describe();
    let model_desc = ModelDescription {
        path: model.display().to_string(),
        description: String::new(),
        size_bytes: std::fs::metadata(&model)?.len(),
        sha256: hashing::file_sha256(&model)?,
    };

    let timestamp = timestamp();
    let out_dir = build::bench_root().join(&timestamp);
    std::fs::create_dir_all(&out_dir)?;
    let settings = RunSettings {
        model: model.clone(),
        tests: args_tests,
        reps,
        threads: args.threads,
        batch: args.batch,
        ubatch: args.ubatch,
        flash_attn: args.flash_attn.clone(),
        gpu_layers: args.gpu_layers,
        greedy_tokens: args.greedy_tokens,
        timeout_s: args.timeout_s,
    };
    let reference = if args.no_reference || !settings.tests.iter().any(|t| lookup::runs(t)) {
        None
    } else {
        let exsa = built.iter().find_map(|b| b.binary.as_ref().ok()).expect("checked above: some variant built");
        match lookup::prepare(exsa, &settings) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("the {} reference is left out: {e:#}", lookup::NAME);
                None
            }
        }
    };
    let runs = run::run_all(&built, reference.as_ref(), &settings, &out_dir);

    let baseline = variants[0].name.clone();
    let base = runs.get(&baseline);
    let equivalence: Vec<Equivalence> = variants
        .iter()
        .map(|v| {
            let this = runs.get(&v.name);
            match base.zip(this).and_then(|(b, t)| t.equivalence_to(b)) {
                Some(e) => Equivalence {
                    variant: v.name.clone(),
                    diverges_at: e.diverges_at(),
                    checked: true,
                    near_tie: matches!(e, exsa_bench_protocol::Equivalence::NearTieSwap(_)),
                },
                None => Equivalence { variant: v.name.clone(), diverges_at: None, checked: false, near_tie: false },
            }
        })
        .collect();
    let diverged: Vec<String> = equivalence.iter().filter(|e| e.diverges_at.is_some()).map(|e| e.variant.clone()).collect();
    let mut order: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    if reference.is_some() {
        order.push(lookup::NAME.into());
    }
    let rows = report::rows(&settings, &order, &baseline, &runs, &diverged);
    let e2e_over_tg = report::e2e_over_tg(&settings, &order, &runs);
    let speculation_gain = report::speculation_gain(&settings, &order, &runs);

    let mut model_desc = model_desc;
    let mut variant_infos: Vec<VariantInfo> = built
        .iter()
        .map(|b| {
            let r = runs.get(&b.variant.name);
            let rep = r.and_then(|r| r.report.as_ref());
            if let Some(rep) = rep {
                model_desc.description = rep.model.description.clone();
            }
            VariantInfo {
                variant: b.variant.clone(),
                build_seconds: b.seconds,
                build_info: rep.map(|x| x.build_info.clone()),
                system_info: rep.map(|x| x.system_info.clone()),
                errors: r.map(|r| r.errors.clone()).unwrap_or_default(),
            }
        })
        .collect();
    if let Some(reference) = &reference {
        variant_infos.push(VariantInfo {
            variant: variants::Variant::builtin(lookup::NAME, "reference", ""),
            build_seconds: 0.0,
            build_info: Some(serde_json::json!({ "llama-lookup --version": lookup::version(reference), "binary": reference.binary })),
            system_info: None,
            errors: runs.get(lookup::NAME).map(|r| r.errors.clone()).unwrap_or_default(),
        });
    }
    let ceiling = machine.memory_read_gb_s * 1e9 / model_desc.size_bytes as f64;
    let report = Report {
        timestamp,
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        git_revision: git_revision(),
        machine,
        model: model_desc,
        settings,
        baseline,
        variants: variant_infos,
        equivalence,
        rows,
        tg_ceiling_tokens_per_s: ceiling,
        e2e_over_tg,
        speculation_gain,
    };
    println!("{}", report.table());
    for path in report.write(&out_dir, &args.format)? {
        println!("wrote {}", path.display());
    }
    println!(
        "total {:.1} min (builds {:.1} min, runs {:.1} min)",
        started.elapsed().as_secs_f64() / 60.0,
        (build_done - started).as_secs_f64() / 60.0,
        build_done.elapsed().as_secs_f64() / 60.0
    );
    if report.variants.iter().all(|v| !v.errors.is_empty()) {
        bail!("every variant failed");
    }
    Ok(())
}

/// A model path that is not GGUF is refused before anything is built.
fn llama_header_check(path: &std::path::Path) -> Result<()> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("model {}: {e}", path.display()))?;
    std::io::Read::read_exact(&mut f, &mut magic).map_err(|_| anyhow::anyhow!("model {} is too short to be GGUF", path.display()))?;
    if &magic != b"GGUF" {
        bail!("model {} is not a GGUF file (magic {:02x?})", path.display(), magic);
    }
    Ok(())
}

pub(crate) fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace::root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// UTC `YYYYMMDD-HHMMSS`, without a date crate.
pub(crate) fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss) = exsa_bench_protocol::utc_civil(secs);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
}

#[cfg(test)]
mod tests {
    use super::{Args, tests_and_rounds};

    fn parse(args: &[&str]) -> Args {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        Cli::try_parse_from(std::iter::once("bench-compare").chain(args.iter().copied())).unwrap().args
    }

    #[test]
    fn micro_saves_the_baseline_on_the_crate_and_compares_our_build_with_it() {
        let [(first, save), (second, compare)] = super::micro_runs();
        assert_eq!((first, second), ("crate", "source"), "the baseline must be saved before it is compared with");
        assert!(save.ends_with(&["--save-baseline".to_string(), "A".into()]) && compare.ends_with(&["--baseline".to_string(), "A".into()]));
        // The bench and both backend features exist where cargo will look for them.
        let manifest = std::fs::read_to_string(crate::workspace::root().join("benches/Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("name = \"{}\"", super::MICRO_BENCH)), "no [[bench]] {}", super::MICRO_BENCH);
        for feature in ["crate", "source"] {
            assert!(manifest.lines().any(|l| l.trim_start().starts_with(&format!("{feature} ="))), "exsa-benches has no feature {feature}");
        }
    }

    #[test]
    fn quick_runs_three_short_tests_and_one_round_is_refused() {
        let (tests, reps) = tests_and_rounds(&parse(&["--quick", "--reps", "9"])).unwrap();
        assert_eq!((tests, reps), (vec!["pp64".to_string(), "tg16".into(), "e2e16".into()], 2));
        let (tests, reps) = tests_and_rounds(&parse(&["--tests", "pp512,tg128", "--reps", "3"])).unwrap();
        assert_eq!((tests.len(), reps), (2, 3));
        let err = tests_and_rounds(&parse(&["--reps", "1"])).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }

    #[test]
    fn timestamps_are_sortable_utc() {
        let t = super::timestamp();
        assert_eq!(t.len(), 15);
        assert!(t.starts_with("20"), "{t}");
    }
}
