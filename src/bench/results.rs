//! `results.json`: the metrics of a run's samples (all computed by [`crate::metrics`]), its
//! progress, timing and configuration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::bootstrap::Bootstrap;
use super::config::{Role, RunConfig};
use super::samples::Sample;
use crate::answer::UNANSWERABLE;
use crate::data::normalize::normalize_answer;
use crate::metrics::{
    self, AnswerTypeBreakdown, NormalizeMode, Prediction, Summary, SummaryOptions, ThresholdSource,
};

/// The file name of the results.
pub const RESULTS_FILE: &str = "results.json";
/// One line per `bench` invocation on a directory (timing), from its start ([`RunLog`]).
pub const RUNS_FILE: &str = "runs.jsonl";
/// One line per question that could not be answered with `--skip-bad` (e.g. an unreadable image).
pub const SKIPPED_FILE: &str = "skipped.jsonl";
/// One line per data record `--skip-bad` left out while reading (bad JSON, a missing field, …).
pub const BAD_RECORDS_FILE: &str = "bad_records.jsonl";

/// A data record left out while reading (with `--skip-bad`), and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BadRecordLine {
    pub split: String,
    pub file: String,
    /// The 1-based line (JSONL); absent for JSON formats, where `reason` names the question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub reason: String,
}

/// One invocation of `bench` on a directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub started: String,
    /// The process (absent in lines of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `false` from the invocation's start until its end: one that was killed (SIGKILL, a power
    /// cut) stays so, its times, count and memory unknown (0, none; its answers are kept in
    /// `samples.jsonl`). Older versions wrote a line only at the end: without the field, `true`.
    #[serde(default = "finished_by_default")]
    pub finished: bool,
    /// Seconds from reading the data to the last answer (model loading not included).
    pub wall_seconds: f64,
    /// Seconds spent answering.
    pub answering_seconds: f64,
    pub answered: usize,
    /// Peak resident memory of the process (VmHWM), KiB.
    pub peak_memory_kib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<super::Shard>,
    /// Whether the invocation ended with an error (its answers are kept).
    #[serde(default)]
    pub failed: bool,
    /// Whether it was stopped by a Ctrl-C or SIGTERM ([`crate::interrupt`]) before its end: in
    /// its answers, or in its metrics (its answers are kept either way).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn finished_by_default() -> bool {
    true
}

impl RunRecord {
    /// The line of an invocation that has just started (of this process, on `shard`).
    pub fn started(started: String, shard: Option<super::Shard>) -> Self {
        Self {
            started,
            pid: Some(std::process::id()),
            finished: false,
            wall_seconds: 0.0,
            answering_seconds: 0.0,
            answered: 0,
            peak_memory_kib: None,
            shard,
            failed: false,
            interrupted: false,
        }
    }
}

/// This invocation's line in `runs.jsonl`: written when it starts, not finished
/// ([`RunRecord::started`]), so that an invocation that is killed is in the log too; replaced by
/// the final record at its end ([`RunLog::finish`]), or, when the invocation returns with an
/// error before that, by one marked failed. Each write replaces the file atomically (the lines
/// before this invocation's, then its own): a kill leaves the one line or the other.
pub struct RunLog {
    path: PathBuf,
    /// The lines of earlier invocations, ending with a line break.
    before: Vec<u8>,
    /// The line written at the start; `None` once finished.
    started: Option<(RunRecord, std::time::Instant)>,
}

impl RunLog {
    /// Records the start of an invocation (`record`, from [`RunRecord::started`]) in `path`.
    pub fn start(path: &Path, record: RunRecord) -> Result<Self> {
        let mut before = crate::input::read_if_present(path, "log")?.unwrap_or_default();
        // A line cut off by a kill (an older version appended): left on a line of its own.
        if before.last().is_some_and(|&b| b != b'\n') {
            before.push(b'\n');
        }
        let mut log = Self {
            path: path.to_path_buf(),
            before,
            started: None,
        };
        log.write(&record)?;
        log.started = Some((record, std::time::Instant::now()));
        Ok(log)
    }

    /// Replaces the start line with the invocation's final record.
    pub fn finish(&mut self, record: &RunRecord) -> Result<()> {
        self.started = None;
        self.write(record)
    }

    fn write(&self, record: &RunRecord) -> Result<()> {
        let mut bytes = self.before.clone();
        serde_json::to_writer(&mut bytes, record).context("serialising a record")?;
        bytes.push(b'\n');
        crate::io::write_bytes_atomically(&self.path, &bytes)
    }
}

