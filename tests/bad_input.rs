//! Bad input of every kind (issue 13) gives a clear error that names the file, key, tensor,
//! line or option, never a panic and never a hang: broken checkpoints and configs, particle sets,
//! sizes from users, numeric options, special tokens in questions, empty data, FIFOs and devices.
//! Command-line cases run the real binary and check its exit status and that no panic text
//! appears.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bella_vqa::answer::{BellaVqa, LoadOptions};
use bella_vqa::bella::particles::{ParticleConfig, ParticleSet, CONFIG_FILE, PARTICLES_FILE};
use bella_vqa::bella::{attach, AdapterSpec, InitB};
use bella_vqa::data::{read_jsonl, ReadOptions};
use bella_vqa::hub::ModelSource;
use bella_vqa::models::prompt::{Prompter, DEFAULT_IMAGE_TOKEN};
use bella_vqa::models::{self, Model};
use candle_core::{DType, Device, Tensor};
use common::fixture;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let files = common::dir_files(dir).expect("files resolve");
    match models::load(&files, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("config.json"), f);
}

#[test]
fn a_tokenizer_with_ids_beyond_the_embedding_is_named() {
    // A tokenizer of another checkpoint: its ids index past the embedding's rows.
    for name in ["llava-tiny-hub", "clip-tiny"] {
        let dir = copy_fixture(name);
        let vocab = {
            let c: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            )
            .unwrap();
            c["text_config"]["vocab_size"].as_u64().unwrap()
        };
        edit_json(&dir.path().join("tokenizer.json"), |t| {
            t["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "id": vocab + 5, "content": "<extra>", "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }))
        });
        // (tokenizers numbers it after the vocabulary it has, whatever the file says.)
        let err = load_err(dir.path());
        assert!(
            err.contains("tokenizer.json has the token \"<extra>\" with id")
                && err.contains(&format!("but the model's embedding has {vocab} rows")),
            "{name}: {err}"
        );
    }
}

#[test]
fn config_without_model_type_is_named() {
    let dir = copy_fixture("clip-tiny");
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model_type") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn a_llava_tower_other_than_clip_and_llama_is_refused_by_name() {
    // transformers' LLaVA builds its towers by these model_types (absent: CLIP and Llama).
    for (tower, other) in [
        ("vision_config", "siglip_vision_model"),
        ("text_config", "mistral"),
    ] {
        let dir = copy_fixture("llava-tiny-hub");
        edit_config(dir.path(), |v| v[tower]["model_type"] = other.into());
        let err = load_err(dir.path());
        assert!(
            err.contains(&format!("{tower}.model_type \"{other}\" is not supported"))
                && err.contains("config.json"),
            "{err}"
        );
    }
    // Absent is the default tower: the model loads.
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["vision_config"]
            .as_object_mut()
            .unwrap()
            .remove("model_type");
    });
    let files = common::dir_files(dir.path()).unwrap();
    models::load(&files, &Device::Cpu, DType::F32).unwrap();
}

#[test]
fn config_with_a_bad_value_names_the_key_path() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["hidden_size"] = "sixty-four".into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("text_config.hidden_size") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_tensor_file_and_shapes() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["intermediate_size"] = 128.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("language_model.model.layers.0.mlp.gate_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("model-0000") && err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w = tensors["text_projection.weight"]
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    tensors.insert("text_projection.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("text_projection.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("vision_model.pre_layrnorm.bias");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("vision_model.pre_layrnorm.bias"), "{err}");
}

#[test]
fn truncated_safetensors_file_is_named() {
    let dir = copy_fixture("llava-tiny-hub");
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn garbage_instead_of_safetensors_is_named() {
    let dir = copy_fixture("clip-tiny");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Running the binary
// ------------------------------------------------------------------------------------------------

fn bella() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bella-vqa"));
    cmd.arg("--quiet").stdin(Stdio::null());
    cmd
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs the command; a run longer than two minutes is a hang: the child is killed and the test
/// fails. Panic text in the output fails the test too.
fn run(cmd: &mut Command) -> Outcome {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("the binary runs"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} hung");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for text in [&stderr, &stdout] {
        assert!(
            !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
            "{cmd:?} panicked: {text}"
        );
    }
    Outcome {
        success: out.status.success(),
        stdout,
        stderr,
    }
}

/// Runs a command that must fail cleanly and returns its error output.
fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.success, "{cmd:?} should fail");
    out.stderr
}

fn succeeds(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.success, "{cmd:?} failed: {}", out.stderr);
    out.stderr
}

fn llava_dir() -> PathBuf {
    fixture("llava-tiny-hub")
}

/// A folder with `images/square.png` (and a truncated `images/broken.png`) and `data.jsonl`
/// holding `lines`.
struct DataDir {
    dir: tempfile::TempDir,
}

impl DataDir {
    fn new(lines: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let png = std::fs::read(fixture("images/square.png")).unwrap();
        std::fs::write(images.join("square.png"), &png).unwrap();
        std::fs::write(images.join("broken.png"), &png[..png.len() / 2]).unwrap();
        std::fs::write(dir.path().join("data.jsonl"), lines.join("\n")).unwrap();
        DataDir { dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data.jsonl")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
}

fn line(id: &str, question: &str, image: &str) -> String {
    serde_json::json!({
        "question_id": id, "image": image, "question": question, "answers": ["red"]
    })
    .to_string()
}

fn good_lines() -> Vec<String> {
    vec![
        line("q1", "What color is the circle?", "images/square.png"),
        line("q2", "What shape is it?", "images/square.png"),
    ]
}

#[test]
fn bench_says_which_questions_no_answer_can_score() {
    // Every human answer of q2 is an article: normalised, nothing is left to match.
    let mut lines = good_lines();
    lines[1] = serde_json::json!({
        "question_id": "q2", "image": "images/square.png", "question": "What is it?",
        "answers": ["a", "an", "the"]
    })
    .to_string();
    let data = DataDir::new(&lines);
    let out = run(&mut bench(&data.data(), &data.out(), &["--bootstrap", "0"]));
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("1 question(s) of")
            && out.stderr.contains("normalise to nothing")
            && out.stderr.contains("\"q2\""),
        "{}",
        out.stderr
    );
    // Under the official rule (normalised only when the answers disagree) it can be matched.
    let data = DataDir::new(&lines);
    let out = run(&mut bench(
        &data.data(),
        &data.out(),
        &["--bootstrap", "0", "--normalize", "official"],
    ));
    assert!(
        out.success && !out.stderr.contains("normalise to nothing"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_training_answer_that_is_empty_or_too_long_is_named() {
    // A test set's records (no answers, VQAv2's consensus answer left empty): nothing to train
    // on (it trained towards an empty answer, loss ~30).
    let lines: Vec<String> = ["q1", "q3"]
        .iter()
        .map(|id| {
            serde_json::json!({"question_id": id, "image": "images/square.png",
                               "question": "What is it?", "answers": [],
                               "multiple_choice_answer": ""})
            .to_string()
        })
        .collect();
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("have no answers to train on") && err.contains("q1"),
        "{err}"
    );
    // An answer too long for the model's positions names the answer, not only the question.
    let mut lines = good_lines();
    lines.push(
        serde_json::json!({"question_id": "q4", "image": "images/square.png",
                           "question": "What is it?", "answers": ["red ".repeat(400)]})
        .to_string(),
    );
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("1 training question(s) the model cannot train on (first: question \"q4\"")
            && err.contains("shorten the question or the answer")
            && err.contains("--skip-bad"),
        "{err}"
    );
    // With --skip-bad it is left out and the others train.
    succeeds(&mut train(&data, &["--skip-bad"]));
    assert!(data.out().join(PARTICLES_FILE).exists());

    // When --skip-bad leaves nothing, the error says why, --quiet or not.
    let lines = [
        "{not json".to_string(),
        serde_json::json!({"question_id": "q5", "image": "images/square.png",
                           "question": "What is it?", "answers": []})
        .to_string(),
        serde_json::json!({"question_id": "q6", "image": "images/square.png",
                           "question": "What is it?", "answers": ["red ".repeat(400)]})
        .to_string(),
    ];
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &["--skip-bad", "--quiet"]));
    assert!(
        err.contains("no training question is left")
            && err.contains("skipped 2 bad record(s)")
            && err.contains("line 1: not valid JSON")
            && err.contains("1 training question(s) the model cannot train on")
            && err.contains("question \"q6\""),
        "{err}"
    );
}

/// A training step that may not fit in the memory available is warned about before it starts,
/// with what to lower; gradient checkpointing shrinks the figure.
#[test]
fn a_training_step_larger_than_the_memory_available_is_warned_about() {
    let data = DataDir::new(&good_lines());
    let rows_figure = |said: &str, rows: usize| -> f64 {
        let rest = said
            .split("a training step may keep ~")
            .nth(1)
            .unwrap_or_else(|| panic!("no warning: {said}"));
        assert!(
            rest.contains(&format!("{rows} rows of up to")) && rest.contains("--targets"),
            "{said}"
        );
        let mut words = rest.split(' ');
        let value: f64 = words.next().unwrap().parse().unwrap();
        match words.next() {
            Some("GB") => value * 1e3,
            Some("MB") => value,
            other => panic!("{other:?}: {said}"),
        }
    };
    let figure = |said: &str| rows_figure(said, 2);
    let tight = bella_vqa::models::compute::MEM_AVAILABLE_ENV;
    // Room for the model (under 1 MB), not for its step.
    let said = succeeds(train(&data, &[]).env(tight, "2000000"));
    assert!(said.contains("pass --gradient-checkpointing"), "{said}");
    let whole = figure(&said);
    std::fs::remove_dir_all(data.out()).unwrap();
    let mut cmd = train(&data, &["--gradient-checkpointing"]);
    let said = succeeds(cmd.env(tight, "2000000"));
    assert!(
        !said.contains("--gradient-checkpointing"),
        "already on: {said}"
    );
    let layered = figure(&said);
    assert!(layered < whole, "{layered} MB against {whole} MB");
    // The estimate can run under the peak: said from 80 % of what is available.
    std::fs::remove_dir_all(data.out()).unwrap();
    let above = format!("{}", (whole * 1e6 / 0.9) as u64);
    figure(&succeeds(train(&data, &[]).env(tight, &above)));
    // Particles in the vision tower keep its activations too: counted alone and added.
    let vision = ["--targets", "vision_tower.*.q_proj"];
    std::fs::remove_dir_all(data.out()).unwrap();
    let vision_only = figure(&succeeds(train(&data, &vision).env(tight, "1000000")));
    // Layered under --gradient-checkpointing (4 particles: the tiny tower's figures then pass
    // the model's size).
    let four = |checkpointing: bool| {
        std::fs::remove_dir_all(data.out()).unwrap();
        let mut cmd = bella();
        cmd.args(["train", "--model"])
            .arg(llava_dir())
            .arg("--data")
            .arg(data.data())
            .arg("--out")
            .arg(data.out())
            .args(["--epochs", "1", "--batch-size", "1", "--particles", "4"])
            .args([
                "--rank",
                "2",
                "--max-steps",
                "1",
                "--targets",
                "vision_tower.*.q_proj",
            ])
            .env(tight, "1000000");
        if checkpointing {
            cmd.arg("--gradient-checkpointing");
        }
        rows_figure(&succeeds(&mut cmd), 4)
    };
    let (vision_whole, vision_layered) = (four(false), four(true));
    assert!(
        vision_layered < vision_whole,
        "{vision_layered} MB against {vision_whole} MB"
    );
    std::fs::remove_dir_all(data.out()).unwrap();
    let both = ["--targets", "language_model.*.q_proj,vision_tower.*.q_proj"];
    let both = figure(&succeeds(train(&data, &both).env(tight, "2000000")));
    std::fs::remove_dir_all(data.out()).unwrap();
    let language = ["--targets", "language_model.*.q_proj"];
    let language = figure(&succeeds(train(&data, &language).env(tight, "2000000")));
    assert!(
        (both - language - vision_only).abs() <= 0.01 * both,
        "{both} MB against {language} + {vision_only} MB"
    );
    // With room, nothing is said.
    std::fs::remove_dir_all(data.out()).unwrap();
    let said = succeeds(train(&data, &[]).env(tight, "100000000000"));
    assert!(!said.contains("a training step may keep"), "{said}");
}

