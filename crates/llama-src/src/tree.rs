//! A content hash of a folder tree.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Every file's relative path ('/'-separated), size and bytes, in path order. Timestamps and
/// permissions do not count, so a copy hashes like its original. Returns the hex digest and the
/// number of files.
///
/// # Errors
///
/// The first I/O error met while walking the tree or reading a file.
pub fn tree_sha256(root: &Path) -> io::Result<(String, usize)> {
    let mut files = Vec::new();
    collect_files(root, root, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for rel in &files {
        let bytes = std::fs::read(root.join(rel))?;
        let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok((hasher.finalize().iter().map(|b| format!("{b:02x}")).collect(), files.len()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
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
        let base = std::env::temp_dir().join(format!("llama-src-hash-{}", std::process::id()));
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
        std::fs::rename(b.join("x"), b.join("w")).unwrap();
        std::fs::write(b.join("w"), "x").unwrap();
        assert_ne!(ha, tree_sha256(&b).unwrap().0, "a renamed file changes the hash");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
