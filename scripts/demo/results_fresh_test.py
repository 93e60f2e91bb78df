#!/usr/bin/env python3
"""Tables of eval/RESULTS.md's "A fresh test of 3000 questions" from bench --compare directories.

Usage: python3 scripts/demo/results_fresh_test.py WORK_DIR

Reads WORK_DIR/bench-s<seed>/ (temperature fitted to the answers' NLL) and, where present,
WORK_DIR/bench-conf-s<seed>/ (fitted with --temperature-objective confidence), each a
`bench --compare "ensemble=…,base,single=…"` of scripts/demo/particles_seeds.sh with TEST_DATA
set, and WORK_DIR/<method>[-conf]-s<seed>/calibrate.json for the temperatures and the confidence
maps. Every value and
interval is the Rust benchmark's (results.json, comparison.json), except conf − acc: the mean
confidence minus the mean accuracy of the test samples.
"""
import json
import sys
from pathlib import Path

if len(sys.argv) != 2:
    sys.exit(__doc__)
work = Path(sys.argv[1])


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cell(value, interval, scale=1.0, digits=3):
    if value is None:
        return "–"
    text = f"{value * scale:.{digits}f}"
    if interval:
        text += f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"
    return text


def diff(d, key, digits=3, scale=1.0):
    ci = d.get("intervals", {}).get(key)
    if not ci:
        return "–"
    star = "*" if ci[0] > 0 or ci[1] < 0 else ""
    return f"[{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]{star}"


print("| seed | method (temperature objective, T, confidence map) | acc | ECE | Brier | AURC | answered "
      "| conf − acc |")
print("|---|---|---|---|---|---|---|---|")
paired = []
def order(path):
    return int(path.name.rsplit("-s", 1)[1]), path.name.startswith("bench-conf")


for bench in sorted(work.glob("bench*-s*"), key=order):
    seed = int(bench.name.rsplit("-s", 1)[1])
    objective = "confidence" if bench.name.startswith("bench-conf") else "answers"
    comparison = load(bench / "comparison.json")
    if comparison is None:
        continue
    for method in ["base", "single", "ensemble"]:
        if method == "base" and objective == "confidence":
            continue  # the same base as in bench-s<seed>
        res = load(bench / method / "results.json")
        if res is None:
            continue
        r, ci = res["results"], res.get("intervals", {})
        test = [json.loads(line) for line in open(bench / method / "samples.jsonl")]
        test = [s for s in test if s.get("split") == "test"]
        gap = sum(s["confidence"] - s["accuracy"] for s in test) / len(test)
        label = method
        if method != "base":
            suffix = "-conf" if objective == "confidence" else ""
            cal = load(work / f"{method}{suffix}-s{seed}" / "calibrate.json") or {}
            abstention = cal.get("abstention") or {}
            t = abstention.get("temperature")
            kind = (abstention.get("confidence_map") or {}).get("kind", "none")
            label += f" ({objective}, {t:.3f}, {kind})" if t else f" ({objective}, none, {kind})"
        print(f"| {seed} | {label} | {cell(r.get('vqa_accuracy'), ci.get('vqa_accuracy'), 100, 1)} | "
              f"{cell(r.get('ece'), ci.get('ece'))} | {cell(r.get('brier'), ci.get('brier'))} | "
              f"{cell(r.get('aurc'), ci.get('aurc'))} | "
              f"{cell(r.get('coverage'), ci.get('coverage'), 100, 1)} | {gap * 100:+.1f} |")
    for d in comparison.get("differences", []):
        paired.append((seed, objective, d))

print()
print("Paired (method − ensemble), 95 % intervals; * when 0 is outside.")
print()
print("| seed | objective | method | acc (points) | ECE | Brier | AURC |")
print("|---|---|---|---|---|---|---|")
for seed, objective, d in paired:
    print(f"| {seed} | {objective} | {d['name']} | {diff(d, 'vqa_accuracy', 1, 100)} | "
          f"{diff(d, 'ece')} | {diff(d, 'brier')} | {diff(d, 'aurc')} |")
