//! Anthropic's Messages API (`POST /v1/messages`, and `/v1/messages/count_tokens`), as
//! llama-server serves it: a request is read as the chat it describes (system prompt, text,
//! `tool_use` and `tool_result` blocks, earlier `thinking`) and generated through the chat path;
//! the reply comes back as content blocks (thinking, text, tool uses), whole or as the API's
//! stream of typed events.

use axum::response::sse::Event as SseEvent;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::openai::ChatRequest;
use crate::chat::{ChatDelta, ChatReply};
use crate::outcome::{FinishReason, GenerationStats};

/// The request fields this module reads; the rest (sampling, `stream`, ...) are the chat's.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub messages: Option<Value>,
    /// Text, or a list of text blocks.
    pub system: Option<Value>,
    pub max_tokens: Option<u32>,
    pub stop_sequences: Option<Value>,
    /// `[{"name", "description", "input_schema"}]`.
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"}`.
    pub tool_choice: Option<Value>,
    /// `{"type": "enabled" | "disabled"}`.
    pub thinking: Option<Value>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl MessagesRequest {
    /// The chat request this asks for (every field it does not map checked there).
    pub fn into_chat(self) -> Result<ChatRequest, ApiError> {
        let mut messages = Vec::new();
        match self.system {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => messages.push(json!({ "role": "system", "content": text })),
            Some(Value::Array(blocks)) => {
                let text: String = blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
                messages.push(json!({ "role": "system", "content": text }));
            }
            Some(_) => return Err(ApiError::invalid("system", "must be text or a list of text blocks")),
        }
        let Some(Value::Array(input)) = self.messages else {
            return Err(ApiError::invalid("messages", "is required: a list of messages"));
        };
        if input.is_empty() {
            return Err(ApiError::invalid("messages", "at least one message is needed"));
        }
        for (i, message) in input.into_iter().enumerate() {
            convert_message(message, &mut messages).map_err(|reason| ApiError::invalid("messages", format!("messages[{i}]: {reason}")))?;
        }
        if self.rest.get("n").is_some_and(|n| !n.is_null() && n != 1) {
            return Err(ApiError::invalid("n", "the Messages API answers with one reply"));
        }
        let mut chat = self.rest;
        chat.insert("messages".into(), Value::Array(messages));
        // Required by Anthropic; llama-server's default where a client leaves it out.
        chat.insert("max_tokens".into(), json!(self.max_tokens.unwrap_or(4096)));
        if let Some(stop) = self.stop_sequences {
            chat.insert("stop".into(), stop);
        }
        if let Some(tools) = self.tools {
            let tools: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({ "type": "function", "function": {
                        "name": t.get("name").cloned().unwrap_or(Value::Null),
                        "description": t.get("description").cloned().unwrap_or(json!("")),
                        "parameters": t.get("input_schema").cloned().unwrap_or(json!({})),
                    } })
                })
                .collect();
            chat.insert("tools".into(), Value::Array(tools));
        }
        match self.tool_choice {
            None | Some(Value::Null) => {}
            Some(choice) => {
                let choice = match (choice["type"].as_str(), choice["name"].as_str()) {
                    (Some("auto"), _) => json!("auto"),
                    (Some("none"), _) => json!("none"),
                    (Some("any"), _) => json!("required"),
                    (Some("tool"), Some(name)) => json!({ "type": "function", "function": { "name": name } }),
                    _ => return Err(ApiError::invalid("tool_choice", format!("{choice} is not auto, any, none or a named tool"))),
                };
                chat.insert("tool_choice".into(), choice);
            }
        }
        match self.thinking {
            None | Some(Value::Null) => {}
            Some(thinking) => {
                if thinking.get("budget_tokens").is_some_and(|b| !b.is_null()) {
                    return Err(ApiError::invalid("thinking", "budget_tokens is not supported: thinking is not bounded here (leave it out)"));
                }
                let enabled = match thinking["type"].as_str() {
                    Some("enabled") => true,
                    Some("disabled") => false,
                    _ => return Err(ApiError::invalid("thinking", "type must be enabled or disabled")),
                };
                let kwargs = chat.entry("chat_template_kwargs").or_insert_with(|| json!({}));
                if let Some(kwargs) = kwargs.as_object_mut() {
                    kwargs.insert("enable_thinking".into(), json!(enabled));
                }
            }
        }
        serde_json::from_value(Value::Object(chat)).map_err(|e| ApiError::invalid("messages", e))
    }
}

