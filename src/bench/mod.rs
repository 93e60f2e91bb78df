//! Batch benchmark runs (design §6): answer every question of a VQA set, log each answer to
//! `samples.jsonl` as soon as it is given, and write `results.json` plus a Markdown/HTML report.
//!
//! ```text
//! OUT/bench_config.json  what the run is (model, particles, data files by SHA-256, settings)
//! OUT/samples.jsonl      one line per answered question (design §10), appended and flushed
//! OUT/runs.jsonl         one line per invocation (time, answers, peak memory), from its start
//! OUT/skipped.jsonl      questions that could not be answered with --skip-bad
//! OUT/bad_records.jsonl  data records --skip-bad left out while reading, with why
//! OUT/results.json       metric name → value, details, progress, timing, config
//! OUT/report.md, report.html, reliability.svg, risk_coverage.svg
//! OUT/submission.json    the test answers in EvalAI's upload format ([`submission`])
//! ```
//!
//! Restarting [`run`] with the same `out` continues: answered questions are skipped, a damaged last
//! line of `samples.jsonl` is dropped and answered again, nothing is duplicated. A different
//! model, particle set, data file or setting is refused (only `--limit` may change); a data file
//! that changed only in questions the run has not answered (records `--skip-bad` left out and then
//! fixed, questions added) is continued, its answers renumbered to their new positions. Every
//! invocation is in `runs.jsonl`, one that was killed too: its line is written when it starts
//! (`"finished": false`) and replaced by the final one at its end ([`results::RunLog`]). With a
//! [`Shard`] a run answers one deterministic slice; [`merge()`] combines the shard directories into
//! the directory a single run would have written.

pub mod bootstrap;
pub mod calibrate;
pub mod cli;
pub mod compare;
pub mod config;
pub mod kept_answers;
pub mod merge;
pub mod results;
pub mod samples;
pub mod submission;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::console::Progress;
use anyhow::{bail, Context, Result};

use crate::answer::generate::Sampling;
use crate::answer::{AskOptions, BellaVqa, Question, UNCALIBRATED_THRESHOLD};
use crate::bella::particles::hash_weights;
use crate::data::{read_dataset_up_to, BadRecord, ReadOptions, VqaExample};
use crate::metrics::NormalizeMode;
use crate::models::image::{decode_image, read_image_file, MAX_IMAGE_PIXELS};

pub use bootstrap::Bootstrap;
pub use calibrate::{
    calibrate, store_abstention, CalibrateOptions, CalibrationOutcome, Guarantee,
    ImageCheckRequest, ImageFlagged, Objective, SelectorChoice, MAX_ABSTENTION_HISTORY,
};
pub use compare::{compare, CompareEntry, Comparison};
pub use config::{DataRecord, Role, RunConfig, Shard};
pub use merge::merge;
pub use results::{ResultsFile, RunRecord, SkippedQuestion};
pub use samples::{read_samples, Sample, SampleFile, SAMPLES_FILE};

/// Where a Ctrl-C stops a run while it answers ([`crate::interrupt`]'s message).
pub const STOPS_WHILE_ANSWERING: &str = "at the model's next layer; every finished answer is kept \
     (the question in progress is answered again by the same command)";

/// The files a run keeps in its output directory as it goes (the module's page).
pub const RECORD_FILES: [&str; 5] = [
    config::CONFIG_FILE,
    SAMPLES_FILE,
    results::RUNS_FILE,
    results::SKIPPED_FILE,
    results::BAD_RECORDS_FILE,
];

/// The files a run writes into its output directory at its end, from its answers.
pub const RESULT_FILES: [&str; 6] = [
    results::RESULTS_FILE,
    crate::report::REPORT_MD,
    crate::report::REPORT_HTML,
    crate::report::RELIABILITY_SVG,
    crate::report::RISK_COVERAGE_SVG,
    submission::SUBMISSION_FILE,
];

/// A data file and, for VQAv2, its annotations and image folder.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataInput {
    pub path: PathBuf,
    /// VQAv2: the annotations JSON.
    pub annotations: Option<PathBuf>,
    /// The image folder (JSON formats; JSONL: replaces the file's folder).
    pub images: Option<PathBuf>,
}

impl DataInput {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }
}

/// The model as the user named it (recorded in the configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// As given to `--model`.
    pub source: String,
    /// The particle directory, if any.
    pub adapters: Option<PathBuf>,
    /// CLIP: the `--answers` file, if any.
    pub answers_file: Option<PathBuf>,
}

