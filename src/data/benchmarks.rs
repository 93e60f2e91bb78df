//! Readers of other VQA benchmarks' official files: TextVQA, GQA and A-OKVQA (OK-VQA ships in
//! VQAv2's format and is read by [`super::vqa::read_vqav2`]).
//!
//! Each reader turns its file into the same [`Dataset`] of [`VqaExample`]s as the readers in
//! [`super::vqa`], with the same rules: a bad record names the question and what to fix, the
//! first one stops the read unless [`ReadOptions::skip_bad`], every image must exist, fields the
//! example has no place for are kept in `extra`, and the file's order is kept.
//!
//! - **TextVQA** (`TextVQA_0.5.1_val.json`): `{"dataset_name": "textvqa", "data": [{"question_id":
//!   34602, "question", "image_id": "0054c91397f2fe05", "answers": [10 strings], …}]}`; the image is
//!   `IMAGE_ID.jpg` in the image folder or its `train_images/` or `test_images/` folder (as the
//!   TextVQA archives unpack). Test files have no answers.
//! - **GQA** (`testdev_balanced_questions.json`): an object keyed by question id, `{"201307251":
//!   {"imageId": "n161313", "question", "answer": "no", "fullAnswer", …}}`; the one answer is the
//!   record's only human answer, so accuracy is GQA's exact match; the image is `IMAGE_ID.jpg` in
//!   the image folder or its `images/` folder. The submission files have no answers.
//! - **A-OKVQA** (`aokvqa_v1p0_val.json`): a list of `{"question_id": "22MexNkBPpdZGX6sxbxVBH",
//!   "image_id": 299207, "question", "choices", "correct_choice_idx", "direct_answers": [10
//!   strings], "split": "val", …}`; the direct answers are the human answers, scored by A-OKVQA's
//!   own rule (`eval_predictions.py`: `min(1, matches / 3)`, [`crate::metrics::AccuracyRule`]);
//!   its direct-answer evaluation also leaves out the `difficult_direct_answer` questions, which
//!   are kept here (the flag is in `extra`); the image is COCO 2017's
//!   `000000299207.jpg` in the image folder or its `val2017/` (`train2017/`, `test2017/`; each is
//!   tried when the record has no `split`) folder.

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::vqa::{
    answer_type, answers, check_image_dir, coco_image, missing, non_empty_string, object,
    parse_image_id, parse_question_id, question_text, wrong_type, Collector, DataFormat, Dataset,
    Entries, JsonTop, ReadOptions, VqaExample,
};

/// Whether a JSON object at the top of a file is TextVQA's: a `"data"` list (asked once our records
/// and VQAv2 are ruled out: `JsonLayout::of` in vqa.rs).
pub(super) fn is_textvqa(top: &Entries) -> bool {
    top.contains_key("data")
}

/// Whether a JSON object at the top of a file is GQA's questions: one of its first values is an
/// object with an `imageId` (a broken first record is then reported as such).
pub(super) fn is_gqa(top: &Entries) -> bool {
    top.0
        .iter()
        .take(10)
        .any(|(_, raw)| object(raw, "").is_ok_and(|entry| entry.contains_key("imageId")))
}

/// Whether a JSON list at the top of a file is A-OKVQA's: one of its first records has
/// `direct_answers`, or a COCO `image_id` and no `image` (a test file without answers).
pub(super) fn is_aokvqa(list: &[&RawValue]) -> bool {
    list.iter().take(10).any(|raw| {
        object(raw, "").is_ok_and(|entry| {
            entry.contains_key("direct_answers")
                || (entry.contains_key("image_id") && !entry.contains_key("image"))
        })
    })
}

/// Reads a TextVQA file (see the module's page); `top` is its parsed top level.
pub(super) fn textvqa_from_top(
    path: &Path,
    top: &JsonTop,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    let Some(list) = top.list_at("data") else {
        bail!(
            "{} is not a TextVQA file: expected a JSON object with a \"data\" list of \
             {{\"question_id\", \"question\", \"image_id\", \"answers\"}} records",
            path.display()
        );
    };
    check_image_dir(image_dir)?;
    let records = list
        .into_iter()
        .enumerate()
        .map(|(i, raw)| (format!("data[{i}]"), None, raw));
    collect(path, records, opts, DataFormat::TextVqa, |entry| {
        let question = take_question(entry)?;
        let image_id = image_file_id(entry, "image_id")?;
        Ok(Fields {
            question,
            image: find_image(
                image_dir,
                &format!("{image_id}.jpg"),
                &["train_images", "test_images"],
            )?,
            answers: optional_answers(entry.remove("answers"))?,
            answer_type: None,
        })
    })
}

/// The id a TextVQA or GQA record names its image by (`ID.jpg`), from `field`.
fn image_file_id(entry: &Map<String, Value>, field: &str) -> Result<String, String> {
    let id = entry
        .get(field)
        .ok_or_else(|| missing(field, "the image's id (its file name without .jpg)"))?;
    non_empty_string(field, id)
}

