//! Accuracy, calibration and selective-prediction metrics (design §6).
//!
//! Every function takes per-question values (a confidence in `[0, 1]` and a VQA accuracy in
//! `[0, 1]`, which may be fractional) and states its convention in its documentation. Bad input
//! (empty slices, different lengths, NaN, values out of range) gives a [`MetricError`], never a
//! panic or a NaN. Quantities that are undefined for the data (AUROC with one class only, the
//! risk of answering nothing) are `None`.
//!
//! Conventions in brief:
//! - VQA accuracy: [`vqa_accuracy`], official leave-one-out rule, [`NormalizeMode`] says when the
//!   answers are normalised;
//! - ECE: [`ece_equal_width`] (15 bins `(lo, hi]`, 0 in the first) and [`ece_equal_mass`];
//! - NLL / Brier: [`nll_binary`] and [`brier_binary`] score the confidence as the probability of
//!   the event "the answer is correct"; [`nll_multiclass`] and [`brier_multiclass`] score a full
//!   (model-averaged) distribution;
//! - detection: [`auroc`] (Mann–Whitney, ties count half) and [`average_precision`]
//!   (scikit-learn's definition);
//! - selective prediction: [`risk_coverage_curve`] (one point per distinct confidence), [`aurc`]
//!   (step integral), [`excess_aurc`], [`coverage_at_risk`];
//! - effective reliability Φ_c (Whitehead et al., ECCV 2022): [`effective_reliability`],
//!   [`choose_threshold_phi`], [`choose_threshold_for_risk`];
//! - everything at once for a benchmark: [`summary`] → [`Summary`] (serialisable).
//!
//! A question is *answered* at threshold `t` when its confidence is `>= t` (as in the reference
//! code of Whitehead et al.). "Abstain on everything" is the threshold just above the largest
//! confidence (the next representable `f64`), so thresholds are always finite.
//!
//! The Python reference `scripts/metrics_reference.py` recomputes all of this with numpy and
//! scikit-learn; `tests/metrics.rs` compares.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::normalize::{clean_whitespace, process_digit_article, process_punctuation};

/// Number of bins of the default ECE.
pub const DEFAULT_BINS: usize = 15;
/// Probabilities are clipped to `[NLL_CLIP, 1 - NLL_CLIP]` (binary) or to at least `NLL_CLIP`
/// (multiclass) before taking logs.
pub const NLL_CLIP: f64 = 1e-12;
/// Comparisons of a selective risk with a target risk, and of Φ values with the best Φ, allow
/// this much floating-point slack (so that 1 error in 20 answers meets a 5 % target).
pub const TOLERANCE: f64 = 1e-12;

/// What is wrong with the input of a metric.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("{what}: no values (at least one prediction is needed)")]
    Empty { what: &'static str },
    #[error("{what}: {left} values but {right} to pair them with")]
    LengthMismatch {
        what: &'static str,
        left: usize,
        right: usize,
    },
    #[error("{what}[{index}] = {value} is outside [0, 1] or not finite")]
    OutOfRange {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("{what}[{index}] is NaN")]
    NotANumber { what: &'static str, index: usize },
    #[error("target[{index}] = {target}, but that row has {classes} probabilities")]
    BadTarget {
        index: usize,
        target: usize,
        classes: usize,
    },
    #[error("probabilities row {index} has a negative or non-finite entry")]
    BadProbability { index: usize },
    #[error("{what} = {value} is not allowed ({why})")]
    BadParameter {
        what: &'static str,
        value: f64,
        why: &'static str,
    },
}

type Result<T> = std::result::Result<T, MetricError>;

// ------------------------------------------------------------------------------------------------
// VQA accuracy

/// When answers are normalised before they are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeMode {
    /// As the official `vqaEval.py` on the answer as generated: every answer is
    /// whitespace-cleaned, but punctuation, number words, articles, contractions and case are
    /// normalised only when the human answers are not all identical (after cleaning). So a model
    /// answer "Yes" scores 0 against ten "yes": the challenge expects answers prepared for
    /// submission.
    Official,
    /// The default: always normalise the model answer and every human answer (with the official
    /// normalisation), as a generated answer is prepared for scoring by lmms-eval's VQAv2 task
    /// and LLaVA's VQAv2 submission script (EvalAI's answer processor; those leave the human
    /// answers alone when they agree, which VQAv2's are, normalised already; lmms-eval's copy
    /// also treats `1,,2` as digit-comma-digit, a difference this crate does not reproduce).
    /// "Yes" scores 1 against ten "yes".
    #[default]
    Always,
}

/// VQA accuracy of one answer against the human answers.
///
/// Official rule (`vqaEval.py`): with `n` human answers, for each of the `n` leave-one-out
/// subsets count the other humans that gave the answer, score `min(count / 3, 1)`, and average the
/// `n` scores. With 10 humans that is 1 for ≥ 4 matches, 0.9 for 3, 0.6 for 2, 0.3 for 1. The
/// answers are compared after [`clean_whitespace`] and, as `mode` says, the full normalisation.
///
/// Generalised to any `n`: for `n >= 4` the rule is exactly the official one. Fewer answers could
/// never give full credit with a quota of 3, so the quota is `min(3, n - 1)`; with one human
/// answer it is exact match (1 or 0). No human answers give 0.
pub fn vqa_accuracy<S: AsRef<str>>(answer: &str, human_answers: &[S], mode: NormalizeMode) -> f64 {
    let n = human_answers.len();
    if n == 0 {
        return 0.0;
    }
    let (answer, humans) = compared(answer, human_answers, mode);
    let matches = humans.iter().filter(|h| **h == answer).count();
    if n == 1 {
        return if matches == 1 { 1.0 } else { 0.0 };
    }
    let quota = 3.min(n - 1) as f64;
    // Summed in the official order (one term per left-out human) so that results are bit-equal.
    let total: f64 = humans
        .iter()
        .map(|h| {
            let others = if *h == answer { matches - 1 } else { matches };
            (others as f64 / quota).min(1.0)
        })
        .sum();
    total / n as f64
}

