//! Calls into llama.cpp functions that can throw a C++ exception, made through llama-sys' guards
//! (`exsa_*`, shim/exsa_shim.cpp), so that an exception becomes a [`CppException`] instead of
//! unwinding into Rust, which aborts the process. See the crate docs' "Soundness" section for
//! which functions need this and why.

use crate::error::CppException;
use crate::sys;

/// Runs `call` with an error slot for the guard it makes; `function` names the llama.cpp function
/// for the message.
pub(crate) fn guard(function: &'static str, call: impl FnOnce(*mut sys::exsa_error) -> i32) -> Result<(), CppException> {
    let mut err = sys::exsa_error::new();
    if call(&mut err) == sys::EXSA_OK as i32 {
        return Ok(());
    }
    Err(CppException { function, what: err.what() })
}
