//! Tool calling for templates that know nothing of tools (Gemma 3's, the default model's): the
//! tools are described in the system message, the reply is one JSON object, either a call or a
//! response, and a grammar made from that object's schema keeps every reply well formed from
//! its first token. llama.cpp once had such a format ("generic"); the pinned tree no longer does,
//! so this one is ours, built only from its JSON-schema converter.
//!
//! The reply's shape: `{"tool_call": {"name": ..., "arguments": {...}}}` (`"tool_calls": [...]`
//! with parallel calls), or `{"response": "..."}`: either with `tool_choice` auto, the call with
//! required, the response with none (the history keeps the same shape either way).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{AssistantMessage, ChatTemplateError, ToolCall};

/// What the generic format needs to parse a reply back.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct GenericFormat {
    /// Whether the reply lists its calls (`tool_calls`) rather than making one (`tool_call`).
    parallel: bool,
}

/// The request rewritten for a template without tools: tools in the system message, tool calls
/// and results in the history as the JSON they were written in, no `tools` field; and the
/// schema every reply must fit.
pub(super) struct Rewritten {
    pub request: Value,
    pub schema: Value,
    pub format: GenericFormat,
}

/// Rewrites `request` (whose `tools` are not empty, each already checked to have a name, and whose
/// `tool_choice` is `auto`, `none` or `required`) for the generic format.
pub(super) fn rewrite(mut request: Value) -> Result<Rewritten, ChatTemplateError> {
    let object = request.as_object_mut().ok_or_else(|| ChatTemplateError::BadRequest("the request is not a JSON object".into()))?;
    let tools = object.remove("tools").unwrap_or(Value::Null);
    let choice = match object.remove("tool_choice") {
        Some(c) if c == "required" => Choice::Call,
        Some(c) if c == "none" => Choice::Respond,
        _ => Choice::Either,
    };
    let parallel = object.remove("parallel_tool_calls").is_some_and(|p| p == true);
    let tools = tools.as_array().cloned().unwrap_or_default();
    let schema = reply_schema(&tools, choice, parallel)?;
    let messages = object.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    object.insert("messages".into(), Value::Array(rewrite_messages(&messages, &tools, &schema)?));
    Ok(Rewritten { request, schema, format: GenericFormat { parallel } })
}

/// What a reply may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Call,
    Respond,
    Either,
}

/// The schema of a reply: a call of one of `tools` (a list of calls when `parallel`), a response,
/// or either, as `choice` says.
fn reply_schema(tools: &[Value], choice: Choice, parallel: bool) -> Result<Value, ChatTemplateError> {
    let calls: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let function = &tool["function"];
            let name = function["name"].as_str().ok_or_else(|| ChatTemplateError::BadRequest("a tool has no function name".into()))?;
            let parameters = match &function["parameters"] {
                Value::Null => json!({ "type": "object" }),
                p => p.clone(),
            };
            Ok(json!({
                "type": "object",
                "properties": { "name": { "const": name }, "arguments": parameters },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }))
        })
        .collect::<Result<_, ChatTemplateError>>()?;
    let call = if calls.len() == 1 { calls[0].clone() } else { json!({ "anyOf": calls }) };
    let call_reply = if parallel {
        json!({ "type": "object", "properties": { "tool_calls": { "type": "array", "items": call, "minItems": 1 } }, "required": ["tool_calls"], "additionalProperties": false })
    } else {
        json!({ "type": "object", "properties": { "tool_call": call }, "required": ["tool_call"], "additionalProperties": false })
    };
    let response =
        json!({ "type": "object", "properties": { "response": { "type": "string" } }, "required": ["response"], "additionalProperties": false });
    Ok(match choice {
        Choice::Call => call_reply,
        Choice::Respond => response,
        Choice::Either => json!({ "anyOf": [call_reply, response] }),
    })
}

