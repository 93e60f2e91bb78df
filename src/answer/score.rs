//! Scoring candidate answers under every particle (design §5, step 3): teacher-forced sequence
//! log-likelihoods, all particles × all candidates in one pass that reads the prompt's cache in
//! place (the candidates are segments of one continuation, see `LlamaModel::forward_segments`).

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
    score_candidates_batch(
        lm,
        prefill,
        std::slice::from_ref(&candidates.to_vec()),
        particles,
    )
}

/// Scores the candidates of several questions at once: `candidates[q]` are question `q`'s, and
/// row `r` of the prefill (particle-major: `p·questions + q`) scores those of question
/// `r % questions`. Shorter lists are padded to the longest (the padding is scored and dropped),
/// so `loglik[r]` has exactly `candidates[r % questions].len()` entries.
pub fn score_candidates_batch(
    lm: &LlamaModel,
    prefill: &Prefill,
    candidates: &[Vec<Vec<u32>>],
    particles: usize,
) -> Result<Vec<Vec<f64>>> {
    let questions = candidates.len();
    if questions == 0 || candidates.iter().flatten().any(Vec::is_empty) {
        bail!("every candidate answer needs at least one token");
    }
    if candidates.iter().any(Vec::is_empty) {
        bail!("every question needs at least one candidate answer");
    }
    let rows = prefill.last_logits.dim(0)?;
    if rows % questions != 0 {
        bail!("{rows} prompt rows do not split into {questions} question(s)");
    }
    let k = candidates.iter().map(Vec::len).max().unwrap_or(1);
    // Row r's candidate list, padded with its first candidate to k entries.
    let row_candidates = |r: usize| {
        let own = &candidates[r % questions];
        (0..k).map(move |c| own.get(c).unwrap_or(&own[0]))
    };
    let first = candidate_first_tokens(&prefill.last_logits, rows, &row_candidates)?; // [rows][k]
    let longest = candidates.iter().flatten().map(Vec::len).max().unwrap_or(1);
    let truncate = |mut out: Vec<Vec<f64>>| {
        for (r, row) in out.iter_mut().enumerate() {
            row.truncate(candidates[r % questions].len());
        }
        out
    };
    if longest == 1 {
        return Ok(truncate(first));
    }
    // Feed tokens 0..len-1 of every candidate; position j predicts token j+1. A row's k
    // candidates are k segments of one sequence that all continue the prompt's cache, which is
    // read in place: never copied per candidate.
    let feed = longest - 1;
    // Every particle scores the same candidates, so they are fed once per row the cache's first
    // layer holds: the layers below the first one with particles run them once per question, and
    // the rows fork to the particles where the prompt forked (`LlamaModel::forward_segments`).
    let fed_rows = match prefill.cache.bottom_rows()? {
        n if n > 0 && n < rows && rows % n == 0 && n % questions == 0 => n,
        _ => rows,
    };
    let mut ids = Vec::with_capacity(fed_rows * k * feed);
    let mut keep = Vec::with_capacity(fed_rows);
    let mut targets = Vec::with_capacity(rows * k * feed);
    for r in 0..rows {
        let mut kept = Vec::with_capacity(k * feed);
        for cand in row_candidates(r) {
            for j in 0..feed {
                let real = j + 1 < cand.len();
                if r < fed_rows {
                    ids.push(if real { cand[j] } else { 0 });
                    kept.push(real);
                }
                targets.push(if real { cand[j + 1] } else { 0 });
            }
        }
        if r < fed_rows {
            keep.push(kept);
        }
    }
    let device = prefill.last_logits.device();
    let ids = Tensor::from_vec(ids, (fed_rows, k * feed), device)?;
    let embeds = lm.embed(&ids)?;
    let input_expanded = prefill.expanded && fed_rows == rows;
    let dec = lm.forward_segments(&embeds, input_expanded, &keep, k, &prefill.cache, particles)?;
    let (logits, _) = lm.logits(&dec.last_hidden_state, dec.expanded, particles)?;
    if logits.dim(0)? != rows {
        bail!(
            "candidate scoring produced {} rows for {rows} prompt rows",
            logits.dim(0)?
        );
    }
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (rows, k * feed, 1), device)?;
    let picked = logp
        .gather(&targets, D::Minus1)?
        .squeeze(D::Minus1)?
        .to_vec2::<f32>()?;
    let mut out = first;
    for (r, row) in out.iter_mut().enumerate() {
        for (c, cand) in row_candidates(r).enumerate() {
            let steps = &picked[r][c * feed..(c + 1) * feed];
            row[c] += steps[..cand.len() - 1]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
        }
    }
    Ok(truncate(out))
}

/// log p(first token of each candidate) from the prompt's next-token logits: `[rows][k]`.
fn candidate_first_tokens<'a, I>(
    last_logits: &Tensor,
    rows: usize,
    row_candidates: &impl Fn(usize) -> I,
) -> Result<Vec<Vec<f64>>>
where
    I: Iterator<Item = &'a Vec<u32>>,
{
    let logp = candle_nn::ops::log_softmax(&last_logits.to_dtype(DType::F32)?, D::Minus1)?
        .to_vec2::<f32>()?;
    let vocab = logp.first().map_or(0, Vec::len);
    (0..rows)
        .map(|r| {
            row_candidates(r)
                .map(|c| match logp[r].get(c[0] as usize) {
                    Some(&l) => Ok(l as f64),
                    None => bail!(
                        "candidate token {} is outside the vocabulary of {vocab}",
                        c[0]
                    ),
                })
                .collect()
        })
        .collect()
}
