//! Chats through the model's own Jinja template, the way llama.cpp's server renders them: tools
//! described, a grammar that keeps tool calls well formed (from a trigger on, or from the first
//! token when a call is required), the format's own stop strings and special tokens, and a parser
//! that reads the reply back into content, reasoning and tool calls ([`ReplyParser`]).
//!
//! This is llama.cpp's `common` chat layer through `llama::chat_templates`: backend `source` with
//! feature `jinja`. Other builds have the same types; loading templates there is
//! [`EngineError::Unsupported`], so no chat ever reaches a parser they cannot make.

#[cfg(all(feature = "source", feature = "jinja"))]
use crate::chat::ToolCall;
use crate::chat::{ChatDelta, ChatMessage, ChatOptions, ChatReply};
use crate::config::GrammarStart;
use crate::error::EngineError;
#[cfg(all(feature = "source", feature = "jinja"))]
use crate::error::cause;
use crate::token::Token;

/// A chat rendered for generation.
#[derive(Debug)]
pub(crate) struct RenderedChat {
    pub(crate) prompt: String,
    /// The format's grammar and when it starts (texts, made tokens by the engine).
    pub(crate) grammar: Option<(String, GrammarText)>,
    /// Stop strings the format adds.
    pub(crate) stops: Vec<String>,
    /// Special tokens (as text) the reply may contain and the parser reads.
    pub(crate) preserved: Vec<String>,
    pub(crate) parser: ReplyParser,
}

/// [`GrammarStart`] before tokenization.
// Made only by the chat layer's renderer (backend source with feature jinja).
#[cfg_attr(not(all(feature = "source", feature = "jinja")), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum GrammarText {
    Immediately,
    /// The grammar reads this text (the end of the prompt) first.
    AfterPrefill(String),
    /// Regular expressions, and words that may each be one special token.
    Lazy {
        patterns: Vec<String>,
        words: Vec<String>,
        tokens: Vec<Token>,
    },
}

impl GrammarText {
    /// The start in tokens: a prefill tokenized as llama.cpp's server does; a trigger word that
    /// is one preserved special token triggers on that token, other words become patterns.
    /// `tokenize` reads special-token text, without BOS; `piece` is a token's text.
    pub(crate) fn to_start(
        &self,
        tokenize: impl Fn(&str) -> Result<Vec<Token>, EngineError>,
        piece: impl Fn(Token) -> Result<String, EngineError>,
        preserved: &[Token],
    ) -> Result<GrammarStart, EngineError> {
        Ok(match self {
            GrammarText::Immediately => GrammarStart::Immediately,
            GrammarText::AfterPrefill(text) => {
                let mut tokens = tokenize(text)?;
                // A tokenizer that puts a space before a leading special token: the space is
                // not part of the text the grammar starts with.
                if let Some(&first) = tokens.first()
                    && piece(first)?.starts_with(char::is_whitespace)
                    && !text.starts_with(char::is_whitespace)
                {
                    tokens.remove(0);
                }
                GrammarStart::AfterPrefill(tokens)
            }
            GrammarText::Lazy { patterns, words, tokens } => {
                let mut patterns = patterns.clone();
                let mut tokens = tokens.clone();
                for word in words {
                    match tokenize(word)?.as_slice() {
                        [one] if preserved.contains(one) => tokens.push(*one),
                        _ => patterns.push(regex_escape(word)),
                    }
                }
                GrammarStart::Lazy { patterns, tokens }
            }
        })
    }
}

/// `text` as a regular expression that matches it literally (llama.cpp's `regex_escape`).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if ".^$|()*+?[]{}\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The model's Jinja chat templates.
#[cfg(all(feature = "source", feature = "jinja"))]
#[derive(Debug)]
pub(crate) struct JinjaTemplates {
    /// llama.cpp's handle may not be rendered from two threads at once.
    templates: std::sync::Mutex<llama::chat_templates::ChatTemplates>,
}

#[cfg(all(feature = "source", feature = "jinja"))]
impl JinjaTemplates {
    /// The model's own template, or `override_source` (Jinja source, or `"chatml"`).
    pub(crate) fn load(
        model: &<crate::backend::Active as crate::backend::Backend>::Model,
        override_source: Option<&str>,
    ) -> Result<JinjaTemplates, EngineError> {
        let templates =
            llama::chat_templates::ChatTemplates::from_model(model.llama(), override_source).map_err(|e| chat_error(e, "chat_template"))?;
        Ok(JinjaTemplates { templates: std::sync::Mutex::new(templates) })
    }

