//! Compiles one bench binary per variant, each in a cargo target folder of its own
//! configuration, so a variant is rebuilt only when its configuration changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::variants::Variant;
use crate::workspace;

/// A built variant: its binary, or why it could not be built.
#[derive(Debug)]
pub struct Built {
    pub variant: Variant,
    pub binary: Result<PathBuf, String>,
    pub seconds: f64,
}

pub fn bench_root() -> PathBuf {
    workspace::target_dir().join("bench-compare")
}

/// Builds each variant; a failure is recorded and the others go on. Each variant gets a line
/// when it starts and one when it ends, also when stderr is no terminal (a log file, CI), so a
/// first build's silent minutes say what they are; a terminal also shows a ticking spinner.
pub fn build_all(variants: &[Variant]) -> Vec<Built> {
    variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            eprintln!(
                "[{}/{}] building {} ({} backend, profile {}); the first build of llama.cpp takes minutes",
                i + 1,
                variants.len(),
                v.name,
                v.backend,
                v.profile
            );
            let bar = ProgressBar::new_spinner().with_message(format!("building {}", v.name));
            bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
            bar.enable_steady_tick(Duration::from_millis(200));
            let start = Instant::now();
            let binary = build(v).map_err(|e| format!("{e:#}"));
            let seconds = start.elapsed().as_secs_f64();
            bar.finish_and_clear();
            match &binary {
                Ok(_) => eprintln!("[{}/{}] built {} in {seconds:.0} s", i + 1, variants.len(), v.name),
                Err(e) => eprintln!("[{}/{}] FAILED to build {} after {seconds:.0} s: {e}", i + 1, variants.len(), v.name),
            }
            Built { variant: v.clone(), binary, seconds }
        })
        .collect()
}

/// The line that says what to do when every variant failed to build: llama-sys names its fix in
/// an `error: llama-sys:` line; otherwise the first error of the first log.
pub fn fix_line(built: &[Built]) -> String {
    let errors: Vec<&str> = built.iter().filter_map(|b| b.binary.as_ref().err().map(String::as_str)).collect();
    let llama_sys = errors.iter().flat_map(|e| e.lines()).find(|l| l.contains("error: llama-sys:"));
    match llama_sys {
        Some(line) => line.trim().trim_start_matches("error: ").to_string(),
        None => format!(
            "{}; `cargo xtask setup --check` lists what is missing",
            errors.first().and_then(|e| e.lines().nth(1)).unwrap_or("see the build logs").trim()
        ),
    }
}

fn build(v: &Variant) -> Result<PathBuf> {
    if v.bundle {
        return build_bundle(v);
    }
    let root = bench_root();
    let target = root.join("targets").join(v.target_key());
    let log_path = root.join("logs").join(format!("build-{}.log", v.name));
    std::fs::create_dir_all(log_path.parent().expect("logs folder"))?;
    let log = std::fs::File::create(&log_path)?;
    let tree = match &v.git_rev {
        Some(rev) => source_tree(rev)?,
        None => workspace::root(),
    };
    let mut cmd = workspace::cargo();
    let features = binary_features(&tree, &v.backend)?;
    cmd.args(["build", "--locked", "--profile", &v.profile, "-p", "exsa-engine", "--bin", "exsa", "--no-default-features", "--features", &features])
        .arg("--manifest-path")
        .arg(tree.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        // The CMake builds of llama.cpp are shared with this workspace's, also by an older tree.
        .env("LLAMA_SYS_BUILD_CACHE", workspace::target_dir().join("llama-cmake"))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    // A clean slate: the caller's LLAMA_SYS_* tuning must not leak into a variant that does
    // not ask for it. The shared CMake build cache stays.
    workspace::clear_build_env(&mut cmd);
    for (k, val) in v.build_env() {
        cmd.env(k, val);
    }
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // The first error line says more than the last lines (often a backtrace).
        let first_error = text.lines().find(|l| l.contains("error:") && !l.contains("could not compile")).unwrap_or("").trim();
        let tail: Vec<&str> = text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("cargo build failed ({status}); log {}\n{first_error}\n{}", log_path.display(), tail.join("\n"));
    }
    let profile_dir = if v.profile == "dev" { "debug" } else { v.profile.as_str() };
    let built = target.join(profile_dir).join(format!("exsa{}", std::env::consts::EXE_SUFFIX));
    // Variants sharing a target folder overwrite its `exsa`: keep each variant's own copy.
    let dest = root.join("bin").join(&v.name).join(built.file_name().expect("binary name"));
    std::fs::create_dir_all(dest.parent().expect("bin folder"))?;
    std::fs::copy(&built, &dest).with_context(|| format!("cannot copy {}", built.display()))?;
    Ok(dest)
}

