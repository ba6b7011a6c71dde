//! ggml's AMX matmul, patched so that it runs where the CPU has AMX instead of crashing, and
//! stays off where the CPU advertises AMX but cannot run it (docs/amx.md).
//!
//! Two faults of the pinned tree, each with its edits:
//! - the crash (SIGSEGV in `ggml_backend_amx_mul_mat`, or SIGILL at its first tile load) is GCC's
//!   `_tile_loadconfig`: its asm declares an 8-byte memory input, so GCC drops the stores that
//!   fill the other 56 bytes of the 64-byte tile configuration, and `ldtilecfg` loads stack
//!   garbage. The configuration is loaded through an operand that is all of it, and each tile
//!   load is fenced (`amx-fix/exsa_amx_tiles.h`);
//! - a multiplication with 3-D activations (recurrent and hybrid models decoding several
//!   sequences: one slice per sequence) adds byte offsets to `float *` and `ggml_fp16_t *`
//!   pointers, writing the second slice's output 4x too far, and offsets the 2-D weight by a
//!   whole matrix per slice, reading past it. Pointers are offset in bytes, the weight is the
//!   same for every slice, and weights with more than 2 dimensions stay off the AMX buffer (its
//!   repacking converts `ne[1]` rows of one matrix only).
//!
//! And ggml asks once per process whether a tile multiply runs, in a child process, before it
//! hands out its AMX buffer type (`amx-fix/exsa_amx_probe.h`). The headers of the folder are
//! copied beside the edited files: `common.h` would otherwise resolve to ggml-cpu's own header of
//! that name.
//!
//! Every x86 build of the pinned tree compiles the patched files (without AMX flags they compile
//! to nothing, as upstream's do), which is what lets the plan turn AMX on by default; another tree
//! (`LLAMA_CPP_DIR`) that does not take the edits builds unpatched with AMX off, and a CMake too
//! old for the swap (source_patch.rs) too.

use crate::source_patch::{Edit, Spec};

pub static SPEC: Spec = Spec {
    id: "amx",
    tree_dir: "ggml/src/ggml-cpu/amx",
    edits: EDITS,
    copied: &["amx.h", "common.h", "mmq.h"],
    own: &["amx-fix/exsa_amx_tiles.h", "amx-fix/exsa_amx_probe.h"],
    own_sources: &[],
    // ggml-cpu and, with GGML_CPU_ALL_VARIANTS, every ggml-cpu-<variant> are defined there.
    targets_dir: "ggml/src",
    required: false,
};

const EDITS: &[Edit] = &[
    Edit { file: "mmq.cpp", anchor: "#include \"ggml-quants.h\"\n", replacement: "#include \"ggml-quants.h\"\n#include \"exsa_amx_tiles.h\"\n" },
    Edit {
        file: "mmq.cpp",
        anchor: "    _tile_loadconfig(&tc);\n    done = true;\n",
        replacement: "    EXSA_TILE_LOADCONFIG(&tc);\n    done = true;\n",
    },
    // 3-D activations: every pointer offset in bytes, the 2-D weight the same for every slice.
    Edit {
        file: "mmq.cpp",
        anchor: "        K, (const float *)src1->data + src1_offset + mb_start * K,                  \\
        (const type *)src0->data + src0_offset + nb_start * K,                      \\
        (float *)dst->data + dst_offset + mb_start * ldc + nb_start, ldc)
",
        replacement: "        K, (const float *)((const char *)src1->data + src1_offset) + mb_start * K,  \\
        (const type *)((const char *)src0->data + src0_offset) + nb_start * K,      \\
        (float *)((char *)dst->data + dst_offset) + mb_start * ldc + nb_start, ldc)
