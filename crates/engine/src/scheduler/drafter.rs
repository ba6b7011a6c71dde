//! A draft model for [`crate::Speculation::Draft`]: a smaller model with the same vocabulary that
//! drafts greedily in a context of its own, keeping what it decoded so that each round decodes
//! only what changed (the same prefix rule as every other cache, [`Sequence::keep_prefix`]).

use super::slot::Sequence;
use crate::backend::{BackendModel, BackendSession, CheckpointOf, Outputs, SamplerOf};
use crate::config::{SamplingParams, SessionConfig};
use crate::error::EngineError;
use crate::token::Token;

pub(crate) struct DraftModel<'e, M: BackendModel + 'e> {
    model: &'e M,
    session: M::Session<'e>,
    seq: Sequence<CheckpointOf<'e, M>>,
    greedy: SamplerOf<'e, M>,
}

impl<M: BackendModel> std::fmt::Debug for DraftModel<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftModel").field("cached", &self.seq.len()).finish_non_exhaustive()
    }
}

impl<'e, M: BackendModel> DraftModel<'e, M> {
    /// The draft model's context: one sequence of `config`'s length.
    pub(crate) fn new(model: &'e M, config: &SessionConfig) -> Result<Self, EngineError> {
        let config = SessionConfig { n_seq_max: 1, embeddings: false, ..config.clone() };
        let session = model.session(&config)?;
        Ok(DraftModel { model, greedy: model.sampler(&SamplingParams::greedy())?, seq: Sequence::new(0, config.n_ctx as usize), session })
    }

    /// Appends to `out` up to `max_len` tokens the draft model generates greedily after `history`
    /// (the main sequence's tokens).
    pub(crate) fn draft(&mut self, history: &[Token], max_len: usize, out: &mut Vec<Token>) -> Result<(), EngineError> {
        if max_len == 0 || history.len() + max_len >= self.session.n_ctx() as usize {
            return Ok(());
        }
        let drafted = self.decode_and_draw(history, max_len, out);
        if drafted.is_err() {
            // The cache may hold part of a failed decode: start clean next round.
            self.seq.clear(&mut self.session);
        }
        drafted
    }

    fn decode_and_draw(&mut self, history: &[Token], max_len: usize, out: &mut Vec<Token>) -> Result<(), EngineError> {
        let reused = self.seq.keep_prefix(&mut self.session, history);
        let n_batch = self.session.n_batch() as usize;
        let mut last = 0;
        for chunk in history[reused..].chunks(n_batch) {
            let outputs = if self.seq.len() + chunk.len() == history.len() { Outputs::Last } else { Outputs::None };
            self.session.decode(chunk, self.seq.len() as i32, outputs)?;
            self.seq.extend(chunk);
            last = chunk.len() as i32 - 1;
        }
        loop {
            let token = self.session.sample_with(&mut self.greedy, last)?;
            out.push(token);
            if out.len() == max_len || self.model.is_eog(token) {
                return Ok(());
            }
            self.session.decode(&[token], self.seq.len() as i32, Outputs::Last)?;
            self.seq.push(token);
            last = 0;
        }
    }
}
