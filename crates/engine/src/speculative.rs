//! Speculative decoding: draft sources and the draft length.
//!
//! Drafts come from prompt lookup ([`draft`]: what followed the most recent earlier occurrence
//! of the last few tokens, in the prompt or the output so far) or from a draft model
//! (`Session::draft_greedy`). The generation decodes a round's drafts in one batch and draws
//! each position with the request's own sampler, keeping a draft while it equals the draw.
//!
//! Why that is lossless: drafts here are deterministic (a lookup, or the draft model's argmax),
//! so the draft distribution q is a point mass on the drafted token d. The standard
//! speculative-sampling rule accepts d with probability min(1, p(d)/q(d)) = p(d) and otherwise
//! draws from max(0, p - q), normalised: p without d. Drawing x from p and keeping d when x = d
//! (x otherwise) gives exactly those probabilities. The logits a batched decode gives differ
//! from a one-token decode's by rounding (up to about one logit on the CPUs measured, see
//! `serving::BATCH_NEAR_TIE`): greedy output is the same except at near ties, and a seeded
//! sampled request, though drawn from the same distribution, may part from its plain twin
//! wherever a draw lands near a boundary.

use crate::token::Token;

/// The longest n-gram looked up; shorter ones are tried when it has no earlier occurrence.
const MAX_NGRAM: usize = 4;
/// A single repeated token is too weak a signal to draft from.
const MIN_NGRAM: usize = 2;

/// Appends to `out` up to `max_len` tokens that followed the most recent earlier occurrence of
/// the longest suffix of `history` (from [`MAX_NGRAM`] down to [`MIN_NGRAM`] tokens) that has
/// one. Nothing when no suffix recurs.
pub(crate) fn draft(history: &[Token], max_len: usize, out: &mut Vec<Token>) {
    if max_len == 0 {
        return;
    }
    for n in (MIN_NGRAM..=MAX_NGRAM.min(history.len().saturating_sub(1))).rev() {
        let key = &history[history.len() - n..];
        // Most recent first: the continuation nearest to now is the likeliest to repeat.
        let found = (0..history.len() - n).rev().find(|&start| &history[start..start + n] == key);
        if let Some(start) = found {
            let from = start + n;
            out.extend_from_slice(&history[from..(from + max_len).min(history.len())]);
            return;
        }
    }
}

/// How many tokens to draft next: all the way up to the maximum while drafts are accepted,
/// cut back to what was accepted (plus one) when they are not, so that text that does not
/// repeat itself costs little more than plain decoding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DraftLength {
    current: usize,
    max: usize,
}

impl DraftLength {
    pub(crate) fn new(max: usize) -> Self {
        DraftLength { current: max, max }
    }

    pub(crate) fn get(&self) -> usize {
        self.current
    }

    /// After a round that drafted `drafted` tokens, of which the first `accepted` held.
    pub(crate) fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.current = if accepted == drafted { (self.current * 2).clamp(1, self.max) } else { (accepted + 1).min(self.max) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids drafted after the ids of `history`.
    fn drafted(history: &[i32], max_len: usize) -> Vec<i32> {
        let history: Vec<Token> = history.iter().copied().map(Token).collect();
        let mut out = Vec::new();
        draft(&history, max_len, &mut out);
        out.into_iter().map(|t| t.0).collect()
    }

    #[test]
    fn the_longest_recurring_suffix_drafts_what_followed_it_last_time() {
        // "1 2 3 4 5 6 ... 1 2 3" → after "1 2 3" came "4 5 6".
        assert_eq!(drafted(&[1, 2, 3, 4, 5, 6, 9, 1, 2, 3], 3), [4, 5, 6]);
        assert_eq!(drafted(&[1, 2, 3, 4, 5, 6, 9, 1, 2, 3], 8), [4, 5, 6, 9, 1, 2, 3]);
        // The most recent occurrence wins: "7 8" was followed by 1 first, by 2 later.
        assert_eq!(drafted(&[7, 8, 1, 7, 8, 2, 7, 8], 1), [2]);
        // A longer match beats a more recent shorter one.
        assert_eq!(drafted(&[5, 6, 7, 10, 0, 6, 7, 11, 5, 6, 7], 1), [10]);
    }

    #[test]
    fn nothing_is_drafted_without_a_recurring_suffix_of_two() {
        assert!(drafted(&[1, 2, 3, 4, 5], 8).is_empty());
        assert!(drafted(&[3, 1, 2, 3], 8).is_empty(), "one token recurring is not enough");
        assert!(drafted(&[], 8).is_empty());
        assert!(drafted(&[1], 8).is_empty());
        assert!(drafted(&[1, 2, 1, 2], 0).is_empty());
    }

    #[test]
    fn the_draft_length_grows_while_accepted_and_shrinks_when_not() {
        let mut len = DraftLength::new(8);
        assert_eq!(len.get(), 8);
        len.update(8, 2);
        assert_eq!(len.get(), 3);
        len.update(3, 3);
        assert_eq!(len.get(), 6);
        len.update(6, 6);
        assert_eq!(len.get(), 8, "capped at the maximum");
        len.update(8, 0);
        assert_eq!(len.get(), 1, "never below one");
        len.update(0, 0);
        assert_eq!(len.get(), 1, "a round without drafts says nothing");
    }
}
