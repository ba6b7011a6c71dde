//! The OpenAI-style request and response bodies, and their mapping onto engine requests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::ServerConfig;
use super::error::ApiError;
use crate::chat::{ChatDelta, ChatMessage, ChatOptions, ChatReply, Continuation, ReasoningFormat, Tool, ToolCall, ToolChoice};
use crate::config::{GenerateOptions, GenerateRequest, Prompt as EnginePrompt, SamplingParams, Speculation};
use crate::outcome::{FinishReason, GenerationStats};
use crate::token::{Token, TokenLogprobs};

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: text, or a list of parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant message's tool calls.
    #[serde(default)]
    pub tool_calls: Vec<MessageToolCall>,
    /// A tool message: the call it answers.
    pub tool_call_id: Option<String>,
    /// A tool message: the tool's name.
    pub name: Option<String>,
    /// An assistant message's reasoning text (llama-server's extension).
    pub reasoning_content: Option<String>,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub struct MessageToolCall {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as OpenAI sends it (an object is accepted too).
    #[serde(default)]
    pub arguments: Value,
}

/// A tool of `tools`.
#[derive(Debug, Deserialize)]
pub struct ToolField {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Option<FunctionField>,
}

/// A function tool. OpenAI's `strict` (arguments always fit the schema) is what every call gets
/// here: once a call starts, the format's grammar holds its arguments to the schema.
#[derive(Debug, Deserialize)]
pub struct FunctionField {
    pub name: Option<String>,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format`: `{"type": "text" | "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
    /// llama-server's extension: `{"type": "json_object", "schema": {...}}` constrains the object.
    pub schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub schema: Option<Value>,
}

/// The sampling and length fields chat and completion requests share. Fields a client sends
/// that this server does not know are ignored, as OpenAI's own API does with new clients;
/// known fields of the wrong type are a 400.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string key) → bias in [-100, 100].
    pub logit_bias: Option<Map<String, Value>>,
    pub response_format: Option<ResponseFormat>,
    /// A GBNF grammar (rule `root`), as llama-server takes it; not with `response_format`.
    pub grammar: Option<String>,
    /// llama-server's extension: a JSON schema the reply must fit (as `response_format`'s).
    pub json_schema: Option<Value>,
    /// Chat: a boolean; text completions: the number of candidates (the legacy API).
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    /// exsa's extension: speculative decoding by prompt lookup, `{"type": "ngram", "max_draft":
    /// 8}` or `{"type": "off"}`; unset, the server's `--speculative` setting applies.
    pub speculative: Option<SpeculativeField>,
    /// llama-server's extension: a stream reports the prompt's progress while it decodes
    /// (`prompt_progress` chunks).
    #[serde(default)]
    pub return_progress: bool,
    /// llama-server's extension: every streamed chunk carries `timings` (so far).
    #[serde(default)]
    pub timings_per_token: bool,
    /// llama-server's extension: the response also carries `__verbose`, the native response
    /// with the prompt as decoded (default: the server's `--verbose`).
    pub verbose: Option<bool>,
    /// llama-server's extension: end-of-generation tokens are never drawn (the reply ends at
    /// `max_tokens`, a stop sequence or a full context).
    pub ignore_eos: Option<bool>,
    /// llama-server's extension: the slot to run in (-1: any), e.g. one whose cache a slot
    /// action restored.
    pub id_slot: Option<i64>,
    /// llama-server's extension: the scales of the server's LoRA adapters for this request,
    /// `[{"id": 0, "scale": 0.5}]`; adapters not listed are off. Unset or empty: the scales
    /// `POST /lora-adapters` set (at start, `--lora`'s).
    pub lora: Option<Vec<LoraField>>,
}

/// An entry of `lora` (other keys, such as the `path` `GET /lora-adapters` lists, are ignored:
/// clients send that list back).
#[derive(Debug, Deserialize)]
pub struct LoraField {
    pub id: usize,
    pub scale: f32,
}

/// The most adapters a request or `POST /lora-adapters` can name (ids 0 to this less one).
pub const MAX_LORA_ID: usize = 256;

