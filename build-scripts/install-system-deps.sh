#!/usr/bin/env bash
# The system packages of the source build (cmake, libclang, ccache; valgrind on Linux; haproxy
# for the scale-out test), for
# scripts that prepare a machine. The logic (find each as its user finds it, install with
# apt-get or brew, check again, load libclang through bindgen) lives in `cargo xtask setup`,
# where it is unit-tested.
#   --check   report each dependency and its path, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask setup "$@"
