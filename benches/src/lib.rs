//! Criterion micro-benchmarks live in `benches/steps.rs`; this crate only carries them and
//! forwards the backend feature (`source`, `crate` or `raw`) to the engine.
//!
//! `cargo xtask bench-compare --micro` runs them for A (the crate baseline) with
//! `--save-baseline`, then for B against it, so criterion prints the change.
