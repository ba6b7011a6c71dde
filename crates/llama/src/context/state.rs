//! Saving and restoring a context's state (KV cache, outputs, RNG), whole or per sequence,
//! as bytes or files.

use std::ffi::CString;
use std::path::Path;

use super::Context;
use crate::backend;
use crate::batch::{Pos, SeqId};
use crate::error::StateError;
use crate::sys;
use crate::token::Token;

impl Context<'_> {
    /// The whole memory (KV cache, recurrent state) as bytes. The last decode's outputs are not
    /// part of it: save before a prompt's last token and decode that token after restoring.
    pub fn save_state(&mut self) -> Result<Vec<u8>, StateError> {
        // SAFETY: size query on a live context.
        let size = unsafe { sys::llama_state_get_size(self.raw.as_ptr()) };
        if size == 0 {
            return Err(StateError::Empty);
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes.
        let written = unsafe { sys::llama_state_get_data(self.raw.as_ptr(), buf.as_mut_ptr(), size) };
        if written != size {
            return Err(StateError::SizeMismatch { written, expected: size });
        }
        Ok(buf)
    }

    /// Restores a state from [`Context::save_state`].
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        self.outputs.clear();
        self.forget_cut_floors();
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: state is readable for its length; llama.cpp validates the content; `read` is a
            // live out-parameter.
            crate::cpp::guard("llama_state_set_data", |err| unsafe {
                sys::exsa_state_set_data(self.raw.as_ptr(), state.as_ptr(), state.len(), &mut read, err)
            })
        });
        guarded?;
        restored(state.len(), read, messages)
    }

    fn check_state_seq(&self, seq_id: SeqId) -> Result<(), StateError> {
        self.check_seq(seq_id, false).map_err(|_| StateError::InvalidSeqId { seq_id, n_seq_max: self.n_seq_max })
    }

    /// One sequence's state as bytes.
    pub fn save_sequence_state(&mut self, seq_id: SeqId) -> Result<Vec<u8>, StateError> {
        self.check_state_seq(seq_id)?;
        self.sequence_state(seq_id, WHOLE)
    }

    /// Restores one sequence's state into `dest_seq_id`. The last decode's outputs stay readable
    /// (the other sequences of that batch may still draw from them).
    pub fn load_sequence_state(&mut self, state: &[u8], dest_seq_id: SeqId) -> Result<(), StateError> {
        self.check_state_seq(dest_seq_id)?;
        self.read_sequence_state("llama_state_seq_set_data", state, dest_seq_id, WHOLE)
    }

    /// The `flags` part of checked sequence `seq_id`'s state as bytes.
    fn sequence_state(&mut self, seq_id: SeqId, flags: sys::llama_state_seq_flags) -> Result<Vec<u8>, StateError> {
        // SAFETY: size query on a live context for a checked id.
        let size = unsafe { sys::llama_state_seq_get_size_ext(self.raw.as_ptr(), seq_id, flags) };
        if size == 0 {
            return Err(StateError::Empty);
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes; checked id. llama.cpp catches its own
        // exceptions here (returns 0).
        let written = unsafe { sys::llama_state_seq_get_data_ext(self.raw.as_ptr(), buf.as_mut_ptr(), size, seq_id, flags) };
        if written != size {
            return Err(StateError::SizeMismatch { written, expected: size });
        }
        Ok(buf)
    }

    /// Reads `state` (the `flags` part of a sequence's state) into checked sequence `seq_id`;
    /// `function` names the call in a caught exception. The last decode's outputs stay readable:
    /// llama.cpp reads a sequence's state into the memory only, not the output buffers (a
    /// sequence returned to a checkpoint while the others of its batch still draw from it).
    /// Cut floors go: the recurrent memory may move cells to place the sequence.
    fn read_sequence_state(
        &mut self,
        function: &'static str,
        state: &[u8],
        seq_id: SeqId,
        flags: sys::llama_state_seq_flags,
    ) -> Result<(), StateError> {
        self.forget_cut_floors();
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: state readable for its length; id checked; `read` is a live out-parameter.
            crate::cpp::guard(function, |err| unsafe {
                sys::exsa_state_seq_set_data_ext(self.raw.as_ptr(), state.as_ptr(), state.len(), seq_id, flags, &mut read, err)
            })
        });
        guarded?;
        restored(state.len(), read, messages)
    }

    /// The last position sequence `seq_id` (checked) holds.
    fn last_position(&self, seq_id: SeqId) -> Result<Option<Pos>, StateError> {
        self.max_position(seq_id).map_err(|_| StateError::InvalidSeqId { seq_id, n_seq_max: self.n_seq_max })
    }

    /// The recurrent part of sequence `seq_id`'s memory as it stands (LFM2's convolution state,
    /// Mamba's SSM state; not the attention cells of a hybrid model): a checkpoint to return the
    /// sequence to with [`Context::restore_recurrent_checkpoint`] after it has gone on, where a
    /// recurrent state cannot be cut back. [`StateError::NotRecurrent`] for a model without one,
    /// [`StateError::Empty`] for an empty sequence.
    pub fn save_recurrent_checkpoint(&mut self, seq_id: SeqId) -> Result<RecurrentCheckpoint, StateError> {
        self.check_state_seq(seq_id)?;
        if !self.model.has_recurrent_state() {
            return Err(StateError::NotRecurrent);
        }
        let Some(last) = self.last_position(seq_id)? else {
            return Err(StateError::Empty);
        };
        let bytes = self.sequence_state(seq_id, RECURRENT_ONLY)?;
        Ok(RecurrentCheckpoint { context: self.serial, positions: last + 1, bytes })
    }

    /// Returns sequence `seq_id` to `checkpoint`: its recurrent state becomes the checkpoint's,
    /// and the attention cells after the checkpoint's positions are dropped, so the sequence holds
    /// positions `0..checkpoint.positions()` and goes on from there. The caller keeps the first
    /// positions as they were when the checkpoint was taken (the same tokens); a checkpoint of
    /// another context, or one beyond what the sequence holds, is refused. On a failed restore
    /// the sequence is emptied (its recurrent part may be half read).
    pub fn restore_recurrent_checkpoint(&mut self, seq_id: SeqId, checkpoint: &RecurrentCheckpoint) -> Result<(), StateError> {
        self.check_state_seq(seq_id)?;
        if checkpoint.context != self.serial {
            return Err(StateError::ForeignCheckpoint);
        }
        let held = self.last_position(seq_id)?.map_or(0, |p| p + 1);
        if held < checkpoint.positions {
            return Err(StateError::CheckpointAhead { positions: checkpoint.positions, held });
        }
        let restored = self.read_sequence_state("llama_state_seq_set_data_ext", &checkpoint.bytes, seq_id, RECURRENT_ONLY);
        let memory = self.memory();
        // SAFETY: memory handle of this context, checked id. The recurrent state now ends at the
        // checkpoint's last position, so this cut drops attention cells only.
        let cut = restored.is_ok() && unsafe { sys::llama_memory_seq_rm(memory, seq_id, checkpoint.positions, -1) };
        if !cut {
            // SAFETY: as above; removing a whole sequence is valid on every memory kind.
            unsafe { sys::llama_memory_seq_rm(memory, seq_id, -1, -1) };
            restored?;
            return Err(StateError::CheckpointCut { positions: checkpoint.positions });
        }
        Ok(())
    }

    /// Saves the whole state and the `tokens` it holds to a file.
    pub fn save_state_file(&mut self, path: &Path, tokens: &[Token]) -> Result<(), StateError> {
        let c_path = c_path(path)?;
        // SAFETY: path NUL-terminated; tokens readable; Token is repr(transparent).
        let ok = unsafe { sys::llama_state_save_file(self.raw.as_ptr(), c_path.as_ptr(), tokens.as_ptr().cast(), tokens.len()) };
        if ok { Ok(()) } else { Err(StateError::Save { path: path.to_path_buf() }) }
    }

    /// Loads a state file; returns the tokens saved with it (at most `max_tokens`).
    pub fn load_state_file(&mut self, path: &Path, max_tokens: usize) -> Result<Vec<Token>, StateError> {
        let c_path = c_path(path)?;
        self.outputs.clear();
        self.forget_cut_floors();
        let mut tokens = vec![Token(0); max_tokens];
        let mut n = 0usize;
        let mut ok = false;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: tokens has max_tokens writable slots; n and ok receive the results.
            crate::cpp::guard("llama_state_load_file", |err| unsafe {
                sys::exsa_state_load_file(self.raw.as_ptr(), c_path.as_ptr(), tokens.as_mut_ptr().cast(), max_tokens, &mut n, &mut ok, err)
            })
        });
        guarded?;
        if !ok {
            return Err(load_failure(path, messages));
        }
        tokens.truncate(n);
        Ok(tokens)
    }

    /// Saves one sequence's state and the `tokens` it holds to a file.
    pub fn save_sequence_state_file(&mut self, seq_id: SeqId, path: &Path, tokens: &[Token]) -> Result<(), StateError> {
        self.check_state_seq(seq_id)?;
        let c_path = c_path(path)?;
        // SAFETY: checked id; path NUL-terminated; tokens readable, Token repr(transparent).
        let written = unsafe { sys::llama_state_seq_save_file(self.raw.as_ptr(), c_path.as_ptr(), seq_id, tokens.as_ptr().cast(), tokens.len()) };
        if written == 0 { Err(StateError::Save { path: path.to_path_buf() }) } else { Ok(()) }
    }

    /// Loads a sequence state file into `dest_seq_id`; returns the tokens saved with it (at
    /// most `max_tokens`). The last decode's outputs stay readable.
    pub fn load_sequence_state_file(&mut self, dest_seq_id: SeqId, path: &Path, max_tokens: usize) -> Result<Vec<Token>, StateError> {
        self.check_state_seq(dest_seq_id)?;
        let c_path = c_path(path)?;
        // As `read_sequence_state`: the memory only, the last decode's outputs stay.
        self.forget_cut_floors();
        let mut tokens = vec![Token(0); max_tokens];
        let mut n = 0usize;
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: checked id; tokens has max_tokens writable slots; n and read receive results.
            crate::cpp::guard("llama_state_seq_load_file", |err| unsafe {
                sys::exsa_state_seq_load_file(
                    self.raw.as_ptr(),
                    c_path.as_ptr(),
                    dest_seq_id,
                    tokens.as_mut_ptr().cast(),
                    max_tokens,
                    &mut n,
                    &mut read,
                    err,
                )
            })
        });
        guarded?;
        if read == 0 {
            return Err(load_failure(path, messages));
        }
        tokens.truncate(n);
        Ok(tokens)
    }
}

