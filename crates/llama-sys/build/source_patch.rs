//! Exact-text patches to llama.cpp sources, compiled from copies in the build folder.
//!
//! The vendored tree is never touched: each patched file is read from it, edited by exact-text
//! substitutions (an anchor must occur exactly once, so a tree whose text moved fails loudly
//! instead of compiling something half-patched), and written with its unchanged neighbours and
//! our own files into a folder of the build. A CMake script, run at the tree's `project()`
//! (CMAKE_PROJECT_INCLUDE), defers to the end of the configure step and swaps the copies into
//! every target that compiles the originals. The patches themselves: rpc_patch.rs, amx_patch.rs.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// `cmake_language(DEFER)` needs it.
pub const MIN_CMAKE: (u32, u32) = (3, 19);

/// One substitution: `anchor` must occur exactly once in `file`.
pub struct Edit {
    pub file: &'static str,
    pub anchor: &'static str,
    pub replacement: &'static str,
}

/// What one patch changes, and where CMake compiles it.
pub struct Spec {
    /// A short name for CMake identifiers and folders: `rpc`, `amx`.
    pub id: &'static str,
    /// The folder of the patched files, relative to the tree.
    pub tree_dir: &'static str,
    pub edits: &'static [Edit],
    /// Files of `tree_dir` copied as they are: headers that the copies include by quotes and
    /// that must not resolve to another folder's file of the same name.
    pub copied: &'static [&'static str],
    /// Our own files (relative to the crate) written beside the copies.
    pub own: &'static [&'static str],
    /// Of `own`, those compiled into the patched targets.
    pub own_sources: &'static [&'static str],
    /// The tree folder whose CMakeLists defines the targets to patch, relative to the tree.
    pub targets_dir: &'static str,
    /// Whether configuring fails when no target compiles the originals.
    pub required: bool,
}

/// The patched files, in memory until a build folder is known.
pub struct Patch {
    spec: &'static Spec,
    files: Vec<(String, String)>,
}

impl Patch {
    /// Applies every edit of `spec` to the tree at `source`, or says which anchor is missing.
    pub fn prepare(spec: &'static Spec, source: &Path, manifest_dir: &Path) -> Result<Patch, String> {
        let mut files: Vec<(String, String)> = Vec::new();
        let tree_names = spec.edits.iter().map(|e| e.file).chain(spec.copied.iter().copied());
        for name in tree_names {
            if files.iter().any(|(n, _)| n == name) {
                continue;
            }
            let path = source.join(spec.tree_dir).join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            files.push((name.to_string(), text));
        }
        for edit in spec.edits {
            let text = &mut files.iter_mut().find(|(name, _)| name == edit.file).expect("read above").1;
            *text = apply(text, edit).map_err(|e| format!("{}/{}: {e}", spec.tree_dir, edit.file))?;
        }
        for own in spec.own {
            let path = manifest_dir.join(own);
            println!("cargo:rerun-if-changed={}", path.display());
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let name = Path::new(own).file_name().expect("a file").to_string_lossy().into_owned();
            files.push((name, text));
        }
        Ok(Patch { spec, files })
    }

    pub fn id(&self) -> &'static str {
        self.spec.id
    }

    /// Changes with any byte of what gets compiled: part of the build folder's key.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.spec.id);
        for (name, text) in &self.files {
            h.update(name);
            h.update(text);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes the files into `dir` and returns the CMake script that swaps them in.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in &self.files {
            write_if_changed(&dir.join(name), text)?;
        }
        let script = dir.join(format!("swap-{}-sources.cmake", self.spec.id));
        write_if_changed(&script, &swap_script(self.spec, dir))?;
        Ok(script)
    }
}

/// One CMAKE_PROJECT_INCLUDE script that runs each of `scripts` (the patches' swap scripts, and
/// the CPU variants' tuning: variant_tuning.rs).
pub fn write_project_include(root: &Path, scripts: &[PathBuf]) -> std::io::Result<Option<PathBuf>> {
    if scripts.is_empty() {
        return Ok(None);
    }
    let mut text = String::from("# Written by llama-sys' build script (build/source_patch.rs): the patched sources of this build.\n");
    for script in scripts {
        text.push_str(&format!("include(\"{}\")\n", cmake_path(script)));
    }
    let path = root.join("exsa-patches.cmake");
    write_if_changed(&path, &text)?;
    Ok(Some(path))
}

