//! The build plan: target + features + environment → CMake defines, compiler flags and the
//! libraries to link, in order.
//!
//! Pure on purpose: nothing here reads the environment or touches the file system, so the
//! Metal, CUDA and Accelerate paths that no CI machine of ours can build are still proven right
//! by the unit tests at the bottom. The library compiles this file under `cfg(test)` to run them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The platform being compiled for, from Cargo's `CARGO_CFG_TARGET_*` variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub triple: String,
    pub os: String,
    pub arch: String,
    pub env: String,
}

impl Target {
    pub fn is_apple(&self) -> bool {
        matches!(self.os.as_str(), "macos" | "ios" | "tvos" | "visionos")
    }

    pub fn is_msvc(&self) -> bool {
        self.env == "msvc"
    }

    pub fn is_x86(&self) -> bool {
        self.arch == "x86_64" || self.arch == "x86"
    }
}

/// The C++ compiler family, which decides the OpenMP runtime and the flag syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompilerFamily {
    Gnu,
    Clang,
    Msvc,
}

/// One on/off dimension of the build. Each maps to exactly one ggml CMake option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Switch {
    Native,
    OpenMp,
    Llamafile,
    Repack,
    Lto,
    Blas,
    Metal,
    Accelerate,
    Cuda,
    Rpc,
    Amx,
    BackendDl,
}

impl Switch {
    pub const ALL: [Switch; 12] = [
        Switch::Native,
        Switch::OpenMp,
        Switch::Llamafile,
        Switch::Repack,
        Switch::Lto,
        Switch::Blas,
        Switch::Metal,
        Switch::Accelerate,
        Switch::Cuda,
        Switch::Rpc,
        Switch::Amx,
        Switch::BackendDl,
    ];

    /// The cargo feature that forces this switch on.
    pub fn feature(self) -> &'static str {
        match self {
            Switch::Native => "native",
            Switch::OpenMp => "openmp",
            Switch::Llamafile => "llamafile",
            Switch::Repack => "repack",
            Switch::Lto => "lto",
            Switch::Blas => "blas",
            Switch::Metal => "metal",
            Switch::Accelerate => "accelerate",
            Switch::Cuda => "cuda",
            Switch::Rpc => "rpc",
            Switch::Amx => "amx",
            Switch::BackendDl => "backend-dl",
        }
    }

    /// The environment variable that overrides both the feature and the platform default.
    pub fn env_var(self) -> String {
        format!("LLAMA_SYS_{}", self.feature().to_ascii_uppercase().replace('-', "_"))
    }

    /// The ggml CMake option this switch sets.
    pub fn cmake_define(self) -> &'static str {
        match self {
            Switch::Native => "GGML_NATIVE",
            Switch::OpenMp => "GGML_OPENMP",
            Switch::Llamafile => "GGML_LLAMAFILE",
            Switch::Repack => "GGML_CPU_REPACK",
            Switch::Lto => "GGML_LTO",
            Switch::Blas => "GGML_BLAS",
            Switch::Metal => "GGML_METAL",
            Switch::Accelerate => "GGML_ACCELERATE",
            Switch::Cuda => "GGML_CUDA",
            Switch::Rpc => "GGML_RPC",
            // GGML_AMX_TILE and GGML_AMX_BF16 follow it, and native builds without it get -mno-amx-*;
            // see BuildPlan::new.
            Switch::Amx => "GGML_AMX_INT8",
            // Shared libraries, and each backend a module ggml loads at run time.
            Switch::BackendDl => "GGML_BACKEND_DL",
        }
    }

    /// What the switch is when neither a feature nor the environment says otherwise.
    fn platform_default(self, target: &Target, host_build: bool) -> bool {
        match self {
            // -march=native describes the build machine, so only a host build may use it.
            Switch::Native => host_build && !target.is_msvc(),
            // Apple's toolchain ships no OpenMP runtime; ggml's own threadpool serves there.
            Switch::OpenMp => !target.is_apple(),
            Switch::Llamafile | Switch::Repack => true,
            Switch::Metal | Switch::Accelerate => target.is_apple(),
            // ggml's RPC backend: a small library that does nothing until a server is named, so
            // every build can reach rpc-servers and be one (`exsa rpc-server`, `--rpc`).
            Switch::Rpc => true,
            // AMX follows native CPU flags where the AMX patch applies (resolve_switches).
            Switch::Lto | Switch::Blas | Switch::Cuda | Switch::Amx | Switch::BackendDl => false,
        }
    }
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.feature())
    }
}

/// Everything the plan depends on, gathered by the build script.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub target: Target,
    /// Whether target == host, which is what allows native CPU flags.
    pub host_build: bool,
    pub compiler: CompilerFamily,
    /// Switches forced on by cargo features.
    pub features: BTreeSet<Switch>,
    /// `LLAMA_SYS_*` variables that were set, by name (see [`known_env_vars`]).
    pub env: BTreeMap<String, String>,
    /// Path of a ccache binary, when one should be used.
    pub ccache: Option<String>,
    /// Whether the CUDA toolkit has the driver's link stub (`lib64/stubs/libcuda.so`): the PyPI
    /// wheels of `cargo xtask setup --cuda` do not, and ggml then builds without the driver API
    /// (GGML_CUDA_NO_VMM).
    pub cuda_driver_stub: bool,
    /// Whether the tree's AMX kernels compile patched (build/amx_patch.rs): unpatched, ggml's AMX
    /// matmul crashes on the pinned tree, so AMX is on by default only when they are.
    pub amx_patched: bool,
    /// LLAMA_BUILD_NUMBER / LLAMA_BUILD_COMMIT for llama.cpp's own version reporting.
    pub build_number: Option<u32>,
    pub build_commit: Option<String>,
}

/// A library to link, in the order the linker must see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// One of llama.cpp's own static libraries, from the install folder.
    Static(String),
    /// A system shared library (`-l`).
    Dylib(String),
    /// An Apple framework.
    Framework(String),
}

impl Link {
    /// The `cargo:rustc-link-lib` value for this library.
    pub fn cargo_value(&self) -> String {
        match self {
            Link::Static(name) => format!("static={name}"),
            Link::Dylib(name) => format!("dylib={name}"),
            Link::Framework(name) => format!("framework={name}"),
        }
    }
}

/// What to build and how, for one target and flag set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildPlan {
    /// Every switch with its resolved value.
    pub switches: BTreeMap<Switch, bool>,
    /// `-D` definitions passed to CMake, the validated pass-through ones included.
    pub defines: BTreeMap<String, String>,
    pub c_flags: Vec<String>,
    pub cxx_flags: Vec<String>,
    /// Libraries in link order: llama first, ggml-base after every backend, system last.
    pub links: Vec<Link>,
    /// Extra native search paths (CUDA's library folders, for one).
    pub search_paths: Vec<String>,
    /// Headers bindgen reads, relative to the llama.cpp source root.
    pub headers: Vec<&'static str>,
    /// Whether the build may be moved to another machine ([`RELOCATABLE_VAR`]).
    pub relocatable: bool,
    /// Whether ggml's x86 CPU variants get their family's `-mtune` ([`CPU_VARIANT_TUNE_VAR`],
    /// variant_tuning.rs).
    pub tune_cpu_variants: bool,
}