/// SVGD's ΔW kernel from particles that all start at the base (--init-b-std 0) can draw them
/// together: said before training, and not for the parameter kernel or random B.
#[test]
fn svgd_from_equal_particles_with_the_delta_w_kernel_is_warned_about() {
    let data = DataDir::new(&good_lines());
    let svgd = ["--method", "svgd"];
    let warning = "the delta-w kernel's repulsion can then draw the particles together";
    let said = succeeds(train(&data, &svgd).args(["--init-b-std", "0"]));
    assert!(
        said.contains(warning) && said.contains("--kernel params"),
        "{said}"
    );
    let others: [&[&str]; 2] = [
        &["--init-b-std", "0", "--kernel", "params"],
        &["--init-b-std", "0.001"],
    ];
    for other in others {
        std::fs::remove_dir_all(data.out()).unwrap();
        let said = succeeds(train(&data, &svgd).args(other));
        assert!(!said.contains(warning), "{other:?}: {said}");
    }
}

/// A question with nothing visible in it (control or invisible characters alone) asks nothing,
/// in training as in `ask`; blanks around a question are not part of it, in training as in `ask`.
#[test]
fn training_reads_questions_as_ask_reads_them() {
    let mut lines = good_lines();
    lines.push(line("q3", "\u{180E}\u{200E}\u{1}", "images/square.png"));
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("question \"q3\"") && err.contains("the question is empty"),
        "{err}"
    );
    succeeds(&mut train(&data, &["--skip-bad"]));

    let p = Prompter::from_dir(&llava_dir(), Some(DEFAULT_IMAGE_TOKEN)).unwrap();
    let ids = |q: &str| p.encode_question(q, true, 25, Some("red")).unwrap();
    assert_eq!(ids("  What color is it?\n\n"), ids("What color is it?"));
    assert_ne!(ids("What color is it ?"), ids("What color is it?"));
}

/// A validation question the model cannot answer is found before the first step (it stopped
/// the run at its first evaluation, the steps since the last checkpoint lost), named with its
/// file; `--skip-bad` leaves it out.
#[test]
fn an_unanswerable_validation_question_stops_train_before_it_starts() {
    let data = DataDir::new(&good_lines());
    let val = data.dir.path().join("val.jsonl");
    let long = format!("What color is {}?", "the circle ".repeat(300));
    let mut lines = good_lines();
    lines.push(line("v9", &long, "images/square.png"));
    std::fs::write(&val, lines.join("\n")).unwrap();
    let err = fails(train(&data, &["--eval-every", "1"]).arg("--val").arg(&val));
    assert!(
        err.contains("val.jsonl: 1 validation question(s) the model cannot answer")
            && err.contains("\"v9\"")
            && err.contains("positions"),
        "{err}"
    );
    assert!(!data.out().join(PARTICLES_FILE).exists());
    // A prompt that fits but leaves no room for the evaluation's answer tokens is unfit too
    // (decoding past the model's positions stopped the run just as well).
    let (near, _) = question_of_tokens(249..=256);
    let mut near_lines = good_lines();
    near_lines.push(line("v8", &near, "images/square.png"));
    let near_val = data.dir.path().join("near.jsonl");
    std::fs::write(&near_val, near_lines.join("\n")).unwrap();
    let err = fails(
        train(&data, &["--eval-every", "1"])
            .arg("--val")
            .arg(&near_val),
    );
    assert!(
        err.contains("\"v8\"") && err.contains("tokens of an answer at each evaluation"),
        "{err}"
    );
    succeeds(
        train(&data, &["--eval-every", "1", "--skip-bad"])
            .arg("--val")
            .arg(&val),
    );
    assert!(data.out().join(PARTICLES_FILE).exists());
}

/// A CLIP training record whose answer makes its text longer than CLIP's text positions is that
/// record's fault: named (not the first question of the set), and left out with --skip-bad.
#[test]
fn a_clip_answer_too_long_for_its_text_positions_is_that_records() {
    let mut lines = good_lines();
    lines[1] = serde_json::json!({"question_id": "q2", "image": "images/square.png",
                                  "question": "What shape is it?", "answers": ["circle"]})
    .to_string();
    lines.push(
        serde_json::json!({"question_id": "q3", "image": "images/square.png",
                           "question": "What is it?", "answers": ["word ".repeat(40)]})
        .to_string(),
    );
    let data = DataDir::new(&lines);
    let clip = fixture("clip-tiny");
    let err = fails(&mut train_model(&clip, &data, &[]));
    assert!(
        err.contains("question \"q3\"")
            && err.contains("is longer than the 32 tokens")
            && !err.contains("--answers"),
        "{err}"
    );
    succeeds(&mut train_model(&clip, &data, &["--skip-bad"]));
}

/// A CLIP training question is scored against every answer of the vocabulary: one that fits
/// with its own answer but not with the longest is named so (it quoted another question's
/// answer as if it were its own), and --skip-bad leaves it out (it stopped the run all the same).
#[test]
fn a_clip_question_too_long_for_the_longest_vocabulary_answer_is_named_and_skippable() {
    let record = |id: &str, question: &str, answer: &str| {
        serde_json::json!({"question_id": id, "image": "images/square.png",
                           "question": question, "answers": [answer]})
        .to_string()
    };
    let data = DataDir::new(&[
        record("q1", "What color is the circle?", "red"),
        record("q2", "What?", "word word word"),
        // 6 words more: fits with "red", not with "word word word" (32 positions).
        record("q3", "What is it it it it it it ?", "red"),
    ]);
    let clip = fixture("clip-tiny");
    let err = fails(&mut train_model(&clip, &data, &[]));
    assert!(
        err.contains(
            "question \"q3\": scored against every answer of the vocabulary, it does not \
                      fit with the longest, \"word word word\""
        ) && err.contains("--skip-bad"),
        "{err}"
    );
    succeeds(&mut train_model(&clip, &data, &["--skip-bad"]));
}

/// `train` on the tiny LLaVA with small settings plus `extra`.
fn train(data: &DataDir, extra: &[&str]) -> Command {
    train_model(&llava_dir(), data, extra)
}

/// `train` on `model` with small settings plus `extra`.
fn train_model(model: &Path, data: &DataDir, extra: &[&str]) -> Command {
    let mut cmd = bella();
    cmd.arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data.data())
        .arg("--out")
        .arg(data.out())
        .args(["--epochs", "1", "--batch-size", "1", "--particles", "2"])
        .args(["--rank", "2", "--max-steps", "1"])
        .args(extra);
    cmd
}

fn ask(extra: &[&str]) -> Command {
    ask_about(&fixture("images/square.png"), extra)
}

fn ask_about(image: &Path, extra: &[&str]) -> Command {
    let mut cmd = bella();
    cmd.arg("ask")
        .arg("--model")
        .arg(llava_dir())
        .arg("--image")
        .arg(image)
        .args(extra);
    cmd
}

