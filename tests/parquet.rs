//! Hugging Face datasets' Parquet files (lmms-eval's benchmarks): each fixture in
//! tests/fixtures/parquet/ was written by the real `datasets` / pyarrow together with the same
//! rows as our JSONL (scripts/make_parquet_fixtures.py), and must read as that JSONL reads; its
//! embedded images are extracted once, byte for byte; `--limit` extracts only its rows; bad
//! files are named with what to do, never a panic; `bench` answers a Parquet file as its JSONL.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use bella_vqa::data::parquet::read_parquet;
use bella_vqa::data::{read_dataset, read_jsonl, BadRecord, DataFormat, Dataset, ReadOptions};
use common::{fixture, SKIP, STRICT};
use serde_json::Value;

fn parquet(name: &str) -> PathBuf {
    fixture("parquet").join(name)
}

/// Reads `path` with the image cache `cache`.
fn read(path: &Path, images: Option<&Path>, limit: Option<usize>, cache: &Path) -> Dataset {
    read_parquet(path, images, &STRICT, limit, cache)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn read_err(path: &Path, images: Option<&Path>, opts: &ReadOptions) -> String {
    let cache = tempfile::tempdir().unwrap();
    match read_parquet(path, images, opts, None, cache.path()) {
        Ok(d) => panic!("{} read: {} examples", path.display(), d.len()),
        Err(e) => format!("{e:#}"),
    }
}

/// The files in the image cache.
fn cached(cache: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(cache)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// The Parquet data set reads as its JSONL twin: the same ids, questions, answers, answer types
/// and extra fields in the same order, each image a file with the bytes of the twin's image.
fn assert_reads_as_jsonl(
    parquet_path: &Path,
    jsonl: &str,
    images: Option<&Path>,
    cache: &Path,
) -> Dataset {
    let got = read(parquet_path, images, None, cache);
    let want = read_jsonl(&parquet(jsonl), &STRICT).unwrap();
    assert_eq!(got.format, DataFormat::Parquet);
    assert_eq!(got.source, parquet_path);
    assert_eq!(got.unread, 0);
    assert!(got.skipped.is_empty());
    assert_eq!(got.len(), want.len(), "{}", parquet_path.display());
    for (g, w) in got.examples.iter().zip(&want.examples) {
        let name = format!("{} question {}", parquet_path.display(), w.question_id);
        assert_eq!(g.question_id, w.question_id, "{name}");
        assert_eq!(g.question, w.question, "{name}");
        assert_eq!(g.answers, w.answers, "{name}");
        assert_eq!(g.answer_type, w.answer_type, "{name}");
        assert_eq!(g.extra, w.extra, "{name}");
        assert_eq!(
            fs::read(&g.image).unwrap(),
            fs::read(&w.image).unwrap(),
            "{name}: image {}",
            g.image.display()
        );
    }
    got
}

#[test]
fn each_lmms_eval_layout_reads_as_its_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    // VQAv2: int ids, list<struct{answer, answer_confidence, answer_id}> answers, `datasets`'
    // own writer (snappy, images uncompressed).
    let vqav2 = assert_reads_as_jsonl(&parquet("vqav2.parquet"), "vqav2.jsonl", None, cache);
    assert_eq!(vqav2.examples[0].question_id, "262148000");
    assert_eq!(vqav2.examples[0].extra["multiple_choice_answer"], "square");
    assert!(vqav2.has_answers());
    // Embedded images go to the cache, named by their content.
    let image = &vqav2.examples[0].image;
    assert_eq!(image.extension().unwrap(), "png");
    let hash = bella_vqa::io::sha256_bytes(&fs::read(image).unwrap());
    assert_eq!(image.file_stem().unwrap().to_str().unwrap(), hash);
    // TextVQA: list<string> answers and list columns kept; gzip.
    let textvqa = assert_reads_as_jsonl(&parquet("textvqa.parquet"), "textvqa.jsonl", None, cache);
    assert_eq!(
        textvqa.examples[0].extra["ocr_tokens"],
        serde_json::json!(["nous", "les", "gosses"])
    );
    // A test split without answers (VizWiz's, string ids, null answers).
    let test = assert_reads_as_jsonl(
        &parquet("vizwiz-test.parquet"),
        "vizwiz-test.jsonl",
        None,
        cache,
    );
    assert!(!test.has_answers());
    // ChartQA: no id column (the row's position), one `answer`.
    assert_reads_as_jsonl(&parquet("chartqa.parquet"), "chartqa.jsonl", None, cache);
    // `id` ids, one `answer`, the image a plain binary column.
    assert_reads_as_jsonl(&parquet("plain.parquet"), "plain.jsonl", None, cache);
    // Images not embedded (null bytes, a path): found in --images.
    assert_reads_as_jsonl(
        &parquet("paths.parquet"),
        "paths.jsonl",
        Some(&fixture("images")),
        cache,
    );
    // GQA's questions: no image column, `imageId` names IMAGE_ID.jpg in --images; its structs and
    // lists of structs are kept as JSON.
    let gqa = assert_reads_as_jsonl(
        &parquet("gqa.parquet"),
        "gqa.jsonl",
        Some(&parquet("gqa-images")),
        cache,
    );
    assert_eq!(
        gqa.examples[1].extra["semantic"][1]["dependencies"],
        serde_json::json!([0])
    );
    // A folder of one split's two shards: the rows of both, in shard order.
    assert_reads_as_jsonl(&parquet("shards"), "vqav2.jsonl", None, cache);
}

#[test]
fn images_are_extracted_once_by_content_and_not_rewritten() {
    let cache = tempfile::tempdir().unwrap();
    let data = read(&parquet("vqav2.parquet"), None, None, cache.path());
    // Four questions, three images (two questions share one).
    let files = cached(cache.path());
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(data.examples[0].image, data.examples[1].image);
    let sources: BTreeSet<Vec<u8>> = ["square.png", "wide.png", "photo.png"]
        .iter()
        .map(|n| fs::read(fixture("images").join(n)).unwrap())
        .collect();
    let extracted: BTreeSet<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert_eq!(extracted, sources);
    // A second read (the same file, or the shards holding the same rows) leaves them as they are.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for f in &files {
        fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let again = read(&parquet("shards"), None, None, cache.path());
    assert_eq!(again.examples, data.examples);
    assert_eq!(cached(cache.path()), files);
    for f in &files {
        assert_eq!(
            fs::metadata(f).unwrap().modified().unwrap(),
            old,
            "{}",
            f.display()
        );
    }
}

#[test]
fn a_limit_reads_and_extracts_only_its_rows() {
    let cache = tempfile::tempdir().unwrap();
    let shards = parquet("shards");
    let one = read(&shards, None, Some(1), cache.path());
    assert_eq!(one.len(), 1);
    assert_eq!(
        one.unread, 3,
        "the first shard's second row and the second shard"
    );
    assert_eq!(cached(cache.path()).len(), 1);
    // Into the second shard: its first row's image only.
    let three = read(&shards, None, Some(3), cache.path());
    assert_eq!(three.len(), 3);
    assert_eq!(three.unread, 1);
    assert_eq!(cached(cache.path()).len(), 2);
    assert_eq!(three.examples[..1], one.examples[..]);
}

// --- Bad input --------------------------------------------------------------------------------

#[test]
fn bad_files_are_named_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let good = fs::read(parquet("vqav2.parquet")).unwrap();

    // Cut short: the footer is gone.
    let truncated = tmp.path().join("truncated.parquet");
    fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let err = read_err(&truncated, None, &STRICT);
    assert!(
        err.contains("truncated.parquet is a truncated or damaged Parquet file")
            && err.contains("fetch it again"),
        "{err}"
    );
    // Not Parquet at all.
    let text = tmp.path().join("text.parquet");
    fs::write(&text, "{\"question\": \"what?\"}\n").unwrap();
    let err = read_err(&text, None, &STRICT);
    assert!(err.contains("text.parquet is not a Parquet file"), "{err}");
    let empty = tmp.path().join("empty.parquet");
    fs::write(&empty, "").unwrap();
    let err = read_err(&empty, None, &STRICT);
    assert!(err.contains("empty.parquet is not a Parquet file"), "{err}");

    // No question column: the columns it has are listed.
    let err = read_err(&parquet("bad/no-question.parquet"), None, &STRICT);
    assert!(
        err.contains("no-question.parquet: no \"question\" column; its columns are question_id (integer), text (string), image (struct<bytes: binary, path: string>)"),
        "{err}"
    );
    // A column of a type it cannot read as its role.
    let err = read_err(&parquet("bad/question-int.parquet"), None, &STRICT);
    assert!(
        err.contains("question-int.parquet: column \"question\" is integer, which bella-vqa does not read as the question"),
        "{err}"
    );
    // A compression it does not read, named.
    for codec in ["ZSTD", "BROTLI"] {
        let file = format!("bad/{}.parquet", codec.to_lowercase());
        let err = read_err(&parquet(&file), None, &STRICT);
        assert!(
            err.contains(&format!(
                "{}.parquet is compressed with {codec}",
                codec.to_lowercase()
            )) && err.contains("compression=\"snappy\""),
            "{err}"
        );
    }
    // An annotations file does not apply.
    let err = read_dataset(
        &parquet("vqav2.parquet"),
        Some(&parquet("vqav2.jsonl")),
        None,
        &STRICT,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("is a Parquet data file, which holds its answers"),
        "{err:#}"
    );
    // Other tabular formats still say what to write, and no longer count Parquet among them.
    let csv = tmp.path().join("data.csv");
    fs::write(&csv, "question_id,question\n").unwrap();
    let err = format!("{:#}", read_dataset(&csv, None, None, &STRICT).unwrap_err());
    assert!(
        err.contains("is a CSV file, which bella-vqa does not read"),
        "{err}"
    );
}

