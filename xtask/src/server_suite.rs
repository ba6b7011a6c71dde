//! `cargo xtask server-suite`: llama.cpp's own server test suite (`tools/server/tests/` of the
//! `llama-cpp-python` sdist) run unmodified against `exsa serve`, and with `--reference` against
//! llama-server itself through the same runner, on the same local model.
//!
//! The suite starts the program `$LLAMA_SERVER_BIN_PATH` per test with llama-server's options;
//! that is `xtask/server_suite/llama-server`, a launcher that starts the server under test with the
//! equivalent settings, or refuses an option without an equivalent (the test is then reported as
//! skipped for that reason, by `xtask/server_suite/plugin.py`, never as passed). The suite's models
//! come from Hugging Face, out of reach here: every preset runs on the local model (the default
//! one unless `--model`). Tests that assert what one particular model writes are meaningless then;
//! `xtask/server_suite/expected.toml` lists every test expected to fail with its reason, and the
//! run fails on a failure not listed there, or on a listed test that passes (a stale entry).
//!
//! By default the suite's OpenAI-surface files run (CI); `--all` runs every file (`cargo xtask
//! test --full`, with `--reference`). The expectations hold for the OpenAI-surface files; the
//! other files' outcomes are reported, not judged (what they test is other issues' work). The per-file table goes to stdout and, with the raw outcomes, under
//! `target/server-suite/<time>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{fetch_model, llama_tools, python, server_process, workspace};

/// The files of the suite that test the OpenAI-compatible surface: what CI runs.
pub const OPENAI_SURFACE: &[&str] =
    &["test_basic.py", "test_chat_completion.py", "test_completion.py", "test_compat_oai_responses.py", "test_tokenize.py"];

/// The tests expected to fail against exsa serve, each with its reason (relative to the workspace).
const EXPECTED: &str = "xtask/server_suite/expected.toml";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Every file of the suite, not only the OpenAI-surface ones.
    #[arg(long)]
    all: bool,
    /// Only these files of the suite's `unit/` folder (e.g. test_tokenize.py).
    #[arg(long, value_delimiter = ',')]
    files: Vec<String>,
    /// Only tests whose name matches this pytest `-k` expression.
    #[arg(short = 'k', long)]
    filter: Option<String>,
    /// Also run llama.cpp's llama-server through the same launcher and model (builds it: minutes).
    #[arg(long)]
    reference: bool,
    /// Include the tests the suite marks slow.
    #[arg(long)]
    slow: bool,
    /// The model every preset runs on (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Test an `exsa` built in release (default: the debug build the tests use; llama.cpp is
    /// optimized in both).
    #[arg(long)]
    release: bool,
}

impl Args {
    /// The whole suite against both servers, as `cargo xtask test --full` runs it.
    pub fn full() -> Args {
        Args { all: true, reference: true, ..Args::default() }
    }
}

/// Which server a run tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Exsa,
    LlamaServer,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Exsa => "exsa",
            Target::LlamaServer => "llama-server",
        }
    }
}

/// A test's outcome, as the plugin records it.
#[derive(Clone, Debug, Deserialize)]
struct Outcome {
    test: String,
    outcome: String,
    #[serde(default)]
    unsupported: bool,
    #[serde(default)]
    message: String,
}

impl Outcome {
    fn file(&self) -> &str {
        self.test.split("::").next().unwrap_or(&self.test)
    }
}

/// An entry of expected.toml.
#[derive(Debug, Deserialize)]
struct Expected {
    /// The test's pytest id (`unit/test_x.py::test_y[params]`), or a prefix ending in `*`.
    id: String,
    /// Why it fails against exsa serve.
    why: String,
}

#[derive(Debug, Deserialize)]
struct ExpectedFile {
    #[serde(default)]
    test: Vec<Expected>,
}