/// How a question's accuracy follows from its human answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccuracyRule {
    /// VQAv2's leave-one-out rule, [`vqa_accuracy`] (VQAv2, OK-VQA, VizWiz, TextVQA, GQA, ours).
    #[default]
    Vqa,
    /// A-OKVQA's direct-answer rule ([`direct_answer_accuracy`]).
    DirectAnswer,
}

impl AccuracyRule {
    /// The accuracy of `answer` against `human_answers` by this rule.
    pub fn accuracy<S: AsRef<str>>(
        self,
        answer: &str,
        human_answers: &[S],
        mode: NormalizeMode,
    ) -> f64 {
        match self {
            AccuracyRule::Vqa => vqa_accuracy(answer, human_answers, mode),
            AccuracyRule::DirectAnswer => direct_answer_accuracy(answer, human_answers, mode),
        }
    }

    /// Whether this is the default rule (left out of files).
    pub fn is_vqa(&self) -> bool {
        *self == AccuracyRule::Vqa
    }
}

/// A-OKVQA's direct-answer accuracy (`eval_predictions.py`): `min(1, matches / 3)` with the
/// matching human answers counted once, no leave-one-out average (3 of 10 matching scores 1, not
/// [`vqa_accuracy`]'s 0.9); answers compared after the same cleaning and, as `mode` says, the
/// same normalisation as [`vqa_accuracy`]. No human answers give 0.
pub fn direct_answer_accuracy<S: AsRef<str>>(
    answer: &str,
    human_answers: &[S],
    mode: NormalizeMode,
) -> f64 {
    if human_answers.is_empty() {
        return 0.0;
    }
    let (answer, humans) = compared(answer, human_answers, mode);
    let matches = humans.iter().filter(|h| **h == answer).count();
    (matches as f64 / 3.0).min(1.0)
}

/// The answer and the human answers as the official evaluation compares them: whitespace
/// cleaned, and normalised as `mode` says (`Official`: only when the humans disagree).
fn compared<S: AsRef<str>>(
    answer: &str,
    human_answers: &[S],
    mode: NormalizeMode,
) -> (String, Vec<String>) {
    let mut humans: Vec<String> = human_answers
        .iter()
        .map(|h| clean_whitespace(h.as_ref()))
        .collect();
    let mut answer = clean_whitespace(answer);
    let normalise = match mode {
        NormalizeMode::Always => true,
        NormalizeMode::Official => humans.iter().any(|h| *h != humans[0]),
    };
    if normalise {
        let norm = |s: &str| process_digit_article(&process_punctuation(s));
        answer = norm(&answer);
        humans = humans.iter().map(|h| norm(h)).collect();
    }
    (answer, humans)
}

/// One evaluated question, as a benchmark records it (one line of `samples.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The model's answer (raw; it is normalised as the [`NormalizeMode`] says).
    pub answer: String,
    /// Confidence in `[0, 1]` that the answer is correct.
    pub confidence: f64,
    /// The human (ground-truth) answers, raw.
    #[serde(default)]
    pub human_answers: Vec<String>,
    /// VQAv2 answer type (`yes/no`, `number`, `other`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_type: Option<String>,
    /// Whether the question is out of distribution, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_ood: Option<bool>,
    /// Whether the system abstained (its recorded decision).
    #[serde(default)]
    pub abstained: bool,
    /// An uncertainty score for OOD detection (higher = more uncertain, e.g. epistemic mutual
    /// information); `1 - confidence` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<f64>,
    /// The full model-averaged distribution over candidate classes, if the backend gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Vec<f64>>,
    /// The index of the correct class in `distribution`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<usize>,
    /// The abstention selector's score (higher means "answer"); the confidence when absent.
    /// Selective prediction (risk–coverage, AURC, thresholds, error detection) ranks by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// How its accuracy is computed (its data set's rule).
    #[serde(default, skip_serializing_if = "AccuracyRule::is_vqa")]
    pub rule: AccuracyRule,
    /// Its accuracy by `rule` under a mode, computed once (a benchmark sample's stored value):
    /// [`Prediction::accuracy`] in that mode returns it instead of normalising every answer
    /// again (a bootstrap meets each question a thousand times: 20 000 questions took 111 s).
    #[serde(skip)]
    pub known_accuracy: Option<(NormalizeMode, f64)>,
}

impl Prediction {
    /// The accuracy of this prediction by its [`AccuracyRule`].
    pub fn accuracy(&self, mode: NormalizeMode) -> f64 {
        match self.known_accuracy {
            Some((known, accuracy)) if known == mode => accuracy,
            _ => self.rule.accuracy(&self.answer, &self.human_answers, mode),
        }
    }

    /// The score selective prediction ranks by: `score`, or the confidence when it is absent.
    pub fn selection_score(&self) -> f64 {
        self.score.unwrap_or(self.confidence)
    }

    /// The OOD score: `uncertainty`, or `1 - confidence` when it is absent.
    pub fn ood_score(&self) -> f64 {
        self.uncertainty.unwrap_or(1.0 - self.confidence)
    }
}

/// [`Prediction::accuracy`] of every prediction.
pub fn accuracies(predictions: &[Prediction], mode: NormalizeMode) -> Vec<f64> {
    predictions.iter().map(|p| p.accuracy(mode)).collect()
}

// ------------------------------------------------------------------------------------------------
// Input checks