#[test]
fn image_bytes_that_are_no_image_are_a_bad_record() {
    let path = parquet("bad/not-an-image.parquet");
    let cache = tempfile::tempdir().unwrap();
    let err = read_parquet(&path, None, &STRICT, None, cache.path()).unwrap_err();
    let text = format!("{err:#}");
    let record = err.downcast::<BadRecord>().expect("a bad record");
    assert_eq!(record.file, path);
    assert!(
        text.contains(&format!(
            "question 2 (row 1): its image cannot be used: {} row 1 is not an image in a \
             supported format",
            path.display()
        )),
        "{text}"
    );
    // --skip-bad leaves it out and reads the rest; nothing is written for it.
    let data = read_parquet(&path, None, &SKIP, None, cache.path()).unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data.skipped.len(), 1);
    assert_eq!(cached(cache.path()).len(), 1);
}

#[test]
fn folders_hold_one_whole_split() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = |i: usize| parquet(&format!("shards/validation-{i:05}-of-00002.parquet"));
    // Several splits: listed.
    let two = tmp.path().join("two-splits");
    fs::create_dir_all(&two).unwrap();
    fs::copy(shard(0), two.join("validation-00000-of-00002.parquet")).unwrap();
    fs::copy(shard(1), two.join("validation-00001-of-00002.parquet")).unwrap();
    fs::copy(shard(0), two.join("testdev-00000-of-00001.parquet")).unwrap();
    let err = read_err(&two, None, &STRICT);
    assert!(
        err.contains("holds the Parquet files of several splits: testdev (1 file(s)), validation (2 file(s)); give one file"),
        "{err}"
    );
    // A hub snapshot: the shards are in its data/ folder.
    let snapshot = tmp.path().join("snapshot");
    fs::create_dir_all(snapshot.join("data")).unwrap();
    fs::copy(
        shard(0),
        snapshot.join("data/validation-00000-of-00002.parquet"),
    )
    .unwrap();
    // A split with a shard missing is not the benchmark.
    let err = read_err(&snapshot, None, &STRICT);
    assert!(
        err.contains("holds 1 of the 2 shards of split validation (missing: 00001)"),
        "{err}"
    );
    fs::copy(
        shard(1),
        snapshot.join("data/validation-00001-of-00002.parquet"),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    assert_eq!(read(&snapshot, None, None, cache.path()).len(), 4);
    // The hub's converted Parquet (`{config}/{split}/0000.parquet`, …): numbered shards of the
    // split the folder is named after, read in order.
    let converted = tmp.path().join("default/validation");
    fs::create_dir_all(&converted).unwrap();
    fs::copy(shard(0), converted.join("0000.parquet")).unwrap();
    fs::copy(shard(1), converted.join("0001.parquet")).unwrap();
    let ids =
        |d: &Dataset| -> Vec<String> { d.examples.iter().map(|e| e.question_id.clone()).collect() };
    assert_eq!(
        ids(&read(&converted, None, None, cache.path())),
        ids(&read(&snapshot, None, None, cache.path()))
    );
    // A folder without Parquet files keeps its message.
    let err = format!(
        "{:#}",
        read_dataset(tmp.path(), None, None, &STRICT).unwrap_err()
    );
    assert!(
        err.contains("is a folder: give the data file in it") && err.contains(".parquet"),
        "{err}"
    );
}

