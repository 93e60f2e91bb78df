//! A threshold with a finite-sample guarantee on the selective risk: Learn then Test
//! (Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then Test: Calibrating Predictive
//! Algorithms to Achieve Risk Control", 2021, arXiv 2110.01052), with a binomial tail p-value
//! (Hoeffding–Bentkus for fractional losses) and fixed-sequence testing from the most confident
//! threshold down. The derivation is in `docs/risk-guarantee.md`.
//!
//! With probability at least 1 − δ over the draw of the n validation questions, the chosen
//! threshold's selective risk on new exchangeable questions (the expected loss of an answered
//! question) is at most α.

use serde::{Deserialize, Serialize};

/// The tests a guarantee is made with: the binomial tail for 0/1 losses, Hoeffding–Bentkus for
/// fractional ones.
const METHODS: [&str; 2] = ["ltt-binomial", "ltt-hoeffding-bentkus"];

/// What a guaranteed threshold promises, stored with the particles and reported by `calibrate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RiskGuarantee {
    /// `ltt-binomial` (0/1 losses) or `ltt-hoeffding-bentkus` (fractional losses).
    pub method: String,
    /// Target selective risk.
    pub alpha: f64,
    /// Allowed probability that the validation draw misleads.
    pub delta: f64,
    /// Validation questions.
    pub questions: usize,
    /// Of them answered at the threshold.
    pub answered: usize,
    /// Their selective risk (1 − mean accuracy).
    pub risk: f64,
    /// The upper confidence bound on the threshold's risk at the level its test ran at (≤ α).
    pub bound: f64,
    /// answered / questions: the coverage to expect on new questions.
    pub coverage: f64,
}

impl RiskGuarantee {
    /// Refuses numbers that contradict each other (a hand-edited config): more answered than
    /// questions, α or δ outside (0, 1), a bound below the risk it certifies or above α, a
    /// coverage other than answered / questions, a risk with nothing answered, an unknown method.
    pub fn check(&self) -> Result<(), String> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let open_unit = |x: f64| x > 0.0 && x < 1.0;
        if self.answered > self.questions {
            return Err(format!(
                "{} answered of {} questions",
                self.answered, self.questions
            ));
        }
        if !(open_unit(self.alpha) && open_unit(self.delta)) {
            return Err(format!(
                "alpha {:?} and delta {:?} must lie in (0, 1)",
                self.alpha, self.delta
            ));
        }
        // The bound is an upper confidence bound on the risk, and the test passed: bound ≤ α.
        if !(unit(self.risk) && self.risk <= self.bound + 1e-12 && self.bound <= self.alpha) {
            return Err(format!(
                "risk {:?} <= bound {:?} <= alpha {:?} does not hold",
                self.risk, self.bound, self.alpha
            ));
        }
        if !unit(self.coverage) {
            return Err(format!("coverage {:?} is outside [0, 1]", self.coverage));
        }
        // The coverage and risk are those of the tested questions.
        let share = self.answered as f64 / self.questions.max(1) as f64;
        if (self.coverage - share).abs() > 1e-9 {
            return Err(format!(
                "coverage {:?} is not {} answered of {} questions",
                self.coverage, self.answered, self.questions
            ));
        }
        if self.answered == 0 && self.risk != 0.0 {
            return Err(format!("risk {:?} with no question answered", self.risk));
        }
        if !METHODS.contains(&self.method.as_str()) {
            return Err(format!("method {:?} is none of {METHODS:?}", self.method));
        }
        Ok(())
    }
}

/// ln P(Bin(n, p) ≤ k), by summing the pmf in log space.
fn log_binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return f64::NEG_INFINITY;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_pmf = n as f64 * lq;
    let mut log_sum = log_pmf;
    for i in 0..k {
        log_pmf += ((n - i) as f64).ln() - ((i + 1) as f64).ln() + lp - lq;
        let (hi, lo) = if log_pmf > log_sum {
            (log_pmf, log_sum)
        } else {
            (log_sum, log_pmf)
        };
        log_sum = hi + (lo - hi).exp().ln_1p();
    }
    log_sum.min(0.0)
}

