//! An inference context over a [`Model`]: decoding and the outputs of the last decode. Its
//! other concerns have files of their own beside this one: creation parameters (`params.rs`),
//! the KV cache (`memory.rs`), state persistence (`state.rs`), threads, cancellation and timing
//! (`runtime.rs`), applying LoRA adapters (`lora.rs`).

mod lora;
mod memory;
mod params;
mod runtime;
mod state;

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::batch::{Batch, BatchEntry, Pos, SeqId};
use crate::error::{ContextError, DecodeError, OutputError};
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::{backend, sys};

pub use memory::MemoryData;
pub use params::{ContextParams, FlashAttention, KvType, Pooling};
pub use runtime::PerfCounters;
pub use state::RecurrentCheckpoint;

/// A context: KV cache and compute state over a model it borrows, so it cannot outlive it.
#[derive(Debug)]
pub struct Context<'m> {
    raw: NonNull<sys::llama_context>,
    /// Unique in the process: what a [`RecurrentCheckpoint`] names as its context (an address
    /// could be reused by a later context).
    serial: u64,
    pub(crate) model: &'m Model,
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
    /// For models with a recurrent state: per sequence, the first position the last decode
    /// wrote, below which llama.cpp's snapshots cannot cut back (None: no cut at all).
    recurrent_cut_floor: Option<Vec<Option<Pos>>>,
    abort_flag: Option<Arc<AtomicBool>>,
    /// The adapters applied with [`Context::set_lora_adapters`]: llama.cpp keeps their pointers,
    /// so the context keeps them alive.
    pub(crate) lora: Vec<LoraAdapter<'m>>,
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
        params.check_pooled_reserve(params.applied_pooling(model), model.is_causal(), model.n_ctx_train())?;
        model.check_servers()?;
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
        static SERIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Context {
            raw,
            serial: SERIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
            recurrent_cut_floor: model.has_recurrent_state().then(|| vec![None; n_seq_max as usize]),
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

    /// Recurrent-state snapshots per sequence as llama.cpp applied
    /// [`ContextParams::recurrent_snapshots`]: 0 where the architecture has none (Mamba) or the
    /// memory no recurrent state. A sequence can drop at most this many tokens of its last decode.
    pub fn recurrent_snapshots(&self) -> u32 {
        // SAFETY: reads a field of the live context.
        unsafe { sys::llama_n_rs_seq(self.raw.as_ptr()) }
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
        for (index, BatchEntry { token, pos, seq_ids, .. }) in batch.entries().enumerate() {
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

    /// Waits until the last decode has finished. A decode may return before its computation has
    /// (GPU and RPC backends queue the work; reading logits waits for it): time a decode with
    /// this, as llama-bench does.
    pub fn synchronize(&self) {
        // SAFETY: a live context, not shared (Context is not Sync); it waits for the backends'
        // queues and throws nothing.
        unsafe { sys::llama_synchronize(self.raw.as_ptr()) }
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
        self.model.check_servers()?;
        self.outputs.clear();
        let mut code = 0;
        // Graph building reads the model's adapter set: no adapter may be loaded or freed meanwhile.
        let _adapters = self.model.adapters_read();
        let (guarded, messages) = backend::capture(|| crate::cpp::guard(function, |err| call(self.raw.as_ptr(), batch.raw(), &mut code, err)));
        // Whatever happens next, the snapshots of earlier decodes are gone (or now in doubt).
        self.forget_cut_floors();
        guarded?;
        if code == 0 && self.model.has_watched_servers() {
            // An RPC decode returns before its computation has; a server lost meanwhile leaves
            // zeros in the outputs, which must not be read as logits.
            self.synchronize();
            self.model.check_servers()?;
        }
        match code {
            0 => {
                self.outputs.extend(batch.entries().enumerate().filter(|(_, e)| e.output == crate::batch::Output::Compute).map(|(i, _)| i as i32));
                self.note_cut_floors(batch);
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
    pub fn sequence_embeddings(&self, seq_id: SeqId) -> Result<&[f32], OutputError> {
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
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context; nothing borrows it past this point.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
        // Its decodes may have left this thread a team (an embedding computed on a pooled
        // thread, say), which would slow the threads that go on decoding. It is the dropping
        // thread's team that ends: drop a context on the thread that decoded with it (another
        // live context of that thread just makes a new team at its next decode).
        crate::openmp::release_this_threads_team();
    }
}