/// Appends the chat messages one Anthropic message stands for: its text, reasoning and tool uses
/// as one message, then a tool message per `tool_result` block.
fn convert_message(message: Value, messages: &mut Vec<Value>) -> Result<(), String> {
    let role = message["role"].as_str().ok_or("a message needs a role")?.to_owned();
    if role != "user" && role != "assistant" {
        return Err(format!("role {role:?} is not user or assistant"));
    }
    let blocks = match &message["content"] {
        Value::String(text) => {
            messages.push(json!({ "role": role, "content": text }));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => return Err("content must be text or a list of blocks".into()),
    };
    let (mut texts, mut reasoning, mut calls, mut results) = (Vec::new(), String::new(), Vec::new(), Vec::new());
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => texts.push(json!({ "type": "text", "text": block["text"].as_str().ok_or("a text block needs text")? })),
            Some("thinking") => reasoning.push_str(block["thinking"].as_str().unwrap_or_default()),
            Some("redacted_thinking") => {}
            Some("tool_use") => calls.push(json!({
                "id": block["id"].as_str().ok_or("a tool_use block needs an id")?,
                "type": "function",
                "function": { "name": block["name"].as_str().ok_or("a tool_use block needs a name")?, "arguments": block["input"].to_string() },
            })),
            Some("tool_result") => {
                let id = block["tool_use_id"].as_str().ok_or("a tool_result block needs tool_use_id")?;
                let content = match &block["content"] {
                    Value::String(text) => text.clone(),
                    Value::Array(parts) => {
                        let mut text = String::new();
                        for part in parts {
                            match part["type"].as_str() {
                                Some("text") => text.push_str(part["text"].as_str().unwrap_or_default()),
                                other => return Err(format!("tool_result content of type {other:?} is not supported (text only)")),
                            }
                        }
                        text
                    }
                    Value::Null => String::new(),
                    _ => return Err("a tool_result's content must be text or blocks".into()),
                };
                results.push(json!({ "role": "tool", "tool_call_id": id, "content": content }));
            }
            other => return Err(format!("content blocks of type {other:?} are not supported (text only)")),
        }
    }
    if !texts.is_empty() || !calls.is_empty() || !reasoning.is_empty() {
        let mut converted = json!({ "role": role, "content": if texts.is_empty() { json!("") } else { Value::Array(texts) } });
        if !calls.is_empty() {
            converted["tool_calls"] = Value::Array(calls);
        }
        if !reasoning.is_empty() {
            converted["reasoning_content"] = json!(reasoning);
        }
        messages.push(converted);
    }
    messages.extend(results);
    Ok(())
}

/// Why the reply ended, in Anthropic's words.
pub fn stop_reason(reason: FinishReason, called_tools: bool) -> &'static str {
    match reason {
        _ if called_tools => "tool_use",
        FinishReason::EndOfText | FinishReason::Cancelled => "end_turn",
        FinishReason::StopSequence => "stop_sequence",
        FinishReason::MaxTokens | FinishReason::ContextFull => "max_tokens",
    }
}

fn usage(stats: &GenerationStats) -> Value {
    json!({
        "input_tokens": stats.prompt_tokens,
        "cache_read_input_tokens": stats.prompt_tokens_reused,
        "cache_creation_input_tokens": 0,
        "output_tokens": stats.completion_tokens,
    })
}

fn tool_use(call: &crate::chat::ToolCall) -> Value {
    // The input is the call's arguments as JSON (an object where the model wrote one).
    let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": input })
}

