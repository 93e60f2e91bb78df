//! The shipped demo models (`demo/llava`, `demo/clip`, trained by scripts/demo/train_base.py)
//! against transformers (references from scripts/demo/check_parity.py), and `ask` on a shipped
//! demo image.

mod common;

use std::path::PathBuf;
use std::process::Command;

use bella_vqa::models::image::load_image;
use bella_vqa::models::llava::LlavaInput;
use bella_vqa::models::{self, LoadedModel, Model};
use candle_core::{DType, Device};
use common::*;

const IMAGE: &str = "eval/demo/red-circle.png";
const QUESTION: &str = "What color is the circle?";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load(dir: &str) -> LoadedModel {
    let files = dir_files(&repo(dir)).expect("demo model files");
    models::load(&files, &Device::Cpu, DType::F32).expect("demo model loads")
}

fn pixels(m: &LoadedModel) -> candle_core::Tensor {
    let processor = m.image_processor.as_ref().expect("an image processor");
    processor
        .preprocess(&load_image(&repo(IMAGE)).unwrap())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn demo_llava_matches_transformers() {
    let loaded = load("demo/llava");
    let r = reference("demo");
    // The prompt as the Rust side builds it: chat template, image tokens, tokenizer.json.
    let prompter = loaded.prompter().unwrap();
    let prompt = prompter.render_question(QUESTION, true).unwrap();
    assert_eq!(prompt, format!("USER: <image>\n{QUESTION} ASSISTANT:"));
    let n_image = prompter.num_image_tokens(32, 32).unwrap();
    assert_eq!(n_image, 64);
    let prompt_ids = prompter.encode(&prompt, n_image).unwrap();
    assert_eq!(prompt_ids, ids(get(&r, "llava.input_ids"))[0]);
    let pixel_values = pixels(&loaded);
    assert_close(
        "llava.pixel_values",
        &pixel_values,
        get(&r, "llava.pixel_values"),
    );

    let Model::Llava(m) = &loaded.model else {
        panic!("demo/llava is not a LLaVA model")
    };
    let input_ids = get(&r, "llava.input_ids").to_dtype(DType::U32).unwrap();
    let keep = keep_from_mask(&ids(get(&r, "llava.attention_mask")));
    let input = LlavaInput {
        input_ids: &input_ids,
        pixel_values: Some(&pixel_values),
        keep: &keep,
        expanded: false,
    };
    let mut cache = m.language_model.new_cache();
    let out = m.forward(&input, &mut cache, 1, false).unwrap();
    assert_close("llava.logits", &out.logits, get(&r, "llava.logits"));

    // Greedy answer: the same tokens (answer + </s>) as transformers' generate().
    let expected = ids(get(&r, "llava.greedy_tokens"))[0].clone();
    let tokens = greedy(m, &input, 1, expected.len());
    assert_eq!(tokens[0], expected);
    assert_eq!(prompter.decode(&expected, true).unwrap().trim(), "red");
}

#[test]
fn demo_clip_matches_transformers() {
    let loaded = load("demo/clip");
    let r = reference("demo");
    let vocab: Vec<String> = std::fs::read_to_string(repo("demo/clip/answers.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(vocab.len(), 18);
    let texts: Vec<String> = vocab
        .iter()
        .map(|a| bella_vqa::answer::candidates::clip_prompt(QUESTION, a))
        .collect();
    let Model::Clip(m) = &loaded.model else {
        panic!("demo/clip is not a CLIP model")
    };
    let max_len = m.config().text_config.max_position_embeddings;
    let (rows, masks) = loaded
        .prompter()
        .unwrap()
        .encode_clip_batch(&texts, max_len, false)
        .unwrap();
    assert_eq!(rows, ids(get(&r, "clip.input_ids")));
    assert_eq!(masks, ids(get(&r, "clip.attention_mask")));
    let pixel_values = pixels(&loaded);
    assert_close(
        "clip.pixel_values",
        &pixel_values,
        get(&r, "clip.pixel_values"),
    );
    let logits = m
        .logits_per_image(&pixel_values, &ids_tensor(&rows), Some(&ids_tensor(&masks)))
        .unwrap();
    assert_close(
        "clip.logits_per_image",
        &logits,
        get(&r, "clip.logits_per_image"),
    );
    let best = logits
        .squeeze(0)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap();
    assert_eq!(vocab[best as usize], "red");
}

fn ask_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["ask", "--json"])
        .args(args)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "ask failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn ask_demo_llava_answers_a_shipped_image() {
    let v = ask_json(&["--model", "demo/llava", "--image", IMAGE, QUESTION]);
    assert_eq!(v["answer"], "red", "{v}");
    assert!(v["confidence"].as_f64().unwrap() > 0.9, "{v}");
    let v = ask_json(&[
        "--model",
        "demo/llava",
        "--image",
        "eval/demo/two-blue-squares.png",
        "How many squares are there?",
    ]);
    assert_eq!(v["answer"], "2", "{v}");
}

#[test]
fn ask_demo_clip_answers_from_its_vocabulary() {
    let v = ask_json(&[
        "--model",
        "demo/clip",
        "--answers",
        "demo/clip/answers.txt",
        "--image",
        IMAGE,
        QUESTION,
    ]);
    assert_eq!(v["answer"], "red", "{v}");
    // A long list takes a while to score, and `ask` says so first (but with --quiet); a short
    // one goes unremarked.
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("answers.txt");
    let shipped = std::fs::read_to_string(repo("demo/clip/answers.txt")).unwrap();
    let more: String = (0..2000).map(|i| format!("colour {i}\n")).collect();
    std::fs::write(&long, format!("{shipped}{more}")).unwrap();
    let shipped_count = bella_vqa::answer::read_answer_list(&repo("demo/clip/answers.txt"))
        .unwrap()
        .len();
    let said = format!("scoring {} candidate answers", shipped_count + 2000);
    for (list, quiet, said) in [
        (repo("demo/clip/answers.txt"), false, None),
        (long.clone(), false, Some(said)),
        (long, true, None),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(quiet.then_some("--quiet"))
            .args(["ask", "--json", "--model", "demo/clip", "--image", IMAGE])
            .arg("--answers")
            .arg(&list)
            .arg(QUESTION)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        match said {
            Some(line) => assert!(stderr.contains(&line), "{stderr}"),
            None => assert!(!stderr.contains("candidate answers"), "{stderr}"),
        }
    }
}

/// `ask --json` without a model argument (the embedded demo), its cache in `cache`.
fn ask_embedded(cache: &std::path::Path, image: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .env("BELLA_VQA_CACHE", cache)
        .args(["ask", "--json", "--image"])
        .arg(repo(image))
        .arg(QUESTION)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An empty `BELLA_VQA_CACHE` is unset: the cache goes under HOME, not into the current
/// directory (it did, as an empty path).
#[test]
fn an_empty_cache_variable_means_the_default_cache() {
    let home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .current_dir(cwd.path())
        .env("BELLA_VQA_CACHE", "")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home.path())
        .args(["ask", "--quiet", "--image"])
        .arg(repo(IMAGE))
        .arg(QUESTION)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(home.path().join(".cache/bella-vqa").is_dir());
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}

/// The README's first command: no model argument, the embedded demo LLaVA with its calibrated
/// particles (written to a fresh cache directory here). Its image check lets the shapes image
/// through and declines a photograph (the README's third command).
#[test]
fn ask_without_a_model_uses_the_embedded_demo_with_calibrated_particles() {
    let cache = tempfile::tempdir().unwrap();
    let v = ask_embedded(cache.path(), IMAGE);
    assert_eq!(v["answer"], "red", "{v}");
    assert_eq!(v["calibrated"], true, "{v}");
    assert_eq!(v["image_check"]["familiar"], true, "{v}");
    let photo = ask_embedded(cache.path(), "eval/demo/photo-coffee.png");
    assert_eq!(photo["abstained"], true, "{photo}");
    assert_eq!(photo["image_check"]["familiar"], false, "{photo}");
    assert!(v["particles"].as_array().unwrap().len() > 1, "{v}");
    assert_eq!(v["abstained"], false, "{v}");
    // The embedded files landed in the cache, complete (beside the file-hash cache).
    let dirs: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("demo-"))
        .collect();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].path().join(".complete").exists());
    let weights = dirs[0].path().join("llava/model.safetensors");
    assert!(weights.exists());
    // A damaged copy (here truncated, as a full disk or an interrupted copy leaves it) is
    // written again from the binary, and the answer is the same.
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let again = ask_embedded(cache.path(), IMAGE);
    assert_eq!(again["answer"], "red", "{again}");
    assert_eq!(again["confidence"], v["confidence"], "{again}");
    assert_eq!(std::fs::metadata(&weights).unwrap().len(), len);
    // So is a copy without its marker (a copy that skipped dot files; it stopped every demo
    // command for good), and a file in the copy's place.
    let demo = dirs[0].path();
    std::fs::remove_file(demo.join(".complete")).unwrap();
    assert_eq!(ask_embedded(cache.path(), IMAGE)["answer"], "red");
    std::fs::remove_dir_all(&demo).unwrap();
    std::fs::write(&demo, b"not a folder").unwrap();
    assert_eq!(ask_embedded(cache.path(), IMAGE)["answer"], "red");
    assert!(demo.join(".complete").exists());
}

