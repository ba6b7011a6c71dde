//! `cargo xtask test`: the README's test command. Sets up what the tests need (system packages,
//! the vendored source, the default model), then runs every test of the workspace, and the
//! leak check on Linux.

use anyhow::Result;

use crate::{fetch_model, leak_check, setup, vendor, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    setup::run(&setup::Args::default())?;
    vendor::run(&vendor::Args::default())?;
    fetch_model::run(&fetch_model::Args::default())?;
    workspace::run(workspace::cargo().args(["test", "--workspace", "--locked"]).args(&args.cargo_args))?;
    if args.cargo_args.is_empty() && cfg!(target_os = "linux") {
        leak_check::run(&leak_check::Args::default())?;
    }
    Ok(())
}
