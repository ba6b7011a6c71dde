//! Runs CMake on the plan, in a build folder keyed by the plan's hash.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::plan::BuildPlan;

/// Where a finished build lives: `lib/` holds the static libraries, `build/` the CMake tree.
pub struct Installed {
    pub root: PathBuf,
}

impl Installed {
    pub fn lib_dirs(&self) -> Vec<PathBuf> {
        ["lib", "lib64"].iter().map(|d| self.root.join(d)).filter(|d| d.is_dir()).collect()
    }

    pub fn cmake_cache(&self) -> PathBuf {
        self.root.join("build/CMakeCache.txt")
    }

    /// The flags CMake really gave the CPU backend, -march=native and OpenMP included.
    pub fn ggml_cpu_flags_file(&self) -> PathBuf {
        self.root.join("build/ggml/src/CMakeFiles/ggml-cpu.dir/flags.make")
    }

    /// The same for each of ggml's CPU variants (GGML_CPU_ALL_VARIANTS: `ggml-cpu-haswell`, ...):
    /// the variant and its file, in name order; none without variants. Only targets of the last
    /// configure count (CMake lists them anew each time; a folder may keep older ones).
    pub fn cpu_variant_flags_files(&self) -> Vec<(String, PathBuf)> {
        let listed = std::fs::read_to_string(self.root.join("build/CMakeFiles/TargetDirectories.txt")).unwrap_or_default();
        let mut files: Vec<(String, PathBuf)> = listed
            .lines()
            .map(|line| PathBuf::from(line.trim()))
            .filter_map(|dir| {
                let name = dir.file_name()?.to_string_lossy().into_owned();
                let variant = name.strip_prefix("ggml-cpu-")?.strip_suffix(".dir")?;
                // `ggml-cpu-<variant>-feats`: the variant's feature check, compiled without its
                // instruction sets.
                (!variant.ends_with("-feats")).then(|| (variant.to_owned(), dir.join("flags.make")))
            })
            .filter(|(_, file)| file.is_file())
            .collect();
        files.sort();
        files
    }
}

/// The build folder of flag set `key`. `cache` is LLAMA_SYS_BUILD_CACHE when set (the workspace
/// sets it, so debug, release and tuning builds share one folder per flag set), else OUT_DIR as
/// for any -sys crate.
pub fn root(cache: Option<&Path>, out_dir: &Path, key: &str) -> PathBuf {
    match cache {
        Some(cache) => cache.join(key),
        None => out_dir.join("llama.cpp"),
    }
}

/// `project_include`: a CMake script run at the tree's `project()` (CMAKE_PROJECT_INCLUDE).
pub fn build(plan: &BuildPlan, source: &Path, root: PathBuf, project_include: Option<&Path>) -> Installed {
    std::fs::create_dir_all(&root).unwrap_or_else(|e| crate::fail(&format!("cannot create {}: {e}", root.display())));
    // Two cargo invocations (say, `cargo test` and `cargo build --release`) may build the same
    // flag set at once; the second waits instead of corrupting the first's tree.
    let lock = File::create(root.join(".lock")).unwrap_or_else(|e| crate::fail(&format!("cannot lock {}: {e}", root.display())));
    lock.lock().unwrap_or_else(|e| crate::fail(&format!("cannot lock {}: {e}", root.display())));

    let mut config = cmake::Config::new(source);
    // The plan also defines CMAKE_BUILD_TYPE; the profile keeps the cmake crate in step with it.
    // No default flags: the cc crate would add cargo's -O0/-g for debug builds, making the
    // debug and release builds of one flag set differ for nothing.
    config.profile("Release").no_default_flags(true).out_dir(&root);
    for (k, v) in &plan.defines {
        config.define(k, v);
    }
    if let Some(script) = project_include {
        config.define("CMAKE_PROJECT_INCLUDE", script);
    }
    for flag in &plan.c_flags {
        config.cflag(flag);
    }
    for flag in &plan.cxx_flags {
        config.cxxflag(flag);
    }
    config.build();
    drop(lock);
    Installed { root }
}
