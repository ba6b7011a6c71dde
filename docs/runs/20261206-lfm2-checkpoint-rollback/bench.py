"""Paired, interleaved: one `exsa serve` (defaults: no recurrent snapshots, so a rejected round
returns to the checkpoint taken before it) on the LFM2-1.2B-shaped model; per round, each
workload with speculation ngram and off, at 1 and 4 concurrent clients, in a rotating order.
Workloads, both grammar-forced (the model's weights are random), with a bias on the six words'
tokens so that the text comes out as those tokens (not as other splits of the same letters):
`partial` picks one of three words after each " one two three" (lookup drafts partly rejected),
`rewrite` repeats one phrase (drafts kept once it recurs). Prints JSON."""
import concurrent.futures, json, statistics, subprocess, sys, time, urllib.request

exsa, model, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
PROMPT = "one two three four one two three five one two three four one two three five one two three"
GRAMMARS = {"partial": 'root ::= (" one two three" (" four" | " five" | " six"))+', "rewrite": 'root ::= (" one two three four")+'}
MAX_TOKENS = 128

proc = subprocess.Popen([exsa, "--log", "error", "--server-log", "warn", "--threads", "2", "--model", model, "serve", "--port", "0", "--parallel", "4"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
base = proc.stdout.readline().strip().removeprefix("listening on ")
while True:
    try:
        if urllib.request.urlopen(base + "/health").status == 200:
            break
    except Exception:
        time.sleep(0.2)

def post(body):
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))

WORD_TOKENS = json.load(urllib.request.urlopen(urllib.request.Request(base + "/tokenize", json.dumps({"content": " one two three four five six"}).encode())))["tokens"]
assert len(WORD_TOKENS) == 6, WORD_TOKENS
BIAS = {str(t): 50 for t in WORD_TOKENS}

def metrics(*names):
    lines = urllib.request.urlopen(base + "/metrics").read().decode().splitlines()
    return [next((float(l.split()[-1]) for l in lines if l.startswith(n + "{") or l.startswith(n + " ")), 0.0) for n in names]

COUNTERS = ("exsa_decode_steps_total", "exsa_draft_tokens_total", "exsa_draft_tokens_accepted_total", "exsa_draft_tokens_replayed_total")
cells = [(w, c, m) for w in GRAMMARS for c in (1, 4) for m in ("ngram", "off")]
rows = {f"{w}-c{c}-{m}": [] for w, c, m in cells}
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for r in range(rounds):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        for workload, clients, mode in order:
            before = metrics(*COUNTERS)
            bodies = [{"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1000 * r + i, "grammar": GRAMMARS[workload], "logit_bias": BIAS,
                       "speculative": {"type": mode}, "ignore_eos": True} for i in range(clients)]
            t0 = time.monotonic()
            outs = list(pool.map(post, bodies))
            wall = time.monotonic() - t0
            after = metrics(*COUNTERS)
            tokens = sum(o["usage"]["completion_tokens"] for o in outs)
            delta = dict(zip(("decode_steps", "drafted", "accepted", "replayed"), (a - b for a, b in zip(after, before))))
            rows[f"{workload}-c{clients}-{mode}"].append({"round": r, "t_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens, **delta})
rss_mib = int(open(f"/proc/{proc.pid}/status").read().split("VmHWM:")[1].split()[0]) // 1024
proc.terminate()
proc.wait()
summary = {k: {"median_t_s": statistics.median(x["t_s"] for x in v), "min": min(x["t_s"] for x in v), "max": max(x["t_s"] for x in v),
               **{f: sum(x[f] for x in v) for f in ("decode_steps", "drafted", "accepted", "replayed", "completion_tokens")}}
           for k, v in rows.items()}
ratios = {}
for w in GRAMMARS:
    for c in (1, 4):
        per_round = sorted(a["t_s"] / b["t_s"] for a, b in zip(rows[f"{w}-c{c}-ngram"], rows[f"{w}-c{c}-off"]))
        ratios[f"{w}-c{c}"] = {"median": statistics.median(per_round), "min": per_round[0], "max": per_round[-1], "per_round": per_round}
print(json.dumps({"ngram_over_off": ratios, "summary": summary, "peak_rss_mib": rss_mib, "rows": rows}, indent=1))
