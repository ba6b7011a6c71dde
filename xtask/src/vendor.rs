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

/// What to do with a vendor/llama.cpp that is already there.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    UpToDate,
    Replace,
}

/// A tree that hashes like the pin stays; another one is replaced only with --force: it may
/// hold someone's changes.
fn existing_tree(hash: &str, pinned: &str, force: bool) -> Result<Existing> {
    if hash == pinned {
        return Ok(Existing::UpToDate);
    }
    if !force {
        bail!(
            "vendor/llama.cpp differs from the pin (sha256 {} != {}): it was modified or is another version; \
             `cargo xtask vendor --force` replaces it, LLAMA_CPP_DIR builds another tree without touching it",
            &hash[..12.min(hash.len())],
            &pinned[..12.min(pinned.len())]
        );
    }
    Ok(Existing::Replace)
}

/// The llama.cpp tree builds use: LLAMA_CPP_DIR when set, else vendor/llama.cpp, vendored
/// first when missing.
pub fn source() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LLAMA_CPP_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let vendored = workspace::root().join("vendor/llama.cpp");
    if !vendored.join("ggml/CMakeLists.txt").is_file() {
        run(&Args::default())?;
    }
    Ok(vendored)
}

pub fn run(args: &Args) -> Result<()> {
    let pin = pin::read()?;
    let dest = workspace::root().join("vendor/llama.cpp");
    if dest.exists() && !args.update_pin {
        let (hash, _) = llama_src::tree_sha256(&dest).with_context(|| format!("cannot hash {}", dest.display()))?;
        if existing_tree(&hash, &pin.tree_sha256, args.force)? == Existing::UpToDate {
            eprintln!("vendor/llama.cpp is up to date ({} {}, sha256 {})", pin.package, pin.version, &hash[..12]);
            return Ok(());
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
    copy_tree_except(src, dst, &|_| false)
}

/// `copy_tree`, leaving out every file or folder for which `skip` (given its path relative to
/// `src`) is true.
pub fn copy_tree_except(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    copy_below(src, dst, Path::new(""), skip)
}

fn copy_below(src: &Path, dst: &Path, rel: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(dst.join(rel))?;
    let dir = src.join(rel);
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        if skip(&child) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_below(src, dst, &child, skip)?;
        } else {
            std::fs::copy(src.join(&child), dst.join(&child)).with_context(|| format!("cannot copy {}", src.join(&child).display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_that_differs_from_the_pin_is_kept_unless_forced() {
        let pinned = "cc3991296b10aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let changed = "0123456789abbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        assert_eq!(existing_tree(pinned, pinned, false).unwrap(), Existing::UpToDate);
        assert_eq!(existing_tree(pinned, pinned, true).unwrap(), Existing::UpToDate);
        let err = existing_tree(changed, pinned, false).unwrap_err().to_string();
        assert!(err.contains("0123456789ab") && err.contains("cc3991296b10") && err.contains("--force"), "{err}");
        assert_eq!(existing_tree(changed, pinned, true).unwrap(), Existing::Replace);
    }

    #[test]
    fn the_vendored_tree_hashes_like_the_pin() {
        // What `cargo xtask vendor` checks, on the tree the build uses (the test command vendors
        // it first): a modified file would show here.
        let dest = crate::workspace::root().join("vendor/llama.cpp");
        if !dest.is_dir() {
            return;
        }
        let (hash, files) = llama_src::tree_sha256(&dest).unwrap();
        let pin = pin::read().unwrap();
        assert_eq!(hash, pin.tree_sha256, "vendor/llama.cpp is not the pinned tree");
        assert_eq!(files, pin.files);
    }
}
