//! `llama.cpp.toml`: which package ships the tree, and the tree's content hash.

/// The pin, read without a TOML parser: the file is ours, flat, and written by [`Pin::to_toml`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pin {
    /// The crates.io package that ships the tree.
    pub package: String,
    /// The package's exact version.
    pub version: String,
    /// The folder inside the package.
    pub folder: String,
    /// The upstream llama.cpp commit, or "unknown" when the package does not record it.
    pub upstream_commit: String,
    /// llama.cpp's build number (its git commit count), when known.
    pub build_number: Option<u32>,
    /// [`crate::tree_sha256`] of the folder.
    pub tree_sha256: String,
    /// Number of files in the folder (0 when the pin does not say).
    pub files: usize,
}

const HEADER: &str = "\
# The llama.cpp source that Option B compiles: the tree inside this crates.io package, the same
# one the llama-cpp-2 baseline compiles. `cargo xtask vendor` copies it to vendor/llama.cpp and
# checks tree_sha256 (as llama-sys does when it fetches the tree itself); `cargo xtask vendor
# --update-pin` rewrites this file after a bump.
# The package carries no git metadata, so the upstream commit and build number are unknown.
";

impl Pin {
    /// Reads a pin from `llama.cpp.toml` text. Comments, unknown keys and lines without `=` are
    /// skipped; a missing key keeps its default (empty, None or 0), as does an unparsable number.
    pub fn parse(text: &str) -> Pin {
        let mut pin = Pin::default();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "package" => pin.package = value,
                "version" => pin.version = value,
                "folder" => pin.folder = value,
                "upstream_commit" => pin.upstream_commit = value,
                "build_number" => pin.build_number = value.parse().ok(),
                "tree_sha256" => pin.tree_sha256 = value,
                "files" => pin.files = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        pin
    }

    /// The pin as `llama.cpp.toml` text, with the file's explanatory header (a missing build
    /// number is written as 0).
    pub fn to_toml(&self) -> String {
        format!(
            "{HEADER}package = {:?}\nversion = {:?}\nfolder = {:?}\nupstream_commit = {:?}\nbuild_number = {}\ntree_sha256 = {:?}\nfiles = {}\n",
            self.package,
            self.version,
            self.folder,
            self.upstream_commit,
            self.build_number.unwrap_or(0),
            self.tree_sha256,
            self.files
        )
    }

    /// One line that says which llama.cpp this is.
    pub fn describe(&self) -> String {
        if self.package.is_empty() {
            return "unpinned (LLAMA_CPP_DIR)".into();
        }
        format!("{} {} (tree sha256 {})", self.package, self.version, &self.tree_sha256[..self.tree_sha256.len().min(12)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_without_a_pin_says_it_is_unpinned() {
        // LLAMA_CPP_DIR builds carry Pin::default(): reports must not pass them off as the pin.
        assert_eq!(Pin::default().describe(), "unpinned (LLAMA_CPP_DIR)");
        let pin = Pin { package: "llama-cpp-sys-2".into(), version: "0.1.161".into(), tree_sha256: "cc3991296b10ff".into(), ..Pin::default() };
        assert_eq!(pin.describe(), "llama-cpp-sys-2 0.1.161 (tree sha256 cc3991296b10)");
    }

    #[test]
    fn the_committed_pin_parses_and_writes_back_unchanged() {
        let pin = Pin::parse(crate::PIN_TOML);
        assert_eq!(pin.package, "llama-cpp-sys-2");
        assert_eq!(pin.folder, "llama.cpp");
        assert_eq!(pin.tree_sha256.len(), 64);
        assert!(pin.files > 1000, "{pin:?}");
        assert_eq!(pin.to_toml(), crate::PIN_TOML);
        assert_eq!(Pin::parse(&pin.to_toml()), pin);
    }
}
