//! Checks of the crates' shape, run as tests: no import cycle between the top-level modules of
//! `exsa-engine` and `llama` (read from their `crate::` paths), and a library build of
//! `exsa-engine` that pulls in no server or CLI dependency.

#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::workspace;

/// Each top-level module of a crate and the top-level modules its code names (`crate::x::...`,
/// or an item the crate root re-exports from `x`). `files` are (path under `src/`, text).
fn module_graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let module_of = |path: &str| -> Option<String> {
        let first = path.split('/').next()?;
        match first {
            "lib.rs" | "main.rs" | "bin" => None,
            f => Some(f.trim_end_matches(".rs").to_string()),
        }
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|(p, _)| module_of(p)).collect();
    // Items the root re-exports (`pub use module::{A, B};`) stand for their module.
    let mut reexported: BTreeMap<String, String> = BTreeMap::new();
    if let Some((_, lib)) = files.iter().find(|(p, _)| p == "lib.rs") {
        let code = strip_comments(lib);
        for statement in code.split(';').filter_map(|s| s.trim().strip_prefix("pub use ")) {
            let Some((module, items)) = statement.split_once("::") else { continue };
            if modules.contains(module) {
                for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
                    let name = item.split(" as ").last().unwrap_or("").trim();
                    if !name.is_empty() {
                        reexported.insert(name.to_string(), module.to_string());
                    }
                }
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (path, text) in files {
        let Some(from) = module_of(path) else { continue };
        let code = strip_comments(text);
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let before = rest[..at].chars().last();
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `llama_crate::`, not `crate::`
            }
            // `crate::{a, b::C}` names several.
            let names: Vec<&str> = match after.strip_prefix('{') {
                Some(list) => list[..list.find('}').unwrap_or(list.len())].split(',').map(|n| n.trim()).collect(),
                None => vec![after],
            };
            for name in names {
                let ident: String = name.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let to = if modules.contains(&ident) { Some(ident) } else { reexported.get(&ident).cloned() };
                if let Some(to) = to.filter(|to| *to != from) {
                    graph.get_mut(&from).expect("every module has a node").insert(to);
                }
            }
        }
    }
    graph
}

/// The code of a Rust file without its comments (doc comments' links are not imports); string
/// and character literals are kept whole, so a `//` inside one is no comment.
fn strip_comments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += rest[body..].find(&close).map_or(rest.len(), |e| body + e + close.len());
            out.push_str("\"\"");
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            i += (j + 1).min(rest.len());
            out.push_str("\"\"");
        } else if rest.starts_with("'\"'") {
            i += 3;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The groups of modules that depend on each other in a ring (strongly connected components of
/// more than one module), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by search from each module: the crates have a few dozen modules.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|m| (m, reach(m))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for m in graph.keys() {
        let group: Vec<String> = graph.keys().filter(|n| *n == m || (reachable[m].contains(*n) && reachable[*n].contains(m))).cloned().collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

/// Every `.rs` file under `src` of a crate, as (path under `src/`, text).
fn crate_files(src: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(src).unwrap().to_string_lossy().replace('\\', "/");
                files.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files
}

fn edges(pairs: &[(&str, &str)], modules: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.to_string(), BTreeSet::new())).collect();
    for (a, b) in pairs {
        graph.get_mut(*a).unwrap().insert(b.to_string());
    }
    graph
}

#[test]
fn the_graph_reads_paths_lists_and_root_reexports_and_skips_comments_and_strings() {
    let files = [
        ("lib.rs".to_string(), "mod a; mod b; mod c;\npub use c::{Thing, Other as Renamed};\n".to_string()),
        ("a.rs".to_string(), "use crate::{b::X, Thing};\n// crate::c in a comment\nconst S: &str = \"crate::c\";\n".to_string()),
        ("b/mod.rs".to_string(), "mod inner;\n/// [`crate::a`] in a doc link\nfn f() -> crate::Renamed { todo!() }\n".to_string()),
        ("b/inner.rs".to_string(), "use crate::b::Y; use super::Z; fn g(x: llama_crate::T) {}\n".to_string()),
        ("c.rs".to_string(), "let s = r#\"crate::a\"#;".to_string()),
    ];
    let graph = module_graph(&files);
    assert_eq!(graph["a"], ["b", "c"].map(String::from).into());
    assert_eq!(graph["b"], ["c"].map(String::from).into(), "its own submodule and `super` are no edges");
    assert!(graph["c"].is_empty(), "raw strings are not code");
}

#[test]
fn rings_of_any_length_are_found_and_a_chain_is_not_one() {
    let modules = ["a", "b", "c", "d"];
    assert!(cycles(&edges(&[("a", "b"), ("b", "c"), ("a", "c")], &modules)).is_empty());
    assert_eq!(cycles(&edges(&[("a", "b"), ("b", "a"), ("c", "d")], &modules)), vec![vec!["a", "b"]]);
    assert_eq!(cycles(&edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")], &modules)), vec![vec!["a", "b", "c"]]);
}

#[test]
fn no_import_cycle_between_the_modules_of_the_engine_and_the_safe_wrapper() {
    for krate in ["engine", "llama"] {
        let graph = module_graph(&crate_files(&workspace::root().join("crates").join(krate).join("src")));
        assert!(graph.len() > 5, "{krate}: too few modules read: {graph:?}");
        let rings = cycles(&graph);
        assert!(rings.is_empty(), "crates/{krate}: modules that import each other in a ring: {rings:?}\n{graph:#?}");
    }
}

#[test]
fn the_engine_as_a_library_pulls_in_no_server_or_cli_crate() {
    for features in ["source", "crate", "raw"] {
        let out = workspace::cargo()
            .args(["tree", "--locked", "-p", "exsa-engine", "--no-default-features", "--features", features])
            .args(["-e", "normal", "--prefix", "none", "--format", "{p}"])
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8_lossy(&out.stdout);
        let names: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(names.contains("exsa-engine") && names.contains("serde"), "{features}: not a tree: {tree}");
        for server_side in ["axum", "tokio", "tokio-stream", "hyper", "clap", "tracing-subscriber", "reqwest"] {
            assert!(!names.contains(server_side), "{features}: the library build pulls in {server_side}");
        }
    }
}
