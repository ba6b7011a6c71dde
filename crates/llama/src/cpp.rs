//! Calls into llama.cpp functions that can throw a C++ exception, made through llama-sys' guards
//! (`exsa_*`, shim/exsa_shim.cpp), so that an exception becomes a [`CppException`] instead of
//! unwinding into Rust, which aborts the process. See the crate docs' "Soundness" section for
//! which functions need this and why.

use std::ffi::CStr;

use crate::error::CppException;
use crate::sys;

/// Runs `call` with an error slot for the guard it makes; `function` names the llama.cpp function
/// for the message.
pub(crate) fn guard(function: &'static str, call: impl FnOnce(*mut sys::exsa_error) -> i32) -> Result<(), CppException> {
    let mut err = sys::exsa_error { what: [0; 512] };
    if call(&mut err) == sys::EXSA_OK as i32 {
        return Ok(());
    }
    // The guard NUL-terminates the text (and zeroed the slot); the bytes are plain `c_char`s.
    let bytes: Vec<u8> = err.what.iter().map(|&c| c as u8).collect();
    let what = CStr::from_bytes_until_nul(&bytes).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Err(CppException { function, what })
}
