#!/usr/bin/env python3
"""Formats eval/RESULTS.md from the results.json files that `bella-vqa bench --compare` wrote.

Every number is computed by the Rust benchmark; this script only lays them out.
Usage: python3 scripts/demo/results_table.py RUNS_DIR/bench > eval/RESULTS.md
"""
import json
import struct
import sys
from pathlib import Path

bench = Path(sys.argv[1])
comparison = json.loads((bench / "comparison.json").read_text())
names = [e["name"] if isinstance(e, dict) else e for e in comparison.get("entries", [])] or sorted(
    p.name for p in bench.iterdir() if (p / "results.json").exists()
)


def trainable(adapters):
    """Values in particles.safetensors (the safetensors header lists every tensor's shape)."""
    if not adapters:
        return 0
    path = Path(adapters) / "particles.safetensors"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            size = 1
            for d in v["shape"]:
                size *= d
            total += size
    return total


def fmt(v, pct=False):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


rows = []
splits = None
for name in names:
    res = json.loads((bench / name / "results.json").read_text())
    r = res["results"]
    cfg = res["config"]
    adapters = (cfg.get("adapters") or {}).get("path")
    particles = (cfg.get("adapters") or {}).get("particles") or 1
    rows.append((name, particles, trainable(adapters), r, res.get("config", {})))
    if splits is None:
        splits = sorted({k.split(".")[1] for k in r if k.startswith("ood.")})

print("# Demo world results\n")
print("Produced by `scripts/demo/particles.sh` (training, calibration on validation questions,")
print("`bella-vqa bench --compare`) and laid out by `scripts/demo/results_table.py`.")
print("Base: `demo/llava` (shapes world, trained from scratch, `scripts/demo/train_base.py`).")
print("VQA accuracy (official), ECE (15 equal-width bins), AURC, coverage at 5 % risk and Φ₁₀ use")
print("thresholds chosen on the validation split; answered/abstain = share of questions at/below the")
print("calibrated threshold; declined = abstained or answered \"unanswerable\" (the response then says")
print("the question cannot be answered from the image); OOD AUROC: the split against the")
print("in-distribution test questions, scored by 1 − confidence (conf) and by the epistemic")
print("uncertainty (MI). Values in %, except ECE/AURC.\n")
print("| model | P | trainable | threshold | " + " | ".join(["acc", "ECE", "AURC", "cov@5%", "Φ₁₀", "answered", "declined"]) + " |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, p, n, r, _ in rows:
    print(f"| {name} | {p} | {n:,} | {fmt(r.get('threshold'))} | {fmt(r.get('vqa_accuracy'), True)} | {fmt(r.get('ece'))} | "
          f"{fmt(r.get('aurc'))} | {fmt(r.get('coverage_at_risk_5pct'), True)} | {fmt(r.get('phi_10'), True)} | {fmt(r.get('coverage'), True)} | "
          f"{fmt(r.get('declined'), True)} |")
for split in splits or []:
    print(f"\n## {split}\n")
    print("| model | acc | ECE | AURC | cov@5% | Φ₁₀ | abstain | declined | OOD AUROC (conf) | OOD AUROC (MI) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _, _, r, _ in rows:
        k = f"ood.{split}."
        cov = r.get(k + "coverage")
        abstain = None if cov is None else 1 - cov
        print(f"| {name} | {fmt(r.get(k + 'vqa_accuracy'), True)} | {fmt(r.get(k + 'ece'))} | {fmt(r.get(k + 'aurc'))} | "
              f"{fmt(r.get(k + 'coverage_at_risk_5pct'), True)} | {fmt(r.get(k + 'phi_10'), True)} | {fmt(abstain, True)} | "
              f"{fmt(r.get(k + 'declined'), True)} | {fmt(r.get(k + 'auroc_confidence'))} | {fmt(r.get(k + 'auroc_epistemic'))} |")
