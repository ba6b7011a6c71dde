//! llama.cpp's chat layer through `llama::chat_templates` (feature `chat`), on real templates of
//! llama.cpp's corpus (`EXSA_CHAT_TEMPLATES`, unpacked by `cargo xtask test`) and the default
//! model.
#![cfg(feature = "chat")]

mod common;

use std::path::PathBuf;

use llama::chat_templates::*;
use serde_json::json;

fn template(name: &str) -> String {
    let dir = PathBuf::from(std::env::var("EXSA_CHAT_TEMPLATES").expect("EXSA_CHAT_TEMPLATES is set by .cargo/config.toml"));
    let path = dir.join(format!("{name}.jinja"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; `cargo xtask test` unpacks llama.cpp's template corpus there", path.display()))
}

fn weather_tool() -> serde_json::Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": { "city": { "type": "string" } },
                "required": ["city"]
            }
        }
    })
}

fn request(tool_choice: &str) -> serde_json::Value {
    json!({
        "messages": [
            { "role": "system", "content": "You are terse." },
            { "role": "user", "content": "Weather in Paris?" }
        ],
        "tools": [weather_tool()],
        "tool_choice": tool_choice
    })
}

#[test]
fn a_hermes_template_renders_tools_and_a_lazy_grammar_that_a_call_triggers() {
    let templates = ChatTemplates::from_source(&template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use")).unwrap();
    let auto = templates.apply(&request("auto")).unwrap();
    assert!(auto.prompt.contains("get_weather") && auto.prompt.contains("Weather in Paris?"), "{}", auto.prompt);
    assert!(!auto.grammar.is_empty(), "tools with tool_choice auto give a grammar");
    assert!(auto.grammar_lazy, "auto: the grammar waits for a call to start");
    assert!(!auto.grammar_triggers.is_empty(), "{auto:?}");
    assert!(auto.grammar_triggers.iter().any(|t| t.value.contains("tool_call")), "{:?}", auto.grammar_triggers);

    let required = templates.apply(&request("required")).unwrap();
    assert!(!required.grammar.is_empty() && !required.grammar_lazy, "required: the grammar applies from the first token");

    let none = templates.apply(&request("none")).unwrap();
    assert!(none.grammar.is_empty(), "none: no grammar");
}

#[test]
fn a_reply_parses_into_tool_calls_and_streams_as_deltas() {
    let templates = ChatTemplates::from_source(&template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use")).unwrap();
    let prompt = templates.apply(&request("auto")).unwrap();
    let reply = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let message = prompt.parse(reply, ReplyText::Complete).unwrap();
    assert_eq!(message.tool_calls.len(), 1, "{message:?}");
    assert_eq!(message.tool_calls[0].name, "get_weather");
    let arguments: serde_json::Value = serde_json::from_str(&message.tool_calls[0].arguments).unwrap();
    assert_eq!(arguments, json!({ "city": "Paris" }));
    assert_eq!(message.content.trim(), "");

    // Streamed: every prefix parses as a partial message, and the deltas between consecutive
    // parses add up to the whole call (the name before any argument).
    let mut previous = AssistantMessage::default();
    let (mut name, mut args, mut content) = (String::new(), String::new(), String::new());
    let mut name_seen_before_arguments = true;
    for end in (1..=reply.len()).filter(|&i| reply.is_char_boundary(i)) {
        let now = prompt.parse(&reply[..end], if end < reply.len() { ReplyText::Partial } else { ReplyText::Complete }).unwrap();
        for delta in now.deltas_since(&previous).unwrap() {
            content.push_str(&delta.content_delta);
            if delta.tool_call_index.is_some() {
                if !delta.tool_call.arguments.is_empty() && name.is_empty() && delta.tool_call.name.is_empty() {
                    name_seen_before_arguments = false;
                }
                name.push_str(&delta.tool_call.name);
                args.push_str(&delta.tool_call.arguments);
            }
        }
        previous = now;
    }
    assert_eq!(name, "get_weather");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&args).unwrap(), json!({ "city": "Paris" }));
    assert!(name_seen_before_arguments);
    assert_eq!(content.trim(), "");

    let prose = prompt.parse("It is sunny in Paris.", ReplyText::Complete).unwrap();
    assert_eq!(prose.content, "It is sunny in Paris.");
    assert!(prose.tool_calls.is_empty());
}

