//! Percentile bootstrap intervals for every metric of a run, and paired intervals for the
//! differences between runs on the same questions (`bench --bootstrap N`, `bench --compare`).
//!
//! A resample draws, for every data file (test, validation, each OOD file) separately, as many
//! questions as it has, with replacement, and recomputes every metric on the drawn questions
//! (validation included, so the thresholds chosen on it vary too). Resample r uses its own RNG
//! seeded from (seed, r): the intervals do not depend on the number of threads. Runs compared
//! with each other are resampled with the same draws (paired over questions).
//!
//! A file of one question is the same in every resample: it is held fixed while the others are
//! resampled, and its own metrics get no interval (it would have width 0, and any difference
//! would look certain).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Resamples and seed of the bootstrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// 0 disables the intervals.
    pub resamples: usize,
    pub seed: u64,
    /// Show a progress bar over the resamples (tens of thousands of questions take minutes).
    #[serde(skip)]
    pub progress: bool,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self {
            resamples: 1000,
            seed: 0,
            progress: false,
        }
    }
}

/// The interval's coverage: 95 %, the 2.5th and 97.5th percentiles.
pub const LEVEL: f64 = 0.95;

impl Bootstrap {
    /// The note the results carry.
    pub fn describe(&self) -> String {
        format!(
            "Intervals: 95 % percentile bootstrap over the questions ({} resamples, seed {}; each \
             data file resampled separately, validation included, so the thresholds chosen on it \
             vary too; linear interpolation between order statistics). For a biased statistic \
             such as ECE, which resampling inflates, or one chosen anew on each resample under a \
             constraint (the risk at a target risk), the interval can lie beside the point \
             estimate",
            self.resamples, self.seed
        )
    }
}

/// Keys of the metric map that are settings or counts, not estimates.
fn is_estimate(key: &str) -> bool {
    !(key.ends_with("count")
        || key.ends_with("threshold")
        || key.ends_with("ece_bins")
        || key.ends_with("errors"))
}

/// The 2.5th and 97.5th percentiles of `values` (sorted here), interpolated linearly between
/// order statistics (numpy's default).
pub fn percentile_interval(values: &mut [f64]) -> [f64; 2] {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let pos = q * (values.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
    };
    let tail = (1.0 - LEVEL) / 2.0;
    [at(tail), at(1.0 - tail)]
}

/// The draws of resample `r`: for each group of `sizes`, indices into it.
fn draw(sizes: &[usize], seed: u64, r: usize) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(r as u64),
    );
    sizes
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..n.max(1))).collect())
        .collect()
}

/// The metric maps of every run on every resample: `[resample][run]`.
type Maps = Vec<Vec<Map<String, Value>>>;

/// The [`Maps`] of the resamples, and the groups of one question (the same in every resample).
/// Every run must have groups of the same sizes (the same questions, for pairing).
fn resampled<T, F>(runs: &[&[Vec<T>]], b: &Bootstrap, metric: F) -> Result<(Maps, Vec<usize>)>
where
    T: Clone + Sync,
    F: Fn(&[Vec<T>]) -> Result<Map<String, Value>> + Sync,
{
    let Some(first) = runs.first() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let sizes: Vec<usize> = first.iter().map(Vec::len).collect();
    if runs
        .iter()
        .any(|r| r.iter().map(Vec::len).collect::<Vec<_>>() != sizes)
    {
        bail!("paired bootstrap: the runs do not hold the same questions");
    }
    let single: Vec<usize> = (0..sizes.len()).filter(|&g| sizes[g] == 1).collect();
    let bar = crate::console::Progress::new(
        b.progress,
        b.resamples as u64,
        0,
        "resamples",
        "{elapsed_precise} [{bar:30}] resample {pos}/{len} ({eta} left)",
    );
    let maps = (0..b.resamples)
        .into_par_iter()
        .map(|r| {
            // Many questions and resamples take minutes: a Ctrl-C stops here, nothing lost.
            if crate::interrupt::requested() {
                return Err(crate::interrupt::Interrupted(
                    "interrupted while computing the bootstrap intervals; every answer is kept \
                     and the same command computes them again"
                        .into(),
                )
                .into());
            }
            let idx = draw(&sizes, b.seed, r);
            let maps = runs
                .iter()
                .map(|groups| {
                    let drawn: Vec<Vec<T>> = groups
                        .iter()
                        .zip(&idx)
                        .map(|(g, ix)| ix.iter().map(|&i| g[i].clone()).collect())
                        .collect();
                    metric(&drawn)
                })
                .collect();
            bar.inc(1);
            maps
        })
        .collect::<Result<_>>();
    bar.finish_and_clear();
    Ok((maps?, single))
}

