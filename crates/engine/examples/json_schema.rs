//! Structured output with the engine as a library: `SamplingParams::json_schema` makes a JSON
//! schema into a GBNF grammar (`exsa_engine::json_grammar`), the grammar constrains every
//! sampled token, and the reply is JSON that the schema accepts. This is what `exsa serve` does
//! for OpenAI's `response_format: {"type": "json_schema", ...}`.
//!
//!     cargo run -p exsa-engine --example json_schema [-- --model PATH]
//!
//! The program parses the reply, checks it against the schema, and fails if it does not fit.

use exsa_engine::{ChatMessage, Engine, EngineConfig, FinishReason, GenerateRequest, SamplingParams};
use serde_json::{Value, json};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = match (args.next().as_deref(), args.next()) {
        (Some("--model"), Some(path)) => path.into(),
        (None, _) => exsa_engine::default_model_path(),
        _ => return Err("usage: json_schema [--model PATH]".into()),
    };
    let engine = Engine::load(EngineConfig::new(model))?;

    // The schema: required properties always come, in this order; optional ones where the
    // model wants them; no others (the grammar says so where `additionalProperties` is absent).
    let schema = json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 24 },
            "age": { "type": "integer" },
            "role": { "enum": ["admin", "user"] },
            "languages": { "type": "array", "items": { "type": "string", "maxLength": 16 }, "minItems": 1, "maxItems": 3 },
            "email": { "type": "string" }
        },
        "required": ["name", "age", "role", "languages"]
    });
    // Greedy, so the run is the same every time; the grammar applies from the first token. A
    // keyword the converter does not understand (`pattern`, `minimum`, ...) is an error here
    // (`EngineError::JsonSchema`, naming where it is), never silently dropped.
    let sampling = SamplingParams::greedy().json_schema(&schema)?;
    let messages = [ChatMessage::new("user", "Describe a software developer as JSON.")];
    let request = GenerateRequest::chat(messages).max_tokens(128).sampling(sampling);
    let (text, stats) = engine.generate(&request)?;
    println!("{text}");
    println!("({} tokens, finish reason {:?})", stats.completion_tokens, stats.finish_reason);

    // Once the grammar's object is complete, only the end of the text may follow: a reply cut
    // off by max_tokens would be unfinished JSON.
    if stats.finish_reason != Some(FinishReason::EndOfText) {
        return Err(format!("the reply did not end by itself ({:?})", stats.finish_reason).into());
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("the reply is not JSON ({e}): {text:?}"))?;
    validate(&schema, &value, "$")?;
    println!("the reply fits the schema");
    Ok(())
}

/// Checks `value` against the parts of JSON Schema that `schema` uses (type, enum, properties,
/// required, additionalProperties absent, items, minItems/maxItems, maxLength); `at` says where,
/// for the error.
fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let fail = |why: String| Err(format!("{at}: {why} (value {value})"));
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return fail(format!("not one of {allowed:?}"));
    }
    match schema.get("type").and_then(Value::as_str) {
        None => {}
        Some("object") => {
            let Some(object) = value.as_object() else { return fail("not an object".into()) };
            let properties = schema["properties"].as_object().cloned().unwrap_or_default();
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !object.contains_key(required) {
                    return fail(format!("required property {required:?} is missing"));
                }
            }
            for (key, item) in object {
                let Some(property) = properties.get(key) else { return fail(format!("property {key:?} is not in the schema")) };
                validate(property, item, &format!("{at}.{key}"))?;
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else { return fail("not an array".into()) };
            let (min, max) = (schema["minItems"].as_u64().unwrap_or(0), schema["maxItems"].as_u64().unwrap_or(u64::MAX));
            if !(min..=max).contains(&(items.len() as u64)) {
                return fail(format!("{} items, not {min} to {max}", items.len()));
            }
            for (i, item) in items.iter().enumerate() {
                validate(&schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") => {
            let Some(text) = value.as_str() else { return fail("not a string".into()) };
            if let Some(max) = schema["maxLength"].as_u64()
                && text.chars().count() as u64 > max
            {
                return fail(format!("longer than {max} characters"));
            }
        }
        Some("integer") if !(value.is_i64() || value.is_u64()) => return fail("not an integer".into()),
        Some("integer") => {}
        Some(other) => return fail(format!("type {other} is not checked by this example")),
    }
    Ok(())
}
