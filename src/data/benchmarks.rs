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
//!   strings], "split": "val", …}`; the direct answers are the human answers, scored by the VQA
//!   rule like every set here (A-OKVQA's own `eval_predictions.py` scores `min(1, matches / 3)`
//!   without the leave-one-out average, up to 0.1 higher for a question, and leaves out the
//!   `difficult_direct_answer` ones, which are kept in `extra`); the image is COCO 2017's
//!   `000000299207.jpg` in the image folder or its `val2017/` (`train2017/`, `test2017/`; each is
//!   tried when the record has no `split`) folder.

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde_json::{Map, Value};

use super::vqa::{
    answer_type, answers, check_image_dir, coco_image, missing, non_empty_string, object,
    parse_image_id, parse_question_id, question_text, wrong_type, Collector, DataFormat, Dataset,
    Entries, JsonTop, ReadOptions, VqaExample,
};

/// Whether a JSON object at the top of a file is TextVQA's: a `"data"` list.
pub(super) fn is_textvqa(top: &Entries) -> bool {
    top.contains_key("data") && !top.contains_key("questions")
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
pub(super) fn is_aokvqa(list: &[&serde_json::value::RawValue]) -> bool {
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
    let mut c = Collector::new(opts);
    for (i, raw) in list.into_iter().enumerate() {
        let mut entry = match object(raw, "an object with question_id, question and image_id") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(path, None, format!("data[{i}] {why}"))?;
                continue;
            }
        };
        let id = match required_id(&mut entry, i, "data") {
            Ok(id) => id,
            Err(reason) => {
                c.bad(path, None, reason)?;
                continue;
            }
        };
        let record = (|| {
            let question = question_text(entry.get("question"))?;
            let image_id = match entry.get("image_id") {
                Some(v) => non_empty_string("image_id", v)?,
                None => {
                    return Err(missing(
                        "image_id",
                        "the image's id (its file name without .jpg)",
                    ))
                }
            };
            let image = find_image(
                image_dir,
                &format!("{image_id}.jpg"),
                &["train_images", "test_images"],
            )?;
            let answers = optional_answers(entry.remove("answers"))?;
            Ok((question, image, answers))
        })();
        let (question, image, answers) = match record {
            Ok(r) => r,
            Err(reason) => {
                c.bad(path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        entry.remove("question");
        let example = VqaExample {
            question_id: id,
            image,
            question,
            answers,
            answer_type: None,
            extra: entry,
        };
        c.accept(path, None, example)?;
    }
    c.finish(path, DataFormat::TextVqa)
}

/// Reads a GQA questions file (see the module's page); `top` is its top-level object.
pub(super) fn gqa_from_top(
    path: &Path,
    top: &Entries,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    check_image_dir(image_dir)?;
    let mut c = Collector::new(opts);
    for (id, raw) in &top.0 {
        let mut entry = match object(raw, "an object with imageId, question and answer") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(path, None, format!("question {id} {why}"))?;
                continue;
            }
        };
        if id.trim().is_empty() {
            c.bad(
                path,
                None,
                "a question's key (its id) is empty; every question needs its own id".into(),
            )?;
            continue;
        }
        let record = (|| {
            let question = question_text(entry.get("question"))?;
            let image_id = match entry.get("imageId") {
                Some(v) => non_empty_string("imageId", v)?,
                None => {
                    return Err(missing(
                        "imageId",
                        "the image's id (its file name without .jpg)",
                    ))
                }
            };
            let image = find_image(image_dir, &format!("{image_id}.jpg"), &["images"])?;
            let answers = match entry.remove("answer") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(a)) if a.trim().is_empty() => {
                    return Err(
                        "field \"answer\" is empty; give the answer (or leave the field \
                                out for questions without answers)"
                            .to_string(),
                    )
                }
                Some(Value::String(a)) => vec![a],
                Some(v) => return Err(wrong_type("answer", "a string", &v)),
            };
            Ok((question, image, answers))
        })();
        let (question, image, answers) = match record {
            Ok(r) => r,
            Err(reason) => {
                c.bad(path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        entry.remove("question");
        let example = VqaExample {
            question_id: id.clone(),
            image,
            question,
            answers,
            answer_type: None,
            extra: entry,
        };
        c.accept(path, None, example)?;
    }
    c.finish(path, DataFormat::Gqa)
}

/// Reads an A-OKVQA file (see the module's page); `list` is its top-level list.
pub(super) fn aokvqa_from_list(
    path: &Path,
    list: Vec<&serde_json::value::RawValue>,
    image_dir: &Path,
    opts: &ReadOptions,
) -> anyhow::Result<Dataset> {
    check_image_dir(image_dir)?;
    let mut c = Collector::new(opts);
    for (i, raw) in list.into_iter().enumerate() {
        let mut entry = match object(raw, "an object with question_id, image_id and question") {
            Ok(entry) => entry,
            Err(why) => {
                c.bad(path, None, format!("entry {i} {why}"))?;
                continue;
            }
        };
        let id = match required_id(&mut entry, i, "entry") {
            Ok(id) => id,
            Err(reason) => {
                c.bad(path, None, reason)?;
                continue;
            }
        };
        let record = (|| {
            let question = question_text(entry.get("question"))?;
            let image_id = match entry.get("image_id") {
                Some(v) => parse_image_id(v)?,
                None => return Err(missing("image_id", "the COCO image id (an integer)")),
            };
            // The split names COCO 2017's folder; without one, each is tried.
            let folders: Vec<String> = match entry.get("split") {
                Some(Value::String(s))
                    if s.bytes().all(|b| b.is_ascii_alphanumeric()) && !s.is_empty() =>
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
            let answers = optional_answers(entry.remove("direct_answers"))?;
            let answer_type = answer_type(entry.remove("answer_type"))?;
            Ok((question, image, answers, answer_type))
        })();
        let (question, image, answers, answer_type) = match record {
            Ok(r) => r,
            Err(reason) => {
                c.bad(path, None, format!("question {id}: {reason}"))?;
                continue;
            }
        };
        entry.remove("question");
        let example = VqaExample {
            question_id: id,
            image,
            question,
            answers,
            answer_type,
            extra: entry,
        };
        c.accept(path, None, example)?;
    }
    c.finish(path, DataFormat::AOkVqa)
}

/// The record's `question_id`, taken out of it, or why it cannot be read.
fn required_id(entry: &mut Map<String, Value>, i: usize, list: &str) -> Result<String, String> {
    match entry.remove("question_id") {
        Some(v) => parse_question_id(&v).map_err(|reason| format!("{list}[{i}]: {reason}")),
        None => Err(format!(
            "{list}[{i}] has no \"question_id\"; add the question's id"
        )),
    }
}

/// Human answers that a test file leaves out (absent or null: none).
fn optional_answers(v: Option<Value>) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => answers(&v),
    }
}

/// `name` in `dir` or one of its `subfolders`, or a message naming every place looked at.
fn find_image(dir: &Path, name: &str, subfolders: &[&str]) -> Result<PathBuf, String> {
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