/// The examples without their images (the cache files of a join, or the files of a folder).
fn without_images(data: &Dataset) -> Vec<bella_vqa::data::VqaExample> {
    data.examples
        .iter()
        .map(|e| bella_vqa::data::VqaExample {
            image: PathBuf::new(),
            ..e.clone()
        })
        .collect()
}

#[test]
fn gqa_questions_without_their_images_say_where_to_give_them() {
    let gqa = parquet("gqa.parquet");
    // Without --images: IMAGE_ID.jpg is looked up beside the file, and not found there.
    let err = read_err(&gqa, None, &STRICT);
    assert!(
        err.contains("image file n161313.jpg not found in") && err.contains("--images"),
        "{err}"
    );
    // A Parquet file that holds no GQA images (no "id" and "image" columns): its columns, named.
    let err = read_err(&gqa, Some(&parquet("vqav2.parquet")), &STRICT);
    assert!(
        err.contains(
            "vqav2.parquet is no Parquet file of GQA's images: its columns are \
                      question_type (string)"
        ) && err.contains("testdev_balanced_images"),
        "{err}"
    );
}

/// lmms-lab/GQA's images config as --images: the questions' imageId joined to its id column,
/// the same examples as the questions with a folder of IMAGE_ID.jpg files (and as their JSONL),
/// only the images the questions name extracted.
#[test]
fn gqa_questions_join_their_images_as_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let images = parquet("gqa-testdev-images.parquet");
    let joined = assert_reads_as_jsonl(&parquet("gqa.parquet"), "gqa.jsonl", Some(&images), &cache);
    let from_folder = read(
        &parquet("gqa.parquet"),
        Some(&parquet("gqa-images")),
        None,
        tmp.path(),
    );
    assert_eq!(without_images(&joined), without_images(&from_folder));
    for (j, f) in joined.examples.iter().zip(&from_folder.examples) {
        assert!(j.image.starts_with(&cache), "{}", j.image.display());
        assert_eq!(fs::read(&j.image).unwrap(), fs::read(&f.image).unwrap());
    }
    // Two of the file's three images: the one no question names is not extracted.
    let extracted: BTreeSet<Vec<u8>> = cached(&cache)
        .iter()
        .map(|f| fs::read(f).unwrap())
        .collect();
    let named: BTreeSet<Vec<u8>> = ["n161313.jpg", "n235859.jpg"]
        .iter()
        .map(|n| fs::read(parquet("gqa-images").join(n)).unwrap())
        .collect();
    assert_eq!(extracted, named);
    // The images as a folder of one split's shards (the hub's testdev_balanced_images/).
    let shards = tmp.path().join("testdev_balanced_images");
    fs::create_dir_all(&shards).unwrap();
    fs::copy(&images, shards.join("testdev-00000-of-00001.parquet")).unwrap();
    let from_shards = read(&parquet("gqa.parquet"), Some(&shards), None, &cache);
    assert_eq!(from_shards.examples, joined.examples);
}

