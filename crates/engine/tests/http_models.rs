//! `exsa serve` with several models (`--models-dir`): listed, loaded on first use, unloaded
//! when idle or to make room, refused when unknown; and `/health` while the model loads.
//! A separate server process on an ephemeral port, a real HTTP client, the real models.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client};
use exsa_engine::*;
use serde_json::{Value, json};

mod common;

/// A fresh directory under the target dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn completion(server: &Server, model: Option<&str>, max_tokens: u32) -> reqwest::blocking::Response {
    let mut body = json!({ "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0 });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    client().post(server.url("/v1/completions")).json(&body).send().unwrap()
}

fn listed(server: &Server) -> Vec<(String, bool)> {
    let models: Value = client().get(server.url("/v1/models")).send().unwrap().json().unwrap();
    models["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap().to_string(), m["loaded"].as_bool().unwrap())).collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn models_of_a_directory_load_on_first_use_and_unload_when_idle_or_to_make_room() {
    let _one_at_a_time = common::one_at_a_time();
    let dir = scratch_dir("models-dir");
    // Two names for the default model (the files need not differ to be two models), and a
    // file that is not a model, which is not listed.
    for name in ["alpha.gguf", "beta.gguf"] {
        std::os::unix::fs::symlink(default_model_path().canonicalize().unwrap(), dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not a model").unwrap();
    let server = Server::start(&["--models-dir", dir.to_str().unwrap(), "--max-loaded", "1", "--keep-alive", "2", "--parallel", "2"]);
    assert_eq!(listed(&server), [("alpha".to_string(), false), ("beta".to_string(), false)]);
    assert_eq!(server.metric("exsa_models_loaded"), 0.0, "nothing is loaded before it is asked for");

    // Which model: unknown → 404 naming the choices; none given with two to choose from → 400.
    let r = completion(&server, Some("gamma"), 4);
    assert_eq!(r.status(), 404);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("alpha, beta"), "{body}");
    let r = completion(&server, None, 4);
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["error"]["param"], "model");

    // First use loads; the response names the model.
    let a: Value = completion(&server, Some("alpha"), 6).json().unwrap();
    assert_eq!(a["model"], "alpha");
    assert_eq!(listed(&server), [("alpha".to_string(), true), ("beta".to_string(), false)]);
    // A second model unloads the first (at most one loaded), and answers the same text: the
    // same weights under another name.
    let b: Value = completion(&server, Some("beta"), 6).json().unwrap();
    assert_eq!((b["model"].as_str(), b["choices"][0]["text"].as_str()), (Some("beta"), a["choices"][0]["text"].as_str()));
    assert_eq!(listed(&server), [("alpha".to_string(), false), ("beta".to_string(), true)]);
    assert_eq!(server.metric("exsa_models_loaded"), 1.0);
    assert!(server.metric("exsa_kv_used_tokens") > 0.0, "the finished request's cache is kept for reuse");
    assert_eq!(server.metric("exsa_kv_capacity_tokens"), 4096.0);

    // A busy model is not unloaded: while beta streams, alpha cannot be loaded (503, retry).
    let mut stream = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "model": "beta", "messages": [{ "role": "user", "content": "Tell a long story." }], "max_tokens": 400, "stream": true }))
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    let _ = stream.read(&mut first).unwrap();
    let r = completion(&server, Some("alpha"), 4);
    assert_eq!((r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string())), (503, Some("1".into())));
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "model_capacity");
    drop(stream);
    wait_for("beta to go idle", || server.metric("exsa_busy_slots") == 0.0);

    // Idle past the keep-alive (2 s): unloaded.
    wait_for("beta to be unloaded after the keep-alive", || server.metric("exsa_models_loaded") == 0.0);
    assert_eq!(listed(&server), [("alpha".to_string(), false), ("beta".to_string(), false)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn health_is_503_while_the_model_loads_and_a_model_that_cannot_load_stops_the_server() {
    let _one_at_a_time = common::one_at_a_time();
    // A FIFO as the model file: opening it blocks until a writer comes, so the server is
    // "loading" for as long as this test wants.
    let dir = scratch_dir("loading");
    let fifo = dir.join("slow.gguf");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--log", "error", "--server-log", "warn", "--threads", "2", "serve", "--port", "0", "--model", fifo.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("listening on ").unwrap().to_string();
    let http = client();
    for _ in 0..3 {
        let r = http.get(format!("{base}/health")).send().unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers().get("retry-after").unwrap(), "1");
        assert_eq!(r.json::<Value>().unwrap()["status"], "loading");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The "model" turns out not to be one: the server stops with the reason, exit status 1.
    // (A loader that gives up at once may close its end before the write: a broken pipe is fine.)
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    if let Err(e) = writer.write_all(b"this is not a GGUF file") {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    drop(writer);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could not load") && stderr.contains("slow.gguf"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
