//! Scoring candidate answers under every particle (design §5, step 3): teacher-forced sequence
//! log-likelihoods, all particles × all candidates in one batch that reuses the prompt's cache.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

use crate::models::llama::{LlamaModel, Prefill};

/// `loglik[row][k]` = log p(candidate k | prompt) under the particle of `row`, where each
/// candidate is a full token sequence (normally the answer tokens followed by an end token).
pub fn score_candidates(
    lm: &LlamaModel,
    prefill: &Prefill,
    candidates: &[Vec<u32>],
    particles: usize,
) -> Result<Vec<Vec<f64>>> {
    let k = candidates.len();
    if k == 0 || candidates.iter().any(Vec::is_empty) {
        bail!("every candidate answer needs at least one token");
    }
    let first = candidate_first_tokens(&prefill.last_logits, candidates)?; // [rows][k]
    let rows = first.len();
    let longest = candidates.iter().map(Vec::len).max().unwrap_or(1);
    if longest == 1 {
        return Ok(first);
    }
    // Feed tokens 0..len-1 of every candidate; position j predicts token j+1.
    let feed = longest - 1;
    let mut ids = Vec::with_capacity(rows * k * feed);
    let mut keep = Vec::with_capacity(rows * k);
    let mut targets = Vec::with_capacity(rows * k * feed);
    for _ in 0..rows {
        for cand in candidates {
            let mut kept = Vec::with_capacity(feed);
            for j in 0..feed {
                let real = j + 1 < cand.len();
                ids.push(if real { cand[j] } else { 0 });
                targets.push(if real { cand[j + 1] } else { 0 });
                kept.push(real);
            }
            keep.push(kept);
        }
    }
    let device = prefill.last_logits.device();
    let mut cache = prefill.cache.clone();
    cache.repeat_interleave(k)?;
    let ids = Tensor::from_vec(ids, (rows * k, feed), device)?;
    let embeds = lm.embed(&ids)?;
    let dec = lm.forward(
        &embeds,
        prefill.expanded,
        &keep,
        &mut cache,
        particles,
        false,
    )?;
    let (logits, _) = lm.logits(&dec.last_hidden_state, dec.expanded, particles)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (rows * k, feed, 1), device)?;
    let picked = logp
        .gather(&targets, D::Minus1)?
        .squeeze(D::Minus1)?
        .to_vec2::<f32>()?;
    let mut out = first;
    for (r, row) in out.iter_mut().enumerate() {
        for (c, cand) in candidates.iter().enumerate() {
            let steps = &picked[r * k + c];
            row[c] += steps[..cand.len() - 1]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
        }
    }
    Ok(out)
}

/// log p(first token of each candidate) from the prompt's next-token logits: `[rows][k]`.
fn candidate_first_tokens(last_logits: &Tensor, candidates: &[Vec<u32>]) -> Result<Vec<Vec<f64>>> {
    let logp = candle_nn::ops::log_softmax(&last_logits.to_dtype(DType::F32)?, D::Minus1)?
        .to_vec2::<f32>()?;
    Ok(logp
        .iter()
        .map(|row| {
            candidates
                .iter()
                .map(|c| row[c[0] as usize] as f64)
                .collect()
        })
        .collect())
}
