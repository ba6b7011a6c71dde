//! Chat messages, the tools a chat offers, and what a reply parses into.
//!
//! `llama::ChatMessage` is the safe wrapper's; these are the engine's API over every backend
//! (the `crate` backend does not link `llama`). Tools, tool calls and template options need the
//! model's own Jinja template ([`crate::ChatTemplating::Jinja`], backend `source`); elsewhere they
//! are [`crate::EngineError::Unsupported`].

use serde_json::{Map, Value, json};

/// One chat message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    /// The message text.
    pub content: String,
    /// A content sent as a list of text parts (OpenAI's content parts), for templates that read
    /// them one by one; `content` then holds them joined by line breaks (llama.cpp's chat layer
    /// does the same for templates that read text). Empty for a content sent as text.
    pub content_parts: Vec<String>,
    /// An assistant message's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool message: the id of the call it answers.
    pub tool_call_id: Option<String>,
    /// A tool message: the tool's name (some templates print it).
    pub name: Option<String>,
    /// An assistant message's reasoning text (templates that keep it in the history print it).
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    /// An assistant message that calls tools.
    pub fn tool_calls(calls: impl Into<Vec<ToolCall>>) -> Self {
        ChatMessage { role: "assistant".into(), tool_calls: calls.into(), ..Default::default() }
    }

    /// A tool's result, answering the call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: "tool".into(), content: content.into(), tool_call_id: Some(call_id.into()), ..Default::default() }
    }

    /// Sets [`ChatMessage::role`].
    #[must_use]
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }

    /// Sets [`ChatMessage::content`].
    #[must_use]
    pub fn content(mut self, content: impl Into<String>) -> Self {
        self.content = content.into();
        self
    }

    /// Sets [`ChatMessage::content_parts`].
    #[must_use]
    pub fn content_parts(mut self, content_parts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.content_parts = content_parts.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`ChatMessage::tool_calls`].
    #[must_use]
    pub fn with_tool_calls(mut self, tool_calls: impl Into<Vec<ToolCall>>) -> Self {
        self.tool_calls = tool_calls.into();
        self
    }

    /// Sets [`ChatMessage::tool_call_id`].
    #[must_use]
    pub fn tool_call_id(mut self, tool_call_id: impl Into<String>) -> Self {
        self.tool_call_id = Some(tool_call_id.into());
        self
    }

    /// Sets [`ChatMessage::name`].
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets [`ChatMessage::reasoning_content`].
    #[must_use]
    pub fn reasoning_content(mut self, reasoning_content: impl Into<String>) -> Self {
        self.reasoning_content = Some(reasoning_content.into());
        self
    }

    /// Whether the message carries anything but a role and text.
    pub fn is_plain(&self) -> bool {
        self.tool_calls.is_empty() && self.tool_call_id.is_none() && self.name.is_none() && self.reasoning_content.is_none()
    }

    /// The message in OpenAI's shape, as chat templates read it.
    pub fn to_openai(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), json!(self.role));
        if self.content_parts.is_empty() {
            m.insert("content".into(), json!(self.content));
        } else {
            m.insert("content".into(), self.content_parts.iter().map(|text| json!({ "type": "text", "text": text })).collect());
        }
        if !self.tool_calls.is_empty() {
            m.insert("tool_calls".into(), Value::Array(self.tool_calls.iter().map(ToolCall::to_openai).collect()));
        }
        for (key, value) in [("tool_call_id", &self.tool_call_id), ("name", &self.name), ("reasoning_content", &self.reasoning_content)] {
            if let Some(value) = value {
                m.insert(key.into(), json!(value));
            }
        }
        Value::Object(m)
    }
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Tool {
    /// The function's name, as the model calls it.
    pub name: String,
    /// What the function does, for the model; None: no description.
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object); None: any object.
    pub parameters: Option<Value>,
}

impl Tool {
    /// A tool with a name and a JSON schema of its arguments.
    pub fn new(name: impl Into<String>, parameters: Value) -> Self {
        Tool { name: name.into(), description: None, parameters: Some(parameters) }
    }

