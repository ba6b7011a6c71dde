//! ggml's RPC backend: model layers on other machines. An rpc-server ([`serve`]) offers its
//! devices (GPUs, else its CPU) over TCP; a model loaded with [`ModelParams::rpc_servers`]
//! places layers on them as it would on local GPUs (`n_gpu_layers`, `tensor_split`).
//!
//! The protocol has no authentication or encryption: an rpc-server runs whatever graph a client
//! sends, and reads and writes the memory it allocated for any client. Bind it to 127.0.0.1 (the
//! default of `exsa rpc-server`) or a private network, or reach it through an SSH tunnel.
//!
//! Failures: an endpoint that cannot be parsed, reached or greeted is a typed error
//! ([`RpcError`], or [`LoadErrorKind::Rpc`](crate::LoadErrorKind::Rpc) when loading), where ggml
//! itself would end the process. A server that goes away **after** the model loaded (it stopped,
//! crashed, or its host vanished: keepalive probes notice that in about 25 s) is
//! [`RpcError::Lost`]: from the decode that found it on, every decode of every context of that
//! model fails with [`DecodeError::Rpc`](crate::DecodeError::Rpc), and so does creating a context;
//! the model's remote tensors are gone, so load it again once the server is back. Upstream ggml
//! (protocol 7.0) aborts the process there instead, from the thread that talks to the server;
//! llama-sys patches that one spot of its client ([`watched`] says whether this build has the
//! patch: a build from another `LLAMA_CPP_DIR` tree may not).
//!
//! [`ModelParams::rpc_servers`]: crate::ModelParams::rpc_servers

use std::ffi::CString;
use std::path::Path;

use crate::{backend, sys};

/// The most devices one server may offer here.
const MAX_DEVICES_PER_SERVER: usize = 16;

/// How long a server may take to accept a connection before loading gives up on it (ggml itself
/// would wait for the system's connect timeout, about 2 minutes on Linux for a host that drops
/// packets).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub use crate::error::RpcError;

/// Whether this build has ggml's RPC backend.
pub fn available() -> bool {
    // SAFETY: reads a compile-time constant of the shim.
    unsafe { sys::exsa_rpc_available() }
}

/// Whether this build's RPC client reports a lost server as [`RpcError::Lost`]; without the
/// patch (a build from an unpinned tree), losing a server ends the process, as upstream.
pub fn watched() -> bool {
    // SAFETY: reads a compile-time constant of the shim.
    unsafe { sys::exsa_rpc_watched() }
}

/// A model's connection to one server, as numbered by the patched client: a server that comes
/// back gets a new connection, which does not revive a model loaded over the old one.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    endpoint: String,
    id: u64,
}

impl Connection {
    /// The connection to `endpoint` that a model loading over it now uses; None when the build
    /// does not watch connections.
    pub(crate) fn current(endpoint: &str) -> Option<Connection> {
        let c = CString::new(endpoint).ok()?;
        // SAFETY: a NUL-terminated string that outlives the call; the registry copies it.
        let id = unsafe { sys::exsa_rpc_connection(c.as_ptr()) };
        (id != 0).then(|| Connection { endpoint: endpoint.to_string(), id })
    }

    /// `Err(Lost)` once a reply on this connection has failed.
    pub(crate) fn check(&self) -> Result<(), RpcError> {
        // SAFETY: reads the registry under its lock.
        let lost = unsafe { sys::exsa_rpc_connection_lost(self.id) };
        if lost { Err(RpcError::Lost { endpoint: self.endpoint.clone() }) } else { Ok(()) }
    }
}

/// Checks `endpoint` is `HOST:PORT` (a bracketed IPv6 address passes, but ggml connects over
/// IPv4 only, so connecting to one is [`RpcError::Unreachable`]) before ggml sees it:
/// ggml ends the process on one it cannot parse.
pub fn check_endpoint(endpoint: &str) -> Result<(), RpcError> {
    let bad = || RpcError::BadEndpoint { endpoint: endpoint.to_string() };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty() && !host.chars().any(|c| c.is_whitespace() || c == '\0' || c == '/');
    if port_ok && host_ok { Ok(()) } else { Err(bad()) }
}

