//! Python packages from PyPI, each pip-installed into a folder of its own under `.cache/pip/`
//! (never the user's or the system's site-packages) and used through PYTHONPATH.

use std::path::PathBuf;
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
    let site = workspace::cache_dir().join("pip").join(format!("{package}-{version}"));
    if site.join(module).is_dir() {
        return Ok(site);
    }
    eprintln!("installing {package}=={version} with pip into {}", site.display());
    let staging = site.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    workspace::run(
        python()
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-warn-script-location"])
            .args(["--progress-bar", "on", "--target"])
            .arg(&staging)
            .arg(format!("{package}=={version}")),
    )
    .with_context(|| format!("pip could not install {package}; is Python 3 with pip installed?"))?;
    let _ = std::fs::remove_dir_all(&site);
    std::fs::rename(&staging, &site)?;
    Ok(site)
}