    /// Sets [`Tool::name`].
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`Tool::description`].
    #[must_use]
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Sets [`Tool::parameters`].
    #[must_use]
    pub fn parameters(mut self, parameters: Value) -> Self {
        self.parameters = Some(parameters);
        self
    }

    /// The tool in OpenAI's shape.
    pub fn to_openai(&self) -> Value {
        let mut function = Map::new();
        function.insert("name".into(), json!(self.name));
        if let Some(d) = &self.description {
            function.insert("description".into(), json!(d));
        }
        if let Some(p) = &self.parameters {
            function.insert("parameters".into(), p.clone());
        }
        json!({ "type": "function", "function": function })
    }
}

/// A call of a tool, as the model made it: `arguments` is JSON text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id, which the tool message answering it names in `tool_call_id` (in a parsed
    /// reply: the model's own, or `call_N` where its format writes none).
    pub id: String,
    /// The called tool's name.
    pub name: String,
    /// The arguments, as JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// The call in OpenAI's shape.
    pub fn to_openai(&self) -> Value {
        json!({ "id": self.id, "type": "function", "function": { "name": self.name, "arguments": self.arguments } })
    }
}

/// Whether and which tool the model must call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// A call or text, as the model likes.
    #[default]
    Auto,
    /// Text only (the tools are still described to the model).
    None,
    /// A call of one of the tools.
    Required,
    /// A call of this tool.
    Function(String),
}

impl ToolChoice {
    /// The choice in OpenAI's shape.
    pub fn to_openai(&self) -> Value {
        match self {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Function(name) => json!({ "type": "function", "function": { "name": name } }),
        }
    }
}

/// How reasoning text ("thinking") in a reply is returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// Left in the content as the model wrote it.
    None,
    /// Split out into [`ChatReply::reasoning_content`] where the template's format has it
    /// (llama-server's default).
    #[default]
    Auto,
}

impl ReasoningFormat {
    /// llama.cpp's name of it.
    pub fn name(self) -> &'static str {
        match self {
            ReasoningFormat::None => "none",
            ReasoningFormat::Auto => "auto",
        }
    }
}

impl std::str::FromStr for ReasoningFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ReasoningFormat::None),
            "auto" => Ok(ReasoningFormat::Auto),
            other => Err(format!("{other:?} is not a reasoning format (none, auto)")),
        }
    }
}

/// What a chat asks of its template beyond the messages.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ChatOptions {
    /// Functions the model may call (default: none).
    pub tools: Vec<Tool>,
    /// Whether and which tool the model must call (default [`ToolChoice::Auto`]).
    pub tool_choice: ToolChoice,
    /// Whether a reply may call several tools; None: as the template can (llama-server's
    /// default; the generic format of templates without tools calls one).
    pub parallel_tool_calls: Option<bool>,
    /// How reasoning text in the reply is returned (default [`ReasoningFormat::Auto`]).
    pub reasoning_format: ReasoningFormat,
    /// Extra variables for the template (`enable_thinking`, ...).
    pub template_kwargs: Map<String, Value>,
    /// Whether the prompt ends by opening the assistant's turn (default true; false with a
    /// continuation).
    pub add_generation_prompt: bool,
    /// The last message, an assistant's, is a reply begun: the prompt ends inside it.
    pub continuation: Continuation,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            tools: Vec::new(),
            tool_choice: ToolChoice::default(),
            parallel_tool_calls: None,
            reasoning_format: ReasoningFormat::default(),
            template_kwargs: Map::new(),
            add_generation_prompt: true,
            continuation: Continuation::None,
        }
    }
}

/// Which part of a last assistant message a reply continues (llama.cpp's `continue_final_message`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Continuation {
    /// The prompt does not end inside a message.
    #[default]
    None,
    /// Where the message ends: its reasoning if it has no content, else its content.
    Auto,
    /// Its content.
    Content,
    /// Its reasoning text.
    Reasoning,
}

impl Continuation {
    /// `continue_final_message` as llama.cpp's chat layer reads it.
    fn to_openai(self) -> Option<Value> {
        match self {
            Continuation::None => None,
            Continuation::Auto => Some(json!(true)),
            Continuation::Content => Some(json!("content")),
            Continuation::Reasoning => Some(json!("reasoning_content")),
        }
    }
}