/// A configuration the plan refuses, with the variable or feature at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError(pub String);

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub const OPT_LEVEL_VAR: &str = "LLAMA_SYS_OPT_LEVEL";
pub const CUDA_ARCHS_VAR: &str = "LLAMA_SYS_CUDA_ARCHITECTURES";
pub const BLAS_VENDOR_VAR: &str = "LLAMA_SYS_BLAS_VENDOR";
pub const CMAKE_ARGS_VAR: &str = "LLAMA_SYS_CMAKE_ARGS";
pub const CFLAGS_VAR: &str = "LLAMA_SYS_CFLAGS";
pub const CXXFLAGS_VAR: &str = "LLAMA_SYS_CXXFLAGS";
pub const CUDA_PATH_VAR: &str = "CUDA_PATH";
/// `1` builds ggml's CUDA backend without the driver API's virtual memory pool
/// (GGML_CUDA_NO_VMM), so nothing links the driver library; implied when the toolkit has no
/// driver stub.
pub const CUDA_NO_VMM_VAR: &str = "LLAMA_SYS_CUDA_NO_VMM";
/// CUDA architectures when LLAMA_SYS_CUDA_ARCHITECTURES is not set: machine code for the current
/// generations (Ampere and Ada consumer cards, Hopper and Blackwell datacenter parts, Blackwell
/// consumer cards), and Ampere PTX that the driver compiles for anything newer.
pub const DEFAULT_CUDA_ARCHS: &str = "86-real;89-real;90a-real;100a-real;120a-real;86-virtual";
/// C and C++ compilers for CMake (`gcc`/`g++`, `clang`/`clang++`, or paths): a tuning dimension.
pub const CC_VAR: &str = "LLAMA_SYS_CC";
pub const CXX_VAR: &str = "LLAMA_SYS_CXX";
/// `1` builds for moving elsewhere (a release bundle): the shared libraries and modules of the
/// dynamic-backend mode find each other in their own folder (`$ORIGIN`), and nothing of the
/// build's folders is compiled in (no module folder to fall back on, no source path).
pub const RELOCATABLE_VAR: &str = "LLAMA_SYS_RELOCATABLE";
/// `off` leaves ggml's x86 CPU variants (a dynamic-backend build with GGML_CPU_ALL_VARIANTS) at
/// the compiler's generic tuning; on by default there (variant_tuning.rs).
pub const CPU_VARIANT_TUNE_VAR: &str = "LLAMA_SYS_CPU_VARIANT_TUNE";

/// Every variable the plan reads, so the build script can watch them all.
pub fn known_env_vars() -> Vec<String> {
    let mut vars: Vec<String> = Switch::ALL.iter().map(|s| s.env_var()).collect();
    vars.extend(
        [
            OPT_LEVEL_VAR,
            CUDA_ARCHS_VAR,
            CUDA_NO_VMM_VAR,
            BLAS_VENDOR_VAR,
            CMAKE_ARGS_VAR,
            CFLAGS_VAR,
            CXXFLAGS_VAR,
            CUDA_PATH_VAR,
            CC_VAR,
            CXX_VAR,
            RELOCATABLE_VAR,
            CPU_VARIANT_TUNE_VAR,
        ]
        .map(String::from),
    );
    vars
}

impl BuildPlan {
    pub fn new(input: &PlanInput) -> Result<BuildPlan, PlanError> {
        // Read once: AMX's switch and the variants' tuning both follow it.
        let all_variants = all_cpu_variants(input)?;
        let switches = resolve_switches(input, all_variants)?;
        let on = |s: Switch| switches[&s];
        let target = &input.target;

        let mut defines = BTreeMap::new();
        let mut define = |k: &str, v: &str| {
            defines.insert(k.to_string(), v.to_string());
        };
        let onoff = |b: bool| if b { "ON" } else { "OFF" };

        // Static libraries only, and none of upstream's programs: we link the library and
        // nothing else, so its tests, tools, server and network code are dead weight.
        // Release whatever cargo's profile: a Debug llama.cpp is two orders of magnitude slower.
        define("CMAKE_BUILD_TYPE", "Release");
        // Static libraries, but for the dynamic-backend mode: ggml then needs shared ones.
        define("BUILD_SHARED_LIBS", onoff(on(Switch::BackendDl)));
        let relocatable = input.env.get(RELOCATABLE_VAR).map(|v| parse_bool(RELOCATABLE_VAR, v)).transpose()?.unwrap_or(false);
        if relocatable && on(Switch::BackendDl) {
            // Installed, the libraries and modules look for each other (and for what a bundle
            // puts beside them: libgomp) in their own folder, wherever it is.
            define("CMAKE_INSTALL_RPATH", if target.is_apple() { "@loader_path" } else { "$ORIGIN" });
        }
        define("CMAKE_POSITION_INDEPENDENT_CODE", "ON");
        for off in [
            "LLAMA_BUILD_TESTS",
            "LLAMA_BUILD_EXAMPLES",
            "LLAMA_BUILD_TOOLS",
            "LLAMA_BUILD_SERVER",
            "LLAMA_BUILD_COMMON",
            "LLAMA_BUILD_APP",
            "LLAMA_OPENSSL",
            "GGML_BUILD_TESTS",
            "GGML_BUILD_EXAMPLES",
        ] {
            define(off, "OFF");
        }
        let x86 = target.is_x86();
        for s in Switch::ALL.into_iter().filter(|&s| x86 || s != Switch::Amx) {
            define(s.cmake_define(), onoff(on(s)));
        }
        if on(Switch::Metal) {
            // The shader library goes inside the binary: no .metallib to ship or find at run time.
            define("GGML_METAL_EMBED_LIBRARY", "ON");
        }
        if on(Switch::Blas) {
            let vendor = match input.env.get(BLAS_VENDOR_VAR) {
                Some(v) => v.clone(),
                None if target.is_apple() => "Apple".to_string(),
                None => "OpenBLAS".to_string(),
            };
            define("GGML_BLAS_VENDOR", &vendor);
        }
        // Decided once: the define and whether the driver library is linked follow from it.
        let cuda_vmm = on(Switch::Cuda) && !cuda_no_vmm(input)?;
        if on(Switch::Cuda) {
            let archs = input.env.get(CUDA_ARCHS_VAR).map_or(DEFAULT_CUDA_ARCHS, String::as_str);
            validate_cuda_archs(archs)?;
            define("CMAKE_CUDA_ARCHITECTURES", archs);
            define("GGML_CUDA_NO_VMM", onoff(!cuda_vmm));
            // The toolkit named, not whichever nvcc PATH finds first (a toolkit assembled by
            // `cargo xtask setup --cuda` is on no PATH).
            if let Some(root) = input.env.get(CUDA_PATH_VAR) {
                let nvcc = if target.os == "windows" { "nvcc.exe" } else { "nvcc" };
                define("CUDAToolkit_ROOT", root);
                define("CMAKE_CUDA_COMPILER", &format!("{root}/bin/{nvcc}"));
            }
        }
        if let Some(ccache) = &input.ccache {
            define("CMAKE_C_COMPILER_LAUNCHER", ccache);
            define("CMAKE_CXX_COMPILER_LAUNCHER", ccache);
            if on(Switch::Cuda) {
                define("CMAKE_CUDA_COMPILER_LAUNCHER", ccache);
            }
        }
        if let Some(n) = input.build_number {
            define("LLAMA_BUILD_NUMBER", &n.to_string());
        }
        if let Some(commit) = &input.build_commit {
            define("LLAMA_BUILD_COMMIT", commit);
        }
        for (var, cmake) in [(CC_VAR, "CMAKE_C_COMPILER"), (CXX_VAR, "CMAKE_CXX_COMPILER")] {
            if let Some(compiler) = input.env.get(var) {
                if compiler.is_empty() || compiler.contains(char::is_whitespace) {
                    return Err(PlanError(format!("{var}={compiler:?} is not a compiler name or path")));
                }
                define(cmake, compiler);
            }
        }
        if let Some(level) = input.env.get(OPT_LEVEL_VAR) {
            let flags = release_flags(level, input.compiler)?;
            define("CMAKE_C_FLAGS_RELEASE", &flags);
            define("CMAKE_CXX_FLAGS_RELEASE", &flags);
        }
        let mut c_flags = Vec::new();
        let mut cxx_flags = Vec::new();
        if x86 {
            define("GGML_AMX_TILE", onoff(on(Switch::Amx)));
            define("GGML_AMX_BF16", onoff(on(Switch::Amx)));
            // -march=native turns AMX on wherever the CPU has it; GGML_AMX_* only act on
            // non-native builds. An explicit -mno-* wins over -march in GCC and Clang alike.
            if on(Switch::Native) && !on(Switch::Amx) && input.compiler != CompilerFamily::Msvc {
                let no_amx = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"].map(String::from);
                c_flags.extend(no_amx.clone());
                cxx_flags.extend(no_amx);
            }
        }
        // Last, so a pass-through definition can override anything above.
        if let Some(args) = input.env.get(CMAKE_ARGS_VAR) {
            for (k, v) in parse_cmake_args(args)? {
                defines.insert(k, v);
            }
        }

        c_flags.extend(parse_compiler_flags(CFLAGS_VAR, input.env.get(CFLAGS_VAR))?);
        cxx_flags.extend(parse_compiler_flags(CXXFLAGS_VAR, input.env.get(CXXFLAGS_VAR))?);
        if on(Switch::Cuda) {
            // nvcc preprocesses device code with the host compiler too, but takes none of the C++
            // flags: the path maps go to it by hand, or ggml-cuda's assertion messages name the
            // build's folders (a relocatable build, `cargo xtask dist --cuda`, must not).
            let maps: Vec<&str> = cxx_flags.iter().map(String::as_str).filter(|f| is_path_map(f)).collect();
            if !maps.is_empty() {
                let host = format!("-Xcompiler={}", maps.join(","));
                let flags = defines.entry("CMAKE_CUDA_FLAGS".to_string()).or_default();
                *flags = if flags.is_empty() { host } else { format!("{flags} {host}") };
            }
        }
        let tune_cpu_variants = tune_cpu_variants(input, &switches, all_variants)?;
        let (links, search_paths) = link_list(input, &switches, cuda_vmm);

        let mut headers =
            vec!["include/llama.h", "ggml/include/ggml.h", "ggml/include/ggml-backend.h", "ggml/include/ggml-cpu.h", "ggml/include/gguf.h"];
        if on(Switch::Rpc) {
            headers.push("ggml/include/ggml-rpc.h");
        }

        Ok(BuildPlan { switches, defines, c_flags, cxx_flags, links, search_paths, headers, relocatable, tune_cpu_variants })
    }

