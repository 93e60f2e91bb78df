//! The per-question log `samples.jsonl` (design §10): one JSON object per answered question,
//! appended and flushed as soon as the question is answered, so an interrupted run keeps every
//! finished answer.
//!
//! Reading tolerates a damaged last line (a kill in the middle of a write) and drops it; any other
//! bad line, and a question that appears twice, is an error that names the file and the line.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::answer::aggregate::Uncertainty;
use crate::answer::candidates::ParticleAnswer;
use crate::answer::image_check::{gated_score, ImageVerdict};
use crate::answer::{CandidateAnswer, Response};
use crate::data::VqaExample;
use crate::io::AppendFile;
use crate::metrics::{AccuracyRule, NormalizeMode, Prediction};

/// The file name of the per-question log.
pub const SAMPLES_FILE: &str = "samples.jsonl";

/// The keys [`Sample`] writes itself. An input's extra field with one of these names is passed
/// through as `input_{name}` when its value differs (and dropped when it is the same).
pub const SAMPLE_FIELDS: [&str; 23] = [
    "accuracy_rule",
    "question_id",
    "split",
    "is_ood",
    "index",
    "question",
    "image",
    "image_sha256",
    "answers",
    "answer_type",
    "answer",
    "confidence",
    "selector",
    "score",
    "abstained",
    "image_check",
    "accuracy",
    "uncertainty",
    "vote_share",
    "particles",
    "candidates",
    "candidates_left_out",
    "response",
];

/// One answered question: one line of `samples.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub question_id: String,
    /// The data file the question came from: `test` (`--data`), `val` (`--val`) or the name of an
    /// `--ood-data` file (its file stem).
    pub split: String,
    /// True for questions of an `--ood-data` file.
    pub is_ood: bool,
    /// Position of the question in its data file (after bad records were skipped).
    pub index: usize,
    pub question: String,
    /// The image file, as the reader resolved it, absolute (`crate::io::stored_path`).
    pub image: String,
    /// SHA-256 of the image file's bytes as answered: a continued run answers again a question
    /// whose image has changed since (absent in older samples: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// The human answers.
    pub answers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_type: Option<String>,
    /// The model's most likely answer (also when it abstained).
    pub answer: String,
    pub confidence: f64,
    /// The abstention selector (samples written before selectors: `confidence`).
    #[serde(default = "confidence_selector")]
    pub selector: String,
    /// The selector's score, compared with the threshold (absent in older samples: the
    /// confidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    pub abstained: bool,
    /// The image check's verdict, when the particles carry one (abstained when not familiar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_check: Option<ImageVerdict>,
    /// Accuracy of `answer` against `answers` as if it had been given, by `accuracy_rule`
    /// (normalisation as the run's `normalize` says); `null` for a question without human
    /// answers (a test-dev set).
    pub accuracy: Option<f64>,
    /// The data set's accuracy rule (left out for the VQA rule).
    #[serde(default, skip_serializing_if = "AccuracyRule::is_vqa")]
    pub accuracy_rule: AccuracyRule,
    pub uncertainty: Uncertainty,
    /// Fraction of particles whose own answer is `answer`.
    pub vote_share: f64,
    /// Every particle's own answer.
    pub particles: Vec<ParticleAnswer>,
    /// The candidates with their model-averaged probabilities, most likely first: the first
    /// [`SAMPLE_CANDIDATES`] (a CLIP's answer list can hold tens of thousands, 1.4 MB a line).
    pub candidates: Vec<CandidateAnswer>,
    /// The candidates left out of `candidates`, and their probability together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates_left_out: Option<LeftOut>,
    /// The answer's token limit where the prompt left less room in the model's positions than
    /// the run's `max_new_tokens` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_limit: Option<usize>,
    /// The rendered response text.
    pub response: String,
    /// The input record's extra fields, passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The most candidates a sample keeps ([`Sample::candidates`]).
pub const SAMPLE_CANDIDATES: usize = 100;

/// Candidates a sample leaves out: how many, and their probability together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeftOut {
    pub count: usize,
    pub probability: f64,
}