impl Drop for RunLog {
    /// An invocation that returned with an error before its end: recorded as failed (best
    /// effort; the start line stays where this write fails).
    fn drop(&mut self) {
        if let Some((mut record, since)) = self.started.take() {
            record.finished = true;
            record.failed = true;
            record.wall_seconds = since.elapsed().as_secs_f64();
            record.peak_memory_kib = super::config::peak_memory_kib();
            let _ = self.write(&record);
        }
    }
}

/// A question that could not be answered (with `--skip-bad`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkippedQuestion {
    pub split: String,
    pub question_id: String,
    pub index: usize,
    pub reason: String,
}

/// Time and memory, over every invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub invocations: usize,
    /// Invocations that never recorded their end (killed): their times and answers are not in
    /// the sums below, their answers are in the results.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unfinished: usize,
    pub wall_time_s: f64,
    pub answering_time_s: f64,
    pub answered: usize,
    pub answers_per_second: Option<f64>,
    pub peak_memory_mib: Option<f64>,
    pub peak_memory_source: String,
}

impl Timing {
    pub fn of(runs: &[RunRecord]) -> Self {
        let answering: f64 = runs.iter().map(|r| r.answering_seconds).sum();
        let answered: usize = runs.iter().map(|r| r.answered).sum();
        Timing {
            invocations: runs.len(),
            unfinished: runs.iter().filter(|r| !r.finished).count(),
            wall_time_s: runs.iter().map(|r| r.wall_seconds).sum(),
            answering_time_s: answering,
            answered,
            answers_per_second: (answering > 0.0).then(|| answered as f64 / answering),
            peak_memory_mib: runs
                .iter()
                .filter_map(|r| r.peak_memory_kib)
                .max()
                .map(|k| k as f64 / 1024.0),
            peak_memory_source: "VmHWM (peak resident set size) of the bench process from \
                                 /proc/self/status, the largest over the invocations (and shards); \
                                 includes the model weights"
                .into(),
        }
    }
}

/// How far the run got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Questions this run (limit, shard) covers, over every data file.
    pub questions: usize,
    pub answered: usize,
    /// Could not be answered (`--skip-bad`): see `skipped.jsonl`.
    pub skipped: usize,
    /// Neither answered nor skipped: rerun with the same `--out` to finish.
    pub missing: usize,
    pub complete: bool,
    /// Bad records left out of the data files (`--skip-bad`).
    pub bad_records: usize,
}

/// OOD detection of one `--ood-data` file against the test questions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OodResult {
    pub count: usize,
    /// Fraction answered (not abstained) at the run's threshold.
    pub coverage: f64,
    /// Fraction given no content answer: abstained, or answered "unanswerable" ([`declined`]).
    #[serde(default)]
    pub declined: f64,
    pub mean_confidence: f64,
    /// Mean VQA accuracy, when the file has human answers.
    pub accuracy: Option<f64>,
    /// Score 1 − confidence.
    pub confidence: metrics::Detection,
    /// Score: total uncertainty H[p̄].
    pub total_uncertainty: metrics::Detection,
    /// Score: epistemic uncertainty (mutual information).
    pub epistemic_uncertainty: metrics::Detection,
    /// Score: minus the abstention selector's score, a flagged image below all
    /// ([`crate::answer::image_check::gated_score`]; absent in results written before selectors).
    #[serde(default)]
    pub selector: Option<metrics::Detection>,
    /// Fraction whose image the image check flagged (`None` without a calibrated check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_flagged: Option<f64>,
}

/// Counts and accuracy of the validation questions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationBrief {
    pub count: usize,
    pub accuracy: f64,
    pub mean_confidence: f64,
}

/// The whole `results.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultsFile {
    /// Metric name → value (test questions; OOD keys `ood.{split}.…`); `null` when undefined.
    pub results: Map<String, Value>,
    pub per_answer_type: BTreeMap<String, AnswerTypeBreakdown>,
    pub ood: BTreeMap<String, OodResult>,
    pub validation: Option<ValidationBrief>,
    /// Every metric of the test questions with its curves and bins ([`metrics::summary`]);
    /// `None` without answered test questions with human answers.
    pub summary: Option<Summary>,
    pub progress: Progress,
    pub timing: Timing,
    pub config: RunConfig,
    /// Notes on conventions and caveats, also shown in the report.
    pub notes: Vec<String>,
    /// Metric key → 95 % percentile bootstrap interval [lo, hi] over the questions (empty
    /// without `--bootstrap`; metrics undefined in every resample are left out).
    #[serde(default)]
    pub intervals: BTreeMap<String, [f64; 2]>,
    pub written: String,
}

