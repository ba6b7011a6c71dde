//! What can change on a live context: threads, cancellation, and llama.cpp's timing counters.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Context;
use crate::error::ContextError;
use crate::sys;

/// llama.cpp's timing counters for a context.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerfCounters {
    /// Time spent loading the model, ms.
    pub load_ms: f64,
    /// Time spent on prompt batches, ms.
    pub prompt_ms: f64,
    /// Time spent on single-token generation, ms.
    pub eval_ms: f64,
    /// Prompt tokens decoded.
    pub n_prompt_tokens: i32,
    /// Generated tokens decoded (llama.cpp reports at least 1).
    pub n_eval_tokens: i32,
    /// Times a compute graph was reused instead of rebuilt.
    pub n_graph_reused: i32,
}

impl Context<'_> {
    /// llama.cpp's timing counters since the context was created or last reset.
    pub fn perf(&self) -> PerfCounters {
        // SAFETY: reads counters of a live context.
        let p = unsafe { sys::llama_perf_context(self.raw.as_ptr()) };
        PerfCounters {
            load_ms: p.t_load_ms,
            prompt_ms: p.t_p_eval_ms,
            eval_ms: p.t_eval_ms,
            n_prompt_tokens: p.n_p_eval,
            n_eval_tokens: p.n_eval,
            n_graph_reused: p.n_reused,
        }
    }

    /// Zeroes the timing counters.
    pub fn reset_perf(&mut self) {
        // SAFETY: resets counters of a live context.
        unsafe { sys::llama_perf_context_reset(self.raw.as_ptr()) }
    }

    /// Sets the thread counts for generation and for batches.
    pub fn set_threads(&mut self, n_threads: i32, n_threads_batch: i32) -> Result<(), ContextError> {
        for (name, n) in [("n_threads", n_threads), ("n_threads_batch", n_threads_batch)] {
            if n < 1 {
                return Err(ContextError::InvalidParam { name, value: n.to_string(), reason: "at least one thread is needed" });
            }
        }
        // SAFETY: valid counts on a live context.
        unsafe { sys::llama_set_n_threads(self.raw.as_ptr(), n_threads, n_threads_batch) };
        Ok(())
    }

    /// (generation threads, batch threads).
    pub fn threads(&self) -> (i32, i32) {
        // SAFETY: reads fields of a live context.
        unsafe { (sys::llama_n_threads(self.raw.as_ptr()), sys::llama_n_threads_batch(self.raw.as_ptr())) }
    }

    /// Cancellation: while `flag` is true, a running decode stops and returns
    /// [`DecodeError::Aborted`](crate::DecodeError::Aborted). `None` removes it.
    pub fn set_abort_flag(&mut self, flag: Option<Arc<AtomicBool>>) {
        match &flag {
            // SAFETY: the user data points into the Arc kept in self.abort_flag, so it lives
            // as long as the callback is installed; the callback only reads an atomic.
            Some(f) => unsafe { sys::llama_set_abort_callback(self.raw.as_ptr(), Some(abort_trampoline), Arc::as_ptr(f).cast_mut().cast()) },
            // SAFETY: removes the callback.
            None => unsafe { sys::llama_set_abort_callback(self.raw.as_ptr(), None, std::ptr::null_mut()) },
        }
        self.abort_flag = flag;
    }
}

extern "C" fn abort_trampoline(data: *mut c_void) -> bool {
    // SAFETY: data is the AtomicBool inside the Arc the context keeps while this is installed.
    unsafe { &*data.cast::<AtomicBool>() }.load(Ordering::Relaxed)
}
