//! Where the llama.cpp source comes from, and what its pin says about it.

use std::path::{Path, PathBuf};

use crate::env;

pub const SOURCE_DIR_VAR: &str = "LLAMA_CPP_DIR";

/// The source tree to build and what is known of its version.
pub struct Source {
    pub dir: PathBuf,
    pub pin: Pin,
}

/// The committed pin file `vendor/llama.cpp.toml`, read without a TOML parser: it is ours,
/// flat, and written by `cargo xtask vendor`.
#[derive(Clone, Debug, Default)]
pub struct Pin {
    pub package: String,
    pub version: String,
    pub upstream_commit: String,
    pub build_number: Option<u32>,
    pub tree_sha256: String,
}

impl Pin {
    fn parse(text: &str) -> Pin {
        let mut pin = Pin::default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "package" => pin.package = value,
                "version" => pin.version = value,
                "upstream_commit" => pin.upstream_commit = value,
                "build_number" => pin.build_number = value.parse().ok(),
                "tree_sha256" => pin.tree_sha256 = value,
                _ => {}
            }
        }
        pin
    }

    /// One line that says which llama.cpp this is.
    pub fn describe(&self) -> String {
        if self.package.is_empty() {
            return "unpinned (LLAMA_CPP_DIR)".into();
        }
        format!("{} {} (tree sha256 {})", self.package, self.version, &self.tree_sha256[..self.tree_sha256.len().min(12)])
    }
}

pub fn locate(manifest_dir: &Path) -> Source {
    let workspace = manifest_dir.join("../..");
    if let Some(dir) = env::var(SOURCE_DIR_VAR) {
        let dir = PathBuf::from(dir);
        check_tree(&dir, &format!("{SOURCE_DIR_VAR}={}", dir.display()));
        return Source { dir, pin: Pin::default() };
    }
    let dir = workspace.join("vendor/llama.cpp");
    let pin_file = workspace.join("vendor/llama.cpp.toml");
    println!("cargo:rerun-if-changed={}", pin_file.display());
    check_tree(&dir, "the vendored source");
    let pin = std::fs::read_to_string(&pin_file).map(|t| Pin::parse(&t)).unwrap_or_default();
    Source { dir: dir.canonicalize().unwrap_or(dir), pin }
}

fn check_tree(dir: &Path, what: &str) {
    if !dir.join("include/llama.h").is_file() || !dir.join("CMakeLists.txt").is_file() {
        crate::fail(&format!(
            "llama.cpp source not found at {} ({what}): run `cargo xtask vendor`, or set {SOURCE_DIR_VAR} to a llama.cpp checkout",
            dir.display()
        ));
    }
}
