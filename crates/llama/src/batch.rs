//! An owned, capacity-checked batch of tokens for [`crate::Context::decode`].

use crate::error::BatchError;
use crate::sys;
use crate::token::Token;

/// A token's position in its sequence (0-based). Plain `i32`, as llama.cpp takes it; a type
/// name so signatures say which `i32` is which.
pub type Pos = i32;

/// A sequence id: which of a context's sequences (0..n_seq_max) a token belongs to. Plain
/// `i32`, as llama.cpp takes it (where -1 means "every sequence").
pub type SeqId = i32;

/// Whether a decode computes a token's output row: its logits, or its embedding in an
/// embeddings context (llama.cpp's `logits` flag of a batch entry). Only a token with an output
/// can be sampled or read after the decode; each output costs a row of the vocabulary's width.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// No output for this token: it only fills the cache (a prompt's tokens but the last).
    #[default]
    Skip,
    /// An output row for this token (the last prompt token, each generated token).
    Compute,
}

/// One entry of a [`Batch`], as [`Batch::entries`] reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEntry<'b> {
    /// The token decoded.
    pub token: Token,
    /// Its position.
    pub pos: Pos,
    /// The sequences it belongs to.
    pub seq_ids: &'b [SeqId],
    /// Whether the decode produces an output (logits, embeddings) for it.
    pub output: Output,
}

/// Tokens with their positions, sequence ids and output flags. Every write is checked against
/// the allocation, which llama.cpp's own `llama_batch` leaves to the caller.
#[derive(Debug)]
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    n_seq_max: usize,
}

// SAFETY: the batch owns its buffers outright; nothing in it is shared with llama.cpp between
// calls, so moving it to another thread is fine. Mutation needs &mut.
unsafe impl Send for Batch {}
// SAFETY: &Batch only reads.
unsafe impl Sync for Batch {}

impl Batch {
    /// A batch of up to `capacity` tokens, each in up to `n_seq_max` sequences.
    pub fn new(capacity: usize, n_seq_max: usize) -> Result<Batch, BatchError> {
        let (Ok(cap), Ok(seq)) = (i32::try_from(capacity), i32::try_from(n_seq_max)) else {
            return Err(BatchError::ZeroSize { capacity, n_seq_max });
        };
        if cap < 1 || seq < 1 {
            return Err(BatchError::ZeroSize { capacity, n_seq_max });
        }
        // SAFETY: allocates token/pos/n_seq_id/seq_id/logits arrays of `cap` entries, each
        // seq_id entry with room for `seq` ids; freed in Drop.
        let raw = unsafe { sys::llama_batch_init(cap, 0, seq) };
        Ok(Batch { raw, capacity, n_seq_max })
    }

    /// A single-sequence batch of `tokens` at positions `start..`, with logits for the last.
    pub fn from_tokens(tokens: &[Token], start: Pos, seq_id: SeqId) -> Result<Batch, BatchError> {
        let mut batch = Batch::new(tokens.len().max(1), 1)?;
        batch.add_sequence(tokens, start, seq_id, Output::Compute)?;
        Ok(batch)
    }

    /// Appends one token at `pos` of the sequences `seq_ids`, with an output row or not. For the
    /// usual case, see [`Batch::add_output`].
    pub fn add(&mut self, token: Token, pos: Pos, seq_ids: &[SeqId], output: Output) -> Result<(), BatchError> {
        let i = self.len();
        if i >= self.capacity {
            return Err(BatchError::Full { capacity: self.capacity });
        }
        if seq_ids.is_empty() {
            return Err(BatchError::NoSeqId);
        }
        if seq_ids.len() > self.n_seq_max {
            return Err(BatchError::TooManySeqIds { given: seq_ids.len(), max: self.n_seq_max });
        }
        if let Some(&bad) = seq_ids.iter().find(|&&s| s < 0) {
            return Err(BatchError::NegativeSeqId(bad));
        }
        if pos < 0 {
            return Err(BatchError::NegativePosition(pos));
        }
        // SAFETY: i < capacity, the length of every array llama_batch_init allocated, and
        // seq_ids fits the n_seq_max ids allocated for each token.
        unsafe {
            *self.raw.token.add(i) = token.0;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = seq_ids.len() as i32;
            let dst = *self.raw.seq_id.add(i);
            std::ptr::copy_nonoverlapping(seq_ids.as_ptr(), dst, seq_ids.len());
            *self.raw.logits.add(i) = i8::from(output == Output::Compute);
        }
        self.raw.n_tokens += 1;
        Ok(())
    }

