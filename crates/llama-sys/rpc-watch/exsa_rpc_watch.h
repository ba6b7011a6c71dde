// What exsa adds to ggml's RPC client (compiled into the ggml-rpc library by the build script,
// which also patches ggml-rpc.cpp and transport.cpp to call it; see build/rpc_patch.rs).
//
// Upstream, a reply that does not come ends the process: the client's dispatcher thread calls
// GGML_ABORT. Patched, the dispatcher marks its connection lost here, completes every message
// without sending it (replies read as zeros), and carries on; callers ask whether a connection
// they depend on is lost and turn it into an error. Connections are numbered: a model remembers
// the numbers it was loaded over, so a server that comes back does not revive a model whose
// tensors died with the old one.
#pragma once

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// A dispatcher connected to `endpoint`: returns the connection's number (never 0).
uint64_t exsa_rpc_watch_connected(const char * endpoint);
// Connection `id` failed an exchange; everything it carries from now on is lost.
void exsa_rpc_watch_lost(uint64_t id);
// The number of the latest connection to `endpoint`, 0 if there was none.
uint64_t exsa_rpc_watch_current(const char * endpoint);
// Whether connection `id` was lost.
bool exsa_rpc_watch_is_lost(uint64_t id);
// Socket options for every RPC socket, both sides: close-on-exec (children must not inherit a
// connection), and keepalive probes, so that a host that vanished (power, network) is noticed in
// about half a minute instead of never.
void exsa_rpc_watch_socket(intptr_t fd);

#ifdef __cplusplus
}
#endif