#[test]
fn a_limit_extracts_only_the_images_of_the_gqa_questions_read() {
    let cache = tempfile::tempdir().unwrap();
    let images = parquet("gqa-testdev-images.parquet");
    let one = read(
        &parquet("gqa.parquet"),
        Some(&images),
        Some(1),
        cache.path(),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one.unread, 1);
    assert_eq!(one.examples[0].question_id, "201307251");
    let files = cached(cache.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        fs::read(files.first().unwrap()).unwrap(),
        fs::read(parquet("gqa-images/n161313.jpg")).unwrap()
    );
}

#[test]
fn a_gqa_image_missing_or_unusable_is_a_bad_record_named_in_the_images_file() {
    let gqa = parquet("gqa.parquet");
    let images = parquet("bad/gqa-images.parquet");
    let cache = tempfile::tempdir().unwrap();
    // The first question's image is an SVG drawing: the message of the image checks, naming the
    // image's id, the images file and its row, and the question and its row.
    let err = read_parquet(&gqa, Some(&images), &STRICT, None, cache.path()).unwrap_err();
    let text = format!("{err:#}");
    let record = err.downcast::<BadRecord>().expect("a bad record");
    assert_eq!(record.file, gqa);
    assert!(
        record.reason.starts_with(&format!(
            "question 201307251 (row 0): its image cannot be used: n161313 ({} row 1) is an SVG \
             drawing, which bella-vqa cannot read",
            images.display()
        )) && record.reason.contains("convert it to PNG or JPEG"),
        "{text}"
    );
    // --skip-bad: the second question's image is not in the file, named by its id.
    let data = read_parquet(&gqa, Some(&images), &SKIP, None, cache.path()).unwrap();
    assert!(data.is_empty());
    assert_eq!(data.skipped.len(), 2);
    assert_eq!(data.skipped[1].file, gqa);
    assert_eq!(
        data.skipped[1].reason,
        format!(
            "question 201640614 (row 1): its image n235859 (\"imageId\") is not in {}: no row \
             of its \"id\" column holds it",
            images.display()
        )
    );
    // Nothing extracted: neither the drawing nor the photograph that no question names.
    assert!(cached(cache.path()).is_empty());
}

