//! An inference context over a [`Model`]: the KV cache, decoding, and the outputs of the last
//! decode.

use std::ffi::{CString, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::batch::Batch;
use crate::error::{ContextError, DecodeError, LoraError, OutputError, StateError};
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::vocab::Token;
use crate::{backend, sys};

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
    /// 8-bit blocks (half the memory of F16).
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
}

impl KvType {
    fn ggml(self) -> sys::ggml_type {
        match self {
            KvType::F32 => sys::GGML_TYPE_F32,
            KvType::F16 => sys::GGML_TYPE_F16,
            KvType::Bf16 => sys::GGML_TYPE_BF16,
            KvType::Q8_0 => sys::GGML_TYPE_Q8_0,
            KvType::Q4_0 => sys::GGML_TYPE_Q4_0,
        }
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

/// Parameters for [`Context::new`]. Zero sizes mean "the model's" where llama.cpp allows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextParams {
    /// Context length in tokens; 0 = the model's training context.
    pub n_ctx: u32,
    /// Most tokens one `decode` call takes.
    pub n_batch: u32,
    /// Most tokens computed at once inside a decode.
    pub n_ubatch: u32,
    /// Distinct sequences the KV cache holds.
    pub n_seq_max: u32,
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
}

impl Default for ContextParams {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
        ContextParams {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_seq_max: 1,
            n_threads: threads,
            n_threads_batch: threads,
            flash_attention: FlashAttention::Auto,
            type_k: KvType::F16,
            type_v: KvType::F16,
            embeddings: false,
            pooling: Pooling::Unspecified,
            no_perf: false,
        }
    }
}

impl ContextParams {
    fn validate(&self) -> Result<(), ContextError> {
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
        // SAFETY: a constant of the library.
        let max_seq = unsafe { sys::llama_max_parallel_sequences() } as u32;
        if self.n_seq_max < 1 || self.n_seq_max > max_seq {
            return bad("n_seq_max", self.n_seq_max.to_string(), "must be between 1 and llama_max_parallel_sequences()");
        }
        Ok(())
    }

    fn to_raw(&self) -> sys::llama_context_params {
        // SAFETY: returns a struct by value.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = self.n_ctx;
        p.n_batch = self.n_batch;
        p.n_ubatch = self.n_ubatch;
        p.n_seq_max = self.n_seq_max;
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
        p
    }
}

/// llama.cpp's timing counters for a context.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerfCounters {
    /// Time spent loading the model, ms.
    pub load_ms: f64,
    /// Time spent on prompt batches, ms.
    pub prompt_ms: f64,
    /// Time spent on single-token generation, ms.
    pub eval_ms: f64,
    /// Prompt tokens decoded.
    pub n_prompt_tokens: i32,
    /// Generated tokens decoded (llama.cpp reports at least 1).
    pub n_eval_tokens: i32,
    /// Times a compute graph was reused instead of rebuilt.
    pub n_graph_reused: i32,
}

/// A context: KV cache and compute state over a model it borrows, so it cannot outlive it.
#[derive(Debug)]
pub struct Context<'m> {
    raw: NonNull<sys::llama_context>,
    model: &'m Model,
    n_ctx_seq: u32,
    n_batch: u32,
    n_ubatch: u32,
    /// False for models that attend both ways: their batches must fit one micro-batch.
    causal: bool,
    /// Whether all sequences share one KV stream; else each has its own, and llama.cpp copies
    /// between streams whole sequences only.
    unified_kv: bool,
    n_seq_max: u32,
    n_vocab: i32,
    embeddings: bool,
    /// Batch indices that requested an output in the last successful decode.
    outputs: Vec<i32>,
    abort_flag: Option<Arc<AtomicBool>>,
    /// The adapters applied with [`Context::set_lora_adapters`]: llama.cpp keeps their pointers,
    /// so the context keeps them alive.
    lora: Vec<LoraAdapter<'m>>,
}

