//! The generation loop allocates nothing per token on the Rust side: sampling, detokenizing,
//! stop-sequence checks and streaming through `Generation::next_text` reuse their buffers.
//! (llama.cpp's own C++ allocations are not counted: they do not go through Rust's allocator.)
//!
//! Its own test binary, with one test, because it replaces the global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use exsa_engine::*;

/// Counts allocations made on a thread that asked for counting.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed straight to the system allocator; counting touches only an
// atomic and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_generation_allocates_nothing_per_token() {
    let mut config = EngineConfig::new(default_model_path());
    config.session = SessionConfig::default().n_ctx(512).n_batch(512).n_ubatch(512).n_threads(2).n_threads_batch(2);
    let engine = Engine::load(config).expect("the default model: run `cargo xtask fetch-model`");
    let mut session = engine.session().unwrap();
    // A stop sequence that never appears keeps the matcher busy holding and releasing text.
    let request = GenerateRequest::new("Write a long story about a lighthouse keeper.")
        .max_tokens(96)
        .stop(["\n\n\n\n"])
        .sampling(SamplingParams::default().seed(3));
    let mut generation = session.generate(&request).unwrap();
    let mut text = String::with_capacity(1 << 16);
    let mut per_step = Vec::new();
    loop {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        COUNTING.with(|c| c.set(true));
        let delta = generation.next_text();
        COUNTING.with(|c| c.set(false));
        per_step.push(ALLOCATIONS.load(Ordering::Relaxed) - before);
        match delta {
            Some(delta) => text.push_str(delta.unwrap()),
            None => break,
        }
    }
    let stats = generation.stats().clone();
    assert!(stats.completion_tokens >= 48, "too short a generation to judge: {stats:?}");
    // The first steps may size the buffers; after that, nothing.
    let steady = &per_step[16..];
    assert!(steady.iter().all(|&n| n == 0), "allocations per step after warm-up: {steady:?}");
    assert!(!text.is_empty());
}