/// Reads a GQA questions file (see the module's page); `top` is its top-level object.
pub(super) fn gqa_from_top(
    path: &Path,
    top: &Entries,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    check_image_dir(image_dir)?;
    let records = top
        .0
        .iter()
        .map(|(id, raw)| (format!("question {id}"), Some(id.as_str()), *raw));
    collect(path, records, opts, DataFormat::Gqa, |entry| {
        let question = take_question(entry)?;
        let image_id = image_file_id(entry, "imageId")?;
        let answers = match entry.remove("answer") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(a)) if a.trim().is_empty() => {
                return Err(
                    "field \"answer\" is empty; give the answer (or leave the field out \
                            for questions without answers)"
                        .to_string(),
                )
            }
            Some(Value::String(a)) => vec![a],
            Some(v) => return Err(wrong_type("answer", "a string", &v)),
        };
        Ok(Fields {
            question,
            image: find_image(image_dir, &format!("{image_id}.jpg"), &["images"])?,
            answers,
            answer_type: None,
        })
    })
}

/// Reads an A-OKVQA file (see the module's page); `list` is its top-level list.
pub(super) fn aokvqa_from_list(
    path: &Path,
    list: Vec<&RawValue>,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    check_image_dir(image_dir)?;
    let records = list
        .into_iter()
        .enumerate()
        .map(|(i, raw)| (format!("entry {i}"), None, raw));
    collect(path, records, opts, DataFormat::AOkVqa, |entry| {
        let question = take_question(entry)?;
        let image_id = match entry.get("image_id") {
            Some(v) => parse_image_id(v)?,
            None => return Err(missing("image_id", "the COCO image id (an integer)")),
        };
        // The split names COCO 2017's folder; without one, each is tried.
        let folders: Vec<String> = match entry.get("split") {
            Some(Value::String(s))
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                vec![format!("{s}2017")]
            }
            _ => ["val", "train", "test"]
                .map(|s| format!("{s}2017"))
                .to_vec(),
        };
        let image = folders
            .iter()
            .find_map(|f| coco_image(image_dir, Some(f), image_id, &mut None).ok())
            .map_or_else(
                || coco_image(image_dir, Some(&folders[0]), image_id, &mut None),
                Ok,
            )?;
        Ok(Fields {
            question,
            image,
            answers: optional_answers(entry.remove("direct_answers"))?,
            answer_type: answer_type(entry.remove("answer_type"))?,
        })
    })
}

/// What a reader takes out of one record; the rest of the record goes to the example's `extra`.
struct Fields {
    question: String,
    image: PathBuf,
    answers: Vec<String>,
    answer_type: Option<String>,
}

/// The loop of every reader here: each record (where it is, for messages; its id when the file
/// keys records by id, else its `question_id` is read; the record) must be an object whose
/// `fields` can be read; a bad one names the question and is reported or skipped.
fn collect<'a>(
    path: &Path,
    records: impl Iterator<Item = (String, Option<&'a str>, &'a RawValue)>,
    opts: &ReadOptions,
    format: DataFormat,
    mut fields: impl FnMut(&mut Map<String, Value>) -> Result<Fields, String>,
) -> anyhow::Result<Dataset> {
    let mut c = Collector::new(opts);
    for (place, key, raw) in records {
        let mut entry = match object(raw, "an object with the question's fields") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(path, None, format!("{place} {why}"))?;
                continue;
            }
        };
        let id = match (key, entry.remove("question_id")) {
            (Some(k), _) if k.trim().is_empty() => Err(format!(
                "{place}: its key (the question's id) is empty; every question needs its own id"
            )),
            (Some(k), _) => Ok(k.to_string()),
            (None, Some(v)) => parse_question_id(&v).map_err(|reason| format!("{place}: {reason}")),
            (None, None) => Err(format!(
                "{place} has no \"question_id\"; add the question's id"
            )),
        };
        let id = match id {
            Ok(id) => id,
            Err(reason) => {
                c.bad(path, None, reason)?;
                continue;
            }
        };
        match fields(&mut entry) {
            Ok(f) => {
                let example = VqaExample {
                    question_id: id,
                    image: f.image,
                    question: f.question,
                    answers: f.answers,
                    answer_type: f.answer_type,
                    extra: entry,
                };
                c.accept(path, None, example)?;
            }
            Err(reason) => c.bad(path, None, format!("question {id}: {reason}"))?,
        }
    }
    c.finish(path, format)
}

/// The record's question text, taken out of it.
fn take_question(entry: &mut Map<String, Value>) -> Result<String, String> {
    let question = question_text(entry.get("question"))?;
    entry.remove("question");
    Ok(question)
}

/// Human answers that a test file leaves out (absent or null: none).
fn optional_answers(v: Option<Value>) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => answers(&v),
    }
}

/// `name` in `dir` or one of its `subfolders`, or a message naming every place looked at.
pub(super) fn find_image(dir: &Path, name: &str, subfolders: &[&str]) -> Result<PathBuf, String> {
    std::iter::once(dir.join(name))
        .chain(subfolders.iter().map(|sub| dir.join(sub).join(name)))
        .find(|p| p.exists())
        .ok_or_else(|| {
            let places = subfolders
                .iter()
                .map(|s| format!("{s}/"))
                .collect::<Vec<_>>()
                .join(" or ");
            format!(
                "image file {name} not found in {} or its {places} folder; give the folder that \
                 holds the images (--images for --data, --val-images for --val, --ood-images for --ood-data, \
                 --ood-val-images for --ood-val)",
                dir.display()
            )
        })
}