fn check_len(what: &'static str, left: usize, right: usize) -> Result<()> {
    if left == 0 {
        return Err(MetricError::Empty { what });
    }
    if left != right {
        return Err(MetricError::LengthMismatch { what, left, right });
    }
    Ok(())
}

fn check_unit(what: &'static str, xs: &[f64]) -> Result<()> {
    match xs
        .iter()
        .position(|x| !(x.is_finite() && (0.0..=1.0).contains(x)))
    {
        Some(index) => Err(MetricError::OutOfRange {
            what,
            index,
            value: xs[index],
        }),
        None => Ok(()),
    }
}

fn check_not_nan(what: &'static str, xs: &[f64]) -> Result<()> {
    match xs.iter().position(|x| x.is_nan()) {
        Some(index) => Err(MetricError::NotANumber { what, index }),
        None => Ok(()),
    }
}

/// Confidence and accuracy in `[0, 1]`, same non-zero length.
fn check_conf_acc(conf: &[f64], acc: &[f64]) -> Result<()> {
    check_len("confidence/accuracy", conf.len(), acc.len())?;
    check_unit("confidence", conf)?;
    check_unit("accuracy", acc)
}

/// Any non-NaN score with an accuracy in `[0, 1]`.
fn check_score_acc(score: &[f64], acc: &[f64]) -> Result<()> {
    check_len("confidence/accuracy", score.len(), acc.len())?;
    check_not_nan("confidence", score)?;
    check_unit("accuracy", acc)
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Indices sorted by score, descending; equal scores keep their input order.
fn order_desc(score: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[b].partial_cmp(&score[a]).unwrap_or(Ordering::Equal));
    idx
}

/// Runs of equal scores in an order (as index ranges into it).
fn tie_groups(score: &[f64], order: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=order.len() {
        if i == order.len() || score[order[i]] != score[order[start]] {
            groups.push(start..i);
            start = i;
        }
    }
    groups
}

/// The next representable `f64` above `x` (`f64::next_up`, which needs Rust 1.86).
fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        x
    } else if x == 0.0 {
        f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() + 1)
    } else {
        f64::from_bits(x.to_bits() - 1)
    }
}

/// The threshold at which nothing is answered: just above the largest score.
fn abstain_all_threshold(score: &[f64]) -> f64 {
    next_up(score.iter().copied().fold(f64::NEG_INFINITY, f64::max))
}

// ------------------------------------------------------------------------------------------------
// Calibration

/// How the bins of a [`Calibration`] were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binning {
    EqualWidth,
    EqualMass,
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge (equal width: exclusive, except 0 for the first bin; equal mass: the smallest
    /// confidence in the bin).
    pub lo: f64,
    /// Upper edge (equal width: inclusive; equal mass: the largest confidence in the bin).
    pub hi: f64,
    pub count: usize,
    /// Mean confidence of the bin; `None` when empty.
    pub mean_confidence: Option<f64>,
    /// Mean (VQA) accuracy of the bin; `None` when empty.
    pub accuracy: Option<f64>,
}

/// An expected calibration error and the reliability diagram it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub binning: Binning,
    pub ece: f64,
    pub bins: Vec<ReliabilityBin>,
}

fn calibration(
    binning: Binning,
    conf: &[f64],
    acc: &[f64],
    members: Vec<Vec<usize>>,
    edges: Vec<(f64, f64)>,
) -> Calibration {
    let total = conf.len() as f64;
    let mut ece = 0.0;
    let bins = members
        .iter()
        .zip(edges)
        .map(|(idx, (lo, hi))| {
            let mean_confidence = mean(idx.iter().map(|&i| conf[i]));
            let accuracy = mean(idx.iter().map(|&i| acc[i]));
            if let (Some(c), Some(a)) = (mean_confidence, accuracy) {
                ece += idx.len() as f64 / total * (a - c).abs();
            }
            ReliabilityBin {
                lo,
                hi,
                count: idx.len(),
                mean_confidence,
                accuracy,
            }
        })
        .collect();
    Calibration { binning, ece, bins }
}

/// Expected calibration error with `n_bins` equal-width bins (15 by default, [`DEFAULT_BINS`]).
///
/// Convention: bin `k` is `(k/B, (k+1)/B]` with edges computed as `k as f64 / B as f64`; a
/// confidence of exactly 0 goes into the first bin, and a confidence on an edge into the bin below
/// it (`0.2` with 15 bins is in bin 2, `(2/15, 3/15]`). ECE = Σ_bins (n_b / N) · |acc_b − conf_b|
/// where `acc_b` and `conf_b` are the bin's mean accuracy and mean confidence. The accuracy of a
/// question may be fractional (VQA accuracy), so `acc_b` is a mean of fractions. All `n_bins` bins
/// are returned, empty ones with `count = 0` and `None` means.
pub fn ece_equal_width(conf: &[f64], acc: &[f64], n_bins: usize) -> Result<Calibration> {
    check_conf_acc(conf, acc)?;
    if n_bins == 0 {
        return Err(MetricError::BadParameter {
            what: "n_bins",
            value: 0.0,
            why: "at least one bin",
        });
    }
    let edge = |k: usize| k as f64 / n_bins as f64;
    let mut members = vec![Vec::new(); n_bins];
    for (i, &c) in conf.iter().enumerate() {
        // first bin whose upper edge is >= c (the last edge is exactly 1)
        let b = (0..n_bins)
            .find(|&b| c <= edge(b + 1))
            .unwrap_or(n_bins - 1);
        members[b].push(i);
    }
    let edges = (0..n_bins).map(|b| (edge(b), edge(b + 1))).collect();
    Ok(calibration(Binning::EqualWidth, conf, acc, members, edges))
}

