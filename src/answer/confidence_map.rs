//! The calibrated map from the model average's confidence to the confidence shown (design §5
//! step 5).
//!
//! One temperature tempers every particle's probabilities alike. It cannot mend an ensemble that
//! averaging makes underconfident on the answers it gets right while a few confidently wrong
//! answers pull the temperature the other way (`eval/RESULTS-notes.md`, "A fresh test of 3000
//! questions"). A [`ConfidenceMap`] is fitted after the temperature, on the validation questions'
//! confidences and accuracies, and maps the confidence: the one shown ([`super::Response`]'s
//! `confidence`, the response text, and so ECE, NLL and Brier in `bench`) and the one the
//! selectors read ([`super::selector::Facts`]). The candidates' probabilities (p̄) and the
//! uncertainty split stay as they are, and no answer changes.
//!
//! - `platt`: σ(a·logit(c) + b) with a > 0 (Platt 1999, "Probabilistic outputs for support vector
//!   machines"), fitted by Newton's method on the log loss.
//! - `isotonic`: centered isotonic regression (Oron & Flournoy 2017, "Centered isotonic
//!   regression: point and interval estimation for dose–response studies"): the
//!   pool-adjacent-violators fit, with each block's mean confidence and mean accuracy as a knot
//!   (the end blocks' at the smallest and the largest confidence), linear between knots (plain
//!   isotonic regression is a step function that ties most confidences), and on to (0, 0) and
//!   (1, 1) beyond the end knots, where no validation question was.
//!
//! Both fit Platt's smoothed targets: with N₊ right and N₋ wrong answers (accuracies summed), a
//! right answer counts as (N₊+1)/(N₊+2) and a wrong one as 1/(N₋+2), so no map claims a
//! certainty (0 or 1) that N questions cannot show. Both maps are strictly increasing: they keep
//! the order of the confidences, so the `confidence` selector, which scores the confidence shown,
//! ranks the questions as before and answers the same ones at the threshold `calibrate` chooses
//! through the map, while a threshold a user gives (`--threshold 0.8`) means a confidence that
//! holds. [`choose`] picks among none, platt and isotonic by the Brier score of cross-fitted
//! maps.
//!
//! Not the default: a map learns what a confidence means on questions like the validation ones,
//! and questions unlike them keep their low model-average confidence while being right far less
//! often. On the shapes world the fine-tuned ensemble is underconfident in distribution, so the
//! map lifts low confidences, and with it the confidence of the out-of-distribution questions it
//! declines (absent-object questions: mean 0.30 → 0.66 at accuracy 0.11; `eval/RESULTS.md`,
//! stop 35). Use it where the questions asked will be like the validation questions.

use serde::{Deserialize, Serialize};

use super::selector::{cross_fit, solve};

/// A fitted map of the confidence (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ConfidenceMap {
    /// σ(a·logit(c) + b).
    Platt { a: f64, b: f64 },
    /// Knots `[confidence, mapped]`, both strictly increasing; linear between them and on to
    /// (0, 0) and (1, 1).
    Isotonic { knots: Vec<[f64; 2]> },
}

/// Which map `calibrate --confidence-map` fits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MapChoice {
    /// The one with the lowest cross-fitted Brier score on the validation questions, no map
    /// included.
    Auto,
    /// Show the model average's confidence as it is (the default: see the module docs).
    #[default]
    None,
    Platt,
    Isotonic,
}

/// The maps [`choose`] compares, in the order of its table (`none` first: it wins ties).
pub const MAP_NAMES: [&str; 3] = ["none", "platt", "isotonic"];

/// One map as [`choose`] scored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapRow {
    /// One of [`MAP_NAMES`].
    pub map: String,
    /// Brier score of the cross-fitted map's confidence against the accuracy (`None`: too few
    /// questions to cross-fit, or a fold it could not be fitted on).
    pub brier: Option<f64>,
}

/// Confidences are clamped to [ε, 1 − ε] before the logit (a confidence of exactly 1 is common).
const EPS: f64 = 1e-9;

