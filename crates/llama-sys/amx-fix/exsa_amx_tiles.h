// AMX tile intrinsics whose memory use the compiler sees in full (llama-sys, build/amx_patch.rs).
//
// GCC's amxtileintrin.h (seen in GCC 12) declares `ldtilecfg`'s memory input as the first 8
// bytes of the 64-byte configuration and `tileloadd` with no memory input at all. After inlining,
// GCC may then drop the stores that fill the rest of a configuration on the stack as dead, and
// ldtilecfg loads whatever the stack held: a #GP (SIGSEGV) when that is not a valid
// configuration, or an empty one and a #UD (SIGILL) at the next tileloadd. Clang's intrinsics are
// builtins that model memory; the forms below are right for both.
#pragma once

#if defined(__AMX_TILE__) && defined(__GNUC__)

#include <immintrin.h>

struct exsa_tile_config_bytes {
    unsigned char bytes[64];
};

// The operand is the whole configuration, so every store that fills it happens before.
#define EXSA_TILE_LOADCONFIG(config) \
    __asm__ volatile("ldtilecfg %0" ::"m"(*(const struct exsa_tile_config_bytes *) (config)))

#if !defined(__clang__)
// A compiler barrier first, so that stores to the tile's source (ggml unpacks into a buffer
// just before loading it) are not moved past the load.
#undef _tile_loadd
#define _tile_loadd(dst, base, stride)            \
    do {                                          \
        __asm__ volatile("" ::: "memory");        \
        _tile_loadd_internal(dst, base, stride);  \
    } while (0)
#endif

#else
#define EXSA_TILE_LOADCONFIG(config) _tile_loadconfig(config)
#endif