/// The p-value of the null hypothesis "the risk is > α" after seeing `n` answered questions with
/// total loss `loss_sum`: small when the observed risk is well below α. `binary`: every loss is
/// 0 or 1 (exact binomial tail, LTT eq. for binary losses); otherwise the Hoeffding–Bentkus
/// p-value for losses in [0, 1] (LTT Proposition 3 / Bates et al. 2021).
pub fn p_value(n: usize, loss_sum: f64, alpha: f64, binary: bool) -> f64 {
    if n == 0 {
        return 1.0;
    }
    if binary {
        let k = (loss_sum + 1e-9).floor() as usize;
        return log_binomial_cdf(k, n, alpha).exp();
    }
    let r = (loss_sum / n as f64).clamp(0.0, 1.0);
    let a = r.min(alpha);
    // h1(a, α) = a ln(a/α) + (1 − a) ln((1 − a)/(1 − α)), 0 ln 0 = 0.
    let h = |a: f64| {
        let first = if a > 0.0 { a * (a / alpha).ln() } else { 0.0 };
        first + (1.0 - a) * ((1.0 - a) / (1.0 - alpha)).ln()
    };
    let hoeffding = (-(n as f64) * h(a)).exp();
    let k = ((n as f64 * r) - 1e-9).ceil().max(0.0) as usize;
    let bentkus = std::f64::consts::E * log_binomial_cdf(k, n, alpha).exp();
    hoeffding.min(bentkus).min(1.0)
}

/// Why no threshold could be guaranteed.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub alpha: f64,
    pub delta: f64,
    pub questions: usize,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "no threshold meets risk {} with confidence 1 − {} on {} question{}: allow more risk \
             (--target-risk), less confidence (--delta), or calibrate on more validation questions \
             (the test goes down from the most confident questions and stops at the first \
             threshold it cannot certify: a few wrong answers among the most confident stop it)",
            crate::console::number(self.alpha),
            crate::console::number(self.delta),
            self.questions,
            if self.questions == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for Refusal {}

/// The threshold and its guarantee (answer when score ≥ `threshold`).
#[derive(Clone, Debug, PartialEq)]
pub struct Guaranteed {
    pub threshold: f64,
    pub guarantee: RiskGuarantee,
}

