//! Layers across processes through ggml's RPC backend, on loopback: two `exsa rpc-server`
//! processes take most of the default model's layers, the rest stay on this process's CPU, and
//! greedy output is the local output (up to the near-tie rule). A bad endpoint and a refused
//! connection are typed errors, through the library and the CLI. Backends `crate` and `raw`
//! refuse rpc-servers by name.
//!
//! Not tested, because it does not hold: a server killed after the model loaded ends the client
//! process (ggml's RPC client aborts on a thread of its own; see `llama::rpc`).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exsa_engine::serving::BATCH_NEAR_TIE;
use exsa_engine::*;

/// An `exsa rpc-server` child on a free loopback port, killed on drop.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> RpcServer {
        // A port that was free a moment ago (the server binds it itself).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_exsa"))
            .args(["--log", "error", "--threads", "1", "rpc-server", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("exsa rpc-server starts");
        let server = RpcServer { child, endpoint: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&server.endpoint).is_err() {
            assert!(Instant::now() < deadline, "rpc-server on {} did not listen", server.endpoint);
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Resident memory of the server process, in KiB (Linux).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(rpc_servers: Vec<String>, n_gpu_layers: i32) -> EngineConfig {
    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig { n_ctx: 512, n_threads: 2, n_threads_batch: 2, ..Default::default() };
    config.rpc_servers = rpc_servers;
    config.n_gpu_layers = n_gpu_layers;
    config
}

fn supported() -> bool {
    if Engine::backend_name() == "source" {
        return true;
    }
    let err = Engine::load(config(vec!["127.0.0.1:1".into()], 4)).expect_err("refused");
    assert!(matches!(err, EngineError::Unsupported { what, .. } if what.contains("rpc")), "{err}");
    false
}

#[test]
fn layers_on_two_rpc_servers_give_the_local_output() {
    if !supported() {
        return;
    }
    let servers = [RpcServer::start(), RpcServer::start()];
    let before: Vec<u64> = servers.iter().map(RpcServer::rss_kib).collect();
    // 12 of the 18 layers on the servers, split evenly; 6 and the output stay here.
    let mut remote = config(servers.iter().map(|s| s.endpoint.clone()).collect(), 12);
    remote.tensor_split = vec![1.0, 1.0];
    let engine = Engine::load(remote).expect("the model loads across the servers");
    let placement = engine.model_info().placement;
    for (server, before) in servers.iter().zip(&before) {
        let grown = server.rss_kib().saturating_sub(*before);
        assert!(grown > 4 * 1024, "rpc-server {} took only {grown} KiB of layers", server.endpoint);
        // `exsa info` shows the same: each server's model buffer, by endpoint.
        assert!(placement.iter().any(|l| l.contains(&server.endpoint) && l.contains("buffer size")), "{placement:?}");
    }
    assert!(placement.iter().any(|l| l.contains("offloaded 12/")), "{placement:?}");
    let local = Engine::load(config(Vec::new(), 0)).unwrap();
    let prompt = "The history of the printing press begins";
    let want = harness::greedy_trace(&local, local.session_config(), prompt, 24).unwrap();
    let got = harness::greedy_trace(&engine, engine.session_config(), prompt, 24).unwrap();
    if let Some(k) = want.iter().zip(&got).position(|(a, b)| a.token != b.token) {
        assert!(want[k].margin < BATCH_NEAR_TIE, "parted at token {k} where the choice was clear: {:?} / {:?}", want[k], got[k]);
    }
    // Generation through the engine works end to end.
    let (text, stats) =
        engine.generate(&GenerateRequest { max_tokens: 8, sampling: SamplingParams::greedy(), ..GenerateRequest::new(prompt) }).unwrap();
    assert!(!text.is_empty() && stats.completion_tokens == 8, "{stats:?}");
}

#[test]
fn bad_endpoints_and_refused_connections_are_errors() {
    if !supported() {
        return;
    }
    let message = |endpoint: &str| {
        let err = Engine::load(config(vec![endpoint.to_string()], 4)).expect_err("refused");
        assert!(matches!(err, EngineError::Load { .. }), "{endpoint}: {err:?}");
        format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default())
    };
    let bad = message("no-port-here");
    assert!(bad.contains("no-port-here") && bad.contains("HOST:PORT"), "{bad}");
    // Nothing listens on a port that was just free.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = message(&format!("127.0.0.1:{port}"));
    assert!(refused.contains(&format!("127.0.0.1:{port}")) && refused.to_lowercase().contains("connect"), "{refused}");
    // The process is still here and loads the model locally afterwards.
    Engine::load(config(Vec::new(), 0)).unwrap();

    // The CLI says the same and exits 1.
    let out = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--log", "error", "--rpc", &format!("127.0.0.1:{port}"), "generate", "hello", "--max-tokens", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

#[test]
fn a_server_bound_beyond_loopback_warns_that_the_protocol_has_no_authentication() {
    if !supported() {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--log", "error", "--threads", "1", "rpc-server", "--host", "0.0.0.0", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rpc-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("warning") && stderr.contains("no authentication"), "{stderr}");
    // A port already taken: the server says it cannot serve, and exits 1.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_exsa")).args(["--log", "error", "rpc-server", "--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}
