//! Reading the environment from a build script: every variable read is watched.

use std::path::PathBuf;

/// Reads `name`, preferring the target-specific `name_<target>` (openssl-sys' convention), and
/// tells cargo to rebuild when either changes. Empty values count as unset.
pub fn var(name: &str) -> Option<String> {
    let target = std::env::var("TARGET").unwrap_or_default();
    let specific = format!("{name}_{}", target.replace('-', "_"));
    for key in [specific.as_str(), name] {
        println!("cargo:rerun-if-env-changed={key}");
    }
    [specific.as_str(), name].into_iter().find_map(|key| std::env::var(key).ok().filter(|v| !v.trim().is_empty()))
}

/// A variable cargo always sets for build scripts.
pub fn cargo(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| crate::fail(&format!("cargo did not set {name}; run the build through cargo")))
}

pub fn cargo_path(name: &str) -> PathBuf {
    PathBuf::from(cargo(name))
}