impl ChatOptions {
    /// Sets [`ChatOptions::tools`].
    #[must_use]
    pub fn tools(mut self, tools: impl Into<Vec<Tool>>) -> Self {
        self.tools = tools.into();
        self
    }

    /// Sets [`ChatOptions::tool_choice`].
    #[must_use]
    pub fn tool_choice(mut self, tool_choice: ToolChoice) -> Self {
        self.tool_choice = tool_choice;
        self
    }

    /// Sets [`ChatOptions::parallel_tool_calls`].
    #[must_use]
    pub fn parallel_tool_calls(mut self, parallel_tool_calls: bool) -> Self {
        self.parallel_tool_calls = Some(parallel_tool_calls);
        self
    }

    /// Sets [`ChatOptions::reasoning_format`].
    #[must_use]
    pub fn reasoning_format(mut self, reasoning_format: ReasoningFormat) -> Self {
        self.reasoning_format = reasoning_format;
        self
    }

    /// Sets [`ChatOptions::template_kwargs`].
    #[must_use]
    pub fn template_kwargs(mut self, template_kwargs: Map<String, Value>) -> Self {
        self.template_kwargs = template_kwargs;
        self
    }

    /// Sets [`ChatOptions::add_generation_prompt`].
    #[must_use]
    pub fn add_generation_prompt(mut self, add_generation_prompt: bool) -> Self {
        self.add_generation_prompt = add_generation_prompt;
        self
    }

    /// Sets [`ChatOptions::continuation`].
    #[must_use]
    pub fn continuation(mut self, continuation: Continuation) -> Self {
        self.continuation = continuation;
        self
    }

    /// Whether these are the defaults, which a built-in template can render too.
    pub fn is_plain(&self) -> bool {
        // Without tools, whether calls may be parallel changes nothing.
        self.tools.is_empty()
            && self.tool_choice == ToolChoice::Auto
            && self.template_kwargs.is_empty()
            && self.add_generation_prompt
            && self.continuation == Continuation::None
    }

    /// `messages` with these options as an OpenAI-shaped request, as llama.cpp's chat layer
    /// (`llama::chat_templates::ChatTemplates::apply`) renders it.
    pub fn request(&self, messages: &[ChatMessage]) -> Value {
        let mut request = json!({
            "messages": messages.iter().map(ChatMessage::to_openai).collect::<Vec<_>>(),
            "reasoning_format": self.reasoning_format.name(),
            "add_generation_prompt": self.add_generation_prompt,
        });
        if let Some(continuation) = self.continuation.to_openai() {
            request["continue_final_message"] = continuation;
        }
        if let Some(parallel) = self.parallel_tool_calls {
            request["parallel_tool_calls"] = json!(parallel);
        }
        if !self.tools.is_empty() {
            request["tools"] = Value::Array(self.tools.iter().map(Tool::to_openai).collect());
        }
        if self.tool_choice != ToolChoice::Auto || !self.tools.is_empty() {
            request["tool_choice"] = self.tool_choice.to_openai();
        }
        if !self.template_kwargs.is_empty() {
            request["chat_template_kwargs"] = Value::Object(self.template_kwargs.clone());
        }
        request
    }
}

/// A reply read by its chat format.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatReply {
    /// The text meant for the user.
    pub content: String,
    /// Reasoning text the format sets apart.
    pub reasoning_content: String,
    /// The tool calls the reply makes, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// A piece of a reply as it streams: text to append, or part of a tool call (its id and name
/// first, then fragments of its arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatDelta {
    /// Text to append to the reply's content.
    Content(String),
    /// Text to append to the reply's reasoning text.
    Reasoning(String),
    /// Part of a tool call.
    ToolCall {
        /// Which call (0, 1, ... in the reply's order).
        index: usize,
        /// Set on the call's first delta.
        id: Option<String>,
        /// Set on the call's first delta.
        name: Option<String>,
        /// The next fragment of the call's arguments (JSON text).
        arguments: String,
    },
}
