//! Chat messages, and which template formats them.
//!
//! `llama::ChatMessage` is the safe wrapper's; this one is the engine's API over every backend
//! (the `crate` backend does not link `llama`), serializable for the server's JSON.

use serde::Serialize;

use crate::backend::BackendModel;
use crate::engine::Model;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The template for chats: the model's own, else `fallback`, else one chosen by architecture.
pub(crate) fn resolve_chat_template(model: &Model, fallback: Option<&str>) -> String {
    if let Some(t) = model.chat_template() {
        return t;
    }
    if let Some(t) = fallback {
        return t.to_string();
    }
    let arch = model.info().architecture;
    if arch.starts_with("gemma") {
        "gemma".into()
    } else if arch.starts_with("llama") {
        "llama3".into()
    } else {
        "chatml".into()
    }
}