impl Expected {
    fn matches(&self, test: &str) -> bool {
        match self.id.strip_suffix('*') {
            Some(prefix) => test.starts_with(prefix),
            None => self.id == test,
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };
    let tests = llama_tools::sdist_source()?.join("tools").join("server").join("tests");
    let site = python::site_for_requirements("server-suite", &tests.join("requirements.txt"), "pytest")?;
    let files = files(args, &tests)?;
    let out = workspace::target_dir().join("server-suite").join(crate::bench::timestamp());
    std::fs::create_dir_all(&out)?;
    // A copy: a build of other features (another backend's tests) rewrites target/*/exsa, and
    // the suite starts a server per test for minutes.
    let exsa = out.join("exsa");
    std::fs::copy(build_exsa(args.release)?, &exsa).context("copying exsa for the run")?;
    let mut runs = BTreeMap::new();
    runs.insert(Target::Exsa, run_suite(Target::Exsa, &exsa, &model, &tests, &site, &files, args, &out)?);
    // The copy is large (a debug build): only the outcomes and logs stay.
    let _ = std::fs::remove_file(&exsa);
    if args.reference {
        let llama_server = llama_tools::ensure("llama-server")?;
        runs.insert(Target::LlamaServer, run_suite(Target::LlamaServer, &llama_server, &model, &tests, &site, &files, args, &out)?);
    }
    let expected: ExpectedFile =
        toml::from_str(&std::fs::read_to_string(workspace::root().join(EXPECTED))?).with_context(|| format!("reading {EXPECTED}"))?;
    let verdict = verdict(&runs[&Target::Exsa], &expected.test);
    let report = report(&runs, &expected.test, &verdict, &model, &files);
    std::fs::write(out.join("report.md"), &report)?;
    println!("{report}");
    println!("outcomes and logs in {}", out.display());
    if !verdict.unexpected.is_empty() || !verdict.stale.is_empty() {
        bail!(
            "{} test(s) failed that {EXPECTED} does not list, {} listed test(s) passed (see the report above)",
            verdict.unexpected.len(),
            verdict.stale.len()
        );
    }
    Ok(())
}

/// The suite's test files this run takes.
fn files(args: &Args, tests: &Path) -> Result<Vec<String>> {
    let names: Vec<String> = if !args.files.is_empty() {
        args.files.clone()
    } else if args.all {
        let mut all: Vec<String> = std::fs::read_dir(tests.join("unit"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("test_") && n.ends_with(".py"))
            .collect();
        all.sort();
        all
    } else {
        OPENAI_SURFACE.iter().map(|s| s.to_string()).collect()
    };
    for name in &names {
        if !tests.join("unit").join(name).is_file() {
            bail!("the suite has no unit/{name}");
        }
    }
    Ok(names)
}

fn build_exsa(release: bool) -> Result<PathBuf> {
    let mut build = workspace::cargo();
    build.args(["build", "--locked", "-p", "exsa-engine", "--bin", "exsa"]);
    if release {
        build.arg("--release");
    }
    workspace::run(&mut build)?;
    Ok(workspace::target_dir().join(if release { "release" } else { "debug" }).join("exsa"))
}

/// Runs the suite's `files` against `target`; every test's outcome.
#[allow(clippy::too_many_arguments)]
fn run_suite(
    target: Target,
    binary: &Path,
    model: &Path,
    tests: &Path,
    site: &Path,
    files: &[String],
    args: &Args,
    out: &Path,
) -> Result<Vec<Outcome>> {
    let launcher_dir = workspace::root().join("xtask").join("server_suite");
    let results = out.join(format!("{}.jsonl", target.name()));
    let unsupported = out.join(format!("{}-unsupported.jsonl", target.name()));
    let log = std::fs::File::create(out.join(format!("{}.log", target.name())))?;
    let python_path = std::env::join_paths([site, launcher_dir.as_path(), tests])?;
    eprintln!("running llama.cpp's server suite ({} files) against {}", files.len(), target.name());
    let mut pytest = python::python();
    pytest
        .current_dir(tests)
        .args(["-m", "pytest", "-p", "plugin", "-p", "no:cacheprovider", "-q", "-rN"])
        .args(if args.slow { vec![] } else { vec!["-m".to_string(), "not slow".to_string()] })
        .args(args.filter.iter().flat_map(|k| ["-k".to_string(), k.clone()]))
        .args(files.iter().map(|f| format!("unit/{f}")))
        .env("PYTHONPATH", python_path)
        .env("LLAMA_SERVER_BIN_PATH", launcher_dir.join("llama-server"))
        .env("PORT", server_process::free_port()?.to_string())
        .env("EXSA_SUITE_TARGET", target.name())
        .env("EXSA_SUITE_BIN", binary)
        .env("EXSA_SUITE_MODEL", model)
        .env("EXSA_SUITE_RESULTS", &results)
        .env("EXSA_SUITE_UNSUPPORTED", &unsupported)
        .stdout(log.try_clone()?)
        .stderr(log);
    // pytest's own status only says whether some test failed; the outcomes say which.
    let status = pytest.status().context("starting pytest")?;
    if !results.is_file() {
        bail!("the suite ran no test against {} (pytest: {status}; see {})", target.name(), out.display());
    }
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    for line in std::fs::read_to_string(&results)?.lines() {
        let outcome: Outcome = serde_json::from_str(line)?;
        // A test's worst report counts (a call that passed, then a teardown that failed).
        let worse = |o: &Outcome| match o.outcome.as_str() {
            "failed" => 2,
            "skipped" => 1,
            _ => 0,
        };
        match outcomes.get(&outcome.test) {
            Some(seen) if worse(seen) >= worse(&outcome) => {}
            _ => {
                outcomes.insert(outcome.test.clone(), outcome);
            }
        }
    }
    Ok(outcomes.into_values().collect())
}

/// How exsa's outcomes stand against expected.toml.
struct Verdict {
    /// Failed, and not listed.
    unexpected: Vec<String>,
    /// Entries whose tests ran and passed.
    stale: Vec<String>,
}

fn verdict(outcomes: &[Outcome], expected: &[Expected]) -> Verdict {
    let held: Vec<&Outcome> = outcomes.iter().filter(|o| OPENAI_SURFACE.iter().any(|f| o.file() == format!("unit/{f}"))).collect();
    let listed = |test: &str| expected.iter().any(|e| e.matches(test));
    // An entry is stale when tests it covers ran and none failed.
    let stale = expected
        .iter()
        .filter(|e| {
            let covered: Vec<&&Outcome> = held.iter().filter(|o| e.matches(&o.test) && o.outcome != "skipped").collect();
            !covered.is_empty() && covered.iter().all(|o| o.outcome == "passed")
        })
        .map(|e| e.id.clone())
        .collect();
    Verdict { unexpected: held.iter().filter(|o| o.outcome == "failed" && !listed(&o.test)).map(|o| o.test.clone()).collect(), stale }
}

/// Passed, failed, skipped as unsupported, skipped otherwise.
fn counts<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> [usize; 4] {
    let mut c = [0; 4];
    for o in outcomes {
        let i = match (o.outcome.as_str(), o.unsupported) {
            ("passed", _) => 0,
            ("failed", _) => 1,
            (_, true) => 2,
            _ => 3,
        };
        c[i] += 1;
    }
    c
}

fn report(runs: &BTreeMap<Target, Vec<Outcome>>, expected: &[Expected], verdict: &Verdict, model: &Path, files: &[String]) -> String {
    let machine = crate::bench::machine::describe();
    let mut md = format!(
        "# llama.cpp's server test suite against exsa serve\n\nCommand: `cargo xtask server-suite{}{}`\nModel (every preset): {}\nMachine: {}, {} cores\n\n",
        if files.len() > OPENAI_SURFACE.len() { " --all" } else { "" },
        if runs.contains_key(&Target::LlamaServer) { " --reference" } else { "" },
        model.display(),
        machine.cpu,
        machine.cores,
    );
    md += "| file |";
    for target in runs.keys() {
        md += &format!(" {0} passed | {0} failed | {0} skipped (unsupported) | {0} skipped (other) |", target.name());
    }
    md += "\n|---|";
    md += &"---|---|---|---|".repeat(runs.len());
    md += "\n";
    let mut totals = vec![[0usize; 4]; runs.len()];
    for file in files {
        md += &format!("| {file} |");
        for (i, outcomes) in runs.values().enumerate() {
            let c = counts(outcomes.iter().filter(|o| o.file() == format!("unit/{file}")));
            for k in 0..4 {
                totals[i][k] += c[k];
            }
            md += &format!(" {} | {} | {} | {} |", c[0], c[1], c[2], c[3]);
        }
        md += "\n";
    }
    md += "| **total** |";
    for t in &totals {
        md += &format!(" **{}** | **{}** | **{}** | **{}** |", t[0], t[1], t[2], t[3]);
    }
    md += "\n";
    let exsa = &runs[&Target::Exsa];
    let reference: BTreeMap<&str, &Outcome> =
        runs.get(&Target::LlamaServer).map(|r| r.iter().map(|o| (o.test.as_str(), o)).collect()).unwrap_or_default();
    let failed: Vec<&Outcome> = exsa.iter().filter(|o| o.outcome == "failed").collect();
    if !failed.is_empty() {
        md += "\n## Failed against exsa serve\n\n| test | listed reason | llama-server | message |\n|---|---|---|---|\n";
        for o in failed {
            let held = OPENAI_SURFACE.iter().any(|f| o.file() == format!("unit/{f}"));
            let why = expected.iter().find(|e| e.matches(&o.test)).map_or(if held { "**not listed**" } else { "(not judged)" }, |e| e.why.as_str());
            let reference = reference.get(o.test.as_str()).map_or("-", |r| r.outcome.as_str());
            md += &format!("| `{}` | {} | {} | {} |\n", o.test, why, reference, o.message.replace('|', "\\|").replace('\n', " "));
        }
    }
    let unsupported: Vec<&Outcome> = exsa.iter().filter(|o| o.unsupported).collect();
    if !unsupported.is_empty() {
        md += "\n## Skipped: an option exsa serve has no equivalent for\n\n";
        for o in unsupported {
            md += &format!("- `{}`: {}\n", o.test, o.message.trim_start_matches("unsupported by exsa serve: "));
        }
    }
    if !verdict.stale.is_empty() {
        md += "\n## Listed as failing, but passed (remove from expected.toml)\n\n";
        for t in &verdict.stale {
            md += &format!("- `{t}`\n");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(test: &str, outcome: &str) -> Outcome {
        Outcome { test: test.into(), outcome: outcome.into(), unsupported: false, message: String::new() }
    }

    fn expected(id: &str) -> Expected {
        Expected { id: id.into(), why: "because".into() }
    }

    #[test]
    fn failures_must_be_listed_and_listed_tests_must_still_fail() {
        let outcomes = [
            outcome("unit/test_basic.py::a", "failed"),
            outcome("unit/test_basic.py::b[1]", "failed"),
            outcome("unit/test_basic.py::b[2]", "passed"),
            outcome("unit/test_basic.py::c", "passed"),
            outcome("unit/test_basic.py::d", "failed"),
            // Other files are reported, not judged.
            outcome("unit/test_embedding.py::e", "failed"),
        ];
        let list = [expected("unit/test_basic.py::a"), expected("unit/test_basic.py::b[*"), expected("unit/test_basic.py::c")];
        let v = verdict(&outcomes, &list);
        assert_eq!(v.unexpected, ["unit/test_basic.py::d"]);
        assert_eq!(v.stale, ["unit/test_basic.py::c"], "a prefix entry with one failure left is not stale");
        let all_pass = [outcome("unit/test_basic.py::b[1]", "passed"), outcome("unit/test_basic.py::b[2]", "passed")];
        assert_eq!(verdict(&all_pass, &list).stale, ["unit/test_basic.py::b[*"]);
    }

    #[test]
    fn the_expected_list_parses_and_every_entry_has_a_reason() {
        let text = std::fs::read_to_string(workspace::root().join(EXPECTED)).unwrap();
        let file: ExpectedFile = toml::from_str(&text).unwrap();
        assert!(!file.test.is_empty());
        for e in &file.test {
            assert!(e.id.starts_with("unit/test_") && e.why.len() > 10, "{e:?}");
            assert!(OPENAI_SURFACE.iter().any(|f| e.id.starts_with(&format!("unit/{f}"))), "{} is not of a judged file", e.id);
        }
    }

    /// The launcher translates llama-server's options for exsa serve, and refuses the ones
    /// without an equivalent with exit 77 and the reason (what the plugin reports as a skip).
    #[test]
    fn the_launcher_translates_options_and_refuses_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("exsa-launcher-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let unsupported = dir.join("unsupported.jsonl");
        let run = |args: &[&str]| {
            std::process::Command::new(workspace::root().join("xtask/server_suite/llama-server"))
                .args(args)
                .env("EXSA_SUITE_TARGET", "exsa")
                .env("EXSA_SUITE_BIN", "/bin/echo")
                .env("EXSA_SUITE_MODEL", "/models/m.gguf")
                .env("EXSA_SUITE_UNSUPPORTED", &unsupported)
                .output()
                .unwrap()
        };
        let out =
            run(&["--port", "8080", "--hf-repo", "ggml-org/x", "--ctx-size", "512", "--parallel", "2", "--alias", "tiny", "--jinja", "--no-slots"]);
        assert!(out.status.success(), "{out:?}");
        let line = String::from_utf8(out.stdout).unwrap();
        assert_eq!(line.trim(), "--model /models/m.gguf --log error --ctx 512 serve --port 8080 --parallel 2 --model-id tiny");
        // Without --parallel, llama-server's own default (4), not exsa's (from the context).
        let out = run(&["--port", "8080", "--hf-repo", "ggml-org/x", "--ctx-size", "512"]);
        let line = String::from_utf8(out.stdout).unwrap();
        assert!(line.trim().ends_with("serve --port 8080 --parallel 4"), "{line}");
        // llama-server's "auto" slot count, and its KV cache types.
        let out = run(&["--port", "8080", "--hf-repo", "ggml-org/x", "-np", "-1", "-ctk", "q8_0", "-ctv", "q8_0"]);
        let line = String::from_utf8(out.stdout).unwrap();
        assert!(line.contains("--cache-type-k q8_0 --cache-type-v q8_0 serve --port 8080 --parallel 4"), "{line}");
        // LoRA adapters, comma-separated as llama-server takes them, one --lora each for exsa.
        let out = run(&["--port", "8080", "--hf-repo", "ggml-org/x", "--lora", "a.gguf,b.gguf", "--lora-init-without-apply"]);
        let line = String::from_utf8(out.stdout).unwrap();
        assert!(line.contains("--lora a.gguf --lora b.gguf --lora-init-without-apply serve --port 8080"), "{line}");
        let out = run(&["--port", "8080", "--no-such-option"]);
        assert_eq!(out.status.code(), Some(77), "an unknown option is refused, not passed on");
        let reason = std::fs::read_to_string(&unsupported).unwrap();
        assert!(reason.contains("--no-such-option"), "{reason}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