/// A demo copy that cannot be read for a reason of the process's own (here too few file
/// descriptors) is an error, not a damaged copy: it stays in place for the other processes that
/// use it. It was moved away as damaged and not written again.
#[cfg(target_os = "linux")]
#[test]
fn a_demo_copy_that_cannot_be_read_is_not_moved_away() {
    let cache = tempfile::tempdir().unwrap();
    ask_embedded(cache.path(), IMAGE);
    let copy = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("demo-"))
        .unwrap()
        .path();
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("data.jsonl");
    let record = serde_json::json!({"question_id": "q", "image": repo(IMAGE),
        "question": QUESTION, "answers": ["red"]});
    std::fs::write(&data, format!("{record}\n")).unwrap();
    // Whatever the limit, whichever file it stops at (bench holds a few files open).
    for files in 4..=12u64 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bella-vqa"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BELLA_VQA_CACHE", cache.path())
            .args(["bench", "--model", "demo", "--bootstrap", "0", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(out.path().join(format!("run{files}")));
        let output = limited(&mut cmd, Limit::OpenFiles, files).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("damaged"), "{files} files: {stderr}");
        assert!(!stderr.contains("panicked"), "{files} files: {stderr}");
        assert!(copy.join(".complete").exists(), "{files} files: {stderr}");
    }
}

