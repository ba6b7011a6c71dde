// See exsa_shim.h. Every function is noexcept: whatever llama.cpp throws stops here.

#include "exsa_shim.h"
#include "exsa_guard.h"

#include <regex>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef EXSA_WITH_GOMP
// OpenMP 5.0's (libgomp since GCC 9), declared here rather than through <omp.h>: the shim may be
// compiled by another compiler than ggml (cc's default against LLAMA_SYS_CXX), one without
// GCC's header. The argument is omp_pause_resource_t; 1 is omp_pause_soft.
extern "C" int omp_pause_resource_all(int kind);
#endif

#ifdef EXSA_WITH_RPC
#include "ggml-rpc.h"
#endif
#ifdef EXSA_WITH_RPC_WATCH
#include "exsa_rpc_watch.h"
#endif

void exsa::set_error(exsa_error * err, const char * what) noexcept {
    if (err == nullptr) {
        return;
    }
    std::strncpy(err->what, what != nullptr ? what : "", sizeof(err->what) - 1);
    err->what[sizeof(err->what) - 1] = '\0';
}

namespace {

using exsa::set_error;

template <class F> int32_t guarded(exsa_error * err, F && f) noexcept {
    try {
        f();
        return EXSA_OK;
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "an exception that is not a std::exception");
    }
    return EXSA_EXCEPTION;
}

// How many `fatal_guarded` calls this thread is inside.
thread_local int fatal_depth = 0;

// ggml's abort hook (ggml_abort calls it, then abort()). Inside `fatal_guarded` on this thread it
// throws, so the fatal error unwinds to that call's catch: through ggml_abort's C frame, which
// GCC and Clang give unwind tables on the platforms we build for; MSVC does not promise that, so
// there the hook is not installed. Anywhere else it prints what ggml prints without a hook and
// returns, and ggml aborts as before: an exception there could reach a thread with no catch or
// unwind into Rust.
void abort_hook(const char * message) {
    if (fatal_depth > 0) {
        throw std::runtime_error(message != nullptr ? message : "ggml: fatal error");
    }
    std::fprintf(stderr, "%s\n", message != nullptr ? message : "ggml: fatal error");
}

// `guarded`, with ggml's fatal errors on this thread turned into exceptions (see abort_hook).
template <class F> int32_t fatal_guarded(exsa_error * err, F && f) noexcept {
#ifndef _MSC_VER
    static const bool installed = (ggml_set_abort_callback(abort_hook), true);
    (void) installed;
#endif
    ++fatal_depth;
    const int32_t result = guarded(err, f);
    --fatal_depth;
    return result;
}

#ifdef EXSA_WITH_RPC
// The devices an rpc-server offers: every GPU or accelerator, else the CPU.
std::vector<ggml_backend_dev_t> served_devices() {
    std::vector<ggml_backend_dev_t> gpus;
    ggml_backend_dev_t cpu = nullptr;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_CPU:
                cpu = cpu != nullptr ? cpu : dev;
                break;
            case GGML_BACKEND_DEVICE_TYPE_GPU:
            case GGML_BACKEND_DEVICE_TYPE_IGPU:
                // An RPC device of this process (a client of other servers) is not served on.
                if (std::strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") != 0) {
                    gpus.push_back(dev);
                }
                break;
            default:
                break;
        }
    }
    if (gpus.empty() && cpu != nullptr) {
        gpus.push_back(cpu);
    }
    return gpus;
}
#endif

}  // namespace

extern "C" {

int32_t exsa_decode(llama_context * ctx, llama_batch batch, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_decode(ctx, batch); });
}

int32_t exsa_encode(llama_context * ctx, llama_batch batch, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_encode(ctx, batch); });
}

int32_t exsa_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
                      int32_t n_tokens_max, bool add_special, bool parse_special, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special); });
}

int32_t exsa_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf, int32_t length, int32_t lstrip,
                            bool special, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_token_to_piece(vocab, token, buf, length, lstrip, special); });
}

int32_t exsa_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text,
                        int32_t text_len_max, bool remove_special, bool unparse_special, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_detokenize(vocab, tokens, n_tokens, text, text_len_max, remove_special, unparse_special); });
}

int32_t exsa_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg, bool add_ass,
                                 char * buf, int32_t length, int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_chat_apply_template(tmpl, chat, n_msg, add_ass, buf, length); });
}

int32_t exsa_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
                                  llama_sampler ** out, exsa_error * err) {
    return guarded(err, [&] { *out = llama_sampler_init_grammar(vocab, grammar_str, grammar_root); });
}

int32_t exsa_sampler_init_grammar_lazy(const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
                                       const char ** trigger_patterns, size_t num_trigger_patterns,
                                       const llama_token * trigger_tokens, size_t num_trigger_tokens, llama_sampler ** out,
                                       exsa_error * err) {
    return guarded(err, [&] {
        // Compiled here first, as llama.cpp compiles them: a pattern std::regex refuses throws
        // inside llama.cpp after it has allocated the sampler, which then leaks (found by the
        // leak check); here it throws before anything is allocated.
        for (size_t i = 0; i < num_trigger_patterns; ++i) {
            std::regex check(trigger_patterns[i]);
        }
        *out = llama_sampler_init_grammar_lazy_patterns(vocab, grammar_str, grammar_root, trigger_patterns, num_trigger_patterns,
                                                        trigger_tokens, num_trigger_tokens);
    });
}