fn logit(c: f64) -> f64 {
    let c = c.clamp(EPS, 1.0 - EPS);
    (c / (1.0 - c)).ln()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl ConfidenceMap {
    pub fn name(&self) -> &'static str {
        match self {
            ConfidenceMap::Platt { .. } => "platt",
            ConfidenceMap::Isotonic { .. } => "isotonic",
        }
    }

    /// The confidence shown for the model average's confidence `c`.
    pub fn apply(&self, c: f64) -> f64 {
        match self {
            ConfidenceMap::Platt { a, b } => sigmoid(a * logit(c) + b),
            ConfidenceMap::Isotonic { knots } => {
                // Between the knots, or between an end knot and (0, 0) or (1, 1).
                let c = c.clamp(0.0, 1.0);
                let after = knots.partition_point(|k| k[0] < c);
                let lo = after.checked_sub(1).map_or([0.0, 0.0], |i| knots[i]);
                let hi = knots.get(after).copied().unwrap_or([1.0, 1.0]);
                if hi[0] <= lo[0] {
                    // c = 0 on a knot at 0.
                    return hi[1];
                }
                lo[1] + (c - lo[0]) / (hi[0] - lo[0]) * (hi[1] - lo[1])
            }
        }
    }

    /// Refuses a map this build would misapply (a stored config from elsewhere): it must be
    /// finite and increasing (isotonic: confidences in [0, 1], values in (0, 1)).
    pub fn check(&self) -> Result<(), String> {
        match self {
            ConfidenceMap::Platt { a, b } => {
                if !(a.is_finite() && *a > 0.0 && b.is_finite()) {
                    return Err(format!(
                        "platt needs a finite a > 0 and a finite b, not a = {a}, b = {b}"
                    ));
                }
            }
            ConfidenceMap::Isotonic { knots } => {
                if knots.is_empty() {
                    return Err("isotonic has no knots".into());
                }
                // Values strictly inside (0, 1): the map runs on to (0, 0) and (1, 1) and must
                // rise all the way.
                let inside = |k: &[f64; 2]| (0.0..=1.0).contains(&k[0]) && k[1] > 0.0 && k[1] < 1.0;
                if !knots.iter().all(inside) {
                    return Err(
                        "isotonic knots must have confidences in [0, 1] and values in (0, 1)"
                            .into(),
                    );
                }
                if !knots
                    .windows(2)
                    .all(|w| w[0][0] < w[1][0] && w[0][1] < w[1][1])
                {
                    return Err("isotonic knots must increase strictly in both coordinates".into());
                }
            }
        }
        Ok(())
    }

    /// Fits the map `name` (`platt` or `isotonic`) to confidences and accuracies in [0, 1];
    /// refused when the accuracies leave nothing to fit (no question, or all equal).
    pub fn fit(name: &str, conf: &[f64], acc: &[f64]) -> Result<Self, String> {
        let targets = smoothed_targets(acc)?;
        let map = match name {
            "platt" => fit_platt(conf, &targets),
            "isotonic" => fit_isotonic(conf, &targets),
            other => return Err(format!("unknown confidence map {other:?}")),
        };
        map.check()
            .map_err(|why| format!("the {name} fit is unusable: {why}"))?;
        Ok(map)
    }
}

/// Platt's smoothed targets of accuracies `acc` (see the module docs).
fn smoothed_targets(acc: &[f64]) -> Result<Vec<f64>, String> {
    let right: f64 = acc.iter().sum();
    let wrong = acc.len() as f64 - right;
    if acc.is_empty() || acc.iter().all(|&a| a == acc[0]) {
        return Err(
            "a confidence map needs validation questions the model gets both right and wrong"
                .into(),
        );
    }
    let (lo, hi) = (1.0 / (wrong + 2.0), (right + 1.0) / (right + 2.0));
    Ok(acc.iter().map(|&a| lo + a * (hi - lo)).collect())
}

/// Newton's method on the mean log loss of σ(a·logit(c) + b), from the identity (a = 1, b = 0),
/// halving a step until the loss does not rise.
fn fit_platt(conf: &[f64], targets: &[f64]) -> ConfidenceMap {
    let x: Vec<f64> = conf.iter().map(|&c| logit(c)).collect();
    let n = x.len() as f64;
    let loss = |w: [f64; 2]| -> f64 {
        x.iter()
            .zip(targets)
            .map(|(&x, &t)| {
                let z = w[0] * x + w[1];
                // −[t·ln σ(z) + (1 − t)·ln σ(−z)], stable for large |z|.
                let softplus = |z: f64| z.max(0.0) + (-z.abs()).exp().ln_1p();
                t * softplus(-z) + (1.0 - t) * softplus(z)
            })
            .sum::<f64>()
            / n
    };
    let mut w = [1.0, 0.0];
    let mut current = loss(w);
    for _ in 0..100 {
        let mut grad = [0.0; 2];
        let mut hess = [[1e-9, 0.0], [0.0, 1e-9]];
        for (&x, &t) in x.iter().zip(targets) {
            let p = sigmoid(w[0] * x + w[1]);
            let z = [x, 1.0];
            for i in 0..2 {
                grad[i] += (p - t) * z[i] / n;
                for j in 0..2 {
                    hess[i][j] += p * (1.0 - p) * z[i] * z[j] / n;
                }
            }
        }
        let step = solve(hess, grad);
        let mut scale = 1.0;
        let mut next = [w[0] - step[0], w[1] - step[1]];
        while loss(next) > current && scale > 1e-10 {
            scale /= 2.0;
            next = [w[0] - scale * step[0], w[1] - scale * step[1]];
        }
        let new = loss(next);
        if new > current {
            break;
        }
        let moved = (next[0] - w[0]).abs().max((next[1] - w[1]).abs());
        (w, current) = (next, new);
        if moved < 1e-12 {
            break;
        }
    }
    ConfidenceMap::Platt { a: w[0], b: w[1] }
}