/// The release bundle (with the variant's llama-sys variables over its own), its program and
/// libraries copied into the variant's own folder (the program finds both beside itself, as in
/// the bundle's `lib/`).
fn build_bundle(v: &Variant) -> Result<PathBuf> {
    let overrides: Vec<(String, String)> = v.env.iter().map(|(k, val)| (k.clone(), val.clone())).collect();
    let (bundle, _) = crate::dist::make(None, &overrides)?;
    let dest = bench_root().join("bin").join(&v.name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    for dir in ["bin", "lib"] {
        for entry in std::fs::read_dir(bundle.dir.join(dir))? {
            let path = entry?.path();
            std::fs::copy(&path, dest.join(path.file_name().context("a bundle file without a name")?))?;
        }
    }
    Ok(dest.join("exsa"))
}

/// The workspace as it was at `rev` (a commit, tag or branch), unpacked with `git archive` under
/// target/bench-compare/sources/ (once per commit), with the pinned llama.cpp tree linked in: a
/// variant built from it measures a change against what came before.
pub fn source_tree(rev: &str) -> Result<PathBuf> {
    let root = workspace::root();
    let resolved = Command::new("git").current_dir(&root).args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")]).output()?;
    if !resolved.status.success() {
        bail!("git_rev {rev:?} is no commit of this repository");
    }
    let commit = String::from_utf8_lossy(&resolved.stdout).trim().to_string();
    let dir = bench_root().join("sources").join(&commit[..12]);
    if !dir.join("Cargo.toml").is_file() {
        let partial = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)?;
        let archive = Command::new("git").current_dir(&root).args(["archive", "--format=tar", &commit]).stdout(Stdio::piped()).spawn()?;
        let unpacked = Command::new("tar").arg("-x").arg("-C").arg(&partial).stdin(archive.stdout.context("git archive's output")?).status()?;
        if !unpacked.success() {
            bail!("could not unpack revision {commit} into {}", partial.display());
        }
        std::fs::rename(&partial, &dir)?;
    }
    let vendored = dir.join("vendor").join("llama.cpp");
    if !vendored.exists() {
        std::fs::create_dir_all(vendored.parent().expect("vendor folder"))?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("vendor").join("llama.cpp"), &vendored)?;
        #[cfg(not(unix))]
        bail!("git_rev variants need a symbolic link to the vendored llama.cpp: Unix only");
    }
    Ok(dir)
}

/// The features the `exsa` binary of `tree` is built with for `backend`: the backend, and the
/// binary's own (`cli`) where that tree's engine has them (older trees built it by default).
fn binary_features(tree: &Path, backend: &str) -> Result<String> {
    let manifest = std::fs::read_to_string(tree.join("crates/engine/Cargo.toml"))?;
    Ok(if manifest.lines().any(|l| l.trim_start().starts_with("cli = [")) { format!("{backend},cli") } else { backend.to_string() })
}

/// Whether a run should go on without building: every variant's binary is already there.
pub fn cached(variants: &[Variant]) -> Option<Vec<Built>> {
    variants
        .iter()
        .map(|v| {
            let bin = bench_root().join("bin").join(&v.name).join(format!("exsa{}", std::env::consts::EXE_SUFFIX));
            bin.is_file().then(|| Built { variant: v.clone(), binary: Ok(bin), seconds: 0.0 })
        })
        .collect()
}

/// A command for one run of a variant's binary.
pub fn command(binary: &PathBuf) -> Command {
    let mut cmd = Command::new(binary);
    cmd.stdin(Stdio::null());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(name: &str, error: &str) -> Built {
        Built { variant: Variant::builtin(name, "source", ""), binary: Err(error.to_string()), seconds: 1.0 }
    }

    #[test]
    fn the_fix_line_is_llama_sys_own_when_it_gave_one() {
        let built = [
            failed(
                "A",
                "cargo build failed (exit status: 101); log /t/build-A.log\nerror: failed to run custom build command for `llama-cpp-sys-2`\n...",
            ),
            failed(
                "B",
                "cargo build failed (exit status: 101); log /t/build-B.log\nerror: failed to run custom build command for `llama-sys`\n  error: llama-sys: libclang not found (bindgen needs it): run `cargo xtask setup`",
            ),
        ];
        assert_eq!(fix_line(&built), "llama-sys: libclang not found (bindgen needs it): run `cargo xtask setup`");
    }

    #[test]
    fn without_one_the_first_error_and_the_check_command_are_named() {
        let built = [failed("A", "cargo build failed (exit status: 101); log /t/build-A.log\nerror: linker `cc` not found\n...")];
        let line = fix_line(&built);
        assert!(line.starts_with("error: linker `cc` not found"), "{line}");
        assert!(line.ends_with("`cargo xtask setup --check` lists what is missing"), "{line}");
    }
}
