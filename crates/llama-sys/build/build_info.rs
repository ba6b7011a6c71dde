//! The build info the crate exports: what exactly was compiled, so every benchmark row can say
//! what it measured.

use std::fmt::Write as _;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::cmake_build::Installed;
use crate::plan::{BuildPlan, is_path_map};
use crate::source::Source;
use crate::tools;

pub struct BuildInfo {
    pub llama_cpp: String,
    pub build_number: u32,
    pub upstream_commit: String,
    pub source_dir: String,
    pub target: String,
    pub switches: Vec<(String, bool)>,
    pub defines: Vec<(String, String)>,
    pub c_flags: String,
    pub cxx_flags: String,
    pub ggml_cpu_flags: String,
    pub cpu_variant_flags: Vec<(String, String)>,
    pub c_compiler: String,
    pub cxx_compiler: String,
    pub tuned_profile: String,
}

/// What a relocatable build records instead of a folder of the build machine.
const NOT_RECORDED: &str = "(not recorded: relocatable build)";

/// Definitions whose values are folders of the build machine (the CUDA toolkit's).
const TOOLKIT_PATHS: &[&str] = &["CUDAToolkit_ROOT", "CMAKE_CUDA_COMPILER"];

/// Compiler flags as recorded: a relocatable build leaves out its path maps
/// (`-ffile-prefix-map=/build/folder=...`, and nvcc's `-Xcompiler=` list of them), which change
/// no code and name the build's folders.
fn recorded_flags(plan: &BuildPlan, flags: &str) -> String {
    if !plan.relocatable {
        return flags.trim().to_string();
    }
    let path_maps = |f: &str| is_path_map(f) || f.strip_prefix("-Xcompiler=").is_some_and(|list| list.split(',').all(is_path_map));
    flags.split_whitespace().filter(|f| !path_maps(f)).collect::<Vec<_>>().join(" ")
}

impl BuildInfo {
    pub fn collect(plan: &BuildPlan, source: &Source, target: &str, installed: &Installed, profile: &crate::profile::Profile) -> BuildInfo {
        let cache = std::fs::read_to_string(installed.cmake_cache()).unwrap_or_default();
        let cache_var = |name: &str| {
            cache
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .and_then(|r| r.split_once('=').map(|(_, v)| v.trim().to_string()))
                .unwrap_or_default()
        };
        let compiler = |lang: &str| {
            let path = cache_var(&format!("CMAKE_{lang}_COMPILER"));
            format!("{path} ({})", tools::compiler_version(&path))
        };
        let cxx_flags_of = |flags_make: &Path| {
            std::fs::read_to_string(flags_make)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("CXX_FLAGS = ").map(|f| recorded_flags(plan, f)))
                .unwrap_or_default()
        };
        BuildInfo {
            llama_cpp: source.pin.describe(),
            build_number: source.pin.build_number.unwrap_or(0),
            upstream_commit: if source.pin.upstream_commit.is_empty() { "unknown".into() } else { source.pin.upstream_commit.clone() },
            // A relocatable build keeps the build machine's folders out of the program.
            source_dir: if plan.relocatable { NOT_RECORDED.into() } else { source.dir.display().to_string() },
            target: target.to_string(),
            switches: plan.switches.iter().map(|(s, on)| (s.to_string(), *on)).collect(),
            defines: plan
                .defines
                .iter()
                .map(|(k, v)| {
                    let recorded = match k.as_str() {
                        _ if plan.relocatable && TOOLKIT_PATHS.contains(&k.as_str()) => NOT_RECORDED.into(),
                        "CMAKE_CUDA_FLAGS" => recorded_flags(plan, v),
                        _ => v.clone(),
                    };
                    (k.clone(), recorded)
                })
                .collect(),
            c_flags: recorded_flags(plan, &format!("{} {}", cache_var("CMAKE_C_FLAGS"), cache_var("CMAKE_C_FLAGS_RELEASE"))),
            cxx_flags: recorded_flags(plan, &format!("{} {}", cache_var("CMAKE_CXX_FLAGS"), cache_var("CMAKE_CXX_FLAGS_RELEASE"))),
            ggml_cpu_flags: cxx_flags_of(&installed.ggml_cpu_flags_file()),
            cpu_variant_flags: installed.cpu_variant_flags_files().iter().map(|(variant, file)| (variant.clone(), cxx_flags_of(file))).collect(),
            c_compiler: compiler("C"),
            cxx_compiler: compiler("CXX"),
            tuned_profile: profile.path.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string()),
        }
    }

    /// A short hash of everything above: two builds with the same hash compiled the same thing.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{}|{}|{}|{:?}|{:?}|{}|{}|{}|{}|{}|{}",
            self.llama_cpp,
            self.build_number,
            self.target,
            self.switches,
            self.defines,
            self.c_flags,
            self.cxx_flags,
            self.ggml_cpu_flags,
            self.c_compiler,
            self.cxx_compiler,
            self.tuned_profile
        ));
        // Appended only where there are variants, so a build without them keeps the hash it had
        // before they were recorded.
        if !self.cpu_variant_flags.is_empty() {
            h.update(format!("|{:?}", self.cpu_variant_flags));
        }
        hex(&h.finalize())[..12].to_string()
    }

    /// Rust source for `OUT_DIR/build_info.rs`, included by the library.
    pub fn write(&self, out_dir: &Path) {
        let mut s = String::new();
        let pairs = |v: &[(String, String)]| v.iter().map(|(k, v)| format!("({k:?}, {v:?})")).collect::<Vec<_>>().join(", ");
        let switches = self.switches.iter().map(|(k, v)| format!("({k:?}, {v})")).collect::<Vec<_>>().join(", ");
        writeln!(
            s,
            "/// What this build of llama.cpp is, and how it was compiled.\npub const BUILD_INFO: BuildInfo = BuildInfo {{\n    llama_cpp: {:?},\n    build_number: {},\n    upstream_commit: {:?},\n    source_dir: {:?},\n    target: {:?},\n    switches: &[{switches}],\n    cmake_defines: &[{}],\n    c_flags: {:?},\n    cxx_flags: {:?},\n    ggml_cpu_flags: {:?},\n    cpu_variant_flags: &[{}],\n    c_compiler: {:?},\n    cxx_compiler: {:?},\n    tuned_profile: {:?},\n    hash: {:?},\n}};",
            self.llama_cpp,
            self.build_number,
            self.upstream_commit,
            self.source_dir,
            self.target,
            pairs(&self.defines),
            self.c_flags,
            self.cxx_flags,
            self.ggml_cpu_flags,
            pairs(&self.cpu_variant_flags),
            self.c_compiler,
            self.cxx_compiler,
            self.tuned_profile,
            self.hash(),
        )
        .expect("formatting into a String cannot fail");
        let path = out_dir.join("build_info.rs");
        std::fs::write(&path, s).unwrap_or_else(|e| crate::fail(&format!("cannot write {}: {e}", path.display())));
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
