#!/usr/bin/env bash
# The GPU half of `cargo xtask gpu-bundle` (docs/gpu.md), run on a machine with an NVIDIA GPU, its
# driver, nvcc and CMake, and no Rust. From the bundle's folder:
#
#   MODEL=/path/to/model.gguf OUT=/path/to/results ./run.sh [all|build|bench]
#
# `build` and `bench` split the work so that the modules can build in the background while the
# model is still arriving (`bench` waits for a running `build`).
#
# 1. Builds ggml's CUDA backend as a module (libggml-cuda.so) from the pinned ggml source in
#    ggml/, with this machine's nvcc, twice: "B" as our build plan does (machine code for this GPU,
#    nothing else) and "A" as the llama-cpp-2 crate's build does (ggml's default architecture list,
#    which has no machine code for Hopper: the driver compiles the compute_90 PTX at first use;
#    only that PTX is built here, since it is all an H100 or H200 runs of the list).
# 2. Runs the exsa binary built on the CPU machine (bin/, backends as modules) with each module:
#    exsa bench pp512, tg128, e2e, every layer on the GPU, ROUNDS interleaved rounds; then the
#    server under 1 and 8 streaming clients (serve_bench.py).
# Results go to $OUT as JSON lines; `cargo xtask gpu-bundle --report $OUT` writes the report.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
phase=${1:-all}
out=${OUT:-$here/results}
rounds=${ROUNDS:-5}
variants=${VARIANTS:-B A}
mkdir -p "$out"
log() { echo "[gpu-bundle $(date +%T)] $*" | tee -a "$out/log.txt" >&2; }

nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cuda_root=$(cd "$(dirname "$nvcc_bin")/.." && pwd)
# The module needs this machine's cudart and cuBLAS; the exsa binary itself needs none.
export LD_LIBRARY_PATH="$cuda_root/lib64:$cuda_root/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
{
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader
    "$nvcc_bin" --version | grep release
    cmake --version | head -1
    nproc
} > "$out/machine.txt"
log "$(tr '\n' ' ' < "$out/machine.txt")"
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')

archs_for() {
    case $1 in
        B) echo "${cc}$([ "$cc" = 90 ] && echo a)-real" ;;  # sm_90a: Hopper's own instructions
        A) echo "${cc}-virtual" ;;
    esac
}

build_module() {
    local v=$1 dir=$here/build-$1 archs
    archs=$(archs_for "$1")
    log "building libggml-cuda.so ($v: CMAKE_CUDA_ARCHITECTURES=$archs)"
    local started=$SECONDS
    cmake -S "$here/ggml" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON \
        -DGGML_CPU=OFF -DGGML_CUDA=ON -DGGML_NATIVE=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
        -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCMAKE_CUDA_ARCHITECTURES="$archs" > "$dir.log" 2>&1
    cmake --build "$dir" --target ggml-cuda -j "$(nproc)" >> "$dir.log" 2>&1 || { tail -30 "$dir.log" >&2; return 1; }
    mkdir -p "$here/modules-$v"
    cp "$here"/bin/libggml-cpu*.so "$here/modules-$v/"
    cp "$(find "$dir" -name 'libggml-cuda.so' | head -1)" "$here/modules-$v/"
    echo "{\"variant\":\"$v\",\"archs\":\"$archs\",\"build_s\":$((SECONDS - started)),\"module_bytes\":$(stat -c %s "$here/modules-$v/libggml-cuda.so")}" >> "$out/builds.jsonl"
    log "built $v in $((SECONDS - started)) s"
}

exsa() {
    local v=$1; shift
    EXSA_BACKEND_DIR="$here/modules-$v" "$here/bin/exsa" --model "$model" "$@"
}

bench_round() {
    local v=$1 round=$2 json
    json=$(exsa "$v" --log error bench --tests pp512,tg128,e2e --reps 1 2>>"$out/log.txt") || { log "bench $v round $round failed"; return 0; }
    python3 -c 'import json,sys; print(json.dumps({"variant": sys.argv[1], "round": int(sys.argv[2]), "stdout": sys.stdin.read()}))' \
        "$v" "$round" <<< "$json" >> "$out/runs.jsonl"
}

if [ "$phase" = all ] || [ "$phase" = build ]; then
    rm -f "$out/build.done" "$out/build.failed"
    for v in $variants; do
        build_module "$v" || { touch "$out/build.failed"; exit 1; }
    done
    touch "$out/build.done"
fi
[ "$phase" = build ] && exit 0

model=${MODEL:?set MODEL to the GGUF to bench}
while [ ! -f "$out/build.done" ]; do
    [ -f "$out/build.failed" ] && { log "the module build failed (build-*.log)"; exit 1; }
    sleep 2
done
for v in $variants; do
    exsa "$v" --log warn info > "$out/info-$v.txt" 2>&1 || true
done
log "benching: $rounds rounds of ${variants// /, }, interleaved"
for ((r = 0; r < rounds; r++)); do
    order=$variants
    ((r % 2 == 1)) && order=$(echo "$variants" | tr ' ' '\n' | tac | tr '\n' ' ')
    for v in $order; do bench_round "$v" "$r"; done
done
for v in $variants; do
    log "server bench ($v)"
    EXSA_BACKEND_DIR="$here/modules-$v" python3 "$here/serve_bench.py" --exsa "$here/bin/exsa" --model "$model" \
        --variant "$v" --streams 1,8 >> "$out/serve.jsonl" 2>>"$out/log.txt" || log "server bench $v failed"
done
log "done"
