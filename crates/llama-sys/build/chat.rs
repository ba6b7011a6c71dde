//! llama.cpp's chat layer (feature `chat`): the part of its `common` library that renders Jinja
//! chat templates with tools, builds tool-call grammars and parses replies (`common/chat.cpp` and
//! what it calls), compiled with the cc crate beside our C surface (`chat/exsa_chat.cpp`).
//!
//! Not upstream's whole `llama-common` target: that brings the argument parser, downloads,
//! sampling and speculative decoding. `common.cpp` and `log.cpp` stay out too; the few functions
//! the chat code calls from them are in `chat/exsa_common_min.cpp`. The list follows the pinned
//! tree: a file that is not there stops the build by name.

use std::path::Path;

pub const HEADER: &str = "chat/exsa_chat.h";
const OWN: [&str; 2] = ["chat/exsa_chat.cpp", "chat/exsa_common_min.cpp"];

/// The chat code of the pinned tree and what it calls, relative to `common/`.
const COMMON_SOURCES: &[&str] = &[
    "chat.cpp",
    "chat-auto-parser-generator.cpp",
    "chat-auto-parser-helpers.cpp",
    "chat-diff-analyzer.cpp",
    "chat-peg-parser.cpp",
    "peg-parser.cpp",
    "json-schema-to-grammar.cpp",
    "json-schema.cpp",
    "json.cpp",
    "trie.cpp",
    "unicode.cpp",
    "jinja/caps.cpp",
    "jinja/lexer.cpp",
    "jinja/parser.cpp",
    "jinja/runtime.cpp",
    "jinja/string.cpp",
    "jinja/value.cpp",
    "parsers/parsers.cpp",
    "parsers/cohere2moe.cpp",
    "parsers/deepseek.cpp",
    "parsers/functionary-v3-2.cpp",
    "parsers/gemma4.cpp",
    "parsers/gigachat-v3.cpp",
    "parsers/gpt-oss.cpp",
    "parsers/kimi-k2.cpp",
    "parsers/kimi-k3.cpp",
    "parsers/lfm2.cpp",
    "parsers/ling3.cpp",
    "parsers/llm-jp-harmony.cpp",
    "parsers/minicpm5.cpp",
    "parsers/minimax-m3.cpp",
    "parsers/ministral3.cpp",
    "parsers/muse-glimmer.cpp",
    "parsers/qwen3-coder.cpp",
];

/// Whether the crate was built with the `chat` feature.
pub fn enabled() -> bool {
    std::env::var_os("CARGO_FEATURE_CHAT").is_some()
}

/// Compiles the chat layer into the static library `exsa_chat`, linked before the shim and
/// llama.cpp, whose functions it calls.
pub fn compile(manifest_dir: &Path, llama_source: &Path) {
    let common = llama_source.join("common");
    let mut build = crate::shim::guarded_cpp(manifest_dir, llama_source);
    for file in COMMON_SOURCES {
        let path = common.join(file);
        if !path.is_file() {
            crate::fail(&format!("the chat layer's source {} is not in the llama.cpp tree (update build/chat.rs with the pin)", path.display()));
        }
        build.file(path);
    }
    for file in OWN.iter().chain([&HEADER]) {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(file).display());
    }
    for file in OWN {
        build.file(manifest_dir.join(file));
    }
    build
        .include(manifest_dir.join("chat"))
        .include(&common)
        .include(llama_source.join("vendor"))
        // Upstream's code, not ours to clean up.
        .warnings(false)
        .try_compile("exsa_chat")
        .unwrap_or_else(|e| crate::fail(&format!("cannot compile llama.cpp's chat layer (build/chat.rs): {e}")));
}
