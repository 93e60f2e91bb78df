//! VQA readers: our JSONL (design §10), VQAv2 (and VQA-CP) questions + annotations, VizWiz, and
//! the dispatch to the other benchmarks' readers ([`super::benchmarks`]: TextVQA, GQA, A-OKVQA)
//! and to the Parquet reader ([`super::parquet`]: Hugging Face datasets' files, as lmms-eval has
//! them).
//!
//! Every reader returns a [`Dataset`]: the good examples, the records it skipped (with
//! [`ReadOptions::skip_bad`]) and where they came from. A bad record (bad JSON, a missing field, a
//! field of the wrong type, a duplicate `question_id`, a missing or unreadable image, …) is reported
//! as a [`BadRecord`] that names the file and the line (JSONL) or the question (JSON formats) and
//! says what to fix. By default the first bad record stops the read with that error (it can be
//! downcast to [`BadRecord`]); with `skip_bad` the reader goes on and collects them in
//! [`Dataset::skipped`].
//!
//! Answers: a record holds 0 to [`MAX_ANSWERS`] human answers. Zero answers are allowed only for a
//! test set without answers, i.e. when no record of the file has answers; in a file where some
//! records have answers, a record without answers is bad. In our JSONL the `answers` key must be
//! present (`"answers": []` for a test set), except in LLaVA's evaluation question files
//! (`{"question_id", "image", "text", "category"}`: the question is `text`, with no answers).
//!
//! Image paths: relative paths in a JSONL file are relative to the file's folder; VQAv2 and VizWiz
//! images are looked up in the image folder (by default the data file's folder). Every reader checks
//! that each image file exists and has the header of an image in a supported format within the
//! size limits; with [`ReadOptions::check_images`] it also decodes the whole image
//! (a truncated file has a good header and fails only in a full decode).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::benchmarks;

/// The most human answers a record may hold (VQAv2 and VizWiz have 10).
pub const MAX_ANSWERS: usize = 10;

/// The keys of a JSONL record that are fields of [`VqaExample`]; every other key goes to `extra`.
pub const RECORD_FIELDS: [&str; 5] = ["question_id", "image", "question", "answers", "answer_type"];

/// One VQA question (design §10).
///
/// Serialised as one JSONL record: `question_id`, `image`, `question`, `answers`, `answer_type`
/// (left out when `None`), then the `extra` fields (keys that collide with the named fields are
/// left out). Deserialising accepts the same record, with `question_id` a string or an integer and
/// `answers` a list of strings or of `{"answer": …}` objects; the image path is taken as written.
#[derive(Clone, Debug, PartialEq)]
pub struct VqaExample {
    /// Unique within a data set. JSONL may give a number: it is stored as its decimal string.
    pub question_id: String,
    /// The image file. Readers resolve relative paths (JSONL: against the data file's folder).
    pub image: PathBuf,
    pub question: String,
    /// Human answers, 0..=10 (0 only for test sets without answers).
    pub answers: Vec<String>,
    /// "yes/no", "number", "other", "unanswerable", …
    pub answer_type: Option<String>,
    /// Every other field of the record, kept and passed through.
    pub extra: Map<String, Value>,
}

impl VqaExample {
    /// Builds an example from one JSON record (our JSONL layout, or a LLaVA evaluation question
    /// record: `text` for the question, no answers). The image path is kept as written. The
    /// error says which field is wrong and how to fix it.
    pub fn from_json(value: Value) -> Result<Self, String> {
        let Value::Object(mut map) = value else {
            return Err(format!(
                "expected a JSON object such as {{\"question_id\": \"q1\", \"image\": \"images/1.png\", \
                 \"question\": \"…\", \"answers\": [\"…\"]}}, found {}",
                json_kind(&value)
            ));
        };
        let question_id = match map.remove("question_id") {
            Some(v) => parse_question_id(&v)?,
            None => return Err(missing("question_id", "a unique string or integer id")),
        };
        let image = match map.remove("image") {
            Some(Value::String(s)) if is_url(&s) => {
                return Err(format!(
                    "field \"image\" is a URL ({}…); a data file names image files: save the \
                     image and give its path",
                    s.chars().take(24).collect::<String>()
                ))
            }
            Some(Value::String(s)) if s.contains('\0') => {
                return Err(format!(
                    "field \"image\" {s:?} holds a NUL character, which no file name can; give \
                     the image file's path"
                ))
            }
            Some(Value::String(s)) if !s.trim().is_empty() => PathBuf::from(s),
            Some(Value::String(_)) => {
                return Err("field \"image\" is empty; give the image file's path".into())
            }
            // What Hugging Face datasets' `to_json` writes for an Image feature.
            Some(Value::Object(o)) if o.contains_key("bytes") || o.contains_key("path") => {
                return Err(
                    "field \"image\" is an image object (Hugging Face datasets' \
                     {\"bytes\", \"path\"}); a data file names image files: save the images \
                     and give each one's path as a string"
                        .into(),
                )
            }
            Some(v) => return Err(wrong_type("image", "a string (the image file's path)", &v)),
            None => {
                return Err(missing(
                    "image",
                    "the image file's path, relative to the data file's folder",
                ))
            }
        };
        // LLaVA's evaluation question files (llava_vqav2_mscoco_test-dev2015.jsonl, …): the
        // question (with its answer instruction) is "text", and they hold no answers.
        let llava_question = !map.contains_key("question")
            && !map.contains_key("answers")
            && map.get("text").is_some_and(Value::is_string);
        let question = match map.remove("question") {
            Some(v) => non_empty_string("question", &v)?,
            None if llava_question => {
                non_empty_string("text", &map.remove("text").unwrap_or_default())?
            }
            None => {
                let instead = present(&map, &["text", "prompt", "query"])
                    .map_or(String::new(), |k| {
                        format!(" (this record has \"{k}\": rename it to \"question\")")
                    });
                return Err(missing("question", "the question text") + &instead);
            }
        };
        let answers =
            match map.remove("answers") {
                Some(v) => answers(&v)?,
                None if llava_question => Vec::new(),
                None => return Err(missing(
                    "answers",
                    "the human answers as a list of strings, e.g. \"answers\": [\"red\", \"red\"] \
                     (use [] for a test set without answers)",
                ) + &present(&map, &["answer", "label", "gt_answer"])
                    .map_or(String::new(), |k| {
                        format!(" (this record has \"{k}\": give it as \"answers\": [\"…\"])")
                    })),
            };
        let answer_type = answer_type(map.remove("answer_type"))?;
        Ok(VqaExample {
            question_id,
            image,
            question,
            answers,
            answer_type,
            extra: map,
        })
    }