/// Copies the shipped ensemble particles (rank 8, P = 4, on the demo LLaVA) into `dir`.
fn copy_shipped_ensemble(dir: &std::path::Path) {
    let from = repo("demo/particles/llava-ensemble");
    for entry in std::fs::read_dir(&from).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

/// The image check end to end on the demo: `calibrate` fits it on the distinct validation images
/// of a shapes world, `ask` abstains on a photograph whatever the particles' confidence, and
/// `bench` declines every photograph question and ranks them below the shapes questions.
#[test]
fn the_image_check_declines_photographs_and_keeps_shapes() {
    use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions, Question};
    use bella_vqa::bench::{
        self, calibrate, BenchOptions, CalibrateOptions, DataInput, ImageCheckRequest, ModelSpec,
        Objective,
    };
    use bella_vqa::data::shapes::{generate, ShapesOptions};
    use bella_vqa::hub::ModelSource;

    let world = tempfile::tempdir().unwrap();
    generate(&ShapesOptions {
        n: 150,
        seed: 5,
        ..ShapesOptions::new(world.path())
    })
    .unwrap();
    let val = world.path().join("val.jsonl");
    let text = std::fs::read_to_string(&val).unwrap();
    let distinct: std::collections::HashSet<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["image"].to_string())
        .collect();

    let particles = tempfile::tempdir().unwrap();
    copy_shipped_ensemble(particles.path());
    let source = ModelSource::parse(repo("demo/llava").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, Some(particles.path()), &LoadOptions::default()).unwrap();
    let mut opts = CalibrateOptions::new(DataInput::new(&val), Objective::TargetCoverage(0.9));
    opts.max_new_tokens = 4;

    // Too few images for a 1 % false-alarm rate: an error when asked for, a note otherwise.
    opts.image_check = Some(ImageCheckRequest {
        alpha: 0.01,
        required: true,
    });
    let e = format!(
        "{:#}",
        calibrate(&vqa, particles.path(), &opts).unwrap_err()
    );
    assert!(e.contains("needs 198 distinct validation images"), "{e}");
    assert!(e.contains(&format!("there are {}", distinct.len())), "{e}");
    opts.image_check = Some(ImageCheckRequest {
        alpha: 0.01,
        required: false,
    });
    opts.dry_run = true;
    let outcome = calibrate(&vqa, particles.path(), &opts).unwrap();
    assert!(outcome.abstention.image_check.is_none());
    assert!(outcome.image_check_skipped.unwrap().contains("needs 198"));

    opts.image_check = Some(ImageCheckRequest {
        alpha: 0.2,
        required: true,
    });
    opts.dry_run = false;
    // A 20 % false-alarm rate leaves too few answerable questions for 90 % coverage: refused,
    // not stored as met.
    let e = format!(
        "{:#}",
        calibrate(&vqa, particles.path(), &opts).unwrap_err()
    );
    assert!(e.contains("coverage 90.0 % cannot be met"), "{e}");
    opts.objective = Objective::TargetCoverage(0.85);
    let outcome = calibrate(&vqa, particles.path(), &opts).unwrap();
    let check = outcome.abstention.image_check.clone().unwrap();
    // Every distinct validation image was used once: half to fit, half to calibrate.
    assert_eq!(check.fit_images + check.calibration_images, distinct.len());
    assert_eq!(check.fit_images, distinct.len().div_ceil(2));
    assert_eq!(check.dim(), 128, "the demo LLaVA's text hidden size");
    // Answered at least 85 % of all validation questions, the flagged ones included.
    assert!(outcome.coverage >= 0.85, "{outcome:?}");
    let flagged = outcome.image_flagged.unwrap();
    assert!(flagged.val < 0.2, "{flagged:?}");

    let vqa = BellaVqa::load(&source, Some(particles.path()), &LoadOptions::default()).unwrap();
    let ask = AskOptions {
        max_new_tokens: 4,
        ..AskOptions::default()
    };
    let photo = load_image(&repo("eval/demo/photo-cat.png")).unwrap();
    let r = vqa
        .ask_with(&photo, "What color is the circle?", &ask)
        .unwrap();
    let v = r.image_check.unwrap();
    assert!(!v.familiar && v.distance > 2.0 * v.threshold, "{v:?}");
    assert_eq!(v.threshold, check.threshold);
    assert!(r.abstained);
    assert!(
        r.response
            .starts_with("I'm not sure: this image is unlike the ones I was calibrated on."),
        "{}",
        r.response
    );

    // In a batch (rows particle-major over the questions), each image keeps its own verdict.
    let shapes = load_image(&repo(IMAGE)).unwrap();
    let alone = vqa
        .ask_with(&shapes, QUESTION, &ask)
        .unwrap()
        .image_check
        .unwrap();
    let batch = vqa.ask_batch(&[
        Question {
            image: &photo,
            text: "What color is the circle?",
            options: &ask,
        },
        Question {
            image: &shapes,
            text: QUESTION,
            options: &ask,
        },
    ]);
    let verdicts: Vec<_> = batch
        .into_iter()
        .map(|r| r.unwrap().image_check.unwrap())
        .collect();
    for (b, a) in verdicts.iter().zip([&v, &alone]) {
        assert!(
            (b.distance - a.distance).abs() < 1e-4 * a.distance,
            "{b:?} vs {a:?}"
        );
    }
    assert!(
        verdicts[1].distance < verdicts[0].distance / 2.0,
        "{verdicts:?}"
    );

    // A caller's threshold replaces the calibrated rule, the image check included.
    let forced = AskOptions {
        threshold: Some(0.0),
        ..ask.clone()
    };
    let r = vqa
        .ask_with(&photo, "What color is the circle?", &forced)
        .unwrap();
    assert!(!r.abstained && !r.image_check.unwrap().familiar, "{r:?}");

    let out = tempfile::tempdir().unwrap();
    let mut bench_opts =
        BenchOptions::new(DataInput::new(world.path().join("test.jsonl")), out.path());
    bench_opts.ood = vec![DataInput::new(repo("eval/demo/photos.jsonl"))];
    bench_opts.max_new_tokens = 4;
    bench_opts.bootstrap.resamples = 0;
    let spec = ModelSpec {
        source: repo("demo/llava").display().to_string(),
        adapters: Some(particles.path().to_path_buf()),
        answers_file: None,
    };
    let results = bench::run(&vqa, &spec, &bench_opts)
        .unwrap()
        .results
        .results;
    assert_eq!(results["ood.photos.declined"], 1.0);
    let auroc = results["ood.photos.auroc_selector"].as_f64().unwrap();
    assert!(auroc > 0.9, "{auroc}");
    let samples = std::fs::read_to_string(out.path().join("samples.jsonl")).unwrap();
    let mut test_flagged = 0;
    for line in samples.lines() {
        let s: serde_json::Value = serde_json::from_str(line).unwrap();
        let familiar = s["image_check"]["familiar"].as_bool().unwrap();
        if s["split"] == "test" {
            test_flagged += usize::from(!familiar);
        } else {
            assert!(!familiar && s["abstained"] == true, "{s}");
        }
    }
    assert!(
        test_flagged < 12,
        "{test_flagged} of 30 shapes questions flagged"
    );
    assert_eq!(results["ood.photos.image_flagged"], 1.0);
    assert_eq!(results["image_flagged"], test_flagged as f64 / 30.0);

    // A damaged stored check is refused at load, naming it.
    let path = particles.path().join("bella_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["abstention"]["image_check"]["std"][0] = 0.0.into();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let e = BellaVqa::load(&source, Some(particles.path()), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("abstention.image_check: recalibrate"),
        "{e:#}"
    );
}

