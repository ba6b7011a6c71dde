//! The builds being compared: built-in variants and any from a TOML file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One build of the engine's bench binary.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// `source` (B: our build), `crate` (A: llama-cpp-2) or `raw` (B through raw FFI).
    pub backend: String,
    /// llama-sys switches forced on (native, openmp, lto, blas, ...), for source/raw.
    #[serde(default)]
    pub features: Vec<String>,
    /// Extra environment for the build (LLAMA_SYS_* overrides, for instance).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CMake definitions for llama.cpp (source/raw), passed as LLAMA_SYS_CMAKE_ARGS.
    #[serde(default)]
    pub cmake_defines: BTreeMap<String, String>,
    #[serde(default)]
    pub cflags: String,
    #[serde(default)]
    pub cxxflags: String,
    #[serde(default)]
    pub rustflags: String,
    /// Another llama.cpp checkout to build (source/raw).
    #[serde(default)]
    pub llama_cpp_dir: Option<PathBuf>,
    /// Cargo profile (release, or release-lto to see what Rust-side LTO does).
    #[serde(default = "release")]
    pub profile: String,
    /// Runtime: thread count (default: all cores).
    #[serde(default)]
    pub threads: Option<u32>,
    /// Runtime: flash attention on/off/auto.
    #[serde(default)]
    pub flash_attn: Option<String>,
    /// Runtime: rpc-servers that take the offloaded layers (`--gpu-layers`, all by default).
    /// `"loopback"` starts an `exsa rpc-server` of the variant's own binary on a free 127.0.0.1
    /// port for each run and stops it after; anything else is the HOST:PORT of a running server.
    #[serde(default)]
    pub rpc: Vec<String>,
    /// Build the engine as it was at this revision of this repository (a commit, tag or branch),
    /// to measure a change against what came before it (see `build::source_tree`).
    #[serde(default)]
    pub git_rev: Option<String>,
    /// Measure the release bundle (`cargo xtask dist`: dynamic backends, every x86-64 CPU
    /// variant, the best one for this CPU loaded at start) instead of a build with the settings
    /// above, which must then be left out but for `env` (llama-sys variables over the bundle's
    /// own, e.g. `LLAMA_SYS_CPU_VARIANT_TUNE = "off"`).
    #[serde(default)]
    pub bundle: bool,
}

fn release() -> String {
    "release".into()
}

impl Variant {
    pub fn builtin(name: &str, backend: &str, rustflags: &str) -> Variant {
        Variant {
            name: name.into(),
            backend: backend.into(),
            features: Vec::new(),
            env: BTreeMap::new(),
            cmake_defines: BTreeMap::new(),
            cflags: String::new(),
            cxxflags: String::new(),
            rustflags: rustflags.into(),
            llama_cpp_dir: None,
            profile: release(),
            threads: None,
            flash_attn: None,
            rpc: Vec::new(),
            git_rev: None,
            bundle: false,
        }
    }

    /// Environment for `cargo build`, on top of one cleared of LLAMA_SYS_* and RUSTFLAGS.
    pub fn build_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![("RUSTFLAGS".into(), self.rustflags.clone())];
        for f in &self.features {
            // llama-sys' `Switch::env_var`: a feature's name upper-cased, `-` as `_`.
            env.push((format!("LLAMA_SYS_{}", f.to_ascii_uppercase().replace('-', "_")), "on".into()));
        }
        if !self.cmake_defines.is_empty() {
            let args: Vec<String> = self.cmake_defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
            env.push(("LLAMA_SYS_CMAKE_ARGS".into(), args.join(" ")));
        }
        if !self.cflags.is_empty() {
            env.push(("LLAMA_SYS_CFLAGS".into(), self.cflags.clone()));
        }
        if !self.cxxflags.is_empty() {
            env.push(("LLAMA_SYS_CXXFLAGS".into(), self.cxxflags.clone()));
        }
        if let Some(dir) = &self.llama_cpp_dir {
            env.push(("LLAMA_CPP_DIR".into(), dir.display().to_string()));
        }
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// Names the cargo target folder. Only what makes cargo recompile everything goes in
    /// (RUSTFLAGS, profile, the source revision): variants that differ in llama.cpp settings
    /// share a folder, and switching between them reruns llama-sys' build script, whose CMake
    /// builds are cached per flag set anyway, instead of compiling every dependency again.
    pub fn target_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("{}|{}|{}", self.rustflags, self.profile, self.git_rev.as_deref().unwrap_or("")));
        crate::hashing::hex(&h.finalize())[..12].to_string()
    }

    fn validate(&self) -> Result<()> {
        if !matches!(self.backend.as_str(), "source" | "crate" | "raw") {
            bail!("variant {}: unknown backend {:?} (use source, crate or raw)", self.name, self.backend);
        }
        if self.backend == "crate" && (!self.features.is_empty() || !self.cmake_defines.is_empty() || self.llama_cpp_dir.is_some()) {
            bail!("variant {}: llama-sys features, CMake defines and llama_cpp_dir apply to source/raw builds, not the crate baseline", self.name);
        }
        let switches = llama_sys_switches()?;
        if let Some(bad) = self.features.iter().find(|f| !switches.contains(f)) {
            bail!("variant {}: unknown llama-sys feature {bad:?} (known: {})", self.name, switches.join(", "));
        }
        if self.bundle
            && (self.backend != "source"
                || !self.features.is_empty()
                || !self.cmake_defines.is_empty()
                || !self.cflags.is_empty()
                || !self.cxxflags.is_empty()
                || !self.rustflags.is_empty()
                || self.llama_cpp_dir.is_some()
                || self.git_rev.is_some()
                || self.profile != "release")
        {
            bail!(
                "variant {}: a bundle is built as `cargo xtask dist` builds it: backend source, and no build settings of its own but llama-sys variables (`env`)",
                self.name
            );
        }
        if !self.rpc.is_empty() && self.backend != "source" {
            bail!("variant {}: rpc-servers need backend source", self.name);
        }
        if let Some(bad) =
            self.rpc.iter().find(|e| *e != "loopback" && !e.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()))
        {
            bail!("variant {}: rpc entry {bad:?} is neither \"loopback\" nor HOST:PORT", self.name);
        }
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("variant name {:?} must be letters, digits, '-', '_' or '.'", self.name);
        }
        Ok(())
    }
}