/// `lora` entries as one scale per adapter id, from 0 to the highest id listed; ids not listed
/// are 0 (off). Whether the model has that many adapters is checked when the model is known
/// ([`super::handlers`]: a longer list is a 400 naming `lora`). An empty list is None, as
/// llama-server reads it: the server's scales.
pub fn lora_scales(entries: &[LoraField]) -> Result<Option<Vec<f32>>, ApiError> {
    let Some(last) = entries.iter().map(|e| e.id).max() else { return Ok(None) };
    if last >= MAX_LORA_ID {
        return Err(ApiError::invalid("lora", format!("adapter id {last} is not loaded")));
    }
    let mut scales = vec![0.0; last + 1];
    for entry in entries {
        if !entry.scale.is_finite() {
            return Err(ApiError::invalid("lora", format!("the scale of adapter {} is not a finite number", entry.id)));
        }
        scales[entry.id] = entry.scale;
    }
    Ok(Some(scales))
}

/// The `speculative` field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeField {
    #[serde(rename = "type")]
    pub kind: String,
    pub max_draft: Option<u32>,
}

impl SpeculativeField {
    /// The speculation it asks for (drafts default to 8).
    pub fn speculation(&self) -> Result<Speculation, ApiError> {
        match self.kind.as_str() {
            "off" => Ok(Speculation::Off),
            "ngram" => Ok(Speculation::Ngram { max_draft: self.max_draft.unwrap_or(8) }),
            other => Err(ApiError::invalid("speculative", format!("type {other:?} is not ngram or off (a draft model is not served)"))),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Option<Vec<ToolField>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Extra variables for the chat template (llama-server's extension).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// `none` or `auto` (llama-server's extension; default: the server's --reasoning-format).
    pub reasoning_format: Option<String>,
    /// `none` turns thinking off; other values go to the template as `reasoning_effort`.
    pub reasoning_effort: Option<String>,
    /// Whether the prompt opens the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// `true`, `"content"` or `"reasoning_content"`: the last message, an assistant's, is a reply
    /// to continue (llama-server continues one unasked, as here).
    pub continue_final_message: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every field not named above: see [`fields::check`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A text, token ids, or a list of either (a choice each, as OpenAI answers them).
    pub prompt: Value,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every field not named above: see [`fields::check`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Ollama's embedding `input`: one text or a list of texts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl CompletionRequest {
    /// The engine request for the first prompt (text, control-token text left as text), and
    /// the other prompts of a list (a choice each).
    pub fn to_request(&self, server: &ServerConfig) -> Result<(GenerateRequest, Vec<EnginePrompt>), ApiError> {
        super::fields::check(&self.other, super::fields::Endpoint::Completions)?;
        let options = self.sampling.to_options(server)?;
        let mut listed = prompts(&self.prompt, "prompt", completion_prompt)?.into_iter();
        let first = listed.next().ok_or_else(|| ApiError::invalid("prompt", "the list is empty"))?;
        Ok((GenerateRequest { prompt: first, options }, listed.collect()))
    }
}

/// The prompts of a request's `field`, each read by `one`: one prompt (text, token ids, or a
/// list mixing both), or a list of such, as llama-server tells them apart.
pub(super) fn prompts<T>(prompt: &Value, field: &'static str, one: impl Fn(&Value) -> Result<T, ApiError>) -> Result<Vec<T>, ApiError> {
    match listed_prompts(prompt) {
        Some([]) => Err(ApiError::invalid(field, "the list is empty")),
        Some(items) => items.iter().map(one).collect(),
        None => Ok(vec![one(prompt)?]),
    }
}

/// The prompts of a list of prompts (a list without a token id at its top), as llama-server
/// tells it from one prompt; None for one prompt.
pub(super) fn listed_prompts(prompt: &Value) -> Option<&[Value]> {
    match prompt {
        Value::Array(items) if !items.iter().any(Value::is_number) => Some(items),
        _ => None,
    }
}

/// One prompt of OpenAI's `prompt`: a text, or token ids (checked against the vocabulary when
/// the model is known). Text and ids mixed in one prompt is llama-server's `/completion`'s.
fn completion_prompt(prompt: &Value) -> Result<EnginePrompt, ApiError> {
    match prompt {
        Value::String(text) => Ok(EnginePrompt::text(text.clone())),
        Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_number) => ids
            .iter()
            .map(|id| {
                id.as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .map(Token)
                    .ok_or_else(|| ApiError::invalid("prompt", format!("{id} is not a token id")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(EnginePrompt::Tokens),
        _ => Err(ApiError::invalid("prompt", "must be a text, token ids, or a list of either (text and ids mixed in one prompt: /completion)")),
    }
}

impl Sampling {
    /// The generation options these fields ask for, or a 400 naming the field that cannot be
    /// met. Unset fields take the server's defaults (`server.sampling`, `server.max_tokens`, as
    /// llama-server's command line sets them); `max_tokens` is at most the rest of the context
    /// anyway. The server's speculation applies unless the request sets `speculative`. No cancel
    /// token: the request's event stream cancels it when the client goes.
    pub fn to_options(&self, server: &ServerConfig) -> Result<GenerateOptions, ApiError> {
        self.choices()?;
        let defaults = &server.sampling;
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            logit_bias: self.logit_bias()?,
            grammar: self.grammar()?,
            grammar_start: Default::default(),
            // OpenAI's seed is 64-bit; llama.cpp's samplers take 32.
            seed: self.seed.map_or(defaults.seed, |s| s as u32),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.iter().any(String::is_empty) || stop.len() > 16 {
            return Err(ApiError::invalid("stop", "up to 16 non-empty stop sequences"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).map(|n| n as usize).or(server.max_tokens).unwrap_or(usize::MAX);
        let speculation = match &self.speculative {
            Some(field) => field.speculation()?,
            None => server.speculation,
        };
        let options = GenerateOptions {
            max_tokens,
            stop,
            sampling,
            cancel: None,
            speculation,
            logprobs: self.logprobs()?,
            // llama-server's native field (`super::native`); OpenAI's logprobs are the model's.
            post_sampling: false,
            preserved_tokens: Vec::new(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            // Only a stream can show it.
            prompt_progress: self.return_progress && self.stream,
            slot: match self.id_slot {
                None | Some(-1) => None,
                Some(n) => Some(usize::try_from(n).map_err(|_| ApiError::invalid("id_slot", format!("{n} is not a slot number (or -1 for any)")))?),
            },
            lora_scales: lora_scales(self.lora.as_deref().unwrap_or_default())?,
        };
        options.validate()?;
        Ok(options)
    }

    /// `logit_bias` as token ids and biases (token range checked against the model later).
    fn logit_bias(&self) -> Result<Vec<(Token, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else { return Ok(Vec::new()) };
        if map.len() > 1024 {
            return Err(ApiError::invalid("logit_bias", "at most 1024 tokens"));
        }
        map.iter()
            .map(|(token, bias)| {
                let token = token.parse::<i32>().map_err(|_| ApiError::invalid("logit_bias", format!("key {token:?} is not a token id")))?;
                let bias = bias.as_f64().ok_or_else(|| ApiError::invalid("logit_bias", format!("the bias of token {token} is not a number")))?;
                Ok((Token(token), bias as f32))
            })
            .collect()
    }

    /// The grammar `response_format`, `json_schema` or `grammar` asks for (one of them).
    fn grammar(&self) -> Result<Option<String>, ApiError> {
        let format = self.response_format.as_ref().filter(|f| f.kind != "text");
        let given = [format.is_some(), self.json_schema.is_some(), self.grammar.is_some()];
        if given.iter().filter(|&&g| g).count() > 1 {
            return Err(ApiError::invalid("grammar", "give one of grammar, json_schema and response_format"));
        }
        if let Some(schema) = &self.json_schema {
            return schema_grammar("json_schema", schema).map(Some);
        }
        let Some(format) = format else { return Ok(self.grammar.clone()) };
        match (format.kind.as_str(), &format.schema) {
            ("json_object", None) => Ok(Some(crate::json_grammar::json_object_grammar())),
            ("json_object", Some(schema)) => schema_grammar("response_format", schema).map(Some),
            ("json_schema", _) => {
                let schema = format
                    .json_schema
                    .as_ref()
                    .and_then(|s| s.schema.as_ref())
                    .ok_or_else(|| ApiError::invalid("response_format", "json_schema needs {\"json_schema\": {\"schema\": {...}}}"))?;
                schema_grammar("response_format", schema).map(Some)
            }
            (other, _) => Err(ApiError::invalid("response_format", format!("type {other:?} is not text, json_object or json_schema"))),
        }
    }

    /// How many candidates per token the response lists with log-probabilities, if any.
    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let n = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => self.top_logprobs.unwrap_or(0) as usize,
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| ApiError::invalid("logprobs", "must be a count from 0 to 20"))? as usize,
            Some(_) => return Err(ApiError::invalid("logprobs", "must be a boolean (chat) or a count (completions)")),
        };
        if n > 20 {
            return Err(ApiError::invalid("top_logprobs", "at most 20"));
        }
        Ok(Some(n))
    }

    /// How many choices the request asks for (`n`, default 1): at most 16.
    pub fn choices(&self) -> Result<usize, ApiError> {
        match self.n {
            None | Some(1) => Ok(1),
            Some(0) => Err(ApiError::invalid("n", "must be at least 1")),
            Some(n) if n > 16 => Err(ApiError::invalid("n", "at most 16")),
            Some(n) => Ok(n as usize),
        }
    }

    /// Whether the response echoes `__verbose`.
    pub fn verbose(&self, server: &ServerConfig) -> bool {
        self.verbose.unwrap_or(server.verbose)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// The grammar of a JSON schema a request gives in `field`.
fn schema_grammar(field: &'static str, schema: &Value) -> Result<String, ApiError> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(ApiError::invalid(field, "the schema must be a JSON object"));
    }
    crate::json_grammar::json_schema_grammar(schema).map_err(|e| ApiError::invalid(field, e))
}

impl ChatRequest {
    /// The engine request: the messages as a chat prompt with its tools and template options,
    /// and the options, with the server's defaults for what the request leaves out.
    pub fn to_request(&self, server: &ServerConfig) -> Result<GenerateRequest, ApiError> {
        let (messages, chat) = self.chat(server.reasoning_format)?;
        let options = self.sampling.to_options(server)?;
        Ok(GenerateRequest { prompt: EnginePrompt::chat_with(messages, chat), options })
    }

    /// The messages and what the chat asks of its template; every field checked.
    pub fn chat(&self, reasoning: ReasoningFormat) -> Result<(Vec<ChatMessage>, ChatOptions), ApiError> {
        super::fields::check(&self.other, super::fields::Endpoint::Chat)?;
        Ok((self.messages()?, self.chat_options(reasoning)?))
    }

    /// Tools, tool choice and template options as the engine takes them.
    pub fn chat_options(&self, reasoning: ReasoningFormat) -> Result<ChatOptions, ApiError> {
        let tools = self.tools.as_deref().unwrap_or_default().iter().enumerate().map(|(i, t)| t.to_tool(i)).collect::<Result<Vec<_>, _>>()?;
        let tool_choice = match &self.tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(Value::Object(o)) if o.get("type").is_none_or(|t| t == "function") => {
                match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                    Some(name) => ToolChoice::Function(name.to_owned()),
                    None => {
                        return Err(ApiError::invalid("tool_choice", "a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}"));
                    }
                }
            }
            Some(other) => return Err(ApiError::invalid("tool_choice", format!("{other} is not auto, none, required or a function"))),
        };
        if tools.is_empty() && !matches!(tool_choice, ToolChoice::Auto | ToolChoice::None) {
            return Err(ApiError::invalid("tool_choice", "is given without tools"));
        }
        if let ToolChoice::Function(name) = &tool_choice
            && !tools.iter().any(|t| &t.name == name)
        {
            return Err(ApiError::invalid("tool_choice", format!("names the function {name:?}, which is not among the tools")));
        }
        if !tools.is_empty() && tool_choice != ToolChoice::None && self.sampling.grammar.is_some() {
            return Err(ApiError::invalid("grammar", "cannot be combined with tools"));
        }
        let reasoning_format = match &self.reasoning_format {
            None => reasoning,
            Some(name) => name.parse().map_err(|e: String| ApiError::invalid("reasoning_format", e))?,
        };
        let mut template_kwargs = self.chat_template_kwargs.clone().unwrap_or_default();
        match self.reasoning_effort.as_deref() {
            None => {}
            Some("none") => {
                template_kwargs.insert("enable_thinking".into(), Value::Bool(false));
            }
            Some(effort) => {
                template_kwargs.insert("reasoning_effort".into(), Value::String(effort.to_owned()));
            }
        }
        let (add_generation_prompt, continuation) = self.continuation()?;
        Ok(ChatOptions {
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            reasoning_format,
            template_kwargs,
            add_generation_prompt,
            continuation,
        })
    }

    /// Whether the prompt opens the assistant's turn, and which reply it continues: a last
    /// assistant message is continued unless the request says otherwise, as llama-server does.
    fn continuation(&self) -> Result<(bool, Continuation), ApiError> {
        let asked = match &self.continue_final_message {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(Continuation::Auto),
            Some(Value::String(s)) if s == "content" => Some(Continuation::Content),
            Some(Value::String(s)) if s == "reasoning_content" => Some(Continuation::Reasoning),
            Some(other) => {
                return Err(ApiError::invalid("continue_final_message", format!("{other} is not true, \"content\" or \"reasoning_content\"")));
            }
        };
        let last = self.messages.last();
        let ends_with_reply = last.is_some_and(|m| m.role == "assistant");
        let (add_generation_prompt, continuation) = match asked {
            Some(_) if self.add_generation_prompt == Some(true) => {
                return Err(ApiError::invalid("continue_final_message", "cannot be set with add_generation_prompt: true"));
            }
            Some(c) => (false, c),
            None if ends_with_reply && self.continue_final_message.is_none() => (false, Continuation::Auto),
            None => (self.add_generation_prompt.unwrap_or(true), Continuation::None),
        };
        if continuation != Continuation::None {
            match last {
                Some(m) if m.role == "assistant" && m.tool_calls.is_empty() => {}
                Some(m) if m.role == "assistant" => {
                    return Err(ApiError::invalid("continue_final_message", "cannot continue an assistant message that calls tools"));
                }
                _ => return Err(ApiError::invalid("continue_final_message", "the last message is not an assistant's")),
            }
        }
        Ok((add_generation_prompt, continuation))
    }

    fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "at least one message is needed"));
        }
        // A last assistant message is a reply begun; two cannot both be.
        if let [.., a, b] = self.messages.as_slice()
            && a.role == "assistant"
            && b.role == "assistant"
        {
            return Err(ApiError::invalid("messages", "the list ends with two assistant messages; only the last may be a reply to continue"));
        }
        self.messages
            .iter()
            .map(|m| {
                let (content, parts) = match &m.content {
                    None => (String::new(), Vec::new()),
                    Some(Content::Text(t)) => (t.clone(), Vec::new()),
                    Some(Content::Parts(parts)) => {
                        let mut texts = Vec::with_capacity(parts.len());
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => texts.push(t.clone()),
                                (kind, _) => return Err(ApiError::invalid("messages", format!("content parts of type {kind:?} are not supported"))),
                            }
                        }
                        (texts.join("\n"), texts)
                    }
                };
                Ok((m, content, parts))
            })
            .enumerate()
            .map(|(i, m)| {
                let (m, content, parts) = m?;
                let mut message = m.to_message(content).map_err(|reason| ApiError::invalid("messages", format!("messages[{i}]: {reason}")))?;
                message.content_parts = parts;
                Ok(message)
            })
            .collect()
    }
}

impl Message {
    /// The engine's message, with `content` already read; the reason it is malformed otherwise.
    fn to_message(&self, content: String) -> Result<ChatMessage, String> {
        if !["system", "developer", "user", "assistant", "tool"].contains(&self.role.as_str()) {
            return Err(format!("role {:?} is not system, developer, user, assistant or tool", self.role));
        }
        if self.role == "tool" && self.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err("a tool message needs tool_call_id".into());
        }
        if !self.tool_calls.is_empty() && self.role != "assistant" {
            return Err("only assistant messages carry tool_calls".into());
        }
        let tool_calls = self
            .tool_calls
            .iter()
            .map(|c| {
                if c.kind.as_deref().is_some_and(|k| k != "function") {
                    return Err("a tool call's type must be function".to_string());
                }
                let arguments = match &c.function.arguments {
                    Value::String(text) => text.clone(),
                    Value::Null => "{}".into(),
                    other => other.to_string(),
                };
                Ok(ToolCall { id: c.id.clone(), name: c.function.name.clone(), arguments })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChatMessage {
            role: self.role.clone(),
            content,
            content_parts: Vec::new(),
            tool_calls,
            tool_call_id: self.tool_call_id.clone(),
            name: self.name.clone(),
            reasoning_content: self.reasoning_content.clone(),
        })
    }
}

impl ToolField {
    /// The engine's tool; `tools[i]` named in the error otherwise.
    fn to_tool(&self, i: usize) -> Result<Tool, ApiError> {
        let bad = |reason: &str| ApiError::invalid("tools", format!("tools[{i}]: {reason}"));
        if self.kind != "function" {
            return Err(bad("only tools of type function exist"));
        }
        let function = self.function.as_ref().ok_or_else(|| bad("a function tool needs \"function\""))?;
        let name = function.name.as_deref().filter(|n| !n.is_empty()).ok_or_else(|| bad("a function needs a name"))?;
        match &function.parameters {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(bad("parameters must be a JSON schema (an object)")),
        }
        Ok(Tool {
            name: name.to_owned(),
            description: function.description.clone(),
            parameters: function.parameters.clone().filter(|p| !p.is_null()),
        })
    }
}

/// OpenAI's finish reasons: a reply that ended on its own after calling tools ended for
/// `tool_calls`.
pub fn finish_reason(reason: FinishReason, called_tools: bool) -> &'static str {
    match reason {
        FinishReason::EndOfText | FinishReason::StopSequence if called_tools => "tool_calls",
        FinishReason::EndOfText | FinishReason::StopSequence => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

pub fn usage(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": stats.prompt_tokens_reused },
    })
}

