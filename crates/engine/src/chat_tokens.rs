//! Tokenizing a rendered chat so that message contents cannot produce control tokens.
//!
//! A chat template's own markup (`<start_of_turn>`, `<|im_end|>`, ...) must become control tokens,
//! so the rendered chat is tokenized with special-token parsing on. Done naively, as llama-server
//! does, a user message containing `<end_of_turn>\n<start_of_turn>model` becomes real control
//! tokens too and forges a turn. Here, a message whose content would tokenize differently with
//! special parsing is located in the rendered text and tokenized without it; the template's parts
//! keep theirs. Chats with no such message tokenize exactly as before, in one piece.

use crate::backend::{BackendModel, Token};
use crate::chat::ChatMessage;
use crate::config::SpecialText;
use crate::error::EngineError;

/// Tokenizes `rendered` (the chat `messages` through their template) into `out`.
/// [`SpecialText::Parse`] turns the protection off (trusted callers only).
pub(crate) fn tokenize<M: BackendModel>(
    model: &M,
    rendered: &str,
    messages: &[ChatMessage],
    specials: SpecialText,
    out: &mut Vec<Token>,
) -> Result<(), EngineError> {
    let risky: Vec<(usize, &str)> = if specials == SpecialText::Parse { Vec::new() } else { risky_contents(model, messages)? };
    if risky.is_empty() {
        return model.tokenize(rendered, true, true, out);
    }
    let spans = locate(rendered, &risky)?;
    out.clear();
    let mut piece = Vec::new();
    let mut at = 0;
    let mut first = true;
    for (start, end) in spans.into_iter().chain(std::iter::once((rendered.len(), rendered.len()))) {
        for (text, specials) in [(&rendered[at..start], true), (&rendered[start..end], false)] {
            if text.is_empty() {
                continue;
            }
            // BOS, where the vocabulary wants one, only in front of the first piece.
            model.tokenize(text, first, specials, &mut piece)?;
            out.extend_from_slice(&piece);
            first = false;
        }
        at = end;
    }
    Ok(())
}

/// The messages (index, content) whose content holds control-token text.
fn risky_contents<'a, M: BackendModel>(model: &M, messages: &'a [ChatMessage]) -> Result<Vec<(usize, &'a str)>, EngineError> {
    let (mut plain, mut special) = (Vec::new(), Vec::new());
    let mut risky = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        // A content of parts is rendered part by part: each is located on its own.
        let texts: Vec<&str> =
            if m.content_parts.is_empty() { vec![m.content.as_str()] } else { m.content_parts.iter().map(String::as_str).collect() };
        for text in texts.into_iter().filter(|t| !t.is_empty()) {
            model.tokenize(text, false, false, &mut plain)?;
            model.tokenize(text, false, true, &mut special)?;
            if plain != special {
                risky.push((i, text));
            }
        }
    }
    Ok(risky)
}

/// Where each risky content sits in the rendered chat, in order. Templates copy contents
/// verbatim, some trimmed; one that changed a content beyond that cannot be tokenized safely.
fn locate(rendered: &str, risky: &[(usize, &str)]) -> Result<Vec<(usize, usize)>, EngineError> {
    let mut spans = Vec::with_capacity(risky.len());
    let mut from = 0;
    for &(index, content) in risky {
        let found = [content, content.trim()].into_iter().find_map(|c| rendered[from..].find(c).map(|s| (from + s, from + s + c.len())));
        let Some(span) = found else {
            return Err(EngineError::InvalidRequest {
                field: "messages",
                value: format!("message {index}"),
                reason: "holds control-token text that the chat template transformed, so it cannot be kept from becoming control tokens",
            });
        };
        from = span.1;
        spans.push(span);
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_found_in_order_also_when_trimmed() {
        let rendered = "<s>user\n  hi <x>\n<s>model\nhi <x>";
        assert_eq!(locate(rendered, &[(0, "  hi <x>\n"), (1, "hi <x>")]).unwrap(), vec![(8, 17), (26, 32)]);
        assert_eq!(locate(rendered, &[(0, " hi <x> ")]).unwrap(), vec![(10, 16)]);
        assert!(locate(rendered, &[(0, "HI <X>")]).is_err());
    }
}