/// Embedded bytes that the image checks refuse (a HEIC photograph, a PNG too large) are named by
/// the Parquet file, the row and the question, with the checks' own message: not by a cache file.
#[test]
fn unusable_embedded_images_are_named_by_file_row_and_question() {
    let path = parquet("bad/unusable-images.parquet");
    let cache = tempfile::tempdir().unwrap();
    let err = read_parquet(&path, None, &STRICT, None, cache.path()).unwrap_err();
    let record = err.downcast::<BadRecord>().expect("a bad record");
    assert_eq!(record.file, path);
    assert!(
        record.reason.starts_with(&format!(
            "question 2 (row 1): its image cannot be used: {} row 1 is a HEIC/HEIF photograph, \
             which bella-vqa cannot read (supported: {})",
            path.display(),
            bella_vqa::models::image::SUPPORTED_IMAGE_FORMATS
        )) && record.reason.ends_with("convert it to PNG or JPEG"),
        "{}",
        record.reason
    );
    let data = read_parquet(&path, None, &SKIP, None, cache.path()).unwrap();
    assert_eq!(data.len(), 1);
    let reasons: Vec<&str> = data.skipped.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons[1].starts_with(&format!(
            "question 3 (row 2): its image cannot be used: image {} row 2 is too large: \
             40000×40000 pixels",
            path.display()
        )),
        "{}",
        reasons[1]
    );
    // Neither is written to the cache, nor named by it.
    assert_eq!(cached(cache.path()).len(), 1);
    let cache_name = cache.path().to_str().unwrap();
    assert!(
        reasons.iter().all(|r| !r.contains(cache_name)),
        "{reasons:?}"
    );
}

/// A corrupted byte anywhere in a file gives a result or an error that names the file, never a
/// panic (the Parquet decoder panics on some of them: its panics are turned into errors).
#[test]
fn flipped_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let images = parquet("gqa-images");
    let mut damaged = 0;
    for name in [
        "vqav2.parquet",
        "textvqa.parquet",
        "vizwiz-test.parquet",
        "gqa.parquet",
    ] {
        let good = fs::read(parquet(name)).unwrap();
        let file = tmp.path().join(name);
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            fs::write(&file, &bad).unwrap();
            let result = std::panic::catch_unwind(|| {
                read_parquet(&file, Some(&images), &SKIP, None, cache.path()).map(|d| d.len())
            });
            let Ok(result) = result else {
                panic!("{name} with byte {at} flipped: a panic");
            };
            if let Err(e) = result {
                let e = format!("{e:#}");
                assert!(e.contains(file.to_str().unwrap()), "{e}");
                damaged += usize::from(e.contains("the file is damaged"));
            }
        }
    }
    // GQA's images as Parquet, damaged: the questions read, or an error naming the images file.
    let name = "gqa-testdev-images.parquet";
    let good = fs::read(parquet(name)).unwrap();
    let file = tmp.path().join(name);
    let mut images_damaged = 0;
    for at in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        fs::write(&file, &bad).unwrap();
        let result = std::panic::catch_unwind(|| {
            read_parquet(
                &parquet("gqa.parquet"),
                Some(&file),
                &SKIP,
                None,
                cache.path(),
            )
            .map(|d| d.len())
        });
        let Ok(result) = result else {
            panic!("{name} with byte {at} flipped: a panic");
        };
        if let Err(e) = result {
            let e = format!("{e:#}");
            assert!(e.contains(file.to_str().unwrap()), "{e}");
            images_damaged += usize::from(e.contains("the file is damaged"));
        }
    }
    assert!(damaged > 0 && images_damaged > 0);
}

