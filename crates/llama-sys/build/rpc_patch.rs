//! ggml's RPC client, patched so that losing a server is an error the caller sees, not an abort.
//!
//! Upstream (protocol 7.0) each connection has a dispatcher thread that `GGML_ABORT`s when a
//! reply fails; nothing on the caller's thread can catch that (the shim's abort hook only turns
//! fatal errors on the *calling* thread into exceptions). The patch replaces that one assertion
//! with a report to `rpc-watch/exsa_rpc_watch.cpp` and keeps the dispatcher completing messages,
//! numbers connections, and gives every RPC socket keepalive probes. Nothing else in ggml
//! changes: local inference compiles from the pinned tree as it is, so the A/B comparison is
//! unaffected.
//!
//! The edits are exact-text substitutions on copies of the two files; a tree whose text differs
//! (another `LLAMA_CPP_DIR`) builds unpatched, with a warning, and a lost server aborts there as
//! upstream. CMake swaps the copies into the `ggml-rpc` target once the tree is configured
//! (`CMAKE_PROJECT_INCLUDE` defers a call to the end of the top-level directory).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The directory of our C++ side, relative to the crate.
const WATCH_DIR: &str = "rpc-watch";
const WATCH_FILES: [&str; 2] = ["exsa_rpc_watch.h", "exsa_rpc_watch.cpp"];
const RPC_DIR: &str = "ggml/src/ggml-rpc";
/// `cmake_language(DEFER)` needs it.
pub const MIN_CMAKE: (u32, u32) = (3, 19);

/// One substitution: `anchor` must occur exactly once in `file`.
struct Edit {
    file: &'static str,
    anchor: &'static str,
    replacement: &'static str,
}

const WATCH_INCLUDE: &str = "#include \"transport.h\"\n#include \"exsa_rpc_watch.h\"\n";

const EDITS: &[Edit] = &[
    Edit { file: "ggml-rpc.cpp", anchor: "#include \"transport.h\"\n", replacement: WATCH_INCLUDE },
    Edit {
        file: "ggml-rpc.cpp",
        anchor: "    std::atomic_bool running;\n    std::thread      thread;\n};\n",
        replacement: "    std::atomic_bool running;\n    std::thread      thread;\n    uint64_t         exsa_id = 0;\n};\n",
    },
    Edit {
        file: "ggml-rpc.cpp",
        anchor: "    running = true;\n    thread = std::thread(rpc_dispatcher_trampoline, this);\n",
        replacement: "    exsa_id = exsa_rpc_watch_connected(endpoint.c_str());\n    running = true;\n    thread = std::thread(rpc_dispatcher_trampoline, this);\n",
    },
    Edit {
        file: "ggml-rpc.cpp",
        anchor: "        if (msg_ptr->cmd != RPC_CMD_NONE) {
            if (msg_ptr->output) {
                bool status = send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size, msg_ptr->output, msg_ptr->output_size);
                RPC_STATUS_ASSERT(status);
            } else {
                bool status = send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size);
                RPC_STATUS_ASSERT(status);
            }
        }
        msg_ptr->completion.set_value();
",
        // Once lost, nothing more is sent (the stream is out of step) and replies read as zeros,
        // so no caller waits forever; callers check exsa_rpc_watch_is_lost before trusting them.
        replacement: "        if (msg_ptr->cmd != RPC_CMD_NONE && !exsa_lost) {
            bool status = msg_ptr->output
                ? send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size, msg_ptr->output, msg_ptr->output_size)
                : send_rpc_cmd(sock, msg_ptr->cmd, msg_ptr->input.get(), msg_ptr->input_size);
            if (!status) {
                exsa_lost = true;
                exsa_rpc_watch_lost(exsa_id);
            }
        }
        if (exsa_lost && msg_ptr->output != nullptr) {
            memset(msg_ptr->output, 0, msg_ptr->output_size);
        }
        msg_ptr->completion.set_value();
",
    },
    Edit {
        file: "ggml-rpc.cpp",
        anchor: "void rpc_dispatcher::work() {\n",
        replacement: "void rpc_dispatcher::work() {\n    bool exsa_lost = false;\n",
    },
    Edit { file: "transport.cpp", anchor: "#include \"transport.h\"\n", replacement: WATCH_INCLUDE },
    Edit {
        file: "transport.cpp",
        anchor: "    int ret = setsockopt(sockfd, IPPROTO_TCP, TCP_NODELAY, (char *)&flag, sizeof(int));\n    return ret == 0;\n",
        replacement: "    int ret = setsockopt(sockfd, IPPROTO_TCP, TCP_NODELAY, (char *)&flag, sizeof(int));\n    exsa_rpc_watch_socket((intptr_t) sockfd);\n    return ret == 0;\n",
    },
];

/// The patched files, in memory until a build folder is known.
pub struct Patch {
    files: Vec<(String, String)>,
}

