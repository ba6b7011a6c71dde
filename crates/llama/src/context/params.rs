//! What a context is created with: sizes, threads, attention, cache types, pooling.

use crate::error::ContextError;
use crate::sys;

/// When to use Flash Attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashAttention {
    /// llama.cpp decides per device (its default).
    #[default]
    Auto,
    /// Always (fails at creation where unsupported).
    On,
    /// Never.
    Off,
}

/// The element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 32-bit floats.
    F32,
    #[default]
    /// 16-bit floats (llama.cpp's default).
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks (about half the memory of F16).
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
    /// 4-bit blocks with an offset.
    Q4_1,
    /// 4-bit non-linear blocks.
    Iq4Nl,
    /// 5-bit blocks.
    Q5_0,
    /// 5-bit blocks with an offset.
    Q5_1,
}

impl KvType {
    fn ggml(self) -> sys::ggml_type {
        match self {
            KvType::F32 => sys::GGML_TYPE_F32,
            KvType::F16 => sys::GGML_TYPE_F16,
            KvType::Bf16 => sys::GGML_TYPE_BF16,
            KvType::Q8_0 => sys::GGML_TYPE_Q8_0,
            KvType::Q4_0 => sys::GGML_TYPE_Q4_0,
            KvType::Q4_1 => sys::GGML_TYPE_Q4_1,
            KvType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
            KvType::Q5_0 => sys::GGML_TYPE_Q5_0,
            KvType::Q5_1 => sys::GGML_TYPE_Q5_1,
        }
    }

    /// Whether the type stores blocks of quantized values (every type but F32, F16 and Bf16).
    /// A quantized V cache needs flash attention.
    pub fn is_quantized(self) -> bool {
        !matches!(self, KvType::F32 | KvType::F16 | KvType::Bf16)
    }
}

/// How embeddings are pooled per sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooling {
    /// The model's own choice.
    #[default]
    Unspecified,
    /// No pooling: one embedding per token.
    None,
    /// Mean over the sequence's tokens.
    Mean,
    /// The first (CLS) token's.
    Cls,
    /// The last token's.
    Last,
    /// Reranking score.
    Rank,
}

/// Parameters for [`Context::new`](crate::Context::new). Zero sizes mean "the model's" where llama.cpp allows it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ContextParams {
    /// Context length in tokens; 0 = the model's training context.
    pub n_ctx: u32,
    /// Most tokens one `decode` call takes.
    pub n_batch: u32,
    /// Most tokens computed at once inside a decode.
    pub n_ubatch: u32,
    /// Distinct sequences the KV cache holds.
    pub n_seq_max: u32,
    /// One KV buffer shared by all sequences (each may then grow to n_ctx while others are
    /// short), instead of n_ctx / n_seq_max cells reserved for each.
    pub unified_kv: bool,
    /// Threads for single-token generation.
    pub n_threads: i32,
    /// Threads for prompt batches.
    pub n_threads_batch: i32,
    /// When to use Flash Attention.
    pub flash_attention: FlashAttention,
    /// Element type of the K cache.
    pub type_k: KvType,
    /// Element type of the V cache.
    pub type_v: KvType,
    /// Compute embeddings (as well as logits).
    pub embeddings: bool,
    /// How embeddings are pooled per sequence.
    pub pooling: Pooling,
    /// Skip llama.cpp's timing counters.
    pub no_perf: bool,
    /// Recurrent-state snapshots kept per sequence: a recurrent or hybrid model's memory can
    /// then drop up to this many of the tokens its last decode added (the rejected tail of a
    /// speculative draft, verified in one decode), like an attention cache. 0 (the default):
    /// a recurrent state cannot be cut back at all. A cut to before the last decode is refused
    /// (see [`Context::remove_range`](crate::Context::remove_range)). llama.cpp ignores the
    /// setting on architectures without support (LFM2 has it, Mamba not) and marks it
    /// experimental; each snapshot costs a copy of the state.
    pub recurrent_snapshots: u32,
}

