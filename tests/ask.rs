//! Answering with particles end to end: abstention follows disagreement, the JSON interface,
//! and clear errors for bad input.

mod common;

use std::path::Path;
use std::process::Command;

use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions};
use bella_vqa::bella::particles::{ParticleConfig, ParticleSet};
use bella_vqa::bella::{attach, Adapter, AdapterSpec, InitB, ParticleModel};
use bella_vqa::hub::ModelSource;
use bella_vqa::models::image::load_image;
use bella_vqa::models::Model;
use candle_core::{DType, Device, Tensor};
use common::*;

const P: usize = 4;

/// Writes a crafted particle set for the tiny LLaVA: every particle's lm_head is sharpened
/// (ΔW = 2000·W via A = I, B = 2000·W, so each particle is near-certain of its greedy answer); with
/// `disagree`, every particle also gets its own large random perturbation of the decoder.
fn crafted_particles(dir: &Path, disagree: bool) {
    let loaded = load_model("llava-tiny-hub");
    let Model::Llava(mut m) = loaded.model else {
        panic!("not LLaVA")
    };
    if disagree {
        let spec = AdapterSpec {
            targets: vec!["language_model.model.layers.*".into()],
            rank: 64,
            alpha: 64.0,
            particles: P,
        };
        attach(m.as_mut(), &spec, InitB::Normal { std: 0.3 }, 99).unwrap();
    }
    for (name, layer) in m.linears_mut() {
        if name == "language_model.lm_head" {
            let (out, inp) = layer.shape();
            let eye = Tensor::eye(inp, DType::F32, &Device::Cpu).unwrap();
            let a = eye.unsqueeze(0).unwrap().repeat((P, 1, 1)).unwrap();
            let b = (layer
                .dense_weight()
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .repeat((P, 1, 1))
                .unwrap()
                * 2000.0)
                .unwrap();
            assert_eq!(b.dims(), &[P, out, inp]);
            layer
                .set_adapter(Some(Adapter::new(a, b, 1.0).unwrap()))
                .unwrap();
        }
    }
    let config = ParticleConfig {
        targets: vec!["crafted".into()],
        rank: 64,
        alpha: 64.0,
        particles: P,
        method: "crafted".into(),
        abstention: Some(test_abstention(0.6)),
        ..tiny_llava_particle_config(&loaded.files)
    };
    ParticleSet::from_model(m.as_ref(), config)
        .save(dir)
        .unwrap();
}

fn ask(adapters: &Path) -> bella_vqa::answer::Response {
    let source = ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, Some(adapters), &LoadOptions::default()).unwrap();
    assert_eq!(vqa.particles(), P);
    let image = load_image(&fixture("images/square.png")).unwrap();
    vqa.ask_with(&image, "What color is the circle?", &AskOptions::default())
        .unwrap()
}

#[test]
fn agreeing_particles_answer_and_disagreeing_particles_abstain() {
    let agree_dir = tempfile::tempdir().unwrap();
    crafted_particles(agree_dir.path(), false);
    let r = ask(agree_dir.path());
    assert!(
        r.particles.iter().all(|p| p.answer == r.answer),
        "{:?}",
        r.particles
    );
    assert!(r.confidence > 0.6, "confidence {}: {r:?}", r.confidence);
    assert!(r.uncertainty.epistemic < 1e-3, "{:?}", r.uncertainty);
    assert_eq!(r.vote_share, 1.0);
    assert!(r.calibrated && r.threshold == 0.6);
    assert!(!r.abstained);
    assert_eq!(r.response, r.answer);

    let disagree_dir = tempfile::tempdir().unwrap();
    crafted_particles(disagree_dir.path(), true);
    let r = ask(disagree_dir.path());
    let distinct: std::collections::BTreeSet<&str> =
        r.particles.iter().map(|p| p.normalized.as_str()).collect();
    assert!(
        distinct.len() >= 2,
        "particles must disagree: {:?}",
        r.particles
    );
    assert!(r.confidence < 0.6, "confidence {}: {r:?}", r.confidence);
    assert!(r.uncertainty.epistemic > 0.3, "{:?}", r.uncertainty);
    assert!(r.vote_share < 1.0);
    assert!(r.abstained);
    assert!(
        r.response.starts_with("I'm not sure. Most likely: "),
        "{}",
        r.response
    );
    // p̄ of the chosen answer is its confidence; the candidates carry all of p̄ but "other".
    assert!((r.candidates[0].probability - r.confidence).abs() < 1e-12);
}

