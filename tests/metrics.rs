//! Metrics against independent references and hand-computed cases.
//!
//! `tests/fixtures/metrics/expected.json` was written by `scripts/metrics_reference.py`: the
//! per-question VQA accuracies come from the official `vqaEval.py` (Python 2.7), everything else
//! from numpy / scikit-learn code written from the definitions. This file recomputes it all in
//! Rust from the same `*.jsonl` predictions and compares (absolute tolerance 1e-9).

use std::path::PathBuf;

use bella_vqa::metrics::*;
use serde_json::Value;

const TOL: f64 = 1e-9;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/metrics")
        .join(name)
}

fn read_jsonl(name: &str) -> Vec<Prediction> {
    let text = std::fs::read_to_string(fixture(&format!("{name}.jsonl"))).expect("fixture jsonl");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("prediction record"))
        .collect()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// Fields of `Summary` that the Python reference does not produce (labels, not numbers).
const NOT_IN_REFERENCE: [&str; 3] = ["binning", "normalize_mode", "thresholds_from"];

fn compare(path: &str, want: &Value, got: &Value, errors: &mut Vec<String>) {
    match (want, got) {
        (Value::Number(w), Value::Number(g)) => {
            let (w, g) = (w.as_f64().unwrap(), g.as_f64().unwrap());
            if (w - g).abs() > TOL {
                errors.push(format!("{path}: expected {w}, got {g} (diff {:e})", g - w));
            }
        }
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => compare(&format!("{path}.{k}"), wv, gv, errors),
                    None => errors.push(format!("{path}.{k}: missing in Rust output")),
                }
            }
            for k in g.keys() {
                if !w.contains_key(k) && !NOT_IN_REFERENCE.contains(&k.as_str()) {
                    errors.push(format!("{path}.{k}: not checked by the reference"));
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.len() != g.len() {
                errors.push(format!(
                    "{path}: {} items expected, {} got",
                    w.len(),
                    g.len()
                ));
                return;
            }
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                compare(&format!("{path}[{i}]"), wv, gv, errors);
            }
        }
        (w, g) if w == g => {}
        (w, g) => errors.push(format!("{path}: expected {w}, got {g}")),
    }
}

#[test]
fn reference_accuracies_match_official_code() {
    let exp = expected();
    let files = exp["files"].as_object().unwrap();
    assert_eq!(files.len(), 5);
    for (name, entry) in files {
        let preds = read_jsonl(name);
        for (mode, key) in [
            (NormalizeMode::Official, "official_accuracy"),
            (NormalizeMode::Always, "always_accuracy"),
        ] {
            let want: Vec<f64> = serde_json::from_value(entry[key].clone()).unwrap();
            assert_eq!(want.len(), preds.len());
            for (i, (p, w)) in preds.iter().zip(&want).enumerate() {
                let got = p.accuracy(mode);
                // summed in the official order, so equal up to how serde_json reads the
                // reference float (its default parser may be one ulp off)
                assert!(
                    (got - w).abs() <= 1e-15,
                    "{name}[{i}] {mode:?}: {got} vs {w}: {p:?}"
                );
            }
        }
    }
}

#[test]
fn reference_accuracies_are_varied() {
    // The fixtures must exercise both branches of the official rule and fractional accuracies.
    let exp = expected();
    let off: Vec<f64> =
        serde_json::from_value(exp["files"]["random"]["official_accuracy"].clone()).unwrap();
    let alw: Vec<f64> =
        serde_json::from_value(exp["files"]["random"]["always_accuracy"].clone()).unwrap();
    for v in [0.0, 1.0] {
        assert!(off.contains(&v));
    }
    assert!(
        off.iter().any(|&a| a > 0.0 && a < 1.0),
        "no fractional accuracy"
    );
    assert!(
        off.iter().zip(&alw).any(|(o, a)| o != a),
        "official and always modes never differ"
    );
}

