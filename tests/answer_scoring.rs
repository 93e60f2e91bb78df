//! Batched candidate scoring equals log-likelihoods read off full teacher-forced passes of each
//! particle's merged model.

mod common;

use bella_vqa::answer::score::score_candidates;
use bella_vqa::bella::{attach, merged_particle, AdapterSpec, InitB};
use bella_vqa::models::llava::{LlavaInput, LlavaModel};
use bella_vqa::models::Model;
use candle_core::{IndexOp, D};
use common::*;

/// Where the particles start above the first decoder layer, the candidates run once through the
/// layers below them and fork there (the cache's first layer holds the one shared row); where
/// they start at the bottom, every particle row runs them. Both equal full passes.
#[test]
fn batched_scores_equal_full_passes_per_particle() {
    let top: &[&str] = &["language_model.model.layers.1.*", "lm_head"];
    let last = &["language_model.model.layers.2.self_attn.*"];
    let everywhere = &["q_proj", "v_proj"];
    for (targets, bottom_rows) in [(top, 1), (last, 1), (everywhere, 3)] {
        check_scores(targets, bottom_rows);
    }
}

fn check_scores(targets: &[&str], bottom_rows: usize) {
    let mut m = match load_model("llava-tiny-hub").model {
        Model::Llava(m) => *m,
        _ => panic!(),
    };
    attach(
        &mut m,
        &AdapterSpec {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            rank: 4,
            alpha: 8.0,
            particles: 3,
        },
        InitB::Normal { std: 0.2 },
        21,
    )
    .unwrap();
    let image = reference_prompt("image");
    let input = image.input();
    let candidates = vec![vec![56, 2], vec![300, 301, 302, 2], vec![7], vec![99, 2]];
    let prefill = m.prefill(&input, 3).unwrap();
    assert_eq!(
        prefill.cache.bottom_rows().unwrap(),
        bottom_rows,
        "{targets:?}"
    );
    let scores = score_candidates(&m.language_model, &prefill, &candidates, 3).unwrap();
    assert_eq!(scores.len(), 3);

    let prompt = ids(&image.ids)[0].clone();
    for (p, particle_scores) in scores.iter().enumerate() {
        let merged: LlavaModel = merged_particle(&m, p).unwrap();
        for (k, cand) in candidates.iter().enumerate() {
            let mut seq = prompt.clone();
            seq.extend(cand);
            let t = ids_tensor(&[seq.clone()]);
            let keep = vec![vec![true; seq.len()]];
            let input = LlavaInput {
                input_ids: &t,
                pixel_values: image.pixels.as_ref(),
                keep: &keep,
                expanded: false,
            };
            let mut cache = merged.language_model.new_cache();
            let logits = merged.forward(&input, &mut cache, 1, false).unwrap().logits;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let expected: f64 = cand
                .iter()
                .enumerate()
                .map(|(j, &tok)| {
                    let pos = prompt.len() - 1 + j;
                    logp.i((0, pos, tok as usize))
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                })
                .sum();
            let got = particle_scores[k];
            assert!(
                (got - expected).abs() < 1e-3,
                "{targets:?}: particle {p} candidate {k}: {got} vs {expected}"
            );
        }
    }
    assert!(
        (scores[0][1] - scores[1][1]).abs() > 1e-3,
        "particles score differently"
    );
}

/// Decoding records each row's log-likelihood of what it produced (its tokens, then the end
/// token it stopped at), which `ask` uses instead of scoring when every particle decoded the
/// one candidate: it equals scoring that sequence teacher-forced, for diverging particles on
/// every layer and for agreeing ones on the last layer (the shared decoding step).
#[test]
fn decoded_log_likelihoods_equal_scoring_the_decoded_sequences() {
    use bella_vqa::answer::generate::{generate, GenerateOptions, Sampling};
    let everywhere: &[&str] = &["q_proj", "v_proj"];
    let last: &[&str] = &["language_model.model.layers.2.self_attn.*"];
    for (targets, std) in [(everywhere, 0.3), (last, 1e-3)] {
        let mut m = match load_model("llava-tiny-hub").model {
            Model::Llava(m) => *m,
            _ => panic!(),
        };
        let spec = AdapterSpec {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            rank: 4,
            alpha: 8.0,
            particles: 3,
        };
        attach(&mut m, &spec, InitB::Normal { std }, 29).unwrap();
        let image = reference_prompt("image");
        let input = image.input();
        let prefill = m.prefill(&input, 3).unwrap();
        let decode = |eos: Vec<u32>| {
            let opts = GenerateOptions {
                max_new_tokens: 6,
                eos,
                sampling: Sampling::Greedy,
            };
            generate(&m.language_model, &prefill, 3, &opts).unwrap()
        };
        // The third token particle 0 picks, made an end token: that row stops there and its
        // log-likelihood includes it.
        let free = decode(vec![])[0].tokens.clone();
        let end = free[2];
        let stop = free.iter().position(|&t| t == end).unwrap_or(2) + 1;
        let generated = decode(vec![end]);
        assert_eq!(generated[0].end, Some(end), "{targets:?}");
        assert_eq!(generated[0].sequence(), free[..stop].to_vec());
        let sequences: Vec<Vec<u32>> = generated.iter().map(|g| g.sequence()).collect();
        let scores = score_candidates(&m.language_model, &prefill, &sequences, 3).unwrap();
        for (r, g) in generated.iter().enumerate() {
            let (got, want) = (g.log_likelihood, scores[r][r]);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{targets:?}: row {r} ({:?}): decoded {got}, scored {want}",
                g.sequence()
            );
        }
    }
}
