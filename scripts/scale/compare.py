#!/usr/bin/env python3
"""bella-vqa side by side with transformers + PEFT on one checkpoint: interleaved rounds, medians, ratios.

    PY=~/.cache/bella-vqa/venv-scale/bin/python
    $PY scripts/scale/compare.py --model ~/.cache/bella-vqa/real-size/llava-1.5-7b-hf-L2 \\
        --particles 1,4,8 --rounds 3 [--dtype f32|bf16|f16] [--device cpu|cuda] [--layers-from K] \\
        [--train] [--ask-check 4] [--markdown eval/SCALE.md]

What runs (each configuration in a fresh process, so that load and peak memory are its own):

- bella-vqa: the `ask_latency` bench (benches/ask_latency.rs) with `--model-dir MODEL --modes batched
  --parts ask,decode --no-base --warmup W --runs R --decode 15` and the particles on the same layers
  as the peer's adapters (`--targets`): `ask` = one whole `BellaVqa::ask_with` (vision tower once,
  all P particles batched, greedy ≤ 16 tokens, candidate scoring, aggregation), decode = cached
  decode steps of all P rows, per step; peak RSS while answering.
- the peer (scripts/scale/peft_bench.py): the same image + question, P adapters loaded with
  `load_adapter`, answered sequentially with `set_adapter` and in one mixed batch with `adapter_names`
  (P > 1), greedy, max_new_tokens 16.
- `--ask-check P`: `bella-vqa ask --json` once with the peer's own adapters imported as particles
  (`import-peft`), so the answers of both sides can be compared (f32: equal greedy tokens expected).
- `--train`: one step of P = 4 rank-8 adapters: `bella-vqa train --max-steps 1` (process wall time,
  minus its load time measured by an `inspect` of the same model) against PEFT training the four
  adapters one after the other (step time measured in-process; load separately).

The configurations take turns within a round and the order flips every round; every number is the
median over rounds. `--markdown FILE` writes the tables between the markers
`<!-- scale-compare:begin -->` and `<!-- scale-compare:end -->` of FILE (created if missing; the rest
of the file is kept). Flags that bella-vqa may not have yet (`--dtype`, `--device`) are passed to the
CLI only when its `--help` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / "scripts" / "scale" / "peft_bench.py"
CACHE = Path(os.environ.get("BELLA_REAL_SIZE_DIR", Path.home() / ".cache" / "bella-vqa" / "real-size"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
IMAGE = "tests/fixtures/images/photo.png"
QUESTION = "What color is the circle?"
BEGIN, END = "<!-- scale-compare:begin -->", "<!-- scale-compare:end -->"

LOG: list[str] = []


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float, int]:
    """Runs `cmd`, returns (stdout, wall seconds, peak RSS of the process in bytes, by /usr/bin/time)."""
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    LOG.append(line)
    print(f"$ {line}", file=sys.stderr, flush=True)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        prefix = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name] if Path("/usr/bin/time").exists() else []
        t0 = time.perf_counter()
        proc = subprocess.run(prefix + [str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        try:
            rss = int(Path(rss_file.name).read_text().split()[-1]) * 1024
        except (ValueError, IndexError):
            rss = 0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {line}")
    return proc.stdout, wall, rss


def result_line(out: str) -> dict:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit("no RESULT line in:\n" + out[-2000:])


def newest(kind: str, pattern: str) -> Path | None:
    """The newest executable matching `pattern` under TARGET/kind, or None."""
    found = [p for p in (TARGET / kind).glob(pattern)
             if p.is_file() and os.access(p, os.X_OK) and p.suffix == ""]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def release_or_debug(pattern: str, build: str) -> Path:
    """A release build when there is one (a debug build is never timed silently)."""
    found = newest("release", pattern)
    if found is None:
        found = newest("debug", pattern)
        if found is None:
            raise SystemExit(f"no {pattern} under {TARGET}: {build}")
        print(f"warning: timing a debug build, {found}", file=sys.stderr)
    return found


def find_bench() -> Path:
    return release_or_debug("deps/ask_latency-*", "cargo bench --bench ask_latency --no-run")


def find_cli() -> Path:
    return release_or_debug("bella-vqa", "cargo build --release")


def cli_flags(cli: Path, sub: str, args) -> list[str]:
    """--dtype/--device for a bella-vqa subcommand, if it has them (they land with issue 10)."""
    help_text = subprocess.run([str(cli), sub, "--help"], capture_output=True, text=True).stdout
    out = []
    if "--dtype" in help_text:
        out += ["--dtype", args.dtype]
    elif args.dtype != "f32":
        raise SystemExit(f"bella-vqa {sub} has no --dtype yet: only f32 can be compared")
    if "--device" in help_text:
        out += ["--device", args.device]
    elif args.device != "cpu":
        raise SystemExit(f"bella-vqa {sub} has no --device yet")
    return out


def targets(layers_from: int | None, num_layers: int) -> str:
    projs = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if layers_from:
        rng = f"{layers_from}-{num_layers - 1}" if layers_from < num_layers - 1 else str(layers_from)
        return ",".join(f"language_model.layers.{rng}.*.{p}" for p in projs)
    return ",".join(f"language_model.*.{p}" for p in projs)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description="bella-vqa vs transformers + PEFT")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--particles", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1, help="timed calls per process (median)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls per process before the timed ones")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers-from", type=int, default=None, help="particles/adapters only on layers >= K")
    ap.add_argument("--peer-modes", default="sequential,batched")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the peer")
    ap.add_argument("--train", action="store_true", help="also one training step with P = 4")
    ap.add_argument("--ask-check", type=int, default=None, metavar="P",
                    help="also `bella-vqa ask --json` with the peer's P adapters imported")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--title", default=None, help="heading of the Markdown section")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model = args.model.resolve()
    cfg = json.loads((model / "config.json").read_text())
    num_layers = cfg["text_config"].get("num_hidden_layers", 32)
    ps = [int(p) for p in args.particles.split(",")]
    peer_modes = args.peer_modes.split(",")
    tag = f"{model.name}-from{args.layers_from or 0}"
    adapters = CACHE / f"peft-{tag}"
    bench, cli = find_bench(), find_cli()
    tgt = targets(args.layers_from, num_layers)
    common_peer = ["--model", model, "--adapters", adapters, "--dtype", args.dtype, "--device", args.device]
    if args.threads:
        common_peer += ["--threads", str(args.threads)]
    layers = ["--layers-from", str(args.layers_from)] if args.layers_from else []

    # adapters for the peer (and, imported, for bella-vqa's ask check)
    run([args.python, PEER, "prepare", *common_peer, "--particles", str(max(ps + [4])), *layers])

    configs = []
    for p in ps:
        configs.append(("bella", "batched", p))
        for m in peer_modes:
            if m == "batched" and p == 1:
                continue
            configs.append(("peer", m, p))
    rows: dict[tuple, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for c in order:
            side, mode, p = c
            print(f"round {r + 1}/{args.rounds}: {side} {mode} P = {p}", file=sys.stderr, flush=True)
            if side == "bella":
                with tempfile.TemporaryDirectory() as tmp:
                    js = Path(tmp) / "bench.json"
                    out, wall, _ = run([bench, "--model-dir", model, "--particles", str(p), "--rounds", "1",
                                        "--runs", str(args.runs), "--warmup", str(args.warmup), "--decode", "15",
                                        "--modes", "batched", "--parts", "ask,decode", "--no-base",
                                        "--targets", tgt, "--dtype", args.dtype, "--device", args.device,
                                        "--json", js])
                    m = json.loads(js.read_text())["results"][0]
                rows[c].append({"answer_s": m["ask_ms"] / 1e3, "decode_per_token_s": m["decode_ms"] / 1e3 / m["decode_steps"],
                                "peak_rss_bytes": m["rss_peak"], "rss_loaded_bytes": m["rss_loaded"],
                                "prompt_tokens": m["prompt_tokens"], "process_s": wall})
            else:
                out, wall, _ = run([args.python, PEER, "answer", *common_peer, "--particles", str(p), "--mode", mode,
                                    "--runs", str(args.runs), "--warmup", str(args.warmup)])
                res = result_line(out)
                res["process_s"] = wall
                rows[c].append(res)

    summary = {}
    for c, rs in rows.items():
        summary[c] = {k: med([x.get(k) for x in rs]) for k in
                      ("answer_s", "decode_per_token_s", "peak_rss_bytes", "process_s", "load_s")}
        summary[c]["rounds"] = [x["answer_s"] for x in rs]
        if c[0] == "peer":
            summary[c]["answers"] = rs[-1]["answers"]
            summary[c]["prompt_tokens"] = rs[-1]["prompt_tokens"]
            summary[c]["versions"] = rs[-1]["versions"]
        else:
            summary[c]["prompt_tokens"] = rs[-1]["prompt_tokens"]

    ask_check = None
    if args.ask_check:
        p = args.ask_check
        pdir = CACHE / f"bella-{tag}-P{p}"
        if not (pdir / "bella_config.json").is_file():
            run([cli, "import-peft", "--quiet", "--peft", *[adapters / f"p{i}" for i in range(p)], "--out", pdir,
                 "--model", model])
        out, wall, rss = run([cli, "ask", "--quiet", "--model", model, "--adapters", pdir, "--image", IMAGE,
                              "--json", "--threshold", "0", *cli_flags(cli, "ask", args), QUESTION])
        js = json.loads(out)
        ask_check = {"particles": p, "wall_s": wall, "peak_rss_bytes": rss,
                     "answers": [x["answer"] for x in js["particles"]], "prompt_tokens": js.get("prompt_tokens")}

    train = None
    if args.train:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.jsonl"
            data.write_text(json.dumps({"question_id": "q0", "image": str(REPO / IMAGE), "question": QUESTION,
                                        "answers": ["red"]}) + "\n")
            _, load_wall, _ = run([cli, "inspect", "--model", model, *cli_flags(cli, "inspect", args)])
            _, wall, rss = run([cli, "train", "--quiet", "--model", model, "--data", data, "--out", Path(tmp) / "out",
                                "--particles", "4", "--rank", "8", "--alpha", "16", "--batch-size", "1",
                                "--max-steps", "1", "--epochs", "1", "--targets", tgt, *cli_flags(cli, "train", args)])
            out, pwall, _ = run([args.python, PEER, "train", *common_peer, "--particles", "4", "--runs", "1",
                                 "--warmup", "0"])
            peer = result_line(out)
        train = {"bella": {"process_s": wall, "inspect_process_s": load_wall, "step_s_est": wall - load_wall,
                           "peak_rss_bytes": rss},
                 "peer": {**peer, "process_s": pwall}}

    md = markdown(args, model, num_layers, ps, peer_modes, summary, ask_check, train, tgt)
    print(md)
    if args.markdown:
        write_section(args.markdown, md)
    if args.json:
        args.json.write_text(json.dumps({"summary": {" ".join(map(str, k)): v for k, v in summary.items()},
                                         "rows": {" ".join(map(str, k)): v for k, v in rows.items()},
                                         "ask_check": ask_check, "train": train, "commands": LOG}, indent=2))
    return 0


def gib(b):
    return f"{b / 2**30:.2f}" if b else "–"


def markdown(args, model, num_layers, ps, peer_modes, s, ask_check, train, tgt) -> str:
    where = f"layers ≥ {args.layers_from}" if args.layers_from else "every layer"
    title = args.title or (f"transformers + PEFT side by side: {model.name}, {args.dtype}, {args.device}, "
                           f"particles on {where}")
    versions = next((v["versions"] for k, v in s.items() if k[0] == "peer"), {})
    prompt = next((v["prompt_tokens"] for k, v in s.items()), None)
    lines = [f"### {title}", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU threads; "
             f"peer: torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
             f"peft {versions.get('peft')}.",
             f"- Model: `{model}` ({num_layers} language-model layers), prompt {prompt} tokens "
             f"(576 image tokens), question {QUESTION!r} on `{IMAGE}`, greedy, ≤ 16 new tokens.",
             f"- Particles / adapters: rank 8, α 16, q/k/v/o of the language model on {where} "
             f"(bella-vqa `--targets {tgt}`).",
             f"- Medians over {args.rounds} interleaved round(s); per process {args.warmup} warm-up + "
             f"{args.runs} timed call(s). Time to answer excludes loading. Peak RSS: while answering "
             "(VmHWM reset after loading).",
             f"- Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             "| P | side | path | time to answer (s) | decode / token (ms) | peak RSS answering (GiB) | per round (s) |",
             "|---|---|---|---:|---:|---:|---|"]
    for p in ps:
        for k, v in s.items():
            if k[2] != p:
                continue
            side = "bella-vqa" if k[0] == "bella" else "transformers + PEFT"
            path = "batched particles" if k[0] == "bella" else (
                "`set_adapter` in turn" if k[1] == "sequential" else "`adapter_names` batch")
            rounds = ", ".join(f"{x:.1f}" for x in v["rounds"])
            dpt = v["decode_per_token_s"]
            lines.append(f"| {p} | {side} | {path} | {v['answer_s']:.1f} | "
                         f"{dpt * 1e3:.0f} | {gib(v['peak_rss_bytes'])} | {rounds} |" if dpt is not None else
                         f"| {p} | {side} | {path} | {v['answer_s']:.1f} | – | {gib(v['peak_rss_bytes'])} | {rounds} |")
    lines += ["", "Ratios (peer time / bella-vqa time; > 1: bella-vqa is faster):", ""]
    for p in ps:
        b = s.get(("bella", "batched", p))
        peers = {m: s.get(("peer", m, p)) for m in peer_modes if s.get(("peer", m, p))}
        if not b or not peers:
            continue
        fastest = min(peers.items(), key=lambda kv: kv[1]["answer_s"])
        cells = ", ".join(f"{m} {v['answer_s'] / b['answer_s']:.2f}×" for m, v in peers.items())
        dec = ", ".join(f"{m} {v['decode_per_token_s'] / b['decode_per_token_s']:.2f}×" for m, v in peers.items()
                        if v.get("decode_per_token_s") and b.get("decode_per_token_s"))
        lines.append(f"- P = {p}: time to answer {cells} (fastest peer way: {fastest[0]}, "
                     f"{fastest[1]['answer_s'] / b['answer_s']:.2f}×); decode per token {dec}")
    one = s.get(("bella", "batched", 1))
    if one:
        for p in ps:
            b = s.get(("bella", "batched", p))
            if p != 1 and b:
                lines.append(f"- bella-vqa P = {p} / P = 1: answer {b['answer_s'] / one['answer_s']:.2f}×, "
                             f"decode per token {b['decode_per_token_s'] / one['decode_per_token_s']:.2f}×")
    if ask_check:
        peer = s.get(("peer", "sequential", ask_check["particles"]))
        lines += ["", f"Same adapters on both sides (`import-peft` of the peer's P = {ask_check['particles']} "
                      f"adapters, `ask --json`; process wall {ask_check['wall_s']:.1f} s including load, "
                      f"peak RSS {gib(ask_check['peak_rss_bytes'])} GiB):", ""]
        for i, a in enumerate(ask_check["answers"]):
            pa = peer["answers"][i] if peer and i < len(peer["answers"]) else None
            same = "same" if pa is not None and pa.strip() == a.strip() else "DIFFERENT"
            lines.append(f"- particle {i}: bella-vqa {a!r} / PEFT {pa!r}: {same}")
    if train:
        b, p = train["bella"], train["peer"]
        lines += ["", "One training step, P = 4 rank-8 adapters (one image + question + answer):", "",
                  "| side | how | step (s) | process wall (s) | peak RSS (GiB) |", "|---|---|---:|---:|---:|",
                  f"| bella-vqa | `train --max-steps 1`, all particles batched | ≈ {b['step_s_est']:.1f} (wall − "
                  f"`inspect` wall {b['inspect_process_s']:.1f}) | {b['process_s']:.1f} | {gib(b['peak_rss_bytes'])} "
                  "(incl. load) |",
                  f"| transformers + PEFT | the four adapters in turn | {p['step_s']:.1f} | {p['process_s']:.1f} | "
                  f"{gib(p['peak_rss_with_load_bytes'])} (incl. load; {gib(p['peak_rss_bytes'])} in the step) |"]
    lines += ["", "<details><summary>commands</summary>", "", "```"] + LOG + ["```", "", "</details>", ""]
    return "\n".join(lines)


def write_section(path: Path, md: str) -> None:
    text = path.read_text() if path.exists() else "# Real-size checkpoints\n\n"
    block = f"{BEGIN}\n{md}\n{END}"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
