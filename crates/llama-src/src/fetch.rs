//! Obtaining a crates.io package's source through cargo.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Has `cargo` resolve a throw-away manifest (written under `scratch`) that depends on exactly
/// `name =version`, and returns the package's unpacked source folder in cargo's registry cache.
/// The cache is tried first (`--offline`), so a machine that has the package never touches the
/// network.
///
/// # Errors
///
/// [`Error::Io`] when the manifest cannot be written under `scratch`; [`Error::Fetch`] when
/// `cargo` cannot be run, fails both offline and online, or does not list the package.
pub fn fetch_package(cargo: &Path, name: &str, version: &str, scratch: &Path) -> Result<PathBuf, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(scratch.join("src")).map_err(io(scratch))?;
    let manifest = scratch.join("Cargo.toml");
    std::fs::write(
        &manifest,
        format!(
            "[package]\nname = \"llama-src-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\n{name} = \"={version}\"\n\n[workspace]\n"
        ),
    )
    .map_err(io(&manifest))?;
    std::fs::write(scratch.join("src/lib.rs"), "").map_err(io(scratch))?;
    let mut last_error = String::new();
    for offline in [true, false] {
        let mut cmd = Command::new(cargo);
        cmd.args(["metadata", "--format-version", "1", "--manifest-path"]).arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        // A build script's environment describes the crate being built, not this manifest.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_CFG_") || key == "CARGO_MANIFEST_DIR" || key == "CARGO_TARGET_DIR" {
                cmd.env_remove(key.as_ref());
            }
        }
        let output = cmd.output().map_err(|e| Error::Fetch {
            package: name.into(),
            version: version.into(),
            detail: format!("cannot run {}: {e}", cargo.display()),
        })?;
        if output.status.success() {
            return manifest_dir_of(&output.stdout, name, version).ok_or_else(|| Error::Fetch {
                package: name.into(),
                version: version.into(),
                detail: "cargo metadata does not list it".into(),
            });
        }
        last_error = String::from_utf8_lossy(&output.stderr).trim().lines().last().unwrap_or("").to_string();
    }
    Err(Error::Fetch { package: name.into(), version: version.into(), detail: last_error })
}

/// The folder of `name`'s manifest in `cargo metadata` JSON, found without a JSON parser: cargo
/// prints each package as an object whose `"name"`, `"version"` and `"manifest_path"` keys are
/// plain strings.
fn manifest_dir_of(json: &[u8], name: &str, version: &str) -> Option<PathBuf> {
    let text = std::str::from_utf8(json).ok()?;
    let name_key = format!("\"name\":\"{name}\",\"version\":\"{version}\"");
    let start = text.find(&name_key)?;
    let rest = &text[start..];
    let key = "\"manifest_path\":\"";
    let path_start = rest.find(key)? + key.len();
    let path_end = path_start + rest[path_start..].find('"')?;
    let manifest = rest[path_start..path_end].replace("\\\\", "\\");
    Path::new(&manifest).parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_folder_is_read_from_cargo_metadata_json() {
        let json = br#"{"packages":[{"name":"cc","version":"1.2.0","id":"x","manifest_path":"/r/cc-1.2.0/Cargo.toml"},{"name":"llama-cpp-sys-2","version":"0.1.161","id":"registry+https://github.com/rust-lang/crates.io-index#llama-cpp-sys-2@0.1.161","license":"MIT","manifest_path":"/r/llama-cpp-sys-2-0.1.161/Cargo.toml"}]}"#;
        assert_eq!(manifest_dir_of(json, "llama-cpp-sys-2", "0.1.161"), Some(PathBuf::from("/r/llama-cpp-sys-2-0.1.161")));
        assert_eq!(manifest_dir_of(json, "llama-cpp-sys-2", "0.1.160"), None);
    }
}
