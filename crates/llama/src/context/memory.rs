//! The KV cache (llama.cpp's "memory") of a context: which positions of which sequences it
//! holds, and how to remove, copy and shift them.

use super::Context;
use crate::batch::{Pos, SeqId};
use crate::error::ContextError;
use crate::sys;

impl Context<'_> {
    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: the memory belongs to the live context.
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    pub(super) fn check_seq(&self, seq_id: SeqId, any_allowed: bool) -> Result<(), ContextError> {
        if (any_allowed && seq_id == -1) || (0..self.n_seq_max as i32).contains(&seq_id) {
            Ok(())
        } else {
            Err(ContextError::InvalidParam { name: "seq_id", value: seq_id.to_string(), reason: "not a sequence of this context" })
        }
    }

    /// Empties the KV cache (and its buffers too, with `data`).
    pub fn clear_memory(&mut self, data: bool) {
        // SAFETY: valid memory handle of this context.
        unsafe { sys::llama_memory_clear(self.memory(), data) };
        self.outputs.clear();
    }

    /// Removes positions `[p0, p1)` of `seq_id` (-1: every sequence; negative bounds: open).
    /// False when a partial range cannot be removed (recurrent models).
    pub fn remove_range(&mut self, seq_id: SeqId, p0: Pos, p1: Pos) -> Result<bool, ContextError> {
        self.check_seq(seq_id, true)?;
        // SAFETY: checked sequence id; llama.cpp accepts any bounds.
        Ok(unsafe { sys::llama_memory_seq_rm(self.memory(), seq_id, p0, p1) })
    }

    /// Copies positions `[p0, p1)` of sequence `src` to sequence `dst`. Where each sequence
    /// has its own KV stream (several sequences, the default non-unified cache), llama.cpp
    /// copies whole sequences only (`p0 <= 0`, `p1 <= 0`); a part is refused, where llama.cpp
    /// would abort.
    pub fn copy_range(&mut self, src: SeqId, dst: SeqId, p0: Pos, p1: Pos) -> Result<(), ContextError> {
        self.check_seq(src, false)?;
        self.check_seq(dst, false)?;
        let cross_stream = src != dst && !self.unified_kv && self.n_seq_max > 1;
        if cross_stream && (p0 > 0 || p1 > 0) {
            return Err(ContextError::InvalidParam {
                name: "p0/p1",
                value: format!("[{p0}, {p1})"),
                reason: "sequences in separate KV streams are copied whole (p0 <= 0 and p1 <= 0)",
            });
        }
        // SAFETY: both ids checked.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) };
        Ok(())
    }

    /// Removes every sequence but `seq_id`.
    pub fn keep_only(&mut self, seq_id: SeqId) -> Result<(), ContextError> {
        self.check_seq(seq_id, false)?;
        // llama_memory_seq_keep only looks at the KV stream of `seq_id`: with one stream per
        // sequence (kv_unified off, the default) the others survive it. Removing each other
        // sequence does what the name says in both layouts.
        // SAFETY: checked id, and every other id below n_seq_max.
        unsafe {
            sys::llama_memory_seq_keep(self.memory(), seq_id);
            for other in (0..self.n_seq_max as i32).filter(|&s| s != seq_id) {
                sys::llama_memory_seq_rm(self.memory(), other, -1, -1);
            }
        }
        Ok(())
    }

    /// Adds `delta` to the positions `[p0, p1)` of `seq_id` (a context shift).
    /// Refused with [`ContextError::CannotShift`] where the memory cannot shift positions
    /// (M-RoPE models, some recurrent ones), on which llama.cpp aborts.
    pub fn shift_range(&mut self, seq_id: SeqId, p0: Pos, p1: Pos, delta: Pos) -> Result<(), ContextError> {
        self.check_seq(seq_id, false)?;
        if !self.can_shift() {
            return Err(ContextError::CannotShift);
        }
        // SAFETY: checked id.
        unsafe { sys::llama_memory_seq_add(self.memory(), seq_id, p0, p1, delta) };
        Ok(())
    }

    /// Whether [`Context::shift_range`] can move positions in this context's memory.
    pub fn can_shift(&self) -> bool {
        // SAFETY: valid memory handle of this context.
        unsafe { sys::llama_memory_can_shift(self.memory()) }
    }

    /// The largest position held for `seq_id`, or None when it is empty.
    pub fn max_position(&self, seq_id: SeqId) -> Result<Option<Pos>, ContextError> {
        self.check_seq(seq_id, false)?;
        // SAFETY: checked id.
        let p = unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq_id) };
        Ok((p >= 0).then_some(p))
    }
}
