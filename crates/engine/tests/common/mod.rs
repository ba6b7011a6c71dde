//! Shared by the server tests: `exsa serve` as a child process on an ephemeral port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub base: String,
}

/// The lines a server wrote to stderr so far (its log), collected as they come.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Server {
    /// The server with `extra` arguments, its log (warnings and errors) on the test's stderr.
    pub fn start(extra: &[&str]) -> Server {
        Server::spawn(extra, Stdio::inherit())
    }

    /// The server with `extra` arguments (later ones override the defaults, so `--server-log
    /// info` shows request lines), and its log.
    pub fn start_logged(extra: &[&str]) -> (Server, Log) {
        let mut server = Server::spawn(extra, Stdio::piped());
        let log = Log::default();
        let (stderr, lines) = (server.child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.0.lock().unwrap().push(line);
            }
        });
        (server, log)
    }

    fn spawn(extra: &[&str], stderr: Stdio) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_exsa"))
            .args(["--log", "error", "--server-log", "warn", "--threads", "2", "serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("exsa serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let server = Server { child, base: addr.to_string() };
        server.wait_ready();
        server
    }

    /// Waits until `/health` says the server's models are loaded (it listens before).
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let http = client();
        loop {
            match http.get(self.url("/health")).send() {
                Ok(r) if r.status().as_u16() == 200 => return,
                Ok(r) => assert_eq!(r.status().as_u16(), 503, "/health while loading"),
                Err(e) => panic!("/health: {e}"),
            }
            assert!(std::time::Instant::now() < deadline, "the server did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A metric's value, summed over its series (one per loaded model for the decode loops'
    /// metrics).
    pub fn metric(&self, name: &str) -> f64 {
        let text = client().get(self.url("/metrics")).send().unwrap().text().unwrap();
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
            .collect();
        assert!(!values.is_empty(), "no {name} in {text}");
        values.iter().sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// llama.cpp's own `llama-server` (EXSA_LLAMA_SERVER: `cargo xtask test` builds it from the
/// llama-cpp-python sdist) on a free port, the reference some tests ask the same questions as
/// `exsa serve`; stopped when dropped.
pub struct LlamaServer {
    child: Child,
    pub base: String,
}

impl LlamaServer {
    /// The server with `args` (its model among them), once its `/health` answers 200.
    pub fn start(args: &[&str]) -> LlamaServer {
        let program = std::path::PathBuf::from(std::env::var("EXSA_LLAMA_SERVER").expect("EXSA_LLAMA_SERVER is set by .cargo/config.toml"));
        assert!(program.is_file(), "llama.cpp's llama-server is missing at {}: run `cargo xtask test` (it builds it)", program.display());
        // A port the system hands out now; llama-server does not print one it picked itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
        let child = Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &port, "--threads", "2", "--log-disable"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        let mut server = LlamaServer { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let http = client();
        while !http.get(server.url("/health")).send().is_ok_and(|r| r.status().as_u16() == 200) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("llama-server {args:?} exited: {status}");
            }
            assert!(std::time::Instant::now() < deadline, "llama-server {args:?} did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Held by each server test for its whole run: the tests of one binary otherwise run two at a
/// time, each server decoding with all cores, and llama.cpp's spinning worker threads slow
/// oversubscribed cores down many times over (http.rs took 213 s that way, 33 s in turn).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it poisons nothing the next one needs.
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// Runs `tests/<script>` with the official `openai` Python client on its path (pip-installed by
/// `cargo xtask test` at EXSA_OPENAI_SITE) and `args`; fails with its output unless it exits 0.
pub fn run_openai_script(script: &str, args: &[&str]) {
    run_client_script("EXSA_OPENAI_SITE", "openai", script, args);
}

/// [`run_openai_script`] with the official `ollama` Python client (EXSA_OLLAMA_SITE).
pub fn run_ollama_script(script: &str, args: &[&str]) {
    run_client_script("EXSA_OLLAMA_SITE", "ollama", script, args);
}

/// Runs `tests/<script>` with the Python package `module` on its path (the folder `site_var`
/// names, where `cargo xtask test` installs it) and `args`; fails with its output unless it exits 0.
fn run_client_script(site_var: &str, module: &str, script: &str, args: &[&str]) {
    let site = std::path::PathBuf::from(std::env::var(site_var).unwrap_or_else(|_| panic!("{site_var} is set by .cargo/config.toml")));
    assert!(site.join(module).is_dir(), "the {module} package is missing at {}: run `cargo xtask test` (it installs it)", site.display());
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let out = Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
        .env("PYTHONPATH", &site)
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
