//! llama.cpp's chat layer (feature `chat`): the part of its `common` library that renders Jinja
//! chat templates with tools, builds tool-call grammars and parses replies (`common/chat.cpp` and
//! what it calls), compiled with the cc crate beside our C surface (`chat/exsa_chat.cpp`).
//!
//! It is compiled from a copy of `common/` in the build folder, with llama.cpp's Jinja parser's
//! `assert`s on malformed templates turned into exceptions ([`EDITS`]): an assert aborts the
//! process (and compiled out, a node of the wrong type would reach a null dereference), where an
//! exception comes back from the shim as a parse error. The vendored tree is not touched.
//!
//! Not upstream's whole `llama-common` target: that brings the argument parser, downloads,
//! sampling and speculative decoding. `common.cpp` and `log.cpp` stay out too; the few functions
//! the chat code calls from them are in `chat/exsa_common_min.cpp`. The list follows the pinned
//! tree: a file that is not there stops the build by name.

use std::path::{Path, PathBuf};

use crate::source_patch::{self, Edit};

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

/// The Jinja parser's checks of what it parsed, as exceptions instead of `assert`s (found by the
/// template fuzzer, `crates/llama/tests/fuzz.rs`: `{% macro 5() %}` aborted the process); and
/// the time templates print taken from the request.
const EDITS: &[Edit] = &[
    Edit {
        file: "jinja/runtime.h",
        anchor: "    assert(dynamic_cast<T *>(ptr.get()) != nullptr);\n",
        replacement: "    if (dynamic_cast<T *>(ptr.get()) == nullptr) { throw std::runtime_error(\"malformed template: a statement of the wrong kind\"); }\n",
    },
    Edit {
        file: "jinja/runtime.h",
        anchor: "    assert(dynamic_cast<T *>(ptr.get()) != nullptr || dynamic_cast<U *>(ptr.get()) != nullptr);\n",
        replacement: "    if (dynamic_cast<T *>(ptr.get()) == nullptr && dynamic_cast<U *>(ptr.get()) == nullptr) { throw std::runtime_error(\"malformed template: a statement of the wrong kind\"); }\n",
    },
    Edit {
        file: "jinja/parser.cpp",
        anchor: "        assert(start_pos < tokens.size());\n",
        replacement: "        if (start_pos >= tokens.size()) { throw std::runtime_error(\"malformed template: it ends too early\"); }\n",
    },
    // The time a template prints (`strftime_now`, the `datetime` of the extra context) is the
    // request's `now` (llama-server passes its clock there), not a second reading of the clock:
    // a render is then reproducible (the recorded parity test ran into a new day).
    Edit {
        file: "chat.cpp",
        anchor: "    jinja::context ctx(tmpl.source());\n",
        replacement: "    jinja::context ctx(tmpl.source());\n    ctx.current_time = std::chrono::system_clock::to_time_t(inputs.now);\n",
    },
    Edit {
        file: "chat.cpp",
        anchor: "static json common_chat_extra_context() {\n    json ctx = json::object();\n    std::chrono::system_clock::time_point now = std::chrono::system_clock::now();\n",
        replacement: "static json common_chat_extra_context(std::chrono::system_clock::time_point now) {\n    json ctx = json::object();\n",
    },
    Edit {
        file: "chat.cpp",
        anchor: "    params.extra_context = common_chat_extra_context();\n",
        replacement: "    params.extra_context = common_chat_extra_context(params.now);\n",
    },
];

/// `common/` copied into `out` with [`EDITS`] applied; the copy's path.
fn patched_common(common: &Path, out: &Path) -> Result<PathBuf, String> {
    let copy = out.join("exsa-chat-common");
    let mut applied = 0;
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = common.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let name = rel.join(entry.file_name());
            let path = entry.path();
            if path.is_dir() {
                pending.push(name);
                continue;
            }
            if !path.extension().is_some_and(|e| ["h", "hpp", "cpp", "c"].iter().any(|x| e == *x)) {
                continue;
            }
            let mut text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let unix_name = name.to_string_lossy().replace('\\', "/");
            for edit in EDITS.iter().filter(|e| e.file == unix_name) {
                text = source_patch::apply(&text, edit).map_err(|e| format!("common/{}: {e}", edit.file))?;
                applied += 1;
            }
            let target = copy.join(&name);
            std::fs::create_dir_all(target.parent().expect("a file in a folder")).map_err(|e| format!("cannot create {}: {e}", copy.display()))?;
            source_patch::write_if_changed(&target, &text).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        }
    }
    if applied != EDITS.len() {
        return Err(format!("{} of the chat layer's {} edits found their file (build/chat.rs)", applied, EDITS.len()));
    }
    Ok(copy)
}

/// Whether the crate was built with the `chat` feature.
pub fn enabled() -> bool {
    std::env::var_os("CARGO_FEATURE_CHAT").is_some()
}

/// Compiles the chat layer into the static library `exsa_chat`, linked before the shim and
/// llama.cpp, whose functions it calls.
pub fn compile(manifest_dir: &Path, llama_source: &Path) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let common =
        patched_common(&llama_source.join("common"), &out).unwrap_or_else(|e| crate::fail(&format!("cannot prepare llama.cpp's chat layer: {e}")));
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
