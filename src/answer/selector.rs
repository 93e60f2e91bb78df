//! Abstention selectors and the shared temperature (design §5 step 5, §11 "Abstention scores").
//!
//! A [`Selector`] maps the facts the aggregation already has about one question ([`Facts`]: the
//! model average, the entropies, the vote share, the spread of the answer's probability over the
//! particles, the answer's length) to one score where higher means "answer". Abstention is
//! `score < threshold` for every selector; `calibrate` fits the selector's parameters and chooses
//! the threshold on validation questions, and stores both with the particles.
//!
//! The [`temper`]ature is applied to every particle's row before aggregation; [`assess`] is the
//! one place where a P×K matrix becomes an [`Aggregate`] and its [`Facts`].

use serde::{Deserialize, Serialize};

use super::aggregate::{aggregate, aggregate_with_other, Aggregate};
use super::confidence_map::ConfidenceMap;
use crate::metrics;

/// Everything a selector may look at, for one question.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Facts {
    /// p̄ of the answer, through the calibrated confidence map when there is one (the
    /// confidence shown).
    pub confidence: f64,
    /// Mutual information between answer and particle (nats).
    pub epistemic: f64,
    /// Mean entropy of the particles (nats).
    pub aleatoric: f64,
    /// Share of particles whose own most likely candidate is the answer.
    pub vote_share: f64,
    /// Standard deviation over particles of the answer's probability (population, 1/P).
    pub answer_std: f64,
    /// Words in the answer.
    pub answer_words: f64,
    /// Candidates that could be the answer (the "other" mass not counted).
    pub candidates: f64,
}

/// The [`Facts`] a learned selector reads, in the order of its coefficients.
pub const FEATURES: [&str; 7] = [
    "confidence",
    "epistemic",
    "aleatoric",
    "vote_share",
    "answer_std",
    "answer_words",
    "candidates",
];

impl Facts {
    /// The facts of the aggregate `agg` of `probs` whose answer is `answer`.
    pub fn new(probs: &[Vec<f64>], other: bool, agg: &Aggregate, answer: &str) -> Self {
        let p = probs.len().max(1) as f64;
        let var = probs
            .iter()
            .map(|row| (row[agg.best] - agg.confidence).powi(2))
            .sum::<f64>()
            / p;
        let k = probs.first().map_or(0, Vec::len);
        Facts {
            confidence: agg.confidence,
            epistemic: agg.uncertainty.epistemic,
            aleatoric: agg.uncertainty.aleatoric,
            vote_share: agg.vote_share,
            answer_std: var.sqrt(),
            answer_words: answer.split_whitespace().count() as f64,
            candidates: (if other { k.saturating_sub(1) } else { k }) as f64,
        }
    }

    /// The values of [`FEATURES`].
    pub fn features(&self) -> [f64; FEATURES.len()] {
        [
            self.confidence,
            self.epistemic,
            self.aleatoric,
            self.vote_share,
            self.answer_std,
            self.answer_words,
            self.candidates,
        ]
    }
}

