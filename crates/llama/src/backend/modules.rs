//! Dynamic-backend builds (llama-sys' `backend-dl` switch): every ggml backend, the CPU's too, is
//! a shared module (`libggml-cpu.so`, `libggml-cuda.so`, ...) loaded when the process starts
//! using llama.cpp. A module that cannot load (CUDA's, on a machine without the CUDA runtime or
//! a GPU) is skipped, so one binary runs everywhere and uses a GPU where there is one.
//!
//! Where the modules are looked for, first folder holding a CPU module wins:
//! 1. `EXSA_BACKEND_DIR`, when set (only there);
//! 2. the running program's folder, then its `../lib` (a bundle or an install);
//! 3. the folder this build's CMake installed them into (development builds, `cargo test`).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::sys;

/// Names the folder to load backend modules from, instead of the search above.
pub const BACKEND_DIR_VAR: &str = "EXSA_BACKEND_DIR";

static LOADED_FROM: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Whether this build loads its backends as modules.
pub fn is_dynamic() -> bool {
    sys::BUILD_INFO.switch("backend-dl") == Some(true)
}

/// The folder the backend modules were loaded from; None in a static build, or when no folder
/// held a CPU module (then nothing can run: [`crate::Model::load`] says so).
pub fn loaded_from() -> Option<&'static Path> {
    super::init();
    LOADED_FROM.get().and_then(Option::as_deref)
}

/// The folders searched, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(BACKEND_DIR_VAR) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("../lib"));
        dirs.insert(0, exe_dir);
    }
    if let Some(built) = sys::BACKEND_DIR {
        dirs.push(PathBuf::from(built));
    }
    dirs
}

/// Loads every module of the first folder that has a CPU module. Called once, by
/// [`crate::backend::init`].
pub(crate) fn load() {
    LOADED_FROM.get_or_init(|| {
        if !is_dynamic() {
            return None;
        }
        let dir = search_dirs().into_iter().find(|d| has_module(d, "cpu"))?;
        let c_dir = CString::new(dir.to_string_lossy().into_owned()).ok()?;
        // SAFETY: a NUL-terminated path that outlives the call; ggml registers what it loads
        // for the rest of the process. Called once, under the init OnceLock.
        unsafe { sys::ggml_backend_load_all_from_path(c_dir.as_ptr()) };
        Some(dir)
    });
}

/// Whether `dir` has a module of backend `name` (`libggml-cuda.so`, `libggml-cpu-haswell.so`,
/// `ggml-cpu.dll`, ...).
pub fn has_module(dir: &Path, name: &str) -> bool {
    let prefix = format!("ggml-{name}");
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(|e| e.ok()).any(|e| {
        let file = e.file_name().to_string_lossy().into_owned();
        let stem = file.strip_prefix("lib").unwrap_or(&file);
        let module = [".so", ".dylib", ".dll"].iter().any(|ext| stem.ends_with(ext));
        module && (stem.starts_with(&format!("{prefix}.")) || stem.starts_with(&format!("{prefix}-")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_found_by_backend_name() {
        let dir = std::env::temp_dir().join(format!("exsa-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["libggml-cpu-haswell.so", "ggml-cuda.dll", "libggml-base.so", "libggml-rpc.so.1", "notes.txt"] {
            std::fs::write(dir.join(file), b"").unwrap();
        }
        assert!(has_module(&dir, "cpu"));
        assert!(has_module(&dir, "cuda"));
        // A versioned file name is not a module ggml loads.
        assert!(!has_module(&dir, "rpc"));
        assert!(!has_module(&dir, "metal"));
        assert!(!has_module(&dir.join("missing"), "cpu"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
