//! VQA readers: our JSONL, VQAv2 (questions + annotations), VizWiz, TextVQA, GQA, A-OKVQA; bad
//! records and round trips.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use bella_vqa::data::vqa::{
    read_dataset, read_jsonl, read_vizwiz, read_vqav2, write_jsonl, BadRecord, DataFormat,
    ReadOptions, VqaExample,
};
use common::{SKIP, STRICT};
use serde_json::{json, Map, Value};

fn png(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(4, 3, image::Rgb([200, 10, 10]))
        .save(path)
        .unwrap();
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn record(id: &str, image: &str) -> String {
    json!({"question_id": id, "image": image, "question": "What color is the circle?",
           "answers": ["red", "red", "dark red"], "answer_type": "other"})
    .to_string()
}

/// The error as the CLI prints it, and the bad record it carries.
fn bad(err: anyhow::Error) -> (String, BadRecord) {
    let text = format!("{err:#}");
    let rec = err
        .downcast::<BadRecord>()
        .unwrap_or_else(|e| panic!("not a BadRecord: {e:#}"));
    (text, rec)
}

/// A folder with `images/1.png` and `images/2.png`.
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("images/1.png"));
    png(&dir.path().join("images/2.png"));
    dir
}

// --- JSONL ---------------------------------------------------------------------------------

#[test]
fn jsonl_with_extra_fields_round_trips() {
    let dir = folder();
    let mut extra = Map::new();
    extra.insert("family".into(), json!("color"));
    extra.insert(
        "scene".into(),
        json!({"objects": [{"shape": "circle", "bbox": [1, 2, 3, 4]}]}),
    );
    extra.insert("answerable".into(), json!(1));
    let examples = vec![
        VqaExample {
            question_id: "q1".into(),
            image: dir.path().join("images/1.png"),
            question: "What color is the circle?".into(),
            answers: vec!["red".into(), "red".into(), "dark red".into()],
            answer_type: Some("other".into()),
            extra,
        },
        VqaExample {
            question_id: "q2".into(),
            image: dir.path().join("images/2.png"),
            question: "How many shapes are there?".into(),
            answers: vec!["2".into(); 10],
            answer_type: None,
            extra: Map::new(),
        },
    ];
    let path = dir.path().join("data.jsonl");
    write_jsonl(&path, &examples).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.contains("\"image\":\"images/1.png\""), "{text}");
    assert!(
        !text.contains(dir.path().to_str().unwrap()),
        "absolute path written: {text}"
    );
    assert!(!text.contains("answer_type\":null"));
    let data = read_jsonl(&path, &STRICT).unwrap();
    assert_eq!(data.examples, examples);
    assert_eq!(data.format, DataFormat::Jsonl);
    assert_eq!(data.source, path);
    assert!(data.skipped.is_empty());
    assert!(data.has_answers());
    // No temporary files left behind.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn write_jsonl_keeps_images_outside_the_folder_absolute() {
    let dir = folder();
    let example = VqaExample {
        question_id: "q1".into(),
        image: dir.path().join("images/1.png"),
        question: "Q?".into(),
        answers: vec!["a".into()],
        answer_type: None,
        extra: Map::new(),
    };
    let path = dir.path().join("out/sub/data.jsonl");
    write_jsonl(&path, std::slice::from_ref(&example)).unwrap();
    let line: Value = serde_json::from_str(fs::read_to_string(&path).unwrap().trim()).unwrap();
    assert_eq!(
        PathBuf::from(line["image"].as_str().unwrap()),
        dir.path().join("images/1.png")
    );
    assert_eq!(read_jsonl(&path, &STRICT).unwrap().examples, vec![example]);
}

#[test]
fn numeric_question_id_and_relative_paths() {
    let dir = folder();
    let abs = dir.path().join("images/2.png");
    // The second record after a byte-order mark: a file saved on Windows concatenated in.
    let text = format!(
        "{}\n\n  \n\u{feff}{}\r\n",
        json!({"question_id": 17, "image": "images/1.png", "question": "Q?", "answers": ["x"]}),
        json!({"question_id": "q2", "image": abs, "question": "Q?", "answers": ["y"], "answer_type": null, "note": [1, 2]})
    );
    fs::create_dir_all(dir.path().join("sub")).unwrap();
    let path = dir.path().join("sub/../data.jsonl");
    write(&dir.path().join("data.jsonl"), &format!("\u{feff}{text}"));
    let data = read_jsonl(&path, &STRICT).unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data.examples[0].question_id, "17");
    assert_eq!(
        data.examples[0].image,
        dir.path().join("sub/../images/1.png")
    );
    assert!(data.examples[0].image.is_file());
    assert_eq!(data.examples[1].image, abs);
    assert_eq!(data.examples[1].answer_type, None);
    assert_eq!(data.examples[1].extra["note"], json!([1, 2]));

    // serde accepts the record too, numeric id included.
    let e: VqaExample = serde_json::from_str(
        r#"{"question_id": 5, "image": "a.png", "question": "Q?", "answers": [{"answer": "x"}], "k": true}"#,
    )
    .unwrap();
    assert_eq!(e.question_id, "5");
    assert_eq!(e.answers, vec!["x"]);
    assert_eq!(e.extra["k"], json!(true));
    assert!(serde_json::from_str::<VqaExample>(r#"{"question_id": 1.5}"#).is_err());
}

#[test]
fn bad_json_line_names_file_and_line() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    write(
        &path,
        &format!(
            "{}\n{{\"question_id\": \"q2\", \"image\": \n",
            record("q1", "images/1.png")
        ),
    );
    let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert_eq!(rec.line, Some(2));
    assert_eq!(rec.file, path);
    assert!(text.contains("data.jsonl line 2"), "{text}");
    assert!(text.contains("not valid JSON"), "{text}");
    // Half a UTF-16 pair, as Python's json.dumps writes a string holding one, followed by text
    // or by another escape: named as what it is.
    for question in [r"x\ud800 y", r"x\ud800\u0041 y"] {
        let line = record("q1", "images/1.png").replace("What color is the circle?", question);
        assert!(line.contains(question), "{line}");
        write(&path, &format!("{line}\n"));
        let (text, _) = bad(read_jsonl(&path, &STRICT).unwrap_err());
        assert!(
            text.contains("a lone UTF-16 surrogate"),
            "{question}: {text}"
        );
    }
}

