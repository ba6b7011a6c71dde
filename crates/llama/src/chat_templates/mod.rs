//! A model's own Jinja chat template with tools, the way llama.cpp's server uses it (feature
//! `chat`): render an OpenAI-shaped request to a prompt and the grammar that keeps tool calls
//! well formed, then parse what the model wrote back into content, reasoning and tool calls.
//!
//! This is llama.cpp's `common` chat layer (`common/chat.cpp`, its Jinja engine and parsers for
//! some thirty model families), compiled by llama-sys (`build/chat.rs`) behind a C surface with
//! JSON text in and out. Requests are `serde_json::Value`s in the shape of OpenAI's chat
//! completions (`messages`, `tools`, `tool_choice`, ...; see [`ChatTemplates::apply`]).
//!
//! A named function in `tool_choice` narrows the tools to that one and requires a call. A
//! template that knows nothing of tools (Gemma 3's) gets them through a generic JSON format of
//! ours (`generic.rs`): the tools described in the system message, and a grammar that makes
//! every reply one JSON object, a call or a response.
//!
//! **Known gap, not yet closed:** llama.cpp's Jinja parser and interpreter and its output parser
//! recurse without a depth limit, so a template (or, for parse, a reply) nested deeply enough
//! overflows the calling thread's stack, which ends the process. Until they are bounded, give
//! these functions only templates you trust and run them on a thread with a large stack.

use std::ffi::{CStr, CString, c_char};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::Model;
use crate::sys;
use crate::token::Token;

/// Why a chat template could not be loaded, applied, or its output parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatTemplateError {
    /// The Jinja source does not parse.
    #[error("the chat template does not parse: {0}")]
    Parse(String),
    /// Rendering failed (the template raised an exception, a variable it needs is missing, ...).
    #[error("the chat template failed to render: {0}")]
    Render(String),
    /// A tool's parameters (or the JSON schema) cannot become a grammar.
    #[error("a JSON schema cannot become a grammar: {0}")]
    Schema(String),
    /// The request is malformed: not OpenAI-shaped, an unknown role, ...
    #[error("bad chat request: {0}")]
    BadRequest(String),
    /// A field of the request is wrong: a tool without a name, a `tool_choice` naming no tool.
    #[error("{field}: {reason}")]
    Field {
        /// The field's name (`tools`, `tool_choice`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The generated text does not match the template's format (or a parse is not a
    /// continuation of the previous one).
    #[error("the output does not match the chat format: {0}")]
    OutputMismatch(String),
    /// A text contains a NUL byte, which cannot cross into C.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// Anything else llama.cpp threw.
    #[error("llama.cpp's chat layer failed: {0}")]
    Other(String),
}

impl ChatTemplateError {
    fn from_code(code: i32, err: &sys::exsa_error) -> ChatTemplateError {
        // SAFETY: the shim always leaves `what` NUL-terminated.
        let what = unsafe { CStr::from_ptr(err.what.as_ptr()) }.to_string_lossy().into_owned();
        match code {
            sys::EXSA_CHAT_TEMPLATE_PARSE => ChatTemplateError::Parse(what),
            sys::EXSA_CHAT_TEMPLATE_RENDER => ChatTemplateError::Render(what),
            sys::EXSA_CHAT_SCHEMA => ChatTemplateError::Schema(what),
            sys::EXSA_CHAT_BAD_REQUEST => ChatTemplateError::BadRequest(what),
            sys::EXSA_CHAT_OUTPUT_MISMATCH => ChatTemplateError::OutputMismatch(what),
            _ => ChatTemplateError::Other(what),
        }
    }
}

/// Runs one shim call that returns a malloc'd string, and takes that string.
fn call_for_string(f: impl FnOnce(*mut *mut c_char, *mut sys::exsa_error) -> i32) -> Result<String, ChatTemplateError> {
    let mut out: *mut c_char = std::ptr::null_mut();
    let mut err = sys::exsa_error::default();
    let code = f(&mut out, &mut err);
    if code != sys::EXSA_OK as i32 {
        return Err(ChatTemplateError::from_code(code, &err));
    }
    if out.is_null() {
        return Err(ChatTemplateError::Other("the chat layer returned no text".into()));
    }
    // SAFETY: on EXSA_OK the shim returns a NUL-terminated string from malloc, ours to free.
    let text = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
    // SAFETY: `out` came from the shim's malloc and is freed once, here.
    unsafe { sys::exsa_chat_string_free(out) };
    Ok(text)
}

