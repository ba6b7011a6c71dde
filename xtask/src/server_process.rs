//! A server started as a child process for a measurement or a comparison: a free port, and the
//! wait until its `/health` answers 200.

use std::net::TcpListener;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Result;

/// A free port on 127.0.0.1 (free when asked; the server binds it next).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How waiting for a server ended.
pub enum Started {
    /// `/health` answered 200.
    Healthy,
    /// The process ended first.
    Exited(ExitStatus),
    /// Neither within two minutes.
    TimedOut,
}

/// Polls `base`'s `/health` until it answers 200, `child` ends, or two minutes pass.
pub fn wait_healthy(child: &mut Child, base: &str) -> Result<Started> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(Started::Exited(status));
        }
        if client.get(format!("{base}/health")).send().is_ok_and(|r| r.status().is_success()) {
            return Ok(Started::Healthy);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Started::TimedOut)
}
