//! Which of a folder's CPU modules a dynamic build runs. A bundle built with ggml's
//! `GGML_CPU_ALL_VARIANTS` holds one module per instruction-set level (`libggml-cpu-x64.so`,
//! `libggml-cpu-haswell.so`, ..., `libggml-cpu-sapphirerapids.so`), each of which scores this CPU
//! (its exported `ggml_backend_score`: 0 when the CPU lacks an instruction set the module was
//! built for, more for more of them). The best-scoring module runs, as ggml itself would choose,
//! unless [`CPU_VARIANT_VAR`] names one. This module only decides; [`super::modules`] reads the
//! folder, scores and loads.

use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::error::CpuVariantError;

/// Names the CPU variant to load (`haswell`, `icelake`, ...) instead of the best one. One the CPU
/// cannot run is refused before it is loaded, never left to fault on its first instruction.
pub const CPU_VARIANT_VAR: &str = "EXSA_CPU_VARIANT";

/// A CPU module of the folder, scored on this CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuCandidate {
    /// The variant (`haswell`); empty for a build's single `libggml-cpu.so`.
    pub name: String,
    /// The module's file.
    pub path: PathBuf,
    /// The module's score on this CPU (0: it cannot run here); None where the module has none
    /// (a single module built for the target's baseline, which runs on every CPU of it).
    pub score: Option<i32>,
}

impl CpuCandidate {
    fn runs_here(&self) -> bool {
        self.score != Some(0)
    }
}

/// How the CPU module was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuChoice {
    /// The highest score among the folder's modules (ggml's own rule; the first on a tie).
    BestScore,
    /// Named by [`CPU_VARIANT_VAR`].
    Forced,
    /// The folder's one module without a score (a build without variants).
    Only,
}

impl fmt::Display for CpuChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuChoice::BestScore => "the highest score on this CPU",
            CpuChoice::Forced => CPU_VARIANT_VAR,
            CpuChoice::Only => "the only CPU module",
        })
    }
}

/// The CPU module a dynamic build loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuVariant {
    /// The module that runs.
    pub chosen: CpuCandidate,
    /// Why that one.
    pub choice: CpuChoice,
    /// Every CPU module of the folder as scored here, by name.
    pub candidates: Vec<CpuCandidate>,
}

/// Chooses among `candidates` (sorted by name): the one `forced` names, else the best score.
pub fn choose(mut candidates: Vec<CpuCandidate>, forced: Option<&str>, dir: &Path) -> Result<CpuVariant, CpuVariantError> {
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let names = |pick: &dyn Fn(&CpuCandidate) -> bool| {
        let list: Vec<&str> = candidates.iter().filter(|c| pick(c)).map(|c| display_name(&c.name)).collect();
        if list.is_empty() { "none".to_owned() } else { list.join(", ") }
    };
    let (index, choice) = match forced {
        Some(name) => {
            let index = candidates.iter().position(|c| c.name == name).ok_or_else(|| CpuVariantError::Unknown {
                name: name.to_owned(),
                dir: dir.display().to_string(),
                available: names(&|_| true),
            })?;
            if !candidates[index].runs_here() {
                return Err(CpuVariantError::CannotRun {
                    name: name.to_owned(),
                    features: cpu_features().join(" "),
                    runnable: names(&CpuCandidate::runs_here),
                });
            }
            (index, CpuChoice::Forced)
        }
        None => {
            let mut best: Option<usize> = None;
            for (i, c) in candidates.iter().enumerate() {
                if c.score.unwrap_or(0) > best.map_or(0, |b| candidates[b].score.unwrap_or(0)) {
                    best = Some(i);
                }
            }
            match best {
                Some(i) => (i, CpuChoice::BestScore),
                // ggml's fallback when nothing scores: the module without a variant.
                None => match candidates.iter().position(|c| c.name.is_empty() && c.score.is_none()) {
                    Some(i) => (i, CpuChoice::Only),
                    None => {
                        return Err(CpuVariantError::NoneRuns {
                            dir: dir.display().to_string(),
                            features: cpu_features().join(" "),
                            available: names(&|_| true),
                        });
                    }
                },
            }
        }
    };
    Ok(CpuVariant { chosen: candidates[index].clone(), choice, candidates })
}

fn display_name(name: &str) -> &str {
    if name.is_empty() { "(libggml-cpu)" } else { name }
}