impl Sample {
    /// The sample of `example` answered with `response` (without its image's SHA-256).
    pub fn new(
        example: &VqaExample,
        split: &str,
        is_ood: bool,
        index: usize,
        response: Response,
        mode: NormalizeMode,
        rule: AccuracyRule,
    ) -> Self {
        let mut extra = Map::new();
        for (k, v) in &example.extra {
            if SAMPLE_FIELDS.contains(&k.as_str()) {
                let ours = match k.as_str() {
                    "split" => Some(Value::from(split)),
                    "is_ood" => Some(Value::from(is_ood)),
                    _ => None,
                };
                if ours.as_ref() != Some(v) {
                    extra.insert(format!("input_{k}"), v.clone());
                }
            } else {
                extra.insert(k.clone(), v.clone());
            }
        }
        Sample {
            question_id: example.question_id.clone(),
            split: split.to_string(),
            is_ood,
            index,
            question: example.question.clone(),
            image: crate::io::stored_path(&example.image),
            image_sha256: None,
            answers: example.answers.clone(),
            answer_type: example.answer_type.clone(),
            accuracy: (!example.answers.is_empty())
                .then(|| rule.accuracy(&response.answer, &example.answers, mode)),
            accuracy_rule: rule,
            answer: response.answer,
            confidence: response.confidence,
            selector: response.selector,
            score: Some(response.score),
            abstained: response.abstained,
            image_check: response.image_check,
            uncertainty: response.uncertainty,
            vote_share: response.vote_share,
            particles: response.particles,
            candidates_left_out: (response.candidates.len() > SAMPLE_CANDIDATES).then(|| {
                let rest = &response.candidates[SAMPLE_CANDIDATES..];
                LeftOut {
                    count: rest.len(),
                    probability: rest.iter().map(|c| c.probability).sum(),
                }
            }),
            candidates: response
                .candidates
                .into_iter()
                .take(SAMPLE_CANDIDATES)
                .collect(),
            answer_limit: None,
            response: response.response,
            extra,
        }
    }

    /// The key that identifies a question within a run.
    pub fn key(&self) -> (String, String) {
        (self.split.clone(), self.question_id.clone())
    }

    /// The selector's score as selective prediction ranks it, as the decision treats it: a
    /// flagged image below all (`None` in samples written before selectors).
    fn gated_score(&self) -> Option<f64> {
        self.score
            .map(|s| gated_score(s, self.image_check.as_ref()))
    }

    /// The score selective prediction ranks by ([`Prediction::selection_score`]).
    pub fn selection_score(&self) -> f64 {
        self.gated_score().unwrap_or(self.confidence)
    }

    /// The sample as a [`Prediction`] for [`crate::metrics`], its stored accuracy taken as
    /// computed under `mode`, the run's normalisation (a run is continued only under it).
    pub fn prediction(&self, mode: NormalizeMode) -> Prediction {
        Prediction {
            answer: self.answer.clone(),
            confidence: self.confidence,
            human_answers: self.answers.clone(),
            answer_type: self.answer_type.clone(),
            is_ood: Some(self.is_ood),
            abstained: self.abstained,
            uncertainty: None,
            distribution: None,
            target: None,
            score: self.gated_score(),
            rule: self.accuracy_rule,
            known_accuracy: self.accuracy.map(|a| (mode, a)),
        }
    }
}

/// Scores again every sample scored by another accuracy rule than its split's (`rule_of`;
/// samples written before A-OKVQA's own rule was applied carry none and were scored by the VQA
/// rule), under the run's normalisation; how many.
pub fn rescore(
    samples: &mut [Sample],
    rule_of: impl Fn(&str) -> Option<AccuracyRule>,
    mode: NormalizeMode,
) -> usize {
    let mut rescored = 0;
    for s in samples {
        let Some(rule) = rule_of(&s.split).filter(|r| *r != s.accuracy_rule) else {
            continue;
        };
        s.accuracy_rule = rule;
        s.accuracy = (!s.answers.is_empty()).then(|| rule.accuracy(&s.answer, &s.answers, mode));
        rescored += 1;
    }
    rescored
}