fn c_path(path: &Path) -> Result<CString, StateError> {
    crate::c_string::path(path).ok_or_else(|| StateError::InvalidPath(path.to_path_buf()))
}

/// Why a state file did not load: more tokens than the caller made room for (llama.cpp says
/// so in its log: "token count in session file exceeded capacity! N > M"), or anything else.
fn load_failure(path: &Path, messages: crate::error::LlamaMessages) -> StateError {
    let capacity = messages.0.iter().find_map(|line| {
        let (_, counts) = line.split_once("exceeded capacity!")?;
        let (needed, capacity) = counts.split_once('>')?;
        Some((needed.trim().parse().ok()?, capacity.trim().parse().ok()?))
    });
    match capacity {
        Some((needed, capacity)) => StateError::TooManyTokens { needed, capacity },
        None => StateError::Load { path: path.to_path_buf(), messages },
    }
}

/// The outcome of a state restore that read `read` of `len` bytes: nothing read is a state
/// llama.cpp refused (its log lines say why), fewer than all is trailing data.
fn restored(len: usize, read: usize, messages: crate::error::LlamaMessages) -> Result<(), StateError> {
    if read == 0 {
        return Err(StateError::Restore { len, messages });
    }
    if read != len {
        return Err(StateError::TrailingBytes { len, read });
    }
    Ok(())
}

/// A sequence's whole state (`llama_state_seq_*` without flags).
const WHOLE: sys::llama_state_seq_flags = 0;
/// The recurrent part only: on a hybrid model, without the attention cells.
const RECURRENT_ONLY: sys::llama_state_seq_flags = sys::LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY as sys::llama_state_seq_flags;

/// The recurrent part of one sequence's memory at a position it reached (see
/// [`Context::save_recurrent_checkpoint`]). Restorable only into the context that made it.
#[derive(Clone)]
pub struct RecurrentCheckpoint {
    /// The serial of the context it came from.
    context: u64,
    positions: Pos,
    bytes: Vec<u8>,
}

impl RecurrentCheckpoint {
    /// The positions it covers: the sequence held `0..positions()` when it was taken.
    pub fn positions(&self) -> Pos {
        self.positions
    }

    /// Its size in bytes (host memory).
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
}

impl std::fmt::Debug for RecurrentCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecurrentCheckpoint").field("positions", &self.positions).field("bytes", &self.bytes.len()).finish()
    }
}
