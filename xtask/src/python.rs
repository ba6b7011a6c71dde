//! Python packages from PyPI, each pip-installed into a folder of its own under `.cache/pip/`
//! (never the user's or the system's site-packages) and used through PYTHONPATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::workspace;

/// The Python to run: `PYTHON`, else `python3`.
pub fn python() -> Command {
    Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
}

/// The folder holding `package==version` (with its dependencies), installed unless `module`
/// is already importable from it.
pub fn site(package: &str, version: &str, module: &str) -> Result<PathBuf> {
    install(&format!("{package}-{version}"), &[format!("{package}=={version}")], module)
        .with_context(|| format!("pip could not install {package}; is Python 3 with pip installed?"))
}

/// The folder holding what `requirements` (a pip requirements file) lists, installed unless
/// `module` is already importable from it; `name` names the folder, with the file's hash so that
/// a changed file gets a fresh one.
pub fn site_for_requirements(name: &str, requirements: &Path, module: &str) -> Result<PathBuf> {
    let hash = crate::hashing::file_sha256(requirements)?;
    install(&format!("{name}-{}", &hash[..12]), &["-r".into(), requirements.display().to_string()], module)
        .with_context(|| format!("pip could not install what {} lists; is Python 3 with pip installed?", requirements.display()))
}

fn install(folder: &str, what: &[String], module: &str) -> Result<PathBuf> {
    let site = workspace::cache_dir().join("pip").join(folder);
    if site.join(module).is_dir() {
        return Ok(site);
    }
    eprintln!("installing {} with pip into {}", what.join(" "), site.display());
    let staging = site.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    workspace::run(
        python()
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-warn-script-location"])
            .args(["--progress-bar", "on", "--target"])
            .arg(&staging)
            .args(what),
    )?;
    let _ = std::fs::remove_dir_all(&site);
    std::fs::rename(&staging, &site)?;
    Ok(site)
}