/// Settings of a benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub data: DataInput,
    /// Validation questions: thresholds for Φ_c and target risks are chosen on them.
    pub val: Option<DataInput>,
    /// Out-of-distribution files, each detected against `data`.
    pub ood: Vec<DataInput>,
    pub out: PathBuf,
    /// Only the first `limit` questions of every file.
    pub limit: Option<usize>,
    pub shard: Option<Shard>,
    pub normalize: NormalizeMode,
    /// Skip bad records and unreadable images (listed in the results) instead of stopping.
    pub skip_bad: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Abstain below this selector score instead of the particles' calibrated threshold.
    pub threshold: Option<f64>,
    pub max_new_tokens: usize,
    /// A question whose prompt leaves less room in the model's positions than
    /// `max_new_tokens` gets an answer as long as the room, as `ask` without
    /// `--max-new-tokens` answers it (false: it cannot be answered, as when the limit was asked
    /// for).
    pub answer_within_room: bool,
    /// Bootstrap intervals of the metrics (0 resamples: none).
    pub bootstrap: Bootstrap,
}

impl BenchOptions {
    pub fn new(data: DataInput, out: impl Into<PathBuf>) -> Self {
        Self {
            data,
            val: None,
            ood: Vec::new(),
            out: out.into(),
            limit: None,
            shard: None,
            normalize: NormalizeMode::default(),
            skip_bad: false,
            progress: false,
            threshold: None,
            max_new_tokens: AskOptions::default().max_new_tokens,
            answer_within_room: true,
            bootstrap: Bootstrap::default(),
        }
    }
}

/// What a finished [`run`] did.
#[derive(Debug)]
pub struct BenchOutcome {
    pub results: ResultsFile,
    /// Answered by this invocation.
    pub answered_now: usize,
    /// Already answered before it (resumed).
    pub resumed: usize,
    /// A damaged last line of `samples.jsonl` was dropped.
    pub dropped_damaged_line: bool,
    /// Files written.
    pub written: Vec<PathBuf>,
}

/// One data file's questions.
pub(crate) struct EvalSet {
    pub record: DataRecord,
    pub examples: Vec<VqaExample>,
    pub skipped: Vec<BadRecord>,
}

pub(crate) fn read_set(
    input: &DataInput,
    split: &str,
    role: Role,
    limit: Option<usize>,
    skip_bad: bool,
) -> Result<EvalSet> {
    if !input.path.exists() {
        bail!("data file {} does not exist", input.path.display());
    }
    let opts = ReadOptions {
        skip_bad,
        check_images: false,
    };
    let ds = read_dataset_up_to(
        &input.path,
        input.annotations.as_deref(),
        input.images.as_deref(),
        &opts,
        limit,
    )?
    .require_questions()?;
    // The rows a Parquet read left unread past the limit count as questions of the file, so that
    // the record tells a part of the file from the whole (no submission file for a part), whatever
    // the limit.
    let questions = ds.examples.len() + ds.unread;
    let selected = limit.map_or(questions, |l| l.min(ds.examples.len()));
    let record = DataRecord {
        split: split.to_string(),
        role,
        path: crate::io::stored_path(&input.path),
        format: ds.format,
        sha256: data_sha256(&input.path)?,
        annotations: input.annotations.as_deref().map(crate::io::stored_path),
        annotations_sha256: match &input.annotations {
            Some(a) => Some(crate::io::sha256_file(a)?),
            None => None,
        },
        questions,
        skipped_records: ds.skipped.len(),
        selected,
        training_questions: None,
    };
    Ok(EvalSet {
        record,
        examples: ds.examples,
        skipped: ds.skipped,
    })
}

/// The sha256 of a data file; of a folder of Parquet shards, the sha256 of the list of its
/// shards' names and hashes (a shard changed, added or removed changes it).
fn data_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::io::sha256_file(path);
    }
    let mut list = String::new();
    for shard in crate::data::parquet::shards(path)? {
        let name = shard.file_name().map(|n| n.to_string_lossy().into_owned());
        list += &format!(
            "{}  {}\n",
            crate::io::sha256_file(&shard)?,
            name.unwrap_or_default()
        );
    }
    Ok(crate::io::sha256_bytes(list.as_bytes()))
}

/// The split names of the OOD files: their file stems, made unique.
fn ood_names(ood: &[DataInput]) -> Result<Vec<String>> {
    for (i, d) in ood.iter().enumerate() {
        if ood[..i].iter().any(|o| o.path == d.path) {
            bail!(
                "--ood-data names {} twice: give each out-of-distribution file once",
                d.path.display()
            );
        }
    }
    let mut taken: HashSet<String> = ["test", "val"].iter().map(|s| s.to_string()).collect();
    Ok(ood
        .iter()
        .map(|d| {
            let stem = d
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "ood".into());
            let mut name = if taken.contains(&stem) {
                format!("ood-{stem}")
            } else {
                stem
            };
            let base = name.clone();
            let mut k = 2;
            while taken.contains(&name) {
                name = format!("{base}-{k}");
                k += 1;
            }
            taken.insert(name.clone());
            name
        })
        .collect())
}