pub fn apply(text: &str, edit: &Edit) -> Result<String, String> {
    match text.matches(edit.anchor).count() {
        1 => Ok(text.replacen(edit.anchor, edit.replacement, 1)),
        0 => Err(format!("the text to patch is not there (another llama.cpp version?): {:?}", first_line(edit.anchor))),
        n => Err(format!("the text to patch occurs {n} times: {:?}", first_line(edit.anchor))),
    }
}

pub fn first_line(text: &str) -> &str {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or(text).trim()
}

/// Rewriting an unchanged file would make CMake (or cc's change check) recompile it.
pub fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(path, text)
}

/// CMake wants forward slashes, also on Windows.
fn cmake_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "/")
}

/// The edited files replace their originals in every target defined in `targets_dir` that lists
/// them; `own_sources` join those targets. The patch folder comes first on the include path (so
/// the copies' headers are ours) and the originals' folder last (so nothing else resolves
/// differently).
fn swap_script(spec: &Spec, dir: &Path) -> String {
    let dir = cmake_path(dir);
    let id = spec.id;
    let mut edited: Vec<&str> = spec.edits.iter().map(|e| e.file).collect();
    edited.sort_unstable();
    edited.dedup();
    let originals: Vec<String> = edited.iter().map(|f| format!("\"${{CMAKE_SOURCE_DIR}}/{}/{f}\"", spec.tree_dir)).collect();
    let own_sources: Vec<String> =
        spec.own_sources.iter().map(|f| format!("\"{dir}/{}\"", Path::new(f).file_name().expect("a file").to_string_lossy())).collect();
    let missing = if spec.required {
        format!("message(FATAL_ERROR \"llama-sys: no target in {} compiles the sources of the {id} patch\")", spec.targets_dir)
    } else {
        format!("message(STATUS \"llama-sys: no target compiles the sources of the {id} patch\")")
    };
    format!(
        r#"# Written by llama-sys' build script (build/source_patch.rs): once the tree is configured, the
# targets that compile the originals compile the patched copies in this folder instead.
include_guard(GLOBAL)
function(exsa_swap_{id}_sources)
    set(originals {originals})
    set(resolved)
    foreach(original IN LISTS originals)
        get_filename_component(original "${{original}}" ABSOLUTE)
        list(APPEND resolved "${{original}}")
    endforeach()
    get_directory_property(targets DIRECTORY "${{CMAKE_SOURCE_DIR}}/{targets_dir}" BUILDSYSTEM_TARGETS)
    set(patched)
    foreach(target IN LISTS targets)
        get_target_property(sources ${{target}} SOURCES)
        get_target_property(origin ${{target}} SOURCE_DIR)
        if (NOT sources)
            continue()
        endif()
        set(swapped)
        set(hit FALSE)
        foreach(src IN LISTS sources)
            if (IS_ABSOLUTE "${{src}}")
                set(path "${{src}}")
            else()
                set(path "${{origin}}/${{src}}")
            endif()
            get_filename_component(path "${{path}}" ABSOLUTE)
            if (path IN_LIST resolved)
                get_filename_component(name "${{path}}" NAME)
                get_filename_component(original_dir "${{path}}" DIRECTORY)
                list(APPEND swapped "{dir}/${{name}}")
                set(hit TRUE)
            else()
                list(APPEND swapped "${{path}}")
            endif()
        endforeach()
        if (hit)
            list(APPEND swapped {own_sources})
            set_property(TARGET ${{target}} PROPERTY SOURCES ${{swapped}})
            target_include_directories(${{target}} BEFORE PRIVATE "{dir}")
            target_include_directories(${{target}} PRIVATE "${{original_dir}}")
            list(APPEND patched ${{target}})
        endif()
    endforeach()
    if (NOT patched)
        {missing}
    else()
        message(STATUS "llama-sys: ${{patched}} compile the patched {id} sources in {dir}")
    endif()
endfunction()
cmake_language(DEFER DIRECTORY "${{CMAKE_SOURCE_DIR}}" CALL exsa_swap_{id}_sources)
"#,
        originals = originals.join(" "),
        own_sources = own_sources.join(" "),
        targets_dir = spec.targets_dir,
    )
}