#[test]
fn missing_field_and_wrong_type_name_the_field() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    let cases = [
        (
            json!({"question_id": "q", "image": "images/1.png", "answers": ["a"]}),
            "\"question\"",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "question": "Q?"}),
            "\"answers\"",
        ),
        (
            json!({"image": "images/1.png", "question": "Q?", "answers": ["a"]}),
            "\"question_id\"",
        ),
        (
            json!({"question_id": "q", "question": "Q?", "answers": ["a"]}),
            "\"image\"",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "question": 3, "answers": ["a"]}),
            "must be a string",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "question": "Q?", "answers": "a"}),
            "must be a list",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "question": "Q?", "answers": [2]}),
            "write it as \"2\"",
        ),
        (
            json!({"question_id": [1], "image": "images/1.png", "question": "Q?", "answers": ["a"]}),
            "string or an integer",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "question": "Q?", "answers": ["", "  "]}),
            "every answer is empty",
        ),
        (json!(["not", "an", "object"]), "expected a JSON object"),
        // What other formats call these fields, and image references that are not files.
        (
            json!({"question_id": "q", "image": "images/1.png", "question": "Q?", "answer": "a"}),
            "this record has \"answer\": give it as \"answers\"",
        ),
        (
            json!({"question_id": "q", "image": "images/1.png", "text": "Q?", "answers": ["a"]}),
            "this record has \"text\": rename it to \"question\"",
        ),
        (
            json!({"question_id": "q", "image": "data:image/png;base64,iVBOR", "question": "Q?", "answers": ["a"]}),
            "is a URL",
        ),
        (
            json!({"question_id": "q", "image": {"bytes": null, "path": "1.png"}, "question": "Q?", "answers": ["a"]}),
            "Hugging Face datasets",
        ),
    ];
    for (value, needle) in cases {
        write(
            &path,
            &format!("{}\n{value}\n", record("ok", "images/2.png")),
        );
        let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
        assert_eq!(rec.line, Some(2), "{text}");
        assert!(
            text.contains("line 2") && text.contains(needle),
            "{needle}: {text}"
        );
    }
    // An integer id too large to read exactly: said so, with the way out.
    write(
        &path,
        r#"{"question_id": 123456789012345678901234, "image": "images/1.png", "question": "Q?", "answers": ["a"]}"#,
    );
    let (text, _) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert!(
        text.contains("too large") && text.contains("as a string"),
        "{text}"
    );
}

#[test]
fn missing_and_unreadable_images() {
    let dir = folder();
    write(
        &dir.path().join("images/fake.png"),
        "this is text, not a PNG",
    );
    let path = dir.path().join("data.jsonl");

    write(&path, &format!("{}\n", record("q1", "images/none.png")));
    let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert_eq!(rec.line, Some(1));
    assert!(
        text.contains("none.png") && text.contains("not found"),
        "{text}"
    );

    write(
        &path,
        &format!(
            "{}\n{}\n",
            record("q1", "images/1.png"),
            record("q2", "images/fake.png")
        ),
    );
    let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert_eq!(rec.line, Some(2));
    assert!(
        text.contains("fake.png") && text.contains("cannot be read as an image"),
        "{text}"
    );
    // Without check_images the header is read: a file that is no image is refused all the same,
    // one cut short after a good header is not (it fails when its question is answered).
    let lenient = ReadOptions {
        skip_bad: false,
        check_images: false,
    };
    let (text, _) = bad(read_jsonl(&path, &lenient).unwrap_err());
    assert!(
        text.contains("fake.png") && text.contains("not an image"),
        "{text}"
    );
    let png = fs::read(dir.path().join("images/1.png")).unwrap();
    fs::write(dir.path().join("images/fake.png"), &png[..png.len() - 10]).unwrap();
    assert_eq!(read_jsonl(&path, &lenient).unwrap().len(), 2);
    let (text, _) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert!(text.contains("fake.png"), "{text}");
    // A TIFF with a good header whose compression (CCITT Group 3, which Pillow reads) the decoder
    // lacks: refused here too, not at its question.
    fs::write(dir.path().join("images/fax.tif"), fax3_tiff()).unwrap();
    write(&path, &format!("{}\n", record("q1", "images/fax.tif")));
    let (text, _) = bad(read_jsonl(&path, &lenient).unwrap_err());
    assert!(text.contains("fax.tif"), "{text}");
}

/// An 8×8 bilevel TIFF whose one strip is compressed with CCITT Group 3 (Compression = 3).
fn fax3_tiff() -> Vec<u8> {
    let mut t = b"II\x2a\x00\x08\x00\x00\x00".to_vec();
    let entries: [(u16, u16, u32); 8] = [
        (256, 3, 8),   // ImageWidth
        (257, 3, 8),   // ImageLength
        (258, 3, 1),   // BitsPerSample
        (259, 3, 3),   // Compression: CCITT Group 3
        (262, 3, 0),   // PhotometricInterpretation: WhiteIsZero
        (273, 4, 110), // StripOffsets
        (278, 3, 8),   // RowsPerStrip
        (279, 4, 8),   // StripByteCounts
    ];
    t.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        t.extend_from_slice(&tag.to_le_bytes());
        t.extend_from_slice(&kind.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&value.to_le_bytes());
    }
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(t.len(), 110);
    t.extend_from_slice(&[0u8; 8]);
    t
}

#[test]
fn skip_bad_counts_bad_records_and_keeps_good_ones() {
    let dir = folder();
    write(&dir.path().join("images/fake.png"), "text");
    let path = dir.path().join("data.jsonl");
    let lines = [
        record("q1", "images/1.png"),
        "{not json".to_string(),
        json!({"question_id": "q3", "image": "images/1.png", "answers": []}).to_string(),
        record("q4", "images/none.png"),
        record("q5", "images/fake.png"),
        record("q1", "images/2.png"),
        record("q7", "images/2.png"),
        json!({"question_id": "q8", "image": "images/1.png", "question": "Q?", "answers": vec!["a"; 11]}).to_string(),
    ];
    write(&path, &(lines.join("\n") + "\n"));
    let data = read_jsonl(&path, &SKIP).unwrap();
    let ids: Vec<&str> = data
        .examples
        .iter()
        .map(|e| e.question_id.as_str())
        .collect();
    assert_eq!(ids, ["q1", "q7"]);
    let bad_lines: Vec<Option<usize>> = data.skipped.iter().map(|b| b.line).collect();
    assert_eq!(
        bad_lines,
        [Some(2), Some(3), Some(4), Some(5), Some(6), Some(8)]
    );
    assert!(data.skipped.iter().all(|b| b.file == path));
    let dup = data.skipped[4].to_string();
    assert!(
        dup.contains("duplicate question_id \"q1\"") && dup.contains("first on line 1"),
        "{dup}"
    );
    assert!(
        data.skipped[5].reason.contains("at most 10"),
        "{}",
        data.skipped[5]
    );
}

#[test]
fn duplicate_question_id_is_an_error() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    write(
        &path,
        &format!(
            "{}\n{}\n",
            record("q1", "images/1.png"),
            record("q1", "images/2.png")
        ),
    );
    let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert_eq!(rec.line, Some(2));
    assert!(
        text.contains("duplicate question_id") && text.contains("line 1"),
        "{text}"
    );
}

#[test]
fn answers_on_some_records_only() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    let no_answers = |id: &str| {
        json!({"question_id": id, "image": "images/1.png", "question": "Q?", "answers": []})
            .to_string()
    };
    // A test set without answers is fine.
    write(
        &path,
        &format!("{}\n{}\n", no_answers("a"), no_answers("b")),
    );
    let data = read_jsonl(&path, &STRICT).unwrap();
    assert_eq!(data.len(), 2);
    assert!(!data.has_answers());
    // A record without answers among answered ones is not.
    write(
        &path,
        &format!("{}\n{}\n", record("q1", "images/1.png"), no_answers("b")),
    );
    let (text, rec) = bad(read_jsonl(&path, &STRICT).unwrap_err());
    assert_eq!(rec.line, Some(2));
    assert!(text.contains("no answers"), "{text}");
}

