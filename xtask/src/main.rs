//! `cargo xtask <command>`: the project's automation, one module per command.

mod app_test;
mod bench;
mod bench_embed;
mod bench_serve;
mod check_cuda;
mod crate_shape;
mod dist;
mod dynamic_build;
mod examples;
mod fetch_model;
mod fuzz;
mod gpu_bundle;
mod hashing;
mod leak_check;
mod llama_tools;
mod package;
mod pin;
mod python;
mod server_process;
mod server_suite;
mod setup;
mod synth_models;
mod template_parity;
mod test;
mod tune;
mod vendor;
mod workspace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "exsa-engine project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install cmake, libclang and ccache when missing (apt-get or brew), or print the command.
    Setup(setup::Args),
    /// Materialise the pinned llama.cpp source in vendor/llama.cpp and verify its hash.
    Vendor(vendor::Args),
    /// Install the default model (Gemma 3 270M Q4_K_M) into .cache/models and print its path.
    FetchModel(fetch_model::Args),
    /// Random-weight GGUFs of other architectures (LFM2, llama, Mamba) into .cache/models/synth.
    SynthModels(synth_models::Args),
    /// .crate files of llama-src (with the pinned llama.cpp inside), llama-sys and llama.
    Package(package::Args),
    /// Build and run an app outside the workspace against the packaged crates, offline.
    AppTest(app_test::Args),
    /// Run every example of the workspace on the project's models (each checks its result).
    Examples(examples::Args),
    /// Set everything up, then run every test of the workspace.
    Test(test::Args),
    /// The randomized safe-API test for longer, with a fresh seed.
    Fuzz(fuzz::Args),
    /// Run the safe wrapper's test binaries under valgrind; fail on any definite leak.
    LeakCheck(leak_check::Args),
    /// The A/B speed test: our source build against the llama-cpp-2 crate baseline.
    BenchCompare(bench::Args),
    /// Our server against llama.cpp's llama-server under streaming chat load.
    BenchServe(bench_serve::Args),
    /// Our server's embeddings per second against llama-server --embeddings.
    BenchEmbed(bench_embed::Args),
    /// Find the fastest llama.cpp build for this machine and make it the default.
    Tune(tune::Args),
    /// Build the CUDA backend here against a toolkit from PyPI (setup --cuda): the full check.
    CheckCuda(check_cuda::Args),
    /// Every chat template of llama.cpp's corpus rendered by exsa serve and by llama-server, compared.
    TemplateParity(template_parity::Args),
    /// llama.cpp's own server test suite against exsa serve (and llama-server with --reference).
    ServerSuite(server_suite::Args),
    /// Everything a GPU machine without Rust needs to bench our build on its GPU (docs/gpu.md).
    GpuBundle(gpu_bundle::Args),
    /// The release bundle: exsa with every x86-64 CPU variant, relocatable, as a tarball.
    Dist(dist::Args),
}

/// Errors end the run with one `error:` line (the cause chain joined), never with a backtrace:
/// the last line a user sees is the one that says what to do.
fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup(args) => setup::run(&args),
        Command::Vendor(args) => vendor::run(&args),
        Command::FetchModel(args) => fetch_model::run(&args).map(|path| println!("{}", path.display())),
        Command::SynthModels(args) => synth_models::run(&args),
        Command::Package(args) => package::run(&args).map(|_| ()),
        Command::AppTest(args) => app_test::run(&args),
        Command::Examples(args) => examples::run(&args),
        Command::Test(args) => test::run(&args),
        Command::LeakCheck(args) => leak_check::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::BenchCompare(args) => bench::run(&args),
        Command::Tune(args) => tune::run(&args),
        Command::CheckCuda(args) => check_cuda::run(&args),
        Command::GpuBundle(args) => gpu_bundle::run(&args),
        Command::Dist(args) => dist::run(&args),
        Command::BenchServe(args) => bench_serve::run(&args),
        Command::BenchEmbed(args) => bench_embed::run(&args),
        Command::TemplateParity(args) => template_parity::run(&args),
        Command::ServerSuite(args) => server_suite::run(&args),
    }
}
