// Exception guards for the llama.cpp functions that can throw a C++ exception out of their
// `extern "C"` signature. An exception unwinding into Rust aborts the process ("Rust cannot
// catch foreign exceptions"), so safe Rust calls these instead: each runs the llama.cpp
// function inside try/catch and reports an exception as EXSA_EXCEPTION with its what() text.
// The audit of which functions need this is in the `llama` crate's docs (module `soundness`).
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Returned by every guard: the call ran (its own result is in the out parameter), or it threw.
#define EXSA_OK 0
#define EXSA_EXCEPTION (-1)

// The message of a caught exception, truncated to fit and always NUL-terminated.
typedef struct exsa_error {
    char what[512];
} exsa_error;

int32_t exsa_decode(struct llama_context * ctx, struct llama_batch batch, int32_t * ret, exsa_error * err);
int32_t exsa_encode(struct llama_context * ctx, struct llama_batch batch, int32_t * ret, exsa_error * err);

int32_t exsa_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
                      int32_t n_tokens_max, bool add_special, bool parse_special, int32_t * ret, exsa_error * err);
int32_t exsa_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                            int32_t lstrip, bool special, int32_t * ret, exsa_error * err);
int32_t exsa_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text,
                        int32_t text_len_max, bool remove_special, bool unparse_special, int32_t * ret, exsa_error * err);

int32_t exsa_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg, bool add_ass,
                                 char * buf, int32_t length, int32_t * ret, exsa_error * err);

int32_t exsa_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
                                  struct llama_sampler ** out, exsa_error * err);
// A grammar that applies only once the output matches one of `trigger_patterns` (regular
// expressions, matched from the output's start; the grammar reads from the first match group) or
// one of `trigger_tokens` is drawn. A pattern that is not a regular expression throws (caught).
int32_t exsa_sampler_init_grammar_lazy(const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
                                       const char ** trigger_patterns, size_t num_trigger_patterns,
                                       const llama_token * trigger_tokens, size_t num_trigger_tokens,
                                       struct llama_sampler ** out, exsa_error * err);
int32_t exsa_sampler_init_dry(const struct llama_vocab * vocab, float multiplier, float base,
                              int32_t allowed_length, int32_t penalty_last_n, const char ** seq_breakers,
                              size_t num_breakers, struct llama_sampler ** out, exsa_error * err);
int32_t exsa_sampler_accept(struct llama_sampler * smpl, llama_token token, exsa_error * err);
int32_t exsa_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p, exsa_error * err);
int32_t exsa_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx, llama_token * out,
                            exsa_error * err);
int32_t exsa_sampler_reset(struct llama_sampler * smpl, exsa_error * err);

int32_t exsa_state_set_data(struct llama_context * ctx, const uint8_t * src, size_t size, size_t * ret, exsa_error * err);
int32_t exsa_state_seq_set_data_ext(struct llama_context * ctx, const uint8_t * src, size_t size,
                                    llama_seq_id dest_seq_id, llama_state_seq_flags flags, size_t * ret,
                                    exsa_error * err);
int32_t exsa_state_load_file(struct llama_context * ctx, const char * path, llama_token * tokens_out,
                             size_t n_token_capacity, size_t * n_token_count_out, bool * ret, exsa_error * err);
int32_t exsa_state_seq_load_file(struct llama_context * ctx, const char * path, llama_seq_id dest_seq_id,
                                 llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out,
                                 size_t * ret, exsa_error * err);

int32_t exsa_adapter_lora_init(struct llama_model * model, const char * path, struct llama_adapter_lora ** out,
                               exsa_error * err);
int32_t exsa_set_adapters_lora(struct llama_context * ctx, struct llama_adapter_lora ** adapters, size_t n_adapters,
                               float * scales, int32_t * ret, exsa_error * err);

// Where ggml gives up on an RPC endpoint (it cannot be parsed, reached or greeted) it calls
// ggml_abort, which ends the process. During the calls below, such a fatal error on the calling
// thread becomes EXSA_EXCEPTION instead (see fatal_guarded in the source); anywhere else ggml
// still aborts. Builds without the `rpc` switch report that for the two rpc functions.

// Loads a model like llama_model_load_from_file (which reports its own failures as null).
int32_t exsa_model_load_from_file(const char * path, struct llama_model_params params, struct llama_model ** out,
                                  exsa_error * err);
// Connects to a ggml rpc-server at `endpoint` (host:port) and writes up to `max_devices` of
// its devices to `devices`, their number to `n_devices`.
int32_t exsa_rpc_add_server(const char * endpoint, ggml_backend_dev_t * devices, size_t max_devices, size_t * n_devices,
                            exsa_error * err);
// Serves this process's devices on `endpoint` (the GPUs if there are any, else the CPU) until
// the process ends. `cache_dir` (may be NULL) keeps tensors sent before, by hash.
int32_t exsa_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads, exsa_error * err);
// Whether this build has the RPC backend.
bool exsa_rpc_available(void);

// Whether this build's RPC client reports a lost server (rpc-watch, see llama-sys'
// build/rpc_patch.rs) instead of ending the process.
bool exsa_rpc_watched(void);
// The number of the latest connection to `endpoint` (0: none, or not watched). A model loaded over
// an endpoint keeps that connection for its whole life.
uint64_t exsa_rpc_connection(const char * endpoint);
// Whether connection `id` was lost (a reply failed: the server closed, crashed or vanished).
bool exsa_rpc_connection_lost(uint64_t id);

// Ends the OpenMP thread team that the calling thread started, where the build links libgomp
// (else does nothing). libgomp keeps one team per thread that ever opened a parallel region, for
// as long as that thread lives; while the teams' threads outnumber the cores, every team's workers
// spin 1000 times instead of 300000 before sleeping, and each graph then waits on wake-ups.
void exsa_openmp_release_team(void);

#ifdef __cplusplus
}
#endif
