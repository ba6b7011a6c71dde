//! Our chat layer against llama-server's renders, recorded by `cargo xtask template-parity
//! --record` (tests/data/llama_server_renders.json): every template of llama.cpp's corpus, each
//! conversation of the record, rendered here from the template's source on the default model
//! with the record's date, must give llama-server's prompt byte for byte; the only difference
//! allowed is the one by design, a template without tools given tools (our generic format). The
//! live comparison, `exsa serve` against a llama-server it builds, is `cargo xtask
//! template-parity` (in `cargo xtask test --full`).
#![cfg(feature = "chat")]

mod common;

use std::path::PathBuf;

use llama::chat_templates::ChatTemplates;
use serde_json::Value;

#[test]
fn every_corpus_template_renders_as_llama_server_does() {
    let record_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama_server_renders.json");
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    let corpus = PathBuf::from(std::env::var("EXSA_CHAT_TEMPLATES").expect("EXSA_CHAT_TEMPLATES is set by .cargo/config.toml"));
    let now = record["now"].as_i64().unwrap();
    let (mut equal, mut by_design, mut differ) = (0, 0, Vec::new());
    let renders = record["renders"].as_array().unwrap();
    for (template, group) in renders.chunk_by(|a, b| a["template"] == b["template"]).map(|g| (g[0]["template"].as_str().unwrap(), g)) {
        let source = std::fs::read_to_string(corpus.join(format!("{template}.jinja"))).unwrap();
        let templates = ChatTemplates::from_model(common::model(), Some(&source));
        for render in group {
            let conversation = render["conversation"].as_str().unwrap();
            let mut request = record["conversations"][conversation].clone();
            request["now"] = now.into();
            let ours = templates.as_ref().map_err(ToString::to_string).and_then(|t| t.apply(&request).map_err(|e| e.to_string()));
            match (&ours, render["prompt"].as_str()) {
                (Ok(ours), Some(theirs)) if ours.prompt == theirs => equal += 1,
                (Err(_), None) => equal += 1,
                (Ok(ours), _) if ours.is_generic() => by_design += 1,
                (ours, theirs) => differ.push(format!(
                    "{template} / {conversation}:\n  ours:         {:?}\n  llama-server: {theirs:?}",
                    ours.as_ref().map(|p| &p.prompt)
                )),
            }
        }
    }
    println!("{equal} equal, {by_design} different by design, {} different ({})", differ.len(), record["llama_server"]);
    assert!(differ.is_empty(), "renders differ from llama-server's:\n{}", differ.join("\n"));
    assert!(equal >= 300, "too few renders compared: {equal}");
}