",
    },
    Edit {
        file: "mmq.cpp",
        anchor: "        (float *) dst->data + dst_offset + nb_start, ldc)\n",
        replacement: "        (float *) ((char *) dst->data + dst_offset) + nb_start, ldc)\n",
    },
    Edit {
        file: "mmq.cpp",
        anchor: "                    (float *) dst->data + dst_offset + mb_start * N + nb_start, ldc);\n",
        replacement: "                    (float *) ((char *) dst->data + dst_offset) + mb_start * ldc + nb_start, ldc);\n",
    },
    Edit {
        file: "mmq.cpp",
        anchor: "
                    int64_t src0_offset = ggml_batch_offset(src0, batch_idx, ne2);
                    int64_t src1_offset = ggml_batch_offset(src1, batch_idx, ne2);
",
        replacement: "
                    int64_t src0_offset = 0; // exsa: a 2-D weight (supports_op), the same for every slice
                    int64_t src1_offset = ggml_batch_offset(src1, batch_idx, ne2);
",
    },
    Edit {
        file: "mmq.cpp",
        anchor: "
                    int64_t src0_offset = ggml_batch_offset(src0, batch_idx, ne2);
                    int64_t dst_offset  = ggml_batch_offset(dst,  batch_idx, ne2);
",
        replacement: "
                    int64_t src0_offset = 0; // exsa: a 2-D weight (supports_op), the same for every slice
                    int64_t dst_offset  = ggml_batch_offset(dst,  batch_idx, ne2);
",
    },
    Edit {
        file: "mmq.cpp",
        anchor: "
                int64_t src0_offset = ggml_batch_offset(src0, batch_idx, ne2);
",
        replacement: "
                int64_t src0_offset = 0; // exsa: a 2-D weight (supports_op), the same for every slice
",
    },
    Edit {
        file: "amx.cpp",
        anchor: "        if (!ggml_is_contiguous(src0) || !ggml_is_contiguous(src1)) {
            return false;
        }
",
        replacement: "        if (!ggml_is_contiguous(src0) || !ggml_is_contiguous(src1)) {
            return false;
        }
        if (src0->ne[2] != 1 || src0->ne[3] != 1) {
            return false; // exsa: the repacked weight is one matrix
        }
",
    },
    Edit { file: "amx.cpp", anchor: "#include \"traits.h\"\n", replacement: "#include \"traits.h\"\n#include \"exsa_amx_probe.h\"\n" },
    Edit {
        file: "amx.cpp",
        anchor: "static bool ggml_amx_init() {
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
        fprintf(stderr, \"AMX is not ready to be used!\\n\");
        return false;
    }
    return true;
",
        // Once per process: ggml asks on every call for the buffer type.
        replacement: "static bool ggml_amx_init() {
#if defined(__linux__)
    static const bool ready = [] {
        if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
            GGML_LOG_WARN(\"AMX: the kernel does not grant the tile state: ggml's AVX-512 kernels run\\n\");
            return false;
        }
        return exsa_amx::probe();
    }();
    return ready;
",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tile_configuration_is_loaded_only_through_the_full_operand() {
        let config = EDITS.iter().find(|e| e.anchor.contains("_tile_loadconfig")).expect("the config edit");
        assert!(!config.replacement.contains("_tile_loadconfig(") && config.replacement.contains("EXSA_TILE_LOADCONFIG(&tc)"));
        let tiles = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/amx-fix/exsa_amx_tiles.h")).unwrap();
        assert!(tiles.contains("\"m\"(*(const struct exsa_tile_config_bytes *)"), "the operand must be the 64-byte struct");
        assert!(tiles.contains("unsigned char bytes[64];"));
    }

    #[test]
    fn no_pointer_into_a_slice_is_offset_in_elements_by_a_byte_count() {
        let tree = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vendor/llama.cpp").join(SPEC.tree_dir);
        let Ok(mut text) = std::fs::read_to_string(tree.join("mmq.cpp")) else {
            eprintln!("skipped: the vendored tree is not there (cargo xtask vendor)");
            return;
        };
        for edit in EDITS.iter().filter(|e| e.file == "mmq.cpp") {
            assert_eq!(text.matches(edit.anchor).count(), 1, "{}", crate::source_patch::first_line(edit.anchor));
            text = text.replacen(edit.anchor, edit.replacement, 1);
        }
        for typed in [
            "(float *)dst->data + dst_offset",
            "(float *) dst->data + dst_offset",
            "(const float *)src1->data + src1_offset",
            "(const type *)src0->data + src0_offset",
        ] {
            assert!(!text.contains(typed), "{typed}");
        }
        assert!(!text.contains("ggml_batch_offset(src0"), "the weight is not offset per slice");
    }

    #[test]
    fn the_buffer_type_is_handed_out_only_after_the_probe() {
        let init = EDITS.iter().find(|e| e.anchor.contains("ggml_amx_init")).expect("the init edit");
        assert!(init.replacement.contains("return exsa_amx::probe();"));
        assert!(init.replacement.contains("static const bool ready"), "asked once per process");
        let includes = EDITS.iter().filter(|e| e.file == "amx.cpp" && e.replacement.contains("exsa_amx_probe.h")).count();
        assert_eq!(includes, 1);
    }
}