#[test]
fn missing_data_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.jsonl");
    let text = format!("{:#}", read_jsonl(&path, &STRICT).unwrap_err());
    assert!(text.contains("nope.jsonl"), "{text}");
    let text = format!("{:#}", read_jsonl(dir.path(), &STRICT).unwrap_err());
    assert!(text.contains("folder"), "{text}");
    let text = format!(
        "{:#}",
        read_vizwiz(&dir.path().join("val.json"), dir.path(), &STRICT).unwrap_err()
    );
    assert!(text.contains("val.json"), "{text}");
}

// --- VQAv2 ---------------------------------------------------------------------------------

fn vqav2_files(dir: &Path, subtype: Option<&str>) -> (PathBuf, PathBuf, PathBuf) {
    let images = dir.join("images");
    for id in [42u64, 7] {
        let name = format!("COCO_val2014_{id:012}.jpg");
        fs::create_dir_all(&images).unwrap();
        image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 255]))
            .save(images.join(name))
            .unwrap();
    }
    let mut questions = json!({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
    "questions": [
        {"image_id": 42, "question": "What color is the car?", "question_id": 42000},
        {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
        {"image_id": 7, "question": "How many dogs?", "question_id": 7000}
    ]});
    if let Some(s) = subtype {
        questions["data_subtype"] = json!(s);
    }
    let answers = |a: &[&str]| -> Value {
        a.iter()
            .enumerate()
            .map(|(i, x)| json!({"answer": x, "answer_confidence": "yes", "answer_id": i + 1}))
            .collect()
    };
    let annotations = json!({"annotations": [
        {"question_id": 7000, "image_id": 7, "answers": answers(&["2"; 10]), "answer_type": "number",
         "multiple_choice_answer": "2", "question_type": "how many"},
        {"question_id": 42000, "image_id": 42, "answers": answers(&["blue", "blue", "navy", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]),
         "answer_type": "other", "multiple_choice_answer": "blue", "question_type": "what color is the"},
        {"question_id": 42001, "image_id": 42, "answers": answers(&["no"; 10]), "answer_type": "yes/no",
         "multiple_choice_answer": "no", "question_type": "is it"}
    ]});
    let q = dir.join("v2_OpenEnded_mscoco_val2014_questions.json");
    let a = dir.join("v2_mscoco_val2014_annotations.json");
    fs::write(&q, questions.to_string()).unwrap();
    fs::write(&a, annotations.to_string()).unwrap();
    (q, a, images)
}

#[test]
fn vqav2_pair_reads_with_and_without_data_subtype() {
    for subtype in [Some("val2014"), None] {
        let dir = tempfile::tempdir().unwrap();
        let (q, a, images) = vqav2_files(dir.path(), subtype);
        let data = read_vqav2(&q, &a, &images, &STRICT).unwrap();
        assert_eq!(data.format, DataFormat::VqaV2);
        assert_eq!(data.len(), 3);
        let e = &data.examples[0];
        assert_eq!(e.question_id, "42000");
        assert_eq!(e.question, "What color is the car?");
        assert_eq!(e.answers.len(), 10);
        assert_eq!(e.answers[2], "navy");
        assert_eq!(e.answer_type.as_deref(), Some("other"));
        assert_eq!(e.image, images.join("COCO_val2014_000000000042.jpg"));
        assert_eq!(e.extra["multiple_choice_answer"], "blue");
        assert_eq!(e.extra["question_type"], "what color is the");
        assert_eq!(e.extra["image_id"], 42);
        assert_eq!(data.examples[2].answer_type.as_deref(), Some("number"));

        // read_dataset picks the same reader; the image folder defaults to the file's folder.
        let via = read_dataset(&q, Some(&a), Some(&images), &STRICT).unwrap();
        assert_eq!(via.examples, data.examples);

        // COCO 2017's names (the bare id), as the images come today: found too.
        for id in [42u64, 7] {
            fs::rename(
                images.join(format!("COCO_val2014_{id:012}.jpg")),
                images.join(format!("{id:012}.jpg")),
            )
            .unwrap();
        }
        let data = read_vqav2(&q, &a, &images, &STRICT).unwrap();
        assert_eq!(data.examples[0].image, images.join("000000000042.jpg"));
    }
}

#[test]
fn vqav2_without_data_subtype_finds_images_in_their_split_folder() {
    // COCO's archives unpack into val2014/ (train2014/, …): the folder named as the images is
    // searched when the questions file does not name its split.
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqav2_files(dir.path(), None);
    let split = images.join("val2014");
    fs::create_dir(&split).unwrap();
    for id in [42u64, 7] {
        let name = format!("COCO_val2014_{id:012}.jpg");
        fs::rename(images.join(&name), split.join(&name)).unwrap();
    }
    let data = read_vqav2(&q, &a, &images, &STRICT).unwrap();
    assert_eq!(
        data.examples[0].image,
        split.join("COCO_val2014_000000000042.jpg")
    );
    // Not any folder: one that is not a split's is not searched.
    let other = images.join("thumbnails");
    fs::rename(&split, &other).unwrap();
    let text = format!("{:#}", read_vqav2(&q, &a, &images, &STRICT).unwrap_err());
    assert!(text.contains("split folders"), "{text}");
}

/// VQA-CP v2's pair as it is published (`vqacp_v2_test_questions.json`,
/// `vqacp_v2_test_annotations.json`): bare lists, each record naming its COCO split, the
/// images in COCO 2014's split folders.
fn vqacp_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let images = dir.join("coco");
    for (split, id) in [("val2014", 42u64), ("train2014", 7)] {
        fs::create_dir_all(images.join(split)).unwrap();
        png_as(
            &images
                .join(split)
                .join(format!("COCO_{split}_{id:012}.jpg")),
        );
    }
    // The same id in the other split: the record's split chooses.
    png_as(
        &images
            .join("train2014")
            .join("COCO_train2014_000000000042.jpg"),
    );
    let questions = json!([
        {"image_id": 42, "question": "What color is the car?", "question_id": 42000, "coco_split": "val2014"},
        {"image_id": 7, "question": "How many dogs?", "question_id": 7000, "coco_split": "train2014"}
    ]);
    let answers = |a: &str, n: usize| -> Value {
        (0..10)
            .map(|i| json!({"answer": if i < n { a } else { "other" }, "answer_confidence": "yes", "answer_id": i + 1}))
            .collect()
    };
    let annotations = json!([
        {"question_type": "how many", "multiple_choice_answer": "2", "answers": answers("2", 10),
         "image_id": 7, "answer_type": "number", "question_id": 7000, "coco_split": "train2014"},
        {"question_type": "what color is the", "multiple_choice_answer": "blue",
         "answers": answers("blue", 2), "image_id": 42, "answer_type": "other",
         "question_id": 42000, "coco_split": "val2014"}
    ]);
    let q = dir.join("vqacp_v2_test_questions.json");
    let a = dir.join("vqacp_v2_test_annotations.json");
    fs::write(&q, questions.to_string()).unwrap();
    fs::write(&a, annotations.to_string()).unwrap();
    (q, a, images)
}

