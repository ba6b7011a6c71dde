//! `cargo xtask gpu-bundle`: everything a GPU machine without Rust needs to measure our build on
//! its GPU, in one folder, and `--report` to turn what it measured into a report.
//!
//! Built here: `exsa` with dynamic backends (llama-sys `backend-dl`: the program links
//! libllama/libggml/libggml-base, every backend is a module), its CPU module, the pinned ggml
//! source without the other backends, and the scripts (`run.sh`, `serve_bench.py`). There,
//! `run.sh` builds `libggml-cuda.so` with that machine's nvcc for that machine's GPU (our copy of
//! cuBLAS never travels: the module links the machine's own), once as our plan builds it and once
//! as the crate baseline's build would, and benches both with the same exsa binary. The model
//! travels beside the bundle in parts (`--chunk-mib`), since transfers to such machines are
//! limited; `stage-model.sh` joins and checks them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace;

mod report;

const RUN_SH: &str = include_str!("run.sh");
const SERVE_BENCH_PY: &str = include_str!("serve_bench.py");
const STAGE_MODEL_SH: &str = include_str!("stage-model.sh");

#[derive(clap::Args)]
pub struct Args {
    /// Folder to write the bundle into.
    #[arg(long, default_value = "target/gpu-bundle")]
    out: PathBuf,
    /// GGUF model to bench there (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model's parts, MiB each (0: one file), written to `<out>-model/`: 62 fits the 64 MiB
    /// that one call to this project's lent GPU machines carries, with the repository.
    #[arg(long, default_value_t = 62)]
    chunk_mib: u64,
    /// Write the report of a finished run's results folder (run.sh's $OUT) instead.
    #[arg(long, value_name = "RESULTS_DIR")]
    report: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(results) = &args.report {
        let text = report::write(results)?;
        print!("{text}");
        return Ok(());
    }
    if !cfg!(target_os = "linux") {
        bail!("gpu-bundle builds for Linux GPU machines; run it on Linux");
    }
    let out = workspace::root().join(&args.out);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("bin"))?;
    std::fs::create_dir_all(out.join("lib"))?;

    let exsa = build_exsa()?;
    std::fs::copy(&exsa, out.join("bin/exsa"))?;
    let libs = shared_libraries(&exsa)?;
    let mut modules_dir = None;
    for lib in &libs {
        let name = lib.file_name().context("a library path without a name")?;
        std::fs::copy(lib, out.join("lib").join(name)).with_context(|| format!("cannot copy {}", lib.display()))?;
        // CMake installs the modules into bin/ beside the lib/ of the shared libraries.
        modules_dir = modules_dir.or_else(|| lib.parent().and_then(Path::parent).map(|root| root.join("bin")));
    }
    let modules_dir = modules_dir.context("exsa links no libllama: was it built with backend-dl?")?;
    let mut cpu_modules = 0;
    for entry in std::fs::read_dir(&modules_dir).with_context(|| format!("no backend modules in {}", modules_dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("libggml-cpu") && name.ends_with(".so") {
            std::fs::copy(&path, out.join("bin").join(&name))?;
            cpu_modules += 1;
        }
    }
    if cpu_modules == 0 {
        bail!("no libggml-cpu*.so in {}", modules_dir.display());
    }

    copy_ggml_source(&llama_source()?, &out.join("ggml"))?;
    for (name, text) in [("run.sh", RUN_SH), ("serve_bench.py", SERVE_BENCH_PY), ("stage-model.sh", STAGE_MODEL_SH)] {
        std::fs::write(out.join(name), text)?;
        set_executable(&out.join(name))?;
    }
    let model = args.model.clone().unwrap_or_else(crate::fetch_model::default_path);
    let parts_dir = PathBuf::from(format!("{}-model", out.display()));
    let parts = split_model(&model, &parts_dir, args.chunk_mib)?;

    eprintln!("gpu-bundle: {} ({}), model in {} part(s) in {}", out.display(), human_size(dir_size(&out)?), parts, parts_dir.display());
    eprintln!("gpu-bundle: there, `./stage-model.sh <parts folder> /tmp/model.gguf` for each batch of parts, then");
    eprintln!("gpu-bundle:   MODEL=/tmp/model.gguf OUT=<results> ./run.sh ; here: cargo xtask gpu-bundle --report <results>");
    Ok(())
}

/// `exsa` in release with dynamic backends, in a target folder of its own (its features differ
/// from every other build's).
fn build_exsa() -> Result<PathBuf> {
    let target = workspace::target_dir().join("gpu-bundle-build");
    workspace::run(
        workspace::cargo()
            .args(["build", "--release", "-p", "exsa-engine", "--bin", "exsa", "--features", "backend-dl"])
            .env("CARGO_TARGET_DIR", &target),
    )?;
    Ok(target.join("release/exsa"))
}

/// llama.cpp's shared libraries that `exsa` loads, as the dynamic loader resolves them here.
fn shared_libraries(exsa: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exsa).output().context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let libs = parse_ldd(&text);
    if !["libllama", "libggml.", "libggml-base"].iter().all(|want| libs.iter().any(|l| l.to_string_lossy().contains(want))) {
        bail!("{} does not load libllama, libggml and libggml-base from this build:\n{text}", exsa.display());
    }
    Ok(libs)
}

