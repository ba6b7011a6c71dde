//! The request fields this server does not read itself, and what becomes of each: no field that
//! would change the output is ever dropped without a word.
//!
//! Fields the request structs name are honoured (or refused with a 400 naming them, where a value
//! cannot be met). Of the rest, the few listed in [`IGNORED`] are accepted and ignored because
//! they cannot change the output; every other field is a 400 naming it, so that a client relying
//! on one learns at once that it was not honoured.

use serde_json::{Map, Value};

use super::error::ApiError;

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI's `/v1/chat/completions`.
    Chat,
    /// OpenAI's `/v1/completions`.
    Completions,
    /// llama-server's native `/completion`.
    Native,
}

/// Accepted and ignored: they label, store or route a request; none changes its output. Each
/// entry says why it is safe.
pub const IGNORED: &[(&str, &str)] = &[
    ("user", "an end-user id for abuse tracking: a label"),
    ("metadata", "key-value labels stored with the request: labels"),
    ("store", "whether OpenAI keeps the output for its dashboards: nothing is kept here"),
    ("service_tier", "OpenAI's billing and latency tier: one tier here"),
    ("cache_prompt", "llama-server's prompt cache switch: prefixes are always reused here, which never changes the output"),
];

/// Fields a client may send whose meaning this server does not provide, with the reason given in
/// the 400 (fields not listed anywhere get a generic reason).
const REFUSED: &[(&str, &str)] = &[
    ("best_of", "is not supported (only one candidate is generated)"),
    ("echo", "is not supported (the prompt is not repeated in the output)"),
    ("suffix", "is not supported (no fill-in-the-middle)"),
    ("min_tokens", "is not supported"),
    ("modalities", "is not supported: only text is generated"),
    ("audio", "is not supported: only text is generated"),
    ("prediction", "is not supported (predicted outputs)"),
    ("web_search_options", "is not supported (no web search)"),
    ("functions", "is the deprecated form of tools: send tools"),
    ("function_call", "is the deprecated form of tool_choice: send tool_choice"),
    ("logit_bias_type", "is not supported"),
];

/// Checks the fields the request structs did not read (`other`): listed as ignorable, or a
/// harmless value (null, or the default that changes nothing), or else a 400 naming the field.
pub fn check(other: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    for (name, value) in other {
        if IGNORED.iter().any(|(n, _)| n == name) || is_default(name, value, endpoint) {
            continue;
        }
        let reason =
            REFUSED.iter().find(|(n, _)| n == name).map_or("is not a field this server knows; it would be ignored, so it is refused", |(_, r)| r);
        return Err(ApiError::invalid(name.clone(), reason));
    }
    Ok(())
}

/// A value that asks for nothing beyond what the server does anyway.
fn is_default(name: &str, value: &Value, endpoint: Endpoint) -> bool {
    match (name, value) {
        (_, Value::Null) => true,
        ("best_of", v) => v.as_u64() == Some(1),
        ("echo", Value::Bool(false)) => true,
        ("suffix", Value::String(s)) => s.is_empty(),
        ("min_tokens", v) => v.as_u64() == Some(0),
        ("modalities", Value::Array(m)) => endpoint == Endpoint::Chat && m.iter().all(|m| m == "text"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_one(name: &str, value: Value, endpoint: Endpoint) -> Result<(), String> {
        let mut other = Map::new();
        other.insert(name.into(), value);
        check(&other, endpoint).map_err(|e| e.message)
    }

    #[test]
    fn every_ignored_field_is_accepted_with_any_value() {
        for (name, _) in IGNORED {
            for value in [json!("x"), json!({ "a": 1 }), json!(true)] {
                assert!(check_one(name, value, Endpoint::Chat).is_ok(), "{name}");
            }
        }
    }

    #[test]
    fn refused_fields_are_refused_by_name_unless_their_value_asks_for_nothing() {
        for (name, _) in REFUSED {
            let err = check_one(name, json!("something"), Endpoint::Chat).unwrap_err();
            assert!(err.contains(name), "{name}: {err}");
        }
        assert!(check_one("best_of", json!(1), Endpoint::Completions).is_ok());
        assert!(check_one("best_of", json!(2), Endpoint::Completions).is_err());
        assert!(check_one("echo", json!(false), Endpoint::Completions).is_ok());
        assert!(check_one("echo", json!(true), Endpoint::Completions).is_err());
        assert!(check_one("suffix", json!(""), Endpoint::Completions).is_ok());
        assert!(check_one("modalities", json!(["text"]), Endpoint::Chat).is_ok());
        assert!(check_one("modalities", json!(["text", "audio"]), Endpoint::Chat).is_err());
        assert!(check_one("audio", Value::Null, Endpoint::Chat).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = check_one("n_probs", json!(3), Endpoint::Chat).unwrap_err();
        assert!(err.starts_with("n_probs: ") && err.contains("not a field this server knows"), "{err}");
    }
}