/// A small image written under `path` whatever its extension says (the reader goes by content).
fn png_as(path: &Path) {
    image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 255]))
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

#[test]
fn vqacp_questions_read_with_their_annotations_and_each_records_split() {
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqacp_files(dir.path());
    let data = read_dataset(&q, Some(&a), Some(&images), &STRICT).unwrap();
    // VQAv2's records, scored by VQAv2's rule.
    assert_eq!(data.format, DataFormat::VqaV2);
    assert_eq!(data.len(), 2);
    let car = &data.examples[0];
    assert_eq!(car.question_id, "42000");
    assert_eq!(car.answers.len(), 10);
    assert_eq!(car.answers.iter().filter(|a| *a == "blue").count(), 2);
    assert_eq!(car.answer_type.as_deref(), Some("other"));
    assert_eq!(car.extra["multiple_choice_answer"], "blue");
    assert_eq!(
        car.image,
        images.join("val2014").join("COCO_val2014_000000000042.jpg")
    );
    assert_eq!(
        data.examples[1].image,
        images
            .join("train2014")
            .join("COCO_train2014_000000000007.jpg")
    );

    // Without the annotations: said what is missing, not read as a test set.
    let text = format!(
        "{:#}",
        read_dataset(&q, None, Some(&images), &STRICT).unwrap_err()
    );
    assert!(
        text.contains("VQA-CP") && text.contains("annotations"),
        "{text}"
    );
    // The annotations given as the data: said which is which.
    let text = format!(
        "{:#}",
        read_dataset(&a, None, Some(&images), &STRICT).unwrap_err()
    );
    assert!(text.contains("annotations file"), "{text}");
}

#[test]
fn a_list_of_vqav2_records_with_their_answers_keeps_the_answers() {
    // A flattened VQAv2 (one list, answers in each record): read with its answers, never as an
    // A-OKVQA test file (which also names images by COCO id) without them.
    let dir = tempfile::tempdir().unwrap();
    let (_, _, images) = vqacp_files(dir.path());
    let flat = dir.path().join("vqa_flat.json");
    fs::write(
        &flat,
        json!([{"image_id": 7, "question": "How many dogs?", "question_id": 1,
                "answers": ["2", "2", "two", "2", "2", "2", "2", "2", "3", "2"]}])
        .to_string(),
    )
    .unwrap();
    // Image 7 is only in train2014/: found there without a split named.
    let data = read_dataset(&flat, None, Some(&images), &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::VqaV2);
    assert_eq!(data.examples[0].answers.len(), 10);
    assert_eq!(data.examples[0].answers[2], "two");
    assert_eq!(
        data.examples[0].image,
        images
            .join("train2014")
            .join("COCO_train2014_000000000007.jpg")
    );
}

