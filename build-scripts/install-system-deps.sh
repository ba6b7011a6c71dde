#!/usr/bin/env bash
# Installs what the llama.cpp source build needs and Rust does not bring: cmake, libclang (for
# bindgen), ccache, and on Linux valgrind (for the leak check). Uses apt-get on Debian/Ubuntu
# and brew on macOS; elsewhere, or without the rights to install, prints the command to run
# and fails.
#   --check   report only, install nothing
set -euo pipefail

check_only=0
[[ "${1:-}" == "--check" ]] && check_only=1

have_libclang() {
  [[ -n "${LIBCLANG_PATH:-}" ]] && ls "$LIBCLANG_PATH"/libclang*.{so,dylib}* >/dev/null 2>&1 && return 0
  if [[ "$(uname -s)" == Darwin ]]; then
    xcrun --find clang >/dev/null 2>&1 && return 0
    [[ -d "$(brew --prefix llvm 2>/dev/null)/lib" ]] && return 0
    return 1
  fi
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && return 0
  ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* >/dev/null 2>&1
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
have_libclang || missing+=(libclang)
command -v ccache >/dev/null 2>&1 || missing+=(ccache)
# valgrind runs `cargo xtask leak-check`; macOS has none worth the name.
[[ "$(uname -s)" != Darwin ]] && ! command -v valgrind >/dev/null 2>&1 && missing+=(valgrind)

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system dependencies present: cmake, libclang, ccache$([[ "$(uname -s)" != Darwin ]] && echo ", valgrind")" >&2
  exit 0
fi

if [[ "$(uname -s)" == Darwin ]]; then
  pkgs=(); for m in "${missing[@]}"; do case $m in libclang) pkgs+=(llvm);; *) pkgs+=("$m");; esac; done
  cmd=(brew install "${pkgs[@]}")
elif command -v apt-get >/dev/null 2>&1; then
  pkgs=(); for m in "${missing[@]}"; do case $m in libclang) pkgs+=(libclang-dev);; *) pkgs+=("$m");; esac; done
  sudo=(); [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  cmd=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}")
  update=("${sudo[@]}" apt-get update -q)
else
  echo "error: missing ${missing[*]}; install them with your package manager (libclang is LLVM's libclang)" >&2
  exit 1
fi

if [[ $check_only -eq 1 ]]; then
  echo "missing: ${missing[*]}; install with: ${cmd[*]}" >&2
  exit 1
fi
if [[ $(id -u) -ne 0 && "$(uname -s)" != Darwin ]] && ! sudo -n true 2>/dev/null; then
  echo "error: missing ${missing[*]} and no rights to install; run: ${cmd[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}: ${cmd[*]}" >&2
[[ -n "${update+x}" ]] && "${update[@]}" >&2
"${cmd[@]}" >&2