/// llama-server's `timings`: prompt tokens decoded (those reused from the cache apart) and
/// generated, with their times and rates.
pub fn timings(stats: &GenerationStats) -> Value {
    let prompt_n = stats.prompt_tokens - stats.prompt_tokens_reused;
    let per = |ms: f64, n: usize| if n > 0 { (ms / n as f64, 1000.0 * n as f64 / ms.max(f64::MIN_POSITIVE)) } else { (0.0, 0.0) };
    let (prompt_per_token_ms, prompt_per_second) = per(stats.prompt_ms, prompt_n);
    let (predicted_per_token_ms, predicted_per_second) = per(stats.generation_ms, stats.completion_tokens);
    json!({
        "cache_n": stats.prompt_tokens_reused,
        "prompt_n": prompt_n,
        "prompt_ms": stats.prompt_ms,
        "prompt_per_token_ms": prompt_per_token_ms,
        "prompt_per_second": prompt_per_second,
        "predicted_n": stats.completion_tokens,
        "predicted_ms": stats.generation_ms,
        "predicted_per_token_ms": predicted_per_token_ms,
        "predicted_per_second": predicted_per_second,
    })
}

/// Who a response is: its id, creation time and model, the same in every chunk of a stream.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The build that answered (OpenAI's `system_fingerprint`).
    pub fingerprint: String,
}

