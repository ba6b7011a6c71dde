//! The vocabulary: tokenize, detokenize, special tokens.

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::error::TokenizeError;
use crate::sys;
use crate::token::Token;

/// Whether special tokens are added and recognised when tokenizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Add BOS/EOS as the model's metadata asks.
    pub add_special: bool,
    /// Turn special-token text (e.g. `<start_of_turn>`) into the special token.
    pub parse_special: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions { add_special: true, parse_special: false }
    }
}

/// How special tokens are written when detokenizing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetokenizeOptions {
    /// Leave out the BOS/EOS the model adds (as [`TokenizeOptions::add_special`] put them in).
    pub remove_special: bool,
    /// Write special tokens as their text (`<end_of_turn>`) instead of leaving them out.
    pub unparse_special: bool,
}

/// Whether [`Vocab::piece`] and [`Vocab::piece_into`] write the text of control tokens
/// (llama.cpp's `special` flag of `llama_token_to_piece`). Other tokens, user-defined ones
/// included, are written either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Control tokens (`<end_of_turn>`, BOS and EOS as most vocabularies mark them) and the
    /// unknown token have an empty piece: text for a reader.
    #[default]
    Omit,
    /// Control tokens and the unknown token are written as their text (`<end_of_turn>`), which
    /// [`TokenizeOptions::parse_special`] turns back into the token.
    Render,
}

/// The vocabulary of a [`Model`](crate::Model), borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct Vocab<'m> {
    raw: NonNull<sys::llama_vocab>,
    n_tokens: i32,
    /// Borrowed from its model for 'm.
    _model: PhantomData<&'m ()>,
}

// SAFETY: the vocab is part of an immutable, Sync model; every method reads it.
unsafe impl Send for Vocab<'_> {}
// SAFETY: as above.
unsafe impl Sync for Vocab<'_> {}

impl<'m> Vocab<'m> {
    /// `raw` must be the vocabulary of a model that lives for 'm (the caller ties the lifetime).
    pub(crate) fn new(raw: NonNull<sys::llama_vocab>, _model: PhantomData<&'m ()>) -> Self {
        // SAFETY: raw is the live vocab of `_model`.
        let n_tokens = unsafe { sys::llama_vocab_n_tokens(raw.as_ptr()) };
        Vocab { raw, n_tokens, _model: PhantomData }
    }

    /// The raw handle; it stays owned by the model.
    pub fn as_ptr(&self) -> *const sys::llama_vocab {
        self.raw.as_ptr()
    }