#[test]
fn lfm2_templates_render_their_tool_list() {
    let templates = ChatTemplates::from_source(&template("LFM2-8B-A1B")).unwrap();
    let prompt = templates.apply(&request("auto")).unwrap();
    assert!(prompt.prompt.contains("<|tool_list_start|>") && prompt.prompt.contains("get_weather"), "{}", prompt.prompt);
    assert!(!prompt.grammar.is_empty(), "{prompt:?}");
    assert!(prompt.preserved_tokens.iter().any(|t| t.contains("tool_call_start")), "{:?}", prompt.preserved_tokens);
    let call = prompt.parse("<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>", ReplyText::Complete).unwrap();
    assert_eq!(call.tool_calls.len(), 1, "{call:?}");
    assert_eq!(call.tool_calls[0].name, "get_weather");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&call.tool_calls[0].arguments).unwrap(), json!({ "city": "Paris" }));
}

#[test]
fn history_with_tool_calls_and_tool_results_renders() {
    let templates = ChatTemplates::from_source(&template("Qwen-Qwen2.5-7B-Instruct")).unwrap();
    let prompt = templates
        .apply(&json!({
            "messages": [
                { "role": "user", "content": "Weather in Paris?" },
                { "role": "assistant", "content": "", "tool_calls": [
                    { "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }
                ] },
                { "role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C" }
            ],
            "tools": [weather_tool()]
        }))
        .unwrap();
    assert!(prompt.prompt.contains("sunny, 21 C") && prompt.prompt.contains("\"city\""), "{}", prompt.prompt);
    assert!(prompt.prompt.ends_with("<|im_start|>assistant\n"), "{}", prompt.prompt);
}

#[test]
fn the_default_models_template_renders_a_plain_chat() {
    // This GGUF ships no template: llama.cpp falls back to ChatML.
    let templates = ChatTemplates::from_model(common::model(), None).unwrap();
    let prompt = templates.apply(&json!({ "messages": [{ "role": "user", "content": "Hello" }] })).unwrap();
    assert!(prompt.prompt.contains("<|im_start|>user\nHello<|im_end|>"), "{}", prompt.prompt);
    assert!(prompt.prompt.ends_with("<|im_start|>assistant\n"), "{}", prompt.prompt);
    let reply = prompt.parse("Hi there.", ReplyText::Complete).unwrap();
    assert_eq!((reply.content.as_str(), reply.tool_calls.len()), ("Hi there.", 0));
}

#[test]
fn bad_templates_requests_and_schemas_are_typed_errors() {
    let err = ChatTemplates::from_source("{% for x in %}").expect_err("a template that does not parse");
    assert!(matches!(err, ChatTemplateError::Parse(_)), "{err}");
    assert!(err.to_string().len() > "the chat template does not parse: ".len() + 5, "the cause is named: {err}");

    let templates = ChatTemplates::from_source(&template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use")).unwrap();
    let err = templates.apply(&json!({ "tools": [weather_tool()] })).unwrap_err();
    assert!(matches!(err, ChatTemplateError::BadRequest(_)) && err.to_string().contains("messages"), "{err}");
    let err = templates.apply(&request("sometimes")).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Field { field: "tool_choice", .. }), "{err}");
    let mut unknown = request("auto");
    unknown["tool_choice"] = json!({ "type": "function", "function": { "name": "get_time" } });
    let err = templates.apply(&unknown).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Field { field: "tool_choice", .. }) && err.to_string().contains("get_time"), "{err}");
    let mut nameless = request("auto");
    nameless["tools"][0]["function"].as_object_mut().unwrap().remove("name");
    assert!(matches!(templates.apply(&nameless), Err(ChatTemplateError::Field { field: "tools", .. })));
    let mut bad_schema = request("auto");
    bad_schema["tools"][0]["function"]["parameters"] = json!({ "type": "object", "properties": { "city": { "type": "no-such-type" } } });
    let err = templates.apply(&bad_schema).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Schema(_)) && err.to_string().contains("get_weather"), "{err}");

    // Raises only on this content: loading probes the template with messages of its own.
    let raising = ChatTemplates::from_source(
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('boom was asked for') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let err = raising.apply(&json!({ "messages": [{ "role": "user", "content": "boom" }] })).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)) && err.to_string().contains("boom was asked for"), "{err}");
    assert!(matches!(templates.apply(&json!({ "messages": "not a list" })), Err(ChatTemplateError::BadRequest(_))));
}