#[test]
fn ask_json_interface() {
    let dir = tempfile::tempdir().unwrap();
    crafted_particles(dir.path(), true);
    let out = stdout_of(
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args(["ask", "--json", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--adapters")
            .arg(dir.path())
            .arg("--image")
            .arg(fixture("images/square.png"))
            .arg("What color is the circle?"),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["answer", "abstained", "confidence", "response"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in ["total", "aleatoric", "epistemic"] {
        assert!(v["uncertainty"][key].is_f64(), "missing uncertainty.{key}");
    }
    assert_eq!(v["particles"].as_array().unwrap().len(), P);
    assert!(v["particles"][0]["answer"].is_string());
    let lib = ask(dir.path());
    assert_eq!(v["answer"], lib.answer.as_str());
    assert_eq!(v["abstained"], lib.abstained);
}

/// Without --model, particles go onto the base model they were trained on (as PEFT's
/// `AutoPeftModel` reads `base_model_name_or_path`), not onto the demo; a base that is gone is
/// named with what to do.
#[test]
fn particles_without_model_load_onto_their_own_base() {
    let dir = tempfile::tempdir().unwrap();
    crafted_particles(dir.path(), true);
    let ask_cli = |particles: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args(["ask", "--json", "--adapters"])
            .arg(particles)
            .arg("--image")
            .arg(fixture("images/square.png"))
            .arg("What color is the circle?")
            .output()
            .unwrap()
    };
    let out = ask_cli(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "base model {}",
            fixture("llava-tiny-hub").display()
        )),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lib = ask(dir.path());
    assert_eq!(v["answer"], lib.answer.as_str());
    assert_eq!(v["confidence"].as_f64().unwrap(), lib.confidence);
    // The library's way (as PEFT's AutoPeftModel): the same answer.
    let image = load_image(&fixture("images/square.png")).unwrap();
    let own_base = BellaVqa::load_particles(dir.path(), &LoadOptions::default()).unwrap();
    let by_library = own_base.ask(&image, "What color is the circle?").unwrap();
    assert_eq!(
        serde_json::to_value(&by_library).unwrap(),
        v,
        "library and command line differ"
    );

    // The same particles whose recorded base directory is gone.
    let config_path = dir.path().join("bella_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let gone = dir.path().join("moved-away-model");
    config["base_model"]["source"] = gone.display().to_string().into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = ask_cli(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("base model of the particles in")
            && stderr.contains("pass --model")
            && stderr.contains("moved-away-model"),
        "{stderr}"
    );
}

#[test]
fn no_particles_is_the_base_model_with_its_sequence_probability() {
    let source = ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, None, &LoadOptions::default()).unwrap();
    let image = load_image(&fixture("images/square.png")).unwrap();
    let r = vqa.ask(&image, "What color is the circle?").unwrap();
    assert_eq!(r.particles.len(), 1);
    assert!((r.confidence - r.particles[0].log_likelihood.exp()).abs() < 1e-9);
    assert!(!r.calibrated);
    assert_eq!(r.uncertainty.epistemic, 0.0);
    // Greedy decoding of the same prompt as the reference batch row 0 (square.png).
    let reference = reference("llava");
    let tokens = ids(get(&reference, "batch.greedy_tokens"))[0].clone();
    let text = vqa
        .model()
        .prompter()
        .unwrap()
        .decode(&tokens, true)
        .unwrap();
    assert!(
        r.particles[0].answer.starts_with(text.trim()),
        "{:?} vs {:?}",
        r.particles[0].answer,
        text
    );
}

#[test]
fn bad_input_is_reported_clearly() {
    let source = ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, None, &LoadOptions::default()).unwrap();
    let image = load_image(&fixture("images/square.png")).unwrap();
    // Blanks, control characters and characters that render as nothing (a sweep found each of
    // these answered with confidence 0.7–0.99).
    for blank in [
        "   ",
        "\u{200B}\u{200D} \u{FEFF}",
        "\u{180E}",
        "\u{061C}",
        "\u{00AD}\u{034F}\u{200E}\u{2061}\u{3164}",
        "\u{FE0F}\u{E0020}",
        "\0\u{1}\u{1b}\u{7f}",
    ] {
        let err = vqa.ask(&image, blank).unwrap_err();
        // Typed, for a front end to answer 400 without reading the text.
        assert!(
            matches!(
                err.downcast_ref::<bella_vqa::error::QuestionError>(),
                Some(bella_vqa::error::QuestionError::Empty)
            ),
            "{blank:?}: {err:#}"
        );
        assert!(
            err.to_string().contains("question is empty"),
            "{blank:?}: {err}"
        );
    }
    // A question too long for the positions, or for them with the answer's, and options out
    // of range: typed too.
    let err = vqa
        .ask(&image, &"What color is the circle? ".repeat(200))
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<bella_vqa::error::QuestionError>(),
            Some(bella_vqa::error::QuestionError::Unusable(_))
        ),
        "{err:#}"
    );
    let room = vqa.answer_room("What color?").unwrap().unwrap();
    let too_many = AskOptions {
        max_new_tokens: room + 1,
        ..AskOptions::default()
    };
    let err = vqa.ask_with(&image, "What color?", &too_many).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<bella_vqa::error::QuestionError>(),
            Some(bella_vqa::error::QuestionError::PromptTooLong { .. })
        ),
        "{err:#}"
    );
    let none = AskOptions {
        max_new_tokens: 0,
        ..AskOptions::default()
    };
    let err = vqa.ask_with(&image, "What color?", &none).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<bella_vqa::error::QuestionError>(),
            Some(bella_vqa::error::QuestionError::Unusable(_))
        ),
        "{err:#}"
    );
    // A zero-width character inside a question is part of it.
    vqa.ask(&image, "What\u{200B} color?").unwrap();
    // And emoji with a variation selector are visible.
    vqa.ask(&image, "\u{2764}\u{FE0F}?").unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("photo.jpg");
    std::fs::write(&text, "hello").unwrap();
    let err = format!("{:#}", load_image(&text).unwrap_err());
    assert!(err.contains("photo.jpg"), "{err}");

    // An image made in memory past the limits is refused as decoding refuses one (typed: a
    // server answers 413), before it is copied.
    let wide = bella_vqa::image::DynamicImage::new_rgb8(40_000, 2);
    let err = vqa.ask(&wide, "What color is the circle?").unwrap_err();
    assert!(
        err.downcast_ref::<bella_vqa::error::ImageTooLarge>()
            .is_some(),
        "{err:#}"
    );

    // Particles trained on one base refuse another (the v5 copy has different weight files).
    let dir = tempfile::tempdir().unwrap();
    crafted_particles(dir.path(), false);
    let other = ModelSource::parse(fixture("llava-tiny-v5").to_str().unwrap()).unwrap();
    let err = format!(
        "{:#}",
        BellaVqa::load(&other, Some(dir.path()), &LoadOptions::default())
            .err()
            .unwrap()
    );
    assert!(
        err.contains("trained on") && err.contains("llava-tiny-v5"),
        "{err}"
    );
    // A directory that is not a particle set.
    let err = format!(
        "{:#}",
        BellaVqa::load(&source, Some(tmp.path()), &LoadOptions::default())
            .err()
            .unwrap()
    );
    assert!(err.contains("bella_config.json"), "{err}");
}

