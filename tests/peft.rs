//! Particles as PEFT LoRA adapters, checked against an adapter saved by the real Python `peft`
//! (tests/fixtures/peft/llava-lora, reference/peft.safetensors; see scripts/make_fixtures.py).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use bella_vqa::bella::particles::{
    hash_weights, BaseModel, ParticleConfig, ParticleSet, CONFIG_FILE, PARTICLES_FILE,
};
use bella_vqa::bella::peft::{
    bind_base, export_peft, import_peft, import_peft_stacked, read_safetensors_header,
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use bella_vqa::bella::{attach, AdapterSpec, InitB};
use bella_vqa::models::clip::ClipModel;
use bella_vqa::models::llava::LlavaModel;
use bella_vqa::models::Model;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use serde_json::{json, Value};

fn llava() -> LlavaModel {
    match load_model("llava-tiny-hub").model {
        Model::Llava(m) => *m,
        _ => panic!("not LLaVA"),
    }
}

fn clip() -> ClipModel {
    match load_model("clip-tiny").model {
        Model::Clip(m) => *m,
        _ => panic!("not CLIP"),
    }
}

fn peft_fixture() -> PathBuf {
    fixture("peft/llava-lora")
}

/// Logits of the reference image prompt (`image.*` of reference/llava.safetensors), one block
/// of rows per particle.
fn image_logits(m: &LlavaModel, particles: usize) -> Tensor {
    let p = reference_prompt("image");
    let input = p.input();
    let mut cache = m.language_model.new_cache();
    m.forward(&input, &mut cache, particles, false)
        .unwrap()
        .logits
}

fn config(source: &str, rank: usize, alpha: f64, particles: usize) -> ParticleConfig {
    ParticleConfig {
        format_version: 1,
        base_model: BaseModel {
            source: source.into(),
            revision: None,
            commit: None,
            weights: vec![],
        },
        architecture: "LLaVA".into(),
        targets: vec![],
        layers: vec![],
        rank,
        alpha,
        particles,
        method: "ensemble".into(),
        seed: 3,
        step: 0,
        abstention: None,
        abstention_history: Vec::new(),
        answer_vocabulary: None,
        particles_sha256: None,
    }
}

/// The targets of the Python fixture (q, k, v, o of the language model), r = 4, α = 8, with
/// random B so that particles differ.
fn llava_particles(particles: usize) -> (LlavaModel, ParticleSet) {
    let mut m = llava();
    let spec = AdapterSpec {
        rank: 4,
        alpha: 8.0,
        particles,
        ..AdapterSpec::default_for_llava()
    };
    attach(&mut m, &spec, InitB::Normal { std: 0.1 }, 11).unwrap();
    let set = ParticleSet::from_model(
        &m,
        config("tests/fixtures/llava-tiny-hub", 4, 8.0, particles),
    );
    (m, set)
}

/// key → (dtype, shape) from a safetensors header, plus its `__metadata__`.
fn header(path: &Path) -> (BTreeMap<String, (String, Vec<u64>)>, Value) {
    let h = read_safetensors_header(path).unwrap();
    let mut keys = BTreeMap::new();
    let mut meta = Value::Null;
    for (k, v) in h {
        if k == "__metadata__" {
            meta = v;
            continue;
        }
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        keys.insert(k, (v["dtype"].as_str().unwrap().to_string(), shape));
    }
    (keys, meta)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Same layers (in any order) with bit-identical factors and the same scale.
fn assert_same_factors(a: &ParticleSet, b: &ParticleSet) {
    let by_name = |s: &ParticleSet| {
        s.adapters
            .iter()
            .map(|(n, ad)| (n.clone(), ad.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let (a, b) = (by_name(a), by_name(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for ((name, x), y) in a.iter().zip(b.values()) {
        assert_eq!(x.a.dims(), y.a.dims(), "{name}");
        assert_eq!(x.b.dims(), y.b.dims(), "{name}");
        assert_eq!(max_abs_diff(&x.a, &y.a), 0.0, "{name} A");
        assert_eq!(max_abs_diff(&x.b, &y.b), 0.0, "{name} B");
        assert_eq!(x.scale, y.scale, "{name} scale");
    }
}

#[test]
fn python_peft_adapter_gives_peft_logits() {
    let set = import_peft(&peft_fixture()).unwrap();
    assert_eq!(set.config.particles, 1);
    assert_eq!((set.config.rank, set.config.alpha), (4, 8.0));
    assert_eq!(set.config.architecture, "LLaVA");
    assert_eq!(
        set.config.base_model.source,
        "tests/fixtures/llava-tiny-hub"
    );
    // in natural order (layer index, then name)
    let expected_layers: Vec<String> = (0..3)
        .flat_map(|i| {
            ["k_proj", "o_proj", "q_proj", "v_proj"]
                .map(|p| format!("language_model.model.layers.{i}.self_attn.{p}"))
        })
        .collect();
    assert_eq!(set.config.layers, expected_layers);
    assert_eq!(set.config.targets, expected_layers);

    let base = llava();
    let mut m = base.clone();
    set.attach_to(&mut m).unwrap();
    let got = image_logits(&m, 1);
    let peft = reference("peft");
    let expected = get(&peft, "image.logits");
    assert_close("PEFT-wrapped logits", &got, expected);
    // the adapter matters: without it the logits are far away
    let d = max_abs_diff(&image_logits(&base, 1), expected);
    assert!(d > 0.5, "base vs PEFT logits differ by only {d}");
}

#[test]
fn exported_keys_shapes_dtypes_and_metadata_equal_python_peft() {
    let (_, set) = llava_particles(2);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    assert_eq!(
        dirs,
        vec![tmp.path().join("particle-0"), tmp.path().join("particle-1")]
    );
    let (want, want_meta) = header(&peft_fixture().join(ADAPTER_WEIGHTS_FILE));
    assert_eq!(want.len(), 24);
    assert!(want
        .keys()
        .all(|k| k.starts_with("base_model.model.model.language_model.layers.")));
    for dir in &dirs {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]);
        let (got, meta) = header(&dir.join(ADAPTER_WEIGHTS_FILE));
        assert_eq!(got, want, "{}", dir.display());
        assert_eq!(meta, want_meta);
        assert_eq!(meta["format"], "pt");
    }
}

#[test]
fn exported_config_matches_python_peft() {
    let (_, set) = llava_particles(2);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    let real = read_json(&peft_fixture().join(ADAPTER_CONFIG_FILE));
    let real = real.as_object().unwrap();
    for dir in &dirs {
        let ours = read_json(&dir.join(ADAPTER_CONFIG_FILE));
        let ours = ours.as_object().unwrap();
        let written: BTreeSet<&str> = ours.keys().map(String::as_str).collect();
        assert_eq!(
            written,
            BTreeSet::from([
                "alpha_pattern",
                "auto_mapping",
                "base_model_name_or_path",
                "bias",
                "fan_in_fan_out",
                "inference_mode",
                "init_lora_weights",
                "layers_pattern",
                "layers_to_transform",
                "lora_alpha",
                "lora_dropout",
                "modules_to_save",
                "peft_type",
                "r",
                "rank_pattern",
                "revision",
                "target_modules",
                "task_type",
                "use_dora",
                "use_rslora",
            ])
        );
        for (k, v) in ours {
            let r = real
                .get(k)
                .unwrap_or_else(|| panic!("PEFT does not write {k}"));
            if k != "target_modules" {
                // same value, same JSON type (lora_alpha 8 is an integer in both)
                assert_eq!(v, r, "{k}");
            }
        }
        // target_modules: the exact module names, which are the ones the Python regex selected
        let fixture_modules: BTreeSet<String> = header(&peft_fixture().join(ADAPTER_WEIGHTS_FILE))
            .0
            .keys()
            .map(|k| {
                k.strip_prefix("base_model.model.")
                    .unwrap()
                    .strip_suffix(".lora_A.weight")
                    .or_else(|| {
                        k.strip_prefix("base_model.model.")?
                            .strip_suffix(".lora_B.weight")
                    })
                    .unwrap()
                    .to_string()
            })
            .collect();
        let ours_modules: Vec<String> = ours["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(ours_modules.len(), 12);
        assert_eq!(
            ours_modules.iter().cloned().collect::<BTreeSet<_>>(),
            fixture_modules
        );
        assert_eq!(
            ours_modules[0],
            "model.language_model.layers.0.self_attn.k_proj"
        );
    }
}

#[test]
fn reexporting_the_python_adapter_gives_the_same_file() {
    let set = import_peft(&peft_fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    assert_eq!(dirs.len(), 1);
    let theirs = std::fs::read(peft_fixture().join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let ours = std::fs::read(dirs[0].join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert!(ours == theirs, "the safetensors bytes differ from PEFT's");
    assert_same_factors(&set, &import_peft(&dirs[0]).unwrap());
}

#[test]
fn export_import_round_trip_is_exact() {
    let (_, set) = llava_particles(3);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    let back = import_peft_stacked(&dirs).unwrap();
    assert_eq!(back.config.particles, 3);
    assert_eq!((back.config.rank, back.config.alpha), (4, 8.0));
    assert_same_factors(&set, &back);
    // through our own format too
    let saved = tempfile::tempdir().unwrap();
    back.save(saved.path()).unwrap();
    assert_same_factors(
        &set,
        &ParticleSet::load(saved.path(), &Device::Cpu).unwrap(),
    );
}

#[test]
fn exported_particle_alone_equals_its_particle_in_the_stacked_model() {
    let (stacked_model, set) = llava_particles(3);
    let stacked = image_logits(&stacked_model, 3);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    let mut blocks = Vec::new();
    for (p, dir) in dirs.iter().enumerate() {
        let one = import_peft(dir).unwrap();
        let mut m = llava();
        one.attach_to(&mut m).unwrap();
        let single = image_logits(&m, 1);
        let block = stacked.i(p..p + 1).unwrap();
        assert_close(&format!("particle {p}"), &single, &block);
        blocks.push(block);
    }
    assert!(
        max_abs_diff(&blocks[0], &blocks[1]) > 1e-2,
        "particles differ"
    );
}

#[test]
fn clip_particles_export_with_clip_names() {
    let mut m = clip();
    let spec = AdapterSpec {
        targets: vec!["q_proj".into(), "visual_projection".into()],
        rank: 2,
        alpha: 3.5,
        particles: 2,
    };
    attach(&mut m, &spec, InitB::Normal { std: 0.1 }, 5).unwrap();
    let mut cfg = config("tests/fixtures/clip-tiny", 2, 3.5, 2);
    cfg.architecture = "CLIP".into();
    // The answers CLIP particles score go with them (their import could not answer without).
    let vocabulary: Vec<String> = ["red", "#1", "two words", "blue"]
        .map(String::from)
        .to_vec();
    cfg.answer_vocabulary = Some(vocabulary.clone());
    let set = ParticleSet::from_model(&m, cfg);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = export_peft(&set, tmp.path(), &[]).unwrap();
    let c = read_json(&dirs[1].join(ADAPTER_CONFIG_FILE));
    assert_eq!(c["task_type"], Value::Null);
    assert_eq!(c["auto_mapping"]["base_model_class"], "CLIPModel");
    assert_eq!(c["lora_alpha"], 3.5);
    assert_eq!(c["r"], 2);
    let (keys, _) = header(&dirs[1].join(ADAPTER_WEIGHTS_FILE));
    assert!(keys.contains_key("base_model.model.visual_projection.lora_A.weight"));
    assert!(keys.contains_key(
        "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"
    ));
    assert!(keys.contains_key(
        "base_model.model.vision_model.encoder.layers.2.self_attn.q_proj.lora_A.weight"
    ));
    let back = import_peft_stacked(&dirs).unwrap();
    assert_eq!(back.config.architecture, "CLIP");
    assert_eq!(back.config.answer_vocabulary, Some(vocabulary));
    assert_same_factors(&set, &back);
    let mut fresh = clip();
    back.attach_to(&mut fresh).unwrap();
    // Particles with different vocabularies are not one set.
    std::fs::write(
        dirs[1].join(bella_vqa::bella::peft::ANSWERS_FILE),
        r#"["red", "blue"]"#,
    )
    .unwrap();
    let err = format!("{:#}", import_peft_stacked(&dirs).unwrap_err());
    assert!(err.contains("different answer vocabularies"), "{err}");
}

#[test]
fn imported_set_is_tied_to_its_base_and_answers() {
    let mut set = import_peft(&peft_fixture()).unwrap();
    let hub = dir_files(&fixture("llava-tiny-hub")).unwrap();
    // not tied yet: the base check refuses it
    assert!(set.verify_base(&hub).is_err());
    bind_base(&mut set, &hub, "tests/fixtures/llava-tiny-hub").unwrap();
    assert_eq!(set.config.base_model.weights, hash_weights(&hub).unwrap());
    set.verify_base(&hub).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    set.save(tmp.path()).unwrap();
    let loaded = ParticleSet::load(tmp.path(), &Device::Cpu).unwrap();
    loaded
        .verify_base(&dir_files(&fixture("llava-tiny-hub")).unwrap())
        .unwrap();
    // the transformers-5 layout of the same model has the same layers
    let mut again = import_peft(&peft_fixture()).unwrap();
    bind_base(
        &mut again,
        &dir_files(&fixture("llava-tiny-v5")).unwrap(),
        "v5",
    )
    .unwrap();
    // CLIP has no such layers: the base the adapter names is the one to pass.
    let mut fresh = import_peft(&peft_fixture()).unwrap();
    let err = bind_base(
        &mut fresh,
        &dir_files(&fixture("clip-tiny")).unwrap(),
        "clip",
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("does not have")
            && err.contains("base_model_name_or_path: tests/fixtures/llava-tiny-hub")
            && err.contains("as --model"),
        "{err}"
    );
}

#[test]
fn rslora_is_folded_into_alpha() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture(tmp.path());
    edit_config(&dir, |c| c["use_rslora"] = Value::Bool(true));
    let set = import_peft(&dir).unwrap();
    // scale = lora_alpha / √r = 8 / 2 = 4 = α / r with α = 16
    assert_eq!(set.config.alpha, 16.0);
    assert_eq!(set.adapters[0].1.scale, 4.0);
}

fn copy_fixture(to: &Path) -> PathBuf {
    let dir = to.join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        std::fs::copy(peft_fixture().join(f), dir.join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let mut c = read_json(&path);
    edit(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[track_caller]
fn import_err(dir: &Path) -> String {
    format!("{:#}", import_peft(dir).unwrap_err())
}

#[test]
fn bad_adapters_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("nothing-here");
    assert!(import_err(&missing).contains("not a PEFT adapter directory"));

    // (expected in the error, config field, value)
    let cases = [
        ("peft_type \"IA3\"", "peft_type", json!("IA3")),
        ("merge_and_unload", "use_dora", json!(true)),
        // The saved factors of these are not a LoRA of the base (PEFT changes the base
        // weight when it loads them): refused with the conversion PEFT offers.
        (
            "path_initial_model_for_weight_conversion",
            "init_lora_weights",
            json!("pissa"),
        ),
        (
            "init_lora_weights \"pissa_niter_4\"",
            "init_lora_weights",
            json!("pissa_niter_4"),
        ),
        (
            "init_lora_weights \"olora\"",
            "init_lora_weights",
            json!("olora"),
        ),
        (
            "init_lora_weights \"loftq\"",
            "init_lora_weights",
            json!("loftq"),
        ),
        (
            "none bella-vqa knows",
            "init_lora_weights",
            json!("garbage"),
        ),
        ("none bella-vqa knows", "init_lora_weights", json!(0)),
        ("rank_pattern gives", "rank_pattern", json!({"q_proj": 8})),
        ("modules_to_save", "modules_to_save", json!(["lm_head"])),
        ("bias = \"all\"", "bias", json!("all")),
        ("lora_bias", "lora_bias", json!(true)),
        ("use_qalora is set", "use_qalora", json!(true)),
        (
            "layer_replication is set",
            "layer_replication",
            json!([[0, 2], [1, 2]]),
        ),
        (
            "trainable_token_indices",
            "trainable_token_indices",
            json!([3, 4]),
        ),
        ("`r` must be", "r", json!(0)),
        ("but r = 8", "r", json!(8)),
        ("`lora_alpha` must be", "lora_alpha", json!("eight")),
        // Overflows f32 once it scales ΔW: refused here, not NaN at every answer.
        ("at most 1e6", "lora_alpha", json!(1e300)),
        ("at most 1e6", "lora_alpha", json!(-16)),
    ];
    for (i, (want, key, value)) in cases.into_iter().enumerate() {
        let dir = copy_fixture(&tmp.path().join(format!("case{i}")));
        edit_config(&dir, |c| c[key] = value);
        let err = import_err(&dir);
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }

    let dir = copy_fixture(&tmp.path().join("json"));
    std::fs::write(dir.join(ADAPTER_CONFIG_FILE), "{ not json").unwrap();
    assert!(import_err(&dir).contains("not valid JSON"));

    let dir = copy_fixture(&tmp.path().join("bin"));
    std::fs::remove_file(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    assert!(import_err(&dir).contains("adapter_model.bin"));

    let dir = copy_fixture(&tmp.path().join("truncated"));
    let bytes = std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), &bytes[..bytes.len() / 2]).unwrap();
    assert!(import_err(&dir).contains("truncated or not safetensors"));

    let dir = copy_fixture(&tmp.path().join("half"));
    rewrite_weights(&dir, |t| {
        t.remove("base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight");
    });
    let err = import_err(&dir);
    assert!(
        err.contains("language_model.model.layers.1.self_attn.v_proj has lora_A but not lora_B"),
        "{err}"
    );

    let dir = copy_fixture(&tmp.path().join("embedding"));
    rewrite_weights(&dir, |t| {
        t.insert(
            "base_model.model.model.language_model.embed_tokens.lora_embedding_A".into(),
            Tensor::zeros((4, 422), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(import_err(&dir).contains("is not a LoRA factor"));

    // The lm_head's whole weight, as PEFT saves it when lm_head is targeted: the way to re-save.
    let dir = copy_fixture(&tmp.path().join("base-layer"));
    rewrite_weights(&dir, |t| {
        t.insert(
            "base_model.model.lm_head.base_layer.weight".into(),
            Tensor::zeros((422, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(import_err(&dir).contains("save_embedding_layers=False"));

    // An adapter saved under a name of its own: its folder is named.
    let named = tmp.path().join("named");
    let inside = copy_fixture(&named);
    let err = import_err(&named);
    assert!(
        err.contains(&inside.display().to_string()) && err.contains("pass those"),
        "{err}"
    );

    // stacking adapters that do not agree
    let a = copy_fixture(&tmp.path().join("stack-a"));
    let b = copy_fixture(&tmp.path().join("stack-b"));
    edit_config(&b, |c| c["lora_alpha"] = 16.into());
    let err = format!("{:#}", import_peft_stacked(&[a.clone(), b]).unwrap_err());
    assert!(err.contains("share rank and alpha"), "{err}");
    let c = copy_fixture(&tmp.path().join("stack-c"));
    rewrite_weights(&c, |t| {
        t.retain(|k, _| !k.contains("layers.2."));
    });
    let err = format!("{:#}", import_peft_stacked(&[a.clone(), c]).unwrap_err());
    assert!(
        err.contains("adapts other layers")
            && err.contains("stack-c/adapter: none; only in ")
            && err.contains(
                "stack-a/adapter: language_model.model.layers.2.self_attn.k_proj, \
                 language_model.model.layers.2.self_attn.o_proj, \
                 language_model.model.layers.2.self_attn.q_proj and 1 more)"
            ),
        "{err}"
    );
    let err = format!("{:#}", import_peft_stacked(&[]).unwrap_err());
    assert!(err.contains("no PEFT adapter directory"), "{err}");
}

#[test]
fn bad_particle_directories_are_refused_on_export() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ParticleSet::load(&tmp.path().join("missing"), &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("is not a particle directory"));
    // A PEFT adapter given where particles are expected: the way to import it.
    let peft = copy_fixture(&tmp.path().join("peft"));
    let err = format!("{:#}", ParticleSet::load(&peft, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("is a PEFT adapter") && err.contains("bella-vqa import-peft --peft"),
        "{err}"
    );

    let (_, set) = llava_particles(2);
    let dir = tmp.path().join("set");
    set.save(&dir).unwrap();
    let weights = dir.join("particles.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    let err = ParticleSet::load(&dir, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");

    // the output is a file
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = export_peft(&set, &file, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("not a directory"), "{err:#}");

    // a layer we have no PEFT name for
    let mut odd = set.clone();
    odd.adapters[0].0 = "transformer.h.0.attn.c_attn".into();
    let err = export_peft(&odd, &tmp.path().join("odd"), &[]).unwrap_err();
    assert!(
        format!("{err:#}").contains("no PEFT module name"),
        "{err:#}"
    );

    // non-finite factors
    let mut nan = set.clone();
    let a = &nan.adapters[3].1.a;
    nan.adapters[3].1.a = (a * f64::NAN).unwrap();
    let err = export_peft(&nan, &tmp.path().join("nan"), &[]).unwrap_err();
    assert!(format!("{err:#}").contains("non-finite"), "{err:#}");

    // All or nothing: a set whose last particle cannot be written replaces none of the adapters
    // there (the first particles were written, the old ones removed before).
    let out = tmp.path().join("whole");
    let mut earlier = set.clone();
    earlier.adapters[3].1.a = (&earlier.adapters[3].1.a * 2.0).unwrap();
    let old = export_peft(&earlier, &out, &[]).unwrap();
    let before: Vec<Vec<u8>> = old
        .iter()
        .map(|d| std::fs::read(d.join("adapter_model.safetensors")).unwrap())
        .collect();
    let mut last_bad = set.clone();
    let a = &last_bad.adapters[3].1.a;
    let p = a.dim(0).unwrap();
    let rows: Vec<Tensor> = (0..p)
        .map(|k| {
            let row = a.get(k).unwrap();
            if k + 1 == p {
                (row * f64::NAN).unwrap()
            } else {
                row
            }
        })
        .collect();
    last_bad.adapters[3].1.a = Tensor::stack(&rows, 0).unwrap();
    let err = export_peft(&last_bad, &out, &old).unwrap_err();
    assert!(format!("{err:#}").contains("non-finite"), "{err:#}");
    let after: Vec<Vec<u8>> = old
        .iter()
        .map(|d| std::fs::read(d.join("adapter_model.safetensors")).unwrap())
        .collect();
    assert_eq!(before, after);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), old.len(), "{names:?}");
}

fn bella() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

/// `import-peft` of `peft` into `out` (against the tiny LLaVA), with `--force` when asked.
fn import_peft_cli(peft: &[PathBuf], out: &Path, force: bool) -> std::process::Output {
    let mut cmd = bella();
    cmd.args(["import-peft", "--peft"])
        .args(peft)
        .arg("--out")
        .arg(out)
        .arg("--model")
        .arg(fixture("llava-tiny-hub"));
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

#[test]
fn the_demos_particles_export_with_a_base_peft_can_load() {
    // The shipped particles record their base as "demo", which PEFT cannot resolve: the export
    // names the directory the demo is written to (a Hugging Face model directory).
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("peft");
    let o = bella()
        .env("BELLA_VQA_CACHE", &cache)
        .args(["export-peft", "--adapters"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/particles/llava-ensemble"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("particle-0").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let base = Path::new(config["base_model_name_or_path"].as_str().unwrap());
    assert!(base.starts_with(&cache), "{}", base.display());
    assert!(base.join("config.json").is_file(), "{}", base.display());
}

#[test]
fn cli_exports_and_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, set) = llava_particles(2);
    let particles = tmp.path().join("particles");
    set.save(&particles).unwrap();
    let out = tmp.path().join("peft");
    let o = bella()
        .args(["export-peft", "--adapters"])
        .arg(&particles)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("particle-1"), "{stdout}");
    assert!(out.join("particle-1").join(ADAPTER_WEIGHTS_FILE).is_file());

    let back = tmp.path().join("back");
    let both = [out.join("particle-0"), out.join("particle-1")];
    // A folder named checkpoints that is not a training run's is no particle set, and stays.
    let theirs = back.join("checkpoints").join("my-other-run");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("model.bin"), b"x").unwrap();
    let o = import_peft_cli(&both, &back, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loaded = ParticleSet::load(&back, &Device::Cpu).unwrap();
    assert_same_factors(&set, &loaded);
    loaded
        .verify_base(&dir_files(&fixture("llava-tiny-hub")).unwrap())
        .unwrap();

    // Finished work is not replaced without --force: a calibrated particle set, exported adapters.
    let import_again = |force: bool| import_peft_cli(&both[..1], &back, force);
    let before = std::fs::read(back.join("bella_config.json")).unwrap();
    let o = import_again(false);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("already holds a particle set") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(back.join("bella_config.json")).unwrap(),
        before
    );
    // With --force the set is replaced and stale training checkpoints and logs go with it.
    std::fs::create_dir_all(back.join("checkpoints").join("step-00000001")).unwrap();
    let stale_files = [
        "train_log.jsonl",
        "train_summary.json",
        bella_vqa::bench::kept_answers::FILE,
    ];
    for stale in stale_files {
        std::fs::write(back.join(stale), b"{}").unwrap();
    }
    let o = import_again(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        ParticleSet::load(&back, &Device::Cpu)
            .unwrap()
            .config
            .particles,
        1
    );
    assert!(!back.join("checkpoints").join("step-00000001").exists());
    assert_eq!(std::fs::read(theirs.join("model.bin")).unwrap(), b"x");
    for stale in stale_files {
        assert!(!back.join(stale).exists(), "{stale}");
    }
    let export_again = |force: bool| {
        let mut cmd = bella();
        cmd.args(["export-peft", "--adapters"])
            .arg(&particles)
            .arg("--out")
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let o = export_again(false);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("already holds a PEFT adapter") && stderr.contains("--force"),
        "{stderr}"
    );
    let o = export_again(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same adapter twice is not two particles.
    let twice = [
        out.join("particle-0"),
        out.join("particle-1").join("..").join("particle-0"),
    ];
    let o = import_peft_cli(&twice, &tmp.path().join("twice"), false);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("are the same adapter"), "{stderr}");
    // Nor is a copy of it.
    let copy = tmp.path().join("copy-of-particle-0");
    std::fs::create_dir_all(&copy).unwrap();
    for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        std::fs::copy(out.join("particle-0").join(f), copy.join(f)).unwrap();
    }
    let o = import_peft_cli(
        &[out.join("particle-0"), copy],
        &tmp.path().join("copied"),
        false,
    );
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("hold the same factors"), "{stderr}");

    // An adapter with a NaN is refused at import, named, and nothing is written.
    let damaged = tmp.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::copy(
        out.join("particle-0").join("adapter_config.json"),
        damaged.join("adapter_config.json"),
    )
    .unwrap();
    let weights = out.join("particle-0").join(ADAPTER_WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("lora_A"))
        .unwrap()
        .clone();
    let t = &tensors[&key];
    let nan = (t * f64::NAN).unwrap();
    tensors.insert(key.clone(), nan);
    candle_core::safetensors::save(&tensors, damaged.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let o = import_peft_cli(&[damaged], &tmp.path().join("from-damaged"), false);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("NaN") && stderr.contains(&key), "{stderr}");
    assert!(!tmp
        .path()
        .join("from-damaged")
        .join("bella_config.json")
        .exists());

    let o = bella()
        .args(["export-peft", "--adapters"])
        .arg(tmp.path().join("missing"))
        .arg("--out")
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a particle directory"));

    // --out names a file: said so, and the file is left alone.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "keep me").unwrap();
    let o = bella()
        .args(["export-peft", "--adapters", "demo", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("is a file, not a directory"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn export_with_force_replaces_a_larger_set_whole_and_import_takes_the_lock_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("peft");
    let export = |particles: &Path, force: bool| {
        let mut cmd = bella();
        cmd.args(["export-peft", "--quiet", "--adapters"])
            .arg(particles)
            .arg("--out")
            .arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let (_, four) = llava_particles(4);
    let (_, two) = llava_particles(2);
    let (four_dir, two_dir) = (tmp.path().join("four"), tmp.path().join("two"));
    four.save(&four_dir).unwrap();
    two.save(&two_dir).unwrap();
    assert!(export(&four_dir, false).status.success());
    let o = export(&two_dir, false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a PEFT adapter"));
    // A folder of the user's named like one is not an adapter of the set.
    let theirs = out.join("particle-best");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join(ADAPTER_CONFIG_FILE), "{}").unwrap();
    assert!(export(&two_dir, true).status.success());
    assert!(theirs.join(ADAPTER_CONFIG_FILE).is_file());
    std::fs::remove_dir_all(&theirs).unwrap();
    // A link to a directory that is not there: said so.
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let o = bella()
        .args(["export-peft", "--quiet", "--adapters"])
        .arg(&two_dir)
        .arg("--out")
        .arg(&dangling)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("is a link to a directory that is not there"),
        "{stderr}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("particle-"))
        .collect();
    left.sort();
    assert_eq!(left, ["particle-0", "particle-1"]);
    // An import into a directory another run holds is refused for that, before looking at what
    // it holds (two imports into one empty --out could both find it empty).
    let busy = tmp.path().join("busy");
    two.save(&busy).unwrap();
    let _held = bella_vqa::io::OutputLock::acquire(&busy).unwrap();
    let o = import_peft_cli(&[out.join("particle-0")], &busy, false);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("is in use by process") && !stderr.contains("already holds"),
        "{stderr}"
    );
}

#[test]
fn factors_that_are_not_the_ones_their_config_describes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, a) = llava_particles(2);
    let (_, b) = llava_particles(3);
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    a.save(&a_dir).unwrap();
    b.save(&b_dir).unwrap();
    // The pair round-trips, the hash recorded.
    let loaded = ParticleSet::load(&a_dir, &Device::Cpu).unwrap();
    assert!(loaded.config.particles_sha256.is_some());
    // A write killed between the two files: b's factors under a's config.
    let a_factors = std::fs::read(a_dir.join(PARTICLES_FILE)).unwrap();
    std::fs::copy(b_dir.join(PARTICLES_FILE), a_dir.join(PARTICLES_FILE)).unwrap();
    let err = format!("{:#}", ParticleSet::load(&a_dir, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("is not the file its bella_config.json describes")
            && err.contains("interrupted"),
        "{err}"
    );
    // A writer between its two files (train publishing a checkpoint): the reader reads the
    // pair again and gets the whole new set once the second file is in place.
    let b_config = b_dir.join(CONFIG_FILE);
    let a_config = a_dir.join(CONFIG_FILE);
    let a_config_bytes = std::fs::read(&a_config).unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(150));
        std::fs::copy(&b_config, &a_config).unwrap();
    });
    let loaded = ParticleSet::load(&a_dir, &Device::Cpu).unwrap();
    writer.join().unwrap();
    assert_eq!(loaded.config.particles, 3);
    std::fs::write(a_dir.join(CONFIG_FILE), a_config_bytes).unwrap();
    // A config written before the hash was recorded still loads.
    std::fs::write(a_dir.join(PARTICLES_FILE), a_factors).unwrap();
    let config_path = a_dir.join(CONFIG_FILE);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("particles_sha256");
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    ParticleSet::load(&a_dir, &Device::Cpu).unwrap();
}

#[test]
fn a_relative_base_model_that_is_not_found_says_to_pass_model() {
    // The fixture's base_model_name_or_path is relative to the repository: from elsewhere it is
    // neither a directory nor a hub id.
    let elsewhere = tempfile::tempdir().unwrap();
    let o = bella()
        .args(["import-peft", "--quiet", "--peft"])
        .arg(peft_fixture())
        .arg("--out")
        .arg(elsewhere.path().join("set"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("tests/fixtures/llava-tiny-hub") && stderr.contains("pass --model"),
        "{stderr}"
    );
    assert!(
        !elsewhere.path().join("set").exists(),
        "nothing was written"
    );
}

/// The adapter_config.json values PEFT 0.21.2 writes for its LoRA variants (LoraConfig(…,
/// alora_invocation_tokens=[294, 262, 384]), use_bdlora=BdLoraConfig(…), ArrowConfig(top_k=2),
/// KasaConfig(), saved by save_pretrained on llava-tiny-hub).
fn variant_configs() -> Vec<(&'static str, Value)> {
    vec![
        ("alora_invocation_tokens", json!([294, 262, 384])),
        (
            "use_bdlora",
            json!({"match_strict": true, "nblocks": 2, "target_modules_bd_a": ["o_proj"],
                   "target_modules_bd_b": ["q_proj", "k_proj", "v_proj"]}),
        ),
        (
            "arrow_config",
            json!({"top_k": 2, "router_temperature": 1.0, "use_gks": false,
                   "task_adapter_names": null, "gks_adapter_names": null, "rng_seed": null}),
        ),
        ("kasa_config", json!({"beta": 0.0001, "gamma": 0.001})),
        // PEFT turns an empty sub-config into an active variant with default settings.
        ("kasa_config", json!({})),
        ("megatron_config", json!({"tensor_model_parallel_size": 1})),
    ]
}

#[test]
fn lora_variants_that_change_the_forward_pass_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (key, value)) in variant_configs().into_iter().enumerate() {
        let dir = copy_fixture(&tmp.path().join(format!("variant{i}")));
        edit_config(&dir, |c| c[key] = value);
        let err = import_err(&dir);
        assert!(
            err.contains(&format!("{key} is set")) && err.contains("plain LoRA only"),
            "{key}: {err}"
        );
    }
    // aLoRA: the reason is the one that made its numbers wrong (ΔW before the invocation).
    let dir = copy_fixture(&tmp.path().join("alora"));
    edit_config(&dir, |c| {
        c["alora_invocation_tokens"] = json!([294, 262, 384])
    });
    let err = import_err(&dir);
    assert!(err.contains("invocation tokens on"), "{err}");

    // A key bella-vqa does not know: refused when set, naming the PEFT version that wrote it.
    let dir = copy_fixture(&tmp.path().join("unknown"));
    edit_config(&dir, |c| c["use_hira"] = json!(true));
    let err = import_err(&dir);
    assert!(
        err.contains("use_hira = true") && err.contains("written by PEFT 0.21.2"),
        "{err}"
    );
    let dir = copy_fixture(&tmp.path().join("unknown-versionless"));
    edit_config(&dir, |c| {
        c["sparse_config"] = json!({"k": 3});
        c.as_object_mut().unwrap().remove("peft_version");
    });
    let err = import_err(&dir);
    assert!(
        err.contains("sparse_config = {\"k\":3}") && !err.contains("written by"),
        "{err}"
    );
    // LoRA-GA moves a part of the base weight into the factors, like PiSSA.
    let dir = copy_fixture(&tmp.path().join("lora-ga"));
    edit_config(&dir, |c| c["init_lora_weights"] = json!("lora_ga"));
    assert!(import_err(&dir).contains("changes the base model's weights"));
}

/// Every saved factor must belong to a module the config selects as PEFT 0.21 reads it
/// (`check_target_module_exists`: a regex matched against the whole name, or names matched as a
/// suffix, then `layers_to_transform` by the first numbered segment, `exclude_modules`): PEFT
/// loads only those, so the tensors alone must not decide (a sweep imported all 12 layers of an
/// adapter PEFT loads 4 of).
#[test]
fn the_config_must_select_every_saved_module_as_peft_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = import_peft(&peft_fixture()).unwrap();
    let names = json!(["q_proj", "k_proj", "v_proj", "o_proj"]);
    // (case, the config keys it sets, Some(what the refusal names) or None: imported as is)
    let cases = [
        ("list", json!({"target_modules": names}), None),
        (
            "all layers",
            json!({"target_modules": names, "layers_to_transform": [0, 1, 2]}),
            None,
        ),
        (
            "all layers by pattern",
            json!({"target_modules": names, "layers_to_transform": [2, 1, 0], "layers_pattern": "layers"}),
            None,
        ),
        ("all-linear", json!({"target_modules": "all-linear"}), None),
        (
            "excluded elsewhere",
            json!({"exclude_modules": ["mlp.up_proj"]}),
            None,
        ),
        // A pattern that names no module of the adapter changes nothing in PEFT.
        (
            "pattern of nothing",
            json!({"rank_pattern": {"nonexistent_xyz": 2}, "alpha_pattern": {"gate_proj": 32}}),
            None,
        ),
        // PEFT sets it to false on Linear layers, every adapted layer here.
        ("fan_in_fan_out", json!({"fan_in_fan_out": true}), None),
        (
            "one layer",
            json!({"target_modules": names, "layers_to_transform": [0]}),
            Some("layers.1.self_attn"),
        ),
        (
            "one layer as an integer",
            json!({"target_modules": names, "layers_to_transform": 2}),
            Some("layers.0.self_attn"),
        ),
        (
            "another pattern",
            json!({"target_modules": names, "layers_to_transform": [0, 1, 2], "layers_pattern": "blocks"}),
            Some("layers.0.self_attn"),
        ),
        (
            "fewer modules",
            json!({"target_modules": ["k_proj"]}),
            Some("self_attn.o_proj"),
        ),
        (
            "regex of fewer modules",
            json!({"target_modules": ".*\\.(q_proj|k_proj)"}),
            Some("self_attn.o_proj"),
        ),
        (
            "excluded",
            json!({"exclude_modules": ".*layers\\.2\\..*"}),
            Some("layers.2.self_attn"),
        ),
    ];
    for (name, keys, refused) in cases {
        let dir = copy_fixture(&tmp.path().join(name));
        edit_config(&dir, |c| {
            for (k, v) in keys.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        match refused {
            None => {
                let set = import_peft(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert_same_factors(&set, &plain);
            }
            Some(module) => {
                let err = import_err(&dir);
                assert!(
                    err.contains("which its config does not select") && err.contains(module),
                    "{name}: {err}"
                );
            }
        }
    }
    // rsLoRA's switch decides the scale: only a boolean is read.
    for value in [json!(1), json!("true")] {
        let dir = copy_fixture(&tmp.path().join(format!("rslora-{value}")));
        edit_config(&dir, |c| c["use_rslora"] = value.clone());
        let err = import_err(&dir);
        assert!(err.contains("is not true or false"), "{value}: {err}");
    }
}

#[test]
fn settings_that_leave_plain_lora_at_inference_import_the_same_factors() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = import_peft(&peft_fixture()).unwrap();
    let module = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
    // (case, the config keys it sets)
    let cases = [
        // MiCA only chooses the initial factors; LoraLayer.mica_init leaves the base alone.
        ("mica", json!({"init_lora_weights": "mica"})),
        // PEFT 0.2's merge-at-eval switch (alpaca-lora's adapters carry it): the same numbers.
        ("merge_weights", json!({"merge_weights": true})),
        // Entries equal to r and lora_alpha, by name and by regex.
        (
            "patterns",
            json!({
                "rank_pattern": {"q_proj": 4, "^model\\.language_model\\.layers\\.0\\.self_attn\\.q_proj$": 4},
                "alpha_pattern": {"v_proj": 8.0}
            }),
        ),
        // Neutral values, known keys or not.
        (
            "neutral",
            json!({
                "alora_invocation_tokens": [],
                "use_hira": false,
                "hira_config": null,
                "runtime_config": {"ephemeral_gpu_offload": true}
            }),
        ),
    ];
    for (name, keys) in cases {
        let dir = copy_fixture(&tmp.path().join(name));
        edit_config(&dir, |c| {
            for (k, v) in keys.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        let set = import_peft(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_same_factors(&set, &plain);
    }

    // VeLoRA and MonteCLoRA train with extra tensors but are lora_B(lora_A(x)) in eval; their
    // tensors, named and shaped as PEFT 0.21.2 saves them, are skipped.
    // (config key, its value, the tensors' names and lengths)
    let extras = [
        (
            "velora_config",
            json!({"init_type": "batch_average", "num_groups": 64, "scale": 1.0}),
            vec![("lora_velora_embed", 1)],
        ),
        (
            "monteclora_config",
            json!({"buffer_size": 150, "dirichlet_prior": 0.1, "kl_loss_weight": 1e-05,
                   "num_samples": 8, "sample_scaler": 0.0001, "use_entropy": false}),
            vec![
                ("lora_monteclora_sampler.expert_weights", 8),
                ("lora_monteclora_sampler.std_prior", 4),
            ],
        ),
    ];
    for (key, value, tensors) in extras {
        let dir = copy_fixture(&tmp.path().join(key));
        rewrite_weights(&dir, |t| {
            for (name, n) in &tensors {
                t.insert(
                    format!("{module}.{name}"),
                    Tensor::ones(*n, DType::F32, &Device::Cpu).unwrap(),
                );
            }
        });
        // Without the config the tensors are named for what they are.
        let err = import_err(&dir);
        assert!(
            err.contains(&format!("({key})")) && err.contains("not a LoRA factor"),
            "{err}"
        );
        edit_config(&dir, |c| c[key] = value);
        let set = import_peft(&dir).unwrap_or_else(|e| panic!("{key}: {e:#}"));
        assert_same_factors(&set, &plain);
    }
}

#[test]
fn factors_saved_with_their_adapter_name_say_how_to_save_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture(tmp.path());
    // model.state_dict() of a PeftModel: `….lora_A.default.weight`.
    rewrite_weights(&dir, |t| {
        *t = std::mem::take(t)
            .into_iter()
            .map(|(k, v)| (k.replace(".weight", ".default.weight"), v))
            .collect();
    });
    let err = import_err(&dir);
    assert!(
        err.contains("adapter name \"default\"") && err.contains("PeftModel.save_pretrained"),
        "{err}"
    );
}

/// An offline hub cache (`HF_HOME`) holding llava-tiny-hub as `acme/llava-tiny`, `main` and
/// the tag `v1` at one commit, as huggingface_hub lays it out; returns (HF_HOME, commit).
fn hub_cache_with_tiny_llava(root: &Path) -> (PathBuf, &'static str) {
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let home = root.join("hf");
    let repo = home.join("hub").join("models--acme--llava-tiny");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for entry in std::fs::read_dir(fixture("llava-tiny-hub")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    for r in ["main", "v1"] {
        std::fs::write(repo.join("refs").join(r), COMMIT).unwrap();
    }
    (home, COMMIT)
}

#[test]
fn a_hub_base_exports_as_peft_names_it_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, commit) = hub_cache_with_tiny_llava(tmp.path());
    let offline = |args: &[&str]| {
        let o = bella()
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(tmp.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // The base as PEFT writes it: the repo id, and the revision apart.
    let adapter = copy_fixture(&tmp.path().join("from-peft"));
    edit_config(&adapter, |c| {
        c["base_model_name_or_path"] = json!("acme/llava-tiny");
        c["revision"] = json!("v1");
    });
    offline(&[
        "import-peft",
        "-q",
        "--peft",
        "from-peft/adapter",
        "--out",
        "set",
    ]);
    offline(&[
        "export-peft",
        "-q",
        "--adapters",
        "set",
        "--out",
        "exported",
    ]);
    let exported = tmp.path().join("exported/particle-0");
    let config = read_json(&exported.join(ADAPTER_CONFIG_FILE));
    assert_eq!(config["base_model_name_or_path"], "acme/llava-tiny");
    assert_eq!(config["revision"], commit);
    offline(&[
        "import-peft",
        "-q",
        "--peft",
        "exported/particle-0",
        "--out",
        "again",
    ]);
    let again = ParticleSet::load(&tmp.path().join("again"), &Device::Cpu).unwrap();
    assert_eq!(
        again.config.base_model.source,
        format!("acme/llava-tiny@{commit}")
    );
    assert_eq!(again.config.base_model.commit.as_deref(), Some(commit));
    assert_same_factors(&again, &import_peft(&peft_fixture()).unwrap());

    // A `--model org/name@rev` is written the same way, and an export of an older bella-vqa
    // (`org/name@rev` in base_model_name_or_path) still imports.
    offline(&[
        "import-peft",
        "-q",
        "--peft",
        "from-peft/adapter",
        "--model",
        "acme/llava-tiny@v1",
        "--out",
        "pinned",
        "--force",
    ]);
    offline(&[
        "export-peft",
        "-q",
        "--adapters",
        "pinned",
        "--out",
        "exported-pinned",
    ]);
    let config = read_json(
        &tmp.path()
            .join("exported-pinned/particle-0")
            .join(ADAPTER_CONFIG_FILE),
    );
    assert_eq!(config["base_model_name_or_path"], "acme/llava-tiny");
    assert_eq!(config["revision"], commit);
    edit_config(&exported, |c| {
        c["base_model_name_or_path"] = json!("acme/llava-tiny@v1")
    });
    offline(&[
        "import-peft",
        "-q",
        "--peft",
        "exported/particle-0",
        "--out",
        "old",
        "--force",
    ]);
}

#[test]
fn particles_trained_on_a_hub_branch_load_its_commit_after_the_branch_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, commit) = hub_cache_with_tiny_llava(tmp.path());
    let repo = home.join("hub").join("models--acme--llava-tiny");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(fixture("images/square.png"), images.join("square.png")).unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::write(
        &data,
        json!({"question_id": "q1", "image": "images/square.png",
               "question": "What color is the circle?", "answers": ["red"]})
        .to_string(),
    )
    .unwrap();
    let run = |args: &[&str]| {
        bella()
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(tmp.path())
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "train",
        "-q",
        "--model",
        "acme/llava-tiny",
        "--data",
        "train.jsonl",
        "--out",
        "set",
        "--particles",
        "2",
        "--rank",
        "2",
        "--max-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ask = || {
        run(&[
            "ask",
            "-q",
            "--json",
            "--adapters",
            "set",
            "--image",
            "images/square.png",
            "What color is the circle?",
        ])
    };
    let before = ask();
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );

    // `main` moves on to other weights (the v5 copy): the particles still load the commit they
    // were trained on, as a pinned revision does in transformers, and answer as before.
    const NEWER: &str = "fedcba9876543210fedcba9876543210fedcba98";
    let newer = repo.join("snapshots").join(NEWER);
    std::fs::create_dir_all(&newer).unwrap();
    for entry in std::fs::read_dir(fixture("llava-tiny-v5")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, newer.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(repo.join("refs").join("main"), NEWER).unwrap();
    let after = ask();
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert_eq!(before.stdout, after.stdout);
    // A benchmark of them records the commit its files came from.
    let o = run(&[
        "bench",
        "-q",
        "--adapters",
        "set",
        "--data",
        "train.jsonl",
        "--out",
        "bench",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = read_json(&tmp.path().join("bench/bench_config.json"));
    assert_eq!(config["model"]["commit"], commit, "{config}");

    // Served, the model is named by its hub id alone (as vLLM names it), not `id@commit`.
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(tmp.path())
        .args(["serve", "--port", "0", "--adapters", "set"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let url = std::io::BufRead::lines(stderr)
        .map_while(Result::ok)
        .find_map(|line| Some(line.strip_prefix("listening on ")?.to_string()));
    let models = url.map(|url| {
        ureq::get(&format!("{url}/v1/models"))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
    });
    server.kill().unwrap();
    server.wait().unwrap();
    let models: serde_json::Value = serde_json::from_str(&models.unwrap().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "acme/llava-tiny", "{models}");

    // Put onto `main` on purpose, they are refused with the base to pass.
    let o = run(&[
        "ask",
        "-q",
        "--model",
        "acme/llava-tiny",
        "--adapters",
        "set",
        "--image",
        "images/square.png",
        "What color is the circle?",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains(&format!("--model acme/llava-tiny@{commit}")),
        "{stderr}"
    );
}

#[test]
fn a_hub_adapter_id_is_read_from_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, commit) = hub_cache_with_tiny_llava(tmp.path());
    let repo = home.join("hub").join("models--acme--llava-lora");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        std::fs::copy(peft_fixture().join(f), snapshot.join(f)).unwrap();
    }
    let import = |peft: &str, out: &str| {
        bella()
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(tmp.path())
            .args(["import-peft", "-q", "--peft", peft, "--out", out, "--model"])
            .arg(fixture("llava-tiny-hub"))
            .output()
            .unwrap()
    };
    let o = import("acme/llava-lora", "set");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = ParticleSet::load(&tmp.path().join("set"), &Device::Cpu).unwrap();
    assert_same_factors(&set, &import_peft(&peft_fixture()).unwrap());

    let o = import("acme/other-lora@v2", "other");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && stderr.contains("acme/other-lora@v2 is not in the hub cache")
            && stderr.contains("hf download acme/other-lora --revision v2"),
        "{stderr}"
    );
}

/// Rewrites the exported adapter in `dir` as PEFT saves one made on a CLIP tower alone
/// (transformers 5's `CLIPVisionModel` has no `vision_model.` wrapper): `strip` is cut from
/// every module name.
fn as_tower_only_adapter(dir: &Path, strip: &str) {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let rest = k.strip_prefix("base_model.model.").unwrap();
            let rest = rest.strip_prefix(strip).unwrap();
            (format!("base_model.model.{rest}"), t)
        })
        .collect();
    assert!(renamed
        .keys()
        .all(|k| k.starts_with("base_model.model.encoder.layers.")));
    candle_core::safetensors::save(&renamed, &path).unwrap();
    // The config names the modules as the tower alone has them.
    edit_config(dir, |c| {
        let targets: Vec<String> = c["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().strip_prefix(strip).unwrap().to_string())
            .collect();
        c["target_modules"] = json!(targets);
    });
}

#[test]
fn an_adapter_made_on_a_clip_tower_alone_goes_onto_the_tower_it_fits() {
    let tmp = tempfile::tempdir().unwrap();
    // LLaVA: onto its vision tower, the same factors as the adapter with the tower's names.
    let mut m = llava();
    let spec = AdapterSpec {
        targets: vec!["vision_tower.*.q_proj".into()],
        rank: 2,
        alpha: 4.0,
        particles: 2,
    };
    attach(&mut m, &spec, InitB::Normal { std: 0.1 }, 7).unwrap();
    let set = ParticleSet::from_model(&m, config("tests/fixtures/llava-tiny-hub", 2, 4.0, 2));
    let dirs = export_peft(&set, &tmp.path().join("llava"), &[]).unwrap();
    for dir in &dirs {
        as_tower_only_adapter(dir, "model.vision_tower.");
    }
    let mut back = import_peft_stacked(&dirs).unwrap();
    bind_base(
        &mut back,
        &dir_files(&fixture("llava-tiny-hub")).unwrap(),
        "llava",
    )
    .unwrap();
    assert_eq!(back.config.architecture, "LLaVA");
    assert!(back.config.layers[0].starts_with("vision_tower.vision_model.encoder.layers."));
    assert_same_factors(&set, &back);
    back.attach_to(&mut llava()).unwrap();

    // CLIP: the vision tower has 3 layers, the text tower 2 (both 32 wide): an adapter on the
    // vision tower's last layer fits the vision tower only...
    let mut m = clip();
    let spec = AdapterSpec {
        targets: vec!["vision_model.*.q_proj".into()],
        rank: 2,
        alpha: 4.0,
        particles: 1,
    };
    attach(&mut m, &spec, InitB::Normal { std: 0.1 }, 8).unwrap();
    let mut cfg = config("tests/fixtures/clip-tiny", 2, 4.0, 1);
    cfg.architecture = "CLIP".into();
    let set = ParticleSet::from_model(&m, cfg);
    let dirs = export_peft(&set, &tmp.path().join("clip"), &[]).unwrap();
    as_tower_only_adapter(&dirs[0], "vision_model.");
    let clip_files = dir_files(&fixture("clip-tiny")).unwrap();
    let mut back = import_peft_stacked(&dirs).unwrap();
    bind_base(&mut back, &clip_files, "clip").unwrap();
    assert_eq!(back.config.architecture, "CLIP");
    assert_same_factors(&set, &back);

    // ...one on its first layer fits both towers: which one it was is not guessed.
    let mut m = clip();
    let spec = AdapterSpec {
        targets: vec!["vision_model.encoder.layers.0.self_attn.q_proj".into()],
        ..spec
    };
    attach(&mut m, &spec, InitB::Normal { std: 0.1 }, 9).unwrap();
    let mut cfg = config("tests/fixtures/clip-tiny", 2, 4.0, 1);
    cfg.architecture = "CLIP".into();
    let set = ParticleSet::from_model(&m, cfg);
    let dirs = export_peft(&set, &tmp.path().join("clip-first"), &[]).unwrap();
    as_tower_only_adapter(&dirs[0], "vision_model.");
    let mut back = import_peft_stacked(&dirs).unwrap();
    let err = bind_base(&mut back, &clip_files, "clip").unwrap_err();
    assert!(
        format!("{err:#}").contains("both towers")
            && format!("{err:#}").contains("prefix its keys"),
        "{err:#}"
    );
}
