//! The command line, end to end on the fixture models.

mod common;

use std::process::Command;

use candle_core::{DType, IndexOp};
use common::*;

fn bella() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(!out.status.success(), "should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn inspect_counts_every_stored_value() {
    let dir = fixture("llava-tiny-hub");
    let json = run_ok(bella().args(["inspect", "--json", "--model"]).arg(&dir));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    // Independent count: the index's total_size is bytes of f32 values.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total = index["metadata"]["total_size"].as_u64().unwrap() / 4;
    assert_eq!(v["parameters"].as_u64().unwrap(), total);
    assert_eq!(v["architecture"], "LLaVA");
    assert_eq!(v["declared_dtype"], "float32");
    assert!(v["files"].as_array().unwrap().len() >= 5);
    // Layers that can carry particles: every linear layer of the index (a `.weight` of a
    // projection, the lm_head, the projector) but those of vision layer 2, which LLaVA
    // (vision_feature_layer −2 of 3) never runs.
    let linear = |k: &str| {
        k.ends_with("proj.weight")
            || k.ends_with("fc1.weight")
            || k.ends_with("fc2.weight")
            || k.ends_with("linear_1.weight")
            || k.ends_with("linear_2.weight")
            || k.ends_with("lm_head.weight")
    };
    let weights = index["weight_map"].as_object().unwrap();
    let all = weights.keys().filter(|k| linear(k)).count();
    let never_run = weights
        .keys()
        .filter(|k| linear(k) && k.contains("encoder.layers.2."))
        .count();
    assert_eq!(never_run, 6);
    assert_eq!(
        v["particle_capable_layers"].as_u64().unwrap() as usize,
        all - never_run
    );
    let text = run_ok(
        bella()
            .args(["inspect", "--model"])
            .arg(fixture("clip-tiny")),
    );
    assert!(text.contains("CLIP") && text.contains("71,649"), "{text}");
    // A LLaVA's positions (what a question and its answer must fit in) are shown too.
    let text = run_ok(
        bella()
            .args(["inspect", "--model"])
            .arg(fixture("llava-tiny-hub")),
    );
    assert!(text.contains("256 positions (prompt and answer)"), "{text}");
}