    /// A stable text form of everything that decides the compiled output; its hash names the
    /// cached CMake build folder.
    pub fn fingerprint(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.defines {
            out.push_str(&format!("-D{k}={v}\n"));
        }
        out.push_str(&format!("cflags={}\ncxxflags={}\n", self.c_flags.join(" "), self.cxx_flags.join(" ")));
        out
    }
}

fn resolve_switches(input: &PlanInput, all_variants: bool) -> Result<BTreeMap<Switch, bool>, PlanError> {
    let mut switches = BTreeMap::new();
    for s in Switch::ALL {
        let value = match input.env.get(&s.env_var()) {
            Some(raw) => parse_bool(&s.env_var(), raw)?,
            None => input.features.contains(&s) || s.platform_default(&input.target, input.host_build),
        };
        switches.insert(s, value);
    }
    let target = &input.target;
    if switches[&Switch::Lto] && input.compiler == CompilerFamily::Gnu {
        // CMake's IPO for GCC writes GIMPLE-only objects (-fno-fat-lto-objects) into the static
        // libraries; Rust's linker (rust-lld here) cannot read them, and every ggml symbol comes
        // out undefined at the final link. Found by `cargo xtask tune`.
        return Err(PlanError(format!(
            "{} (GGML_LTO) with GCC produces static libraries Rust cannot link; unset it, or build with clang (LLAMA_SYS_CC/LLAMA_SYS_CXX)",
            Switch::Lto.env_var()
        )));
    }
    for s in [Switch::Metal, Switch::Accelerate] {
        if switches[&s] && !target.is_apple() {
            return Err(PlanError(format!(
                "the `{s}` feature ({}) needs an Apple target, not {}; unset it or build for macOS/iOS",
                s.env_var(),
                target.triple
            )));
        }
    }
    if switches[&Switch::BackendDl] {
        // The dynamic-backend mode goes without two defaults: RPC (our shim calls ggml-rpc's
        // functions directly, which a loaded module does not export to the link) and native CPU
        // flags (ggml refuses them there: a module is meant to run on other CPUs; the CPU module
        // gets ggml's portable x86-64 level, or one module per CPU generation with
        // LLAMA_SYS_CMAKE_ARGS=-DGGML_CPU_ALL_VARIANTS=ON). Asked for by name, each is an error.
        for s in [Switch::Rpc, Switch::Native] {
            let asked = input.env.get(&s.env_var()).is_some_and(|v| parse_bool(&s.env_var(), v).unwrap_or(true)) || input.features.contains(&s);
            if asked {
                return Err(PlanError(format!(
                    "{s} ({}) and backend-dl ({}) do not combine: with dynamic backends ggml builds every backend as a module{}",
                    s.env_var(),
                    Switch::BackendDl.env_var(),
                    if s == Switch::Rpc { ", which the guards cannot link" } else { " meant for other CPUs too" }
                )));
            }
            switches.insert(s, false);
        }
    }
    if switches[&Switch::Native] && !input.host_build {
        return Err(PlanError(format!(
            "native CPU flags ({}) describe the build machine and cannot target {}; set {}=off",
            Switch::Native.cmake_define(),
            target.triple,
            Switch::Native.env_var()
        )));
    }
    // Unasked, AMX comes with native flags (-march=native enables it where the CPU has it) once
    // the patch makes ggml's AMX kernels correct; a non-native build names no AMX CPU.
    let amx_asked = input.env.contains_key(&Switch::Amx.env_var()) || input.features.contains(&Switch::Amx);
    if target.is_x86() && all_variants {
        // With one module per instruction-set level, ggml decides AMX per variant (its
        // Sapphire Rapids variant has it) whatever GGML_AMX_* say: the switch reports that, and
        // cannot be set.
        if amx_asked {
            return Err(PlanError(format!(
                "{} (amx) does not act on a build with GGML_CPU_ALL_VARIANTS, whose Sapphire Rapids variant always has AMX; \
                 unset it (EXSA_AMX=off turns AMX off at run time)",
                Switch::Amx.env_var()
            )));
        }
        switches.insert(Switch::Amx, true);
    } else if !amx_asked {
        switches.insert(Switch::Amx, input.amx_patched && switches[&Switch::Native]);
    }
    Ok(switches)
}

/// Whether the build makes one CPU module per instruction-set level: GGML_CPU_ALL_VARIANTS on
/// (through LLAMA_SYS_CMAKE_ARGS, the only way to set it).
fn all_cpu_variants(input: &PlanInput) -> Result<bool, PlanError> {
    let Some(args) = input.env.get(CMAKE_ARGS_VAR) else { return Ok(false) };
    let on = |v: &str| ["ON", "1", "TRUE", "YES", "Y"].contains(&v.to_ascii_uppercase().as_str());
    Ok(parse_cmake_args(args)?.iter().rev().find(|(k, _)| k == "GGML_CPU_ALL_VARIANTS").is_some_and(|(_, v)| on(v)))
}

/// Whether the CPU variants are tuned: where there are variants (x86, dynamic backends,
/// GGML_CPU_ALL_VARIANTS) and the compiler takes GCC's flags, unless turned off. Asked for where
/// it cannot act, an error.
fn tune_cpu_variants(input: &PlanInput, switches: &BTreeMap<Switch, bool>, all_variants: bool) -> Result<bool, PlanError> {
    let applies = input.target.is_x86() && switches[&Switch::BackendDl] && all_variants && input.compiler != CompilerFamily::Msvc;
    match input.env.get(CPU_VARIANT_TUNE_VAR).map(|v| parse_bool(CPU_VARIANT_TUNE_VAR, v)).transpose()? {
        Some(true) if !applies => Err(PlanError(format!(
            "{CPU_VARIANT_TUNE_VAR}=on tunes ggml's x86 CPU variants, which only a backend-dl build ({}) for x86 with GCC or Clang and {CMAKE_ARGS_VAR}=-DGGML_CPU_ALL_VARIANTS=ON has",
            Switch::BackendDl.env_var()
        ))),
        Some(asked) => Ok(asked),
        None => Ok(applies),
    }
}

/// GGML_CUDA_NO_VMM: asked for, or forced by a toolkit without the driver stub to link.
fn cuda_no_vmm(input: &PlanInput) -> Result<bool, PlanError> {
    match input.env.get(CUDA_NO_VMM_VAR) {
        Some(raw) => {
            let no_vmm = parse_bool(CUDA_NO_VMM_VAR, raw)?;
            if !no_vmm && !input.cuda_driver_stub {
                return Err(PlanError(format!(
                    "{CUDA_NO_VMM_VAR}=off needs the CUDA driver's link stub (lib64/stubs/libcuda.so under {CUDA_PATH_VAR}), which this toolkit lacks"
                )));
            }
            Ok(no_vmm)
        }
        None => Ok(!input.cuda_driver_stub),
    }
}

