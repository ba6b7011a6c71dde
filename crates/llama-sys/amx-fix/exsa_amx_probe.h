// Whether this machine really runs AMX tile code, asked once before ggml hands out its AMX
// buffer type (llama-sys, build/amx_patch.rs).
//
// A CPU can advertise amx_tile/amx_int8 and the kernel grant the tile state while tile
// instructions still fault: a hypervisor that does not carry the tile state, a kernel without
// XFD support. The probe runs a tile load and a tile multiply in a child process and checks the
// product; if the child dies (SIGILL, SIGSEGV) or computes something else, ggml's AVX-512
// kernels run instead of crashing the process. EXSA_AMX=off skips AMX at run time.
// EXSA_AMX_PROBE_SKIP_CONFIG (a test hook) makes the child skip ldtilecfg, so that its tile load
// faults as on such a machine.
#pragma once

#include "exsa_amx_tiles.h"

#if defined(__AMX_INT8__) && defined(__AVX512VNNI__) && defined(__linux__)

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <immintrin.h>

namespace exsa_amx {

// C = A·B for 16x64 int8 tiles of ones and twos: every element of C is 64 * 1 * 2.
static bool tile_multiply_works(bool load_config) {
    alignas(64) unsigned char config[64] = {0};
    config[0] = 1;  // palette 1
    for (int tile = 0; tile < 3; ++tile) {
        config[16 + 2 * tile] = 64;  // colsb[tile] = 64 bytes (little endian)
        config[48 + tile] = 16;      // rows[tile] = 16
    }
    if (load_config) {
        EXSA_TILE_LOADCONFIG(config);
    }
    alignas(64) int8_t a[16 * 64];
    alignas(64) int8_t b[16 * 64];
    alignas(64) int32_t c[16 * 16];
    memset(a, 1, sizeof a);
    memset(b, 2, sizeof b);
    memset(c, 0, sizeof c);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
    for (int32_t v : c) {
        if (v != 64 * 2) {
            return false;
        }
    }
    return true;
}

static bool probe() {
    const char * mode = getenv("EXSA_AMX");
    if (mode != nullptr && (strcmp(mode, "off") == 0 || strcmp(mode, "0") == 0)) {
        GGML_LOG_INFO("AMX: off (EXSA_AMX=%s): ggml's AVX-512 kernels run\n", mode);
        return false;
    }
    const bool load_config = getenv("EXSA_AMX_PROBE_SKIP_CONFIG") == nullptr;
    const pid_t pid = fork();
    if (pid < 0) {
        GGML_LOG_WARN("AMX: cannot fork the probe process (%s): ggml's AVX-512 kernels run\n", strerror(errno));
        return false;
    }
    if (pid == 0) {
        // Only system calls and the tile code from here: the parent may have other threads.
        struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        _exit(tile_multiply_works(load_config) ? 0 : 1);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            GGML_LOG_WARN("AMX: cannot wait for the probe process (%s): ggml's AVX-512 kernels run\n", strerror(errno));
            return false;
        }
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        return true;
    }
    if (WIFSIGNALED(status)) {
        GGML_LOG_WARN("AMX: the CPU advertises AMX but a tile multiply died of signal %d (%s) in a probe process: ggml's AVX-512 kernels run\n",
                      WTERMSIG(status), strsignal(WTERMSIG(status)));
    } else {
        GGML_LOG_WARN("AMX: a tile multiply in a probe process gave a wrong product: ggml's AVX-512 kernels run\n");
    }
    return false;
}

}  // namespace exsa_amx

#endif
