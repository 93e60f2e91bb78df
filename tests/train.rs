//! Training particles: gradients reach every particle's factors (and never the base), the loss
//! goes down, particles differ, resuming equals an uninterrupted run, damaged checkpoints are
//! reported and the previous one is intact.

mod common;

use std::path::Path;

use bella_vqa::bella::particles::{ParticleSet, PARTICLES_FILE};
use bella_vqa::bella::{attach, Adapter, AdapterSpec, InitB, ParticleModel};
use bella_vqa::data::shapes::{generate, ShapesOptions};
use bella_vqa::data::{read_jsonl, ReadOptions, VqaExample};
use bella_vqa::models::llava::LlavaInput;
use bella_vqa::models::nn::VarGrads;
use bella_vqa::models::Model;
use bella_vqa::train::objective::{encode_example, make_batch, particle_nll, target_answer};
use bella_vqa::train::{self, Kernel, Method, RunOptions, TrainOptions};
use candle_core::{Device, Var};
use common::*;

fn shapes(dir: &Path, n: usize) -> (Vec<VqaExample>, Vec<VqaExample>) {
    generate(&ShapesOptions {
        n,
        ..ShapesOptions::new(dir)
    })
    .unwrap();
    let read = |f: &str| {
        read_jsonl(&dir.join(f), &ReadOptions::default())
            .unwrap()
            .examples
    };
    (read("train.jsonl"), read("val.jsonl"))
}

fn options(method: Method) -> TrainOptions {
    TrainOptions {
        targets: vec![
            "language_model.*.q_proj".into(),
            "language_model.*.v_proj".into(),
        ],
        rank: 4,
        alpha: 8.0,
        particles: 3,
        method,
        kernel: Kernel::DeltaW,
        epochs: 2,
        batch_size: 4,
        lr: 1e-2,
        ..TrainOptions::llava_defaults()
    }
}

fn run(out: &Path, max_steps: Option<u64>, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        force: false,
        eval_every: 2,
        val_sample: 2,
        checkpoint_every: 3,
        max_steps,
        progress: false,
        model_source: "tests/fixtures/llava-tiny-hub".into(),
        gradient_checkpointing: false,
    }
}

#[test]
fn every_particle_factor_gets_a_gradient_and_the_base_none() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, _) = shapes(data_dir.path(), 10);
    // Particles on every linear layer: vision tower, projector, decoder, lm_head.
    let (m, vars, prompter, processor) = with_particle_vars(&["*"]);
    assert!(vars.len() > 60, "{} adapted factors", vars.len());
    let examples: Vec<_> = train_data.iter().take(6).collect();
    let encoded: Vec<_> = examples
        .iter()
        .map(|e| encode_example(&prompter, 25, &e.question, &target_answer(e).unwrap()).unwrap())
        .collect();
    let refs: Vec<_> = encoded.iter().collect();
    let images: Vec<_> = examples.iter().map(|e| e.image.as_path()).collect();
    let pad = prompter.pad_token_id().unwrap();
    // Ensemble layout: 2 different examples per particle.
    let batch = make_batch(&refs, &images, &processor, pad).unwrap();
    let input = LlavaInput {
        input_ids: &batch.input_ids,
        pixel_values: Some(&batch.pixel_values),
        keep: &batch.keep,
        expanded: true,
    };
    let mut cache = m.language_model.new_cache();
    let logits = m.forward(&input, &mut cache, 3, false).unwrap().logits;
    let window = batch.targets.dim(1).unwrap();
    let nll = particle_nll(
        &logits.narrow(1, batch.window_start, window).unwrap(),
        &batch,
        3,
    )
    .unwrap();
    let grads = nll.sum_all().unwrap().backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        for p in 0..3 {
            let norm = sq_norm(&g.get(p).unwrap());
            assert!(norm > 0.0, "{name} particle {p} has a zero gradient");
        }
    }
    for (name, layer) in m.linears() {
        let weight = layer.dense_weight().unwrap();
        assert!(
            grads.get(&weight).is_none(),
            "the frozen weight of {name} got a gradient"
        );
    }
}