    fn serialize_with_image<S: Serializer>(&self, image: &Path, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("question_id", &self.question_id)?;
        m.serialize_entry("image", image)?;
        m.serialize_entry("question", &self.question)?;
        m.serialize_entry("answers", &self.answers)?;
        if let Some(t) = &self.answer_type {
            m.serialize_entry("answer_type", t)?;
        }
        for (k, v) in &self.extra {
            if !RECORD_FIELDS.contains(&k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

impl Serialize for VqaExample {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.serialize_with_image(&self.image, s)
    }
}

impl<'de> Deserialize<'de> for VqaExample {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        VqaExample::from_json(value).map_err(serde::de::Error::custom)
    }
}

/// How readers treat bad records and images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Go on after a bad record and collect it in [`Dataset::skipped`] (default: stop with its error).
    pub skip_bad: bool,
    /// Decode every image (a truncated file fails here), not only read its header.
    pub check_images: bool,
}

/// Which reader produced a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Our JSONL (design §10).
    Jsonl,
    /// The official VQAv2 questions + annotations pair.
    VqaV2,
    /// VizWiz-VQA annotations.
    VizWiz,
    /// A TextVQA file (`{"data": […]}`).
    #[serde(rename = "textvqa")]
    TextVqa,
    /// GQA questions (an object keyed by question id).
    Gqa,
    /// An A-OKVQA file (direct answers).
    #[serde(rename = "aokvqa")]
    AOkVqa,
    /// A Hugging Face datasets Parquet file, or a folder of one split's shards.
    Parquet,
}

impl DataFormat {
    /// How its questions' accuracy is computed: A-OKVQA's direct-answer rule for A-OKVQA, the
    /// VQA rule for every other format.
    pub fn accuracy_rule(self) -> crate::metrics::AccuracyRule {
        match self {
            DataFormat::AOkVqa => crate::metrics::AccuracyRule::DirectAnswer,
            _ => crate::metrics::AccuracyRule::Vqa,
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Jsonl => "jsonl",
            DataFormat::VqaV2 => "vqav2",
            DataFormat::VizWiz => "vizwiz",
            DataFormat::TextVqa => "textvqa",
            DataFormat::Gqa => "gqa",
            DataFormat::AOkVqa => "aokvqa",
            DataFormat::Parquet => "parquet",
        })
    }
}

/// A record that could not be read, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct BadRecord {
    /// The file that holds the record.
    pub file: PathBuf,
    /// The 1-based line (JSONL); `None` for JSON formats, where `reason` names the question.
    pub line: Option<usize>,
    /// What is wrong and what to fix.
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}: {}", self.file.display(), line, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// The examples of one data file.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub examples: Vec<VqaExample>,
    /// Bad records left out (only with [`ReadOptions::skip_bad`]).
    pub skipped: Vec<BadRecord>,
    /// The data file (for VQAv2 the questions file).
    pub source: PathBuf,
    pub format: DataFormat,
    /// Rows left unread after the limit of [`read_dataset_up_to`] (the Parquet and JSONL readers
    /// stop early); 0 when the whole file was read.
    pub unread: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The data set, or an error naming its file when it holds no usable question (an empty
    /// file, or one whose every record was bad and skipped).
    pub fn require_questions(self) -> anyhow::Result<Self> {
        if self.examples.is_empty() {
            let skipped = match self.skipped.len() {
                0 => String::new(),
                n => format!(
                    " ({n} bad record(s) skipped, the first: {})",
                    self.skipped[0]
                ),
            };
            bail!(
                "data file {} holds no questions{skipped}",
                self.source.display()
            );
        }
        Ok(self)
    }

    /// True when the data set has human answers (it is not a test set without answers).
    pub fn has_answers(&self) -> bool {
        self.examples.iter().any(|e| !e.answers.is_empty())
    }
}

// ---------------------------------------------------------------------------------------------
// JSONL
// ---------------------------------------------------------------------------------------------

/// Reads our JSONL (design §10): one JSON object per line, empty lines skipped, extra fields kept.
/// Relative image paths are resolved against the file's folder.
pub fn read_jsonl(path: &Path, opts: &ReadOptions) -> anyhow::Result<Dataset> {
    read_jsonl_in(path, None, opts, None)
}

/// Reads our JSONL; with `limit`, only up to that many good questions (the lines after them are
/// counted in [`Dataset::unread`], not parsed, nor their images checked).
fn read_jsonl_in(
    path: &Path,
    base: Option<&Path>,
    opts: &ReadOptions,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    let file = open_data_file(path)?;
    let base = base
        .map(Path::to_path_buf)
        .unwrap_or_else(|| folder_of(path).to_path_buf());
    let mut reader = BufReader::new(file);
    let mut c = Collector::new(opts);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let mut unread = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read data file {}", path.display()))?;
        if n == 0 {
            break;
        }
        if limit.is_some_and(|l| c.accepted() >= l) {
            unread += usize::from(!buf.trim_ascii().is_empty());
            continue;
        }
        line_no += 1;
        let line = Some(line_no);
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t,
            Err(e) => {
                c.bad(
                    path,
                    line,
                    format!("the line is not valid UTF-8 ({e}); save the file as UTF-8"),
                )?;
                continue;
            }
        };
        // A byte-order mark starts the file, or a file concatenated into it (Windows editors).
        let text = text.trim_start_matches('\u{feff}').trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            // JSON has no NUL outside strings (and escapes it within).
            Err(_) if text.contains('\0') => {
                c.bad(path, line, nul_bytes(text))?;
                continue;
            }
            Err(e) => {
                c.bad(
                    path,
                    line,
                    format!(
                        "not valid JSON ({} at column {}); each line must hold one complete JSON object",
                        json_error_message(&e),
                        e.column()
                    ),
                )?;
                continue;
            }
        };
        let mut example = match VqaExample::from_json(value) {
            Ok(e) => e,
            Err(reason) => {
                c.bad(path, line, reason)?;
                continue;
            }
        };
        example.image = resolve(&base, &example.image);
        c.accept(path, line, example)?;
    }
    let mut data = c.finish(path, DataFormat::Jsonl)?;
    data.unread = unread;
    Ok(data)
}

