//! `cargo xtask dist --check`: the bundle runs without the build that made it, gives the native
//! build's greedy tokens, and each CPU variant does what it should on this CPU.
//!
//! The tarball is unpacked into an empty folder, and the folder llama.cpp's libraries and
//! modules were built into is renamed for the duration (restored when the check ends, or by
//! the next check if this one was killed), so a bundle that still reached for it would fail.
//! Then, against the native build (static, `-march=native`, this machine's default): the
//! variant the bundle chooses, and every other variant this CPU runs (forced with
//! `EXSA_CPU_VARIANT`), generate the native build's greedy tokens at every step up to the
//! near-tie rule (where the two builds swap near-tied candidates, the bundle is fed the native
//! tokens and compared on at every later step); each variant this CPU cannot run is refused with
//! an error that names it, not a crash. `exsa info` records every variant's compile flags, and
//! each variant llama-sys tunes carries its `-mtune`. Where the native build runs ggml's AMX
//! kernels (a CPU with AMX, a model of types they take), a variant compiled with them (Sapphire
//! Rapids) must run them too, llama-sys' fix of them included (llama.cpp's log names their
//! buffer), and no other variant may.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use exsa_bench_protocol::{GreedyStep, NEAR_TIE};
use serde_json::{Value, json};

use super::Bundle;
use crate::dynamic_build::DynamicBuild;
use crate::{server_process, workspace};

/// The prompt and reply length every build is compared on.
const PROMPT: &str = "The history of the printing press begins";
const STEPS: usize = 48;
/// The llama crate's `backend_modules::CPU_VARIANT_VAR`.
const CPU_VARIANT_VAR: &str = "EXSA_CPU_VARIANT";
/// llama.cpp's log line (at level info) when it puts weights in the buffer of ggml's AMX
/// kernels: they, not the AVX-512 ones, run that model's matrix multiplications.
const AMX_BUFFER_LOG: &str = "AMX model buffer size";
/// What ggml's `system_info` says of a CPU module compiled with the AMX kernels.
const AMX_COMPILED: &str = "AMX_INT8 = 1";
/// The engine's warning when a build that can use CUDA finds no GPU (`warn_if_no_gpu`).
const NO_GPU_WARNING: &str = "this build can use CUDA, but no GPU was found";
/// llama.cpp's log line (level info) when it puts weights on the first CUDA device.
const OFFLOADED_LOG: &str = "CUDA0 model buffer size";

