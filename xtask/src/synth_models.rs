//! `cargo xtask synth-models`: small GGUFs with random weights for architectures no GGUF of
//! which can be downloaded here (LFM2's hybrid memory, a dense llama, Mamba's recurrent state,
//! BERT encoders for embeddings and reranking), and, with `--bench`, one of LFM2-1.2B's shape in
//! Q4_K_M for speed measurements.
//!
//! `xtask/synth/synth_models.py` writes them with the `gguf` package from PyPI, the tokenizer
//! copied from the default model. A model is written again only when the generator, the
//! package version or the tokenizer's model changed: its key sits beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{fetch_model, hashing, python, workspace};

const GGUF_PACKAGE: &str = "gguf";
const GGUF_VERSION: &str = "0.19.0";
const GENERATOR: &str = "xtask/synth/synth_models.py";

/// The models the tests use (one per kind of memory, one with another vocabulary, a LoRA
/// adapter for llama-tiny and the same made an activated LoRA, and a BERT embedder and
/// reranker).
const TEST_MODELS: [&str; 8] =
    ["llama-tiny", "lfm2-tiny", "mamba-tiny", "llama-tiny-32k", "llama-tiny-lora", "llama-tiny-alora", "bert-tiny", "bert-tiny-rerank"];
/// Written in F16 and quantized to Q4_K_M: for bench-compare, not the tests.
const BENCH_MODEL: &str = "lfm2-1.2b-shape";
/// A LoRA adapter of the default model: for bench-serve, not the tests.
const DEFAULT_ADAPTER: &str = "default-lora";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Also the LFM2-1.2B-shaped Q4_K_M model (~0.7 GB; a few minutes).
    #[arg(long)]
    bench: bool,
    /// Write every model again.
    #[arg(long)]
    force: bool,
}

pub fn dir() -> PathBuf {
    workspace::cache_dir().join("models").join("synth")
}

pub fn run(args: &Args) -> Result<()> {
    let generator = Generator::new()?;
    let out = dir();
    generator.ensure(&TEST_MODELS, args.force)?;
    for m in TEST_MODELS {
        println!("{}", out.join(format!("{m}.gguf")).display());
    }
    if args.bench {
        let quantized = out.join(format!("{BENCH_MODEL}-q4_k_m.gguf"));
        if args.force || !is_current(&quantized, &generator.key) {
            let f16 = out.join(format!("{BENCH_MODEL}.gguf"));
            generator.generate(&[BENCH_MODEL])?;
            quantize(&f16, &quantized)?;
            std::fs::remove_file(&f16).with_context(|| format!("cannot remove {}", f16.display()))?;
            write_key(&quantized, &generator.key)?;
        }
        println!("{}", quantized.display());
    }
    Ok(())
}

/// The random LoRA adapter of the default model (rank 16 on its attention queries and values),
/// for `bench-serve --scenario lora`: written when missing or stale.
pub fn default_adapter() -> Result<PathBuf> {
    Generator::new()?.ensure(&[DEFAULT_ADAPTER], false)?;
    Ok(dir().join(format!("{DEFAULT_ADAPTER}.gguf")))
}

/// The Python generator with its inputs: the tokenizer source, the `gguf` package, the key.
struct Generator {
    tokenizer: PathBuf,
    site: PathBuf,
    script: PathBuf,
    key: String,
}

impl Generator {
    fn new() -> Result<Generator> {
        let tokenizer = fetch_model::run(&fetch_model::Args::default())?;
        let site = python::site(GGUF_PACKAGE, GGUF_VERSION, "gguf")?;
        let script = workspace::root().join(GENERATOR);
        let key = cache_key(&script)?;
        std::fs::create_dir_all(dir()).with_context(|| format!("cannot create {}", dir().display()))?;
        Ok(Generator { tokenizer, site, script, key })
    }

    /// Writes those of `models` that are missing or stale (all of them with `force`).
    fn ensure(&self, models: &[&str], force: bool) -> Result<()> {
        let stale: Vec<&str> = models.iter().copied().filter(|m| force || !is_current(&dir().join(format!("{m}.gguf")), &self.key)).collect();
        if stale.is_empty() {
            return Ok(());
        }
        self.generate(&stale)?;
        for m in &stale {
            write_key(&dir().join(format!("{m}.gguf")), &self.key)?;
        }
        Ok(())
    }

    fn generate(&self, models: &[&str]) -> Result<()> {
        let out = dir();
        eprintln!("writing {} into {}", models.join(", "), out.display());
        workspace::run(
            python::python()
                .env("PYTHONPATH", &self.site)
                .arg(&self.script)
                .arg("--tokenizer-from")
                .arg(&self.tokenizer)
                .arg("--out")
                .arg(&out)
                .args(models),
        )
        .context("the model generator failed")
    }
}

/// What the models depend on: the generator's text, the gguf package's version and the
/// tokenizer source (the default model, pinned by its sha256).
fn cache_key(generator: &Path) -> Result<String> {
    let text = std::fs::read(generator).with_context(|| format!("cannot read {}", generator.display()))?;
    let mut h = Sha256::new();
    h.update(&text);
    h.update(format!("|{GGUF_PACKAGE}=={GGUF_VERSION}|{}", fetch_model::SHA256));
    Ok(hashing::hex(&h.finalize()))
}

fn key_path(model: &Path) -> PathBuf {
    model.with_extension("gguf.key")
}

fn is_current(model: &Path, key: &str) -> bool {
    model.is_file() && std::fs::read_to_string(key_path(model)).is_ok_and(|k| k.trim() == key)
}

fn write_key(model: &Path, key: &str) -> Result<()> {
    std::fs::write(key_path(model), format!("{key}\n")).with_context(|| format!("cannot write the key of {}", model.display()))
}

/// Our own quantize (the safe wrapper's, through its example), from F16 to Q4_K_M.
fn quantize(input: &Path, output: &Path) -> Result<()> {
    eprintln!("quantizing {} to Q4_K_M", input.display());
    let partial = output.with_extension("gguf.partial");
    workspace::run(
        workspace::cargo().args(["run", "--quiet", "-p", "exsa-llama", "--example", "quantize", "--"]).arg(input).arg(&partial).arg("q4_k_m"),
    )?;
    if !partial.is_file() {
        bail!("quantize wrote nothing at {}", partial.display());
    }
    std::fs::rename(&partial, output)?;
    Ok(())
}