/// Expected calibration error with `n_bins` equal-mass (adaptive) bins.
///
/// Convention: the questions are sorted by confidence, ascending (a stable sort: equal
/// confidences keep their input order, and a run of equal confidences may straddle two bins),
/// and split into `n_bins` consecutive groups whose sizes differ by at most one, the larger
/// groups first (numpy's `array_split`). With fewer questions than bins only the non-empty bins
/// are kept. ECE as in [`ece_equal_width`]; `lo`/`hi` are the smallest/largest confidence in the
/// bin.
pub fn ece_equal_mass(conf: &[f64], acc: &[f64], n_bins: usize) -> Result<Calibration> {
    check_conf_acc(conf, acc)?;
    if n_bins == 0 {
        return Err(MetricError::BadParameter {
            what: "n_bins",
            value: 0.0,
            why: "at least one bin",
        });
    }
    let mut order: Vec<usize> = (0..conf.len()).collect();
    order.sort_by(|&a, &b| conf[a].partial_cmp(&conf[b]).unwrap_or(Ordering::Equal));
    let n = order.len();
    let (size, extra) = (n / n_bins, n % n_bins);
    let mut members = Vec::new();
    let mut edges = Vec::new();
    let mut start = 0;
    for b in 0..n_bins {
        let len = size + usize::from(b < extra);
        if len == 0 {
            continue;
        }
        let idx = order[start..start + len].to_vec();
        edges.push((conf[idx[0]], conf[idx[len - 1]]));
        members.push(idx);
        start += len;
    }
    Ok(calibration(Binning::EqualMass, conf, acc, members, edges))
}

// ------------------------------------------------------------------------------------------------
// Proper scoring rules

/// Binary confidence NLL ("NLL of the correct event"): the mean over questions of
/// `−[y ln c + (1 − y) ln(1 − c)]`, with the confidence `c` clipped to `[1e-12, 1 − 1e-12]`
/// ([`NLL_CLIP`]) and `y` the question's accuracy (fractional VQA accuracy gives the
/// cross-entropy against a soft label).
pub fn nll_binary(conf: &[f64], acc: &[f64]) -> Result<f64> {
    check_conf_acc(conf, acc)?;
    let per = conf.iter().zip(acc).map(|(&c, &y)| {
        let c = c.clamp(NLL_CLIP, 1.0 - NLL_CLIP);
        -(y * c.ln() + (1.0 - y) * (1.0 - c).ln())
    });
    Ok(mean(per).unwrap_or(0.0))
}

/// Binary confidence Brier score: the mean over questions of `(c − y)²`, with `y` the question's
/// (possibly fractional) accuracy. Range `[0, 1]`.
pub fn brier_binary(conf: &[f64], acc: &[f64]) -> Result<f64> {
    check_conf_acc(conf, acc)?;
    Ok(mean(conf.iter().zip(acc).map(|(&c, &y)| (c - y) * (c - y))).unwrap_or(0.0))
}

fn check_probs(probs: &[Vec<f64>], target: &[usize]) -> Result<()> {
    check_len("probabilities/targets", probs.len(), target.len())?;
    for (index, (row, &t)) in probs.iter().zip(target).enumerate() {
        if row.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return Err(MetricError::BadProbability { index });
        }
        if t >= row.len() {
            return Err(MetricError::BadTarget {
                index,
                target: t,
                classes: row.len(),
            });
        }
    }
    Ok(())
}

/// Multiclass NLL of a model-averaged distribution: the mean over questions of
/// `−ln max(p̄[target], 1e-12)`. Pass the Bayesian model average p̄ (mean over particles of
/// their probabilities: average first, then take the log). Rows are used as given (not
/// renormalised), so a row may leave mass to an implicit "other" class.
pub fn nll_multiclass(probs: &[Vec<f64>], target: &[usize]) -> Result<f64> {
    check_probs(probs, target)?;
    let per = probs
        .iter()
        .zip(target)
        .map(|(row, &t)| -row[t].max(NLL_CLIP).ln());
    Ok(mean(per).unwrap_or(0.0))
}

/// Multiclass Brier score (Brier's original form): the mean over questions of
/// `Σ_k (p_k − 1[k = target])²` (summed over classes, not divided by their number; range
/// `[0, 2]`).
pub fn brier_multiclass(probs: &[Vec<f64>], target: &[usize]) -> Result<f64> {
    check_probs(probs, target)?;
    let per = probs.iter().zip(target).map(|(row, &t)| {
        row.iter()
            .enumerate()
            .map(|(k, &p)| {
                let d = p - if k == t { 1.0 } else { 0.0 };
                d * d
            })
            .sum::<f64>()
    });
    Ok(mean(per).unwrap_or(0.0))
}

// ------------------------------------------------------------------------------------------------
// Detection (error detection, OOD detection)

fn check_detection(score: &[f64], label: &[bool]) -> Result<(usize, usize)> {
    check_len("scores/labels", score.len(), label.len())?;
    check_not_nan("score", score)?;
    let pos = label.iter().filter(|&&l| l).count();
    Ok((pos, label.len() - pos))
}