/// A number as a key part: 0.05 → "5" (percent), 10.0 → "10".
pub fn key_number(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x}")
    }
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn opt(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// The flat metric map of a [`Summary`] (plus accuracy in both normalisation modes).
pub fn flatten(s: &Summary, predictions: &[Prediction]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("count".into(), Value::from(s.count));
    m.insert("vqa_accuracy".into(), num(s.accuracy));
    for (name, mode) in [
        ("vqa_accuracy_official", NormalizeMode::Official),
        ("vqa_accuracy_always", NormalizeMode::Always),
    ] {
        let acc = metrics::accuracies(predictions, mode);
        m.insert(name.into(), opt(mean(acc.into_iter())));
    }
    let d = &s.recorded_decisions;
    m.insert("coverage".into(), num(d.coverage));
    m.insert("selective_risk".into(), opt(d.risk));
    m.insert("answered_accuracy".into(), opt(d.risk.map(|r| 1.0 - r)));
    for p in &d.phi {
        m.insert(format!("phi_{}_recorded", key_number(p.c)), num(p.phi));
    }
    m.insert("ece".into(), num(s.ece.ece));
    m.insert("ece_equal_mass".into(), num(s.ece_equal_mass.ece));
    m.insert("ece_bins".into(), Value::from(s.ece.bins.len()));
    m.insert("nll".into(), num(s.nll_binary));
    m.insert("brier".into(), num(s.brier_binary));
    m.insert("nll_multiclass".into(), opt(s.nll_multiclass));
    m.insert("brier_multiclass".into(), opt(s.brier_multiclass));
    m.insert("error_auroc".into(), opt(s.error_detection.auroc));
    m.insert("error_aupr".into(), opt(s.error_detection.aupr));
    m.insert("errors".into(), Value::from(s.error_detection.positives));
    m.insert("aurc".into(), num(s.aurc));
    m.insert("optimal_aurc".into(), num(s.optimal_aurc));
    m.insert("excess_aurc".into(), num(s.excess_aurc));
    for c in &s.coverage_at_risk {
        m.insert(
            format!("coverage_at_risk_{}pct", key_number(c.target_risk * 100.0)),
            num(c.coverage),
        );
    }
    m.insert(
        "thresholds_from".into(),
        Value::from(match s.thresholds_from {
            ThresholdSource::Validation => "validation",
            ThresholdSource::EvaluatedSet => "evaluated_set",
        }),
    );
    for p in &s.effective_reliability {
        let k = key_number(p.c);
        m.insert(format!("phi_{k}"), num(p.phi));
        m.insert(format!("phi_{k}_threshold"), num(p.threshold));
        m.insert(format!("phi_{k}_coverage"), num(p.coverage));
        m.insert(format!("phi_{k}_risk"), opt(p.risk));
    }
    for r in &s.risk_thresholds {
        let k = key_number(r.target_risk * 100.0);
        m.insert(format!("risk_{k}pct_threshold"), num(r.threshold));
        m.insert(format!("risk_{k}pct_coverage"), num(r.coverage));
        m.insert(format!("risk_{k}pct_risk"), opt(r.risk));
    }
    m
}

/// The share of samples that give the user no content answer: below the threshold, or answered
/// "unanswerable" (VizWiz's answer for a question the image cannot answer, which the response
/// template words as "This question cannot be answered from the image."). 0 for no samples.
pub fn declined(samples: &[&Sample]) -> f64 {
    mean(samples.iter().map(|s| {
        let unanswerable = normalize_answer(&s.answer) == UNANSWERABLE;
        if s.abstained || unanswerable {
            1.0
        } else {
            0.0
        }
    }))
    .unwrap_or(0.0)
}

/// The share of samples whose image the image check flagged; `None` when no sample was checked.
pub fn image_flagged(samples: &[&Sample]) -> Option<f64> {
    mean(
        samples
            .iter()
            .filter_map(|s| s.image_check.map(|v| if v.familiar { 0.0 } else { 1.0 })),
    )
}

/// OOD detection of `ood` against `test`, with three scores.
pub fn ood_result(test: &[&Sample], ood: &[&Sample]) -> Result<OodResult> {
    let all: Vec<&Sample> = test.iter().chain(ood).copied().collect();
    let label: Vec<bool> = all.iter().map(|s| s.is_ood).collect();
    let det = |score: &dyn Fn(&Sample) -> f64| {
        let scores: Vec<f64> = all.iter().map(|s| score(s)).collect();
        metrics::detection(&scores, &label)
    };
    let has_answers = ood.iter().all(|s| !s.answers.is_empty());
    Ok(OodResult {
        count: ood.len(),
        coverage: mean(ood.iter().map(|s| if s.abstained { 0.0 } else { 1.0 })).unwrap_or(0.0),
        declined: declined(ood),
        mean_confidence: mean(ood.iter().map(|s| s.confidence)).unwrap_or(0.0),
        accuracy: if has_answers {
            mean(ood.iter().filter_map(|s| s.accuracy))
        } else {
            None
        },
        confidence: det(&|s| 1.0 - s.confidence)?,
        total_uncertainty: det(&|s| s.uncertainty.total)?,
        epistemic_uncertainty: det(&|s| s.uncertainty.epistemic)?,
        selector: Some(det(&|s| -s.selection_score())?),
        image_flagged: image_flagged(ood),
    })
}

/// The samples of a run in canonical order (data files in config order, then position), only
/// those the run's selection covers; and the progress.
pub fn select<'a>(
    config: &RunConfig,
    samples: &'a [Sample],
    skipped: &[SkippedQuestion],
) -> (Vec<&'a Sample>, Progress) {
    let by_key: HashMap<(&str, usize), &Sample> = samples
        .iter()
        .map(|s| ((s.split.as_str(), s.index), s))
        .collect();
    let skipped: HashSet<(&str, usize)> = skipped
        .iter()
        .map(|s| (s.split.as_str(), s.index))
        .collect();
    let mut chosen = Vec::new();
    let mut progress = Progress {
        questions: 0,
        answered: 0,
        skipped: 0,
        missing: 0,
        complete: false,
        bad_records: config.data.iter().map(|d| d.skipped_records).sum(),
    };
    for d in &config.data {
        for k in config.selection(d) {
            progress.questions += 1;
            match by_key.get(&(d.split.as_str(), k)) {
                Some(s) => {
                    progress.answered += 1;
                    chosen.push(*s);
                }
                None if skipped.contains(&(d.split.as_str(), k)) => progress.skipped += 1,
                None => progress.missing += 1,
            }
        }
    }
    progress.complete = progress.missing == 0;
    (chosen, progress)
}

