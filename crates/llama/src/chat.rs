//! Chat templates: messages to the prompt text the model was trained on.

use std::ffi::CString;

use crate::error::ChatError;
use crate::model::Model;
use crate::sys;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// The names of llama.cpp's built-in templates ("chatml", "llama3", "gemma", ...).
pub fn builtin_templates() -> Vec<String> {
    // SAFETY: with a null buffer the call only counts.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut names = vec![std::ptr::null(); n.max(0) as usize];
    // SAFETY: names has n slots; llama.cpp fills them with pointers to static strings.
    unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    names
        .into_iter()
        .filter(|p| !p.is_null())
        // SAFETY: static NUL-terminated strings owned by llama.cpp.
        .map(|p| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}

/// What a formatted chat ends with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatEnding {
    /// The opening of the assistant's turn: the prompt to generate a reply from.
    #[default]
    AssistantTurn,
    /// The last message and nothing after it: a conversation as it stands (to count its tokens,
    /// or to store it).
    LastMessage,
}

impl Model {
    /// Formats `messages` with the model's own chat template ([`ChatError::NoTemplate`] when
    /// its GGUF has none).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], ending: ChatEnding) -> Result<String, ChatError> {
        let template = self.chat_template(None).ok_or(ChatError::NoTemplate)?;
        apply_template(&template, messages, ending)
    }
}

/// Formats `messages` with `template`: a template's text, or the name of one of llama.cpp's
/// built-in templates ([`builtin_templates`]).
pub fn apply_template(template: &str, messages: &[ChatMessage], ending: ChatEnding) -> Result<String, ChatError> {
    let add_assistant = ending == ChatEnding::AssistantTurn;
    let c_template = CString::new(template).map_err(|_| ChatError::Nul("the chat template"))?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|m| Ok((CString::new(m.role.as_str())?, CString::new(m.content.as_str())?)))
        .collect::<Result<_, std::ffi::NulError>>()
        .map_err(|_| ChatError::Nul("a chat message"))?;
    let raw: Vec<sys::llama_chat_message> =
        owned.iter().map(|(role, content)| sys::llama_chat_message { role: role.as_ptr(), content: content.as_ptr() }).collect();
    let total: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    let mut buf = vec![0u8; total * 2 + 256];
    loop {
        let mut n = 0;
        // SAFETY: every pointer in raw points into `owned`, alive across the call; buf is
        // writable for its length; `n` is a live out-parameter.
        crate::cpp::guard("llama_chat_apply_template", |err| unsafe {
            sys::exsa_chat_apply_template(
                c_template.as_ptr(),
                raw.as_ptr(),
                raw.len(),
                add_assistant,
                buf.as_mut_ptr().cast(),
                i32::try_from(buf.len()).unwrap_or(i32::MAX),
                &mut n,
                err,
            )
        })?;
        if n < 0 {
            return Err(ChatError::UnknownTemplate(template.chars().take(64).collect()));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf).map_err(|_| ChatError::InvalidUtf8);
        }
        buf.resize(n, 0);
    }
}
