//! Tokens as the engine passes them around: ids, and a generated token's log-probabilities.

use std::fmt;

/// A token id, as llama.cpp numbers them: the same number as the `llama` crate's `Token`
/// (with backend `source`, `From` converts either way). Ids are checked against the model's
/// vocabulary where they enter the engine, so any `i32` may be wrapped.
///
/// `repr(transparent)` over `i32`, so token slices reach llama.cpp without a copy; serialized as
/// the bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
#[repr(transparent)]
pub struct Token(pub i32);

impl Token {
    /// The id as an index into a vocabulary-wide row (logits, probabilities); None for a
    /// negative id.
    pub fn index(self) -> Option<usize> {
        usize::try_from(self.0).ok()
    }

    /// Whether the id names a token of a vocabulary of `n_vocab` tokens.
    pub(crate) fn in_vocab(self, n_vocab: i32) -> bool {
        (0..n_vocab).contains(&self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<i32> for Token {
    fn from(id: i32) -> Token {
        Token(id)
    }
}

impl From<Token> for i32 {
    fn from(token: Token) -> i32 {
        token.0
    }
}

#[cfg(feature = "source")]
impl From<llama::Token> for Token {
    fn from(token: llama::Token) -> Token {
        Token(token.0)
    }
}

#[cfg(feature = "source")]
impl From<Token> for llama::Token {
    fn from(token: Token) -> llama::Token {
        llama::Token(token.0)
    }
}

/// A generated token's log-probability under the model (before the sampler's temperature and
/// cuts), and the likeliest candidates at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The drawn token.
    pub token: Token,
    /// Its log-probability (natural logarithm).
    pub logprob: f32,
    /// The `n` likeliest tokens, likeliest first.
    pub top: Vec<(Token, f32)>,
}

impl TokenLogprobs {
    /// `token`'s log-probability in a logits row and the row's `n` likeliest candidates (at most
    /// the row's width).
    pub(crate) fn from_row(row: &[f32], token: Token, n: usize) -> TokenLogprobs {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
        let mut top: Vec<(Token, f32)> = Vec::with_capacity(n + 1);
        for (i, &x) in row.iter().enumerate() {
            if top.len() < n || top.last().is_some_and(|&(_, worst)| x > worst) {
                let at = top.partition_point(|&(_, v)| v >= x);
                top.insert(at, (Token(i as i32), x));
                top.truncate(n);
            }
        }
        for entry in &mut top {
            entry.1 -= lse;
        }
        let logit = token.index().and_then(|i| row.get(i)).copied().unwrap_or(f32::NEG_INFINITY);
        TokenLogprobs { token, logprob: logit - lse, top }
    }
}

/// A vocabulary's fill-in-the-middle tokens (code models), each where it has one: an infill
/// prompt is `prefix` + text before the cursor + `suffix` + text after it + `middle`, the reply
/// what goes between; `repository` and `separator` mark files given as context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FimTokens {
    /// Before the text before the cursor (FIM prefix); None: the vocabulary has none.
    pub prefix: Option<Token>,
    /// Before the text after the cursor (FIM suffix); None: the vocabulary has none.
    pub suffix: Option<Token>,
    /// After both texts: the reply follows (FIM middle); None: the vocabulary has none.
    pub middle: Option<Token>,
    /// Before the repository's name that opens the context files (FIM repo); None: the vocabulary
    /// has none.
    pub repository: Option<Token>,
    /// Before each context file's name (FIM file separator); None: the vocabulary has none.
    pub separator: Option<Token>,
}

/// The special tokens a vocabulary puts around the two texts of a pair (a reranker's query and
/// document, as llama-server builds them): each only where the vocabulary adds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairTokens {
    /// Before the first text.
    pub bos: Option<Token>,
    /// After each text (EOS, or SEP where the vocabulary has no EOS).
    pub eos: Option<Token>,
    /// Between the two (after the first's `eos`).
    pub sep: Option<Token>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_normalised_and_the_top_is_sorted() {
        let row = [0.0, 2.0, 1.0, -1.0];
        let lp = TokenLogprobs::from_row(&row, Token(2), 2);
        let total: f32 = row.iter().map(|&x| (x - 2.0f32).exp()).sum();
        let lse = 2.0 + total.ln();
        assert!((lp.logprob - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|&(t, _)| t).collect::<Vec<_>>(), [Token(1), Token(2)]);
        assert!((lp.top[0].1 - (2.0 - lse)).abs() < 1e-6);
        // Asking for more candidates than the row has lists the row.
        assert_eq!(TokenLogprobs::from_row(&row, Token(0), 10).top.len(), 4);
    }
}