/// Writes examples as our JSONL, atomically (temp file, fsync, rename). Image paths are written
/// relative to the file's folder when the image lies under it, absolute otherwise. Creates the
/// folder if needed.
pub fn write_jsonl(path: &Path, examples: &[VqaExample]) -> anyhow::Result<()> {
    let dir = folder_of(path);
    let abs_dir = normalize_lexically(
        &std::path::absolute(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .with_context(|| format!("cannot resolve the folder of {}", path.display()))?,
    );
    let mut out = Vec::new();
    for e in examples {
        let image = relative_image_path(&e.image, &abs_dir)?;
        let mut ser = serde_json::Serializer::new(&mut out);
        e.serialize_with_image(&image, &mut ser).with_context(|| {
            format!(
                "cannot write question {:?} to {} (is the image path valid UTF-8?)",
                e.question_id,
                path.display()
            )
        })?;
        out.push(b'\n');
    }
    crate::io::write_bytes_atomically(path, &out)
}

// ---------------------------------------------------------------------------------------------
// VQAv2
// ---------------------------------------------------------------------------------------------

/// Reads the official VQAv2 pair: the questions JSON (`{"questions": [{image_id, question,
/// question_id}], "data_subtype": "val2014"}`) and the annotations JSON (`{"annotations":
/// [{question_id, image_id, answers: [{answer, answer_confidence, answer_id}], answer_type,
/// multiple_choice_answer, question_type}]}`). Images are `COCO_{data_subtype}_{image_id:012}.jpg`
/// or COCO 2017's `{image_id:012}.jpg` in `image_dir` (or in `image_dir/{data_subtype}/`);
/// without `data_subtype`, any file in
/// `image_dir` whose name ends in `_{image_id:012}.jpg` (or is `{image_id:012}.jpg`). `image_id`,
/// `multiple_choice_answer` and `question_type` are kept in `extra`.
pub fn read_vqav2(
    questions: &Path,
    annotations: &Path,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let text = read_json_text(questions)?;
    let top = JsonTop::parse(questions, &text)?;
    vqav2_from_top(questions, &top, Some(annotations), image_dir, opts)
}

/// Reads a VQAv2 questions file, with its annotations, or without them for a test split
/// (`data_subtype` test2015 or test-dev2015: no answers). The same reads VQA-CP v2's files and
/// other lists of VQAv2 records ([`is_vqa_list`]): the questions are a bare list, each record's
/// `coco_split` names its image's split, the annotations are a bare list too, or the records hold
/// their own `answers`.
fn vqav2_from_top(
    questions_path: &Path,
    questions: &JsonTop,
    annotations: Option<&Path>,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let (question_list, subtype) = match questions {
        JsonTop::Object(qfile) => {
            let Some(list) = qfile.list_at("questions") else {
                bail!(
                    "{} is not a VQAv2 questions file: it has no \"questions\" list",
                    questions_path.display()
                );
            };
            let subtype = qfile
                .get("data_subtype")
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
            (list, subtype)
        }
        JsonTop::List(list) => (list.clone(), None),
        JsonTop::Other => bail!(
            "{} is not a VQAv2 questions file: expected a JSON object with a \"questions\" list",
            questions_path.display()
        ),
    };
    let is_test = subtype.as_deref().is_some_and(|s| s.starts_with("test"));
    // A list whose records hold their own answers needs no annotations file.
    let inline = matches!(questions, JsonTop::List(_))
        && question_list
            .iter()
            .take(10)
            .any(|raw| object(raw, "").is_ok_and(|entry| entry.contains_key("answers")));
    let annotation_text;
    let (annotations_path, annotation_list) = match annotations {
        Some(path) => {
            annotation_text = read_json_text(path)?;
            let list = match JsonTop::parse(path, &annotation_text)? {
                // VQA-CP's annotations are a bare list.
                JsonTop::List(list) => list,
                afile @ JsonTop::Object(_) => match afile.list_at("annotations") {
                    Some(list) => list,
                    None => bail!(
                        "{} is not a VQAv2 annotations file: it has no \"annotations\" list",
                        path.display()
                    ),
                },
                JsonTop::Other => bail!(
                    "{} is not a VQAv2 annotations file: expected a JSON object with an \"annotations\" list",
                    path.display()
                ),
            };
            (path, list)
        }
        None if is_test || inline => (Path::new(""), Vec::new()),
        None if matches!(questions, JsonTop::List(_)) => bail!(
            "{} is a list of VQA questions without answers (VQA-CP's layout); it needs its \
             annotations file (e.g. vqacp_v2_test_annotations.json): pass it as the annotations \
             (--annotations for --data, --val-annotations for --val)",
            questions_path.display()
        ),
        None => bail!(
            "{} is a VQAv2 questions file; it needs its annotations file \
             (e.g. v2_mscoco_val2014_annotations.json): pass it as the annotations \
             (--annotations for --data, --val-annotations for --val; --ood-data \
             takes files that hold their answers)",
            questions_path.display()
        ),
    };
    // COCO's test-dev questions are a subset of test2015, whose images they name.
    let image_subtype = subtype.as_deref().map(|s| s.replace("test-dev", "test"));
    check_image_dir(image_dir)?;

    let mut c = Collector::new(opts);

    // Annotations by question id, left unparsed until their question comes.
    let mut by_id: HashMap<String, &RawValue> = HashMap::new();
    for (i, raw) in annotation_list.into_iter().enumerate() {
        let entry = match object(raw, "an object with question_id and answers") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(annotations_path, None, format!("annotations[{i}] {why}"))?;
                continue;
            }
        };
        let id = match entry.get("question_id").map(parse_question_id) {
            Some(Ok(id)) => id,
            Some(Err(reason)) => {
                c.bad(
                    annotations_path,
                    None,
                    format!("annotations[{i}]: {reason}"),
                )?;
                continue;
            }
            None => {
                c.bad(
                    annotations_path,
                    None,
                    format!("annotations[{i}] has no \"question_id\"; every annotation needs the id of its question"),
                )?;
                continue;
            }
        };
        if by_id.contains_key(&id) {
            c.bad(
                annotations_path,
                None,
                format!("question {id}: annotated twice; keep one annotation per question"),
            )?;
            continue;
        }
        by_id.insert(id, raw);
    }

    let mut coco_index: Option<HashMap<u64, Vec<PathBuf>>> = None;
    for (i, raw) in question_list.into_iter().enumerate() {
        let mut entry = match object(raw, "an object with image_id, question and question_id") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(questions_path, None, format!("questions[{i}] {why}"))?;
                continue;
            }
        };
        let id = match entry.remove("question_id").as_ref().map(parse_question_id) {
            Some(Ok(id)) => id,
            Some(Err(reason)) => {
                c.bad(questions_path, None, format!("questions[{i}]: {reason}"))?;
                continue;
            }
            None => {
                c.bad(
                    questions_path,
                    None,
                    format!("questions[{i}] has no \"question_id\"; add the question's id"),
                )?;
                continue;
            }
        };
        let question = match question_text(entry.get("question")) {
            Ok(q) => q,
            Err(reason) => {
                c.bad(questions_path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        let image_id = match entry.get("image_id").map(parse_image_id) {
            Some(Ok(n)) => n,
            Some(Err(reason)) => {
                c.bad(questions_path, None, format!("question {id}: {reason}"))?;
                continue;
            }
            None => {
                c.bad(
                    questions_path,
                    None,
                    format!(
                        "question {id}: {}",
                        missing("image_id", "the COCO image id (an integer)")
                    ),
                )?;
                continue;
            }
        };
        if let Some(reason) = c.duplicate(&id) {
            c.bad(questions_path, None, reason)?;
            continue;
        }
        // The annotation's answers, type and kept fields (none for a test split); a record that
        // holds its own answers is its annotation.
        let (answers, answer_type, mut ann) = if annotations.is_none() && !inline {
            (Vec::new(), None, Map::new())
        } else {
            let (annotations_path, mut ann) = if annotations.is_none() {
                (questions_path, entry.clone())
            } else {
                let Some(raw_annotation) = by_id.remove(&id) else {
                    c.bad(
                        questions_path,
                        None,
                        format!(
                            "question {id}: no annotation in {}; use the annotations file that belongs to this questions file",
                            annotations_path.display()
                        ),
                    )?;
                    continue;
                };
                // Read once already, for its id.
                match object(raw_annotation, "an object") {
                    Ok(ann) => (annotations_path, ann),
                    Err(why) => {
                        c.bad(
                            annotations_path,
                            None,
                            format!("question {id}: its annotation {why}"),
                        )?;
                        continue;
                    }
                }
            };
            match ann.get("image_id").map(parse_image_id) {
                Some(Ok(a)) if a != image_id => {
                    c.bad(
                        annotations_path,
                        None,
                        format!(
                            "question {id}: the annotation names image {a}, the question image {image_id}; \
                             the two files do not belong together"
                        ),
                    )?;
                    continue;
                }
                Some(Err(reason)) => {
                    c.bad(annotations_path, None, format!("question {id}: {reason}"))?;
                    continue;
                }
                _ => {}
            }
            let answers = match ann.get("answers") {
                Some(v) => match answers(v) {
                    Ok(a) if !a.is_empty() => a,
                    Ok(_) => {
                        c.bad(
                            annotations_path,
                            None,
                            format!("question {id}: the annotation has no answers; VQAv2 annotations hold 10 human answers"),
                        )?;
                        continue;
                    }
                    Err(reason) => {
                        c.bad(annotations_path, None, format!("question {id}: {reason}"))?;
                        continue;
                    }
                },
                None => {
                    c.bad(
                        annotations_path,
                        None,
                        format!("question {id}: the annotation has no \"answers\" list; VQAv2 annotations hold 10 human answers"),
                    )?;
                    continue;
                }
            };
            let answer_type = match answer_type(ann.remove("answer_type")) {
                Ok(t) => t,
                Err(reason) => {
                    c.bad(annotations_path, None, format!("question {id}: {reason}"))?;
                    continue;
                }
            };
            (answers, answer_type, ann)
        };
        // VQA-CP names each record's split.
        let record_subtype = entry
            .get("coco_split")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
            .map(|s| s.replace("test-dev", "test"));
        let image = match coco_image(
            image_dir,
            record_subtype.as_deref().or(image_subtype.as_deref()),
            image_id,
            &mut coco_index,
        ) {
            Ok(p) => p,
            Err(reason) => {
                c.bad(questions_path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        let mut extra = Map::new();
        extra.insert("image_id".into(), Value::from(image_id));
        for key in ["multiple_choice_answer", "question_type"] {
            if let Some(v) = ann.remove(key) {
                extra.insert(key.into(), v);
            }
        }
        let example = VqaExample {
            question_id: id,
            image,
            question,
            answers,
            answer_type,
            extra,
        };
        c.accept(questions_path, None, example)?;
    }
    c.finish(questions_path, DataFormat::VqaV2)
}

/// The COCO image file of `image_id`.
pub(super) fn coco_image(
    image_dir: &Path,
    subtype: Option<&str>,
    image_id: u64,
    index: &mut Option<HashMap<u64, Vec<PathBuf>>>,
) -> Result<PathBuf, String> {
    if let Some(sub) = subtype {
        // COCO 2014's names, then COCO 2017's bare ids (2017 has only those), in the folder or
        // its `sub` folder.
        let bare = format!("{image_id:012}.jpg");
        let names = if sub.ends_with("2017") {
            vec![bare]
        } else {
            vec![format!("COCO_{sub}_{image_id:012}.jpg"), bare]
        };
        return names
            .iter()
            .flat_map(|n| [image_dir.join(n), image_dir.join(sub).join(n)])
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "image file {} not found in {} or its {sub} folder; give the folder that \
                     holds the images (--images for --data, --val-images for --val, --ood-images for --ood-data, \
                 --ood-val-images for --ood-val)",
                    names.join(" (or ") + &")".repeat(names.len() - 1),
                    image_dir.display()
                )
            });
    }
    if index.is_none() {
        *index = Some(index_coco_images(image_dir)?);
    }
    let found = index.as_ref().and_then(|m| m.get(&image_id));
    match found.map(Vec::as_slice) {
        Some([one]) => Ok(one.clone()),
        Some(many) if many.len() > 1 => Err(format!(
            "{} files in {} match image {image_id} ({}); the questions file has no \"data_subtype\" to choose: \
             add it (e.g. \"val2014\") or keep one split's images in the folder",
            many.len(),
            image_dir.display(),
            many.iter()
                .map(|p| p.strip_prefix(image_dir).unwrap_or(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => Err(format!(
            "no image file ending in _{image_id:012}.jpg in {} or its split folders (val2014/, \
             train2017/, …); give the folder that holds the \
             images (--images for --data, --val-images for --val, --ood-images for --ood-data, \
                 --ood-val-images for --ood-val)",
            image_dir.display()
        )),
    }
}

/// COCO images by id: the files named `…_{id:012}.jpg` or `{id:012}.jpg` in `image_dir` and in
/// its split folders (`val2014/`, `train2017/`, … as COCO's archives unpack).
fn index_coco_images(image_dir: &Path) -> Result<HashMap<u64, Vec<PathBuf>>, String> {
    let mut index: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    let mut folders = vec![image_dir.to_path_buf()];
    let mut i = 0;
    while let Some(folder) = folders.get(i).cloned() {
        i += 1;
        let entries = fs::read_dir(&folder)
            .map_err(|e| format!("cannot list the image folder {}: {e}", folder.display()))?;
        let mut names = Vec::new();
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if folder == image_dir && is_split_folder(name) && entry.path().is_dir() {
                    folders.push(entry.path());
                } else {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        for name in names {
            if let Some(id) = coco_file_id(&name) {
                index.entry(id).or_default().push(folder.join(&name));
            }
        }
    }
    Ok(index)
}

/// Whether a folder's name is a COCO split's (`val2014`, `test2015`, `train2017`, …).
fn is_split_folder(name: &str) -> bool {
    name.len() > 4 && name.is_char_boundary(name.len() - 4) && {
        let (head, year) = name.split_at(name.len() - 4);
        head.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            && year.bytes().all(|b| b.is_ascii_digit())
    }
}

/// The COCO image id of a file named `…_{id:012}.jpg` or `{id:012}.jpg`.
fn coco_file_id(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".jpg")?;
    if stem.len() < 12 || !stem.is_char_boundary(stem.len() - 12) {
        return None;
    }
    let (head, digits) = stem.split_at(stem.len() - 12);
    if !(head.is_empty() || head.ends_with('_')) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// VizWiz
// ---------------------------------------------------------------------------------------------

/// Reads VizWiz-VQA annotations: a list of `{"image": "VizWiz_val_00000000.jpg", "question",
/// "answers": [{"answer", "answer_confidence"}], "answerable": 0|1, "answer_type"}`. The question id
/// is the image file name without extension (or the record's own `question_id` if it has one);
/// images are looked up in `image_dir`; `answerable` and any other unknown keys are kept in
/// `extra`. Test-set records without `answers` are read with no answers.
pub fn read_vizwiz(
    annotations: &Path,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let text = read_json_text(annotations)?;
    let top = JsonTop::parse(annotations, &text)?;
    vizwiz_from_top(annotations, top, image_dir, opts)
}

fn vizwiz_from_top(
    path: &Path,
    top: JsonTop,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let JsonTop::List(list) = top else {
        bail!(
            "{} is not a VizWiz annotations file: expected a JSON list of {{\"image\", \"question\", \"answers\", …}} objects",
            path.display()
        );
    };
    check_image_dir(image_dir)?;
    let mut c = Collector::new(opts);
    for (i, raw) in list.into_iter().enumerate() {
        let mut entry = match object(raw, "an object with image, question and answers") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(path, None, format!("entry {i} {why}"))?;
                continue;
            }
        };
        let image_name = match entry.remove("image") {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(v) => {
                c.bad(
                    path,
                    None,
                    format!(
                        "entry {i}: {}",
                        wrong_type("image", "the image file name", &v)
                    ),
                )?;
                continue;
            }
            None => {
                c.bad(
                    path,
                    None,
                    format!(
                        "entry {i}: {}",
                        missing(
                            "image",
                            "the image file name, e.g. \"VizWiz_val_00000000.jpg\""
                        )
                    ),
                )?;
                continue;
            }
        };
        let id = match entry.remove("question_id") {
            Some(v) => match parse_question_id(&v) {
                Ok(id) => id,
                Err(reason) => {
                    c.bad(path, None, format!("entry {i} ({image_name}): {reason}"))?;
                    continue;
                }
            },
            None => {
                let id = Path::new(&image_name)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| image_name.clone());
                if let Some(reason) = c.duplicate(&id) {
                    c.bad(
                        path,
                        None,
                        format!(
                            "entry {i}: {reason} (a VizWiz question is named by its image, and \
                             {image_name} has two: give each record its own \"question_id\")"
                        ),
                    )?;
                    continue;
                }
                id
            }
        };
        let question = match question_text(entry.remove("question").as_ref()) {
            Ok(q) => q,
            Err(reason) => {
                c.bad(path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        let answers = match entry.remove("answers") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => match answers(&v) {
                Ok(a) => a,
                Err(reason) => {
                    c.bad(path, None, format!("question {id}: {reason}"))?;
                    continue;
                }
            },
        };
        let answer_type = match answer_type(entry.remove("answer_type")) {
            Ok(t) => t,
            Err(reason) => {
                c.bad(path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        let example = VqaExample {
            question_id: id,
            image: vizwiz_image(image_dir, &image_name),
            question,
            answers,
            answer_type,
            extra: entry,
        };
        c.accept(path, None, example)?;
    }
    c.finish(path, DataFormat::VizWiz)
}

/// A VizWiz image: in the image folder, in its split's folder there (`VizWiz_val_00000000.jpg`
/// in `val/`, as the archives unpack), or beside an `Annotations` folder that holds the data file
/// (VizWiz's own layout); the first place when it is in none, for the error to name.
fn vizwiz_image(image_dir: &Path, name: &str) -> PathBuf {
    let direct = resolve(image_dir, Path::new(name));
    let split = name
        .strip_prefix("VizWiz_")
        .and_then(|rest| rest.split('_').next())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()));
    let Some(split) = split else {
        return direct;
    };
    let mut places = vec![direct.clone(), image_dir.join(split).join(name)];
    if image_dir.file_name().is_some_and(|n| n == "Annotations") {
        places.push(folder_of(image_dir).join(split).join(name));
    }
    places.into_iter().find(|p| p.exists()).unwrap_or(direct)
}

// ---------------------------------------------------------------------------------------------
// Format detection
// ---------------------------------------------------------------------------------------------

/// Picks the reader from the file:
/// - `*.jsonl` → our JSONL (`image_dir`, if given, replaces the file's folder as the base of
///   relative image paths; `annotations` must be `None`);
/// - `*.json` holding a list → VQAv2's reader for VQA-CP's questions (records with a COCO
///   `image_id` and a `coco_split`; with `annotations`, VQA-CP's annotations list) and for
///   VQAv2 records holding their `answers`; A-OKVQA when its records have `direct_answers` (or a
///   COCO `image_id` and no `image`: its test file); our records; else VizWiz;
/// - `*.json` holding `{"questions": …}` → VQAv2 (OK-VQA too), which needs `annotations`
///   unless its `data_subtype` is a test split (test2015, test-dev2015: no answers);
/// - `*.json` holding `{"data": […]}` → TextVQA; an object of `{"imageId", …}` records → GQA
///   ([`super::benchmarks`]).
///
/// - `*.parquet`, or a folder of one split's `.parquet` shards → Hugging Face datasets' Parquet
///   ([`super::parquet`]).
///
/// For the JSON and Parquet formats `image_dir` defaults to the data file's folder.
pub fn read_dataset(
    path: &Path,
    annotations: Option<&Path>,
    image_dir: Option<&Path>,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    read_dataset_up_to(path, annotations, image_dir, opts, None)
}

/// [`read_dataset`], where a Parquet or JSONL file is read only up to its first `limit` good
/// questions (`--limit`): the rows after them are not parsed (a Parquet file's embedded images
/// not extracted, a JSONL file's images not checked), and [`Dataset::unread`] counts them. The
/// other formats are read whole (their first `limit` questions are what a caller keeps).
pub fn read_dataset_up_to(
    path: &Path,
    annotations: Option<&Path>,
    image_dir: Option<&Path>,
    opts: &ReadOptions,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if ext.as_deref() == Some("parquet") || (path.is_dir() && super::parquet::is_parquet(path)) {
        refuse_annotations(path, annotations, "Parquet")?;
        let cache = super::parquet::image_cache()?;
        return super::parquet::read_parquet(path, image_dir, opts, limit, &cache);
    }
    match ext.as_deref() {
        Some("jsonl") => {
            refuse_annotations(path, annotations, "JSONL")?;
            read_jsonl_in(path, image_dir, opts, limit)
        }
        Some("json") => {
            let text = read_json_text(path)?;
            if text.trim().is_empty() {
                bail!("data file {} is empty: it holds no questions", path.display());
            }
            // Hugging Face datasets' `to_json` writes one record per line under a .json name.
            if is_json_lines(&text) {
                return read_jsonl_in(path, image_dir, opts, limit);
            }
            let top = JsonTop::parse(path, &text)?;
            // A bare file name's folder is the working directory.
            let default_dir = match folder_of(path) {
                dir if dir.as_os_str().is_empty() => PathBuf::from("."),
                dir => dir.to_path_buf(),
            };
            let image_dir = image_dir.map(Path::to_path_buf).unwrap_or(default_dir);
            let layout = JsonLayout::of(&top);
            if let (Some(a), true) = (annotations, layout.holds_answers()) {
                bail!(
                    "{} holds its answers (it is not a VQAv2 questions file); an annotations file \
                     ({}) applies only to VQAv2 questions files",
                    path.display(),
                    a.display()
                );
            }
            match (layout, top) {
                (JsonLayout::AOkVqa, JsonTop::List(list)) => {
                    benchmarks::aokvqa_from_list(path, list, &image_dir, opts)
                }
                (JsonLayout::OurRecords, JsonTop::List(list)) => {
                    records_from_list(path, list, &image_dir, opts)
                }
                (JsonLayout::OurRecords, JsonTop::Object(m)) => {
                    // One record alone (a JSON Lines file of one line), or under "data".
                    let list = match m.list_at("data") {
                        Some(list) => list,
                        None => vec![serde_json::from_str::<&RawValue>(&text)?],
                    };
                    records_from_list(path, list, &image_dir, opts)
                }
                (JsonLayout::VizWiz, top) => vizwiz_from_top(path, top, &image_dir, opts),
                (JsonLayout::VqaV2Questions, top) => {
                    vqav2_from_top(path, &top, annotations, &image_dir, opts)
                }
                (JsonLayout::VqaV2Annotations, _) => bail!(
                    "{} is a VQAv2 (or VQA-CP) annotations file; pass the questions file as the \
                     data and this file as its annotations",
                    path.display()
                ),
                (JsonLayout::TextVqa, top) => {
                    benchmarks::textvqa_from_top(path, &top, &image_dir, opts)
                }
                (JsonLayout::Gqa, JsonTop::Object(m)) => {
                    benchmarks::gqa_from_top(path, &m, &image_dir, opts)
                }
                (JsonLayout::Empty, _) => {
                    bail!("data file {} is an empty JSON object: it holds no questions", path.display())
                }
                _ => bail!(
                    "{} is none of the JSON formats bella-vqa reads: a VQAv2 (or OK-VQA, VQA-CP) questions \
                     file, a VizWiz or A-OKVQA list, a TextVQA file or GQA questions; for other \
                     data write our JSONL (one {{\"question_id\", \"image\", \"question\", \
                     \"answers\"}} per line)",
                    path.display()
                ),
            }
        }
        _ if path.is_dir() => bail!(
            "{} is a folder: give the data file in it (.jsonl for our JSONL, .json for a \
             benchmark's own file: VQAv2, VizWiz, TextVQA, GQA, A-OKVQA; .parquet for Hugging \
             Face datasets' files, or a folder of one split's .parquet shards)",
            path.display()
        ),
        Some(ext @ ("csv" | "tsv" | "arrow")) => bail!(
            "{} is a {} file, which bella-vqa does not read: write our JSONL (one {{\"question_id\", \
             \"image\" (a file path), \"question\", \"answers\": [...]}} per line; with pandas: \
             df.to_json(\"data.jsonl\", orient=\"records\", lines=True), images saved as files first; \
             or Parquet, e.g. Hugging Face datasets' ds.to_parquet(\"data.parquet\"))",
            path.display(),
            ext.to_ascii_uppercase()
        ),
        _ => bail!(
            "cannot tell the format of {} from its name: use .jsonl for our JSONL (one question per \
             line), .json for a benchmark's own file (VQAv2/OK-VQA questions + annotations, \
             VizWiz, TextVQA, GQA, A-OKVQA) or .parquet for Hugging Face datasets' files",
            path.display()
        ),
    }
}

/// Refuses an annotations file beside a data file of `kind` that holds its own answers.
fn refuse_annotations(path: &Path, annotations: Option<&Path>, kind: &str) -> anyhow::Result<()> {
    match annotations {
        Some(a) => bail!(
            "{} is a {kind} data file, which holds its answers; an annotations file ({}) applies \
             only to VQAv2 questions files",
            path.display(),
            a.display()
        ),
        None => Ok(()),
    }
}

/// Whether a .json file holds one JSON object per line (JSON Lines), not one JSON value.
fn is_json_lines(text: &str) -> bool {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first_two = (lines.next(), lines.next());
    let object =
        |l: &str| l.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(l).is_ok();
    matches!(first_two, (Some(a), Some(b)) if object(a) && object(b))
}

/// Whether a JSON list holds our records (a `question_id` and an `image` path each), as a JSONL
/// file would one per line; VizWiz records have no `question_id`.
/// Whether a JSON list holds VQAv2 records by COCO image id: VQA-CP v2's questions or
/// annotations (each record names its `coco_split`) or VQAv2 records with their `answers` (a
/// flattened VQAv2) — not A-OKVQA's (`direct_answers`, `choices`).
fn is_vqa_list(list: &[&RawValue]) -> bool {
    list.iter().take(10).any(|raw| {
        object(raw, "").is_ok_and(|entry| {
            entry.contains_key("image_id")
                && !entry.contains_key("image")
                && (entry.contains_key("coco_split") || entry.contains_key("answers"))
                && !entry.contains_key("direct_answers")
                && !entry.contains_key("choices")
        })
    })
}

fn are_our_records(list: &[&RawValue]) -> bool {
    list.iter().take(10).any(|raw| {
        object(raw, "").is_ok_and(|entry| {
            entry.contains_key("question_id")
                && entry.get("image").is_some_and(Value::is_string)
                && !entry.contains_key("answerable")
        })
    })
}

/// Reads a JSON list of our records (the JSONL layout in one list; images relative to
/// `image_dir`).
fn records_from_list(
    path: &Path,
    list: Vec<&RawValue>,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let mut c = Collector::new(opts);
    for (i, raw) in list.into_iter().enumerate() {
        let example = serde_json::from_str::<Value>(raw.get())
            .map_err(|e| format!("cannot be read: {}", json_error_message(&e)))
            .and_then(VqaExample::from_json);
        match example {
            Ok(mut example) => {
                example.image = resolve(image_dir, &example.image);
                c.accept(path, None, example)?;
            }
            Err(reason) => c.bad(path, None, format!("entry {i}: {reason}"))?,
        }
    }
    c.finish(path, DataFormat::Jsonl)
}

/// What a .json data file holds, told from its content (the first records where it takes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JsonLayout {
    /// Our records: a list of them, one alone, or a list under `"data"`.
    OurRecords,
    AOkVqa,
    VizWiz,
    VqaV2Questions,
    VqaV2Annotations,
    TextVqa,
    Gqa,
    /// `{}`.
    Empty,
    Unknown,
}

impl JsonLayout {
    fn of(top: &JsonTop) -> Self {
        match top {
            JsonTop::List(list) if is_vqa_list(list) => {
                if list
                    .iter()
                    .take(10)
                    .any(|raw| object(raw, "").is_ok_and(|entry| entry.contains_key("question")))
                {
                    JsonLayout::VqaV2Questions
                } else {
                    JsonLayout::VqaV2Annotations
                }
            }
            JsonTop::List(list) if benchmarks::is_aokvqa(list) => JsonLayout::AOkVqa,
            JsonTop::List(list) if are_our_records(list) => JsonLayout::OurRecords,
            JsonTop::List(_) => JsonLayout::VizWiz,
            JsonTop::Object(m) if m.0.is_empty() => JsonLayout::Empty,
            JsonTop::Object(m) if m.contains_key("question_id") && m.contains_key("image") => {
                JsonLayout::OurRecords
            }
            JsonTop::Object(m) if m.contains_key("questions") => JsonLayout::VqaV2Questions,
            JsonTop::Object(m) if m.contains_key("annotations") => JsonLayout::VqaV2Annotations,
            // Our records under "data" (TextVQA's there have no `image`).
            JsonTop::Object(m) if m.list_at("data").is_some_and(|l| are_our_records(&l)) => {
                JsonLayout::OurRecords
            }
            JsonTop::Object(m) if benchmarks::is_textvqa(m) => JsonLayout::TextVqa,
            JsonTop::Object(m) if benchmarks::is_gqa(m) => JsonLayout::Gqa,
            _ => JsonLayout::Unknown,
        }
    }

    /// Whether such a file holds its answers (an annotations file given with it is a mistake).
    fn holds_answers(self) -> bool {
        !matches!(
            self,
            JsonLayout::VqaV2Questions
                | JsonLayout::VqaV2Annotations
                | JsonLayout::Empty
                | JsonLayout::Unknown
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Collecting records
// ---------------------------------------------------------------------------------------------

/// Gathers good records, checks ids and images, and reports or collects bad ones.
pub(super) struct Collector<'a> {
    opts: &'a ReadOptions,
    examples: Vec<VqaExample>,
    /// Where each example came from, for checks after the pass: (file, line).
    origins: Vec<(PathBuf, Option<usize>)>,
    skipped: Vec<BadRecord>,
    seen: HashMap<String, Option<usize>>,
    images: HashMap<PathBuf, Result<(), String>>,
}

impl<'a> Collector<'a> {
    pub(super) fn new(opts: &'a ReadOptions) -> Self {
        Collector {
            opts,
            examples: Vec::new(),
            origins: Vec::new(),
            skipped: Vec::new(),
            seen: HashMap::new(),
            images: HashMap::new(),
        }
    }

    /// Reports a bad record: an error by default, collected with `skip_bad`.
    pub(super) fn bad(
        &mut self,
        file: &Path,
        line: Option<usize>,
        reason: String,
    ) -> anyhow::Result<()> {
        let record = BadRecord {
            file: file.to_path_buf(),
            line,
            reason,
        };
        if self.opts.skip_bad {
            self.skipped.push(record);
            Ok(())
        } else {
            Err(anyhow::Error::new(record))
        }
    }

    pub(super) fn accept(
        &mut self,
        file: &Path,
        line: Option<usize>,
        example: VqaExample,
    ) -> anyhow::Result<()> {
        let id = &example.question_id;
        let prefix = if line.is_some() {
            String::new()
        } else {
            format!("question {id}: ")
        };
        if example.answers.len() > MAX_ANSWERS {
            return self.bad(
                file,
                line,
                format!(
                    "{prefix}{} answers; a record holds at most {MAX_ANSWERS} human answers",
                    example.answers.len()
                ),
            );
        }
        if let Some(reason) = self.duplicate(id) {
            return self.bad(file, line, reason);
        }
        let image_state = match self.images.get(&example.image) {
            Some(state) => state.clone(),
            None => {
                let state = check_image(&example.image, self.opts.check_images);
                self.images.insert(example.image.clone(), state.clone());
                state
            }
        };
        if let Err(reason) = image_state {
            let fix = match (line, example.image.is_file()) {
                (_, true) => "",
                (Some(_), false) => {
                    "; fix the \"image\" path (relative paths are relative to the data file's \
                     folder, or to the one its images option names: --images for --data, \
                     --val-images for --val, --ood-images for --ood-data, --ood-val-images for \
                     --ood-val)"
                }
                // The JSON formats name images without their folder.
                (None, false) => {
                    "; the images of a JSON data file (VQAv2, VizWiz, TextVQA, GQA, A-OKVQA) are \
                     looked up in the data file's folder unless the images option names the \
                     folder that holds them (--images for --data, --val-images for --val, --ood-images for --ood-data, \
                 --ood-val-images for --ood-val)"
                }
            };
            return self.bad(file, line, format!("{prefix}{reason}{fix}"));
        }
        self.seen.insert(example.question_id.clone(), line);
        self.examples.push(example);
        self.origins.push((file.to_path_buf(), line));
        Ok(())
    }

    /// Takes `image` as checked (an image a reader checked itself, named by where it came from,
    /// as the Parquet reader checks embedded bytes before writing them to the image cache): its
    /// records are not checked again by the file.
    pub(super) fn image_checked(&mut self, image: &Path) {
        self.images.insert(image.to_path_buf(), Ok(()));
    }

    /// How many good records it holds so far.
    pub(super) fn accepted(&self) -> usize {
        self.examples.len()
    }

    /// The complaint about `id` if an earlier good record has it.
    pub(super) fn duplicate(&self, id: &str) -> Option<String> {
        let first = self.seen.get(id)?;
        let where_ = match first {
            Some(l) => format!(" (first on line {l})"),
            None => String::new(),
        };
        Some(format!(
            "duplicate question_id {id:?}{where_}; every question needs its own id"
        ))
    }

    /// Checks the whole set (answers present on all records or on none) and returns it.
    pub(super) fn finish(mut self, source: &Path, format: DataFormat) -> anyhow::Result<Dataset> {
        if self.examples.iter().any(|e| !e.answers.is_empty()) {
            let examples = std::mem::take(&mut self.examples);
            let origins = std::mem::take(&mut self.origins);
            for (example, (file, line)) in examples.into_iter().zip(origins) {
                if example.answers.is_empty() {
                    let prefix = if line.is_some() {
                        String::new()
                    } else {
                        format!("question {}: ", example.question_id)
                    };
                    self.bad(
                        &file,
                        line,
                        format!(
                            "{prefix}no answers, but other records of this file have answers; add the human \
                             answers (empty answers are allowed only when no record has answers, in a test set)"
                        ),
                    )?;
                } else {
                    self.examples.push(example);
                }
            }
        }
        Ok(Dataset {
            examples: self.examples,
            skipped: self.skipped,
            source: source.to_path_buf(),
            format,
            unread: 0,
        })
    }
}

fn check_image(path: &Path, decode: bool) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(format!("image {} is not a file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("image file {} not found", path.display()))
        }
        Err(e) => return Err(format!("cannot read image file {}: {e}", path.display())),
    }
    let unreadable = |e: anyhow::Error| {
        // Too large, or not readable at all: the error says what to do; else it is no image.
        let said =
            e.is::<crate::error::ImageTooLarge>() || e.chain().any(|c| c.is::<std::io::Error>());
        let fix = if said {
            ""
        } else {
            "; replace it with a valid PNG, JPEG, WebP, GIF, BMP or TIFF file"
        };
        format!(
            "image file {} cannot be read as an image ({e:#}){fix}",
            path.display()
        )
    };
    if decode {
        // A full decode: a truncated file has a good header and fails only here.
        crate::models::image::load_image(path).map_err(unreadable)?;
    } else {
        // Its header: a file that is no image (or too large) is found before a run starts.
        crate::models::image::image_file_size(path).map_err(unreadable)?;
    }
    Ok(())
}

pub(super) fn check_image_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("image folder {} is not a folder", dir.display()),
        Err(e) => bail!("cannot open image folder {}: {e}", dir.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Field helpers
// ---------------------------------------------------------------------------------------------

/// What a JSON value is, for messages ("a string", "an object", …).
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An optional `answer_type`: absent or null is `None`, a string is kept, anything else is an error.
pub(super) fn answer_type(v: Option<Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong_type("answer_type", "a string or null", &v)),
    }
}

/// The non-empty question text of a record, or why it is not there.
pub(super) fn question_text(v: Option<&Value>) -> Result<String, String> {
    match v {
        Some(v) => non_empty_string("question", v),
        None => Err(missing("question", "the question text")),
    }
}

pub(super) fn missing(field: &str, what: &str) -> String {
    format!("missing field \"{field}\"; add {what}")
}

/// The first of `keys` (what other formats call a field) that the record has.
fn present<'k>(map: &Map<String, Value>, keys: &[&'k str]) -> Option<&'k str> {
    keys.iter().copied().find(|k| map.contains_key(*k))
}

/// Whether an image reference is a URL rather than a file path.
fn is_url(s: &str) -> bool {
    let lower = s.trim_start().to_ascii_lowercase();
    ["data:", "http://", "https://"]
        .iter()
        .any(|p| lower.starts_with(p))
}

pub(super) fn wrong_type(field: &str, expected: &str, found: &Value) -> String {
    format!(
        "field \"{field}\" must be {expected}, found {}",
        json_kind(found)
    )
}

pub(super) fn parse_question_id(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        Value::String(_) => {
            Err("field \"question_id\" is empty; give every question a unique id".into())
        }
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        Value::Number(n)
            if n.as_f64()
                .is_some_and(|x| x.fract() == 0.0 && x.abs() > 1e15) =>
        {
            Err(format!(
                "field \"question_id\" is an integer too large to read exactly ({n}); write it as \
                 a string (in quotes)"
            ))
        }
        Value::Number(n) => Err(format!(
            "field \"question_id\" must be a string or an integer, found {n}"
        )),
        _ => Err(wrong_type("question_id", "a string or an integer", v)),
    }
}

pub(super) fn parse_image_id(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("field \"image_id\" must be a non-negative integer, found {n}")),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("field \"image_id\" must be an integer, found {s:?}")),
        _ => Err(wrong_type("image_id", "an integer", v)),
    }
}