/// The tiny LLaVA with particles (as variables) on the layers matching `targets`; returns the
/// model and every variable with its layer's name.
fn with_particle_vars(
    targets: &[&str],
) -> (
    Box<bella_vqa::models::llava::LlavaModel>,
    Vec<(String, Var)>,
    bella_vqa::models::prompt::Prompter,
    bella_vqa::models::image::ImageProcessor,
) {
    let loaded = load_model("llava-tiny-hub");
    let prompter = loaded.prompter.unwrap();
    let processor = loaded.image_processor.unwrap();
    let Model::Llava(mut m) = loaded.model else {
        panic!()
    };
    let vars = particle_vars(m.as_mut(), targets);
    (m, vars, prompter, processor)
}

/// Attaches 3 particles of rank 2 to the layers matching `targets` and makes their factors
/// variables (in the layers too), each with its layer's name.
fn particle_vars<M: ParticleModel + ?Sized>(m: &mut M, targets: &[&str]) -> Vec<(String, Var)> {
    let spec = AdapterSpec {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rank: 2,
        alpha: 4.0,
        particles: 3,
    };
    attach(m, &spec, InitB::Normal { std: 0.05 }, 1).unwrap();
    let mut vars = Vec::new();
    for (name, layer) in m.linears_mut() {
        let Some(ad) = layer.adapter().cloned() else {
            continue;
        };
        let (a, b) = (
            Var::from_tensor(&ad.a).unwrap(),
            Var::from_tensor(&ad.b).unwrap(),
        );
        let adapter = Adapter::new(a.as_tensor().clone(), b.as_tensor().clone(), ad.scale);
        layer.set_adapter(Some(adapter.unwrap())).unwrap();
        vars.push((format!("{name}.A"), a));
        vars.push((format!("{name}.B"), b));
    }
    vars
}

/// Asserts that `got` holds the gradients `plain` (one plain backward pass) has for each of
/// `vars`, none of them zero, to 1e-5 of their scale.
fn assert_same_gradients(
    plain: &candle_core::backprop::GradStore,
    got: &VarGrads,
    vars: &[(String, Var)],
    what: &str,
) {
    for (name, v) in vars {
        let want = plain
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let got = got.get(v).unwrap();
        let scale = max_abs(want);
        assert!(scale > 0.0, "{name}: a zero gradient tests nothing");
        let d = max_abs_diff(want, &got);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{what}: {name} differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn gradient_checkpointing_gives_the_gradients_of_the_plain_backward_pass() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, _) = shapes(data_dir.path(), 10);
    // Particles everywhere, each particle its own examples (the ensemble's layout); and only on
    // the vision tower and the top decoder layer with one batch shared by the particles (SVGD's):
    // the rows then fork inside the top layer, and the vision tower's gradients flow back through
    // the merged embeddings; and on the top decoder layer alone (the backward pass stops there).
    let layouts: [(&[&str], bool, usize); 3] = [
        (&["*"], true, 6),
        (
            &["vision_tower.*.q_proj", "language_model.layers.2.*.v_proj"],
            false,
            2,
        ),
        (&["language_model.layers.2.*.q_proj"], true, 6),
    ];
    for (targets, expanded, n) in layouts {
        let (m, vars, prompter, processor) = with_particle_vars(targets);
        assert!(!vars.is_empty());
        let examples: Vec<_> = train_data.iter().take(n).collect();
        let encoded: Vec<_> = examples
            .iter()
            .map(|e| {
                encode_example(&prompter, 25, &e.question, &target_answer(e).unwrap()).unwrap()
            })
            .collect();
        let refs: Vec<_> = encoded.iter().collect();
        let images: Vec<_> = examples.iter().map(|e| e.image.as_path()).collect();
        let batch =
            make_batch(&refs, &images, &processor, prompter.pad_token_id().unwrap()).unwrap();
        let input = LlavaInput {
            input_ids: &batch.input_ids,
            pixel_values: Some(&batch.pixel_values),
            keep: &batch.keep,
            expanded,
        };
        let window = batch.targets.dim(1).unwrap();
        let plain_nll = particle_nll(
            &m.forward_window(&input, 3, batch.window_start, window)
                .unwrap(),
            &batch,
            3,
        )
        .unwrap();
        let plain = plain_nll.sum_all().unwrap().backward().unwrap();

        let just_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let mut taped = VarGrads::new(&just_vars);
        let nll = |logits: &candle_core::Tensor| particle_nll(logits, &batch, 3);
        let taped_nll = m
            .window_loss_checkpointed(&input, 3, (batch.window_start, window), &nll, &mut taped)
            .unwrap();
        let d = max_abs_diff(&plain_nll, &taped_nll);
        assert!(d <= 1e-6, "{targets:?}: the loss differs by {d}");
        assert_same_gradients(&plain, &taped, &vars, &format!("{targets:?}"));
    }
}