/// Area under the ROC curve of `score` for the positive `label`s (higher score = more likely
/// positive), as the Mann–Whitney statistic: the probability that a random positive scores above a
/// random negative, ties counting half. Equal to scikit-learn's `roc_auc_score`.
///
/// For error detection use `label = wrong`, `score = −confidence`; for OOD detection
/// `label = OOD`, `score = uncertainty`. `Ok(None)` when all labels are the same class.
pub fn auroc(score: &[f64], label: &[bool]) -> Result<Option<f64>> {
    let (pos, neg) = check_detection(score, label)?;
    if pos == 0 || neg == 0 {
        return Ok(None);
    }
    // Rank sum of the positives with mid-ranks for ties (ranks 1..=n, ascending score).
    let mut order = order_desc(score);
    order.reverse();
    let mut rank_sum = 0.0;
    for g in tie_groups(score, &order) {
        let mid_rank = (g.start + 1 + g.end) as f64 / 2.0;
        let positives = order[g].iter().filter(|&&i| label[i]).count();
        rank_sum += mid_rank * positives as f64;
    }
    let (p, n) = (pos as f64, neg as f64);
    Ok(Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n)))
}

/// Average precision (area under the precision–recall curve) as scikit-learn's
/// `average_precision_score` defines it: `AP = Σ_t (R_t − R_{t−1}) · P_t` over the distinct scores
/// `t` in descending order, where `P_t` and `R_t` are the precision and recall of "score >= t"
/// (tied scores enter together; no interpolation). `Ok(None)` when all labels are the same class.
pub fn average_precision(score: &[f64], label: &[bool]) -> Result<Option<f64>> {
    let (pos, neg) = check_detection(score, label)?;
    if pos == 0 || neg == 0 {
        return Ok(None);
    }
    let order = order_desc(score);
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut ap, mut prev_recall) = (0.0, 0.0);
    for g in tie_groups(score, &order) {
        for &i in &order[g] {
            if label[i] {
                tp += 1;
            } else {
                fp += 1;
            }
        }
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = tp as f64 / pos as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    Ok(Some(ap))
}

// ------------------------------------------------------------------------------------------------
// Selective prediction

/// One point of a risk–coverage curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskCoveragePoint {
    /// Answer the questions whose confidence is `>= threshold`.
    pub threshold: f64,
    /// How many questions that answers.
    pub answered: usize,
    /// `answered / total`.
    pub coverage: f64,
    /// Selective risk: `1 − mean accuracy` of the answered questions.
    pub risk: f64,
}

/// The risk–coverage curve: questions sorted by confidence, descending, and one point per
/// distinct confidence `t` (tied questions enter together), with coverage and selective risk of
/// answering every question whose confidence is `>= t`. The risk uses the (possibly fractional)
/// accuracy: `1 − mean accuracy`. Confidences may be any non-NaN score.
pub fn risk_coverage_curve(conf: &[f64], acc: &[f64]) -> Result<Vec<RiskCoveragePoint>> {
    check_score_acc(conf, acc)?;
    let order = order_desc(conf);
    let n = conf.len() as f64;
    let mut correct = 0.0;
    Ok(tie_groups(conf, &order)
        .into_iter()
        .map(|g| {
            correct += order[g.clone()].iter().map(|&i| acc[i]).sum::<f64>();
            let k = g.end;
            RiskCoveragePoint {
                threshold: conf[order[g.start]],
                answered: k,
                coverage: k as f64 / n,
                risk: 1.0 - correct / k as f64,
            }
        })
        .collect())
}

/// Area under the risk–coverage curve (AURC, Geifman et al.), as a right-endpoint step integral
/// over coverage: `Σ_j (coverage_j − coverage_{j−1}) · risk_j` over the points of
/// [`risk_coverage_curve`] (`coverage_0 = 0`). Without ties this is the mean of the selective risks
/// at the `n` coverages `1/n, 2/n, …, 1`; a run of tied confidences contributes its size times the
/// risk after the whole run (so the value does not depend on the order of tied questions).
pub fn aurc(conf: &[f64], acc: &[f64]) -> Result<f64> {
    let curve = risk_coverage_curve(conf, acc)?;
    let mut prev = 0.0;
    Ok(curve
        .iter()
        .map(|p| {
            let area = (p.coverage - prev) * p.risk;
            prev = p.coverage;
            area
        })
        .sum())
}

/// The smallest AURC any confidence could reach on these accuracies: questions ranked by their
/// accuracy, best first, and the mean of the selective risks at the coverages `1/n, …, 1`
/// (Geifman et al.'s optimal AURC, with fractional accuracies).
pub fn optimal_aurc(acc: &[f64]) -> Result<f64> {
    if acc.is_empty() {
        return Err(MetricError::Empty { what: "accuracy" });
    }
    check_unit("accuracy", acc)?;
    let mut sorted = acc.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap_or(Ordering::Equal));
    let mut correct = 0.0;
    let risks = sorted.iter().enumerate().map(|(k, &a)| {
        correct += a;
        1.0 - correct / (k + 1) as f64
    });
    Ok(mean(risks).unwrap_or(0.0))
}

/// Excess AURC: [`aurc`] − [`optimal_aurc`] (≥ 0).
pub fn excess_aurc(conf: &[f64], acc: &[f64]) -> Result<f64> {
    // Never below 0 but by rounding (−8.7e-19 read as a negative excess in a report).
    Ok((aurc(conf, acc)? - optimal_aurc(acc)?).max(0.0))
}

/// Coverage reached at a target selective risk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoverageAtRisk {
    pub target_risk: f64,
    /// The largest coverage among the points of [`risk_coverage_curve`] whose risk is
    /// `<= target_risk` (+ [`TOLERANCE`]) and whose threshold is `>= 0` (a score below 0 is an
    /// answer the decision never gives: an image the check flags); 0 when there is none.
    pub coverage: f64,
    /// The threshold of that point (answer when confidence `>= threshold`); the abstain-on-all
    /// threshold when there is none.
    pub threshold: f64,
}