#[test]
fn a_bare_vqav2_file_name_finds_its_images_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqav2_files(dir.path(), None);
    for f in [&q, &a] {
        fs::copy(f, images.join(f.file_name().unwrap())).unwrap();
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny-hub");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .current_dir(&images)
        .args(["bench", "--quiet", "--limit", "1", "--max-new-tokens", "2"])
        .args(["--bootstrap", "0", "--model"])
        .arg(&model)
        .args(["--data", q.file_name().unwrap().to_str().unwrap()])
        .args(["--annotations", a.file_name().unwrap().to_str().unwrap()])
        // The same pair as validation questions, with their own annotations and images.
        .arg("--val")
        .arg(&q)
        .arg("--val-annotations")
        .arg(&a)
        .arg("--val-images")
        .arg(&images)
        .args(["--out", "run"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(images.join("run").join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results["validation"]["count"], 1, "{results}");
}

#[test]
fn train_reads_vqav2_with_its_annotations_and_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqav2_files(dir.path(), Some("val2014"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny-hub");
    let train = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args([
                "train",
                "--quiet",
                "--particles",
                "2",
                "--max-steps",
                "1",
                "--model",
            ])
            .arg(&model)
            .arg("--data")
            .arg(&q)
            .arg("--out")
            .arg(dir.path().join("particles"))
            .args(extra)
            .output()
            .unwrap()
    };
    // Without its annotations the questions file cannot be trained on, and says so.
    let out = train(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs its annotations file"), "{err}");
    let out = train(&[
        "--annotations".as_ref(),
        a.as_os_str(),
        "--images".as_ref(),
        images.as_os_str(),
        "--val".as_ref(),
        q.as_os_str(),
        "--val-annotations".as_ref(),
        a.as_os_str(),
        "--val-images".as_ref(),
        images.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("particles/particles.safetensors").is_file());
}

#[test]
fn vqav2_errors_name_the_question() {
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqav2_files(dir.path(), Some("val2014"));
    // A question without annotation and a missing image.
    let mut questions: Value = serde_json::from_str(&fs::read_to_string(&q).unwrap()).unwrap();
    questions["questions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"image_id": 42, "question": "Extra?", "question_id": 99}));
    questions["questions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"image_id": 42, "question": "Again?", "question_id": 42000}));
    fs::write(&q, questions.to_string()).unwrap();
    fs::remove_file(images.join("COCO_val2014_000000000007.jpg")).unwrap();

    let (text, rec) = bad(read_vqav2(&q, &a, &images, &STRICT).unwrap_err());
    assert_eq!(rec.line, None);
    assert!(
        text.contains("question 7000") && text.contains("not found"),
        "{text}"
    );
    // Both names looked for are named (the 2017 one was not).
    assert!(text.contains("000000000007.jpg)"), "{text}");

    let data = read_vqav2(&q, &a, &images, &SKIP).unwrap();
    assert_eq!(data.len(), 2);
    let reasons: Vec<String> = data.skipped.iter().map(|b| b.to_string()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("question 7000"), "{reasons:?}");
    assert!(
        reasons[1].contains("question 99") && reasons[1].contains("no annotation"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("duplicate question_id \"42000\""),
        "{reasons:?}"
    );

    // Without annotations, read_dataset says what is needed.
    let text = format!(
        "{:#}",
        read_dataset(&q, None, Some(&images), &STRICT).unwrap_err()
    );
    assert!(text.contains("needs its annotations file"), "{text}");
    let text = format!(
        "{:#}",
        read_dataset(&a, None, Some(&images), &STRICT).unwrap_err()
    );
    assert!(text.contains("annotations file"), "{text}");
    // Not JSON at all.
    fs::write(&a, "{oops").unwrap();
    let text = format!("{:#}", read_vqav2(&q, &a, &images, &STRICT).unwrap_err());
    assert!(
        text.contains("v2_mscoco_val2014_annotations.json") && text.contains("not valid JSON"),
        "{text}"
    );
}

#[test]
fn vqav2_records_that_are_not_objects_and_files_of_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (q, a, images) = vqav2_files(dir.path(), Some("val2014"));
    // A byte-order mark, an annotation and a question that are not objects, and an annotation
    // whose question id is a list: each named with its index, the good records kept.
    let mut annotations: Value = serde_json::from_str(&fs::read_to_string(&a).unwrap()).unwrap();
    let list = annotations["annotations"].as_array_mut().unwrap();
    list.insert(1, json!("oops"));
    list.push(json!({"question_id": [1], "answers": []}));
    fs::write(&a, format!("\u{feff}{annotations}")).unwrap();
    let mut questions: Value = serde_json::from_str(&fs::read_to_string(&q).unwrap()).unwrap();
    questions["questions"]
        .as_array_mut()
        .unwrap()
        .push(json!(17));
    fs::write(&q, questions.to_string()).unwrap();

    let (text, _) = bad(read_vqav2(&q, &a, &images, &STRICT).unwrap_err());
    assert!(
        text.contains("annotations[1] is a string, expected an object"),
        "{text}"
    );
    let data = read_vqav2(&q, &a, &images, &SKIP).unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data.examples[1].answers, ["no"; 10]);
    let reasons: Vec<String> = data.skipped.iter().map(|b| b.to_string()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("annotations[1] is a string"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("annotations[4]"), "{reasons:?}");
    assert!(
        reasons[2].contains("questions[3] is a number"),
        "{reasons:?}"
    );

    // Records that are valid JSON text but not readable values say why, not "null".
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let questions = format!(
        r#"{{"data_subtype": "val2014", "questions": [{deep}, {{"image_id": 1e400, "question": "q?", "question_id": 5}}]}}"#
    );
    let q2 = dir.path().join("odd_questions.json");
    fs::write(&q2, questions).unwrap();
    let data = read_vqav2(&q2, &a, &images, &SKIP).unwrap();
    let reasons: Vec<String> = data.skipped.iter().map(|b| b.to_string()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("questions[0] cannot be read") && r.contains("recursion")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("questions[1] cannot be read") && r.contains("out of range")),
        "{reasons:?}"
    );

    // Files of the wrong shape say so, and invalid JSON is located.
    let cases = [
        (
            &q,
            r#"{"questions": {"image_id": 1}}"#,
            "has no \"questions\" list",
        ),
        (
            &q,
            "[1, 2]",
            "holds its answers (it is not a VQAv2 questions file)",
        ),
        (&q, "\"text\"", "none of the JSON formats bella-vqa reads"),
        (&a, r#"{"annotations": 3}"#, "has no \"annotations\" list"),
        // A bare list is VQA-CP's layout: this one annotates nothing.
        (&a, "[]", "no annotation in"),
        (
            &a,
            "\"text\"",
            "expected a JSON object with an \"annotations\" list",
        ),
        (
            &a,
            "{\"annotations\": [\n{\"question_id\": 1,}]}",
            "not valid JSON",
        ),
    ];
    for (file, content, expected) in cases {
        let (old_q, old_a) = (fs::read(&q).unwrap(), fs::read(&a).unwrap());
        fs::write(file, content).unwrap();
        let text = format!(
            "{:#}",
            read_dataset(&q, Some(&a), Some(&images), &STRICT).unwrap_err()
        );
        assert!(text.contains(expected), "{content}: {text}");
        assert!(text.contains(file.to_str().unwrap()), "{content}: {text}");
        if expected == "not valid JSON" {
            assert!(text.contains("line 2 column"), "{text}");
        }
        fs::write(&q, old_q).unwrap();
        fs::write(&a, old_a).unwrap();
    }
}

// --- VizWiz --------------------------------------------------------------------------------

#[test]
fn vizwiz_reads_answers_answerable_and_unanswerable() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("val");
    png(&images.join("VizWiz_val_00000000.jpg"));
    png(&images.join("VizWiz_val_00000001.jpg"));
    let ans = |a: &str| json!({"answer": a, "answer_confidence": "yes"});
    let list = json!([
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
         "answers": [ans("soup"), ans("soup"), ans("can of soup")], "answerable": 1, "answer_type": "other"},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color is this shirt?",
         "answers": [ans("unanswerable"), ans("unanswerable")], "answerable": 0, "answer_type": "unanswerable"}
    ]);
    let path = dir.path().join("Annotations/val.json");
    write(&path, &list.to_string());
    let data = read_vizwiz(&path, &images, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::VizWiz);
    assert_eq!(data.len(), 2);
    let (a, b) = (&data.examples[0], &data.examples[1]);
    assert_eq!(a.question_id, "VizWiz_val_00000000");
    assert_eq!(a.answers, ["soup", "soup", "can of soup"]);
    assert_eq!(a.extra["answerable"], 1);
    assert_eq!(a.image, images.join("VizWiz_val_00000000.jpg"));
    assert_eq!(b.answer_type.as_deref(), Some("unanswerable"));
    assert_eq!(b.extra["answerable"], 0);
    let via = read_dataset(&path, None, Some(&images), &STRICT).unwrap();
    assert_eq!(via.examples, data.examples);

    // A test set without answers.
    let test = json!([{"image": "VizWiz_val_00000000.jpg", "question": "What is this?"}]);
    write(&path, &test.to_string());
    let data = read_vizwiz(&path, &images, &STRICT).unwrap();
    assert!(!data.has_answers());

    // Bad records name the question.
    let broken = json!([
        {"image": "VizWiz_val_00000000.jpg", "question": 5, "answers": []},
        {"image": "VizWiz_val_00000009.jpg", "question": "Q?", "answers": [ans("x")]},
        {"question": "Q?"}
    ]);
    write(&path, &broken.to_string());
    let (text, _) = bad(read_vizwiz(&path, &images, &STRICT).unwrap_err());
    assert!(
        text.contains("question VizWiz_val_00000000") && text.contains("\"question\""),
        "{text}"
    );
    let data = read_vizwiz(&path, &images, &SKIP).unwrap();
    assert!(data.is_empty());
    assert_eq!(data.skipped.len(), 3);
    assert!(data.skipped[1].reason.contains("VizWiz_val_00000009.jpg"));
    assert!(
        data.skipped[1].reason.contains("--images"),
        "{}",
        data.skipped[1].reason
    );
    assert!(data.skipped[2].reason.contains("entry 2"));

    // Two questions on one image: the id both take from it is said to be the image's.
    let twice = json!([
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?"},
        {"image": "VizWiz_val_00000000.jpg", "question": "What color is it?"}
    ]);
    write(&path, &twice.to_string());
    let (text, _) = bad(read_vizwiz(&path, &images, &STRICT).unwrap_err());
    assert!(
        text.contains("entry 1")
            && text.contains("duplicate question_id \"VizWiz_val_00000000\"")
            && text.contains("named by its image")
            && text.contains("\"question_id\""),
        "{text}"
    );
}

#[test]
fn read_dataset_picks_the_reader() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    write(&path, &format!("{}\n", record("q1", "1.png")));
    // image_dir replaces the file's folder as the base of relative paths.
    let data = read_dataset(&path, None, Some(&dir.path().join("images")), &STRICT).unwrap();
    assert_eq!(data.examples[0].image, dir.path().join("images/1.png"));
    let text = format!(
        "{:#}",
        read_dataset(&path, Some(&path), None, &STRICT).unwrap_err()
    );
    assert!(text.contains("applies only to VQAv2"), "{text}");
    let other = dir.path().join("data.txt");
    write(&other, "a,b\n");
    let text = format!(
        "{:#}",
        read_dataset(&other, None, None, &STRICT).unwrap_err()
    );
    assert!(
        text.contains("cannot tell the format") && text.contains("data.txt"),
        "{text}"
    );
    let odd = dir.path().join("odd.json");
    write(&odd, "{\"something\": 1}");
    assert!(read_dataset(&odd, None, None, &STRICT).is_err());
}

// --- TextVQA, GQA, A-OKVQA -------------------------------------------------------------------

/// Each record as `(question_id, image file name, question, answers)`.
fn summary(data: &bella_vqa::data::Dataset) -> Vec<(String, String, String, Vec<String>)> {
    data.examples
        .iter()
        .map(|e| {
            (
                e.question_id.clone(),
                e.image.file_name().unwrap().to_string_lossy().into_owned(),
                e.question.clone(),
                e.answers.clone(),
            )
        })
        .collect()
}

#[test]
fn textvqa_files_are_read_with_their_images_in_the_archive_folders() {
    let dir = tempfile::tempdir().unwrap();
    // As the TextVQA archives unpack: train_images/ (train and val) and test_images/.
    png(&dir.path().join("train_images/0054c91397f2fe05.jpg"));
    png(&dir.path().join("test_images/00a1b2c3d4e5f607.jpg"));
    let ten = |a: &str, b: &str| -> Vec<String> {
        (0..10)
            .map(|i| if i < 7 { a } else { b }.to_string())
            .collect()
    };
    let file = json!({
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [
            {"question": "what is the brand of this camera?", "image_id": "0054c91397f2fe05",
             "image_classes": ["Camera"], "image_width": 1024, "image_height": 664,
             "answers": ten("nous les gosses", "dakota"), "question_tokens": ["what", "is"],
             "question_id": 34602, "set_name": "val"},
            {"question": "what does the small white text spell?", "image_id": "0054c91397f2fe05",
             "answers": ten("copenhagen", "thursday"), "question_id": 34603, "set_name": "val"},
            {"question": "what is written on the sign?", "image_id": "00a1b2c3d4e5f607",
             "answers": ten("stop", "stop"), "question_id": 34604, "set_name": "test"}
        ]
    });
    let path = dir.path().join("TextVQA_0.5.1_val.json");
    write(&path, &file.to_string());
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::TextVqa);
    assert_eq!(
        summary(&data),
        [
            (
                "34602".into(),
                "0054c91397f2fe05.jpg".into(),
                "what is the brand of this camera?".into(),
                ten("nous les gosses", "dakota")
            ),
            (
                "34603".into(),
                "0054c91397f2fe05.jpg".into(),
                "what does the small white text spell?".into(),
                ten("copenhagen", "thursday")
            ),
            (
                "34604".into(),
                "00a1b2c3d4e5f607.jpg".into(),
                "what is written on the sign?".into(),
                ten("stop", "stop")
            ),
        ]
    );
    assert_eq!(
        data.examples[0].image,
        dir.path().join("train_images/0054c91397f2fe05.jpg")
    );
    assert_eq!(
        data.examples[2].image,
        dir.path().join("test_images/00a1b2c3d4e5f607.jpg")
    );
    // Fields the example has no place for are kept.
    assert_eq!(data.examples[0].extra["image_classes"], json!(["Camera"]));
    assert_eq!(data.examples[0].extra["image_id"], "0054c91397f2fe05");

    // The test file has no answers.
    let mut test = file.clone();
    for r in test["data"].as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("answers");
    }
    write(&path, &test.to_string());
    assert!(!read_dataset(&path, None, None, &STRICT)
        .unwrap()
        .has_answers());

    // A missing image names the places looked at and the option; a bad record names the question.
    let mut broken = file.clone();
    broken["data"][1]["image_id"] = json!("ffffffffffffffff");
    broken["data"][2]["question"] = json!(7);
    write(&path, &broken.to_string());
    let (text, rec) = bad(read_dataset(&path, None, None, &STRICT).unwrap_err());
    assert!(
        text.contains("question 34603") && text.contains("ffffffffffffffff.jpg"),
        "{text}"
    );
    assert!(
        text.contains("train_images/ or test_images/") && text.contains("--images"),
        "{text}"
    );
    assert_eq!(rec.file, path);
    let data = read_dataset(&path, None, None, &SKIP).unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data.skipped.len(), 2);
    assert!(
        data.skipped[1].reason.contains("question 34604")
            && data.skipped[1].reason.contains("\"question\"")
    );
}

