//! A server started as a child process for a measurement or a comparison: a free port, and the
//! wait until its `/health` answers 200.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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

/// Starts `command`, a server `name` that listens on `port`, its stderr into the file `log`, and
/// waits until it is healthy: the child and its base URL. A server that exits first or is not
/// healthy within two minutes is an error naming the log (a slow one is killed).
pub fn start_healthy(command: &mut Command, name: &str, port: u16, log: &Path) -> Result<(Child, String)> {
    let stderr = std::fs::File::create(log)?;
    let mut child = command.stdout(Stdio::null()).stderr(stderr).spawn().with_context(|| format!("starting {name}"))?;
    let base = format!("http://127.0.0.1:{port}");
    let started = wait_healthy(&mut child, &base);
    if !matches!(started, Ok(Started::Healthy)) {
        // Not left running (or unreaped) behind an error.
        let _ = child.kill();
        let _ = child.wait();
    }
    match started? {
        Started::Healthy => Ok((child, base)),
        Started::Exited(status) => bail!("{name} exited ({status}) before it became healthy (log in {})", log.display()),
        Started::TimedOut => bail!("{name} did not become healthy within 120 s (log in {})", log.display()),
    }
}
