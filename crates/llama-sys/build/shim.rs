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

pub fn compile(manifest_dir: &Path, llama_source: &Path, rpc: Rpc) {
    for file in [HEADER, SOURCE] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(file).display());
    }
    let mut build = cc::Build::new();
    if rpc != Rpc::Off {
        build.define("EXSA_WITH_RPC", "1");
    }
    if rpc == Rpc::Watched {
        build.define("EXSA_WITH_RPC_WATCH", "1").include(manifest_dir.join("rpc-watch"));
    }
    build
        .cpp(true)
        .std("c++17")
        .file(manifest_dir.join(SOURCE))
        .include(llama_source.join("include"))
        .include(llama_source.join("ggml/include"))
        // The guards must catch: never build them with exceptions off.
        .flag_if_supported("-fexceptions")
        .warnings(true)
        .try_compile("exsa_shim")
        .unwrap_or_else(|e| crate::fail(&format!("cannot compile the exception guards {SOURCE}: {e}")));
}