/// What kind of request a response answers: the two differ in object names and in where the
/// text goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
    /// llama-server's native `/completion` (its bodies are [`super::native::Shape`]'s).
    Native,
    /// OpenAI's Responses API: a chat (its bodies are [`super::responses`]').
    Responses,
    /// Anthropic's Messages API: a chat (its bodies are [`super::anthropic`]'s).
    Messages,
}

impl Kind {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Responses => "resp",
            Kind::Messages => "msg",
            Kind::Completion | Kind::Native => "cmpl",
        }
    }

    /// A whole response; `logprobs` is already in this kind's shape (or null). A chat read by
    /// its format answers with `reply` (content, reasoning, tool calls) rather than `text`.
    pub fn response(self, meta: &Meta, text: &str, reply: Option<&ChatReply>, finish: &str, stats: &GenerationStats, logprobs: Value) -> Value {
        let Meta { id, created, model, fingerprint } = meta;
        match self {
            Kind::Chat | Kind::Responses | Kind::Messages => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": fingerprint,
                "choices": [{ "index": 0, "message": message(text, reply), "finish_reason": finish, "logprobs": logprobs }],
                "usage": usage(stats), "timings": timings(stats),
            }),
            Kind::Completion | Kind::Native => json!({
                "id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": fingerprint,
                "choices": [{ "index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs }],
                "usage": usage(stats), "timings": timings(stats),
            }),
        }
    }

    /// Log-probabilities in this kind's shape: chat's `content` list, or the legacy parallel
    /// lists of text completions. `text` gives a token's text.
    pub fn logprobs(self, entries: &[TokenLogprobs], text: impl Fn(Token) -> Vec<u8>) -> Value {
        let piece = |t: Token| String::from_utf8_lossy(&text(t)).into_owned();
        match self {
            Kind::Chat | Kind::Responses | Kind::Messages => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        // `id` as llama-server lists it: a token's text does not always name it
                        // (several tokens can have the same bytes).
                        let top: Vec<Value> =
                            e.top.iter().map(|&(t, lp)| json!({ "id": t, "token": piece(t), "logprob": lp, "bytes": text(t) })).collect();
                        json!({ "id": e.token, "token": piece(e.token), "logprob": e.logprob, "bytes": text(e.token), "top_logprobs": top })
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion | Kind::Native => {
                let tokens: Vec<String> = entries.iter().map(|e| piece(e.token)).collect();
                let logprobs: Vec<f32> = entries.iter().map(|e| e.logprob).collect();
                let top: Vec<Value> = entries.iter().map(|e| Value::Object(e.top.iter().map(|&(t, lp)| (piece(t), json!(lp))).collect())).collect();
                json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top })
            }
        }
    }

    /// One streamed chunk: `text` as the delta, or the role opening (chat), or the end.
    pub fn chunk(self, meta: &Meta, delta: Delta<'_>) -> Value {
        let Meta { id, created, model, fingerprint } = meta;
        let (delta_value, finish): (Value, Value) = match delta {
            // No text yet: null, as OpenAI's first chunk (clients append every non-null content).
            Delta::Role => (json!({ "role": "assistant", "content": null }), Value::Null),
            Delta::Text(t) => (json!({ "content": t }), Value::Null),
            Delta::Chat(ChatDelta::Content(t)) => (json!({ "content": t }), Value::Null),
            Delta::Chat(ChatDelta::Reasoning(t)) => (json!({ "reasoning_content": t }), Value::Null),
            // As OpenAI streams a call: index, id, type and name first, then argument fragments.
            Delta::Chat(ChatDelta::ToolCall { index, id, name, arguments }) => {
                let mut call = json!({ "index": index, "function": { "arguments": arguments } });
                if let Some(id) = id {
                    call["id"] = json!(id);
                    call["type"] = json!("function");
                }
                if let Some(name) = name {
                    call["function"]["name"] = json!(name);
                }
                (json!({ "tool_calls": [call] }), Value::Null)
            }
            Delta::End(reason) => (json!({}), json!(reason)),
        };
        match self {
            Kind::Chat | Kind::Responses | Kind::Messages => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": fingerprint,
                "choices": [{ "index": 0, "delta": delta_value, "finish_reason": finish }],
            }),
            Kind::Completion | Kind::Native => json!({
                "id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": fingerprint,
                "choices": [{ "index": 0, "text": delta_value.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null }],
            }),
        }
    }

    /// The last chunk before `[DONE]` with `stream_options.include_usage`.
    pub fn usage_chunk(self, meta: &Meta, stats: &GenerationStats) -> Value {
        let Meta { id, created, model, fingerprint } = meta;
        let object = if self == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({ "id": id, "object": object, "created": created, "model": model, "system_fingerprint": fingerprint, "choices": [], "usage": usage(stats), "timings": timings(stats) })
    }
}

