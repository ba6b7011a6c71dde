//! llama.cpp's own prompt-lookup program, `llama-lookup`, as a reference variant of the task
//! tests: the same chat prompt (rendered by our engine, `exsa bench --task-setup`), the same
//! sampling, drafts of up to the same length, on the same model and threads, in the same
//! interleaved rounds. Its `task-X` rows run it with no drafts (`--spec-draft-n-max 0`: one
//! decode per token), so the report's speculation gain for it is llama.cpp's own.
//!
//! It is built natively from the `llama-cpp-python` sdist's llama.cpp (`llama_tools`), a tree of
//! a near-identical version to our pin.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use exsa_bench_protocol::{Sample, TaskSetup};

use super::run::RunSettings;
use crate::llama_tools;

/// The variant's name in reports.
pub const NAME: &str = "llama-lookup";

/// The built program and what each task test runs.
#[derive(Debug)]
pub struct Reference {
    pub binary: PathBuf,
    pub setups: Vec<TaskSetup>,
}

/// Whether `test` is one the reference runs.
pub fn runs(test: &str) -> bool {
    test.starts_with("task-")
}

/// Builds llama-lookup (once) and asks `exsa` (a built variant) what the task tests run.
pub fn prepare(exsa: &Path, settings: &RunSettings) -> Result<Reference> {
    let tests: Vec<&str> = settings.tests.iter().map(String::as_str).filter(|t| runs(t)).collect();
    let out = Command::new(exsa)
        .arg("--model")
        .arg(&settings.model)
        .args(["--log", "error", "bench", "--task-setup", "--tests", &tests.join(",")])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", exsa.display()))?;
    if !out.status.success() {
        bail!("{} --task-setup failed: {}", exsa.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let setups = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str::<TaskSetup>)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the task setups")?;
    Ok(Reference { binary: llama_tools::ensure("llama-lookup")?, setups })
}

/// llama-lookup's arguments for `setup`.
pub fn args(setup: &TaskSetup, settings: &RunSettings, threads: u32) -> Vec<String> {
    let mut a: Vec<String> = vec!["-m".into(), settings.model.display().to_string(), "-p".into(), setup.prompt.clone()];
    let pairs = [
        ("-n", setup.max_tokens.to_string()),
        ("--spec-draft-n-max", setup.max_draft.to_string()),
        ("--temp", setup.temperature.to_string()),
        ("--top-k", setup.top_k.to_string()),
        ("--top-p", setup.top_p.to_string()),
        ("--min-p", setup.min_p.to_string()),
        ("--repeat-penalty", setup.repeat_penalty.to_string()),
        ("--repeat-last-n", setup.repeat_last_n.to_string()),
        ("--seed", setup.seed.to_string()),
        ("-t", threads.to_string()),
        ("-tb", threads.to_string()),
        ("-c", "4096".to_string()),
        ("-b", settings.batch.to_string()),
        ("-ub", settings.ubatch.to_string()),
        ("-fa", settings.flash_attn.clone()),
    ];
    for (flag, value) in pairs {
        a.extend([flag.to_string(), value]);
    }
    a
}

/// What llama-lookup printed at its end, as a sample of `test`.
pub fn parse(test: &str, max_draft: u32, log: &str) -> Result<Sample> {
    // "decoded   37 tokens in    0.256 seconds, speed:  144.594 t/s"
    let decoded = log.lines().find_map(|l| l.split_once("decoded ").map(|(_, rest)| rest)).context("no `decoded N tokens` line")?;
    let words: Vec<&str> = decoded.split_whitespace().collect();
    let (tokens, seconds) = match words.as_slice() {
        [n, "tokens", "in", s, "seconds,", ..] => (n.parse::<usize>()?, s.parse::<f64>()?),
        _ => bail!("unexpected line {decoded:?}"),
    };
    let count = |key: &str| -> Result<usize> {
        let line = log.lines().find_map(|l| l.split_once(key).map(|(_, rest)| rest)).with_context(|| format!("no {key:?} line"))?;
        Ok(line.trim_start_matches([' ', '=']).trim().parse()?)
    };
    if tokens == 0 || seconds <= 0.0 {
        bail!("decoded {tokens} tokens in {seconds} s");
    }
    let (drafted, accepted) = (count("n_drafted ")?, count("n_accept ")?);
    // One decode per round; the last token is sampled without a decode after it.
    let decodes = tokens.saturating_sub(accepted).saturating_sub(1).max(1);
    let speculating = max_draft > 0;
    Ok(Sample {
        tokens_per_decode: speculating.then(|| tokens as f64 / decodes as f64),
        draft_acceptance_percent: speculating.then(|| 100.0 * accepted as f64 / drafted.max(1) as f64),
        ..Sample::timed(test, tokens, seconds)
    })
}

/// Runs `test` once. The working directory is `dir`: llama-lookup writes its n-gram cache file
/// there, never read back (each run starts with no cache, as ours does).
pub fn run_once(reference: &Reference, test: &str, settings: &RunSettings, dir: &Path, timeout: Duration) -> Result<Sample> {
    let setup = reference.setups.iter().find(|s| s.test == test).with_context(|| format!("no setup for {test}"))?;
    let threads = settings.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let log = dir.join(format!("run-{NAME}.log"));
    let mut child = Command::new(&reference.binary)
        .args(args(setup, settings, threads))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", reference.binary.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (status, text) = super::run::wait_reading(child, stderr, timeout)?;
    let _ = std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if !status.success() {
        bail!("exited with {status} (see {})", log.display());
    }
    parse(test, setup.max_draft, &text).with_context(|| format!("reading {}", log.display()))
}

/// `llama-lookup --version`, for the report's build info.
pub fn version(reference: &Reference) -> String {
    Command::new(&reference.binary)
        .arg("--version")
        .output()
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "0.01.162.636 I decoded   37 tokens in    0.256 seconds, speed:  144.594 t/s\n\
0.01.162.669 I n_draft      = 8\n0.01.162.681 I n_predict    = 37\n0.01.162.692 I n_drafted    = 32\n\
0.01.162.728 I n_accept     = 24\n0.01.162.740 I accept       = 75.000%\n";

    #[test]
    fn the_end_of_a_run_is_a_sample() {
        let s = parse("task-rewrite-spec", 8, LOG).unwrap();
        assert_eq!((s.tokens, s.seconds), (37, 0.256));
        assert!((s.tokens_per_s - 37.0 / 0.256).abs() < 1e-9);
        assert_eq!(s.draft_acceptance_percent, Some(75.0));
        // 37 tokens, 24 of them accepted drafts: 12 decodes.
        assert_eq!(s.tokens_per_decode, Some(37.0 / 12.0));
        let plain = parse("task-rewrite", 0, LOG).unwrap();
        assert_eq!((plain.tokens_per_decode, plain.draft_acceptance_percent), (None, None));
    }

    #[test]
    fn a_run_that_did_not_finish_is_an_error() {
        assert!(parse("task-free", 0, "loading model\n").is_err());
        assert!(parse("task-free", 0, "I decoded    0 tokens in    0.000 seconds, speed: nan t/s\nn_drafted = 0\nn_accept = 0\n").is_err());
        assert!(parse("task-free", 0, "I decoded 12 tokens in\n").is_err());
    }

    #[test]
    fn the_setup_becomes_the_arguments() {
        let setup = TaskSetup {
            test: "task-free-spec".into(),
            prompt: "<start_of_turn>user\nhi<end_of_turn>\n".into(),
            max_tokens: 128,
            max_draft: 8,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.15,
            repeat_last_n: 64,
            seed: 42,
        };
        let settings = RunSettings {
            model: "m.gguf".into(),
            tests: vec![],
            reps: 2,
            threads: Some(2),
            batch: 2048,
            ubatch: 512,
            flash_attn: "auto".into(),
            gpu_layers: -1,
            greedy_tokens: 0,
            timeout_s: 60,
        };
        let a = args(&setup, &settings, 2).join(" ");
        for part in [
            "-m m.gguf",
            "-n 128",
            "--spec-draft-n-max 8",
            "--temp 0.8",
            "--top-k 40",
            "--repeat-penalty 1.15",
            "--seed 42",
            "-t 2",
            "-tb 2",
            "-fa auto",
        ] {
            assert!(a.contains(part), "{part} in {a}");
        }
        assert!(runs("task-free") && !runs("e2e") && !runs("tg128"));
    }
}
