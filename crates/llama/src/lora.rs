//! LoRA adapters.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::LoraError;
use crate::model::{Model, read_c_string};
use crate::{Token, backend, sys};

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

    /// One metadata value of the adapter's file as text (llama-server lists
    /// `adapter.lora.task_name` and `adapter.lora.prompt_prefix`); None when the file has no
    /// such key.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        // SAFETY: a live adapter, whose metadata is read-only once loaded; the key is
        // NUL-terminated; the buffer contract is snprintf's.
        read_c_string(|buf, len| unsafe { sys::llama_adapter_meta_val_str(self.as_ptr(), key.as_ptr(), buf, len) })
    }

    /// An activated LoRA's (aLoRA's) invocation tokens: such an adapter is meant to apply only
    /// from the last place these tokens occur in the prompt on (llama-server does so; llama.cpp
    /// itself applies an adapter to every token of a decode). Empty for a plain adapter.
    pub fn alora_invocation_tokens(&self) -> Vec<Token> {
        // SAFETY: reads a field of a live adapter.
        let n = unsafe { sys::llama_adapter_get_alora_n_invocation_tokens(self.as_ptr()) };
        if n == 0 {
            return Vec::new();
        }
        // SAFETY: as above; the adapter owns `n` tokens there, read-only once loaded, and alive
        // while `self` is (copied out before it can go).
        let tokens = unsafe { sys::llama_adapter_get_alora_invocation_tokens(self.as_ptr()) };
        if tokens.is_null() {
            return Vec::new();
        }
        // SAFETY: as above; `n` came from the same vector, whose size fits memory.
        unsafe { std::slice::from_raw_parts(tokens, n as usize) }.iter().map(|&t| Token(t)).collect()
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
