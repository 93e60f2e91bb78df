//! Bayesian model average over particles and the uncertainty split (design §5, step 4).
//!
//! Input: a P×K matrix of probabilities, particle p's distribution over the K candidate answers
//! (each row sums to 1). Entropies are in nats.

use serde::{Deserialize, Serialize};

/// Total = aleatoric + epistemic, in nats.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Uncertainty {
    /// H[p̄], the entropy of the averaged distribution.
    pub total: f64,
    /// E_p H(p_p), the particles' mean entropy.
    pub aleatoric: f64,
    /// The mutual information between answer and particle: total − aleatoric (≥ 0).
    pub epistemic: f64,
}

/// The aggregate of P particles over K candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// p̄_k = mean over particles.
    pub mean: Vec<f64>,
    /// argmax p̄ (ties: the candidate with the larger vote share, then the lower index).
    pub best: usize,
    /// p̄ at `best`.
    pub confidence: f64,
    pub uncertainty: Uncertainty,
    /// Fraction of particles whose own most likely candidate is `best`.
    pub vote_share: f64,
}

/// Entropy of a distribution in nats (0·log 0 = 0).
pub fn entropy(p: &[f64]) -> f64 {
    let h = -p
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.ln())
        .sum::<f64>();
    // A certain distribution has entropy 0, not −0 (or a rounding's −1e-17), in JSON and text.
    if h > 0.0 {
        h
    } else {
        0.0
    }
}

fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (k, &x) in p.iter().enumerate() {
        if x > p[best] {
            best = k;
        }
    }
    best
}

/// Aggregates `probs[p][k]`. Errors on an empty matrix, ragged rows, or rows that are not
/// distributions (negative, non-finite, or not summing to 1 within 1e-6).
pub fn aggregate(probs: &[Vec<f64>]) -> Result<Aggregate, String> {
    let k = probs.first().map_or(0, Vec::len);
    aggregate_first(probs, k)
}

/// As [`aggregate`], where the last column is the mass of "any other answer": it counts in the
/// entropies but is never the chosen answer.
pub fn aggregate_with_other(probs: &[Vec<f64>]) -> Result<Aggregate, String> {
    let k = probs.first().map_or(0, Vec::len);
    if k < 2 {
        return Err("no candidates besides the other-answer mass".into());
    }
    aggregate_first(probs, k - 1)
}

/// The best answer is chosen among the first `eligible` columns.
fn aggregate_first(probs: &[Vec<f64>], eligible: usize) -> Result<Aggregate, String> {
    let particles = probs.len();
    let k = probs.first().map_or(0, Vec::len);
    if particles == 0 || k == 0 {
        return Err("no particles or no candidates to aggregate".into());
    }
    for (p, row) in probs.iter().enumerate() {
        if row.len() != k {
            return Err(format!(
                "particle {p} scores {} candidates, not {k}",
                row.len()
            ));
        }
        let sum: f64 = row.iter().sum();
        if row.iter().any(|x| !x.is_finite()) {
            return Err(format!(
                "particle {p}'s probabilities are not finite (sum {sum}): the model overflowed \
                 or holds NaN (in f16 most easily: try --dtype bf16 or f32; in f32, a damaged \
                 base weight — matrices over 1 M values are not scanned at load — or particles \
                 whose alpha or weights are out of range)"
            ));
        }
        if row.iter().any(|x| *x < 0.0) || (sum - 1.0).abs() > 1e-6 {
            return Err(format!(
                "particle {p}'s probabilities are not a distribution (sum {sum})"
            ));
        }
    }
    let mean: Vec<f64> = (0..k)
        .map(|j| probs.iter().map(|row| row[j]).sum::<f64>() / particles as f64)
        .collect();
    let votes: Vec<usize> = probs.iter().map(|row| argmax(&row[..eligible])).collect();
    let share = |j: usize| votes.iter().filter(|&&v| v == j).count() as f64 / particles as f64;
    let mut best = 0;
    for j in 1..eligible {
        let better = mean[j] > mean[best] + 1e-12
            || ((mean[j] - mean[best]).abs() <= 1e-12 && share(j) > share(best));
        if better {
            best = j;
        }
    }
    let total = entropy(&mean);
    let aleatoric = probs.iter().map(|row| entropy(row)).sum::<f64>() / particles as f64;
    Ok(Aggregate {
        confidence: mean[best],
        vote_share: share(best),
        uncertainty: Uncertainty {
            total,
            aleatoric,
            // Jensen: total ≥ aleatoric; clamp rounding noise.
            epistemic: (total - aleatoric).max(0.0),
        },
        mean,
        best,
    })
}

/// Turns per-particle log-likelihoods `[p][k]` into per-particle distributions over the
/// candidates (softmax per row).
pub fn normalise_log_likelihoods(loglik: &[Vec<f64>]) -> Vec<Vec<f64>> {
    loglik.iter().map(|row| softmax(row)).collect()
}

