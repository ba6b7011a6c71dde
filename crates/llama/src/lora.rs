//! LoRA adapters.

use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::LoraError;
use crate::model::Model;
use crate::{backend, sys};

/// A LoRA adapter loaded for a model, freed when the last clone of it is dropped and no context
/// still applies it (a context keeps the adapters it applies alive).
///
/// llama.cpp records every adapter in a set inside its model, which each context's decode reads:
/// loading and freeing adapters therefore take the model's adapter lock for writing, and decodes
/// take it for reading, so a `&Model` shared between threads never races.
#[derive(Clone, Debug)]
pub struct LoraAdapter<'m> {
    handle: Arc<Handle<'m>>,
}

#[derive(Debug)]
struct Handle<'m> {
    raw: NonNull<sys::llama_adapter_lora>,
    model: &'m Model,
}

// SAFETY: the adapter's tensors are read-only once loaded; the one mutation it causes (the
// model's adapter set, on free) happens under the model's adapter lock.
unsafe impl Send for Handle<'_> {}
// SAFETY: as above; `&Handle` only gives out the pointer.
unsafe impl Sync for Handle<'_> {}

impl<'m> LoraAdapter<'m> {
    /// Loads the adapter at `path` for `model`.
    pub fn load(model: &'m Model, path: impl AsRef<Path>) -> Result<LoraAdapter<'m>, LoraError> {
        let path = path.as_ref();
        // Before the file check: a path with a NUL is no file, but the reason is the NUL.
        let c_path = crate::c_string::path(path).ok_or_else(|| LoraError::InvalidPath(path.to_path_buf()))?;
        if !path.is_file() {
            return Err(LoraError::NotFound(path.to_path_buf()));
        }
        backend::init();
        let mut raw = std::ptr::null_mut();
        let _writer = model.adapters_write();
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: the model is alive and, under the write lock, no decode reads its adapter
            // set; the path is NUL-terminated; `raw` is a live out-parameter.
            crate::cpp::guard("llama_adapter_lora_init", |err| unsafe { sys::exsa_adapter_lora_init(model.as_ptr(), c_path.as_ptr(), &mut raw, err) })
        });
        guarded?;
        let raw = NonNull::new(raw).ok_or_else(|| LoraError::Load { path: path.to_path_buf(), messages })?;
        Ok(LoraAdapter { handle: Arc::new(Handle { raw, model }) })
    }

    /// The raw handle; it stays owned by this adapter.
    pub fn as_ptr(&self) -> *mut sys::llama_adapter_lora {
        self.handle.raw.as_ptr()
    }

    /// The model the adapter belongs to.
    pub fn model(&self) -> &'m Model {
        self.handle.model
    }
}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        let _writer = self.model.adapters_write();
        // SAFETY: the last owner of the adapter is going (contexts that applied it hold a
        // clone); under the write lock no decode reads the model's adapter set, which this
        // removes the adapter from.
        unsafe { sys::llama_adapter_lora_free(self.raw.as_ptr()) }
    }
}
