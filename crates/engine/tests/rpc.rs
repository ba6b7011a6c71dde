//! Layers across processes through ggml's RPC backend, on loopback: two `exsa rpc-server`
//! processes take most of the default model's layers, the rest stay on this process's CPU, and
//! greedy output is the local output (up to the near-tie rule). A bad endpoint and a refused
//! connection are typed errors, through the library and the CLI; so is a server killed while a
//! generation runs (the client process carries on, and says which server it lost). Backends
//! `crate` and `raw` refuse rpc-servers by name.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client};
use exsa_engine::serving::BATCH_NEAR_TIE;
use exsa_engine::*;
use serde_json::json;

mod common;

/// An `exsa rpc-server` child on a free loopback port, killed on drop.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> RpcServer {
        // A port that was free a moment ago (the server binds it itself).
        RpcServer::start_on(TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
    }

    fn start_on(port: u16) -> RpcServer {
        let child = Command::new(env!("CARGO_BIN_EXE_exsa"))
            .args(["--log", "error", "--threads", "1", "rpc-server", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("exsa rpc-server starts");
        let mut server = RpcServer { child, endpoint: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.listens() {
            assert!(Instant::now() < deadline, "rpc-server on {} did not listen", server.endpoint);
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Whether this server's child took its port. A connection alone does not say so: the port
    /// is in the ephemeral range, so a connect before the server binds can be given the port as
    /// its own source and connect to itself (TCP's simultaneous open), and a child that found
    /// the port taken has exited.
    fn listens(&mut self) -> bool {
        if let Some(status) = self.child.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = self.child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
            panic!("rpc-server on {} exited ({status}): {stderr}", self.endpoint);
        }
        match TcpStream::connect(&self.endpoint) {
            Ok(stream) => stream.local_addr().ok() != stream.peer_addr().ok(),
            Err(_) => false,
        }
    }

    /// Resident memory of the server process, in KiB (Linux).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl RpcServer {
    /// Ends the server the hard way: no goodbye on its sockets but what the kernel sends.
    fn kill(&mut self) {
        self.child.stderr = None; // its end is no news
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        // A server that ended before its test let it go says why (on the failing test's output).
        if let (Some(mut pipe), Ok(Some(status))) = (self.child.stderr.take(), self.child.try_wait()) {
            let mut stderr = String::new();
            let _ = pipe.read_to_string(&mut stderr);
            eprintln!("rpc-server on {} had exited ({status}): {stderr}", self.endpoint);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(rpc_servers: Vec<String>, n_gpu_layers: i32) -> EngineConfig {
    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig::default().n_ctx(512).n_threads(2).n_threads_batch(2);
    config.placement.rpc_servers = rpc_servers;
    config.placement.n_gpu_layers = n_gpu_layers;
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
    remote.placement.tensor_split = vec![1.0, 1.0];
    let engine = Engine::load(remote).expect("the model loads across the servers");
    let placement = engine.model_info().placement;
    for (server, before) in servers.iter().zip(&before) {
        let grown = server.rss_kib().saturating_sub(*before);
        assert!(grown > 4 * 1024, "rpc-server {} took only {grown} KiB of layers", server.endpoint);
        // `exsa info` shows the same: each server's model buffer, by endpoint.
        assert!(placement.iter().any(|l| l.contains(&server.endpoint) && l.contains("buffer size")), "{placement:?}");
    }
    assert!(placement.iter().any(|l| l.contains("offloaded 12/")), "{placement:?}");
    // A child process inherits none of the connections (they are close-on-exec): an inherited
    // one outlives the model and keeps the one-client rpc-server from serving anyone else.
    #[cfg(target_os = "linux")]
    {
        let fds = Command::new("ls").args(["-l", "/proc/self/fd"]).output().unwrap();
        let fds = String::from_utf8_lossy(&fds.stdout);
        assert!(!fds.contains("socket:"), "a child inherited sockets:\n{fds}");
    }
    let local = Engine::load(config(Vec::new(), 0)).unwrap();
    let prompt = "The history of the printing press begins";
    let want = harness::greedy_trace(&local, local.session_config(), prompt, 24).unwrap();
    let got = harness::greedy_trace(&engine, engine.session_config(), prompt, 24).unwrap();
    if let Some(k) = want.iter().zip(&got).position(|(a, b)| a.token != b.token) {
        assert!(want[k].margin < BATCH_NEAR_TIE, "parted at token {k} where the choice was clear: {:?} / {:?}", want[k], got[k]);
    }
    // Generation through the engine works end to end.
    let (text, stats) = engine.generate(&GenerateRequest::new(prompt).max_tokens(8).sampling(SamplingParams::greedy())).unwrap();
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

    // The CLI says the same and exits 1, whichever side of the command the option is on.
    let exsa = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_exsa")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let endpoint = format!("127.0.0.1:{port}");
    for args in [
        ["--log", "error", "--rpc", &endpoint, "generate", "hello", "--max-tokens", "2"],
        ["--log", "error", "generate", "hello", "--max-tokens", "2", "--rpc", &endpoint],
    ] {
        let (code, stderr) = exsa(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&endpoint), "{args:?}: {stderr}");
    }
    // On both sides, clap would keep one side's servers: refused (usage error, exit 2), as is
    // --tensor-split so.
    let (code, stderr) = exsa(&["--log", "error", "--rpc", &endpoint, "generate", "hello", "--rpc", "127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--rpc") && stderr.contains("before the command or every one after it"), "{stderr}");
    let (code, stderr) = exsa(&["--log", "error", "--tensor-split", "1,1", "generate", "hello", "--tensor-split", "2"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tensor-split"), "{stderr}");
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

#[test]
fn a_server_killed_mid_generation_is_an_error_not_an_abort() {
    if !supported() {
        return;
    }
    // (`supported` returned for the other backends; only `source` links the llama crate.)
    #[cfg(feature = "source")]
    assert!(llama::rpc::watched(), "this build's RPC client is unpatched (see llama-sys build/rpc_patch.rs)");
    let mut servers = [RpcServer::start(), RpcServer::start()];
    let mut remote = config(servers.iter().map(|s| s.endpoint.clone()).collect(), 12);
    remote.placement.tensor_split = vec![1.0, 1.0];
    let engine = Engine::load(remote).unwrap();
    let request = GenerateRequest::new("Once upon a time").max_tokens(200).sampling(SamplingParams::greedy());
    let mut session = engine.session().unwrap();
    let mut generation = session.generate(&request).unwrap();
    for _ in 0..4 {
        generation.next().expect("a token").expect("the servers are up");
    }
    let lost = servers[1].endpoint.clone();
    servers[1].kill();
    // The next decode finds the connection gone; at most one more may complete first, if its
    // reply was already on the way.
    let err = generation.by_ref().take(3).find_map(Result::err).expect("the generation fails once a server is gone");
    assert!(matches!(&err, EngineError::Rpc(m) if m.to_string().contains(&lost) && m.to_string().contains("lost")), "{err:?}");
    assert!(generation.next().is_none_or(|r| r.is_err()), "no token after the loss");
    drop(generation);
    drop(session);
    // Every later use of the model says the same, at once, instead of computing on zeros.
    let started = Instant::now();
    let again = engine.generate(&request.clone().max_tokens(4)).expect_err("the model lost its layers");
    assert!(matches!(&again, EngineError::Rpc(m) if m.to_string().contains(&lost)), "{again:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // The model frees cleanly (the live server gives its buffers back), and the process goes on.
    drop(engine);
    Engine::load(config(vec![servers[0].endpoint.clone()], 6)).expect("the surviving server still serves a new model");

    // The CLI: exit 1 with the lost endpoint named, not an abort (134) or a hang.
    let mut servers = [RpcServer::start(), RpcServer::start()];
    let endpoints = format!("{},{}", servers[0].endpoint, servers[1].endpoint);
    let mut child = Command::new(env!("CARGO_BIN_EXE_exsa"))
        .args(["--log", "error", "--rpc", &endpoints, "--gpu-layers", "12", "generate", "Once upon a time", "--max-tokens", "400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).expect("the CLI streams text before the server goes");
    let lost = servers[0].endpoint.clone();
    servers[0].kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "exsa generate hangs after losing {lost}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&lost) && stderr.contains("lost"), "{stderr}");
}

#[test]
fn exsa_serve_reports_a_lost_rpc_server_and_loads_the_model_again_once_it_is_back() {
    if !supported() {
        return;
    }
    let _turn = common::one_at_a_time();
    let mut servers = [RpcServer::start(), RpcServer::start()];
    let endpoints = format!("{},{}", servers[0].endpoint, servers[1].endpoint);
    let server = Server::start(&["--rpc", &endpoints, "--gpu-layers", "12", "--parallel", "2"]);
    let http = client();
    let chat = || {
        http.post(server.url("/v1/chat/completions"))
            .json(&json!({ "messages": [{ "role": "user", "content": "Say hello." }], "max_tokens": 8, "temperature": 0 }))
            .send()
            .unwrap()
    };
    let health = || {
        let r = http.get(server.url("/health")).send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    assert_eq!(chat().status().as_u16(), 200);

    let port: u16 = servers[1].endpoint.rsplit(':').next().unwrap().parse().unwrap();
    servers[1].kill();
    // The request that finds the server gone fails with a typed error, and the server lives on.
    let failed = chat();
    let status = failed.status().as_u16();
    let body: serde_json::Value = failed.json().unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "rpc_server_lost", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&servers[1].endpoint), "{body}");
    // /health takes the server out of a balancer's rotation while the model cannot be reloaded.
    let (status, said) = health();
    assert_eq!(status, 503, "{said}");
    assert!(said["status"] == "rpc_server_lost" || said["status"] == "model_unavailable", "{said}");
    let refused = chat();
    assert!(matches!(refused.status().as_u16(), 502 | 503), "{}", refused.status());

    // The rpc-server comes back on its port: the model loads again and serves.
    let _back = RpcServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while health().0 != 200 {
        assert!(Instant::now() < deadline, "the model was not loaded again: {}", health().1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = chat();
    assert_eq!(again.status().as_u16(), 200);
    let body: serde_json::Value = again.json().unwrap();
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap_or("").is_empty(), "{body}");
}
