//! The engine's errors: one enum, each variant naming what was wrong.

/// An engine failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("invalid request: {field} = {value}: {reason}")]
    InvalidRequest { field: &'static str, value: String, reason: &'static str },
    #[error("invalid engine configuration: {field} = {value}: {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: &'static str },
    #[error("the prompt is {prompt_tokens} tokens, but the context holds {n_ctx}")]
    PromptTooLong { prompt_tokens: usize, n_ctx: u32 },
    #[error("the text to embed is {tokens} tokens, more than one batch ({n_batch}) pools; raise n_batch or split the text")]
    EmbedTooLong { tokens: usize, n_batch: u32 },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("could not create a session: {0}")]
    Session(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("sampler: {0}")]
    Sampler(String),
    #[error("the request was cancelled")]
    Cancelled,
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