#[test]
fn the_api_is_send_and_sync_and_usable_from_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BellaVqa>();
    let source = ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap();
    let vqa = std::sync::Arc::new(BellaVqa::load(&source, None, &LoadOptions::default()).unwrap());
    let image = std::sync::Arc::new(load_image(&fixture("images/square.png")).unwrap());
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (vqa, image) = (vqa.clone(), image.clone());
            std::thread::spawn(move || vqa.ask(&image, "What color is the circle?").unwrap())
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
}

/// A copy of the tiny LLaVA whose generation_config.json stops on `eos` ids.
fn tiny_llava_stopping_at(eos: &[u32]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("llava-tiny-hub")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        serde_json::json!({ "eos_token_id": eos }).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn generation_config_eos_ids_end_answers_as_in_transformers() {
    // The fixture's greedy answer (reference batch row 0), then the same model whose
    // generation_config.json also stops on the answer's second token.
    let reference = reference("llava");
    let tokens = ids(get(&reference, "batch.greedy_tokens"))[0].clone();
    assert!(tokens.len() >= 2 && tokens[1] != tokens[0] && tokens[1] != 2);
    let dir = tiny_llava_stopping_at(&[2, tokens[1]]);
    let generation = dir.path().join("generation_config.json");
    let source = ModelSource::Dir(dir.path().to_path_buf());
    let vqa = BellaVqa::load(&source, None, &LoadOptions::default()).unwrap();
    assert_eq!(vqa.model().stop_token_ids(), [2, tokens[1]]);
    let image = load_image(&fixture("images/square.png")).unwrap();
    let r = vqa.ask(&image, "What color is the circle?").unwrap();
    let prompter = vqa.model().prompter().unwrap();
    let first = prompter.decode(&tokens[..1], true).unwrap();
    assert_eq!(r.particles[0].answer.trim(), first.trim(), "{r:?}");
    let full = prompter.decode(&tokens, true).unwrap();
    assert!(
        full.trim().len() > first.trim().len(),
        "{full:?} vs {first:?}"
    );

    // A generation config whose eos_token_id is not a token id is named.
    std::fs::write(&generation, r#"{"eos_token_id": "</s>"}"#).unwrap();
    let err = BellaVqa::load(&source, None, &LoadOptions::default())
        .expect_err("a bad generation config is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("generation_config.json")
            && text.contains("eos_token_id")
            && text.contains("a token id (a whole number from 0) or a list of them")
            && !text.contains("untagged"),
        "{text}"
    );
}

#[test]
fn an_empty_answer_is_no_answer_and_abstains_whatever_the_threshold() {
    // The same model, stopping on the fixture's first greedy token: every particle says nothing.
    let reference = reference("llava");
    let first = ids(get(&reference, "batch.greedy_tokens"))[0][0];
    let dir = tiny_llava_stopping_at(&[2, first]);
    let vqa = BellaVqa::load(
        &ModelSource::Dir(dir.path().to_path_buf()),
        None,
        &LoadOptions::default(),
    )
    .unwrap();
    let image = load_image(&fixture("images/square.png")).unwrap();
    let opts = AskOptions {
        threshold: Some(0.0),
        ..AskOptions::default()
    };
    let r = vqa
        .ask_with(&image, "What color is the circle?", &opts)
        .unwrap();
    assert_eq!(r.answer, "", "{r:?}");
    assert!(r.abstained, "an empty answer was given as an answer: {r:?}");
}

#[test]
fn a_candidate_answer_that_normalises_to_nothing_is_refused() {
    // The demo CLIP choosing between "." and "the": both normalise to "" (no answer at all), so
    // either could only be declined.
    let tmp = tempfile::tempdir().unwrap();
    let answers = tmp.path().join("answers.txt");
    std::fs::write(&answers, ".\nthe\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .args([
            "ask",
            "--quiet",
            "--json",
            "--threshold",
            "0",
            "--model",
            "demo:clip",
            "--answers",
        ])
        .arg(&answers)
        .arg("--image")
        .arg(fixture("images/square.png"))
        .arg("What color is the circle?")
        .env("BELLA_VQA_CACHE", tmp.path().join("cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("the candidate answer \".\" says nothing")
            && stderr.contains("leave it out"),
        "{stderr}"
    );
}

#[test]
fn the_text_line_shows_the_score_that_abstention_compared() {
    // Disagreeing particles calibrated with the vote selector at 0.9: the confidence line must
    // show the vote share against the threshold, not the confidence.
    let dir = tempfile::tempdir().unwrap();
    crafted_particles(dir.path(), true);
    let config_path = dir.path().join("bella_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["abstention"]["selector"] = serde_json::json!({"name": "vote"});
    config["abstention"]["threshold"] = serde_json::json!(0.9);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bella-vqa"));
        cmd.args(["ask", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--adapters")
            .arg(dir.path())
            .arg("--image")
            .arg(fixture("images/square.png"));
        if json {
            cmd.arg("--json");
        }
        stdout_of(cmd.arg("What color is the circle?"))
    };
    let v: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(v["selector"], "vote");
    let line = run(false);
    let expected = format!(
        "vote score {:.3} (threshold 0.900, calibrated)",
        v["score"].as_f64().unwrap()
    );
    assert!(line.contains(&expected), "{expected:?} in {line}");
}

/// The standard output of a `bella-vqa` command that must succeed.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn an_answer_cut_at_max_new_tokens_is_said_to_be_cut() {
    // The tiny random model never ends its answer: with 2 tokens every particle is cut, and the
    // confidence (that of answers beginning so) is said to be that.
    let cut = stdout_of(
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args(["ask", "--max-new-tokens", "2", "--model"])
            .arg(fixture("llava-tiny-hub"))
            .arg("--image")
            .arg(fixture("images/square.png"))
            .arg("What color is the circle?"),
    );
    assert!(
        cut.contains("the answer was cut at its token limit") && cut.contains("--max-new-tokens"),
        "{cut}"
    );
    // The demo model ends its answers: not said.
    let whole = stdout_of(
        Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
            .args(["ask", "--image"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/red-circle.png"))
            .arg("What color is the circle?"),
    );
    assert!(!whole.contains("cut at"), "{whole}");
}

#[test]
fn a_question_that_fills_the_positions_but_the_answer_is_answered() {
    // Disagreeing particles, so that the candidates are scored (k segments continuing the
    // prompt): an answer as long as the room the prompt leaves must fit, segments and all.
    let dir = tempfile::tempdir().unwrap();
    crafted_particles(dir.path(), true);
    let source = ModelSource::parse(fixture("llava-tiny-hub").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, Some(dir.path()), &LoadOptions::default()).unwrap();
    let mut words = 1;
    let (question, room) = loop {
        let q = format!("What color is the {}circle?", "red ".repeat(words));
        match vqa.answer_room(&q).unwrap() {
            Some(room) if room <= 4 => break (q, room),
            Some(_) => words += 1,
            None => panic!("LLaVA has positions"),
        }
    };
    assert!(room >= 2, "room {room}");
    let image = load_image(&fixture("images/square.png")).unwrap();
    let opts = AskOptions {
        max_new_tokens: room,
        ..AskOptions::default()
    };
    let r = vqa.ask_with(&image, &question, &opts).unwrap();
    assert!(r.candidates.len() > 1, "the candidates were scored: {r:?}");
}
