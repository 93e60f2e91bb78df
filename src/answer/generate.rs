//! Decoding all particles as one batch from a prefilled prompt (design §5, step 1).

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::models::llama::{LlamaModel, Outputs, Prefill};
use crate::models::nn::log_sum_exp;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature and nucleus (top-p) sampling, seeded.
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A row stops at any of these (not included in its tokens).
    pub eos: Vec<u32>,
    pub sampling: Sampling,
}

/// The tokens one row produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// The end-of-sequence token it stopped at (`None`: it stopped at `max_new_tokens`).
    pub end: Option<u32>,
    /// log p(tokens, then `end` if any | prompt) under the row's own model: the sum of the
    /// log-softmax of the raw logits (no sampling temperature) at every token it chose — what
    /// scoring this sequence teacher-forced computes again.
    pub log_likelihood: f64,
}

impl Generated {
    /// Whether it stopped at an end-of-sequence token (rather than at `max_new_tokens`).
    pub fn finished(&self) -> bool {
        self.end.is_some()
    }

    /// Its tokens followed by the end token it stopped at: the sequence `log_likelihood` is of.
    pub fn sequence(&self) -> Vec<u32> {
        self.tokens.iter().copied().chain(self.end).collect()
    }
}

/// Decodes every row of `prefill` (all particles, one batch) with a KV cache.
pub fn generate(
    lm: &LlamaModel,
    prefill: &Prefill,
    particles: usize,
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    generate_batch(lm, prefill, particles, 1, opts)
}

/// Decodes the rows of `prefill` for `questions` questions at once (rows particle-major:
/// row `p·questions + q`). When sampling, each question draws from its own generator seeded
/// with the options' seed, so a question gets the same tokens alone or in a batch.
pub fn generate_batch(
    lm: &LlamaModel,
    prefill: &Prefill,
    particles: usize,
    questions: usize,
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    let mut cache = prefill.cache.clone();
    let mut logits = prefill.last_logits.clone();
    let mut expanded = prefill.expanded;
    let rows = logits.dim(0)?;
    let mut out = vec![
        Generated {
            tokens: Vec::new(),
            end: None,
            log_likelihood: 0.0,
        };
        rows
    ];
    if questions == 0 || rows % questions != 0 {
        anyhow::bail!("{rows} decoding rows do not split into {questions} question(s)");
    }
    let mut rngs: Vec<StdRng> = match opts.sampling {
        Sampling::Sample { seed, .. } => (0..questions)
            .map(|_| StdRng::seed_from_u64(seed))
            .collect(),
        Sampling::Greedy => Vec::new(),
    };
    for step in 0..opts.max_new_tokens {
        let next = choose(&logits, opts.sampling, &mut rngs)?;
        let logp = token_log_probs(&logits, &next)?;
        for ((row, &t), lp) in out.iter_mut().zip(&next).zip(logp) {
            if row.finished() {
                continue;
            }
            row.log_likelihood += lp;
            if opts.eos.contains(&t) {
                row.end = Some(t);
            } else {
                row.tokens.push(t);
            }
        }
        if step + 1 == opts.max_new_tokens || out.iter().all(Generated::finished) {
            break;
        }
        // While the particles of every prompt row pick the same token and the layers below the
        // particles still hold one row per prompt row (rows are particle-major: P·batch), the
        // step runs those layers once per prompt row and forks at the first layer with
        // particles, as the prompt did: fine-tuned particles mostly agree, and then a step of P
        // particles costs little more than one.
        let batch = rows / particles.max(1);
        let shared = expanded
            && particles > 1
            && cache.bottom_rows()? == batch
            && (0..rows).all(|r| next[r] == next[r % batch]);
        let (next, expanded_in) = if shared {
            (next[..batch].to_vec(), false)
        } else {
            (next, expanded)
        };
        let fed = next.len();
        let ids = Tensor::from_vec(next, (fed, 1), logits.device())?;
        let embeds = lm.embed(&ids)?;
        let keep = vec![vec![true]; fed];
        let dec = lm.forward(
            &embeds,
            expanded_in,
            &keep,
            &mut cache,
            particles,
            Outputs::All,
        )?;
        let (next_logits, next_expanded) =
            lm.logits(&dec.last_hidden_state, dec.expanded, particles)?;
        logits = next_logits.squeeze(1)?;
        expanded = next_expanded;
    }
    Ok(out)
}

/// Temperatures below this decode greedily, as vLLM's do (`_SAMPLING_EPS`): dividing the
/// logits by less overflows f32, and the softmax of infinities is not a number.
pub const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// The next token of every row of `logits` `[rows, vocab]`; when sampling, row `r` draws from
/// `rngs[r % rngs.len()]` (one generator per question).
fn choose(logits: &Tensor, sampling: Sampling, rngs: &mut [StdRng]) -> Result<Vec<u32>> {
    match sampling {
        Sampling::Sample {
            temperature, top_p, ..
        } if temperature >= GREEDY_BELOW_TEMPERATURE && !rngs.is_empty() => {
            let probs =
                candle_nn::ops::softmax(&(logits.to_dtype(DType::F32)? / temperature)?, D::Minus1)?
                    .to_vec2::<f32>()?;
            let groups = rngs.len();
            Ok(probs
                .iter()
                .enumerate()
                .map(|(r, row)| sample_top_p(row, top_p, &mut rngs[r % groups]))
                .collect())
        }
        _ => Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?),
    }
}

/// `log softmax(logits[r])[tokens[r]]` for every row of `logits` `[rows, vocab]`, in f32 as
/// scoring computes it.
fn token_log_probs(logits: &Tensor, tokens: &[u32]) -> Result<Vec<f64>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .zip(tokens)
        .map(|(row, &t)| {
            let picked = row.get(t as usize).copied().ok_or_else(|| {
                anyhow::anyhow!("token {t} is outside the vocabulary of {}", row.len())
            })?;
            Ok((picked - log_sum_exp(row)) as f64)
        })
        .collect()
}

/// Samples from the smallest set of most likely tokens whose mass reaches `top_p`.
fn sample_top_p(probs: &[f32], top_p: f64, rng: &mut StdRng) -> u32 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0.0f64;
    for &i in &order {
        kept.push(i);
        mass += probs[i] as f64;
        if mass >= top_p {
            break;
        }
    }
    let mut u = rng.random_range(0.0..mass.max(f64::MIN_POSITIVE));
    for &i in &kept {
        u -= probs[i] as f64;
        if u <= 0.0 {
            return i as u32;
        }
    }
    kept.last().map_or(0, |&i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_vanishing_temperature_decodes_greedily_instead_of_overflowing() {
        let logits = Tensor::new(&[[1.0f32, 30.0, 2.0], [5.0, -1.0, 4.5]], &Device::Cpu).unwrap();
        for temperature in [1e-38, 1e-300, 1e-6] {
            let mut rngs = vec![StdRng::seed_from_u64(1)];
            let sampling = Sampling::Sample {
                temperature,
                top_p: 1.0,
                seed: 1,
            };
            assert_eq!(
                choose(&logits, sampling, &mut rngs).unwrap(),
                vec![1, 0],
                "{temperature}"
            );
        }
    }
}
