//! GBNF grammars for JSON output: any JSON object (OpenAI's `response_format: json_object`),
//! or the JSON a schema describes (`json_schema`).
//!
//! The schema converter covers what structured-output schemas use (pydantic's, OpenAI's strict
//! mode): `type` (one or a list), `properties`/`required`/`additionalProperties`, `items`,
//! `prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`, `enum`, `const`, `anyOf`/
//! `oneOf`, a single-entry `allOf`, and `$ref` into `#/$defs` or `#/definitions` (recursion
//! included). A keyword that would constrain the output but is not understood (`pattern`,
//! `minimum`, ...) is an error naming it and where it is, never silently dropped: output that
//! ignores part of the schema would break the promise. Annotations (`title`, `description`,
//! `format`, ...) are ignored, as JSON Schema allows.
//!
//! Objects: properties come in the schema's order, required ones always, optional ones where
//! the model wants them; other keys only where `additionalProperties` allows them (absent means
//! none, as OpenAI's strict mode has it). Whitespace between tokens is bounded, so a model
//! cannot loop on blanks forever.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use serde_json::{Map, Value};

/// A schema the converter cannot turn into a grammar.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("JSON schema at {path}: {reason}")]
pub struct SchemaError {
    /// Where in the schema, as a JSON pointer (`#/properties/name`).
    pub path: String,
    /// What is wrong there (an unsupported keyword, a bad value, ...).
    pub reason: String,
}