/// The whole message: thinking, text and tool uses, in the reply's order.
pub fn message(id: &str, model: &str, reply: &ChatReply, reason: FinishReason, stats: &GenerationStats) -> Value {
    let mut content = Vec::new();
    if !reply.reasoning_content.is_empty() {
        content.push(json!({ "type": "thinking", "thinking": reply.reasoning_content, "signature": "" }));
    }
    if !reply.content.is_empty() || reply.tool_calls.is_empty() {
        content.push(json!({ "type": "text", "text": reply.content }));
    }
    content.extend(reply.tool_calls.iter().map(tool_use));
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(reason, !reply.tool_calls.is_empty()), "stop_sequence": null, "usage": usage(stats),
    })
}

/// The stream of a message: typed events built from the reply's pieces as they come, each piece
/// in its own content block (thinking, text, then each tool use).
pub struct Events {
    id: String,
    model: String,
    started: bool,
    /// The open block: its index and what it holds.
    open: Option<(usize, Block)>,
    blocks: usize,
    called_tools: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    Tool(usize),
}

impl Events {
    pub fn new(id: String, model: String) -> Events {
        Events { id, model, started: false, open: None, blocks: 0, called_tools: false }
    }

    fn event(kind: &str, mut data: Value) -> SseEvent {
        data["type"] = json!(kind);
        SseEvent::default().event(kind).data(data.to_string())
    }

    /// `message_start`, once, with the prompt's size.
    pub fn start(&mut self, prompt_tokens: usize, out: &mut Vec<SseEvent>) {
        if !self.started {
            self.started = true;
            let message = json!({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": prompt_tokens, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 0 },
            });
            out.push(Self::event("message_start", json!({ "message": message })));
        }
    }

    /// Opens `block` unless it is the open one (closing the one before).
    fn open(&mut self, block: Block, start: Value, out: &mut Vec<SseEvent>) -> usize {
        if let Some((index, open)) = self.open
            && open == block
        {
            return index;
        }
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some((index, block));
        out.push(Self::event("content_block_start", json!({ "index": index, "content_block": start })));
        index
    }

    fn close(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((index, _)) = self.open.take() {
            out.push(Self::event("content_block_stop", json!({ "index": index })));
        }
    }

    /// The events for a piece of the reply.
    pub fn delta(&mut self, delta: &ChatDelta, prompt_tokens: usize) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.start(prompt_tokens, &mut out);
        match delta {
            ChatDelta::Reasoning(text) => {
                let index = self.open(Block::Thinking, json!({ "type": "thinking", "thinking": "", "signature": "" }), &mut out);
                out.push(Self::event("content_block_delta", json!({ "index": index, "delta": { "type": "thinking_delta", "thinking": text } })));
            }
            ChatDelta::Content(text) => {
                let index = self.open(Block::Text, json!({ "type": "text", "text": "" }), &mut out);
                out.push(Self::event("content_block_delta", json!({ "index": index, "delta": { "type": "text_delta", "text": text } })));
            }
            ChatDelta::ToolCall { index: call, id, name, arguments } => {
                self.called_tools = true;
                let start =
                    json!({ "type": "tool_use", "id": id.clone().unwrap_or_default(), "name": name.clone().unwrap_or_default(), "input": {} });
                let index = self.open(Block::Tool(*call), start, &mut out);
                if !arguments.is_empty() {
                    out.push(Self::event(
                        "content_block_delta",
                        json!({ "index": index, "delta": { "type": "input_json_delta", "partial_json": arguments } }),
                    ));
                }
            }
        }
        out
    }

    /// The closing events: the open block's end, why the message ended, and its end.
    pub fn finish(&mut self, reason: FinishReason, stats: &GenerationStats) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.start(stats.prompt_tokens, &mut out);
        if self.blocks == 0 {
            // An empty reply still has its text block.
            self.open(Block::Text, json!({ "type": "text", "text": "" }), &mut out);
        }
        self.close(&mut out);
        out.push(Self::event(
            "message_delta",
            json!({ "delta": { "stop_reason": stop_reason(reason, self.called_tools), "stop_sequence": null }, "usage": usage(stats) }),
        ));
        out.push(Self::event("message_stop", json!({})));
        out
    }
}
