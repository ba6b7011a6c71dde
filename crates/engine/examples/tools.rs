//! A tool round trip with the engine as a library: the model is asked a question with a tool it
//! must call, the call's arguments are read, the tool's result goes back, and the model answers.
//! The chat is rendered by the model's own Jinja template (the default model's has no tools, so
//! the generic JSON format applies, grammar-forced).
//!
//!     cargo run --release -p exsa-engine --example tools [-- --model PATH]

use exsa_engine::{ChatMessage, ChatOptions, ChatTemplating, Engine, EngineConfig, GenerateOptions, SamplingParams, Tool, ToolChoice};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = match (args.next().as_deref(), args.next()) {
        (Some("--model"), Some(path)) => path.into(),
        _ => exsa_engine::default_model_path(),
    };
    let engine = Engine::load(EngineConfig::new(model).chat_templating(ChatTemplating::Jinja { override_source: None }))?;
    let weather = Tool::new(
        "get_weather",
        json!({ "type": "object", "properties": { "city": { "type": "string", "enum": ["Paris", "London", "Tokyo"] } }, "required": ["city"] }),
    )
    .description("The current weather in a city.");
    let options = GenerateOptions::default().max_tokens(96).sampling(SamplingParams::greedy());
    let mut session = engine.session()?;

    // The call, required: the grammar holds it to the tool's schema.
    let mut messages = vec![ChatMessage::new("user", "What is the weather in Paris?")];
    let chat = ChatOptions::default().tools(vec![weather]).tool_choice(ToolChoice::Required);
    let (reply, _) = session.chat_reply(&messages, &chat, options.clone())?;
    let call = reply.tool_calls.first().ok_or("the model made no call")?;
    let arguments: serde_json::Value = serde_json::from_str(&call.arguments)?;
    println!("call {} {}: {arguments}", call.id, call.name);

    // The result goes back; the model answers in text.
    messages.push(ChatMessage::tool_calls(reply.tool_calls.clone()));
    messages.push(ChatMessage::tool_result(call.id.clone(), json!({ "temperature_c": 18, "sky": "sunny" }).to_string()));
    let chat = chat.tool_choice(ToolChoice::None);
    let (answer, stats) = session.chat_reply(&messages, &chat, options)?;
    println!("answer: {}", answer.content.trim());
    println!("({} prompt tokens, {} reused from the first turn)", stats.prompt_tokens, stats.prompt_tokens_reused);
    Ok(())
}
