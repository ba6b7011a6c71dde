//! `cargo xtask test`: the README's test command. Sets up what the tests need (system packages,
//! reported with their paths; the vendored source; the default model; the random-weight models
//! of other architectures from `synth-models`; llama.cpp's chat template corpus), then runs every
//! test of the workspace (the chat layer's included, on that corpus), the engine's
//! tests once more per other backend and in the dynamic-backend mode, an app outside the
//! workspace built against the packaged crates and `cargo install exsa-engine` from them, every
//! example of the workspace (`cargo xtask examples`), rustfmt, clippy and the API docs
//! (`cargo doc`, warnings denied), the leak
//! check on Linux, llama.cpp's own server test suite against `exsa serve` (`cargo xtask
//! server-suite`, its OpenAI-surface files), and the reduced CUDA check on Linux x86-64 (a toolkit from PyPI, ggml
//! configured with CUDA, one CUDA source compiled). `--full` adds what CI leaves out to stay
//! within its time budget: the engine's tests over raw FFI, the statistical speculation tests on
//! the other backends (`FULL_ONLY_ON_OTHER_BACKENDS`), the leak check under valgrind (~11 min),
//! the chat template parity with llama-server (`cargo xtask template-parity`, which builds
//! llama-server), the whole server suite beside llama-server's own result, and the release
//! bundle with every x86-64 CPU variant (`cargo xtask dist --check`, ~20 min cold).

use anyhow::Result;

use crate::{
    app_test, check_cuda, dist, examples, fetch_model, leak_check, llama_tools, python, server_suite, setup, synth_models, template_parity, vendor,
    workspace,
};

/// The `openai` client the server tests drive `exsa serve` with (`.cargo/config.toml`'s
/// EXSA_OPENAI_SITE names its folder).
const OPENAI_VERSION: &str = "3.57.0";

/// The `ollama` client the Ollama API tests drive `exsa serve` with (EXSA_OLLAMA_SITE).
const OLLAMA_VERSION: &str = "0.6.3";

/// The tests the crate and raw backends' runs leave to `--full`: the statistical checks of
/// sampled speculation (thousands of draws each, minutes per backend). The rule they check is the
/// engine's one verification path, the same over every backend; the default backend runs them
/// every time, and the other backends' runs keep every other speculation test.
/// With them, the same-seed comparison of speculative and plain draws (hundreds of generations).
const FULL_ONLY_ON_OTHER_BACKENDS: &[&str] =
    &["sampled_speculation_keeps_the_distribution", "same_seed_speculative_and_plain_draws_differ_only_at_rounding"];