/// The instructions the system message gets.
fn instructions(tools: &[Value], schema: &Value) -> String {
    let listed: Vec<Value> = tools.iter().map(|t| t["function"].clone()).collect();
    format!(
        "You can call tools. They are, as JSON:\n{}\n\nReply with exactly one JSON object and nothing else, matching this JSON schema:\n{}\n\
         Use \"tool_call\" (or \"tool_calls\") to call a tool with arguments that fit its parameters, and \"response\" to answer the user \
         directly, where the schema allows it. A tool's result comes back to you as {{\"tool_response\": ...}}.",
        Value::Array(listed),
        schema
    )
}

/// The history with the tools described in its system message (added first when it has none),
/// assistant turns as the JSON the format replies with, and each run of tool results as one user
/// turn (templates without tools often allow only alternating user and assistant turns).
fn rewrite_messages(messages: &[Value], tools: &[Value], schema: &Value) -> Result<Vec<Value>, ChatTemplateError> {
    let instructions = instructions(tools, schema);
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(first) if first["role"] == "system" => {
            let text = content_text(first)?;
            out.push(json!({ "role": "system", "content": format!("{text}\n\n{instructions}") }));
        }
        _ => out.push(json!({ "role": "system", "content": instructions })),
    }
    let skip = usize::from(messages.first().is_some_and(|m| m["role"] == "system"));
    let mut results: Vec<Value> = Vec::new();
    // The tool each call id called, for results that do not name it.
    let mut called: Vec<(Value, Value)> = Vec::new();
    for message in &messages[skip..] {
        let role = message["role"].as_str().unwrap_or_default();
        if role == "tool" {
            let id = message.get("tool_call_id").cloned().unwrap_or(Value::Null);
            let name = match message.get("name") {
                Some(name) if !name.is_null() => name.clone(),
                _ => called.iter().find(|(i, _)| *i == id).map_or(Value::Null, |(_, n)| n.clone()),
            };
            // A result that is JSON is shown as the value it is, not as a string of it.
            let text = content_text(message)?;
            let content = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
            let mut result = json!({ "content": content });
            if !name.is_null() {
                result["name"] = name;
            }
            results.push(result);
            continue;
        }
        for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            called.push((call["id"].clone(), call["function"]["name"].clone()));
        }
        flush_results(&mut results, &mut out);
        if role == "assistant" {
            out.push(json!({ "role": "assistant", "content": assistant_json(message)?.to_string() }));
        } else {
            out.push(message.clone());
        }
    }
    flush_results(&mut results, &mut out);
    Ok(out)
}

fn flush_results(results: &mut Vec<Value>, out: &mut Vec<Value>) {
    if results.is_empty() {
        return;
    }
    let body = if results.len() == 1 { json!({ "tool_response": results[0] }) } else { json!({ "tool_responses": results }) };
    results.clear();
    out.push(json!({ "role": "user", "content": body.to_string() }));
}

/// A message's content as text (a list of text parts joined).
fn content_text(message: &Value) -> Result<String, ChatTemplateError> {
    match &message["content"] {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| p["text"].as_str().map(str::to_owned).ok_or_else(|| ChatTemplateError::BadRequest("a content part without text".into())))
            .collect(),
        _ => Err(ChatTemplateError::BadRequest("a message's content is not text".into())),
    }
}

/// An assistant turn of the history as the format would have written it.
fn assistant_json(message: &Value) -> Result<Value, ChatTemplateError> {
    let calls = message.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
    if calls.is_empty() {
        return Ok(json!({ "response": content_text(message)? }));
    }
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            let function = &c["function"];
            // Arguments travel as JSON text in OpenAI's API; shown as the object they encode.
            let arguments = match &function["arguments"] {
                Value::String(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())),
                other => other.clone(),
            };
            json!({ "name": function["name"], "arguments": arguments })
        })
        .collect();
    Ok(if calls.len() == 1 { json!({ "tool_call": calls[0] }) } else { json!({ "tool_calls": calls }) })
}

