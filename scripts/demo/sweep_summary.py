#!/usr/bin/env python3
"""A Markdown table, one row per variant of scripts/demo/sweep.sh: in-distribution accuracy, ECE and
share answered at the calibrated threshold (test split); on each out-of-distribution split the
share abstained, the share declined (abstained or answered "unanswerable"), and the OOD AUROC of
1 - confidence and of the epistemic uncertainty (mutual information).

    python3 scripts/demo/sweep_summary.py WORK_DIR VARIANT [VARIANT ...]
"""
import json
import sys
from pathlib import Path


def auroc(neg, pos):
    """P(score of a positive > score of a negative), ties counted half."""
    if not neg or not pos:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def ece(rows, bins=15):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [r for r in rows if lo < r["confidence"] <= hi or (b == 0 and r["confidence"] == 0)]
        if inside:
            conf = sum(r["confidence"] for r in inside) / len(inside)
            acc = sum(r["accuracy"] for r in inside) / len(inside)
            total += len(inside) / len(rows) * abs(conf - acc)
    return total


SPLITS = ["ood-absent", "ood-mismatched", "photos"]


def summary(work, name):
    """One Markdown table row; abstain / declined / AUROC (conf) / AUROC (MI) per split."""
    path = Path(work) / f"bench-{name}" / name / "samples.jsonl"
    if not path.exists():
        return f"| {name} | no samples ({path}) |"
    by_split = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_split.setdefault(r["split"], []).append(r)
    test = by_split.get("test", [])
    acc = 100 * sum(r["accuracy"] for r in test) / len(test)
    answered = 100 * sum(not r["abstained"] for r in test) / len(test)
    cells = [name, f"{acc:.1f}", f"{ece(test):.3f}", f"{answered:.1f}"]
    for split in SPLITS:
        rows = by_split.get(split, [])
        if not rows:
            cells.append("–")
            continue
        abstain = 100 * sum(r["abstained"] for r in rows) / len(rows)
        declined = 100 * sum(r["abstained"] or r["answer"] == "unanswerable" for r in rows) / len(rows)
        conf = auroc([1 - r["confidence"] for r in test], [1 - r["confidence"] for r in rows])
        mi = auroc(
            [r["uncertainty"]["epistemic"] for r in test],
            [r["uncertainty"]["epistemic"] for r in rows],
        )
        cells.append(f"{abstain:.1f} / {declined:.1f} / {conf:.2f} / {mi:.2f}")
    return "| " + " | ".join(cells) + " |"


def main():
    work, names = sys.argv[1], sys.argv[2:]
    print("| variant | acc | ECE | answered | " + " | ".join(SPLITS) + " |")
    print("|---|---|---|---|" + "---|" * len(SPLITS))
    for name in names:
        print(summary(work, name))


if __name__ == "__main__":
    main()