/// What [`rescore`] says it did.
pub fn rescored_note(count: usize, path: &Path) -> String {
    format!(
        "{count} answer(s) in {} were scored by the VQA rule (an older bella-vqa): scored again \
         by their data's rule (A-OKVQA's direct-answer accuracy)",
        path.display()
    )
}

fn confidence_selector() -> String {
    "confidence".into()
}

/// What [`read_samples`] found.
#[derive(Debug, Default)]
pub struct SampleFile {
    pub samples: Vec<Sample>,
    /// Length in bytes of the good part of the file (everything before a damaged last line).
    pub good_len: u64,
    /// A damaged last line was dropped (its question will be answered again).
    pub dropped_last_line: bool,
}

impl SampleFile {
    /// Replaces the file at `path` (atomically) with these samples, whole.
    pub fn rewrite(&mut self, path: &Path) -> Result<()> {
        write_samples(path, &self.samples)?;
        self.good_len = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        Ok(())
    }
}

/// Reads a `samples.jsonl`; a missing file is an empty log. A damaged last line (cut off by a
/// kill, or not valid JSON) is dropped; a bad line before it, or a question repeated, is an
/// error naming the file and the line.
pub fn read_samples(path: &Path) -> Result<SampleFile> {
    let Some(bytes) = crate::input::read_if_present(path, "answers file")? else {
        return Ok(SampleFile::default());
    };
    let mut out = SampleFile::default();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut start = 0usize;
    let mut line_no = 0usize;
    while start < bytes.len() {
        line_no += 1;
        let (end, terminated) = match bytes[start..].iter().position(|&b| b == b'\n') {
            Some(i) => (start + i, true),
            None => (bytes.len(), false),
        };
        let is_last = !terminated || end + 1 >= bytes.len();
        let text = &bytes[start..end];
        let next = if terminated { end + 1 } else { end };
        if text.iter().all(u8::is_ascii_whitespace) {
            if terminated {
                out.good_len = next as u64;
            }
            start = next;
            continue;
        }
        let parsed: std::result::Result<Sample, String> = if terminated {
            serde_json::from_slice(text).map_err(|e| e.to_string())
        } else {
            Err("the line was cut off (no line end)".into())
        };
        match parsed {
            Ok(sample) => {
                if let Some(first) = seen.insert(sample.key(), line_no) {
                    bail!(
                        "{} line {line_no}: question {:?} of split {:?} is already on line {first}; \
                         a samples file holds each question once (remove one of the lines)",
                        path.display(),
                        sample.question_id,
                        sample.split
                    );
                }
                out.samples.push(sample);
                out.good_len = next as u64;
            }
            Err(_) if is_last => {
                out.dropped_last_line = true;
            }
            Err(e) => bail!(
                "{} line {line_no} is not a valid sample ({e}); only a damaged last line is \
                 dropped automatically: fix or delete this line",
                path.display()
            ),
        }
        start = next;
    }
    Ok(out)
}

/// Appends samples, one line each, written in one piece and flushed at once (synced to disk at
/// most every second and when dropped or [`SampleWriter::sync`]ed).
pub struct SampleWriter {
    file: AppendFile,
    last_sync: Instant,
}

impl SampleWriter {
    /// Opens `path` for appending, first cutting it to `good_len` bytes (dropping a damaged last
    /// line that [`read_samples`] found).
    pub fn open(path: &Path, good_len: u64) -> Result<Self> {
        Ok(Self {
            file: AppendFile::open(path, Some(good_len))?,
            last_sync: Instant::now(),
        })
    }

    pub fn append(&mut self, sample: &Sample) -> Result<()> {
        let mut line = serde_json::to_vec(sample).context("serialising a sample")?;
        line.push(b'\n');
        self.file.append(&line)?;
        if self.last_sync.elapsed() > Duration::from_secs(1) {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<()> {
        self.last_sync = Instant::now();
        self.file.sync()
    }
}

/// Writes samples as a whole file, atomically.
pub fn write_samples(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = Vec::new();
    for s in samples {
        serde_json::to_writer(&mut out, s).context("serialising a sample")?;
        out.push(b'\n');
    }
    crate::io::write_bytes_atomically(path, &out)
}
