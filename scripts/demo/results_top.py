#!/usr/bin/env python3
"""Formats the table "Particles on the top layer only" of eval/RESULTS-notes.md from the runs of
scripts/demo/top_layers.sh (issue 10 §3).

Usage: python3 scripts/demo/results_top.py WORK_DIR

Reads WORK_DIR/bench-top-s<seed>/comparison.json (bench --compare of ensemble-top against
ensemble: every metric with its 95 % bootstrap interval and the paired difference's interval)
and the training logs WORK_DIR/ensemble{,-top}-s<seed>/train_log.jsonl. Cells: mean ± sd over
seeds; the difference column gives each seed's paired difference (ensemble − top layer) and its
interval, * when the interval excludes 0.
"""
import json
import statistics
import sys
from pathlib import Path

if len(sys.argv) != 2:
    sys.exit(__doc__)
work = Path(sys.argv[1])
runs = sorted(work.glob("bench-top-s*/comparison.json"), key=lambda p: int(p.parent.name.split("-s")[-1]))
if not runs:
    sys.exit(f"no {work}/bench-top-s*/comparison.json: run scripts/demo/top_layers.sh first")

ROWS = [
    ("ID accuracy", "vqa_accuracy", True),
    ("ID answered", "coverage", True),
    ("ID ECE", "ece", False),
    ("ID AURC", "aurc", False),
    ("ood-absent declined", "ood.ood-absent.declined", True),
    ("ood-absent AUROC (selector)", "ood.ood-absent.auroc_selector", False),
    ("ood-mismatched declined", "ood.ood-mismatched.declined", True),
    ("ood-mismatched AUROC (selector)", "ood.ood-mismatched.auroc_selector", False),
    ("ood-unseen-pairs declined", "ood.ood-unseen-pairs.declined", True),
    ("photos declined", "ood.photos.declined", True),
]


def value(results, key):
    if key.startswith("ood."):
        _, split, metric = key.split(".", 2)
        if metric.startswith("auroc_"):
            return results["ood"][split][metric[len("auroc_"):]]["auroc"]
        return results["ood"][split][metric]
    return results[key]


def fmt(v, pct):
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def mean_sd(values, pct):
    if len(values) == 1:
        return fmt(values[0], pct)
    return f"{fmt(statistics.mean(values), pct)} ± {fmt(statistics.stdev(values), pct)}"


def seconds(run):
    last = None
    for line in (work / run / "train_log.jsonl").read_text().splitlines():
        try:
            last = json.loads(line)
        except ValueError:
            pass
    return last and last.get("elapsed_seconds")


seeds, data = [], []
for path in runs:
    c = json.loads(path.read_text())
    full = {}
    for r in c["runs"]:
        full[r["name"]] = json.loads((Path(r["dir"]) / "results.json").read_text())
    diff = next(d for d in c["differences"] if d["name"] == "ensemble")
    seeds.append(path.parent.name.split("-s")[-1])
    data.append((full, diff))

print(f"| seeds {', '.join(seeds)}, P = 4 | everywhere | top layer only | paired difference per seed (everywhere − top) |")
print("|---|---|---|---|")
for label, key, pct in ROWS:
    every, top, diffs = [], [], []
    for full, diff in data:
        flat = lambda r: {**r["results"], "ood": r["ood"]}  # noqa: E731
        e, t = value(flat(full["ensemble"]), key), value(flat(full["ensemble-top"]), key)
        every.append(e)
        top.append(t)
        lo, hi = diff["intervals"].get(key, (None, None))
        star = " *" if lo is not None and (lo > 0 or hi < 0) else ""
        scale = 100 if pct else 1
        ci = f" [{lo * scale:+.{1 if pct else 3}f}, {hi * scale:+.{1 if pct else 3}f}]" if lo is not None else ""
        diffs.append(f"{(e - t) * scale:+.{1 if pct else 3}f}{ci}{star}")
    print(f"| {label} | {mean_sd(every, pct)} | {mean_sd(top, pct)} | {'; '.join(diffs)} |")
times = [(seconds(f"ensemble-s{s}"), seconds(f"ensemble-top-s{s}")) for s in seeds]
if all(a and b for a, b in times):
    print(f"| training time (s, 750 steps; per seed) | {' / '.join(f'{a:.0f}' for a, _ in times)} | "
          f"{' / '.join(f'{b:.0f}' for _, b in times)} | {', '.join(f'{a / b:.1f}×' for a, b in times)} |")
