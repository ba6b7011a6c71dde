//! The llama.cpp source tree that `llama-sys` compiles, pinned by content hash.
//!
//! Third-party source is never committed to this repository, yet a crate that depends on
//! `llama-sys` (from a registry, a git URL or a path) must build with no manual step. The tree is
//! found, in this order:
//!
//! 1. **Packaged**: `llama.cpp/` inside this crate. `cargo xtask package` stages it there before
//!    `cargo package`, so the `.crate` is self-contained, as openssl-src carries OpenSSL; the
//!    registry's checksum covers it.
//! 2. **Vendored**: the workspace's `vendor/llama.cpp`, which `cargo xtask vendor` filled and
//!    verified.
//! 3. **Fetched**: the pinned crates.io package that ships the tree (the one the `llama-cpp-2`
//!    baseline compiles), obtained through cargo itself so that its registry, mirrors, source
//!    replacement and offline cache all apply, then verified against [`PIN_TOML`]'s tree hash.

#![warn(missing_docs)]

mod fetch;
mod pin;
mod tree;

use std::path::{Path, PathBuf};

pub use fetch::fetch_package;
pub use pin::Pin;
pub use tree::tree_sha256;

/// The pin this crate was built with (`llama.cpp.toml`).
pub const PIN_TOML: &str = include_str!("../llama.cpp.toml");

/// Where [`locate`] found the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `llama.cpp/` inside this crate, staged by `cargo xtask package`.
    Packaged,
    /// The workspace's `vendor/llama.cpp`, filled by `cargo xtask vendor`.
    Vendored,
    /// The pinned package's tree in cargo's registry cache, verified against the pin's hash.
    Fetched,
}

/// A pinned llama.cpp tree on disk.
#[derive(Clone, Debug)]
pub struct Located {
    /// The tree's root folder (the one holding `include/llama.h` and `CMakeLists.txt`).
    pub dir: PathBuf,
    /// Where it was found.
    pub origin: Origin,
    /// The pin it answers to ([`PIN_TOML`], parsed).
    pub pin: Pin,
}

/// Why the pinned tree could not be had.
#[derive(Debug)]
pub enum Error {
    /// cargo could not obtain the package (offline without it in the cache, say).
    Fetch {
        /// The package asked for.
        package: String,
        /// Its exact version.
        version: String,
        /// What went wrong: cargo's last line of error output, or why cargo could not run.
        detail: String,
    },
    /// The package's tree is not the pinned one.
    Mismatch {
        /// The package fetched.
        package: String,
        /// Its version.
        version: String,
        /// The tree hash found (hex SHA-256, see [`tree_sha256`]).
        found: String,
        /// The tree hash the pin expects.
        pinned: String,
    },
    /// A file or folder could not be read or written.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Fetch { package, version, detail } => write!(
                f,
                "cannot obtain the pinned llama.cpp source ({package} {version}) through cargo: {detail}; \
                 build once with network access, or set LLAMA_CPP_DIR to a llama.cpp checkout"
            ),
            Error::Mismatch { package, version, found, pinned } => {
                write!(f, "{package} {version} from the registry hashes to {found}, but the pin says {pinned}: refusing to build it")
            }
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The pinned tree: packaged, vendored, or fetched through `cargo` (the program to run, usually
/// the `CARGO` that runs the caller) into its registry cache. `scratch` is a folder the fetch may
/// write its throw-away manifest to.
///
/// # Errors
///
/// [`Error::Fetch`] when cargo cannot obtain the pinned package, [`Error::Mismatch`] when the
/// fetched tree does not hash to the pin, [`Error::Io`] when it cannot be read.
pub fn locate(cargo: &Path, scratch: &Path) -> Result<Located, Error> {
    let pin = Pin::parse(PIN_TOML);
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let packaged = here.join("llama.cpp");
    if is_tree(&packaged) {
        return Ok(Located { dir: packaged, origin: Origin::Packaged, pin });
    }
    let vendored = here.join("../../vendor/llama.cpp");
    if is_tree(&vendored) {
        let dir = vendored.canonicalize().unwrap_or(vendored);
        return Ok(Located { dir, origin: Origin::Vendored, pin });
    }
    let package_dir = fetch_package(cargo, &pin.package, &pin.version, scratch)?;
    let dir = package_dir.join(&pin.folder);
    let (found, _) = tree_sha256(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
    if found != pin.tree_sha256 {
        return Err(Error::Mismatch { package: pin.package, version: pin.version, found, pinned: pin.tree_sha256 });
    }
    Ok(Located { dir, origin: Origin::Fetched, pin })
}

/// Whether `dir` looks like a llama.cpp source tree.
pub fn is_tree(dir: &Path) -> bool {
    dir.join("include/llama.h").is_file() && dir.join("CMakeLists.txt").is_file()
}
