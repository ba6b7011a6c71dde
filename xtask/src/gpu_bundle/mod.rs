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

use anyhow::{Context, Result, bail};

use crate::dynamic_build::DynamicBuild;
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

    let build = DynamicBuild::build("gpu-bundle-build", "backend-dl", &[])?;
    std::fs::copy(&build.exsa, out.join("bin/exsa"))?;
    for lib in &build.libraries {
        let name = lib.file_name().context("a library path without a name")?;
        std::fs::copy(lib, out.join("lib").join(name)).with_context(|| format!("cannot copy {}", lib.display()))?;
    }
    for module in build.modules("libggml-cpu")? {
        std::fs::copy(&module, out.join("bin").join(module.file_name().context("a module without a name")?))?;
    }

    copy_ggml_source(&crate::vendor::source()?, &out.join("ggml"))?;
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
