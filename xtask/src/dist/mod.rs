//! `cargo xtask dist`: the release bundle, one download that runs at native speed on any x86-64
//! Linux machine. `exsa` is built with dynamic backends (llama-sys `backend-dl`) and ggml's
//! `GGML_CPU_ALL_VARIANTS`: one CPU module per instruction-set level, from plain x86-64 to
//! AVX-512 with VNNI/BF16 and AMX, of which the best one this CPU runs is loaded at start
//! (`exsa info` says which and why; `EXSA_CPU_VARIANT` forces one); each variant that one CPU
//! family loads is tuned for it (llama-sys `build/variant_tuning.rs`). The build is relocatable
//! (llama-sys `LLAMA_SYS_RELOCATABLE`): the program finds its libraries in `../lib` and the
//! libraries each other beside themselves, and it names none of the build's folders.
//!
//! Written: `target/dist/exsa-<version>-x86_64-linux.tar.gz`, a folder of that name with
//! `bin/exsa`, `lib/` (libllama, libggml, libggml-base, the modules, and the OpenMP runtime the
//! CPU modules link, which a machine without GCC lacks), the licences and a README. Checked
//! here before it is packed: every library search path is relative, no file names a folder of
//! this build, and a module with ggml's AMX kernels (the Sapphire Rapids variant) carries
//! llama-sys' fix of them (docs/amx.md). `--check` then proves it runs without the build
//! ([`check`]).

mod check;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::dynamic_build::{self, DynamicBuild};
use crate::workspace;

#[derive(clap::Args)]
pub struct Args {
    /// Also build the CUDA module (the toolkit of `cargo xtask setup --cuda`, or CUDA_PATH).
    #[arg(long)]
    cuda: bool,
    /// With --cuda: the CUDA architectures to compile for (LLAMA_SYS_CUDA_ARCHITECTURES, e.g.
    /// `90-real`); default: llama-sys' list, which a release wants and which takes hours on a
    /// small machine (docs/gpu.md).
    #[arg(long, requires = "cuda")]
    cuda_archs: Option<String>,
    /// Then unpack the bundle into an empty folder with this build out of reach, check that it
    /// generates the native build's greedy tokens with the CPU variant it chooses and with
    /// every other variant this CPU runs, and that it refuses the variants it cannot run.
    #[arg(long)]
    check: bool,
    /// Model for --check (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
}

impl Args {
    /// The bundle of CPU variants, built and checked (`cargo xtask test` runs it).
    pub fn checked() -> Args {
        Args { cuda: false, cuda_archs: None, check: true, model: None }
    }
}

/// What the bundle is called, and its folder and tarball.
pub struct Bundle {
    pub name: String,
    pub dir: PathBuf,
    pub tarball: PathBuf,
}

