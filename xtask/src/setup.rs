//! `cargo xtask setup`: the system packages the source build needs (cmake, libclang, ccache),
//! installed by build-scripts/install-system-deps.sh.

use std::process::Command;

use anyhow::Result;

use crate::workspace;

#[derive(clap::Args, Default)]
pub struct Args {
    /// Only report what is missing and the command that would install it.
    #[arg(long)]
    check: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let script = workspace::root().join("build-scripts/install-system-deps.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if args.check {
        cmd.arg("--check");
    }
    workspace::run(&mut cmd)
}