/// Percentile intervals of the values `value(resample)` gives, per estimate key; keys defined
/// (a number) in fewer than half the resamples are left out, and so are the keys that
/// `of_group(key, g)` says are metrics of a group `g` of `single` (one question).
fn collect_intervals(
    maps: &Maps,
    single: &[usize],
    of_group: &impl Fn(&str, usize) -> bool,
    value: impl Fn(&[Map<String, Value>], &str) -> Option<f64>,
) -> BTreeMap<String, [f64; 2]> {
    let mut keys: Vec<&String> = maps
        .iter()
        .flat_map(|m| m.iter().flat_map(|run| run.keys()))
        .filter(|k| is_estimate(k) && !single.iter().any(|&g| of_group(k, g)))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let mut v: Vec<f64> = maps.iter().filter_map(|m| value(m, k)).collect();
            (2 * v.len() >= maps.len() && !v.is_empty())
                .then(|| (k.clone(), percentile_interval(&mut v)))
        })
        .collect()
}

/// Intervals for every estimate of every run, resampled with the same draws: one map per run.
/// `metric` computes the flat metric map of one run's per-file groups; `of_group(key, g)` tells
/// whether `key` is a metric of group `g` (left out when that group has one question).
pub fn intervals<T, F>(
    runs: &[&[Vec<T>]],
    b: &Bootstrap,
    metric: F,
    of_group: impl Fn(&str, usize) -> bool,
) -> Result<Vec<BTreeMap<String, [f64; 2]>>>
where
    T: Clone + Sync,
    F: Fn(&[Vec<T>]) -> Result<Map<String, Value>> + Sync,
{
    let (maps, single) = resampled(runs, b, metric)?;
    Ok((0..runs.len())
        .map(|k| collect_intervals(&maps, &single, &of_group, |m, key| m[k].get(key)?.as_f64()))
        .collect())
}

/// Paired intervals of run k − run 0 for every k ≥ 1 (one map each): every run is resampled
/// with the same draws (`of_group` as in [`intervals`]).
pub fn paired<T, F>(
    runs: &[&[Vec<T>]],
    b: &Bootstrap,
    metric: F,
    of_group: impl Fn(&str, usize) -> bool,
) -> Result<Vec<BTreeMap<String, [f64; 2]>>>
where
    T: Clone + Sync,
    F: Fn(&[Vec<T>]) -> Result<Map<String, Value>> + Sync,
{
    let (maps, single) = resampled(runs, b, metric)?;
    Ok((1..runs.len())
        .map(|k| {
            collect_intervals(&maps, &single, &of_group, |m, key| {
                Some(m[k].get(key)?.as_f64()? - m[0].get(key)?.as_f64()?)
            })
        })
        .collect())
}

