//! The particle axis: B = 0 is the base model, particle p of the stacked forward is the model with
//! merged weights, left padding and the KV cache change nothing, batched decoding equals P runs.

mod common;

use bella_vqa::bella::{attach, merged_particle, AdapterSpec, InitB, ParticleModel};
use bella_vqa::models::clip::ClipModel;
use bella_vqa::models::llama::Outputs;
use bella_vqa::models::llava::LlavaModel;
use bella_vqa::models::Model;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;

fn llava() -> LlavaModel {
    match load_model("llava-tiny-hub").model {
        Model::Llava(m) => *m,
        _ => panic!("not LLaVA"),
    }
}

fn spec(targets: &[&str], particles: usize) -> AdapterSpec {
    AdapterSpec {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rank: 4,
        alpha: 8.0,
        particles,
    }
}

/// Every linear layer of every part: vision tower, projector, decoder, lm_head.
const ALL: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "out_proj",
    "fc1",
    "fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
    "linear_1",
    "linear_2",
    "lm_head",
];

fn logits(m: &LlavaModel, p: &ReferencePrompt, particles: usize) -> Tensor {
    let input = p.input();
    let mut cache = m.language_model.new_cache();
    m.forward(&input, &mut cache, particles, false)
        .unwrap()
        .logits
}

#[test]
fn zero_b_particles_equal_the_base_model() {
    let base = llava();
    let mut m = base.clone();
    let adapted = attach(
        &mut m,
        &AdapterSpec {
            particles: 3,
            ..AdapterSpec::default_for_llava()
        },
        InitB::Zero,
        1,
    )
    .unwrap();
    assert_eq!(
        adapted.len(),
        4 * 3,
        "q, k, v, o of 3 decoder layers: {adapted:?}"
    );
    assert!(adapted
        .iter()
        .all(|n| n.starts_with("language_model.model.layers.")));
    assert_eq!(m.particles().unwrap(), 3);
    let p = reference_prompt("image");
    let expected = logits(&base, &p, 1);
    let stacked = logits(&m, &p, 3);
    assert_eq!(stacked.dim(0).unwrap(), 3);
    for i in 0..3 {
        assert_close(
            &format!("particle {i}"),
            &stacked.i(i..i + 1).unwrap(),
            &expected,
        );
    }
}

fn check_stacked_equals_merged(m: &LlavaModel, particles: usize, prefix: &str) {
    let p = reference_prompt(prefix);
    let batch = p.ids.dim(0).unwrap();
    let stacked = logits(m, &p, particles);
    assert_eq!(stacked.dim(0).unwrap(), particles * batch);
    let mut blocks = Vec::new();
    for i in 0..particles {
        let merged = merged_particle(m, i).unwrap();
        assert_eq!(merged.particles().unwrap(), 1);
        let single = logits(&merged, &p, 1);
        let block = stacked.i(i * batch..(i + 1) * batch).unwrap();
        let mask: Vec<Vec<u32>> = p
            .keep
            .iter()
            .map(|r| r.iter().map(|&k| k as u32).collect())
            .collect();
        assert_close_masked(&format!("{prefix}: particle {i}"), &block, &single, &mask);
        blocks.push(block);
    }
    // The particles really differ, so the comparison above means something.
    assert!(max_abs_diff(&blocks[0], &blocks[1]) > 1e-2);
}

#[test]
fn every_particle_equals_its_merged_model_with_adapters_everywhere() {
    let mut m = llava();
    let adapted = attach(&mut m, &spec(ALL, 3), InitB::Normal { std: 0.1 }, 7).unwrap();
    assert_eq!(
        adapted.len() + m.inert_linears().len(),
        m.linears().len(),
        "every linear layer the model runs carries particles"
    );
    check_stacked_equals_merged(&m, 3, "image");
    check_stacked_equals_merged(&m, 3, "batch");
}

#[test]
fn particles_from_a_middle_decoder_layer_equal_merged_models() {
    // Layers 0-1 run once for all particles, the expansion happens at layer 2.
    let mut m = llava();
    attach(
        &mut m,
        &spec(&["language_model.model.layers.2.*"], 2),
        InitB::Normal { std: 0.2 },
        3,
    )
    .unwrap();
    check_stacked_equals_merged(&m, 2, "batch");
    check_stacked_equals_merged(&m, 2, "text");
}

