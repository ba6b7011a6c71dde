//! What callers do with embeddings and reranker scores: [`l2_normalize`] (or another
//! [`EmbeddingNorm`]) before comparing vectors, [`RerankScore`], one document's answer from
//! [`crate::Engine::rerank`], and [`EmbedOptions`], what one embedding or rerank call may change.

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
    EmbeddingNorm::Euclidean.apply(v);
}

/// How an embedding is scaled before it is returned: llama-server's `embd_normalize` choices
/// (`-1`: [`EmbeddingNorm::Unscaled`], `0`: [`EmbeddingNorm::MaxAbs`], `1`: taxicab, `2`:
/// [`EmbeddingNorm::Euclidean`], `p > 2`: [`EmbeddingNorm::P`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmbeddingNorm {
    /// As llama.cpp pools it.
    Unscaled,
    /// Scaled so that the largest absolute value is 32760 (the range of an `i16`, for callers
    /// that store embeddings as 16-bit integers).
    MaxAbs,
    /// Length 1, so that the dot product of two is their cosine similarity ([`l2_normalize`]).
    Euclidean,
    /// Length 1 in the p-norm (`P(1)`: taxicab; `P(2)` is [`EmbeddingNorm::Euclidean`]).
    P(u32),
}

impl EmbeddingNorm {
    /// llama-server's `embd_normalize` number as a norm; None for a number it does not define
    /// (below -1).
    pub fn from_llama_server(n: i64) -> Option<EmbeddingNorm> {
        match n {
            -1 => Some(EmbeddingNorm::Unscaled),
            0 => Some(EmbeddingNorm::MaxAbs),
            2 => Some(EmbeddingNorm::Euclidean),
            p @ 1.. => u32::try_from(p).ok().map(EmbeddingNorm::P),
            _ => None,
        }
    }

    /// Scales `v` in place. A zero vector stays zero (never NaN).
    pub fn apply(self, v: &mut [f32]) {
        // Summed in f64: a wide embedding's squares lose precision in f32.
        let size = match self {
            EmbeddingNorm::Unscaled => return,
            EmbeddingNorm::MaxAbs => v.iter().fold(0.0_f64, |m, x| m.max(f64::from(x.abs()))) / 32760.0,
            EmbeddingNorm::Euclidean | EmbeddingNorm::P(2) => v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt(),
            EmbeddingNorm::P(p) => v.iter().map(|x| f64::from(x.abs()).powf(f64::from(p))).sum::<f64>().powf(1.0 / f64::from(p)),
        };
        if size > 0.0 && size.is_finite() {
            for x in v {
                *x = (f64::from(*x) / size) as f32;
            }
        }
    }
}

/// What one embedding or rerank call may change ([`crate::Engine::embed_many_with`],
/// [`crate::Engine::rerank_with`]); the default changes nothing.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct EmbedOptions {
    /// The scales of the engine's LoRA adapters ([`crate::EngineConfig::lora`], one per adapter,
    /// in order; 0.0 leaves one out) for this call. None: the session config's
    /// ([`crate::SessionConfig::lora_scales`]), else the adapters' configured scales.
    pub lora_scales: Option<Vec<f32>>,
}

impl EmbedOptions {
    /// Sets [`EmbedOptions::lora_scales`].
    #[must_use]
    pub fn lora_scales(mut self, lora_scales: impl Into<Vec<f32>>) -> Self {
        self.lora_scales = Some(lora_scales.into());
        self
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
    fn each_llama_server_norm_scales_as_common_embd_normalize_does() {
        let v = [3.0_f32, -4.0, 0.0];
        let scaled = |n: i64| {
            let mut v = v.to_vec();
            EmbeddingNorm::from_llama_server(n).unwrap().apply(&mut v);
            v
        };
        assert_eq!(scaled(-1), v);
        assert_eq!(scaled(0), [3.0 * 32760.0 / 4.0, -32760.0, 0.0]);
        assert_eq!(scaled(1), [3.0 / 7.0, -4.0 / 7.0, 0.0]);
        assert_eq!(scaled(2), [0.6, -0.8, 0.0]);
        let cubed = (27.0_f64 + 64.0).cbrt();
        let p3 = scaled(3);
        for (got, want) in p3.iter().zip([3.0 / cubed, -4.0 / cubed, 0.0]) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{p3:?}");
        }
        assert_eq!(EmbeddingNorm::from_llama_server(-2), None);
        assert_eq!(EmbeddingNorm::from_llama_server(2), Some(EmbeddingNorm::Euclidean));
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