pub(crate) fn read_sets(opts: &BenchOptions) -> Result<Vec<EvalSet>> {
    let mut sets = vec![read_set(
        &opts.data,
        "test",
        Role::Test,
        opts.limit,
        opts.skip_bad,
    )?];
    if let Some(v) = &opts.val {
        let val = read_set(v, "val", Role::Val, opts.limit, opts.skip_bad)?;
        if val.examples.iter().all(|e| e.answers.is_empty()) {
            bail!(
                "--val {} has no human answers: the thresholds are chosen on validation answers; \
                 give a validation set with answers, or leave --val out",
                v.path.display()
            );
        }
        sets.push(val);
    }
    for (d, name) in opts.ood.iter().zip(ood_names(&opts.ood)?) {
        sets.push(read_set(d, &name, Role::Ood, opts.limit, opts.skip_bad)?);
    }
    Ok(sets)
}

/// The configuration of a run of `vqa` with `opts`.
pub(crate) fn run_config(
    vqa: &BellaVqa,
    model: &ModelSpec,
    opts: &BenchOptions,
    sets: &[EvalSet],
) -> Result<RunConfig> {
    let loaded = vqa.model();
    let adapters = match &model.adapters {
        Some(dir) => Some(config::AdaptersRecord::read(dir)?),
        None => None,
    };
    let (threshold, threshold_from) = match (
        opts.threshold,
        adapters.as_ref().and_then(|a| a.abstention.as_ref()),
    ) {
        (Some(t), _) => (t, "--threshold".to_string()),
        (None, Some(a)) => (a.threshold, format!("calibration ({})", a.objective)),
        (None, None) => (UNCALIBRATED_THRESHOLD, "default, uncalibrated".to_string()),
    };
    // A stored threshold passed ParticleConfig::validate when the particles were read.
    if let Some(t) = opts.threshold {
        crate::answer::check_given_threshold(t)?;
    }
    Ok(RunConfig {
        model: config::ModelRecord {
            source: model.source.clone(),
            commit: match &loaded.files.origin {
                crate::hub::Origin::HubCache { commit, .. } => Some(commit.clone()),
                crate::hub::Origin::Directory => None,
            },
            architecture: loaded.info.architecture.to_string(),
            weights: hash_weights(&loaded.files)?,
            quantization: loaded
                .info
                .quantization
                .as_ref()
                .map(|q| config::quantization_name(&q.kind, q.vision)),
            compute_dtype: loaded.info.compute_dtype.as_str().to_string(),
        },
        data: data_records(sets, model.adapters.as_deref())?,
        adapters,
        normalize: opts.normalize,
        threshold,
        threshold_from,
        max_new_tokens: opts.max_new_tokens,
        answers_within_room: Some(opts.answer_within_room),
        answers_file_sha256: match &model.answers_file {
            Some(p) => Some(crate::io::sha256_file(p)?),
            None => None,
        },
        decoding: "greedy".into(),
        limit: opts.limit,
        shard: opts.shard,
        bella_vqa_version: env!("CARGO_PKG_VERSION").into(),
        created: config::utc_timestamp(),
    })
}

/// The records of the data files, each with the count of its selected questions that are
/// training questions of the particles (a warning when there are any).
fn data_records(sets: &[EvalSet], adapters: Option<&Path>) -> Result<Vec<DataRecord>> {
    let keys = match adapters {
        Some(dir) => crate::data::seen::read(dir)?,
        None => None,
    };
    let mut records = Vec::with_capacity(sets.len());
    for set in sets {
        let mut record = set.record.clone();
        if let Some(keys) = &keys {
            let seen = crate::data::seen::count(keys, &set.examples[..record.selected]);
            if seen > 0 {
                crate::note!(
                    "warning: {}: {}",
                    record.split,
                    crate::data::seen::warning(seen, record.selected, "questions")
                );
            }
            record.training_questions = Some(seen);
        }
        records.push(record);
    }
    Ok(records)
}

/// Writes the configuration, or checks it against the one already in `out` (a restart). A
/// restart whose data files changed only in questions it has not answered (bad records fixed,
/// questions added) continues with the answers it has: see [`renumber_answers`].
fn check_or_write_config(
    out: &Path,
    config: &mut RunConfig,
    sets: &[EvalSet],
    progress: bool,
) -> Result<()> {
    let path = out.join(config::CONFIG_FILE);
    let samples = out.join(SAMPLES_FILE);
    if !path.exists() && samples.metadata().is_ok_and(|m| m.len() > 0) {
        bail!(
            "{} holds answers ({}) but no {} saying how they were made, so they cannot be \
             continued: use another --out, or delete the directory to start over",
            out.display(),
            samples.display(),
            config::CONFIG_FILE
        );
    }
    if path.exists() {
        let old = RunConfig::read(out)?.with_unrecorded_from(config);
        let diffs = old.differences(config, true, false);
        if !diffs.is_empty() && !only_data_changed(&old, config) {
            // Runs begun before `always` became the default continue with the option.
            let hint = if old.normalize != config.normalize {
                format!(
                    "; to continue it, pass --normalize {} as it was begun with",
                    crate::report::normalize_name(old.normalize)
                )
            } else {
                String::new()
            };
            bail!(
                "{} holds a different benchmark run, so it cannot be continued:\n  {}\nuse \
                 another --out, or delete the directory to start over{hint}",
                out.display(),
                first_differences(diffs)
            );
        }
        if let Some(limit) = config.limit.filter(|&n| old.limit.is_none_or(|l| n < l)) {
            refuse_answers_past(limit, out, config, sets)?;
        }
        if !diffs.is_empty() {
            let kept = renumber_answers(out, sets, config.shard)?;
            // The same files with another --limit: not a change of the data.
            let same_files = old.data.len() == config.data.len()
                && old.data.iter().zip(&config.data).all(|(a, b)| {
                    a.sha256 == b.sha256 && a.annotations_sha256 == b.annotations_sha256
                });
            let what = match same_files {
                true => "the questions it takes changed (--limit)",
                false => "the data changed",
            };
            if progress {
                crate::note!(
                    "{}: {what} since the run began; its {kept} answers are to questions that \
                     did not change, so they are kept and the rest is answered now",
                    out.display()
                );
            }
        }
        config.created = old.created;
    }
    config.write(out)
}

