"""Paired, interleaved: exsa serve on the LFM2-1.2B-shaped model with recurrent snapshots (8) and
without (0), speculation ngram and off, a grammar-forced workload whose lookup drafts are partly
rejected. Prints JSON."""
import json, statistics, subprocess, sys, time, urllib.request
exsa, model, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = "one two three four one two three five one two three four one two three five one two three"
G = 'root ::= (" one two three" (" four" | " five" | " six"))+'
def start(snap):
    p = subprocess.Popen([exsa, "--log", "error", "--server-log", "warn", "--threads", "2", "--recurrent-snapshots", str(snap), "--model", model, "serve", "--port", "0", "--parallel", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = p.stdout.readline().strip().removeprefix("listening on ")
    while True:
        try:
            if urllib.request.urlopen(base + "/health").status == 200: break
        except Exception: time.sleep(0.2)
    return p, base
def post(base, body):
    return json.load(urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})))
def metric(base, name):
    for l in urllib.request.urlopen(base + "/metrics").read().decode().splitlines():
        if l.startswith(name + "{"): return float(l.split()[-1])
    return 0.0
servers = {snap: start(snap) for snap in (8, 0)}
rows = {f"snap{s}-{m}": [] for s in (8, 0) for m in ("ngram", "off")}
for r in range(rounds):
    # Each round in another order (positions in a round cost differently on a shared machine).
    order = [(s, m) for s in (8, 0) for m in ("ngram", "off")]
    order = order[r % 4:] + order[:r % 4]
    for snap, mode in order:
        if True:
            base = servers[snap][1]
            before = (metric(base, "exsa_decode_steps_total"), metric(base, "exsa_draft_tokens_total"), metric(base, "exsa_draft_tokens_accepted_total"))
            body = {"prompt": P, "max_tokens": 128, "temperature": 1.0, "seed": r, "grammar": G, "speculative": {"type": mode}, "ignore_eos": True}
            t0 = time.monotonic(); out = post(base, body); wall = time.monotonic() - t0
            after = (metric(base, "exsa_decode_steps_total"), metric(base, "exsa_draft_tokens_total"), metric(base, "exsa_draft_tokens_accepted_total"))
            rows[f"snap{snap}-{mode}"].append({"round": r, "t_s": out["timings"]["predicted_per_second"], "wall_s": wall, "completion_tokens": out["usage"]["completion_tokens"],
                "decode_steps": after[0] - before[0], "drafted": after[1] - before[1], "accepted": after[2] - before[2]})
rss = {}
for snap, (p, base) in servers.items():
    rss[snap] = int(open(f"/proc/{p.pid}/status").read().split("VmHWM:")[1].split()[0]) // 1024
    p.terminate(); p.wait()
summary = {k: {"median_t_s": statistics.median(x["t_s"] for x in v), "min": min(x["t_s"] for x in v), "max": max(x["t_s"] for x in v),
               "drafted": sum(x["drafted"] for x in v), "accepted": sum(x["accepted"] for x in v),
               "decode_steps": sum(x["decode_steps"] for x in v)} for k, v in rows.items()}
ratios = {f"snap{s}": [a["t_s"] / b["t_s"] for a, b in zip(rows[f"snap{s}-ngram"], rows[f"snap{s}-off"])] for s in (8, 0)}
print(json.dumps({"summary": summary, "ngram_over_off_per_round": ratios, "peak_rss_mib": rss, "rows": rows}, indent=1))