fn c_text(text: &str, what: &'static str) -> Result<CString, ChatTemplateError> {
    CString::new(text).map_err(|_| ChatTemplateError::Nul(what))
}

/// The JSON the shim returned, read into `T`.
fn from_shim<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, ChatTemplateError> {
    serde_json::from_str(json).map_err(|e| ChatTemplateError::Other(format!("unexpected JSON from the chat layer: {e}")))
}

mod generic;

/// A model's chat templates (its default one and, where it has one, its tool-use variant), or a
/// template given as Jinja source.
#[derive(Debug)]
pub struct ChatTemplates {
    raw: NonNull<sys::exsa_chat_templates>,
    caps: TemplateCaps,
}

/// What a template can do, as llama.cpp reads it from the template's source (its server reports
/// the same in `/props`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
#[non_exhaustive]
pub struct TemplateCaps {
    /// It describes the tools it is given.
    pub supports_tools: bool,
    /// It renders assistant messages' tool calls.
    pub supports_tool_calls: bool,
    /// It renders several calls in one message.
    pub supports_parallel_tool_calls: bool,
    /// It has a system role (otherwise llama.cpp folds system messages into the first user one).
    pub supports_system_role: bool,
    /// It takes `reasoning_effort`.
    pub supports_reasoning_effort: bool,
}

/// The GBNF grammar (rule `root`) of a JSON schema, by llama.cpp's converter: the one its server
/// uses for `response_format` and tool parameters (`pattern`, `format`, `minimum`, `$ref`, ...).
pub fn json_schema_grammar(schema: &Value) -> Result<String, ChatTemplateError> {
    crate::backend::init();
    let schema = c_text(&schema.to_string(), "the schema")?;
    call_for_string(|out, err| {
        // SAFETY: the schema is NUL-terminated; out and err are valid for writes.
        unsafe { sys::exsa_chat_json_schema_to_grammar(schema.as_ptr(), out, err) }
    })
}

// SAFETY: the handle owns everything it uses (llama.cpp copies the template sources and the
// special tokens out of the model at init) and nothing in it is tied to a thread, so it may move
// between threads. It is not Sync: whether two renders of one handle may run at once is not
// established, so `apply` takes `&self` but the type cannot be shared.
unsafe impl Send for ChatTemplates {}

impl ChatTemplates {
    /// The model's own chat template, or `override_source` (Jinja source, or `"chatml"`) instead.
    pub fn from_model(model: &Model, override_source: Option<&str>) -> Result<ChatTemplates, ChatTemplateError> {
        Self::init(Some(model), override_source)
    }

    /// A template from its Jinja source alone (special tokens come from a model, so a template
    /// that prints `bos_token` prints nothing here).
    pub fn from_source(source: &str) -> Result<ChatTemplates, ChatTemplateError> {
        Self::init(None, Some(source))
    }

    fn init(model: Option<&Model>, override_source: Option<&str>) -> Result<ChatTemplates, ChatTemplateError> {
        crate::backend::init();
        let source = override_source.map(|s| c_text(s, "the template source")).transpose()?;
        let mut out: *mut sys::exsa_chat_templates = std::ptr::null_mut();
        let mut err = sys::exsa_error::default();
        let model_ptr = model.map_or(std::ptr::null(), |m| m.as_ptr() as *const sys::llama_model);
        let source_ptr = source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: the model (if any) is alive for the call; the source is NUL-terminated or null;
        // out and err are valid for writes. The handle borrows nothing from the model afterwards.
        let code = unsafe { sys::exsa_chat_templates_init(model_ptr, source_ptr, &mut out, &mut err) };
        if code != sys::EXSA_OK as i32 {
            return Err(ChatTemplateError::from_code(code, &err));
        }
        let raw = NonNull::new(out).ok_or_else(|| ChatTemplateError::Other("no template handle".into()))?;
        // Owned from here: dropped (freed) if reading the caps fails.
        let mut templates = ChatTemplates { raw, caps: TemplateCaps::default() };
        let caps = call_for_string(|out, err| {
            // SAFETY: the handle is alive; out and err are valid for writes.
            unsafe { sys::exsa_chat_templates_caps(templates.raw.as_ptr(), out, err) }
        })?;
        templates.caps = from_shim(&caps)?;
        Ok(templates)
    }

