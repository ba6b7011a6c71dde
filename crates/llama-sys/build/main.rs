//! Build script of llama-sys: plan, check tools, bindgen, CMake, link, build info.
//! Each step is its own module; this file only puts them in order.

mod bindings;
mod build_info;
mod cmake_build;
mod env;
mod plan;
mod profile;
mod shim;
mod source;
mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use plan::{BuildPlan, CompilerFamily, PlanInput, Switch, Target};

/// Stops the build with one line that names the fix.
pub fn fail(message: &str) -> ! {
    eprintln!("error: llama-sys: {message}");
    std::process::exit(1);
}

fn main() {
    let manifest_dir = env::cargo_path("CARGO_MANIFEST_DIR");
    let out_dir = env::cargo_path("OUT_DIR");
    let target = Target {
        triple: env::cargo("TARGET"),
        os: env::cargo("CARGO_CFG_TARGET_OS"),
        arch: env::cargo("CARGO_CFG_TARGET_ARCH"),
        env: std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default(),
    };

    let source = source::locate(&out_dir);
    let profile = profile::load(&plan::known_env_vars());
    let plan = BuildPlan::new(&plan_input(&target, &source, &profile)).unwrap_or_else(|e| fail(&e.to_string()));

    tools::require_cmake();
    tools::require_libclang();
    // bindgen first: it takes seconds and fails early, CMake takes minutes.
    bindings::generate(&plan, &source.dir, &manifest_dir.join(shim::HEADER), &out_dir);

    let key = cache_key(&plan, &target, &source);
    let cache = env::var("LLAMA_SYS_BUILD_CACHE").map(PathBuf::from);
    let installed = cmake_build::build(&plan, &source.dir, cache.as_deref(), &out_dir, &key);
    // The guards call into llama.cpp: a static library must come before those it uses.
    shim::compile(&manifest_dir, &source.dir, plan.switches[&plan::Switch::Rpc]);
    emit_link(&plan, &installed);

    let info = build_info::BuildInfo::collect(&plan, &source, &target.triple, &installed, &profile);
    info.write(&out_dir);

    println!("cargo:include={}", source.dir.join("include").display());
    println!("cargo:ggml_include={}", source.dir.join("ggml/include").display());
    println!("cargo:build_hash={}", info.hash());
    // Watching the whole tree would make every build stat 2,000 files; these are where the code is.
    for dir in ["src", "ggml/src", "include", "ggml/include", "CMakeLists.txt", "ggml/CMakeLists.txt"] {
        println!("cargo:rerun-if-changed={}", source.dir.join(dir).display());
    }
    println!("cargo:rerun-if-changed=build");
}

fn plan_input(target: &Target, source: &source::Source, profile: &profile::Profile) -> PlanInput {
    let features: BTreeSet<Switch> =
        Switch::ALL.into_iter().filter(|s| std::env::var_os(format!("CARGO_FEATURE_{}", s.feature().to_ascii_uppercase())).is_some()).collect();
    // The tuned profile first, the environment over it: an explicit variable always wins.
    let mut env: BTreeMap<String, String> = profile.env.clone();
    env.extend(plan::known_env_vars().into_iter().filter_map(|k| env::var(&k).map(|v| (k, v))));
    let host_build = env::cargo("HOST") == target.triple;
    // The family decides the OpenMP runtime to link: that of LLAMA_SYS_CXX when it is set,
    // else that of the compiler the cc crate would pick.
    let compiler = match env.get(plan::CXX_VAR) {
        Some(cxx) if cxx.contains("clang") => CompilerFamily::Clang,
        Some(_) => CompilerFamily::Gnu,
        None => {
            let compiler = cc::Build::new().cpp(true).cargo_metadata(false).get_compiler();
            if compiler.is_like_msvc() {
                CompilerFamily::Msvc
            } else if compiler.is_like_clang() {
                CompilerFamily::Clang
            } else {
                CompilerFamily::Gnu
            }
        }
    };
    PlanInput {
        target: target.clone(),
        host_build,
        compiler,
        features,
        env,
        ccache: tools::ccache(),
        build_number: source.pin.build_number,
        build_commit: Some(source.pin.upstream_commit.clone()).filter(|c| !c.is_empty() && c != "unknown"),
    }
}

/// Names the cached build folder: the plan, the target, the source tree, and the CFLAGS the cc
/// crate forwards to CMake.
fn cache_key(plan: &BuildPlan, target: &Target, source: &source::Source) -> String {
    let mut h = Sha256::new();
    h.update(plan.fingerprint());
    h.update(&target.triple);
    h.update(source.dir.display().to_string());
    h.update(&source.pin.tree_sha256);
    for var in ["CFLAGS", "CXXFLAGS", "CC", "CXX"] {
        h.update(format!("{var}={:?}", env::var(var)));
    }
    format!("{}-{}", target.triple, &build_info::hex(&h.finalize())[..16])
}

fn emit_link(plan: &BuildPlan, installed: &cmake_build::Installed) {
    for dir in installed.lib_dirs() {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    for dir in &plan.search_paths {
        println!("cargo:rustc-link-search=native={dir}");
    }
    for link in &plan.links {
        println!("cargo:rustc-link-lib={}", link.cargo_value());
    }
}
