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
    /// The folder, its CPU module (None on platforms where ggml chose it), and what became of
    /// its other backends' modules.
    From(PathBuf, Option<CpuVariant>, Vec<BackendModule>),
    /// The folder held CPU modules, but none could be chosen or loaded.
    Refused(PathBuf, CpuVariantError, Vec<BackendModule>),
}

/// A module of a backend other than the CPU's (CUDA's) in the folder, and what became of it: a
/// bundle built with CUDA carries `libggml-cuda.so` to machines with and without the CUDA
/// runtime and a GPU, and this says which it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendModule {
    /// ggml's name of the backend: `cuda`, `vulkan`, ...
    pub backend: &'static str,
    /// The module registered with ggml, or (none was) the first of the backend's modules.
    pub path: PathBuf,
    /// Why it was not registered (the loader's message: a library it needs is missing); None
    /// when it was. A registered module may still have found no device (a CUDA runtime without
    /// a GPU or driver): [`crate::devices`] lists what it found.
    pub error: Option<String>,
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
        Loaded::From(dir, _, _) => Some(dir),
        _ => None,
    }
}

/// The CPU module that was loaded and why; None in a static build (its CPU code is built in).
pub fn cpu_variant() -> Option<&'static CpuVariant> {
    match loaded() {
        Loaded::From(_, variant, _) => variant.as_ref(),
        _ => None,
    }
}

/// Why the folder's CPU modules were refused ([`CPU_VARIANT_VAR`] names one this CPU cannot run,
/// or none runs here), with the folder.
pub fn refused() -> Option<(&'static Path, &'static CpuVariantError)> {
    match loaded() {
        Loaded::Refused(dir, error, _) => Some((dir, error)),
        _ => None,
    }
}