impl GenericFormat {
    /// Reads a reply. While partial, what is complete so far: the response text, or the call's
    /// name and the start of its arguments (text that may still close the reply is held back;
    /// calls of a list show once the list is complete). A final text cut short (at `max_tokens`)
    /// reads as far as it goes, as it streamed; one that is not the format's at all is the
    /// content as it is.
    pub(super) fn parse(&self, text: &str, partial: bool) -> AssistantMessage {
        if let Ok(reply) = serde_json::from_str::<Reply<'_>>(text.trim()) {
            let calls: Vec<&Call<'_>> = match (&reply.tool_call, &reply.tool_calls) {
                (Some(call), _) => vec![call],
                (None, Some(calls)) if self.parallel => calls.iter().collect(),
                _ => Vec::new(),
            };
            if !calls.is_empty() {
                return AssistantMessage { tool_calls: calls.into_iter().map(Call::to_tool_call).collect(), ..Default::default() };
            }
            if let Some(response) = reply.response {
                return AssistantMessage { content: response, ..Default::default() };
            }
        }
        let read = partial_reply(text);
        if partial || !read.content.is_empty() || !read.tool_calls.is_empty() {
            return read;
        }
        AssistantMessage { content: text.to_owned(), ..Default::default() }
    }
}

/// A complete reply. Arguments are kept as the model wrote them, so that what streamed of them
/// is a prefix of the final text.
#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(borrow)]
    tool_call: Option<Call<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<Call<'a>>>,
    response: Option<String>,
}

#[derive(Deserialize)]
struct Call<'a> {
    name: String,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
}

impl Call<'_> {
    fn to_tool_call(&self) -> ToolCall {
        let arguments = self.arguments.map_or_else(|| "{}".to_owned(), |a| a.get().to_owned());
        ToolCall { id: String::new(), name: self.name.clone(), arguments }
    }
}

/// What an incomplete reply says for sure.
fn partial_reply(text: &str) -> AssistantMessage {
    let mut at = Cursor(text);
    if !at.eat("{") {
        return AssistantMessage::default();
    }
    match at.key().as_deref() {
        Some("response") => AssistantMessage { content: at.string_prefix().unwrap_or_default(), ..Default::default() },
        Some("tool_call") if at.eat("{") && at.key().as_deref() == Some("name") => {
            let Some(name) = at.complete_string() else { return AssistantMessage::default() };
            let arguments = if at.eat(",") && at.key().as_deref() == Some("arguments") { at.held_back_rest() } else { String::new() };
            AssistantMessage { tool_calls: vec![ToolCall { id: String::new(), name, arguments }], ..Default::default() }
        }
        _ => AssistantMessage::default(),
    }
}

/// A reading position in partial JSON text.
struct Cursor<'a>(&'a str);

impl Cursor<'_> {
    /// Skips whitespace, then `token` if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        self.0 = self.0.trim_start();
        match self.0.strip_prefix(token) {
            Some(rest) => {
                self.0 = rest;
                true
            }
            None => false,
        }
    }

    /// A complete key and its colon.
    fn key(&mut self) -> Option<String> {
        let key = self.complete_string()?;
        self.eat(":").then_some(key)
    }

    /// A complete string.
    fn complete_string(&mut self) -> Option<String> {
        if !self.eat("\"") {
            return None;
        }
        let end = string_end(self.0)?;
        let value = serde_json::from_str(&format!("\"{}\"", &self.0[..end])).ok()?;
        self.0 = &self.0[end + 1..];
        Some(value)
    }

    /// The decoded start of a string that may be incomplete (an escape cut short is left out).
    fn string_prefix(&mut self) -> Option<String> {
        if !self.eat("\"") {
            return None;
        }
        let body = string_end(self.0).map_or(self.0, |end| &self.0[..end]);
        // An escape cut short is at most six bytes (`\uXXXX`): drop up to that many.
        let cuts = body.char_indices().rev().take(6).map(|(i, _)| i);
        std::iter::once(body.len()).chain(cuts).find_map(|cut| serde_json::from_str(&format!("\"{}\"", &body[..cut])).ok())
    }

    /// The rest, less what may still close the reply (closing brackets and whitespace at its end).
    fn held_back_rest(&mut self) -> String {
        self.0.trim_start().trim_end_matches(|c: char| c == '}' || c == ']' || c.is_whitespace()).to_owned()
    }
}

