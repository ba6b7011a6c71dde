//! `cargo xtask examples`: runs every example of the workspace on the project's models, each as
//! `cargo run --locked -p PACKAGE --example NAME [--features ...] -- ARGS` in the dev profile
//! (reusing the test builds), and fails naming the first one that fails. The engine's examples
//! check their own results and exit non-zero when they are wrong, so this is a test of each;
//! the `llama` crate's and llama-sys' examples must at least run to the end.
//!
//! [`EXAMPLES`] lists them; a test fails when a file in `crates/*/examples/` is missing from it,
//! so no example escapes CI. `cargo xtask test` runs them all.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{fetch_model, synth_models, test, workspace};

/// An example and how to run it.
pub struct Example {
    /// The cargo package (`-p`).
    pub package: &'static str,
    /// The example's name (`--example`): its file in the package's `examples/`.
    pub name: &'static str,
    /// Features beyond the package's defaults (`--features`).
    pub features: &'static [&'static str],
    /// The example's arguments, after `--`.
    pub args: &'static [Arg],
    /// Text for its standard input (an interactive example reads it, then sees its end); without
    /// it, standard input is empty.
    pub stdin: Option<&'static str>,
}

/// An argument of an example: text, or a path known when the run starts.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Text(&'static str),
    /// The default model (`cargo xtask fetch-model`).
    Model,
    /// A model of `cargo xtask synth-models`, by file name.
    Synth(&'static str),
    /// A file under `target/xtask-examples/` (made, not read: an example's output).
    Output(&'static str),
}

use Arg::{Model, Output, Synth, Text};

/// Every example of the workspace. Add a new one here (the test below insists).
pub const EXAMPLES: &[Example] = &[
    // The safe `llama` crate.
    Example {
        package: "exsa-llama",
        name: "generate",
        features: &[],
        args: &[Text("--model"), Model, Text("Once upon a time"), Text("32")],
        stdin: None,
    },
    Example {
        package: "exsa-llama",
        name: "chat",
        features: &[],
        args: &[Text("--model"), Model],
        stdin: Some("Say hello in one short sentence.\n"),
    },
    Example {
        package: "exsa-llama",
        name: "quantize",
        features: &[],
        args: &[Model, Output("gemma-3-270m-q4_0.gguf"), Text("q4_0"), Text("--allow-requantize")],
        stdin: None,
    },
    // llama-sys' raw FFI: one round (it measures; here it only has to run).
    Example { package: "exsa-llama-sys", name: "backend_sampling", features: &[], args: &[Model, Text("1")], stdin: None },
    // The engine as a library (its default features: backend source, jinja, the server's tokio
    // and axum, the harness).
    Example { package: "exsa-engine", name: "tools", features: &[], args: &[Text("--model"), Model], stdin: None },
    Example {
        package: "exsa-engine",
        name: "embeddings",
        features: &[],
        args: &[Text("--model"), Model, Text("--reranker"), Synth("bert-tiny-rerank.gguf")],
        stdin: None,
    },
    Example { package: "exsa-engine", name: "json_schema", features: &[], args: &[Text("--model"), Model], stdin: None },
    Example { package: "exsa-engine", name: "speculative", features: &[], args: &[Text("--model"), Model], stdin: None },
    Example { package: "exsa-engine", name: "rpc", features: &[], args: &[Text("--model"), Model], stdin: None },
    Example { package: "exsa-engine", name: "async_stream", features: &[], args: &[Text("--model"), Model], stdin: None },
    Example { package: "exsa-engine", name: "axum_server", features: &[], args: &[Text("--model"), Model], stdin: None },
];

#[derive(clap::Args, Default)]
pub struct Args {
    /// Run only these examples, each NAME or PACKAGE/NAME (default: all).
    names: Vec<String>,
}

impl Example {
    /// Whether `wanted` names this example: its name, or package/name.
    fn is(&self, wanted: &str) -> bool {
        wanted == self.name || wanted.split_once('/') == Some((self.package, self.name))
    }
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(unknown) = args.names.iter().find(|n| !EXAMPLES.iter().any(|e| e.is(n))) {
        let known: Vec<String> = EXAMPLES.iter().map(|e| format!("{}/{}", e.package, e.name)).collect();
        bail!("no example is named {unknown:?} (examples: {})", known.join(", "));
    }
    let chosen: Vec<&Example> = EXAMPLES.iter().filter(|e| args.names.is_empty() || args.names.iter().any(|n| e.is(n))).collect();
    let paths = Paths {
        model: fetch_model::run(&fetch_model::Args::default())?,
        synth: synth_models::dir(),
        output: workspace::target_dir().join("xtask-examples"),
    };
    if chosen.iter().any(|e| e.args.iter().any(|a| matches!(a, Synth(_)))) {
        synth_models::run(&synth_models::Args::default())?;
    }
    std::fs::create_dir_all(&paths.output).with_context(|| format!("cannot create {}", paths.output.display()))?;
    let start = Instant::now();
    for example in &chosen {
        let took = Instant::now();
        eprintln!("examples: {} of {}", example.name, example.package);
        run_one(example, &paths).with_context(|| format!("example `{}` of {} failed", example.name, example.package))?;
        eprintln!("examples: {} ok ({:.1} s)", example.name, took.elapsed().as_secs_f64());
    }
    // What the examples wrote (a quantized model: a few hundred MB) is not kept.
    std::fs::remove_dir_all(&paths.output).with_context(|| format!("cannot remove {}", paths.output.display()))?;
    eprintln!("examples: {} ran and passed in {:.0} s", chosen.len(), start.elapsed().as_secs_f64());
    Ok(())
}

/// Where the [`Arg`] paths point.
struct Paths {
    model: PathBuf,
    synth: PathBuf,
    output: PathBuf,
}

impl Arg {
    fn resolve(self, paths: &Paths) -> std::ffi::OsString {
        match self {
            Text(text) => text.into(),
            Model => paths.model.clone().into(),
            Synth(file) => paths.synth.join(file).into(),
            Output(file) => paths.output.join(file).into(),
        }
    }
}

/// How long one example may run once built; past it, it is killed and fails.
const TIME_LIMIT: Duration = Duration::from_secs(600);

fn run_one(example: &Example, paths: &Paths) -> Result<()> {
    // Built first (no time limit: a cold build of an example is minutes), then run by path, so
    // that the limit applies to the example alone and killing it leaves nothing behind.
    let mut build = workspace::cargo();
    build.args(["build", "--locked", "-p", example.package, "--example", example.name]);
    if !example.features.is_empty() {
        build.args(["--features", &example.features.join(",")]);
    }
    // The test run's builds (no tuned llama.cpp profile), so nothing is built twice.
    workspace::run(build.envs(test::ISOLATED_ENV))?;
    let binary = workspace::target_dir().join("debug/examples").join(format!("{}{}", example.name, std::env::consts::EXE_SUFFIX));
    let mut cmd = Command::new(&binary);
    cmd.args(example.args.iter().map(|a| a.resolve(paths))).envs(test::ISOLATED_ENV);
    // (.cargo/config.toml's [env], which `cargo run` would set, reaches it from xtask's own
    // environment: xtask runs under `cargo run` too.)
    let shown = format!("{cmd:?}");
    let mut child =
        cmd.stdin(if example.stdin.is_some() { Stdio::piped() } else { Stdio::null() }).spawn().with_context(|| format!("cannot start {shown}"))?;
    if let Some(input) = example.stdin {
        // Written whole, then closed: the example reads it and then sees the end of its input.
        child.stdin.take().context("stdin is piped")?.write_all(input.as_bytes()).with_context(|| format!("cannot write to {shown}"))?;
    }
    let deadline = Instant::now() + TIME_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            bail!("{shown} ran past {} s and was stopped", TIME_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // An interactive example's last prompt has no line end.
    if example.stdin.is_some() {
        eprintln!();
    }
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The workspace's packages under `crates/`: (package name, folder).
#[cfg(test)]
fn packages() -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(workspace::root().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(dir.join("Cargo.toml")) else { continue };
        let manifest: toml::Value = toml::from_str(&text).unwrap();
        found.push((manifest["package"]["name"].as_str().expect("a package name").to_string(), dir));
    }
    found
}

/// The examples in `crates/*/examples/` as (package, example name): each `.rs` file, and each
/// folder with a `main.rs`.
#[cfg(test)]
fn examples_on_disk() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (package, dir) in packages() {
        let Ok(files) = std::fs::read_dir(dir.join("examples")) else { continue };
        for file in files {
            let path = file.unwrap().path();
            let name = match path.extension() {
                Some(ext) if ext == "rs" => path.file_stem(),
                None if path.join("main.rs").is_file() => path.file_name(),
                _ => None,
            };
            if let Some(name) = name {
                found.push((package.clone(), name.to_string_lossy().into_owned()));
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_of_the_workspace_is_run() {
        let on_disk = examples_on_disk();
        assert!(on_disk.iter().any(|(p, n)| p == "exsa-llama" && n == "generate"), "found no examples: {on_disk:?}");
        for (package, name) in &on_disk {
            assert!(
                EXAMPLES.iter().any(|e| e.package == package && e.name == name),
                "the example `{name}` of {package} is not in xtask/src/examples.rs' EXAMPLES, so CI does not run it: add it there"
            );
        }
        for e in EXAMPLES {
            assert!(on_disk.iter().any(|(p, n)| p == e.package && n == e.name), "EXAMPLES names `{}` of {}, which has no file", e.name, e.package);
        }
    }

    #[test]
    fn each_example_is_listed_once_with_features_its_package_has() {
        let packages = packages();
        for (i, e) in EXAMPLES.iter().enumerate() {
            assert!(!EXAMPLES[..i].iter().any(|o| o.package == e.package && o.name == e.name), "{}/{} is listed twice", e.package, e.name);
            let (_, dir) = packages.iter().find(|(p, _)| p == e.package).unwrap_or_else(|| panic!("{}: no package {}", e.name, e.package));
            let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
            for feature in e.features {
                assert!(manifest["features"].get(feature).is_some(), "{}: {} has no feature {feature}", e.name, e.package);
            }
        }
    }
}
