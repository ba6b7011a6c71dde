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
//! A tree whose text differs (another `LLAMA_CPP_DIR`) builds unpatched, with a warning, and a
//! lost server aborts there as upstream. How the copies are made and compiled: source_patch.rs.

use crate::source_patch::{Edit, Spec};

pub static SPEC: Spec = Spec {
    id: "rpc",
    tree_dir: "ggml/src/ggml-rpc",
    edits: EDITS,
    copied: &[],
    own: &["rpc-watch/exsa_rpc_watch.h", "rpc-watch/exsa_rpc_watch.cpp"],
    own_sources: &["rpc-watch/exsa_rpc_watch.cpp"],
    targets_dir: "ggml/src/ggml-rpc",
    required: true,
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source_patch::first_line;

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
}