#[test]
fn gqa_questions_keep_the_file_order_and_score_their_one_answer() {
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("images/n161313.jpg"));
    png(&dir.path().join("images/2354786.jpg"));
    // Keys in an order no hash map keeps: the file's order must survive.
    let text = r#"{
        "201307251": {"semantic": [{"operation": "select", "argument": "sky"}], "entailed": [],
                      "equivalent": ["201307251"], "question": "Is it overcast?",
                      "imageId": "n161313", "isBalanced": true, "answer": "no",
                      "types": {"structural": "verify", "semantic": "attr"},
                      "fullAnswer": "No, it is clear."},
        "10": {"question": "Who is wearing the shirt?", "imageId": "2354786", "answer": "girl",
               "fullAnswer": "The girl is wearing the shirt."},
        "05515938": {"question": "Which color is the shirt?", "imageId": "2354786", "answer": "white"}
    }"#;
    let path = dir.path().join("testdev_balanced_questions.json");
    write(&path, text);
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::Gqa);
    assert_eq!(
        summary(&data),
        [
            (
                "201307251".into(),
                "n161313.jpg".into(),
                "Is it overcast?".into(),
                vec!["no".to_string()]
            ),
            (
                "10".into(),
                "2354786.jpg".into(),
                "Who is wearing the shirt?".into(),
                vec!["girl".to_string()]
            ),
            (
                "05515938".into(),
                "2354786.jpg".into(),
                "Which color is the shirt?".into(),
                vec!["white".to_string()]
            ),
        ]
    );
    assert_eq!(data.examples[0].extra["fullAnswer"], "No, it is clear.");
    assert_eq!(data.examples[0].extra["imageId"], "n161313");
    // One human answer: the VQA rule is GQA's exact match (after normalisation).
    use bella_vqa::metrics::{vqa_accuracy, NormalizeMode};
    let official = NormalizeMode::default();
    assert_eq!(vqa_accuracy("No", &data.examples[0].answers, official), 1.0);
    assert_eq!(
        vqa_accuracy("yes", &data.examples[0].answers, official),
        0.0
    );

    // The submission file has no answers; a wrong answer type is a bad record.
    write(
        &path,
        &text
            .replace(r#", "answer": "no""#, "")
            .replace(r#", "answer": "girl""#, "")
            .replace(r#", "answer": "white""#, ""),
    );
    assert!(!read_dataset(&path, None, None, &STRICT)
        .unwrap()
        .has_answers());
    write(
        &path,
        &text.replace(r#""answer": "girl""#, r#""answer": ["girl"]"#),
    );
    let (text, _) = bad(read_dataset(&path, None, None, &STRICT).unwrap_err());
    assert!(
        text.contains("question 10") && text.contains("\"answer\" must be a string"),
        "{text}"
    );
}

#[test]
fn aokvqa_direct_answers_with_coco_2017_images() {
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("val2017/000000299207.jpg"));
    png(&dir.path().join("val2017/000000057005.jpg"));
    let ten = |a: &'static str| -> Vec<&'static str> { vec![a; 10] };
    let list = json!([
        {"split": "val", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
         "question": "What is the man by the bags awaiting?",
         "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
         "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi",
                            "cab", "cab", "his ride"],
         "difficult_direct_answer": false, "rationales": ["A train would not be on the street."]},
        {"split": "val", "image_id": 57005, "question_id": "2AHHKxgVZ6DwXHWNkBKHpr",
         "question": "What type of bird is this?", "choices": ["owl", "duck", "crow", "eagle"],
         "correct_choice_idx": 1, "direct_answers": ten("duck"), "difficult_direct_answer": false}
    ]);
    let path = dir.path().join("aokvqa_v1p0_val.json");
    write(&path, &list.to_string());
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::AOkVqa);
    assert_eq!(data.len(), 2);
    let a = &data.examples[0];
    assert_eq!(a.question_id, "22MexNkBPpdZGX6sxbxVBH");
    assert_eq!(a.image, dir.path().join("val2017/000000299207.jpg"));
    assert_eq!(a.answers.len(), 10);
    assert_eq!(a.answers[3], "taxi");
    assert_eq!(
        a.extra["choices"],
        json!(["skateboarder", "train", "delivery", "cab"])
    );
    assert_eq!(a.extra["correct_choice_idx"], 3);
    // "cab" from 2 of 10 humans: A-OKVQA's eval_predictions.py scores min(1, 2 / 3), where the
    // VQA rule averages 2/3 and 1/3 over the 10 leave-one-out sets; the format picks its rule.
    use bella_vqa::metrics::NormalizeMode;
    let rule = data.format.accuracy_rule();
    let acc = rule.accuracy("cab", &a.answers, NormalizeMode::default());
    assert!((acc - 2.0 / 3.0).abs() < 1e-12, "{acc}");
    let vqa = bella_vqa::metrics::vqa_accuracy("cab", &a.answers, NormalizeMode::default());
    assert!(
        (vqa - (8.0 * (2.0 / 3.0) + 2.0 * (1.0 / 3.0)) / 10.0).abs() < 1e-12,
        "{vqa}"
    );
    // Three matches: 1 (the VQA rule's 0.9).
    let three = ["x", "x", "x", "y", "y", "y", "y", "y", "y", "y"];
    assert_eq!(rule.accuracy("x", &three, NormalizeMode::default()), 1.0);
    assert_eq!(
        rule.accuracy("boat", &a.answers, NormalizeMode::default()),
        0.0
    );

    // The test split has no direct answers (and no correct choice): a test set.
    let test = json!([{"split": "test", "image_id": 57005, "question_id": "t1",
                       "question": "What type of bird is this?", "choices": ["owl", "duck", "crow", "eagle"]}]);
    png(&dir.path().join("test2017/000000057005.jpg"));
    write(&path, &test.to_string());
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::AOkVqa);
    assert!(!data.has_answers());
    assert_eq!(
        data.examples[0].image,
        dir.path().join("test2017/000000057005.jpg")
    );

    // A missing image names the COCO file and the folder.
    let mut broken = list.clone();
    broken[1]["image_id"] = json!(1);
    write(&path, &broken.to_string());
    let (text, _) = bad(read_dataset(&path, None, None, &STRICT).unwrap_err());
    assert!(
        text.contains("question 2AHHKxgVZ6DwXHWNkBKHpr") && text.contains("000000000001.jpg"),
        "{text}"
    );
}