int32_t exsa_sampler_init_dry(const llama_vocab * vocab, float multiplier, float base,
                              int32_t allowed_length, int32_t penalty_last_n, const char ** seq_breakers,
                              size_t num_breakers, llama_sampler ** out, exsa_error * err) {
    return guarded(err, [&] {
        *out = llama_sampler_init_dry(vocab, multiplier, base, allowed_length, penalty_last_n, seq_breakers, num_breakers);
    });
}

int32_t exsa_sampler_accept(llama_sampler * smpl, llama_token token, exsa_error * err) {
    return guarded(err, [&] { llama_sampler_accept(smpl, token); });
}

int32_t exsa_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p, exsa_error * err) {
    return guarded(err, [&] { llama_sampler_apply(smpl, cur_p); });
}

int32_t exsa_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx, llama_token * out, exsa_error * err) {
    return guarded(err, [&] { *out = llama_sampler_sample(smpl, ctx, idx); });
}

int32_t exsa_sampler_reset(llama_sampler * smpl, exsa_error * err) {
    return guarded(err, [&] { llama_sampler_reset(smpl); });
}

int32_t exsa_state_set_data(llama_context * ctx, const uint8_t * src, size_t size, size_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_state_set_data(ctx, src, size); });
}

int32_t exsa_state_seq_set_data_ext(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id,
                                    llama_state_seq_flags flags, size_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_state_seq_set_data_ext(ctx, src, size, dest_seq_id, flags); });
}

int32_t exsa_state_load_file(llama_context * ctx, const char * path, llama_token * tokens_out, size_t n_token_capacity,
                             size_t * n_token_count_out, bool * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_state_load_file(ctx, path, tokens_out, n_token_capacity, n_token_count_out); });
}

int32_t exsa_state_seq_load_file(llama_context * ctx, const char * path, llama_seq_id dest_seq_id, llama_token * tokens_out,
                                 size_t n_token_capacity, size_t * n_token_count_out, size_t * ret, exsa_error * err) {
    return guarded(err, [&] {
        *ret = llama_state_seq_load_file(ctx, path, dest_seq_id, tokens_out, n_token_capacity, n_token_count_out);
    });
}

int32_t exsa_adapter_lora_init(llama_model * model, const char * path, llama_adapter_lora ** out, exsa_error * err) {
    return guarded(err, [&] { *out = llama_adapter_lora_init(model, path); });
}

int32_t exsa_set_adapters_lora(llama_context * ctx, llama_adapter_lora ** adapters, size_t n_adapters, float * scales,
                               int32_t * ret, exsa_error * err) {
    return guarded(err, [&] { *ret = llama_set_adapters_lora(ctx, adapters, n_adapters, scales); });
}

int32_t exsa_model_load_from_file(const char * path, llama_model_params params, llama_model ** out, exsa_error * err) {
    return fatal_guarded(err, [&] { *out = llama_model_load_from_file(path, params); });
}

bool exsa_rpc_available(void) {
#ifdef EXSA_WITH_RPC
    return true;
#else
    return false;
#endif
}

bool exsa_rpc_watched(void) {
#ifdef EXSA_WITH_RPC_WATCH
    return true;
#else
    return false;
#endif
}

uint64_t exsa_rpc_connection(const char * endpoint) {
#ifdef EXSA_WITH_RPC_WATCH
    return exsa_rpc_watch_current(endpoint);
#else
    (void) endpoint;
    return 0;
#endif
}

bool exsa_rpc_connection_lost(uint64_t id) {
#ifdef EXSA_WITH_RPC_WATCH
    return exsa_rpc_watch_is_lost(id);
#else
    (void) id;
    return false;
#endif
}

int32_t exsa_rpc_add_server(const char * endpoint, ggml_backend_dev_t * devices, size_t max_devices, size_t * n_devices,
                            exsa_error * err) {
#ifdef EXSA_WITH_RPC
    return fatal_guarded(err, [&] {
        *n_devices = 0;
        ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);
        if (reg == nullptr) {
            throw std::runtime_error(std::string("the rpc-server at ") + endpoint + " offers no device");
        }
        const size_t count = ggml_backend_reg_dev_count(reg);
        for (size_t i = 0; i < count && i < max_devices; ++i) {
            devices[i] = ggml_backend_reg_dev_get(reg, i);
            *n_devices = i + 1;
        }
    });
#else
    (void) endpoint, (void) devices, (void) max_devices, (void) n_devices;
    set_error(err, "this build has no RPC backend (the `rpc` switch of llama-sys is off)");
    return EXSA_EXCEPTION;
#endif
}

int32_t exsa_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads, exsa_error * err) {
#ifdef EXSA_WITH_RPC
    return fatal_guarded(err, [&] {
        std::vector<ggml_backend_dev_t> devices = served_devices();
        if (devices.empty()) {
            throw std::runtime_error("no device to serve");
        }
        ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, devices.size(), devices.data());
        // It returns only when it could not start (its reason went to stderr).
        throw std::runtime_error(std::string("the RPC server could not serve on ") + endpoint + " (see the lines above)");
    });
#else
    (void) endpoint, (void) cache_dir, (void) n_threads;
    set_error(err, "this build has no RPC backend (the `rpc` switch of llama-sys is off)");
    return EXSA_EXCEPTION;
#endif
}

void exsa_openmp_release_team(void) {
#ifdef EXSA_WITH_GOMP
    // libgomp's pause ends only the calling thread's team (and refuses, returning nonzero,
    // inside a parallel region); the next region this thread opens makes a new one.
    (void) omp_pause_resource_all(1 /* omp_pause_soft */);
#endif
}

}  // extern "C"

int32_t exsa::fatal_guarded_call(exsa_error * err, void (*f)(void *), void * ctx) noexcept {
    return ::fatal_guarded(err, [&] { f(ctx); });
}