/// The VQA accuracies of the run's test samples, in canonical order.
pub fn test_accuracies(
    config: &RunConfig,
    samples: &[Sample],
    skipped: &[SkippedQuestion],
) -> Vec<f64> {
    let (chosen, _) = select(config, samples, skipped);
    let tests: HashSet<&str> = config
        .data
        .iter()
        .filter(|d| d.role == Role::Test)
        .map(|d| d.split.as_str())
        .collect();
    chosen
        .iter()
        .filter(|s| tests.contains(s.split.as_str()))
        .filter_map(|s| s.accuracy)
        .collect()
}

/// The metric map, the test summary and the OOD results of a run's selected samples.
pub(crate) struct Metrics {
    pub results: Map<String, Value>,
    pub summary: Option<Summary>,
    pub ood: BTreeMap<String, OodResult>,
}

/// The samples of `split`, in order.
fn of_split<'a>(chosen: &[&'a Sample], split: &str) -> Vec<&'a Sample> {
    chosen
        .iter()
        .copied()
        .filter(|s| s.split == split)
        .collect()
}

/// The selected samples grouped by data file, in config order (what the bootstrap resamples).
pub(crate) fn split_samples<'a>(config: &RunConfig, chosen: &[&'a Sample]) -> Vec<Vec<&'a Sample>> {
    config
        .data
        .iter()
        .map(|d| of_split(chosen, &d.split))
        .collect()
}