/// The rules every JSON grammar here shares.
const PRIMITIVES: &[(&str, &str)] = &[
    ("space", r#"| " " | "\n" [ \t]{0,20}"#),
    ("char", r#"[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#),
    ("string", r#""\"" char* "\"" space"#),
    ("integral-part", r#"[0] | [1-9] [0-9]{0,15}"#),
    ("number", r#"("-"? integral-part) ("." [0-9]{1,16})? ([eE] [-+]? integral-part)? space"#),
    ("integer", r#"("-"? integral-part) space"#),
    ("boolean", r#"("true" | "false") space"#),
    ("null", r#""null" space"#),
    ("value", r#"object | array | string | number | boolean | null"#),
    ("object", r#""{" space ( string ":" space value ("," space string ":" space value)* )? "}" space"#),
    ("array", r#""[" space ( value ("," space value)* )? "]" space"#),
];

/// Any JSON object: what `response_format: {"type": "json_object"}` asks for.
pub fn json_object_grammar() -> String {
    let mut out = String::from("root ::= object\n");
    write_primitives(&mut out);
    out
}

/// Appends the shared rules.
fn write_primitives(out: &mut String) {
    for (name, body) in PRIMITIVES {
        let _ = writeln!(out, "{name} ::= {body}");
    }
}

/// A grammar whose `root` matches exactly the JSON values `schema` describes (see the module
/// notes for what is understood).
pub fn json_schema_grammar(schema: &Value) -> Result<String, SchemaError> {
    let mut c = Converter { root: schema, rules: Vec::new(), names: HashSet::new(), refs: HashMap::new() };
    for (name, _) in PRIMITIVES {
        c.names.insert((*name).to_string());
    }
    let root = c.visit(schema, "root", "#")?;
    // A schema that made a rule of its own named it `root` already.
    let mut out = if root == "root" { String::new() } else { format!("root ::= {root}\n") };
    for (name, body) in &c.rules {
        let _ = writeln!(out, "{name} ::= {body}");
    }
    // The primitives are few and small: always included, whether used or not.
    write_primitives(&mut out);
    Ok(out)
}

/// Keywords that describe or organise a schema and do not constrain values.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "format",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
    "name",
];

struct Converter<'a> {
    root: &'a Value,
    /// Rules made so far, in order.
    rules: Vec<(String, String)>,
    names: HashSet<String>,
    /// `$ref` targets already given a rule (or being converted: recursion ends there).
    refs: HashMap<String, String>,
}

impl<'a> Converter<'a> {
    /// An expression for `schema`: a primitive's name, a new rule's name, or an inline
    /// expression.
    fn visit(&mut self, schema: &'a Value, hint: &str, path: &str) -> Result<String, SchemaError> {
        let object = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => return Err(error(path, "`false` matches nothing")),
            Value::Object(o) => o,
            _ => return Err(error(path, "a schema must be an object or a boolean")),
        };
        self.check_keywords(object, path)?;
        if let Some(reference) = object.get("$ref") {
            return self.visit_ref(reference, path);
        }
        if let Some(value) = object.get("const") {
            return Ok(literal(value));
        }
        if let Some(values) = object.get("enum") {
            let values = values.as_array().filter(|v| !v.is_empty()).ok_or_else(|| error(path, "`enum` must be a non-empty list"))?;
            return Ok(group(values.iter().map(literal)));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = object.get(key) {
                let options = options.as_array().filter(|v| !v.is_empty()).ok_or_else(|| error(path, format!("`{key}` must be a non-empty list")))?;
                let mut alternatives = Vec::new();
                for (i, option) in options.iter().enumerate() {
                    alternatives.push(self.visit(option, &format!("{hint}-{i}"), &format!("{path}/{key}/{i}"))?);
                }
                return Ok(group(alternatives.into_iter()));
            }
        }
        if let Some(all) = object.get("allOf") {
            return match all.as_array().map(Vec::as_slice) {
                Some([one]) => self.visit(one, hint, &format!("{path}/allOf/0")),
                _ => Err(error(path, "`allOf` with more than one schema is not supported")),
            };
        }
        let types: Vec<&str> = match object.get("type") {
            None if object.contains_key("properties") || object.contains_key("additionalProperties") => vec!["object"],
            None if object.contains_key("items") || object.contains_key("prefixItems") => vec!["array"],
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => {
                ts.iter().map(|t| t.as_str().ok_or_else(|| error(path, "`type` lists must hold strings"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(error(path, "`type` must be a string or a list of strings")),
        };
        let mut alternatives = Vec::new();
        for t in types {
            alternatives.push(match t {
                "string" => self.string(object, hint, path)?,
                "number" | "integer" | "boolean" | "null" => t.to_string(),
                "object" => self.object(object, hint, path)?,
                "array" => self.array(object, hint, path)?,
                other => return Err(error(path, format!("unknown type {other:?}"))),
            });
        }
        Ok(group(alternatives.into_iter()))
    }

    /// Refuses keywords that constrain values in ways this converter does not implement.
    fn check_keywords(&self, object: &Map<String, Value>, path: &str) -> Result<(), SchemaError> {
        const UNDERSTOOD: &[&str] = &[
            "$ref",
            "const",
            "enum",
            "anyOf",
            "oneOf",
            "allOf",
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "prefixItems",
            "minItems",
            "maxItems",
            "minLength",
            "maxLength",
        ];
        match object.keys().find(|k| !UNDERSTOOD.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str())) {
            Some(k) => Err(error(path, format!("the keyword `{k}` is not supported"))),
            None => Ok(()),
        }
    }

    fn visit_ref(&mut self, reference: &Value, path: &str) -> Result<String, SchemaError> {
        let reference = reference.as_str().ok_or_else(|| error(path, "`$ref` must be a string"))?;
        if let Some(name) = self.refs.get(reference) {
            return Ok(name.clone());
        }
        let pointer = reference.strip_prefix('#').filter(|p| p.starts_with("/$defs/") || p.starts_with("/definitions/"));
        let target = pointer
            .and_then(|p| self.root.pointer(p))
            .ok_or_else(|| error(path, format!("`$ref` {reference:?} does not point into this schema's $defs or definitions")))?;
        let name = self.fresh(reference.rsplit('/').next().unwrap_or("ref"));
        self.refs.insert(reference.to_string(), name.clone());
        let body = self.visit(target, &name, reference)?;
        self.rules.push((name.clone(), body));
        Ok(name)
    }

    fn string(&mut self, object: &Map<String, Value>, hint: &str, path: &str) -> Result<String, SchemaError> {
        let (min, max) = (count(object, "minLength", path)?, count(object, "maxLength", path)?);
        if min.is_none() && max.is_none() {
            return Ok("string".into());
        }
        Ok(self.rule(hint, format!(r#""\"" {} "\"" space"#, repeat("char", min, max, path)?)))
    }

    fn array(&mut self, object: &'a Map<String, Value>, hint: &str, path: &str) -> Result<String, SchemaError> {
        // `items` as a list is the older form of a tuple (`prefixItems`), with nothing after it.
        let (tuple, tuple_key, items) = match (object.get("prefixItems"), object.get("items")) {
            (Some(prefix), items) => (Some(prefix), "prefixItems", items),
            (None, Some(list @ Value::Array(_))) => (Some(list), "items", None),
            (None, items) => (None, "", items),
        };
        let items = match items {
            None => "value".to_string(),
            Some(items) => self.visit(items, &format!("{hint}-item"), &format!("{path}/items"))?,
        };
        if let Some(prefix) = tuple {
            let prefix = prefix.as_array().ok_or_else(|| error(path, format!("`{tuple_key}` must be a list")))?;
            let mut parts = Vec::new();
            for (i, p) in prefix.iter().enumerate() {
                parts.push(self.visit(p, &format!("{hint}-{i}"), &format!("{path}/{tuple_key}/{i}"))?);
            }
            // A tuple: exactly these, then more of `items` only if the schema gives them.
            let tail = if tuple_key == "prefixItems" && object.contains_key("items") { format!(r#" ("," space {items})*"#) } else { String::new() };
            let body = if parts.is_empty() { String::new() } else { format!(" {}{tail}", parts.join(r#" "," space "#)) };
            return Ok(self.rule(hint, format!(r#""[" space{body} "]" space"#)));
        }
        let (min, max) = (count(object, "minItems", path)?, count(object, "maxItems", path)?);
        if let (Some(min), Some(max)) = (min, max)
            && max < min
        {
            return Err(error(path, format!("maxItems ({max}) is below minItems ({min})")));
        }
        let body = match (min.unwrap_or(0), max) {
            (_, Some(0)) => String::new(),
            (0, None) => format!(r#"( {items} ("," space {items})* )?"#),
            (0, Some(max)) => format!(r#"( {items} ("," space {items}){{0,{}}} )?"#, max - 1),
            (min, max) => format!(r#"{items} {}"#, repeat(&format!(r#"("," space {items})"#), Some(min - 1), max.map(|m| m - 1), path)?),
        };
        Ok(self.rule(hint, format!(r#""[" space {body} "]" space"#)))
    }

    fn object(&mut self, object: &'a Map<String, Value>, hint: &str, path: &str) -> Result<String, SchemaError> {
        let properties: Vec<(&'a String, &'a Value)> = match object.get("properties") {
            None => Vec::new(),
            Some(Value::Object(p)) => p.iter().collect(),
            Some(_) => return Err(error(path, "`properties` must be an object")),
        };
        let required: Vec<&str> = match object.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => {
                r.iter().map(|k| k.as_str().ok_or_else(|| error(path, "`required` must list strings"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(error(path, "`required` must be a list")),
        };
        if let Some(missing) = required.iter().find(|k| !properties.iter().any(|(p, _)| p == *k)) {
            return Err(error(path, format!("required property {missing:?} is not in `properties`")));
        }
        let kv = |c: &mut Self, key: &str, schema: &'a Value| -> Result<String, SchemaError> {
            let value = c.visit(schema, &format!("{hint}-{key}"), &format!("{path}/properties/{key}"))?;
            Ok(c.rule(&format!("{hint}-{key}-kv"), format!(r#"{} space ":" space {value}"#, literal_text(&Value::String(key.into())))))
        };
        let mut required_kvs = Vec::new();
        let mut optional_kvs = Vec::new();
        for (key, schema) in properties {
            let rule = kv(self, key, schema)?;
            if required.contains(&key.as_str()) { required_kvs.push(rule) } else { optional_kvs.push(rule) }
        }
        let extra = match object.get("additionalProperties") {
            None | Some(Value::Bool(false)) => None,
            Some(schema) => {
                let value = self.visit(schema, &format!("{hint}-additional"), &format!("{path}/additionalProperties"))?;
                Some(self.rule(&format!("{hint}-additional-kv"), format!(r#"string ":" space {value}"#)))
            }
        };
        let body = if !required_kvs.is_empty() {
            let mut body = required_kvs.join(r#" "," space "#);
            for o in &optional_kvs {
                let _ = write!(body, r#" ("," space {o})?"#);
            }
            if let Some(extra) = &extra {
                let _ = write!(body, r#" ("," space {extra})*"#);
            }
            body
        } else if let Some(extra) = &extra {
            // Keys in any order and number: the declared ones are checked by their own rules.
            let any = group(optional_kvs.iter().cloned().chain([extra.clone()]));
            format!(r#"( {any} ("," space {any})* )?"#)
        } else if optional_kvs.is_empty() {
            String::new()
        } else {
            // Optional keys in order: whichever comes first, then any of those after it.
            let starts = (0..optional_kvs.len()).map(|i| {
                let mut s = optional_kvs[i].clone();
                for later in &optional_kvs[i + 1..] {
                    let _ = write!(s, r#" ("," space {later})?"#);
                }
                s
            });
            format!("{}?", group(starts))
        };
        Ok(self.rule(hint, format!(r#""{{" space {body} "}}" space"#)))
    }

    /// Adds a rule under a fresh name made from `hint`; returns the name.
    fn rule(&mut self, hint: &str, body: String) -> String {
        let name = self.fresh(hint);
        self.rules.push((name.clone(), body));
        name
    }

    fn fresh(&mut self, hint: &str) -> String {
        let mut base: String = hint.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        if base.is_empty() {
            base = "r".into();
        }
        let mut name = base.clone();
        let mut n = 1;
        while !self.names.insert(name.clone()) {
            n += 1;
            name = format!("{base}-{n}");
        }
        name
    }
}

fn error(path: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError { path: path.to_string(), reason: reason.into() }
}

/// A non-negative integer keyword.
fn count(object: &Map<String, Value>, key: &str, path: &str) -> Result<Option<u64>, SchemaError> {
    match object.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| error(path, format!("`{key}` must be a non-negative integer"))),
    }
}

/// `item` repeated between `min` and `max` times in GBNF.
fn repeat(item: &str, min: Option<u64>, max: Option<u64>, path: &str) -> Result<String, SchemaError> {
    let min = min.unwrap_or(0);
    match max {
        Some(max) if max < min => Err(error(path, format!("the maximum ({max}) is below the minimum ({min})"))),
        Some(max) => Ok(format!("{item}{{{min},{max}}}")),
        None => Ok(format!("{item}{{{min},}}")),
    }
}

/// Alternatives, parenthesised when more than one.
fn group(alternatives: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = alternatives.collect();
    if all.len() == 1 { all.into_iter().next().unwrap_or_default() } else { format!("( {} )", all.join(" | ")) }
}

/// A JSON value as a GBNF literal followed by optional space.
fn literal(value: &Value) -> String {
    format!("{} space", literal_text(value))
}

/// A JSON value's compact text as a GBNF string literal.
fn literal_text(value: &Value) -> String {
    let json = value.to_string();
    let mut out = String::with_capacity(json.len() + 2);
    out.push('"');
    for c in json.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn root_rule(grammar: &str) -> &str {
        grammar.lines().find(|l| l.starts_with("root ::= ")).unwrap()
    }

    #[test]
    fn required_properties_come_in_order_and_optional_ones_may_follow() {
        let schema = json!({
            "type": "object",
            "properties": { "name": { "type": "string" }, "age": { "type": "integer" }, "tags": { "type": "array", "items": { "type": "string" } } },
            "required": ["name", "age"]
        });
        let g = json_schema_grammar(&schema).unwrap();
        assert!(g.contains(r#"root-name-kv ::= "\"name\"" space ":" space string"#), "{g}");
        assert!(g.contains(r#"root ::= "{" space root-name-kv "," space root-age-kv ("," space root-tags-kv)? "}" space"#), "{g}");
        assert!(g.contains(r#"root-tags ::= "[" space ( string ("," space string)* )? "]" space"#), "{g}");
    }

    #[test]
    fn enums_consts_unions_and_recursive_refs_become_rules() {
        let schema = json!({
            "$defs": { "node": { "type": "object", "properties": { "children": { "type": "array", "items": { "$ref": "#/$defs/node" } } } } },
            "anyOf": [ { "enum": ["a", 1, null] }, { "const": {"k": "v\"q"} }, { "$ref": "#/$defs/node" }, { "type": ["integer", "null"] } ]
        });
        let g = json_schema_grammar(&schema).unwrap();
        assert!(
            g.starts_with(r#"root ::= ( ( "\"a\"" space | "1" space | "null" space ) | "{\"k\":\"v\\\"q\"}" space | node | ( integer | null ) )"#),
            "{g}"
        );
        // The recursion refers to the rule by name, defined once.
        assert_eq!(g.matches("\nnode ::= ").count(), 1, "{g}");
        assert!(g.contains("node-children ::= \"[\" space ( node (\",\" space node)* )? \"]\" space"), "{g}");
    }

    #[test]
    fn lengths_and_counts_become_bounded_repetitions() {
        let g = json_schema_grammar(&json!({ "type": "string", "minLength": 2, "maxLength": 5 })).unwrap();
        assert!(g.contains(r#"root ::= "\"" char{2,5} "\"" space"#), "{g}");
        let g = json_schema_grammar(&json!({ "type": "array", "items": { "type": "boolean" }, "minItems": 1, "maxItems": 3 })).unwrap();
        assert!(g.contains(r#"root ::= "[" space boolean ("," space boolean){0,2} "]" space"#), "{g}");
        let g = json_schema_grammar(&json!({ "type": "array", "prefixItems": [{ "type": "string" }, { "type": "number" }] })).unwrap();
        assert!(g.contains(r#"root ::= "[" space string "," space number "]" space"#), "{g}");
        // The older tuple form: `items` as a list (no type needed, as llama.cpp's converter reads it).
        let g = json_schema_grammar(&json!({ "items": [{ "type": "integer" }] })).unwrap();
        assert!(g.contains(r#"root ::= "[" space integer "]" space"#), "{g}");
    }

    #[test]
    fn objects_without_required_keys_allow_any_ordered_subset() {
        let g = json_schema_grammar(&json!({ "properties": { "a": { "type": "null" }, "b": { "type": "null" } } })).unwrap();
        assert!(g.contains(r#"root ::= "{" space ( root-a-kv ("," space root-b-kv)? | root-b-kv )? "}" space"#), "{g}");
        let g = json_schema_grammar(&json!({ "type": "object", "additionalProperties": { "type": "number" } })).unwrap();
        assert!(g.contains(r#"root ::= "{" space ( root-additional-kv ("," space root-additional-kv)* )? "}" space"#), "{g}");
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_naming_where() {
        let cases = [
            (json!({ "type": "string", "pattern": "^a+$" }), "#", "pattern"),
            (json!({ "properties": { "n": { "type": "integer", "minimum": 3 } } }), "#/properties/n", "minimum"),
            (json!({ "$ref": "#/$defs/missing" }), "#", "missing"),
            (json!({ "$ref": "https://example.com/schema" }), "#", "does not point"),
            (json!({ "type": "object", "properties": {}, "required": ["x"] }), "#", "\"x\""),
            (json!({ "type": "decimal" }), "#", "decimal"),
            (json!({ "type": "array", "minItems": 3, "maxItems": 1 }), "#", "below minItems"),
            (json!({ "type": "string", "minLength": 3, "maxLength": 1 }), "#", "below the minimum"),
            (json!({ "allOf": [{}, {}] }), "#", "allOf"),
            (json!(false), "#", "matches nothing"),
            (json!(3), "#", "object or a boolean"),
        ];
        for (schema, path, says) in cases {
            let e = json_schema_grammar(&schema).unwrap_err();
            assert_eq!(e.path, path, "{schema}: {e}");
            assert!(e.to_string().contains(says), "{schema}: {e}");
        }
    }

    #[test]
    fn annotations_are_ignored_and_an_empty_schema_is_any_value() {
        let g = json_schema_grammar(&json!({ "title": "T", "description": "d", "$schema": "x", "format": "date-time" })).unwrap();
        assert_eq!(root_rule(&g), "root ::= value");
        assert!(json_object_grammar().starts_with("root ::= object\n"));
    }
}