/// Connects to the rpc-server at `endpoint` and returns its devices (raw ggml handles, which
/// ggml keeps for the rest of the process). Connecting twice to one endpoint gives the same
/// devices.
pub(crate) fn connect(endpoint: &str) -> Result<Vec<sys::ggml_backend_dev_t>, RpcError> {
    backend::init();
    check_endpoint(endpoint)?;
    if !available() {
        return Err(RpcError::Unavailable);
    }
    let c = CString::new(endpoint).map_err(|_| RpcError::BadEndpoint { endpoint: endpoint.to_string() })?;
    reachable(endpoint)?;
    let mut devices: Vec<sys::ggml_backend_dev_t> = vec![std::ptr::null_mut(); MAX_DEVICES_PER_SERVER];
    let mut n = 0usize;
    let add = |err| {
        // SAFETY: the endpoint is NUL-terminated and outlives the call; `devices` has room for
        // MAX_DEVICES_PER_SERVER entries and `n` says how many were written. ggml's fatal errors
        // on this thread come back as an exception the guard catches.
        unsafe { sys::exsa_rpc_add_server(c.as_ptr(), devices.as_mut_ptr(), devices.len(), &mut n, err) }
    };
    let (result, _) = backend::capture(|| crate::cpp::guard("ggml_backend_rpc_add_server", add));
    result.map_err(|e| RpcError::Ggml { endpoint: endpoint.to_string(), message: ggml_message(&e.what) })?;
    devices.truncate(n);
    Ok(devices)
}

/// Connects once with [`CONNECT_TIMEOUT`] and hangs up (the server goes back to waiting).
fn reachable(endpoint: &str) -> Result<(), RpcError> {
    use std::net::{TcpStream, ToSocketAddrs};
    let unreachable = |reason: String| RpcError::Unreachable { endpoint: endpoint.to_string(), reason };
    // ggml connects over IPv4 to the host's first address; so does this.
    let mut addrs = endpoint.to_socket_addrs().map_err(|e| unreachable(e.to_string()))?;
    let addr = addrs.find(std::net::SocketAddr::is_ipv4).ok_or_else(|| unreachable("the host has no IPv4 address".into()))?;
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(unreachable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Serves this process's devices on `endpoint` (GPUs where the build has them, else the CPU with
/// `threads` threads) until the process ends; `cache_dir` keeps tensors clients sent, by hash,
/// so a restarted client sends them again only when they changed. Returns only on failure.
pub fn serve(endpoint: &str, cache_dir: Option<&Path>, threads: usize) -> Result<std::convert::Infallible, RpcError> {
    backend::init();
    check_endpoint(endpoint)?;
    if !available() {
        return Err(RpcError::Unavailable);
    }
    let c = CString::new(endpoint).map_err(|_| RpcError::BadEndpoint { endpoint: endpoint.to_string() })?;
    let cache = match cache_dir {
        Some(dir) => Some(CString::new(dir.to_string_lossy().into_owned()).map_err(|_| RpcError::BadCacheDir(dir.display().to_string()))?),
        None => None,
    };
    let cache_ptr = cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: both strings are NUL-terminated and outlive the call (which serves until the
    // process ends, or returns on failure); ggml's fatal errors come back as an exception.
    let result = crate::cpp::guard("ggml_backend_rpc_start_server", |err| unsafe { sys::exsa_rpc_start_server(c.as_ptr(), cache_ptr, threads, err) });
    let message = match result {
        Err(e) => ggml_message(&e.what),
        Ok(()) => "the server stopped".to_string(),
    };
    Err(RpcError::Ggml { endpoint: endpoint.to_string(), message })
}

/// ggml's message without its source location (`ggml-rpc.cpp:547: Failed to connect ...`).
fn ggml_message(what: &str) -> String {
    let text = what.trim();
    match text.split_once(": ") {
        Some((location, rest)) if location.contains(".c") && location.rsplit(':').next().is_some_and(|l| l.parse::<u32>().is_ok()) => {
            rest.trim().to_string()
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_and_port() {
        for ok in ["127.0.0.1:50052", "localhost:1", "[::1]:50052", "gpu-box.lan:65535"] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in ["", "127.0.0.1", ":50052", "host:0", "host:65536", "host:port", "a b:1", "http://h:1"] {
            assert!(matches!(check_endpoint(bad), Err(RpcError::BadEndpoint { .. })), "{bad}");
        }
    }

    #[test]
    fn ggml_locations_are_cut_from_messages() {
        assert_eq!(ggml_message("/src/ggml-rpc.cpp:547: Failed to connect to h:1\n"), "Failed to connect to h:1");
        assert_eq!(ggml_message("no device to serve"), "no device to serve");
    }
}