/// Whether `key` of the flat metric map is a metric of data file `group` (as [`split_samples`]
/// orders them): the test file's are the keys outside `ood.`, an OOD file's those under
/// `ood.{split}.`; the validation file has none of its own (it chooses thresholds).
pub(crate) fn is_metric_of(config: &RunConfig, key: &str, group: usize) -> bool {
    let Some(d) = config.data.get(group) else {
        return false;
    };
    match d.role {
        Role::Test => !key.starts_with("ood."),
        Role::Val => false,
        Role::Ood => key
            .strip_prefix("ood.")
            .and_then(|k| k.strip_prefix(d.split.as_str()))
            .is_some_and(|k| k.starts_with('.')),
    }
}

/// One note for every data file of one answered question, which the bootstrap holds fixed
/// ([`super::bootstrap`]): its metrics have no interval.
pub(crate) fn held_fixed_notes(config: &RunConfig, groups: &[Vec<&Sample>]) -> Vec<String> {
    config
        .data
        .iter()
        .zip(groups)
        .filter(|(_, g)| g.len() == 1)
        .map(|(d, _)| {
            let what = match d.role {
                Role::Test => "its metrics have no interval",
                Role::Val => "the thresholds chosen on it do not vary",
                Role::Ood => "its metrics (ood.…) have no interval",
            };
            format!(
                "Intervals: {} ({}) has one question, the same in every resample: it is held \
                 fixed, so {what}, and the other intervals leave out its sampling variation; \
                 give it more questions for intervals that include it",
                d.split, d.path
            )
        })
        .collect()
}

type Roles<'a, 'c> = (
    Vec<&'a Sample>,
    Vec<&'a Sample>,
    Vec<(&'c str, Vec<&'a Sample>)>,
);

/// Test, validation and OOD samples of per-file groups (as [`split_samples`] orders them).
pub(crate) fn roles<'a, 'c>(config: &'c RunConfig, groups: &[Vec<&'a Sample>]) -> Roles<'a, 'c> {
    let (mut test, mut val, mut ood) = (Vec::new(), Vec::new(), Vec::new());
    for (d, g) in config.data.iter().zip(groups) {
        match d.role {
            Role::Test => test.extend(g.iter().copied()),
            Role::Val => val.extend(g.iter().copied()),
            Role::Ood => ood.push((d.split.as_str(), g.clone())),
        }
    }
    (test, val, ood)
}

/// Every metric of the test, validation and OOD samples (the flat map of `results.json`
/// without the run's settings).
pub(crate) fn metrics_of(
    config: &RunConfig,
    test: &[&Sample],
    val: &[&Sample],
    ood_sets: &[(&str, Vec<&Sample>)],
) -> Result<Metrics> {
    let mode = config.normalize;
    let with_answers = test.iter().any(|s| !s.answers.is_empty());
    let predictions: Vec<Prediction> = test
        .iter()
        .map(|s| Prediction {
            is_ood: None,
            ..s.prediction(mode)
        })
        .collect();
    let val_predictions: Vec<Prediction> = val.iter().map(|s| s.prediction(mode)).collect();
    let summary = if with_answers && !predictions.is_empty() {
        let opts = SummaryOptions {
            mode,
            ..SummaryOptions::default()
        };
        let val_arg = (!val_predictions.is_empty()).then_some(val_predictions.as_slice());
        Some(metrics::summary(&predictions, val_arg, &opts).context("computing the metrics")?)
    } else {
        None
    };
    let mut results = match &summary {
        Some(s) => flatten(s, &predictions),
        None => {
            let mut m = Map::new();
            m.insert("count".into(), Value::from(test.len()));
            // What needs no human answers: the share answered (a test server's questions).
            if !test.is_empty() {
                let answered = test.iter().filter(|s| !s.abstained).count();
                m.insert("coverage".into(), num(answered as f64 / test.len() as f64));
            }
            m
        }
    };
    results.insert("declined".into(), num(declined(test)));
    if let Some(share) = image_flagged(test) {
        results.insert("image_flagged".into(), num(share));
    }
    let mut ood = BTreeMap::new();
    for (split, these) in ood_sets {
        if these.is_empty() || test.is_empty() {
            continue;
        }
        let r = ood_result(test, these)?;
        let p = format!("ood.{split}");
        // The same metrics as on the test questions, on this split (when it has answers), with
        // the thresholds chosen on the validation questions.
        if these.iter().all(|s| !s.answers.is_empty()) {
            let preds: Vec<Prediction> = these.iter().map(|s| s.prediction(mode)).collect();
            let opts = SummaryOptions {
                mode,
                ..SummaryOptions::default()
            };
            let val_arg = (!val_predictions.is_empty()).then_some(val_predictions.as_slice());
            let split_summary = metrics::summary(&preds, val_arg, &opts)
                .with_context(|| format!("computing the metrics of {split}"))?;
            for (key, value) in flatten(&split_summary, &preds) {
                if !key.starts_with("ood.") {
                    results.insert(format!("{p}.{key}"), value);
                }
            }
        }
        results.insert(format!("{p}.count"), Value::from(r.count));
        results.insert(format!("{p}.coverage"), num(r.coverage));
        results.insert(format!("{p}.declined"), num(r.declined));
        if let Some(share) = r.image_flagged {
            results.insert(format!("{p}.image_flagged"), num(share));
        }
        results.insert(format!("{p}.accuracy"), opt(r.accuracy));
        for (name, det) in [
            ("confidence", &r.confidence),
            ("total", &r.total_uncertainty),
            ("epistemic", &r.epistemic_uncertainty),
        ] {
            results.insert(format!("{p}.auroc_{name}"), opt(det.auroc));
            results.insert(format!("{p}.aupr_{name}"), opt(det.aupr));
        }
        if let Some(det) = &r.selector {
            results.insert(format!("{p}.auroc_selector"), opt(det.auroc));
            results.insert(format!("{p}.aupr_selector"), opt(det.aupr));
        }
        ood.insert(split.to_string(), r);
    }
    Ok(Metrics {
        results,
        summary,
        ood,
    })
}