/// The rows fork inside the first layer with particles, whichever of its projections carry
/// them: its projections of the shared input run their base product once.
#[test]
fn a_fork_layer_with_particles_on_some_projections_equals_merged_models() {
    for targets in [
        &["language_model.model.layers.1.self_attn.v_proj"][..],
        &["language_model.model.layers.1.mlp.*"][..],
        &[
            "language_model.model.layers.2.self_attn.q_proj",
            "language_model.model.layers.2.self_attn.o_proj",
        ][..],
    ] {
        let mut m = llava();
        attach(&mut m, &spec(targets, 3), InitB::Normal { std: 0.3 }, 5).unwrap();
        check_stacked_equals_merged(&m, 3, "batch");
        check_stacked_equals_merged(&m, 3, "image");
    }
}

#[test]
fn clip_particles_equal_merged_models() {
    let base = match load_model("clip-tiny").model {
        Model::Clip(m) => *m,
        _ => panic!("not CLIP"),
    };
    let mut m: ClipModel = base.clone();
    attach(
        &mut m,
        &spec(
            &[
                "q_proj",
                "v_proj",
                "fc2",
                "visual_projection",
                "text_projection",
            ],
            2,
        ),
        InitB::Normal { std: 0.1 },
        5,
    )
    .unwrap();
    let r = reference("clip");
    let pixels = get(&r, "vision.pixel_values");
    let input_ids = get(&r, "text.input_ids").to_dtype(DType::U32).unwrap();
    let mask = ids_tensor(&ids(get(&r, "text.attention_mask")));
    let img = m.image_embeds(pixels, 2).unwrap();
    let txt = m.text_embeds(&input_ids, Some(&mask), 2).unwrap();
    for i in 0..2 {
        let merged = merged_particle(&m, i).unwrap();
        assert_close(
            "image",
            &img.i(i * 2..i * 2 + 2).unwrap(),
            &merged.image_embeds(pixels, 1).unwrap(),
        );
        assert_close(
            "text",
            &txt.i(i * 2..i * 2 + 2).unwrap(),
            &merged.text_embeds(&input_ids, Some(&mask), 1).unwrap(),
        );
    }
    assert!(max_abs_diff(&img.i(0..2).unwrap(), &img.i(2..4).unwrap()) > 1e-3);
}

#[test]
fn left_padded_rows_equal_each_row_alone() {
    let mut m = llava();
    attach(
        &mut m,
        &spec(&["q_proj", "v_proj", "down_proj"], 2),
        InitB::Normal { std: 0.1 },
        11,
    )
    .unwrap();
    let p = reference_prompt("batch");
    let batched = logits(&m, &p, 2);
    let ids_rows = ids(&p.ids);
    let pixels = p.pixels.as_ref().unwrap();
    for (row, id_row) in ids_rows.iter().enumerate() {
        let real: Vec<u32> = id_row
            .iter()
            .zip(&p.keep[row])
            .filter(|(_, &k)| k)
            .map(|(&t, _)| t)
            .collect();
        let pad = id_row.len() - real.len();
        let alone = ReferencePrompt {
            ids: ids_tensor(std::slice::from_ref(&real)),
            pixels: Some(pixels.i(row..row + 1).unwrap()),
            keep: vec![vec![true; real.len()]],
        };
        let single = logits(&m, &alone, 2); // [2 particles, len, vocab]
        for particle in 0..2 {
            let padded_row = batched.i(particle * 2 + row).unwrap().i(pad..).unwrap();
            assert_close(
                &format!("row {row} particle {particle}"),
                &padded_row,
                &single.i(particle).unwrap(),
            );
        }
    }
}

#[test]
fn cached_decoding_equals_a_full_pass() {
    let mut m = llava();
    attach(
        &mut m,
        &spec(&["language_model.model.layers.1.*", "lm_head"], 2),
        InitB::Normal { std: 0.2 },
        13,
    )
    .unwrap();
    let p = reference_prompt("batch");
    let input = p.input();
    // Prefill, then feed two different tokens per particle-row one at a time.
    let mut cache = m.language_model.new_cache();
    let first = m.forward(&input, &mut cache, 2, false).unwrap();
    assert!(first.decoder.expanded);
    let steps: [Vec<u32>; 2] = [vec![10, 20, 30, 40], vec![50, 60, 70, 80]];
    let mut step_logits = Vec::new();
    for s in &steps {
        let ids = Tensor::from_vec(s.clone(), (4, 1), &candle_core::Device::Cpu).unwrap();
        let embeds = m.language_model.embed(&ids).unwrap();
        let out = m
            .language_model
            .forward(
                &embeds,
                true,
                &vec![vec![true]; 4],
                &mut cache,
                2,
                Outputs::All,
            )
            .unwrap();
        step_logits.push(
            m.language_model
                .logits(&out.last_hidden_state, out.expanded, 2)
                .map(|(l, _)| l)
                .unwrap(),
        );
    }
    // The same sequences in one pass, per particle with its merged model.
    let ids_rows = ids(&p.ids);
    for particle in 0..2 {
        let merged = merged_particle(&m, particle).unwrap();
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|r| {
                let mut row = ids_rows[r].clone();
                row.push(steps[0][particle * 2 + r]);
                row.push(steps[1][particle * 2 + r]);
                row
            })
            .collect();
        let keep: Vec<Vec<bool>> = p
            .keep
            .iter()
            .map(|k| {
                let mut k = k.clone();
                k.extend([true, true]);
                k
            })
            .collect();
        let full = ReferencePrompt {
            ids: ids_tensor(&rows),
            pixels: p.pixels.clone(),
            keep,
        };
        let full_logits = logits(&merged, &full, 1);
        let len = rows[0].len();
        for (s, step) in step_logits.iter().enumerate() {
            let expected = full_logits.i((.., len - 2 + s, ..)).unwrap();
            let actual = step
                .i(particle * 2..particle * 2 + 2)
                .unwrap()
                .squeeze(1)
                .unwrap();
            assert_close(&format!("step {s} particle {particle}"), &actual, &expected);
        }
    }
}