fn bench(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = bella();
    cmd.arg("bench")
        .arg("--model")
        .arg(llava_dir())
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// [`bench`] of `data` into its `out` without `--quiet`, for what it says along the way.
fn loud_bench(data: &DataDir, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bella-vqa"));
    cmd.stdin(Stdio::null())
        .arg("bench")
        .arg("--model")
        .arg(llava_dir())
        .arg("--data")
        .arg(data.data())
        .arg("--out")
        .arg(data.out())
        .args(extra);
    cmd
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

// ------------------------------------------------------------------------------------------------
// 1. Configs are validated at load, with the file and key named
// ------------------------------------------------------------------------------------------------

#[test]
fn config_invariants_are_checked_at_load_with_the_key_named() {
    let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        (
            "llava-tiny-hub",
            "/text_config/num_key_value_heads",
            0.into(),
            "text_config.num_key_value_heads is 0",
        ),
        (
            "llava-tiny-hub",
            "/text_config/num_attention_heads",
            0.into(),
            "text_config.num_attention_heads is 0",
        ),
        (
            "llava-tiny-hub",
            "/text_config/num_attention_heads",
            5.into(),
            "text_config.hidden_size 64 is not divisible by text_config.num_attention_heads 5",
        ),
        (
            "llava-tiny-hub",
            "/text_config/num_key_value_heads",
            3.into(),
            "text_config.num_attention_heads 4 is not a multiple of text_config.num_key_value_heads 3",
        ),
        (
            "llava-tiny-hub",
            "/text_config/rope_theta",
            (-1.0).into(),
            "text_config.rope_theta",
        ),
        (
            "llava-tiny-hub",
            "/image_token_index",
            5000.into(),
            "image_token_index 5000 is outside the vocabulary",
        ),
        (
            "clip-tiny",
            "/vision_config/patch_size",
            0.into(),
            "vision_config.patch_size is 0",
        ),
        (
            "clip-tiny",
            "/vision_config/image_size",
            100_000.into(),
            "vision_config.image_size 100000 is larger than 8192",
        ),
        (
            "clip-tiny",
            "/text_config/vocab_size",
            0.into(),
            "text_config.vocab_size is 0",
        ),
    ];
    for (model, pointer, value, expected) in cases {
        let dir = copy_fixture(model);
        edit_config(dir.path(), |v| {
            *v.pointer_mut(pointer).unwrap() = value.clone()
        });
        let err = load_err(dir.path());
        assert!(
            err.contains(expected) && err.contains("config.json"),
            "{pointer} = {value}: {err}"
        );
    }
}

/// transformers saves some values under their old and new names both (LlamaConfig copies
/// `rope_scaling.type` into `rope_type`): such configs load when the two agree.
#[test]
fn a_value_under_its_old_and_new_names_loads_when_they_agree() {
    use serde_json::json;
    let load = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = copy_fixture("llava-tiny-hub");
        edit_config(dir.path(), edit);
        let files = common::dir_files(dir.path()).expect("files resolve");
        models::load(&files, &Device::Cpu, DType::F32)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    let index = |v: &serde_json::Value| v["image_token_index"].clone();
    load(&|v| {
        v["text_config"]["rope_scaling"] = json!({"type": "default", "rope_type": "default"})
    })
    .expect("both names, one value");
    load(&|v| v["image_token_id"] = index(v)).expect("both names, one value");
    // rope_theta beside transformers 5's rope_parameters: the latter's value is the one
    // transformers 5 uses (its standardize_rope_params only fills a missing one from the former).
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v: &mut serde_json::Value| {
        v["text_config"]["rope_theta"] = json!(10000.0);
        v["text_config"]["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500.0});
    });
    let files = common::dir_files(dir.path()).unwrap();
    let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
    let models::Model::Llava(m) = &loaded.model else {
        panic!("a LLaVA")
    };
    assert_eq!(m.config().text_config.rope_theta(), 500.0);
    // Which θ transformers 5 uses where `rope_scaling` (the 4.x key) is there too: a non-empty
    // `rope_scaling` replaces `rope_parameters` whole (`convert_rope_params_to_dict`), and the
    // legacy `rope_theta` fills a θ it lacks. Pinned from transformers 5.24's
    // `LlavaConfig.from_dict(...).text_config.rope_parameters`.
    for (text_config, theta) in [
        (
            json!({"rope_scaling": {"rope_type": "default", "rope_theta": 50000.0}}),
            50000.0,
        ),
        (
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
                   "rope_scaling": {"rope_type": "default"}}),
            10000.0,
        ),
        (
            json!({"rope_theta": 700.0,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0},
                   "rope_scaling": {"rope_type": "default"}}),
            700.0,
        ),
        (
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                   "rope_scaling": {}}),
            500.0,
        ),
        (json!({"rope_theta": 300.0, "rope_scaling": null}), 300.0),
    ] {
        let dir = copy_fixture("llava-tiny-hub");
        edit_config(dir.path(), |v: &mut serde_json::Value| {
            let text = v["text_config"].as_object_mut().unwrap();
            for key in ["rope_theta", "rope_parameters", "rope_scaling"] {
                text.remove(key);
            }
            text.extend(text_config.as_object().unwrap().clone());
        });
        let files = common::dir_files(dir.path()).unwrap();
        let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
        let models::Model::Llava(m) = &loaded.model else {
            panic!("a LLaVA")
        };
        assert_eq!(m.config().text_config.rope_theta(), theta, "{text_config}");
    }
    // A type in the section transformers ignores does not matter; in the one it uses, it does.
    load(&|v| {
        v["text_config"]["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0});
        v["text_config"]["rope_scaling"] = json!({"rope_type": "default"});
    })
    .expect("rope_parameters replaced by rope_scaling");
    for (edit, expected) in [
        (
            Box::new(|v: &mut serde_json::Value| {
                v["text_config"]["rope_scaling"] =
                    json!({"type": "linear", "rope_type": "linear", "factor": 2.0})
            }) as Box<dyn Fn(&mut serde_json::Value)>,
            "rope type \"linear\" is not supported",
        ),
        (
            Box::new(|v: &mut serde_json::Value| {
                v["text_config"]["rope_scaling"] = json!({"type": "linear", "rope_type": "default"})
            }),
            "text_config.rope_scaling: type \"linear\" and rope_type \"default\" disagree",
        ),
        (
            // transformers refuses a factor without a type too: it would be silently ignored.
            Box::new(|v: &mut serde_json::Value| {
                v["text_config"]["rope_scaling"] = json!({"factor": 4.0})
            }),
            "a rope scaling factor (4.0) without a rope type is not supported",
        ),
        (
            Box::new(|v: &mut serde_json::Value| v["image_token_id"] = json!(7)),
            "image_token_id 7 and image_token_index",
        ),
    ] {
        let err = load(&*edit).expect_err(expected);
        assert!(err.contains(expected), "{err}");
    }
}

/// transformers 5 ties a LLaVA's output layer to its embeddings when the model's own
/// `tie_word_embeddings` is true, whatever `text_config` says (`LlavaConfig.__post_init__`), and
/// its `save_pretrained` then stores no `lm_head`: such a checkpoint computes what one storing
/// the embeddings as its `lm_head` computes. `"swish"` is transformers' other name for SiLU.
#[test]
fn a_checkpoint_tied_by_the_models_own_key_loads_tied() {
    let weights = |dir: &Path| dir.join("model.safetensors");
    let tensors =
        candle_core::safetensors::load(weights(&fixture("llava-tiny-v5")), &Device::Cpu).unwrap();
    let embed = tensors["language_model.model.embed_tokens.weight"].clone();
    let write = |dir: &Path, lm_head: Option<&Tensor>| {
        let mut t = tensors.clone();
        t.remove("language_model.lm_head.weight");
        if let Some(head) = lm_head {
            t.insert("language_model.lm_head.weight".into(), head.clone());
        }
        candle_core::safetensors::save(&t, weights(dir)).unwrap();
    };
    let untied = copy_fixture("llava-tiny-v5");
    write(untied.path(), Some(&embed));
    let tied = copy_fixture("llava-tiny-v5");
    write(tied.path(), None);
    edit_config(tied.path(), |v| {
        v["tie_word_embeddings"] = true.into();
        v["text_config"]["tie_word_embeddings"] = false.into();
        v["text_config"]["hidden_act"] = "swish".into();
    });
    let logits = |dir: &Path| {
        let files = common::dir_files(dir).unwrap();
        let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
        bella_vqa::logits::prompt_outputs(&loaded, None, "What color is the circle?", false)
            .unwrap()
            .logits
    };
    assert_eq!(
        common::max_abs_diff(&logits(tied.path()), &logits(untied.path())),
        0.0
    );
}

#[test]
fn inspect_of_a_config_with_zero_heads_fails_cleanly() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["num_attention_heads"] = 0.into()
    });
    let err = fails(bella().args(["inspect", "--model"]).arg(dir.path()));
    assert!(err.contains("text_config.num_attention_heads"), "{err}");
}

#[test]
fn tensors_the_config_does_not_use_are_reported_as_transformers_does() {
    // A config with one decoder layer fewer than its weights: transformers loads it and warns
    // "Some weights of the model checkpoint … were not used"; so do we, and `inspect` lists them.
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["text_config"]["num_hidden_layers"] = 2.into()
    });
    let files = common::dir_files(dir.path()).unwrap();
    let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
    let unused = &loaded.info.unused_tensors;
    assert!(!unused.is_empty());
    assert!(
        unused
            .iter()
            .all(|k| k.starts_with("language_model.model.layers.2.")),
        "{unused:?}"
    );
    let out = run(bella().args(["inspect", "--model"]).arg(dir.path()));
    assert!(out.success);
    let warning = format!("warning: {} of the tensors", unused.len());
    assert!(out.stderr.contains(&warning), "{}", out.stderr);
    assert!(out.stdout.contains(&unused[0]), "{}", out.stdout);
    // The shipped checkpoints' layout has none (LLaVA's unused vision post_layernorm counts as
    // read, as transformers loads it).
    for name in ["llava-tiny-hub", "llava-tiny-v5", "clip-tiny"] {
        let files = common::dir_files(&fixture(name)).unwrap();
        let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.info.unused_tensors, Vec::<String>::new(), "{name}");
    }
}

#[test]
fn a_huge_crop_in_the_preprocessor_config_is_refused_before_allocating() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_json(&dir.path().join("preprocessor_config.json"), |v| {
        v["crop_size"] = serde_json::json!({"height": 100_000, "width": 100_000})
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("crop_size")
            && err.contains("100000")
            && err.contains("preprocessor_config.json"),
        "{err}"
    );
}

