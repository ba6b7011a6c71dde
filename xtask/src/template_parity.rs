//! `cargo xtask template-parity`: every Jinja template of llama.cpp's corpus rendered by `exsa
//! serve` and by llama.cpp's own `llama-server` (`POST /apply-template` on both, the same model,
//! the same template file), for a fixed set of conversations; the prompts must be equal byte for
//! byte, or differ in a way listed here with its reason. Run by `cargo xtask test --full` (it
//! builds llama-server, minutes; CI leaves it out for time).
//!
//! The one difference by design: a template that knows nothing of tools, given tools, renders our
//! generic format (the tools described in the system message, see docs/tools.md), where
//! llama-server renders the messages as if there were no tools.
//!
//! `--record` also writes llama-server's renders to [`RECORD`], which CI's
//! `crates/llama/tests/chat_parity.rs` holds our chat layer to without building llama-server
//! (the date the templates print there is pinned to the recording day's, noon UTC).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::server_process::{self, Started};
use crate::{fetch_model, llama_tools, workspace};

/// llama-server's renders, as `--record` writes them (relative to the workspace).
pub const RECORD: &str = "crates/llama/tests/data/llama_server_renders.json";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Only templates whose file name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Also write llama-server's renders to crates/llama/tests/data/llama_server_renders.json.
    #[arg(long)]
    record: bool,
}

/// A server with its child process (killed on drop).
struct Running {
    child: Child,
    base: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The conversations each template renders: plain, with a system prompt, several turns, with
/// tools, and with a history of tool calls and their results.
fn conversations() -> Vec<(&'static str, Value)> {
    let weather = json!({ "type": "function", "function": { "name": "get_weather", "description": "The weather in a city.",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } });
    let call = json!({ "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\": \"Paris\"}" } });
    vec![
        ("plain", json!({ "messages": [{ "role": "user", "content": "Hello!" }] })),
        ("system", json!({ "messages": [{ "role": "system", "content": "You are terse." }, { "role": "user", "content": "Hello!" }] })),
        (
            "multi-turn",
            json!({ "messages": [
                { "role": "user", "content": "Name a fruit." }, { "role": "assistant", "content": "Apple." },
                { "role": "user", "content": "Another one." }] }),
        ),
        ("tools", json!({ "messages": [{ "role": "user", "content": "Weather in Paris?" }], "tools": [weather] })),
        (
            "tool-results",
            json!({ "messages": [
                { "role": "user", "content": "Weather in Paris?" },
                { "role": "assistant", "content": null, "tool_calls": [call] },
                { "role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny" }], "tools": [weather] }),
        ),
    ]
}