/// A prompt before decoding (and a training window at its end) runs the queries, attention and
/// MLP of the last decoder layer for the positions read only, the keys and values for all: the
/// logits and the cache equal a full pass, also where that layer is the one the rows fork in.
#[test]
fn the_last_layer_runs_only_the_positions_that_are_read() {
    let last_layer_only = &["language_model.model.layers.2.self_attn.*"][..];
    for targets in [last_layer_only, &["q_proj", "v_proj", "down_proj"][..]] {
        let mut m = llava();
        attach(&mut m, &spec(targets, 3), InitB::Normal { std: 0.3 }, 19).unwrap();
        for prompt in ["batch", "image"] {
            let p = reference_prompt(prompt);
            let input = p.input();
            let full = logits(&m, &p, 3);
            let (rows, len, _) = full.dims3().unwrap();
            let what = format!("{targets:?} {prompt}");
            let prefill = m.prefill(&input, 3).unwrap();
            assert_eq!(prefill.last_logits.dims2().unwrap().0, rows);
            let last = full.i((.., len - 1, ..)).unwrap();
            assert_close(&format!("{what}: prefill"), &prefill.last_logits, &last);
            let window = m.forward_window(&input, 3, len - 3, 2).unwrap();
            let expected = full.narrow(1, len - 3, 2).unwrap();
            assert_close(&format!("{what}: window"), &window, &expected);
            // The cache holds every position: a step after the prefill equals a full pass over
            // the prompt and that token — a token per particle row, or one shared by the
            // particles (fed once below the first layer with particles where it can be).
            let batch = rows / 3;
            let ids_rows = ids(&p.ids);
            let lm = &m.language_model;
            for shared in [false, true] {
                let step: Vec<u32> = (0..rows)
                    .map(|r| 7 + 5 * if shared { r % batch } else { r } as u32)
                    .collect();
                let fed = if shared { batch } else { rows };
                let step_ids =
                    Tensor::from_vec(step[..fed].to_vec(), (fed, 1), &Device::Cpu).unwrap();
                let mut cache = prefill.cache.clone();
                let embeds = lm.embed(&step_ids).unwrap();
                let keep = vec![vec![true]; fed];
                let out = lm
                    .forward(&embeds, !shared, &keep, &mut cache, 3, Outputs::All)
                    .unwrap();
                let (after, _) = lm.logits(&out.last_hidden_state, out.expanded, 3).unwrap();
                assert_eq!(after.dim(0).unwrap(), rows);
                for particle in 0..3 {
                    let merged = merged_particle(&m, particle).unwrap();
                    let extended = ReferencePrompt {
                        ids: ids_tensor(
                            &(0..batch)
                                .map(|r| [&ids_rows[r][..], &[step[particle * batch + r]]].concat())
                                .collect::<Vec<_>>(),
                        ),
                        pixels: p.pixels.clone(),
                        keep: p.keep.iter().map(|k| [&k[..], &[true]].concat()).collect(),
                    };
                    let expected = logits(&merged, &extended, 1).i((.., len, ..)).unwrap();
                    let actual = after
                        .i(particle * batch..(particle + 1) * batch)
                        .unwrap()
                        .squeeze(1)
                        .unwrap();
                    let what = format!("{what}: step (shared {shared}), particle {particle}");
                    assert_close(&what, &actual, &expected);
                }
            }
        }
    }
}

