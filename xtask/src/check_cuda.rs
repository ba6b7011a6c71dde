//! `cargo xtask check-cuda`: proves the CUDA build compiles and links on a machine without a GPU
//! or a system toolkit, against the toolkit `setup --cuda` assembles from PyPI, and that the
//! program then runs on the CPU and says it found no GPU.
//!
//! The full check builds `exsa --features cuda` for the architectures asked (one by default:
//! ggml-cuda is 144 CUDA objects, about half an hour on 2 cores per architecture) and records the
//! build time and the binary's size. `--quick` (what `cargo xtask test` runs) configures ggml with
//! CUDA as llama-sys' plan does and compiles one of its CUDA sources: the toolkit, CMake's CUDA
//! detection and nvcc's host compiler are all exercised in about a minute.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::setup::cuda;
use crate::workspace;

#[derive(clap::Args)]
pub struct Args {
    /// CUDA architectures (LLAMA_SYS_CUDA_ARCHITECTURES); `default` for the plan's full list.
    #[arg(long, default_value = "90-real")]
    archs: String,
    /// Only configure ggml with CUDA and compile one CUDA source.
    #[arg(long)]
    quick: bool,
}

/// The ggml CUDA source the quick check compiles: small, and it includes the common headers.
const QUICK_SOURCE_OBJECT: &str = "acc.cu.o";

/// The reduced check `cargo xtask test` runs (Linux x86-64: where the toolkit's wheels exist).
pub fn run_quick() -> Result<()> {
    run(&Args { archs: "90-real".into(), quick: true })
}

pub fn run(args: &Args) -> Result<()> {
    let toolkit = cuda::run()?;
    if args.quick { quick(&toolkit, &args.archs) } else { full(&toolkit, &args.archs) }
}

fn full(toolkit: &Path, archs: &str) -> Result<()> {
    let target = workspace::target_dir().join("cuda-check");
    let mut build = workspace::cargo();
    build.args(["build", "-p", "exsa-engine", "--bin", "exsa", "--features", "cuda"]).env("CARGO_TARGET_DIR", &target).env("CUDA_PATH", toolkit);
    if archs != "default" {
        build.env("LLAMA_SYS_CUDA_ARCHITECTURES", archs);
    }
    let started = Instant::now();
    workspace::run(&mut build)?;
    let build_s = started.elapsed().as_secs();
    let exsa = target.join("debug/exsa");
    let size = std::fs::metadata(&exsa)?.len();

    // No GPU here: the program must run on the CPU and say so (cudart and cuBLAS come from the
    // toolkit's folder; the driver library is absent, which is the point).
    let lib64 = toolkit.join("lib64");
    let out = Command::new(&exsa)
        .args(["--log", "warn", "generate", "The capital of France is", "--max-tokens", "4"])
        .env("LD_LIBRARY_PATH", prepend_path(&lib64, std::env::var_os("LD_LIBRARY_PATH")))
        .output()
        .context("cannot run the CUDA build")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("the CUDA build did not run on this GPU-less machine ({}):\n{stderr}", out.status);
    }
    if !stderr.contains("no GPU was found") {
        bail!("the CUDA build ran but did not say it found no GPU:\n{stderr}");
    }
    let report = serde_json::json!({
        "archs": archs,
        "toolkit": toolkit.display().to_string(),
        "build_s": build_s,
        "exsa_bytes": size,
        "generated": String::from_utf8_lossy(&out.stdout).trim(),
        "warning": stderr.lines().find(|l| l.contains("no GPU was found")),
    });
    std::fs::create_dir_all(&target)?;
    std::fs::write(target.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// CMake's view of the CUDA backend, as llama-sys configures it (no driver stub: no VMM), and
/// one of its objects compiled.
fn quick(toolkit: &Path, archs: &str) -> Result<()> {
    // The whole tree, as llama-sys configures it (ggml on its own would want files the
    // packaged tree leaves out).
    let source = workspace::root().join("vendor/llama.cpp");
    if !source.join("ggml/src/ggml-cuda").is_dir() {
        bail!("no ggml source in vendor/llama.cpp: run `cargo xtask vendor`");
    }
    let build = workspace::target_dir().join("check-cuda-quick");
    let archs = if archs == "default" { "90-real" } else { archs };
    let started = Instant::now();
    workspace::run(
        Command::new(std::env::var_os("CMAKE").unwrap_or_else(|| "cmake".into()))
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args(["-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON", "-DGGML_CUDA_NO_VMM=ON", "-DGGML_NATIVE=OFF"])
            .args(["-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
            .args(["-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"])
            .arg(format!("-DCMAKE_CUDA_ARCHITECTURES={archs}"))
            .arg(format!("-DCUDAToolkit_ROOT={}", toolkit.display()))
            .arg(format!("-DCMAKE_CUDA_COMPILER={}", toolkit.join("bin/nvcc").display())),
    )
    .context("CMake could not configure ggml with CUDA")?;
    // The Makefile generator has a target per object in the backend's folder.
    workspace::run(Command::new("make").arg("-C").arg(build.join("ggml/src/ggml-cuda")).arg(QUICK_SOURCE_OBJECT))
        .context("nvcc could not compile a ggml CUDA source")?;
    let object = find_file(&build, QUICK_SOURCE_OBJECT).context("the object was not written")?;
    eprintln!(
        "check-cuda: configured ggml with CUDA and compiled {} ({} bytes) in {} s",
        object.display(),
        std::fs::metadata(&object)?.len(),
        started.elapsed().as_secs()
    );
    Ok(())
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

fn prepend_path(dir: &Path, rest: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(rest) = rest {
        paths.extend(std::env::split_paths(&rest));
    }
    std::env::join_paths(paths).unwrap_or_default()
}
