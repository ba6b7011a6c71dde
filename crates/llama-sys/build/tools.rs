//! The external programs the build needs, checked up front so a missing one costs one clear line
//! instead of a CMake or bindgen backtrace minutes into the build.

use std::path::PathBuf;
use std::process::Command;

const SETUP_HINT: &str = "run `cargo xtask setup`";

pub fn require_cmake() {
    let cmake = std::env::var("CMAKE").unwrap_or_else(|_| "cmake".into());
    if !Command::new(&cmake).arg("--version").output().is_ok_and(|o| o.status.success()) {
        crate::fail(&format!(
            "cmake not found (`{cmake} --version` failed): {SETUP_HINT}, or install it (apt-get install cmake / brew install cmake)"
        ));
    }
}

pub fn require_libclang() {
    // bindgen loads libclang at run time and panics with a page of text when it is missing.
    let quiet_panics = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(bindgen::clang_version).is_ok();
    std::panic::set_hook(quiet_panics);
    if !found {
        crate::fail(&format!(
            "libclang not found (bindgen needs it): {SETUP_HINT}, or install it (apt-get install libclang-dev / brew install llvm) or set LIBCLANG_PATH"
        ));
    }
}

/// ccache when it is installed, unless LLAMA_SYS_CCACHE=off.
pub fn ccache() -> Option<String> {
    let disabled = crate::env::var("LLAMA_SYS_CCACHE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "0" | "off" | "false" | "no"));
    if disabled {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(if cfg!(windows) { "ccache.exe" } else { "ccache" }))
        .find(|p| p.is_file())
        .map(|p: PathBuf| p.display().to_string())
}

/// The first line of `<compiler> --version`, for the build info.
pub fn compiler_version(compiler: &str) -> String {
    Command::new(compiler)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}