/// Learn then Test over the candidate thresholds "answer when score ≥ s" for every distinct
/// validation score s, tested in order from the highest score down (fixed-sequence testing): the
/// hypothesis "risk(s) > α" is rejected while its p-value is at most the sequence's level, and
/// the lowest threshold rejected before the first failure is returned.
///
/// Where a sequence starts matters: at the very top a single unlucky error among a handful of
/// answers ends it before it reaches the thresholds worth having, while a late start gives up
/// the thresholds a small validation set can support. So two sequences run, each at level δ/2
/// (Bonferroni: the family-wise error stays ≤ δ), one from the first threshold at which a
/// loss-free run could be rejected, one from the first at which a run with half the target's
/// loss could; the lower of their thresholds is returned. Both starts depend on the number
/// answered, so on the scores only, never on the losses.
///
/// `loss[i]` in [0, 1] (1 − VQA accuracy). Errors with [`Refusal`] when no threshold is
/// rejected (empty input included).
pub fn learn_then_test(
    scores: &[f64],
    loss: &[f64],
    alpha: f64,
    delta: f64,
) -> Result<Guaranteed, Refusal> {
    let refusal = Refusal {
        alpha,
        delta,
        questions: scores.len(),
    };
    if scores.len() != loss.len() || !(alpha > 0.0 && alpha < 1.0) || !(delta > 0.0 && delta < 1.0)
    {
        return Err(refusal);
    }
    let binary = loss.iter().all(|&l| l == 0.0 || l == 1.0);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    // (threshold, answered, loss sum) of every candidate threshold, from the highest score down;
    // questions tied at a score are answered together.
    let mut steps: Vec<(f64, usize, f64)> = Vec::new();
    let mut loss_sum = 0.0;
    for (n, &i) in order.iter().enumerate() {
        loss_sum += loss[i];
        let last_of_tie = order.get(n + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            steps.push((scores[i], n + 1, loss_sum));
        }
    }
    let level = delta / 2.0;
    // The smallest n at which an observed risk of `share`·α is rejected at `level`.
    let start = |share: f64| {
        (1..=scores.len()).find(|&n| {
            let sum = n as f64 * alpha * share;
            p_value(n, if binary { sum.floor() } else { sum }, alpha, binary) <= level
        })
    };
    let sequence = |first: usize| {
        steps
            .iter()
            .filter(|(_, n, _)| *n >= first)
            .take_while(|(_, n, sum)| p_value(*n, *sum, alpha, binary) <= level)
            .last()
            .copied()
    };
    let best = [start(0.0), start(0.5)]
        .into_iter()
        .flatten()
        .filter_map(sequence)
        .max_by_key(|(_, n, _)| *n);
    let (threshold, answered, loss_sum) = best.ok_or(refusal)?;
    // The upper confidence bound: the smallest r at which this outcome rejects "risk > r".
    let (mut lo, mut hi) = (loss_sum / answered as f64, alpha);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if mid > 0.0 && p_value(answered, loss_sum, mid, binary) <= level {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Guaranteed {
        threshold,
        guarantee: RiskGuarantee {
            method: METHODS[usize::from(!binary)].into(),
            alpha,
            delta,
            questions: scores.len(),
            answered,
            risk: loss_sum / answered as f64,
            bound: hi,
            coverage: answered as f64 / scores.len() as f64,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tail_by_hand() {
        // P(Bin(3, 0.5) ≤ 1) = (1 + 3)/8.
        assert!((log_binomial_cdf(1, 3, 0.5).exp() - 0.5).abs() < 1e-12);
        // P(Bin(10, 0.1) ≤ 0) = 0.9^10.
        assert!((p_value(10, 0.0, 0.1, true) - 0.9f64.powi(10)).abs() < 1e-12);
        // P(Bin(20, 0.2) ≤ 2) = 0.2060847…
        assert!((p_value(20, 2.0, 0.2, true) - 0.206_084_718_948_474_1).abs() < 1e-9);
        assert_eq!(p_value(0, 0.0, 0.1, true), 1.0);
    }

    #[test]
    fn hoeffding_bentkus_is_the_smaller_of_its_two_bounds() {
        // n = 100, mean loss 0.02, α = 0.1: Hoeffding exp(−n h1(0.02, 0.1)), Bentkus
        // e·P(Bin(100, 0.1) ≤ 2).
        let h1 = 0.02 * (0.02f64 / 0.1).ln() + 0.98 * (0.98f64 / 0.9).ln();
        let hoeffding = (-100.0 * h1).exp();
        let bentkus = std::f64::consts::E * log_binomial_cdf(2, 100, 0.1).exp();
        let p = p_value(100, 2.0, 0.1, false);
        assert!((p - hoeffding.min(bentkus)).abs() < 1e-12);
        // Fractional losses never get a smaller p-value than the binary test of the same sum.
        assert!(p >= p_value(100, 2.0, 0.1, true));
    }

    #[test]
    fn a_clean_top_and_a_noisy_bottom() {
        // 100 questions: scores 1.00 … 0.01; the top 60 right, the rest wrong.
        let scores: Vec<f64> = (0..100).map(|i| 1.0 - i as f64 / 100.0).collect();
        let loss: Vec<f64> = (0..100).map(|i| if i < 60 { 0.0 } else { 1.0 }).collect();
        let g = learn_then_test(&scores, &loss, 0.1, 0.1).unwrap();
        // Both sequences start within the clean top 60 (0.9^29 ≤ δ/2); answering the top n with
        // e = n − 60 errors is rejected while P(Bin(n, 0.1) ≤ e) ≤ δ/2.
        let expected = (60..=100)
            .take_while(|&n| p_value(n, (n - 60) as f64, 0.1, true) <= 0.05)
            .last()
            .unwrap();
        assert_eq!(g.guarantee.answered, expected);
        assert_eq!(g.threshold, scores[expected - 1]);
        assert!(g.guarantee.bound <= 0.1 + 1e-9 && g.guarantee.bound >= g.guarantee.risk);
        assert_eq!(g.guarantee.method, "ltt-binomial");
    }

    #[test]
    fn too_few_questions_are_refused() {
        let e = learn_then_test(&[0.9, 0.8, 0.7], &[0.0, 0.0, 0.0], 0.05, 0.1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no threshold meets risk 0.05 with confidence 1 − 0.1 on 3 questions: allow more risk \
             (--target-risk), less confidence (--delta), or calibrate on more validation questions \
             (the test goes down from the most confident questions and stops at the first \
             threshold it cannot certify: a few wrong answers among the most confident stop it)"
        );
    }
}
