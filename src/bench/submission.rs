//! `OUT/submission.json`: the test answers in the upload format of the data's evaluation server
//! (EvalAI), for test sets whose human answers are withheld (VQAv2 test-dev/test-std, VizWiz test,
//! TextVQA test, GQA submission, A-OKVQA test).
//!
//! - VQAv2: `[{"question_id": 262148000, "answer": "yes"}, …]` (the id a number, as in the
//!   questions file; LLaVA's `convert_vqav2_for_submission.py` writes the same);
//! - VizWiz: `[{"image": "VizWiz_test_00000000.jpg", "answer": "…"}, …]`;
//! - TextVQA: `[{"question_id": 34602, "answer": "…"}, …]` (the id a number, as in its file);
//! - GQA: `[{"questionId": "201307251", "prediction": "…"}, …]` (what GQA's `eval.py` reads);
//! - A-OKVQA: `{"22MexNkBPpdZGX6sxbxVBH": {"direct_answer": "…"}, …}` (the direct-answer part of
//!   its leaderboard's predictions file);
//! - JSONL and Parquet: `[{"question_id": "…", "answer": "…"}, …]` (an integer id as a number).
//!
//! The answer is the one the particles gave, abstained or not (the servers score every question),
//! normalised as the run scores it (`--normalize always`, the default: the official VQA
//! normalisation, as LLaVA's submission scripts apply EvalAI's answer processor; an answer
//! "Red." would otherwise score 0 against ten "red" on the server), or as generated with
//! `--normalize official`. Written only when every question of the test file was answered (not
//! for a shard, with `--limit`, or with questions or records skipped): a server refuses a partial
//! file. [`status`] says why a file was not written.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::config::{Role, RunConfig};
use super::samples::Sample;
use crate::data::normalize::normalize_answer;
use crate::data::vqa::DataFormat;
use crate::metrics::NormalizeMode;

pub const SUBMISSION_FILE: &str = "submission.json";

/// How a results note that there is no submission file begins.
pub const NOT_WRITTEN: &str = "no submission.json: ";

/// Writes `dir/submission.json`, or removes an old one when the run has none ([`status`] says
/// why).
pub fn write(dir: &Path, config: &RunConfig, samples: &[Sample]) -> Result<Option<PathBuf>> {
    let path = dir.join(SUBMISSION_FILE);
    let Ok(answers) = status(config, samples) else {
        crate::io::remove_file(&path)?;
        return Ok(None);
    };
    let (format, mode) = (answers.format, config.normalize);
    let answer = |s: &Sample| match mode {
        NormalizeMode::Always => normalize_answer(&s.answer),
        NormalizeMode::Official => s.answer.clone(),
    };
    let entries: Value = if format == DataFormat::AOkVqa {
        answers
            .samples
            .iter()
            .map(|s| (s.question_id.clone(), json!({"direct_answer": answer(s)})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    } else {
        answers
            .samples
            .iter()
            .map(|s| match format {
                DataFormat::VizWiz => json!({"image": file_name(&s.image), "answer": answer(s)}),
                DataFormat::Gqa => json!({"questionId": s.question_id, "prediction": answer(s)}),
                // VQAv2, TextVQA, our JSONL, Parquet.
                _ => json!({"question_id": numeric_id(&s.question_id), "answer": answer(s)}),
            })
            .collect()
    };
    crate::io::write_bytes_atomically(&path, &serde_json::to_vec(&entries)?)?;
    Ok(Some(path))
}

/// The test answers of a submission, in the file's order.
pub struct Answers<'a> {
    pub format: DataFormat,
    pub samples: Vec<&'a Sample>,
}

/// The test answers to submit, or why the run has no submission file.
pub fn status<'a>(config: &RunConfig, samples: &'a [Sample]) -> Result<Answers<'a>, String> {
    let Some(test) = config.data.iter().find(|d| d.role == Role::Test) else {
        return Err("the run has no test file".into());
    };
    let mut answers: Vec<&Sample> = samples.iter().filter(|s| s.split == test.split).collect();
    answers.sort_by_key(|s| s.index);
    let whole = "a server scores every question of the file";
    if test.skipped_records > 0 {
        return Err(format!(
            "{} bad record(s) of {} were left out (--skip-bad); {whole}",
            test.skipped_records, test.path
        ));
    }
    if test.selected < test.questions {
        return Err(format!(
            "--limit kept {} of the {} questions of {}; {whole}",
            test.selected, test.questions, test.path
        ));
    }
    if answers.len() < test.selected || answers.is_empty() {
        return Err(format!(
            "{} of the {} questions of {} are answered (a shard, a stopped run or questions \
             skipped); {whole}",
            answers.len(),
            test.selected,
            test.path
        ));
    }
    Ok(Answers {
        format: test.format,
        samples: answers,
    })
}

/// A question id as its file most likely has it: a number when it is one written the way a
/// number is (VQAv2's and TextVQA's ids, a JSONL file's integer ids, which EvalAI compares as
/// numbers), else the text ("05515938", "22MexNkBPpdZGX6sxbxVBH").
fn numeric_id(id: &str) -> Value {
    match id.parse::<u64>() {
        Ok(n) if n.to_string() == id => json!(n),
        _ => json!(id),
    }
}

fn file_name(image: &str) -> String {
    Path::new(image)
        .file_name()
        .map_or_else(|| image.to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vqav2_ids_are_numbers_as_in_the_questions_file() {
        assert_eq!(numeric_id("262148000"), json!(262148000u64));
        assert_eq!(numeric_id("q-7"), json!("q-7"));
        // A leading zero or sign is the id's own text, not a number.
        assert_eq!(numeric_id("05515938"), json!("05515938"));
        assert_eq!(numeric_id("+5"), json!("+5"));
        assert_eq!(
            file_name("/data/VizWiz_test_00000001.jpg"),
            "VizWiz_test_00000001.jpg"
        );
    }
}