    /// Renders `messages` with `options`.
    pub(crate) fn render(&self, messages: &[ChatMessage], options: &ChatOptions) -> Result<RenderedChat, EngineError> {
        let request = options.request(messages);
        let prompt = {
            let templates = self.templates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            templates.apply(&request).map_err(|e| chat_error(e, "messages"))?
        };
        let grammar = (!prompt.grammar.is_empty()).then(|| {
            let start = if prompt.grammar_lazy {
                let (mut patterns, mut words, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
                for trigger in &prompt.grammar_triggers {
                    use llama::chat_templates::TriggerKind;
                    match trigger.kind {
                        TriggerKind::Word => words.push(trigger.value.clone()),
                        TriggerKind::Pattern => patterns.push(trigger.value.clone()),
                        TriggerKind::PatternFull => patterns.push(anchored(&trigger.value)),
                        TriggerKind::Token => tokens.extend(trigger.token.map(Token::from)),
                    }
                }
                GrammarText::Lazy { patterns, words, tokens }
            } else if prompt.generation_prompt.is_empty() {
                GrammarText::Immediately
            } else {
                GrammarText::AfterPrefill(prompt.generation_prompt.clone())
            };
            (prompt.grammar.clone(), start)
        });
        Ok(RenderedChat {
            prompt: prompt.prompt.clone(),
            grammar,
            stops: prompt.additional_stops.clone(),
            preserved: prompt.preserved_tokens.clone(),
            parser: ReplyParser {
                prompt,
                text: String::new(),
                parsed: llama::chat_templates::AssistantMessage::default(),
                next_id: 0,
                ids: Vec::new(),
            },
        })
    }
}

/// A pattern that must match the whole output (llama.cpp anchors it the same way).
#[cfg(all(feature = "source", feature = "jinja"))]
fn anchored(pattern: &str) -> String {
    match (pattern.starts_with('^'), pattern.ends_with('$')) {
        _ if pattern.is_empty() => "^$".into(),
        (true, true) => pattern.into(),
        (true, false) => format!("{pattern}$"),
        (false, true) => format!("^{pattern}"),
        (false, false) => format!("^{pattern}$"),
    }
}

/// A chat-layer error as the engine's, naming the request field at fault (`otherwise` when the
/// layer does not say).
#[cfg(all(feature = "source", feature = "jinja"))]
fn chat_error(e: llama::chat_templates::ChatTemplateError, otherwise: &'static str) -> EngineError {
    use llama::chat_templates::ChatTemplateError as E;
    let field = match &e {
        E::Field { field, .. } => field,
        E::Schema(_) => "tools",
        E::Parse(_) => "chat_template",
        _ => otherwise,
    };
    EngineError::Chat { field, source: cause(e) }
}

/// Reads a reply as it grows into content, reasoning and tool calls, and hands out what each
/// piece of text added ([`ChatDelta`]s). Tool calls the model gave no id get `call_<n>` ids.
#[derive(Debug)]
pub struct ReplyParser {
    #[cfg(all(feature = "source", feature = "jinja"))]
    prompt: llama::chat_templates::ChatPrompt,
    #[cfg(all(feature = "source", feature = "jinja"))]
    parsed: llama::chat_templates::AssistantMessage,
    #[cfg(all(feature = "source", feature = "jinja"))]
    next_id: usize,
    /// The ids given to calls without one, by call index.
    #[cfg(all(feature = "source", feature = "jinja"))]
    ids: Vec<String>,
    text: String,
}

impl ReplyParser {
    /// Appends generated text; the deltas it completes. Text the format may still turn into
    /// something else (a tool call's opening) is held back.
    pub fn push(&mut self, text: &str) -> Result<Vec<ChatDelta>, EngineError> {
        self.text.push_str(text);
        self.reparse(true)
    }

    /// At the end: the deltas of what was held back, and the whole reply.
    pub fn finish(&mut self) -> Result<(Vec<ChatDelta>, ChatReply), EngineError> {
        let deltas = self.reparse(false)?;
        Ok((deltas, self.reply()))
    }

    /// The whole reply of `text`, generated without streaming: read once, at the end, rather
    /// than again after every piece as [`ReplyParser::push`] does.
    pub fn read_whole(mut self, text: &str) -> Result<ChatReply, EngineError> {
        self.text.push_str(text);
        self.finish().map(|(_, reply)| reply)
    }

    /// Everything generated so far, as it came.
    pub fn text(&self) -> &str {
        &self.text
    }

    #[cfg(all(feature = "source", feature = "jinja"))]
    fn reparse(&mut self, partial: bool) -> Result<Vec<ChatDelta>, EngineError> {
        let reply = if partial { llama::chat_templates::ReplyText::Partial } else { llama::chat_templates::ReplyText::Complete };
        let next = match self.prompt.parse(&self.text, reply) {
            Ok(next) => next,
            // Partial text the format cannot read yet: wait for more.
            Err(_) if partial => return Ok(Vec::new()),
            // A reply that does not fit its format is its text (llama-server does the same).
            Err(_) => llama::chat_templates::AssistantMessage { content: self.text.clone(), ..Default::default() },
        };
        let diffs = match next.deltas_since(&self.parsed) {
            Ok(diffs) => diffs,
            // Not a continuation (a partial parse rewritten by more text): wait for more.
            Err(_) if partial => return Ok(Vec::new()),
            // The final reading rewrote what streamed (a reply that did not fit its format in
            // the end): the whole reply is the final one; a stream cannot take back what it sent.
            Err(e) => {
                tracing::debug!("the final reply is not a continuation of what streamed: {e}");
                self.parsed = next;
                return Ok(Vec::new());
            }
        };
        self.parsed = next;
        let mut deltas = Vec::new();
        for diff in diffs {
            if !diff.reasoning_content_delta.is_empty() {
                deltas.push(ChatDelta::Reasoning(diff.reasoning_content_delta));
            }
            if !diff.content_delta.is_empty() {
                deltas.push(ChatDelta::Content(diff.content_delta));
            }
            if let Some(index) = diff.tool_call_index {
                let call = diff.tool_call;
                let first = index >= self.ids.len();
                if first {
                    let id = if call.id.is_empty() { self.new_id() } else { call.id.clone() };
                    self.ids.push(id);
                }
                let (id, name) = if first { (Some(self.ids[index].clone()), Some(call.name)) } else { (None, None) };
                deltas.push(ChatDelta::ToolCall { index, id, name, arguments: call.arguments });
            }
        }
        Ok(deltas)
    }

