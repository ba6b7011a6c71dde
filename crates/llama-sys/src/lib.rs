//! Raw FFI to llama.cpp, compiled from source by this crate's build script with the flags chosen
//! for the target (see `build/plan.rs`): native SIMD on every CPU, Metal and Accelerate on Apple,
//! CUDA on request.
//!
//! Everything here is `unsafe` and unchecked; the `llama` crate is the safe layer. What is
//! specific to this crate is [`BUILD_INFO`]: the exact configuration that was compiled.
//!
//! The source is the pinned tree that the `llama-src` crate locates (packaged, `vendor/llama.cpp`,
//! or fetched through cargo and verified) or whatever `LLAMA_CPP_DIR` points at. Besides
//! llama.cpp's own API, the `exsa_*` functions are exception guards (`shim/exsa_shim.h`): each
//! calls one llama.cpp function inside try/catch and returns [`EXSA_EXCEPTION`] with the
//! exception's text in an [`exsa_error`] instead of letting it unwind into Rust.

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc,
    rustdoc::all
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
pub use bindings::*;

mod build_info;
pub use build_info::{BUILD_INFO, BuildInfo};

/// Dynamic-backend builds (`backend-dl`): the folder this build's CMake installed the backend
/// modules into (`libggml-cpu.so`, ...), the last place the `llama` crate looks for them.
pub const BACKEND_DIR: Option<&str> = option_env!("LLAMA_SYS_BACKEND_DIR");

impl exsa_error {
    /// An empty slot for a guard to fill.
    pub fn new() -> exsa_error {
        exsa_error { what: [0; 512] }
    }

    /// The caught exception's text (the guard NUL-terminates it; lossy UTF-8).
    pub fn what(&self) -> String {
        let bytes: Vec<u8> = self.what.iter().map(|&c| c as u8).collect();
        std::ffi::CStr::from_bytes_until_nul(&bytes).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

// The build plan is the build script's, but its unit tests run here: build scripts have no
// test harness of their own.
#[cfg(test)]
#[path = "../build/plan.rs"]
#[allow(dead_code)]
mod plan;

#[cfg(test)]
#[path = "../build/source_patch.rs"]
#[allow(dead_code)]
mod source_patch;

#[cfg(test)]
#[path = "../build/rpc_patch.rs"]
#[allow(dead_code)]
mod rpc_patch;

#[cfg(test)]
#[path = "../build/amx_patch.rs"]
#[allow(dead_code)]
mod amx_patch;

// The build script's tuned-profile reader, tested here with stand-ins for the two build-script
// helpers it calls (`super::env::var`, `super::fail`).
#[cfg(test)]
#[path = "../build/profile.rs"]
#[allow(dead_code)]
mod profile;
#[cfg(test)]
fn fail(message: &str) -> ! {
    panic!("{message}")
}
#[cfg(test)]
mod env {
    pub fn var(name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}