    /// Appends one token of one sequence, with an output: the next token of a generation.
    pub fn add_output(&mut self, token: Token, pos: Pos, seq_id: SeqId) -> Result<(), BatchError> {
        self.add(token, pos, &[seq_id], Output::Compute)
    }

    /// Appends `tokens` to one sequence at consecutive positions from `start`; `last` is the last
    /// token's output (the others have none).
    pub fn add_sequence(&mut self, tokens: &[Token], start: Pos, seq_id: SeqId, last: Output) -> Result<(), BatchError> {
        if self.len() + tokens.len() > self.capacity {
            return Err(BatchError::Full { capacity: self.capacity });
        }
        // The last position must fit i32: a wrapped position would decode at the wrong place.
        let last_pos = i32::try_from(tokens.len()).ok().and_then(|n| start.checked_add(n.saturating_sub(1)));
        if last_pos.is_none() {
            return Err(BatchError::PositionOverflow { start, len: tokens.len() });
        }
        for (k, &t) in tokens.iter().enumerate() {
            let output = if k + 1 == tokens.len() { last } else { Output::Skip };
            self.add(t, start + k as i32, &[seq_id], output)?;
        }
        Ok(())
    }

    /// Empties the batch, keeping its allocation.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// Whether the batch holds no token.
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Most tokens the batch holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The entries, in batch order (an entry's index is its output index after a decode).
    pub fn entries(&self) -> impl Iterator<Item = BatchEntry<'_>> + '_ {
        (0..self.len()).map(move |i| {
            // SAFETY: i < n_tokens <= capacity, and entries below n_tokens were written by add.
            unsafe {
                let n = *self.raw.n_seq_id.add(i) as usize;
                BatchEntry {
                    token: Token(*self.raw.token.add(i)),
                    pos: *self.raw.pos.add(i),
                    seq_ids: std::slice::from_raw_parts(*self.raw.seq_id.add(i), n),
                    output: if *self.raw.logits.add(i) != 0 { Output::Compute } else { Output::Skip },
                }
            }
        })
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init in Batch::new, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_refuses_more_tokens() {
        let mut b = Batch::new(2, 1).unwrap();
        b.add(Token(1), 0, &[0], Output::Skip).unwrap();
        b.add_output(Token(2), 1, 0).unwrap();
        assert_eq!(b.add(Token(3), 2, &[0], Output::Skip), Err(BatchError::Full { capacity: 2 }));
        assert_eq!(b.len(), 2);
        b.clear();
        assert!(b.is_empty());
        b.add(Token(3), 0, &[0], Output::Skip).unwrap();
    }

    #[test]
    fn sequence_ids_are_checked_against_the_allocation() {
        let mut b = Batch::new(4, 2).unwrap();
        assert_eq!(b.add(Token(1), 0, &[0, 1, 2], Output::Skip), Err(BatchError::TooManySeqIds { given: 3, max: 2 }));
        assert_eq!(b.add(Token(1), 0, &[], Output::Skip), Err(BatchError::NoSeqId));
        assert_eq!(b.add(Token(1), 0, &[-1], Output::Skip), Err(BatchError::NegativeSeqId(-1)));
        assert_eq!(b.add(Token(1), -3, &[0], Output::Skip), Err(BatchError::NegativePosition(-3)));
        b.add(Token(7), 5, &[0, 1], Output::Compute).unwrap();
        let entries: Vec<_> = b.entries().collect();
        assert_eq!(entries, vec![BatchEntry { token: Token(7), pos: 5, seq_ids: &[0, 1], output: Output::Compute }]);
    }

    #[test]
    fn add_sequence_is_all_or_nothing() {
        let mut b = Batch::new(3, 1).unwrap();
        assert!(b.add_sequence(&[Token(1), Token(2), Token(3), Token(4)], 0, 0, Output::Compute).is_err());
        assert!(b.is_empty());
        assert!(Batch::new(0, 1).is_err());
    }
}