pub(super) fn non_empty_string(field: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        Value::String(_) => Err(format!("field \"{field}\" is empty")),
        _ => Err(wrong_type(field, "a string", v)),
    }
}

/// A list of strings, or of objects with an `answer` string (VQAv2 / VizWiz style).
pub(super) fn answers(v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = v else {
        return Err(format!(
            "field \"answers\" must be a list of strings, e.g. [\"red\", \"red\"], found {}",
            json_kind(v)
        ));
    };
    list.iter()
        .enumerate()
        .map(|(i, a)| match a {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => match o.get("answer") {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "answers[{i}].answer must be a string, found {}",
                    json_kind(other)
                )),
                None => Err(format!(
                    "answers[{i}] is an object without an \"answer\" string"
                )),
            },
            Value::Number(n) => Err(format!(
                "answers[{i}] must be a string, found the number {n} (write it as \"{n}\")"
            )),
            other => Err(format!(
                "answers[{i}] must be a string, found {}",
                json_kind(other)
            )),
        })
        .collect::<Result<Vec<String>, String>>()
        .and_then(|answers| {
            if !answers.is_empty() && answers.iter().all(|a| a.trim().is_empty()) {
                Err(
                    "every answer is empty: give the human answers (or [] for a test set \
                     without answers)"
                        .into(),
                )
            } else {
                Ok(answers)
            }
        })
}