/// The build switches llama-sys has, as its manifest declares them: one cargo feature per switch
/// of its build plan, besides the features listed as extras in `[package.metadata.llama-sys]`
/// (llama-sys' own tests hold the plan's switch list to the manifest).
pub fn llama_sys_switches() -> Result<Vec<String>> {
    let path = crate::workspace::root().join("crates/llama-sys/Cargo.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
    let features = manifest.get("features").and_then(|f| f.as_table()).with_context(|| format!("{} has no [features]", path.display()))?;
    let extras: Vec<&str> = manifest
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("llama-sys"))
        .and_then(|l| l.get("extras"))
        .and_then(|e| e.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    Ok(features.keys().filter(|k| *k != "default" && !extras.contains(&k.as_str())).cloned().collect())
}

/// Where `cargo xtask tune` writes its profile and llama-sys looks for it by default.
pub fn tuned_profile_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"))
        .join("exsa/tuned.toml")
}

/// A, A-native, B, B-tuned, B-raw, B-amx, B-noamx, B-dist, B-rpc.
pub fn builtins() -> Vec<Variant> {
    vec![
        // The crate baseline exactly as `cargo add llama-cpp-2` gives it.
        Variant::builtin("A", "crate", ""),
        // The best A can do: rustc's native target makes llama-cpp-sys-2 build GGML_NATIVE.
        Variant::builtin("A-native", "crate", "-C target-cpu=native"),
        // Our build with its default flags: a tuned profile on this machine is ignored.
        Variant { env: [("LLAMA_SYS_PROFILE".to_string(), "none".to_string())].into(), ..Variant::builtin("B", "source", "") },
        // Our build with the profile `cargo xtask tune` wrote (fails to build without one).
        Variant {
            env: [("LLAMA_SYS_PROFILE".to_string(), tuned_profile_path().display().to_string())].into(),
            ..Variant::builtin("B-tuned", "source", "")
        },
        // The same build through raw llama-sys calls: B minus the safe wrapper.
        Variant { env: [("LLAMA_SYS_PROFILE".to_string(), "none".to_string())].into(), ..Variant::builtin("B-raw", "raw", "") },
        // B with ggml's AMX kernels asked for, and without them (docs/amx.md): B is the first
        // where the CPU has AMX, the second elsewhere.
        Variant {
            env: [("LLAMA_SYS_PROFILE", "none"), ("LLAMA_SYS_AMX", "on")].map(|(k, v)| (k.to_string(), v.to_string())).into(),
            ..Variant::builtin("B-amx", "source", "")
        },
        Variant {
            env: [("LLAMA_SYS_PROFILE", "none"), ("LLAMA_SYS_AMX", "off")].map(|(k, v)| (k.to_string(), v.to_string())).into(),
            ..Variant::builtin("B-noamx", "source", "")
        },
        // The release bundle (`cargo xtask dist`) against B: what loading the CPU code as the
        // module for this CPU's instruction-set level costs against -march=native.
        Variant { bundle: true, ..Variant::builtin("B-dist", "source", "") },
        // B with its layers on an rpc-server on loopback: what the network hop costs.
        Variant {
            env: [("LLAMA_SYS_PROFILE".to_string(), "none".to_string())].into(),
            rpc: vec!["loopback".into()],
            ..Variant::builtin("B-rpc", "source", "")
        },
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantsFile {
    #[serde(default)]
    variant: Vec<Variant>,
}

/// Built-ins plus the file's variants, then `selected` picked out in order.
pub fn resolve(file: Option<&Path>, selected: &[String]) -> Result<Vec<Variant>> {
    let mut all = builtins();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read variants file {}", path.display()))?;
        let parsed: VariantsFile = toml::from_str(&text).with_context(|| format!("variants file {} is malformed", path.display()))?;
        for v in parsed.variant {
            if all.iter().any(|b| b.name == v.name) {
                bail!("variants file {}: variant {:?} is defined twice", path.display(), v.name);
            }
            all.push(v);
        }
    }
    for v in &all {
        v.validate()?;
    }
    selected
        .iter()
        .map(|name| {
            all.iter().find(|v| &v.name == name).cloned().with_context(|| {
                let known: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
                format!("unknown variant {name:?} (known: {})", known.join(", "))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_resolve_and_unknown_names_are_refused() {
        let v = resolve(None, &["A".into(), "B".into()]).unwrap();
        assert_eq!(v.iter().map(|v| v.backend.as_str()).collect::<Vec<_>>(), ["crate", "source"]);
        let err = resolve(None, &["C".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown variant \"C\"") && err.contains("A-native"), "{err}");
    }

    #[test]
    fn a_variants_file_adds_variants_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("variants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[[variant]]\nname = \"B-lto\"\nbackend = \"source\"\nfeatures = [\"lto\"]\ncmake_defines = { GGML_AVX512 = \"OFF\" }\n",
        )
        .unwrap();
        let v = resolve(Some(&good), &["B-lto".into()]).unwrap();
        assert!(resolve(None, &["B-dist".into()]).unwrap()[0].bundle, "the built-in bundle variant");
        let env = v[0].build_env();
        assert!(env.contains(&("LLAMA_SYS_LTO".into(), "on".into())));
        assert!(env.contains(&("LLAMA_SYS_CMAKE_ARGS".into(), "-DGGML_AVX512=OFF".into())));
        // A switch whose name has a dash is set by the variable llama-sys reads.
        let dashed = Variant { features: vec!["backend-dl".into()], ..Variant::builtin("X", "source", "") };
        assert!(dashed.build_env().contains(&("LLAMA_SYS_BACKEND_DL".into(), "on".into())), "{:?}", dashed.build_env());

        for (text, needle) in [
            ("[[variant]]\nname = \"X\"\nbackend = \"gpu\"\n", "unknown backend"),
            ("[[variant]]\nname = \"X\"\nbackend = \"source\"\nfeatures = [\"turbo\"]\n", "unknown llama-sys feature"),
            ("[[variant]]\nname = \"X\"\nbackend = \"crate\"\nfeatures = [\"lto\"]\n", "not the crate baseline"),
            ("[[variant]]\nname = \"X\"\nbakend = \"source\"\n", "malformed"),
            ("[[variant]]\nname = \"A\"\nbackend = \"source\"\n", "defined twice"),
            ("[[variant]]\nname = \"X\"\nbackend = \"crate\"\nrpc = [\"loopback\"]\n", "need backend source"),
            ("[[variant]]\nname = \"X\"\nbackend = \"source\"\nrpc = [\"nowhere\"]\n", "neither"),
            ("[[variant]]\nname = \"X\"\nbackend = \"source\"\nbundle = true\nfeatures = [\"lto\"]\n", "as `cargo xtask dist` builds it"),
            ("[[variant]]\nname = \"X\"\nbackend = \"raw\"\nbundle = true\n", "as `cargo xtask dist` builds it"),
            ("[[variant]]\nname = \"X\"\nbackend = \"source\"\nbundle = true\ncflags = \"-O2\"\n", "as `cargo xtask dist` builds it"),
        ] {
            let path = dir.join("bad.toml");
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", resolve(Some(&path), &["A".into()]).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn variants_share_a_target_folder_unless_rustflags_or_profile_differ() {
        let all = builtins();
        let key = |n: &str| all.iter().find(|v| v.name == n).unwrap().target_key();
        assert_eq!(key("A"), key("B"));
        assert_eq!(key("B"), key("B-raw"));
        assert_eq!(key("B"), key("B-tuned"));
        assert_ne!(key("A"), key("A-native"));
        let lto = Variant { profile: "release-lto".into(), ..all[0].clone() };
        assert_ne!(lto.target_key(), key("A"));
    }
}
