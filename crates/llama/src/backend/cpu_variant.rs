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
/// cannot run (its score 0) is refused with a typed error before any of its code is used (it is
/// only opened to read its score, as ggml does), never left to fault on its first instruction.
pub const CPU_VARIANT_VAR: &str = "EXSA_CPU_VARIANT";

/// A CPU module of the folder, scored on this CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuCandidate {
    /// The variant (`haswell`); empty for a build's single `libggml-cpu.so`.
    pub name: String,
    /// The module's file.
    pub path: PathBuf,
    /// The module's score on this CPU (0: it cannot run here); None for the module without a
    /// variant, which ggml does not score (it loads it only when no variant scores, and then
    /// refuses it itself if it cannot run here), for a variant without a score function, and
    /// for one that did not open.
    pub score: Option<i32>,
    /// Why the module did not open (a library it needs is missing), if it did not.
    pub load_error: Option<String>,
}

impl CpuCandidate {
    /// The variant's name, or `(libggml-cpu)` for the module without one.
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() { "(libggml-cpu)" } else { &self.name }
    }

    /// Whether nothing known says it cannot run here.
    fn runs_here(&self) -> bool {
        self.load_error.is_none() && self.score != Some(0)
    }

    /// How it fared here, for messages: `zen4 (score 0)`, `x64 (not opened: ...)`.
    fn describe(&self) -> String {
        match (&self.load_error, self.score) {
            (Some(error), _) => format!("{} (not opened: {error})", self.display_name()),
            (None, Some(score)) => format!("{} (score {score})", self.display_name()),
            (None, None) => self.display_name().to_owned(),
        }
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

/// Chooses among `candidates` by ggml's rule (`ggml_backend_load_best`): the first variant (by
/// name) with the highest score above 0; none scoring, the module without a variant, if it
/// opened. Or the one `forced` names, if nothing known says it cannot run here.
pub fn choose(mut candidates: Vec<CpuCandidate>, forced: Option<&str>, dir: &Path) -> Result<CpuVariant, CpuVariantError> {
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let list = |pick: &dyn Fn(&CpuCandidate) -> bool, show: &dyn Fn(&CpuCandidate) -> String| {
        let list: Vec<String> = candidates.iter().filter(|c| pick(c)).map(show).collect();
        if list.is_empty() { "none".to_owned() } else { list.join(", ") }
    };
    let (index, choice) = match forced {
        Some(name) => {
            let index = candidates.iter().position(|c| c.name == name).ok_or_else(|| CpuVariantError::Unknown {
                name: name.to_owned(),
                dir: dir.display().to_string(),
                available: list(&|_| true, &|c| c.display_name().to_owned()),
            })?;
            let chosen = &candidates[index];
            if let Some(error) = &chosen.load_error {
                return Err(CpuVariantError::LoadFailed { path: chosen.path.display().to_string(), reason: error.clone() });
            }
            if !chosen.runs_here() {
                return Err(CpuVariantError::CannotRun {
                    name: name.to_owned(),
                    features: cpu_features().join(" "),
                    runnable: list(&CpuCandidate::runs_here, &|c| c.display_name().to_owned()),
                });
            }
            (index, CpuChoice::Forced)
        }
        None => {
            let mut best: Option<usize> = None;
            for (i, c) in candidates.iter().enumerate() {
                let score = if c.name.is_empty() || c.load_error.is_some() { 0 } else { c.score.unwrap_or(0) };
                if score > best.map_or(0, |b| candidates[b].score.unwrap_or(0)) {
                    best = Some(i);
                }
            }
            match best {
                Some(i) => (i, CpuChoice::BestScore),
                None => match candidates.iter().position(|c| c.name.is_empty() && c.load_error.is_none()) {
                    Some(i) => (i, CpuChoice::Only),
                    None => {
                        return Err(CpuVariantError::NoneRuns {
                            dir: dir.display().to_string(),
                            features: cpu_features().join(" "),
                            available: list(&|_| true, &CpuCandidate::describe),
                        });
                    }
                },
            }
        }
    };
    Ok(CpuVariant { chosen: candidates[index].clone(), choice, candidates })
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
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only where the CPU has it
        // (above its highest leaf it answers another leaf's data).
        let leaf7 = unsafe {
            let (highest, _) = std::arch::x86_64::__get_cpuid_max(0);
            if highest >= 7 { std::arch::x86_64::__cpuid_count(7, 0) } else { std::arch::x86_64::CpuidResult { eax: 0, ebx: 0, ecx: 0, edx: 0 } }
        };
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
        CpuCandidate { name: name.into(), path: PathBuf::from(format!("libggml-cpu-{name}.so")), score, load_error: None }
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
        let single = CpuCandidate { name: String::new(), path: "libggml-cpu.so".into(), score: None, load_error: None };
        let only = choose(vec![single.clone()], None, dir).unwrap();
        assert_eq!(only.choice, CpuChoice::Only);
        // A scoring variant wins over it; one that does not open is passed over and said why.
        let v = choose(vec![single.clone(), candidate("haswell", Some(64))], None, dir).unwrap();
        assert_eq!((v.chosen.name.as_str(), v.choice), ("haswell", CpuChoice::BestScore));
        let broken = CpuCandidate { load_error: Some("libgomp.so.1: cannot open shared object file".into()), ..candidate("zen4", None) };
        let err = choose(vec![broken.clone()], None, dir).unwrap_err();
        assert!(err.to_string().contains("zen4 (not opened: libgomp.so.1"), "{err}");
        let err = choose(vec![broken, candidate("x64", Some(1))], Some("zen4"), dir).unwrap_err();
        assert!(matches!(&err, CpuVariantError::LoadFailed { reason, .. } if reason.contains("libgomp")), "{err:?}");
        let err = choose(vec![candidate("zen4", Some(0)), candidate("icelake", Some(0))], None, dir).unwrap_err();
        assert!(matches!(&err, CpuVariantError::NoneRuns { available, .. } if available == "icelake (score 0), zen4 (score 0)"), "{err:?}");
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
