//! The C++ exception guards (shim/exsa_shim.cpp), compiled with the cc crate and linked before
//! llama.cpp's libraries, whose symbols they call.

use std::path::Path;

pub const HEADER: &str = "shim/exsa_shim.h";
const SOURCE: &str = "shim/exsa_shim.cpp";

/// `rpc`: the build has ggml's RPC backend, which the guards then call (else they report that
/// it is missing).
pub fn compile(manifest_dir: &Path, llama_source: &Path, rpc: bool) {
    for file in [HEADER, SOURCE] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(file).display());
    }
    let mut build = cc::Build::new();
    if rpc {
        build.define("EXSA_WITH_RPC", "1");
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
