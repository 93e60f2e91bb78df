#!/usr/bin/env python3
"""Load benchmark for `bella-vqa serve` on the embedded demo (loopback only, bounded in count and time).

    python scripts/serve_load.py --bin "$CARGO_TARGET_DIR/release/bella-vqa" [--rounds 3] [--requests 64]

For each round, starts one server per variant (default batching, and `--max-batch 1`) side by side,
warms both up, then for 1, 8 and 32 concurrent clients measures one and at once the other
(interleaved, the order alternating), each time sending a fixed number of requests drawn in a fixed
order from the demo images and questions in eval/demo (images.json and photos.jsonl). Reports
requests/s, p50/p95/p99 latency, errors (any status but 200, or a transport error) and the server's
RSS (VmRSS) after a warm-up at the highest concurrency and at the end; then prints a Markdown table
of the medians over the rounds. Uses httpx2 (the `openai` client's HTTP library, so the venv of
scripts/requirements-openai.txt) with asyncio; plain `httpx` works too.
"""
import argparse
import asyncio
import base64
import json
import math
import signal
import statistics
import sys
import time
from pathlib import Path

from bella_server import Server

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "eval" / "demo"


def workload(which="all"):
    """(image file, question) pairs from the shipped demo: the shapes-world questions of images.json
    (short answers), the photographs' questions of photos.jsonl (often long, unsure answers), or all."""
    pairs = []
    if which in ("all", "shapes"):
        images = json.loads((DEMO / "images.json").read_text())
        for name in sorted(images):
            for q in sorted(images[name].get("questions", {})):
                pairs.append((name, q))
    if which in ("all", "photos"):
        for line in (DEMO / "photos.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                pairs.append((rec["image"], rec["question"]))
    bodies = []
    for name, q in pairs:
        mime = "image/jpeg" if name.lower().endswith((".jpg", ".jpeg")) else "image/png"
        url = f"data:{mime};base64," + base64.b64encode((DEMO / name).read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 16, "temperature": 0}
        bodies.append(json.dumps(body).encode())
    return pairs, bodies


def rss_mib(pid: int):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None

def pct(sorted_xs, q):
    """Nearest-rank percentile."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


async def level(base, bodies, clients, n, timeout):
    """n requests by `clients` concurrent workers; request i uses bodies[i % len(bodies)]."""
    lat, errors, statuses = [], 0, {}
    nxt = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        async def worker():
            nonlocal nxt, errors
            while nxt < n:
                i = nxt
                nxt += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", content=bodies[i % len(bodies)],
                                          headers={"content-type": "application/json"})
                    await r.aread()
                    code = r.status_code
                except Exception as e:  # noqa: BLE001
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": n, "wall_s": wall, "rps": n / wall, "errors": errors,
            "statuses": {str(k): v for k, v in statuses.items()},
            "p50_ms": pct(lat, 50) * 1e3, "p95_ms": pct(lat, 95) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


def run_round(binary, variants, bodies, levels, n, warmup, timeout, soak, rnd):
    """One round: every variant's server runs side by side (an idle one costs nothing); each level
    is measured on one server, then at once on the other (order alternating), so that the two see
    the same machine load as nearly as possible."""
    servers = {}
    try:
        for name, extra in variants:
            servers[name] = Server(binary, extra, timeout)
        recs = {}
        for name, extra in variants:
            pid = servers[name].proc.pid
            rss_idle = rss_mib(pid)
            # warm-up at the highest concurrency, so that the buffers of the largest batches exist
            # before the RSS that the end is compared with is read
            asyncio.run(level(servers[name].base, bodies, max(levels), max(warmup, max(levels)), timeout))
            recs[name] = {"variant": name, "args": extra, "round": rnd + 1, "rss_idle_mib": rss_idle,
                          "rss_start_mib": rss_mib(pid), "levels": []}
        for i, c in enumerate(levels):
            order = variants if (rnd + i) % 2 == 0 else variants[::-1]
            for name, _ in order:
                r = asyncio.run(level(servers[name].base, bodies, c, n, timeout))
                r["rss_mib"] = rss_mib(servers[name].proc.pid)
                recs[name]["levels"].append(r)
                print(f"  {name:>13}  {c:>2} clients: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  "
                      f"RSS {r['rss_mib']:.1f} MiB", flush=True)
        for name, _ in variants:
            server, rec = servers[name], recs[name]
            rec["rss_end_mib"] = rss_mib(server.proc.pid)
            # soak: more rounds of requests at the highest concurrency on the same server, RSS after each
            soak_rss, soak_errors = [], 0
            for _ in range(soak):
                r = asyncio.run(level(server.base, bodies, max(levels), n, timeout))
                soak_errors += r["errors"]
                soak_rss.append(rss_mib(server.proc.pid))
            if soak:
                print(f"  {name:>13}  soak: {soak} x {n} requests at {max(levels)} clients, RSS MiB "
                      + " ".join(f"{x:.1f}" for x in soak_rss) + f", errors {soak_errors}", flush=True)
            rec["soak_rss_mib"], rec["soak_errors"] = soak_rss, soak_errors
            rec["batch_metrics"] = [ln for ln in server.metrics().splitlines()
                                    if "batch" in ln and not ln.startswith("#")]
        return [recs[name] for name, _ in variants]
    finally:
        for server in servers.values():
            server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the bella-vqa binary (a release build)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level and round")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each runs every variant once, interleaved)")
    ap.add_argument("--warmup", type=int, default=64, help="requests before measuring (at the highest concurrency)")
    ap.add_argument("--time-limit", type=float, default=900, help="no new round starts after this many seconds")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per request and for the server to start")
    ap.add_argument("--questions", choices=["all", "shapes", "photos"], default="all",
                    help="which demo questions: all, the shapes world only, the photographs only")
    ap.add_argument("--soak", type=int, default=0,
                    help="after the levels, this many more rounds of --requests at the highest concurrency (RSS after each)")
    ap.add_argument("--variants", default="default,max-batch-1",
                    help="servers to compare: default (its own --max-batch), max-batch-1, or both")
    ap.add_argument("--json", help="write every measurement to this file")
    args = ap.parse_args()

    levels = [int(c) for c in args.clients.split(",")]
    assert args.requests > 0 and args.rounds > 0 and all(0 < c <= 256 for c in levels)
    pairs, bodies = workload(args.questions)
    known = {"default": ("default", []), "max-batch-1": ("--max-batch 1", ["--max-batch", "1"])}
    try:
        variants = [known[v.strip()] for v in args.variants.split(",")]
    except KeyError as e:
        ap.error(f"unknown variant {e}: default, max-batch-1")
    print(f"serve_load: {args.bin}; {len(pairs)} demo (image, question) pairs ({args.questions}); {args.requests} requests per level; "
          f"clients {levels}; up to {args.rounds} rounds", flush=True)
    started = time.monotonic()
    runs = []
    for rnd in range(args.rounds):
        if rnd and time.monotonic() - started > args.time_limit:
            print(f"serve_load: time limit reached after {rnd} rounds", flush=True)
            break
        print(f"round {rnd + 1}", flush=True)
        runs += run_round(args.bin, variants, bodies, levels, args.requests, args.warmup, args.timeout, args.soak, rnd)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))

    rounds_done = max(r["round"] for r in runs)
    print()
    print(f"Medians over {rounds_done} round(s); {args.requests} requests per row and round; errors summed; "
          f"RSS: after {max(args.warmup, max(levels))} warm-up requests at {max(levels)} clients → after the last level "
          f"(the round with the largest growth).")
    print()
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | RSS MiB (start → end) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    med = statistics.median
    total_errors = 0
    rps = {}
    for name, _ in variants:
        vr = [r for r in runs if r["variant"] == name]
        growth = max(vr, key=lambda r: (r["rss_end_mib"] or 0) / (r["rss_start_mib"] or 1))
        for i, c in enumerate(levels):
            ls = [r["levels"][i] for r in vr]
            errs = sum(x["errors"] for x in ls)
            total_errors += errs
            rps[(name, c)] = med(x["rps"] for x in ls)
            rss = (f"{growth['rss_start_mib']:.1f} → {growth['rss_end_mib']:.1f}"
                   if i == len(levels) - 1 and growth["rss_start_mib"] else "")
            print(f"| {name} | {c} | {rps[(name, c)]:.1f} | {med(x['p50_ms'] for x in ls):.1f} | "
                  f"{med(x['p95_ms'] for x in ls):.1f} | {med(x['p99_ms'] for x in ls):.1f} | {errs} | {rss} |")
    print()
    for name, _ in variants if len(levels) > 1 else []:
        base = rps[(name, levels[0])]
        ups = ", ".join(f"{c} clients {rps[(name, c)] / base:.2f}x" for c in levels[1:])
        print(f"- {name}: throughput over {levels[0]} client: {ups}")
    if len(variants) == 2:
        ups = ", ".join(f"{c} clients {rps[('default', c)] / rps[('--max-batch 1', c)]:.2f}x" for c in levels)
        print(f"- default batching over --max-batch 1 (ratio of the medians): {ups}")
        # the two servers of a round were measured back to back: their ratio is the less noisy number
        paired = []
        for i, c in enumerate(levels):
            ratios = []
            for k in sorted({r["round"] for r in runs}):
                a = next(r for r in runs if r["round"] == k and r["variant"] == "default")["levels"][i]["rps"]
                b = next(r for r in runs if r["round"] == k and r["variant"] == "--max-batch 1")["levels"][i]["rps"]
                ratios.append(a / b)
            paired.append(f"{c} clients {med(ratios):.2f}x (rounds: " + " ".join(f"{x:.2f}" for x in ratios) + ")")
        print("- default batching over --max-batch 1, median of the paired per-round ratios: " + "; ".join(paired))
    for r in runs:
        for x in r["levels"]:
            if x["errors"]:
                print(f"- errors in round {r['round']}, {r['variant']}, {x['clients']} clients: {x['statuses']}")
    for r in runs[:len(variants)]:
        if r["batch_metrics"]:
            print(f"- /metrics batch lines after round {r['round']} ({r['variant']}): " + "; ".join(r["batch_metrics"][:6]))
    for r in runs:
        if r["soak_rss_mib"]:
            print(f"- soak, round {r['round']}, {r['variant']}: RSS MiB {r['rss_end_mib']:.1f} → "
                  + " → ".join(f"{x:.1f}" for x in r["soak_rss_mib"]) + f" ({r['soak_errors']} errors)")
        total_errors += r["soak_errors"]
    print(f"serve_load: {len(runs)} server runs in {time.monotonic() - started:.0f} s, {total_errors} errors")
    return 1 if total_errors else 0


if __name__ == "__main__":
    # SIGTERM (e.g. from CI's timeout) unwinds like Ctrl-C, so the server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