impl Bundle {
    pub fn new() -> Bundle {
        let name = format!("exsa-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
        let out = workspace::target_dir().join("dist");
        Bundle { dir: out.join(&name), tarball: out.join(format!("{name}.tar.gz")), name }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let cuda = args.cuda.then(|| Cuda { archs: args.cuda_archs.clone() });
    let (bundle, build) = make(cuda.as_ref(), &[])?;
    pack(&bundle)?;
    let size = std::fs::metadata(&bundle.tarball)?.len();
    eprintln!("dist: {} ({:.1} MiB)", bundle.tarball.display(), size as f64 / f64::from(1 << 20));
    if args.check {
        let model = args.model.clone().unwrap_or_else(crate::fetch_model::default_path);
        check::run(&bundle, &build, &model)?;
    }
    println!("{}", bundle.tarball.display());
    Ok(())
}

/// The CUDA module's build: the architectures, or llama-sys' list.
pub struct Cuda {
    pub archs: Option<String>,
}

/// Builds and assembles the bundle's folder, checked relocatable (not packed), with the CUDA
/// module when `cuda` says how. `overrides`: llama-sys variables over the bundle's defaults (a
/// benchmark's bundle variant, e.g. `LLAMA_SYS_CPU_VARIANT_TUNE=off`); one the bundle's build
/// sets itself is refused.
pub fn make(cuda: Option<&Cuda>, overrides: &[(String, String)]) -> Result<(Bundle, DynamicBuild)> {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        bail!("dist builds the x86-64 Linux bundle; run it on x86-64 Linux");
    }
    let bundle = Bundle::new();
    let build = build(cuda, overrides)?;
    assemble(&build, &bundle)?;
    check_relocatable(&bundle.dir, &forbidden_paths()?)?;
    Ok((bundle, build))
}

/// The relocatable dynamic-backend build with every CPU variant.
fn build(cuda: Option<&Cuda>, overrides: &[(String, String)]) -> Result<DynamicBuild> {
    // Source paths in assertion and panic messages name the build's folders: mapped to short
    // names (the recorded flags leave the maps out).
    let maps = path_maps()?;
    let c_maps: Vec<String> = maps.iter().map(|(from, to)| format!("-ffile-prefix-map={}={to}", from.display())).collect();
    let rust_maps: Vec<String> = maps.iter().map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display())).collect();
    let mut env = vec![
        // The bundle runs on other machines: no tuned profile of this one.
        ("LLAMA_SYS_PROFILE", "none".to_owned()),
        ("LLAMA_SYS_RELOCATABLE", "1".to_owned()),
        ("LLAMA_SYS_CMAKE_ARGS", "-DGGML_CPU_ALL_VARIANTS=ON".to_owned()),
        ("LLAMA_SYS_CFLAGS", c_maps.join(" ")),
        ("LLAMA_SYS_CXXFLAGS", c_maps.join(" ")),
        // The shim and the chat layer, compiled by the `cc` crate.
        ("CFLAGS", c_maps.join(" ")),
        ("CXXFLAGS", c_maps.join(" ")),
        ("RUSTFLAGS", rust_maps.join(" ")),
    ];
    let features = if let Some(cuda) = cuda {
        env.push(("CUDA_PATH", cuda_toolkit()?.display().to_string()));
        if let Some(archs) = &cuda.archs {
            env.push(("LLAMA_SYS_CUDA_ARCHITECTURES", archs.clone()));
        }
        "backend-dl,cuda"
    } else {
        "backend-dl"
    };
    for (var, value) in overrides {
        if !var.starts_with("LLAMA_SYS_") {
            bail!("{var} is no llama-sys variable (LLAMA_SYS_*): a bundle takes no other build setting");
        }
        if env.iter().any(|(own, _)| own == var) {
            bail!("{var} is set by the bundle's build itself and cannot be overridden");
        }
        env.push((var.as_str(), value.clone()));
    }
    let build = DynamicBuild::build("dist-build", features, &env)?;
    if cuda.is_some() {
        build.modules("libggml-cuda").context("--cuda: the build made no CUDA module")?;
    }
    Ok(build)
}

/// The CUDA toolkit: CUDA_PATH, else the one `cargo xtask setup --cuda` assembles.
pub fn cuda_toolkit() -> Result<PathBuf> {
    let toolkit = std::env::var_os("CUDA_PATH").map(PathBuf::from).unwrap_or_else(crate::setup::cuda::root);
    if !toolkit.join("bin/nvcc").is_file() {
        bail!("--cuda: no nvcc under {} (run `cargo xtask setup --cuda`, or set CUDA_PATH)", toolkit.display());
    }
    Ok(toolkit)
}

