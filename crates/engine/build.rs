//! Records the RUSTFLAGS of this build: the `crate` backend's llama.cpp flags depend on them
//! (llama-cpp-sys-2 turns GGML_NATIVE on for `-C target-cpu=native`), and reports must say so.
//! In the dynamic-backend mode (`backend-dl`), also tells the programs where llama.cpp's shared
//! libraries are: beside the program or in its `../lib` (a bundle, an install), else where this
//! build made them.

fn main() {
    // Path remapping changes no code, and names the build machine's folders.
    let flags: Vec<String> = std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .unwrap_or_default()
        .split('\x1f')
        .filter(|f| !f.is_empty() && !f.starts_with("--remap-path-prefix"))
        .map(str::to_owned)
        .collect();
    println!("cargo:rustc-env=EXSA_RUSTFLAGS={}", flags.join(" "));
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let relocatable = std::env::var("DEP_LLAMA_SOURCE_RELOCATABLE").is_ok();
    if !relocatable {
        // Where `cargo xtask fetch-model` puts the default model: a program built here finds it
        // without --model. A relocatable build (a release bundle) names no folder of this one.
        let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-env=EXSA_DEFAULT_MODEL_DIR={manifest}/../../.cache/models");
    }
    // Set by llama-sys (links = "llama_source") in backend-dl builds only.
    if let Ok(dirs) = std::env::var("DEP_LLAMA_SOURCE_LIB_DIR") {
        let origin = if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") { "@executable_path" } else { "$ORIGIN" };
        // A relocatable build (a release bundle) finds them beside itself only, never in the
        // build machine's folders.
        let built = (!relocatable).then_some(dirs);
        for dir in [Some(origin.to_string()), Some(format!("{origin}/../lib")), built].into_iter().flatten() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
