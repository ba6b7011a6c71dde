//! The KV cache (llama.cpp's "memory") of a context: which positions of which sequences it
//! holds, and how to remove, copy and shift them.

use super::Context;
use crate::batch::{Pos, SeqId};
use crate::error::ContextError;
use crate::sys;

/// What [`Context::clear_memory`] does with the memory's data buffers (llama.cpp's `data` flag
/// of `llama_memory_clear`). Either way every cell is freed: the memory holds no sequence
/// afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryData {
    /// Leave the buffers' contents as they are: only the metadata (which cell holds which
    /// position of which sequence) is reset. Cheap.
    Keep,
    /// Also write zeros over the buffers (the whole cache's size, on the device that holds
    /// it).
    Zero,
}

impl Context<'_> {
    pub(super) fn memory(&self) -> sys::llama_memory_t {
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

    /// llama.cpp cuts a recurrent state back by restoring one of the snapshots its last decode
    /// took, one per token of that decode; it accepts a cut to before that decode too, and then
    /// restores a stale snapshot: a wrong state, silently. Only a tail of the last decode's own
    /// tokens is let through (llama.cpp still refuses it without snapshots or beyond their
    /// number).
    fn recurrent_cut_allowed(&self, seq_id: SeqId, p0: Pos, p1: Pos) -> bool {
        let Some(floors) = &self.recurrent_cut_floor else { return true };
        let whole = p0 <= 0 && p1 < 0;
        if whole || seq_id < 0 {
            // llama.cpp refuses partial ranges over every sequence itself.
            return true;
        }
        // A tail after everything the sequence holds removes nothing (llama.cpp agrees).
        // SAFETY: reads the memory of the live context; the id is checked by the caller.
        let after_end = p1 < 0 && p0 > unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq_id) };
        after_end || (p1 < 0 && floors.get(seq_id as usize).copied().flatten().is_some_and(|floor| p0 >= floor))
    }

    /// Records, per sequence, the first position `batch` wrote: the floor of a later cut. A
    /// sequence with an entry shared with others gets none: those sequences share a recurrent
    /// cell, which a cut of one would move for all, while llama.cpp's rollback index is per
    /// sequence.
    pub(super) fn note_cut_floors(&mut self, batch: &crate::batch::Batch) {
        let Some(floors) = &mut self.recurrent_cut_floor else { return };
        let mut shared = Vec::new();
        for entry in batch.entries() {
            if entry.seq_ids.len() > 1 {
                shared.extend_from_slice(entry.seq_ids);
            }
            for &seq in entry.seq_ids {
                let floor = &mut floors[seq as usize];
                *floor = Some(floor.map_or(entry.pos, |f| f.min(entry.pos)));
            }
        }
        for seq in shared {
            floors[seq as usize] = None;
        }
    }

    /// No cut of a recurrent state until the next decode.
    pub(super) fn forget_cut_floors(&mut self) {
        if let Some(floors) = &mut self.recurrent_cut_floor {
            floors.fill(None);
        }
    }

    /// No further cut of sequence `seq_id` (every sequence, when negative) until the next
    /// decode: llama.cpp's rollback index of a sequence is single-use, and the other sequences'
    /// snapshots are their own.
    fn forget_cut_floor(&mut self, seq_id: SeqId) {
        match (&mut self.recurrent_cut_floor, usize::try_from(seq_id)) {
            (Some(floors), Ok(i)) => {
                if let Some(floor) = floors.get_mut(i) {
                    *floor = None;
                }
            }
            _ => self.forget_cut_floors(),
        }
    }

    /// Empties the memory (the KV cache, a recurrent state): every sequence and position is
    /// removed. `data` says whether the buffers that held them are also zeroed.
    pub fn clear_memory(&mut self, data: MemoryData) {
        self.forget_cut_floors();
        // SAFETY: valid memory handle of this context.
        unsafe { sys::llama_memory_clear(self.memory(), data == MemoryData::Zero) };
        self.outputs.clear();
    }

    /// Removes positions `[p0, p1)` of `seq_id` (-1: every sequence; negative bounds: open).
    /// False, with the memory untouched, when the range cannot be removed: on a model with a
    /// recurrent state ([`Model::has_recurrent_state`](crate::Model::has_recurrent_state)),
    /// any range but the whole sequence, except a tail of the last decode's tokens with
    /// [`ContextParams::recurrent_snapshots`](crate::ContextParams::recurrent_snapshots).
    pub fn remove_range(&mut self, seq_id: SeqId, p0: Pos, p1: Pos) -> Result<bool, ContextError> {
        self.check_seq(seq_id, true)?;
        if !self.recurrent_cut_allowed(seq_id, p0, p1) {
            return Ok(false);
        }
        self.forget_cut_floor(seq_id);
        // SAFETY: checked sequence id; llama.cpp accepts any bounds.
        Ok(unsafe { sys::llama_memory_seq_rm(self.memory(), seq_id, p0, p1) })
    }

    /// Copies positions `[p0, p1)` of sequence `src` to sequence `dst`. Where each sequence
    /// has its own KV stream (several sequences, the default non-unified cache), llama.cpp
    /// copies whole sequences only (`p0 <= 0`, `p1 <= 0`); a part is refused, where llama.cpp
    /// would abort.
    pub fn copy_range(&mut self, src: SeqId, dst: SeqId, p0: Pos, p1: Pos) -> Result<(), ContextError> {
        self.forget_cut_floors();
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
        self.forget_cut_floors();
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
        self.forget_cut_floors();
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