/// Whether a paired interval of a difference excludes 0.
pub fn significant(interval: &[f64; 2]) -> bool {
    interval[0] > 0.0 || interval[1] < 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group of values; the metric is their mean.
    fn mean_metric(groups: &[Vec<f64>]) -> Result<Map<String, Value>> {
        let g = &groups[0];
        let mut m = Map::new();
        m.insert(
            "mean".into(),
            Value::from(g.iter().sum::<f64>() / g.len() as f64),
        );
        m.insert("count".into(), Value::from(g.len()));
        Ok(m)
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f64>()).collect()
    }

    fn interval(data: &[f64], b: &Bootstrap) -> [f64; 2] {
        let runs = [vec![data.to_vec()]];
        let r: Vec<&[Vec<f64>]> = runs.iter().map(|g| g.as_slice()).collect();
        intervals(&r, b, mean_metric, |_, _| true).unwrap()[0]["mean"]
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile(range(11), [2.5, 97.5]) = [0.25, 9.75]
        let mut v: Vec<f64> = (0..=10).rev().map(f64::from).collect();
        let [lo, hi] = percentile_interval(&mut v);
        assert!((lo - 0.25).abs() < 1e-12 && (hi - 9.75).abs() < 1e-12);
    }

    #[test]
    fn the_interval_holds_the_estimate_and_shrinks_with_more_questions() {
        let b = Bootstrap::default();
        let small = values(100, 1);
        let large = values(2500, 2);
        let [lo, hi] = interval(&small, &b);
        let mean = small.iter().sum::<f64>() / small.len() as f64;
        assert!(lo < mean && mean < hi, "{lo} {mean} {hi}");
        // A uniform's sd is 1/√12 ≈ 0.289: a 95 % interval of the mean of 100 is ≈ ±0.057.
        assert!(
            (hi - lo - 2.0 * 1.96 * 0.2887 / 10.0).abs() < 0.02,
            "{}",
            hi - lo
        );
        let [lo2, hi2] = interval(&large, &b);
        // 25 times the questions: a fifth of the width.
        assert!(
            (hi2 - lo2) < (hi - lo) / 3.5,
            "{} vs {}",
            hi2 - lo2,
            hi - lo
        );
        // Counts get no interval.
        let runs = [vec![small.clone()]];
        let r: Vec<&[Vec<f64>]> = runs.iter().map(|g| g.as_slice()).collect();
        assert!(!intervals(&r, &b, mean_metric, |_, _| true).unwrap()[0].contains_key("count"));
    }

    #[test]
    fn the_same_seed_gives_the_same_interval_and_another_seed_another() {
        let data = values(200, 3);
        let b = Bootstrap {
            resamples: 300,
            seed: 5,
            progress: false,
        };
        assert_eq!(interval(&data, &b), interval(&data, &b));
        assert_ne!(
            interval(&data, &b),
            interval(&data, &Bootstrap { seed: 6, ..b })
        );
    }

    #[test]
    fn a_paired_difference_with_itself_is_exactly_zero() {
        let data = values(150, 4);
        let shifted: Vec<f64> = data.iter().map(|x| x + 0.03).collect();
        let runs = [vec![data.clone()], vec![data.clone()], vec![shifted]];
        let r: Vec<&[Vec<f64>]> = runs.iter().map(|g| g.as_slice()).collect();
        let diffs = paired(&r, &Bootstrap::default(), mean_metric, |_, _| true).unwrap();
        let single = intervals(&r, &Bootstrap::default(), mean_metric, |_, _| true).unwrap();
        assert_eq!(diffs[0]["mean"], [0.0, 0.0]);
        assert!(!significant(&diffs[0]["mean"]));
        // A constant shift is the same in every resample: paired, it is certain, although the
        // unpaired intervals of the two runs overlap.
        let [lo, hi] = diffs[1]["mean"];
        assert!((lo - 0.03).abs() < 1e-12 && (hi - 0.03).abs() < 1e-12);
        assert!(significant(&diffs[1]["mean"]));
        assert!(single[2]["mean"][0] < single[0]["mean"][1]);
        // One question: every resample alike, so no intervals (every difference looked certain).
        let one = [vec![vec![0.0]], vec![vec![1.0]]];
        let r: Vec<&[Vec<f64>]> = one.iter().map(|g| g.as_slice()).collect();
        assert!(paired(&r, &Bootstrap::default(), mean_metric, |_, _| true).unwrap()[0].is_empty());
        // Different questions cannot be paired.
        let other = [vec![data.clone()], vec![values(10, 9)]];
        let r: Vec<&[Vec<f64>]> = other.iter().map(|g| g.as_slice()).collect();
        assert!(paired(&r, &Bootstrap::default(), mean_metric, |_, _| true).is_err());
    }

    #[test]
    fn a_group_of_one_question_is_held_fixed_and_only_its_own_metrics_lose_their_interval() {
        // Group 0 has one question, group 1 a hundred; "a" is group 0's mean, "b" group 1's,
        // "gap" is computed from both.
        let metric = |groups: &[Vec<f64>]| -> Result<Map<String, Value>> {
            let mean = |g: &[f64]| g.iter().sum::<f64>() / g.len() as f64;
            let mut m = Map::new();
            m.insert("a".into(), Value::from(mean(&groups[0])));
            m.insert("b".into(), Value::from(mean(&groups[1])));
            m.insert(
                "gap".into(),
                Value::from(mean(&groups[1]) - mean(&groups[0])),
            );
            Ok(m)
        };
        let of_group = |key: &str, g: usize| matches!((key, g), ("a", 0) | ("b", 1));
        let runs = [vec![vec![0.25], values(100, 5)]];
        let r: Vec<&[Vec<f64>]> = runs.iter().map(|g| g.as_slice()).collect();
        let got = intervals(&r, &Bootstrap::default(), metric, of_group).unwrap();
        assert!(!got[0].contains_key("a"), "{got:?}");
        let [lo, hi] = got[0]["b"];
        assert!(hi - lo > 0.05, "{lo} {hi}");
        // The single question is the same in every resample: "gap" varies with group 1 alone.
        let [glo, ghi] = got[0]["gap"];
        assert!((glo + 0.25 - lo).abs() < 1e-12 && (ghi + 0.25 - hi).abs() < 1e-12);
    }
}
