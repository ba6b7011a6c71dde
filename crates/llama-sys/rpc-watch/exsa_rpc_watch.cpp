// See exsa_rpc_watch.h.

#include "exsa_rpc_watch.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

#ifndef _WIN32
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#endif

namespace {

struct registry {
    std::mutex mutex;
    uint64_t last_id = 0;
    std::unordered_map<std::string, uint64_t> current;
    std::unordered_map<uint64_t, std::string> endpoints;
    std::unordered_set<uint64_t> lost;
};

registry & the_registry() {
    // Never destroyed: dispatcher threads may still report while the process exits.
    static registry * r = new registry();
    return *r;
}

// Seconds of silence before the first probe, seconds between probes, probes unanswered before the
// connection counts as dead: a vanished host is noticed after about 10 + 3 * 5 = 25 s. A busy
// server still answers probes (its kernel does), so long computations are not cut short. No
// TCP_USER_TIMEOUT: it would also cut a connection whose server is slow to read a large upload
// while it computes (a zero window), and data in flight is bounded by TCP's own retransmission
// limit (minutes).
constexpr int KEEPALIVE_IDLE_S = 10;
constexpr int KEEPALIVE_INTERVAL_S = 5;
constexpr int KEEPALIVE_PROBES = 3;

}  // namespace

extern "C" {

uint64_t exsa_rpc_watch_connected(const char * endpoint) {
    registry & r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    const uint64_t id = ++r.last_id;
    r.current[endpoint] = id;
    r.endpoints[id] = endpoint;
    return id;
}

void exsa_rpc_watch_lost(uint64_t id) {
    registry & r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    if (r.lost.insert(id).second) {
        const auto it = r.endpoints.find(id);
        std::fprintf(stderr, "exsa: lost the rpc-server %s (it closed the connection or stopped answering); "
                             "what used it now fails\n",
                     it != r.endpoints.end() ? it->second.c_str() : "?");
    }
}

uint64_t exsa_rpc_watch_current(const char * endpoint) {
    registry & r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.current.find(endpoint);
    return it != r.current.end() ? it->second : 0;
}

bool exsa_rpc_watch_is_lost(uint64_t id) {
    registry & r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    return r.lost.count(id) != 0;
}

void exsa_rpc_watch_socket(intptr_t fd) {
#ifndef _WIN32
    const int s = static_cast<int>(fd);
    // ggml opens its sockets without SOCK_CLOEXEC: a child process spawned meanwhile (any
    // Command::spawn of the program) inherits them and keeps the connection open after the
    // program closes it, and an rpc-server (one client at a time) then waits on that orphan
    // forever while the next client hangs in its handshake. Found by the RPC tests.
    const int flags = fcntl(s, F_GETFD);
    if (flags >= 0) {
        (void) fcntl(s, F_SETFD, flags | FD_CLOEXEC);
    }
    int on = 1;
    int idle = KEEPALIVE_IDLE_S;
    int interval = KEEPALIVE_INTERVAL_S;
    int probes = KEEPALIVE_PROBES;
    // Failures only cost the early notice: the connection itself works without these options.
    (void) setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
#if defined(TCP_KEEPIDLE)
    (void) setsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
#elif defined(TCP_KEEPALIVE)
    (void) setsockopt(s, IPPROTO_TCP, TCP_KEEPALIVE, &idle, sizeof(idle));
#endif
#if defined(TCP_KEEPINTVL) && defined(TCP_KEEPCNT)
    (void) setsockopt(s, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
    (void) setsockopt(s, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes));
#endif
    (void) interval, (void) probes;
#else
    (void) fd;
#endif
}

}  // extern "C"
