//! What this build of llama.cpp can do on this machine.

use std::ffi::CStr;

use crate::{backend, sys};

/// ggml's system-info line: the CPU features compiled in and found (e.g. `AVX2 = 1`).
pub fn system_info() -> String {
    backend::init();
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()) }.to_string_lossy().into_owned()
}

/// The kind of a backend device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU backend.
    Cpu,
    /// A discrete GPU (CUDA, Metal on a Mac with one, ...).
    Gpu,
    /// An integrated GPU (Apple silicon's, for one).
    IntegratedGpu,
    /// An accelerator (BLAS, AMX, ...).
    Accelerator,
    /// A kind this build does not name.
    Other,
}

/// A compute device registered with ggml (CPU, Metal, CUDA, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The backend's short name (e.g. "CPU", "CUDA0", "MTL0").
    pub name: String,
    /// What the backend says of the device (the CPU or GPU model).
    pub description: String,
    /// What kind of device it is.
    pub kind: DeviceKind,
    /// Free memory in bytes, as the backend reports it.
    pub memory_free: usize,
    /// Total memory in bytes.
    pub memory_total: usize,
}

/// Every device this build can use.
pub fn devices() -> Vec<Device> {
    backend::init();
    // SAFETY: registry queries; indices below the count are valid, strings are static.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .filter_map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                if dev.is_null() {
                    return None;
                }
                let text = |p: *const std::ffi::c_char| {
                    if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
                };
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                let kind = match sys::ggml_backend_dev_type(dev) {
                    sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                    sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
                    _ => DeviceKind::Other,
                };
                Some(Device {
                    name: text(sys::ggml_backend_dev_name(dev)),
                    description: text(sys::ggml_backend_dev_description(dev)),
                    kind,
                    memory_free: free,
                    memory_total: total,
                })
            })
            .collect()
    }
}

/// What the build supports: GPU offload, mmap, mlock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Layers can be offloaded to a GPU.
    pub gpu_offload: bool,
    /// Models can be memory-mapped.
    pub mmap: bool,
    /// Model memory can be locked in RAM.
    pub mlock: bool,
}

/// What this build and machine support.
pub fn capabilities() -> Capabilities {
    backend::init();
    // SAFETY: constant queries.
    unsafe { Capabilities { gpu_offload: sys::llama_supports_gpu_offload(), mmap: sys::llama_supports_mmap(), mlock: sys::llama_supports_mlock() } }
}
