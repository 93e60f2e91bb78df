//! Functional diversity of the particles during training (issue 12): how often two particles
//! give different greedy answers on the validation sample, and how far apart their ΔW are.
//! Both are logged at every evaluation (`train_log.jsonl`) and summarised at the end
//! (`train_summary.json`).

use serde::{Deserialize, Serialize};

use crate::data::normalize::normalize_answer;

/// The share of particle pairs whose greedy answers differ (after answer normalisation),
/// averaged over questions. `answers[q][p]` is particle p's answer to question q. `None` with no
/// question or fewer than two particles (no pair to compare).
pub fn pairwise_disagreement(answers: &[Vec<String>]) -> Option<f64> {
    let mut sum = 0.0;
    let mut questions = 0usize;
    for row in answers {
        let p = row.len();
        if p < 2 {
            return None;
        }
        let norm: Vec<String> = row.iter().map(|a| normalize_answer(a)).collect();
        let mut differ = 0usize;
        for i in 0..p {
            for j in i + 1..p {
                if norm[i] != norm[j] {
                    differ += 1;
                }
            }
        }
        sum += differ as f64 / (p * (p - 1) / 2) as f64;
        questions += 1;
    }
    (questions > 0).then(|| sum / questions as f64)
}

/// The mean over pairs i < j of √d_ij, for a P×P matrix of squared distances (negative entries,
/// rounding noise, count as 0). 0 for fewer than two particles.
pub fn mean_pairwise_distance(sq_distances: &[Vec<f64>]) -> f64 {
    let p = sq_distances.len();
    if p < 2 {
        return 0.0;
    }
    let mut sum = 0.0;
    for (i, row) in sq_distances.iter().enumerate() {
        for v in row.iter().skip(i + 1) {
            sum += v.max(0.0).sqrt();
        }
    }
    sum / (p * (p - 1) / 2) as f64
}

/// One diversity measurement of the training log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiversityPoint {
    pub step: u64,
    /// See [`pairwise_disagreement`]; `None` without validation data or with one particle.
    pub val_disagreement: Option<f64>,
    /// Mean pairwise ‖ΔW_i − ΔW_j‖_F over all adapted layers.
    pub mean_pairwise_distance: f64,
}

/// Diversity over a run: the first and the last evaluation and the largest values seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiversitySummary {
    pub evaluations: usize,
    pub first: DiversityPoint,
    pub last: DiversityPoint,
    pub max_val_disagreement: Option<f64>,
    pub max_mean_pairwise_distance: f64,
    /// Mean of the disagreement over the evaluations (`None` when none measured it).
    pub mean_val_disagreement: Option<f64>,
}

/// Summarises the diversity points of a run, in step order; `None` for an empty log.
pub fn summarize(points: &[DiversityPoint]) -> Option<DiversitySummary> {
    let first = points.first()?.clone();
    let last = points.last()?.clone();
    let dis: Vec<f64> = points.iter().filter_map(|p| p.val_disagreement).collect();
    let max_val_disagreement = dis.iter().copied().reduce(f64::max);
    let mean_val_disagreement =
        (!dis.is_empty()).then(|| dis.iter().sum::<f64>() / dis.len() as f64);
    let max_mean_pairwise_distance = points
        .iter()
        .map(|p| p.mean_pairwise_distance)
        .fold(0.0, f64::max);
    Some(DiversitySummary {
        evaluations: points.len(),
        first,
        last,
        max_val_disagreement,
        max_mean_pairwise_distance,
        mean_val_disagreement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn disagreement_by_hand() {
        // 3 particles → 3 pairs. Q1: all agree → 0. Q2: "red", "Red", "blue" → normalised
        // red = red ≠ blue: 2 of 3 pairs differ. Q3: all differ → 1. Mean (0 + 2/3 + 1) / 3 = 5/9.
        let answers = vec![
            s(&["red", "red", "red"]),
            s(&["red", "Red", "blue"]),
            s(&["circle", "square", "2"]),
        ];
        let d = pairwise_disagreement(&answers).unwrap();
        assert!((d - 5.0 / 9.0).abs() < 1e-12, "{d}");
        // 4 particles, 6 pairs, one odd one out: 3 of 6 pairs differ.
        let d = pairwise_disagreement(&[s(&["2", "two", "2", "3"])]).unwrap();
        // "two" normalises to "2" (official VQA normalisation): only "3" differs.
        assert!((d - 0.5).abs() < 1e-12, "{d}");
        assert_eq!(pairwise_disagreement(&[]), None);
        assert_eq!(pairwise_disagreement(&[s(&["red"])]), None);
    }

    #[test]
    fn mean_distance_by_hand() {
        // Pairs: √9 = 3, √16 = 4, √25 = 5 → mean 4; the lower triangle and diagonal are ignored.
        let d = vec![
            vec![0.0, 9.0, 16.0],
            vec![-1.0, 0.0, 25.0],
            vec![7.0, 7.0, 0.0],
        ];
        assert!((mean_pairwise_distance(&d) - 4.0).abs() < 1e-12);
        assert_eq!(mean_pairwise_distance(&[vec![0.0]]), 0.0);
        // A tiny negative (rounding) distance counts as 0.
        assert_eq!(
            mean_pairwise_distance(&[vec![0.0, -1e-18], vec![-1e-18, 0.0]]),
            0.0
        );
    }

    #[test]
    fn summary_by_hand() {
        let pt = |step, dis, dist| DiversityPoint {
            step,
            val_disagreement: dis,
            mean_pairwise_distance: dist,
        };
        let pts = vec![
            pt(10, Some(0.1), 1.0),
            pt(20, None, 3.0),
            pt(30, Some(0.3), 2.0),
        ];
        let s = summarize(&pts).unwrap();
        assert_eq!(s.evaluations, 3);
        assert_eq!(s.first.step, 10);
        assert_eq!(s.last.step, 30);
        assert_eq!(s.max_val_disagreement, Some(0.3));
        assert!((s.mean_val_disagreement.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(s.max_mean_pairwise_distance, 3.0);
        assert_eq!(summarize(&[]), None);
    }
}