/// The instruction sets of this CPU that ggml's x86 variants are built for (what decides which
/// variants run here), by the names llama.cpp's system info uses; empty elsewhere.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut found = Vec::new();
        macro_rules! detect {
            ($($name:literal => $feature:tt),* $(,)?) => {
                $(if std::arch::is_x86_feature_detected!($feature) { found.push($name); })*
            };
        }
        detect!(
            "SSE4.2" => "sse4.2", "AVX" => "avx", "F16C" => "f16c", "FMA" => "fma", "AVX2" => "avx2", "BMI2" => "bmi2",
            "AVX512F" => "avx512f", "AVX512_VBMI" => "avx512vbmi", "AVX512_VNNI" => "avx512vnni",
            "AVX512_BF16" => "avx512bf16", "AVX_VNNI" => "avxvnni",
        );
        // AMX's detection is not stable in std: CPUID leaf 7 (EDX bit 24: tiles, 25: int8), as
        // ggml's own check reads it.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and leaf 7 is answered (zeros where unknown).
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        if leaf7.edx & (1 << 24) != 0 {
            found.push("AMX_TILE");
        }
        if leaf7.edx & (1 << 25) != 0 {
            found.push("AMX_INT8");
        }
        found
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, score: Option<i32>) -> CpuCandidate {
        CpuCandidate { name: name.into(), path: PathBuf::from(format!("libggml-cpu-{name}.so")), score }
    }

    fn folder() -> Vec<CpuCandidate> {
        vec![
            candidate("x64", Some(1)),
            candidate("zen4", Some(0)),
            candidate("haswell", Some(65)),
            candidate("skylakex", Some(129)),
            candidate("icelake", Some(0)),
        ]
    }

    #[test]
    fn the_best_score_wins_and_a_tie_goes_to_the_first() {
        let dir = Path::new("/b/lib");
        let v = choose(folder(), None, dir).unwrap();
        assert_eq!((v.chosen.name.as_str(), v.choice), ("skylakex", CpuChoice::BestScore));
        assert_eq!(v.candidates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["haswell", "icelake", "skylakex", "x64", "zen4"]);
        let tie = choose(vec![candidate("b", Some(5)), candidate("a", Some(5))], None, dir).unwrap();
        assert_eq!(tie.chosen.name, "a");
    }

    #[test]
    fn a_forced_variant_runs_only_where_the_cpu_can() {
        let dir = Path::new("/b/lib");
        let v = choose(folder(), Some("haswell"), dir).unwrap();
        assert_eq!((v.chosen.name.as_str(), v.choice), ("haswell", CpuChoice::Forced));
        match choose(folder(), Some("zen4"), dir).unwrap_err() {
            CpuVariantError::CannotRun { name, runnable, .. } => {
                assert_eq!(name, "zen4");
                assert_eq!(runnable, "haswell, skylakex, x64");
            }
            other => panic!("{other:?}"),
        }
        let err = choose(folder(), Some("pentium"), dir).unwrap_err();
        assert!(matches!(&err, CpuVariantError::Unknown { available, .. } if available == "haswell, icelake, skylakex, x64, zen4"), "{err:?}");
        assert!(err.to_string().contains("EXSA_CPU_VARIANT=pentium") && err.to_string().contains("/b/lib"), "{err}");
    }

    #[test]
    fn a_folder_without_variants_loads_its_one_module_and_one_where_none_runs_is_an_error() {
        let dir = Path::new("/b/lib");
        let only = choose(vec![CpuCandidate { name: String::new(), path: "libggml-cpu.so".into(), score: None }], None, dir).unwrap();
        assert_eq!(only.choice, CpuChoice::Only);
        let err = choose(vec![candidate("zen4", Some(0)), candidate("icelake", Some(0))], None, dir).unwrap_err();
        assert!(matches!(&err, CpuVariantError::NoneRuns { available, .. } if available == "icelake, zen4"), "{err:?}");
        assert!(matches!(choose(Vec::new(), None, dir), Err(CpuVariantError::NoneRuns { .. })));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_64_cpu_has_what_the_baseline_needs_named() {
        // x86-64 always has SSE2; SSE4.2 is on every CPU these builds run on (CI's included).
        let features = cpu_features();
        assert!(features.contains(&"SSE4.2"), "{features:?}");
        assert_eq!(features.contains(&"AVX2"), std::arch::is_x86_feature_detected!("avx2"));
    }
}
