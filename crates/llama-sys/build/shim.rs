//! The C++ exception guards (shim/exsa_shim.cpp), compiled with the cc crate and linked before
//! llama.cpp's libraries, whose symbols they call.

use std::path::Path;

pub const HEADER: &str = "shim/exsa_shim.h";
const SOURCE: &str = "shim/exsa_shim.cpp";

/// What the build has of ggml's RPC backend, which the guards then call (else they report that it
/// is missing).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Off,
    /// Upstream's client: a lost server ends the process.
    Unpatched,
    /// With rpc-watch (rpc_patch.rs): a lost server is reported.
    Watched,
}

impl Rpc {
    pub fn from_build(switch: bool, patched: bool) -> Rpc {
        match (switch, patched) {
            (false, _) => Rpc::Off,
            (true, false) => Rpc::Unpatched,
            (true, true) => Rpc::Watched,
        }
    }
}

/// A C++ build of code that calls llama.cpp through exception guards (the shim here, the chat
/// layer in build/chat.rs): C++17, llama.cpp's public headers and the shim's, exceptions on.
pub fn guarded_cpp(manifest_dir: &Path, llama_source: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(manifest_dir.join("shim"))
        .include(llama_source.join("include"))
        .include(llama_source.join("ggml/include"))
        // The guards must catch: never build them with exceptions off.
        .flag_if_supported("-fexceptions");
    build
}

/// `gomp`: whether the program links libgomp (GNU OpenMP), whose thread teams the shim releases.
pub fn compile(manifest_dir: &Path, llama_source: &Path, rpc: Rpc, gomp: bool) {
    for file in [HEADER, SOURCE] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(file).display());
    }
    let mut build = guarded_cpp(manifest_dir, llama_source);
    if rpc != Rpc::Off {
        build.define("EXSA_WITH_RPC", "1");
    }
    if gomp {
        build.define("EXSA_WITH_GOMP", "1");
    }
    if rpc == Rpc::Watched {
        build.define("EXSA_WITH_RPC_WATCH", "1").include(manifest_dir.join("rpc-watch"));
    }
    build
        .file(manifest_dir.join(SOURCE))
        .warnings(true)
        .try_compile("exsa_shim")
        .unwrap_or_else(|e| crate::fail(&format!("cannot compile the exception guards {SOURCE}: {e}")));
}