/// Coverage at risk `target_risk` (e.g. 0.01, 0.05, 0.10): see [`CoverageAtRisk`]. The risk need
/// not be monotone in coverage; the largest qualifying coverage is taken, wherever it is.
pub fn coverage_at_risk(conf: &[f64], acc: &[f64], target_risk: f64) -> Result<CoverageAtRisk> {
    if !target_risk.is_finite() {
        return Err(MetricError::BadParameter {
            what: "target_risk",
            value: target_risk,
            why: "must be finite",
        });
    }
    let curve = risk_coverage_curve(conf, acc)?;
    // A score below 0 is an answer the decision never gives: no threshold below 0 is reachable.
    let best = curve
        .iter()
        .rev()
        .find(|p| p.risk <= target_risk + TOLERANCE && p.threshold >= 0.0);
    Ok(match best {
        Some(p) => CoverageAtRisk {
            target_risk,
            coverage: p.coverage,
            threshold: p.threshold,
        },
        None => CoverageAtRisk {
            target_risk,
            coverage: 0.0,
            threshold: abstain_all_threshold(conf),
        },
    })
}

/// The threshold to use at a target risk, chosen on validation pairs `(confidence, accuracy)`:
/// the threshold of [`coverage_at_risk`] (largest coverage whose selective risk is within the
/// target; abstain on everything when none is).
pub fn choose_threshold_for_risk(val: &[(f64, f64)], target_risk: f64) -> Result<f64> {
    let (conf, acc): (Vec<f64>, Vec<f64>) = val.iter().copied().unzip();
    Ok(coverage_at_risk(&conf, &acc, target_risk)?.threshold)
}

/// The threshold that answers at least `coverage` of the validation questions: the
/// confidence of the ⌈coverage · n⌉-th most confident one (ties at it are answered too).
pub fn choose_threshold_for_coverage(conf: &[f64], coverage: f64) -> Result<f64> {
    if !(coverage > 0.0 && coverage <= 1.0) {
        return Err(MetricError::BadParameter {
            what: "coverage",
            value: coverage,
            why: "the share of questions to answer must be in (0, 1]",
        });
    }
    check_len("confidence", conf.len(), conf.len())?;
    check_unit("confidence", conf)?;
    let mut sorted = conf.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let k = ((coverage * sorted.len() as f64 - 1e-9).ceil() as usize).clamp(1, sorted.len());
    Ok(sorted[k - 1])
}

// ------------------------------------------------------------------------------------------------
// Effective reliability (Whitehead et al., ECCV 2022)

/// The per-question effective reliability Φ_c (Whitehead et al., "Reliable Visual Question
/// Answering: Abstain Rather Than Answer Incorrectly", ECCV 2022, and their reference code):
/// `Acc(x)` if answered and `Acc(x) > 0`; `−c` if answered and `Acc(x) = 0`; `0` if abstained.
/// `Acc` is the fractional VQA accuracy, so a partly right answer (e.g. 0.3) earns its accuracy
/// and is never penalised; only an answer no human gave costs `c`.
pub fn phi_score(acc: f64, answered: bool, c: f64) -> f64 {
    match (answered, acc > 0.0) {
        (false, _) => 0.0,
        (true, true) => acc,
        (true, false) => -c,
    }
}

fn check_cost(c: f64) -> Result<()> {
    if c.is_finite() && c >= 0.0 {
        Ok(())
    } else {
        Err(MetricError::BadParameter {
            what: "c",
            value: c,
            why: "the cost of a wrong answer must be finite and >= 0",
        })
    }
}

/// Effective reliability Φ_c of recorded decisions: the mean of [`phi_score`] over all questions
/// (abstentions count in the denominator).
pub fn effective_reliability_of_decisions(acc: &[f64], answered: &[bool], c: f64) -> Result<f64> {
    check_len("accuracy/decisions", acc.len(), answered.len())?;
    check_unit("accuracy", acc)?;
    check_cost(c)?;
    let per = acc
        .iter()
        .zip(answered)
        .map(|(&a, &ans)| phi_score(a, ans, c));
    Ok(mean(per).unwrap_or(0.0))
}

/// Effective reliability Φ_c when answering exactly the questions whose confidence is
/// `>= threshold` (the mean of [`phi_score`]).
pub fn effective_reliability(conf: &[f64], acc: &[f64], threshold: f64, c: f64) -> Result<f64> {
    check_score_acc(conf, acc)?;
    let answered: Vec<bool> = conf.iter().map(|&x| x >= threshold).collect();
    effective_reliability_of_decisions(acc, &answered, c)
}

/// The threshold that maximises Φ_c on validation pairs `(confidence, accuracy)`.
///
/// Candidates: every distinct confidence (answer when `>= t`) and abstain-on-everything (Φ = 0).
/// Ties (within [`TOLERANCE`]) go to the lowest threshold, i.e. the most coverage, as in the
/// reference code of Whitehead et al. (which, unlike this function, neither groups tied
/// confidences nor considers abstaining on everything).
pub fn choose_threshold_phi(val: &[(f64, f64)], c: f64) -> Result<f64> {
    let (conf, acc): (Vec<f64>, Vec<f64>) = val.iter().copied().unzip();
    check_score_acc(&conf, &acc)?;
    check_cost(c)?;
    let n = conf.len() as f64;
    let order = order_desc(&conf);
    // (threshold, Φ) from the highest threshold down
    let mut candidates = vec![(abstain_all_threshold(&conf), 0.0)];
    let mut sum = 0.0;
    // A score below 0 is an answer the decision never gives (an image the check flags, ranked
    // below every other): no threshold below 0 is a candidate.
    for g in tie_groups(&conf, &order)
        .into_iter()
        .take_while(|g| conf[order[g.start]] >= 0.0)
    {
        sum += order[g.clone()]
            .iter()
            .map(|&i| phi_score(acc[i], true, c))
            .sum::<f64>();
        candidates.push((conf[order[g.start]], sum / n));
    }
    let best = candidates
        .iter()
        .map(|&(_, phi)| phi)
        .fold(f64::NEG_INFINITY, f64::max);
    let chosen = candidates
        .iter()
        .rev()
        .find(|&&(_, phi)| phi >= best - TOLERANCE)
        .map_or(candidates[0].0, |&(t, _)| t);
    Ok(chosen)
}