    #[cfg(all(feature = "source", feature = "jinja"))]
    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("call_{}", self.next_id - 1)
    }

    #[cfg(all(feature = "source", feature = "jinja"))]
    fn reply(&self) -> ChatReply {
        let tool_calls = self
            .parsed
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCall {
                id: self.ids.get(i).cloned().unwrap_or_else(|| c.id.clone()),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            })
            .collect();
        ChatReply { content: self.parsed.content.clone(), reasoning_content: self.parsed.reasoning_content.clone(), tool_calls }
    }

    // Without the chat layer no parser is ever made (loading templates is Unsupported); these
    // keep the type's one interface.
    #[cfg(not(all(feature = "source", feature = "jinja")))]
    fn reparse(&mut self, _partial: bool) -> Result<Vec<ChatDelta>, EngineError> {
        Ok(Vec::new())
    }

    #[cfg(not(all(feature = "source", feature = "jinja")))]
    fn reply(&self) -> ChatReply {
        ChatReply { content: self.text.clone(), ..Default::default() }
    }
}

/// Stands in for the chat layer in builds without it.
#[cfg(not(all(feature = "source", feature = "jinja")))]
#[derive(Debug)]
pub(crate) struct JinjaTemplates;

#[cfg(not(all(feature = "source", feature = "jinja")))]
impl JinjaTemplates {
    pub(crate) fn load(
        _model: &<crate::backend::Active as crate::backend::Backend>::Model,
        _override_source: Option<&str>,
    ) -> Result<JinjaTemplates, EngineError> {
        Err(Self::unsupported())
    }

    pub(crate) fn render(&self, _messages: &[ChatMessage], _options: &ChatOptions) -> Result<RenderedChat, EngineError> {
        Err(Self::unsupported())
    }

    fn unsupported() -> EngineError {
        EngineError::Unsupported {
            what: "Jinja chat templates (backend source with feature jinja)",
            backend: <crate::backend::Active as crate::backend::Backend>::NAME,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_escapes_what_std_regex_reads_specially() {
        assert_eq!(regex_escape("<tool_call>"), "<tool_call>");
        assert_eq!(regex_escape("[TOOL_CALLS]"), "\\[TOOL_CALLS\\]");
        assert_eq!(regex_escape("a.b*c(d)|e?{f}^$\\"), "a\\.b\\*c\\(d\\)\\|e\\?\\{f\\}\\^\\$\\\\");
    }

    #[test]
    fn trigger_words_that_are_one_preserved_token_trigger_on_it() {
        let start = GrammarText::Lazy { patterns: vec!["x".into()], words: vec!["<tc>".into(), "[T]".into()], tokens: vec![] };
        let tokenize = |w: &str| Ok(if w == "<tc>" { vec![Token(7)] } else { vec![Token(1), Token(2)] });
        let piece = |_| Ok(String::new());
        assert_eq!(
            start.to_start(tokenize, piece, &[Token(7)]).unwrap(),
            GrammarStart::Lazy { patterns: vec!["x".into(), "\\[T\\]".into()], tokens: vec![Token(7)] }
        );
        // Not preserved: the word stays a pattern.
        let start = GrammarText::Lazy { patterns: vec![], words: vec!["<tc>".into()], tokens: vec![] };
        assert_eq!(start.to_start(tokenize, piece, &[]).unwrap(), GrammarStart::Lazy { patterns: vec!["<tc>".into()], tokens: vec![] });
        // A prefill loses a space token its tokenizer put in front.
        let prefill = GrammarText::AfterPrefill("<tc>".into());
        let spaced = |t: Token| Ok(if t == Token(1) { " ".to_string() } else { "x".to_string() });
        assert_eq!(prefill.to_start(tokenize, spaced, &[]).unwrap(), GrammarStart::AfterPrefill(vec![Token(7)]));
        let prefill = GrammarText::AfterPrefill("[T]".into());
        assert_eq!(prefill.to_start(tokenize, spaced, &[]).unwrap(), GrammarStart::AfterPrefill(vec![Token(2)]));
    }
}
