//! Rust strings and paths as the NUL-terminated strings llama.cpp takes.

use std::ffi::CString;
use std::path::Path;

/// A path's bytes for C, or None when it holds a NUL byte (which C would read as its end).
pub(crate) fn path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).ok()
}
