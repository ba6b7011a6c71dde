//! `cargo xtask leak-check`: the safe wrapper's own test binaries under valgrind; any
//! definitely-lost block fails the run.
//!
//! valgrind 3.19 (Debian 12) cannot decode AVX-512, which a native build uses on AVX-512
//! machines, so the binaries are built without native flags (ggml's AVX2 baseline), in a target
//! folder of their own. They use the dynamic-backend build (`backend-dl`, which is never native):
//! the same llama.cpp build as the engine's dynamic-backend tests in `cargo xtask test`, so that
//! run compiles llama.cpp once for both. The wrapper code under test is the same either way.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::workspace;

/// A test binary to check: the tests to skip (too slow under valgrind) and its environment.
struct Binary {
    name: &'static str,
    skip: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// (`a_preselected_chain_draws_from_the_top_k` keeps the preselection path under valgrind; the
/// chains that sort the whole 262,144-token vocabulary every step are left to the plain run,
/// where they take a second and under valgrind minutes, and `soundness` keeps their error
/// paths here.)
/// The randomized cases run in this process (valgrind follows no re-executed child) with a
/// budget per group that fits valgrind's pace.
const BINARIES: &[Binary] = &[
    Binary { name: "bad_input", skip: &[], env: &[] },
    Binary {
        name: "generation",
        skip: &[
            "quantize",
            "preselected_candidates_sample_the_same_tokens",
            "seeded_sampling_chains_are_reproducible",
            "a_logit_bias_forces_a_token",
            // Grammar stage against constraint over the whole vocabulary, step by step; the
            // constraint's own paths stay under valgrind in the test after it.
            "a_constraint_picks_what_a_grammar_stage_picks",
            // Two 900-token decodes; the abort path it takes is the one the test above it takes.
            "an_abort_from_another_thread_stops_a_running_decode",
            // Grammars masking the whole vocabulary every step; their constructors and error
            // paths stay under valgrind in bad_input.
            "a_lazy_constraint_is_free_until_its_trigger_then_holds",
            "a_prefilled_constraint_reads_its_prefill_first_and_again_after_reset",
        ],
        env: &[],
    },
    Binary { name: "soundness", skip: &["penalties_over_the_whole_context_penalise"], env: &[] },
    Binary { name: "fuzz", skip: &[], env: &[("LLAMA_FUZZ_IN_PROCESS", "1"), ("LLAMA_FUZZ_CASES", "200"), ("LLAMA_FUZZ_SECONDS", "20")] },
];

#[derive(clap::Args, Default)]
pub struct Args {}

pub fn run(_: &Args) -> Result<()> {
    let target_dir = workspace::target_dir().join("leak-check");
    let output = workspace::cargo()
        .args(["test", "-p", "exsa-llama", "--features", "backend-dl", "--tests", "--no-run", "--locked", "--message-format=json"])
        .env("LLAMA_SYS_NATIVE", "off")
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("building the test binaries failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let executables = executables(&output.stdout);
    // The test binaries load llama.cpp's shared libraries from the build's folder; cargo
    // would say where when it runs them, valgrind needs it said.
    let library_path = std::env::join_paths(native_link_paths(&output.stdout)).context("a library folder with a ':' in its path")?;
    let mut failed = Vec::new();
    for Binary { name, skip, env } in BINARIES {
        let exe = executables.iter().find(|(n, _)| n == name).map(|(_, p)| p).with_context(|| format!("cargo built no `{name}` test binary"))?;
        eprintln!("leak-check: valgrind {name} (a few minutes under valgrind)");
        let mut cmd = std::process::Command::new("valgrind");
        cmd.args(["--leak-check=full", "--errors-for-leak-kinds=definite", "--error-exitcode=3", "--quiet"]).arg(exe).arg("--test-threads=1");
        for s in *skip {
            cmd.args(["--skip", s]);
        }
        cmd.envs(env.iter().copied()).env("LD_LIBRARY_PATH", &library_path);
        let status =
            cmd.current_dir(workspace::root().join("crates/llama")).status().context("cannot run valgrind (install it: cargo xtask setup)")?;
        if !status.success() {
            failed.push(format!("{name} ({status})"));
        }
    }
    if !failed.is_empty() {
        bail!("leak-check failed: {}", failed.join(", "));
    }
    eprintln!("leak-check: no definite leaks, no memory errors");
    Ok(())
}

/// The `native=` folders build scripts asked the linker to search (llama-sys: the shared libraries).
fn native_link_paths(json_lines: &[u8]) -> Vec<PathBuf> {
    String::from_utf8_lossy(json_lines)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .flat_map(|m| m["linked_paths"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().and_then(|p| p.strip_prefix("native=")).map(PathBuf::from))
        .collect()
}

fn executables(json_lines: &[u8]) -> Vec<(String, PathBuf)> {
    String::from_utf8_lossy(json_lines)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| Some((m["target"]["name"].as_str()?.to_string(), PathBuf::from(m["executable"].as_str()?))))
        .collect()
}
