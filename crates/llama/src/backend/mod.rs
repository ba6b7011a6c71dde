//! Process-wide initialisation, and llama.cpp's log routed into `tracing`.

mod cpu_variant;
pub mod modules;

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::LlamaMessages;
use crate::sys;

static INIT: OnceLock<()> = OnceLock::new();

/// Initialises llama.cpp's backends and installs the log bridge, once per process and from any
/// thread. Everything that touches llama.cpp calls it first, so callers never have to; calling
/// it again is free and never an error.
pub fn init() {
    INIT.get_or_init(|| {
        // SAFETY: the callback is a plain `extern "C" fn` that lives for the whole program and
        // never unwinds; a null user-data pointer is what it expects.
        unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        // SAFETY: one-time global initialisation, guarded by the OnceLock.
        unsafe { sys::llama_backend_init() };
        modules::load();
    });
}

/// How much of llama.cpp's log reaches `tracing`; lines below it are dropped before they are
/// formatted. `tracing`'s own filters apply on top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Everything, down to llama.cpp's debug lines.
    Debug = 1,
    /// Informational lines and above (model loading details).
    Info = 2,
    /// Warnings and errors (the default).
    Warn = 3,
    /// Errors only.
    Error = 4,
    /// Nothing.
    Off = 5,
}

// Default: warnings and errors. llama.cpp writes hundreds of info lines per model load.
static MIN_LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Warn as u8);

/// Sets the lowest llama.cpp log level forwarded to `tracing` (events target `llama_cpp`).
pub fn set_log_level(level: LogLevel) {
    MIN_LEVEL.store(level as u8, Ordering::Relaxed);
}

thread_local! {
    /// The line being assembled from llama.cpp's chunks, and its level.
    static PENDING: RefCell<(u32, String)> = const { RefCell::new((0, String::new())) };
    /// Open captures on this thread: warning and error lines are collected for error messages.
    static CAPTURES: RefCell<Vec<Captured>> = const { RefCell::new(Vec::new()) };
}

/// What one [`capture`] collects.
#[derive(Default)]
pub(crate) struct Captured {
    /// Warning and error lines.
    pub messages: Vec<String>,
    /// The loader's account of where weights went, at any level: which layers were offloaded,
    /// and each device's model buffer (`load_tensors: RPC0[host:port] model buffer size = ...`).
    pub placement: Vec<String>,
}

/// Runs `f` and returns, with its result, the warning and error lines llama.cpp logged on this
/// thread meanwhile: the reason behind a null pointer or a failure code.
pub(crate) fn capture<T>(f: impl FnOnce() -> T) -> (T, LlamaMessages) {
    let (out, captured) = capture_all(f);
    (out, LlamaMessages(captured.messages))
}

/// [`capture`], with the placement lines too.
pub(crate) fn capture_all<T>(f: impl FnOnce() -> T) -> (T, Captured) {
    CAPTURES.with_borrow_mut(|c| c.push(Captured::default()));
    let out = f();
    let captured = CAPTURES.with_borrow_mut(|c| c.pop().unwrap_or_default());
    (out, captured)
}

/// Whether a loader line says where weights went.
fn is_placement(line: &str) -> bool {
    line.starts_with("load_tensors:") && (line.contains("offloaded") || line.contains("buffer size"))
}

extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    // A panic must not unwind into C; a log line lost to a panic is the lesser harm.
    let _ = std::panic::catch_unwind(|| {
        if text.is_null() {
            return;
        }
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        on_log(level, &text);
    });
}

fn on_log(level: sys::ggml_log_level, text: &str) {
    PENDING.with_borrow_mut(|(pending_level, line)| {
        if level != sys::GGML_LOG_LEVEL_CONT {
            *pending_level = level;
        }
        line.push_str(text);
        while let Some(end) = line.find('\n') {
            let full: String = line.drain(..=end).collect();
            emit(*pending_level, full.trim_end());
        }
    });
}

fn emit(level: u32, line: &str) {
    if line.is_empty() {
        return;
    }
    let warning = level >= sys::GGML_LOG_LEVEL_WARN;
    let placement = is_placement(line);
    if warning || placement {
        CAPTURES.with_borrow_mut(|c| {
            if let Some(open) = c.last_mut() {
                if warning {
                    open.messages.push(line.to_string());
                }
                if placement {
                    open.placement.push(line.trim_start_matches("load_tensors:").trim().to_string());
                }
            }
        });
    }
    if level < u32::from(MIN_LEVEL.load(Ordering::Relaxed)) {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama_cpp", "{line}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama_cpp", "{line}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::info!(target: "llama_cpp", "{line}"),
        _ => tracing::debug!(target: "llama_cpp", "{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_lines_and_warnings_are_captured() {
        let ((), messages) = capture(|| {
            on_log(sys::GGML_LOG_LEVEL_ERROR, "failed to ");
            on_log(sys::GGML_LOG_LEVEL_CONT, "open file\nsecond");
            on_log(sys::GGML_LOG_LEVEL_CONT, " line\n");
            on_log(sys::GGML_LOG_LEVEL_INFO, "not captured\n");
        });
        assert_eq!(messages.0, vec!["failed to open file", "second line"]);
    }

    #[test]
    fn the_loaders_placement_lines_are_kept_at_any_level() {
        let ((), captured) = capture_all(|| {
            on_log(sys::GGML_LOG_LEVEL_INFO, "load_tensors: offloaded 12/19 layers to GPU\n");
            on_log(sys::GGML_LOG_LEVEL_INFO, "load_tensors: RPC0[127.0.0.1:50052] model buffer size =    20.50 MiB\n");
            on_log(sys::GGML_LOG_LEVEL_INFO, "load_tensors: loading model tensors, this can take a while\n");
            on_log(sys::GGML_LOG_LEVEL_DEBUG, "llama_model_loader: - type q4_K\n");
        });
        assert_eq!(captured.placement, ["offloaded 12/19 layers to GPU", "RPC0[127.0.0.1:50052] model buffer size =    20.50 MiB"]);
        assert!(captured.messages.is_empty());
    }
}