impl Default for ContextParams {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
        ContextParams {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_seq_max: 1,
            unified_kv: false,
            n_threads: threads,
            n_threads_batch: threads,
            flash_attention: FlashAttention::Auto,
            type_k: KvType::F16,
            type_v: KvType::F16,
            embeddings: false,
            pooling: Pooling::Unspecified,
            no_perf: false,
            recurrent_snapshots: 0,
        }
    }
}

impl ContextParams {
    /// Sets [`ContextParams::n_ctx`].
    #[must_use]
    pub fn n_ctx(mut self, n_ctx: u32) -> Self {
        self.n_ctx = n_ctx;
        self
    }

    /// Sets [`ContextParams::n_batch`].
    #[must_use]
    pub fn n_batch(mut self, n_batch: u32) -> Self {
        self.n_batch = n_batch;
        self
    }

    /// Sets [`ContextParams::n_ubatch`].
    #[must_use]
    pub fn n_ubatch(mut self, n_ubatch: u32) -> Self {
        self.n_ubatch = n_ubatch;
        self
    }

    /// Sets [`ContextParams::n_seq_max`].
    #[must_use]
    pub fn n_seq_max(mut self, n_seq_max: u32) -> Self {
        self.n_seq_max = n_seq_max;
        self
    }

    /// Sets [`ContextParams::unified_kv`].
    #[must_use]
    pub fn unified_kv(mut self, unified_kv: bool) -> Self {
        self.unified_kv = unified_kv;
        self
    }

    /// Sets [`ContextParams::n_threads`].
    #[must_use]
    pub fn n_threads(mut self, n_threads: i32) -> Self {
        self.n_threads = n_threads;
        self
    }

    /// Sets [`ContextParams::n_threads_batch`].
    #[must_use]
    pub fn n_threads_batch(mut self, n_threads_batch: i32) -> Self {
        self.n_threads_batch = n_threads_batch;
        self
    }

    /// Sets [`ContextParams::flash_attention`].
    #[must_use]
    pub fn flash_attention(mut self, flash_attention: FlashAttention) -> Self {
        self.flash_attention = flash_attention;
        self
    }

    /// Sets [`ContextParams::type_k`].
    #[must_use]
    pub fn type_k(mut self, type_k: KvType) -> Self {
        self.type_k = type_k;
        self
    }

    /// Sets [`ContextParams::type_v`].
    #[must_use]
    pub fn type_v(mut self, type_v: KvType) -> Self {
        self.type_v = type_v;
        self
    }

    /// Sets [`ContextParams::embeddings`].
    #[must_use]
    pub fn embeddings(mut self, embeddings: bool) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// Sets [`ContextParams::pooling`].
    #[must_use]
    pub fn pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets [`ContextParams::no_perf`].
    #[must_use]
    pub fn no_perf(mut self, no_perf: bool) -> Self {
        self.no_perf = no_perf;
        self
    }

    /// Sets [`ContextParams::recurrent_snapshots`].
    #[must_use]
    pub fn recurrent_snapshots(mut self, recurrent_snapshots: u32) -> Self {
        self.recurrent_snapshots = recurrent_snapshots;
        self
    }

    pub(super) fn validate(&self) -> Result<(), ContextError> {
        let bad = |name, value: String, reason| Err(ContextError::InvalidParam { name, value, reason });
        if self.n_threads < 1 {
            return bad("n_threads", self.n_threads.to_string(), "at least one thread is needed");
        }
        if self.n_threads_batch < 1 {
            return bad("n_threads_batch", self.n_threads_batch.to_string(), "at least one thread is needed");
        }
        if self.n_batch < 1 {
            return bad("n_batch", self.n_batch.to_string(), "must be at least 1");
        }
        if self.n_ubatch < 1 || self.n_ubatch > self.n_batch {
            return bad("n_ubatch", self.n_ubatch.to_string(), "must be between 1 and n_batch");
        }
        if self.recurrent_snapshots > 0 && self.recurrent_snapshots.saturating_add(1) >= self.n_ubatch {
            // llama.cpp keeps a sequence's last snapshots+1 tokens in one micro-batch (it asserts so).
            return bad("recurrent_snapshots", self.recurrent_snapshots.to_string(), "must be below n_ubatch - 1");
        }
        if self.type_v.is_quantized() && self.flash_attention == FlashAttention::Off {
            return bad("type_v", format!("{:?}", self.type_v), "a quantized V cache needs flash attention (Auto or On)");
        }
        // SAFETY: a constant of the library.
        let max_seq = unsafe { sys::llama_max_parallel_sequences() } as u32;
        if self.n_seq_max < 1 || self.n_seq_max > max_seq {
            return bad("n_seq_max", self.n_seq_max.to_string(), "must be between 1 and llama_max_parallel_sequences()");
        }
        Ok(())
    }

