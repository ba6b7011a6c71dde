//! Build script of llama-sys: plan, check tools, bindgen, CMake, link, build info.
//! Each step is its own module; this file only puts them in order.

mod amx_patch;
mod bindings;
mod build_info;
mod chat;
mod cmake_build;
mod env;
mod plan;
mod profile;
mod rpc_patch;
mod shim;
mod source;
mod source_patch;
mod tools;
mod variant_tuning;

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
    // Prepared before the plan: whether the AMX kernels are patched decides AMX's default.
    let cmake_version = cmake_version();
    let amx_patch = if target.is_x86() { patch(&amx_patch::SPEC, &source, &manifest_dir, &cmake_version, "AMX is off by default") } else { None };
    let plan = BuildPlan::new(&plan_input(&target, &source, &profile, amx_patch.is_some())).unwrap_or_else(|e| fail(&e.to_string()));

    tools::require_cmake();
    tools::require_libclang();
    // bindgen first: it takes seconds and fails early, CMake takes minutes.
    let chat = chat::enabled();
    let extra_headers: Vec<PathBuf> = chat.then(|| manifest_dir.join(chat::HEADER)).into_iter().collect();
    bindings::generate(&plan, &source.dir, &manifest_dir.join(shim::HEADER), &extra_headers, &out_dir);

    let rpc = plan.switches[&plan::Switch::Rpc];
    let rpc_patch =
        if rpc { patch(&rpc_patch::SPEC, &source, &manifest_dir, &cmake_version, "losing an rpc-server mid-run ends the process") } else { None };
    let patches: Vec<&source_patch::Patch> = rpc_patch.iter().chain(amx_patch.iter()).collect();
    let tuning = tuning_script(&plan, &cmake_version);
    let key = cache_key(&plan, &target, &source, &patches, tuning.as_deref());
    let cache = env::var("LLAMA_SYS_BUILD_CACHE").map(PathBuf::from);
    // A relative path would be taken from this crate's folder (where cargo runs build scripts)
    // and then from CMake's build folder: from neither place the user meant.
    if let Some(relative) = cache.as_ref().filter(|c| c.is_relative()) {
        fail(&format!("LLAMA_SYS_BUILD_CACHE must be an absolute path (got {})", relative.display()));
    }
    let root = cmake_build::root(cache.as_deref(), &out_dir, &key);
    let project_include = write_project_scripts(&root, &patches, tuning.as_deref());
    let installed = cmake_build::build(&plan, &source.dir, root, project_include.as_deref());
    // The guards call into llama.cpp, and the chat layer into both: a static library must come
    // before those it uses.
    if chat {
        chat::compile(&manifest_dir, &source.dir);
    }
    let gomp = plan.links.contains(&plan::Link::Dylib("gomp".into()));
    shim::compile(&manifest_dir, &source.dir, shim::Rpc::from_build(rpc, rpc_patch.is_some()), gomp);
    emit_link(&plan, &installed);

    let info = build_info::BuildInfo::collect(&plan, &source, &target.triple, &installed, &profile);
    info.write(&out_dir);

    if plan.switches[&plan::Switch::BackendDl] {
        // The modules, for the llama crate to load; the shared libraries, for dependents to
        // find at run time (links metadata: DEP_LLAMA_SOURCE_LIB_DIR). A relocatable build
        // names neither folder to the program: it finds both beside itself or nowhere.
        if !plan.relocatable {
            println!("cargo:rustc-env=LLAMA_SYS_BACKEND_DIR={}", installed.root.join("bin").display());
        }
        let dirs: Vec<String> = installed.lib_dirs().iter().map(|d| d.display().to_string()).collect();
        println!("cargo:lib_dir={}", dirs.join(":"));
    }
    if plan.relocatable {
        // For dependents (DEP_LLAMA_SOURCE_RELOCATABLE): compile in no folder of this build.
        println!("cargo:relocatable=1");
    }
    println!("cargo:include={}", source.dir.join("include").display());
    println!("cargo:ggml_include={}", source.dir.join("ggml/include").display());
    println!("cargo:build_hash={}", info.hash());
    // Watching the whole tree would make every build stat 2,000 files; these are where the code is.
    for dir in ["src", "ggml/src", "include", "ggml/include", "CMakeLists.txt", "ggml/CMakeLists.txt"] {
        println!("cargo:rerun-if-changed={}", source.dir.join(dir).display());
    }
    println!("cargo:rerun-if-changed=build");
}

fn plan_input(target: &Target, source: &source::Source, profile: &profile::Profile, amx_patched: bool) -> PlanInput {
    let features: BTreeSet<Switch> = Switch::ALL
        .into_iter()
        .filter(|s| std::env::var_os(format!("CARGO_FEATURE_{}", s.feature().to_ascii_uppercase().replace('-', "_"))).is_some())
        .collect();
    // The tuned profile first, the environment over it: an explicit variable always wins.
    let env = profile::with_explicit(&profile.env, plan::known_env_vars().into_iter().filter_map(|k| env::var(&k).map(|v| (k, v))));
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
    let cuda_driver_stub = cuda_driver_stub(&env, target);
    PlanInput {
        target: target.clone(),
        host_build,
        compiler,
        features,
        env,
        ccache: tools::ccache(),
        cuda_driver_stub,
        amx_patched,
        build_number: source.pin.build_number,
        build_commit: Some(source.pin.upstream_commit.clone()).filter(|c| !c.is_empty() && c != "unknown"),
    }
}