/// Centered isotonic regression: pool adjacent violators over the questions in order of
/// confidence (equal confidences one point from the start, so that knots are distinct), a block
/// merged with the one before it while its mean target is not above that one's (up to rounding).
/// Each block is a knot at its mean confidence and mean target, except that the first knot sits at
/// the smallest confidence and the last at the largest: the fitted value holds over the range the
/// validation questions cover, and the map runs on to (0, 0) and (1, 1) only beyond it.
fn fit_isotonic(conf: &[f64], targets: &[f64]) -> ConfidenceMap {
    #[derive(Clone, Copy)]
    struct Block {
        conf: f64,
        target: f64,
        count: f64,
        lowest: f64,
        highest: f64,
    }
    let mut order: Vec<usize> = (0..conf.len()).collect();
    order.sort_by(|&a, &b| conf[a].total_cmp(&conf[b]));
    let mut points: Vec<Block> = Vec::new();
    for i in order {
        let (c, t) = (conf[i], targets[i]);
        match points.last_mut() {
            Some(p) if p.lowest == c => {
                p.conf += c;
                p.target += t;
                p.count += 1.0;
            }
            _ => points.push(Block {
                conf: c,
                target: t,
                count: 1.0,
                lowest: c,
                highest: c,
            }),
        }
    }
    let mean = |b: &Block| b.target / b.count;
    let mut blocks: Vec<Block> = Vec::with_capacity(points.len());
    for mut block in points {
        while let Some(before) = blocks.last().copied() {
            if mean(&block) > mean(&before) + 1e-12 {
                break;
            }
            blocks.pop();
            block = Block {
                conf: before.conf + block.conf,
                target: before.target + block.target,
                count: before.count + block.count,
                lowest: before.lowest,
                highest: block.highest,
            };
        }
        blocks.push(block);
    }
    let last = blocks.len() - 1;
    ConfidenceMap::Isotonic {
        knots: blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let at = match i {
                    _ if last == 0 => b.conf / b.count,
                    0 => b.lowest,
                    _ if i == last => b.highest,
                    _ => b.conf / b.count,
                };
                [at.clamp(0.0, 1.0), mean(b)]
            })
            .collect(),
    }
}

/// Scores no map, `platt` and `isotonic` by the Brier score of maps cross-fitted on `folds`
/// folds (question `i` in fold `i % folds`; each question's confidence mapped by a map fitted
/// on the other folds), and fits the one `choice` asks for on all questions (`Auto`: the lowest
/// Brier score, no map on ties). With fewer than `2·folds` questions nothing is cross-fitted
/// and `Auto` keeps no map. Refused when a named map cannot be fitted.
pub fn choose(
    choice: MapChoice,
    conf: &[f64],
    acc: &[f64],
    folds: usize,
) -> Result<(Option<ConfidenceMap>, Vec<MapRow>), String> {
    let brier = |shown: &[f64]| -> f64 {
        shown
            .iter()
            .zip(acc)
            .map(|(c, a)| (c - a).powi(2))
            .sum::<f64>()
            / shown.len() as f64
    };
    let enough = conf.len() >= 2 * folds && folds > 1;
    let rows: Vec<MapRow> = MAP_NAMES
        .iter()
        .map(|&name| MapRow {
            map: name.to_string(),
            brier: match name {
                "none" => (!conf.is_empty()).then(|| brier(conf)),
                _ if enough => cross_fitted(name, conf, acc, folds).map(|s| brier(&s)),
                _ => None,
            },
        })
        .collect();
    let name = match choice {
        MapChoice::None => return Ok((None, rows)),
        MapChoice::Platt => "platt",
        MapChoice::Isotonic => "isotonic",
        MapChoice::Auto => {
            // Lowest Brier first (none first on ties); a map that its folds could fit but all
            // the questions cannot (a Platt slope that comes out ≤ 0) gives way to the next.
            let mut ranked: Vec<(&str, f64)> = rows
                .iter()
                .filter_map(|r| Some((r.map.as_str(), r.brier?)))
                .collect();
            ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
            for (name, _) in ranked {
                if name == "none" {
                    break;
                }
                if let Ok(map) = ConfidenceMap::fit(name, conf, acc) {
                    return Ok((Some(map), rows));
                }
            }
            return Ok((None, rows));
        }
    };
    let map = ConfidenceMap::fit(name, conf, acc)?;
    Ok((Some(map), rows))
}