/// Refuses to continue the run in `out` with a smaller `limit` when it has answered questions past
/// it: they would stay in samples.jsonl beside the results of fewer.
fn refuse_answers_past(
    limit: usize,
    out: &Path,
    config: &RunConfig,
    sets: &[EvalSet],
) -> Result<()> {
    let selected: HashSet<(&str, usize)> = sets
        .iter()
        .flat_map(|set| {
            config
                .selection(&set.record)
                .map(move |k| (set.record.split.as_str(), k))
        })
        .collect();
    let beyond = read_samples(&out.join(SAMPLES_FILE))?
        .samples
        .iter()
        .filter(|s| !selected.contains(&(s.split.as_str(), s.index)))
        .count();
    if beyond > 0 {
        bail!(
            "{} holds answers to {beyond} question(s) past --limit {limit}: it is a run of more \
             questions; give its --limit (or none) to continue it, or another --out for fewer",
            out.display()
        );
    }
    Ok(())
}

/// Whether two runs differ only in what their data files hold, not in which files they are or
/// in anything else.
fn only_data_changed(old: &RunConfig, new: &RunConfig) -> bool {
    if old.data.len() != new.data.len() {
        return false;
    }
    let mut probe = new.clone();
    for (p, o) in probe.data.iter_mut().zip(&old.data) {
        p.sha256.clone_from(&o.sha256);
        p.annotations_sha256.clone_from(&o.annotations_sha256);
        p.questions = o.questions;
        p.skipped_records = o.skipped_records;
    }
    old.differences(&probe, true, false).is_empty()
}

/// Continues a run over data files that changed since it began (`--skip-bad` records fixed,
/// questions added or reordered): every answered question must still be in its file with the same
/// question, image, human answers and answer type, or the run is refused naming the first that is
/// not. The answers (and the questions skipped as unanswerable) are renumbered to their questions'
/// new positions, `samples.jsonl` first, each file replaced atomically, so that a kill in between
/// is continued the same way. Returns how many answers were kept.
fn renumber_answers(out: &Path, sets: &[EvalSet], shard: Option<Shard>) -> Result<usize> {
    let positions: HashMap<(&str, &str), (usize, &VqaExample)> = sets
        .iter()
        .flat_map(|s| {
            s.examples
                .iter()
                .enumerate()
                .map(move |(k, e)| ((s.record.split.as_str(), e.question_id.as_str()), (k, e)))
        })
        .collect();
    let samples_path = out.join(SAMPLES_FILE);
    let mut existing = read_samples(&samples_path)?;
    for s in &mut existing.samples {
        let found = positions.get(&(s.split.as_str(), s.question_id.as_str()));
        let problem = match found {
            None => Some("is no longer in it".to_string()),
            Some(&(k, e)) => {
                let changed: Vec<&str> = [
                    ("question", s.question != e.question),
                    ("image", s.image != crate::io::stored_path(&e.image)),
                    ("human answers", s.answers != e.answers),
                    ("answer type", s.answer_type != e.answer_type),
                ]
                .into_iter()
                .filter_map(|(what, differs)| differs.then_some(what))
                .collect();
                if !changed.is_empty() {
                    Some(format!("has another {}", changed.join(", ")))
                } else if shard.is_some_and(|sh| !sh.contains(k)) {
                    Some("moved to another shard's share of the questions".to_string())
                } else {
                    s.index = k;
                    None
                }
            }
        };
        if let Some(problem) = problem {
            let file = sets
                .iter()
                .find(|set| set.record.split == s.split)
                .map_or(s.split.clone(), |set| set.record.path.clone());
            bail!(
                "{} holds answers to {} questions that {file} does not match (the run was of \
                 another file, or this one changed since): question {:?}, answered then, \
                 {problem}; so the run cannot be continued: use another --out, or delete the \
                 directory to start over",
                out.display(),
                s.split,
                s.question_id
            );
        }
    }
    crate::io::write_bytes_atomically(&samples_path, &results::json_lines(&existing.samples)?)?;
    let skipped_path = out.join(results::SKIPPED_FILE);
    let renumbered: Vec<SkippedQuestion> = results::read_lines::<SkippedQuestion>(&skipped_path)?
        .into_iter()
        .filter_map(|mut q| {
            let &(k, _) = positions.get(&(q.split.as_str(), q.question_id.as_str()))?;
            q.index = k;
            Some(q)
        })
        .collect();
    results::replace_lines(&skipped_path, &renumbered)?;
    Ok(existing.samples.len())
}

