//! Finding libclang the way bindgen finds it.
//!
//! bindgen loads libclang at run time through clang-sys, which accepts only the C library
//! (`libclang.so`, `libclang-<version>.so[.N]`, `libclang.so.N`, `libclang.dylib`) and never
//! `libclang-cpp` (LLVM's C++ API library, which Debian installs with unrelated packages). A check
//! that accepted any `libclang*` file once told a fresh Debian machine that libclang was present
//! when only `libclang-cpp.so.14` was, and every build then failed in bindgen. The rules below are
//! clang-sys' (1.x, `runtime` feature, as bindgen enables it), kept pure so tests can feed them
//! file names.

use std::path::{Path, PathBuf};

/// The platform whose naming rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
}

impl Os {
    pub fn host() -> Os {
        if cfg!(target_os = "macos") { Os::MacOs } else { Os::Linux }
    }
}

/// Whether clang-sys would load a file of this name as libclang.
pub fn accepts(file_name: &str, os: Os) -> bool {
    // `libclang-cpp.so.14`, `libclang-cpp.dylib`: the C++ library that matches `libclang-*`.
    if file_name.contains("-cpp.") {
        return false;
    }
    match os {
        Os::MacOs => file_name == "libclang.dylib",
        Os::Linux => {
            let Some(rest) = file_name.strip_prefix("libclang") else { return false };
            if rest == ".so" || rest.starts_with(".so.") {
                return true;
            }
            // `libclang-<anything>.so` or `libclang-<anything>.so.<anything>`
            rest.strip_prefix('-').is_some_and(|r| r.ends_with(".so") || r.contains(".so."))
        }
    }
}

/// The version numbers a file name carries (`libclang-14.so.1` → [14, 1]), for choosing the
/// newest of several, as clang-sys does.
pub fn version(file_name: &str) -> Vec<u32> {
    file_name.trim_start_matches("libclang").split(['-', '.']).filter_map(|part| part.parse().ok()).collect()
}

/// The libclang clang-sys would pick among `found` (directory order = preference): the highest
/// version, the earliest directory on a tie.
pub fn best(found: &[PathBuf]) -> Option<PathBuf> {
    let mut best: Option<(&PathBuf, Vec<u32>)> = None;
    for path in found {
        let v = version(&path.file_name().unwrap_or_default().to_string_lossy());
        if best.as_ref().is_none_or(|(_, bv)| v > *bv) {
            best = Some((path, v));
        }
    }
    best.map(|(p, _)| p.clone())
}

/// What the search reads from the environment, gathered so tests can give their own.
#[derive(Clone, Debug, Default)]
pub struct SearchEnv {
    /// `LIBCLANG_PATH`: a folder or the library itself; when set, nothing else is searched.
    pub libclang_path: Option<PathBuf>,
    /// `llvm-config --prefix`.
    pub llvm_prefix: Option<PathBuf>,
    /// `xcode-select --print-path` (macOS).
    pub xcode: Option<PathBuf>,
    pub ld_library_path: Vec<PathBuf>,
    pub library_path: Vec<PathBuf>,
}

impl SearchEnv {
    pub fn from_process() -> SearchEnv {
        let paths = |var: &str| std::env::var_os(var).map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
        SearchEnv {
            libclang_path: std::env::var_os("LIBCLANG_PATH").filter(|v| !v.is_empty()).map(PathBuf::from),
            llvm_prefix: first_line_of("llvm-config", &["--prefix"]).map(PathBuf::from),
            xcode: if cfg!(target_os = "macos") { first_line_of("xcode-select", &["--print-path"]).map(PathBuf::from) } else { None },
            ld_library_path: paths("LD_LIBRARY_PATH"),
            library_path: paths("LIBRARY_PATH"),
        }
    }
}

fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).output().ok().filter(|o| o.status.success())?;
    String::from_utf8(out.stdout).ok()?.lines().next().map(str::to_string)
}

/// clang-sys' system folders, in its order of preference.
fn system_patterns(os: Os) -> &'static [&'static str] {
    match os {
        Os::Linux => {
            &["/usr/local/llvm*/lib*", "/usr/local/lib*/*/*", "/usr/local/lib*/*", "/usr/local/lib*", "/usr/lib*/*/*", "/usr/lib*/*", "/usr/lib*"]
        }
        Os::MacOs => &[
            "/usr/local/opt/llvm*/lib/llvm*/lib",
            "/Library/Developer/CommandLineTools/usr/lib",
            "/Applications/Xcode.app/Contents/Developer/Toolchains/XcodeDefault.xctoolchain/usr/lib",
            "/usr/local/opt/llvm*/lib",
            // Homebrew on Apple silicon; clang-sys finds it through `llvm-config` when brew's
            // llvm is on PATH, and we install it without linking it there.
            "/opt/homebrew/opt/llvm/lib",
        ],
    }
}