#[test]
fn nan_in_a_small_base_tensor_names_file_and_tensor() {
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "vision_model.pre_layrnorm.weight";
    let shape = tensors[key].dims().to_vec();
    let mut values = vec![1f32; shape.iter().product()];
    values[3] = f32::NAN;
    values[5] = f32::INFINITY;
    tensors.insert(
        key.into(),
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(key) && err.contains("model.safetensors") && err.contains("2 NaN or infinite"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------
// Particle sets
// ------------------------------------------------------------------------------------------------

/// A small valid particle set for the tiny LLaVA (P = 2, rank 2 on q_proj) in `dir`.
fn particle_set(dir: &Path) {
    let loaded = common::load_model("llava-tiny-hub");
    let Model::Llava(mut m) = loaded.model else {
        panic!("not LLaVA")
    };
    let spec = AdapterSpec {
        targets: vec!["q_proj".into()],
        rank: 2,
        alpha: 4.0,
        particles: 2,
    };
    let layers = attach(m.as_mut(), &spec, InitB::Normal { std: 0.01 }, 1).unwrap();
    let config = ParticleConfig {
        targets: spec.targets.clone(),
        layers,
        rank: 2,
        alpha: 4.0,
        particles: 2,
        seed: 1,
        abstention: Some(common::test_abstention(0.5)),
        ..common::tiny_llava_particle_config(&loaded.files)
    };
    ParticleSet::from_model(m.as_ref(), config)
        .save(dir)
        .unwrap();
}

fn particles_err(dir: &Path) -> String {
    let source = ModelSource::Dir(llava_dir());
    match BellaVqa::load(&source, Some(dir), &LoadOptions::default()) {
        Ok(_) => panic!("loading the particles in {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_particle_configs_name_the_file_and_field() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("/particles", 0.into(), "particles = 0"),
        ("/rank", 0.into(), "rank = 0"),
        ("/alpha", 0.0.into(), "alpha = 0"),
        // Finite in f64, infinite once it scales an f32 ΔW; negative: no LoRA.
        (
            "/alpha",
            1e300.into(),
            "alpha = 1e300: must be above 0 and at most 1e6",
        ),
        ("/alpha", (-16.0).into(), "alpha = -16: must be above 0"),
        (
            "/abstention/threshold",
            1.5.into(),
            "abstention.threshold 1.5",
        ),
        (
            "/abstention/threshold",
            (-0.1).into(),
            "abstention.threshold -0.1",
        ),
    ];
    for (pointer, value, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        particle_set(dir.path());
        edit_json(&dir.path().join(CONFIG_FILE), |v| {
            *v.pointer_mut(pointer).unwrap() = value.clone()
        });
        let err = particles_err(dir.path());
        assert!(
            err.contains(expected) && err.contains(CONFIG_FILE),
            "{pointer} = {value}: {err}"
        );
    }
    // The same through the binary: an exit status, no panic.
    let dir = tempfile::tempdir().unwrap();
    particle_set(dir.path());
    edit_json(&dir.path().join(CONFIG_FILE), |v| v["particles"] = 0.into());
    let err = fails(&mut ask(&[
        "--adapters",
        dir.path().to_str().unwrap(),
        "What is it?",
    ]));
    assert!(err.contains("particles = 0"), "{err}");
}

#[test]
fn stored_temperatures_maps_and_guarantees_that_cannot_be_are_refused() {
    // calibrate fits the temperature in [0.05, 20]: 1e308 made every confidence 0.5, 1e-300
    // every one 1. A guarantee's numbers must agree with each other.
    let guarantee = |answered: usize, risk: f64, bound: f64, coverage: f64| {
        serde_json::json!({
            "method": "ltt-binomial", "alpha": 0.1, "delta": 0.1, "questions": 10,
            "answered": answered, "risk": risk, "bound": bound, "coverage": coverage
        })
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "temperature",
            1e308.into(),
            "abstention.temperature 1e308 is outside [0.05, 20]",
        ),
        (
            "temperature",
            1e-300.into(),
            "abstention.temperature 1e-300 is outside",
        ),
        (
            "temperature",
            0.0.into(),
            "abstention.temperature 0.0 is outside",
        ),
        (
            "confidence_map",
            serde_json::json!({"kind": "platt", "a": -1.0, "b": 0.0}),
            "abstention.confidence_map: recalibrate: platt needs a finite a > 0",
        ),
        (
            "confidence_map",
            serde_json::json!({"kind": "isotonic", "knots": [[0.5, 0.9], [0.4, 0.95]]}),
            "abstention.confidence_map: recalibrate: isotonic knots must increase strictly",
        ),
        (
            "guarantee",
            guarantee(20, 0.05, 0.08, 1.0),
            "20 answered of 10 questions",
        ),
        (
            "guarantee",
            guarantee(8, 0.05, 0.01, 0.8),
            "risk 0.05 <= bound 0.01",
        ),
        (
            "guarantee",
            guarantee(8, 0.05, 0.5, 0.8),
            "bound 0.5 <= alpha 0.1",
        ),
        (
            "guarantee",
            guarantee(8, 0.05, 0.08, 2.0),
            "coverage 2.0 is outside [0, 1]",
        ),
        (
            "guarantee",
            guarantee(8, 0.05, 0.08, 0.5),
            "coverage 0.5 is not 8 answered of 10 questions",
        ),
        (
            "guarantee",
            {
                let mut g = guarantee(8, 0.05, 0.08, 0.8);
                g["method"] = "bogus".into();
                g
            },
            "method \"bogus\" is none of",
        ),
    ];
    for (key, value, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        particle_set(dir.path());
        edit_json(&dir.path().join(CONFIG_FILE), |v| {
            v["abstention"][key] = value.clone()
        });
        let err = particles_err(dir.path());
        assert!(
            err.contains(expected) && err.contains(CONFIG_FILE) && err.contains("recalibrate"),
            "{key} = {value}: {err}"
        );
    }
    // A consistent guarantee, a temperature in the range and an increasing map load.
    let dir = tempfile::tempdir().unwrap();
    particle_set(dir.path());
    edit_json(&dir.path().join(CONFIG_FILE), |v| {
        v["abstention"]["guarantee"] = guarantee(8, 0.05, 0.08, 0.8);
        v["abstention"]["temperature"] = 1.1.into();
        v["abstention"]["confidence_map"] =
            serde_json::json!({"kind": "platt", "a": 1.2, "b": 0.3});
    });
    BellaVqa::load(
        &ModelSource::Dir(llava_dir()),
        Some(dir.path()),
        &LoadOptions::default(),
    )
    .unwrap();
}

/// Makes the config one written before it recorded its factors' sha256, so that the checks
/// behind that one (what an older set still relies on) are reached.
fn forget_particles_hash(dir: &Path) {
    edit_json(&dir.join("bella_config.json"), |v| {
        v.as_object_mut().unwrap().remove("particles_sha256");
    });
}

#[test]
fn factors_the_config_does_not_list_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    particle_set(dir.path());
    forget_particles_hash(dir.path());
    let path = dir.path().join(PARTICLES_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let stray = tensors.values().next().unwrap().clone();
    tensors.insert("bogus.bella_A".into(), stray);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = particles_err(dir.path());
    assert!(
        err.contains("bogus.bella_A") && err.contains("does not list"),
        "{err}"
    );
}

#[test]
fn nan_in_particle_weights_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    particle_set(dir.path());
    forget_particles_hash(dir.path());
    let path = dir.path().join(PARTICLES_FILE);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "language_model.model.layers.1.self_attn.q_proj.bella_B";
    let bad = (tensors[key].clone() * f64::NAN).unwrap();
    tensors.insert(key.into(), bad);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = particles_err(dir.path());
    assert!(
        err.contains(key) && err.contains(PARTICLES_FILE) && err.contains("NaN"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------
// 2. Sizes from users are checked before anything is allocated from them
// ------------------------------------------------------------------------------------------------

/// A question whose prompt (with its image) takes a number of the tiny LLaVA's 256 positions
/// within `tokens`, and that number.
fn question_of_tokens(tokens: std::ops::RangeInclusive<usize>) -> (String, usize) {
    let p = Prompter::from_dir(&llava_dir(), Some(DEFAULT_IMAGE_TOKEN)).unwrap();
    (1..200)
        .map(|k| format!("What color is {}?", "the circle ".repeat(k)))
        .map(|q| {
            let len = p.encode_question(&q, true, 25, None).unwrap().len();
            (q, len)
        })
        .find(|(_, len)| tokens.contains(len))
        .unwrap_or_else(|| panic!("no question of {tokens:?} prompt tokens"))
}

fn long_question() -> String {
    "is it red or blue ".repeat(400)
}

#[test]
fn a_too_long_question_is_refused_before_the_model_runs() {
    let err = fails(&mut ask(&[&long_question()]));
    assert!(err.contains("more than the model's 256 positions"), "{err}");
    // One that leaves less room than --max-new-tokens (16) is answered within the room, as the
    // server answers it, and says so.
    let (near, near_tokens) = question_of_tokens(245..=254);
    let out = ask(&["--json", &near]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Said, but not with --quiet (which `ask` here passes).
    assert!(!err.contains("the answer takes at most"), "{err}");
    let said = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .args(["ask", "--json", "--model"])
        .arg(llava_dir())
        .arg("--image")
        .arg(fixture("images/square.png"))
        .arg(&near)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&said.stderr);
    assert!(said.contains("the answer takes at most"), "{said}");
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let generated = response["generated_tokens"].as_u64().unwrap() as usize;
    assert!(near_tokens + generated <= 256, "{response}");
    let err = fails(&mut ask(&[&"x".repeat(70_000)]));
    assert!(err.contains("70000 bytes"), "{err}");
}

/// A long `--answers` list costs the memory of its embeddings, not of one text-tower batch
/// holding all of it: 6000 answers took 266 MiB with this tiny CLIP, 300 000 tens of GB.
#[test]
fn a_long_answer_list_is_scored_in_bounded_memory() {
    let data = DataDir::new(&[line("q1", "What color is it?", "images/square.png")]);
    let answers = data.dir.path().join("answers.txt");
    let list: Vec<String> = (0..6000).map(|i| format!("answer {i}")).collect();
    std::fs::write(&answers, list.join("\n")).unwrap();
    let mut cmd = bella();
    cmd.arg("bench")
        .arg("--model")
        .arg(fixture("clip-tiny"))
        .arg("--answers")
        .arg(&answers)
        .arg("--data")
        .arg(data.data())
        .arg("--out")
        .arg(data.out());
    succeeds(&mut cmd);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.out().join("results.json")).unwrap())
            .unwrap();
    let peak = results["timing"]["peak_memory_mib"].as_f64().unwrap();
    assert!(peak < 150.0, "6000 answers took {peak} MiB");
    // The sample keeps the 100 most likely (a line each question, not 6000 candidates), and says
    // how many it left out with their probability.
    let samples = std::fs::read_to_string(data.out().join("samples.jsonl")).unwrap();
    let sample: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    let kept = sample["candidates"].as_array().unwrap();
    assert_eq!(kept.len(), 100);
    let left_out = &sample["candidates_left_out"];
    assert_eq!(left_out["count"], 5900, "{left_out}");
    let kept_mass: f64 = kept
        .iter()
        .map(|c| c["probability"].as_f64().unwrap())
        .sum();
    let total = kept_mass + left_out["probability"].as_f64().unwrap();
    assert!((total - 1.0).abs() < 1e-6, "{total}");
}

#[test]
fn bench_with_skip_bad_skips_a_too_long_question_and_records_why() {
    let mut lines = good_lines();
    lines.push(line("q-long", &long_question(), "images/square.png"));
    let data = DataDir::new(&lines);
    let err = fails(&mut bench(&data.data(), &data.out(), &[]));
    assert!(err.contains("q-long") && err.contains("positions"), "{err}");
    // Found before the first answer (it stopped the run when reached, maybe hours in).
    assert!(err.contains("1 question(s) cannot be answered"), "{err}");
    let samples = std::fs::read_to_string(data.out().join("samples.jsonl")).unwrap_or_default();
    assert_eq!(samples, "", "answered before the check");
    let out = data.dir.path().join("out-skip");
    succeeds(&mut bench(&data.data(), &out, &["--skip-bad"]));
    let skipped = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert!(
        skipped.contains("q-long") && skipped.contains("positions"),
        "{skipped}"
    );
    assert_eq!(skipped.lines().count(), 1, "{skipped}");
}

/// A question whose prompt leaves less room than --max-new-tokens is answered within the room
/// by bench as by ask (bench refused it, and --skip-bad left it out of the accuracy), and said
/// so; one whose prompt leaves no room at all is still refused before the first answer.
#[test]
fn bench_answers_a_question_near_the_positions_as_ask_does() {
    let (near, near_tokens) = question_of_tokens(245..=254);
    let mut lines = good_lines();
    lines.push(line("q-near", &near, "images/square.png"));
    let data = DataDir::new(&lines);
    // Said, but not with --quiet (which `bench` here passes).
    let said = succeeds(&mut loud_bench(&data, &[]));
    assert!(
        said.contains("1 question(s) left less room in the model's positions")
            && said.contains(&format!("\"q-near\" of {}", data.data().display()))
            && said.contains(&format!("{} answer token(s)", 256 - near_tokens)),
        "{said}"
    );
    let samples = std::fs::read_to_string(data.out().join("samples.jsonl")).unwrap();
    let sample: serde_json::Value = samples
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|s| s["question_id"] == "q-near")
        .unwrap();
    // Recorded with the answer and in the results, not only said.
    assert_eq!(sample["answer_limit"], 256 - near_tokens, "{sample}");
    let results = std::fs::read_to_string(data.out().join("results.json")).unwrap();
    assert!(
        results.contains("1 answer(s) were limited to the room"),
        "{results}"
    );
    let out = ask(&["--json", "--quiet", &near]).output().unwrap();
    assert!(out.status.success());
    let asked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sample["answer"], asked["answer"]);
    assert_eq!(sample["confidence"], asked["confidence"]);
    // A limit given is kept, as ask keeps it: then the question cannot be answered.
    let strict = data.dir.path().join("strict");
    let err = fails(&mut bench(
        &data.data(),
        &strict,
        &["--max-new-tokens", "16"],
    ));
    assert!(
        err.contains("\"q-near\"") && err.contains("allow at most"),
        "{err}"
    );
    // Nor is the run above continued under it (its limited answer would stay).
    let err = fails(&mut bench(
        &data.data(),
        &data.out(),
        &["--max-new-tokens", "16"],
    ));
    assert!(err.contains("answers_within_room"), "{err}");
    // calibrate answers it too (it failed the run: "--skip-bad skips such questions").
    let trained = DataDir::new(&good_lines());
    succeeds(&mut train(&trained, &[]));
    let mut calibrate = bella();
    calibrate
        .args([
            "calibrate",
            "--dry-run",
            "--target-coverage",
            "0.5",
            "--data",
        ])
        .arg(data.data())
        .arg("--adapters")
        .arg(trained.out());
    succeeds(&mut calibrate);
    // Its kept answers do not serve a run that keeps a given limit.
    let err = fails(calibrate.args(["--max-new-tokens", "16"]));
    assert!(
        err.contains("\"q-near\"") && err.contains("allow at most"),
        "{err}"
    );

    let (full, _) = question_of_tokens(256..=256);
    lines.push(line("q-full", &full, "images/square.png"));
    let data = DataDir::new(&lines);
    let err = fails(&mut bench(&data.data(), &data.out(), &[]));
    assert!(
        err.contains("\"q-full\"") && err.contains("leaves no room for an answer"),
        "{err}"
    );
}

/// A question skipped for its image, answered by a later invocation once the image is fixed,
/// leaves skipped.jsonl (results.json already counted it answered; the file still listed it).
#[test]
fn a_skipped_question_answered_later_leaves_the_skipped_list() {
    let mut lines = good_lines();
    lines.push(line("q-broken", "What color is it?", "images/broken.png"));
    let data = DataDir::new(&lines);
    succeeds(&mut bench(&data.data(), &data.out(), &["--skip-bad"]));
    let listed = std::fs::read_to_string(data.out().join("skipped.jsonl")).unwrap();
    assert!(listed.contains("q-broken"), "{listed}");
    std::fs::copy(
        fixture("images/square.png"),
        data.dir.path().join("images/broken.png"),
    )
    .unwrap();
    succeeds(&mut bench(&data.data(), &data.out(), &["--skip-bad"]));
    let samples = std::fs::read_to_string(data.out().join("samples.jsonl")).unwrap();
    assert!(samples.contains("q-broken"), "answered now");
    let listed = std::fs::read_to_string(data.out().join("skipped.jsonl")).unwrap_or_default();
    assert!(!listed.contains("q-broken"), "{listed}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.out().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(results["progress"]["skipped"], 0, "{}", results["progress"]);
}

#[test]
fn a_too_long_training_question_names_its_id() {
    let mut lines = good_lines();
    lines.push(line("q-long", &long_question(), "images/square.png"));
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("training question(s) the model cannot train on (first: question \"q-long\"")
            && err.contains("positions"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------
// 4. Numeric options are range-checked, and the message blames the option
// ------------------------------------------------------------------------------------------------

#[test]
fn train_options_out_of_range_name_the_option() {
    let data = DataDir::new(&good_lines());
    let cases: &[(&[&str], &str)] = &[
        (&["--grad-clip=-1"], "--grad-clip"),
        (&["--grad-clip", "0"], "--grad-clip"),
        (&["--alpha", "NaN"], "--alpha"),
        (&["--alpha", "0"], "--alpha"),
        (&["--prior-std", "0"], "--prior-std"),
        (&["--init-b-std", "NaN"], "--init-b-std"),
        (&["--init-b-std=-1"], "--init-b-std"),
        (&["--lr", "inf"], "--lr"),
        (&["--rank", "100000"], "--rank"),
        (&["--particles", "100000"], "--particles"),
        (&["--eval-every", "0"], "--eval-every"),
    ];
    for (args, option) in cases {
        let err = fails(&mut train(&data, args));
        assert!(err.contains(option), "{args:?}: {err}");
        assert!(!err.contains("diverged"), "{args:?} blames training: {err}");
        // An open upper end is said in words, not as f64::MAX's 309 digits.
        assert!(err.len() < 400, "{args:?}: {err}");
    }
    assert!(!data.out().join(PARTICLES_FILE).exists());
    // Targets that match nothing: the model's layer stacks and the pattern forms, not a Rust
    // Option.
    let err = fails(&mut train(&data, &["--targets", "nosuchmodule"]));
    assert!(
        err.contains("no layer matches")
            && err.contains("this model's layers are ")
            && err.contains("language_model.model.layers.0-")
            && !err.contains("Some("),
        "{err}"
    );
    // A reversed range is said to be one.
    let err = fails(&mut train(
        &data,
        &["--targets", "q_proj,language_model.layers.2-1.*.k_proj"],
    ));
    assert!(err.contains("is reversed: write 1-2"), "{err}");
    // A range that runs past the last layer (the fixture's are 0-2) would adapt fewer layers
    // than asked: refused, naming the layers there are.
    let err = fails(&mut train(
        &data,
        &["--targets", "language_model.layers.1-5.*.q_proj"],
    ));
    assert!(
        err.contains("names layers 1-5, but this model has only 0-2 there"),
        "{err}"
    );
    // Beside a pattern that matches, one that matches nothing (a range past the layers, a
    // typo) is named too: it was dropped without a word.
    for (idle, said) in [
        (
            "language_model.layers.70-71.*.k_proj",
            "names layers 70-71, but this model has only 0-2 there",
        ),
        ("bogus", "matches no layer"),
    ] {
        let targets = format!("q_proj,{idle}");
        let err = fails(&mut train(&data, &["--targets", &targets]));
        assert!(
            err.contains(&format!("the target {idle:?} {said}")),
            "{err}"
        );
    }
    assert!(!data.out().join(PARTICLES_FILE).exists());
}

#[test]
fn a_clip_trained_on_one_answer_is_refused() {
    // Both questions answer "red": a CLIP would always say "red" with confidence 1.
    let data = DataDir::new(&good_lines());
    let err = fails(&mut train_model(&fixture("clip-tiny"), &data, &[]));
    assert!(
        err.contains("every training question has the answer \"red\""),
        "{err}"
    );
    assert!(!data.out().join(PARTICLES_FILE).exists());
    // A question too long for CLIP's text positions with an answer: named before training.
    let long = format!("Is it {}red?", "really ".repeat(200));
    let mut lines = good_lines();
    lines.push(
        serde_json::json!({"question_id": "q3", "image": "images/square.png",
                           "question": long, "answers": ["blue"]})
        .to_string(),
    );
    let data = DataDir::new(&lines);
    let err = fails(&mut train_model(&fixture("clip-tiny"), &data, &[]));
    assert!(
        err.contains("(first: question \"q3\"") && err.contains("shorten the question"),
        "{err}"
    );
    assert!(!data.out().exists(), "no empty log left behind");
    // The same question among the validation questions: named before training too (it failed
    // at the first evaluation, after the first steps).
    let mut train_lines = good_lines();
    train_lines.push(
        serde_json::json!({"question_id": "q4", "image": "images/square.png",
                           "question": "Is it red?", "answers": ["blue"]})
        .to_string(),
    );
    let train_data = DataDir::new(&train_lines);
    let val = train_data.dir.path().join("val.jsonl");
    std::fs::write(&val, lines.join("\n")).unwrap();
    let err = fails(&mut train_model(
        &fixture("clip-tiny"),
        &train_data,
        &["--val", val.to_str().unwrap(), "--eval-every", "1"],
    ));
    assert!(
        err.contains(
            "val.jsonl: 1 validation question(s) the model cannot answer (first: question \"q3\""
        ) && err.contains("shorten the question"),
        "{err}"
    );
    assert!(!train_data.out().join(PARTICLES_FILE).exists());
}

#[test]
fn train_refuses_input_files_it_would_write_over() {
    // The data saved as train_log.jsonl in the folder given as --out: the log's clean-up cut it to
    // its log lines (60 questions became 1 line).
    let data = DataDir::new(&good_lines());
    let folder = data.data().parent().unwrap().to_path_buf();
    let log = folder.join("train_log.jsonl");
    std::fs::copy(data.data(), &log).unwrap();
    let before = std::fs::read(&log).unwrap();
    let err = fails(
        bella()
            .args(["train", "--model"])
            .arg(llava_dir())
            .arg("--data")
            .arg(&log)
            .arg("--out")
            .arg(&folder)
            .args(["--particles", "2", "--rank", "2", "--max-steps", "1"]),
    );
    assert!(
        err.contains("--data") && err.contains("a file train writes"),
        "{err}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), before);
}

#[test]
fn a_run_that_diverges_at_once_says_no_particles_were_kept() {
    let data = DataDir::new(&good_lines());
    // A prior this narrow makes the loss infinite at the first step.
    let err = fails(&mut train(&data, &["--prior-std", "1e-30"]));
    assert!(
        err.contains("diverged at step 1")
            && err.contains("in a new --out")
            && err.contains("--prior-std")
            && err.contains("no checkpoint was written yet"),
        "{err}"
    );
    assert!(!data.out().join(PARTICLES_FILE).exists());
    // A gradient whose norm overflows f32 (an SVGD repulsion of 1e30) scaled every update to
    // nothing: the particles froze while the loss looked fine. Now it is divergence too.
    let data = DataDir::new(&good_lines());
    let err = fails(&mut train(
        &data,
        &["--method", "svgd", "--repulsion", "1e30"],
    ));
    assert!(
        err.contains("diverged at step 1")
            && err.contains("gradient norm inf")
            && err.contains("--repulsion"),
        "{err}"
    );
    // Diverging right after a checkpoint: the message says that checkpoint is where the step
    // began (it was called "the last good particles" and may be what diverged).
    let data = DataDir::new(&good_lines());
    let err = fails(
        bella()
            .args(["train", "--model"])
            .arg(llava_dir())
            .arg("--data")
            .arg(data.data())
            .arg("--out")
            .arg(data.out())
            .args(["--epochs", "4", "--batch-size", "1", "--particles", "2"])
            .args([
                "--rank", "2", "--dtype", "f16", "--lr", "1", "--alpha", "1000",
            ])
            .args(["--checkpoint-every", "1"]),
    );
    assert!(
        err.contains("this step started from the particles of checkpoint")
            && err.contains("may be what diverged"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_or_image_processor_unlike_the_model_is_refused_at_load() {
    // image_token_index set to the end token: the tokenizer's <image> is another id.
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| v["image_token_index"] = 2.into());
    let err = fails(bella().args(["inspect", "--model"]).arg(dir.path()));
    assert!(
        err.contains("image_token_index is 2")
            && err.contains("\"<image>\" has id")
            && err.contains("disagree"),
        "{err}"
    );
    // A crop the vision tower does not take (it takes 30×30).
    let dir = copy_fixture("llava-tiny-hub");
    std::fs::remove_file(dir.path().join("processor_config.json")).ok();
    edit_json(&dir.path().join("preprocessor_config.json"), |v| {
        v["crop_size"] = serde_json::json!({"height": 60, "width": 60})
    });
    let err = fails(bella().args(["inspect", "--model"]).arg(dir.path()));
    assert!(
        err.contains("60×60")
            && err.contains("30×30")
            && err.contains("crop_size")
            && err.contains("vision_config.image_size"),
        "{err}"
    );
    // The same in a transformers 5 checkpoint: the file that holds the setting is named.
    let v5 = copy_fixture("llava-tiny-v5");
    edit_json(&v5.path().join("processor_config.json"), |v| {
        v["image_processor"]["crop_size"] = serde_json::json!({"height": 60, "width": 60})
    });
    let err = fails(bella().args(["inspect", "--model"]).arg(v5.path()));
    assert!(
        err.contains("processor_config.json, \"image_processor\"") && err.contains("60×60"),
        "{err}"
    );
    // No crop and no padding: only square images would fit.
    edit_json(&dir.path().join("preprocessor_config.json"), |v| {
        v["do_center_crop"] = false.into();
        v["do_pad"] = false.into();
    });
    let err = fails(bella().args(["inspect", "--model"]).arg(dir.path()));
    assert!(
        err.contains("aspect ratio") && err.contains("crop_size 30"),
        "{err}"
    );
}

#[test]
fn empty_files_and_folders_are_named_for_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let err = fails(ask_about(&empty, &[]).arg("What is it?"));
    assert!(
        err.contains("empty.png") && err.contains("is empty"),
        "{err}"
    );
    let err = fails(&mut bench(dir.path(), &dir.path().join("out"), &[]));
    assert!(err.contains("is a folder"), "{err}");
    let particles = dir.path().join("particles");
    particle_set(&particles);
    std::fs::write(particles.join(CONFIG_FILE), b"").unwrap();
    let err = particles_err(&particles);
    assert!(
        err.contains(CONFIG_FILE) && err.contains("not a valid particle config"),
        "{err}"
    );
}

#[test]
fn ask_options_out_of_range_name_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["--threshold", "NaN"], "--threshold"),
        (&["--threshold", "inf"], "--threshold"),
        (&["--threshold", "1.5"], "--threshold"),
        (&["--max-new-tokens", "0"], "--max-new-tokens"),
        (&["--temperature", "0"], "--temperature"),
        (&["--temperature", "NaN"], "--temperature"),
        (&["--temperature", "1", "--top-p", "0"], "--top-p"),
        (&["--temperature", "1", "--top-p", "1.5"], "--top-p"),
        // Options that would do nothing are errors, not silence.
        (&["--top-p", "0.5"], "--temperature"),
        (&["--seed", "3"], "--temperature"),
        // The prompt plus this many tokens wrapped around and passed the check.
        (
            &["--max-new-tokens", "18446744073709551615"],
            "--max-new-tokens",
        ),
    ];
    for (args, option) in cases {
        let mut cmd = ask(args);
        let err = fails(cmd.arg("What color is the circle?"));
        assert!(err.contains(option), "{args:?}: {err}");
    }
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), "red\nblue\n").unwrap();
    let err = fails(&mut ask(&[
        "--answers",
        list.path().to_str().unwrap(),
        "What is it?",
    ]));
    assert!(err.contains("--answers") && err.contains("CLIP"), "{err}");
}

#[test]
fn an_answer_longer_than_the_context_names_the_option_and_a_bench_of_nothing_fails() {
    // The tiny LLaVA has 256 positions; its prompt alone is a few dozen tokens.
    let err = fails(ask(&["--max-new-tokens", "300"]).arg("What color is the circle?"));
    assert!(
        err.contains("256 positions") && err.contains("--max-new-tokens"),
        "{err}"
    );
    // With --skip-bad every question is skipped for it: that measured nothing, so it fails.
    let data = DataDir::new(&good_lines());
    let err = fails(&mut bench(
        &data.data(),
        &data.out(),
        &["--skip-bad", "--max-new-tokens", "300"],
    ));
    assert!(
        err.contains("no question could be answered") && err.contains("--max-new-tokens"),
        "{err}"
    );
    assert!(!data.out().join("results.json").exists());
}

#[test]
fn a_response_template_that_cannot_render_is_refused_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jinja");
    // Valid syntax; fails only when rendered, and only when abstaining.
    std::fs::write(
        &bad,
        "{% if abstained %}{{ nothing.there }}{% else %}{{ answer }}{% endif %}",
    )
    .unwrap();
    let err = fails(ask(&["--template", bad.to_str().unwrap()]).arg("What color is the circle?"));
    assert!(
        err.contains("cannot render a sample response") && err.contains("abstained: true"),
        "{err}"
    );
    let good = dir.path().join("good.jinja");
    std::fs::write(&good, "{{ answer }}!").unwrap();
    succeeds(ask(&["--template", good.to_str().unwrap()]).arg("What color is the circle?"));
}

