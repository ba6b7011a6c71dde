//! The machine a benchmark ran on, and its memory-read bandwidth: token generation reads every
//! weight once per token, so bandwidth / model size is the ceiling for tg.

use std::time::Instant;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub simd: Vec<String>,
    pub memory_bytes: u64,
    pub os: String,
    pub kernel: String,
    /// Best of several full reads of a 1 GiB buffer with every core, in GB/s.
    pub memory_read_gb_s: f64,
}

pub fn describe() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| cpuinfo.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string());
    let flags = field("flags").unwrap_or_default();
    let interesting = [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "neon",
        "sve",
    ];
    let simd = interesting.iter().filter(|f| flags.split_whitespace().any(|x| x == **f)).map(|s| s.to_string()).collect();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| l[12..].trim_matches('"').to_string()))
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    Machine {
        cpu: field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        simd,
        memory_bytes,
        os,
        kernel,
        memory_read_gb_s: memory_read_bandwidth(),
    }
}

/// Sums a 1 GiB buffer with one thread per core, five times, and keeps the best rate.
pub fn memory_read_bandwidth() -> f64 {
    const BYTES: usize = 1 << 30;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}
