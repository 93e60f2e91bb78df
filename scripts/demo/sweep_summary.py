#!/usr/bin/env python3
"""A Markdown table, one row per variant of scripts/demo/sweep.sh, from the results.json that
`bella-vqa bench` wrote (every number is computed by the Rust benchmark; this only lays them out):
test accuracy, ECE and share answered at the calibrated threshold; on each out-of-distribution
split the share abstained, the share declined (abstained or answered "unanswerable"), and the OOD
AUROC of 1 - confidence and of the epistemic uncertainty (mutual information).

    python3 scripts/demo/sweep_summary.py WORK_DIR VARIANT [VARIANT ...]
"""
import json
import sys
from pathlib import Path

SPLITS = ["ood-absent", "ood-mismatched", "photos"]


def row(work, name):
    path = Path(work) / f"bench-{name}" / name / "results.json"
    if not path.exists():
        return f"| {name} | no results ({path}) |"
    r = json.loads(path.read_text())["results"]
    cells = [name, f"{100 * r['vqa_accuracy']:.1f}", f"{r['ece']:.3f}", f"{100 * r['coverage']:.1f}"]
    for split in SPLITS:
        k = f"ood.{split}."
        if k + "coverage" not in r:
            cells.append("–")
            continue
        cells.append(
            f"{100 * (1 - r[k + 'coverage']):.1f} / {100 * r[k + 'declined']:.1f} / "
            f"{r[k + 'auroc_confidence']:.2f} / {r[k + 'auroc_epistemic']:.2f}"
        )
    return "| " + " | ".join(cells) + " |"


def main():
    work, names = sys.argv[1], sys.argv[2:]
    print("| variant | acc | ECE | answered | " + " | ".join(SPLITS) + " |")
    print("|---|---|---|---|" + "---|" * len(SPLITS))
    for name in names:
        print(row(work, name))


if __name__ == "__main__":
    main()