/// serde_json's message without its " at line L column C" suffix; for an escape of half a
/// UTF-16 pair (which Python's `json.dumps` writes for a string holding a lone surrogate, and
/// serde_json reports as a hex escape or surrogate error) what it is.
fn json_error_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let msg = msg.strip_suffix(&suffix).unwrap_or(&msg).to_string();
    if msg.contains("surrogate") || msg == "unexpected end of hex escape" {
        format!(
            "{msg}: a \\uD800–\\uDFFF escape without its other half, a lone UTF-16 surrogate \
             that is no character (in Python, json.dumps of a string with one: fix the string)"
        )
    } else {
        msg
    }
}

// ---------------------------------------------------------------------------------------------
// Files and paths
// ---------------------------------------------------------------------------------------------

fn open_data_file(path: &Path) -> anyhow::Result<fs::File> {
    crate::input::open(path, "data file")
}

/// A JSON data file's text, without a leading byte-order mark.
pub(super) fn read_json_text(path: &Path) -> anyhow::Result<String> {
    let mut file = open_data_file(path)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            anyhow!(
                "data file {} is not UTF-8 text (UTF-16 or Latin-1?): save it as UTF-8",
                path.display()
            )
        } else {
            anyhow!("cannot read data file {}: {e}", path.display())
        }
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if text.contains('\0') {
        bail!("data file {}: {}", path.display(), nul_bytes(&text));
    }
    Ok(text)
}

