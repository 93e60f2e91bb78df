#!/usr/bin/env python3
"""Independent references for bella-vqa's answer normalisation and evaluation metrics.

This driver is ours. The official VQA evaluation code is NOT part of this repository and is never
committed: fetch it yourself and pass the path of its file
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (repository ``GT-Vision-Lab/VQA``, checked with
commit a013f0043c1e2cdc995922dfe257f7149aa9af06, "Fixed processing answers bug").

The official file is Python 2 (``print "..."``). It is run unmodified under a Python 2.7
interpreter (``--python2``, default ``python2.7`` on PATH; with pyenv e.g.
``~/.pyenv/versions/2.7.18/bin/python``): the driver copies it into a temporary directory, imports
``VQAEval`` there and calls

- ``processPunctuation`` and ``processDigitArticle`` for the normalisation table, and
- ``evaluate()`` itself (on a stub VQA/result pair, with ``setEvalQA`` captured so that the
  unrounded per-question accuracy comes back) for the official VQA accuracy, i.e. with the
  official rule "normalise only when the human answers differ".

The "always normalise" accuracy (lmms-eval's habit) applies the official ``processPunctuation`` and
``processDigitArticle`` to every answer and then counts leave-one-out matches in this driver.

Everything else (ECE, NLL, Brier, AUROC/AUPR, risk-coverage, AURC, coverage at risk, effective
reliability) is computed here with numpy and scikit-learn, written from the definitions stated in
``src/metrics.rs`` and below, not ported from the Rust code.

Usage (numpy and scikit-learn pinned in scripts/requirements-metrics.txt):

    python3 -m venv ~/.cache/metrics-venv
    ~/.cache/metrics-venv/bin/pip install -r scripts/requirements-metrics.txt
    # fetch GT-Vision-Lab/VQA somewhere, then:
    ~/.cache/metrics-venv/bin/python scripts/metrics_reference.py all \\
        --official /path/to/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py \\
        --python2 ~/.pyenv/versions/2.7.18/bin/python

Sub-commands: ``fixtures`` (rewrite the seeded tests/fixtures/metrics/*.jsonl), ``normalization``
(rewrite normalization.tsv), ``expected`` (rewrite expected.json), ``all`` (the three in order).
Running it twice gives identical files.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import sklearn
from sklearn.metrics import average_precision_score, roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXDIR = os.path.join(ROOT, "tests", "fixtures", "metrics")

TEST_FILES = ["random", "all_correct", "all_wrong", "heavy_ties"]
VAL_FILE = "random_val"
N_BINS = 15
COSTS = [1.0, 10.0, 100.0]
RISK_TARGETS = [0.01, 0.05, 0.10, 0.20, 0.30]
ERROR_BELOW = 0.5  # a question is an "error" when its VQA accuracy is below this
CLIP = 1e-12
TOL = 1e-12

# ---------------------------------------------------------------------------------------------
# The driver that runs inside Python 2.7 next to a copy of the official vqaEval.py.
# It must stay valid Python 2 and 3.
OFFICIAL_DRIVER = r'''
import io, json, sys
from vqaEval import VQAEval

class _Stub(object):
    def __init__(self, qa):
        self.qa = qa
    def getQuesIds(self):
        return sorted(self.qa.keys())

with io.open(sys.argv[1], "r", encoding="utf-8") as f:
    job = json.load(f)

ev = VQAEval(_Stub({}), _Stub({}))
punct = []
full = []
for text in job["normalize"]:
    # the same preparation evaluate() applies before normalising
    t = text.replace(u"\n", u" ").replace(u"\t", u" ").strip()
    p = ev.processPunctuation(t)
    punct.append(p)
    full.append(ev.processDigitArticle(p))

gts = {}
res = {}
for i, rec in enumerate(job["evaluate"]):
    qid = i + 1
    gts[qid] = {"question_id": qid, "question_type": u"none", "answer_type": u"other",
                "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": u"yes"}
                            for j, a in enumerate(rec["human_answers"])]}
    res[qid] = {"question_id": qid, "answer": rec["answer"]}
ev = VQAEval(_Stub(gts), _Stub(res))
captured = {}
def _capture(quesId, acc):
    captured[quesId] = acc
ev.setEvalQA = _capture
if gts:
    ev.evaluate()
official_acc = [captured[i + 1] for i in range(len(job["evaluate"]))]

with open(sys.argv[2], "w") as f:  # ASCII JSON: str in Python 2 and 3
    f.write(json.dumps({"punct": punct, "full": full, "official_acc": official_acc,
                        "python": sys.version}, ensure_ascii=True))
'''


def run_official(official, python2, normalize, evaluate):
    """Runs the official code on the answers; returns (punct, full, official_acc, version)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(official, os.path.join(tmp, "vqaEval.py"))
        with open(os.path.join(tmp, "driver.py"), "w") as f:
            f.write(OFFICIAL_DRIVER)
        job = os.path.join(tmp, "job.json")
        out = os.path.join(tmp, "out.json")
        with open(job, "w", encoding="utf-8") as f:
            json.dump({"normalize": normalize, "evaluate": evaluate}, f)
        subprocess.run([python2, "driver.py", job, out], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as f:
            got = json.load(f)
    return got["punct"], got["full"], got["official_acc"], got["python"]


def official_version(official, python2):
    return run_official(official, python2, [], [])[3].split()[0]


# ---------------------------------------------------------------------------------------------
# Normalisation table

NORMALIZATION_CASES = [
    "Black.", "black", "BLACK", "2.5", "2.50", "10,000", "1,000,000", "1.", "1.0", "3.14.",
    ".5", "..5", "5..", "a dog", "A Dog", "The Cat", "the cat.", "two dogs", "Two Dogs!",
    "yes!", "Yes.", "yes ?", "no, it is not", "no,it is not", "\"yes\"", "'yes'", "it's",
    "dont", "Dont", "don't", "isnt", "yall'll", "yall", "Im", "im", "Ive", "somebody'd",
    "oclock", "5 oclock", "twas", "ow's'at", "let's", "/", "red/white", "red / white",
    "red/ white", "t-shirt", "t - shirt", "left-hand side", "5:30", "5:30 pm", "100%", "50 %",
    "$5", "#1", "a&w", "1/2", "1 / 2", "3/4 inch", "1,2", "1, 2", "1,000/2", "x,y,1,2",
    "(yes)", "[no]", "{maybe}", "a+b", "a = b", "e-mail", "@home", "snow_board", "back\\slash",
    "x>y", "<none>", "`tick`", "what?", "why?!", "none", "None", "zero", "one", "ten", "eleven",
    "twenty", "one two three four five six seven eight nine ten", "an apple", "An Apple",
    "the", "a", "an", "a an the", "theater", "another", "athe", "the the dog", "a 2", "two a",
    "mr. smith", "st. louis", "u.s.a.", "u.s.a", "dr.", "...", "!!!", "???", "",
    " ", "  yes  ", "\tyes\t", "\nyes\n", "yes\nno", "yes\tno", "line1\r\nline2",
    "multiple   spaces", "trailing period.", "comma, separated, list", "semi;colon",
    "3 dogs.", "3dogs", "2.5.", "2. 5", "12.5%", "0.5", ".", ",", "-", "--", "- -",
    "a.m.", "p.m", "9.30", "9,30", "9 ,30", "1 ,000", "1000,", ",1000", "1,a", "a,1",
    "rock 'n' roll", "o'clock", "ma'am", "MAAM", "y'all", "y'allll", "Y'ALLLL",
    "couldn'tve", "COULDNT", "they're", "theyre", "shouldnt've", "café", "Café.", "naïve",
    "ÉCOLE", "straße", "ΣΑΣ", "İstanbul", "٣", "1,٣", "x.٣", "١,٢", "non\u00a0breaking",
    "ideographic\u3000space", "nbsp\u00a0", "\u00a0lead", "sep\u001fword", "\u001cyes\u001d",
    "mongolian\u180evowel", "zero\u200bwidth", "next\u0085line", "emoji 🐶", "日本",
    ".......................................x",
    "........................................",
    "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.a.b.c.d.e.f.g.h.i.j",
    "1.2.3.4.5.", "v1.2", "hello.world", "x..y", "2 . 5", ". 5",
]

FUZZ_ALPHABET = list("aAeTthn 0123456789.,;:/-_'\"?!()[]{}=+\\@`<>%$&") + [
    "two", "The", " a ", " an ", "dont", "ten", "\t", "\n"]


def normalization_inputs():
    cases = list(NORMALIZATION_CASES)
    # every contraction key and its capitalised form, every number word
    stub = _official_tables()
    for k in stub["contractions"]:
        cases += [k, k.capitalize(), "%s." % k, "the %s" % k]
    for k in stub["manual_map"]:
        cases += [k, k.upper(), "%s," % k]
    rng = random.Random(20240612)
    for _ in range(300):
        n = rng.randint(1, 12)
        cases.append("".join(rng.choice(FUZZ_ALPHABET) for _ in range(n)))
    out = []
    seen = set()
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


_TABLES = {}


def _official_tables():
    return _TABLES


def load_official_tables(official, python2):
    """Reads the contractions and manualMap keys from the official class (run in Python 2)."""
    code = r'''
import io, json, sys
from vqaEval import VQAEval
class S(object):
    def getQuesIds(self): return []
e = VQAEval(S(), S())
with open(sys.argv[1], "w") as f:  # ASCII JSON: str in Python 2 and 3
    f.write(json.dumps({"contractions": sorted(e.contractions.keys()),
                        "manual_map": sorted(e.manualMap.keys())}, ensure_ascii=True))
'''
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(official, os.path.join(tmp, "vqaEval.py"))
        with open(os.path.join(tmp, "tables.py"), "w") as f:
            f.write(code)
        out = os.path.join(tmp, "out.json")
        subprocess.run([python2, "tables.py", out], cwd=tmp, check=True)
        with open(out, encoding="utf-8") as f:
            _TABLES.update(json.load(f))


def write_normalization(official, python2):
    inputs = normalization_inputs()
    punct, full, _, version = run_official(official, python2, inputs, [])
    path = os.path.join(FIXDIR, "normalization.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Official VQA answer normalisation: columns are JSON strings separated by a tab.\n")
        f.write("# input\tafter processPunctuation (of the whitespace-cleaned input)\t"
                "after processDigitArticle (the full normalisation)\n")
        f.write("# Expected columns computed by scripts/metrics_reference.py running the official\n")
        f.write("# vqaEval.py (GT-Vision-Lab/VQA a013f00) unmodified under Python %s.\n" % version.split()[0])
        for i, p, o in zip(inputs, punct, full):
            f.write("%s\t%s\t%s\n" % (json.dumps(i, ensure_ascii=False),
                                      json.dumps(p, ensure_ascii=False),
                                      json.dumps(o, ensure_ascii=False)))
    print("wrote %s (%d rows)" % (path, len(inputs)))


# ---------------------------------------------------------------------------------------------
# Fixture prediction files (seeded)

POOLS = {
    "yes/no": [["yes", "Yes", "yes!", "Yes."], ["no", "No", "no.", "No!"]],
    "number": [["2", "two", "Two", "2."], ["3", "three", "3 "], ["10,000", "10000"],
               ["2.5", "2.5."], ["0", "none", "zero"]],
    "other": [["black", "Black.", "BLACK"], ["cat", "the cat", "The Cat", "a cat"],
              ["dog", "a dog", "dog."], ["red and white", "red & white"],
              ["t-shirt", "t shirt", "T-Shirt"], ["don't know", "dont know"],
              ["5:30", "5:30 pm"], ["100%", "100 %"], ["frisbee", "frisbe"]],
}


def _variant(rng, group):
    return rng.choice(group)


def make_record(rng, conf_values=None, ood_rate=0.25, k_classes=5):
    atype = rng.choice(list(POOLS))
    groups = POOLS[atype]
    true_group = rng.randrange(len(groups))
    n_humans = 10 if rng.random() < 0.85 else rng.randint(4, 9)
    if rng.random() < 0.3:
        a = _variant(rng, groups[true_group])
        humans = [a] * n_humans
    else:
        humans = []
        for _ in range(n_humans):
            g = true_group if rng.random() < 0.6 else rng.randrange(len(groups))
            humans.append(_variant(rng, groups[g]))
    r = rng.random()
    if r < 0.5:
        answer = _variant(rng, groups[true_group])
    elif r < 0.65:
        answer = rng.choice(humans)
    else:
        answer = _variant(rng, groups[rng.randrange(len(groups))])
    # roughly right (same answer group as most humans): confidence tends to be high
    good = answer in groups[true_group]
    if conf_values is not None:
        conf = rng.choice(conf_values[1] if good else conf_values[0])
    else:
        u = rng.random()
        if u < 0.04:
            conf = 0.0
        elif u < 0.10:
            conf = 1.0 if good else 0.0
        elif u < 0.18:
            conf = rng.choice([0.2, 0.4, 0.6, 0.8, 1.0 / 3.0, 2.0 / 3.0])  # exact bin edges
        elif good:
            conf = round(rng.betavariate(6.0, 1.5), 2)
        else:
            conf = round(rng.betavariate(1.5, 2.5), 2)
    is_ood = rng.random() < ood_rate
    unc = round(min(1.0, max(0.0, rng.gauss(0.6 if is_ood else 0.4, 0.2))), 2)
    probs = [rng.random() ** 2 for _ in range(k_classes)]
    s = sum(probs)
    probs = [round(p / s, 3) for p in probs]
    target = rng.randrange(k_classes)
    if rng.random() < 0.05:
        probs[target] = 0.0
    return {
        "answer": answer, "confidence": conf, "human_answers": humans, "answer_type": atype,
        "is_ood": is_ood, "abstained": conf < 0.3, "uncertainty": unc,
        "distribution": probs, "target": target,
    }


def write_jsonl(name, records):
    path = os.path.join(FIXDIR, name + ".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    print("wrote %s (%d records)" % (path, len(records)))


def write_fixtures():
    os.makedirs(FIXDIR, exist_ok=True)
    rng = random.Random(7)
    write_jsonl("random", [make_record(rng) for _ in range(200)])
    rng = random.Random(8)
    write_jsonl(VAL_FILE, [make_record(rng) for _ in range(200)])
    rng = random.Random(9)
    recs = []
    for i in range(20):
        r = make_record(rng)
        r["human_answers"] = [r["answer"]] * 10
        r["confidence"] = [0.0, 0.5, 1.0, 0.95, 0.3][i % 5]
        r["abstained"] = r["confidence"] < 0.3
        recs.append(r)
    write_jsonl("all_correct", recs)
    rng = random.Random(10)
    recs = []
    for i in range(20):
        r = make_record(rng)
        r["answer"] = "zebra crossing"
        r["confidence"] = [0.0, 0.5, 1.0, 0.95, 0.3][i % 5]
        r["abstained"] = r["confidence"] < 0.3
        r["is_ood"] = False  # one class only: OOD AUROC undefined
        recs.append(r)
    write_jsonl("all_wrong", recs)
    rng = random.Random(11)
    ties = ([0.0, 0.2, 0.2, 0.5, 0.8], [0.5, 0.8, 0.8, 1.0, 1.0])  # (roughly wrong, right)
    recs = [make_record(rng, conf_values=ties) for _ in range(120)]
    for r in recs:
        del r["uncertainty"]  # OOD score falls back to 1 - confidence
    write_jsonl("heavy_ties", recs)


def read_jsonl(name):
    with open(os.path.join(FIXDIR, name + ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Metrics from the definitions (numpy / scikit-learn)

def always_accuracy(answer_norm, humans_norm):
    """Leave-one-out VQA accuracy after normalising every answer (official functions)."""
    n = len(humans_norm)
    accs = []
    for i in range(n):
        others = humans_norm[:i] + humans_norm[i + 1:]
        accs.append(min(1.0, sum(1 for h in others if h == answer_norm) / 3.0))
    return float(sum(accs)) / n


def ece_bins(conf, acc, assign, n_bins):
    bins = []
    total = len(conf)
    ece = 0.0
    for b in range(n_bins):
        idx = [i for i in range(total) if assign[i] == b]
        if not idx:
            bins.append({"count": 0, "mean_confidence": None, "accuracy": None})
            continue
        mc = float(np.mean(conf[idx]))
        ma = float(np.mean(acc[idx]))
        ece += len(idx) / total * abs(ma - mc)
        bins.append({"count": len(idx), "mean_confidence": mc, "accuracy": ma})
    return float(ece), bins


def ece_equal_width(conf, acc, n_bins=N_BINS):
    edges = [k / n_bins for k in range(n_bins + 1)]
    assign = []
    for c in conf:
        b = 0
        while not (c <= edges[b + 1]):  # bins (lo, hi]; 0 falls in the first bin
            b += 1
        assign.append(b)
    ece, bins = ece_bins(conf, acc, assign, n_bins)
    for b in range(n_bins):
        bins[b]["lo"] = edges[b]
        bins[b]["hi"] = edges[b + 1]
    return {"ece": ece, "bins": bins}


def ece_equal_mass(conf, acc, n_bins=N_BINS):
    order = np.argsort(conf, kind="stable")
    chunks = [c for c in np.array_split(order, n_bins) if len(c) > 0]
    assign = [0] * len(conf)
    for b, chunk in enumerate(chunks):
        for i in chunk:
            assign[i] = b
    ece, bins = ece_bins(conf, acc, assign, len(chunks))
    for b, chunk in enumerate(chunks):
        bins[b]["lo"] = float(conf[chunk].min())
        bins[b]["hi"] = float(conf[chunk].max())
    return {"ece": ece, "bins": bins}


def nll_binary(conf, acc):
    c = np.clip(conf, CLIP, 1.0 - CLIP)
    return float(np.mean(-(acc * np.log(c) + (1.0 - acc) * np.log(1.0 - c))))


def brier_binary(conf, acc):
    return float(np.mean((conf - acc) ** 2))


def nll_multiclass(probs, target):
    p = np.array([row[t] for row, t in zip(probs, target)])
    return float(np.mean(-np.log(np.maximum(p, CLIP))))


def brier_multiclass(probs, target):
    tot = []
    for row, t in zip(probs, target):
        onehot = np.zeros(len(row))
        onehot[t] = 1.0
        tot.append(np.sum((np.array(row) - onehot) ** 2))
    return float(np.mean(tot))


def detection(scores, labels):
    labels = np.asarray(labels, dtype=bool)
    pos = int(labels.sum())
    neg = int(len(labels) - pos)
    if pos == 0 or neg == 0:
        return {"auroc": None, "aupr": None, "positives": pos, "negatives": neg}
    return {"auroc": float(roc_auc_score(labels, scores)),
            "aupr": float(average_precision_score(labels, scores)),
            "positives": pos, "negatives": neg}


def risk_coverage(conf, acc):
    n = len(conf)
    pts = []
    for t in sorted(set(conf.tolist()), reverse=True):
        mask = conf >= t
        k = int(mask.sum())
        pts.append({"threshold": float(t), "answered": k, "coverage": k / n,
                    "risk": float(1.0 - np.mean(acc[mask]))})
    return pts


def aurc(pts):
    total = 0.0
    prev = 0.0
    for p in pts:
        total += (p["coverage"] - prev) * p["risk"]
        prev = p["coverage"]
    return float(total)


def optimal_aurc(acc):
    s = np.sort(acc)[::-1]
    k = np.arange(1, len(s) + 1)
    return float(np.mean(1.0 - np.cumsum(s) / k))


def abstain_all_threshold(conf):
    return float(np.nextafter(np.max(conf), np.inf))


def coverage_at_risk(conf, acc, target):
    pts = risk_coverage(conf, acc)
    ok = [p for p in pts if p["risk"] <= target + TOL]
    if not ok:
        return {"target_risk": target, "coverage": 0.0, "threshold": abstain_all_threshold(conf)}
    best = max(ok, key=lambda p: p["coverage"])
    return {"target_risk": target, "coverage": best["coverage"], "threshold": best["threshold"]}


def phi_at(conf, acc, t, c):
    answered = conf >= t
    per = np.where(answered, np.where(acc > 0, acc, -c), 0.0)
    return float(np.mean(per))


def choose_threshold_phi(conf, acc, c):
    cands = sorted(set(conf.tolist()) | {abstain_all_threshold(conf)})
    phis = [phi_at(conf, acc, t, c) for t in cands]
    best = max(phis)
    for t, p in zip(cands, phis):  # ascending: the lowest threshold (most coverage) wins ties
        if p >= best - TOL:
            return float(t)
    raise AssertionError


def selective(acc, answered):
    k = int(np.sum(answered))
    cov = k / len(acc)
    risk = None if k == 0 else float(1.0 - np.mean(acc[answered]))
    return cov, risk


def phi_decisions(acc, answered, c):
    per = np.where(answered, np.where(acc > 0, acc, -c), 0.0)
    return float(np.mean(per))


def thresholds(conf, acc, val_conf, val_acc):
    """Phi_c and target-risk thresholds chosen on (val_conf, val_acc), applied to (conf, acc)."""
    phis = []
    for c in COSTS:
        t = choose_threshold_phi(val_conf, val_acc, c)
        cov, risk = selective(acc, conf >= t)
        phis.append({"c": c, "threshold": t, "phi": phi_at(conf, acc, t, c),
                     "coverage": cov, "risk": risk})
    risk_thresholds = []
    for target in RISK_TARGETS:
        t = coverage_at_risk(val_conf, val_acc, target)["threshold"]
        cov, risk = selective(acc, conf >= t)
        risk_thresholds.append({"target_risk": target, "threshold": t,
                                "coverage": cov, "risk": risk})
    return {"effective_reliability": phis, "risk_thresholds": risk_thresholds}


def summarize(recs, acc, val_conf, val_acc):
    conf = np.array([r["confidence"] for r in recs], dtype=float)
    out = {"count": len(recs), "accuracy": float(np.mean(acc))}
    out["ece"] = ece_equal_width(conf, acc)
    out["ece_equal_mass"] = ece_equal_mass(conf, acc)
    out["nll_binary"] = nll_binary(conf, acc)
    out["brier_binary"] = brier_binary(conf, acc)
    out["nll_multiclass"] = nll_multiclass([r["distribution"] for r in recs],
                                           [r["target"] for r in recs])
    out["brier_multiclass"] = brier_multiclass([r["distribution"] for r in recs],
                                               [r["target"] for r in recs])
    pts = risk_coverage(conf, acc)
    out["risk_coverage"] = pts
    out["aurc"] = aurc(pts)
    out["optimal_aurc"] = optimal_aurc(acc)
    out["excess_aurc"] = out["aurc"] - out["optimal_aurc"]
    out["coverage_at_risk"] = [coverage_at_risk(conf, acc, t) for t in RISK_TARGETS]
    out["error_detection"] = detection(-conf, acc < ERROR_BELOW)
    unc = np.array([r.get("uncertainty", 1.0 - r["confidence"]) for r in recs], dtype=float)
    out["ood_detection"] = detection(unc, [r["is_ood"] for r in recs])
    answered = np.array([not r["abstained"] for r in recs])
    cov, risk = selective(acc, answered)
    out["recorded_decisions"] = {
        "coverage": cov, "risk": risk,
        "phi": [{"c": c, "phi": phi_decisions(acc, answered, c)} for c in COSTS]}
    out.update(thresholds(conf, acc, val_conf, val_acc))
    types = {}
    for at in sorted(set(r["answer_type"] for r in recs)):
        idx = [i for i, r in enumerate(recs) if r["answer_type"] == at]
        types[at] = {"count": len(idx), "accuracy": float(np.mean(acc[idx])),
                     "mean_confidence": float(np.mean(conf[idx])),
                     "ece": ece_equal_width(conf[idx], acc[idx])["ece"]}
    out["per_answer_type"] = types
    return out


def accuracies(official, python2, recs):
    evaluate = [{"answer": r["answer"], "human_answers": r["human_answers"]} for r in recs]
    texts = []
    for r in recs:
        texts.append(r["answer"])
        texts.extend(r["human_answers"])
    _, full, off_acc, _ = run_official(official, python2, texts, evaluate)
    always = []
    pos = 0
    for r in recs:
        a = full[pos]
        hs = full[pos + 1: pos + 1 + len(r["human_answers"])]
        pos += 1 + len(r["human_answers"])
        always.append(always_accuracy(a, hs))
    return np.array(off_acc, dtype=float), np.array(always, dtype=float)


def write_expected(official, python2):
    val = read_jsonl(VAL_FILE)
    val_off, val_alw = accuracies(official, python2, val)
    val_conf = np.array([r["confidence"] for r in val], dtype=float)
    out = {
        "generator": "scripts/metrics_reference.py",
        "official_python": official_version(official, python2),
        "numpy": np.__version__, "scikit_learn": sklearn.__version__,
        "settings": {"n_bins": N_BINS, "costs": COSTS, "risk_targets": RISK_TARGETS,
                     "error_below": ERROR_BELOW, "clip": CLIP, "tolerance": TOL,
                     "val_file": VAL_FILE},
        "files": {},
    }
    for name in TEST_FILES + [VAL_FILE]:
        recs = read_jsonl(name)
        off, alw = accuracies(official, python2, recs)
        entry = {"official_accuracy": off.tolist(), "always_accuracy": alw.tolist()}
        entry["official"] = summarize(recs, off, val_conf, val_off)
        entry["always"] = summarize(recs, alw, val_conf, val_alw)
        conf = np.array([r["confidence"] for r in recs], dtype=float)
        # thresholds chosen on the evaluated file itself (no validation split)
        entry["official_self_thresholds"] = thresholds(conf, off, conf, off)
        out["files"][name] = entry
    path = os.path.join(FIXDIR, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s" % path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["fixtures", "normalization", "expected", "all"])
    ap.add_argument("--official", help="path of the official vqaEval.py (not committed)")
    ap.add_argument("--python2", default="python2.7", help="Python 2.7 interpreter")
    args = ap.parse_args()
    if args.command in ("normalization", "expected", "all") and not args.official:
        ap.error("--official PATH/TO/vqaEval.py is required")
    if args.command in ("fixtures", "all"):
        write_fixtures()
    if args.command in ("normalization", "all"):
        load_official_tables(args.official, args.python2)
        write_normalization(args.official, args.python2)
    if args.command in ("expected", "all"):
        write_expected(args.official, args.python2)


if __name__ == "__main__":
    sys.exit(main())