    /// What the template can do.
    pub fn caps(&self) -> TemplateCaps {
        self.caps
    }

    /// Renders a request in the shape of OpenAI's chat completions: `messages` (with `tool_calls`
    /// on assistant messages and `tool` messages with `tool_call_id`), and optionally `tools`,
    /// `tool_choice` (`"auto"`, `"none"`, `"required"`, or `{"type": "function", "function":
    /// {"name": ...}}`), `parallel_tool_calls` (default: whether the template can render parallel
    /// calls, as llama-server does; false for the generic format), `add_generation_prompt` (default true),
    /// `reasoning_format` (`"none"`, `"auto"`, ...), `enable_thinking`, `chat_template_kwargs`,
    /// `json_schema`, `now` (seconds since the epoch: the date templates print; default now).
    pub fn apply(&self, request: &Value) -> Result<ChatPrompt, ChatTemplateError> {
        let request = normalized(request)?;
        let has_tools = request.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty());
        if has_tools && !self.caps.supports_tools && !self.caps.supports_tool_calls {
            if request.get("json_schema").is_some_and(|s| !s.is_null()) || request.get("grammar").is_some_and(|g| !g.is_null()) {
                return Err(ChatTemplateError::Field { field: "tools", reason: "a JSON schema or grammar cannot be combined with tools".into() });
            }
            let rewritten = generic::rewrite(request)?;
            let mut prompt = self.apply_native(&rewritten.request)?;
            prompt.grammar = json_schema_grammar(&rewritten.schema)?;
            prompt.grammar_lazy = false;
            prompt.grammar_triggers.clear();
            // The grammar covers the reply alone: nothing before it to feed.
            prompt.generation_prompt.clear();
            prompt.format_name = "exsa generic JSON".into();
            prompt.generic = Some(rewritten.format);
            return Ok(prompt);
        }
        self.apply_native(&request)
    }

    /// The template and llama.cpp's format for it, as they are.
    fn apply_native(&self, request: &Value) -> Result<ChatPrompt, ChatTemplateError> {
        let request = c_text(&request.to_string(), "the request")?;
        let json = call_for_string(|out, err| {
            // SAFETY: the handle is alive (&self); the request is NUL-terminated; out and err
            // are valid for writes.
            unsafe { sys::exsa_chat_apply(self.raw.as_ptr(), request.as_ptr(), out, err) }
        })?;
        from_shim(&json)
    }
}

impl Drop for ChatTemplates {
    fn drop(&mut self) {
        // SAFETY: the handle came from exsa_chat_templates_init and is freed once.
        unsafe { sys::exsa_chat_templates_free(self.raw.as_ptr()) };
    }
}

/// What a rendered request is generated from.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatPrompt {
    /// The text to tokenize (with special tokens parsed).
    pub prompt: String,
    /// llama.cpp's name of the output format (`"Content-only"`, `"peg-native"`, ...).
    pub format_name: String,
    /// A GBNF grammar for the reply, empty for none.
    pub grammar: String,
    /// Whether the grammar applies only from a trigger on (a tool call may or may not come).
    pub grammar_lazy: bool,
    /// Text the template put after the prompt's end that the reply is read as starting with.
    pub generation_prompt: String,
    /// Where a lazy grammar starts.
    pub grammar_triggers: Vec<GrammarTrigger>,
    /// Special tokens the reply may contain as text (tool-call markers).
    pub preserved_tokens: Vec<String>,
    /// Stop strings the format adds.
    pub additional_stops: Vec<String>,
    /// Whether the template has a thinking mode.
    pub supports_thinking: bool,
    /// The tag that opens its reasoning text, when it has one.
    pub thinking_start_tag: String,
    /// The tags that close it.
    pub thinking_end_tags: Vec<String>,
    format: i64,
    parser: String,
    /// Set for templates without tools given tools (see `generic.rs`).
    #[serde(skip)]
    generic: Option<generic::GenericFormat>,
}