#[test]
fn questions_without_answers_are_refused_for_validation_and_training() {
    let no_answers: Vec<String> = good_lines()
        .iter()
        .map(|l| l.replace("[\"red\"]", "[]"))
        .collect();
    let data = DataDir::new(&good_lines());
    let val = data.dir.path().join("val.jsonl");
    std::fs::write(&val, no_answers.join("\n")).unwrap();
    let val_arg = val.to_str().unwrap();
    let err = fails(&mut train(&data, &["--val", val_arg]));
    assert!(
        err.contains("val.jsonl") && err.contains("no human answers"),
        "{err}"
    );
    let err = fails(&mut bench(&data.data(), &data.out(), &["--val", val_arg]));
    assert!(
        err.contains("val.jsonl") && err.contains("no human answers"),
        "{err}"
    );
    // Training on them: named, with the way out.
    let unanswered = DataDir::new(&no_answers);
    let err = fails(&mut train(&unanswered, &[]));
    assert!(
        err.contains("data.jsonl")
            && err.contains("no answers to train on")
            && err.contains("--skip-bad"),
        "{err}"
    );
}

#[test]
fn calibration_rates_out_of_reach_are_refused_with_what_to_ask_instead() {
    for (option, value, expected) in [
        ("--target-risk", "1", "--target-coverage 1"),
        ("--target-risk", "0", "(0, 1)"),
        ("--target-risk", "1.5", "(0, 1)"),
        ("--image-check-alpha", "1e-300", "[0.0001, 1)"),
        // Before any question is answered (it failed after all of them).
        ("--target-coverage", "0", "(0, 1]"),
    ] {
        let err = fails(bella().args([
            "calibrate",
            "--adapters",
            "particles",
            "--data",
            "val.jsonl",
            option,
            value,
        ]));
        assert!(
            err.contains(option) && err.contains(expected),
            "{option} {value}: {err}"
        );
    }
    // Options of the risk guarantee with a rule that has none: refused, not ignored.
    for (extra, expected) in [
        (["--guarantee", "ltt"], "needs --target-risk"),
        (["--delta", "0.05"], "no effect here"),
    ] {
        let err = fails(
            bella()
                .args(["calibrate", "--model", "m", "--adapters", "particles"])
                .args(["--data", "val.jsonl", "--target-coverage", "0.9"])
                .args(extra),
        );
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
}

#[test]
fn bench_checks_every_input_before_answering_anything() {
    let data = DataDir::new(&good_lines());
    let path = data.data();
    let ood = data.dir.path().join("ood.jsonl");
    std::fs::copy(&path, &ood).unwrap();
    let file = ood.to_str().unwrap();
    let err = fails(&mut bench(&path, &data.out(), &["--ood-data", file, file]));
    assert!(err.contains("names") && err.contains("twice"), "{err}");
    // The test file itself as OOD questions.
    let err = fails(&mut bench(
        &path,
        &data.out(),
        &["--ood-data", path.to_str().unwrap()],
    ));
    assert!(err.contains("is the --data file"), "{err}");
    // A missing particle directory at the end of --compare: refused before base is answered.
    let missing = data.dir.path().join("no-such-particles");
    let entries = format!("base,{}", missing.display());
    let err = fails(&mut bench(&path, &data.out(), &["--compare", &entries]));
    assert!(err.contains("no-such-particles"), "{err}");
    assert!(!data.out().join("base").join("samples.jsonl").exists());
}

#[test]
fn bench_counts_of_zero_are_refused() {
    let data = DataDir::new(&good_lines());
    for option in ["--limit", "--max-new-tokens"] {
        let err = fails(&mut bench(&data.data(), &data.out(), &[option, "0"]));
        assert!(err.contains(option), "{option}: {err}");
    }
    // A count that would only burn time: refused at once, not hours later.
    let err = fails(&mut bench(
        &data.data(),
        &data.out(),
        &["--bootstrap", "100000000"],
    ));
    assert!(
        err.contains("--bootstrap") && err.contains("100000"),
        "{err}"
    );
    // So few that an interval's end is not even one resample: refused too.
    let err = fails(&mut bench(&data.data(), &data.out(), &["--bootstrap", "5"]));
    assert!(
        err.contains("--bootstrap") && err.contains("at least 50"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------
// 5. Errors name the culprit: empty data, truncated images
// ------------------------------------------------------------------------------------------------

#[test]
fn an_empty_data_file_is_named_and_bench_writes_no_report() {
    let data = DataDir::new(&[]);
    let err = fails(&mut bench(&data.data(), &data.out(), &[]));
    assert!(
        err.contains("data.jsonl") && err.contains("holds no questions"),
        "{err}"
    );
    assert!(!data.out().join("results.json").exists());
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("data.jsonl") && err.contains("holds no questions"),
        "{err}"
    );
}

#[test]
fn a_truncated_jpeg_is_refused_as_pillow_refuses_it() {
    use bella_vqa::models::image::{decode_image, load_image, MAX_IMAGE_PIXELS};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/photo-rocket.jpg");
    let jpeg = std::fs::read(&path).unwrap();
    let whole = load_image(&path).unwrap();
    // The JPEG decoder would fill in the missing rows; the file is refused instead, named.
    for cut in [700, jpeg.len() / 2, jpeg.len() - 2] {
        let err = format!(
            "{:#}",
            decode_image(&jpeg[..cut], "cut.jpg", MAX_IMAGE_PIXELS).unwrap_err()
        );
        assert!(
            err.contains("cut.jpg") && err.contains("truncated"),
            "{cut}: {err}"
        );
    }
    // Bytes after the end marker (as some cameras append) are fine, and so is the whole file.
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"appended data");
    let decoded = decode_image(&trailing, "trailing.jpg", MAX_IMAGE_PIXELS).unwrap();
    assert_eq!(decoded.to_rgb8().as_raw(), whole.to_rgb8().as_raw());
    // A truncated file given to `ask` fails the same way.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &jpeg[..700]).unwrap();
    let err = fails(ask_about(&cut, &[]).arg("What is it?"));
    assert!(
        err.contains("cut.jpg") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_truncated_training_image_names_its_line_and_skip_bad_skips_it() {
    let lines = vec![
        line("q1", "What color is the circle?", "images/square.png"),
        line("q2", "What shape is it?", "images/broken.png"),
        line("q3", "Is there a circle?", "images/square.png"),
    ];
    let data = DataDir::new(&lines);
    let err = fails(&mut train(&data, &[]));
    assert!(
        err.contains("data.jsonl line 2") && err.contains("broken.png"),
        "{err}"
    );
    // The reader's view: with --skip-bad the record is left out and listed.
    let read = read_jsonl(
        &data.data(),
        &ReadOptions {
            skip_bad: true,
            check_images: true,
        },
    )
    .unwrap();
    assert_eq!(read.examples.len(), 2);
    assert_eq!(read.skipped[0].line, Some(2));
    succeeds(&mut train(&data, &["--skip-bad"]));
    assert!(data.out().join(PARTICLES_FILE).exists());
}

// ------------------------------------------------------------------------------------------------
// 6. Special tokens in user text are text
// ------------------------------------------------------------------------------------------------

#[test]
fn special_tokens_in_a_question_are_tokenised_as_text() {
    let p = Prompter::from_dir(&llava_dir(), Some(DEFAULT_IMAGE_TOKEN)).unwrap();
    let image_tokens = 25;
    // Plain questions: exactly the one-string tokenisation transformers does.
    let plain = "What color is the circle?";
    assert_eq!(
        p.encode_question(plain, true, image_tokens, None).unwrap(),
        p.encode(&p.render_question(plain, true).unwrap(), image_tokens)
            .unwrap()
    );
    // `</s>` and `<image>` typed in a question are their characters, not the tokens.
    let question = "Is </s> a <image> tag?";
    let ids = p
        .encode_question(question, true, image_tokens, None)
        .unwrap();
    let eos = p.eos_token_id().unwrap();
    let image = p.image_token_id().unwrap();
    assert!(!ids.contains(&eos), "{ids:?}");
    assert_eq!(ids.iter().filter(|&&t| t == image).count(), image_tokens);
    // The ids are those of the whole prompt tokenised in one piece with the template's `<image>`
    // parsed and every other special-token string as text: `tokenizers` itself on a copy of the
    // tokenizer where `<image>` is an ordinary added token and special-token parsing is off (no
    // word-start `▁` where the question begins or after it, as tokenising pieces one by one gave).
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llava_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    for t in json["added_tokens"].as_array_mut().unwrap() {
        if t["content"] == DEFAULT_IMAGE_TOKEN {
            t["special"] = false.into();
        }
    }
    let mut reference: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    reference.set_encode_special_tokens(true);
    for (question, with_image, answer) in [
        ("What is <s> or </s>?", true, None),
        ("What is <s> or </s>?", false, None),
        ("<unk>", true, None),
        ("Is it red?", true, Some("no </s> yes")),
    ] {
        let mut prompt = p.render_question(question, with_image).unwrap();
        if let Some(a) = answer {
            prompt = format!("{prompt} {a}");
        }
        let prompt = p.expand_image_tokens(&prompt, image_tokens).unwrap();
        let expected = reference.encode(prompt.as_str(), true).unwrap();
        assert_eq!(
            p.encode_question(question, with_image, image_tokens, answer)
                .unwrap(),
            expected.get_ids(),
            "{question:?} {answer:?}"
        );
    }
    let mut text_tokenizer = p.tokenizer().clone();
    text_tokenizer.set_encode_special_tokens(true);
    let question_ids = text_tokenizer
        .encode(question, false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(question_ids.len() > 4 && !question_ids.contains(&eos));
    // Counted as text too (the server's question limit and usage).
    assert_eq!(p.count_text_tokens(question).unwrap(), question_ids.len());
    // End to end: the binary answers such a question.
    succeeds(&mut ask(&["What is </s> <image> <s>?"]));
}

// ------------------------------------------------------------------------------------------------
// 7. Nothing hangs: FIFOs and devices are refused before they are opened
// ------------------------------------------------------------------------------------------------

/// A model without a tokenizer or image settings is refused before its weights are loaded, with
/// the way to get the file (it failed at the first question, blaming the image).
#[test]
fn a_model_without_its_tokenizer_or_image_settings_is_refused_with_the_way_to_get_them() {
    for (file, expected) in [
        ("tokenizer.json", "has no tokenizer.json"),
        (
            "preprocessor_config.json",
            "has no preprocessor_config.json",
        ),
    ] {
        let model = copy_fixture("llava-tiny-hub");
        std::fs::remove_file(model.path().join(file)).unwrap();
        let err = fails(
            bella()
                .arg("ask")
                .arg("--model")
                .arg(model.path())
                .arg("--image")
                .arg(fixture("images/square.png"))
                .arg("What is it?"),
        );
        assert!(
            err.contains(expected) && err.contains("save_pretrained") && !err.contains("answering"),
            "{file}: {err}"
        );
    }
}

/// A benchmark written into a particle directory would mix its files into the set: refused
/// before anything is answered, as `bench merge` refuses it.
#[test]
fn bench_into_a_particle_directory_is_refused() {
    let data = DataDir::new(&good_lines());
    let set = data.dir.path().join("set");
    std::fs::create_dir_all(&set).unwrap();
    std::fs::write(set.join(CONFIG_FILE), "{}").unwrap();
    let err = fails(&mut bench(&data.data(), &set, &[]));
    assert!(err.contains("holds a particle set"), "{err}");
    assert!(!set.join("samples.jsonl").exists());
}

#[test]
fn fifos_and_devices_are_refused_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("pipe.png");
    mkfifo(&fifo);
    let err = fails(&mut ask_about(&fifo, &["What is it?"]));
    assert!(err.contains("pipe.png") && err.contains("FIFO"), "{err}");
    let err = fails(&mut ask_about(Path::new("/dev/zero"), &["What is it?"]));
    assert!(err.contains("/dev/zero") && err.contains("device"), "{err}");

    let data = DataDir::new(&good_lines());
    std::fs::remove_file(data.data()).unwrap();
    mkfifo(&data.data());
    let err = fails(&mut train(&data, &[]));
    assert!(err.contains("data.jsonl") && err.contains("FIFO"), "{err}");
    let err = fails(&mut bench(&data.data(), &data.out(), &[]));
    assert!(err.contains("data.jsonl") && err.contains("FIFO"), "{err}");

    let model = copy_fixture("llava-tiny-hub");
    std::fs::remove_file(model.path().join("config.json")).unwrap();
    mkfifo(&model.path().join("config.json"));
    let err = fails(bella().args(["inspect", "--model"]).arg(model.path()));
    assert!(err.contains("config.json") && err.contains("FIFO"), "{err}");

    let model = copy_fixture("llava-tiny-hub");
    let shard = model.path().join("model-00001-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let err = fails(bella().args(["inspect", "--model"]).arg(model.path()));
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("FIFO"),
        "{err}"
    );

    // The model's other files: named as a FIFO or a folder, not as missing.
    for (name, folder) in [
        ("tokenizer.json", false),
        ("preprocessor_config.json", false),
        ("generation_config.json", true),
    ] {
        let model = copy_fixture("llava-tiny-hub");
        let path = model.path().join(name);
        let _ = std::fs::remove_file(&path);
        if folder {
            std::fs::create_dir(&path).unwrap();
        } else {
            mkfifo(&path);
        }
        let err = fails(bella().args(["inspect", "--model"]).arg(model.path()));
        let kind = if folder { "directory" } else { "FIFO" };
        assert!(err.contains(name) && err.contains(kind), "{name}: {err}");
    }

    // Files a resume reads: the answers so far, the training log, the checkpoint pointer.
    let data = DataDir::new(&good_lines());
    std::fs::create_dir_all(data.out()).unwrap();
    mkfifo(&data.out().join("samples.jsonl"));
    let err = fails(&mut bench(&data.data(), &data.out(), &[]));
    assert!(
        err.contains("samples.jsonl") && err.contains("FIFO"),
        "{err}"
    );
    // Any of the files a resume reads, at any depth this program writes (they blocked in
    // open(): a checkpoint's trainer state, the run's config and results).
    for name in [
        "train_log.jsonl",
        "checkpoints/latest",
        "checkpoints/step-00000001/trainer_state.json",
        "bella_config.json",
    ] {
        let data = DataDir::new(&good_lines());
        let pipe = data.out().join(name);
        std::fs::create_dir_all(pipe.parent().unwrap()).unwrap();
        mkfifo(&pipe);
        let err = fails(&mut train(&data, &["--resume"]));
        assert!(err.contains(name) && err.contains("FIFO"), "{name}: {err}");
    }
    for name in ["bench_config.json", "results.json"] {
        let data = DataDir::new(&good_lines());
        std::fs::create_dir_all(data.out()).unwrap();
        mkfifo(&data.out().join(name));
        let err = fails(&mut bench(&data.data(), &data.out(), &[]));
        assert!(err.contains(name) && err.contains("FIFO"), "{name}: {err}");
    }
}

#[test]
fn pre_quantized_checkpoints_are_refused_with_the_way_to_quantize_at_load() {
    let dir = copy_fixture("llava-tiny-hub");
    edit_config(dir.path(), |v| {
        v["quantization_config"] = serde_json::json!({"quant_method": "fp8"})
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("pre-quantized")
            && err.contains("\"fp8\"")
            && err.contains("--quantize")
            && err.contains("config.json"),
        "{err}"
    );
    // Integer weights without a quantization_config: the tensor, its file and its dtype are
    // named (the file is complete: no "re-download" advice).
    let dir = copy_fixture("clip-tiny");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let w = tensors["text_projection.weight"]
        .to_dtype(DType::U8)
        .unwrap();
    tensors.insert("text_projection.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("text_projection.weight")
            && err.contains("model.safetensors")
            && err.contains("U8")
            && err.contains("--quantize")
            && !err.contains("re-download"),
        "{err}"
    );
}

#[test]
fn a_llava_without_a_chat_template_says_which_prompt_it_gets() {
    let dir = copy_fixture("llava-tiny-hub");
    std::fs::remove_file(dir.path().join("chat_template.json")).unwrap();
    let out = bella()
        .args(["inspect", "--json", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("has no chat template"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let template = summary["chat_template"].as_str().unwrap();
    assert!(template.contains("built-in LLaVA-1.5"), "{template}");
    // With its template: named, and no warning.
    let out = bella()
        .args(["inspect", "--json", "--model"])
        .arg(llava_dir())
        .output()
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["chat_template"], "chat_template.json");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// A chat template that leaves the image out (or puts it twice) is refused at load, naming the
/// template, not after the model has run on the first question.
#[test]
fn a_chat_template_without_the_image_is_refused_at_load() {
    for (template, n) in [
        (
            "USER: {{ messages[0]['content'][1]['text'] }} ASSISTANT:",
            0,
        ),
        (
            "USER: <image><image>{{ messages[0]['content'][1]['text'] }} ASSISTANT:",
            2,
        ),
    ] {
        let dir = copy_fixture("llava-tiny-hub");
        std::fs::write(
            dir.path().join("chat_template.json"),
            serde_json::json!({ "chat_template": template }).to_string(),
        )
        .unwrap();
        let err = fails(bella().args(["inspect", "--model"]).arg(dir.path()));
        assert!(
            err.contains("chat_template.json")
                && err.contains(&format!("puts {n} image token(s) \"<image>\""))
                && err.contains("own chat template"),
            "{err}"
        );
    }
}

#[test]
fn a_server_with_a_bad_template_or_answers_file_stops_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("t.jinja");
    std::fs::write(&template, "{% if %}").unwrap();
    for (option, path, needle) in [
        ("--template", template.clone(), "invalid response template"),
        ("--answers", dir.path().join("missing.txt"), "missing.txt"),
    ] {
        let err = fails(
            bella()
                .args(["serve", "--port", "0", "--model"])
                .arg(llava_dir())
                .arg(option)
                .arg(&path),
        );
        assert!(err.contains(needle), "{option}: {err}");
        assert!(!err.contains("listening on"), "{option}: {err}");
    }
}

/// A rank above an adapted layer's smaller dimension is trained (the user may mean it), with a
/// warning that it adds only parameters and memory there.
#[test]
fn a_rank_above_a_layer_dimension_is_trained_with_a_warning() {
    let data = DataDir::new(&good_lines());
    let mut cmd = bella();
    cmd.arg("train")
        .arg("--model")
        .arg(llava_dir())
        .arg("--data")
        .arg(data.data())
        .arg("--out")
        .arg(data.out())
        .args(["--batch-size", "1", "--particles", "1", "--max-steps", "1"]);
    // The tiny LLaVA's k_proj is 64 → 32 (two key-value heads of 16).
    let err = succeeds(cmd.args(["--rank", "40"]));
    assert!(
        err.contains("warning: rank 40 is above the smallest dimension") && err.contains("(32, in"),
        "{err}"
    );
    let err = succeeds(&mut train(&DataDir::new(&good_lines()), &[]));
    assert!(!err.contains("is above the smallest dimension"), "{err}");
}

/// Many bad records skipped: the first ten are said one by one, the rest counted (all of them
/// are in bad_records.jsonl); a rerun said all 500 of a file again.
#[test]
fn many_skipped_bad_records_are_counted_after_the_first_ten() {
    let mut lines = good_lines();
    lines.extend((0..12).map(|i| format!("not json {i}")));
    let data = DataDir::new(&lines);
    let err = succeeds(&mut loud_bench(&data, &["--skip-bad", "--bootstrap", "0"]));
    assert_eq!(err.matches("skipped bad record:").count(), 10, "{err}");
    assert!(err.contains("skipped 2 more bad record(s) of"), "{err}");
    let listed = std::fs::read_to_string(data.out().join("bad_records.jsonl")).unwrap();
    assert_eq!(listed.lines().count(), 12, "{listed}");
}

/// Under any address-space limit a large image is answered or refused with an error that says
/// so, never an abort ("memory allocation of N bytes failed"): an 8-bit RGB image was copied
/// beside an unused buffer of its size (a 16000×1500 JPEG aborted under 320–340 MB), and a
/// TIFF's or WebP's decoder holds its pixels twice, which was not counted (a 6000×6000 TIFF
/// aborted under 400 MB, a lossless WebP under 150-340 MB).
#[cfg(target_os = "linux")]
#[test]
fn no_address_space_limit_makes_a_large_image_abort() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.jpg");
    image::RgbImage::from_fn(16000, 1500, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, 90])
    })
    .save(&wide)
    .unwrap();
    let tiff = dir.path().join("large.tif");
    image::RgbImage::from_fn(4000, 4000, |x, y| {
        image::Rgb([(x % 251) as u8, 40, (y % 241) as u8])
    })
    .save(&tiff)
    .unwrap();
    // A lossless WebP without alpha is decoded as RGBA into a buffer of its own, then copied.
    let webp = dir.path().join("large.webp");
    image::RgbImage::from_fn(4000, 4000, |x, y| {
        image::Rgb([40, (x % 251) as u8, (y % 241) as u8])
    })
    .save(&webp)
    .unwrap();
    for image in [&wide, &tiff, &webp] {
        let (mut answered, mut refused) = (false, false);
        for mb in (150u64..=550).step_by(25) {
            let mut cmd = bella();
            cmd.env("RAYON_NUM_THREADS", "1")
                .args(["ask", "--quiet", "--image"])
                .arg(image)
                .arg("What color is the circle?");
            common::limited(&mut cmd, common::Limit::AddressSpace, mb << 20);
            let out = run(&mut cmd);
            if out.success {
                answered = true;
                continue;
            }
            assert!(
                out.stderr.starts_with("error:")
                    && (out.stderr.contains("not enough memory for")
                        || out.stderr.contains("out of memory")),
                "{} under {mb} MB: {}",
                image.display(),
                out.stderr
            );
            refused = true;
        }
        assert!(answered && refused, "{}", image.display());
    }
}

/// An image too large for the memory the process may take (`ulimit -v` on a shared machine) is
/// an error naming what it needs, which `bench --skip-bad` can skip, not an abort ("memory
/// allocation of N bytes failed") at the same question on every rerun.
#[cfg(target_os = "linux")]
#[test]
fn an_image_larger_than_the_memory_left_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.png");
    // 6000 × 6000: 108 MB decoded, about 206 MB more to prepare; a few hundred kilobytes stored.
    image::RgbImage::from_pixel(6000, 6000, image::Rgb([200, 30, 30]))
        .save(&image)
        .unwrap();
    let mut cmd = bella();
    cmd.env("RAYON_NUM_THREADS", "1")
        .args(["ask", "--image"])
        .arg(&image)
        .arg("What color is the circle?");
    common::limited(&mut cmd, common::Limit::AddressSpace, 350 << 20);
    let out = run(&mut cmd);
    assert!(!out.success);
    assert!(
        out.stderr.contains("not enough memory for") && out.stderr.contains("6000×6000"),
        "{}",
        out.stderr
    );
}