// ------------------------------------------------------------------------------------------------
// Summary

/// Settings of [`summary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryOptions {
    pub mode: NormalizeMode,
    /// Bins of both ECEs (15).
    pub n_bins: usize,
    /// Costs c of Φ_c (1, 10, 100).
    pub costs: Vec<f64>,
    /// Target risks for coverage at risk and risk thresholds (0.01, 0.05, 0.10).
    pub risk_targets: Vec<f64>,
    /// Error detection counts a question as an error when its VQA accuracy is below this (0.5:
    /// with 10 humans, at most one human gave the answer).
    pub error_below: f64,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        Self {
            mode: NormalizeMode::default(),
            n_bins: DEFAULT_BINS,
            costs: vec![1.0, 10.0, 100.0],
            risk_targets: vec![0.01, 0.05, 0.10],
            error_below: 0.5,
        }
    }
}

/// AUROC and AUPR of one detection task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// [`auroc`]; `None` when one class is missing.
    pub auroc: Option<f64>,
    /// [`average_precision`]; `None` when one class is missing.
    pub aupr: Option<f64>,
    pub positives: usize,
    pub negatives: usize,
}

/// [`auroc`] and [`average_precision`] together.
pub fn detection(score: &[f64], label: &[bool]) -> Result<Detection> {
    let (positives, negatives) = check_detection(score, label)?;
    Ok(Detection {
        auroc: auroc(score, label)?,
        aupr: average_precision(score, label)?,
        positives,
        negatives,
    })
}

/// Φ_c for one cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiValue {
    pub c: f64,
    pub phi: f64,
}

/// What the recorded decisions (`Prediction::abstained`) achieve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decisions {
    pub coverage: f64,
    /// Selective risk of the answered questions; `None` when nothing was answered.
    pub risk: Option<f64>,
    pub phi: Vec<PhiValue>,
}

/// Φ_c on the evaluated set at a threshold chosen by [`choose_threshold_phi`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiAtCost {
    pub c: f64,
    pub threshold: f64,
    pub phi: f64,
    pub coverage: f64,
    /// `None` when nothing was answered.
    pub risk: Option<f64>,
}

/// Coverage and risk on the evaluated set at a threshold chosen by [`choose_threshold_for_risk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskThreshold {
    pub target_risk: f64,
    pub threshold: f64,
    pub coverage: f64,
    /// `None` when nothing was answered.
    pub risk: Option<f64>,
}

/// Where the thresholds of a [`Summary`] were chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdSource {
    /// On a separate validation split (the honest setting).
    Validation,
    /// On the evaluated set itself (optimistic: an upper bound).
    EvaluatedSet,
}

/// Metrics of the questions of one answer type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerTypeBreakdown {
    pub count: usize,
    pub accuracy: f64,
    pub mean_confidence: f64,
    /// Equal-width ECE within the type.
    pub ece: f64,
}

/// All metrics of an evaluated set (what a benchmark writes to `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub normalize_mode: NormalizeMode,
    /// Mean VQA accuracy.
    pub accuracy: f64,
    /// Equal-width ECE and its reliability diagram.
    pub ece: Calibration,
    pub ece_equal_mass: Calibration,
    pub nll_binary: f64,
    pub brier_binary: f64,
    /// When every prediction has a `distribution` and a `target`.
    pub nll_multiclass: Option<f64>,
    pub brier_multiclass: Option<f64>,
    pub risk_coverage: Vec<RiskCoveragePoint>,
    pub aurc: f64,
    pub optimal_aurc: f64,
    pub excess_aurc: f64,
    pub coverage_at_risk: Vec<CoverageAtRisk>,
    /// label: accuracy below `error_below`; score: −confidence.
    pub error_detection: Detection,
    /// label: `is_ood`; score: [`Prediction::ood_score`]. `None` unless every prediction has
    /// `is_ood`.
    pub ood_detection: Option<Detection>,
    /// The decisions recorded in the predictions (`abstained`).
    pub recorded_decisions: Decisions,
    pub thresholds_from: ThresholdSource,
    /// Φ_c for each cost at the threshold chosen on `thresholds_from`.
    pub effective_reliability: Vec<PhiAtCost>,
    /// Coverage and risk at the threshold chosen for each target risk on `thresholds_from`.
    pub risk_thresholds: Vec<RiskThreshold>,
    /// Per answer type (predictions without a type are left out of this map only).
    pub per_answer_type: BTreeMap<String, AnswerTypeBreakdown>,
}

fn selective(acc: &[f64], answered: &[bool]) -> (f64, Option<f64>) {
    let k = answered.iter().filter(|&&a| a).count();
    let risk = mean(
        acc.iter()
            .zip(answered)
            .filter(|(_, &a)| a)
            .map(|(&x, _)| x),
    )
    .map(|m| 1.0 - m);
    (k as f64 / acc.len() as f64, risk)
}

