//! The official VQA answer normalisation against the official code's own outputs.
//!
//! `tests/fixtures/metrics/normalization.tsv` was written by `scripts/metrics_reference.py`, which
//! runs the official `vqaEval.py` (GT-Vision-Lab/VQA) unmodified under Python 2.7. Each row holds
//! three JSON strings: the input, `processPunctuation` of the whitespace-cleaned input, and the full
//! normalisation (`processDigitArticle` after that).

use std::path::PathBuf;

use bella_vqa::data::normalize::{
    clean_whitespace, contraction, normalize_answer, process_digit_article, process_punctuation,
};

fn table() -> Vec<(String, String, String)> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/normalization.tsv");
    let text = std::fs::read_to_string(&path).expect("normalization.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 3, "bad row {l:?}");
            let s = |i: usize| -> String { serde_json::from_str(cols[i]).expect("JSON string") };
            (s(0), s(1), s(2))
        })
        .collect()
}

#[test]
fn official_table_matches() {
    let rows = table();
    assert!(rows.len() > 500, "only {} rows", rows.len());
    let mut failures = Vec::new();
    for (input, punct, full) in &rows {
        let got_punct = process_punctuation(&clean_whitespace(input));
        let got_full = normalize_answer(input);
        if &got_punct != punct || &got_full != full {
            failures.push(format!(
                "{input:?}: punctuation {got_punct:?} (official {punct:?}), full {got_full:?} (official {full:?})"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn table_covers_the_brief() {
    let rows = table();
    let inputs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for must in [
        "dont",
        "isnt",
        "yall'll",
        "Black.",
        "black",
        "2.5",
        "10,000",
        "1.",
        "a dog",
        "The Cat",
        "two dogs",
        "yes!",
        "\"yes\"",
        "red/white",
        "t-shirt",
        "5:30",
        "100%",
        "trailing period.",
        "comma, separated, list",
    ] {
        assert!(inputs.contains(&must), "table lacks {must:?}");
    }
}

#[test]
fn hand_checked_examples() {
    let cases = [
        ("Black.", "black"),
        ("The Cat", "cat"),
        ("two dogs", "2 dogs"),
        ("10,000", "10000"),
        ("2.5", "2.5"),
        ("1.", "1"),
        ("yes!", "yes"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("yall'll", "y'all'll"),
        ("5:30", "5:30"),
        ("100%", "100%"),
        ("red/white", "red white"),
        ("red / white", "red white"),
        ("t-shirt", "t shirt"),
        ("\tAn  Apple\n", "apple"),
        ("", ""),
    ];
    for (input, want) in cases {
        assert_eq!(normalize_answer(input), want, "{input:?}");
    }
    // quirks kept from the official code
    assert_eq!(process_digit_article("Im"), "im"); // capitalised keys never match
    assert_eq!(normalize_answer("somebody'd"), "somebodyd");
    assert_eq!(normalize_answer("1,000/2"), "10002"); // digit-comma-digit removes every mark
    let dots = ".".repeat(40);
    assert_eq!(normalize_answer(&dots), ".".repeat(8)); // only 32 of 40 go (count = re.UNICODE = 32)
    assert_eq!(contraction("wont"), Some("won't"));
}

#[test]
fn idempotent_on_simple_answers() {
    for a in ["yes", "2", "cat", "don't", "red white", "2.5"] {
        assert_eq!(normalize_answer(&normalize_answer(a)), normalize_answer(a));
    }
}
