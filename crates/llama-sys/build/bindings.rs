//! bindgen over llama.h and the ggml headers the safe crate needs.

use std::path::Path;

use crate::plan::BuildPlan;

/// `shim_header` declares the exception guards (build/shim.rs), bound beside llama.h, and
/// `extra_headers` further C surfaces of ours (the chat layer's, build/chat.rs).
pub fn generate(plan: &BuildPlan, source: &Path, shim_header: &Path, extra_headers: &[std::path::PathBuf], out_dir: &Path) {
    let mut wrapper: String = plan.headers.iter().map(|h| format!("#include \"{}\"\n", source.join(h).display())).collect();
    wrapper.push_str(&format!("#include \"{}\"\n", shim_header.display()));
    for header in extra_headers {
        wrapper.push_str(&format!("#include \"{}\"\n", header.display()));
    }
    for h in &plan.headers {
        println!("cargo:rerun-if-changed={}", source.join(h).display());
    }
    let bindings = bindgen::Builder::default()
        .header_contents("llama_sys_wrapper.h", &wrapper)
        .clang_arg(format!("-I{}", source.join("include").display()))
        .clang_arg(format!("-I{}", source.join("ggml/include").display()))
        .clang_arg(format!("-I{}", shim_header.parent().expect("shim/").display()))
        .allowlist_function("(llama|ggml|gguf|exsa)_.*")
        .allowlist_type("(llama|ggml|gguf|exsa)_.*")
        .allowlist_var("(LLAMA|GGML|GGUF|EXSA)_.*")
        .rust_edition(bindgen::RustEdition::Edition2024)
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .prepend_enum_name(false)
        .layout_tests(true)
        .generate_comments(true)
        .generate()
        .unwrap_or_else(|e| crate::fail(&format!("bindgen could not parse llama.h from {}: {e}", source.display())));
    let path = out_dir.join("bindings.rs");
    bindings.write_to_file(&path).unwrap_or_else(|e| crate::fail(&format!("cannot write {}: {e}", path.display())));
}
