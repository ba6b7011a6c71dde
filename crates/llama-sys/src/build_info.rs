//! What was compiled: written by the build script, read by benchmarks and `info` commands.

use std::fmt::Write as _;

/// The configuration of the llama.cpp this crate links, exactly as CMake saw it.
#[derive(Clone, Copy, Debug)]
pub struct BuildInfo {
    /// Which llama.cpp tree: the pinned package and version, or "unpinned" for `LLAMA_CPP_DIR`.
    pub llama_cpp: &'static str,
    /// llama.cpp's build number (0 when the tree carries none, as a crate package does not).
    pub build_number: u32,
    /// The upstream llama.cpp commit, or "unknown".
    pub upstream_commit: &'static str,
    /// The folder of the llama.cpp tree compiled, or "(not recorded: relocatable build)" for a
    /// `LLAMA_SYS_RELOCATABLE` build.
    pub source_dir: &'static str,
    /// The target triple compiled for (`x86_64-unknown-linux-gnu`, ...).
    pub target: &'static str,
    /// Every switch of the build plan (`native`, `openmp`, `metal`, ...) and its value.
    pub switches: &'static [(&'static str, bool)],
    /// Every `-D` definition given to CMake.
    pub cmake_defines: &'static [(&'static str, &'static str)],
    /// CMAKE_C_FLAGS plus the release flags, as configured.
    pub c_flags: &'static str,
    /// CMAKE_CXX_FLAGS plus the release flags, as configured.
    pub cxx_flags: &'static str,
    /// The flags ggml's CPU backend was compiled with, as CMake generated them: this is where
    /// `-march=native` (or an explicit ISA list) shows.
    pub ggml_cpu_flags: &'static str,
    /// With one CPU module per instruction-set level (a dynamic-backend build with
    /// GGML_CPU_ALL_VARIANTS, as `cargo xtask dist` makes): each variant (`haswell`, ...) and the
    /// flags it was compiled with, in name order; empty otherwise (and then `ggml_cpu_flags` is
    /// the CPU code's).
    pub cpu_variant_flags: &'static [(&'static str, &'static str)],
    /// Compiler path and the first line of its `--version`.
    pub c_compiler: &'static str,
    /// C++ compiler path and the first line of its `--version`.
    pub cxx_compiler: &'static str,
    /// The tuned profile applied under the environment (`cargo xtask tune`), or "none".
    pub tuned_profile: &'static str,
    /// A short hash of all of the above.
    pub hash: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/build_info.rs"));

impl BuildInfo {
    /// The flags CPU module `variant` was compiled with, if this build made it: a variant's
    /// (`haswell`, ...), or for `""`, the one module of a build without variants
    /// (`ggml_cpu_flags`).
    pub fn cpu_variant_flags(&self, variant: &str) -> Option<&'static str> {
        if variant.is_empty() {
            return Some(self.ggml_cpu_flags).filter(|f| !f.is_empty());
        }
        self.cpu_variant_flags.iter().find(|(n, _)| *n == variant).map(|(_, f)| *f)
    }

    /// Whether a switch of the build plan was on.
    pub fn switch(&self, name: &str) -> Option<bool> {
        self.switches.iter().find(|(n, _)| *n == name).map(|(_, on)| *on)
    }

    /// The value of a CMake definition, if it was given.
    pub fn define(&self, name: &str) -> Option<&'static str> {
        self.cmake_defines.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// A JSON object of every field, for benchmark reports.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let field = |s: &mut String, k: &str, v: &str| {
            let _ = write!(s, "{}:{},", json_str(k), json_str(v));
        };
        field(&mut s, "llama_cpp", self.llama_cpp);
        let _ = write!(s, "\"build_number\":{},", self.build_number);
        field(&mut s, "upstream_commit", self.upstream_commit);
        field(&mut s, "source_dir", self.source_dir);
        field(&mut s, "target", self.target);
        s.push_str("\"switches\":{");
        let switches: Vec<String> = self.switches.iter().map(|(k, v)| format!("{}:{v}", json_str(k))).collect();
        s.push_str(&switches.join(","));
        s.push_str("},");
        let object = |s: &mut String, k: &str, pairs: &[(&str, &str)]| {
            let members: Vec<String> = pairs.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_str(v))).collect();
            let _ = write!(s, "{}:{{{}}},", json_str(k), members.join(","));
        };
        object(&mut s, "cmake_defines", self.cmake_defines);
        field(&mut s, "c_flags", self.c_flags);
        field(&mut s, "cxx_flags", self.cxx_flags);
        field(&mut s, "ggml_cpu_flags", self.ggml_cpu_flags);
        object(&mut s, "cpu_variant_flags", self.cpu_variant_flags);
        field(&mut s, "c_compiler", self.c_compiler);
        field(&mut s, "cxx_compiler", self.cxx_compiler);
        field(&mut s, "tuned_profile", self.tuned_profile);
        let _ = write!(s, "\"hash\":{}}}", json_str(self.hash));
        s
    }
}

fn json_str(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_quotes_backslashes_and_controls() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn every_switch_is_a_cargo_feature() {
        let manifest = include_str!("../Cargo.toml");
        for (name, _) in BUILD_INFO.switches {
            assert!(manifest.contains(&format!("\n{name} = []")), "switch {name} has no cargo feature");
        }
        assert_eq!(BUILD_INFO.switches.len(), crate::plan::Switch::ALL.len());
    }

    #[test]
    fn build_info_is_complete_and_release() {
        assert_eq!(BUILD_INFO.hash.len(), 12);
        assert_eq!(BUILD_INFO.define("BUILD_SHARED_LIBS"), Some("OFF"));
        assert!(!BUILD_INFO.cxx_compiler.is_empty());
        assert!(BUILD_INFO.cxx_flags.contains("-O") || BUILD_INFO.cxx_flags.contains("/O"), "{}", BUILD_INFO.cxx_flags);
        assert!(!BUILD_INFO.ggml_cpu_flags.is_empty(), "ggml-cpu flags were not captured");
        let json = BUILD_INFO.to_json();
        assert!(json.starts_with('{') && json.ends_with('}'));
        assert!(json.contains(BUILD_INFO.hash));
        assert!(BUILD_INFO.cpu_variant_flags.is_empty() && json.contains("\"cpu_variant_flags\":{},"), "a static build has no variants: {json}");
    }
}
