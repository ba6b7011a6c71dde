//! `cargo xtask app-test`: the design card's second user, tried for real. A new cargo project
//! outside the workspace depends on the *packaged* `llama` crate (and through it llama-sys and
//! llama-src, the pinned tree inside), builds offline with no other step, and runs on a model.
//! It fails if the package is not self-contained: the app's build never sees `vendor/`.
//! Then the program's user: `cargo install exsa-engine` from the packaged crates, offline, into a
//! temporary root, and the installed `exsa generate` on the model.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{fetch_model, package, workspace};

const APP_MAIN: &str = include_str!("../app-test/main.rs");

#[derive(clap::Args, Default)]
pub struct Args {
    /// Any GGUF model (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => fetch_model::run(&fetch_model::Args::default())?,
    };
    let crates = package::run(&package::Args::default())?;
    let root = workspace::target_dir().join("app-test");
    let unpacked = root.join("crates");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    std::fs::create_dir_all(&unpacked)?;
    let mut dirs = Vec::new();
    for file in &crates {
        // Each package in a folder named by its content: `cargo package` gives every file the
        // same time stamp, so cargo's fingerprints (by path and time) would take a changed
        // package in the folder of an earlier run for the build it already made. A new folder
        // per content rebuilds what changed and reuses what did not.
        let content = crate::hashing::file_sha256(file)?;
        let folder = unpacked.join(&content[..16]);
        std::fs::create_dir_all(&folder)?;
        workspace::run(Command::new("tar").arg("-xzf").arg(file).arg("-C").arg(&folder))?;
        let name = file.file_stem().context("crate file name")?.to_string_lossy().into_owned();
        dirs.push(folder.join(name));
    }
    let app = root.join("app");
    write_app(&app, &dirs)?;

    eprintln!("app-test: building an app outside the workspace against the packaged crates (offline)");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&app).args(["run", "--release", "--offline", "--quiet", "--"]).arg(&model).env("CARGO_TARGET_DIR", root.join("target"));
    // As an outside app sees it: no workspace build cache, no source override, no tuned profile.
    for var in ["LLAMA_SYS_BUILD_CACHE", "LLAMA_CPP_DIR", "EXSA_MODEL", "CARGO_MANIFEST_DIR"] {
        cmd.env_remove(var);
    }
    cmd.env("LLAMA_SYS_PROFILE", "none");
    let output = cmd.output().context("cannot run cargo for the app")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("the app outside the workspace failed ({}):\n{}\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim(), stdout.trim());
    }
    check_output(&stdout, &unpacked)?;
    eprintln!("app-test: ok\n{}", stdout.trim());
    install(&root, &dirs, &model)
}

/// `cargo install exsa-engine` from the packaged crates (by path, the others patched in as if
/// from a registry), offline, into a temporary root; the installed program must generate.
fn install(root: &Path, crate_dirs: &[PathBuf], model: &Path) -> Result<()> {
    let engine = package::CRATES
        .iter()
        .zip(crate_dirs)
        .find(|(name, _)| **name == "exsa-engine")
        .map(|(_, dir)| dir)
        .context("exsa-engine is not packaged")?;
    let prefix = root.join("installed");
    let _ = std::fs::remove_dir_all(&prefix);
    // Installed from outside this workspace's folder, as from a registry's download: inside it,
    // cargo takes the package for a member of the workspace that it is not.
    let outside = std::env::temp_dir().join(format!("exsa-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    let source = outside.join(engine.file_name().context("the engine's package folder has no name")?);
    crate::vendor::copy_tree(engine, &source)?;
    eprintln!("app-test: cargo install exsa-engine from the packaged crates (offline)");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "--offline", "--path"]).arg(&source).arg("--root").arg(&prefix).env("CARGO_TARGET_DIR", root.join("target"));
    for (name, dir) in package::CRATES.iter().zip(crate_dirs).filter(|(name, _)| **name != "exsa-engine") {
        cmd.arg("--config").arg(format!("patch.crates-io.{name}.path={:?}", dir.display().to_string()));
    }
    for var in ["LLAMA_SYS_BUILD_CACHE", "LLAMA_CPP_DIR", "EXSA_MODEL", "CARGO_MANIFEST_DIR"] {
        cmd.env_remove(var);
    }
    cmd.env("LLAMA_SYS_PROFILE", "none");
    let output = cmd.output().context("cannot run cargo install")?;
    let _ = std::fs::remove_dir_all(&outside);
    if !output.status.success() {
        bail!("cargo install exsa-engine from the packaged crates failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    let exsa = prefix.join("bin").join(format!("exsa{}", std::env::consts::EXE_SUFFIX));
    let out = Command::new(&exsa)
        .args(["--log", "error", "generate", "--max-tokens", "8", "--model"])
        .arg(model)
        .arg("The capital of France is")
        .output()
        .with_context(|| format!("cannot run {}", exsa.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && !text.trim().is_empty(),
        "the installed exsa did not generate ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("app-test: installed exsa generated {:?}", text.trim());
    Ok(())
}

/// The app's manifest: `exsa-llama` by version (its library is `llama`, as in the workspace), as from a registry, with the packaged crates patched
/// in by path (they are not on crates.io); the workspace's lockfile so that offline resolution
/// picks the versions already in cargo's cache.
fn write_app(app: &Path, crate_dirs: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(app.join("src"))?;
    let patches: String =
        package::CRATES.iter().zip(crate_dirs).map(|(name, dir)| format!("{name} = {{ path = {:?} }}\n", dir.display().to_string())).collect();
    std::fs::write(
        app.join("Cargo.toml"),
        format!(
            "[package]\nname = \"exsa-app-test\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\nexsa-llama = \"0.1.0\"\n\n[patch.crates-io]\n{patches}\n[workspace]\n"
        ),
    )?;
    std::fs::write(app.join("src/main.rs"), APP_MAIN)?;
    std::fs::copy(workspace::root().join("Cargo.lock"), app.join("Cargo.lock"))?;
    Ok(())
}

/// The app generated text, from the tree inside the packaged llama-src.
fn check_output(stdout: &str, unpacked: &Path) -> Result<()> {
    let field = |key: &str| stdout.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let source_dir = field("source_dir=").context("the app printed no source_dir")?;
    let packaged = unpacked.canonicalize().unwrap_or(unpacked.to_path_buf());
    ensure!(
        Path::new(source_dir).starts_with(&packaged) || Path::new(source_dir).starts_with(unpacked),
        "the app was built from {source_dir}, not from the tree inside the packaged llama-src ({})",
        unpacked.display()
    );
    ensure!(field("llama_cpp=").is_some_and(|s| s.starts_with("llama-cpp-sys-2")), "the app's build is not pinned:\n{stdout}");
    ensure!(field("generated=").is_some_and(|s| !s.is_empty()), "the app generated no text:\n{stdout}");
    Ok(())
}