/// Whether the CUDA toolkit (CUDA_PATH, else /usr/local/cuda) has the driver's link stub.
fn cuda_driver_stub(env: &BTreeMap<String, String>, target: &Target) -> bool {
    let root = PathBuf::from(env.get(plan::CUDA_PATH_VAR).map_or("/usr/local/cuda", String::as_str));
    let stub = if target.os == "windows" { root.join("lib/x64/cuda.lib") } else { root.join("lib64/stubs/libcuda.so") };
    stub.is_file()
}

/// What `cmake --version` prints (empty when it does not run): asked once for all patches.
fn cmake_version() -> String {
    let cmake = std::env::var("CMAKE").unwrap_or_else(|_| "cmake".into());
    std::process::Command::new(&cmake).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// The CPU variants' tuning script, where the plan tunes them and CMake can run it (like the
/// patches, it defers to the end of the configure step); without such a CMake, generic tuning
/// with a warning, or an error where it was asked for by name.
fn tuning_script(plan: &BuildPlan, cmake_version: &str) -> Option<String> {
    if !plan.tune_cpu_variants {
        return None;
    }
    if !source_patch::cmake_supports(cmake_version) {
        let (major, minor) = source_patch::MIN_CMAKE;
        let why = format!("tuning ggml's CPU variants needs CMake {major}.{minor} or newer, found {:?}", cmake_version.lines().next().unwrap_or(""));
        if env::var(plan::CPU_VARIANT_TUNE_VAR).is_some() {
            fail(&format!("{}=on: {why}", plan::CPU_VARIANT_TUNE_VAR));
        }
        println!("cargo:warning=llama-sys: {why}; they keep the compiler's generic tuning");
        return None;
    }
    Some(variant_tuning::script())
}

/// A patch of the tree (rpc_patch.rs, amx_patch.rs), prepared. The pinned tree must take it;
/// another tree (LLAMA_CPP_DIR) or a CMake too old builds unpatched, with a warning that says
/// `unpatched_means`.
fn patch(
    spec: &'static source_patch::Spec,
    source: &source::Source,
    manifest_dir: &std::path::Path,
    version: &str,
    unpatched_means: &str,
) -> Option<source_patch::Patch> {
    let unpatched = |why: String| {
        println!("cargo:warning=llama-sys: the {} patch is not applied ({why}): {unpatched_means}", spec.id);
        None
    };
    if !source_patch::cmake_supports(version) {
        let (major, minor) = source_patch::MIN_CMAKE;
        return unpatched(format!("CMake {major}.{minor} or newer is needed, found {:?}", version.lines().next().unwrap_or("")));
    }
    match source_patch::Patch::prepare(spec, &source.dir, manifest_dir) {
        Ok(patch) => Some(patch),
        Err(e) if env::var(source::SOURCE_DIR_VAR).is_some() => unpatched(e),
        Err(e) => {
            fail(&format!("the pinned llama.cpp tree does not take the {} patch: {e} (update build/{}_patch.rs with the pin)", spec.id, spec.id))
        }
    }
}

/// Writes each patch, and the CPU variants' tuning script when there is one, into the build
/// folder; returns the script CMake runs at `project()`.
fn write_project_scripts(root: &std::path::Path, patches: &[&source_patch::Patch], tuning: Option<&str>) -> Option<PathBuf> {
    fn cannot_write(path: &std::path::Path, e: std::io::Error) -> ! {
        fail(&format!("cannot write into {}: {e}", path.display()))
    }
    let mut scripts = Vec::new();
    for patch in patches {
        let dir = root.join(format!("exsa-{}-patch", patch.id()));
        let script = patch.write(&dir).unwrap_or_else(|e| fail(&format!("cannot write the {} patch to {}: {e}", patch.id(), dir.display())));
        scripts.push(script);
    }
    if let Some(text) = tuning {
        std::fs::create_dir_all(root).unwrap_or_else(|e| cannot_write(root, e));
        let script = root.join("exsa-tune-cpu-variants.cmake");
        source_patch::write_if_changed(&script, text).unwrap_or_else(|e| cannot_write(&script, e));
        scripts.push(script);
    }
    source_patch::write_project_include(root, &scripts).unwrap_or_else(|e| cannot_write(root, e))
}

/// Names the cached build folder: the plan, the target, the source tree, the patches, the CPU
/// variants' tuning, and the CFLAGS the cc crate forwards to CMake.
fn cache_key(plan: &BuildPlan, target: &Target, source: &source::Source, patches: &[&source_patch::Patch], tuning: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(plan.fingerprint());
    for patch in patches {
        h.update(patch.fingerprint());
    }
    if let Some(text) = tuning {
        h.update(text);
    }
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