#[test]
fn llava_logits_file_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("square.safetensors");
    run_ok(
        bella()
            .args(["logits", "--quiet", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--image")
            .arg(fixture("images/square.png"))
            .args(["--prompt", "What color is the circle?", "--out"])
            .arg(&out),
    );
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    // Row 0 of the reference batch is this prompt on square.png, left padded.
    let r = reference("llava");
    let mask = ids(get(&r, "batch.attention_mask"));
    let pad = mask[0].iter().filter(|&&m| m == 0).count();
    let ref_ids: Vec<u32> = ids(get(&r, "batch.input_ids"))[0][pad..].to_vec();
    assert_eq!(ids(&got["input_ids"])[0], ref_ids);
    assert_close(
        "pixel_values",
        &got["pixel_values"],
        &get(&r, "batch.pixel_values").i(0..1).unwrap(),
    );
    let ref_logits = get(&r, "batch.logits").i((0..1, pad.., ..)).unwrap();
    assert_close("logits", &got["logits"], &ref_logits);
    assert_eq!(got["image_features"].dims(), &[1, 25, 64]);
}

#[test]
fn clip_logits_file_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clip.safetensors");
    run_ok(
        bella()
            .args(["logits", "--quiet", "--model"])
            .arg(fixture("clip-tiny"))
            .arg("--image")
            .arg(fixture("images/square.png"))
            .args([
                "--prompt",
                "a photo of a red circle on a chequered mat",
                "--out",
            ])
            .arg(&out),
    );
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let r = reference("clip");
    assert_close(
        "logits",
        &got["logits"],
        &get(&r, "logits_per_image").i((0..1, 0..1)).unwrap(),
    );
    let ref_ids = get(&r, "text.input_ids")
        .i(0..1)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    assert_eq!(ids(&got["input_ids"]), ids(&ref_ids));
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let not_image = tmp.path().join("notes.png");
    std::fs::write(&not_image, "not an image").unwrap();
    let err = run_err(
        bella()
            .args(["logits", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--image")
            .arg(&not_image)
            .args(["--prompt", "hi", "--out"])
            .arg(&out),
    );
    assert!(err.contains("notes.png"), "{err}");
    assert!(!out.exists(), "no output file on failure");
    // A raw prompt with image tokens but no image: refused (it ran on the placeholder's own
    // embedding, logits no pipeline produces).
    let err = run_err(
        bella()
            .args(["logits", "--raw", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .args(["--prompt", "USER: <image> What? ASSISTANT:", "--out"])
            .arg(&out),
    );
    assert!(err.contains("no --image was given"), "{err}");
    assert!(!out.exists(), "no output file on failure");
    // An output inside a file: the file is named as what is in the way.
    let err = run_err(
        bella()
            .args(["logits", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--image")
            .arg(fixture("images/square.png"))
            .args(["--prompt", "hi", "--out"])
            .arg(not_image.join("x.safetensors")),
    );
    assert!(err.contains("is a file, not a directory"), "{err}");
    // Two <image> for one image, or none: the raw prompt is named, not the chat template.
    for prompt in [
        "USER: <image> <image> What? ASSISTANT:",
        "USER: What? ASSISTANT:",
    ] {
        let err = run_err(
            bella()
                .args(["logits", "--raw", "--model"])
                .arg(fixture("llava-tiny-hub"))
                .arg("--image")
                .arg(fixture("images/square.png"))
                .args(["--prompt", prompt, "--out"])
                .arg(&out),
        );
        assert!(
            err.contains("the --raw prompt holds") && !err.contains("chat template"),
            "{err}"
        );
    }
    let err = run_err(bella().args(["inspect", "--model"]).arg(tmp.path()));
    assert!(
        err.contains("config.json") || err.contains("weights"),
        "{err}"
    );
    let err = run_err(bella().args(["inspect", "--offline", "--model", "nobody/nothing"]));
    assert!(
        err.contains("not in the hub cache") || err.contains("cache"),
        "{err}"
    );
}

/// What the model's config tells (an answer list for a LLaVA, a CLIP without candidate answers)
/// is refused before a server listens, not after it said so and loaded the model.
#[test]
fn serve_refuses_answers_that_cannot_apply_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.txt");
    std::fs::write(&answers, "red\nblue\n").unwrap();
    for (model, extra, expected) in [
        (
            "llava-tiny-hub",
            Some(&answers),
            "applies only to CLIP models",
        ),
        ("clip-tiny", None, "give one with --answers FILE"),
    ] {
        let mut cmd = bella();
        cmd.args(["serve", "--port", "0", "--model"])
            .arg(fixture(model));
        if let Some(a) = extra {
            cmd.arg("--answers").arg(a);
        }
        let err = run_err(&mut cmd);
        assert!(
            err.contains(expected) && !err.contains("listening"),
            "{model}: {err}"
        );
    }
    // A port in use and a host that is not this machine's are told apart.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (host, expected) in [
        (
            "127.0.0.1",
            "another program listens there: try another --port",
        ),
        // TEST-NET-1 (RFC 5737): never an address of this machine.
        ("192.0.2.1", "--host is not an address of this machine"),
    ] {
        let err = run_err(
            bella()
                .args(["serve", "--host", host, "--port", &port, "--model"])
                .arg(fixture("llava-tiny-hub")),
        );
        assert!(err.contains(expected), "{host}: {err}");
    }
}

/// `--model=~/dir` (the shell leaves that `~` alone) is the directory in $HOME; a PEFT adapter
/// or a hub cache folder given as the model is named as what it is.
#[test]
fn model_paths_people_type_are_understood() {
    let home = tempfile::tempdir().unwrap();
    let clip = home.path().join("clip");
    std::fs::create_dir_all(&clip).unwrap();
    for entry in std::fs::read_dir(fixture("clip-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), clip.join(entry.file_name())).unwrap();
    }
    let out =
        run_ok(
            bella()
                .env("HOME", home.path())
                .args(["inspect", "--json", "--model=~/clip"]),
        );
    assert!(out.contains("\"CLIP\""), "{out}");

    let err = run_err(
        bella()
            .args(["inspect", "--model"])
            .arg(fixture("peft/llava-lora")),
    );
    assert!(
        err.contains("is a PEFT adapter") && err.contains("import-peft"),
        "{err}"
    );
    let cache = home.path().join("models--org--name");
    std::fs::create_dir_all(cache.join("snapshots")).unwrap();
    let err = run_err(bella().args(["inspect", "--model"]).arg(&cache));
    assert!(err.contains("is a hub cache folder"), "{err}");
    // The cache itself, or a cache folder's snapshots, said to be what they are.
    let err = run_err(bella().args(["inspect", "--model"]).arg(home.path()));
    assert!(
        err.contains("is a hub cache: pass a hub id, with HF_HUB_CACHE="),
        "{err}"
    );
    let err = run_err(
        bella()
            .args(["inspect", "--model"])
            .arg(cache.join("snapshots")),
    );
    assert!(
        err.contains("holds a hub cache folder's snapshots"),
        "{err}"
    );
    // A folder here with a hub id's name is read instead of the hub model: said so.
    std::fs::create_dir_all(home.path().join("org2/name")).unwrap();
    let err = run_err(
        bella()
            .current_dir(home.path())
            .args(["inspect", "--model", "org2/name"]),
    );
    assert!(
        err.contains("org2/name is a folder here, read instead of the hub model"),
        "{err}"
    );
}

/// An option out of its range is a usage error, exit status 2 as for clap's own (a script tells
/// a bad invocation from a failed run), on every command alike, and `train` says so before the
/// model loads (no "computing in …" line first).
#[test]
fn an_option_out_of_range_is_a_usage_error_on_every_command() {
    let world = tempfile::tempdir().unwrap();
    let data = world.path().join("train.jsonl");
    std::fs::write(&data, "").unwrap();
    let repo = |p: &str| format!("{}/{p}", env!("CARGO_MANIFEST_DIR"));
    let (image, particles) = (
        repo("eval/demo/red-circle.png"),
        repo("demo/particles/llava-ensemble"),
    );
    let (tiny, out_dir) = (fixture("llava-tiny-hub"), world.path().join("out"));
    let (data_arg, tiny, out) = (
        data.to_str().unwrap(),
        tiny.to_str().unwrap(),
        out_dir.to_str().unwrap(),
    );
    let cases: [(&[&str], &str); 5] = [
        (
            &["ask", "--max-new-tokens", "0", "--image", &image, "q?"],
            "--max-new-tokens 0",
        ),
        (
            &["ask", "--threshold", "2", "--image", &image, "q?"],
            "--threshold 2",
        ),
        (
            &[
                "train", "--model", tiny, "--data", data_arg, "--out", out, "--lr", "-1",
            ],
            "--lr -1",
        ),
        (&["data", "shapes", "--n", "0", "--out", out], "(--n)"),
        (
            &[
                "calibrate",
                "--adapters",
                &particles,
                "--data",
                data_arg,
                "--objective",
                "phiX",
            ],
            "objective \"phiX\"",
        ),
    ];
    for (args, named) in cases {
        let out = bella().args(args).output().expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(named) && !err.contains("computing in"),
            "{args:?}: {err}"
        );
    }
    assert!(!out_dir.exists(), "nothing written");
}

/// Where standard error is not a terminal (a CI log), no bar is drawn: a plain line says how far
/// a run is, at its first question and then every 30 s, so a long run is not silent.
#[test]
fn a_log_that_is_not_a_terminal_gets_plain_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/red-circle.png");
    let lines: String = (0..2)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"question_id": format!("q{i}"), "image": image,
                    "question": "What color is the circle?", "answers": ["red"]})
            )
        })
        .collect();
    std::fs::write(dir.path().join("test.jsonl"), lines).unwrap();
    let bench = |quiet: bool| {
        let mut cmd = bella();
        cmd.args([
            "bench",
            "--max-new-tokens",
            "2",
            "--bootstrap",
            "0",
            "--model",
        ])
        .arg(fixture("llava-tiny-hub"))
        .arg("--data")
        .arg(dir.path().join("test.jsonl"))
        .arg("--out")
        .arg(dir.path().join(if quiet { "quiet" } else { "run" }));
        if quiet {
            cmd.arg("--quiet");
        }
        cmd.output().expect("runs")
    };
    let out = bench(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1/2 questions (test): 50 % after"), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "no bar drawn: {err:?}"
    );
    let quiet = bench(true);
    assert!(quiet.status.success());
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
}