#[test]
fn training_with_gradient_checkpointing_gives_the_same_particles() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    for method in [Method::Ensemble, Method::Svgd] {
        let outs = [false, true].map(|gradient_checkpointing| {
            let out = tempfile::tempdir().unwrap();
            let mut loaded = load_model("llava-tiny-hub");
            let run = RunOptions {
                gradient_checkpointing,
                ..run(out.path(), Some(3), false)
            };
            train::train(&mut loaded, &train_data, &val, &options(method), &run).unwrap();
            out
        });
        let (a, b) = (tensors(outs[0].path()), tensors(outs[1].path()));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let d = max_abs_diff(t, &b[k]);
            assert!(d <= 1e-5, "{method:?}: {k} differs by {d}");
        }
    }
}

fn log(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_once(method: Method) -> (tempfile::TempDir, ParticleSet) {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    let out = tempfile::tempdir().unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    let report = train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(method),
        &run(out.path(), None, false),
    )
    .unwrap();
    assert!(report.finished);
    assert_eq!(report.steps, 8);
    let entries = log(out.path());
    let first = entries.first().unwrap()["train_loss"].as_f64().unwrap();
    let last = entries.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < first * 0.9, "{method:?}: loss {first} → {last}");
    assert!(
        entries.last().unwrap()["mean_pairwise_distance"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(entries.last().unwrap()["val_accuracy"].is_f64());
    // Questions per second for both methods; question–particle pairs: P times that.
    let last = entries.last().unwrap();
    let (q, pairs) = (
        last["examples_per_second"].as_f64().unwrap(),
        last["particle_examples_per_second"].as_f64().unwrap(),
    );
    assert!(
        q > 0.0 && (pairs - 3.0 * q).abs() < 1e-9 * pairs,
        "{q} {pairs}"
    );
    let set = ParticleSet::load(out.path(), &Device::Cpu).unwrap();
    assert_eq!(set.config.particles, 3);
    assert_eq!(set.config.step, 8);
    assert_eq!(set.config.layers.len(), 6, "q and v of 3 decoder layers");
    // The particles really differ (first and last).
    let (_, ad) = &set.adapters[0];
    let d = (ad.delta(0).unwrap() - ad.delta(2).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3, "{method:?}: particles 0 and 2 are the same");
    (out, set)
}

#[test]
fn ensemble_training_lowers_the_loss_and_particles_differ() {
    let (_out, set) = train_once(Method::Ensemble);
    assert_eq!(set.config.method, "ensemble");
}

#[test]
fn svgd_training_lowers_the_loss_and_particles_differ() {
    let (out, set) = train_once(Method::Svgd);
    assert_eq!(set.config.method, "svgd");
    // The particles' diversity at every evaluation, and its summary with the options.
    for e in log(out.path()) {
        let d = e["val_disagreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d), "{e}");
        assert!(e["mean_pairwise_distance"].as_f64().unwrap() > 0.0, "{e}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("train_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["options"]["repulsion"], 1.0);
    assert_eq!(summary["compute"], "f32");
    let d = &summary["diversity"];
    assert_eq!(
        d["evaluations"].as_u64().unwrap() as usize,
        log(out.path()).len()
    );
    assert_eq!(d["last"]["step"], summary["step"]);
}

fn tensors(dir: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("particles.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn resuming_equals_an_uninterrupted_run() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    let straight = tempfile::tempdir().unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Svgd),
        &run(straight.path(), None, false),
    )
    .unwrap();

    let split = tempfile::tempdir().unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    let first = train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Svgd),
        &run(split.path(), Some(5), false),
    )
    .unwrap();
    assert!(!first.finished && first.steps == 5);
    // Without --resume the run is not overwritten.
    let mut loaded = load_model("llava-tiny-hub");
    let err = train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Svgd),
        &run(split.path(), None, false),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    // A fresh process: a newly loaded base model.
    let mut loaded = load_model("llava-tiny-hub");
    let second = train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Svgd),
        &run(split.path(), None, true),
    )
    .unwrap();
    assert!(second.finished && second.steps == 8);

    let (a, b) = (tensors(straight.path()), tensors(split.path()));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = max_abs_diff(t, &b[k]);
        assert!(d <= 1e-6, "{k} differs by {d} after resuming");
    }
    // Other options refuse to resume.
    let mut loaded = load_model("llava-tiny-hub");
    let other = TrainOptions {
        lr: 0.5,
        ..options(Method::Svgd)
    };
    let err = train::train(
        &mut loaded,
        &train_data,
        &val,
        &other,
        &run(split.path(), None, true),
    )
    .unwrap_err();
    assert!(err.to_string().contains("other training options"), "{err}");
}

