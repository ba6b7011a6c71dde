// The shim's exception guard for other C++ files of llama-sys (chat/exsa_chat.cpp): runs a
// callable with ggml's fatal errors on this thread turned into exceptions, and any exception
// turned into a return code and a message. Defined in exsa_shim.cpp, beside the abort hook it
// installs.
#pragma once

#include "exsa_shim.h"

#include <type_traits>

namespace exsa {

// Copies `what` into `err` (truncated, NUL-terminated).
void set_error(exsa_error * err, const char * what) noexcept;

// Runs `f(ctx)`; EXSA_OK, or EXSA_EXCEPTION with the message in `err`.
int32_t fatal_guarded_call(exsa_error * err, void (*f)(void *), void * ctx) noexcept;

template <class F> int32_t fatal_guarded(exsa_error * err, F && f) noexcept {
    using Callable = std::remove_reference_t<F>;
    return fatal_guarded_call(err, [](void * ctx) { (*static_cast<Callable *>(ctx))(); }, const_cast<void *>(static_cast<const void *>(&f)));
}

}  // namespace exsa
