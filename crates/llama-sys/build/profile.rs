//! The tuned profile: `cargo xtask tune` writes the winning build's settings to a file, and
//! every build of llama-sys on the machine picks them up, under the explicit environment.
//!
//! Where: `LLAMA_SYS_PROFILE=/path/to/tuned.toml`, else `$XDG_CONFIG_HOME/exsa/tuned.toml` or
//! `~/.config/exsa/tuned.toml`. `LLAMA_SYS_PROFILE=none` ignores any profile (bench-compare's
//! `B` does, so it keeps measuring the default flags).
//!
//! The file is ours and flat, so it is read without a TOML parser: `KEY = "value"` lines under
//! an `[env]` table, each KEY one of the plan's LLAMA_SYS_* variables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::env;

pub const PROFILE_VAR: &str = "LLAMA_SYS_PROFILE";

/// The profile in force: its path and settings.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub path: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
}

pub fn load(known: &[String]) -> Profile {
    let path = match env::var(PROFILE_VAR) {
        Some(v) if v == "none" => return Profile::default(),
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let dir = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
                .map(|c| c.join("exsa"));
            dir.as_deref().and_then(watch_profile_dir);
            dir.map(|d| d.join("tuned.toml")).filter(|p| p.is_file())
        }
    };
    let Some(path) = path else { return Profile::default() };
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| crate::fail(&format!("cannot read the tuned profile {} ({PROFILE_VAR}): {e}", path.display())));
    let env = parse(&text, known).unwrap_or_else(|e| crate::fail(&format!("tuned profile {}: {e}", path.display())));
    Profile { path: Some(path), env }
}

/// Has cargo rerun this script when a profile appears in, changes in or leaves `dir`, so a
/// target folder built before the first `cargo xtask tune` picks the profile up. Cargo watches
/// a folder's files, but reruns every build for a path that does not exist: the folder is
/// created (empty) when missing, which costs one extra run of this script on the next build.
/// Where it cannot be (a read-only home), nothing is watched.
fn watch_profile_dir(dir: &std::path::Path) -> Option<()> {
    std::fs::create_dir_all(dir).ok()?;
    println!("cargo:rerun-if-changed={}", dir.display());
    Some(())
}

/// `[env]` lines `KEY = "value"`; unknown keys are an error, not silently ignored.
pub fn parse(text: &str, known: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut in_env = false;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            in_env = line == "[env]";
            continue;
        }
        if !in_env {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected KEY = \"value\"", n + 1))?;
        let (k, v) = (k.trim(), v.trim().trim_matches('"'));
        if !known.iter().any(|x| x == k) {
            return Err(format!("line {}: {k} is not a llama-sys setting", n + 1));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}