#[test]
fn finished_particles_without_their_checkpoints_are_not_trained_over() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    let attempt = |out: &Path, resume: bool, force: bool| {
        let mut loaded = load_model("llava-tiny-hub");
        let run = RunOptions {
            force,
            ..run(out, Some(3), resume)
        };
        train::train(
            &mut loaded,
            &train_data,
            &val,
            &options(Method::Ensemble),
            &run,
        )
    };
    // A run; then its checkpoints are lost: the particles stay safe.
    let out = tempfile::tempdir().unwrap();
    attempt(out.path(), false, false).unwrap();
    let finished = std::fs::read(out.path().join(PARTICLES_FILE)).unwrap();
    let checkpoints = out.path().join("checkpoints");
    let committed = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    // First only `latest`: resuming names the checkpoint left, and prunes nothing.
    std::fs::remove_file(checkpoints.join("latest")).unwrap();
    let err = format!("{:#}", attempt(out.path(), true, false).unwrap_err());
    assert!(
        err.contains("no committed checkpoint to resume")
            && err.contains("checkpoints/latest")
            && err.contains(committed.trim()),
        "{err}"
    );
    assert!(checkpoints.join(committed.trim()).is_dir());
    // Then all of them (deleted to save space): a new run does not replace the particles.
    std::fs::remove_dir_all(&checkpoints).unwrap();
    let err = format!("{:#}", attempt(out.path(), false, false).unwrap_err());
    assert!(
        err.contains("holds particles but no committed checkpoint") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.path().join(PARTICLES_FILE)).unwrap(),
        finished
    );
    // --force trains over them.
    attempt(out.path(), false, true).unwrap();
    assert!(checkpoints.join("latest").exists());
    // A damaged `latest`: every checkpoint is kept, and the message names them.
    let steps = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        names
    };
    let kept = steps(&checkpoints);
    assert!(!kept.is_empty());
    for garbage in ["", "garbage", "../../etc", "step-00000099"] {
        std::fs::write(checkpoints.join("latest"), garbage).unwrap();
        for resume in [true, false] {
            let err = format!("{:#}", attempt(out.path(), resume, false).unwrap_err());
            assert!(
                err.contains("is not a checkpoint directory")
                    && err.contains(kept.last().unwrap().as_str()),
                "{garbage:?}: {err}"
            );
            assert_eq!(steps(&checkpoints), kept, "{garbage:?}");
        }
    }
    // Their checkpoints deleted to save space, `latest` left: the way out is named.
    for dir in &kept {
        std::fs::remove_dir_all(checkpoints.join(dir)).unwrap();
    }
    let err = format!("{:#}", attempt(out.path(), true, false).unwrap_err());
    assert!(
        err.contains("no checkpoint is left") && err.contains("delete it"),
        "{err}"
    );
}

#[test]
fn a_damaged_checkpoint_is_reported_and_the_previous_one_is_intact() {
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    let out = tempfile::tempdir().unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Ensemble),
        &run(out.path(), Some(7), false),
    )
    .unwrap();
    let latest = train::checkpoint::latest(out.path()).unwrap().unwrap();
    assert!(latest.ends_with("step-00000007"));
    let file = latest.join("particles.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    let err = format!(
        "{:#}",
        train::train(
            &mut loaded,
            &train_data,
            &val,
            &options(Method::Ensemble),
            &run(out.path(), None, true)
        )
        .unwrap_err()
    );
    assert!(
        err.contains("step-00000007") && err.contains("particles.safetensors"),
        "{err}"
    );
    let previous = out.path().join("checkpoints/step-00000006");
    let ck = train::checkpoint::load(&previous).expect("the previous checkpoint still loads");
    assert_eq!(ck.state.step, 6);
    // The way out the message gives works: point latest at the one before, and resume.
    assert!(err.contains("write step-00000006 into"), "{err}");
    std::fs::write(out.path().join("checkpoints/latest"), "step-00000006").unwrap();
    let mut loaded = load_model("llava-tiny-hub");
    let report = train::train(
        &mut loaded,
        &train_data,
        &val,
        &options(Method::Ensemble),
        &run(out.path(), Some(7), true),
    )
    .unwrap();
    assert_eq!(report.steps, 7);
}

