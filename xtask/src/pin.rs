//! `crates/llama-src/llama.cpp.toml`: which llama.cpp tree Option B builds, and its content hash.
//! The llama-src crate owns the format; xtask reads the file from disk (not the copy compiled
//! into llama-src) so that `vendor --update-pin` sees its own edits.

use std::path::PathBuf;

use anyhow::{Context, Result};
pub use llama_src::Pin;

use crate::workspace;

pub fn path() -> PathBuf {
    workspace::root().join("crates/llama-src/llama.cpp.toml")
}

pub fn read() -> Result<Pin> {
    let path = path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the pin file {}", path.display()))?;
    let pin = Pin::parse(&text);
    anyhow::ensure!(pin.tree_sha256.len() == 64 && !pin.package.is_empty(), "{} is not a valid pin file", path.display());
    Ok(pin)
}

pub fn write(pin: &Pin) -> Result<()> {
    std::fs::write(path(), pin.to_toml()).with_context(|| format!("cannot write {}", path().display()))
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
        // llama-src's version carries the pin as build metadata.
        let src_manifest = std::fs::read_to_string(workspace::root().join("crates/llama-src/Cargo.toml")).unwrap();
        assert!(src_manifest.contains(&format!("+{}.{}\"", pin.package, pin.version)), "llama-src's version does not name the pin");
    }
}
