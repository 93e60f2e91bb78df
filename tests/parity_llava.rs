//! LLaVA against transformers: vision features, merged embeddings, every decoder layer, logits,
//! greedy tokens; hub (sharded, sparse config) and transformers-5 layouts.

mod common;

use bella_vqa::models::llava::LlavaModel;
use bella_vqa::models::Model;
use common::*;

fn llava(name: &str) -> LlavaModel {
    match load_model(name).model {
        Model::Llava(m) => *m,
        _ => panic!("{name} is not a LLaVA model"),
    }
}

fn check_image_prompt(m: &LlavaModel) {
    let r = reference("llava");
    let p = reference_prompt("image");
    let input = p.input();
    let mut cache = m.language_model.new_cache();
    let out = m.forward(&input, &mut cache, 1, true).unwrap();
    assert_close(
        "image.image_features",
        out.image_features.as_ref().unwrap(),
        get(&r, "image.image_features"),
    );
    assert_close(
        "image.inputs_embeds",
        &out.inputs_embeds,
        get(&r, "image.inputs_embeds"),
    );
    assert_eq!(out.decoder.layer_outputs.len(), 3);
    for (i, h) in out.decoder.layer_outputs.iter().enumerate() {
        let key = format!("image.layer_outputs.{i}");
        assert_close(&key, h, get(&r, &key));
    }
    assert_close(
        "image.last_hidden_state",
        &out.decoder.last_hidden_state,
        get(&r, "image.last_hidden_state"),
    );
    assert_close("image.logits", &out.logits, get(&r, "image.logits"));
}

#[test]
fn hub_layout_image_prompt_matches_transformers() {
    check_image_prompt(&llava("llava-tiny-hub"));
}

#[test]
fn transformers5_layout_image_prompt_matches_transformers() {
    check_image_prompt(&llava("llava-tiny-v5"));
}

#[test]
fn vision_tower_hidden_states_match_transformers() {
    let m = llava("llava-tiny-hub");
    let r = reference("llava");
    let out = m
        .vision_tower
        .hidden_states_at(get(&r, "image.pixel_values"), &[0, 1, 2], 1, false)
        .unwrap()
        .0;
    for i in 0..3 {
        let key = format!("image.vision_hidden_states.{i}");
        let part = out.narrow(2, i * 32, 32).unwrap();
        assert_close(&key, &part, get(&r, &key));
    }
}

#[test]
fn text_only_prompt_logits_match_transformers() {
    let m = llava("llava-tiny-hub");
    let r = reference("llava");
    let p = reference_prompt("text");
    let input = p.input();
    let mut cache = m.language_model.new_cache();
    let out = m.forward(&input, &mut cache, 1, false).unwrap();
    assert_close("text.logits", &out.logits, get(&r, "text.logits"));
}

#[test]
fn left_padded_batch_logits_match_transformers() {
    let m = llava("llava-tiny-hub");
    let r = reference("llava");
    let mask = ids(get(&r, "batch.attention_mask"));
    assert!(mask[0].contains(&0), "the reference batch is left padded");
    let p = reference_prompt("batch");
    let input = p.input();
    let mut cache = m.language_model.new_cache();
    let out = m.forward(&input, &mut cache, 1, false).unwrap();
    assert_close_masked("batch.logits", &out.logits, get(&r, "batch.logits"), &mask);
}

#[test]
fn greedy_tokens_equal_transformers() {
    assert_greedy_tokens_equal_transformers(&llava("llava-tiny-hub"), "f32");
}
