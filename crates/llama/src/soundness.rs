//! # Soundness: what safe code can and cannot do
//!
//! **The guarantee.** Whatever safe code passes to this crate, it cannot abort the process, read
//! or write out of bounds, use freed memory or race. Bad input comes back as a typed error that
//! names what was wrong. The exceptions are listed under *Known limits* below.
//!
//! ## Checked in Rust before llama.cpp sees it
//!
//! | call | checked first |
//! |---|---|
//! | [`Model::load`](crate::Model::load) | file exists, GGUF magic and version, header counts and lengths (capped), tensor data within the file |
//! | [`Context::new`](crate::Context::new) | thread counts, `1 <= n_ubatch <= n_batch`, `n_seq_max` within llama.cpp's limit, not vocab-only |
//! | [`Context::decode`](crate::Context::decode) / [`encode`](crate::Context::encode) | batch not empty, within `n_batch`; within `n_ubatch` for encoders and models that attend both ways (llama.cpp asserts); every token in the vocabulary, position inside the context, sequence id below `n_seq_max` |
//! | [`Batch`](crate::Batch) writes | capacity, sequence ids per token, negative ids and positions, `start + len` overflow |
//! | [`Context::logits`](crate::Context::logits) / [`embeddings`](crate::Context::embeddings) | the index requested an output in the last decode; rows are `n_vocab`, `n_embd_out` wide (`n_cls_out` for rank pooling) |
//! | memory operations | sequence ids; [`shift_range`](crate::Context::shift_range) only where `llama_memory_can_shift` (else llama.cpp aborts); on a recurrent state, [`remove_range`](crate::Context::remove_range) cuts back only within the last decode's tokens (llama.cpp accepts an earlier cut with snapshots on and restores a stale state: wrong results, silently) |
//! | state | sequence ids; an empty state is an error; trailing bytes after a state are refused |
//! | [`SamplerChain::build`](crate::SamplerChain::build) | every parameter's range; the chain ends with a selector (llama.cpp aborts otherwise); `PenaltyWindow::WholeContext` is the whole (training) context (llama.cpp would silently clamp its -1 to 0), and a window is never longer than that (llama.cpp allocates it up front) |
//! | [`Sampler::sample`](crate::Sampler::sample) / [`accept`](crate::Sampler::accept) | model and output index; accepted tokens in the vocabulary; an all-NaN row or a chain whose stages rule out every candidate is an error before llama.cpp's accept runs |
//! | [`Vocab`](crate::Vocab) | token ids in range; text length within `i32` |
//! | [`quantize`](crate::quantize()) | input header; the output is not the input (also through links) |
//! | [`LoraAdapter`](crate::LoraAdapter) | file exists; loading and freeing serialised against every decode of the model (llama.cpp keeps adapters in a set inside the shared model) |
//!
//! ## C++ exceptions
//!
//! llama.cpp is C++ behind `extern "C"` functions, and some of those let exceptions escape. An
//! exception unwinding into Rust aborts the process ("Rust cannot catch foreign exceptions").
//! Calls that can throw therefore go through guards compiled by llama-sys
//! (`shim/exsa_shim.cpp`): each catches everything and returns its `what()` text, which becomes
//! [`CppException`](crate::CppException) inside the operation's error. The audit, against the
//! pinned tree:
//!
//! | llama.cpp function | throws? | where | here |
//! |---|---|---|---|
//! | `llama_sampler_accept` | yes | grammar: `std::out_of_range` for an id outside the vocabulary, "Unexpected empty grammar stack" for a token the grammar cannot take; penalties' ring buffer | guard + id check |
//! | `llama_sampler_apply`, `llama_sampler_sample` | yes | grammar stage (`.at()` on pieces), accept inside `sample` | guard |
//! | `llama_sampler_reset` | yes | grammar re-initialisation | guard |
//! | `llama_sampler_init_grammar` | yes | parser (`std::runtime_error` on bad GBNF, partly caught inside) | guard; a parse failure is [`SamplerError::Grammar`](crate::SamplerError::Grammar) |
//! | `llama_sampler_init_dry` | yes | tokenizes the sequence breakers | guard |
//! | `llama_tokenize`, `llama_token_to_piece`, `llama_detokenize` | yes | `.at()` on token tables, precompiled charsmap bounds | guard + id checks |
//! | `llama_chat_apply_template` | yes | template formatting (`std::string` operations, `.at()`) | guard |
//! | `llama_decode`, `llama_encode` | yes | graph building and memory (`std::runtime_error` on allocation failures, `std::bad_alloc`) | guard |
//! | `llama_state_set_data`, `llama_state_seq_set_data`, `llama_state_seq_set_data_ext` (a recurrent checkpoint), `llama_state_load_file`, `llama_state_seq_load_file` | yes | state readers (`std::runtime_error` on a malformed state; some catch it themselves) | guard |
//! | `llama_adapter_lora_init`, `llama_set_adapters_lora` | yes | adapter loading (catches its own `runtime_error`), `std::map` insertions | guard |
//! | `llama_model_load_from_file` | caught inside; ggml aborts | `try`/`catch` around the load, returning null; with rpc-servers, ggml aborts on one it cannot reach | guard with ggml's fatal errors turned into exceptions on this thread (below); log lines kept in the error |
//! | `ggml_backend_rpc_add_server`, `ggml_backend_rpc_start_server` | ggml aborts | an endpoint that cannot be parsed, reached or greeted; a port that cannot be bound | the same guard; endpoints checked in Rust first |
//! | `llama_init_from_model`, `llama_model_quantize` | caught inside | each wraps its work in `try`/`catch` and returns null or an error code | log lines kept in the error |
//! | `llama_state_get_size`/`_data`, `llama_state_save_file`, `llama_state_seq_*` savers (`_ext` ones included) | caught inside | `try`/`catch` in llama-context.cpp | return value checked |
//! | memory operations (`llama_memory_seq_*`, `llama_memory_clear`), `llama_synchronize` | no | (no throw site reachable) | — |
//! | getters (`llama_model_*`, `llama_vocab_*` reads, `llama_get_logits_ith`, ...) | no | field reads; `llama_get_*_ith` catch their own index errors and return null | null checked |
//!
//! Rust never unwinds into C either: the log callback and the abort callback catch panics (or
//! cannot panic) before returning to llama.cpp.
//!
//! **ggml's fatal errors as exceptions, in three calls only.** ggml gives up by calling
//! `ggml_abort`, which calls a hook and then `abort()`. The shim installs a hook that throws a
//! `std::runtime_error` when, and only when, the calling thread is inside one of the guards
//! marked above (a thread-local depth counter); the exception unwinds through `ggml_abort`'s C
//! frame (GCC and Clang emit unwind tables for it on the targets we build; on MSVC the hook is not
//! installed) to the guard's `catch`. Everywhere else the hook prints ggml's message and returns,
//! and ggml aborts as it always did: an exception on another thread would find no `catch`, and
//! one outside a guard would unwind into Rust.
//!
//! ## Known limits
//!
//! - **Failed `GGML_ASSERT`s and out-of-memory inside ggml abort.** The checks above rule out
//!   the asserts that bad arguments reach; an allocation failure inside a compute graph, or
//!   weights that are corrupt beyond what the header check sees (NaN-producing tensors are fine;
//!   impossible shapes are not), can still end in `abort()`. So can a tensor of a type the
//!   loader accepts but a kernel does not: found with the synthetic models, an LFM2 or Mamba
//!   GGUF whose convolution kernel is F16 instead of F32 loads, then aborts in ggml's
//!   `ssm_conv` on the first decode.
//! - **`as_ptr()`** hands out raw handles for calls this crate does not wrap; using them is
//!   `unsafe` and outside these guarantees.
//! - **Full-vocabulary sampling** (chains that are not preselected) runs llama.cpp's own
//!   candidate loop; an all-NaN logits row there gives whatever token llama.cpp picks, not an
//!   error.
//! - GPU backends report device errors (CUDA, Metal) by aborting inside ggml; no guard can catch
//!   those.
//! - **An rpc-server that goes away after the model loaded ends the client process in builds
//!   without the RPC client patch** (another `LLAMA_CPP_DIR` tree; [`crate::rpc::watched`] says
//!   which): upstream ggml's client (protocol 7.0) aborts on a dispatcher thread of its own when a
//!   reply fails. The pinned tree is patched at build time so that the loss is
//!   [`crate::rpc::RpcError::Lost`] instead. See [`crate::rpc`].
