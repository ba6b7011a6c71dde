//! Paths of the workspace, and running cargo the way the user's cargo runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the root").to_path_buf()
}

/// Git-ignored folder for downloads that are not build outputs (pip packages, models).
pub fn cache_dir() -> PathBuf {
    root().join(".cache")
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// The cargo that runs us, so toolchain overrides carry through.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Leaves out of `cmd`'s environment the caller's llama.cpp build settings (`LLAMA_SYS_*` but
/// the shared CMake build cache, `LLAMA_CPP_DIR`) and cargo's encoded RUSTFLAGS, so that a build
/// made for a purpose (a bench variant, the release bundle) gets only what it sets.
pub fn clear_build_env(cmd: &mut Command) {
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    for (key, _) in std::env::vars() {
        if (key.starts_with("LLAMA_SYS_") && key != "LLAMA_SYS_BUILD_CACHE") || key == "LLAMA_CPP_DIR" {
            cmd.env_remove(key);
        }
    }
}

/// Runs a command, inheriting stdio, and fails with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