fn parse_bool(var: &str, raw: &str) -> Result<bool, PlanError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        other => Err(PlanError(format!("{var}={other:?} is not on/off (use 1/0, on/off, true/false)"))),
    }
}

/// CMAKE_<LANG>_FLAGS_RELEASE for an explicit optimisation level. `-Ofast` is refused: it
/// changes results, and every build here must give the same tokens.
fn release_flags(level: &str, compiler: CompilerFamily) -> Result<String, PlanError> {
    let level = level.trim();
    let valid = match compiler {
        CompilerFamily::Msvc => matches!(level, "1" | "2" | "d"),
        _ => matches!(level, "0" | "1" | "2" | "3" | "s" | "z"),
    };
    if !valid {
        return Err(PlanError(format!("{OPT_LEVEL_VAR}={level:?} is not an optimisation level this compiler takes (0-3, s, z; MSVC: 1, 2, d)")));
    }
    Ok(match compiler {
        CompilerFamily::Msvc => format!("/O{level} /DNDEBUG"),
        _ => format!("-O{level} -DNDEBUG"),
    })
}

fn validate_cuda_archs(archs: &str) -> Result<(), PlanError> {
    let ok = archs == "native"
        || archs == "all"
        || archs == "all-major"
        || archs.split(';').all(|a| {
            let a = a.trim_end_matches("-real").trim_end_matches("-virtual");
            !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric())
        });
    if ok {
        Ok(())
    } else {
        Err(PlanError(format!("{CUDA_ARCHS_VAR}={archs:?} is not a CMake CUDA architecture list (e.g. \"86;89\", \"90a\", \"native\")")))
    }
}

