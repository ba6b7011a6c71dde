//! sha256 of files and folder trees, with progress for the big ones.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of one file, with a progress bar on stderr.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let bar = ProgressBar::new(len).with_message(format!("sha256 {}", path.file_name().unwrap_or_default().display()));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}").expect("valid template").progress_chars("=> "),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

/// A content hash of a folder: every file's relative path ('/'-separated), size and bytes, in
/// path order. Timestamps and permissions do not count, so a copy hashes like its original.
pub fn tree_sha256(root: &Path) -> Result<(String, usize)> {
    let mut files = Vec::new();
    collect_files(root, root, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for rel in &files {
        let bytes = std::fs::read(root.join(rel)).with_context(|| format!("cannot read {}", rel.display()))?;
        let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok((hex(&hasher.finalize()), files.len()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).expect("walked below root").to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_sees_content_and_names_but_not_order_of_creation() {
        let base = std::env::temp_dir().join(format!("xtask-hash-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        for (dir, order) in [(&a, ["x", "y/z"]), (&b, ["y/z", "x"])] {
            for name in order {
                let p = dir.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, name).unwrap();
            }
        }
        let (ha, na) = tree_sha256(&a).unwrap();
        assert_eq!(na, 2);
        assert_eq!(ha, tree_sha256(&b).unwrap().0);
        std::fs::write(b.join("x"), "changed").unwrap();
        assert_ne!(ha, tree_sha256(&b).unwrap().0);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