/// The first differences, one a line: a recalibration differs in every element of the image
/// check's vectors, and the first few say what changed.
fn first_differences(mut diffs: Vec<String>) -> String {
    const SHOWN: usize = 8;
    if diffs.len() > SHOWN {
        let more = diffs.len() - SHOWN;
        diffs.truncate(SHOWN);
        diffs.push(format!("… and {more} more"));
    }
    diffs.join("\n  ")
}

/// Drops the answers whose image has changed since they were given (its file has another
/// SHA-256 now, or cannot be read), so that a continued run answers those questions again;
/// `samples.jsonl` is rewritten atomically without them, and the number is said. The images are
/// the data's as it is now (a moved data set is checked where it is); answers recorded without a
/// SHA-256 (older runs) are kept.
fn without_changed_images(
    mut existing: SampleFile,
    path: &Path,
    sets: &[EvalSet],
    progress: bool,
) -> Result<SampleFile> {
    let images: HashMap<(&str, usize), &Path> = sets
        .iter()
        .flat_map(|s| {
            s.examples
                .iter()
                .enumerate()
                .map(move |(k, e)| ((s.record.split.as_str(), k), e.image.as_path()))
        })
        .collect();
    let distinct: HashSet<&Path> = existing
        .samples
        .iter()
        .filter(|s| s.image_sha256.is_some())
        .filter_map(|s| images.get(&(s.split.as_str(), s.index)).copied())
        .collect();
    let pb = progress_bar(distinct.len(), progress && distinct.len() > 1000);
    pb.set_message("image checks");
    let mut now: HashMap<&Path, Option<String>> = HashMap::new();
    for image in distinct {
        now.insert(image, crate::io::sha256_file(image).ok());
        pb.inc(1);
    }
    pb.finish_and_clear();
    let changed = |s: &Sample| {
        let image = images.get(&(s.split.as_str(), s.index));
        match (image.and_then(|p| now.get(p)), &s.image_sha256) {
            (Some(current), Some(then)) => current.as_ref() != Some(then),
            _ => false,
        }
    };
    let stale: Vec<&Sample> = existing.samples.iter().filter(|s| changed(s)).collect();
    let Some(first) = stale.first() else {
        return Ok(existing);
    };
    if progress {
        crate::note!(
            "{} answer(s) were given for images that have changed since (the first: {} of \
             question {:?}): those questions are answered again",
            stale.len(),
            first.image,
            first.question_id
        );
    }
    let kept: Vec<Sample> = existing
        .samples
        .iter()
        .filter(|s| !changed(s))
        .cloned()
        .collect();
    existing.samples = kept;
    existing.rewrite(path)?;
    Ok(existing)
}

/// Questions whose every human answer normalises to nothing ("a", "."): with answers always
/// normalised they score 0 whatever the model says, which is said.
fn unscorable(set: &EvalSet, normalize: NormalizeMode) -> Option<String> {
    if normalize != NormalizeMode::Always {
        return None;
    }
    let empty: Vec<&str> = set
        .examples
        .iter()
        .filter(|e| {
            !e.answers.is_empty()
                && e.answers
                    .iter()
                    .all(|a| crate::data::normalize::normalize_answer(a).is_empty())
        })
        .map(|e| e.question_id.as_str())
        .collect();
    let first = empty.first()?;
    Some(format!(
        "{} question(s) of {} ({}) have only human answers that normalise to nothing (articles, \
         punctuation; the first: {first:?}): they score 0 whatever is answered",
        empty.len(),
        set.record.path,
        set.record.split
    ))
}

fn progress_bar(len: usize, show: bool) -> Progress {
    Progress::new(
        show,
        len as u64,
        0,
        "questions",
        "{msg:>16} [{bar:30}] {pos}/{len} · {rate} · ETA {eta} ({elapsed})",
    )
}

/// Bad records of a data file said one by one; the rest are counted (all are in
/// `bad_records.jsonl`).
const SHOWN_BAD_RECORDS: usize = 10;

