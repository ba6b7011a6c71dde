//! The `k` most likely tokens, selected straight from a logits row.
//!
//! llama.cpp's `llama_sampler_sample` first writes a candidate for every token of the
//! vocabulary (262,144 of them, 3 MiB, for Gemma 3) and its top-k stage then partially sorts
//! that whole array. Here one pass over the row keeps a sorted buffer of the best `k` and builds
//! nothing else: most of the row is only compared against the current k-th best, a block of
//! values at a time, which the compiler turns into vector compares.

use crate::sys::llama_token_data;

/// Values compared per block before any of them is looked at one by one.
const BLOCK: usize = 64;

/// Fills `out` with the `k` highest logits of `logits` (as candidates with `p = 0`), sorted by
/// logit, highest first; equal logits keep the lower token id first, so `k = 1` is the first
/// maximum, as llama.cpp's greedy sampler picks it. NaN logits are never selected. `out` keeps its
/// allocation across calls.
///
/// The work is one compare per logit plus an insertion into the buffer for each logit that beats
/// the current k-th best, about `k · ln(n / k)` of them for a row in no particular order; `k`
/// should stay small (the sampler uses it up to [`MAX_K`]).
pub(crate) fn select(logits: &[f32], k: usize, out: &mut Vec<llama_token_data>) {
    out.clear();
    let k = k.min(logits.len());
    if k == 0 {
        return;
    }
    out.reserve(k);
    let mut next = 0;
    // Fill the buffer with the first k selectable values.
    while out.len() < k && next < logits.len() {
        let logit = logits[next];
        if !logit.is_nan() {
            insert(out, k, next, logit);
        }
        next += 1;
    }
    if out.len() < k {
        return;
    }
    let mut threshold = out[k - 1].logit;
    // Scalar up to a block boundary, then whole blocks.
    let head_end = next.next_multiple_of(BLOCK).min(logits.len());
    for (id, &logit) in logits.iter().enumerate().take(head_end).skip(next) {
        if logit > threshold {
            threshold = insert(out, k, id, logit);
        }
    }
    let mut start = head_end;
    for block in logits[head_end..].chunks(BLOCK) {
        // A branch-free OR over the block vectorises; most blocks stop here.
        if block.iter().fold(false, |any, &logit| any | (logit > threshold)) {
            for (offset, &logit) in block.iter().enumerate() {
                if logit > threshold {
                    threshold = insert(out, k, start + offset, logit);
                }
            }
        }
        start += block.len();
    }
}

/// The largest `k` worth selecting this way; above it llama.cpp's own bucket sort is used.
pub(crate) const MAX_K: usize = 256;

/// Inserts a non-NaN logit after every equal or higher one (ids only grow, so ties keep the
/// lower id first), dropping the lowest when the buffer is full; returns the new k-th best.
fn insert(out: &mut Vec<llama_token_data>, k: usize, id: usize, logit: f32) -> f32 {
    let at = out.partition_point(|c| c.logit >= logit);
    if out.len() == k {
        out.pop();
    }
    // Token ids fit in i32: the row is n_vocab long, and llama.cpp's n_vocab is an i32.
    out.insert(at, llama_token_data { id: id as i32, logit, p: 0.0 });
    out.last().map_or(f32::NEG_INFINITY, |c| c.logit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious way: sort every (logit, id), highest logit then lowest id first.
    fn reference(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
        let mut all: Vec<(i32, f32)> = logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as i32, l)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    fn selected(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
        let mut out = Vec::new();
        select(logits, k, &mut out);
        assert!(out.iter().all(|c| c.p == 0.0));
        out.iter().map(|c| (c.id, c.logit)).collect()
    }

    /// xorshift: reproducible rows without a dependency.
    fn row(n: usize, seed: u64, levels: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % levels) as f32 / 8.0 - 20.0
            })
            .collect()
    }

    #[test]
    fn matches_a_full_sort_on_random_rows_with_and_without_ties() {
        for (n, levels) in [(262_144, 1 << 20), (262_144, 64), (1000, 3), (63, 1 << 20), (65, 5), (129, 1 << 20)] {
            for seed in 1..4 {
                let logits = row(n, seed, levels);
                for k in [1, 2, 40, 64, 100, MAX_K] {
                    assert_eq!(selected(&logits, k), reference(&logits, k), "n={n} levels={levels} seed={seed} k={k}");
                }
            }
        }
    }

    #[test]
    fn rising_and_falling_rows_are_right_too() {
        let up: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let down: Vec<f32> = up.iter().rev().copied().collect();
        for k in [1, 7, 40] {
            assert_eq!(selected(&up, k), reference(&up, k));
            assert_eq!(selected(&down, k), reference(&down, k));
        }
    }

    #[test]
    fn greedy_is_the_first_maximum() {
        assert_eq!(selected(&[1.0, 3.0, 2.0, 3.0], 1), vec![(1, 3.0)]);
        assert_eq!(selected(&[f32::NEG_INFINITY; 4], 1), vec![(0, f32::NEG_INFINITY)]);
    }

    #[test]
    fn edge_sizes_and_nan_are_handled() {
        assert!(selected(&[], 5).is_empty());
        assert!(selected(&[1.0, 2.0], 0).is_empty());
        assert_eq!(selected(&[1.0, 2.0], 5), vec![(1, 2.0), (0, 1.0)]);
        assert_eq!(selected(&[f32::NAN, 1.0, f32::NAN, 0.5, 2.0], 2), vec![(4, 2.0), (1, 1.0)]);
        assert!(selected(&[f32::NAN; 3], 2).is_empty());
        let mut with_nan = row(10_000, 9, 1 << 20);
        with_nan[17] = f32::NAN;
        with_nan[9000] = f32::NAN;
        assert_eq!(selected(&with_nan, 40), reference(&with_nan, 40));
    }

    #[test]
    fn the_buffer_is_reused() {
        let logits = row(4096, 5, 1 << 20);
        let mut out = Vec::new();
        select(&logits, 40, &mut out);
        let capacity = out.capacity();
        let first = out.as_ptr();
        select(&logits, 40, &mut out);
        assert_eq!((out.capacity(), out.as_ptr()), (capacity, first));
    }
}
