//! The raw FFI end to end on the real default model: init, load, tokenize, decode, read logits,
//! free. If this passes, the build links and the bindings match the library.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;

use llama_sys as sys;

fn model_path() -> CString {
    let path = std::env::var("EXSA_MODEL").expect("EXSA_MODEL is set by .cargo/config.toml");
    assert!(std::path::Path::new(&path).is_file(), "default model missing at {path}: run `cargo xtask fetch-model`");
    CString::new(path).unwrap()
}

#[test]
fn raw_ffi_decodes_the_default_model() {
    let path = model_path();
    // SAFETY: every call below follows llama.h's contract: init before use, pointers checked for
    // null, buffers sized as declared, each object freed once, after the objects that borrow it.
    unsafe {
        sys::llama_backend_init();
        let mut mparams = sys::llama_model_default_params();
        mparams.n_gpu_layers = 0;
        let model = NonNull::new(sys::llama_model_load_from_file(path.as_ptr(), mparams)).expect("model loads");
        let vocab = sys::llama_model_get_vocab(model.as_ptr());
        let n_vocab = sys::llama_vocab_n_tokens(vocab);
        assert!(n_vocab > 1000, "n_vocab = {n_vocab}");

        let prompt = "Monday, Tuesday, Wednesday, Thursday,";
        let mut tokens = vec![0 as sys::llama_token; 64];
        let n = sys::llama_tokenize(vocab, prompt.as_ptr().cast(), prompt.len() as i32, tokens.as_mut_ptr(), tokens.len() as i32, true, false);
        assert!(n > 1 && (n as usize) < tokens.len(), "tokenize returned {n}");
        tokens.truncate(n as usize);
        assert_eq!(tokens[0], sys::llama_vocab_bos(vocab), "first token is BOS");

        let mut cparams = sys::llama_context_default_params();
        cparams.n_ctx = 256;
        cparams.n_batch = 64;
        cparams.n_threads = 2;
        cparams.n_threads_batch = 2;
        let ctx = NonNull::new(sys::llama_init_from_model(model.as_ptr(), cparams)).expect("context");

        let batch = sys::llama_batch_get_one(tokens.as_mut_ptr(), tokens.len() as i32);
        assert_eq!(sys::llama_decode(ctx.as_ptr(), batch), 0, "decode");

        let logits = sys::llama_get_logits_ith(ctx.as_ptr(), -1);
        assert!(!logits.is_null());
        let row = std::slice::from_raw_parts(logits, n_vocab as usize);
        assert!(row.iter().all(|x| x.is_finite()), "non-finite logits");
        let spread = row.iter().cloned().fold(f32::MIN, f32::max) - row.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1.0, "logits are flat ({spread}): the model did not run");

        let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as sys::llama_token;
        let mut piece = [0u8; 64];
        let len = sys::llama_token_to_piece(vocab, argmax, piece.as_mut_ptr().cast(), piece.len() as i32, 0, false);
        assert!(len > 0);
        let text = String::from_utf8_lossy(&piece[..len as usize]);
        assert_eq!(text.trim(), "Friday", "greedy next token is {text:?}");

        sys::llama_free(ctx.as_ptr());
        sys::llama_model_free(model.as_ptr());
        sys::llama_backend_free();
    }
}

#[test]
fn host_build_reports_native_flags_and_matching_simd() {
    let info = &sys::BUILD_INFO;
    // These are the default flags. `cargo xtask test` builds with LLAMA_SYS_PROFILE=none, so that
    // a machine's tuned profile cannot change them; the build must then have read none.
    if std::env::var("LLAMA_SYS_PROFILE").as_deref() == Ok("none") {
        assert_eq!(info.tuned_profile, "none", "the tuned profile leaked into the test build");
    }
    assert_eq!(info.switch("native"), Some(true), "a host build defaults to native");
    assert_eq!(info.define("GGML_NATIVE"), Some("ON"));
    #[cfg(not(target_env = "msvc"))]
    assert!(
        info.ggml_cpu_flags.contains("-march=native") || info.ggml_cpu_flags.contains("-mcpu=native"),
        "ggml-cpu was not compiled with native flags: {}",
        info.ggml_cpu_flags
    );

    // SAFETY: returns a pointer to a static NUL-terminated string owned by llama.cpp.
    let system = unsafe { CStr::from_ptr(sys::llama_print_system_info()) }.to_string_lossy().into_owned();
    #[cfg(target_arch = "x86_64")]
    for (name, present) in [
        ("AVX2", std::is_x86_feature_detected!("avx2")),
        ("FMA", std::is_x86_feature_detected!("fma")),
        ("F16C", std::is_x86_feature_detected!("f16c")),
    ] {
        let shown = system.contains(&format!("{name} = 1"));
        assert_eq!(shown, present, "{name}: CPU has it = {present}, build uses it = {shown}\n{system}");
    }
    assert!(system.contains("CPU"), "{system}");
}
