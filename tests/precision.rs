//! Half precision (issue 10 §1): the fixtures computed in bf16 and f16 against transformers' f32
//! outputs, with stated tolerances; the frozen weights stay in the compute dtype while particles
//! stay f32; answering and a training step work over a half-precision base.

mod common;

use bella_vqa::bella::ParticleModel;
use bella_vqa::models::Model;
use candle_core::DType;
use common::*;

/// bf16 keeps 8 bits of mantissa (relative step 2⁻⁸ ≈ 0.4 %), f16 11 bits (≈ 0.05 %); through a
/// few layers the errors add up to a few steps.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 0.03,
        DType::F16 => 0.005,
        _ => 1e-5,
    }
}

fn llava(dtype: DType) -> bella_vqa::models::llava::LlavaModel {
    match load_model_in("llava-tiny-hub", dtype).model {
        Model::Llava(m) => *m,
        _ => panic!("not a LLaVA"),
    }
}

#[test]
fn llava_in_half_precision_matches_transformers_within_tolerance() {
    let r = reference("llava");
    for dtype in [DType::BF16, DType::F16] {
        let m = llava(dtype);
        for prefix in ["image", "text"] {
            let p = reference_prompt(prefix);
            let mut cache = m.language_model.new_cache();
            let out = m.forward(&p.input(), &mut cache, 1, false).unwrap();
            assert_eq!(out.logits.dtype(), dtype);
            let err = relative_diff(&out.logits, get(&r, &format!("{prefix}.logits")));
            eprintln!("{dtype:?} {prefix}: relative error {err}");
            assert!(
                err <= tolerance(dtype),
                "{dtype:?} {prefix}: relative error {err}"
            );
        }
    }
}

#[test]
fn greedy_tokens_in_half_precision_equal_transformers() {
    for dtype in [DType::BF16, DType::F16] {
        assert_greedy_tokens_equal_transformers(&llava(dtype), &format!("{dtype:?}"));
    }
}

#[test]
fn clip_in_half_precision_matches_transformers_within_tolerance() {
    let r = reference("clip");
    let input_ids = get(&r, "text.input_ids").to_dtype(DType::U32).unwrap();
    let mask = ids_tensor(&ids(get(&r, "text.attention_mask")));
    for dtype in [DType::BF16, DType::F16] {
        let Model::Clip(m) = load_model_in("clip-tiny", dtype).model else {
            panic!("not a CLIP")
        };
        let logits = m
            .logits_per_image(get(&r, "vision.pixel_values"), &input_ids, Some(&mask))
            .unwrap();
        let err = relative_diff(&logits, get(&r, "logits_per_image"));
        assert!(err <= tolerance(dtype), "{dtype:?}: relative error {err}");
    }
}

#[test]
fn frozen_weights_stay_in_the_compute_dtype_and_particles_in_f32() {
    use bella_vqa::bella::{attach, AdapterSpec, InitB};
    let loaded = load_model_in("llava-tiny-hub", DType::BF16);
    assert_eq!(loaded.info.compute_dtype, DType::BF16);
    let Model::Llava(mut m) = loaded.model else {
        panic!()
    };
    let spec = AdapterSpec {
        targets: vec!["language_model.*.q_proj".into()],
        rank: 2,
        alpha: 4.0,
        particles: 3,
    };
    attach(m.as_mut(), &spec, InitB::Normal { std: 0.05 }, 1).unwrap();
    for (name, layer) in m.linears() {
        assert_eq!(layer.dtype(), DType::BF16, "{name}");
        if let Some(ad) = layer.adapter() {
            assert_eq!(
                (ad.a.dtype(), ad.b.dtype()),
                (DType::F32, DType::F32),
                "{name}"
            );
        }
    }
    // Three particles decode over the bf16 base (f32 low-rank products on bf16 activations).
    let p = reference_prompt("image");
    let tokens = greedy(&m, &p.input(), 3, 4);
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| t.len() == 4), "{tokens:?}");
}

#[test]
fn training_over_a_half_precision_base_lowers_the_loss_with_f32_particles() {
    use bella_vqa::bella::particles::ParticleSet;
    let mut loaded = load_model_in("llava-tiny-hub", DType::BF16);
    let out =
        train_briefly_and_check_the_loss_falls(&mut loaded, bella_vqa::train::Method::Svgd, 2);
    let set = ParticleSet::load(out.path(), &candle_core::Device::Cpu).unwrap();
    for (name, ad) in &set.adapters {
        assert_eq!(ad.a.dtype(), DType::F32, "{name}");
    }
}

fn bella() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
}

/// The demo's answer to its README question with extra `ask` options (`--dtype bf16`, …), with
/// its own cache directory (quantized weights are cached there).
fn demo_answer(options: &[&str]) -> serde_json::Value {
    let image = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/red-circle.png");
    let cache = tempfile::tempdir().unwrap();
    let out = bella()
        .args(["ask", "--quiet", "--json"])
        .args(options)
        .arg("--image")
        .arg(&image)
        .arg("What color is the circle?")
        .env("BELLA_VQA_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{options:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_demo_answers_alike_in_every_dtype() {
    let f32 = demo_answer(&["--dtype", "f32"]);
    // Names are taken in any case, as --device's are.
    for dtype in ["bf16", "F16"] {
        let half = demo_answer(&["--dtype", dtype]);
        assert_eq!(half["answer"], f32["answer"], "{dtype}");
        let (a, b) = (
            half["confidence"].as_f64().unwrap(),
            f32["confidence"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 0.05,
            "{dtype}: confidence {a} vs {b} in f32"
        );
    }
}

#[test]
fn a_gpu_in_a_cpu_build_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = bella()
        .args(["inspect", "--quiet", "--device", "cuda:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--features cuda") && err.contains("--device cpu"),
        "{err}"
    );
    let out = bella()
        .args(["inspect", "--quiet", "--device", "tpu"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpu, cuda or cuda:N"));
}

#[test]
fn a_quantized_base_runs_under_half_precision_activations() {
    let quantized = demo_answer(&["--dtype", "bf16", "--quantize", "q8_0"]);
    assert_eq!(
        quantized["answer"],
        demo_answer(&["--dtype", "f32"])["answer"]
    );
}
