//! `cargo xtask vendor`: fills vendor/llama.cpp from the pinned crates.io package, through cargo
//! itself (so its registry, mirrors and offline cache all apply), and verifies the tree hash.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{pin, workspace};

#[derive(clap::Args, Default)]
pub struct Args {
    /// Replace vendor/llama.cpp even when it exists with different content.
    #[arg(long)]
    force: bool,
    /// Record the fetched tree's hash in the pin file instead of checking it (after a bump).
    #[arg(long)]
    update_pin: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let pin = pin::read()?;
    let dest = workspace::root().join("vendor/llama.cpp");
    if dest.exists() && !args.update_pin {
        let (hash, _) = llama_src::tree_sha256(&dest).with_context(|| format!("cannot hash {}", dest.display()))?;
        if hash == pin.tree_sha256 {
            eprintln!("vendor/llama.cpp is up to date ({} {}, sha256 {})", pin.package, pin.version, &hash[..12]);
            return Ok(());
        }
        if !args.force {
            bail!(
                "vendor/llama.cpp differs from the pin (sha256 {} != {}): it was modified or is another version; \
                 `cargo xtask vendor --force` replaces it, LLAMA_CPP_DIR builds another tree without touching it",
                &hash[..12],
                &pin.tree_sha256[..12]
            );
        }
    }

    let package_dir = fetch_package(&pin.package, &pin.version)?;
    let src = package_dir.join(&pin.folder);
    let (hash, files) = llama_src::tree_sha256(&src).with_context(|| format!("cannot hash {}", src.display()))?;
    if args.update_pin {
        pin::write(&pin::Pin { tree_sha256: hash.clone(), files, ..pin.clone() })?;
        eprintln!("pin updated: {} {} sha256 {hash} ({files} files)", pin.package, pin.version);
    } else if hash != pin.tree_sha256 {
        bail!("{} {} from the registry hashes to {hash}, but the pin says {}: refusing to vendor it", pin.package, pin.version, pin.tree_sha256);
    }

    let staging = dest.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    copy_tree(&src, &staging)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&staging, &dest)?;
    eprintln!("vendored {} {} into vendor/llama.cpp ({files} files, sha256 {})", pin.package, pin.version, &hash[..12]);
    Ok(())
}

/// The pinned package's unpacked source, through cargo (llama-src does the asking).
fn fetch_package(name: &str, version: &str) -> Result<PathBuf> {
    eprintln!("fetching {name} {version} through cargo");
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
    Ok(llama_src::fetch_package(&cargo, name, version, &workspace::target_dir().join("xtask/vendor-fetch"))?)
}

pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to).with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}