/// The llama.cpp libraries of `ldd` output (`libllama.so.0 => /path/libllama.so.0 (0x...)`).
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split_once("=>"))
        .filter(|(name, _)| name.trim().starts_with("libllama") || name.trim().starts_with("libggml"))
        .filter_map(|(_, path)| path.split_whitespace().next().filter(|p| p.starts_with('/')).map(PathBuf::from))
        .collect()
}

fn llama_source() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LLAMA_CPP_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let vendored = workspace::root().join("vendor/llama.cpp");
    if vendored.join("ggml/CMakeLists.txt").is_file() {
        return Ok(vendored);
    }
    bail!("no llama.cpp source: run `cargo xtask vendor` (or set LLAMA_CPP_DIR)")
}

/// ggml's tree as its CMake needs it for the CUDA module alone: everything but the other
/// backends' folders (ggml-base includes the CPU backend's headers, so that folder stays).
fn copy_ggml_source(llama: &Path, dest: &Path) -> Result<()> {
    crate::vendor::copy_tree_except(&llama.join("ggml"), dest, &another_backend)?;
    // ggml configured on its own installs a pkg-config file from this template, which the
    // crates.io package of the tree leaves out; nothing here uses the file.
    let template = dest.join("ggml.pc.in");
    if !template.exists() {
        std::fs::write(template, "Name: ggml\nDescription: ggml (configured by exsa's gpu-bundle)\nVersion: @GGML_VERSION@\n")?;
    }
    Ok(())
}

/// Whether `rel` (under ggml/) is inside the folder of a backend other than CUDA and the CPU.
fn another_backend(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
    parts.next().as_deref() == Some("src")
        && parts.next().is_some_and(|dir| dir.starts_with("ggml-") && !["ggml-cuda", "ggml-cpu"].contains(&dir.as_str()) && !dir.contains('.'))
}

/// Writes `model` as parts of `chunk_mib` MiB (one part for 0) and its SHA-256; returns the
/// number of parts.
fn split_model(model: &Path, dir: &Path, chunk_mib: u64) -> Result<usize> {
    use std::io::{Read, Write};
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut file = std::fs::File::open(model).with_context(|| format!("cannot open the model {}", model.display()))?;
    let chunk = if chunk_mib == 0 { u64::MAX } else { chunk_mib << 20 };
    let mut buf = vec![0u8; 1 << 20];
    let mut parts = 0;
    loop {
        let mut written = 0u64;
        let path = dir.join(format!("part{parts:02}"));
        let mut part = std::fs::File::create(&path)?;
        while written < chunk {
            let want = (chunk - written).min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            part.write_all(&buf[..n])?;
            written += n as u64;
        }
        if written == 0 {
            std::fs::remove_file(&path)?;
            break;
        }
        parts += 1;
        if written < chunk {
            break;
        }
    }
    let hash = crate::hashing::file_sha256(model)?;
    std::fs::write(dir.join("model.sha256"), format!("{hash}  model.gguf\n"))?;
    std::fs::write(dir.join("parts"), format!("{parts}\n"))?;
    Ok(parts)
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() { dir_size(&entry.path())? } else { entry.metadata()?.len() };
    }
    Ok(total)
}

fn human_size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_llamas_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibllama.so.0 => /t/lib/libllama.so.0 (0x7f)\n\
                    \tlibggml.so.0 => /t/lib/libggml.so.0 (0x7f)\n\tlibggml-base.so.0 => /t/lib/libggml-base.so.0 (0x7f)\n\
                    \tlibstdc++.so.6 => /usr/lib/libstdc++.so.6 (0x7f)\n\tlibggml-cpu.so => not found\n";
        let libs = parse_ldd(text);
        assert_eq!(libs, ["/t/lib/libllama.so.0", "/t/lib/libggml.so.0", "/t/lib/libggml-base.so.0"].map(PathBuf::from));
    }

    #[test]
    fn the_model_splits_into_parts_that_join_to_it() {
        let dir = std::env::temp_dir().join(format!("exsa-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        let bytes: Vec<u8> = (0..(5u32 << 20) / 2).map(|i| (i % 251) as u8).collect();
        std::fs::write(&model, &bytes).unwrap();
        let parts = split_model(&model, &dir.join("parts"), 1).unwrap();
        assert_eq!(parts, 3, "2.5 MiB in 1 MiB parts");
        let joined: Vec<u8> = (0..parts).flat_map(|k| std::fs::read(dir.join(format!("parts/part{k:02}"))).unwrap()).collect();
        assert_eq!(joined, bytes);
        assert!(std::fs::read_to_string(dir.join("parts/model.sha256")).unwrap().starts_with(&crate::hashing::file_sha256(&model).unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_cuda_and_cpu_of_the_backends_travel() {
        let skip = |p: &str| another_backend(Path::new(p));
        assert!(skip("src/ggml-vulkan") && skip("src/ggml-metal/ggml-metal.m") && skip("src/ggml-rpc"));
        // ggml-base's ggml-quants.c includes ggml-cpu/ggml-cpu-impl.h (found on the H100 run).
        for kept in ["src/ggml-cuda/mmq.cu", "src/ggml-cpu/ggml-cpu-impl.h", "src/ggml-backend.cpp", "include/ggml.h", "src/CMakeLists.txt"] {
            assert!(!skip(kept), "{kept}");
        }
    }
}