/// What text with NUL bytes is told: JSON holds none (a NUL in a string is escaped). UTF-16
/// text without a byte-order mark reads as UTF-8 with a NUL beside every ASCII character; a few
/// NULs are stray bytes.
fn nul_bytes(text: &str) -> String {
    let nul = text.bytes().filter(|&b| b == 0).count();
    if nul * 4 >= text.len() {
        "the text holds NUL bytes, which JSON never does: the file looks like UTF-16 without a \
         byte-order mark; save it as UTF-8"
            .to_string()
    } else {
        format!(
            "the text holds {nul} NUL byte(s), which JSON never does (a NUL inside a string is \
             written \\u0000): remove them"
        )
    }
}

/// The top level of a JSON data file, its entries left as unparsed slices of the file's text:
/// a VQAv2 annotations file of 170 MB costs its text and one small record at a time, not the
/// ~14× that `serde_json::Value`s of every record would take.
pub(super) enum JsonTop<'a> {
    List(Vec<&'a RawValue>),
    Object(Entries<'a>),
    /// Neither a list nor an object.
    Other,
}

/// A JSON object's entries in the file's order (GQA's question ids are its keys, and a run keeps
/// the file's order). A key written twice is found at its last place, as serde_json reads it.
pub(super) struct Entries<'a>(pub(super) Vec<(String, &'a RawValue)>);

