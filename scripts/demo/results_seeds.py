#!/usr/bin/env python3
"""Formats eval/RESULTS.md from the runs of scripts/demo/particles_seeds.sh (issue 12).

Usage: python3 scripts/demo/results_seeds.py WORK_DIR [--probe PROBE_DIR] > eval/RESULTS.md

Reads WORK_DIR/bench-s<seed>/ (bench --compare: results.json with 95 % bootstrap intervals,
comparison.json with paired differences against the ensemble, samples.jsonl), and
WORK_DIR/<method>-s<seed>/ (calibrate.json, train_summary.json, train_log.jsonl).

Every metric and interval is computed by the Rust benchmark, except the Learn-then-Test
thresholds at 1/5/10 % risk, computed here from the validation answers bench recorded
(the same test as src/guarantee.rs: binomial / Hoeffding-Bentkus p-values, two fixed sequences at
level delta/2), and their coverage and risk on the test questions (answer when score >= threshold).
Mean +- sd are over seeds; [lo, hi] is the mean over seeds of each seed's 95 % bootstrap interval.
"""
import json
import math
import statistics
import sys
from pathlib import Path

args = sys.argv[1:]
if not args:
    sys.exit(__doc__)
work = Path(args[0])
probe = None
if "--probe" in args:
    probe = Path(args[args.index("--probe") + 1])
notes = None
if "--notes" in args:
    notes = Path(args[args.index("--notes") + 1])

