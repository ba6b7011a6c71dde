//! LoRA adapters.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use crate::error::LoraError;
use crate::model::Model;
use crate::{backend, sys};

/// A LoRA adapter loaded for a model. It lives as long as the model: llama.cpp frees adapters
/// with their model, so contexts may hold on to it without further bookkeeping.
#[derive(Debug)]
pub struct LoraAdapter<'m> {
    raw: NonNull<sys::llama_adapter_lora>,
    model: &'m Model,
}

impl<'m> LoraAdapter<'m> {
    /// Loads the adapter at `path` for `model`.
    pub fn load(model: &'m Model, path: impl AsRef<Path>) -> Result<LoraAdapter<'m>, LoraError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(LoraError::NotFound(path.to_path_buf()));
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| LoraError::InvalidPath(path.to_path_buf()))?;
        // SAFETY: the model is alive; the path is NUL-terminated.
        let (raw, messages) = backend::capture(|| unsafe { sys::llama_adapter_lora_init(model.as_ptr(), c_path.as_ptr()) });
        let raw = NonNull::new(raw).ok_or_else(|| LoraError::Load { path: path.to_path_buf(), messages })?;
        Ok(LoraAdapter { raw, model })
    }

    /// The raw handle; it stays owned by the model.
    pub fn as_ptr(&self) -> *mut sys::llama_adapter_lora {
        self.raw.as_ptr()
    }

    /// The model the adapter belongs to.
    pub fn model(&self) -> &'m Model {
        self.model
    }
}