    /// The pooling a context with these params applies on `model`: the params' own, or where
    /// they leave it unspecified, the model's (`<arch>.pooling_type`; none when the file does
    /// not say).
    pub(super) fn applied_pooling(&self, model: &crate::Model) -> Pooling {
        if self.pooling != Pooling::Unspecified {
            return self.pooling;
        }
        let declared = model.architecture().and_then(|arch| model.meta(&format!("{arch}.pooling_type")));
        match declared.and_then(|v| v.trim().parse::<i32>().ok()) {
            Some(1) => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            Some(4) => Pooling::Rank,
            _ => Pooling::None,
        }
    }

    /// Refuses the sizes on which llama.cpp (this pin) aborts while creating an embeddings
    /// context whose pooling averages tokens (mean; rank, whose classifier may average first):
    /// it reserves its worst-case micro-batch with the token count rounded up to a multiple of
    /// n_seq_max but the output count not, and the pooling's matrix product then has sides of
    /// different lengths (GGML_ASSERT in ggml_mul_mat, a process abort). `pooling` is the one
    /// that applies (the model's where these params leave it unspecified); the sizes follow
    /// `llama_context`'s constructor and `sched_reserve`.
    pub(super) fn check_pooled_reserve(&self, pooling: Pooling, causal: bool, n_ctx_train: u32) -> Result<(), ContextError> {
        if !self.embeddings || self.n_seq_max <= 1 || !matches!(pooling, Pooling::Mean | Pooling::Rank) {
            return Ok(());
        }
        let n_seq = self.n_seq_max;
        let pad = |n: u32| n.div_ceil(256).saturating_mul(256);
        let n_ctx = if self.n_ctx == 0 { n_ctx_train } else { self.n_ctx };
        let n_batch = if causal { n_ctx.min(self.n_batch) } else { self.n_batch };
        let n_ubatch = n_batch.min(self.n_ubatch);
        let cells = if self.unified_kv { pad(n_ctx) } else { pad(pad(n_ctx) / n_seq).saturating_mul(n_seq) };
        let reserved = cells.min(n_ubatch);
        if !reserved.is_multiple_of(n_seq) {
            return Err(ContextError::InvalidParam {
                name: "n_seq_max",
                value: format!("{n_seq} (with a worst-case micro-batch of {reserved} tokens)"),
                reason: "with mean or rank pooling, min(n_ctx, n_ubatch) must be a multiple of n_seq_max (llama.cpp aborts otherwise)",
            });
        }
        Ok(())
    }

