//! The compiler's tuning (`-mtune`) for ggml's x86 CPU variants (`GGML_CPU_ALL_VARIANTS`: the
//! modules of a release bundle, `cargo xtask dist`).
//!
//! ggml compiles each variant with its instruction sets alone (`-mavx2 -mfma ...`), which leaves
//! GCC's and Clang's instruction scheduling and code layout at `-mtune=generic`, where a native
//! build's `-march=native` tunes for the machine. On a Sapphire Rapids Xeon the bundle's module ran
//! 1-2 % behind the native build, and about half of that followed the tuning (docs/benchmarks.md,
//! "The release bundle").
//!
//! A variant is tuned only where every CPU that loads it is of the family it is named after.
//! ggml loads the variant with the highest score among those the CPU can run, so:
//! - `haswell` serves every AVX2 CPU without AVX-512 or AVX-VNNI: Intel's Haswell to Comet Lake
//!   and AMD's Zen 1 to 3 alike;
//! - `zen4` serves Zen 4 and 5 and also Intel's AVX-512 BF16 parts whose AMX is hidden (many
//!   cloud VMs);
//! - `sandybridge` and `ivybridge` serve AMD's Bulldozer and Jaguar too;
//!
//! these keep generic tuning, as do the levels below AVX (`x64`, `sse42`).
//!
//! The tuning is added once CMake has configured the tree (a deferred call of a script run at
//! `project()`, as the source patches are: source_patch.rs), to each variant target that exists,
//! and only where the compiler takes the flag.

// The table, in a file of its own: `cargo xtask dist --check` reads it too, to require each
// tuned variant of a bundle to carry its flag.
include!("variant_tuning_table.rs");

/// The CMake script that tunes each variant target of the configured tree.
pub fn script() -> String {
    let pairs: Vec<String> = TUNING.iter().map(|(variant, cpu)| format!("\"{variant}={cpu}\"")).collect();
    format!(
        r#"# Written by llama-sys' build script (build/variant_tuning.rs): once the tree is configured,
# each of ggml's CPU variant targets named below is tuned for the CPU family that loads it.
include_guard(GLOBAL)
function(exsa_tune_cpu_variants)
    include(CheckCCompilerFlag)
    include(CheckCXXCompilerFlag)
    set(tuned)
    foreach(pair IN ITEMS {pairs})
        string(REPLACE "=" ";" pair "${{pair}}")
        list(GET pair 0 variant)
        list(GET pair 1 cpu)
        if (NOT TARGET ggml-cpu-${{variant}})
            message(WARNING "llama-sys: ggml defines no CPU variant ${{variant}} to tune (another llama.cpp?)")
            continue()
        endif()
        string(MAKE_C_IDENTIFIER "${{cpu}}" id)
        check_c_compiler_flag("-mtune=${{cpu}}" EXSA_C_TAKES_MTUNE_${{id}})
        check_cxx_compiler_flag("-mtune=${{cpu}}" EXSA_CXX_TAKES_MTUNE_${{id}})
        if (EXSA_C_TAKES_MTUNE_${{id}} AND EXSA_CXX_TAKES_MTUNE_${{id}})
            target_compile_options(ggml-cpu-${{variant}} PRIVATE "-mtune=${{cpu}}")
            list(APPEND tuned "${{variant}}")
        else()
            message(STATUS "llama-sys: the compiler does not take -mtune=${{cpu}}: ggml-cpu-${{variant}} keeps generic tuning")
        endif()
    endforeach()
    if (tuned)
        message(STATUS "llama-sys: CPU variants tuned for their family: ${{tuned}}")
    endif()
endfunction()
cmake_language(DEFER DIRECTORY "${{CMAKE_SOURCE_DIR}}" CALL exsa_tune_cpu_variants)
"#,
        pairs = pairs.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variants ggml's CMakeLists defines for x86 (its `ggml_add_cpu_backend_variant` calls
    /// in the x86 branch of GGML_CPU_ALL_VARIANTS), in the tree this build compiled.
    fn ggml_x86_variants() -> Vec<String> {
        let lists = std::path::Path::new(crate::BUILD_INFO.source_dir).join("ggml/src/CMakeLists.txt");
        let text = std::fs::read_to_string(&lists).unwrap_or_else(|e| panic!("{}: {e}", lists.display()));
        let all_variants = text.split_once("if (GGML_CPU_ALL_VARIANTS)").expect("ggml's variant list").1;
        let x86 = all_variants.split_once("if (GGML_SYSTEM_ARCH STREQUAL \"x86\")").expect("ggml's x86 variants").1;
        let x86 = x86.split_once("GGML_SYSTEM_ARCH STREQUAL \"ARM\"").expect("ggml's ARM variants after x86's").0;
        x86.split("ggml_add_cpu_backend_variant(").skip(1).filter_map(|call| call.split([' ', ')']).next()).map(String::from).collect()
    }

    #[test]
    fn every_tuned_variant_is_one_ggml_builds_for_x86() {
        // A name ggml does not define would tune nothing (the script only warns).
        let ggml_x86 = ggml_x86_variants();
        assert!(ggml_x86.len() >= 10 && ggml_x86.iter().any(|v| v == "haswell"), "{ggml_x86:?}");
        for (variant, cpu) in TUNING {
            assert!(ggml_x86.iter().any(|v| v == variant), "{variant} is no x86 variant of ggml");
            assert!(!cpu.is_empty() && !cpu.contains(char::is_whitespace), "{variant}: {cpu:?}");
        }
        for shared in ["x64", "sse42", "sandybridge", "ivybridge", "haswell", "zen4"] {
            assert!(ggml_x86.iter().any(|v| v == shared), "{shared}: {ggml_x86:?}");
            assert!(!TUNING.iter().any(|(v, _)| *v == shared), "{shared} is loaded by more than one family and must stay generic");
        }
    }

    #[test]
    fn the_script_tunes_each_variant_that_exists_where_the_compiler_takes_the_flag() {
        let script = script();
        for (variant, cpu) in TUNING {
            assert_eq!(script.matches(&format!("\"{variant}={cpu}\"")).count(), 1, "{script}");
        }
        assert!(script.contains("if (NOT TARGET ggml-cpu-${variant})"), "{script}");
        assert!(script.contains("target_compile_options(ggml-cpu-${variant} PRIVATE \"-mtune=${cpu}\")"), "{script}");
        assert!(script.contains("EXSA_C_TAKES_MTUNE_${id} AND EXSA_CXX_TAKES_MTUNE_${id}"), "{script}");
        assert!(script.ends_with("cmake_language(DEFER DIRECTORY \"${CMAKE_SOURCE_DIR}\" CALL exsa_tune_cpu_variants)\n"), "{script}");
    }
}
