//! Records the RUSTFLAGS of this build: the `crate` backend's llama.cpp flags depend on them
//! (llama-cpp-sys-2 turns GGML_NATIVE on for `-C target-cpu=native`), and reports must say so.

fn main() {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default().replace('\x1f', " ");
    println!("cargo:rustc-env=EXSA_RUSTFLAGS={flags}");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
}
