//! `exsa` built with dynamic backends (llama-sys `backend-dl`: the program links libllama,
//! libggml and libggml-base, every backend is a module loaded at start), for the bundles that
//! carry it to other machines (`gpu-bundle`, `dist`): the build, and the llama.cpp libraries
//! and backend modules it uses, as this machine resolves them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace;

/// A release `exsa` with dynamic backends.
pub struct DynamicBuild {
    pub exsa: PathBuf,
    /// libllama, libggml and libggml-base, where the program loads them from here.
    pub libraries: Vec<PathBuf>,
    /// Where CMake installed the backend modules (`libggml-cpu*.so`, `libggml-cuda.so`).
    pub modules_dir: PathBuf,
}

impl DynamicBuild {
    /// Builds `exsa` with `features` (backend-dl among them) and `env`, in the cargo target
    /// folder `target/<target_dir>` (its features differ from every other build's).
    pub fn build(target_dir: &str, features: &str, env: &[(&str, String)]) -> Result<DynamicBuild> {
        let target = workspace::target_dir().join(target_dir);
        let mut cargo = workspace::cargo();
        cargo
            .args(["build", "--release", "-p", "exsa-engine", "--bin", "exsa", "--features", features, "--message-format=json-render-diagnostics"])
            .env("CARGO_TARGET_DIR", &target)
            .stderr(std::process::Stdio::inherit());
        workspace::clear_build_env(&mut cargo);
        for (k, v) in env {
            cargo.env(k, v);
        }
        let out = cargo.output().context("cannot run cargo build")?;
        if !out.status.success() {
            bail!("cargo build of exsa ({features}) failed ({})", out.status);
        }
        let exsa = target.join("release/exsa");
        let libraries = shared_libraries(&exsa, &library_dirs(&String::from_utf8_lossy(&out.stdout))?)?;
        // CMake installs the modules into bin/ beside the lib/ of the shared libraries.
        let modules_dir = libraries
            .first()
            .and_then(|lib| lib.parent())
            .and_then(Path::parent)
            .map(|root| root.join("bin"))
            .context("exsa links no libllama: was it built with backend-dl?")?;
        Ok(DynamicBuild { exsa, libraries, modules_dir })
    }

    /// The backend modules whose file names start with `prefix` (`libggml-cpu`).
    pub fn modules(&self, prefix: &str) -> Result<Vec<PathBuf>> {
        let mut modules = Vec::new();
        for entry in std::fs::read_dir(&self.modules_dir).with_context(|| format!("no backend modules in {}", self.modules_dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(".so") {
                modules.push(path);
            }
        }
        if modules.is_empty() {
            bail!("no {prefix}*.so in {}", self.modules_dir.display());
        }
        modules.sort();
        Ok(modules)
    }
}

/// Where this build's llama-sys made the shared libraries: the native search paths of its
/// build script, from cargo's JSON messages (a relocatable program does not name them itself).
fn library_dirs(messages: &str) -> Result<String> {
    let dirs: Vec<String> = messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed" && m["package_id"].as_str().is_some_and(|id| id.contains("llama-sys")))
        .flat_map(|m| m["linked_paths"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().map(|p| p.split_once('=').map_or(p, |(_, dir)| dir).to_owned()))
        .collect();
    if dirs.is_empty() {
        bail!("cargo reported no llama-sys build script with library folders");
    }
    Ok(dirs.join(":"))
}

/// llama.cpp's shared libraries that `exsa` loads, as the dynamic loader resolves them here
/// (`dirs`, colon-separated, searched first).
fn shared_libraries(exsa: &Path, dirs: &str) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exsa).env("LD_LIBRARY_PATH", dirs).output().context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let libs: Vec<PathBuf> =
        parse_ldd(&text).into_iter().filter(|(name, _)| name.starts_with("libllama") || name.starts_with("libggml")).map(|(_, p)| p).collect();
    if !["libllama", "libggml.", "libggml-base"].iter().all(|want| libs.iter().any(|l| l.to_string_lossy().contains(want))) {
        bail!("{} does not load libllama, libggml and libggml-base from this build:\n{text}", exsa.display());
    }
    Ok(libs)
}

/// `ldd`'s report on `binary`.
pub fn ldd(binary: &Path) -> Result<String> {
    let out = Command::new("ldd").arg(binary).output().context("cannot run ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The resolved libraries of `ldd` output (`libllama.so.0 => /path/libllama.so.0 (0x...)`), by
/// the name the binary asks for.
pub fn parse_ldd(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| l.split_once("=>"))
        .filter_map(|(name, path)| path.split_whitespace().next().filter(|p| p.starts_with('/')).map(|p| (name.trim().to_owned(), PathBuf::from(p))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_folders_come_from_llama_sys_build_script_message() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/llama-sys#0.1.0"}"#,
            "\n",
            r#"{"reason":"build-script-executed","package_id":"path+file:///w/crates/llama-sys#0.1.0","linked_paths":["native=/w/target/llama-cmake/k/lib","/w/other"]}"#,
            "\n",
            r#"{"reason":"build-script-executed","package_id":"registry+https://x#ring@0.17.0","linked_paths":["native=/r"]}"#,
            "\nnot json\n"
        );
        assert_eq!(library_dirs(messages).unwrap(), "/w/target/llama-cmake/k/lib:/w/other");
        assert!(library_dirs("").is_err());
    }

    #[test]
    fn ldd_lines_give_the_resolved_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibllama.so.0 => /t/lib/libllama.so.0 (0x7f)\n\
                    \tlibggml.so.0 => /t/lib/libggml.so.0 (0x7f)\n\tlibgomp.so.1 => /usr/lib/libgomp.so.1 (0x7f)\n\
                    \tlibggml-cpu.so => not found\n";
        let libs = parse_ldd(text);
        let names: Vec<&str> = libs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["libllama.so.0", "libggml.so.0", "libgomp.so.1"]);
        assert_eq!(libs[2].1, PathBuf::from("/usr/lib/libgomp.so.1"));
    }
}
