//! `cargo xtask setup --cuda`: a CUDA toolkit assembled from NVIDIA's PyPI wheels into
//! `.cache/cuda/`, in the layout CMake's FindCUDAToolkit expects (bin, include, lib64, nvvm),
//! for machines without a system toolkit. Nothing is installed system-wide.
//!
//! The wheels unpack into `nvidia/cu13/{bin,include,lib,nvvm}`: nearly a toolkit. What they lack
//! is added here: `lib64` (a link to `lib`), the unversioned `libcudart.so`-style links the linker
//! looks for, and the execute bits that unzipping drops. They ship no driver stub (`libcuda.so`),
//! so llama-sys builds ggml's CUDA backend without the driver API there (GGML_CUDA_NO_VMM).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{python, workspace};

/// CUDA 13.0, the newest release that driver 580 (today's datacenter default) runs without
/// the driver being upgraded. cuBLAS is for linking here only: a GPU machine uses its own.
pub const WHEELS: [(&str, &str); 6] = [
    ("nvidia-cuda-nvcc", "13.0.88"),
    ("nvidia-cuda-runtime", "13.0.96"),
    ("nvidia-cuda-crt", "13.0.88"),
    ("nvidia-nvvm", "13.0.88"),
    ("nvidia-cuda-cccl", "13.0.85"),
    ("nvidia-cublas", "13.0.2.14"),
];
/// What `nvcc --version` prints for these wheels.
const NVCC_RELEASE: &str = "release 13.0";
/// Where the wheels unpack inside themselves.
const WHEEL_ROOT: &str = "nvidia/cu13";
/// Written last: a folder without it is a half-finished assembly.
const DONE_MARKER: &str = ".assembled-from-pypi";

/// The toolkit's folder: CUDA_PATH for builds.
pub fn root() -> PathBuf {
    workspace::cache_dir().join("cuda")
}

/// Assembles the toolkit unless it is there already, checks nvcc, and returns its folder.
pub fn run() -> Result<PathBuf> {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        bail!("setup --cuda assembles NVIDIA's Linux x86-64 wheels; elsewhere install the CUDA toolkit from NVIDIA and set CUDA_PATH");
    }
    let root = root();
    let wanted = marker_text();
    if std::fs::read_to_string(root.join(DONE_MARKER)).is_ok_and(|m| m == wanted) {
        nvcc_version(&root)?;
    } else {
        assemble(&root)?;
        nvcc_version(&root)?;
        std::fs::write(root.join(DONE_MARKER), wanted)?;
    }
    let version = nvcc_version(&root)?;
    eprintln!("setup: CUDA toolkit {} in {}", version, root.display());
    eprintln!("setup: build with it (and run what you built, which loads its cudart and cuBLAS from there):");
    println!("export CUDA_PATH={}", root.display());
    println!("export LD_LIBRARY_PATH={}:${{LD_LIBRARY_PATH:-}}", root.join("lib64").display());
    Ok(root)
}

fn marker_text() -> String {
    WHEELS.iter().map(|(name, version)| format!("{name}=={version}\n")).collect()
}

fn assemble(root: &Path) -> Result<()> {
    let wheels = workspace::cache_dir().join("cuda-wheels");
    std::fs::create_dir_all(&wheels)?;
    eprintln!("setup: downloading the CUDA {} wheels (about 525 MB) into {}", NVCC_RELEASE.trim_start_matches("release "), wheels.display());
    workspace::run(
        python::python()
            .args(["-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--no-deps", "--only-binary=:all:", "-d"])
            .arg(&wheels)
            .args(WHEELS.iter().map(|(name, version)| format!("{name}=={version}"))),
    )
    .context("pip could not download the CUDA wheels; is Python 3 with pip installed, and PyPI reachable?")?;

    let staging = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for (name, version) in WHEELS {
        let wheel = find_wheel(&wheels, name, version)?;
        // pip's own zipfile module: no unzip program needed.
        workspace::run(python::python().args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&staging))
            .with_context(|| format!("cannot unpack {}", wheel.display()))?;
    }
    let toolkit = staging.join(WHEEL_ROOT);
    complete_layout(&toolkit)?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::rename(&toolkit, root).with_context(|| format!("cannot move the toolkit to {}", root.display()))?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// `nvidia-cuda-nvcc==13.0.88` → `nvidia_cuda_nvcc-13.0.88-...whl`.
fn find_wheel(dir: &Path, name: &str, version: &str) -> Result<PathBuf> {
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl")))
        .with_context(|| format!("pip downloaded no wheel {prefix}*.whl into {}", dir.display()))
}

/// What the wheels leave out of a toolkit's layout.
fn complete_layout(toolkit: &Path) -> Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    for dir in ["bin", "include", "lib", "nvvm/bin", "nvvm/libdevice"] {
        if !toolkit.join(dir).is_dir() {
            bail!("the CUDA wheels unpacked without {dir}/ under {}", toolkit.display());
        }
    }
    // Zip archives as Python unpacks them lose the execute bit.
    for dir in ["bin", "nvvm/bin"] {
        for entry in std::fs::read_dir(toolkit.join(dir))? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    symlink("lib", toolkit.join("lib64"))?;
    for entry in std::fs::read_dir(toolkit.join("lib"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(unversioned) = unversioned_name(&name) {
            let link = toolkit.join("lib").join(&unversioned);
            if !link.exists() {
                symlink(&name, link)?;
            }
        }
    }
    Ok(())
}

/// `libcudart.so.13` → `libcudart.so`; None for other names.
fn unversioned_name(name: &str) -> Option<String> {
    let (stem, version) = name.split_once(".so.")?;
    (name.starts_with("lib") && !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.')).then(|| format!("{stem}.so"))
}

/// `nvcc --version`'s release line; an error unless it is the release assembled.
fn nvcc_version(root: &Path) -> Result<String> {
    let nvcc = root.join("bin/nvcc");
    let out = Command::new(&nvcc).arg("--version").output().with_context(|| format!("cannot run {}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.contains("release")) {
        Some(line) if out.status.success() && line.contains(NVCC_RELEASE) => Ok(line.trim().to_string()),
        _ => bail!("{} --version did not report {NVCC_RELEASE}: {text}", nvcc.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_libraries_get_an_unversioned_link() {
        assert_eq!(unversioned_name("libcudart.so.13").as_deref(), Some("libcudart.so"));
        assert_eq!(unversioned_name("libcublasLt.so.13").as_deref(), Some("libcublasLt.so"));
        assert_eq!(unversioned_name("libnvvm.so.4.0.1").as_deref(), Some("libnvvm.so"));
        for not in ["libcudart_static.a", "libcudart.so", "cmake", "libfoo.so.x1"] {
            assert_eq!(unversioned_name(not), None, "{not}");
        }
    }

    #[test]
    fn every_wheel_is_one_cuda_release() {
        // Mixed releases build, then fail at run time on symbol versions: keep them together.
        for (name, version) in WHEELS {
            assert!(version.starts_with("13.0."), "{name}=={version}");
        }
        assert!(marker_text().lines().count() == WHEELS.len());
    }
}