// SAFETY: a llama_context may move between threads; it is never used from two at once because
// every method that reaches llama.cpp takes &mut self, or &self on a type that is not Sync.
unsafe impl Send for Context<'_> {}

impl<'m> Context<'m> {
    /// Creates a context over `model`; parameters are checked first, and a vocab-only model is refused.
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Context<'m>, ContextError> {
        backend::init();
        if model.is_vocab_only() {
            return Err(ContextError::VocabOnly);
        }
        params.validate()?;
        let _adapters = model.adapters_read();
        let raw_params = params.to_raw();
        // SAFETY: the model is alive for 'm, which this context cannot outlive; its adapter set,
        // which sizing the graph reads, is not written meanwhile (read lock).
        let (raw, messages) = backend::capture(|| unsafe { sys::llama_init_from_model(model.as_ptr(), raw_params) });
        let raw = NonNull::new(raw).ok_or(ContextError::Llama(messages))?;
        // SAFETY: reads fields of the context just created.
        let (n_ctx_seq, n_batch, n_ubatch, n_seq_max) = unsafe {
            (
                sys::llama_n_ctx_seq(raw.as_ptr()),
                sys::llama_n_batch(raw.as_ptr()),
                sys::llama_n_ubatch(raw.as_ptr()),
                sys::llama_n_seq_max(raw.as_ptr()),
            )
        };
        Ok(Context {
            raw,
            model,
            n_ctx_seq,
            n_batch,
            n_ubatch,
            causal: model.is_causal(),
            unified_kv: raw_params.kv_unified,
            n_seq_max,
            n_vocab: model.vocab().n_tokens(),
            embeddings: params.embeddings,
            outputs: Vec::new(),
            abort_flag: None,
            lora: Vec::new(),
        })
    }

    /// The raw handle, for calls this crate does not wrap. It stays owned by the context.
    pub fn as_ptr(&self) -> *mut sys::llama_context {
        self.raw.as_ptr()
    }

    /// The model the context runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Context length per sequence.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx_seq
    }

    /// Most tokens one `decode` takes.
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Most tokens computed at once; an encoder's batch, and the batch of a model that attends
    /// both ways, must fit in it.
    pub fn n_ubatch(&self) -> u32 {
        self.n_ubatch
    }

    /// Sequences the KV cache holds.
    pub fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    /// Batch indices with outputs from the last decode.
    pub fn outputs(&self) -> &[i32] {
        &self.outputs
    }

    /// `whole` says the batch must fit one micro-batch (llama.cpp asserts, aborting, otherwise).
    fn check_batch(&self, batch: &Batch, whole: Option<&'static str>) -> Result<(), DecodeError> {
        if batch.is_empty() {
            return Err(DecodeError::EmptyBatch);
        }
        if batch.len() > self.n_batch as usize {
            return Err(DecodeError::BatchTooLarge { n_tokens: batch.len(), n_batch: self.n_batch });
        }
        if let Some(why) = whole.filter(|_| batch.len() > self.n_ubatch as usize) {
            return Err(DecodeError::ExceedsUbatch { n_tokens: batch.len(), n_ubatch: self.n_ubatch, why });
        }
        for (index, (token, pos, seq_ids, _)) in batch.entries().enumerate() {
            if !(0..self.n_vocab).contains(&token.0) {
                return Err(DecodeError::TokenOutOfRange { index, token, n_vocab: self.n_vocab });
            }
            if pos as u32 >= self.n_ctx_seq {
                return Err(DecodeError::PositionOutOfRange { index, pos, n_ctx: self.n_ctx_seq });
            }
            if let Some(&seq_id) = seq_ids.iter().find(|&&s| s as u32 >= self.n_seq_max) {
                return Err(DecodeError::SeqIdOutOfRange { index, seq_id, n_seq_max: self.n_seq_max });
            }
        }
        Ok(())
    }

    /// Runs the model on `batch`. Every token, position and sequence id is checked against
    /// this context first; llama.cpp's codes come back as [`DecodeError`] variants.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), DecodeError> {
        let whole = (!self.causal).then_some("the model attends both ways (not causal)");
        self.run(batch, whole, "llama_decode", |ctx, raw, code, err| {
            // SAFETY: the batch was validated against this context and stays alive (borrowed)
            // for the call; `code` and `err` are live out-parameters.
            unsafe { sys::exsa_decode(ctx, raw, code, err) }
        })
    }

    /// Runs the encoder of an encoder-decoder model on `batch`.
    pub fn encode(&mut self, batch: &Batch) -> Result<(), DecodeError> {
        self.run(batch, Some("an encoder takes the whole batch at once"), "llama_encode", |ctx, raw, code, err| {
            // SAFETY: as for decode.
            unsafe { sys::exsa_encode(ctx, raw, code, err) }
        })
    }

    fn run(
        &mut self,
        batch: &Batch,
        whole: Option<&'static str>,
        function: &'static str,
        call: impl FnOnce(*mut sys::llama_context, sys::llama_batch, *mut i32, *mut sys::exsa_error) -> i32,
    ) -> Result<(), DecodeError> {
        self.check_batch(batch, whole)?;
        self.outputs.clear();
        let mut code = 0;
        // Graph building reads the model's adapter set: no adapter may be loaded or freed meanwhile.
        let _adapters = self.model.adapters_read();
        let (guarded, messages) = backend::capture(|| crate::cpp::guard(function, |err| call(self.raw.as_ptr(), batch.raw(), &mut code, err)));
        guarded?;
        match code {
            0 => {
                self.outputs.extend(batch.entries().enumerate().filter(|(_, e)| e.3).map(|(i, _)| i as i32));
                Ok(())
            }
            1 => Err(DecodeError::NoKvSlot),
            2 => Err(DecodeError::Aborted),
            code => Err(DecodeError::Rejected { code, messages }),
        }
    }

    fn check_output(&self, index: i32) -> Result<(), OutputError> {
        if self.outputs.is_empty() {
            return Err(OutputError::NoOutputs);
        }
        if !self.outputs.contains(&index) {
            return Err(OutputError::NotAnOutput { index, outputs: self.outputs.clone() });
        }
        Ok(())
    }

    /// The logits (n_vocab wide) of batch entry `index` of the last decode. Borrowing `self`
    /// keeps the slice from outliving the next decode, which overwrites it.
    pub fn logits(&self, index: i32) -> Result<&[f32], OutputError> {
        self.check_output(index)?;
        // SAFETY: index is an output of the last decode, so llama.cpp has a row for it.
        let ptr = unsafe { sys::llama_get_logits_ith(self.raw.as_ptr(), index) };
        if ptr.is_null() {
            return Err(OutputError::Missing { index });
        }
        // SAFETY: llama.cpp's logits rows are n_vocab floats, valid until the next decode,
        // which needs &mut self.
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.n_vocab as usize) })
    }

    /// The logits of the last output of the last decode.
    pub fn last_logits(&self) -> Result<&[f32], OutputError> {
        let last = *self.outputs.last().ok_or(OutputError::NoOutputs)?;
        self.logits(last)
    }

    /// The embedding ([`Model::n_embd_out`] wide) of batch entry `index`; needs `embeddings: true`.
    pub fn embeddings(&self, index: i32) -> Result<&[f32], OutputError> {
        if !self.embeddings {
            return Err(OutputError::EmbeddingsDisabled);
        }
        self.check_output(index)?;
        // SAFETY: as for logits.
        let ptr = unsafe { sys::llama_get_embeddings_ith(self.raw.as_ptr(), index) };
        if ptr.is_null() {
            return Err(OutputError::Missing { index });
        }
        // SAFETY: llama.cpp writes n_embd_out floats per output row (not n_embd: models with an
        // output projection differ), valid until the next decode, which needs &mut self.
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.model.n_embd_out()) })
    }

    /// The pooled embedding of a whole sequence (pooling other than None): [`Model::n_embd_out`]
    /// floats, or [`Model::n_cls_out`] scores for rank pooling (rerankers).
    pub fn sequence_embeddings(&self, seq_id: i32) -> Result<&[f32], OutputError> {
        if !self.embeddings {
            return Err(OutputError::EmbeddingsDisabled);
        }
        // SAFETY: returns null for a sequence without pooled embeddings.
        let ptr = unsafe { sys::llama_get_embeddings_seq(self.raw.as_ptr(), seq_id) };
        if ptr.is_null() {
            return Err(OutputError::Missing { index: seq_id });
        }
        // SAFETY: reads a field of the live context.
        let pooling = unsafe { sys::llama_pooling_type(self.raw.as_ptr()) };
        let width = if pooling == sys::LLAMA_POOLING_TYPE_RANK { self.model.n_cls_out() } else { self.model.n_embd_out() };
        // SAFETY: llama.cpp's pooled rows are n_embd_out floats, n_cls_out for rank pooling;
        // valid until the next decode, which needs &mut self.
        Ok(unsafe { std::slice::from_raw_parts(ptr, width) })
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: the memory belongs to the live context.
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    fn check_seq(&self, seq_id: i32, any_allowed: bool) -> Result<(), ContextError> {
        if (any_allowed && seq_id == -1) || (0..self.n_seq_max as i32).contains(&seq_id) {
            Ok(())
        } else {
            Err(ContextError::InvalidParam { name: "seq_id", value: seq_id.to_string(), reason: "not a sequence of this context" })
        }
    }

    /// Empties the KV cache (and its buffers too, with `data`).
    pub fn clear_memory(&mut self, data: bool) {
        // SAFETY: valid memory handle of this context.
        unsafe { sys::llama_memory_clear(self.memory(), data) };
        self.outputs.clear();
    }

    /// Removes positions `[p0, p1)` of `seq_id` (-1: every sequence; negative bounds: open).
    /// False when a partial range cannot be removed (recurrent models).
    pub fn remove_range(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool, ContextError> {
        self.check_seq(seq_id, true)?;
        // SAFETY: checked sequence id; llama.cpp accepts any bounds.
        Ok(unsafe { sys::llama_memory_seq_rm(self.memory(), seq_id, p0, p1) })
    }

    /// Copies positions `[p0, p1)` of sequence `src` to sequence `dst`. Where each sequence
    /// has its own KV stream (several sequences, the default non-unified cache), llama.cpp
    /// copies whole sequences only (`p0 <= 0`, `p1 <= 0`); a part is refused, where llama.cpp
    /// would abort.
    pub fn copy_range(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<(), ContextError> {
        self.check_seq(src, false)?;
        self.check_seq(dst, false)?;
        let cross_stream = src != dst && !self.unified_kv && self.n_seq_max > 1;
        if cross_stream && (p0 > 0 || p1 > 0) {
            return Err(ContextError::InvalidParam {
                name: "p0/p1",
                value: format!("[{p0}, {p1})"),
                reason: "sequences in separate KV streams are copied whole (p0 <= 0 and p1 <= 0)",
            });
        }
        // SAFETY: both ids checked.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) };
        Ok(())
    }

    /// Removes every sequence but `seq_id`.
    pub fn keep_only(&mut self, seq_id: i32) -> Result<(), ContextError> {
        self.check_seq(seq_id, false)?;
        // llama_memory_seq_keep only looks at the KV stream of `seq_id`: with one stream per
        // sequence (kv_unified off, the default) the others survive it. Removing each other
        // sequence does what the name says in both layouts.
        // SAFETY: checked id, and every other id below n_seq_max.
        unsafe {
            sys::llama_memory_seq_keep(self.memory(), seq_id);
            for other in (0..self.n_seq_max as i32).filter(|&s| s != seq_id) {
                sys::llama_memory_seq_rm(self.memory(), other, -1, -1);
            }
        }
        Ok(())
    }

    /// Adds `delta` to the positions `[p0, p1)` of `seq_id` (a context shift).
    /// Refused with [`ContextError::CannotShift`] where the memory cannot shift positions
    /// (M-RoPE models, some recurrent ones), on which llama.cpp aborts.
    pub fn shift_range(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<(), ContextError> {
        self.check_seq(seq_id, false)?;
        if !self.can_shift() {
            return Err(ContextError::CannotShift);
        }
        // SAFETY: checked id.
        unsafe { sys::llama_memory_seq_add(self.memory(), seq_id, p0, p1, delta) };
        Ok(())
    }

    /// Whether [`Context::shift_range`] can move positions in this context's memory.
    pub fn can_shift(&self) -> bool {
        // SAFETY: valid memory handle of this context.
        unsafe { sys::llama_memory_can_shift(self.memory()) }
    }

    /// The largest position held for `seq_id`, or None when it is empty.
    pub fn max_position(&self, seq_id: i32) -> Result<Option<i32>, ContextError> {
        self.check_seq(seq_id, false)?;
        // SAFETY: checked id.
        let p = unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq_id) };
        Ok((p >= 0).then_some(p))
    }

    /// The whole state (KV cache, outputs, RNG) as bytes.
    pub fn save_state(&mut self) -> Result<Vec<u8>, StateError> {
        // SAFETY: size query on a live context.
        let size = unsafe { sys::llama_state_get_size(self.raw.as_ptr()) };
        if size == 0 {
            return Err(StateError::Empty);
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes.
        let written = unsafe { sys::llama_state_get_data(self.raw.as_ptr(), buf.as_mut_ptr(), size) };
        if written != size {
            return Err(StateError::SizeMismatch { written, expected: size });
        }
        Ok(buf)
    }

    /// Restores a state from [`Context::save_state`].
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        self.outputs.clear();
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: state is readable for its length; llama.cpp validates the content; `read` is a
            // live out-parameter.
            crate::cpp::guard("llama_state_set_data", |err| unsafe {
                sys::exsa_state_set_data(self.raw.as_ptr(), state.as_ptr(), state.len(), &mut read, err)
            })
        });
        guarded?;
        if read == 0 {
            return Err(StateError::Restore { len: state.len(), messages });
        }
        if read != state.len() {
            return Err(StateError::TrailingBytes { len: state.len(), read });
        }
        Ok(())
    }

    fn check_state_seq(&self, seq_id: i32) -> Result<(), StateError> {
        self.check_seq(seq_id, false).map_err(|_| StateError::InvalidSeqId { seq_id, n_seq_max: self.n_seq_max })
    }

    /// One sequence's state as bytes.
    pub fn save_sequence_state(&mut self, seq_id: i32) -> Result<Vec<u8>, StateError> {
        self.check_state_seq(seq_id)?;
        // SAFETY: checked id.
        let size = unsafe { sys::llama_state_seq_get_size(self.raw.as_ptr(), seq_id) };
        if size == 0 {
            return Err(StateError::Empty);
        }
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes.
        let written = unsafe { sys::llama_state_seq_get_data(self.raw.as_ptr(), buf.as_mut_ptr(), size, seq_id) };
        if written != size {
            return Err(StateError::SizeMismatch { written, expected: size });
        }
        Ok(buf)
    }

    /// Restores one sequence's state into `dest_seq_id`.
    pub fn load_sequence_state(&mut self, state: &[u8], dest_seq_id: i32) -> Result<(), StateError> {
        self.check_state_seq(dest_seq_id)?;
        self.outputs.clear();
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: state readable for its length; id checked; `read` is a live out-parameter.
            crate::cpp::guard("llama_state_seq_set_data", |err| unsafe {
                sys::exsa_state_seq_set_data(self.raw.as_ptr(), state.as_ptr(), state.len(), dest_seq_id, &mut read, err)
            })
        });
        guarded?;
        if read == 0 {
            return Err(StateError::Restore { len: state.len(), messages });
        }
        if read != state.len() {
            return Err(StateError::TrailingBytes { len: state.len(), read });
        }
        Ok(())
    }

    /// Saves the whole state and the `tokens` it holds to a file.
    pub fn save_state_file(&mut self, path: &Path, tokens: &[Token]) -> Result<(), StateError> {
        let c_path = c_path(path)?;
        // SAFETY: path NUL-terminated; tokens readable; Token is repr(transparent).
        let ok = unsafe { sys::llama_state_save_file(self.raw.as_ptr(), c_path.as_ptr(), tokens.as_ptr().cast(), tokens.len()) };
        if ok { Ok(()) } else { Err(StateError::Save { path: path.to_path_buf() }) }
    }

    /// Loads a state file; returns the tokens saved with it (at most `max_tokens`).
    pub fn load_state_file(&mut self, path: &Path, max_tokens: usize) -> Result<Vec<Token>, StateError> {
        let c_path = c_path(path)?;
        self.outputs.clear();
        let mut tokens = vec![Token(0); max_tokens];
        let mut n = 0usize;
        let mut ok = false;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: tokens has max_tokens writable slots; n and ok receive the results.
            crate::cpp::guard("llama_state_load_file", |err| unsafe {
                sys::exsa_state_load_file(self.raw.as_ptr(), c_path.as_ptr(), tokens.as_mut_ptr().cast(), max_tokens, &mut n, &mut ok, err)
            })
        });
        guarded?;
        if !ok {
            return Err(StateError::Load { path: path.to_path_buf(), messages });
        }
        tokens.truncate(n);
        Ok(tokens)
    }

    /// Saves one sequence's state and the `tokens` it holds to a file.
    pub fn save_sequence_state_file(&mut self, seq_id: i32, path: &Path, tokens: &[Token]) -> Result<(), StateError> {
        self.check_state_seq(seq_id)?;
        let c_path = c_path(path)?;
        // SAFETY: checked id; path NUL-terminated; tokens readable, Token repr(transparent).
        let written = unsafe { sys::llama_state_seq_save_file(self.raw.as_ptr(), c_path.as_ptr(), seq_id, tokens.as_ptr().cast(), tokens.len()) };
        if written == 0 { Err(StateError::Save { path: path.to_path_buf() }) } else { Ok(()) }
    }

    /// Loads a sequence state file into `dest_seq_id`; returns the tokens saved with it (at
    /// most `max_tokens`).
    pub fn load_sequence_state_file(&mut self, dest_seq_id: i32, path: &Path, max_tokens: usize) -> Result<Vec<Token>, StateError> {
        self.check_state_seq(dest_seq_id)?;
        let c_path = c_path(path)?;
        self.outputs.clear();
        let mut tokens = vec![Token(0); max_tokens];
        let mut n = 0usize;
        let mut read = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: checked id; tokens has max_tokens writable slots; n and read receive results.
            crate::cpp::guard("llama_state_seq_load_file", |err| unsafe {
                sys::exsa_state_seq_load_file(
                    self.raw.as_ptr(),
                    c_path.as_ptr(),
                    dest_seq_id,
                    tokens.as_mut_ptr().cast(),
                    max_tokens,
                    &mut n,
                    &mut read,
                    err,
                )
            })
        });
        guarded?;
        if read == 0 {
            return Err(StateError::Load { path: path.to_path_buf(), messages });
        }
        tokens.truncate(n);
        Ok(tokens)
    }

    /// llama.cpp's timing counters since the context was created or last reset.
    pub fn perf(&self) -> PerfCounters {
        // SAFETY: reads counters of a live context.
        let p = unsafe { sys::llama_perf_context(self.raw.as_ptr()) };
        PerfCounters {
            load_ms: p.t_load_ms,
            prompt_ms: p.t_p_eval_ms,
            eval_ms: p.t_eval_ms,
            n_prompt_tokens: p.n_p_eval,
            n_eval_tokens: p.n_eval,
            n_graph_reused: p.n_reused,
        }
    }

    /// Zeroes the timing counters.
    pub fn reset_perf(&mut self) {
        // SAFETY: resets counters of a live context.
        unsafe { sys::llama_perf_context_reset(self.raw.as_ptr()) }
    }

    /// Sets the thread counts for generation and for batches.
    pub fn set_threads(&mut self, n_threads: i32, n_threads_batch: i32) -> Result<(), ContextError> {
        for (name, n) in [("n_threads", n_threads), ("n_threads_batch", n_threads_batch)] {
            if n < 1 {
                return Err(ContextError::InvalidParam { name, value: n.to_string(), reason: "at least one thread is needed" });
            }
        }
        // SAFETY: valid counts on a live context.
        unsafe { sys::llama_set_n_threads(self.raw.as_ptr(), n_threads, n_threads_batch) };
        Ok(())
    }

    /// (generation threads, batch threads).
    pub fn threads(&self) -> (i32, i32) {
        // SAFETY: reads fields of a live context.
        unsafe { (sys::llama_n_threads(self.raw.as_ptr()), sys::llama_n_threads_batch(self.raw.as_ptr())) }
    }

    /// Cancellation: while `flag` is true, a running decode stops and returns
    /// [`DecodeError::Aborted`]. `None` removes it.
    pub fn set_abort_flag(&mut self, flag: Option<Arc<AtomicBool>>) {
        match &flag {
            // SAFETY: the user data points into the Arc kept in self.abort_flag, so it lives
            // as long as the callback is installed; the callback only reads an atomic.
            Some(f) => unsafe { sys::llama_set_abort_callback(self.raw.as_ptr(), Some(abort_trampoline), Arc::as_ptr(f).cast_mut().cast()) },
            // SAFETY: removes the callback.
            None => unsafe { sys::llama_set_abort_callback(self.raw.as_ptr(), None, std::ptr::null_mut()) },
        }
        self.abort_flag = flag;
    }

    /// Applies LoRA adapters with their scales, replacing those applied before.
    pub fn set_lora_adapters(&mut self, adapters: &[(&LoraAdapter<'m>, f32)]) -> Result<(), LoraError> {
        if adapters.iter().any(|(a, _)| !std::ptr::eq(a.model(), self.model)) {
            return Err(LoraError::WrongModel);
        }
        let mut raw: Vec<*mut sys::llama_adapter_lora> = adapters.iter().map(|(a, _)| a.as_ptr()).collect();
        let mut scales: Vec<f32> = adapters.iter().map(|(_, s)| *s).collect();
        let mut code = 0;
        let (guarded, messages) = backend::capture(|| {
            // SAFETY: the adapters belong to this context's model (checked above); llama.cpp keeps
            // their pointers, and `self.lora` below keeps them alive while it may use them.
            crate::cpp::guard("llama_set_adapters_lora", |err| unsafe {
                sys::exsa_set_adapters_lora(self.raw.as_ptr(), raw.as_mut_ptr(), raw.len(), scales.as_mut_ptr(), &mut code, err)
            })
        });
        guarded?;
        if code != 0 {
            return Err(LoraError::Apply(messages));
        }
        self.lora = adapters.iter().map(|(a, _)| (*a).clone()).collect();
        Ok(())
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context; nothing borrows it past this point.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

extern "C" fn abort_trampoline(data: *mut c_void) -> bool {
    // SAFETY: data is the AtomicBool inside the Arc the context keeps while this is installed.
    unsafe { &*data.cast::<AtomicBool>() }.load(Ordering::Relaxed)
}

fn c_path(path: &Path) -> Result<CString, StateError> {
    crate::c_string::path(path).ok_or_else(|| StateError::InvalidPath(path.to_path_buf()))
}
