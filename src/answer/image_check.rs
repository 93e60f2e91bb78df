//! Is the image like the ones the particles were calibrated on? (design §11 "Abstention scores")
//!
//! The answer distribution says little when the image itself is unlike anything seen in
//! fine-tuning: a photograph shown to particles tuned on drawings can get a confident answer from
//! every particle. This check looks at the image instead. Each image is summarised by its pooled
//! features (LLaVA: the projected image tokens the language model reads, averaged over tokens and
//! particles; CLIP: the image embedding averaged over particles) and its distance to the
//! validation images is measured per feature in standard deviations: `d = mean_i ((x_i − μ_i) /
//! σ_i)²`, about 1 for an image like them (a diagonal Mahalanobis distance, Lee et al., NeurIPS
//! 2018, without the covariance that a few hundred images cannot estimate in 4096 dimensions).
//!
//! The threshold is split-conformal (Vovk et al. 2005; Angelopoulos & Bates, arXiv 2107.07511,
//! §1–2): μ and σ are fitted on half of the distinct validation images, the other `m` give the
//! distances `d_1 ≤ … ≤ d_m`, and the threshold is `d_k` with `k = ⌈(m + 1)(1 − α)⌉`. For a new
//! image exchangeable with the validation images, P(d > threshold) ≤ α: the check wrongly flags
//! at most a share α of images like the validation ones. It needs `m ≥ 1/α − 1` images.
//! A flagged image makes `ask` abstain whatever the selector says.

use serde::{Deserialize, Serialize};

/// The fitted check, stored with the particles (`abstention.image_check`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageCheck {
    /// Per-feature mean of the fitting images.
    pub mean: Vec<f32>,
    /// Per-feature standard deviation of the fitting images (floored, see [`ImageCheck::fit`]).
    pub std: Vec<f32>,
    /// Flag an image whose distance exceeds this.
    pub threshold: f64,
    /// The false-alarm rate the threshold guarantees for images like the validation ones.
    pub alpha: f64,
    /// Distinct validation images: fitted on, and calibrated on.
    pub fit_images: usize,
    pub calibration_images: usize,
}

/// What the check says about one image (in `ask --json`, samples.jsonl and the server's answer).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageVerdict {
    /// Mean squared standardised distance to the validation images (about 1 for one like them).
    pub distance: f64,
    pub threshold: f64,
    /// `distance <= threshold`.
    pub familiar: bool,
}

/// The false-alarm rate `calibrate` fits the check at unless told otherwise.
pub const DEFAULT_ALPHA: f64 = 0.01;

/// The fewest calibration images a conformal threshold at false-alarm rate `alpha` needs.
pub fn images_needed(alpha: f64) -> usize {
    ((1.0 / alpha) - 1.0).ceil().max(1.0) as usize
}

/// The score that ranks answers for selective prediction once the check has spoken: the
/// selector's score (in [0, 1] for every selector) for a familiar image, that score − 1 for a
/// flagged one, so that every flagged answer ranks below every other, as the decision treats it.
pub fn gated_score(score: f64, verdict: Option<&ImageVerdict>) -> f64 {
    gate(score, verdict.is_some_and(|v| !v.familiar))
}

/// [`gated_score`] of a score whose image is `flagged` or not.
pub fn gate(score: f64, flagged: bool) -> f64 {
    if flagged {
        score - 1.0
    } else {
        score
    }
}