/// Answers every question of the run that `out` does not hold yet, then writes the results and
/// the report. `model` names the model and particles that `vqa` was loaded from.
pub fn run(vqa: &BellaVqa, model: &ModelSpec, opts: &BenchOptions) -> Result<BenchOutcome> {
    // Each entry of a --compare starts after the one before computed its metrics.
    crate::interrupt::stops(STOPS_WHILE_ANSWERING);
    let started_at = config::utc_timestamp();
    let started = Instant::now();
    let sets = read_sets(opts)?;
    for s in &sets {
        if opts.progress {
            for bad in s.skipped.iter().take(SHOWN_BAD_RECORDS) {
                crate::note!("skipped bad record: {bad}");
            }
            if let Some(more) = s.skipped.len().checked_sub(SHOWN_BAD_RECORDS + 1) {
                crate::note!(
                    "skipped {} more bad record(s) of {} ({} lists them all)",
                    more + 1,
                    s.record.path,
                    results::BAD_RECORDS_FILE
                );
            }
        }
        // A warning on the results, not a status line: said under --quiet too.
        if let Some(note) = unscorable(s, opts.normalize) {
            crate::note!("warning: {note}");
        }
    }
    let mut config = run_config(vqa, model, opts, &sets)?;
    crate::io::create_dir_all(&opts.out)?;
    check_or_write_config(&opts.out, &mut config, &sets, opts.progress)?;
    // From here on this invocation is in runs.jsonl, killed or not.
    let mut runs = results::RunLog::start(
        &opts.out.join(results::RUNS_FILE),
        RunRecord::started(started_at.clone(), opts.shard),
    )?;
    // The records --skip-bad left out, with why: of the data as it is now.
    let bad: Vec<results::BadRecordLine> = sets
        .iter()
        .flat_map(|s| {
            s.skipped.iter().map(|b| results::BadRecordLine {
                split: s.record.split.clone(),
                file: crate::io::stored_path(&b.file),
                line: b.line,
                reason: b.reason.clone(),
            })
        })
        .collect();
    results::replace_lines(&opts.out.join(results::BAD_RECORDS_FILE), &bad)?;

    let samples_path = opts.out.join(SAMPLES_FILE);
    let existing = read_samples(&samples_path)?;
    if existing.dropped_last_line && opts.progress {
        crate::note!(
            "{}: dropped a damaged last line (an interrupted write); its question is answered again",
            samples_path.display()
        );
    }
    // A sample from another question under the same position means the data changed.
    let ids: HashMap<(&str, usize), &str> = sets
        .iter()
        .flat_map(|s| {
            s.examples
                .iter()
                .enumerate()
                .map(move |(k, e)| ((s.record.split.as_str(), k), e.question_id.as_str()))
        })
        .collect();
    for s in &existing.samples {
        if let Some(id) = ids.get(&(s.split.as_str(), s.index)) {
            if *id != s.question_id {
                bail!(
                    "{} answers question {:?} at position {} of {}, but the data file has {:?} \
                     there: the samples belong to other data",
                    samples_path.display(),
                    s.question_id,
                    s.index,
                    s.split,
                    id
                );
            }
        }
    }
    let mut existing = existing;
    let rescored = samples::rescore(
        &mut existing.samples,
        |split| {
            sets.iter()
                .find(|s| s.record.split == split)
                .map(|s| s.record.format.accuracy_rule())
        },
        config.normalize,
    );
    if rescored > 0 {
        existing.rewrite(&samples_path)?;
        if opts.progress {
            crate::note!("{}", samples::rescored_note(rescored, &samples_path));
        }
    }
    let existing = without_changed_images(existing, &samples_path, &sets, opts.progress)?;
    let done: HashSet<(String, usize)> = existing
        .samples
        .iter()
        .map(|s| (s.split.clone(), s.index))
        .collect();
    let mut todo: Vec<(&EvalSet, usize)> = Vec::new();
    for set in &sets {
        for k in config.selection(&set.record) {
            if !done.contains(&(set.record.split.clone(), k)) {
                todo.push((set, k));
            }
        }
    }

    let resumed = existing.samples.len();
    // Results and reports of the answers so far would read as this run's, finished, until it
    // finishes (or for good, if it is stopped): gone before a new answer is written.
    if !todo.is_empty() {
        for name in RESULT_FILES {
            crate::io::remove_file(&opts.out.join(name))?;
        }
    }
    let mut writer = samples::SampleWriter::open(&samples_path, existing.good_len)?;
    let skipped_path = opts.out.join(results::SKIPPED_FILE);
    let skipped_before: Vec<SkippedQuestion> = results::read_lines(&skipped_path)?;
    let ask = AskOptions {
        max_new_tokens: opts.max_new_tokens,
        sampling: Sampling::Greedy,
        // None: the particles' calibrated rule (`config.threshold` and their image check); a
        // --threshold replaces both, as in `ask`.
        threshold: opts.threshold,
    };
    // A question the model cannot take (too long for its positions, empty) would stop the run
    // when reached, maybe hours in: every one is found now, before the first answer.
    if !opts.skip_bad {
        use rayon::prelude::*;
        let unfit: Vec<String> = todo
            .par_iter()
            .filter_map(|(set, k)| {
                let example = &set.examples[*k];
                let why = fitted_options(vqa, &example.question, &ask, opts.answer_within_room)
                    .and_then(|options| vqa.check_question(&example.question, &options))
                    .err()?;
                Some(format!(
                    "question {:?} ({} of {}): {why:#}",
                    example.question_id, set.record.split, set.record.path
                ))
            })
            .collect();
        if let Some(first) = unfit.first() {
            bail!(
                "{} question(s) cannot be answered (first: {first}); fix them, or pass \
                 --skip-bad to skip them",
                unfit.len()
            );
        }
    }
    let pb = progress_bar(todo.len(), opts.progress);
    let answering = Instant::now();
    let mut answered_now = 0usize;
    let mut first_skip: Option<String> = None;
    // Answers fitted to the room their prompt left: how many, and the first.
    let mut limited = 0usize;
    let mut first_limited: Option<String> = None;
    // Questions not answered because of a Ctrl-C (crate::interrupt): it stops the question in
    // progress at the model's next layer (that question is answered again by the same command).
    let mut left: Option<usize> = None;
    let stop = || crate::interrupt::check().is_err();
    let mut answer_all = || -> Result<()> {
        for (i, (set, k)) in todo.iter().enumerate() {
            if crate::interrupt::requested() {
                left = Some(todo.len() - i);
                break;
            }
            let example = &set.examples[*k];
            pb.set_message(crate::console::on_terminal(&set.record.split).into_owned());
            let options = fitted_options(vqa, &example.question, &ask, opts.answer_within_room);
            let answer_limit = options
                .as_ref()
                .ok()
                .map(|o| o.max_new_tokens)
                .filter(|&m| m < ask.max_new_tokens);
            if let Some(limit) = answer_limit {
                limited += 1;
                first_limited.get_or_insert_with(|| {
                    format!(
                        "question {:?} of {}: {limit} answer token(s)",
                        example.question_id, set.record.path
                    )
                });
            }
            let answer = options.and_then(|options| {
                let bytes = read_image_file(&example.image)?;
                let name = example.image.display().to_string();
                let image = decode_image(&bytes, &name, MAX_IMAGE_PIXELS)?;
                let question = Question {
                    image: &image,
                    text: &example.question,
                    options: &options,
                };
                let response = vqa
                    .ask_batch_until(&[question], &stop)
                    .pop()
                    .context("no response for the question")??;
                Ok((crate::io::sha256_bytes(&bytes), response))
            });
            let (image_sha256, response) = match answer {
                Ok(r) => r,
                Err(e) if e.is::<crate::cancel::Cancelled>() => {
                    left = Some(todo.len() - i);
                    break;
                }
                Err(e) => {
                    let reason = format!(
                        "cannot answer question {:?} ({} of {}): {e:#}",
                        example.question_id, set.record.split, set.record.path
                    );
                    if !opts.skip_bad {
                        bail!("{reason} (--skip-bad skips such questions)");
                    }
                    pb.suspend(|| crate::note!("skipped: {reason}"));
                    first_skip.get_or_insert_with(|| reason.clone());
                    let skip = SkippedQuestion {
                        split: set.record.split.clone(),
                        question_id: example.question_id.clone(),
                        index: *k,
                        reason,
                    };
                    // A continued run tries it again: recorded once.
                    if !skipped_before.contains(&skip) {
                        results::append_line(&skipped_path, &skip)?;
                    }
                    pb.inc(1);
                    continue;
                }
            };
            let sample = Sample {
                image_sha256: Some(image_sha256),
                answer_limit,
                ..Sample::new(
                    example,
                    &set.record.split,
                    set.record.role == Role::Ood,
                    *k,
                    response,
                    config.normalize,
                    set.record.format.accuracy_rule(),
                )
            };
            writer.append(&sample)?;
            answered_now += 1;
            pb.inc(1);
        }
        writer.sync()
    };
    let outcome = answer_all();
    pb.finish_and_clear();
    if let (Some(first), true) = (&first_limited, opts.progress) {
        crate::note!(
            "{limited} question(s) left less room in the model's positions than the default \
             --max-new-tokens ({}): their answers were limited to the room, as ask and serve \
             limit them (first: {first})",
            opts.max_new_tokens
        );
    }
    let answering_seconds = answering.elapsed().as_secs_f64();
    let record = RunRecord {
        started: started_at,
        pid: Some(std::process::id()),
        finished: true,
        wall_seconds: started.elapsed().as_secs_f64(),
        answering_seconds,
        answered: answered_now,
        peak_memory_kib: config::peak_memory_kib(),
        shard: opts.shard,
        failed: outcome.is_err(),
        interrupted: left.is_some(),
    };
    let logged = runs.finish(&record);
    outcome?;
    logged?;
    // A Ctrl-C between questions, or after the last one (before the bootstrap, which takes a
    // while for many questions): every answer is kept, the same command goes on from them.
    if crate::interrupt::requested() {
        let at = match left {
            Some(left) => format!("with {left} question(s) to go"),
            None => "before the results were computed, every question answered".into(),
        };
        return Err(crate::interrupt::Interrupted(format!(
            "interrupted {at}; the {} answer(s) so far are in {}: the same command continues",
            resumed + answered_now,
            samples_path.display()
        ))
        .into());
    }
    crate::interrupt::stops("the metrics in progress; every answer is kept");
    // --skip-bad is for a few bad questions: a run where every one failed has measured nothing
    // (an option that no question can meet, a wrong image folder).
    if let (0, 0, Some(reason)) = (resumed, answered_now, &first_skip) {
        bail!(
            "no question could be answered: all {} were skipped (see {}); the first: {reason}",
            todo.len(),
            skipped_path.display()
        );
    }

    if opts.progress && opts.bootstrap.resamples > 0 {
        crate::note!(
            "computing the metrics and their bootstrap intervals ({} resamples)",
            opts.bootstrap.resamples
        );
    }
    let finalized = finalize(&opts.out, &opts.bootstrap);
    if let Err(e) = &finalized {
        if e.is::<crate::interrupt::Interrupted>() {
            // Stopped in its metrics (the bootstrap): the line says so.
            runs.finish(&RunRecord {
                interrupted: true,
                ..record
            })?;
        }
    }
    let (results, written) = finalized?;
    Ok(BenchOutcome {
        results,
        answered_now,
        resumed,
        dropped_damaged_line: existing.dropped_last_line,
        written,
    })
}