fn time_tool() -> serde_json::Value {
    json!({ "type": "function", "function": { "name": "get_time", "parameters": { "type": "object", "properties": { "zone": { "type": "string" } } } } })
}

#[test]
fn a_named_tool_choice_requires_that_tool_alone() {
    let templates = ChatTemplates::from_source(&template("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use")).unwrap();
    let mut named = request("auto");
    named["tools"] = json!([weather_tool(), time_tool()]);
    named["tool_choice"] = json!({ "type": "function", "function": { "name": "get_time" } });
    let prompt = templates.apply(&named).unwrap();
    assert!(!prompt.grammar_lazy, "a required call is grammar-forced from the start: {prompt:?}");
    assert!(prompt.grammar.contains("get_time") && !prompt.grammar.contains("get_weather"), "{}", prompt.grammar);
}

#[test]
fn a_template_without_tools_gets_the_generic_json_format() {
    let templates = ChatTemplates::from_source(&template("google-gemma-2-2b-it")).unwrap();
    let caps = templates.caps();
    assert!(!caps.supports_tools && !caps.supports_tool_calls, "{caps:?}");
    let prompt = templates.apply(&request("required")).unwrap();
    assert!(prompt.is_generic() && !prompt.grammar_lazy && prompt.generation_prompt.is_empty(), "{prompt:?}");
    assert!(prompt.prompt.contains("You can call tools.") && prompt.prompt.contains("get_weather"), "{}", prompt.prompt);
    // Gemma 2 has no system role: the instructions join the first user turn.
    assert!(prompt.prompt.starts_with("<start_of_turn>user\n") || prompt.prompt.starts_with("<bos><start_of_turn>user\n"), "{}", prompt.prompt);
    let call = prompt.parse(r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}"#, ReplyText::Complete).unwrap();
    assert_eq!(call.tool_calls.len(), 1, "{call:?}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&call.tool_calls[0].arguments).unwrap(), json!({ "city": "Paris" }));
    // tool_choice none: the same format, a response only.
    let none = templates.apply(&request("none")).unwrap();
    assert!(none.is_generic() && !none.grammar.contains("tool_call"), "{}", none.grammar);
    assert_eq!(none.parse(r#"{"response": "Sunny."}"#, ReplyText::Complete).unwrap().content, "Sunny.");
    // The schema a generic grammar is made from is llama.cpp's converter's: a bad one is an error.
    assert!(matches!(json_schema_grammar(&json!({ "$ref": "#/nowhere" })), Err(ChatTemplateError::Schema(_))));
    assert!(json_schema_grammar(&json!({ "type": "string", "pattern": "^a+$" })).unwrap().contains("root"));
}

#[test]
fn reasoning_is_split_out_where_the_format_has_it() {
    let templates = ChatTemplates::from_source(&template("Qwen-Qwen3-0.6B")).unwrap();
    let chat = json!({ "messages": [{ "role": "user", "content": "Hi" }], "reasoning_format": "auto" });
    let prompt = templates.apply(&chat).unwrap();
    assert!(prompt.supports_thinking, "{prompt:?}");
    let reply = prompt.parse("<think>\nLet me think.\n</think>\n\nHello!", ReplyText::Complete).unwrap();
    assert_eq!((reply.reasoning_content.trim(), reply.content.trim()), ("Let me think.", "Hello!"), "{reply:?}");
    let mut inline = chat.clone();
    inline["reasoning_format"] = json!("none");
    let prompt = templates.apply(&inline).unwrap();
    let reply = prompt.parse("<think>\nLet me think.\n</think>\n\nHello!", ReplyText::Complete).unwrap();
    assert!(reply.reasoning_content.is_empty() && reply.content.contains("<think>"), "{reply:?}");
}