#[derive(clap::Args)]
pub struct Args {
    /// Everything, also what CI leaves out to stay under its time budget (the engine over raw
    /// FFI, the statistical speculation tests once per backend, the leak check, the template
    /// parity with llama-server, the release bundle). Run it before a change lands.
    #[arg(long)]
    full: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter. With them, only
    /// the workspace run happens.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// What every build of the test run sees: no tuned profile, so that a machine tuned by
/// `cargo xtask tune` tests the default flags like every other (the tests check them).
pub const ISOLATED_ENV: [(&str, &str); 1] = [("LLAMA_SYS_PROFILE", "none")];

pub fn run(args: &Args) -> Result<()> {
    for (name, value) in ISOLATED_ENV {
        // SAFETY: nothing else runs yet: xtask is one thread until a command starts others, and
        // every process this run starts inherits the variable.
        unsafe { std::env::set_var(name, value) };
    }
    // Formatting first: it takes a second and needs nothing installed.
    workspace::run(workspace::cargo().args(["fmt", "--all", "--check"]))?;
    setup::run(&setup::Args::default())?;
    vendor::run(&vendor::Args::default())?;
    fetch_model::run(&fetch_model::Args::default())?;
    synth_models::run(&synth_models::Args::default())?;
    python::site("openai", OPENAI_VERSION, "openai")?;
    python::site("ollama", OLLAMA_VERSION, "ollama")?;
    // llama.cpp's corpus of Jinja chat templates, which the chat-layer and tool-calling tests read.
    llama_tools::sdist_source()?;
    // llama.cpp's own embedding program and server, which the embedding tests compare our
    // vectors with and the rerank test our scores (.cargo/config.toml's EXSA_LLAMA_EMBEDDING and
    // EXSA_LLAMA_SERVER; one build tree: a minute with ccache, several minutes without).
    llama_tools::ensure("llama-embedding")?;
    llama_tools::ensure("llama-server")?;
    // The workspace, with the engine on its default backend (`source`). Its server turns on
    // llama's `chat` feature, so the chat layer's own tests run here too.
    workspace::run(workspace::cargo().args(["test", "--workspace", "--locked"]).args(&args.cargo_args))?;
    if !args.cargo_args.is_empty() {
        return Ok(());
    }
    // llama.cpp's own server test suite against `exsa serve`: its OpenAI-surface files here (with
    // the debug build the tests just made), the whole suite beside llama-server in full mode.
    server_suite::run(&if args.full { server_suite::Args::full() } else { server_suite::Args::default() })?;
    // The criterion benches, built (in the test profile, reusing the builds above) so that they
    // cannot rot until someone runs `bench-compare --micro`.
    workspace::run(workspace::cargo().args(["test", "--locked", "--workspace", "--benches", "--no-run"]))?;
    // The engine's conformance tests again over the crate baseline and (in full mode) over raw
    // FFI: the same assertions must hold whichever llama.cpp binding runs them.
    let backends: &[&str] = if args.full { &["crate", "raw"] } else { &["crate"] };
    for &backend in backends {
        let features = format!("{backend},cli");
        let mut test = workspace::cargo();
        test.args(["test", "--locked", "-p", "exsa-engine", "--no-default-features", "--features", &features]);
        if !args.full {
            test.arg("--");
            for name in FULL_ONLY_ON_OTHER_BACKENDS {
                test.args(["--skip", name]);
            }
        }
        workspace::run(&mut test)?;
    }
    // Dynamic backends: llama.cpp as shared libraries, the CPU backend a module loaded at start.
    // Without the chat layer (feature jinja), which this build would compile once more.
    workspace::run(workspace::cargo().args([
        "test",
        "--locked",
        "-p",
        "exsa-engine",
        "--no-default-features",
        "--features",
        "source,cli,backend-dl",
        "--test",
        "backend_dl",
    ]))?;
    // The release bundle (`cargo xtask dist --check`): every x86-64 CPU variant, relocatable,
    // unpacked without its build and compared with the native build, each variant this CPU runs
    // forced once, the others refused. Full mode: on a clean clone it is a release build of
    // the whole program and 14 builds of ggml's CPU code (about 20 minutes on two cores, cold;
    // its compiler flags name the clone's folder, so no other build's cache serves it).
    if args.full && cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        dist::run(&dist::Args::checked())?;
    }
    app_test::run(&app_test::Args::default())?;
    // Every example of the workspace, run on the models (the engine's check their own results).
    examples::run(&examples::Args::default())?;
    // Lints on every target (tests, examples, benches: so the benches cannot rot unbuilt), for
    // the default backend and raw FFI. The crate backend is left out: linting it would build
    // llama-cpp-sys-2's llama.cpp once more, for a module the tests above already compile.
    workspace::run(workspace::cargo().args(["clippy", "--locked", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    workspace::run(workspace::cargo().args([
        "clippy",
        "--locked",
        "-p",
        "exsa-engine",
        "--all-targets",
        "--no-default-features",
        "--features",
        "raw,cli",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The engine as a Rust app uses it: the library alone, without the server, the harness or
    // the command line (crate_shape's test checks what it pulls in; this, that it builds clean).
    workspace::run(workspace::cargo().args([
        "clippy",
        "--locked",
        "-p",
        "exsa-engine",
        "--lib",
        "--no-default-features",
        "--features",
        "source",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The API docs of every crate, as docs.rs would build them: a broken link, a bare URL or an
    // undocumented public item (`#![warn(missing_docs)]` on every library) fails the run.
    workspace::run(workspace::cargo().env("RUSTDOCFLAGS", "-D warnings").args(["doc", "--locked", "--workspace", "--no-deps"]))?;
    if args.full && cfg!(target_os = "linux") {
        leak_check::run(&leak_check::Args::default())?;
    }
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        check_cuda::run_quick()?;
    }
    if args.full {
        // Every template of llama.cpp's corpus rendered by us and by llama-server (which it
        // builds: minutes, more than CI's budget has left).
        template_parity::run(&template_parity::Args::default())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_run_ignores_the_machines_tuned_profile() {
        // llama-sys reads this variable (build/profile.rs); "none" is its word for no profile.
        assert_eq!(super::ISOLATED_ENV, [("LLAMA_SYS_PROFILE", "none")]);
        let profile_rs = std::fs::read_to_string(crate::workspace::root().join("crates/llama-sys/build/profile.rs")).unwrap();
        assert!(
            profile_rs.contains("pub const PROFILE_VAR: &str = \"LLAMA_SYS_PROFILE\"") && profile_rs.contains("Some(\"none\") => Location::Ignored")
        );
    }

    #[test]
    fn what_full_mode_adds_names_tests_that_exist() {
        let speculative = std::fs::read_to_string(crate::workspace::root().join("crates/engine/tests/speculative.rs")).unwrap();
        for name in super::FULL_ONLY_ON_OTHER_BACKENDS {
            assert!(speculative.contains(&format!("fn {name}")), "no test matches the --skip filter {name}");
        }
    }

    #[test]
    fn the_openai_version_is_the_one_the_tests_look_for() {
        let config = std::fs::read_to_string(crate::workspace::root().join(".cargo/config.toml")).unwrap();
        assert!(config.contains(&format!(".cache/pip/openai-{}", super::OPENAI_VERSION)), "EXSA_OPENAI_SITE and OPENAI_VERSION differ");
        assert!(config.contains(&format!(".cache/pip/ollama-{}", super::OLLAMA_VERSION)), "EXSA_OLLAMA_SITE and OLLAMA_VERSION differ");
    }
}