impl<'a> Entries<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The list under `key` (`None` if there is no such list).
    pub(super) fn list_at(&self, key: &str) -> Option<Vec<&'a RawValue>> {
        // Already validated by `JsonTop::parse`: only "not a list" can fail here.
        serde_json::from_str(self.get(key)?.get()).ok()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InOrder<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for InOrder<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Entries<'a>, M::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = m.next_entry::<String, &'a RawValue>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(InOrder(std::marker::PhantomData))
    }
}

impl<'a> JsonTop<'a> {
    /// Parses (and so validates) the whole of `text`, the content of `path`.
    pub(super) fn parse(path: &Path, text: &'a str) -> anyhow::Result<Self> {
        let invalid = |e: serde_json::Error| {
            anyhow!(
                "{} is not valid JSON ({} at line {} column {})",
                path.display(),
                json_error_message(&e),
                e.line(),
                e.column()
            )
        };
        Ok(match text.trim_start().as_bytes().first() {
            Some(b'[') => JsonTop::List(serde_json::from_str(text).map_err(invalid)?),
            Some(b'{') => JsonTop::Object(serde_json::from_str(text).map_err(invalid)?),
            _ => serde_json::from_str::<Value>(text)
                .map(|_| JsonTop::Other)
                .map_err(invalid)?,
        })
    }