#[test]
fn clip_particles_learn_an_answer_vocabulary_and_answer_with_it() {
    use bella_vqa::answer::{BellaVqa, LoadOptions};
    use bella_vqa::hub::ModelSource;
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, val) = shapes(data_dir.path(), 16);
    let out = tempfile::tempdir().unwrap();
    let mut loaded = load_model("clip-tiny");
    let opts = TrainOptions {
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..options(Method::Ensemble)
    };
    // Gradient checkpointing is for LLaVA's decoder: refused before anything is written.
    let checkpointed = RunOptions {
        gradient_checkpointing: true,
        ..run(out.path(), None, false)
    };
    let err = train::train(&mut loaded, &train_data, &val, &opts, &checkpointed).unwrap_err();
    assert!(err.to_string().contains("applies to LLaVA"), "{err}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    let report = train::train(
        &mut loaded,
        &train_data,
        &val,
        &opts,
        &run(out.path(), None, false),
    )
    .unwrap();
    assert!(report.finished);
    let entries = log(out.path());
    let first = entries.first().unwrap()["train_loss"].as_f64().unwrap();
    let last = entries.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < first, "loss {first} → {last}");
    let set = ParticleSet::load(out.path(), &Device::Cpu).unwrap();
    let vocab = set
        .config
        .answer_vocabulary
        .clone()
        .expect("a CLIP set stores its vocabulary");
    assert!(vocab.len() >= 3 && vocab.iter().all(|a| !a.is_empty()));
    assert_eq!(set.config.architecture, "CLIP");
    // q and v of 2 text + 3 vision layers.
    assert_eq!(set.config.layers.len(), 10);

    let source = ModelSource::parse(fixture("clip-tiny").to_str().unwrap()).unwrap();
    let vqa = BellaVqa::load(&source, Some(out.path()), &LoadOptions::default()).unwrap();
    let image = bella_vqa::models::image::load_image(&train_data[0].image).unwrap();
    let r = vqa.ask(&image, &train_data[0].question).unwrap();
    assert_eq!(r.particles.len(), 3);
    assert!(vocab.contains(&r.answer), "{} not in {vocab:?}", r.answer);
    let total: f64 = r.candidates.iter().map(|c| c.probability).sum();
    assert!(
        (total - 1.0).abs() < 1e-6,
        "CLIP candidates carry all the mass: {total}"
    );
}