/// Tempers every particle's row at temperature `t`: `p^(1/t)` renormalised (`t > 1` flattens,
/// `t < 1` sharpens, `t = 1` returns the rows unchanged). With `other` the last column is the mass
/// of every answer not among the candidates (LLaVA); it is tempered as if it were one more
/// answer. That is an approximation: tempering each unseen answer separately would move more mass
/// into "other" at `t > 1`, but those answers were never scored, so the lump is all we have.
pub fn temper(probs: &[Vec<f64>], t: f64) -> Vec<Vec<f64>> {
    if t == 1.0 {
        return probs.to_vec();
    }
    probs
        .iter()
        .map(|row| {
            // In log space: the largest entry becomes 1 before the power, so nothing underflows
            // to an all-zero row.
            let max = row.iter().cloned().fold(0.0, f64::max);
            let powered: Vec<f64> = row
                .iter()
                .map(|&x| {
                    if x > 0.0 {
                        ((x / max).ln() / t).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = powered.iter().sum();
            powered.into_iter().map(|x| x / sum).collect()
        })
        .collect()
}

/// Tempers, aggregates and collects the facts of one question's P×K matrix; `candidates` names
/// the answer columns. The facts' confidence goes through `map` (the aggregate keeps p̄).
pub fn assess(
    probs: &[Vec<f64>],
    other: bool,
    candidates: &[String],
    temperature: f64,
    map: Option<&ConfidenceMap>,
) -> Result<(Aggregate, Facts), String> {
    let tempered = temper(probs, temperature);
    let agg = if other {
        aggregate_with_other(&tempered)
    } else {
        aggregate(&tempered)
    }?;
    let answer = candidates
        .get(agg.best)
        .ok_or_else(|| format!("no candidate {} among {}", agg.best, candidates.len()))?;
    let mut facts = Facts::new(&tempered, other, &agg, answer);
    if let Some(map) = map {
        facts.confidence = map.apply(facts.confidence);
    }
    Ok((agg, facts))
}

/// A logistic model of "the answer is right" over standardised [`FEATURES`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    /// Names of the features, as [`FEATURES`] (checked when loaded).
    pub features: Vec<String>,
    /// Standardisation: feature mean and standard deviation on the fitting questions.
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// Coefficients of the standardised features, and the intercept.
    pub weights: Vec<f64>,
    pub bias: f64,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl Logistic {
    /// Fits by Newton's method (IRLS) with a small ridge penalty (`L2` on the weights, not the
    /// intercept), so separable data and constant features stay finite. `y` are soft labels in
    /// [0, 1] (the VQA accuracy); the loss is the mean binary cross-entropy.
    pub fn fit(x: &[[f64; FEATURES.len()]], y: &[f64]) -> Self {
        const L2: f64 = 1e-2;
        const D: usize = FEATURES.len();
        let n = x.len().max(1) as f64;
        let mut mean = [0.0; D];
        let mut scale = [0.0; D];
        for j in 0..D {
            mean[j] = x.iter().map(|r| r[j]).sum::<f64>() / n;
            let var = x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n;
            // A constant feature gets scale 1 (its standardised value is 0).
            scale[j] = if var > 1e-24 { var.sqrt() } else { 1.0 };
        }
        // Design rows with the intercept last.
        let rows: Vec<[f64; D + 1]> = x
            .iter()
            .map(|r| {
                let mut z = [1.0; D + 1];
                for j in 0..D {
                    z[j] = (r[j] - mean[j]) / scale[j];
                }
                z
            })
            .collect();
        let mut w = [0.0; D + 1];
        for _ in 0..100 {
            let mut grad = [0.0; D + 1];
            let mut hess = [[0.0; D + 1]; D + 1];
            for (z, &t) in rows.iter().zip(y) {
                let p = sigmoid(z.iter().zip(&w).map(|(a, b)| a * b).sum());
                let s = (p * (1.0 - p)).max(1e-12);
                for a in 0..=D {
                    grad[a] += (p - t) * z[a] / n;
                    for b in 0..=D {
                        hess[a][b] += s * z[a] * z[b] / n;
                    }
                }
            }
            for a in 0..D {
                grad[a] += L2 * w[a];
                hess[a][a] += L2;
            }
            hess[D][D] += 1e-9;
            let step = solve(hess, grad);
            let mut largest: f64 = 0.0;
            for a in 0..=D {
                w[a] -= step[a];
                largest = largest.max(step[a].abs());
            }
            if largest < 1e-10 {
                break;
            }
        }
        Logistic {
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
            mean: mean.to_vec(),
            scale: scale.to_vec(),
            weights: w[..D].to_vec(),
            bias: w[D],
        }
    }

    /// The modelled probability that the answer is right.
    pub fn predict(&self, facts: &Facts) -> f64 {
        let z: f64 = facts
            .features()
            .iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .zip(&self.weights)
            .map(|(((x, m), s), w)| (x - m) / s * w)
            .sum();
        sigmoid(z + self.bias)
    }

    /// Whether the stored coefficients fit this build's [`FEATURES`].
    fn check(&self) -> Result<(), String> {
        let d = FEATURES.len();
        if self.features != FEATURES
            || self.mean.len() != d
            || self.scale.len() != d
            || self.weights.len() != d
        {
            return Err(format!(
                "the learned selector reads features {:?} with {} coefficients, this bella-vqa \
                 computes {FEATURES:?}: recalibrate",
                self.features,
                self.weights.len()
            ));
        }
        // The fit's scales are ≥ 1e-12 (a standard deviation above it, or 1); below, a feature's
        // standardised value overflows and the score is not a number.
        if self.scale.iter().any(|s| s.is_nan() || *s < 1e-12) {
            return Err("the learned selector has a feature scale below 1e-12: recalibrate".into());
        }
        Ok(())
    }
}

/// Gaussian elimination with partial pivoting of a small symmetric positive-definite system.
pub(crate) fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> [f64; N] {
    for c in 0..N {
        let pivot = (c..N)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        a.swap(c, pivot);
        b.swap(c, pivot);
        if a[c][c].abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[c];
        for r in c + 1..N {
            let f = a[r][c] / pivot_row[c];
            for (x, p) in a[r][c..].iter_mut().zip(&pivot_row[c..]) {
                *x -= f * p;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0.0; N];
    for c in (0..N).rev() {
        let rest: f64 = (c + 1..N).map(|k| a[c][k] * x[k]).sum();
        x[c] = if a[c][c].abs() < 1e-300 {
            0.0
        } else {
            (b[c] - rest) / a[c][c]
        };
    }
    x
}

/// The score that decides abstention (higher means "answer"), with its fitted parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Selector {
    /// p̄ of the answer (the Bayesian model average), through the calibrated confidence map when
    /// there is one: the confidence shown.
    #[default]
    Confidence,
    /// exp(−MI): the same order as −MI (less disagreement between particles first), kept in
    /// (0, 1] so that thresholds read like the others.
    Epistemic,
    /// mean − λ·std over particles of the answer's probability (Variational VQA, arXiv
    /// 2505.09591), floored at 0 so that every score (and threshold) stays in [0, 1].
    RiskAverse { lambda: f64 },
    /// The share of particles whose own answer is the answer.
    Vote,
    /// A logistic model of correctness over [`FEATURES`], fitted on validation questions.
    Learned(Logistic),
}

/// The names `calibrate --selector` takes, in the order of its table.
pub const SELECTOR_NAMES: [&str; 5] = ["confidence", "epistemic", "risk-averse", "vote", "learned"];

/// Why the selector `name` cannot rank questions with `particles` particles, if it cannot:
/// `epistemic` and `vote` measure how the particles disagree, and one particle gives them the
/// same score (1) on every question.
pub fn cannot_rank(name: &str, particles: usize) -> Option<String> {
    match name {
        "epistemic" | "vote" if particles < 2 => Some(format!(
            "the {name} selector measures how the particles disagree, and with {particles} \
             particle its score is 1 on every question, so no threshold tells them apart"
        )),
        _ => None,
    }
}

/// The λ values `risk-averse` is chosen from.
pub const RISK_AVERSE_LAMBDAS: [f64; 6] = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0];

impl Selector {
    pub fn name(&self) -> &'static str {
        match self {
            Selector::Confidence => "confidence",
            Selector::Epistemic => "epistemic",
            Selector::RiskAverse { .. } => "risk-averse",
            Selector::Vote => "vote",
            Selector::Learned(_) => "learned",
        }
    }

    pub fn score(&self, f: &Facts) -> f64 {
        match self {
            Selector::Confidence => f.confidence,
            Selector::Epistemic => (-f.epistemic).exp(),
            Selector::RiskAverse { lambda } => (f.confidence - lambda * f.answer_std).max(0.0),
            Selector::Vote => f.vote_share,
            Selector::Learned(m) => m.predict(f),
        }
    }

    /// Refuses parameters this build cannot use (a stored config from elsewhere).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Selector::RiskAverse { lambda } if !(lambda.is_finite() && *lambda >= 0.0) => Err(
                format!("risk-averse λ must be finite and ≥ 0, not {lambda}"),
            ),
            Selector::Learned(m) => m.check(),
            _ => Ok(()),
        }
    }

    /// Fits the selector `name` ([`SELECTOR_NAMES`]) on questions' facts and accuracies:
    /// `risk-averse` takes the λ of [`RISK_AVERSE_LAMBDAS`] with the lowest AURC (ties: the
    /// smaller λ), `learned` fits its [`Logistic`] model.
    pub fn fit(name: &str, facts: &[Facts], acc: &[f64]) -> anyhow::Result<Self> {
        Ok(match name {
            "confidence" => Selector::Confidence,
            "epistemic" => Selector::Epistemic,
            "vote" => Selector::Vote,
            "risk-averse" => {
                let mut best: Option<(f64, f64)> = None;
                for lambda in RISK_AVERSE_LAMBDAS {
                    let s = Selector::RiskAverse { lambda };
                    let aurc = metrics::aurc(&s.scores(facts), acc)?;
                    if best.is_none_or(|(_, b)| aurc < b - 1e-12) {
                        best = Some((lambda, aurc));
                    }
                }
                Selector::RiskAverse {
                    lambda: best.map_or(0.0, |(l, _)| l),
                }
            }
            "learned" => {
                let x: Vec<_> = facts.iter().map(Facts::features).collect();
                Selector::Learned(Logistic::fit(&x, acc))
            }
            other => anyhow::bail!(
                "unknown selector {other:?}: use one of {} or auto",
                SELECTOR_NAMES.join(", ")
            ),
        })
    }

    pub fn scores(&self, facts: &[Facts]) -> Vec<f64> {
        facts.iter().map(|f| self.score(f)).collect()
    }
}