impl ImageCheck {
    /// Fits the check on the pooled features of distinct images: the even-numbered ones fit μ
    /// and σ, the odd-numbered ones calibrate the threshold at false-alarm rate `alpha`. A
    /// feature's σ is floored at 1e-3 × the mean σ, so that a feature constant over the fitting
    /// images does not make every other image infinitely far.
    pub fn fit(features: &[Vec<f32>], alpha: f64) -> Result<Self, String> {
        if !(alpha > 0.0 && alpha < 1.0) {
            return Err(format!(
                "the image check's false-alarm rate must be in (0, 1), not {alpha}"
            ));
        }
        let dim = features.first().map_or(0, Vec::len);
        if dim == 0 || features.iter().any(|f| f.len() != dim) {
            return Err("image features are empty or of different lengths".into());
        }
        if features.iter().flatten().any(|x| !x.is_finite()) {
            return Err("image features hold a non-finite value".into());
        }
        let fit: Vec<&Vec<f32>> = features.iter().step_by(2).collect();
        let cal: Vec<&Vec<f32>> = features.iter().skip(1).step_by(2).collect();
        let needed = images_needed(alpha);
        if cal.is_empty() {
            return Err(format!(
                "the image check needs at least 2 distinct validation images at any false-alarm \
                 rate (one to fit, one to set the threshold); there is {}: give more validation \
                 images, or calibrate without the check (--no-image-check)",
                features.len()
            ));
        }
        if cal.len() < needed {
            return Err(format!(
                "the image check at false-alarm rate {alpha} needs {} distinct validation images \
                 (half of them to fit, {needed} to set the threshold); there are {}: give more \
                 validation images or a larger rate (--image-check-alpha)",
                2 * needed,
                features.len()
            ));
        }
        let n = fit.len() as f64;
        let mean: Vec<f64> = (0..dim)
            .map(|i| fit.iter().map(|f| f[i] as f64).sum::<f64>() / n)
            .collect();
        let std: Vec<f64> = (0..dim)
            .map(|i| {
                let var = fit
                    .iter()
                    .map(|f| (f[i] as f64 - mean[i]).powi(2))
                    .sum::<f64>()
                    / n;
                var.sqrt()
            })
            .collect();
        let floor = 1e-3 * std.iter().sum::<f64>() / dim as f64;
        if floor <= 0.0 {
            return Err(
                "every validation image has the same features: nothing to compare to".into(),
            );
        }
        let mut check = ImageCheck {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std: std.iter().map(|&s| s.max(floor) as f32).collect(),
            threshold: 0.0,
            alpha,
            fit_images: fit.len(),
            calibration_images: cal.len(),
        };
        let mut d: Vec<f64> = cal.iter().map(|f| check.distance(f)).collect();
        d.sort_by(f64::total_cmp);
        check.threshold = d[check.rank() - 1];
        Ok(check)
    }

    /// The 1-based rank k = ⌈(m + 1)(1 − α)⌉ of the threshold among the m calibration
    /// distances (≤ m, as [`images_needed`] guarantees).
    fn rank(&self) -> usize {
        let m = self.calibration_images;
        (((m + 1) as f64 * (1.0 - self.alpha)).ceil() as usize).clamp(1, m.max(1))
    }

    /// The share of new images like the validation ones that the check is expected to flag:
    /// 1 − k/(m + 1) ≤ α (exact for continuous distances).
    pub fn expected_false_alarms(&self) -> f64 {
        1.0 - self.rank() as f64 / (self.calibration_images + 1) as f64
    }

    /// The mean squared standardised distance of `features` (of length [`Self::dim`]).
    pub fn distance(&self, features: &[f32]) -> f64 {
        let sum: f64 = features
            .iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(&x, (&m, &s))| ((x as f64 - m as f64) / s as f64).powi(2))
            .sum();
        sum / self.mean.len().max(1) as f64
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// The verdict on one image's pooled features; an error when their length does not match
    /// (particles calibrated on another model).
    pub fn verdict(&self, features: &[f32]) -> Result<ImageVerdict, String> {
        if features.len() != self.dim() {
            return Err(format!(
                "the image check was fitted on {} image features, the model gives {}: \
                 recalibrate the particles with this model",
                self.dim(),
                features.len()
            ));
        }
        let distance = self.distance(features);
        Ok(ImageVerdict {
            distance,
            threshold: self.threshold,
            familiar: distance <= self.threshold,
        })
    }

