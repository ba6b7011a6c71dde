//! `cargo xtask fuzz --minutes N`: the randomized safe-API test (crates/llama/tests/fuzz.rs) for
//! longer than CI's budget, with a fresh seed each run (printed, so a failure can be replayed
//! with `--seed`). Each group runs in its own child process, so an abort is reported, not fatal.

use anyhow::Result;

use crate::{fetch_model, llama_tools, vendor, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// Minutes in all, shared by the four groups (samplers, batches, GGUF headers, chat
    /// templates).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Replay a seed instead of drawing one.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: &Args) -> Result<()> {
    vendor::run(&vendor::Args::default())?;
    fetch_model::run(&fetch_model::Args::default())?;
    // The chat template group mutates llama.cpp's corpus of templates.
    llama_tools::sdist_source()?;
    let seed = args.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs()));
    let per_group = (args.minutes * 60 / 4).max(10);
    eprintln!("fuzz: seed {seed}, {per_group} s per group (replay with --seed {seed})");
    workspace::run(
        workspace::cargo()
            .args(["test", "--locked", "--release", "-p", "exsa-llama", "--features", "chat", "--test", "fuzz", "--", "--nocapture"])
            .env("LLAMA_FUZZ_SEED", seed.to_string())
            .env("LLAMA_FUZZ_SECONDS", per_group.to_string())
            .env("LLAMA_FUZZ_CASES", u32::MAX.to_string()),
    )
}
