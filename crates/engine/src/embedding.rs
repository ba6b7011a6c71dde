//! What callers do with embeddings and reranker scores: [`l2_normalize`] before comparing
//! vectors, and [`RerankScore`], one document's answer from [`crate::Engine::rerank`].

/// Scales `v` to length 1 in place, so that the dot product of two normalised embeddings is
/// their cosine similarity. A zero vector stays zero (never NaN).
///
/// [`crate::Engine::embed`] and [`crate::Engine::embed_many`] return vectors as llama.cpp pools
/// them, not normalised: call this before comparing them by dot product, or before storing
/// them in an index that assumes unit vectors. The HTTP server's embeddings (OpenAI's
/// `/v1/embeddings`, Ollama's `/api/embed`) are normalised by this function.
///
/// ```
/// let mut v = vec![3.0, 4.0];
/// exsa_engine::l2_normalize(&mut v);
/// assert_eq!(v, [0.6, 0.8]);
/// ```
pub fn l2_normalize(v: &mut [f32]) {
    // Summed in f64: a wide embedding's squares lose precision in f32.
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// A reranker's answer for one document ([`crate::Engine::rerank`], which gives one per
/// document, in the documents' order).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct RerankScore {
    /// How relevant the document is to the query: the model's raw classification output
    /// (a logit; higher is more relevant). Comparable between documents of one query.
    pub score: f32,
    /// The length in tokens of the query-document pair's prompt that was scored.
    pub tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_normalize_gives_unit_length_and_keeps_direction() {
        let mut v = vec![1.0, -2.0, 2.0, 0.0];
        l2_normalize(&mut v);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "norm {norm}: {v:?}");
        assert_eq!(v, [1.0 / 3.0, -2.0 / 3.0, 2.0 / 3.0, 0.0]);
        // Already unit length: unchanged; tiny values: no underflow to zero (summed in f64).
        let mut unit = vec![0.6, 0.8];
        l2_normalize(&mut unit);
        assert_eq!(unit, [0.6, 0.8]);
        let mut tiny = vec![1e-30_f32, 0.0];
        l2_normalize(&mut tiny);
        assert_eq!(tiny, [1.0, 0.0]);
    }

    #[test]
    fn l2_normalize_leaves_a_zero_or_empty_vector_as_it_is() {
        let mut zero = vec![0.0_f32; 4];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0; 4]);
        let mut empty: Vec<f32> = Vec::new();
        l2_normalize(&mut empty);
        assert!(empty.is_empty());
    }
}