/// Mean accuracy, mean confidence and ECE per `answer_type` (predictions without a type are left
/// out).
pub fn per_answer_type(
    predictions: &[Prediction],
    mode: NormalizeMode,
    n_bins: usize,
) -> Result<BTreeMap<String, AnswerTypeBreakdown>> {
    let mut groups: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for p in predictions {
        if let Some(t) = &p.answer_type {
            let g = groups.entry(t.clone()).or_default();
            g.0.push(p.confidence);
            g.1.push(p.accuracy(mode));
        }
    }
    groups
        .into_iter()
        .map(|(t, (conf, acc))| {
            let ece = ece_equal_width(&conf, &acc, n_bins)?.ece;
            Ok((
                t,
                AnswerTypeBreakdown {
                    count: conf.len(),
                    accuracy: mean(acc.iter().copied()).unwrap_or(0.0),
                    mean_confidence: mean(conf.iter().copied()).unwrap_or(0.0),
                    ece,
                },
            ))
        })
        .collect()
}

/// Every metric of `predictions`. Thresholds for Φ_c and for the target risks are chosen on `val`
/// when given (accuracies computed with the same mode), otherwise on `predictions` themselves
/// (reported as [`ThresholdSource::EvaluatedSet`]).
pub fn summary(
    predictions: &[Prediction],
    val: Option<&[Prediction]>,
    opts: &SummaryOptions,
) -> Result<Summary> {
    if predictions.is_empty() {
        return Err(MetricError::Empty {
            what: "predictions",
        });
    }
    let conf: Vec<f64> = predictions.iter().map(|p| p.confidence).collect();
    let acc = accuracies(predictions, opts.mode);
    check_conf_acc(&conf, &acc)?;

    let multiclass: Option<(Vec<Vec<f64>>, Vec<usize>)> = predictions
        .iter()
        .map(|p| Some((p.distribution.clone()?, p.target?)))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().unzip());
    let (nll_multiclass, brier_multiclass) = match &multiclass {
        Some((probs, target)) => (
            Some(self::nll_multiclass(probs, target)?),
            Some(self::brier_multiclass(probs, target)?),
        ),
        None => (None, None),
    };

    // Selective prediction ranks by the selector's score; calibration (ECE, NLL, Brier) reads
    // the confidence.
    let sel: Vec<f64> = predictions
        .iter()
        .map(Prediction::selection_score)
        .collect();
    check_score_acc(&sel, &acc)?;
    let neg_sel: Vec<f64> = sel.iter().map(|c| -c).collect();
    let errors: Vec<bool> = acc.iter().map(|&a| a < opts.error_below).collect();
    let ood_labels: Option<Vec<bool>> = predictions.iter().map(|p| p.is_ood).collect();
    let ood_detection = match ood_labels {
        Some(labels) => {
            let score: Vec<f64> = predictions.iter().map(Prediction::ood_score).collect();
            Some(detection(&score, &labels)?)
        }
        None => None,
    };

    let answered: Vec<bool> = predictions.iter().map(|p| !p.abstained).collect();
    let (coverage, risk) = selective(&acc, &answered);
    let phi = opts
        .costs
        .iter()
        .map(|&c| {
            Ok(PhiValue {
                c,
                phi: effective_reliability_of_decisions(&acc, &answered, c)?,
            })
        })
        .collect::<Result<_>>()?;

    let (pairs, thresholds_from): (Vec<(f64, f64)>, _) = match val {
        Some(v) => (
            v.iter()
                .map(|p| (p.selection_score(), p.accuracy(opts.mode)))
                .collect(),
            ThresholdSource::Validation,
        ),
        None => (
            sel.iter().copied().zip(acc.iter().copied()).collect(),
            ThresholdSource::EvaluatedSet,
        ),
    };
    let at = |t: f64| -> (f64, Option<f64>) {
        let answered: Vec<bool> = sel.iter().map(|&c| c >= t).collect();
        selective(&acc, &answered)
    };
    let effective_reliability = opts
        .costs
        .iter()
        .map(|&c| {
            let threshold = choose_threshold_phi(&pairs, c)?;
            let (coverage, risk) = at(threshold);
            Ok(PhiAtCost {
                c,
                threshold,
                phi: self::effective_reliability(&sel, &acc, threshold, c)?,
                coverage,
                risk,
            })
        })
        .collect::<Result<_>>()?;
    let risk_thresholds = opts
        .risk_targets
        .iter()
        .map(|&target_risk| {
            let threshold = choose_threshold_for_risk(&pairs, target_risk)?;
            let (coverage, risk) = at(threshold);
            Ok(RiskThreshold {
                target_risk,
                threshold,
                coverage,
                risk,
            })
        })
        .collect::<Result<_>>()?;

    let aurc = self::aurc(&sel, &acc)?;
    let optimal_aurc = self::optimal_aurc(&acc)?;
    Ok(Summary {
        count: predictions.len(),
        normalize_mode: opts.mode,
        accuracy: mean(acc.iter().copied()).unwrap_or(0.0),
        ece: ece_equal_width(&conf, &acc, opts.n_bins)?,
        ece_equal_mass: ece_equal_mass(&conf, &acc, opts.n_bins)?,
        nll_binary: nll_binary(&conf, &acc)?,
        brier_binary: brier_binary(&conf, &acc)?,
        nll_multiclass,
        brier_multiclass,
        risk_coverage: risk_coverage_curve(&sel, &acc)?,
        aurc,
        optimal_aurc,
        // Never below 0 but by rounding, as in [`excess_aurc`] (bootstrap bounds included).
        excess_aurc: (aurc - optimal_aurc).max(0.0),
        coverage_at_risk: opts
            .risk_targets
            .iter()
            .map(|&t| coverage_at_risk(&sel, &acc, t))
            .collect::<Result<_>>()?,
        error_detection: detection(&neg_sel, &errors)?,
        ood_detection,
        recorded_decisions: Decisions {
            coverage,
            risk,
            phi,
        },
        thresholds_from,
        effective_reliability,
        risk_thresholds,
        per_answer_type: per_answer_type(predictions, opts.mode, opts.n_bins)?,
    })
}