#[test]
fn an_unknown_json_layout_names_the_formats_and_our_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.json");
    write(&path, r#"{"version": 1, "items": [{"q": "?"}]}"#);
    let text = format!(
        "{:#}",
        read_dataset(&path, None, None, &STRICT).unwrap_err()
    );
    assert!(
        text.contains("none of the JSON formats")
            && text.contains("TextVQA")
            && text.contains("our JSONL"),
        "{text}"
    );
    // An annotations file with a format that holds its answers is refused, not ignored.
    png(&dir.path().join("train_images/a.jpg"));
    write(
        &path,
        &json!({"data": [{"question_id": 1, "question": "?", "image_id": "a", "answers": ["x"]}]})
            .to_string(),
    );
    let text = format!(
        "{:#}",
        read_dataset(&path, Some(&path), None, &STRICT).unwrap_err()
    );
    assert!(text.contains("holds its answers"), "{text}");
}

#[test]
fn vqav2_test_questions_need_no_annotations_and_find_their_test2015_images() {
    let dir = tempfile::tempdir().unwrap();
    // test-dev2015 names the images of test2015, where its questions come from.
    png(&dir.path().join("test2015/COCO_test2015_000000262144.jpg"));
    let questions = json!({
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
        "data_subtype": "test-dev2015",
        "questions": [
            {"image_id": 262144, "question": "Is the ball flying towards the batter?", "question_id": 262144000},
            {"image_id": 262144, "question": "What is the man holding?", "question_id": 262144001}
        ]
    });
    let path = dir
        .path()
        .join("v2_OpenEnded_mscoco_test-dev2015_questions.json");
    write(&path, &questions.to_string());
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::VqaV2);
    assert!(!data.has_answers());
    assert_eq!(
        summary(&data),
        [
            (
                "262144000".into(),
                "COCO_test2015_000000262144.jpg".into(),
                "Is the ball flying towards the batter?".into(),
                vec![]
            ),
            (
                "262144001".into(),
                "COCO_test2015_000000262144.jpg".into(),
                "What is the man holding?".into(),
                vec![]
            ),
        ]
    );
    // A split with answers still needs its annotations.
    let mut val = questions.clone();
    val["data_subtype"] = json!("val2014");
    write(&path, &val.to_string());
    let text = format!(
        "{:#}",
        read_dataset(&path, None, None, &STRICT).unwrap_err()
    );
    assert!(text.contains("needs its annotations file"), "{text}");
}