/// Computes every metric of a run, with bootstrap intervals when `bootstrap` asks for them.
pub fn compute(
    config: &RunConfig,
    samples: &[Sample],
    skipped: &[SkippedQuestion],
    runs: &[RunRecord],
    bootstrap: &Bootstrap,
) -> Result<ResultsFile> {
    let (chosen, progress) = select(config, samples, skipped);
    let mode = config.normalize;
    let groups = split_samples(config, &chosen);
    let (test, val, ood_sets) = roles(config, &groups);
    let mut notes = vec![
        format!(
            "VQA accuracy: official leave-one-out rule (min(#matching humans / 3, 1) averaged over \
             the subsets that leave one human out); normalisation `{}` ({})",
            match mode {
                NormalizeMode::Official => "official",
                NormalizeMode::Always => "always",
            },
            match mode {
                NormalizeMode::Official =>
                    "as vqaEval.py: punctuation, number words, articles and contractions are \
                     normalised only when the human answers differ",
                NormalizeMode::Always =>
                    "as lmms-eval: the answer and every human answer are always normalised",
            }
        ),
        "ECE: 15 equal-width bins (lo, hi] (confidence 0 in the first bin), weighted |accuracy − \
         confidence|, accuracy = VQA accuracy (fractional); ece_equal_mass: 15 bins of equal count"
            .into(),
        "NLL and Brier score the confidence as the probability of the event 'the answer is \
         correct' with the VQA accuracy as a soft label (binary NLL clipped at 1e-12; Brier = \
         mean (confidence − accuracy)²)"
            .into(),
        "Error detection: an error is an answer with VQA accuracy < 0.5; score −(the \
         selector's score), an image the image check flags ranked below all (its samples.jsonl \
         score − 1); AUROC counts ties half, AUPR is average precision (scikit-learn)"
            .into(),
        "Selective prediction: answer when the selector's score (the confidence, unless the \
         particles were calibrated with another selector) >= threshold, an image the check flags \
         ranked below all and never answered (no threshold below 0 is chosen); AURC is the area \
         under the risk–coverage step curve, excess AURC subtracts the oracle's; coverage at risk \
         r is the largest coverage whose selective risk is <= r on the evaluated questions \
         themselves"
            .into(),
        "Effective reliability Φ_c (Whitehead et al., ECCV 2022): accuracy if answered and \
         accuracy > 0, −c if answered and wrong, 0 if abstained"
            .into(),
    ];
    if config
        .data
        .iter()
        .any(|d| d.format.accuracy_rule() == crate::metrics::AccuracyRule::DirectAnswer)
    {
        notes.push(
            "A-OKVQA questions: accuracy by A-OKVQA's direct-answer rule, min(#matching humans / \
             3, 1) without the leave-one-out average (eval_predictions.py), in vqa_accuracy too"
                .into(),
        );
    }
    let Metrics {
        mut results,
        summary,
        ood,
    } = metrics_of(config, &test, &val, &ood_sets)?;
    if summary.is_none() {
        if test.is_empty() {
            notes.push("no test question was answered: no metrics".into());
        } else {
            notes.push(
                "the test questions have no human answers: only counts and OOD scores".into(),
            );
        }
    }
    if let Some(s) = &summary {
        match s.thresholds_from {
            ThresholdSource::Validation => notes.push(format!(
                "Φ_c and risk thresholds were chosen on the validation questions ({} answered) and \
                 applied to the test questions",
                val.len()
            )),
            ThresholdSource::EvaluatedSet => notes.push(
                "WARNING: no validation split (--val): the Φ_c and risk thresholds were chosen on \
                 the test questions themselves, so those numbers are optimistic (an upper bound)"
                    .into(),
            ),
        }
    }
    for d in &config.data {
        if let Some(seen) = d.training_questions.filter(|&n| n > 0) {
            notes.push(format!(
                "WARNING: {}: {}",
                d.split,
                crate::data::seen::warning(seen, d.selected, "questions")
            ));
        }
    }
    let intervals = if bootstrap.resamples > 0 {
        notes.push(bootstrap.describe());
        notes.extend(held_fixed_notes(config, &groups));
        let metric = |drawn: &[Vec<&Sample>]| {
            let (test, val, ood_sets) = roles(config, drawn);
            Ok(metrics_of(config, &test, &val, &ood_sets)?.results)
        };
        let of_group = |key: &str, g: usize| is_metric_of(config, key, g);
        super::bootstrap::intervals(&[groups.as_slice()], bootstrap, metric, of_group)?
            .pop()
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    results.insert("threshold".into(), num(config.threshold));
    if !ood.is_empty() {
        notes.push(
            "OOD detection: each OOD file against the test questions (OOD = positive class), with \
             four scores: 1 − confidence, total uncertainty H[p̄], epistemic uncertainty \
             (mutual information) and minus the abstention selector's score (`_selector`)"
                .into(),
        );
    }
    let validation = (!val.is_empty()).then(|| ValidationBrief {
        count: val.len(),
        accuracy: mean(val.iter().filter_map(|s| s.accuracy)).unwrap_or(0.0),
        mean_confidence: mean(val.iter().map(|s| s.confidence)).unwrap_or(0.0),
    });
    let limited = chosen.iter().filter(|s| s.answer_limit.is_some()).count();
    if limited > 0 {
        notes.push(format!(
            "{limited} answer(s) were limited to the room their prompt left in the model's \
             positions, below max_new_tokens {} (answer_limit in samples.jsonl)",
            config.max_new_tokens
        ));
    }
    if !progress.complete {
        notes.push(format!(
            "INCOMPLETE: {} of {} questions are not answered yet; rerun with the same --out to \
             finish",
            progress.missing, progress.questions
        ));
    }
    Ok(ResultsFile {
        results,
        per_answer_type: summary
            .as_ref()
            .map(|s| s.per_answer_type.clone())
            .unwrap_or_default(),
        ood,
        validation,
        summary,
        progress,
        timing: Timing::of(runs),
        config: config.clone(),
        notes,
        intervals,
        written: super::config::utc_timestamp(),
    })
}

impl ResultsFile {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(RESULTS_FILE);
        let text = crate::input::read_to_string(&path, "results file")?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialising the results")?;
        crate::io::write_bytes_atomically(&dir.join(RESULTS_FILE), &json)
    }
}

/// Reads a JSON-lines file of `T` (missing file: empty; a FIFO or other non-regular file is
/// refused, not read); damaged lines are skipped.
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let Some(bytes) = crate::input::read_if_present(path, "log")? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&bytes);
    // Auxiliary logs: a line cut off by a kill is skipped wherever it is.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Values as JSON lines.
pub fn json_lines<T: Serialize>(values: &[T]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for v in values {
        serde_json::to_writer(&mut bytes, v).context("serialising a record")?;
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// Replaces the auxiliary log `path` with `values`, atomically; without values, removes it.
pub fn replace_lines<T: Serialize>(path: &Path, values: &[T]) -> Result<()> {
    if values.is_empty() {
        return crate::io::remove_file(path);
    }
    crate::io::write_bytes_atomically(path, &json_lines(values)?)
}

/// Appends one JSON line (flushed and synced).
pub fn append_line<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let line = serde_json::to_vec(value).context("serialising a record")?;
    crate::io::append_line(path, &line)
}