/// Writes the bundle's folder afresh.
fn assemble(build: &DynamicBuild, bundle: &Bundle) -> Result<()> {
    let dir = &bundle.dir;
    let _ = std::fs::remove_dir_all(dir);
    for sub in ["bin", "lib", "licenses"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    copy(&build.exsa, &dir.join("bin/exsa"))?;
    let mut modules = build.modules("libggml-cpu")?;
    check_amx_patched(&modules)?;
    // The CUDA module when this build made one (`--cuda`; checked there).
    modules.extend(build.modules("libggml-cuda").unwrap_or_default());
    for file in build.libraries.iter().chain(&modules) {
        copy(file, &dir.join("lib").join(file.file_name().context("a library without a name")?))?;
    }
    // The CPU modules use OpenMP (as the native build does); a machine without GCC has no
    // libgomp, so it travels, found beside the modules ($ORIGIN).
    let gomp = dynamic_build::parse_ldd(&dynamic_build::ldd(&modules[0])?)
        .into_iter()
        .find(|(name, _)| name.starts_with("libgomp"))
        .context("the CPU module does not link libgomp: was the build's OpenMP switched off?")?;
    copy(&gomp.1, &dir.join("lib").join(&gomp.0))?;
    let root = workspace::root();
    for licence in ["LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root.join(licence), &dir.join(licence))?;
    }
    let llama = crate::vendor::source()?;
    copy(&llama.join("LICENSE"), &dir.join("licenses/llama.cpp-LICENSE"))?;
    let gomp_copyright = Path::new("/usr/share/doc/libgomp1/copyright");
    if gomp_copyright.is_file() {
        copy(gomp_copyright, &dir.join("licenses/libgomp-copyright"))?;
    }
    let cuda_runtime = match modules.iter().find(|m| m.file_name().is_some_and(|n| n == "libggml-cuda.so")) {
        Some(cuda) => Some(needed_libraries(&readelf(cuda)?).into_iter().filter(|l| l.starts_with("libcu")).collect::<Vec<String>>()),
        None => None,
    };
    std::fs::write(dir.join("README.md"), readme(bundle, &modules, cuda_runtime.as_deref()))?;
    Ok(())
}

/// Text of llama-sys' AMX patch (crates/llama-sys/amx-fix/exsa_amx_probe.h) that a module
/// compiled with it carries.
const AMX_PATCH_MARK: &[u8] = b"AMX: cannot fork the probe process";
/// A symbol of ggml's AMX matrix multiplication.
const AMX_KERNEL: &[u8] = b"ggml_backend_amx_mul_mat";

/// Fails naming each CPU module that carries ggml's AMX kernels without llama-sys' patch of them
/// (unpatched, they crash on this tree: docs/amx.md); the Sapphire Rapids variant is built with
/// AMX, so the patch must have applied to it.
fn check_amx_patched(modules: &[PathBuf]) -> Result<()> {
    let contains = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let mut unpatched = Vec::new();
    for module in modules {
        let bytes = std::fs::read(module)?;
        if contains(&bytes, AMX_KERNEL) && !contains(&bytes, AMX_PATCH_MARK) {
            unpatched.push(module.display().to_string());
        }
    }
    if !unpatched.is_empty() {
        bail!("CPU modules with ggml's AMX kernels but without llama-sys' fix of them (they would crash on AMX machines): {}", unpatched.join(", "));
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The bundle's README; `cuda_runtime`: the CUDA libraries its CUDA module needs, when it has one.
fn readme(bundle: &Bundle, modules: &[PathBuf], cuda_runtime: Option<&[String]>) -> String {
    let variants: Vec<String> =
        modules.iter().filter_map(|m| m.file_name()?.to_str()?.strip_prefix("libggml-cpu-")?.strip_suffix(".so").map(str::to_owned)).collect();
    let cuda = cuda_runtime.map_or_else(String::new, |libraries| {
        format!(
            "## NVIDIA GPUs\n\n\
             lib/libggml-cuda.so is ggml's CUDA backend. It needs the NVIDIA driver and the CUDA runtime\n\
             libraries ({}), which the bundle does not carry: install them (NVIDIA's packages, or the\n\
             `nvidia-cuda-runtime` and `nvidia-cublas` wheels) and put their folder on LD_LIBRARY_PATH.\n\
             Without them the module is skipped and exsa runs on the CPU; `bin/exsa info` says why\n\
             (`other_backend_modules`) and lists the GPUs found (`devices`). `--gpu-layers N` puts N\n\
             layers on the GPU (default: all).\n\n",
            libraries.join(", ")
        )
    });
    format!(
        "# {name}\n\n\
         exsa: local LLM inference (llama.cpp compiled from source, a safe Rust engine, and a server\n\
         that speaks OpenAI's, llama-server's and Ollama's APIs). Built {version} for x86-64 Linux\n\
         (glibc), with one CPU backend per instruction-set level ({variants}): at start the best one\n\
         this CPU runs is loaded.\n\n\
         ## Run\n\n\
         ```sh\n\
         bin/exsa serve --model /path/to/model.gguf      # http://127.0.0.1:8080, OpenAI and Ollama APIs\n\
         bin/exsa generate --model /path/to/model.gguf --prompt 'Hello'\n\
         bin/exsa info --model /path/to/model.gguf       # the model, and the CPU variant loaded and why\n\
         ```\n\n\
         Models are GGUF files (llama.cpp's format), from anywhere: pass the path, or serve a folder of\n\
         them with `--models-dir DIR`. Nothing is downloaded.\n\n\
         `EXSA_CPU_VARIANT=haswell` (or another name above) forces one CPU variant; one this CPU cannot\n\
         run is refused with the reason. For a production server see docs/deploy.md in the source\n\
         (`--api-key`, `--max-queue`, `--cors-origin`, `--models-dir`, `--keep-alive`; TLS belongs\n\
         to a reverse proxy in front).\n\n\
         {cuda}\
         ## Licences\n\n\
         exsa: MIT or Apache-2.0 (LICENSE-MIT, LICENSE-APACHE). llama.cpp and ggml: MIT\n\
         (licenses/llama.cpp-LICENSE). lib/libgomp: GCC's OpenMP runtime, GPL-3.0 with the GCC\n\
         Runtime Library Exception (licenses/libgomp-copyright).\n",
        name = bundle.name,
        version = env!("CARGO_PKG_VERSION"),
        variants = variants.join(", "),
    )
}

/// The build machine's folders that no file of the bundle may name: where this repository,
/// its build outputs, cargo's registry, the llama.cpp build cache and another llama.cpp tree
/// (`LLAMA_CPP_DIR`) are; absolute.
fn forbidden_paths() -> Result<Vec<PathBuf>> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set: where cargo's registry is cannot be told")?;
    let mut paths = vec![workspace::root(), workspace::target_dir(), cargo_home];
    paths.extend(["LLAMA_SYS_BUILD_CACHE", "LLAMA_CPP_DIR"].iter().filter_map(std::env::var_os).map(PathBuf::from));
    let mut paths = paths.into_iter().map(|p| std::path::absolute(&p).with_context(|| format!("{}", p.display()))).collect::<Result<Vec<_>>>()?;
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// The build machine's folders (those of [`forbidden_paths`] not inside another) and the
/// names they take in the bundle's messages (`exsa-build-0/crates/...`).
fn path_maps() -> Result<Vec<(PathBuf, String)>> {
    let paths = forbidden_paths()?;
    if let Some(spaced) = paths.iter().find(|p| p.to_string_lossy().contains(char::is_whitespace)) {
        bail!("{} has a space: compiler flags that map it cannot be passed", spaced.display());
    }
    let outermost: Vec<&PathBuf> = paths.iter().filter(|p| !paths.iter().any(|q| q != *p && p.starts_with(q))).collect();
    Ok(outermost.into_iter().enumerate().map(|(i, p)| (p.clone(), format!("exsa-build-{i}"))).collect())
}

/// Whether `bytes` name the folder `path` (or something in it): the path, not preceded by a
/// character of a file name (`/other/work/main` does not name `/work/main`; `file:///work/main`
/// does) and followed by `/`, a NUL or the end.
fn names_path(bytes: &[u8], path: &[u8]) -> bool {
    let part_of_path = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    bytes
        .windows(path.len())
        .enumerate()
        .any(|(i, w)| w == path && (i == 0 || !part_of_path(bytes[i - 1])) && bytes.get(i + path.len()).is_none_or(|&b| b == b'/' || b == 0))
}

/// Fails naming each file of `dir` whose library search path is not relative to itself
/// (`$ORIGIN`), and each that names one of `forbidden` (a folder of the build machine).
fn check_relocatable(dir: &Path, forbidden: &[PathBuf]) -> Result<()> {
    let mut problems = Vec::new();
    for file in files_under(dir)? {
        let bytes = std::fs::read(&file)?;
        let rel = file.strip_prefix(dir).unwrap_or(&file).display().to_string();
        if bytes.starts_with(b"\x7fELF") {
            // The program's own folder and the bundle's lib/ (exsa: `$ORIGIN/../lib`).
            for path in search_paths(&readelf(&file)?) {
                if path != "$ORIGIN" && path != "$ORIGIN/../lib" {
                    problems.push(format!("{rel}: library search path {path}"));
                }
            }
        }
        for path in forbidden {
            if names_path(&bytes, path.as_os_str().as_encoded_bytes()) {
                problems.push(format!("{rel}: names {}", path.display()));
            }
        }
    }
    if !problems.is_empty() {
        bail!("the bundle is not relocatable:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// `readelf -d` of an ELF file: its dynamic section.
fn readelf(file: &Path) -> Result<String> {
    let out = Command::new("readelf").arg("-d").arg(file).output().context("cannot run readelf (binutils)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The libraries a file of `readelf -d` output needs (`(NEEDED)  Shared library: [libcudart.so.13]`).
fn needed_libraries(readelf: &str) -> Vec<String> {
    readelf.lines().filter(|l| l.contains("(NEEDED)")).filter_map(bracketed).map(str::to_owned).collect()
}

/// The value of a `readelf -d` line, between its brackets.
fn bracketed(line: &str) -> Option<&str> {
    line.get(line.find('[')? + 1..line.rfind(']')?)
}

/// The entries of RUNPATH and RPATH in `readelf -d` output
/// (`0x...1d (RUNPATH)  Library runpath: [$ORIGIN:$ORIGIN/../lib]`).
fn search_paths(readelf: &str) -> Vec<String> {
    readelf
        .lines()
        .filter(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .filter_map(bracketed)
        .flat_map(|list| list.split(':').map(str::to_owned))
        .collect()
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files.extend(files_under(&entry.path())?);
        } else {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// `tar czf`, the folder at the top of the archive.
fn pack(bundle: &Bundle) -> Result<()> {
    let parent = bundle.dir.parent().context("the bundle folder has no parent")?;
    let status = Command::new("tar")
        .arg("czf")
        .arg(&bundle.tarball)
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-C")
        .arg(parent)
        .arg(&bundle.name)
        .status()
        .context("cannot run tar")?;
    if !status.success() {
        bail!("tar failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_named_only_as_a_whole_path() {
        for (text, named) in [
            (&b"\0/work/main/crates/x.rs\0"[..], true),
            (b"/work/main", true),
            (b"at /work/main\0", true),
            (b"/work/main2/x", false),
            (b"/other/work/main/x", false),
            (b"exsa-build-0/crates/x.rs", false),
            (b"file:///work/main/x", true),
        ] {
            assert_eq!(names_path(text, b"/work/main"), named, "{}", String::from_utf8_lossy(text));
        }
        // A short folder name is not found inside longer ones (a workspace at /build, or /src).
        assert!(!names_path(b"registry/src/index/x.rs exsa-build-0/src", b"/src"));
    }

    #[test]
    fn every_forbidden_folder_is_inside_one_mapped_folder() {
        let maps = path_maps().unwrap();
        for path in forbidden_paths().unwrap() {
            assert_eq!(maps.iter().filter(|(from, _)| path.starts_with(from)).count(), 1, "{}: {maps:?}", path.display());
        }
    }

    #[test]
    fn a_module_with_unpatched_amx_kernels_is_refused() {
        let probe = std::fs::read_to_string(workspace::root().join("crates/llama-sys/amx-fix/exsa_amx_probe.h")).unwrap();
        assert!(probe.contains(std::str::from_utf8(AMX_PATCH_MARK).unwrap()), "the mark is no longer the patch's text");
        let dir = std::env::temp_dir().join(format!("exsa-dist-amx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (plain, patched, unpatched) =
            (dir.join("libggml-cpu-haswell.so"), dir.join("libggml-cpu-sapphirerapids.so"), dir.join("libggml-cpu-zen4.so"));
        std::fs::write(&plain, b"no amx here").unwrap();
        std::fs::write(&patched, [AMX_KERNEL, b"\0", AMX_PATCH_MARK].concat()).unwrap();
        check_amx_patched(&[plain.clone(), patched.clone()]).unwrap();
        std::fs::write(&unpatched, AMX_KERNEL).unwrap();
        let err = check_amx_patched(&[plain, patched, unpatched]).unwrap_err().to_string();
        assert!(err.contains("zen4") && !err.contains("sapphirerapids"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn search_paths_are_read_from_readelf() {
        let out = " 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN:$ORIGIN/../lib]\n 0x000000000000000e (SONAME)  Library soname: [libllama.so.0]\n 0x000000000000000f (RPATH)  Library rpath: [/build/lib]\n";
        assert_eq!(search_paths(out), ["$ORIGIN", "$ORIGIN/../lib", "/build/lib"]);
        assert!(search_paths(" 0x01 (NEEDED) Shared library: [libc.so.6]\n").is_empty());
        let cuda = " 0x01 (NEEDED)  Shared library: [libggml-base.so.0]\n 0x01 (NEEDED)  Shared library: [libcudart.so.13]\n 0x0e (SONAME)  Library soname: [libggml-cuda.so]\n";
        assert_eq!(needed_libraries(cuda), ["libggml-base.so.0", "libcudart.so.13"]);
        assert!(needed_libraries(out).is_empty());
    }

    #[test]
    fn a_file_naming_a_build_folder_or_searching_outside_itself_is_refused() {
        let dir = std::env::temp_dir().join(format!("exsa-dist-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(dir.join("lib/clean.txt"), b"nothing here").unwrap();
        std::fs::write(dir.join("lib/mapped.txt"), b"exsa-build-0/crates/x.rs /work/builder").unwrap();
        check_relocatable(&dir, &[PathBuf::from("/work/build")]).unwrap();
        std::fs::write(dir.join("lib/dirty.bin"), b"\0\0/work/build/lib\0").unwrap();
        let err = check_relocatable(&dir, &[PathBuf::from("/work/build")]).unwrap_err().to_string();
        assert!(err.contains("lib/dirty.bin: names /work/build"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