    pub(super) fn to_raw(&self) -> sys::llama_context_params {
        // SAFETY: returns a struct by value.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = self.n_ctx;
        p.n_batch = self.n_batch;
        p.n_ubatch = self.n_ubatch;
        p.n_seq_max = self.n_seq_max;
        p.kv_unified = self.unified_kv;
        p.n_threads = self.n_threads;
        p.n_threads_batch = self.n_threads_batch;
        p.flash_attn_type = match self.flash_attention {
            FlashAttention::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttention::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttention::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        p.type_k = self.type_k.ggml();
        p.type_v = self.type_v.ggml();
        p.embeddings = self.embeddings;
        p.pooling_type = match self.pooling {
            Pooling::Unspecified => sys::LLAMA_POOLING_TYPE_UNSPECIFIED,
            Pooling::None => sys::LLAMA_POOLING_TYPE_NONE,
            Pooling::Mean => sys::LLAMA_POOLING_TYPE_MEAN,
            Pooling::Cls => sys::LLAMA_POOLING_TYPE_CLS,
            Pooling::Last => sys::LLAMA_POOLING_TYPE_LAST,
            Pooling::Rank => sys::LLAMA_POOLING_TYPE_RANK,
        };
        p.no_perf = self.no_perf;
        p.n_rs_seq = self.recurrent_snapshots;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each setter sets its own field (every field set to a value unlike its default).
    #[test]
    fn each_setter_sets_its_own_field() {
        let built = ContextParams::default()
            .n_ctx(1)
            .n_batch(2)
            .n_ubatch(3)
            .n_seq_max(4)
            .unified_kv(true)
            .n_threads(5)
            .n_threads_batch(6)
            .flash_attention(FlashAttention::On)
            .type_k(KvType::Q8_0)
            .type_v(KvType::Q4_0)
            .embeddings(true)
            .pooling(Pooling::Cls)
            .no_perf(true)
            .recurrent_snapshots(7);
        let literal = ContextParams {
            n_ctx: 1,
            n_batch: 2,
            n_ubatch: 3,
            n_seq_max: 4,
            unified_kv: true,
            n_threads: 5,
            n_threads_batch: 6,
            flash_attention: FlashAttention::On,
            type_k: KvType::Q8_0,
            type_v: KvType::Q4_0,
            embeddings: true,
            pooling: Pooling::Cls,
            no_perf: true,
            recurrent_snapshots: 7,
        };
        assert_eq!(built, literal);
    }

    fn pooled(n_ctx: u32, n_batch: u32, n_ubatch: u32, n_seq_max: u32, unified_kv: bool) -> ContextParams {
        ContextParams { n_ctx, n_batch, n_ubatch, n_seq_max, unified_kv, embeddings: true, ..ContextParams::default() }
    }

    #[test]
    fn pooled_contexts_whose_reserved_batch_llama_cpp_cannot_split_are_refused() {
        // The sizes that aborted: an encoder's context of one batch and 5 (or a decoder's of
        // 33) sequences, mean pooled.
        assert!(pooled(513, 512, 512, 5, true).check_pooled_reserve(Pooling::Mean, false, 512).is_err());
        assert!(pooled(513, 512, 512, 33, true).check_pooled_reserve(Pooling::Mean, true, 32768).is_err());
        assert!(pooled(513, 512, 512, 22, true).check_pooled_reserve(Pooling::Rank, true, 32768).is_err());
        // A divisor of the batch is fine, and so is any count where nothing averages.
        for n_seq in [1, 2, 4, 8, 16, 32, 64] {
            assert!(pooled(513, 512, 512, n_seq, true).check_pooled_reserve(Pooling::Mean, true, 32768).is_ok(), "{n_seq}");
        }
        for pooling in [Pooling::Cls, Pooling::Last, Pooling::None] {
            assert!(pooled(513, 512, 512, 5, true).check_pooled_reserve(pooling, false, 512).is_ok());
        }
        assert!(ContextParams { embeddings: false, ..pooled(513, 512, 512, 5, true) }.check_pooled_reserve(Pooling::Mean, true, 512).is_ok());
        // A context smaller than its micro-batch reserves the context's cells: per-sequence
        // streams make them a multiple of the sequences, one shared stream need not.
        assert!(pooled(300, 2048, 2048, 3, false).check_pooled_reserve(Pooling::Mean, false, 512).is_ok());
        assert!(pooled(300, 2048, 2048, 3, true).check_pooled_reserve(Pooling::Mean, false, 512).is_err());
        // n_ctx 0 is the model's training context.
        assert!(pooled(0, 600, 600, 3, true).check_pooled_reserve(Pooling::Mean, true, 301).is_err());
        assert!(pooled(0, 600, 600, 3, true).check_pooled_reserve(Pooling::Mean, true, 8192).is_ok());
    }
}
