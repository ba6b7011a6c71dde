//! Applying LoRA adapters to a context (the adapters themselves are `crate::lora`'s).

use super::Context;
use crate::error::LoraError;
use crate::lora::LoraAdapter;
use crate::{backend, sys};

impl<'m> Context<'m> {
    /// Applies LoRA adapters with their scales, replacing those applied before.
    pub fn set_lora_adapters(&mut self, adapters: &[(&LoraAdapter<'m>, f32)]) -> Result<(), LoraError> {
        if adapters.iter().any(|(a, _)| !std::ptr::eq(a.model(), self.model)) {
            return Err(LoraError::WrongModel);
        }
        let mut raw: Vec<*mut sys::llama_adapter_lora> = adapters.iter().map(|(a, _)| a.as_ptr()).collect();
        let mut scales: Vec<f32> = adapters.iter().map(|(_, s)| *s).collect();
        let mut code = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: the adapters belong to this context's model (checked above); llama.cpp keeps
            // their pointers, and `self.lora` below keeps them alive while it may use them.
            crate::cpp::guard("llama_set_adapters_lora", |err| unsafe {
                sys::exsa_set_adapters_lora(self.as_ptr(), raw.as_mut_ptr(), raw.len(), scales.as_mut_ptr(), &mut code, err)
            })
        });
        guarded?;
        if code != 0 {
            return Err(LoraError::Apply(messages));
        }
        self.lora = adapters.iter().map(|(a, _)| (*a).clone()).collect();
        Ok(())
    }
}
