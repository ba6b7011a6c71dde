//! From sampled tokens to the text a client sees: each token's bytes, complete UTF-8
//! characters only, stop sequences held back and cut (for every request, through the
//! scheduler's `request` module).

use crate::backend::BackendModel;
use crate::error::EngineError;
use crate::outcome::FinishReason;
use crate::stop::{StopMatcher, StopScan, TOKEN_TEXT_CAPACITY};
use crate::token::Token;
use exsa_utf8::Utf8Decoder;

/// The text state of one generation. Its buffers keep their allocations across tokens.
#[derive(Debug)]
pub(crate) struct TokenText {
    stop: StopMatcher,
    utf8: Utf8Decoder,
    /// The bytes of the current token.
    piece: Vec<u8>,
    /// The complete characters those bytes finished.
    decoded: String,
    /// Special tokens written as their text.
    preserved: Vec<Token>,
}

impl TokenText {
    pub(crate) fn new(stop: &[String], preserved: Vec<Token>) -> Self {
        TokenText {
            stop: StopMatcher::new(stop),
            utf8: Utf8Decoder::new(),
            piece: Vec::with_capacity(TOKEN_TEXT_CAPACITY),
            decoded: String::with_capacity(TOKEN_TEXT_CAPACITY),
            preserved,
        }
    }

    /// Appends to `delta` the text `token` completes, holding back what may begin a stop
    /// sequence. True when a stop sequence has ended the text (the stop text is not emitted).
    pub(crate) fn push(&mut self, model: &impl BackendModel, token: Token, delta: &mut String) -> Result<bool, EngineError> {
        self.piece.clear();
        model.piece(token, self.preserved.contains(&token), &mut self.piece)?;
        self.decoded.clear();
        self.utf8.push(&self.piece, &mut self.decoded);
        Ok(self.stop.push(&self.decoded, delta) == StopScan::Stop)
    }

    /// At the end: appends the held-back text, then the bytes of an unfinished character
    /// (replaced rather than dropped), unless a stop sequence ended the text.
    pub(crate) fn finish(&mut self, reason: FinishReason, delta: &mut String) {
        if reason != FinishReason::StopSequence {
            self.stop.flush(delta);
            self.utf8.finish(delta);
        }
    }
}