    /// The list under `key` of an object (`None` if there is no such list).
    pub(super) fn list_at(&self, key: &str) -> Option<Vec<&'a RawValue>> {
        let JsonTop::Object(map) = self else {
            return None;
        };
        map.list_at(key)
    }
}

/// One record of a JSON data file as an object, or why not: "is a string, expected …", or why
/// a record that is valid JSON text cannot be read as a value (nested too deep, a number out of
/// range, an unpaired surrogate escape).
pub(super) fn object(raw: &RawValue, expected: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(entry)) => Ok(entry),
        Ok(other) => Err(format!("is {}, expected {expected}", json_kind(&other))),
        Err(e) => Err(format!("cannot be read: {}", json_error_message(&e))),
    }
}

/// The folder that holds `path` (empty for a bare file name).
pub(super) fn folder_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

pub(super) fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Removes `.` and folds `..` without touching the file system.
fn normalize_lexically(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `image` relative to `abs_dir` when it lies under it, else its absolute path.
fn relative_image_path(image: &Path, abs_dir: &Path) -> anyhow::Result<PathBuf> {
    let abs = normalize_lexically(
        &std::path::absolute(image)
            .with_context(|| format!("cannot resolve image path {}", image.display()))?,
    );
    Ok(match abs.strip_prefix(abs_dir) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
        _ => abs,
    })
}