/// The folders to search, in order (the environment's first, then the system's).
pub fn search_dirs(env: &SearchEnv, os: Os) -> Vec<PathBuf> {
    if let Some(path) = &env.libclang_path {
        // A file names itself; a folder is searched alone.
        return vec![if path.is_file() { path.parent().unwrap_or(path).to_path_buf() } else { path.clone() }];
    }
    let mut dirs = Vec::new();
    if let Some(prefix) = &env.llvm_prefix {
        dirs.extend(["bin", "lib", "lib64"].map(|d| prefix.join(d)));
    }
    if let Some(xcode) = &env.xcode {
        dirs.push(xcode.join("Toolchains/XcodeDefault.xctoolchain/usr/lib"));
    }
    dirs.extend(env.ld_library_path.iter().cloned());
    dirs.extend(env.library_path.iter().cloned());
    for pattern in system_patterns(os) {
        if let Ok(paths) = glob::glob(pattern) {
            dirs.extend(paths.flatten().filter(|p| p.is_dir()));
        }
    }
    dirs
}

/// The accepted libclang files in `dirs`, in folder order.
pub fn candidates(dirs: &[PathBuf], os: Os, list: impl Fn(&Path) -> Vec<String>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in dirs {
        let mut names: Vec<String> = list(dir).into_iter().filter(|n| accepts(n, os)).collect();
        names.sort();
        found.extend(names.into_iter().map(|n| dir.join(n)));
    }
    found
}

/// The libclang bindgen would load on this machine, if any.
pub fn find(env: &SearchEnv, os: Os) -> Option<PathBuf> {
    let dirs = search_dirs(env, os);
    let list = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
    };
    let found = candidates(&dirs, os, list);
    // LIBCLANG_PATH naming a file: that file, if clang-sys would accept it.
    if let Some(path) = env.libclang_path.as_ref().filter(|p| p.is_file()) {
        return found.iter().find(|f| *f == path).cloned();
    }
    best(&found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_cpp_library_is_not_libclang() {
        // The fresh Debian 12 machine of issue 11: libclang-cpp14 installed, libclang-14 not.
        for name in ["libclang-cpp.so.14", "libclang-cpp.so", "libclang-cpp.dylib", "libclang-cpp.so.18.1"] {
            assert!(!accepts(name, Os::Linux) && !accepts(name, Os::MacOs), "{name}");
        }
        let dirs = vec![PathBuf::from("/usr/lib/x86_64-linux-gnu")];
        let found = candidates(&dirs, Os::Linux, |_| names(&["libclang-cpp.so.14", "libLLVM-14.so.1", "libc.so.6", "libclangBasic.a"]));
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(best(&found), None);
    }

    #[test]
    fn the_c_library_is_found_in_its_debian_and_macos_names() {
        for name in ["libclang.so", "libclang-14.so", "libclang-14.so.1", "libclang.so.1", "libclang-14.so.14.0.6", "libclang.so.18.1"] {
            assert!(accepts(name, Os::Linux), "{name}");
        }
        assert!(accepts("libclang.dylib", Os::MacOs));
        for name in ["libclang.a", "libclang.so", "libclang.so.1", "libclangAST.dylib", "libclang.dylib.bak"] {
            assert!(!accepts(name, Os::MacOs), "{name}");
        }
        for name in ["libclang.a", "libclangAST.a", "libclangAST.so.14", "libclang_rt.asan-x86_64.so", "libclang.dylib"] {
            assert!(!accepts(name, Os::Linux), "{name}");
        }
    }

    #[test]
    fn the_newest_version_wins_and_then_the_first_folder() {
        let dirs = vec![PathBuf::from("/usr/lib/llvm-14/lib"), PathBuf::from("/usr/lib/llvm-16/lib"), PathBuf::from("/usr/lib/x86_64-linux-gnu")];
        let found = candidates(&dirs, Os::Linux, |d| match d.to_str().unwrap() {
            "/usr/lib/llvm-14/lib" => names(&["libclang-14.so.1", "libclang-cpp.so.14", "libclang.so.1"]),
            "/usr/lib/llvm-16/lib" => names(&["libclang-16.so.1", "libclang-cpp.so.16"]),
            _ => names(&["libclang-16.so.1", "libclang-cpp.so.16"]),
        });
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(best(&found), Some(PathBuf::from("/usr/lib/llvm-16/lib/libclang-16.so.1")));
        assert_eq!(version("libclang-14.so.14.0.6"), vec![14, 14, 0, 6]);
        assert_eq!(version("libclang.so"), Vec::<u32>::new());
    }

    #[test]
    fn libclang_path_is_searched_alone() {
        let env = SearchEnv { libclang_path: Some(PathBuf::from("/opt/llvm/lib")), llvm_prefix: Some("/usr".into()), ..Default::default() };
        assert_eq!(search_dirs(&env, Os::Linux), vec![PathBuf::from("/opt/llvm/lib")]);
        let env = SearchEnv { llvm_prefix: Some("/usr/lib/llvm-14".into()), ld_library_path: vec!["/x".into()], ..Default::default() };
        let dirs = search_dirs(&env, Os::Linux);
        assert_eq!(&dirs[..4], &[PathBuf::from("/usr/lib/llvm-14/bin"), "/usr/lib/llvm-14/lib".into(), "/usr/lib/llvm-14/lib64".into(), "/x".into()]);
    }
}
