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
use std::path::{Path, PathBuf};

// `super`, not `crate`: the library's tests compile this file inside a module of their own.
use super::env;

pub const PROFILE_VAR: &str = "LLAMA_SYS_PROFILE";

/// The profile in force: its path and settings.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub path: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
}

pub fn load(known: &[String]) -> Profile {
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let path = match locate(env::var(PROFILE_VAR).as_deref(), xdg.as_deref(), home.as_deref()) {
        Location::Ignored => return Profile::default(),
        Location::Explicit(path) => Some(path),
        Location::Default(dir) => {
            watch_profile_dir(&dir);
            Some(dir.join("tuned.toml")).filter(|p| p.is_file())
        }
    };
    let Some(path) = path else { return Profile::default() };
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| super::fail(&format!("cannot read the tuned profile {} ({PROFILE_VAR}): {e}", path.display())));
    let env = parse(&text, known).unwrap_or_else(|e| super::fail(&format!("tuned profile {}: {e}", path.display())));
    Profile { path: Some(path), env }
}

/// Where the profile is, from LLAMA_SYS_PROFILE, XDG_CONFIG_HOME and HOME.
#[derive(Debug, PartialEq, Eq)]
pub enum Location {
    /// `LLAMA_SYS_PROFILE=none`, or no folder to look in.
    Ignored,
    /// `LLAMA_SYS_PROFILE=<path>`: that file, which must exist.
    Explicit(PathBuf),
    /// The folder whose `tuned.toml` is used when it exists.
    Default(PathBuf),
}

pub fn locate(var: Option<&str>, xdg_config_home: Option<&Path>, home: Option<&Path>) -> Location {
    match var {
        Some("none") => Location::Ignored,
        Some(path) => Location::Explicit(PathBuf::from(path)),
        None => match xdg_config_home.map(Path::to_path_buf).or_else(|| home.map(|h| h.join(".config"))) {
            Some(config) => Location::Default(config.join("exsa")),
            None => Location::Ignored,
        },
    }
}

/// The settings a build uses: the profile's, each overridden by the same variable set
/// explicitly (an explicit variable always wins).
pub fn with_explicit(profile: &BTreeMap<String, String>, explicit: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    let mut env = profile.clone();
    env.extend(explicit);
    env
}

/// Has cargo rerun this script when a profile appears in, changes in or leaves `dir`, so a
/// target folder built before the first `cargo xtask tune` picks the profile up. Cargo watches
/// a folder's files, but reruns every build for a path that does not exist: the folder is
/// created (empty) when missing, which costs one extra run of this script on the next build.
/// Where it cannot be (a read-only home), nothing is watched.
fn watch_profile_dir(dir: &Path) -> Option<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        ["LLAMA_SYS_NATIVE", "LLAMA_SYS_OPT_LEVEL", "LLAMA_SYS_LTO"].map(String::from).to_vec()
    }

    #[test]
    fn the_profile_is_found_where_the_variables_say() {
        let (xdg, home) = (Path::new("/x/config"), Path::new("/home/u"));
        assert_eq!(locate(Some("none"), Some(xdg), Some(home)), Location::Ignored);
        assert_eq!(locate(Some("/p/tuned.toml"), Some(xdg), Some(home)), Location::Explicit("/p/tuned.toml".into()));
        assert_eq!(locate(None, Some(xdg), Some(home)), Location::Default("/x/config/exsa".into()), "XDG before HOME");
        assert_eq!(locate(None, None, Some(home)), Location::Default("/home/u/.config/exsa".into()));
        assert_eq!(locate(None, None, None), Location::Ignored);
    }

    #[test]
    fn profiles_parse_their_env_table_and_refuse_unknown_keys() {
        let text = "# cargo xtask tune\n[meta]\nLLAMA_SYS_BOGUS = \"ignored outside [env]\"\n\n[env]\nLLAMA_SYS_NATIVE = \"off\"\nLLAMA_SYS_OPT_LEVEL=\"2\"\n";
        let env = parse(text, &known()).unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(env["LLAMA_SYS_NATIVE"], "off");
        assert_eq!(env["LLAMA_SYS_OPT_LEVEL"], "2");
        let err = parse("[env]\nLLAMA_SYS_NATIVE = \"off\"\nLLAMA_SYS_TYPO = \"1\"\n", &known()).unwrap_err();
        assert!(err.contains("line 3") && err.contains("LLAMA_SYS_TYPO"), "{err}");
        assert!(parse("[env]\nLLAMA_SYS_NATIVE\n", &known()).unwrap_err().contains("KEY = \"value\""));
        assert!(parse("", &known()).unwrap().is_empty());
    }

    #[test]
    fn an_explicit_variable_beats_the_profile() {
        let profile = parse("[env]\nLLAMA_SYS_NATIVE = \"off\"\nLLAMA_SYS_LTO = \"on\"\n", &known()).unwrap();
        let env = with_explicit(&profile, [("LLAMA_SYS_NATIVE".to_string(), "on".to_string())]);
        assert_eq!(env["LLAMA_SYS_NATIVE"], "on");
        assert_eq!(env["LLAMA_SYS_LTO"], "on", "what is not set explicitly comes from the profile");
    }
}
