//! Token ids.

use std::fmt;

use crate::sys;

/// A token id. `repr(transparent)` over llama.cpp's `llama_token`, so slices pass through FFI
/// without copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Token(pub sys::llama_token);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
