//! The Learn-then-Test guarantee, checked empirically on synthetic selector scores with a known
//! error model: a question's score s is uniform on [0, 1] and its answer is wrong with
//! probability (1 − s)², so the population selective risk of "answer when s ≥ t" is
//! (1 − t)²/3 (the mean of (1 − s)² over [t, 1]); at α = 0.1 the oracle answers s ≥ 1 − √0.3,
//! 54.8 % of the questions. Over many validation draws, the threshold chosen with
//! confidence 1 − δ must have a true risk above α in at most about δ of them; the empirical
//! choice (`--guarantee none`) should fail far more often.

use bella_vqa::guarantee::learn_then_test;
use bella_vqa::metrics;
use rand::{Rng, SeedableRng};

const ALPHA: f64 = 0.1;
const DELTA: f64 = 0.1;
const SPLITS: usize = 500;
const VAL: usize = 1000;
/// √(3α): the coverage whose risk is exactly α.
const ORACLE_COVERAGE: f64 = 0.547_722_557_505_166;

/// Risk of answering s ≥ t under the error model.
fn true_risk(t: f64) -> f64 {
    (1.0 - t.clamp(0.0, 1.0)).powi(2) / 3.0
}

/// `n` questions: (score, loss) with loss ~ Bernoulli((1 − score)²).
fn draw(rng: &mut impl Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    (0..n)
        .map(|_| {
            let s: f64 = rng.random();
            let wrong = rng.random::<f64>() < (1.0 - s).powi(2);
            (s, if wrong { 1.0 } else { 0.0 })
        })
        .unzip()
}

/// The realised risk of answering s ≥ t on a test draw.
fn realised(scores: &[f64], loss: &[f64], t: f64) -> Option<f64> {
    let answered: Vec<f64> = scores
        .iter()
        .zip(loss)
        .filter(|(s, _)| **s >= t)
        .map(|(_, l)| *l)
        .collect();
    (!answered.is_empty()).then(|| answered.iter().sum::<f64>() / answered.len() as f64)
}

#[test]
fn learn_then_test_holds_its_risk_in_all_but_delta_of_the_splits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let (mut ltt_violations, mut none_violations) = (0usize, 0usize);
    let (mut ltt_test_over, mut none_test_over) = (0usize, 0usize);
    let mut coverage = 0.0;
    for _ in 0..SPLITS {
        let (val_s, val_l) = draw(&mut rng, VAL);
        let (test_s, test_l) = draw(&mut rng, 20_000);
        let g = learn_then_test(&val_s, &val_l, ALPHA, DELTA).expect("1000 questions suffice");
        coverage += g.guarantee.coverage / SPLITS as f64;
        assert!(g.guarantee.bound <= ALPHA + 1e-9);
        if true_risk(g.threshold) > ALPHA {
            ltt_violations += 1;
        }
        if realised(&test_s, &test_l, g.threshold).is_some_and(|r| r > ALPHA) {
            ltt_test_over += 1;
        }
        // The empirical choice: the largest coverage whose validation risk is within α (VQA
        // accuracy = 1 − loss).
        let pairs: Vec<(f64, f64)> = val_s
            .iter()
            .zip(&val_l)
            .map(|(s, l)| (*s, 1.0 - l))
            .collect();
        let t = metrics::choose_threshold_for_risk(&pairs, ALPHA).unwrap();
        if true_risk(t) > ALPHA {
            none_violations += 1;
        }
        if realised(&test_s, &test_l, t).is_some_and(|r| r > ALPHA) {
            none_test_over += 1;
        }
    }
    let rate = |k: usize| k as f64 / SPLITS as f64;
    eprintln!(
        "α {ALPHA}, δ {DELTA}, {SPLITS} splits of {VAL} validation questions: true risk > α in \
         {:.3} (ltt) vs {:.3} (none); realised risk on 20000 test questions > α in {:.3} (ltt) \
         vs {:.3} (none); mean ltt coverage {coverage:.3} (the oracle's: {:.3})",
        rate(ltt_violations),
        rate(none_violations),
        rate(ltt_test_over),
        rate(none_test_over),
        ORACLE_COVERAGE
    );
    // Binomial slack: 500 splits at rate δ have sd √(500·0.1·0.9) ≈ 6.7, so ≤ δ + 3 sd / 500.
    let slack = 3.0 * (DELTA * (1.0 - DELTA) / SPLITS as f64).sqrt();
    assert!(
        rate(ltt_violations) <= DELTA + slack,
        "{}",
        rate(ltt_violations)
    );
    // The empirical choice sits on the boundary: about half of its thresholds are too low.
    assert!(rate(none_violations) > 0.3, "{}", rate(none_violations));
    // The guarantee costs coverage but not all of it.
    assert!(coverage > 0.3 && coverage < ORACLE_COVERAGE, "{coverage}");
}

#[test]
fn learn_then_test_with_fractional_losses_holds_too() {
    // VQA-like accuracies: a wrong answer scores 0 or 0.3, a right one 1 or 0.9; the loss of a
    // question is 1 − accuracy with mean 0.85·(1 − s)² + 0.05·(1 − (1 − s)²).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // The mean over s ∈ [t, 1] of 0.05 + 0.8 (1 − s)².
    let risk = |t: f64| 0.05 + 0.8 * (1.0 - t).powi(2) / 3.0;
    let (mut violations, mut refusals) = (0, 0);
    let splits = 200;
    for _ in 0..splits {
        let (s, l): (Vec<f64>, Vec<f64>) = (0..VAL)
            .map(|_| {
                let s: f64 = rng.random();
                let wrong = rng.random::<f64>() < (1.0 - s).powi(2);
                let partial = rng.random::<f64>() < 0.5;
                let loss = match (wrong, partial) {
                    (true, true) => 0.7,
                    (true, false) => 1.0,
                    (false, true) => 0.1,
                    (false, false) => 0.0,
                };
                (s, loss)
            })
            .unzip();
        // A refusal answers nothing, which keeps the risk.
        match learn_then_test(&s, &l, 0.15, DELTA) {
            Ok(g) => {
                assert_eq!(g.guarantee.method, "ltt-hoeffding-bentkus");
                if risk(g.threshold) > 0.15 {
                    violations += 1;
                }
            }
            Err(_) => refusals += 1,
        }
    }
    let rate = violations as f64 / splits as f64;
    eprintln!(
        "fractional losses: true risk > 0.15 in {rate:.3} of {splits} splits, {refusals} refused"
    );
    assert!(refusals < splits / 10, "{refusals}");
    assert!(rate <= DELTA + 3.0 * (DELTA * (1.0 - DELTA) / splits as f64).sqrt());
}