METHODS = ["base", "single", "ensemble", "svgd", "svgd-rep"]
LABEL = {
    "base": "base",
    "single": "single (P=1)",
    "ensemble": "Bella ensemble",
    "svgd": "SVGD (w=1)",
    "svgd-rep": "SVGD (repulsion)",
}
SPLITS = ["ood-unseen-pairs", "ood-absent", "ood-corrupted", "ood-mismatched", "ood-unanswerable", "photos"]
DELTA = 0.1


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_samples(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Learn then Test, as src/guarantee.rs


def log_binomial_cdf(k, n, p):
    if k >= n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return -math.inf
    lp, lq = math.log(p), math.log(1.0 - p)
    log_pmf = n * lq
    log_sum = log_pmf
    for i in range(k):
        log_pmf += math.log(n - i) - math.log(i + 1) + lp - lq
        hi, lo = max(log_pmf, log_sum), min(log_pmf, log_sum)
        log_sum = hi + math.log1p(math.exp(lo - hi))
    return min(log_sum, 0.0)


def p_value(n, loss_sum, alpha, binary):
    if n == 0:
        return 1.0
    if binary:
        k = int(math.floor(loss_sum + 1e-9))
        return math.exp(log_binomial_cdf(k, n, alpha))
    r = min(max(loss_sum / n, 0.0), 1.0)
    a = min(r, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h)
    k = max(math.ceil(n * r - 1e-9), 0)
    bentkus = math.e * math.exp(log_binomial_cdf(k, n, alpha))
    return min(hoeffding, bentkus, 1.0)


def learn_then_test(scores, loss, alpha, delta):
    """(threshold, answered, n) or None when no threshold is guaranteed."""
    n_all = len(scores)
    if n_all == 0:
        return None
    binary = all(l in (0.0, 1.0) for l in loss)
    order = sorted(range(n_all), key=lambda i: -scores[i])
    steps, s = [], 0.0
    for pos, i in enumerate(order):
        s += loss[i]
        if pos + 1 == n_all or scores[order[pos + 1]] != scores[i]:
            steps.append((scores[i], pos + 1, s))
    level = delta / 2

    def start(share):
        for n in range(1, n_all + 1):
            sm = n * alpha * share
            if p_value(n, math.floor(sm) if binary else sm, alpha, binary) <= level:
                return n
        return None

    def sequence(first):
        last = None
        for t, n, sm in steps:
            if n < first:
                continue
            if p_value(n, sm, alpha, binary) <= level:
                last = (t, n, sm)
            else:
                break
        return last

    best = None
    for first in (start(0.0), start(0.5)):
        if first is None:
            continue
        r = sequence(first)
        if r and (best is None or r[1] > best[1]):
            best = r
    return None if best is None else (best[0], best[1], n_all)


def score_of(s):
    return s["score"] if s.get("score") is not None else s["confidence"]


# ---------------------------------------------------------------------------------------------
# collecting

benches = sorted((b for b in work.glob("bench-s*") if b.is_dir()), key=lambda p: int(p.name.split("-s")[-1]))
runs = {}  # method -> list of per-seed dicts
for bench in benches:
    seed = int(bench.name.split("-s")[-1])
    comparison = read_json(bench / "comparison.json") or {}
    diffs = {d["name"]: d for d in comparison.get("differences", [])} if isinstance(comparison, dict) else {}
    for method in METHODS:
        res = read_json(bench / method / "results.json")
        if res is None:
            continue
        samples = read_samples(bench / method / "samples.jsonl")
        cal = read_json(work / f"{method}-s{seed}" / "calibrate.json") if method != "base" else None
        summ = read_json(work / f"{method}-s{seed}" / "train_summary.json") if method != "base" else None
        runs.setdefault(method, []).append(
            {
                "seed": seed,
                "r": res["results"],
                "ci": res.get("intervals", {}),
                "samples": samples,
                "cal": cal,
                "summary": summ,
                "diff": diffs.get(method),
                "config": res.get("config", {}),
            }
        )

seeds = sorted({r["seed"] for rs in runs.values() for r in rs})


def guaranteed(run, alpha, split="test"):
    """LTT on the val samples; (val coverage, test coverage, test risk) or None (refused)."""
    val = [s for s in run["samples"] if s.get("split") == "val"]
    if not val:
        return None
    got = learn_then_test([score_of(s) for s in val], [1 - s["accuracy"] for s in val], alpha, DELTA)
    if got is None:
        return ("refused", len(val))
    thr, answered, n = got
    test = [s for s in run["samples"] if s.get("split") == split]
    ans = [s for s in test if score_of(s) >= thr]
    cov = len(ans) / len(test) if test else None
    risk = (1 - sum(s["accuracy"] for s in ans) / len(ans)) if ans else None
    return (answered / n, cov, risk)


# ---------------------------------------------------------------------------------------------
# formatting


def mean_sd(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, sd, len(values)


def fmt_num(v, pct):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def cell(method, key, pct=False, with_ci=True):
    rs = runs.get(method, [])
    m, sd, n = mean_sd([r["r"].get(key) for r in rs])
    if m is None:
        return "–"
    out = fmt_num(m, pct)
    if n > 1 and method != "base":
        out += " ± " + fmt_num(sd, pct)
    if with_ci:
        los = [r["ci"][key][0] for r in rs if key in r["ci"]]
        his = [r["ci"][key][1] for r in rs if key in r["ci"]]
        if los:
            out += f" [{fmt_num(statistics.fmean(los), pct)}, {fmt_num(statistics.fmean(his), pct)}]"
    return out


def abstain_cell(method, prefix):
    rs = runs.get(method, [])
    key = prefix + "coverage"
    vals = [1 - r["r"][key] for r in rs if r["r"].get(key) is not None]
    m, sd, n = mean_sd(vals)
    if m is None:
        return "–"
    out = fmt_num(m, True) + (" ± " + fmt_num(sd, True) if n > 1 and method != "base" else "")
    cis = [r["ci"][key] for r in rs if key in r["ci"]]
    if cis:
        out += f" [{fmt_num(1 - statistics.fmean(c[1] for c in cis), True)}, {fmt_num(1 - statistics.fmean(c[0] for c in cis), True)}]"
    return out


def guar_cell(method, alpha):
    rs = runs.get(method, [])
    vals = [guaranteed(r, alpha) for r in rs]
    refused = sum(1 for v in vals if v and v[0] == "refused")
    ok = [v for v in vals if v and v[0] != "refused"]
    if not ok:
        return "refused" if refused else "–"
    cov = mean_sd([v[1] for v in ok])[0]
    risk = mean_sd([v[2] for v in ok])[0]
    out = f"{fmt_num(cov, True)} (risk {fmt_num(risk, True)})"
    if refused:
        out += f", refused in {refused}/{len(vals)}"
    return out


def p(*a):
    print(*a)


def selector_names(method):
    names = []
    for r in runs.get(method, []):
        if r["cal"]:
            names.append(r["cal"]["abstention"]["selector"]["name"])
        else:
            names.append(r["config"].get("selector") or "confidence")
    return names


# ---------------------------------------------------------------------------------------------

p("# Demo world results (issue 12: selectors, temperature, guarantee, seeds, intervals)\n")
p("Produced by `scripts/demo/particles_seeds.sh` (training, `calibrate --selector auto` with a")
p("temperature, `bench --compare --bootstrap 1000`) and laid out by `scripts/demo/results_seeds.py`.")
p("Base: `demo/llava`. Particles: rank 8, α 16 on the attention projections of the language model")
p("and of the vision tower, B ~ N(0, 0.1), lr 2e-3, batch 4, one epoch, on the shapes world of")
world = read_json(work / "world" / "shapes.json") or {}
world_seed = world.get("seed", "?")
# Worlds written before shapes.json recorded the share were made with the script's 15 %.
absent = world.get("absent_share", 0.15)
p(f"`scripts/demo/particles.sh` (seed {world_seed}, {absent * 100:.0f} % absent-object training scenes).")
p(f"Seeds: {', '.join(map(str, seeds)) or 'none yet'}.")
if notes is not None:
    p("How the runs were sized, the choice of the repulsion and the closing note on the targets:")
    p("below the tables.")
partial = [b.name for b in benches if not (b / "comparison.json").exists()]
if partial:
    p(f"**Partial**: {', '.join(partial)} not finished (no comparison.json): its finished runs are")
    p("included, without paired intervals.")
p()
p("Cells: mean ± sd over seeds [95 % bootstrap interval, its ends averaged over the seeds]. The base")
p("model is deterministic (one value). Values in %, except ECE, NLL, Brier, AURC and AUROC.")
p("ECE: 15 equal-width bins; NLL and Brier of the binary event \"the answer is right\"; AURC with the")
p("chosen selector's score; coverage at risk: *val thr.* = the threshold for that risk chosen on the")
p("validation answers and applied to the test split (empirical), *LTT* = the Learn-then-Test")
p("threshold (risk ≤ α with probability ≥ 0.9 over the validation draw, δ = 0.1) applied to the test")
p("split, coverage (realised test risk); abstain = below the stored threshold; declined = abstained or")
p("answered \"unanswerable\" (a flagged image is abstained on); image flagged = the image check")
p("(`calibrate`, false-alarm rate 1 %) found the image unlike the validation images; OOD AUROC: the")
p("split against the in-distribution test questions, *selector* ranking a flagged image below all.\n")

p("## Selectors chosen by `calibrate --selector auto`\n")
p("| method | chosen (per seed) | temperature (mean) | val AURC per selector (mean over seeds, cross-fitted) |")
p("|---|---|---|---|")
for method in METHODS[1:]:
    rs = runs.get(method, [])
    if not rs:
        continue
    temps = [r["cal"]["abstention"].get("temperature") for r in rs if r["cal"]]
    temps = [t if t is not None else 1.0 for t in temps]
    table = {}
    for r in rs:
        for row in (r["cal"] or {}).get("selectors", []):
            table.setdefault(row["selector"]["name"], []).append(row["aurc"])
    sel = ", ".join(f"{k} {statistics.fmean(v):.4f}" for k, v in sorted(table.items(), key=lambda kv: statistics.fmean(kv[1])))
    t = f"{statistics.fmean(temps):.3f}" if temps else "–"
    p(f"| {LABEL[method]} | {', '.join(selector_names(method))} | {t} | {sel} |")

p("\n## In distribution (test split)\n")
p("| method | count | acc | ECE | NLL | Brier | AURC | answered | declined | image flagged | Φ₁₀ |")
p("|---|---|---|---|---|---|---|---|---|---|---|")
for method in METHODS:
    if method not in runs:
        continue
    cnt = runs[method][0]["r"].get("count")
    p(f"| {LABEL[method]} | {cnt} | {cell(method, 'vqa_accuracy', True)} | {cell(method, 'ece')} | {cell(method, 'nll')} | "
      f"{cell(method, 'brier')} | {cell(method, 'aurc')} | {cell(method, 'coverage', True)} | {cell(method, 'declined', True)} | "
      f"{cell(method, 'image_flagged', True, False)} | {cell(method, 'phi_10', True)} |")

p("\n### Coverage at 1 / 5 / 10 % risk (test split)\n")
p("| method | 1 % val thr. | 5 % val thr. | 10 % val thr. | 1 % LTT | 5 % LTT | 10 % LTT |")
p("|---|---|---|---|---|---|---|")
for method in METHODS:
    if method not in runs:
        continue
    p(f"| {LABEL[method]} | {cell(method, 'risk_1pct_coverage', True)} | {cell(method, 'risk_5pct_coverage', True)} | "
      f"{cell(method, 'risk_10pct_coverage', True)} | {guar_cell(method, 0.01)} | {guar_cell(method, 0.05)} | {guar_cell(method, 0.10)} |")

for split in SPLITS:
    k = f"ood.{split}."
    if not any(k + "count" in r["r"] for rs in runs.values() for r in rs):
        continue
    cnt = next(r["r"][k + "count"] for rs in runs.values() for r in rs if k + "count" in r["r"])
    p(f"\n## {split} ({cnt} questions)\n")
    p("| method | acc | ECE | NLL | Brier | AURC | Φ₁₀ | abstain | declined | image flagged | AUROC selector | AUROC conf | AUROC MI |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        if method not in runs:
            continue
        p(f"| {LABEL[method]} | {cell(method, k + 'vqa_accuracy', True)} | {cell(method, k + 'ece')} | {cell(method, k + 'nll')} | "
          f"{cell(method, k + 'brier')} | {cell(method, k + 'aurc')} | {cell(method, k + 'phi_10', True)} | {abstain_cell(method, k)} | "
          f"{cell(method, k + 'declined', True)} | {cell(method, k + 'image_flagged', True, False)} | {cell(method, k + 'auroc_selector')} | {cell(method, k + 'auroc_confidence')} | "
          f"{cell(method, k + 'auroc_epistemic')} |")

# ---------------------------------------------------------------------------------------------
def by_seed(method):
    return {r["seed"]: r for r in runs.get(method, [])}


def paired(method, key, seed):
    """(method − ensemble) point difference and its paired interval on one seed."""
    r, e = by_seed(method).get(seed), by_seed("ensemble").get(seed)
    if not r or not e or r["r"].get(key) is None or e["r"].get(key) is None:
        return None, None
    ci = (r["diff"] or {}).get("intervals", {}).get(key)
    return r["r"][key] - e["r"][key], ci


p("\n## Paired differences against the Bella ensemble\n")
p("Per seed: (method − ensemble) on the same questions, with its 95 % paired bootstrap interval;")
p("* when the interval excludes 0. Lower is better for ECE/NLL/Brier/AURC.\n")
keys = [("vqa_accuracy", True), ("ece", False), ("nll", False), ("brier", False), ("aurc", False), ("coverage", True),
        ("ood.photos.auroc_selector", False), ("ood.ood-mismatched.declined", True), ("ood.ood-absent.declined", True),
        ("ood.photos.declined", True)]
p("| method | seed | " + " | ".join(k for k, _ in keys) + " |")
p("|---|---|" + "---|" * len(keys))
for method in METHODS:
    if method == "ensemble":
        continue
    for r in runs.get(method, []):
        cells = []
        for k, pct in keys:
            v, ci = paired(method, k, r["seed"])
            if v is None:
                cells.append("–")
                continue
            c = ("+" if v > 0 else "") + fmt_num(v, pct)
            if ci:
                star = "*" if ci[0] > 0 or ci[1] < 0 else ""
                c += f" [{fmt_num(ci[0], pct)}, {fmt_num(ci[1], pct)}]{star}"
            cells.append(c)
        p(f"| {LABEL[method]} | {r['seed']} | " + " | ".join(cells) + " |")

# ---------------------------------------------------------------------------------------------
p("\n## Targets (issue 12, §5): the Bella ensemble, each seed's 95 % interval against the line\n")
p("| target | per seed: value [interval] | result |")
p("|---|---|---|")


def target_row(text, per_seed):
    """per_seed: list of (seed, value, ci, met, pct)."""
    cells, met = [], 0
    for seed, v, ci, ok, pct in per_seed:
        c = f"s{seed}: {fmt_num(v, pct)}"
        if ci:
            c += f" [{fmt_num(ci[0], pct)}, {fmt_num(ci[1], pct)}]"
        cells.append(c)
        met += 1 if ok else 0
    n = len(per_seed)
    result = "–" if n == 0 else ("met" if met == n else ("missed" if met == 0 else f"met in {met} of {n} seeds"))
    p(f"| {text} | {'; '.join(cells) or '–'} | {result} |")


ens = runs.get("ensemble", [])


def own(key, line, pct, above=True):
    out = []
    for r in ens:
        v, ci = r["r"].get(key), r["ci"].get(key)
        if v is None:
            continue
        ok = ci is not None and (ci[0] >= line if above else ci[1] <= line)
        out.append((r["seed"], v, ci, ok, pct))
    return out


def versus(other, key, pct):
    """ensemble better (lower) than other: (other − ensemble) interval above 0."""
    out = []
    for r in ens:
        v, ci = paired(other, key, r["seed"])
        if v is None:
            continue
        out.append((r["seed"], v, ci, ci is not None and ci[0] > 0, pct))
    return out


target_row("answers ≥ 85 % of in-distribution questions (coverage)", own("coverage", 0.85, True))
for split, text in [("photos", "photograph"), ("ood-mismatched", "false-premise (mismatched)"), ("ood-absent", "absent-object")]:
    target_row(f"abstains on or declines ≥ 90 % of {text} questions", own(f"ood.{split}.declined", 0.90, True))
target_row("ID ECE ≤ the base model's: (base − ensemble) ECE, paired", versus("base", "ece", False))
target_row("ID ECE ≤ the single particle's: (single − ensemble) ECE, paired", versus("single", "ece", False))
target_row("AURC < the single particle's: (single − ensemble) AURC, paired", versus("single", "aurc", False))
target_row("OOD AUROC with the chosen selector ≥ 0.95 on photos", own("ood.photos.auroc_selector", 0.95, False))

# ---------------------------------------------------------------------------------------------
p("\n## Particle diversity over training\n")
p("From `train_log.jsonl` / `train_summary.json`: pairwise disagreement of the particles' greedy")
p("answers on the validation sample, and mean pairwise ‖ΔW_i − ΔW_j‖_F; first and last evaluation,")
p("mean ± sd over seeds.\n")
p("| method | repulsion | disagreement first → last (%) | ΔW distance first → last |")
p("|---|---|---|---|")
for method in METHODS[1:]:
    rs = [r for r in runs.get(method, []) if r["summary"] and r["summary"].get("diversity")]
    if not rs:
        continue
    d = [r["summary"]["diversity"] for r in rs]
    w = rs[0]["summary"]["options"].get("repulsion", 1.0)
    w = w if method.startswith("svgd") else "–"

    def ms(vals, pct):
        m, sd, n = mean_sd(vals)
        return "–" if m is None else fmt_num(m, pct) + (f" ± {fmt_num(sd, pct)}" if n > 1 else "")

    p(f"| {LABEL[method]} | {w} | {ms([x['first']['val_disagreement'] for x in d], True)} → "
      f"{ms([x['last']['val_disagreement'] for x in d], True)} | {ms([x['first']['mean_pairwise_distance'] for x in d], False)} → "
      f"{ms([x['last']['mean_pairwise_distance'] for x in d], False)} |")

if probe is not None:
    p("\nChoosing the stronger repulsion (short runs, before any test question was answered): SVGD,")
    p("seed 1, all 3000 training questions, the first 50 steps, validation sample of 32 questions.\n")
    p("| repulsion w | train loss | val acc (%) | disagreement (%) | ΔW distance |")
    p("|---|---|---|---|---|")
    for d in sorted(probe.glob("w*"), key=lambda x: float(x.name[1:])):
        lines = read_samples(d / "train_log.jsonl")
        if not lines:
            continue
        e = lines[-1]
        p(f"| {d.name[1:]} | {e['train_loss']:.4f} | {fmt_num(e.get('val_accuracy'), True)} | "
          f"{fmt_num(e.get('val_disagreement'), True)} | {e['mean_pairwise_distance']:.3f} |")

if notes is not None and notes.exists():
    p()
    p(notes.read_text().rstrip())