fn field(field: &'static str, reason: impl Into<String>) -> ChatTemplateError {
    ChatTemplateError::Field { field, reason: reason.into() }
}

/// The tools of `request`, each a function with a name (what every format needs).
fn checked_tools(request: &Map<String, Value>) -> Result<&[Value], ChatTemplateError> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(&[]),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(field("tools", "is not a list")),
    };
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("type").is_some_and(|t| t != "function") {
            return Err(field("tools", format!("tools[{i}]: only tools of type \"function\" exist")));
        }
        let name = tool.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
        if name.is_none_or(str::is_empty) {
            return Err(field("tools", format!("tools[{i}]: a function needs a name")));
        }
        if let Some(parameters) = tool["function"].get("parameters")
            && !(parameters.is_object() || parameters.is_null())
        {
            return Err(field("tools", format!("tools[{i}]: parameters must be a JSON schema (an object)")));
        }
    }
    Ok(tools)
}

/// The request with `tools` checked and a named `tool_choice` turned into a required call of
/// that tool alone.
fn normalized(request: &Value) -> Result<Value, ChatTemplateError> {
    let mut request = request.clone();
    let object = request.as_object_mut().ok_or_else(|| ChatTemplateError::BadRequest("the request is not a JSON object".into()))?;
    let tools = checked_tools(object)?.to_vec();
    let named = match object.get("tool_choice") {
        None | Some(Value::Null) => {
            object.remove("tool_choice");
            return Ok(request);
        }
        Some(Value::String(choice)) if ["auto", "none", "required"].contains(&choice.as_str()) => None,
        Some(Value::Object(choice)) => match choice.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => Some(name.to_owned()),
            None => return Err(field("tool_choice", "a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")),
        },
        Some(other) => return Err(field("tool_choice", format!("{other} is not auto, none, required or a function"))),
    };
    if tools.is_empty() && object["tool_choice"] != "none" {
        return Err(field("tool_choice", "is given without tools"));
    }
    if let Some(name) = named {
        let tool = tools
            .into_iter()
            .find(|t| t["function"]["name"] == name.as_str())
            .ok_or_else(|| field("tool_choice", format!("names the function {name:?}, which is not among the tools")))?;
        object.insert("tools".into(), Value::Array(vec![tool]));
        object.insert("tool_choice".into(), "required".into());
    }
    Ok(request)
}

/// Where a lazy grammar starts applying.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct GrammarTrigger {
    /// What `value` is.
    #[serde(rename = "type")]
    pub kind: TriggerKind,
    /// The word or pattern (for `Token`, the token's text).
    pub value: String,
    /// The token, for `Token` triggers.
    #[serde(deserialize_with = "trigger_token")]
    pub token: Option<Token>,
}

/// A trigger's token as the shim writes it: its id, or -1 (`LLAMA_TOKEN_NULL`) for none.
fn trigger_token<'de, D: serde::Deserializer<'de>>(ids: D) -> Result<Option<Token>, D::Error> {
    let id = i32::deserialize(ids)?;
    Ok((id >= 0).then_some(Token(id)))
}

/// How much of a reply [`ChatPrompt::parse`] is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyText {
    /// The whole reply: the generation has ended.
    Complete,
    /// The reply so far (streaming): it may end mid-way through a tool call or a tag.
    Partial,
}

/// The kinds of grammar triggers.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// One special token.
    Token,
    /// A literal text.
    Word,
    /// A regular expression found anywhere in the output.
    Pattern,
    /// A regular expression the whole output must match.
    PatternFull,
}

impl ChatPrompt {
    /// Whether the reply is the generic JSON format of ours (a template without tools given
    /// tools; see the module's documentation).
    pub fn is_generic(&self) -> bool {
        self.generic.is_some()
    }

