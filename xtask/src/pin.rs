//! `vendor/llama.cpp.toml`: which llama.cpp tree Option B builds, and its content hash.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::workspace;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Pin {
    /// The crates.io package that ships the tree.
    pub package: String,
    pub version: String,
    /// The folder inside the package.
    pub folder: String,
    /// The upstream llama.cpp commit, or "unknown" when the package does not record it.
    pub upstream_commit: String,
    /// llama.cpp's build number (its git commit count), or 0 when unknown.
    pub build_number: u32,
    /// [`crate::hashing::tree_sha256`] of the folder.
    pub tree_sha256: String,
    pub files: usize,
}

const HEADER: &str = "\
# The llama.cpp source that Option B compiles: the tree inside this crates.io package, the same
# one the llama-cpp-2 baseline compiles. `cargo xtask vendor` copies it to vendor/llama.cpp and
# checks tree_sha256; `cargo xtask vendor --update-pin` rewrites this file after a bump.
# The package carries no git metadata, so the upstream commit and build number are unknown.
";

pub fn path() -> PathBuf {
    workspace::root().join("vendor/llama.cpp.toml")
}

pub fn read() -> Result<Pin> {
    let path = path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the pin file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid pin file", path.display()))
}

pub fn write(pin: &Pin) -> Result<()> {
    let text = format!("{HEADER}{}", toml::to_string(pin)?);
    std::fs::write(path(), text).with_context(|| format!("cannot write {}", path().display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baseline crate and our vendored tree must be the same llama.cpp: the pin and the
    /// workspace's exact dependency on llama-cpp-sys-2 may not drift apart.
    #[test]
    fn pin_matches_the_workspace_dependency_on_the_baseline() {
        let pin = read().unwrap();
        assert_eq!(pin.package, "llama-cpp-sys-2");
        let manifest = std::fs::read_to_string(workspace::root().join("Cargo.toml")).unwrap();
        let wanted = format!("llama-cpp-sys-2 = {{ version = \"={}\"", pin.version);
        assert!(manifest.contains(&wanted), "Cargo.toml does not pin `{wanted}`");
        assert_eq!(pin.tree_sha256.len(), 64);
    }
}