/// The softmax of `logits`, in f64 (so that it sums to 1 within rounding however many there are).
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn a_softmax_over_many_answers_is_a_distribution() {
        // 20 000 answers (a CLIP --answers file): f32 sums came to 1 + 3e-6 and were refused.
        let logits: Vec<f64> = (0..20_000)
            .map(|i| ((i * 7919) % 1000) as f64 / 97.0)
            .collect();
        let p = softmax(&logits);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let aggregated = aggregate(&[p.clone(), p]);
        assert!(aggregated.is_ok(), "{:?}", aggregated.err());
    }

    #[test]
    fn a_certain_answer_has_entropy_plus_zero() {
        // −(1·ln 1) is −0.0, which printed as "-0.000" and "-0.0" in JSON.
        let h = entropy(&[1.0, 0.0]);
        assert!(h == 0.0 && h.is_sign_positive(), "{h}");
    }

    #[test]
    fn agreeing_particles_have_no_epistemic_uncertainty() {
        let row = vec![0.7, 0.2, 0.1];
        let a = aggregate(&[row.clone(), row.clone(), row.clone()]).unwrap();
        // H = −(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1), by hand = 0.8018185525433373
        assert!(close(a.uncertainty.total, 0.8018185525433373));
        assert!(close(a.uncertainty.aleatoric, a.uncertainty.total));
        assert!(close(a.uncertainty.epistemic, 0.0));
        assert_eq!(a.best, 0);
        assert!(close(a.confidence, 0.7));
        assert!(close(a.vote_share, 1.0));
    }

    #[test]
    fn confident_disagreeing_particles_are_all_epistemic() {
        // Two particles, each certain of a different answer: p̄ = (½, ½).
        let a = aggregate(&[vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap();
        assert!(close(a.uncertainty.total, std::f64::consts::LN_2));
        assert!(close(a.uncertainty.aleatoric, 0.0));
        assert!(close(a.uncertainty.epistemic, std::f64::consts::LN_2));
        assert!(close(a.confidence, 0.5));
        // Tie in p̄ and in votes: the lower index wins.
        assert_eq!(a.best, 0);
        assert!(close(a.vote_share, 0.5));
    }

    #[test]
    fn hand_computed_mixture() {
        // p1 = (0.9, 0.1, 0), p2 = (0.5, 0.5, 0), p3 = (0.1, 0.3, 0.6)
        // p̄ = (0.5, 0.3, 0.2); H[p̄] = 1.0296530140645737
        // H1 = 0.3250829733914482, H2 = ln 2 = 0.6931471805599453, H3 = 0.8979457248567798
        // aleatoric = 0.6387252929360578, epistemic = 0.3909277211285159
        let a = aggregate(&[
            vec![0.9, 0.1, 0.0],
            vec![0.5, 0.5, 0.0],
            vec![0.1, 0.3, 0.6],
        ])
        .unwrap();
        assert!(a
            .mean
            .iter()
            .zip([0.5, 0.3, 0.2])
            .all(|(x, y)| close(*x, y)));
        assert!((a.uncertainty.total - 1.0296530140645737).abs() < 1e-12);
        assert!((a.uncertainty.aleatoric - 0.6387252929360578).abs() < 1e-12);
        assert!((a.uncertainty.epistemic - 0.3909277211285159).abs() < 1e-12);
        assert_eq!(a.best, 0);
        assert!(close(a.confidence, 0.5));
        // Votes: p1 → 0, p2 → tie (0.5, 0.5) → 0, p3 → 2.
        assert!(close(a.vote_share, 2.0 / 3.0));
    }

    #[test]
    fn tie_in_the_average_goes_to_the_larger_vote_share() {
        // p̄ = (0.5, 0.5): candidate 1 has two votes, candidate 0 one.
        let a = aggregate(&[vec![0.9, 0.1], vec![0.3, 0.7], vec![0.3, 0.7]]).unwrap();
        assert!(close(a.mean[0], 0.5) && close(a.mean[1], 0.5));
        assert_eq!(a.best, 1);
        assert!(close(a.vote_share, 2.0 / 3.0));
    }

    #[test]
    fn one_particle_is_the_single_model() {
        let a = aggregate(&[vec![0.25, 0.75]]).unwrap();
        assert_eq!(a.best, 1);
        assert!(close(a.confidence, 0.75));
        assert!(close(a.uncertainty.epistemic, 0.0));
        assert!(close(a.uncertainty.total, entropy(&[0.25, 0.75])));
        assert!(close(a.vote_share, 1.0));
    }

    #[test]
    fn the_other_mass_is_never_the_answer() {
        // One particle: "red" 0.3, "blue" 0.2, anything else 0.5.
        let a = aggregate_with_other(&[vec![0.3, 0.2, 0.5]]).unwrap();
        assert_eq!(a.best, 0);
        assert!(close(a.confidence, 0.3));
        assert!(close(a.uncertainty.total, entropy(&[0.3, 0.2, 0.5])));
    }

    #[test]
    fn bad_matrices_are_errors() {
        assert!(aggregate(&[]).is_err());
        assert!(aggregate(&[vec![0.5, 0.5], vec![1.0]]).is_err());
        assert!(aggregate(&[vec![0.5, 0.6]]).is_err());
        let overflow = aggregate(&[vec![f64::NAN, 1.0]]).unwrap_err();
        assert!(overflow.contains("--dtype bf16"), "{overflow}");
    }

    #[test]
    fn log_likelihoods_become_row_distributions() {
        let p = normalise_log_likelihoods(&[vec![0.0, 0.0], vec![-1000.0, 0.0]]);
        assert!(close(p[0][0], 0.5) && close(p[0][1], 0.5));
        assert!(p[1][0] < 1e-300 && close(p[1][1], 1.0));
    }
}
