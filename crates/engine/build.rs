//! Records the RUSTFLAGS of this build: the `crate` backend's llama.cpp flags depend on them
//! (llama-cpp-sys-2 turns GGML_NATIVE on for `-C target-cpu=native`), and reports must say so.
//! In the dynamic-backend mode (`backend-dl`), also tells the programs where llama.cpp's shared
//! libraries are: beside the program or in its `../lib` (a bundle, an install), else where this
//! build made them.

fn main() {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default().replace('\x1f', " ");
    println!("cargo:rustc-env=EXSA_RUSTFLAGS={flags}");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    // Set by llama-sys (links = "llama_source") in backend-dl builds only.
    if let Ok(dirs) = std::env::var("DEP_LLAMA_SOURCE_LIB_DIR") {
        let origin = if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") { "@executable_path" } else { "$ORIGIN" };
        for dir in [origin.to_string(), format!("{origin}/../lib"), dirs] {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