/// `ask` for `question`: with `within_room`, its answer limited to the room the prompt leaves in
/// the model's positions, as `ask` and `serve` limit it (a prompt that leaves none keeps the
/// limit, and [`BellaVqa::check_question`] says so).
pub(crate) fn fitted_options(
    vqa: &BellaVqa,
    question: &str,
    ask: &AskOptions,
    within_room: bool,
) -> Result<AskOptions> {
    if !within_room {
        return Ok(ask.clone());
    }
    let text = crate::models::prompt::visible_question(question).unwrap_or(question);
    Ok(AskOptions {
        max_new_tokens: vqa.fitted_max_new_tokens(text, ask.max_new_tokens)?,
        ..ask.clone()
    })
}

/// Computes the results of the directory `dir` from its configuration, samples, skipped
/// questions and invocation log (with `bootstrap` intervals), and writes `results.json` and the
/// report.
pub fn finalize(dir: &Path, bootstrap: &Bootstrap) -> Result<(ResultsFile, Vec<PathBuf>)> {
    let config = RunConfig::read(dir)?;
    let samples = read_samples(&dir.join(SAMPLES_FILE))?.samples;
    let skipped_path = dir.join(results::SKIPPED_FILE);
    let mut skipped: Vec<SkippedQuestion> = results::read_lines(&skipped_path)?;
    // A question a later invocation answered (its image fixed, say) is no longer skipped.
    let answered: HashSet<(&str, usize)> = samples
        .iter()
        .map(|s| (s.split.as_str(), s.index))
        .collect();
    let listed = skipped.len();
    skipped.retain(|q| !answered.contains(&(q.split.as_str(), q.index)));
    if skipped.len() < listed {
        results::replace_lines(&skipped_path, &skipped)?;
    }
    let runs: Vec<RunRecord> = results::read_lines(&dir.join(results::RUNS_FILE))?;
    let mut results = results::compute(&config, &samples, &skipped, &runs, bootstrap)?;
    // A test set without answers is run for its submission: say when there is none.
    if results.summary.is_none() {
        if let Err(why) = submission::status(&config, &samples) {
            results
                .notes
                .push(format!("{}{why}", submission::NOT_WRITTEN));
        }
    }
    results.write(dir)?;
    // The oracle's risk–coverage curve (questions by accuracy, best first; its area is the
    // optimal AURC), for the plot only.
    let mut acc = results::test_accuracies(&config, &samples, &skipped);
    acc.sort_by(|a, b| b.total_cmp(a));
    let mut correct = 0.0;
    let oracle: Option<Vec<(f64, f64)>> = results.summary.as_ref().map(|_| {
        acc.iter()
            .enumerate()
            .map(|(k, a)| {
                correct += a;
                (
                    (k + 1) as f64 / acc.len() as f64,
                    1.0 - correct / (k + 1) as f64,
                )
            })
            .collect()
    });
    let mut written = vec![dir.join(results::RESULTS_FILE)];
    written.extend(submission::write(dir, &config, &samples)?);
    written.extend(crate::report::write_report(
        dir,
        &results,
        oracle.as_deref(),
    )?);
    Ok((results, written))
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_lists_of_differences_are_cut_after_the_first_few() {
        let diffs = |n: usize| (0..n).map(|i| format!("d{i}")).collect::<Vec<_>>();
        assert_eq!(super::first_differences(diffs(2)), "d0\n  d1");
        let cut = super::first_differences(diffs(268));
        assert_eq!(cut.lines().count(), 9);
        assert!(
            cut.starts_with("d0\n") && cut.ends_with("… and 260 more"),
            "{cut}"
        );
    }
}