/// Each item's score from a model fitted on the other `folds` folds (item `i` in fold
/// `i % folds`): what `calibrate` scores the selectors and the confidence maps with, on questions
/// they were not fitted on.
pub fn cross_fit<T: Copy, M, E>(
    items: &[T],
    acc: &[f64],
    folds: usize,
    fit: impl Fn(&[T], &[f64]) -> Result<M, E>,
    score: impl Fn(&M, &T) -> f64,
) -> Result<Vec<f64>, E> {
    let mut scores = vec![0.0; items.len()];
    for fold in 0..folds {
        let (train, train_acc): (Vec<T>, Vec<f64>) = items
            .iter()
            .zip(acc)
            .enumerate()
            .filter(|(i, _)| i % folds != fold)
            .map(|(_, (t, a))| (*t, *a))
            .unzip();
        let model = fit(&train, &train_acc)?;
        for (i, item) in items.iter().enumerate().filter(|(i, _)| i % folds == fold) {
            scores[i] = score(&model, item);
        }
    }
    Ok(scores)
}

/// The range [`fit_temperature`] searches.
pub const TEMPERATURE_RANGE: (f64, f64) = (0.05, 20.0);

/// What [`fit_temperature`] minimises over the validation questions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TemperatureObjective {
    /// The cross-entropy of the model-average distribution over every column (each candidate
    /// and, for LLaVA, the other-answer mass) against the question's target distribution: the
    /// NLL of the answers. Its optimum weighs the wrong answers whose right answer got almost no
    /// probability heavily, which can leave the confidence of the answers given off.
    #[default]
    Answers,
    /// The log loss of the confidence: the model-average probability of the answer given
    /// against that answer's accuracy, the event that ECE, the reliability plot and abstention
    /// look at (top-label calibration).
    Confidence,
}

