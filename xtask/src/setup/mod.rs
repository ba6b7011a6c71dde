//! `cargo xtask setup`: the system packages the source build needs and Rust does not bring
//! (cmake, libclang for bindgen, ccache, and valgrind for the leak check on Linux). Each is found
//! the way its user finds it, installed with apt-get or brew when missing, found again, and
//! reported with its path; libclang is then loaded through bindgen itself, so a library that only
//! looks right cannot pass.

pub mod cuda;
mod libclang;
mod packages;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use packages::{InstallPlan, Manager};

#[derive(clap::Args, Default)]
pub struct Args {
    /// Only report each dependency and its path; install nothing, fail when one is missing.
    #[arg(long)]
    check: bool,
    /// Also assemble a CUDA toolkit from NVIDIA's PyPI wheels into .cache/cuda (Linux x86-64)
    /// and print the CUDA_PATH to build with.
    #[arg(long)]
    cuda: bool,
}

/// A system dependency of the source build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dependency {
    Cmake,
    Libclang,
    Ccache,
    Valgrind,
    /// The load balancer of the scale-out recipe's test (docs/distributed.md).
    Haproxy,
}

impl Dependency {
    /// What this platform needs: valgrind runs `cargo xtask leak-check`, which is Linux-only;
    /// HAProxy fronts two servers in the scale-out test, which runs where the other server tests
    /// do (Linux, macOS).
    pub fn needed() -> Vec<Dependency> {
        let mut deps = vec![Dependency::Cmake, Dependency::Libclang, Dependency::Ccache];
        if cfg!(target_os = "linux") {
            deps.push(Dependency::Valgrind);
        }
        if cfg!(unix) {
            deps.push(Dependency::Haproxy);
        }
        deps
    }

    pub fn name(self) -> &'static str {
        match self {
            Dependency::Cmake => "cmake",
            Dependency::Libclang => "libclang",
            Dependency::Ccache => "ccache",
            Dependency::Valgrind => "valgrind",
            Dependency::Haproxy => "haproxy",
        }
    }

    /// Where this machine has it, found as its user finds it.
    fn locate(self) -> Option<PathBuf> {
        match self {
            // The cmake crate runs $CMAKE, else `cmake` from PATH.
            Dependency::Cmake => std::env::var_os("CMAKE").map(PathBuf::from).filter(|p| p.is_file()).or_else(|| which("cmake")),
            Dependency::Libclang => libclang::find(&libclang::SearchEnv::from_process(), libclang::Os::host()),
            Dependency::Ccache | Dependency::Valgrind => which(self.name()),
            // Debian installs it in /usr/sbin, which a user's PATH may lack.
            Dependency::Haproxy => which("haproxy").or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file())),
        }
    }
}

/// The first `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

pub fn run(args: &Args) -> Result<()> {
    let mut missing: Vec<Dependency> = Dependency::needed().into_iter().filter(|d| d.locate().is_none()).collect();
    if !missing.is_empty() {
        let plan = Manager::detect().map(|m| InstallPlan::new(m, &missing, is_root()));
        if args.check {
            report();
            bail!("missing {}: {}", names(&missing), fix_line(plan.as_ref()));
        }
        install(&missing, plan.as_ref())?;
        missing.retain(|d| d.locate().is_none());
        if !missing.is_empty() {
            report();
            bail!("{} still missing after installing: {}", names(&missing), fix_line(None));
        }
    }
    report();
    check_libclang_loads()?;
    if args.cuda {
        cuda::run()?;
    }
    Ok(())
}

/// One line per dependency: its path, or that it is missing.
fn report() {
    for dep in Dependency::needed() {
        match dep.locate() {
            Some(path) => eprintln!("setup: {:<9} {}", dep.name(), path.display()),
            None => eprintln!("setup: {:<9} MISSING", dep.name()),
        }
    }
}

/// bindgen loads libclang itself, through clang-sys: ask it to, so that what we report is what the
/// build will use.
fn check_libclang_loads() -> Result<()> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let version = std::panic::catch_unwind(bindgen::clang_version);
    std::panic::set_hook(quiet);
    match (version, clang_sys::get_library()) {
        (Ok(version), Some(lib)) => {
            eprintln!("setup: bindgen loads {} ({})", lib.path().display(), version.full);
            Ok(())
        }
        _ => bail!("bindgen cannot load libclang although a file that looks like it was found: {}", fix_line(None)),
    }
}

fn install(missing: &[Dependency], plan: Option<&InstallPlan>) -> Result<()> {
    let Some(plan) = plan else {
        bail!("missing {} and neither apt-get nor brew is here: {}", names(missing), fix_line(None));
    };
    if !is_root() && cfg!(target_os = "linux") && !Command::new("sudo").args(["-n", "true"]).output().is_ok_and(|o| o.status.success()) {
        bail!("missing {} and no rights to install them: run `{}`, then this command again", names(missing), plan.shell_line());
    }
    eprintln!("setup: installing {}: {}", names(missing), plan.shell_line());
    for argv in &plan.commands {
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status();
        if !status.is_ok_and(|s| s.success()) {
            bail!(
                "`{}` failed (offline, or the package index is unreachable?): run `{}` once it can reach its repositories, {}",
                argv.join(" "),
                plan.shell_line(),
                "or install them by hand and set LIBCLANG_PATH to the folder of libclang.so"
            );
        }
    }
    Ok(())
}

/// The one line that tells the user what to run.
fn fix_line(plan: Option<&InstallPlan>) -> String {
    match plan {
        Some(plan) => format!("run `{}`", plan.shell_line()),
        None => "install cmake, ccache, valgrind and LLVM's libclang (the C library libclang.so or libclang-N.so.M, not libclang-cpp) \
                 with your package manager, or set LIBCLANG_PATH to the folder that holds libclang"
            .into(),
    }
}

fn names(deps: &[Dependency]) -> String {
    deps.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