#[test]
fn reference_summaries_match() {
    let exp = expected();
    let settings = &exp["settings"];
    let val = read_jsonl(settings["val_file"].as_str().unwrap());
    let mut errors = Vec::new();
    let mut checked = 0;
    for (name, entry) in exp["files"].as_object().unwrap() {
        let preds = read_jsonl(name);
        for (mode, key) in [
            (NormalizeMode::Official, "official"),
            (NormalizeMode::Always, "always"),
        ] {
            let opts = SummaryOptions {
                mode,
                n_bins: settings["n_bins"].as_u64().unwrap() as usize,
                costs: serde_json::from_value(settings["costs"].clone()).unwrap(),
                risk_targets: serde_json::from_value(settings["risk_targets"].clone()).unwrap(),
                error_below: settings["error_below"].as_f64().unwrap(),
            };
            let s = summary(&preds, Some(&val), &opts).expect("summary");
            assert_eq!(s.thresholds_from, ThresholdSource::Validation);
            let got = serde_json::to_value(&s).unwrap();
            compare(&format!("{name}.{key}"), &entry[key], &got, &mut errors);
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
    assert!(
        errors.is_empty(),
        "{} differences:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn reference_thresholds_chosen_on_the_evaluated_set() {
    let exp = expected();
    let settings = &exp["settings"];
    let opts = SummaryOptions {
        mode: NormalizeMode::Official,
        n_bins: 15,
        costs: serde_json::from_value(settings["costs"].clone()).unwrap(),
        risk_targets: serde_json::from_value(settings["risk_targets"].clone()).unwrap(),
        error_below: settings["error_below"].as_f64().unwrap(),
    };
    let mut errors = Vec::new();
    for (name, entry) in exp["files"].as_object().unwrap() {
        let s = summary(&read_jsonl(name), None, &opts).unwrap();
        assert_eq!(s.thresholds_from, ThresholdSource::EvaluatedSet);
        let want = &entry["official_self_thresholds"];
        let got = serde_json::to_value(&s).unwrap();
        for key in ["effective_reliability", "risk_thresholds"] {
            compare(
                &format!("{name}.self.{key}"),
                &want[key],
                &got[key],
                &mut errors,
            );
        }
    }
    assert!(
        errors.is_empty(),
        "{} differences:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

#[test]
fn reference_edge_files_have_expected_shape() {
    let exp = expected();
    let f = &exp["files"];
    // all correct: no errors to detect; all wrong: nothing but errors, one OOD class only
    assert!(f["all_correct"]["official"]["error_detection"]["auroc"].is_null());
    assert!(f["all_wrong"]["official"]["error_detection"]["auroc"].is_null());
    assert!(f["all_wrong"]["official"]["ood_detection"]["auroc"].is_null());
    assert_eq!(f["all_correct"]["official"]["accuracy"].as_f64(), Some(1.0));
    assert_eq!(f["all_wrong"]["official"]["accuracy"].as_f64(), Some(0.0));
    assert!(f["random"]["official"]["ood_detection"]["auroc"].is_number());
    let preds = read_jsonl("heavy_ties");
    assert!(preds.iter().all(|p| p.uncertainty.is_none()));
    let s = summary(&preds, None, &SummaryOptions::default()).unwrap();
    assert_eq!(s.risk_coverage.len(), 5, "5 distinct confidences, 5 points");
    assert_eq!(s.thresholds_from, ThresholdSource::EvaluatedSet);
}

// ------------------------------------------------------------------------------------------------
// Hand-computed cases

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn vqa_accuracy_official_rule() {
    // 10 humans, m of them say "cat": leave-one-out average of min(matches/3, 1)
    let expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0];
    for (m, want) in expected.iter().enumerate() {
        let humans: Vec<String> = (0..10)
            .map(|i| if i < m { "cat" } else { "dog" }.to_string())
            .collect();
        let got = vqa_accuracy("cat", &humans, NormalizeMode::Official);
        assert!(close(got, *want), "m={m}: {got}");
    }
    // the official code normalises only when the humans disagree
    let yes = vec!["yes"; 10];
    assert_eq!(vqa_accuracy("Yes", &yes, NormalizeMode::Official), 0.0);
    assert_eq!(vqa_accuracy("Yes", &yes, NormalizeMode::Always), 1.0);
    // A generated "Yes" is right by default, as lmms-eval and LLaVA's submission script score it.
    assert_eq!(vqa_accuracy("Yes", &yes, NormalizeMode::default()), 1.0);
    assert_eq!(vqa_accuracy(" yes\n", &yes, NormalizeMode::Official), 1.0); // whitespace always
    let mixed = [
        "yes", "yes", "yes", "yes", "Yes.", "no", "no", "no", "no", "no",
    ];
    assert_eq!(vqa_accuracy("YES!", &mixed, NormalizeMode::Official), 1.0);
    assert_eq!(
        vqa_accuracy("two", &["2"; 10], NormalizeMode::Official),
        0.0
    );
    assert_eq!(vqa_accuracy("two", &["2"; 10], NormalizeMode::Always), 1.0);
}

#[test]
fn vqa_accuracy_few_answers() {
    let none: [&str; 0] = [];
    assert_eq!(vqa_accuracy("cat", &none, NormalizeMode::Official), 0.0);
    assert_eq!(vqa_accuracy("cat", &["cat"], NormalizeMode::Official), 1.0);
    assert_eq!(
        vqa_accuracy("The cat.", &["cat"], NormalizeMode::Official),
        0.0
    );
    assert_eq!(
        vqa_accuracy("The cat.", &["cat"], NormalizeMode::Always),
        1.0
    );
    // n = 2: quota 1, each subset holds the other answer
    assert_eq!(
        vqa_accuracy("cat", &["cat", "cat"], NormalizeMode::Official),
        1.0
    );
    assert_eq!(
        vqa_accuracy("cat", &["cat", "dog"], NormalizeMode::Official),
        0.5
    );
    // n = 3: quota 2; subsets {cat,dog}, {cat,dog}, {cat,cat} → (1/2 + 1/2 + 1) / 3
    let got = vqa_accuracy("cat", &["cat", "cat", "dog"], NormalizeMode::Official);
    assert!(close(got, 2.0 / 3.0));
    // n = 4: the official rule again (quota 3): 3 matches → (3 × 2/3 + 1) / 4
    let got = vqa_accuracy(
        "cat",
        &["cat", "cat", "cat", "dog"],
        NormalizeMode::Official,
    );
    assert!(close(got, 0.75));
}

/// Four questions:
///
/// | conf | acc | 15-bin ECE bin        | wrong | score = −conf |
/// |------|-----|-----------------------|-------|---------------|
/// | 0.9  | 1   | 13 = (13/15, 14/15]   | no    | −0.9          |
/// | 0.8  | 0   | 11 = (11/15, 12/15]   | yes   | −0.8          |
/// | 0.3  | 1   |  4 = (4/15, 5/15]     | no    | −0.3          |
/// | 0.0  | 0   |  0 = [0, 1/15]        | yes   | −0.0          |
///
/// ECE = (|1 − .9| + |0 − .8| + |1 − .3| + |0 − 0|) / 4 = (.1 + .8 + .7 + 0) / 4 = 0.4.
/// AUROC (wrong vs right): pairs (−.8 > −.9 ✓, −.8 > −.3 ✗, 0 > −.9 ✓, 0 > −.3 ✓) → 3/4.
/// AP: by descending score 0 (+), −.3 (−), −.8 (+), −.9 (−): precision 1 at recall .5, then
/// 2/3 at recall 1 → .5 × 1 + .5 × 2/3 = 5/6.
#[test]
fn hand_four_predictions() {
    let conf = [0.9, 0.8, 0.3, 0.0];
    let acc = [1.0, 0.0, 1.0, 0.0];
    let cal = ece_equal_width(&conf, &acc, 15).unwrap();
    assert!(close(cal.ece, 0.4), "{}", cal.ece);
    let occupied: Vec<usize> = (0..15).filter(|&b| cal.bins[b].count > 0).collect();
    assert_eq!(occupied, vec![0, 4, 11, 13]);
    assert_eq!(cal.bins[11].mean_confidence, Some(0.8));
    assert_eq!(cal.bins[1].accuracy, None);

    let wrong: Vec<bool> = acc.iter().map(|&a| a < 0.5).collect();
    let score: Vec<f64> = conf.iter().map(|c| -c).collect();
    assert!(close(auroc(&score, &wrong).unwrap().unwrap(), 0.75));
    assert!(close(
        average_precision(&score, &wrong).unwrap().unwrap(),
        5.0 / 6.0
    ));

    // brier = (.01 + .64 + .49 + 0) / 4
    assert!(close(brier_binary(&conf, &acc).unwrap(), 1.14 / 4.0));
    // nll: −ln .9 − ln .2 − ln .3 − ln(1 − 1e-12)
    let want = -(0.9f64.ln() + 0.2f64.ln() + 0.3f64.ln() + (1.0 - 1e-12f64).ln()) / 4.0;
    assert!(close(nll_binary(&conf, &acc).unwrap(), want));

    // equal mass with 2 bins: {0.0, 0.3} and {0.8, 0.9}: (2/4)|.5 − .15| + (2/4)|.5 − .85|
    let em = ece_equal_mass(&conf, &acc, 2).unwrap();
    assert!(close(em.ece, 0.35));
    assert_eq!((em.bins[0].lo, em.bins[0].hi), (0.0, 0.3));
}

#[test]
fn ece_edges_and_extremes() {
    // 0 → first bin, 1 → last bin, 0.2 = 3/15 → bin 2 (upper edge inclusive)
    let cal = ece_equal_width(&[0.0, 1.0, 0.2], &[0.0, 1.0, 1.0], 15).unwrap();
    assert_eq!(cal.bins[0].count, 1);
    assert_eq!(cal.bins[14].count, 1);
    assert_eq!(cal.bins[2].count, 1);
    assert!(close(cal.ece, 0.8 / 3.0));
    // perfectly confident and right / wrong
    assert_eq!(ece_equal_width(&[1.0; 3], &[1.0; 3], 15).unwrap().ece, 0.0);
    assert_eq!(ece_equal_width(&[1.0; 3], &[0.0; 3], 15).unwrap().ece, 1.0);
    // fewer questions than bins: only non-empty equal-mass bins
    assert_eq!(
        ece_equal_mass(&[0.5, 0.6], &[1.0, 0.0], 15)
            .unwrap()
            .bins
            .len(),
        2
    );
    // fractional accuracy
    let cal = ece_equal_width(&[0.5, 0.5], &[0.3, 0.9], 15).unwrap();
    assert!(close(cal.ece, 0.1));
}

#[test]
fn nll_and_brier_variants() {
    assert!(close(nll_binary(&[0.0], &[1.0]).unwrap(), -(1e-12f64).ln()));
    assert!(nll_binary(&[1.0, 0.0], &[1.0, 0.0]).unwrap() < 1e-11);
    let probs = vec![vec![0.7, 0.2, 0.1], vec![0.0, 0.5, 0.5]];
    let target = [0, 0];
    // row 1: .09 + .04 + .01 = .14; row 2: 1 + .25 + .25 = 1.5
    assert!(close(
        brier_multiclass(&probs, &target).unwrap(),
        (0.14 + 1.5) / 2.0
    ));
    let want = (-(0.7f64.ln()) - (1e-12f64).ln()) / 2.0;
    assert!(close(nll_multiclass(&probs, &target).unwrap(), want));
    assert!(matches!(
        nll_multiclass(&probs, &[0, 3]),
        Err(MetricError::BadTarget { index: 1, .. })
    ));
    assert!(matches!(
        brier_multiclass(&[vec![0.5, -0.1]], &[0]),
        Err(MetricError::BadProbability { index: 0 })
    ));
}

#[test]
fn detection_ties_and_single_class() {
    // all tied: AUROC 0.5, AP = positive rate
    let score = [0.5; 4];
    let label = [true, false, false, false];
    assert_eq!(auroc(&score, &label).unwrap(), Some(0.5));
    assert_eq!(average_precision(&score, &label).unwrap(), Some(0.25));
    // a tie across classes counts half: pos {2, 1}, neg {1, 0} → (1 + 1 + .5 + 1) / 4
    let got = auroc(&[2.0, 1.0, 1.0, 0.0], &[true, true, false, false])
        .unwrap()
        .unwrap();
    assert!(close(got, 0.875));
    // perfect and inverted
    assert_eq!(auroc(&[1.0, 0.0], &[true, false]).unwrap(), Some(1.0));
    assert_eq!(auroc(&[0.0, 1.0], &[true, false]).unwrap(), Some(0.0));
    // one class only: undefined, not a panic, not NaN
    assert_eq!(auroc(&[0.1, 0.2], &[true, true]).unwrap(), None);
    assert_eq!(
        average_precision(&[0.1, 0.2], &[false, false]).unwrap(),
        None
    );
    let d = detection(&[0.1, 0.2], &[false, false]).unwrap();
    assert_eq!((d.positives, d.negatives, d.auroc), (0, 2, None));
}

/// conf [.9, .9, .5, .1], acc [1, 0, 1, 1]: points at .9 (2 answered, risk .5), .5 (3, 1/3),
/// .1 (4, .25). AURC = .5·.5 + .25·(1/3) + .25·.25 = 0.3958…; optimal (accuracies 1,1,1,0):
/// risks 0, 0, 0, .25 → .0625.
#[test]
fn hand_risk_coverage() {
    let conf = [0.9, 0.5, 0.9, 0.1];
    let acc = [1.0, 1.0, 0.0, 1.0];
    let curve = risk_coverage_curve(&conf, &acc).unwrap();
    let got: Vec<(f64, usize, f64)> = curve
        .iter()
        .map(|p| (p.threshold, p.answered, p.risk))
        .collect();
    assert_eq!(got.len(), 3);
    assert_eq!((got[0].0, got[0].1), (0.9, 2));
    assert!(close(got[0].2, 0.5) && close(got[1].2, 1.0 / 3.0) && close(got[2].2, 0.25));
    let want = 0.25 + 0.25 / 3.0 + 0.0625;
    assert!(close(aurc(&conf, &acc).unwrap(), want));
    assert!(close(optimal_aurc(&acc).unwrap(), 0.0625));
    assert!(close(excess_aurc(&conf, &acc).unwrap(), want - 0.0625));

    let c = coverage_at_risk(&conf, &acc, 0.3).unwrap();
    assert_eq!((c.coverage, c.threshold), (1.0, 0.1));
    let c = coverage_at_risk(&conf, &acc, 1.0 / 3.0).unwrap();
    assert_eq!(c.coverage, 1.0); // largest qualifying coverage
    let c = coverage_at_risk(&conf, &acc, 0.01).unwrap();
    assert_eq!(c.coverage, 0.0);
    assert!(c.threshold > 0.9 && c.threshold < 0.9 + 1e-15);
    let pairs: Vec<(f64, f64)> = conf.iter().copied().zip(acc).collect();
    assert_eq!(choose_threshold_for_risk(&pairs, 0.3).unwrap(), 0.1);
    // Coverage targets: 0.9, 0.6, 0.3, 0.1 sorted; answering ≥ 50 % of 4 means 2 questions.
    let by_coverage = |c: f64| choose_threshold_for_coverage(&[0.3, 0.9, 0.1, 0.6], c).unwrap();
    assert_eq!(by_coverage(0.5), 0.6);
    assert_eq!(by_coverage(0.51), 0.3);
    assert_eq!(by_coverage(1.0), 0.1);
    assert_eq!(by_coverage(0.01), 0.9);
    assert!(choose_threshold_for_coverage(&[0.5], 0.0).is_err());
    assert!(choose_threshold_for_coverage(&[], 0.5).is_err());
    // 1 wrong in 20 meets a 5 % target despite rounding
    let conf20: Vec<f64> = (0..20).map(|i| 1.0 - i as f64 / 40.0).collect();
    let acc20: Vec<f64> = (0..20).map(|i| if i == 19 { 0.0 } else { 1.0 }).collect();
    assert_eq!(
        coverage_at_risk(&conf20, &acc20, 0.05).unwrap().coverage,
        1.0
    );
}

#[test]
fn selective_extremes() {
    // all correct: zero risk everywhere; all wrong: risk 1
    assert_eq!(aurc(&[0.2, 0.9], &[1.0, 1.0]).unwrap(), 0.0);
    assert_eq!(excess_aurc(&[0.2, 0.9], &[1.0, 1.0]).unwrap(), 0.0);
    assert_eq!(aurc(&[0.2, 0.9], &[0.0, 0.0]).unwrap(), 1.0);
    assert_eq!(excess_aurc(&[0.2, 0.9], &[0.0, 0.0]).unwrap(), 0.0);
    // all tied: a single point at full coverage
    let curve = risk_coverage_curve(&[0.5; 3], &[1.0, 0.0, 0.0]).unwrap();
    assert_eq!(curve.len(), 1);
    assert_eq!(curve[0].coverage, 1.0);
    // a bad ranking has positive excess
    assert!(excess_aurc(&[0.9, 0.1], &[0.0, 1.0]).unwrap() > 0.4);
}

/// conf [.9, .8, .3, 0], acc [1, 0, .3, 0].
/// c = 1: per-question scores if answered 1, −1, .3, −1 → Φ by threshold: .9 → .25, .8 → 0,
/// .3 → .075, 0 → −.175, abstain all → 0: best .9.
/// c = 0: 1, 0, .3, 0 → .25, .25, .325, .325: tie between .3 and 0 → the lower, 0.
#[test]
fn hand_effective_reliability() {
    let conf = [0.9, 0.8, 0.3, 0.0];
    let acc = [1.0, 0.0, 0.3, 0.0];
    let pairs: Vec<(f64, f64)> = conf.iter().copied().zip(acc).collect();
    assert_eq!(choose_threshold_phi(&pairs, 1.0).unwrap(), 0.9);
    assert!(close(
        effective_reliability(&conf, &acc, 0.9, 1.0).unwrap(),
        0.25
    ));
    assert!(close(
        effective_reliability(&conf, &acc, 0.3, 1.0).unwrap(),
        0.075
    ));
    assert!(close(
        effective_reliability(&conf, &acc, 0.0, 10.0).unwrap(),
        -18.7 / 4.0
    ));
    assert_eq!(choose_threshold_phi(&pairs, 0.0).unwrap(), 0.0);
    // Scores below 0 are answers never given (an image the check flags, ranked below all):
    // answering the two right ones below 0 would make Φ₁ (1 − 1 + 2)/4 = 0.5 at −0.2, but no
    // threshold below 0 is reachable: 0.9, Φ₁ 0.25. Coverage at risk likewise stops at 0.
    let gated = [(0.9, 1.0), (0.8, 0.0), (-0.1, 1.0), (-0.2, 1.0)];
    assert_eq!(choose_threshold_phi(&gated, 1.0).unwrap(), 0.9);
    let (gated_conf, gated_acc): (Vec<f64>, Vec<f64>) = gated.iter().copied().unzip();
    let at = coverage_at_risk(&gated_conf, &gated_acc, 0.5).unwrap();
    assert_eq!((at.coverage, at.threshold), (0.5, 0.8));
    // recorded decisions
    let answered = [true, false, true, true];
    let got = effective_reliability_of_decisions(&acc, &answered, 100.0).unwrap();
    assert!(close(got, (1.0 + 0.3 - 100.0) / 4.0));
    // everything wrong: abstain on all (threshold above the largest confidence, Φ = 0)
    let wrong: Vec<(f64, f64)> = conf.iter().map(|&c| (c, 0.0)).collect();
    let t = choose_threshold_phi(&wrong, 1.0).unwrap();
    assert!(t > 0.9 && t.is_finite());
    assert_eq!(
        effective_reliability(&conf, &[0.0; 4], t, 1.0).unwrap(),
        0.0
    );
    // everything right: answer all, down to confidence 0
    let right: Vec<(f64, f64)> = conf.iter().map(|&c| (c, 1.0)).collect();
    assert_eq!(choose_threshold_phi(&right, 100.0).unwrap(), 0.0);
    // fractional accuracy is never penalised
    assert_eq!(phi_score(0.3, true, 100.0), 0.3);
    assert_eq!(phi_score(0.0, true, 100.0), -100.0);
    assert_eq!(phi_score(0.0, false, 100.0), 0.0);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!(matches!(
        ece_equal_width(&[], &[], 15),
        Err(MetricError::Empty { .. })
    ));
    assert!(matches!(
        nll_binary(&[0.5], &[1.0, 0.0]),
        Err(MetricError::LengthMismatch { .. })
    ));
    assert!(matches!(
        brier_binary(&[1.5], &[1.0]),
        Err(MetricError::OutOfRange {
            what: "confidence",
            ..
        })
    ));
    assert!(matches!(
        ece_equal_mass(&[f64::NAN], &[1.0], 15),
        Err(MetricError::OutOfRange { .. })
    ));
    assert!(matches!(
        aurc(&[0.5], &[2.0]),
        Err(MetricError::OutOfRange {
            what: "accuracy",
            ..
        })
    ));
    assert!(matches!(
        auroc(&[f64::NAN, 1.0], &[true, false]),
        Err(MetricError::NotANumber { .. })
    ));
    assert!(matches!(auroc(&[], &[]), Err(MetricError::Empty { .. })));
    assert!(matches!(
        ece_equal_width(&[0.5], &[1.0], 0),
        Err(MetricError::BadParameter { .. })
    ));
    assert!(matches!(
        choose_threshold_phi(&[(0.5, 1.0)], -1.0),
        Err(MetricError::BadParameter { .. })
    ));
    assert!(matches!(
        choose_threshold_phi(&[], 1.0),
        Err(MetricError::Empty { .. })
    ));
    assert!(matches!(
        coverage_at_risk(&[0.5], &[1.0], f64::NAN),
        Err(MetricError::BadParameter { .. })
    ));
    assert!(matches!(optimal_aurc(&[]), Err(MetricError::Empty { .. })));
    assert!(matches!(
        summary(&[], None, &SummaryOptions::default()),
        Err(MetricError::Empty { .. })
    ));
    // error messages say what is wrong
    let e = brier_binary(&[1.5], &[1.0]).unwrap_err().to_string();
    assert!(e.contains("confidence[0] = 1.5"), "{e}");
}

#[test]
fn summary_without_optional_fields_and_round_trip() {
    let preds: Vec<Prediction> = [("cat", 0.9), ("dog", 0.2), ("cat", 0.6)]
        .iter()
        .map(|&(a, c)| Prediction {
            abstained: c < 0.5,
            ..bare(a, c, "cat")
        })
        .collect();
    let s = summary(&preds, None, &SummaryOptions::default()).unwrap();
    assert!(close(s.accuracy, 2.0 / 3.0));
    assert_eq!(s.ood_detection, None);
    assert_eq!(s.nll_multiclass, None);
    assert!(s.per_answer_type.is_empty());
    assert_eq!(s.recorded_decisions.risk, Some(0.0));
    assert!(close(s.recorded_decisions.coverage, 2.0 / 3.0));
    assert_eq!(s.error_detection.auroc, Some(1.0));
    let json = serde_json::to_string(&s).unwrap();
    let back: Summary = serde_json::from_str(&json).unwrap();
    // serde_json without its `float_roundtrip` feature may read a float back one ulp off
    // (0.9333333333333332 → 0.9333333333333333), so compare with the tolerance
    let mut errors = Vec::new();
    let (want, got) = (
        serde_json::to_value(&s).unwrap(),
        serde_json::to_value(&back).unwrap(),
    );
    compare("summary", &want, &got, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(back.thresholds_from, s.thresholds_from);
    // a prediction line parses with only the required fields
    let p: Prediction = serde_json::from_str(r#"{"answer": "2", "confidence": 0.5}"#).unwrap();
    assert!(p.human_answers.is_empty() && !p.abstained);
    assert_eq!(p.accuracy(NormalizeMode::Official), 0.0);
}

#[test]
fn direct_answer_accuracy_is_a_okvqa_s_rule() {
    use bella_vqa::metrics::{direct_answer_accuracy, NormalizeMode};
    // allenai/aokvqa evaluation/eval_predictions.py: acc = min(1.0, num_match / 3.0).
    let humans = [
        "red", "red", "red", "orange", "orange", "orange", "orange", "orange", "orange", "orange",
    ];
    let mode = NormalizeMode::default();
    assert_eq!(direct_answer_accuracy("red", &humans, mode), 1.0);
    assert_eq!(direct_answer_accuracy("Red.", &humans, mode), 1.0);
    assert_eq!(direct_answer_accuracy("red", &humans[1..], mode), 2.0 / 3.0);
    assert_eq!(direct_answer_accuracy("red", &humans[2..], mode), 1.0 / 3.0);
    assert_eq!(direct_answer_accuracy("blue", &humans, mode), 0.0);
    assert_eq!(direct_answer_accuracy("red", &[] as &[&str], mode), 0.0);
    // The VQA rule's leave-one-out average gives 0.9 for the same three matches.
    assert!((bella_vqa::metrics::vqa_accuracy("red", &humans, mode) - 0.9).abs() < 1e-12);
}

/// A benchmark's stored accuracy is used in the mode it was computed in, and only there.
#[test]
fn a_known_accuracy_stands_for_its_mode_only() {
    let mut p = bare("Two", 0.5, "2");
    // "Two" is "2" once normalised; the official rule normalises only when humans disagree.
    assert_eq!(p.accuracy(NormalizeMode::Always), 1.0);
    assert_eq!(p.accuracy(NormalizeMode::Official), 0.0);
    p.known_accuracy = Some((NormalizeMode::Official, 0.25));
    assert_eq!(p.accuracy(NormalizeMode::Official), 0.25);
    assert_eq!(p.accuracy(NormalizeMode::Always), 1.0);
}

/// A prediction with ten identical human answers `human` and nothing optional.
fn bare(answer: &str, confidence: f64, human: &str) -> Prediction {
    Prediction {
        answer: answer.to_string(),
        confidence,
        human_answers: vec![human.to_string(); 10],
        answer_type: None,
        is_ood: None,
        abstained: false,
        uncertainty: None,
        distribution: None,
        target: None,
        score: None,
        rule: Default::default(),
        known_accuracy: None,
    }
}
