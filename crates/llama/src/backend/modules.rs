//! Dynamic-backend builds (llama-sys' `backend-dl` switch): every ggml backend, the CPU's too, is
//! a shared module (`libggml-cpu.so`, `libggml-cuda.so`, ...) loaded when the process starts
//! using llama.cpp. A module that cannot load (CUDA's, on a machine without the CUDA runtime or
//! a GPU) is skipped, so one binary runs everywhere and uses a GPU where there is one.
//!
//! Where the modules are looked for, first folder holding a CPU module wins:
//! 1. `EXSA_BACKEND_DIR`, when set (only there);
//! 2. the running program's folder, then its `../lib` (a bundle or an install);
//! 3. the folder this build's CMake installed them into (development builds, `cargo test`).
//!
//! Of each backend the folder has several modules of (a bundle's CPU variants, one per
//! instruction-set level), the one that scores best on this machine is loaded, as ggml's own
//! `ggml_backend_load_all_from_path` would; for the CPU, [`cpu_variant`] says which and why, and
//! [`CPU_VARIANT_VAR`] can name another.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use super::cpu_variant::{CPU_VARIANT_VAR, CpuCandidate, CpuChoice, CpuVariant, CpuVariantError, cpu_features};
use crate::sys;

/// Names the folder to load backend modules from, instead of the search above.
pub const BACKEND_DIR_VAR: &str = "EXSA_BACKEND_DIR";

/// What the process loaded, once.
#[derive(Debug)]
enum Loaded {
    /// A static build, or no folder held a CPU module.
    Nothing,
    /// The folder, and its CPU module (None on platforms where ggml chose it).
    From(PathBuf, Option<CpuVariant>),
    /// The folder held CPU modules, but none could be chosen or loaded.
    Refused(PathBuf, CpuVariantError),
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Whether this build loads its backends as modules.
pub fn is_dynamic() -> bool {
    sys::BUILD_INFO.switch("backend-dl") == Some(true)
}

fn loaded() -> &'static Loaded {
    super::init();
    LOADED.get().unwrap_or(&Loaded::Nothing)
}

/// The folder the backend modules were loaded from; None in a static build, or when no folder
/// held a CPU module or its CPU module was refused (then nothing can run: [`crate::Model::load`]
/// says so).
pub fn loaded_from() -> Option<&'static Path> {
    match loaded() {
        Loaded::From(dir, _) => Some(dir),
        _ => None,
    }
}

/// The CPU module that was loaded and why; None in a static build (its CPU code is built in).
pub fn cpu_variant() -> Option<&'static CpuVariant> {
    match loaded() {
        Loaded::From(_, variant) => variant.as_ref(),
        _ => None,
    }
}

/// Why the folder's CPU modules were refused ([`CPU_VARIANT_VAR`] names one this CPU cannot run,
/// or none runs here), with the folder.
pub fn refused() -> Option<(&'static Path, &'static CpuVariantError)> {
    match loaded() {
        Loaded::Refused(dir, error) => Some((dir, error)),
        _ => None,
    }
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

/// Loads the modules of the first folder that has a CPU module. Called once, by
/// [`crate::backend::init`].
pub(crate) fn load() {
    LOADED.get_or_init(|| {
        if !is_dynamic() {
            return Loaded::Nothing;
        }
        let Some(dir) = search_dirs().into_iter().find(|d| has_module(d, "cpu")) else { return Loaded::Nothing };
        load_folder(dir)
    });
}

/// Every backend of `dir`: the best module of each (the CPU's as [`cpu_variant`] chooses).
#[cfg(unix)]
fn load_folder(dir: PathBuf) -> Loaded {
    let modules = modules_of(&dir);
    let mut families: Vec<&str> = modules.iter().map(|(family, _, _)| family.as_str()).filter(|f| *f != "cpu" && *f != "base").collect();
    families.dedup();
    for family in families {
        // ggml's rule for each backend: the best score among its modules; none scoring, the
        // module without a variant (CUDA's has no score), which ggml loads only if it loads.
        let scored = modules.iter().filter(|(f, _, _)| f == family).map(|(_, variant, path)| (variant, path, unix::score(path)));
        let best = scored.filter(|(_, _, score)| score.unwrap_or(0) > 0).max_by_key(|(_, _, score)| *score).map(|(_, path, _)| path.clone());
        let path = best.or_else(|| modules.iter().find(|(f, v, _)| f == family && v.is_empty()).map(|(_, _, p)| p.clone()));
        if let Some(path) = path {
            // Silently skipped when it cannot load (CUDA's on a machine without the runtime).
            register(&path);
        }
    }
    let candidates = modules
        .iter()
        .filter(|(family, _, _)| family == "cpu")
        .map(|(_, variant, path)| CpuCandidate { name: variant.clone(), path: path.clone(), score: unix::score(path) })
        .collect();
    let forced = std::env::var(CPU_VARIANT_VAR).ok().filter(|v| !v.is_empty());
    match super::cpu_variant::choose(candidates, forced.as_deref(), &dir) {
        Ok(variant) if register(&variant.chosen.path) => Loaded::From(dir, Some(variant)),
        Ok(variant) => Loaded::Refused(dir, CpuVariantError::LoadFailed { path: variant.chosen.path.display().to_string() }),
        Err(error) => Loaded::Refused(dir, error),
    }
}

/// Elsewhere ggml chooses among the folder's modules itself.
#[cfg(not(unix))]
fn load_folder(dir: PathBuf) -> Loaded {
    if let Ok(c_dir) = CString::new(dir.to_string_lossy().into_owned()) {
        // SAFETY: a NUL-terminated path that outlives the call; ggml registers what it loads
        // for the rest of the process. Called once, under the init OnceLock.
        unsafe { sys::ggml_backend_load_all_from_path(c_dir.as_ptr()) };
    }
    Loaded::From(dir, None)
}

/// Registers the module at `path` with ggml; whether it did.
fn register(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.to_string_lossy().into_owned()) else { return false };
    // SAFETY: a NUL-terminated path that outlives the call. ggml loads the library, checks its
    // score and API version and registers it for the rest of the process, or returns null
    // (logged, nothing registered). Called from `load`, once, under the init OnceLock.
    !unsafe { sys::ggml_backend_load(c_path.as_ptr()) }.is_null()
}