/// What a streamed chunk carries.
#[derive(Clone, Copy, Debug)]
pub enum Delta<'a> {
    Role,
    Text(&'a str),
    /// A piece of a chat reply read by its format.
    Chat(&'a ChatDelta),
    End(&'static str),
}

/// A whole chat response's message: the text as it is, or as its format read it (`content` is
/// null when the reply only calls tools, as OpenAI's is).
fn message(text: &str, reply: Option<&ChatReply>) -> Value {
    let Some(reply) = reply else { return json!({ "role": "assistant", "content": text }) };
    let content = if reply.content.is_empty() && !reply.tool_calls.is_empty() { Value::Null } else { json!(reply.content) };
    let mut message = json!({ "role": "assistant", "content": content });
    if !reply.reasoning_content.is_empty() {
        message["reasoning_content"] = json!(reply.reasoning_content);
    }
    if !reply.tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(reply.tool_calls.iter().map(ToolCall::to_openai).collect());
    }
    message
}

/// `GET /v1/models`'s entry.
#[derive(Debug, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Whether the model is loaded now (an extension: a model listed but not loaded loads
    /// on its first request).
    pub loaded: bool,
    /// llama-server's: the other names requests may use, and the model's labels.
    pub aliases: Vec<String>,
    pub tags: Vec<String>,
}

