//! A model split across processes with ggml's RPC backend: an rpc-server serves its machine's
//! devices (here: this machine's CPU, in a child process of this program on a loopback port),
//! and the engine loads the model with some of its layers placed on that server
//! (`Placement::rpc_servers`); the rest run here. Greedy output is a local run's (up to near
//! ties, which the measurement harness's trace tells apart: feature `bench`).
//!
//!     cargo run -p exsa-engine --example rpc [-- --model PATH] [--layers N]
//!
//! On a real network the server is `exsa rpc-server --host ADDR --port PORT` on the other
//! machine (the protocol has no authentication: keep it on a private network). The program
//! checks that the server took layers and that the text is the local one, and fails otherwise.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exsa_engine::harness::forced_trace;
use exsa_engine::serving::BATCH_NEAR_TIE;
use exsa_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams, Token};

const PROMPT: &str = "The history of the printing press begins";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // This program started as its own rpc-server: serve until killed.
    if let Some(endpoint) = take_flag(&mut args, "--serve")? {
        return Err(Engine::serve_rpc(&endpoint, None, 1).into());
    }
    let model = take_flag(&mut args, "--model")?.map_or_else(exsa_engine::default_model_path, PathBuf::from);
    // The default model has 18 layers (and its output layer): half of them go to the server.
    let layers: i32 = take_flag(&mut args, "--layers")?.map(|n| n.parse()).transpose()?.unwrap_or(9);
    if let Some(unknown) = args.first() {
        return Err(format!("unknown argument {unknown}; usage: rpc [--model PATH] [--layers N]").into());
    }

    let server = RpcServer::start()?;
    println!("rpc-server listening on {}", server.endpoint);
    let mut config = EngineConfig::new(&model);
    // Offloaded layers go to the local GPUs and the rpc-servers (by their free memory unless
    // `tensor_split` says otherwise); on a machine without GPUs, all to the server.
    config.placement.rpc_servers = vec![server.endpoint.clone()];
    config.placement.n_gpu_layers = layers;
    let split = Engine::load(config)?;
    // Where llama.cpp put the weights, as it logged it at load.
    let placement = split.model_info().placement;
    for line in &placement {
        println!("  {line}");
    }
    if !placement.iter().any(|line| line.contains(&server.endpoint) && line.contains("buffer size")) {
        return Err(format!("no weights on the rpc-server {}: {placement:?}", server.endpoint).into());
    }

    let local = Engine::load(EngineConfig::new(&model))?;
    let (split_text, split_tokens) = greedy(&split, "split")?;
    let (local_text, local_tokens) = greedy(&local, "local")?;
    // The server runs the same kernels, but the graph is cut in two and its parts computed
    // apart: float rounding can differ a little, and where the model's two best tokens are
    // within rounding of each other (`BATCH_NEAR_TIE`), the texts may part. Anywhere else a
    // difference is a bug.
    match split_tokens.iter().zip(&local_tokens).position(|(a, b)| a != b) {
        None if split_text == local_text => println!("the same text split and local"),
        None => return Err(format!("the split model wrote {split_text:?}, the local one {local_text:?}").into()),
        Some(k) => {
            // The local run's candidates at that step (its tokens decoded up to it), with how far
            // each was behind the top.
            let step = forced_trace(&local, local.session_config(), PROMPT, &local_tokens[..=k])?[k];
            match step.gap_to(split_tokens[k].0) {
                Some(gap) if gap < BATCH_NEAR_TIE => {
                    println!("parted at token {k}, a near tie: the split run's choice was {gap:.4} (logits) behind the local run's");
                }
                _ => return Err(format!("parted at token {k} where the choice was clear ({step:?}): {split_text:?} / {local_text:?}").into()),
            }
        }
    }
    Ok(())
}

/// A greedy continuation of [`PROMPT`]: its text and tokens.
fn greedy(engine: &Engine, name: &str) -> Result<(String, Vec<Token>), Box<dyn std::error::Error>> {
    let mut session = engine.session()?;
    let mut generation = session.generate(&GenerateRequest::new(PROMPT).max_tokens(16).sampling(SamplingParams::greedy()))?;
    let mut text = String::new();
    while let Some(delta) = generation.next_text() {
        text.push_str(delta?);
    }
    println!("{name}: {PROMPT}{text} ({:.1} tokens/s)", generation.stats().generation_tokens_per_s);
    Ok((text, generation.tokens().to_vec()))
}

/// Removes `--name VALUE` from `args` and returns the value.
fn take_flag(args: &mut Vec<String>, name: &str) -> Result<Option<String>, String> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(None) };
    args.remove(i);
    if i == args.len() {
        return Err(format!("{name} needs a value"));
    }
    Ok(Some(args.remove(i)))
}

/// This program as an rpc-server, in a child process on a free loopback port; killed on drop.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> Result<RpcServer, Box<dyn std::error::Error>> {
        // A port that was free a moment ago (the server binds it itself).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let endpoint = format!("127.0.0.1:{port}");
        let child = Command::new(std::env::current_exe()?).args(["--serve", &endpoint]).stdout(Stdio::null()).spawn()?;
        let mut server = RpcServer { child, endpoint };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.listens()? {
            if Instant::now() > deadline {
                return Err(format!("the rpc-server on {} did not listen within 30 s", server.endpoint).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Whether the server took its port. (A connection alone does not say so: a port of the
    /// ephemeral range can be given to the connecting socket itself, which then connects to
    /// itself.)
    fn listens(&mut self) -> Result<bool, Box<dyn std::error::Error>> {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!("the rpc-server on {} exited ({status})", self.endpoint).into());
        }
        Ok(TcpStream::connect(&self.endpoint).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok()))
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