/// `--model demo` is the embedded demo LLaVA with its calibrated particles, as without a model;
/// `demo:clip` its CLIP with the answer list that ships with it; `train` from the repository
/// root (where `demo/` is a folder without config.json) records the base by that name.
#[test]
fn the_demo_by_name_answers_like_the_default_and_is_recorded_by_name() {
    let by_name = ask_json(&["--model", "demo", "--image", IMAGE, QUESTION]);
    let default = ask_json(&["--image", IMAGE, QUESTION]);
    assert_eq!(by_name["calibrated"], true, "{by_name}");
    // Calibration is of greedy answers: sampled ones are not called calibrated.
    let sampled = ask_json(&["--temperature", "0.7", "--image", IMAGE, QUESTION]);
    assert_eq!(sampled["calibrated"], false, "{sampled}");
    assert_eq!(by_name["particles"], default["particles"]);
    let clip = ask_json(&["--model", "demo:clip", "--image", IMAGE, QUESTION]);
    assert_eq!(clip["answer"], "red", "{clip}");
    // A question too long for CLIP's 32 text positions with its answer is refused (cut on the
    // right, every answer scored alike and the reply contradicted its particle), not answered.
    // `ask` run from `dir` with `options`, then the image and `question`: its error.
    let ask_fails = |dir: &std::path::Path, options: &[&str], question: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .current_dir(dir)
            .arg("ask")
            .args(options)
            .arg("--image")
            .arg(repo(IMAGE))
            .arg(question)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let here = repo(".");
    let long = format!("Is the shape {}red?", "really ".repeat(40));
    let err = ask_fails(&here, &["--model", "demo:clip"], &long);
    assert!(err.contains("longer than the 32 tokens"), "{err}");
    // `--adapters demo` names where the demo's particles are (they are used without it).
    let elsewhere = tempfile::tempdir().unwrap();
    let err = ask_fails(elsewhere.path(), &["--adapters", "demo"], QUESTION);
    assert!(
        err.contains("the demo's particles are used when neither --model nor --adapters")
            && err.contains("particles/llava-ensemble"),
        "{err}"
    );
    // Sampling options mean nothing to a CLIP: refused, as --answers is on a LLaVA.
    let err = ask_fails(
        &here,
        &["--model", "demo:clip", "--temperature", "0.7"],
        QUESTION,
    );
    assert!(err.contains("samples nothing"), "{err}");
    // A CLIP without candidate answers cannot answer anything: refused at load (a server
    // would otherwise say it is ready).
    let bare = bella_vqa::BellaVqa::load(
        &bella_vqa::ModelSource::Dir(repo("demo/clip")),
        None,
        &bella_vqa::LoadOptions::default(),
    )
    .unwrap();
    let err = format!("{:#}", bare.check_ready().unwrap_err());
    assert!(err.contains("--answers"), "{err}");
    // A candidate answer that leaves no room for any question: refused with its name, rather
    // than refusing every question for being too long.
    let mut bare = bare;
    let long = "word ".repeat(40);
    let err = format!(
        "{:#}",
        bare.set_answer_vocabulary(vec!["red".into(), long.clone()])
            .unwrap_err()
    );
    assert!(
        err.contains("candidate answer") && err.contains(long.trim()),
        "{err}"
    );
    // An empty list, or an answer that says nothing, is refused; a repeat is kept once (two
    // copies would split the answer's probability between them).
    assert!(bare.set_answer_vocabulary(Vec::new()).is_err());
    let err = format!(
        "{:#}",
        bare.set_answer_vocabulary(vec!["red".into(), " the ".into()])
            .unwrap_err()
    );
    assert!(err.contains("says nothing"), "{err}");
    let image = load_image(&repo(IMAGE)).unwrap();
    bare.set_answer_vocabulary(vec!["red".into(), "blue".into()])
        .unwrap();
    let once = bare.ask(&image, QUESTION).unwrap();
    bare.set_answer_vocabulary(vec![
        "red".into(),
        "Red".into(),
        "blue".into(),
        "red ".into(),
    ])
    .unwrap();
    let repeated = bare.ask(&image, QUESTION).unwrap();
    assert_eq!(
        (repeated.candidates.len(), repeated.confidence),
        (2, once.confidence)
    );
    // LLaVA particles on a CLIP are called what they are, through the library too.
    let err = format!(
        "{:#}",
        bella_vqa::BellaVqa::load(
            &bella_vqa::ModelSource::Dir(repo("demo/clip")),
            Some(&repo("demo/particles/llava-ensemble")),
            &bella_vqa::LoadOptions::default(),
        )
        .unwrap_err()
    );
    assert!(err.contains("these are LLaVA particles"), "{err}");

    // The library's demo by name is the command line's: the LLaVA with its calibrated
    // particles, the CLIP with its answer list.
    let opts = bella_vqa::LoadOptions::default();
    let demo = bella_vqa::BellaVqa::demo("demo", &opts).unwrap();
    let lib = serde_json::to_value(demo.ask(&image, QUESTION).unwrap()).unwrap();
    assert_eq!(lib, default);
    let demo_clip = bella_vqa::BellaVqa::demo("demo:clip", &opts).unwrap();
    let lib = serde_json::to_value(demo_clip.ask(&image, QUESTION).unwrap()).unwrap();
    assert_eq!(lib, clip);
    assert!(bella_vqa::BellaVqa::demo("demo:nope", &opts).is_err());

    let world = tempfile::tempdir().unwrap();
    bella_vqa::data::generate(&bella_vqa::data::ShapesOptions {
        n: 8,
        ..bella_vqa::data::ShapesOptions::new(world.path())
    })
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "train",
            "--quiet",
            "--model",
            "demo",
            "--particles",
            "2",
            "--max-steps",
            "1",
        ])
        .args(["--targets", "language_model.*.q_proj", "--data"])
        .arg(world.path().join("train.jsonl"))
        .arg("--out")
        .arg(out.path().join("p"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("p/bella_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["base_model"]["source"], "demo", "{config}");
    // `bench` on the demo CLIP answers from the same shipped list as `ask` (it asked for
    // --answers), and a shapes question gets one of its answers.
    let run = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .args(["bench", "--quiet", "--model", "demo:clip", "--limit", "2"])
        .args(["--bootstrap", "0", "--data"])
        .arg(world.path().join("test.jsonl"))
        .arg("--out")
        .arg(out.path().join("bench"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let list = std::fs::read_to_string(repo("demo/clip/answers.txt")).unwrap();
    let samples = std::fs::read_to_string(out.path().join("bench/samples.jsonl")).unwrap();
    for line in samples.lines() {
        let sample: serde_json::Value = serde_json::from_str(line).unwrap();
        let answer = sample["answer"].as_str().unwrap();
        assert!(list.lines().any(|a| a.trim() == answer), "{sample}");
    }
}

/// A CLIP calibrated with one answer list refuses to answer from another with that calibration
/// (its threshold and temperature are of the first list's probabilities; it answered "calibrated").
#[test]
fn a_clip_calibrated_with_one_answer_list_refuses_another() {
    let world = tempfile::tempdir().unwrap();
    bella_vqa::data::generate(&bella_vqa::data::ShapesOptions {
        n: 12,
        seed: 3,
        ..bella_vqa::data::ShapesOptions::new(world.path())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |p: PathBuf| p.to_str().unwrap().to_string();
    let (train_file, val) = (
        path(world.path().join("train.jsonl")),
        path(world.path().join("val.jsonl")),
    );
    let p = path(dir.path().join("p"));
    let list = |name: &str, answers: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, answers).unwrap();
        path(file)
    };
    let (a, b) = (
        list("a.txt", "red\nblue\ngreen\n"),
        list("b.txt", "red\nyellow\n"),
    );
    let image = path(repo(IMAGE));
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .arg("--quiet")
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let clip = ["--model", "demo:clip", "--adapters", &p];
    ok(&[
        &["train"],
        &clip[..2],
        &["--data", &train_file, "--out", &p],
    ]
    .concat());
    let calibrate = |extra: &[&str]| {
        let common = [
            "--data",
            &val,
            "--target-coverage",
            "0.5",
            "--no-image-check",
        ];
        ok(&[&["calibrate"][..], &clip, &common, extra].concat());
    };
    let ask = |extra: &[&str]| {
        run(&[
            &["ask"][..],
            &clip,
            &["--image", &image],
            extra,
            &[QUESTION],
        ]
        .concat())
    };
    calibrate(&["--answers", &a]);
    let other = ask(&["--answers", &b]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("calibrated with another answer list"),
        "{err}"
    );
    assert!(ask(&["--answers", &a]).status.success());
    // A CLIP samples nothing: a server's request with a temperature is answered as calibrated.
    {
        use bella_vqa::answer::generate::Sampling;
        use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions};
        let source = bella_vqa::hub::ModelSource::parse("demo:clip").unwrap();
        let mut vqa = BellaVqa::load(
            &source,
            Some(dir.path().join("p").as_path()),
            &LoadOptions::default(),
        )
        .unwrap();
        vqa.set_answer_vocabulary(bella_vqa::answer::read_answer_list(a.as_ref()).unwrap())
            .unwrap();
        let image = load_image(&repo(IMAGE)).unwrap();
        for sampling in [
            Sampling::Greedy,
            Sampling::Sample {
                temperature: 0.7,
                top_p: 1.0,
                seed: 1,
            },
        ] {
            let opts = AskOptions {
                sampling,
                ..AskOptions::default()
            };
            let r = vqa.ask_with(&image, QUESTION, &opts).unwrap();
            assert!(r.calibrated, "{sampling:?}");
        }
    }
    // The same answers in another order are the same list.
    let reordered = list("a-reordered.txt", "green\nred\nblue\n");
    assert!(ask(&["--answers", &reordered]).status.success());
    // A server and a benchmark refuse it before they listen or answer anything.
    let refused_before_listening = |extra: &[&str]| {
        let served = run(&[&["serve", "--port", "0"][..], &clip, extra].concat());
        let err = String::from_utf8_lossy(&served.stderr);
        assert!(
            !served.status.success()
                && err.contains("calibrated with another answer list")
                && !err.contains("listening"),
            "{extra:?}: {err}"
        );
    };
    refused_before_listening(&["--answers", &b]);
    let bench_out = dir.path().join("bench");
    let benched = run(&[
        &["bench"][..],
        &clip,
        &[
            "--answers",
            &b,
            "--data",
            &val,
            "--out",
            &path(bench_out.clone()),
        ],
    ]
    .concat());
    let err = String::from_utf8_lossy(&benched.stderr);
    assert!(
        !benched.status.success() && err.contains("calibrated with another answer list"),
        "{err}"
    );
    assert!(!bench_out.join("samples.jsonl").exists());
    // CLIP particles on the demo LLaVA: named as such (it said the weights differ).
    let other = run(&[
        "ask",
        "--model",
        "demo",
        "--adapters",
        &p,
        "--image",
        &image,
        QUESTION,
    ]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("these are CLIP particles"), "{err}");
    // Without --answers the particles answer from their training answers, which are not the
    // list they were calibrated with either: refused before listening too.
    refused_before_listening(&[]);
    // A threshold of the caller's replaces the calibrated rule: answered.
    assert!(ask(&["--answers", &b, "--threshold", "0.5"])
        .status
        .success());
    // Calibrated with their own answers, the particles answer from them (not from the demo's
    // answers.txt, which made every question refused).
    calibrate(&[]);
    let own = ask(&[]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
}

/// A status line that cannot be written is dropped, an answer that cannot be written is an
/// error, and a reader that closed the pipe ends the program quietly: never a panic (a log on a
/// full disk, `> /dev/full` and `| head -1` each panicked with exit 101).
#[test]
fn a_full_disk_or_closed_pipe_under_the_output_is_no_panic() {
    use std::process::Stdio;
    let full = || Stdio::from(std::fs::File::create("/dev/full").expect("/dev/full"));
    let ask = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bella-vqa"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "ask",
            "--model",
            "demo/llava",
            "--image",
            IMAGE,
            QUESTION,
        ]);
        cmd
    };
    // Standard error on a full disk: the status lines are lost, the answer is not.
    let out = ask().stderr(full()).output().expect("runs");
    assert!(out.status.success(), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("red\n"));
    // Standard output on a full disk: the answer is lost, and the command says so.
    let out = ask().stdout(full()).output().expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write to standard output: No space left on device")
            && !err.contains("panicked"),
        "{err}"
    );
    // --version and --help, which clap writes: exit 1 too, never a silent 0.
    for flag in ["--version", "--help"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .arg(flag)
            .stdout(full())
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(1), "{flag}");
    }
    // A reader that has gone: the command's standard output is a pipe closed at once.
    let closed_pipe = |cmd: &mut Command| {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("runs");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // `inspect` writes many lines into it.
    let (status, err) = closed_pipe(
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args(["inspect", "--model"])
            .arg(repo("demo/llava")),
    );
    assert!(status.success() && !err.contains("panicked"), "{err}");
    // The same for an output file that is the pipe (`logits --out /dev/stdout | head -c 10`).
    let (status, err) = closed_pipe(
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args([
                "logits",
                "--quiet",
                "--prompt",
                "hi",
                "--out",
                "/dev/stdout",
            ])
            .arg("--model")
            .arg(repo("demo/llava"))
            .arg("--image")
            .arg(repo(IMAGE)),
    );
    assert!(status.success() && err.is_empty(), "{err}");
}