/// Fits one shared temperature by minimising `objective` over the questions: each is the
/// particles' rows (every row tempered, [`temper`]) and a target over their columns (the
/// candidates' accuracies; with `other`, LLaVA's last column is the other-answer mass and the
/// rest of the target is on it). Golden-section search over log T in [`TEMPERATURE_RANGE`] (the
/// loss of a tempered softmax average is unimodal in practice; the search returns the best point
/// it saw). Questions with an empty or all-zero target are left out.
///
/// Refused, saying why, when no question is left, or when the fit runs to an end of the range
/// (the optimum is at it, or the loss at the end is as low as at the optimum: a flat minimum):
/// the validation answers then favour ever sharper (all right) or ever flatter (the right
/// answers less likely than an even spread: all wrong, or right and unsure) probabilities, and a
/// temperature there only makes every confidence 1 or every one alike.
pub fn fit_temperature(
    questions: &[(&[Vec<f64>], Vec<f64>)],
    other: bool,
    objective: TemperatureObjective,
) -> Result<f64, String> {
    let used: Vec<&(&[Vec<f64>], Vec<f64>)> = questions
        .iter()
        .filter(|(p, q)| !p.is_empty() && q.iter().sum::<f64>() > 0.0)
        .collect();
    if used.is_empty() {
        return Err("no validation question has a right answer among its candidates".into());
    }
    let loss = |probs: &[Vec<f64>], target: &[f64], t: f64| -> f64 {
        let tempered = temper(probs, t);
        match objective {
            TemperatureObjective::Answers => {
                let total: f64 = target.iter().sum();
                target
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| **w > 0.0)
                    .map(|(k, w)| {
                        let mean =
                            tempered.iter().map(|row| row[k]).sum::<f64>() / tempered.len() as f64;
                        -(w / total) * mean.max(1e-12).ln()
                    })
                    .sum::<f64>()
            }
            TemperatureObjective::Confidence => {
                let agg = if other {
                    aggregate_with_other(&tempered)
                } else {
                    aggregate(&tempered)
                };
                // Rows that are no distribution are refused where they are answered; here
                // they only add nothing.
                let Ok(agg) = agg else { return 0.0 };
                let c = agg.confidence.clamp(1e-12, 1.0 - 1e-12);
                let a = target.get(agg.best).copied().unwrap_or(0.0).clamp(0.0, 1.0);
                -(a * c.ln() + (1.0 - a) * (1.0 - c).ln())
            }
        }
    };
    let nll = |log_t: f64| -> f64 {
        let t = log_t.exp();
        used.iter()
            .map(|(probs, target)| loss(probs, target, t))
            .sum::<f64>()
            / used.len() as f64
    };
    let (lo, hi) = (TEMPERATURE_RANGE.0.ln(), TEMPERATURE_RANGE.1.ln());
    let (mut a, mut b) = (lo, hi);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (nll(c), nll(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = nll(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = nll(d);
        }
    }
    let log_t = (a + b) / 2.0;
    let best = nll(log_t);
    // T = 1 is kept when the search cannot beat it (flat NLL).
    if best >= nll(0.0) {
        return Ok(1.0);
    }
    // Ran to an end: the optimum is at it, or the NLL there is as low (a flat minimum that
    // reaches the end: sharp, all-right answers make the NLL exactly 0 in f64 below T ≈ 0.1,
    // and the search stops at the edge of that region, far from the end of the range).
    let edge = 0.01;
    let as_low = |end: f64| nll(end) <= best + 1e-12;
    if log_t - lo < edge || as_low(lo) {
        return Err(format!(
            "the validation answers favour ever sharper probabilities (the fit ran to T = {}, \
             the sharpest it tries): no temperature in its range fits them; calibrate on \
             questions the model gets both right and wrong (or --no-temperature)",
            TEMPERATURE_RANGE.0
        ));
    }
    if hi - log_t < edge || as_low(hi) {
        return Err(format!(
            "the validation answers favour ever flatter probabilities (the fit ran to T = {}, \
             the flattest it tries): the particles give the right answers less probability \
             than an even spread over their candidates{} would (sure of wrong answers, or \
             unsure of right ones), which no temperature corrects, and their confidence is kept \
             as it is; a confidence map recalibrates it (--confidence-map platt or auto), or \
             train the particles on questions like these",
            TEMPERATURE_RANGE.1,
            if other {
                " and \"any other answer\""
            } else {
                ""
            }
        ));
    }
    Ok(log_t.exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn facts(confidence: f64, answer_std: f64) -> Facts {
        Facts {
            confidence,
            epistemic: 0.0,
            aleatoric: 0.0,
            vote_share: 1.0,
            answer_std,
            answer_words: 1.0,
            candidates: 2.0,
        }
    }

    #[test]
    fn temperature_one_is_the_identity_and_others_temper() {
        let rows = vec![vec![0.7, 0.2, 0.1], vec![0.0, 0.5, 0.5]];
        assert_eq!(temper(&rows, 1.0), rows);
        // T = 2: √0.7, √0.2, √0.1 renormalised.
        let s = 0.7f64.sqrt() + 0.2f64.sqrt() + 0.1f64.sqrt();
        let t = temper(&rows, 2.0);
        assert!((t[0][0] - 0.7f64.sqrt() / s).abs() < 1e-12);
        assert_eq!(t[1], vec![0.0, 0.5, 0.5]);
        // T → small: the argmax takes everything, without NaN.
        let sharp = temper(&[vec![1e-300, 1.0 - 1e-300]], 1e-3);
        assert!(sharp[0][1] == 1.0 && sharp[0][0] == 0.0);
    }

    #[test]
    fn facts_and_scores_by_hand() {
        // p1 = (0.9, 0.1), p2 = (0.5, 0.5): p̄ = (0.7, 0.3), answer 0, std of (0.9, 0.5) = 0.2.
        let probs = vec![vec![0.9, 0.1], vec![0.5, 0.5]];
        let cands = vec!["a red one".to_string(), "blue".to_string()];
        let (agg, f) = assess(&probs, false, &cands, 1.0, None).unwrap();
        assert_eq!(agg.best, 0);
        assert!((f.answer_std - 0.2).abs() < 1e-12);
        assert_eq!(f.answer_words, 3.0);
        assert_eq!(f.candidates, 2.0);
        assert!((Selector::RiskAverse { lambda: 2.0 }.score(&f) - 0.3).abs() < 1e-12);
        assert_eq!(Selector::Vote.score(&f), 1.0);
        assert!((Selector::Epistemic.score(&f) - (-agg.uncertainty.epistemic).exp()).abs() < 1e-15);
        assert_eq!(Selector::Confidence.score(&f), 0.7);
    }

    #[test]
    fn selectors_round_trip_through_json_and_default_to_confidence() {
        let s = Selector::RiskAverse { lambda: 0.5 };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"name":"risk-averse","lambda":0.5}"#);
        assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), s);
        assert_eq!(Selector::default(), Selector::Confidence);
        let x = vec![
            [0.1, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0],
            [0.9, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0],
        ];
        let l = Selector::Learned(Logistic::fit(&x, &[0.0, 1.0]));
        let back: Selector = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        assert!(back.check().is_ok());
        // A scale that makes a standardised feature overflow (hand-edited) is refused.
        let Selector::Learned(mut m) = l else {
            unreachable!()
        };
        m.scale[0] = 5e-324;
        assert!(Selector::Learned(m).check().is_err());
    }

    #[test]
    fn risk_averse_picks_the_lambda_that_ranks_best() {
        // Correctness depends on the spread only: the larger λ ranks the errors last.
        let f = vec![
            facts(0.9, 0.4),
            facts(0.8, 0.0),
            facts(0.7, 0.0),
            facts(0.95, 0.45),
        ];
        let acc = [0.0, 1.0, 1.0, 0.0];
        let s = Selector::fit("risk-averse", &f, &acc).unwrap();
        // λ = 1: scores 0.5, 0.8, 0.7, 0.5 → both errors last (AURC optimal); λ ≥ 1 ties, the
        // smaller wins; λ < 1 ranks 0.95 − 0.45λ above 0.7 for λ < 0.56.
        assert_eq!(s, Selector::RiskAverse { lambda: 1.0 });
        assert!(Selector::fit("nonsense", &f, &acc).is_err());
    }

    #[test]
    fn the_learned_selector_recovers_a_known_logistic_model() {
        // P(right) = σ(3·(confidence − 0.5) − 2·epistemic), labels drawn from it.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..20000 {
            let mut f = facts(rng.random::<f64>(), 0.0);
            f.epistemic = rng.random::<f64>();
            f.vote_share = rng.random::<f64>(); // irrelevant
            let p = sigmoid(3.0 * (f.confidence - 0.5) - 2.0 * f.epistemic);
            y.push(if rng.random::<f64>() < p { 1.0 } else { 0.0 });
            x.push(f.features());
        }
        let m = Logistic::fit(&x, &y);
        // Back to raw units: weight / scale.
        let raw = |j: usize| m.weights[j] / m.scale[j];
        assert!((raw(0) - 3.0).abs() < 0.25, "confidence {}", raw(0));
        assert!((raw(1) + 2.0).abs() < 0.25, "epistemic {}", raw(1));
        assert!(raw(3).abs() < 0.25, "vote share {}", raw(3));
        // Constant features get no weight.
        assert!(m.weights[4].abs() < 1e-9 && m.weights[6].abs() < 1e-9);
    }

    /// Draws questions whose true answer distribution is softmax(z); the model reports
    /// softmax(z · `sharpen`) from each of 3 identical particles. The temperature that undoes the
    /// miscalibration is T = `sharpen`.
    fn miscalibrated(sharpen: f64, seed: u64) -> Vec<(Vec<Vec<f64>>, Vec<f64>)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..3000)
            .map(|_| {
                let z: Vec<f64> = (0..4).map(|_| rng.random::<f64>() * 3.0).collect();
                let softmax = |s: f64| {
                    let e: Vec<f64> = z.iter().map(|x| (x * s).exp()).collect();
                    let t: f64 = e.iter().sum();
                    e.into_iter().map(|x| x / t).collect::<Vec<f64>>()
                };
                let truth = softmax(1.0);
                let u = rng.random::<f64>();
                let mut acc = 0.0;
                let label = truth
                    .iter()
                    .position(|p| {
                        acc += p;
                        u < acc
                    })
                    .unwrap_or(3);
                let mut target = vec![0.0; 4];
                target[label] = 1.0;
                let row = softmax(sharpen);
                (vec![row.clone(), row.clone(), row], target)
            })
            .collect()
    }

    #[test]
    fn the_fitted_temperature_recovers_a_known_one() {
        for (sharpen, seed) in [(2.0, 1), (0.5, 2), (1.0, 3)] {
            let data = miscalibrated(sharpen, seed);
            let qs: Vec<(&[Vec<f64>], Vec<f64>)> = data
                .iter()
                .map(|(p, t)| (p.as_slice(), t.clone()))
                .collect();
            let t = fit_temperature(&qs, false, TemperatureObjective::Answers).unwrap();
            assert!(
                (t.ln() - sharpen.ln()).abs() < 0.15,
                "sharpened ×{sharpen}: fitted T {t}"
            );
        }
        assert!(fit_temperature(&[], false, TemperatureObjective::Answers).is_err());
        // Every answer right (wrong): the NLL falls all the way to the end of the range, which
        // is refused rather than stored.
        let right = vec![vec![0.6, 0.3, 0.1]; 2];
        for (target, word) in [
            (vec![1.0, 0.0, 0.0], "sharper"),
            (vec![0.0, 0.0, 1.0], "flatter"),
        ] {
            let qs = [(right.as_slice(), target)];
            let e = fit_temperature(&qs, false, TemperatureObjective::Answers).unwrap_err();
            assert!(e.contains(word), "{e}");
        }
    }

    /// Every question has the same rows, so every confidence is the same number c(T): its log
    /// loss is least where c(T) is the share of right answers (0.9), whatever the probability
    /// the wrong answers gave the right one. That probability (1e-4: the wrong questions' right
    /// answer is the third column) is what the answers' NLL weighs most: it flattens (to
    /// T ≈ 4.1, c ≈ 0.52), and the confidence falls further below the accuracy.
    #[test]
    fn the_confidence_objective_makes_the_confidence_the_accuracy() {
        let rows = vec![vec![0.7, 0.2999, 0.0001]; 3];
        let mut qs: Vec<(&[Vec<f64>], Vec<f64>)> = vec![(rows.as_slice(), vec![1.0, 0.0, 0.0]); 9];
        qs.push((rows.as_slice(), vec![0.0, 0.0, 1.0]));
        let confidence_at = |t: f64| aggregate(&temper(&rows, t)).unwrap().confidence;
        let t = fit_temperature(&qs, false, TemperatureObjective::Confidence).unwrap();
        assert!(t < 1.0, "sharpens: T {t}");
        assert!(
            (confidence_at(t) - 0.9).abs() < 1e-3,
            "T {t}: {}",
            confidence_at(t)
        );
        let t = fit_temperature(&qs, false, TemperatureObjective::Answers).unwrap();
        assert!(
            t > 1.0 && confidence_at(t) < 0.7,
            "T {t}: {}",
            confidence_at(t)
        );
        // With LLaVA's other-answer column (not an answer that can be given) the same holds.
        let with_other = |rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
            rows.iter()
                .map(|r| r.iter().map(|x| x * 0.9).chain([0.1]).collect())
                .collect()
        };
        let rows = with_other(&rows);
        let mut qs: Vec<(&[Vec<f64>], Vec<f64>)> =
            vec![(rows.as_slice(), vec![1.0, 0.0, 0.0, 0.0]); 9];
        qs.push((rows.as_slice(), vec![0.0, 0.0, 1.0, 0.0]));
        let t = fit_temperature(&qs, true, TemperatureObjective::Confidence).unwrap();
        let c = aggregate_with_other(&temper(&rows, t)).unwrap().confidence;
        assert!((c - 0.9).abs() < 1e-3, "T {t}: {c}");
    }

    #[test]
    fn a_flat_minimum_at_the_sharp_end_is_refused_too() {
        // Sharp and right (1, 2 or 10 questions): tempered below T ≈ 0.1 the answer's probability
        // is 1.0 in f64 and the NLL exactly 0, a flat region that the search stops at the edge
        // of (T ≈ 0.10), not at the end of the range. The answers favour ever sharper
        // probabilities all the same.
        let sharp = vec![vec![0.99, 0.005, 0.005]; 4];
        for n in [1, 2, 10] {
            let qs = vec![(sharp.as_slice(), vec![1.0, 0.0, 0.0]); n];
            let e = fit_temperature(&qs, false, TemperatureObjective::Answers).unwrap_err();
            assert!(e.contains("sharper"), "{n} question(s): {e}");
        }
    }

    #[test]
    fn answers_sure_and_mostly_wrong_run_to_the_flat_end_and_say_what_recalibrates_them() {
        // Sure of the first answer, right on 1 question of 5 (the others' right answer is one
        // the particles give almost nothing): no temperature in the range fits.
        let sure = vec![vec![0.98, 0.01, 0.01]; 4];
        let mut qs = vec![(sure.as_slice(), vec![0.0, 1.0, 0.0]); 4];
        qs.push((sure.as_slice(), vec![1.0, 0.0, 0.0]));
        let e = fit_temperature(&qs, false, TemperatureObjective::Answers).unwrap_err();
        assert!(
            e.contains("flatter") && e.contains("--confidence-map platt"),
            "{e}"
        );
        // Always right but unsure, most of the mass on LLaVA's other-answer column: flattening
        // raises the answer's share towards an even 1/2, to the flat end. The message must not
        // call these answers wrong.
        let unsure = vec![vec![0.43, 0.57]; 4];
        let qs = vec![(unsure.as_slice(), vec![1.0, 0.0]); 30];
        let e = fit_temperature(&qs, true, TemperatureObjective::Answers).unwrap_err();
        assert!(
            e.contains("flatter")
                && e.contains("unsure of right ones")
                && e.contains("\"any other answer\""),
            "{e}"
        );
    }
}
