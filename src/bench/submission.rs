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
//! - JSONL: `[{"question_id": "…", "answer": "…"}, …]`.
//!
//! The answer is the one the particles gave, abstained or not (the servers score every question).
//! Written only when every test question was answered (not for a shard, nor with questions
//! skipped): a server refuses a partial file.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::config::{Role, RunConfig};
use super::samples::Sample;
use crate::data::vqa::DataFormat;

pub const SUBMISSION_FILE: &str = "submission.json";

/// Writes (or, for a run with unanswered test questions, removes) `dir/submission.json`.
pub fn write(dir: &Path, config: &RunConfig, samples: &[Sample]) -> Result<Option<PathBuf>> {
    let path = dir.join(SUBMISSION_FILE);
    let test = config.data.iter().find(|d| d.role == Role::Test);
    let mut answers: Vec<&Sample> = samples
        .iter()
        .filter(|s| test.is_some_and(|t| s.split == t.split))
        .collect();
    let Some(test) = test.filter(|t| answers.len() == t.selected && !answers.is_empty()) else {
        crate::io::remove_file(&path)?;
        return Ok(None);
    };
    answers.sort_by_key(|s| s.index);
    let entries: Value = if test.format == DataFormat::AOkVqa {
        answers
            .iter()
            .map(|s| (s.question_id.clone(), json!({"direct_answer": s.answer})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    } else {
        answers
            .iter()
            .map(|s| match test.format {
                DataFormat::VizWiz => json!({"image": file_name(&s.image), "answer": s.answer}),
                DataFormat::VqaV2 | DataFormat::TextVqa => {
                    json!({"question_id": numeric_id(&s.question_id), "answer": s.answer})
                }
                DataFormat::Gqa => json!({"questionId": s.question_id, "prediction": s.answer}),
                DataFormat::Jsonl | DataFormat::AOkVqa => {
                    json!({"question_id": s.question_id, "answer": s.answer})
                }
            })
            .collect()
    };
    crate::io::write_bytes_atomically(&path, &serde_json::to_vec(&entries)?)?;
    Ok(Some(path))
}

/// A VQAv2 or TextVQA question id as its file has it: a number (kept as text if it is none).
fn numeric_id(id: &str) -> Value {
    id.parse::<u64>().map_or_else(|_| json!(id), |n| json!(n))
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
        assert_eq!(
            file_name("/data/VizWiz_test_00000001.jpg"),
            "VizWiz_test_00000001.jpg"
        );
    }
}
