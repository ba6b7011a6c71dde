//! llama.cpp's own programs as references (llama-server for bench-serve, llama-lookup for
//! bench-compare's speculation rows), built with CMake from the `llama-cpp-python` sdist on
//! PyPI, whose vendored llama.cpp is of a near-identical version to our pin, natively, under
//! `target/llama-server/` (one source tree and build directory for all of them).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{python, workspace};

const LLAMA_CPP_PYTHON: &str = "llama-cpp-python";
const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";

/// The program `target` (a CMake target: `llama-server`, `llama-lookup`), built once.
pub fn ensure(target: &str) -> Result<PathBuf> {
    let root = workspace::target_dir().join("llama-server");
    let binary = root.join("build").join("bin").join(target);
    if binary.is_file() {
        return Ok(binary);
    }
    let src = sdist_source()?;
    eprintln!("building {target} natively (minutes)");
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(&src).arg("-B").arg(root.join("build"));
    // ggml's AMX kernels crash when GCC builds them (docs/amx.md) and this tree is not patched:
    // off, on every CPU.
    configure.args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_NATIVE=ON",
        "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    ]);
    if let Some(ccache) = crate::setup::which("ccache") {
        configure.arg(format!("-DCMAKE_C_COMPILER_LAUNCHER={}", ccache.display())).arg(format!("-DCMAKE_CXX_COMPILER_LAUNCHER={}", ccache.display()));
    }
    workspace::run(&mut configure)?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()).to_string();
    workspace::run(Command::new("cmake").arg("--build").arg(root.join("build")).args(["--target", target, "-j", &jobs]))?;
    Ok(binary)
}

/// The llama.cpp tree the `llama-cpp-python` sdist vendors, unpacked once under
/// `target/llama-server/src/`: the reference programs build from it, and its `models/templates/`
/// is the chat template corpus the chat tests read (`.cargo/config.toml`'s EXSA_CHAT_TEMPLATES).
pub fn sdist_source() -> Result<PathBuf> {
    let root = workspace::target_dir().join("llama-server");
    let src = root.join("src");
    if src.join("CMakeLists.txt").is_file() {
        return Ok(src);
    }
    let download = root.join("sdist");
    std::fs::create_dir_all(&download)?;
    eprintln!("downloading the {LLAMA_CPP_PYTHON} {LLAMA_CPP_PYTHON_VERSION} sdist (it vendors llama.cpp)");
    workspace::run(
        python::python()
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "-d"])
            .arg(&download)
            .arg(format!("{LLAMA_CPP_PYTHON}=={LLAMA_CPP_PYTHON_VERSION}")),
    )?;
    let tarball = download.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"));
    workspace::run(Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(&download))?;
    let vendored = download.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}")).join("vendor").join("llama.cpp");
    std::fs::rename(&vendored, &src).with_context(|| format!("moving {} to {}", vendored.display(), src.display()))?;
    Ok(src)
}
