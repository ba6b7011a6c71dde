//! `cargo xtask package`: `.crate` files of exsa-utf8, llama-src, llama-sys, llama,
//! exsa-bench-protocol and exsa-engine that build anywhere (`cargo install exsa-engine` from them
//! gives the `exsa` program).
//!
//! llama-src's package must carry the pinned llama.cpp tree (as openssl-src carries OpenSSL), but
//! the tree is never committed here: it is staged into `crates/llama-src/llama.cpp/` (git-ignored)
//! from the verified `vendor/llama.cpp` for the time of `cargo package`, then removed, so that
//! workspace builds keep using `vendor/llama.cpp` and their cached CMake folders.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{vendor, workspace};

/// The packaged crates, dependencies first.
pub const CRATES: &[&str] = &["exsa-utf8", "exsa-llama-src", "exsa-llama-sys", "exsa-llama", "exsa-bench-protocol", "exsa-engine"];

#[derive(clap::Args, Default)]
pub struct Args {}

/// Writes the `.crate` files into `target/package/` and returns their paths.
pub fn run(_: &Args) -> Result<Vec<PathBuf>> {
    vendor::run(&vendor::Args::default())?;
    let stage = workspace::root().join("crates/llama-src/llama.cpp");
    let _cleanup = RemoveOnDrop(stage.clone());
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    vendor::copy_tree(&workspace::root().join("vendor/llama.cpp"), &stage)?;
    let output = workspace::cargo()
        .args(["package", "--locked", "--no-verify", "--allow-dirty", "--exclude-lockfile"])
        .args(CRATES.iter().flat_map(|c| ["-p", c]))
        .output()
        .context("cannot run cargo package")?;
    if !output.status.success() {
        bail!("cargo package failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let dir = workspace::target_dir().join("package");
    let files = CRATES.iter().map(|name| crate_file(&dir, name)).collect::<Result<Vec<_>>>()?;
    for f in &files {
        eprintln!("packaged {} ({:.1} MB)", f.display(), std::fs::metadata(f)?.len() as f64 / 1e6);
    }
    Ok(files)
}

/// `target/package/<name>-<version>.crate`, whatever the version.
fn crate_file(dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let file = p.file_name().unwrap_or_default().to_string_lossy();
            file.ends_with(".crate")
                && file.strip_prefix(name).and_then(|r| r.strip_prefix('-')).is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .with_context(|| format!("cargo package wrote no {name} crate into {}", dir.display()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