/// The folder's modules of backends other than the CPU's, each registered with ggml or not and
/// why (empty in a static build, or where ggml chose among the folder's modules itself).
pub fn other_modules() -> &'static [BackendModule] {
    match loaded() {
        Loaded::From(_, _, others) | Loaded::Refused(_, _, others) => others,
        Loaded::Nothing => &[],
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

/// ggml's backends other than the CPU's, in the order its `ggml_backend_load_all_from_path`
/// loads them (the CPU's comes last).
const FAMILIES: &[&str] =
    &["blas", "zendnn", "cann", "cuda", "hip", "metal", "rpc", "sycl", "vulkan", "virtgpu", "opencl", "hexagon", "musa", "openvino"];

/// Every backend of `dir` by ggml's rule for each (as `ggml_backend_load_all_from_path`): of
/// its variants (`libggml-cpu-haswell.so`), the first with the highest score on this machine;
/// none scoring, its module without a variant (`libggml-cuda.so`), if that loads. The CPU's
/// as [`cpu_variant`] says, then an out-of-tree module named by ggml's `GGML_BACKEND_PATH`.
/// On x86-64 only: opening a variant to read its score runs its initialisers, which llama.cpp's
/// own x86-64 releases rely on being safe on every CPU, and which is not so on every
/// architecture (llama.cpp #14286: PowerPC variants fault when opened); elsewhere ggml loads
/// the folder itself.
#[cfg(all(unix, target_arch = "x86_64"))]
fn load_folder(dir: PathBuf) -> Loaded {
    use super::cpu_variant::choose;
    let modules = modules_of(&dir);
    let candidates = |family: &str| -> Vec<CpuCandidate> {
        modules
            .iter()
            .filter(|(f, _, _)| f == family)
            .map(|(_, variant, path)| {
                // A module without a variant is not scored (ggml's rule): it only has to open.
                let probe = unix::probe(path, !variant.is_empty());
                CpuCandidate { name: variant.clone(), path: path.clone(), score: probe.score, load_error: probe.error }
            })
            .collect()
    };
    // Only the families the folder has modules of: for the others there is nothing to choose.
    // One whose modules do not open (CUDA's on a machine without the CUDA runtime) is skipped,
    // and `other_modules` says why; the engine says when a GPU was asked for and none answered.
    let mut others = Vec::new();
    for &family in FAMILIES.iter().filter(|family| modules.iter().any(|(f, _, _)| f == *family)) {
        let candidates = candidates(family);
        let (path, error) = match choose(candidates.clone(), None, &dir) {
            Ok(choice) if register(&choice.chosen.path) => (choice.chosen.path, None),
            Ok(choice) => (choice.chosen.path, Some(NOT_REGISTERED.to_owned())),
            Err(_) => (candidates[0].path.clone(), Some(why_none_opened(&candidates))),
        };
        others.push(BackendModule { backend: family, path, error });
    }
    let forced = std::env::var(CPU_VARIANT_VAR).ok().filter(|v| !v.is_empty());
    let loaded = match choose(candidates("cpu"), forced.as_deref(), &dir) {
        Ok(variant) if register(&variant.chosen.path) => Loaded::From(dir, Some(variant), others),
        Ok(variant) => Loaded::Refused(
            dir,
            CpuVariantError::LoadFailed { path: variant.chosen.path.display().to_string(), reason: NOT_REGISTERED.into() },
            others,
        ),
        Err(error) => Loaded::Refused(dir, error, others),
    };
    if let Some(path) = std::env::var_os("GGML_BACKEND_PATH") {
        register(Path::new(&path));
    }
    loaded
}

/// Elsewhere ggml chooses among the folder's modules itself; EXSA_CPU_VARIANT is refused.
#[cfg(not(all(unix, target_arch = "x86_64")))]
fn load_folder(dir: PathBuf) -> Loaded {
    if let Some(name) = std::env::var(CPU_VARIANT_VAR).ok().filter(|v| !v.is_empty()) {
        return Loaded::Refused(dir, CpuVariantError::NotHere { name }, Vec::new());
    }
    if let Some(c_dir) = c_path(&dir) {
        // SAFETY: a NUL-terminated path that outlives the call; ggml registers what it loads
        // for the rest of the process. Called once, under the init OnceLock.
        unsafe { sys::ggml_backend_load_all_from_path(c_dir.as_ptr()) };
    }
    Loaded::From(dir, None, Vec::new())
}

/// Why a module that opened and was chosen is not in use: ggml refused it.
const NOT_REGISTERED: &str = "ggml did not register it (its log says why)";

/// Why none of a backend's modules was chosen: each one's reason (the loader's message), or
/// that it does not run on this machine.
#[cfg(all(unix, target_arch = "x86_64"))]
fn why_none_opened(candidates: &[CpuCandidate]) -> String {
    let reasons: Vec<String> = candidates
        .iter()
        .map(|c| {
            let file = c.path.file_name().unwrap_or_default().to_string_lossy();
            match &c.load_error {
                // The loader names the module itself when the module is what it could not read.
                Some(error) if error.contains(&*file) => error.clone(),
                Some(error) => format!("{file}: {error}"),
                None => format!("{file}: it does not run on this machine (score {})", c.score.unwrap_or(0)),
            }
        })
        .collect();
    reasons.join("; ")
}

/// `path` for C: its bytes as the OS has them, NUL-terminated (None if it holds a NUL).
fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

/// Registers the module at `path` with ggml; whether it did.
fn register(path: &Path) -> bool {
    let Some(c_path) = c_path(path) else { return false };
    // SAFETY: a NUL-terminated path that outlives the call. ggml loads the library, checks its
    // score and API version and registers it for the rest of the process, or returns null
    // (logged, nothing registered). Called from `load`, once, under the init OnceLock.
    !unsafe { sys::ggml_backend_load(c_path.as_ptr()) }.is_null()
}

#[cfg(all(unix, target_arch = "x86_64"))]
mod unix {
    use std::ffi::{CStr, c_int};
    use std::path::Path;

    /// What opening a module told.
    pub(super) struct Probe {
        /// Its `ggml_backend_score()` on this machine when asked for and it has one (0: it
        /// cannot run here).
        pub score: Option<i32>,
        /// Why it did not open (dlerror: a library it needs is missing, it is no library).
        pub error: Option<String>,
    }

    /// Opens the module at `path` and closes it again, reading its score if `score`.
    pub(super) fn probe(path: &Path, score: bool) -> Probe {
        let Some(c_path) = super::c_path(path) else { return Probe { score: None, error: Some("a path with a NUL byte".into()) } };
        // SAFETY: dlopen of a NUL-terminated path; the handle is closed below. This runs the
        // module's initialisers, as ggml's own choice (`ggml_backend_load_best`) does: the
        // folder's modules are trusted to be ggml's (the folder is the program's own, its
        // `../lib`, the build's, or EXSA_BACKEND_DIR), whose x86-64 variants open on every
        // x86-64 CPU (what llama.cpp's releases rely on); nothing else of one is run unless
        // its score vouches for this CPU.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns null or a NUL-terminated message valid until the next dl
            // call on this thread; it is copied before any.
            let error = unsafe {
                let message = libc::dlerror();
                if message.is_null() { "dlopen failed".to_owned() } else { CStr::from_ptr(message).to_string_lossy().into_owned() }
            };
            return Probe { score: None, error: Some(error) };
        }
        let mut read = None;
        if score {
            // SAFETY: a live handle and a NUL-terminated name.
            let symbol = unsafe { libc::dlsym(handle, c"ggml_backend_score".as_ptr()) };
            if !symbol.is_null() {
                // SAFETY: ggml's modules export `ggml_backend_score` as `int (*)(void)`
                // (GGML_BACKEND_DL_SCORE_IMPL); it reads CPUID and never unwinds.
                let f: extern "C" fn() -> c_int = unsafe { std::mem::transmute(symbol) };
                read = Some(f());
            }
        }
        // SAFETY: the handle from dlopen above, closed once; nothing of it is used after.
        unsafe { libc::dlclose(handle) };
        Probe { score: read, error: None }
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

/// The backend and variant a module's file name says, in ggml's form for this platform
/// (`lib` and `.so`; on Windows `.dll` without `lib`): `libggml-cpu-haswell.so` -> ("cpu",
/// "haswell"), `libggml-cuda.so` -> ("cuda", ""); None for files ggml would not load
/// (`libggml-rpc.so.1`, `libggml-cpu-.so`, `notes.txt`).
fn module_name(file: &str) -> Option<(&str, &str)> {
    let (prefix, extension) = if cfg!(windows) { ("ggml-", ".dll") } else { ("libggml-", ".so") };
    let name = file.strip_prefix(prefix)?.strip_suffix(extension)?;
    match name.split_once('-') {
        Some((family, variant)) if !family.is_empty() && !variant.is_empty() => Some((family, variant)),
        Some(_) => None,
        None => (!name.is_empty()).then_some((name, "")),
    }
}

/// Whether `dir` has a module of backend `name` (`libggml-cuda.so`, `libggml-cpu-haswell.so`).
pub fn has_module(dir: &Path, name: &str) -> bool {
    modules_of(dir).iter().any(|(family, _, _)| family == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_found_by_backend_name() {
        let dir = std::env::temp_dir().join(format!("exsa-modules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["libggml-cpu-haswell.so", "libggml-cuda.so", "libggml-base.so", "libggml-rpc.so.1", "ggml-vulkan.so", "notes.txt"] {
            std::fs::write(dir.join(file), b"").unwrap();
        }
        assert!(has_module(&dir, "cpu"));
        assert!(has_module(&dir, "cuda"));
        // A versioned file name is not a module ggml loads.
        assert!(!has_module(&dir, "rpc"));
        assert_eq!(module_name("libggml-cpu-armv8.2_1.so"), Some(("cpu", "armv8.2_1")));
        assert_eq!(module_name("libggml-cpu.so"), Some(("cpu", "")));
        for other in ["libggml-cpu-.so", "libggml-.so", "libggml-cpu-x64.so.0", "libllama.so", "ggml-cuda.dll", "libggml-cpu.dylib", "notes.txt"] {
            assert_eq!(module_name(other), None, "{other}");
        }
        assert!(!has_module(&dir, "metal"));
        assert!(!has_module(&dir, "vulkan"), "not ggml's file name for a module on this platform");
        assert!(!has_module(&dir.join("missing"), "cpu"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