#[test]
fn vizwiz_images_are_found_where_the_archives_unpack() {
    let dir = tempfile::tempdir().unwrap();
    // VizWiz's layout: Annotations/val.json beside val/.
    png(&dir.path().join("val/VizWiz_val_00000000.jpg"));
    let path = dir.path().join("Annotations/val.json");
    write(
        &path,
        &json!([{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
                 "answers": [{"answer": "soup", "answer_confidence": "yes"}], "answerable": 1}])
        .to_string(),
    );
    let data = read_dataset(&path, None, None, &STRICT).unwrap();
    assert_eq!(
        data.examples[0].image,
        dir.path().join("val/VizWiz_val_00000000.jpg")
    );
    // The folder of the images, or the folder above their split's.
    for images in [dir.path().join("val"), dir.path().to_path_buf()] {
        let data = read_dataset(&path, None, Some(&images), &STRICT).unwrap();
        assert!(data.examples[0].image.is_file(), "{}", images.display());
    }
}

#[test]
fn files_in_other_shapes_are_read_or_named_with_what_to_do() {
    let dir = folder();
    let records: Vec<Value> = ["q1", "q2"]
        .iter()
        .zip(["images/1.png", "images/2.png"])
        .map(|(id, image)| serde_json::from_str(&record(id, image)).unwrap())
        .collect();
    let expected = read_dataset(
        &{
            let p = dir.path().join("d.jsonl");
            write(
                &p,
                &records
                    .iter()
                    .map(|r| r.to_string() + "\n")
                    .collect::<String>(),
            );
            p
        },
        None,
        None,
        &STRICT,
    )
    .unwrap();
    // Our records one per line under a .json name (Hugging Face datasets' to_json), or in a list.
    let lines = dir.path().join("lines.json");
    write(
        &lines,
        &records
            .iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    );
    let list = dir.path().join("list.json");
    write(&list, &Value::Array(records.clone()).to_string());
    let under_data = dir.path().join("data.json");
    write(&under_data, &json!({"data": records}).to_string());
    for path in [&lines, &list, &under_data] {
        let data = read_dataset(path, None, None, &STRICT).unwrap();
        assert_eq!(data.format, DataFormat::Jsonl, "{}", path.display());
        assert_eq!(data.examples, expected.examples, "{}", path.display());
    }
    // GQA whose first record is broken: the record is named, and --skip-bad gets past it.
    png(&dir.path().join("n1.jpg"));
    let gqa = dir.path().join("gqa.json");
    write(
        &gqa,
        r#"{"1": "oops", "2": {"question": "What color?", "imageId": "n1", "answer": "red"}}"#,
    );
    let (text, _) = bad(read_dataset(&gqa, None, None, &STRICT).unwrap_err());
    assert!(text.contains("question 1 is a string"), "{text}");
    assert_eq!(read_dataset(&gqa, None, None, &SKIP).unwrap().len(), 1);
    // What cannot be read says what to do.
    // UTF-16 without a byte-order mark reads as UTF-8 with NULs (Windows' "Unicode" save).
    let utf16 =
        |text: &str| -> Vec<u8> { text.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let line = r#"{"question_id": 1, "question": "What?", "image": "a.png", "answers": ["red"]}"#;
    let no_bom = "looks like UTF-16 without a byte-order mark; save it as UTF-8";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.json", b"{}".to_vec(), "holds no questions"),
        ("data.csv", b"question,image\n".to_vec(), "write our JSONL"),
        ("data.parquet", b"PAR1".to_vec(), "truncated or damaged Parquet"),
        ("utf16.json", b"\xff\xfe[\x00]\x00".to_vec(), "save it as UTF-8"),
        ("utf16-no-bom.json", utf16(&format!("[{line}]")), no_bom),
        ("utf16-no-bom.jsonl", utf16(&format!("{line}\n")), no_bom),
        // One stray raw NUL in UTF-8 text is no UTF-16.
        (
            "stray-nul.jsonl",
            format!("{}\n", line.replace("What?", "What\0?")).into_bytes(),
            "holds 1 NUL byte(s), which JSON never does",
        ),
        (
            "stray-nul.json",
            format!("[{}]", line.replace("What?", "What\0?")).into_bytes(),
            "holds 1 NUL byte(s), which JSON never does",
        ),
        (
            "nul-image.jsonl",
            br#"{"question_id": 1, "question": "What?", "image": "a\u0000.png", "answers": ["red"]}"#
                .to_vec(),
            r#"field "image" "a\0.png" holds a NUL character"#,
        ),
    ];
    for (name, content, expected) in cases {
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        let text = format!(
            "{:#}",
            read_dataset(&path, None, None, &STRICT).unwrap_err()
        );
        assert!(
            text.contains(expected) && text.contains(name),
            "{name}: {text}"
        );
    }
}

#[test]
fn llava_evaluation_question_files_are_read_as_test_sets() {
    // LLaVA-1.5's llava_vqav2_mscoco_test-dev2015.jsonl: the question is "text" (with its answer
    // instruction), no answers; images relative to the image folder.
    let dir = tempfile::tempdir().unwrap();
    png(&dir.path().join("test2015/COCO_test2015_000000262144.jpg"));
    let text = "Is the ball flying towards the batter?\nAnswer the question using a single word or phrase.";
    let path = dir.path().join("llava_vqav2_mscoco_test-dev2015.jsonl");
    write(
        &path,
        &format!(
            "{}\n",
            json!({"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg",
                   "text": text, "category": "default"})
        ),
    );
    let data = read_dataset(&path, None, Some(&dir.path().join("test2015")), &STRICT).unwrap();
    assert_eq!(data.format, DataFormat::Jsonl);
    let e = &data.examples[0];
    assert_eq!(
        (e.question_id.as_str(), e.question.as_str()),
        ("262144000", text)
    );
    assert!(e.answers.is_empty());
    assert_eq!(e.extra["category"], "default");
    assert!(!e.extra.contains_key("text"));
}

/// `--limit N` on a JSONL file reads its first N good questions only: the lines after them are
/// counted (for a benchmark's record of a part of the file), not parsed, their images not
/// checked (a 50 000-question file took 23 s before `train --limit 1000` began, 0.5 s now).
#[test]
fn a_limit_reads_the_first_good_questions_of_a_jsonl_file_and_counts_the_rest() {
    let dir = folder();
    let path = dir.path().join("data.jsonl");
    png(&dir.path().join("images/1.png"));
    let lines = [
        record("q1", "images/1.png"),
        "not json".to_string(),
        record("q2", "images/1.png"),
        String::new(),
        record("q3", "images/none.png"),
        "{ cut short".to_string(),
    ];
    write(&path, &(lines.join("\n") + "\n"));
    let up_to =
        |limit| bella_vqa::data::read_dataset_up_to(&path, None, None, &SKIP, Some(limit)).unwrap();
    let two = up_to(2);
    let ids: Vec<_> = two
        .examples
        .iter()
        .map(|e| e.question_id.as_str())
        .collect();
    assert_eq!(ids, ["q1", "q2"]);
    assert_eq!(two.skipped.len(), 1, "the bad line before the limit");
    assert_eq!(
        two.unread, 2,
        "the missing image and the bad line after it, not checked"
    );
    // Without a limit the whole file is read, its bad records with it.
    let all = read_dataset(&path, None, None, &SKIP).unwrap();
    assert_eq!((all.len(), all.skipped.len(), all.unread), (2, 3, 0));
}
