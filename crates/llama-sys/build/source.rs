//! Where the llama.cpp source comes from: LLAMA_CPP_DIR, else the pinned tree that the
//! llama-src crate locates (packaged, vendored, or fetched through cargo and verified).

use std::path::{Path, PathBuf};

use crate::env;

pub use llama_src::Pin;

pub const SOURCE_DIR_VAR: &str = "LLAMA_CPP_DIR";

/// The source tree to build and what is known of its version.
pub struct Source {
    pub dir: PathBuf,
    pub pin: Pin,
}

pub fn locate(out_dir: &Path) -> Source {
    if let Some(dir) = env::var(SOURCE_DIR_VAR) {
        let dir = PathBuf::from(dir);
        if !llama_src::is_tree(&dir) {
            crate::fail(&format!("{SOURCE_DIR_VAR}={} is not a llama.cpp source tree (no include/llama.h or CMakeLists.txt)", dir.display()));
        }
        return Source { dir, pin: Pin::default() };
    }
    let cargo = env::cargo_path("CARGO");
    match llama_src::locate(&cargo, &out_dir.join("llama-src-fetch")) {
        Ok(found) => {
            if found.origin == llama_src::Origin::Fetched {
                println!("cargo:warning=llama-sys: using the pinned llama.cpp fetched through cargo ({})", found.pin.describe());
            }
            Source { dir: found.dir, pin: found.pin }
        }
        Err(e) => crate::fail(&e.to_string()),
    }
}