/// Where the string starting here (after its opening quote) ends: its closing quote.
fn string_end(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } })
    }

    #[test]
    fn a_required_call_has_no_response_branch_none_only_that_and_auto_both() {
        let required = reply_schema(&[weather()], Choice::Call, false).unwrap();
        assert_eq!(required["required"], json!(["tool_call"]));
        assert_eq!(required["properties"]["tool_call"]["properties"]["name"]["const"], "get_weather");
        assert_eq!(reply_schema(&[weather()], Choice::Respond, false).unwrap()["required"], json!(["response"]));
        let auto = reply_schema(&[weather()], Choice::Either, true).unwrap();
        assert_eq!(auto["anyOf"][0]["required"], json!(["tool_calls"]));
        assert_eq!(auto["anyOf"][1]["required"], json!(["response"]));
    }

    #[test]
    fn history_becomes_the_formats_own_turns() {
        let messages = vec![
            json!({ "role": "user", "content": "weather in Paris?" }),
            json!({ "role": "assistant", "content": null, "tool_calls": [{ "id": "c1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }] }),
            json!({ "role": "tool", "tool_call_id": "c1", "content": "18 C" }),
            json!({ "role": "assistant", "content": "It is 18 C." }),
        ];
        let out = rewrite_messages(&messages, &[weather()], &json!({})).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"].as_str().unwrap().contains("get_weather"));
        let call: Value = serde_json::from_str(out[2]["content"].as_str().unwrap()).unwrap();
        assert_eq!(call, json!({ "tool_call": { "name": "get_weather", "arguments": { "city": "Paris" } } }));
        assert_eq!(out[3]["role"], "user");
        let result: Value = serde_json::from_str(out[3]["content"].as_str().unwrap()).unwrap();
        assert_eq!(result, json!({ "tool_response": { "name": "get_weather", "content": "18 C" } }));
        assert_eq!(out[4]["content"], json!({ "response": "It is 18 C." }).to_string());
    }

    #[test]
    fn replies_parse_into_calls_or_content() {
        let format = GenericFormat { parallel: false };
        let whole = r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris" }} }"#;
        let call = format.parse(whole, false);
        assert_eq!(call.tool_calls, vec![ToolCall { id: String::new(), name: "get_weather".into(), arguments: r#"{"city": "Paris" }"#.into() }]);
        assert_eq!(format.parse(r#"{"response": "hi"}"#, false).content, "hi");
        assert_eq!(format.parse("not json", false).content, "not json");
        // Cut short: as far as it goes.
        assert_eq!(format.parse(r#"{"response": "It is sun"#, false).content, "It is sun");
        // Every partial parse is a prefix of the final one: what streamed is never taken back.
        for end in 0..whole.len() {
            let partial = format.parse(&whole[..end], true);
            match partial.tool_calls.first() {
                None => assert!(partial.content.is_empty(), "{end}"),
                Some(c) => {
                    assert_eq!(c.name, "get_weather", "{end}");
                    assert!(call.tool_calls[0].arguments.starts_with(&c.arguments), "{end}: {:?}", c.arguments);
                }
            }
        }
        let response = r#"{"response": "a \"b\" \u00e9 c"}"#;
        let last = format.parse(response, false).content;
        assert_eq!(last, "a \"b\" é c");
        for end in 0..response.len() {
            assert!(last.starts_with(&format.parse(&response[..end], true).content), "{end}");
        }
        assert_eq!(format.parse(&response[..19], true).content, "a \"b");
    }
}