pub fn run(bundle: &Bundle, build: &DynamicBuild, model: &Path) -> Result<()> {
    let unpacked = std::env::temp_dir().join(format!("exsa-dist-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir_all(&unpacked)?;
    let status = Command::new("tar").arg("xzf").arg(&bundle.tarball).arg("-C").arg(&unpacked).status().context("cannot run tar")?;
    if !status.success() {
        bail!("tar could not unpack {} ({status})", bundle.tarball.display());
    }
    let exsa = unpacked.join(&bundle.name).join("bin/exsa");
    let native = Server::start(&Launch::plain(&native_exsa()?), model)?;
    let reference = native.trace(&[])?;
    let native_ran_amx = native.ran_amx()?;
    drop(native);

    let built = build.modules_dir.parent().context("the modules folder has no parent")?;
    let _away = OutOfReach::new(built)?;
    let info = bundle_info(&Launch::plain(&exsa), model)?;
    let cpu = &info["build_info"]["cpu_variant"];
    let chosen = cpu["variant"].as_str().with_context(|| format!("`exsa info` names no CPU variant: {cpu}"))?.to_owned();
    eprintln!("dist check: the bundle chose {chosen} ({}), CPU: {}", cpu["chosen_by"], cpu["cpu_features"]);
    let candidates = cpu["candidates"].as_array().context("`exsa info` lists no CPU variants")?;
    check_variant_flags(&info["build_info"]["cpu_variant_flags"], candidates)?;
    eprintln!("dist check: {chosen} was compiled with {}", cpu["flags"]);
    let best = candidates.iter().filter_map(|c| c["score"].as_i64()).max().unwrap_or(0);
    let chosen_score = candidates.iter().find(|c| c["variant"] == chosen.as_str()).and_then(|c| c["score"].as_i64());
    if chosen_score != Some(best) || best == 0 {
        bail!("the bundle chose {chosen} (score {chosen_score:?}) where the best score on this CPU is {best}: {cpu}");
    }
    compare_variant(&Launch::plain(&exsa), model, &chosen, &reference, amx_expected(native_ran_amx, &info))?;
    for candidate in candidates {
        let name = candidate["variant"].as_str().context("a CPU variant without a name")?;
        match candidate["score"].as_i64() {
            // The module without a variant cannot be named; a bundle has none.
            _ if name.is_empty() || name == chosen => {}
            Some(0) => refused(&exsa, model, name)?,
            _ => {
                let forced = Launch { variant: Some(name), ..Launch::plain(&exsa) };
                let amx = amx_expected(native_ran_amx, &bundle_info(&forced, model)?);
                compare_variant(&forced, model, name, &reference, amx)?;
            }
        }
    }
    if has_cuda_module(&exsa) {
        check_cuda(&exsa, model, &reference, native_ran_amx)?;
    }
    let _ = std::fs::remove_dir_all(&unpacked);
    Ok(())
}

/// llama-sys' table of the `-mtune` each CPU variant gets (its build/variant_tuning.rs).
mod tuning {
    include!("../../../crates/llama-sys/build/variant_tuning_table.rs");
}

/// `exsa info` records the flags of every CPU module of the bundle (`flags`:
/// `build_info.cpu_variant_flags`), and each variant llama-sys tunes carries its `-mtune`: the
/// compiler took it, and the tuning script ran.
fn check_variant_flags(flags: &Value, candidates: &[Value]) -> Result<()> {
    for name in candidates.iter().filter_map(|c| c["variant"].as_str()) {
        let Some(recorded) = flags[name].as_str().filter(|f| f.contains("-O")) else {
            bail!("`exsa info` records no compile flags for CPU variant {name}: {flags}");
        };
        if let Some((_, cpu)) = tuning::TUNING.iter().find(|(variant, _)| *variant == name)
            && !recorded.split_whitespace().any(|f| f == format!("-mtune={cpu}"))
        {
            bail!("CPU variant {name} was compiled without -mtune={cpu} (llama-sys tunes it): {recorded}");
        }
    }
    let missing: Vec<&str> = tuning::TUNING.iter().map(|(variant, _)| *variant).filter(|v| !candidates.iter().any(|c| c["variant"] == *v)).collect();
    if !missing.is_empty() {
        bail!("the bundle has no CPU variant {} that llama-sys tunes: did ggml rename its variants?", missing.join(", "));
    }
    Ok(())
}

/// This machine's native build of `exsa` (debug Rust, llama.cpp in Release as always).
fn native_exsa() -> Result<PathBuf> {
    workspace::run(workspace::cargo().args(["build", "-p", "exsa-engine", "--bin", "exsa"]).env("LLAMA_SYS_PROFILE", "none"))?;
    Ok(workspace::target_dir().join("debug/exsa"))
}

/// `exsa info` of the bundle, run as `launch` says.
fn bundle_info(launch: &Launch, model: &Path) -> Result<Value> {
    let out = launch.command().arg("info").arg("--model").arg(model).output().context("cannot run the bundle's exsa")?;
    if !out.status.success() {
        bail!("the bundle's `exsa info` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("`exsa info` printed no JSON")
}

/// How one `exsa` runs: nothing of this build in its environment, a CPU variant forced or not,
/// and the dynamic loader's search path (the CUDA runtime's folder) or none.
struct Launch<'a> {
    exsa: &'a Path,
    variant: Option<&'a str>,
    library_path: Option<&'a Path>,
}

impl<'a> Launch<'a> {
    fn plain(exsa: &'a Path) -> Launch<'a> {
        Launch { exsa, variant: None, library_path: None }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.exsa);
        command.env_clear().env("PATH", "/usr/bin:/bin");
        if let Some(variant) = self.variant {
            command.env(CPU_VARIANT_VAR, variant);
        }
        if let Some(dir) = self.library_path {
            command.env("LD_LIBRARY_PATH", dir);
        }
        command
    }

    /// A short name for its log file.
    fn tag(&self) -> String {
        format!("{}{}", self.variant.unwrap_or("default"), if self.library_path.is_some() { "-libpath" } else { "" })
    }
}

/// Whether the bundle carries the CUDA module (`dist --cuda`).
fn has_cuda_module(exsa: &Path) -> bool {
    exsa.parent().and_then(Path::parent).is_some_and(|root| root.join("lib/libggml-cuda.so").is_file())
}

/// The bundle's CUDA module must cost nothing where it cannot run and be used where it can:
/// - as unpacked, with nothing on the loader's path, it is skipped on a machine without the CUDA
///   runtime (`exsa info` names the library it lacked), and the bundle ran on the CPU above;
/// - with the runtime of the toolkit that built it on LD_LIBRARY_PATH, ggml registers it; where
///   no GPU answers (no driver, no device), the bundle runs on the CPU, says so once, and gives
///   the native tokens as before; where one does, llama.cpp's log must say the layers went to
///   it, and the tokens are compared by the same rule.
fn check_cuda(exsa: &Path, model: &Path, reference: &[GreedyStep], native_ran_amx: bool) -> Result<()> {
    let plain = bundle_info(&Launch::plain(exsa), model)?;
    match cuda_module(&plain)?["error"].as_str() {
        Some(error) if error.contains("libcu") => eprintln!("dist check: CUDA module without the CUDA runtime: skipped ({error})"),
        Some(error) => bail!("the bundle's CUDA module did not open, but not for want of the CUDA runtime: {error}"),
        None => eprintln!("dist check: CUDA module registered with this machine's own CUDA runtime"),
    }
    let runtime = super::cuda_toolkit()?.join("lib64");
    let launch = Launch { library_path: Some(&runtime), ..Launch::plain(exsa) };
    let info = bundle_info(&launch, model)?;
    if let Some(error) = cuda_module(&info)?["error"].as_str() {
        bail!("the bundle's CUDA module was not registered with the CUDA runtime of {} on the loader's path: {error}", runtime.display());
    }
    let gpus: Vec<&str> = info["build_info"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["kind"] == "gpu")
        .filter_map(|d| d["description"].as_str())
        .collect();
    // On a GPU the weights leave the CPU, and its AMX kernels with them.
    let amx = gpus.is_empty() && amx_expected(native_ran_amx, &info);
    let server = compare_variant(&launch, model, "with the CUDA module", reference, amx)?;
    let (expected, said) =
        if gpus.is_empty() { ("that it runs on the CPU", NO_GPU_WARNING) } else { ("that the layers went to the GPU", OFFLOADED_LOG) };
    if !server.log_says(said)? {
        bail!("the bundle with its CUDA module (GPUs: {gpus:?}) did not say {expected} ({said:?} not in {})", server.log.display());
    }
    eprintln!(
        "dist check: CUDA module registered; {}",
        if gpus.is_empty() { "no GPU here, ran on the CPU and said so".to_owned() } else { format!("ran on {}", gpus.join(", ")) }
    );
    Ok(())
}

/// The CUDA module's entry of `exsa info`'s `other_backend_modules`.
fn cuda_module(info: &Value) -> Result<&Value> {
    let modules = &info["build_info"]["other_backend_modules"];
    modules
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["backend"] == "cuda")
        .with_context(|| format!("`exsa info` lists no CUDA module though the bundle has one: {modules}"))
}

/// Whether a variant whose `exsa info` is `info` must run ggml's AMX kernels: it was compiled
/// with them, and the native build ran them on this CPU with this model (so the CPU has AMX,
/// the probe passed, and the model's weights are of types the AMX kernels take). llama-sys'
/// probe falls back to the AVX-512 kernels where a tile multiply fails; where the native build
/// got past it, that fallback in the bundle would hide a broken module.
fn amx_expected(native_ran_amx: bool, info: &Value) -> bool {
    native_ran_amx && info["system_info"].as_str().is_some_and(|s| s.contains(AMX_COMPILED))
}

/// Compares the variant's greedy tokens with the native build's, and checks that it ran ggml's
/// AMX kernels exactly where `amx` says it must. The server, still running, for more checks.
fn compare_variant(launch: &Launch, model: &Path, name: &str, reference: &[GreedyStep], amx: bool) -> Result<Server> {
    let server = Server::start(launch, model)?;
    let steps = compare_every_step(reference, |forced_prefix| server.trace(forced_prefix))
        .with_context(|| format!("the bundle's CPU variant {name} against the native build"))?;
    let ran_amx = server.ran_amx()?;
    if ran_amx != amx {
        bail!(
            "the bundle's CPU variant {name} {} ggml's AMX kernels where {} (log in {})",
            if ran_amx { "ran" } else { "did not run" },
            if amx { "it has them and the native build ran them" } else { "it should not" },
            server.log.display()
        );
    }
    eprintln!("dist check: variant {name}: {steps}{}", if ran_amx { ", with ggml's AMX kernels" } else { "" });
    Ok(server)
}

/// Compares a build's greedy trace with `reference` at every step: where the two part at a
/// near-tie swap, `trace` is asked again with the reference's tokens up to there forced, and
/// the comparison goes on from the next step. `trace(forced)` gives the build's steps after the
/// prompt and the `forced` tokens. Says how the traces matched.
fn compare_every_step(reference: &[GreedyStep], mut trace: impl FnMut(&[i32]) -> Result<Vec<GreedyStep>>) -> Result<String> {
    let tokens: Vec<i32> = reference.iter().map(|s| s.token).collect();
    let mut at = 0;
    let mut swaps = Vec::new();
    while at < reference.len() {
        let theirs = trace(&tokens[..at])?;
        let ours = &reference[at..];
        match ours.iter().zip(&theirs).position(|(a, b)| a.token != b.token) {
            None if theirs.len() >= ours.len() => break,
            None => bail!("the trace stopped after {} of {} steps", at + theirs.len(), reference.len()),
            Some(k) if ours[k].is_near_tie_swap(&theirs[k], NEAR_TIE) => {
                swaps.push(at + k);
                at += k + 1;
            }
            Some(k) => bail!(
                "step {} differs beyond a near tie: native {} (runner-up {} by {:.3}), bundle {} (runner-up {} by {:.3})",
                at + k,
                ours[k].token,
                ours[k].runner_up,
                ours[k].margin,
                theirs[k].token,
                theirs[k].runner_up,
                theirs[k].margin
            ),
        }
    }
    Ok(if swaps.is_empty() {
        format!("the same {} greedy tokens", reference.len())
    } else {
        format!("the same at all {} steps but near-tie swaps at {swaps:?} (compared on with the native tokens)", reference.len())
    })
}

/// `variant` forced on a CPU that cannot run it: an error naming it, an exit, not a signal.
fn refused(exsa: &Path, model: &Path, variant: &str) -> Result<()> {
    let out = Launch { variant: Some(variant), ..Launch::plain(exsa) }.command().arg("info").arg("--model").arg(model).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(code) if code != 0 && stderr.contains(&format!("{CPU_VARIANT_VAR}={variant}")) && stderr.contains("cannot run it") => {
            eprintln!("dist check: variant {variant}: refused on this CPU (exit {code})");
            Ok(())
        }
        _ => bail!("{CPU_VARIANT_VAR}={variant}, which this CPU cannot run, ended {}: {stderr}", out.status),
    }
}

/// An `exsa serve` of one build, stopped when dropped.
struct Server {
    child: Child,
    base: String,
    /// Its stderr: llama.cpp's log at level info.
    log: PathBuf,
}

impl Server {
    fn start(launch: &Launch, model: &Path) -> Result<Server> {
        let port = server_process::free_port()?;
        let log = std::env::temp_dir().join(format!("exsa-dist-check-{}-{}.log", std::process::id(), launch.tag()));
        let mut command = launch.command();
        command.args(["serve", "--log", "info", "--parallel", "1", "--port", &port.to_string(), "--model"]).arg(model).stdin(Stdio::null());
        let (child, base) = server_process::start_healthy(&mut command, "exsa serve", port, &log)?;
        Ok(Server { child, base, log })
    }

    /// Whether it put the model's weights in the buffer of ggml's AMX kernels (its log says so).
    fn ran_amx(&self) -> Result<bool> {
        self.log_says(AMX_BUFFER_LOG)
    }

    /// Whether its log so far holds `text`.
    fn log_says(&self, text: &str) -> Result<bool> {
        let log = std::fs::read_to_string(&self.log).with_context(|| format!("reading {}", self.log.display()))?;
        Ok(log.contains(text))
    }

    /// The greedy steps after the prompt and `forced`, with each step's top three.
    fn trace(&self, forced: &[i32]) -> Result<Vec<GreedyStep>> {
        let client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(300)).build()?;
        // Text, then token ids: one prompt (llama-server's mixed form).
        let prompt = if forced.is_empty() {
            json!(PROMPT)
        } else {
            Value::Array(std::iter::once(json!(PROMPT)).chain(forced.iter().map(|&t| json!(t))).collect())
        };
        let body =
            json!({ "prompt": prompt, "n_predict": STEPS.saturating_sub(forced.len()).max(1), "n_probs": 3, "temperature": 0, "ignore_eos": true });
        let answer: Value = client.post(format!("{}/completion", self.base)).json(&body).send()?.error_for_status()?.json()?;
        let steps = answer["completion_probabilities"].as_array().with_context(|| format!("no completion_probabilities: {answer}"))?;
        steps.iter().map(greedy_step).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One entry of `completion_probabilities` (`{id, logprob, top_logprobs: [{id, logprob}]}`).
fn greedy_step(step: &Value) -> Result<GreedyStep> {
    let token = step["id"].as_i64().with_context(|| format!("a step without an id: {step}"))? as i32;
    let top: Vec<(i32, f32)> = step["top_logprobs"]
        .as_array()
        .with_context(|| format!("a step without top_logprobs: {step}"))?
        .iter()
        .filter_map(|c| Some((c["id"].as_i64()? as i32, c["logprob"].as_f64()? as f32)))
        .collect();
    let [first, second, third] = top[..] else { bail!("a step without its top three: {step}") };
    Ok(GreedyStep::from_top3(token, [first, second, third]))
}

/// A folder renamed away while the check runs, and back when it ends.
struct OutOfReach {
    dir: PathBuf,
    away: PathBuf,
}

impl OutOfReach {
    fn new(dir: &Path) -> Result<OutOfReach> {
        let away = dir.with_extension("out-of-reach");
        // A check killed before it put the folder back (no Drop ran) left it away: back first,
        // or, where a later build made the folder again, the stale copy goes.
        if away.exists() {
            if dir.exists() {
                std::fs::remove_dir_all(&away)?;
            } else {
                std::fs::rename(&away, dir)?;
            }
        }
        std::fs::rename(dir, &away).with_context(|| format!("cannot move {} out of reach", dir.display()))?;
        Ok(OutOfReach { dir: dir.to_owned(), away })
    }
}

impl Drop for OutOfReach {
    fn drop(&mut self) {
        if let Err(e) = std::fs::rename(&self.away, &self.dir) {
            eprintln!("dist check: could not move {} back to {}: {e}", self.away.display(), self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(token: i32, runner_up: i32, margin: f32) -> GreedyStep {
        GreedyStep { token, runner_up, margin, third: None }
    }

    #[test]
    fn every_variant_needs_its_flags_and_each_tuned_one_its_mtune() {
        let tuned = |name: &str| tuning::TUNING.iter().find(|(v, _)| *v == name).map(|(_, cpu)| format!(" -mtune={cpu}")).unwrap_or_default();
        let names: Vec<&str> = ["x64", "haswell", "zen4"].into_iter().chain(tuning::TUNING.iter().map(|(v, _)| *v)).collect();
        let candidates: Vec<Value> = names.iter().map(|n| json!({ "variant": n, "score": 1 })).collect();
        let flags = |skip_tune: &str| -> Value {
            names.iter().map(|n| (n.to_string(), json!(format!("-O3 -mavx2{}", if *n == skip_tune { String::new() } else { tuned(n) })))).collect()
        };
        check_variant_flags(&flags(""), &candidates).unwrap();

        let err = check_variant_flags(&flags("sapphirerapids"), &candidates).unwrap_err().to_string();
        assert!(err.contains("sapphirerapids was compiled without -mtune=sapphirerapids"), "{err}");
        let mut no_flags = flags("");
        no_flags.as_object_mut().unwrap().remove("haswell");
        let err = check_variant_flags(&no_flags, &candidates).unwrap_err().to_string();
        assert!(err.contains("no compile flags for CPU variant haswell"), "{err}");
        let renamed: Vec<Value> = candidates.iter().filter(|c| c["variant"] != "alderlake").cloned().collect();
        let err = check_variant_flags(&flags(""), &renamed).unwrap_err().to_string();
        assert!(err.contains("no CPU variant alderlake"), "{err}");
    }

    #[test]
    fn a_near_tie_swap_is_followed_by_the_reference_tokens_and_compared_on() {
        let reference = [step(1, 2, 1.0), step(3, 4, 0.1), step(5, 6, 1.0), step(7, 8, 1.0)];
        // The build swaps step 1, then (fed 1, 3) agrees on.
        let mut asked = Vec::new();
        let said = compare_every_step(&reference, |forced| {
            asked.push(forced.to_vec());
            Ok(match forced.len() {
                0 => vec![step(1, 2, 1.0), step(4, 3, 0.05), step(9, 9, 1.0), step(9, 9, 1.0)],
                _ => vec![step(5, 6, 1.0), step(7, 8, 1.0)],
            })
        })
        .unwrap();
        assert_eq!(asked, [vec![], vec![1, 3]]);
        assert!(said.contains("[1]"), "{said}");
        // After the swap a real difference is still found.
        let err = compare_every_step(&reference, |forced| {
            Ok(match forced.len() {
                0 => vec![step(1, 2, 1.0), step(4, 3, 0.05)],
                _ => vec![step(5, 6, 1.0), step(8, 7, 2.0)],
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("step 3 differs"), "{err}");
        // A short trace is a failure, not a match.
        assert!(compare_every_step(&reference, |_| Ok(vec![step(1, 2, 1.0)])).is_err());
    }

    #[test]
    fn a_step_reads_from_the_servers_probabilities() {
        let entry =
            json!({ "id": 5, "logprob": -0.1, "top_logprobs": [{"id": 5, "logprob": -0.1}, {"id": 7, "logprob": -0.4}, {"id": 9, "logprob": -2.1}] });
        let s = greedy_step(&entry).unwrap();
        assert_eq!((s.token, s.runner_up), (5, 7));
        assert!((s.margin - 0.3).abs() < 1e-6 && s.third.is_some_and(|(t, gap)| t == 9 && (gap - 2.0).abs() < 1e-6));
        assert!(greedy_step(&json!({ "id": 5, "top_logprobs": [{"id": 5, "logprob": -0.1}] })).is_err());
    }
}