impl Patch {
    /// Applies every edit to the tree at `source`, or says which anchor is missing.
    pub fn prepare(source: &Path, manifest_dir: &Path) -> Result<Patch, String> {
        let mut files: Vec<(String, String)> = Vec::new();
        for edit in EDITS {
            if !files.iter().any(|(name, _)| name == edit.file) {
                let path = source.join(RPC_DIR).join(edit.file);
                let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                files.push((edit.file.to_string(), text));
            }
            let text = &mut files.iter_mut().find(|(name, _)| name == edit.file).expect("read above").1;
            *text = apply(text, edit).map_err(|e| format!("{RPC_DIR}/{}: {e}", edit.file))?;
        }
        for name in WATCH_FILES {
            let path = manifest_dir.join(WATCH_DIR).join(name);
            println!("cargo:rerun-if-changed={}", path.display());
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            files.push((name.to_string(), text));
        }
        Ok(Patch { files })
    }

    /// Changes with any byte of what gets compiled: part of the build folder's key.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in &self.files {
            h.update(name);
            h.update(text);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes the files into `dir` and returns the CMake script that swaps them in, to pass as
    /// CMAKE_PROJECT_INCLUDE.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in &self.files {
            write_if_changed(&dir.join(name), text)?;
        }
        let script = dir.join("swap-rpc-sources.cmake");
        write_if_changed(&script, &swap_script(dir))?;
        Ok(script)
    }
}

fn apply(text: &str, edit: &Edit) -> Result<String, String> {
    match text.matches(edit.anchor).count() {
        1 => Ok(text.replacen(edit.anchor, edit.replacement, 1)),
        0 => Err(format!("the text to patch is not there (another llama.cpp version?): {:?}", first_line(edit.anchor))),
        n => Err(format!("the text to patch occurs {n} times: {:?}", first_line(edit.anchor))),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or(text).trim()
}

/// Rewriting an unchanged file would make CMake recompile it.
fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(path, text)
}

fn swap_script(dir: &Path) -> String {
    // CMake wants forward slashes, also on Windows.
    let dir = dir.display().to_string().replace('\\', "/");
    format!(
        r#"# Written by llama-sys' build script (build/rpc_patch.rs): once the tree is configured, the
# ggml-rpc target compiles the patched copies in this folder instead of the originals.
include_guard(GLOBAL)
function(exsa_swap_rpc_sources)
    if (NOT TARGET ggml-rpc)
        message(FATAL_ERROR "llama-sys: the RPC switch is on but the tree defines no ggml-rpc target")
    endif()
    get_target_property(sources ggml-rpc SOURCES)
    get_target_property(origin ggml-rpc SOURCE_DIR)
    set(swapped)
    foreach(src IN LISTS sources)
        get_filename_component(name "${{src}}" NAME)
        if (name STREQUAL "ggml-rpc.cpp" OR name STREQUAL "transport.cpp")
            list(APPEND swapped "{dir}/${{name}}")
        elseif (IS_ABSOLUTE "${{src}}")
            list(APPEND swapped "${{src}}")
        else()
            list(APPEND swapped "${{origin}}/${{src}}")
        endif()
    endforeach()
    list(APPEND swapped "{dir}/exsa_rpc_watch.cpp")
    set_property(TARGET ggml-rpc PROPERTY SOURCES ${{swapped}})
    target_include_directories(ggml-rpc PRIVATE "${{origin}}" "{dir}")
    message(STATUS "llama-sys: ggml-rpc compiles the patched client in {dir}")
endfunction()
cmake_language(DEFER DIRECTORY "${{CMAKE_SOURCE_DIR}}" CALL exsa_swap_rpc_sources)
"#
    )
}

/// Whether `cmake --version` printed a version this patch can use.
pub fn cmake_supports(version_output: &str) -> bool {
    let Some(version) = version_output.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit())) else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= MIN_CMAKE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_must_occur_exactly_once() {
        let edit = Edit { file: "f", anchor: "b\n", replacement: "B\n" };
        assert_eq!(apply("a\nb\nc\n", &edit).unwrap(), "a\nB\nc\n");
        assert!(apply("a\nc\n", &edit).unwrap_err().contains("not there"));
        assert!(apply("b\nb\n", &edit).unwrap_err().contains("2 times"));
    }

    #[test]
    fn every_edit_keeps_its_anchor_or_adds_to_it() {
        // The work() edit replaces the abort; all the others only add lines: the anchor's lines
        // stay, in order.
        for edit in EDITS.iter().filter(|e| !e.anchor.contains("RPC_STATUS_ASSERT")) {
            let mut kept = edit.replacement.lines();
            assert!(edit.anchor.lines().all(|line| kept.any(|l| l == line)), "{}", first_line(edit.anchor));
        }
        let work = EDITS.iter().find(|e| e.anchor.contains("RPC_STATUS_ASSERT")).unwrap();
        assert!(!work.replacement.contains("GGML_ABORT") && !work.replacement.contains("RPC_STATUS_ASSERT"));
        assert!(work.replacement.contains("exsa_rpc_watch_lost") && work.replacement.contains("completion.set_value()"));
    }

    #[test]
    fn cmake_versions_are_compared_by_number() {
        assert!(cmake_supports("cmake version 3.25.1\n\nCMake suite maintained"));
        assert!(cmake_supports("cmake version 4.0.2"));
        assert!(cmake_supports("cmake version 3.19.0-rc1"));
        assert!(!cmake_supports("cmake version 3.18.4"));
        assert!(!cmake_supports("cmake version 3.9.2"));
        assert!(!cmake_supports("no version here"));
    }
}