/// Whether `cmake --version` printed a version the patches can use.
pub fn cmake_supports(version_output: &str) -> bool {
    let Some(version) = version_output.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit())) else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= MIN_CMAKE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_must_occur_exactly_once() {
        let edit = Edit { file: "f", anchor: "b\n", replacement: "B\n" };
        assert_eq!(apply("a\nb\nc\n", &edit).unwrap(), "a\nB\nc\n");
        assert!(apply("a\nc\n", &edit).unwrap_err().contains("not there"));
        assert!(apply("b\nb\n", &edit).unwrap_err().contains("2 times"));
    }

    #[test]
    fn cmake_versions_are_compared_by_number() {
        assert!(cmake_supports("cmake version 3.25.1\n\nCMake suite maintained"));
        assert!(cmake_supports("cmake version 4.0.2"));
        assert!(cmake_supports("cmake version 3.19.0-rc1"));
        assert!(!cmake_supports("cmake version 3.18.4"));
        assert!(!cmake_supports("cmake version 3.9.2"));
        assert!(!cmake_supports("no version here"));
    }

    static SPEC: Spec = Spec {
        id: "demo",
        tree_dir: "ggml/src/x",
        edits: &[
            Edit { file: "a.cpp", anchor: "1", replacement: "2" },
            Edit { file: "b.cpp", anchor: "5", replacement: "6" },
            Edit { file: "a.cpp", anchor: "3", replacement: "4" },
        ],
        copied: &["a.h"],
        own: &["demo/ours.cpp", "demo/ours.h"],
        own_sources: &["demo/ours.cpp"],
        targets_dir: "ggml/src",
        required: false,
    };

    #[test]
    fn the_swap_script_replaces_each_edited_file_once_and_adds_our_sources() {
        let script = swap_script(&SPEC, Path::new("/b/exsa-demo"));
        assert_eq!(script.matches("ggml/src/x/a.cpp\"").count(), 1, "{script}");
        assert_eq!(script.matches("ggml/src/x/b.cpp\"").count(), 1, "{script}");
        assert!(script.contains("list(APPEND swapped \"/b/exsa-demo/ours.cpp\")"), "{script}");
        assert!(!script.contains("ours.h\""), "headers are not compiled: {script}");
        assert!(script.contains("DIRECTORY \"${CMAKE_SOURCE_DIR}/ggml/src\" BUILDSYSTEM_TARGETS"), "{script}");
        assert!(script.contains("BEFORE PRIVATE \"/b/exsa-demo\""), "{script}");
        assert!(script.contains("message(STATUS") && !script.contains("FATAL_ERROR"), "not required: {script}");
    }

    #[test]
    fn a_patch_reads_its_files_applies_every_edit_and_keys_on_the_result() {
        let root = std::env::temp_dir().join(format!("llama-sys-patch-{}", std::process::id()));
        let tree = root.join("tree");
        std::fs::create_dir_all(tree.join("ggml/src/x")).unwrap();
        std::fs::create_dir_all(root.join("crate/demo")).unwrap();
        std::fs::write(tree.join("ggml/src/x/a.cpp"), "1 3\n").unwrap();
        std::fs::write(tree.join("ggml/src/x/a.h"), "h\n").unwrap();
        std::fs::write(tree.join("ggml/src/x/b.cpp"), "5\n").unwrap();
        std::fs::write(root.join("crate/demo/ours.cpp"), "o\n").unwrap();
        std::fs::write(root.join("crate/demo/ours.h"), "oh\n").unwrap();
        let patch = Patch::prepare(&SPEC, &tree, &root.join("crate")).unwrap();
        let names: Vec<&str> = patch.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.cpp", "b.cpp", "a.h", "ours.cpp", "ours.h"]);
        assert_eq!(patch.files[0].1, "2 4\n", "both edits of a.cpp, though another file's came between");
        assert_eq!(patch.files[1].1, "6\n");
        let before = patch.fingerprint();
        std::fs::write(tree.join("ggml/src/x/a.h"), "h2\n").unwrap();
        assert_ne!(Patch::prepare(&SPEC, &tree, &root.join("crate")).unwrap().fingerprint(), before, "a copied header is part of the key");
        std::fs::write(tree.join("ggml/src/x/a.cpp"), "1\n").unwrap();
        let err = Patch::prepare(&SPEC, &tree, &root.join("crate")).err().unwrap();
        assert!(err.contains("ggml/src/x/a.cpp") && err.contains("not there"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