pub fn run(args: &Args) -> Result<()> {
    let llama_server = llama_tools::ensure("llama-server")?;
    let corpus = llama_tools::sdist_source()?.join("models").join("templates");
    let model = fetch_model::run(&fetch_model::Args::default())?;
    workspace::run(workspace::cargo().args(["build", "--locked", "-p", "exsa-engine", "--bin", "exsa"]))?;
    let exsa = workspace::target_dir().join("debug").join("exsa");
    let mut templates: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .with_context(|| format!("reading {}", corpus.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    templates.retain(|p| p.extension().is_some_and(|e| e == "jinja") && args.only.as_ref().is_none_or(|o| p.to_string_lossy().contains(o.as_str())));
    templates.sort();
    let out = workspace::target_dir().join("template-parity");
    std::fs::create_dir_all(&out)?;
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let (mut equal, mut by_design, mut mismatches) = (0, 0, Vec::new());
    // Both servers print today's date; the record says which day (its noon, UTC), for the CI
    // test to pin it on our side.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() / 86_400 * 86_400 + 43_200;
    let mut renders = Vec::new();
    for template in &templates {
        let name = template.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        let theirs = start(&llama_server, &model, template, &out, Side::LlamaServer)?;
        let ours = start(&exsa, &model, template, &out, Side::Exsa)?;
        let (ours, theirs) = match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => (ours, theirs),
            // Both refuse the template at start.
            (Err(_), Err(_)) => {
                equal += conversations().len();
                continue;
            }
            (a, b) => {
                let said = |r: &Result<Running, String>| r.as_ref().map_or_else(Clone::clone, |_| "started".to_owned());
                mismatches.push(format!("{name}: exsa {}, llama-server {}", said(&a), said(&b)));
                continue;
            }
        };
        for (conversation, request) in conversations() {
            let a = apply(&http, &ours.base, &request);
            let b = apply(&http, &theirs.base, &request);
            renders.push(json!({ "template": name, "conversation": conversation, "prompt": b.as_ref().ok() }));
            match (&a, &b) {
                (Ok(a), Ok(b)) if a == b => equal += 1,
                // Both refuse the conversation (a template that allows no system message, ...).
                (Err(_), Err(_)) => equal += 1,
                (Ok(a), _) if conversation.starts_with("tool") && a.contains("You can call tools.") => by_design += 1,
                _ => mismatches.push(format!("{name} / {conversation}:\n  exsa:         {a:?}\n  llama-server: {b:?}")),
            }
        }
    }
    println!(
        "template-parity: {} templates x {} conversations: {equal} equal, {by_design} different by design (generic tool format), {} different",
        templates.len(),
        conversations().len(),
        mismatches.len()
    );
    if args.record {
        let version = Command::new(&llama_server).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())?;
        let conversations: serde_json::Map<String, Value> = conversations().into_iter().map(|(n, r)| (n.to_owned(), r)).collect();
        let record = json!({
            "what": "llama-server's /apply-template for each template of llama.cpp's corpus (llama-cpp-python 0.3.36 sdist) and conversation, on the default model; written by `cargo xtask template-parity --record`",
            "llama_server": version,
            "now": now,
            "conversations": conversations,
            "renders": renders,
        });
        let path = workspace::root().join(RECORD);
        std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
        std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")?;
        println!("template-parity: llama-server's renders written to {}", path.display());
    }
    if !mismatches.is_empty() {
        bail!("prompts differ from llama-server's:\n{}", mismatches.join("\n"));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Side {
    Exsa,
    LlamaServer,
}

/// The prompt a server renders for `request`, or its error.
fn apply(http: &reqwest::blocking::Client, base: &str, request: &Value) -> Result<String, String> {
    let response = http.post(format!("{base}/apply-template")).json(request).send().map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().map_err(|e| e.to_string())?;
    match body["prompt"].as_str() {
        Some(prompt) if status.is_success() => Ok(prompt.to_owned()),
        _ => Err(format!("{status}: {body}")),
    }
}

/// Starts one server with `template` on a free port and waits for /health; Ok(Err) when the
/// server refused the template (it exited).
fn start(binary: &Path, model: &Path, template: &Path, out: &Path, side: Side) -> Result<Result<Running, String>> {
    let port = server_process::free_port()?.to_string();
    let mut command = Command::new(binary);
    let log_name = match side {
        Side::Exsa => {
            command.arg("--model").arg(model).args(["--log", "error", "--ctx", "512", "serve", "--port", &port, "--parallel", "1"]);
            command.arg("--chat-template-file").arg(template);
            "exsa.log"
        }
        Side::LlamaServer => {
            command.arg("-m").arg(model).args(["--port", &port, "-c", "512", "-np", "1", "--jinja", "--no-webui"]);
            command.arg("--chat-template-file").arg(template);
            "llama-server.log"
        }
    };
    let log = std::fs::File::create(out.join(log_name))?;
    let child = command.stdout(Stdio::null()).stderr(log).spawn().with_context(|| format!("starting {}", binary.display()))?;
    let mut running = Running { child, base: format!("http://127.0.0.1:{port}") };
    match server_process::wait_healthy(&mut running.child, &running.base)? {
        Started::Healthy => return Ok(Ok(running)),
        Started::Exited(status) => {
            let said = std::fs::read_to_string(out.join(log_name)).unwrap_or_default();
            return Ok(Err(format!("exited ({status}): {}", said.lines().rev().take(2).collect::<Vec<_>>().join(" | "))));
        }
        Started::TimedOut => {}
    }
    bail!("{} with {} did not become healthy within 120 s (log in {})", binary.display(), template.display(), out.join(log_name).display())
}
