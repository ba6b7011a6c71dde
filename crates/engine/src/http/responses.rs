//! OpenAI's Responses API (`POST /v1/responses`, also `/responses` as llama-server serves it): a
//! request of input items is read as the chat it describes and generated through the chat path
//! (template, tools, reasoning); the reply comes back as output items, whole or as the API's
//! stream of typed events.

use axum::response::sse::Event as SseEvent;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::openai::ChatRequest;
use crate::chat::{ChatDelta, ChatReply};
use crate::outcome::GenerationStats;

/// The request fields this module reads; the rest (sampling, `stream`, ...) are the chat's.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    /// Text (one user message), or a list of items: messages, function calls and their outputs.
    pub input: Value,
    /// A system message before the input.
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    /// Function tools in the Responses shape (`{"type": "function", "name", "parameters", ...}`).
    pub tools: Option<Vec<Value>>,
    /// `{"effort": ...}`.
    pub reasoning: Option<Value>,
    /// Stored conversations are not kept here.
    pub previous_response_id: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl ResponsesRequest {
    /// The chat request this asks for (every field it does not map checked there).
    pub fn into_chat(self) -> Result<ChatRequest, ApiError> {
        if self.previous_response_id.as_deref().is_some_and(|id| !id.is_empty()) {
            return Err(ApiError::invalid("previous_response_id", "responses are not stored here: send the whole conversation as input"));
        }
        let mut messages = Vec::new();
        if let Some(instructions) = self.instructions {
            messages.push(json!({ "role": "system", "content": instructions }));
        }
        match self.input {
            Value::String(text) => messages.push(json!({ "role": "user", "content": text })),
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    input_item(item, &mut messages).map_err(|reason| ApiError::invalid("input", format!("input[{i}]: {reason}")))?;
                }
            }
            _ => return Err(ApiError::invalid("input", "must be text or a list of items")),
        }
        if self.rest.get("n").is_some_and(|n| !n.is_null() && n != 1) {
            return Err(ApiError::invalid("n", "the Responses API answers with one reply"));
        }
        let mut chat = self.rest;
        chat.insert("messages".into(), Value::Array(messages));
        if let Some(n) = self.max_output_tokens {
            chat.insert("max_tokens".into(), json!(n));
        }
        if let Some(tools) = self.tools {
            let tools = tools
                .into_iter()
                .enumerate()
                .map(|(i, t)| match t.get("type").and_then(Value::as_str) {
                    Some("function") => {
                        let mut function = t.as_object().cloned().unwrap_or_default();
                        function.remove("type");
                        function.remove("strict");
                        Ok(json!({ "type": "function", "function": function }))
                    }
                    other => Err(ApiError::invalid("tools", format!("tools[{i}]: type {other:?}: only function tools are served"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            chat.insert("tools".into(), Value::Array(tools));
        }
        // A named choice is `{"type": "function", "name": ...}` here, with the name inside
        // `function` in chat requests.
        if let Some(Value::Object(choice)) = chat.get_mut("tool_choice")
            && !choice.contains_key("function")
            && let Some(name) = choice.remove("name")
        {
            choice.insert("function".into(), json!({ "name": name }));
        }
        if let Some(effort) = self.reasoning.as_ref().and_then(|r| r.get("effort")).filter(|e| !e.is_null()) {
            chat.insert("reasoning_effort".into(), effort.clone());
        }
        serde_json::from_value(Value::Object(chat)).map_err(|e| ApiError::invalid("input", e))
    }
}

/// Appends the chat messages one input item stands for.
fn input_item(item: Value, messages: &mut Vec<Value>) -> Result<(), String> {
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).ok_or("a message needs a role")?;
            let content = match item.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("input_text" | "output_text" | "text"), Some(text)) => texts.push(text),
                            (kind, _) => return Err(format!("content parts of type {kind:?} are not supported (text only)")),
                        }
                    }
                    texts.join("\n")
                }
                _ => return Err("a message needs content".into()),
            };
            messages.push(json!({ "role": role, "content": content }));
        }
        "function_call" => {
            let field = |name: &str| item.get(name).and_then(Value::as_str).map(str::to_owned).ok_or(format!("a function_call needs {name}"));
            let call =
                json!({ "id": field("call_id")?, "type": "function", "function": { "name": field("name")?, "arguments": field("arguments")? } });
            // Calls of one turn are one assistant message.
            match messages.last_mut() {
                Some(last) if last["role"] == "assistant" && last.get("tool_calls").is_some() => {
                    last["tool_calls"].as_array_mut().expect("an array").push(call);
                }
                _ => messages.push(json!({ "role": "assistant", "content": null, "tool_calls": [call] })),
            }
        }
        "function_call_output" => {
            let call_id = item.get("call_id").and_then(Value::as_str).ok_or("a function_call_output needs call_id")?;
            let output = match item.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => return Err("a function_call_output needs output".into()),
            };
            messages.push(json!({ "role": "tool", "tool_call_id": call_id, "content": output }));
        }
        // Earlier reasoning is not replayed to the model.
        "reasoning" => {}
        other => return Err(format!("items of type {other:?} are not supported")),
    }
    Ok(())
}

