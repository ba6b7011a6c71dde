//! Raw FFI to llama.cpp, compiled from source by this crate's build script with the flags chosen
//! for the target (see `build/plan.rs`): native SIMD on every CPU, Metal and Accelerate on Apple,
//! CUDA on request.
//!
//! Everything here is `unsafe` and unchecked; the `llama` crate is the safe layer. What is
//! specific to this crate is [`BUILD_INFO`]: the exact configuration that was compiled.
//!
//! The source is `vendor/llama.cpp` (materialised by `cargo xtask vendor`) or whatever
//! `LLAMA_CPP_DIR` points at.

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

// The build plan is the build script's, but its unit tests run here: build scripts have no
// test harness of their own.
#[cfg(test)]
#[path = "../build/plan.rs"]
#[allow(dead_code)]
mod plan;