    /// Parses text the model generated for this prompt into content, reasoning text and tool
    /// calls. With [`ReplyText::Partial`] the text may end mid-way (streaming): what is
    /// incomplete is held back rather than failed.
    pub fn parse(&self, text: &str, reply: ReplyText) -> Result<AssistantMessage, ChatTemplateError> {
        let partial = reply == ReplyText::Partial;
        if let Some(generic) = &self.generic {
            return Ok(generic.parse(text, partial));
        }
        let params = serde_json::json!({ "format": self.format, "parser": self.parser, "generation_prompt": self.generation_prompt });
        let params = c_text(&params.to_string(), "the parser state")?;
        let json = call_for_string(|out, err| {
            // SAFETY: params is NUL-terminated; text is valid for text.len() bytes; out and err
            // are valid for writes.
            unsafe { sys::exsa_chat_parse(params.as_ptr(), text.as_ptr().cast(), text.len(), partial, out, err) }
        })?;
        let wire: WireMessage = from_shim(&json)?;
        Ok(wire.into())
    }
}

/// A reply as the template's format reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssistantMessage {
    /// The text meant for the user.
    pub content: String,
    /// Reasoning text the format sets apart (empty when it has none or it is left inline).
    pub reasoning_content: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// One call of a tool. `arguments` is JSON text (complete once the reply is).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ToolCall {
    /// The call's id, when the model wrote one (the caller assigns ids otherwise).
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// What changed from one parse of a growing reply to the next: text to append, or a piece of
/// one tool call (its name and id first, then fragments of its arguments).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct MessageDelta {
    /// Content to append.
    pub content_delta: String,
    /// Reasoning text to append.
    pub reasoning_content_delta: String,
    /// Which tool call `tool_call` continues, if any.
    pub tool_call_index: Option<usize>,
    /// The new part of that call: its id and name when it starts, then argument fragments.
    pub tool_call: ToolCall,
}

impl AssistantMessage {
    /// The deltas from `previous` (an earlier parse of the same reply) to `self`.
    pub fn deltas_since(&self, previous: &AssistantMessage) -> Result<Vec<MessageDelta>, ChatTemplateError> {
        let previous = c_text(&serde_json::to_string(&WireMessage::from(previous)).expect("serializable"), "a message")?;
        let next = c_text(&serde_json::to_string(&WireMessage::from(self)).expect("serializable"), "a message")?;
        let json = call_for_string(|out, err| {
            // SAFETY: both messages are NUL-terminated; out and err are valid for writes.
            unsafe { sys::exsa_chat_diff(previous.as_ptr(), next.as_ptr(), out, err) }
        })?;
        from_shim(&json)
    }
}

// The chat layer's messages are OpenAI's.
#[derive(Deserialize, Serialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reasoning_content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize, Serialize)]
struct WireToolCall {
    #[serde(rename = "type", default = "function")]
    kind: String,
    #[serde(default)]
    id: String,
    function: WireFunction,
}

#[derive(Deserialize, Serialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

fn function() -> String {
    "function".into()
}

impl From<WireMessage> for AssistantMessage {
    fn from(w: WireMessage) -> AssistantMessage {
        AssistantMessage {
            content: w.content,
            reasoning_content: w.reasoning_content,
            tool_calls: w.tool_calls.into_iter().map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments }).collect(),
        }
    }
}

impl From<&AssistantMessage> for WireMessage {
    fn from(m: &AssistantMessage) -> WireMessage {
        WireMessage {
            role: "assistant".into(),
            content: m.content.clone(),
            reasoning_content: m.reasoning_content.clone(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| WireToolCall {
                    kind: function(),
                    id: c.id.clone(),
                    function: WireFunction { name: c.name.clone(), arguments: c.arguments.clone() },
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tools_without_a_name_or_with_bad_parameters_are_refused() {
        let bad = |tools: Value| checked_tools(json!({ "tools": tools }).as_object().unwrap()).map(<[Value]>::len);
        assert!(
            matches!(bad(json!([{ "type": "function", "function": {} }])), Err(ChatTemplateError::Field { field: "tools", reason }) if reason.contains("name"))
        );
        assert!(
            matches!(bad(json!([{ "type": "function", "function": { "name": "f", "parameters": 3 } }])), Err(ChatTemplateError::Field { field: "tools", reason }) if reason.contains("JSON schema"))
        );
        assert_eq!(
            bad(json!([json!({ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } })])).unwrap(),
            1
        );
    }
}