// --- bench end to end ---------------------------------------------------------------------------

fn bella() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

fn samples(out: &Path) -> Vec<Value> {
    fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `bench` of the tiny LLaVA on `data` into `out` (embedded images cached under `cache`), which
/// must succeed: its samples and results.
fn bench(cache: &Path, data: &Path, out: &Path, extra: &[&str]) -> (Vec<Value>, Value) {
    let result = bella()
        .env("BELLA_VQA_CACHE", cache)
        .args([
            "bench",
            "--quiet",
            "--max-new-tokens",
            "4",
            "--bootstrap",
            "0",
        ])
        .arg("--model")
        .arg(fixture("llava-tiny-hub"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let results: Value =
        serde_json::from_slice(&fs::read(out.join("results.json")).unwrap()).unwrap();
    (samples(out), results)
}

#[test]
fn bench_answers_a_parquet_file_as_its_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |data: &Path, out: &Path, extra: &[&str]| bench(&cache, data, out, extra);
    let (from_jsonl, jsonl_results) = run(&parquet("vqav2.jsonl"), &tmp.path().join("jsonl"), &[]);
    let (from_parquet, parquet_results) =
        run(&parquet("vqav2.parquet"), &tmp.path().join("parquet"), &[]);
    assert_eq!(from_parquet.len(), 4);
    let without_image = |mut s: Value| {
        s.as_object_mut().unwrap().remove("image");
        s
    };
    for (p, j) in from_parquet.iter().zip(&from_jsonl) {
        assert!(p["image"]
            .as_str()
            .unwrap()
            .starts_with(cache.join("images").to_str().unwrap()));
        assert_eq!(without_image(p.clone()), without_image(j.clone()));
    }
    assert_eq!(parquet_results["config"]["data"][0]["format"], "parquet");
    assert_eq!(parquet_results["summary"], jsonl_results["summary"]);

    // --limit on the shards: two questions answered, one image extracted (they share it), and
    // the record tells the part from the four questions of the split.
    let _ = fs::remove_dir_all(&cache);
    let (limited, results) = run(
        &parquet("shards"),
        &tmp.path().join("limited"),
        &["--limit", "2"],
    );
    assert_eq!(limited.len(), 2);
    assert_eq!(cached(&cache.join("images")).len(), 1);
    let data = &results["config"]["data"][0];
    assert_eq!(
        (data["questions"].as_u64(), data["selected"].as_u64()),
        (Some(4), Some(2))
    );
    for (l, j) in limited.iter().zip(&from_jsonl) {
        assert_eq!(without_image(l.clone()), without_image(j.clone()));
    }
}

/// `bench --images` with lmms-lab/GQA's images as Parquet: the questions joined to them, and with
/// `--limit` only the images of the questions answered extracted.
#[test]
fn bench_joins_gqa_questions_to_their_images_as_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    let (answered, _) = bench(
        &cache,
        &parquet("gqa.parquet"),
        &out,
        &[
            "--limit",
            "1",
            "--images",
            parquet("gqa-testdev-images.parquet").to_str().unwrap(),
        ],
    );
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0]["question_id"], "201307251");
    let images = cached(&cache.join("images"));
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(
        answered[0]["image"].as_str(),
        images.first().and_then(|p| p.to_str())
    );
}

/// Spark, Polars and DuckDB name the root of the schema otherwise than pyarrow ("spark_schema",
/// "root", "duckdb_schema"); the file is read all the same (it was called damaged).
#[test]
fn a_root_schema_named_by_another_writer_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = fs::read(parquet("vqav2.parquet")).unwrap();
    // The footer's root SchemaElement name: a thrift string of length 6, "schema".
    let at = bytes
        .windows(7)
        .rposition(|w| w == b"\x06schema")
        .expect("the root name in the footer");
    bytes[at + 1..at + 7].copy_from_slice(b"spark_");
    let renamed = tmp.path().join("spark.parquet");
    fs::write(&renamed, &bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let ours = read(&renamed, None, None, cache.path());
    let theirs = read(&parquet("vqav2.parquet"), None, None, cache.path());
    assert_eq!(ours.examples, theirs.examples);
}