/// The greedy tokens (8) of the two-row reference prompt with `particles` stacked, checked
/// against each particle's merged model.
fn stacked_greedy_equals_merged(m: &LlavaModel, particles: usize) -> Vec<Vec<u32>> {
    let prompt = reference_prompt("batch");
    let input = prompt.input();
    let stacked = greedy(m, &input, particles, 8);
    assert_eq!(stacked.len(), 2 * particles);
    for particle in 0..particles {
        let merged = merged_particle(m, particle).unwrap();
        let single = greedy(&merged, &input, 1, 8);
        assert_eq!(
            &stacked[particle * 2..particle * 2 + 2],
            &single[..],
            "particle {particle}"
        );
    }
    stacked
}

/// Particles on the last decoder layer only, close to the base: they agree on every token, so
/// each step runs the layers below them once per prompt row (the shared path of `generate`), and
/// every particle's tokens still equal its merged model's.
#[test]
fn agreeing_particles_decode_as_their_merged_models() {
    let mut m = llava();
    let targets = ["language_model.model.layers.2.self_attn.*"];
    attach(&mut m, &spec(&targets, 3), InitB::Normal { std: 1e-3 }, 23).unwrap();
    let stacked = stacked_greedy_equals_merged(&m, 3);
    for particle in 1..3 {
        assert_eq!(
            &stacked[particle * 2..particle * 2 + 2],
            &stacked[..2],
            "particles agree"
        );
    }
}

#[test]
fn batched_greedy_decoding_equals_separate_merged_runs() {
    let mut m = llava();
    attach(
        &mut m,
        &spec(&["language_model.*"], 3),
        InitB::Normal { std: 0.3 },
        17,
    )
    .unwrap();
    let stacked = stacked_greedy_equals_merged(&m, 3);
    assert_ne!(stacked[0], stacked[2], "particles decode differently");
}

#[test]
fn vision_layers_above_the_feature_layer_are_inert_and_left_out() {
    // vision_feature_layer −2 of 3 vision layers: hidden state 2 (the output of layer 1) is read,
    // layer 2 never runs.
    let base = llava();
    let inert = base.inert_linears();
    assert_eq!(inert.len(), 6, "{inert:?}");
    assert!(inert
        .iter()
        .all(|n| n.starts_with("vision_tower.vision_model.encoder.layers.2.")));
    // Particles forced onto them change nothing: inert indeed.
    let mut forced = base.clone();
    for (name, layer) in forced.linears_mut() {
        if inert.contains(&name) {
            let (out, inp) = layer.shape();
            let a = Tensor::ones((2, 4, inp), DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::ones((2, out, 4), DType::F32, &Device::Cpu).unwrap();
            layer
                .set_adapter(Some(bella_vqa::bella::Adapter::new(a, b, 2.0).unwrap()))
                .unwrap();
        }
    }
    let prompt = reference_prompt("image");
    let x = logits(&base, &prompt, 1);
    let y = logits(&forced, &prompt, 2);
    let rows = x.dim(0).unwrap();
    assert_eq!(max_abs_diff(&x, &y.i(0..rows).unwrap()), 0.0);
    // A set of only such particles (an imported adapter's) is refused where it is loaded; beside
    // particles that run, they load.
    let files = dir_files(&fixture("llava-tiny-hub")).unwrap();
    let set = |m: &LlavaModel| {
        bella_vqa::bella::particles::ParticleSet::from_model(m, tiny_llava_particle_config(&files))
    };
    let err = set(&forced)
        .attach_to(&mut base.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only layers the model never runs") && err.contains("layers.2."),
        "{err}"
    );
    let mut mixed = forced.clone();
    attach(
        &mut mixed,
        &spec(&["language_model.*.q_proj"], 2),
        InitB::Zero,
        1,
    )
    .unwrap();
    set(&mixed).attach_to(&mut base.clone()).unwrap();
    // attach leaves them out, and says so when nothing else is targeted.
    let mut m = base.clone();
    let adapted = attach(&mut m, &spec(&["vision_tower.*"], 2), InitB::Zero, 1).unwrap();
    assert!(adapted.iter().all(|n| !inert.contains(n)) && !adapted.is_empty());
    let mut m = base.clone();
    let err = attach(
        &mut m,
        &spec(&["vision_tower.*.layers.2.*"], 2),
        InitB::Zero,
        1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("never runs"), "{err}");
    // Beside a target that runs, the idle one is named with the reason, and the layers listed
    // as usable are those that run.
    let mut m = base.clone();
    let err = attach(
        &mut m,
        &spec(
            &[
                "vision_tower.*.layers.2.*.q_proj",
                "multi_modal_projector.linear_1",
            ],
            2,
        ),
        InitB::Zero,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("above vision_feature_layer")
            && err.contains("vision_tower.vision_model.encoder.layers.0-1")
            && !err.contains("encoder.layers.0-2"),
        "{err}"
    );
}
