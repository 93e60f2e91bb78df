//! CLIP against transformers: every stage of both towers, projections and logits.

mod common;

use bella_vqa::models::Model;
use common::*;

fn clip() -> bella_vqa::models::clip::ClipModel {
    match load_model("clip-tiny").model {
        Model::Clip(m) => *m,
        _ => panic!("clip-tiny is not a CLIP model"),
    }
}

#[test]
fn text_tower_matches_transformers_at_every_stage() {
    let m = clip();
    let r = reference("clip");
    let input_ids = get(&r, "text.input_ids")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let mask_rows = ids(get(&r, "text.attention_mask"));
    let mask = ids_tensor(&mask_rows);
    let out = m.text_model.forward(&input_ids, Some(&mask), 1).unwrap();
    assert_close_masked(
        "text.embeddings",
        &out.embeddings,
        get(&r, "text.embeddings"),
        &mask_rows,
    );
    assert_eq!(out.hidden_states.len(), 3);
    for (i, h) in out.hidden_states.iter().enumerate() {
        let key = format!("text.hidden_states.{i}");
        assert_close_masked(&key, h, get(&r, &key), &mask_rows);
    }
    assert_close_masked(
        "text.last_hidden_state",
        &out.last_hidden_state,
        get(&r, "text.last_hidden_state"),
        &mask_rows,
    );
    assert_close("text.pooled", &out.pooled, get(&r, "text.pooled"));
    let embeds = m.text_embeds(&input_ids, Some(&mask), 1).unwrap();
    assert_close("text.embeds", &embeds, get(&r, "text.embeds"));
}

#[test]
fn vision_tower_matches_transformers_at_every_stage() {
    let m = clip();
    let r = reference("clip");
    let pixels = get(&r, "vision.pixel_values");
    let out = m.vision_model.forward(pixels, 1).unwrap();
    assert_close(
        "vision.embeddings",
        &out.embeddings,
        get(&r, "vision.embeddings"),
    );
    assert_eq!(out.hidden_states.len(), 4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        let key = format!("vision.hidden_states.{i}");
        assert_close(&key, h, get(&r, &key));
    }
    assert_close(
        "vision.last_hidden_state",
        &out.last_hidden_state,
        get(&r, "vision.last_hidden_state"),
    );
    assert_close("vision.pooled", &out.pooled, get(&r, "vision.pooled"));
    let embeds = m.image_embeds(pixels, 1).unwrap();
    assert_close("vision.embeds", &embeds, get(&r, "vision.embeds"));
}

#[test]
fn logits_per_image_match_transformers() {
    let m = clip();
    let r = reference("clip");
    let input_ids = get(&r, "text.input_ids")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let mask = ids_tensor(&ids(get(&r, "text.attention_mask")));
    let logits = m
        .logits_per_image(get(&r, "vision.pixel_values"), &input_ids, Some(&mask))
        .unwrap();
    assert_close("logits_per_image", &logits, get(&r, "logits_per_image"));
    let scale = m.logit_scale().to_scalar::<f32>().unwrap();
    assert!((scale - 2.3).abs() < 1e-6, "logit_scale read as {scale}");
}

/// An `image_size` that is not a multiple of `patch_size` (32 with patches of 6): transformers'
/// stride-6 convolution leaves out the last 2 rows and columns, so the tower sees what a 30-pixel
/// tower with the same weights sees of the top-left 30 × 30 (it failed with a shape error).
#[test]
fn an_image_size_past_whole_patches_is_cut_as_the_convolution_cuts_it() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("clip-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    for (file, edit) in [
        ("config.json", "/vision_config/image_size"),
        ("preprocessor_config.json", "/crop_size/height"),
        ("preprocessor_config.json", "/crop_size/width"),
        ("preprocessor_config.json", "/size/shortest_edge"),
    ] {
        let path = dir.path().join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        *v.pointer_mut(edit).unwrap() = 32.into();
        std::fs::write(&path, v.to_string()).unwrap();
    }
    let files = dir_files(dir.path()).unwrap();
    let Model::Clip(wide) =
        bella_vqa::models::load(&files, &candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap()
            .model
    else {
        panic!("a CLIP")
    };
    let pixels =
        candle_core::Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
    let cut = pixels.narrow(2, 0, 30).unwrap().narrow(3, 0, 30).unwrap();
    let expected = clip().image_embeds(&cut, 1).unwrap();
    let got = wide.image_embeds(&pixels, 1).unwrap();
    assert_eq!(got.dims(), expected.dims());
    assert!(max_abs_diff(&got, &expected) < 1e-6);
}
