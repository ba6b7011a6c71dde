//! The dynamic-backend mode (`--features backend-dl`): llama.cpp as shared libraries and every
//! ggml backend a module loaded at run time, the CPU's included. Runs only in such a build
//! (`cargo test -p exsa-engine --no-default-features --features source,cli,backend-dl --test
//! backend_dl`, part of `cargo xtask test`): the module is found and mapped into the process, the model generates, a folder named by
//! EXSA_BACKEND_DIR is used alone, a folder without a CPU module is a clear error, the CPU module
//! loaded is reported and EXSA_CPU_VARIANT chooses another of the folder by name, and a CUDA
//! module that cannot load (as on a machine without a GPU driver) leaves the CPU running, with a
//! warning that says so and `exsa info` saying why.
#![cfg(feature = "backend-dl")]

use std::path::{Path, PathBuf};
use std::process::Command;

use exsa_engine::*;

fn exsa(backend_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_exsa")).env("EXSA_BACKEND_DIR", backend_dir).args(args).output().expect("exsa runs")
}

/// A folder of its own holding copies of the build's CPU modules: a bundle's layout.
fn dir_with_cpu_modules(name: &str) -> PathBuf {
    let built = llama::backend_modules::loaded_from().unwrap().to_path_buf();
    let dir = temp_dir(name);
    for entry in std::fs::read_dir(&built).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("libggml-cpu") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exsa-backend-dl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_cpu_backend_is_a_loaded_module_and_generates() {
    assert!(llama::backend_modules::is_dynamic());
    let dir = llama::backend_modules::loaded_from().expect("a folder with a CPU module was found");
    assert!(llama::backend_modules::has_module(dir, "cpu"), "{}", dir.display());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        maps.lines().any(|l| l.contains("libggml-cpu") && l.contains(&*dir.to_string_lossy())),
        "libggml-cpu is not mapped from {}",
        dir.display()
    );
    assert!(maps.contains("libllama.so"), "llama.cpp is not a shared library here");

    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig::default().n_ctx(256);
    let engine = Engine::load(config).unwrap();
    let (text, stats) = engine.generate(&GenerateRequest::new("The capital of France is").max_tokens(8).sampling(SamplingParams::greedy())).unwrap();
    assert_eq!(stats.completion_tokens, 8);
    assert!(!text.trim().is_empty(), "{text:?}");
}

#[test]
fn exsa_backend_dir_is_used_alone_and_a_folder_without_modules_is_an_error() {
    // A bundle-like folder holding a copy of the CPU module: used, and reported by `exsa info`.
    let copy = dir_with_cpu_modules("copy");
    let out = exsa(&copy, &["--log", "error", "info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["build_info"]["backend_modules"], copy.display().to_string());

    // No CPU module there: nothing to compute with, said by name; no crash.
    let empty = temp_dir("empty");
    let out = exsa(&empty, &["--log", "error", "generate", "hello", "--max-tokens", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no ggml backend module") && stderr.contains(&*empty.to_string_lossy()), "{stderr}");
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn a_cuda_module_that_cannot_load_leaves_the_cpu_running_and_says_so() {
    let dir = dir_with_cpu_modules("cuda");
    // What a CUDA module is on a machine without the NVIDIA driver: a file dlopen refuses.
    std::fs::write(dir.join("libggml-cuda.so"), b"not an ELF file").unwrap();
    let out = exsa(&dir, &["--log", "warn", "generate", "The capital of France is", "--max-tokens", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(stderr.contains("no GPU was found") && stderr.contains("running on the CPU"), "{stderr}");
    // `exsa info` names the module, that it was not registered and the loader's reason, and
    // lists the CPU as the only device.
    let out = exsa(&dir, &["--log", "error", "info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules = &info["build_info"]["other_backend_modules"];
    let [cuda] = modules.as_array().expect("a list").as_slice() else { panic!("one module besides the CPU's: {modules}") };
    assert_eq!(cuda["backend"], "cuda");
    assert_eq!(cuda["file"], dir.join("libggml-cuda.so").display().to_string());
    assert_eq!(cuda["registered"], false);
    // The loader's own words, which name the module it could not read (glibc: "<path>: file
    // too short"), once.
    let error = cuda["error"].as_str().unwrap_or_default();
    assert!(error.matches("libggml-cuda.so").count() == 1 && error.len() > cuda["file"].as_str().unwrap().len() + 3, "{cuda}");
    let devices = info["build_info"]["devices"].as_array().expect("a list of devices");
    assert!(!devices.is_empty() && devices.iter().all(|d| d["kind"] == "cpu"), "{devices:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_cpu_module_is_reported_and_exsa_cpu_variant_chooses_among_the_folders_modules() {
    // This build has one CPU module without variants (a bundle has one per instruction-set
    // level, checked by `cargo xtask dist --check`): by ggml's rule it is loaded unscored, as
    // the only one.
    let variant = llama::backend_modules::cpu_variant().expect("a dynamic build reports its CPU module");
    assert_eq!(variant.candidates.len(), 1, "{variant:?}");
    assert_eq!(variant.chosen.name, "");
    assert_eq!(variant.choice, llama::backend_modules::CpuChoice::Only);
    // Its flags are the build's CPU flags (no variants: ggml's portable x86-64 level).
    let flags = llama::build_info().cpu_variant_flags("").expect("the build's CPU module has recorded flags");
    assert!(flags.contains("-O") && !flags.contains("-march=native"), "{flags}");

    // The same module under a variant's name beside it: a variant that scores, chosen over the
    // module without one; and forced by name, the one loaded.
    let dir = dir_with_cpu_modules("variant");
    let single = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap() == "libggml-cpu.so").unwrap();
    std::fs::copy(&single, dir.join("libggml-cpu-mine.so")).unwrap();
    let info = |variant: &str| {
        Command::new(env!("CARGO_BIN_EXE_exsa"))
            .env("EXSA_BACKEND_DIR", &dir)
            .env("EXSA_CPU_VARIANT", variant)
            .args(["--log", "error", "info"])
            .output()
            .unwrap()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_exsa")).env("EXSA_BACKEND_DIR", &dir).args(["--log", "error", "info"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cpu = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["build_info"]["cpu_variant"].clone();
    assert_eq!((cpu["variant"].as_str(), cpu["chosen_by"].as_str()), (Some("mine"), Some("the highest score on this CPU")), "{cpu}");
    let out = info("mine");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cpu = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["build_info"]["cpu_variant"].clone();
    assert_eq!(cpu["variant"], "mine", "{cpu}");
    assert_eq!(cpu["chosen_by"], "EXSA_CPU_VARIANT", "{cpu}");
    assert_eq!(cpu["file"], dir.join("libggml-cpu-mine.so").display().to_string());
    assert_eq!(cpu["candidates"].as_array().map(Vec::len), Some(2), "{cpu}");
    assert!(cpu["flags"].is_null(), "a module this build did not make has no recorded flags: {cpu}");

    // A name the folder lacks: refused by name, with the folder and what it has; no crash.
    let out = info("pentium");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("EXSA_CPU_VARIANT=pentium") && stderr.contains(&*dir.to_string_lossy()) && stderr.contains("mine"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