impl Prompt {
    /// Every text of an embeddings request (at most `max`).
    pub fn texts(self, max: usize) -> Result<Vec<String>, ApiError> {
        let texts = match self {
            Prompt::One(t) => vec![t],
            Prompt::Many(v) => v,
        };
        if texts.is_empty() || texts.len() > max {
            return Err(ApiError::invalid("input", format!("1 to {max} texts")));
        }
        Ok(texts)
    }
}

/// `POST /tokenize` (llama-server's shape).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    /// List each token as `{"id", "piece"}` (the piece as text, or its bytes where they are not
    /// UTF-8 on their own).
    #[serde(default)]
    pub with_pieces: bool,
    pub content: String,
    /// Which model's tokenizer (default: as for completions).
    pub model: Option<String>,
    /// Add BOS where the model wants one (default false, as llama-server).
    pub add_special: Option<bool>,
    /// Turn control-token text into control tokens (default true, as llama-server).
    pub parse_special: Option<bool>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
    pub model: Option<String>,
}

/// Standard base64 of `bytes`, as OpenAI encodes embeddings.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (input, want) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    /// The library's `SamplingParams::json_schema` and the server's `json_schema` and
    /// `response_format` give one grammar for one schema, and refuse the same schemas.
    #[test]
    fn a_schema_gives_the_library_the_grammar_it_gives_the_server() {
        let schema = json!({ "type": "object", "properties": { "tags": { "type": "array", "items": { "enum": ["a", "b"] } } } });
        let library = SamplingParams::default().json_schema(&schema).unwrap().grammar;
        for body in [
            json!({ "json_schema": schema }),
            json!({ "response_format": { "type": "json_schema", "json_schema": { "schema": schema } } }),
            json!({ "response_format": { "type": "json_object", "schema": schema } }),
        ] {
            let sampling: Sampling = serde_json::from_value(body.clone()).unwrap();
            assert_eq!(sampling.grammar().unwrap(), library, "{body}");
        }
        let bad = json!({ "type": "integer", "minimum": 0 });
        let server = serde_json::from_value::<Sampling>(json!({ "json_schema": bad })).unwrap().grammar().unwrap_err();
        let library = SamplingParams::default().json_schema(&bad).unwrap_err();
        assert!(matches!(&library, crate::EngineError::JsonSchema(e) if e.path == "#" && e.reason.contains("minimum")), "{library}");
        // One message, whichever way the schema came.
        assert_eq!(server.message, library.to_string());
        assert_eq!(server.message, ApiError::from(library).message);
    }
}