/// The CLIP loss as one graph through both towers (the plain backward pass that
/// `clip_loss_and_grads` must reproduce chunk by chunk).
#[allow(clippy::too_many_arguments)]
fn plain_clip_nll(
    m: &bella_vqa::models::clip::ClipModel,
    prompter: &bella_vqa::models::prompt::Prompter,
    processor: &bella_vqa::models::image::ImageProcessor,
    vocabulary: &[String],
    examples: &[&VqaExample],
    targets: &[usize],
    particles: usize,
    expanded: bool,
) -> candle_core::Tensor {
    use bella_vqa::answer::candidates::clip_prompt;
    use bella_vqa::bella::expand_particles;
    use bella_vqa::models::clip::normalize;
    use candle_core::{Tensor, D};
    let (rows, k) = (examples.len(), vocabulary.len());
    let texts: Vec<String> = examples
        .iter()
        .flat_map(|ex| vocabulary.iter().map(|a| clip_prompt(&ex.question, a)))
        .collect();
    let (ids, mask) = prompter.encode_clip_batch(&texts, 77, false).unwrap();
    let len = ids[0].len();
    let ids = Tensor::from_vec(ids.concat(), (rows * k, len), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask.concat(), (rows * k, len), &Device::Cpu).unwrap();
    let pixels: Vec<Tensor> = examples
        .iter()
        .map(|ex| {
            let image = bella_vqa::models::image::load_image(&ex.image).unwrap();
            processor.preprocess(&image).unwrap()
        })
        .collect();
    let pixels = Tensor::stack(&pixels, 0).unwrap();
    let (txt, _) = m
        .text_embeds_rows(&ids, Some(&mask), particles, expanded)
        .unwrap();
    let (img, _) = m.image_embeds_rows(&pixels, particles, expanded).unwrap();
    // Rows: one per example and particle, particle-major.
    let full = if expanded { rows } else { rows * particles };
    let bring = |t: Tensor, per: usize| {
        if t.dim(0).unwrap() == full * per {
            t
        } else {
            expand_particles(&t, full * per / t.dim(0).unwrap()).unwrap()
        }
    };
    let txt = bring(normalize(&txt).unwrap(), k)
        .reshape((full, k, ()))
        .unwrap();
    let img = bring(normalize(&img).unwrap(), 1).unsqueeze(1).unwrap();
    let logits = img
        .matmul(&txt.transpose(1, 2).unwrap().contiguous().unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .broadcast_mul(&m.logit_scale().exp().unwrap())
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let target: Vec<u32> = (0..full).map(|r| targets[r % rows] as u32).collect();
    let target = Tensor::from_vec(target, (full, 1), &Device::Cpu).unwrap();
    logp.gather(&target, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .reshape((particles, full / particles))
        .unwrap()
        .mean(1)
        .unwrap()
        .neg()
        .unwrap()
}

#[test]
fn clip_loss_in_chunks_gives_the_gradients_of_one_backward_pass() {
    use bella_vqa::train::objective::{
        activation_bytes, clip_loss_and_grads, clip_vocabulary, ClipTask,
    };
    let data_dir = tempfile::tempdir().unwrap();
    let (train_data, _) = shapes(data_dir.path(), 10);
    let vocabulary = clip_vocabulary(&train_data, 500);
    assert!(vocabulary.len() >= 3, "{vocabulary:?}");
    // Particles on both towers and their projections, each particle its own examples (the
    // ensemble's layout); on the text tower alone and on the vision tower alone, with examples
    // shared by the particles (SVGD's) or not.
    let layouts: [(&[&str], bool, usize); 4] = [
        (&["*"], true, 6),
        (&["*"], false, 2),
        (&["text_model.*.q_proj"], false, 3),
        (&["vision_model.*.v_proj"], true, 6),
    ];
    for (targets, expanded, n) in layouts {
        let loaded = load_model("clip-tiny");
        let prompter = loaded.prompter.unwrap();
        let processor = loaded.image_processor.unwrap();
        let Model::Clip(mut m) = loaded.model else {
            panic!("clip-tiny is a CLIP")
        };
        let vars = particle_vars(m.as_mut(), targets);
        assert!(!vars.is_empty());
        let examples: Vec<&VqaExample> = train_data.iter().take(n).collect();
        let answers: Vec<usize> = examples
            .iter()
            .map(|ex| {
                let a = bella_vqa::data::normalize::normalize_answer(&target_answer(ex).unwrap());
                vocabulary.iter().position(|v| *v == a).unwrap()
            })
            .collect();
        let plain_nll = plain_clip_nll(
            &m,
            &prompter,
            &processor,
            &vocabulary,
            &examples,
            &answers,
            3,
            expanded,
        );
        let plain = plain_nll.sum_all().unwrap().backward().unwrap();
        let just_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        // Every row layer by layer (it does not fit), an image per chunk through its whole
        // graph, and everything in one chunk.
        let v = &m.config().vision_config;
        let tokens = v.grid().pow(2) + 1;
        let image_row = activation_bytes(3, tokens, v.hidden_size, v.num_hidden_layers, false);
        for chunk_bytes in [1, image_row, usize::MAX] {
            let task = ClipTask {
                prompter: &prompter,
                processor: &processor,
                vocabulary: &vocabulary,
                chunk_bytes,
            };
            let mut grads = VarGrads::new(&just_vars);
            let nll = clip_loss_and_grads(&m, &task, &examples, &answers, 3, expanded, &mut grads)
                .unwrap();
            let d = max_abs_diff(&plain_nll, &nll);
            assert!(d <= 1e-5, "{targets:?}: the loss differs by {d}");
            let what = format!("{targets:?}, {chunk_bytes} bytes a chunk");
            assert_same_gradients(&plain, &grads, &vars, &what);
        }
    }
}