/// Another process that holds the demo's lock and never lets go (stopped, hung) is waited for
/// with a note naming the lock file, then given up on after BELLA_DEMO_LOCK_TIMEOUT_SECS with an
/// error that says what to do: no endless wait.
#[test]
fn a_demo_lock_held_by_a_stopped_process_is_given_up_on_with_what_to_do() {
    // The lock file's name holds the hash of the demo: learnt from a first unpacking.
    let first = tempfile::tempdir().unwrap();
    ask_embedded(first.path(), IMAGE);
    let tag = std::fs::read_dir(first.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("demo-").map(str::to_string))
        .expect("an unpacked demo");
    let cache = tempfile::tempdir().unwrap();
    let lock_path = cache.path().join(format!(".demo-{tag}.lock"));
    // Held by this process (std's File::lock, flock as fs4's): it never lets go while the
    // command runs, as a stopped one would not.
    let holder = std::fs::File::create(&lock_path).unwrap();
    holder.lock().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .env("BELLA_VQA_CACHE", cache.path())
        .env(bella_vqa::demo::LOCK_WAIT_ENV, "2")
        .args(["ask", "--quiet", "--image"])
        .arg(repo(IMAGE))
        .arg(QUESTION)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still waiting for the lock after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lock_name = lock_path.display().to_string();
    assert!(
        err.contains(&format!("note: waiting for {lock_name}"))
            && err.contains("is unpacking the demo model"),
        "no note naming the lock: {err}"
    );
    assert!(
        err.contains(&format!(
            "lock file {lock_name} is held by another bella-vqa (process unknown)"
        )) && err.contains("did not finish in 2 s")
            && err.contains("kill -CONT")
            && !err.contains("free space"),
        "{err}"
    );
    // Let go, the same command unpacks the demo and answers.
    drop(holder);
    assert_eq!(ask_embedded(cache.path(), IMAGE)["answer"], "red");
}

/// A cache directory that cannot be one is named as the cache, with what to do.
#[test]
fn a_file_as_the_cache_directory_is_named_with_the_remedy() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cachefile");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .env("BELLA_VQA_CACHE", &file)
        .args(["ask", "--quiet", "--image"])
        .arg(repo("eval/demo/ood-blue-circle.png"))
        .arg(QUESTION)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cache directory")
            && err.contains("BELLA_VQA_CACHE")
            && err.contains("is a file, not a directory"),
        "{err}"
    );
}