/// `-DNAME=VALUE` words; anything else is refused rather than handed to CMake unseen.
fn parse_cmake_args(args: &str) -> Result<Vec<(String, String)>, PlanError> {
    args.split_whitespace()
        .map(|word| {
            let body = word.strip_prefix("-D").ok_or_else(|| PlanError(format!("{CMAKE_ARGS_VAR}: {word:?} is not of the form -DNAME=VALUE")))?;
            let (name, value) = body.split_once('=').ok_or_else(|| PlanError(format!("{CMAKE_ARGS_VAR}: {word:?} has no =VALUE")))?;
            let name = name.split(':').next().unwrap_or(name); // -DNAME:BOOL=ON
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(PlanError(format!("{CMAKE_ARGS_VAR}: {name:?} is not a CMake variable name")));
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// Whether a GCC/Clang flag maps source paths in the output (`-ffile-prefix-map=FROM=TO`, and
/// the macro and debug-info forms): it changes no code, only what the output names.
pub fn is_path_map(flag: &str) -> bool {
    ["-ffile-prefix-map=", "-fmacro-prefix-map=", "-fdebug-prefix-map="].iter().any(|m| flag.starts_with(m))
}

fn parse_compiler_flags(var: &str, raw: Option<&String>) -> Result<Vec<String>, PlanError> {
    let Some(raw) = raw else { return Ok(Vec::new()) };
    raw.split_whitespace()
        .map(|flag| {
            if flag.starts_with('-') || flag.starts_with('/') {
                Ok(flag.to_string())
            } else {
                Err(PlanError(format!("{var}: {flag:?} is not a compiler flag (flags start with '-')")))
            }
        })
        .collect()
}

/// `cuda_vmm`: ggml's CUDA backend uses the driver API's memory pool, so the driver library is
/// linked.
fn link_list(input: &PlanInput, switches: &BTreeMap<Switch, bool>, cuda_vmm: bool) -> (Vec<Link>, Vec<String>) {
    let on = |s: Switch| switches[&s];
    let target = &input.target;
    let mut search_paths = Vec::new();
    if on(Switch::BackendDl) {
        // Every backend (the CPU's too) is a module ggml loads at run time; the program links
        // the three shared libraries alone, so it starts where a backend's own libraries (CUDA's)
        // are missing.
        let mut links: Vec<Link> = ["llama", "ggml", "ggml-base"].map(|l| Link::Dylib(l.into())).into();
        links.extend(system_links(input, switches));
        return (links, search_paths);
    }
    let mut links = vec![Link::Static("llama".into()), Link::Static("ggml".into()), Link::Static("ggml-cpu".into())];

    // Backends sit between ggml and ggml-base: they call into ggml-base and are registered by ggml.
    if on(Switch::Blas) {
        links.push(Link::Static("ggml-blas".into()));
    }
    if on(Switch::Metal) {
        links.push(Link::Static("ggml-metal".into()));
    }
    if on(Switch::Cuda) {
        links.push(Link::Static("ggml-cuda".into()));
    }
    if on(Switch::Rpc) {
        links.push(Link::Static("ggml-rpc".into()));
    }
    links.push(Link::Static("ggml-base".into()));

    if on(Switch::Cuda) {
        let root = input.env.get(CUDA_PATH_VAR).cloned().unwrap_or_else(|| "/usr/local/cuda".to_string());
        if target.os == "windows" {
            search_paths.push(format!("{root}/lib/x64"));
        } else {
            search_paths.push(format!("{root}/lib64"));
            // libcuda.so belongs to the driver; the stub lets machines without one link.
            search_paths.push(format!("{root}/lib64/stubs"));
        }
        for lib in ["cudart", "cublas", "cublasLt"] {
            links.push(Link::Dylib(lib.into()));
        }
        if cuda_vmm {
            links.push(Link::Dylib("cuda".into()));
        }
    }
    links.extend(system_links(input, switches));
    (links, search_paths)
}

/// BLAS, OpenMP, Apple frameworks and the C++ runtime: what the static libraries need from the
/// system (the dynamic-backend mode needs the C++ runtime too, for the shim).
fn system_links(input: &PlanInput, switches: &BTreeMap<Switch, bool>) -> Vec<Link> {
    let on = |s: Switch| switches[&s] && !switches[&Switch::BackendDl];
    let target = &input.target;
    let mut links = Vec::new();
    if on(Switch::Blas) && !target.is_apple() {
        let vendor = input.env.get(BLAS_VENDOR_VAR).map(String::as_str).unwrap_or("OpenBLAS");
        links.push(Link::Dylib(if vendor == "OpenBLAS" { "openblas".into() } else { vendor.to_ascii_lowercase() }));
    }
    if on(Switch::OpenMp) {
        match input.compiler {
            CompilerFamily::Gnu => links.push(Link::Dylib("gomp".into())),
            CompilerFamily::Clang => links.push(Link::Dylib("omp".into())),
            // MSVC's OpenMP runtime comes in through the compiler's default libraries.
            CompilerFamily::Msvc => {}
        }
    }
    if target.is_apple() {
        if on(Switch::Metal) {
            for fw in ["Foundation", "Metal", "MetalKit"] {
                links.push(Link::Framework(fw.into()));
            }
        }
        if on(Switch::Accelerate) || on(Switch::Blas) {
            links.push(Link::Framework("Accelerate".into()));
        }
        links.push(Link::Dylib("c++".into()));
    } else if target.os == "linux" || target.os == "android" {
        let cxx = if target.os == "android" { "c++_shared" } else { "stdc++" };
        for lib in [cxx, "m", "dl", "pthread"] {
            links.push(Link::Dylib(lib.into()));
        }
    } else if !target.is_msvc() {
        links.push(Link::Dylib("stdc++".into()));
    }
    links
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(triple: &str) -> Target {
        let (arch, os, env) = match triple {
            "x86_64-unknown-linux-gnu" => ("x86_64", "linux", "gnu"),
            "aarch64-unknown-linux-gnu" => ("aarch64", "linux", "gnu"),
            "aarch64-apple-darwin" => ("aarch64", "macos", ""),
            "x86_64-pc-windows-msvc" => ("x86_64", "windows", "msvc"),
            "aarch64-linux-android" => ("aarch64", "android", ""),
            other => panic!("no test target {other}"),
        };
        Target { triple: triple.into(), os: os.into(), arch: arch.into(), env: env.into() }
    }

    fn input(triple: &str) -> PlanInput {
        PlanInput {
            target: target(triple),
            host_build: true,
            compiler: if triple.contains("apple") { CompilerFamily::Clang } else { CompilerFamily::Gnu },
            features: BTreeSet::new(),
            env: BTreeMap::new(),
            ccache: None,
            cuda_driver_stub: true,
            amx_patched: true,
            build_number: None,
            build_commit: None,
        }
    }

    fn with_env(mut i: PlanInput, k: &str, v: &str) -> PlanInput {
        i.env.insert(k.into(), v.into());
        i
    }

    fn plan(i: &PlanInput) -> BuildPlan {
        BuildPlan::new(i).expect("plan")
    }

    fn define<'a>(p: &'a BuildPlan, k: &str) -> Option<&'a str> {
        p.defines.get(k).map(String::as_str)
    }

    fn position(p: &BuildPlan, l: &Link) -> usize {
        p.links.iter().position(|x| x == l).unwrap_or_else(|| panic!("{l:?} not linked: {:?}", p.links))
    }

    #[test]
    fn linux_x86_64_host_build_is_native_with_openmp() {
        let p = plan(&input("x86_64-unknown-linux-gnu"));
        assert_eq!(define(&p, "GGML_NATIVE"), Some("ON"));
        assert_eq!(define(&p, "GGML_OPENMP"), Some("ON"));
        assert_eq!(define(&p, "GGML_LLAMAFILE"), Some("ON"));
        assert_eq!(define(&p, "GGML_CPU_REPACK"), Some("ON"));
        assert_eq!(define(&p, "GGML_METAL"), Some("OFF"));
        assert_eq!(define(&p, "GGML_CUDA"), Some("OFF"));
        assert_eq!(define(&p, "GGML_RPC"), Some("ON"), "every build can use rpc-servers");
        assert!(p.links.contains(&Link::Static("ggml-rpc".into())));
        assert_eq!(define(&p, "CMAKE_BUILD_TYPE"), Some("Release"));
        assert_eq!(define(&p, "BUILD_SHARED_LIBS"), Some("OFF"));
        assert_eq!(define(&p, "LLAMA_BUILD_TESTS"), Some("OFF"));
        assert_eq!(define(&p, "LLAMA_BUILD_SERVER"), Some("OFF"));
        assert_eq!(define(&p, "LLAMA_OPENSSL"), Some("OFF"));
        assert!(p.links.contains(&Link::Dylib("gomp".into())));
        assert!(p.links.contains(&Link::Dylib("stdc++".into())));
        assert!(!p.links.iter().any(|l| matches!(l, Link::Framework(_))));
        assert_eq!(p.headers.len(), 6, "{:?}", p.headers);
    }

    #[test]
    fn static_link_order_puts_llama_first_and_ggml_base_after_backends() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.extend([Switch::Cuda, Switch::Blas, Switch::Rpc]);
        let p = plan(&i);
        let base = position(&p, &Link::Static("ggml-base".into()));
        assert_eq!(position(&p, &Link::Static("llama".into())), 0);
        for backend in ["ggml", "ggml-cpu", "ggml-blas", "ggml-cuda", "ggml-rpc"] {
            assert!(position(&p, &Link::Static(backend.into())) < base, "{backend} after ggml-base");
        }
        // System libraries come after every static library that needs them.
        assert!(position(&p, &Link::Dylib("cublas".into())) > base);
        assert!(position(&p, &Link::Dylib("stdc++".into())) > base);
    }

    #[test]
    fn apple_silicon_uses_metal_with_embedded_shaders_and_accelerate() {
        let p = plan(&input("aarch64-apple-darwin"));
        assert_eq!(define(&p, "GGML_METAL"), Some("ON"));
        assert_eq!(define(&p, "GGML_METAL_EMBED_LIBRARY"), Some("ON"));
        assert_eq!(define(&p, "GGML_ACCELERATE"), Some("ON"));
        assert_eq!(define(&p, "GGML_NATIVE"), Some("ON"));
        assert_eq!(define(&p, "GGML_OPENMP"), Some("OFF"));
        for fw in ["Metal", "MetalKit", "Foundation", "Accelerate"] {
            assert!(p.links.contains(&Link::Framework(fw.into())), "{fw} not linked: {:?}", p.links);
        }
        assert!(p.links.contains(&Link::Static("ggml-metal".into())));
        assert!(p.links.contains(&Link::Dylib("c++".into())));
        assert!(!p.links.contains(&Link::Dylib("stdc++".into())));
        assert!(position(&p, &Link::Static("ggml-metal".into())) < position(&p, &Link::Static("ggml-base".into())));
    }

    #[test]
    fn apple_metal_can_be_turned_off_by_env() {
        let p = plan(&with_env(input("aarch64-apple-darwin"), "LLAMA_SYS_METAL", "off"));
        assert_eq!(define(&p, "GGML_METAL"), Some("OFF"));
        assert_eq!(define(&p, "GGML_METAL_EMBED_LIBRARY"), None);
        assert!(!p.links.contains(&Link::Framework("Metal".into())));
        assert!(p.links.contains(&Link::Framework("Accelerate".into())));
    }

    #[test]
    fn apple_blas_uses_the_accelerate_vendor() {
        let mut i = input("aarch64-apple-darwin");
        i.features.insert(Switch::Blas);
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_BLAS_VENDOR"), Some("Apple"));
        assert!(!p.links.contains(&Link::Dylib("openblas".into())));
    }

    #[test]
    fn linux_cuda_links_the_runtime_and_cublas_and_sets_architectures() {
        let mut i = with_env(input("x86_64-unknown-linux-gnu"), CUDA_ARCHS_VAR, "86;90a");
        i.features.insert(Switch::Cuda);
        i.ccache = Some("/usr/bin/ccache".into());
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_CUDA"), Some("ON"));
        assert_eq!(define(&p, "CMAKE_CUDA_ARCHITECTURES"), Some("86;90a"));
        assert_eq!(define(&p, "CMAKE_CUDA_COMPILER_LAUNCHER"), Some("/usr/bin/ccache"));
        for lib in ["cudart", "cublas", "cuda"] {
            assert!(p.links.contains(&Link::Dylib(lib.into())), "{lib} not linked");
        }
        assert!(p.links.contains(&Link::Static("ggml-cuda".into())));
        assert!(p.search_paths.contains(&"/usr/local/cuda/lib64".to_string()));
    }

    #[test]
    fn cuda_without_architectures_builds_the_current_generations() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.insert(Switch::Cuda);
        let p = plan(&i);
        assert_eq!(define(&p, "CMAKE_CUDA_ARCHITECTURES"), Some(DEFAULT_CUDA_ARCHS));
        for arch in ["89-real", "90a-real", "120a-real", "-virtual"] {
            assert!(DEFAULT_CUDA_ARCHS.contains(arch), "{arch}");
        }
        assert_eq!(define(&p, "GGML_CUDA_NO_VMM"), Some("OFF"));
    }

    #[test]
    fn a_toolkit_without_the_driver_stub_builds_without_vmm_and_links_no_driver() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.insert(Switch::Cuda);
        i.cuda_driver_stub = false;
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_CUDA_NO_VMM"), Some("ON"));
        assert!(!p.links.contains(&Link::Dylib("cuda".into())), "{:?}", p.links);
        assert!(p.links.contains(&Link::Dylib("cudart".into())) && p.links.contains(&Link::Dylib("cublas".into())));
        // Asking for the pool without the stub is refused by name.
        let err = BuildPlan::new(&with_env(i.clone(), CUDA_NO_VMM_VAR, "off")).unwrap_err();
        assert!(err.0.contains(CUDA_NO_VMM_VAR), "{err}");
        // With the stub, no-VMM can still be asked for, and then the driver is not linked.
        i.cuda_driver_stub = true;
        let p = plan(&with_env(i, CUDA_NO_VMM_VAR, "1"));
        assert_eq!(define(&p, "GGML_CUDA_NO_VMM"), Some("ON"));
        assert!(!p.links.contains(&Link::Dylib("cuda".into())));
    }

    #[test]
    fn backend_dl_links_three_shared_libraries_and_no_backend() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.extend([Switch::BackendDl, Switch::Cuda]);
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_BACKEND_DL"), Some("ON"));
        assert_eq!(define(&p, "BUILD_SHARED_LIBS"), Some("ON"));
        assert_eq!(define(&p, "GGML_CUDA"), Some("ON"), "the CUDA module is still built");
        let dylibs: Vec<&Link> = p.links.iter().filter(|l| matches!(l, Link::Dylib(n) if n.starts_with("llama") || n.starts_with("ggml"))).collect();
        assert_eq!(dylibs, [&Link::Dylib("llama".into()), &Link::Dylib("ggml".into()), &Link::Dylib("ggml-base".into())]);
        assert!(!p.links.iter().any(|l| matches!(l, Link::Static(_))), "{:?}", p.links);
        for lib in ["cudart", "cublas", "cuda", "gomp"] {
            assert!(!p.links.contains(&Link::Dylib(lib.into())), "{lib}: a module's library, not the program's");
        }
        // RPC goes: the shim cannot link a module's functions. Asked for by name, it is an error.
        assert!(!p.switches[&Switch::Rpc]);
        assert!(!p.headers.contains(&"ggml/include/ggml-rpc.h"));
        let err = BuildPlan::new(&with_env(i.clone(), &Switch::Rpc.env_var(), "on")).unwrap_err();
        assert!(err.0.contains("backend-dl"), "{err}");
        // Native flags likewise (ggml refuses them with dynamic backends): off, or an error when
        // asked for; an explicit "off" is fine.
        assert_eq!(define(&p, "GGML_NATIVE"), Some("OFF"));
        assert!(!p.cxx_flags.iter().any(|f| f.contains("amx")), "{:?}", p.cxx_flags);
        let err = BuildPlan::new(&with_env(i.clone(), &Switch::Native.env_var(), "1")).unwrap_err();
        assert!(err.0.contains("native") && err.0.contains("backend-dl"), "{err}");
        assert!(BuildPlan::new(&with_env(i.clone(), &Switch::Native.env_var(), "off")).is_ok());
        assert_eq!(Switch::BackendDl.env_var(), "LLAMA_SYS_BACKEND_DL");
    }

    #[test]
    fn a_relocatable_dynamic_build_finds_its_libraries_beside_each_other() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.insert(Switch::BackendDl);
        assert!(!plan(&i).relocatable);
        assert_eq!(define(&plan(&i), "CMAKE_INSTALL_RPATH"), None);
        let p = plan(&with_env(i.clone(), RELOCATABLE_VAR, "1"));
        assert!(p.relocatable);
        assert_eq!(define(&p, "CMAKE_INSTALL_RPATH"), Some("$ORIGIN"));
        let mut mac = input("aarch64-apple-darwin");
        mac.features.insert(Switch::BackendDl);
        assert_eq!(define(&plan(&with_env(mac, RELOCATABLE_VAR, "on")), "CMAKE_INSTALL_RPATH"), Some("@loader_path"));
        // A static build has no libraries to find: relocatable, it only compiles no paths in.
        let p = plan(&with_env(input("x86_64-unknown-linux-gnu"), RELOCATABLE_VAR, "1"));
        assert!(p.relocatable && define(&p, "CMAKE_INSTALL_RPATH").is_none());
        let err = BuildPlan::new(&with_env(i, RELOCATABLE_VAR, "maybe")).unwrap_err();
        assert!(err.0.contains(RELOCATABLE_VAR), "{err}");
    }

    #[test]
    fn the_cpu_variants_are_tuned_in_an_x86_dynamic_build_unless_turned_off() {
        let all_variants = |mut i: PlanInput| {
            i.features.insert(Switch::BackendDl);
            with_env(i, CMAKE_ARGS_VAR, "-DGGML_CPU_ALL_VARIANTS=ON")
        };
        let dl = all_variants(input("x86_64-unknown-linux-gnu"));
        assert!(plan(&dl).tune_cpu_variants);
        assert!(!plan(&with_env(dl.clone(), CPU_VARIANT_TUNE_VAR, "off")).tune_cpu_variants);
        let mut clang = dl.clone();
        clang.compiler = CompilerFamily::Clang;
        assert!(plan(&clang).tune_cpu_variants);
        // Where there are no variants to tune, or the compiler takes no -mtune: off, and an
        // error when asked for.
        let static_build = input("x86_64-unknown-linux-gnu");
        let mut one_module = input("x86_64-unknown-linux-gnu");
        one_module.features.insert(Switch::BackendDl);
        let arm = all_variants(input("aarch64-unknown-linux-gnu"));
        let mut msvc = all_variants(input("x86_64-pc-windows-msvc"));
        msvc.compiler = CompilerFamily::Msvc;
        for i in [static_build, one_module, arm, msvc] {
            assert!(!plan(&i).tune_cpu_variants, "{} {:?}", i.target.triple, i.env);
            let err = BuildPlan::new(&with_env(i, CPU_VARIANT_TUNE_VAR, "on")).unwrap_err();
            assert!(err.0.contains(CPU_VARIANT_TUNE_VAR) && err.0.contains("GGML_CPU_ALL_VARIANTS"), "{err}");
        }
        let err = BuildPlan::new(&with_env(dl, CPU_VARIANT_TUNE_VAR, "sometimes")).unwrap_err();
        assert!(err.0.contains(CPU_VARIANT_TUNE_VAR), "{err}");
    }

    #[test]
    fn cuda_path_moves_the_search_path() {
        let mut i = with_env(input("x86_64-unknown-linux-gnu"), CUDA_PATH_VAR, "/opt/cuda-12.8");
        i.features.insert(Switch::Cuda);
        assert_eq!(plan(&i).search_paths[0], "/opt/cuda-12.8/lib64");
        assert_eq!(define(&plan(&i), "CMAKE_CUDA_COMPILER"), Some("/opt/cuda-12.8/bin/nvcc"));
        assert_eq!(define(&plan(&i), "CUDAToolkit_ROOT"), Some("/opt/cuda-12.8"));
    }

    #[test]
    fn bad_cuda_architectures_are_refused_by_name() {
        let mut i = with_env(input("x86_64-unknown-linux-gnu"), CUDA_ARCHS_VAR, "sm_86; rm -rf");
        i.features.insert(Switch::Cuda);
        let err = BuildPlan::new(&i).unwrap_err();
        assert!(err.0.contains(CUDA_ARCHS_VAR), "{err}");
    }

    #[test]
    fn openmp_off_uses_ggml_threadpool_and_links_no_runtime() {
        let p = plan(&with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_OPENMP", "0"));
        assert_eq!(define(&p, "GGML_OPENMP"), Some("OFF"));
        assert!(!p.links.contains(&Link::Dylib("gomp".into())));
        assert!(!p.links.contains(&Link::Dylib("omp".into())));
    }

    #[test]
    fn clang_openmp_links_libomp() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.compiler = CompilerFamily::Clang;
        assert!(plan(&i).links.contains(&Link::Dylib("omp".into())));
    }

    #[test]
    fn env_overrides_beat_features_and_platform_defaults() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.insert(Switch::Lto);
        i.env.insert("LLAMA_SYS_LTO".into(), "off".into());
        i.env.insert("LLAMA_SYS_NATIVE".into(), "false".into());
        i.env.insert("LLAMA_SYS_LLAMAFILE".into(), "no".into());
        i.env.insert("LLAMA_SYS_BLAS".into(), "yes".into());
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_LTO"), Some("OFF"));
        assert_eq!(define(&p, "GGML_NATIVE"), Some("OFF"));
        assert_eq!(define(&p, "GGML_LLAMAFILE"), Some("OFF"));
        assert_eq!(define(&p, "GGML_BLAS"), Some("ON"));
        assert_eq!(define(&p, "GGML_BLAS_VENDOR"), Some("OpenBLAS"));
        assert!(p.links.contains(&Link::Dylib("openblas".into())));
    }

    #[test]
    fn gcc_lto_is_refused_with_the_reason_and_clang_lto_allowed() {
        let err = BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_LTO", "on")).unwrap_err();
        assert!(err.0.starts_with("LLAMA_SYS_LTO") && err.0.contains("cannot link"), "{err}");
        let mut clang = with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_LTO", "on");
        clang.compiler = CompilerFamily::Clang;
        assert_eq!(define(&plan(&clang), "GGML_LTO"), Some("ON"));
    }

    #[test]
    fn features_force_switches_on() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.extend([Switch::Lto, Switch::Blas]);
        i.compiler = CompilerFamily::Clang;
        let p = plan(&i);
        assert_eq!(define(&p, "GGML_LTO"), Some("ON"));
        assert_eq!(define(&p, "GGML_BLAS"), Some("ON"));
    }

    #[test]
    fn rpc_is_on_by_default_everywhere_and_the_environment_turns_it_off() {
        for triple in ["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu", "aarch64-apple-darwin", "x86_64-pc-windows-msvc"] {
            let p = plan(&input(triple));
            assert_eq!(define(&p, "GGML_RPC"), Some("ON"), "{triple}");
            assert!(p.headers.contains(&"ggml/include/ggml-rpc.h"), "{triple}");
        }
        let off = plan(&with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_RPC", "off"));
        assert_eq!(define(&off, "GGML_RPC"), Some("OFF"));
        assert!(!off.headers.contains(&"ggml/include/ggml-rpc.h"));
        assert!(!off.links.contains(&Link::Static("ggml-rpc".into())));
    }

    #[test]
    fn opt_level_sets_release_flags() {
        let p = plan(&with_env(input("x86_64-unknown-linux-gnu"), OPT_LEVEL_VAR, "2"));
        assert_eq!(define(&p, "CMAKE_C_FLAGS_RELEASE"), Some("-O2 -DNDEBUG"));
        assert_eq!(define(&p, "CMAKE_CXX_FLAGS_RELEASE"), Some("-O2 -DNDEBUG"));
        assert!(!plan(&input("x86_64-unknown-linux-gnu")).defines.contains_key("CMAKE_C_FLAGS_RELEASE"));
    }

    #[test]
    fn a_build_of_every_cpu_variant_reports_amx_as_ggml_decides_it_and_refuses_to_set_it() {
        let mut i = with_env(input("x86_64-unknown-linux-gnu"), CMAKE_ARGS_VAR, "-DGGML_CPU_ALL_VARIANTS=ON");
        i.features.insert(Switch::BackendDl);
        // Not native, and even unpatched: ggml's Sapphire Rapids variant has AMX.
        i.amx_patched = false;
        assert!(plan(&i).switches[&Switch::Amx]);
        for value in ["off", "on"] {
            let err = BuildPlan::new(&with_env(i.clone(), &Switch::Amx.env_var(), value)).unwrap_err();
            assert!(err.0.contains("LLAMA_SYS_AMX") && err.0.contains("GGML_CPU_ALL_VARIANTS") && err.0.contains("EXSA_AMX=off"), "{err}");
        }
        // The last definition counts, as in CMake.
        let off_again = with_env(i.clone(), CMAKE_ARGS_VAR, "-DGGML_CPU_ALL_VARIANTS=ON -DGGML_CPU_ALL_VARIANTS=OFF");
        assert!(!plan(&off_again).switches[&Switch::Amx]);
    }

    #[test]
    fn native_x86_builds_have_amx_where_the_patch_applies_and_leave_it_out_otherwise() {
        let linux = || input("x86_64-unknown-linux-gnu");
        let p = plan(&linux());
        assert!(p.switches[&Switch::Amx]);
        assert_eq!(define(&p, "GGML_AMX_INT8"), Some("ON"));
        assert!(!p.cxx_flags.iter().any(|f| f.contains("amx")), "{:?}", p.cxx_flags);
        // The ways out: the variable, and a tree that does not take the patch.
        for off in [with_env(linux(), "LLAMA_SYS_AMX", "off"), PlanInput { amx_patched: false, ..linux() }] {
            let p = plan(&off);
            assert_eq!(define(&p, "GGML_AMX_INT8"), Some("OFF"));
            assert!(p.cxx_flags.contains(&"-mno-amx-int8".to_string()), "{:?}", p.cxx_flags);
        }
        // Asked for by name, it is on even unpatched (testing an upstream fix).
        let asked = plan(&with_env(PlanInput { amx_patched: false, ..linux() }, "LLAMA_SYS_AMX", "on"));
        assert_eq!(define(&asked, "GGML_AMX_TILE"), Some("ON"));
        assert!(!asked.cxx_flags.iter().any(|f| f.contains("amx")));
        // Without native flags the build names no CPU: no AMX unless asked.
        let generic = plan(&with_env(linux(), "LLAMA_SYS_NATIVE", "off"));
        assert_eq!(define(&generic, "GGML_AMX_INT8"), Some("OFF"));
        let arm = plan(&input("aarch64-apple-darwin"));
        assert_eq!(define(&arm, "GGML_AMX_INT8"), None);
        assert!(arm.cxx_flags.is_empty());
    }

    #[test]
    fn the_compiler_can_be_chosen() {
        let mut i = with_env(input("x86_64-unknown-linux-gnu"), CC_VAR, "clang");
        i.env.insert(CXX_VAR.into(), "clang++".into());
        let p = plan(&i);
        assert_eq!(define(&p, "CMAKE_C_COMPILER"), Some("clang"));
        assert_eq!(define(&p, "CMAKE_CXX_COMPILER"), Some("clang++"));
        assert!(BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), CC_VAR, "gcc -O0")).is_err());
    }

    #[test]
    fn fast_math_opt_level_is_refused() {
        let err = BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), OPT_LEVEL_VAR, "fast")).unwrap_err();
        assert!(err.0.starts_with(OPT_LEVEL_VAR), "{err}");
    }

    #[test]
    fn bad_switch_values_name_the_variable() {
        let err = BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_OPENMP", "maybe")).unwrap_err();
        assert!(err.0.contains("LLAMA_SYS_OPENMP"), "{err}");
    }

    #[test]
    fn metal_on_linux_is_refused() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.features.insert(Switch::Metal);
        let err = BuildPlan::new(&i).unwrap_err();
        assert!(err.0.contains("Apple target"), "{err}");
    }

    #[test]
    fn cross_builds_are_not_native() {
        let mut i = input("aarch64-unknown-linux-gnu");
        i.host_build = false;
        assert_eq!(define(&plan(&i), "GGML_NATIVE"), Some("OFF"));
        i.env.insert("LLAMA_SYS_NATIVE".into(), "on".into());
        assert!(BuildPlan::new(&i).unwrap_err().0.contains("LLAMA_SYS_NATIVE"));
    }

    #[test]
    fn cmake_args_pass_through_validated() {
        let p = plan(&with_env(input("x86_64-unknown-linux-gnu"), CMAKE_ARGS_VAR, "-DGGML_AVX512=OFF -DGGML_SCHED_MAX_COPIES:STRING=2"));
        assert_eq!(define(&p, "GGML_AVX512"), Some("OFF"));
        assert_eq!(define(&p, "GGML_SCHED_MAX_COPIES"), Some("2"));
        for bad in ["GGML_AVX512=OFF", "-DGGML_AVX512", "-D=1", "-D$(x)=1"] {
            let err = BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), CMAKE_ARGS_VAR, bad)).unwrap_err();
            assert!(err.0.starts_with(CMAKE_ARGS_VAR), "{bad}: {err}");
        }
    }

    #[test]
    fn compiler_flags_pass_through_validated() {
        let p = plan(&with_env(input("x86_64-unknown-linux-gnu"), CFLAGS_VAR, "-fno-plt  -mtune=znver3"));
        assert!(p.c_flags.ends_with(&["-fno-plt".to_string(), "-mtune=znver3".to_string()]), "{:?}", p.c_flags);
        let err = BuildPlan::new(&with_env(input("x86_64-unknown-linux-gnu"), CXXFLAGS_VAR, "-O2 ;rm")).unwrap_err();
        assert!(err.0.starts_with(CXXFLAGS_VAR), "{err}");
    }

    #[test]
    fn a_cuda_build_hands_the_path_maps_to_nvcc() {
        let maps = "-O2 -ffile-prefix-map=/b/src=exsa-build-0 -fmacro-prefix-map=/home/u/.cargo=exsa-build-1";
        let cuda = with_env(with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_CUDA", "on"), CXXFLAGS_VAR, maps);
        assert_eq!(
            define(&plan(&cuda), "CMAKE_CUDA_FLAGS"),
            Some("-Xcompiler=-ffile-prefix-map=/b/src=exsa-build-0,-fmacro-prefix-map=/home/u/.cargo=exsa-build-1")
        );
        // Beside flags asked for by name; and not at all without CUDA, or without maps.
        let asked = with_env(cuda.clone(), CMAKE_ARGS_VAR, "-DCMAKE_CUDA_FLAGS=-lineinfo");
        assert!(define(&plan(&asked), "CMAKE_CUDA_FLAGS").is_some_and(|f| f.starts_with("-lineinfo -Xcompiler=-ffile-prefix-map=")));
        assert_eq!(define(&plan(&with_env(input("x86_64-unknown-linux-gnu"), CXXFLAGS_VAR, maps)), "CMAKE_CUDA_FLAGS"), None);
        assert_eq!(define(&plan(&with_env(cuda, CXXFLAGS_VAR, "-O2")), "CMAKE_CUDA_FLAGS"), None);
    }

    #[test]
    fn ccache_becomes_the_compiler_launcher() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.ccache = Some("/usr/bin/ccache".into());
        let p = plan(&i);
        assert_eq!(define(&p, "CMAKE_C_COMPILER_LAUNCHER"), Some("/usr/bin/ccache"));
        assert_eq!(define(&p, "CMAKE_CXX_COMPILER_LAUNCHER"), Some("/usr/bin/ccache"));
        assert_eq!(define(&p, "CMAKE_CUDA_COMPILER_LAUNCHER"), None);
    }

    #[test]
    fn fingerprint_changes_with_every_flag_and_only_then() {
        let base = plan(&input("x86_64-unknown-linux-gnu"));
        assert_eq!(base.fingerprint(), plan(&input("x86_64-unknown-linux-gnu")).fingerprint());
        let other = plan(&with_env(input("x86_64-unknown-linux-gnu"), "LLAMA_SYS_REPACK", "off"));
        assert_ne!(base.fingerprint(), other.fingerprint());
        let flags = plan(&with_env(input("x86_64-unknown-linux-gnu"), CFLAGS_VAR, "-fno-plt"));
        assert_ne!(base.fingerprint(), flags.fingerprint());
    }

    #[test]
    fn fingerprint_changes_with_every_switch_and_setting() {
        let base = input("x86_64-unknown-linux-gnu");
        let base_fp = plan(&base).fingerprint();
        for s in Switch::ALL {
            let flipped = !plan(&base).switches[&s];
            let value = if flipped { "on" } else { "off" };
            // Some flips are refused on this target (Metal off Apple, LTO with GCC): no build, no key.
            if let Ok(p) = BuildPlan::new(&with_env(base.clone(), &s.env_var(), value)) {
                assert_ne!(p.fingerprint(), base_fp, "flipping {s} must change the build folder's key");
            }
        }
        let mut cuda = base.clone();
        cuda.features.insert(Switch::Cuda);
        let cuda_fp = plan(&cuda).fingerprint();
        for (var, value, on) in [
            (OPT_LEVEL_VAR, "2", &base),
            (CFLAGS_VAR, "-fno-plt", &base),
            (CXXFLAGS_VAR, "-fno-plt", &base),
            (CMAKE_ARGS_VAR, "-DGGML_SCHED_MAX_COPIES=2", &base),
            (CC_VAR, "clang", &base),
            (CXX_VAR, "clang++", &base),
            (BLAS_VENDOR_VAR, "Intel10_64lp", &base),
            (CUDA_ARCHS_VAR, "89-real", &cuda),
            (CUDA_NO_VMM_VAR, "1", &cuda),
            (CUDA_PATH_VAR, "/opt/cuda", &cuda),
        ] {
            let before = if std::ptr::eq(on, &cuda) { &cuda_fp } else { &base_fp };
            let changed = plan(&with_env(on.clone(), var, value)).fingerprint();
            // The BLAS vendor only matters with BLAS on.
            if var == BLAS_VENDOR_VAR {
                assert_eq!(&changed, before, "{var} without BLAS changes nothing");
                let mut blas = base.clone();
                blas.features.insert(Switch::Blas);
                assert_ne!(plan(&blas).fingerprint(), plan(&with_env(blas.clone(), var, value)).fingerprint(), "{var}");
                continue;
            }
            assert_ne!(&changed, before, "{var}={value} must change the build folder's key");
        }
    }

    #[test]
    fn windows_msvc_links_no_cxx_runtime_and_finds_cuda_under_x64() {
        let mut i = input("x86_64-pc-windows-msvc");
        i.compiler = CompilerFamily::Msvc;
        let p = plan(&i);
        assert!(!p.switches[&Switch::Native], "MSVC has no -march=native: native is off by default");
        assert!(!p.links.iter().any(|l| matches!(l, Link::Dylib(n) if n == "stdc++" || n == "gomp" || n == "omp")), "{:?}", p.links);
        assert!(p.cxx_flags.iter().all(|f| !f.contains("amx")), "no GCC flags for MSVC");
        assert_eq!(define(&plan(&with_env(i.clone(), OPT_LEVEL_VAR, "2")), "CMAKE_CXX_FLAGS_RELEASE"), Some("/O2 /DNDEBUG"));
        let mut cuda = with_env(i, CUDA_PATH_VAR, "C:/CUDA/v13.0");
        cuda.features.insert(Switch::Cuda);
        let p = plan(&cuda);
        assert_eq!(p.search_paths, ["C:/CUDA/v13.0/lib/x64"]);
        assert_eq!(define(&p, "CMAKE_CUDA_COMPILER"), Some("C:/CUDA/v13.0/bin/nvcc.exe"));
    }

    #[test]
    fn android_links_the_shared_cxx_runtime_and_is_never_native_when_cross_compiled() {
        let mut i = input("aarch64-linux-android");
        i.host_build = false;
        i.compiler = CompilerFamily::Clang;
        let p = plan(&i);
        assert!(!p.switches[&Switch::Native]);
        assert!(!p.switches[&Switch::Metal] && !p.switches[&Switch::Accelerate]);
        for lib in ["c++_shared", "m", "dl", "pthread", "omp"] {
            assert!(p.links.contains(&Link::Dylib(lib.into())), "{lib}: {:?}", p.links);
        }
        assert!(!p.links.contains(&Link::Dylib("stdc++".into())));
        assert!(!defines_key(&p, "GGML_AMX_TILE"), "AMX is an x86 switch");
        let err = BuildPlan::new(&with_env(i, &Switch::Native.env_var(), "on")).unwrap_err();
        assert!(err.0.contains("aarch64-linux-android"), "{err}");
    }

    fn defines_key(p: &BuildPlan, key: &str) -> bool {
        p.defines.contains_key(key)
    }

    #[test]
    fn pin_sets_llama_cpp_build_number_and_commit() {
        let mut i = input("x86_64-unknown-linux-gnu");
        i.build_number = Some(7000);
        i.build_commit = Some("abc1234".into());
        let p = plan(&i);
        assert_eq!(define(&p, "LLAMA_BUILD_NUMBER"), Some("7000"));
        assert_eq!(define(&p, "LLAMA_BUILD_COMMIT"), Some("abc1234"));
    }

    #[test]
    fn the_switches_are_the_manifests_features() {
        // xtask reads the switch list from the manifest (its features but the extras); the plan
        // must agree with it.
        let manifest = include_str!("../Cargo.toml");
        let section = manifest.split("\n[features]\n").nth(1).expect("a [features] section");
        let section = section.split("\n[").next().unwrap();
        let extras: Vec<&str> = manifest
            .lines()
            .find_map(|l| l.strip_prefix("extras = "))
            .expect("package.metadata.llama-sys.extras")
            .trim_matches(['[', ']'])
            .split(',')
            .map(|e| e.trim().trim_matches('"'))
            .collect();
        let features: BTreeSet<&str> = section
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .filter(|k| !k.is_empty() && !k.starts_with('#') && *k != "default" && !extras.contains(k))
            .collect();
        let switches: BTreeSet<&str> = Switch::ALL.iter().map(|s| s.feature()).collect();
        assert_eq!(features, switches);
    }

    #[test]
    fn every_switch_has_a_distinct_variable_and_define() {
        let vars: BTreeSet<_> = Switch::ALL.iter().map(|s| s.env_var()).collect();
        let defines: BTreeSet<_> = Switch::ALL.iter().map(|s| s.cmake_define()).collect();
        assert_eq!(vars.len(), Switch::ALL.len());
        assert_eq!(defines.len(), Switch::ALL.len());
        assert!(known_env_vars().contains(&"LLAMA_SYS_OPENMP".to_string()));
    }
}