/// The ids of one response and its items.
#[derive(Clone, Debug)]
pub struct Ids {
    pub response: String,
    message: String,
    reasoning: String,
}

impl Ids {
    pub fn new(n: u64) -> Ids {
        Ids { response: format!("resp_{n:032}"), message: format!("msg_{n:032}"), reasoning: format!("rs_{n:032}") }
    }
}

fn usage(stats: &GenerationStats) -> Value {
    json!({
        "input_tokens": stats.prompt_tokens,
        "input_tokens_details": { "cached_tokens": stats.prompt_tokens_reused },
        "output_tokens": stats.completion_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    })
}

fn message_item(ids: &Ids, text: &str, status: &str) -> Value {
    let content = if status == "completed" { json!([output_text(text)]) } else { json!([]) };
    json!({ "type": "message", "id": ids.message, "status": status, "role": "assistant", "content": content })
}

fn output_text(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

fn reasoning_item(ids: &Ids, text: &str, status: &str) -> Value {
    json!({ "type": "reasoning", "id": ids.reasoning, "status": status, "summary": [], "content": [{ "type": "reasoning_text", "text": text }] })
}

fn call_item(id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({ "type": "function_call", "id": format!("fc_{id}"), "call_id": id, "name": name, "arguments": arguments, "status": status })
}

/// The response object: its output items in the reply's order (reasoning, the message, calls).
pub fn response(ids: &Ids, created: u64, model: &str, reply: &ChatReply, status: &str, stats: Option<&GenerationStats>) -> Value {
    let mut output = Vec::new();
    if !reply.reasoning_content.is_empty() {
        output.push(reasoning_item(ids, &reply.reasoning_content, "completed"));
    }
    if !reply.content.is_empty() || reply.tool_calls.is_empty() {
        output.push(message_item(ids, &reply.content, "completed"));
    }
    for call in &reply.tool_calls {
        output.push(call_item(&call.id, &call.name, &call.arguments, "completed"));
    }
    let mut body = json!({
        "id": ids.response, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": null, "incomplete_details": null,
    });
    if let Some(stats) = stats {
        body["usage"] = usage(stats);
    }
    body
}

/// The stream of a response: typed events, each with a sequence number, built from the reply's
/// pieces as they come.
pub struct Events {
    ids: Ids,
    created: u64,
    model: String,
    sequence: u64,
    started: bool,
    /// What the reply is so far (reasoning, content, calls), for the `done` events.
    reply: ChatReply,
    /// Which items were announced: reasoning, message, and each call by index.
    open_reasoning: bool,
    open_message: bool,
}

impl Events {
    pub fn new(ids: Ids, created: u64, model: String) -> Events {
        Events { ids, created, model, sequence: 0, started: false, reply: ChatReply::default(), open_reasoning: false, open_message: false }
    }

    fn event(&mut self, kind: &str, mut data: Value) -> SseEvent {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        SseEvent::default().event(kind).data(data.to_string())
    }

    fn start(&mut self, out: &mut Vec<SseEvent>) {
        if !self.started {
            self.started = true;
            let response = response(&self.ids, self.created, &self.model, &ChatReply::default(), "in_progress", None);
            let mut empty = response.clone();
            empty["output"] = json!([]);
            out.push(self.event("response.created", json!({ "response": empty })));
            out.push(self.event("response.in_progress", json!({ "response": empty })));
        }
    }

    /// The prompt's progress, as a `response.in_progress` event that carries it.
    pub fn progress(&mut self, progress: Value) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.start(&mut out);
        let mut response = response(&self.ids, self.created, &self.model, &ChatReply::default(), "in_progress", None);
        response["output"] = json!([]);
        out.push(self.event("response.in_progress", json!({ "response": response, "prompt_progress": progress })));
        out
    }

    /// The events for a piece of the reply (`timings`, llama-server's, go on its text's event).
    pub fn delta(&mut self, delta: &ChatDelta, timings: Option<Value>) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.start(&mut out);
        match delta {
            ChatDelta::Reasoning(text) => {
                if !self.open_reasoning {
                    self.open_reasoning = true;
                    let item = reasoning_item(&self.ids, "", "in_progress");
                    out.push(self.event("response.output_item.added", json!({ "output_index": 0, "item": item })));
                }
                self.reply.reasoning_content.push_str(text);
                let id = self.ids.reasoning.clone();
                out.push(self.event("response.reasoning_text.delta", json!({ "item_id": id, "output_index": 0, "content_index": 0, "delta": text })));
            }
            ChatDelta::Content(text) => {
                let index = usize::from(self.open_reasoning);
                let id = self.ids.message.clone();
                if !self.open_message {
                    self.open_message = true;
                    let item = message_item(&self.ids, "", "in_progress");
                    out.push(self.event("response.output_item.added", json!({ "output_index": index, "item": item })));
                    out.push(self.event(
                        "response.content_part.added",
                        json!({ "item_id": id, "output_index": index, "content_index": 0, "part": output_text("") }),
                    ));
                }
                self.reply.content.push_str(text);
                let mut data = json!({ "item_id": id, "output_index": index, "content_index": 0, "delta": text });
                if let Some(timings) = timings {
                    data["timings"] = timings;
                }
                out.push(self.event("response.output_text.delta", data));
            }
            ChatDelta::ToolCall { index, id, name, arguments } => {
                let output_index = usize::from(self.open_reasoning) + usize::from(self.open_message) + index;
                if *index >= self.reply.tool_calls.len() {
                    let call = crate::chat::ToolCall {
                        id: id.clone().unwrap_or_default(),
                        name: name.clone().unwrap_or_default(),
                        arguments: String::new(),
                    };
                    let item = call_item(&call.id, &call.name, "", "in_progress");
                    self.reply.tool_calls.push(call);
                    out.push(self.event("response.output_item.added", json!({ "output_index": output_index, "item": item })));
                }
                let call = &mut self.reply.tool_calls[*index];
                call.arguments.push_str(arguments);
                let item_id = format!("fc_{}", call.id);
                if !arguments.is_empty() {
                    out.push(self.event(
                        "response.function_call_arguments.delta",
                        json!({ "item_id": item_id, "output_index": output_index, "delta": arguments }),
                    ));
                }
            }
        }
        out
    }

    /// The closing events: each item done, then the whole response with its usage and timings.
    pub fn finish(&mut self, stats: &GenerationStats, timings: Value) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.start(&mut out);
        let reply = self.reply.clone();
        let mut index = 0;
        if self.open_reasoning {
            let item = reasoning_item(&self.ids, &reply.reasoning_content, "completed");
            out.push(self.event("response.output_item.done", json!({ "output_index": index, "item": item })));
            index += 1;
        }
        if self.open_message || reply.tool_calls.is_empty() {
            let id = self.ids.message.clone();
            if !self.open_message {
                let item = message_item(&self.ids, "", "in_progress");
                out.push(self.event("response.output_item.added", json!({ "output_index": index, "item": item })));
                out.push(self.event(
                    "response.content_part.added",
                    json!({ "item_id": id, "output_index": index, "content_index": 0, "part": output_text("") }),
                ));
            }
            out.push(
                self.event("response.output_text.done", json!({ "item_id": id, "output_index": index, "content_index": 0, "text": reply.content })),
            );
            out.push(self.event(
                "response.content_part.done",
                json!({ "item_id": id, "output_index": index, "content_index": 0, "part": output_text(&reply.content) }),
            ));
            let item = message_item(&self.ids, &reply.content, "completed");
            out.push(self.event("response.output_item.done", json!({ "output_index": index, "item": item })));
            index += 1;
        }
        for call in &reply.tool_calls {
            let item_id = format!("fc_{}", call.id);
            out.push(
                self.event(
                    "response.function_call_arguments.done",
                    json!({ "item_id": item_id, "output_index": index, "arguments": call.arguments }),
                ),
            );
            let item = call_item(&call.id, &call.name, &call.arguments, "completed");
            out.push(self.event("response.output_item.done", json!({ "output_index": index, "item": item })));
            index += 1;
        }
        let whole = response(&self.ids, self.created, &self.model, &reply, "completed", Some(stats));
        out.push(self.event("response.completed", json!({ "response": whole, "timings": timings })));
        out
    }
}
