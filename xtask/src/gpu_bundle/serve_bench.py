"""The server half of the GPU bundle's bench (run.sh): starts `exsa serve`, then sends streaming
chat requests from 1, then 8 concurrent clients, and prints one JSON line per level: completion
tokens per second over the level's wall time, and time to first token. Standard library only:
the GPU machine has Python but nothing can be installed there."""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a lighthouse keeper.",
    "List five uses of a paperclip, with one line each.",
    "Describe how a bicycle gear system works.",
    "What makes a good cup of tea? Answer briefly.",
    "Summarise the water cycle for a child.",
    "Give three tips for learning a new language.",
    "Why do cats purr? Answer in a paragraph.",
]


def start_server(exsa, model, slots, ctx):
    proc = subprocess.Popen(
        [exsa, "--log", "error", "--model", model, "serve", "--port", "0", "--parallel", str(slots), "--ctx", str(ctx)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"exsa serve printed {line!r}")
    base = urllib.parse.urlparse(line[len("listening on "):])
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection(base.hostname, base.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


def one_request(base, prompt, max_tokens):
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content") and ttft is None:
            ttft = time.perf_counter() - started
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


def level(base, streams, per_client, max_tokens):
    results, errors = [], []

    def client(k):
        for i in range(per_client):
            try:
                results.append(one_request(base, PROMPTS[(k + i) % len(PROMPTS)], max_tokens))
            except Exception as e:  # noqa: BLE001 - reported, not raised: one failure must not hide the rest
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] * 1000 for r in results if r[0] is not None)
    return {
        "streams": streams, "requests": len(results), "errors": errors[:3],
        "completion_tokens": sum(r[1] for r in results), "wall_s": wall,
        "tokens_per_s": sum(r[1] for r in results) / wall if wall > 0 else None,
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_ms_max": ttfts[-1] if ttfts else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exsa", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    proc, base = start_server(args.exsa, args.model, args.slots, args.ctx)
    try:
        level(base, 1, 1, 8)  # warm-up: first use of every kernel
        for streams in [int(s) for s in args.streams.split(",")]:
            row = level(base, streams, args.per_client, args.max_tokens)
            row["variant"] = args.variant
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
