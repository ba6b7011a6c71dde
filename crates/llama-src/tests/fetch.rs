//! The fallback a git or path dependency takes when no packaged or vendored tree exists: the
//! pinned package obtained through cargo, its tree hashing to the pin. Runs offline first, so on
//! a machine whose cargo cache holds the package (every build of this workspace's crate
//! baseline puts it there) it needs no network.

use std::path::PathBuf;

use llama_src::{PIN_TOML, Pin, fetch_package, is_tree, tree_sha256};

#[test]
fn the_pinned_package_comes_through_cargo_and_hashes_to_the_pin() {
    let pin = Pin::parse(PIN_TOML);
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
    let scratch = std::env::temp_dir().join(format!("llama-src-fetch-{}", std::process::id()));
    let package = fetch_package(&cargo, &pin.package, &pin.version, &scratch).unwrap();
    let tree = package.join(&pin.folder);
    assert!(is_tree(&tree), "{} is not a llama.cpp tree", tree.display());
    let (hash, files) = tree_sha256(&tree).unwrap();
    assert_eq!(hash, pin.tree_sha256);
    assert_eq!(files, pin.files);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn a_package_that_does_not_exist_is_a_fetch_error_that_says_what_to_do() {
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
    let scratch = std::env::temp_dir().join(format!("llama-src-nofetch-{}", std::process::id()));
    let err = fetch_package(&cargo, "llama-cpp-sys-2", "0.0.0-no-such-version", &scratch).unwrap_err();
    assert!(matches!(err, llama_src::Error::Fetch { .. }), "{err}");
    assert!(err.to_string().contains("LLAMA_CPP_DIR"), "{err}");
    std::fs::remove_dir_all(&scratch).unwrap();
}
