//! The rpc-servers of a variant's run (`rpc = ["loopback", "HOST:PORT"]`): loopback entries are
//! `exsa rpc-server` processes of the variant's own binary, started for the run and stopped after
//! it, so that every run meets a fresh server as it meets a fresh process.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The endpoints to pass as `--rpc`, and the servers started for them (stopped on drop).
pub struct Servers {
    pub endpoints: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts one server per `"loopback"` entry of `specs` (with `threads` threads) and waits until
/// each listens; other entries are passed through.
pub fn start(binary: &Path, specs: &[String], threads: Option<u32>) -> Result<Servers> {
    let mut servers = Servers { endpoints: Vec::new(), children: Vec::new() };
    for spec in specs {
        if spec != "loopback" {
            servers.endpoints.push(spec.clone());
            continue;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new(binary);
        cmd.args(["--log", "error"]);
        if let Some(t) = threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        let child = cmd
            .args(["rpc-server", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} rpc-server", binary.display()))?;
        servers.children.push(child);
        let endpoint = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&endpoint).is_err() {
            if Instant::now() > deadline {
                bail!("the loopback rpc-server on {endpoint} did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        servers.endpoints.push(endpoint);
    }
    Ok(servers)
}