    /// Refuses a stored check this build cannot use.
    pub fn check(&self) -> Result<(), String> {
        if self.mean.is_empty() || self.mean.len() != self.std.len() {
            return Err(format!(
                "mean and std have {} and {} values",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.mean.iter().any(|x| !x.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err("mean or std holds a non-finite value or a std ≤ 0".into());
        }
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            return Err(format!("threshold {} is not a distance", self.threshold));
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(format!("alpha {} is outside (0, 1)", self.alpha));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) and standard normals (Box–Muller).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u = self.uniform().max(1e-300);
            let v = self.uniform();
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
        /// `dim` features: feature i ~ N(i, (1 + i)²).
        fn image(&mut self, dim: usize, shift: f64) -> Vec<f32> {
            (0..dim)
                .map(|i| (i as f64 + shift + (1.0 + i as f64) * self.normal()) as f32)
                .collect()
        }
    }

    #[test]
    fn distance_is_the_mean_squared_standardised_difference() {
        let check = ImageCheck {
            mean: vec![1.0, -2.0],
            std: vec![2.0, 0.5],
            threshold: 3.0,
            alpha: 0.1,
            fit_images: 10,
            calibration_images: 10,
        };
        // ((5 − 1)/2)² = 4, ((−1.5 + 2)/0.5)² = 1 → mean 2.5.
        let v = check.verdict(&[5.0, -1.5]).unwrap();
        assert!((v.distance - 2.5).abs() < 1e-12);
        assert!(v.familiar);
        let far = check.verdict(&[7.0, -2.0]).unwrap(); // (6/2)² / 2 = 4.5
        assert!((far.distance - 4.5).abs() < 1e-12 && !far.familiar);
        assert!(check
            .verdict(&[1.0])
            .unwrap_err()
            .contains("2 image features"));
        assert_eq!(gated_score(0.7, Some(&far)), 0.7 - 1.0);
        assert_eq!(gated_score(0.7, Some(&v)), 0.7);
        assert_eq!(gated_score(0.7, None), 0.7);
    }

    #[test]
    fn the_threshold_is_the_conformal_order_statistic_of_the_calibration_half() {
        let mut rng = Rng(7);
        let images: Vec<Vec<f32>> = (0..40).map(|_| rng.image(3, 0.0)).collect();
        let check = ImageCheck::fit(&images, 0.1).unwrap();
        assert_eq!((check.fit_images, check.calibration_images), (20, 20));
        // μ and σ of the even-numbered images.
        let even: Vec<f64> = images.iter().step_by(2).map(|f| f[1] as f64).collect();
        let mu = even.iter().sum::<f64>() / 20.0;
        assert!((check.mean[1] as f64 - mu).abs() < 1e-4);
        // k = ⌈21 · 0.9⌉ = 19: the 19th smallest of the odd-numbered images' distances, so 2 of
        // 21 new images like them are expected to be flagged.
        let mut d: Vec<f64> = images
            .iter()
            .skip(1)
            .step_by(2)
            .map(|f| check.distance(f))
            .collect();
        d.sort_by(f64::total_cmp);
        assert_eq!(check.threshold, d[18]);
        assert!((check.expected_false_alarms() - 2.0 / 21.0).abs() < 1e-12);
        check.check().unwrap();
    }

    #[test]
    fn false_alarms_stay_within_alpha_and_shifted_images_are_flagged() {
        // Over many draws of the validation images, the share of new images like them that the
        // check flags is at most α on average (the split-conformal guarantee), and images from a
        // shifted distribution are flagged.
        let (alpha, draws, new) = (0.1, 200, 50);
        let mut rng = Rng(11);
        let (mut flagged, mut shifted_flagged) = (0usize, 0usize);
        for _ in 0..draws {
            let val: Vec<Vec<f32>> = (0..60).map(|_| rng.image(8, 0.0)).collect();
            let check = ImageCheck::fit(&val, alpha).unwrap();
            for _ in 0..new {
                flagged += usize::from(!check.verdict(&rng.image(8, 0.0)).unwrap().familiar);
                shifted_flagged +=
                    usize::from(!check.verdict(&rng.image(8, 8.0)).unwrap().familiar);
            }
        }
        let rate = flagged as f64 / (draws * new) as f64;
        // The guarantee is ≤ α; the exact expectation here is 1 − k/(m+1) = 1 − 28/31 ≈ 0.097.
        assert!(rate <= alpha + 0.01, "false-alarm rate {rate}");
        assert!(rate > 0.05, "the threshold is far too loose: {rate}");
        let power = shifted_flagged as f64 / (draws * new) as f64;
        assert!(power > 0.95, "shifted images flagged only {power}");
    }

    #[test]
    fn too_few_images_or_bad_features_are_refused_with_what_to_do() {
        let mut rng = Rng(3);
        let few: Vec<Vec<f32>> = (0..30).map(|_| rng.image(2, 0.0)).collect();
        let e = ImageCheck::fit(&few, 0.01).unwrap_err();
        assert!(e.contains("needs 198 distinct validation images") && e.contains("there are 30"));
        assert!(ImageCheck::fit(&few, 0.1).is_ok());
        assert!(ImageCheck::fit(&few, 0.0).unwrap_err().contains("(0, 1)"));
        let mut bad = few.clone();
        bad[3][1] = f32::NAN;
        assert!(ImageCheck::fit(&bad, 0.1)
            .unwrap_err()
            .contains("non-finite"));
        let same = vec![vec![1.0f32, 2.0]; 30];
        assert!(ImageCheck::fit(&same, 0.1)
            .unwrap_err()
            .contains("same features"));
        let mut check = ImageCheck::fit(&few, 0.1).unwrap();
        check.std[0] = 0.0;
        assert!(check.check().is_err());
    }
}