    /// Number of tokens in the vocabulary.
    pub fn n_tokens(&self) -> i32 {
        self.n_tokens
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Token {
        // SAFETY: reads a field of a live vocab.
        Token(unsafe { sys::llama_vocab_bos(self.raw.as_ptr()) })
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Token {
        // SAFETY: reads a field of a live vocab.
        Token(unsafe { sys::llama_vocab_eos(self.raw.as_ptr()) })
    }

    /// The separator token (BERT's `[SEP]`), if the vocabulary has one.
    pub fn sep(&self) -> Option<Token> {
        // SAFETY: reads a field of a live vocab.
        let id = unsafe { sys::llama_vocab_sep(self.raw.as_ptr()) };
        // LLAMA_TOKEN_NULL (-1): none.
        self.contains(Token(id)).then_some(Token(id))
    }

    /// Which special tokens tokenizing with `add_special` adds: BOS before the text, EOS after
    /// it, SEP between the parts of a pair (BERT-like models; a reranker's query and document).
    pub fn added_specials(&self) -> AddedSpecials {
        let raw = self.raw.as_ptr();
        // SAFETY: each reads a field of a live vocab.
        unsafe {
            AddedSpecials { bos: sys::llama_vocab_get_add_bos(raw), eos: sys::llama_vocab_get_add_eos(raw), sep: sys::llama_vocab_get_add_sep(raw) }
        }
    }

    /// The end-of-turn token (chat models).
    pub fn eot(&self) -> Token {
        // SAFETY: reads a field of a live vocab.
        Token(unsafe { sys::llama_vocab_eot(self.raw.as_ptr()) })
    }

    /// The model's fill-in-the-middle token of `kind`, if its vocabulary has one.
    pub fn fim(&self, kind: FimToken) -> Option<Token> {
        let raw = self.raw.as_ptr();
        // SAFETY: each reads a field of a live vocab.
        let id = unsafe {
            match kind {
                FimToken::Prefix => sys::llama_vocab_fim_pre(raw),
                FimToken::Suffix => sys::llama_vocab_fim_suf(raw),
                FimToken::Middle => sys::llama_vocab_fim_mid(raw),
                FimToken::Padding => sys::llama_vocab_fim_pad(raw),
                FimToken::Repository => sys::llama_vocab_fim_rep(raw),
                FimToken::Separator => sys::llama_vocab_fim_sep(raw),
            }
        };
        // LLAMA_TOKEN_NULL (-1): none.
        self.contains(Token(id)).then_some(Token(id))
    }

    /// Whether `token` ends generation (EOS, EOT and the model's other end tokens).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: llama.cpp looks the id up in a set; any id is safe to ask about.
        unsafe { sys::llama_vocab_is_eog(self.raw.as_ptr(), token.0) }
    }

    /// Whether the token is valid for this vocabulary.
    pub fn contains(&self, token: Token) -> bool {
        (0..self.n_tokens).contains(&token.0)
    }

    fn check(&self, token: Token) -> Result<(), TokenizeError> {
        if self.contains(token) { Ok(()) } else { Err(TokenizeError::InvalidToken { token, n_vocab: self.n_tokens }) }
    }

    /// Tokenizes `text` into `out`, replacing its contents; reuses `out`'s allocation.
    pub fn tokenize_into(&self, text: &str, options: TokenizeOptions, out: &mut Vec<Token>) -> Result<(), TokenizeError> {
        let len = i32::try_from(text.len()).map_err(|_| TokenizeError::TooLong { len: text.len() })?;
        // A token is at least one byte, plus BOS/EOS.
        let guess = text.len() + 2;
        out.clear();
        out.reserve(guess);
        for _ in 0..2 {
            let cap = i32::try_from(out.capacity()).unwrap_or(i32::MAX);
            let mut n = 0;
            // SAFETY: text is valid for len bytes; out has `cap` writable Token slots, and Token
            // is repr(transparent) over llama_token; `n` is a live out-parameter.
            crate::cpp::guard("llama_tokenize", |err| unsafe {
                sys::exsa_tokenize(
                    self.raw.as_ptr(),
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr().cast(),
                    cap,
                    options.add_special,
                    options.parse_special,
                    &mut n,
                    err,
                )
            })?;
            if n >= 0 {
                // SAFETY: llama.cpp initialised the first n slots.
                unsafe { out.set_len(n as usize) };
                return Ok(());
            }
            if n == i32::MIN {
                return Err(TokenizeError::Failed(n));
            }
            // A negative count is the size needed.
            out.reserve((-n) as usize);
        }
        Err(TokenizeError::Failed(-1))
    }

    /// Tokenizes `text` into a new vector.
    pub fn tokenize(&self, text: &str, options: TokenizeOptions) -> Result<Vec<Token>, TokenizeError> {
        let mut out = Vec::new();
        self.tokenize_into(text, options, &mut out)?;
        Ok(out)
    }

    /// Appends the bytes of `token`'s text to `out`. Bytes, not a string: a piece may be part
    /// of a multi-byte character; see [`crate::Utf8Decoder`]. `specials` says whether control
    /// tokens are written as their text or left out.
    pub fn piece_into(&self, token: Token, specials: SpecialTokens, out: &mut Vec<u8>) -> Result<(), TokenizeError> {
        let special = specials == SpecialTokens::Render;
        self.check(token)?;
        let start = out.len();
        let mut room = 32usize;
        loop {
            out.resize(start + room, 0);
            let mut n = 0;
            // SAFETY: the token is in range; the buffer has `room` writable bytes; `n` is a live
            // out-parameter.
            crate::cpp::guard("llama_token_to_piece", |err| unsafe {
                sys::exsa_token_to_piece(self.raw.as_ptr(), token.0, out[start..].as_mut_ptr().cast(), room as i32, 0, special, &mut n, err)
            })?;
            if n >= 0 {
                out.truncate(start + n as usize);
                return Ok(());
            }
            room = (-n) as usize;
        }
    }

    /// The bytes of one token's text (see [`Vocab::piece_into`]).
    pub fn piece(&self, token: Token, specials: SpecialTokens) -> Result<Vec<u8>, TokenizeError> {
        let mut out = Vec::new();
        self.piece_into(token, specials, &mut out)?;
        Ok(out)
    }

    /// Detokenizes a whole sequence; invalid UTF-8 (a cut-off character) becomes U+FFFD.
    pub fn detokenize(&self, tokens: &[Token], options: DetokenizeOptions) -> Result<String, TokenizeError> {
        if let Some(bad) = tokens.iter().find(|t| !self.contains(**t)) {
            return Err(TokenizeError::InvalidToken { token: *bad, n_vocab: self.n_tokens });
        }
        let n_tokens = i32::try_from(tokens.len()).map_err(|_| TokenizeError::TooLong { len: tokens.len() })?;
        let mut buf = vec![0u8; tokens.len() * 8 + 16];
        loop {
            let mut n = 0;
            // SAFETY: tokens are valid ids (checked above) read for n_tokens; buf is writable for
            // its length; `n` is a live out-parameter.
            crate::cpp::guard("llama_detokenize", |err| unsafe {
                sys::exsa_detokenize(
                    self.raw.as_ptr(),
                    tokens.as_ptr().cast(),
                    n_tokens,
                    buf.as_mut_ptr().cast(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    options.remove_special,
                    options.unparse_special,
                    &mut n,
                    err,
                )
            })?;
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize((-n) as usize, 0);
        }
    }
}

/// The special tokens of fill-in-the-middle prompts (code models: the text before the cursor,
/// after it, and where the model writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FimToken {
    /// Starts the text before the cursor.
    Prefix,
    /// Starts the text after the cursor.
    Suffix,
    /// Where the model writes what goes between.
    Middle,
    /// Fills unused positions.
    Padding,
    /// Starts a repository's files (repo-level FIM).
    Repository,
    /// Starts a file of the repository.
    Separator,
}

/// The special tokens a vocabulary adds around text (see [`Vocab::added_specials`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddedSpecials {
    /// BOS before the text.
    pub bos: bool,
    /// EOS after it.
    pub eos: bool,
    /// SEP between the parts of a pair.
    pub sep: bool,
}