#[cfg(unix)]
mod unix {
    use std::ffi::{CString, c_int};
    use std::path::Path;

    /// A module's `ggml_backend_score()` on this machine: 0 when it cannot run here; None when it
    /// has none, or does not load (its libraries missing: CUDA's without the runtime).
    pub(super) fn score(path: &Path) -> Option<i32> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: dlopen of a NUL-terminated path; the handle is closed below. Like ggml's own
        // choice (`ggml_backend_load_best`), this runs the module's initialisers: ggml builds
        // every variant's so that loading it runs on any CPU of the target, and only what the
        // score vouches for is ever called.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: a live handle and a NUL-terminated name.
        let symbol = unsafe { libc::dlsym(handle, c"ggml_backend_score".as_ptr()) };
        let score = (!symbol.is_null()).then(|| {
            // SAFETY: ggml's modules export `ggml_backend_score` as `int (*)(void)`
            // (GGML_BACKEND_DL_SCORE_IMPL); it reads CPUID and never unwinds (C++ without throw).
            let score: extern "C" fn() -> c_int = unsafe { std::mem::transmute(symbol) };
            score()
        });
        // SAFETY: the handle from dlopen above, closed once; nothing of it is used after.
        unsafe { libc::dlclose(handle) };
        score
    }
}

/// The backend modules of `dir` as (backend, variant, path), sorted by file name:
/// `libggml-cpu-haswell.so` is ("cpu", "haswell"), `libggml-cuda.so` ("cuda", "").
fn modules_of(dir: &Path) -> Vec<(String, String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut modules: Vec<(String, String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let (family, variant) = module_name(&file)?;
            Some((family.to_owned(), variant.to_owned(), e.path()))
        })
        .collect();
    modules.sort_by(|a, b| a.2.cmp(&b.2));
    modules
}

/// The backend and variant a module's file name says: `libggml-cpu-haswell.so` ->
/// ("cpu", "haswell"), `ggml-cuda.dll` -> ("cuda", ""); None for files ggml would not load
/// (`libggml-rpc.so.1`, `libggml-cpu-.so`, `notes.txt`).
fn module_name(file: &str) -> Option<(&str, &str)> {
    let stem = file.strip_prefix("lib").unwrap_or(file);
    let stem = [".so", ".dylib", ".dll"].iter().find_map(|ext| stem.strip_suffix(ext))?;
    let name = stem.strip_prefix("ggml-")?;
    match name.split_once('-') {
        Some((family, variant)) if !family.is_empty() && !variant.is_empty() => Some((family, variant)),
        Some(_) => None,
        None => (!name.is_empty()).then_some((name, "")),
    }
}

/// Whether `dir` has a module of backend `name` (`libggml-cuda.so`, `libggml-cpu-haswell.so`,
/// `ggml-cpu.dll`, ...).
pub fn has_module(dir: &Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(|e| e.ok()).any(|e| module_name(&e.file_name().to_string_lossy()).is_some_and(|(family, _)| family == name))
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
        assert_eq!(module_name("libggml-cpu-armv8.2_1.so"), Some(("cpu", "armv8.2_1")));
        assert_eq!(module_name("libggml-cpu.so"), Some(("cpu", "")));
        assert_eq!(module_name("ggml-cuda.dll"), Some(("cuda", "")));
        for other in ["libggml-cpu-.so", "libggml-.so", "libggml-cpu-x64.so.0", "libllama.so", "notes.txt"] {
            assert_eq!(module_name(other), None, "{other}");
        }
        assert!(!has_module(&dir, "metal"));
        assert!(!has_module(&dir.join("missing"), "cpu"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