/// Every question's confidence through `name` fitted on the other folds; `None` when a fold
/// cannot be fitted (its training part all right or all wrong).
fn cross_fitted(name: &str, conf: &[f64], acc: &[f64], folds: usize) -> Option<Vec<f64>> {
    cross_fit(
        conf,
        acc,
        folds,
        |c, a| ConfidenceMap::fit(name, c, a),
        |map, c| map.apply(*c),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `n` confidences uniform in (0, 1) and 0/1 accuracies drawn with probability
    /// σ(a·logit(c) + b): a > 1 makes the confidences underconfident.
    fn draw(n: usize, a: f64, b: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let c: f64 = rng.random_range(0.001..0.999);
                let right = rng.random::<f64>() < sigmoid(a * logit(c) + b);
                (c, if right { 1.0 } else { 0.0 })
            })
            .unzip()
    }

    fn ece(shown: &[f64], acc: &[f64]) -> f64 {
        crate::metrics::ece_equal_width(shown, acc, 15).unwrap().ece
    }

    #[test]
    fn platt_recovers_the_parameters_it_was_drawn_with() {
        let (conf, acc) = draw(40_000, 2.0, 0.5, 1);
        let ConfidenceMap::Platt { a, b } = ConfidenceMap::fit("platt", &conf, &acc).unwrap()
        else {
            panic!("not platt")
        };
        assert!(
            (a - 2.0).abs() < 0.06 && (b - 0.5).abs() < 0.06,
            "a {a}, b {b}"
        );
    }

    #[test]
    fn isotonic_by_hand() {
        // 3 right, 3 wrong: targets 1/5 and 4/5. Blocks: 0.1–0.15 (1/5, equal means pool),
        // 0.2–0.3 (the violating pair: 1/2 at their mean 0.25), 0.4–0.45 (4/5). The end knots
        // sit at the smallest and the largest confidence.
        let conf = [0.1, 0.15, 0.2, 0.3, 0.4, 0.45];
        let map = ConfidenceMap::fit("isotonic", &conf, &[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]).unwrap();
        let ConfidenceMap::Isotonic { knots } = &map else {
            panic!("not isotonic")
        };
        let expected = [[0.1, 0.2], [0.25, 0.5], [0.45, 0.8]];
        assert_eq!(knots.len(), 3, "{knots:?}");
        for (k, e) in knots.iter().zip(expected) {
            assert!(
                (k[0] - e[0]).abs() < 1e-12 && (k[1] - e[1]).abs() < 1e-12,
                "{knots:?}"
            );
        }
        // Linear between knots, and on to (0, 0) and (1, 1).
        for (c, shown) in [
            (0.0, 0.0),
            (0.05, 0.1),
            (0.125, 0.25),
            (0.35, 0.65),
            (0.45, 0.8),
            (0.725, 0.9),
            (1.0, 1.0),
        ] {
            assert!(
                (map.apply(c) - shown).abs() < 1e-12,
                "{c} → {}",
                map.apply(c)
            );
        }
    }

    #[test]
    fn isotonic_pools_equal_confidences_and_equal_means() {
        // Three questions at 0.5 (one right) are one point; 0.9 right. Targets: right 3/4
        // (N₊ = 2), wrong 1/4 (N₋ = 2).
        let map =
            ConfidenceMap::fit("isotonic", &[0.5, 0.9, 0.5, 0.5], &[1.0, 1.0, 0.0, 0.0]).unwrap();
        let ConfidenceMap::Isotonic { knots } = &map else {
            panic!("not isotonic")
        };
        assert_eq!(knots.len(), 2, "{knots:?}");
        assert!((knots[0][1] - (0.75 + 0.25 + 0.25) / 3.0).abs() < 1e-12);
        // Two blocks of the same mean are one knot.
        let map =
            ConfidenceMap::fit("isotonic", &[0.2, 0.4, 0.6, 0.8], &[1.0, 0.0, 1.0, 0.0]).unwrap();
        let ConfidenceMap::Isotonic { knots } = &map else {
            panic!("not isotonic")
        };
        assert_eq!(knots.len(), 1, "{knots:?}");
        map.check().unwrap();
    }

    #[test]
    fn the_chosen_map_mends_an_underconfident_model_on_new_questions() {
        let (conf, acc) = draw(600, 2.5, 1.0, 2);
        let (map, rows) = choose(MapChoice::Auto, &conf, &acc, 5).unwrap();
        let map = map.expect("a map beats none");
        let names: Vec<&str> = rows.iter().map(|r| r.map.as_str()).collect();
        assert_eq!(names, MAP_NAMES);
        let brier = |name: &str| rows.iter().find(|r| r.map == name).unwrap().brier.unwrap();
        assert!(brier(map.name()) < brier("none"));
        let (test_conf, test_acc) = draw(5000, 2.5, 1.0, 3);
        let shown: Vec<f64> = test_conf.iter().map(|&c| map.apply(c)).collect();
        let (before, after) = (ece(&test_conf, &test_acc), ece(&shown, &test_acc));
        assert!(after < before / 2.0, "ECE {before} → {after}");
        // Both maps keep the order of the confidences (strictly increasing).
        let mut sorted = test_conf.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        for name in ["platt", "isotonic"] {
            let map = ConfidenceMap::fit(name, &conf, &acc).unwrap();
            let mapped: Vec<f64> = sorted.iter().map(|&c| map.apply(c)).collect();
            assert!(mapped.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
    }

    #[test]
    fn no_map_is_fitted_to_answers_all_right_or_too_few() {
        let conf = [0.6, 0.7, 0.8, 0.9, 0.95, 0.6, 0.7, 0.8, 0.9, 0.95];
        let (map, rows) = choose(MapChoice::Auto, &conf, &[1.0; 10], 5).unwrap();
        assert!(map.is_none());
        assert!(rows.iter().all(|r| (r.map == "none") == r.brier.is_some()));
        let e = choose(MapChoice::Isotonic, &conf, &[1.0; 10], 5).unwrap_err();
        assert!(e.contains("both right and wrong"), "{e}");
        // Four questions cannot be cross-fitted on five folds: auto keeps none, a named map is
        // fitted on all of them.
        let (conf, acc) = ([0.2, 0.4, 0.6, 0.8], [0.0, 0.0, 1.0, 1.0]);
        assert!(choose(MapChoice::Auto, &conf, &acc, 5).unwrap().0.is_none());
        let (map, _) = choose(MapChoice::Platt, &conf, &acc, 5).unwrap();
        assert_eq!(map.unwrap().name(), "platt");
        assert!(choose(MapChoice::None, &conf, &acc, 5).unwrap().0.is_none());
    }

    #[test]
    fn a_confidence_that_falls_with_the_accuracy_gets_no_platt_map_and_auto_no_error() {
        // Right below 0.5, wrong above: Platt's slope comes out negative.
        let conf: Vec<f64> = (0..40).map(|i| 0.1 + 0.02 * i as f64).collect();
        let acc: Vec<f64> = conf.iter().map(|&c| f64::from(c < 0.5)).collect();
        let e = choose(MapChoice::Platt, &conf, &acc, 5).unwrap_err();
        assert!(
            e.contains("the platt fit is unusable: platt needs a finite a > 0"),
            "{e}"
        );
        let (map, rows) = choose(MapChoice::Auto, &conf, &acc, 5).unwrap();
        assert!(rows.iter().any(|r| r.map == "platt" && r.brier.is_none()));
        assert!(map.is_none_or(|m| m.name() == "isotonic" && m.check().is_ok()));
    }

    #[test]
    fn maps_that_would_be_misapplied_are_refused() {
        let bad = [
            ConfidenceMap::Platt { a: -1.0, b: 0.0 },
            ConfidenceMap::Platt {
                a: 1.0,
                b: f64::NAN,
            },
            ConfidenceMap::Isotonic { knots: vec![] },
            ConfidenceMap::Isotonic {
                knots: vec![[0.5, 0.9], [0.4, 0.95]],
            },
            ConfidenceMap::Isotonic {
                knots: vec![[0.4, 0.9], [0.5, 0.8]],
            },
            ConfidenceMap::Isotonic {
                knots: vec![[0.4, 1.5]],
            },
            // A value of 1 would make the map flat up to (1, 1).
            ConfidenceMap::Isotonic {
                knots: vec![[0.4, 0.5], [0.9, 1.0]],
            },
        ];
        for m in bad {
            assert!(m.check().is_err(), "{m:?}");
        }
    }
}
