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
