//! From an image and a question to a P×K probability matrix (design §5, steps 1–3), for both
//! backends: LLaVA generates one answer per particle and scores every distinct answer under every
//! particle; CLIP scores a fixed answer vocabulary directly.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::generate::{generate_batch, GenerateOptions};
use super::score::score_candidates_batch;
use crate::data::normalize::normalize_answer;
use crate::models::clip::{normalize, ClipModel};
use crate::models::llava::{LlavaInput, LlavaModel};
use crate::models::prompt::Prompter;

/// One particle's own answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParticleAnswer {
    /// As generated (LLaVA) or the vocabulary entry it ranks first (CLIP).
    pub answer: String,
    /// After the official VQA normalisation.
    pub normalized: String,
    /// log p(answer) under this particle (LLaVA: sequence log-likelihood incl. the end token;
    /// CLIP: log of its softmax probability).
    pub log_likelihood: f64,
    /// The answer stopped at the token limit before its end token (LLaVA).
    #[serde(default)]
    pub truncated: bool,
}

/// The particles' answers and their distributions over the candidates.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scored {
    pub particle_answers: Vec<ParticleAnswer>,
    /// Display text of each candidate (one per distinct normalised answer).
    pub candidates: Vec<String>,
    /// `probs[p][k]`; when `other` is set, a last column holds the mass of every other answer.
    pub probs: Vec<Vec<f64>>,
    pub other: bool,
    /// Tokens of the prompt (LLaVA: with the image tokens; CLIP: of every candidate text).
    pub prompt_tokens: usize,
    /// Tokens the particles generated, all together (CLIP: 0).
    pub generated_tokens: usize,
    /// The image's pooled features, averaged over the particles (LLaVA: the projected image
    /// tokens averaged; CLIP: the normalised image embedding): what the image check compares.
    pub image_features: Option<Vec<f32>>,
}

/// LLaVA: decode all particles as one batch, normalise their answers, score every distinct answer
/// under every particle. Probabilities are sequence probabilities, so each row keeps the mass of
/// all other answers in an extra column (P = 1 then gives the model's own sequence probability).
pub fn llava_candidates(
    model: &LlavaModel,
    prompter: &Prompter,
    pixel_values: &Tensor,
    question: &str,
    particles: usize,
    gen: &GenerateOptions,
) -> Result<Scored> {
    let mut scored =
        llava_candidates_batch(model, prompter, pixel_values, &[question], particles, gen)?;
    scored.pop().context("no result for the question")
}

/// [`llava_candidates`] for several questions at once, each about its own image
/// (`pixel_values` `[questions, C, H, W]`): the prompts are left-padded into one batch, so the
/// vision tower, the prefill, the decoding of every particle and the candidate scoring are one
/// pass for all questions × particles.
pub fn llava_candidates_batch(
    model: &LlavaModel,
    prompter: &Prompter,
    pixel_values: &Tensor,
    questions: &[&str],
    particles: usize,
    gen: &GenerateOptions,
) -> Result<Vec<Scored>> {
    let n = questions.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let image_tokens = model.config().image_tokens_per_image();
    let prompts = questions
        .iter()
        .map(|q| prompter.encode_question(q, true, image_tokens, None))
        .collect::<Result<Vec<_>>>()?;
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Left padding; the padded positions are masked, so any id that is not the image token works.
    let pad = prompter
        .pad_token_id()
        .or(prompter.eos_token_id())
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(n * len);
    let mut keep = Vec::with_capacity(n);
    for p in &prompts {
        ids.extend(std::iter::repeat_n(pad, len - p.len()));
        ids.extend_from_slice(p);
        let mut row = vec![false; len - p.len()];
        row.resize(len, true);
        keep.push(row);
    }
    let input_ids = Tensor::from_vec(ids, (n, len), &Device::Cpu)?;
    let input = LlavaInput {
        input_ids: &input_ids,
        pixel_values: Some(pixel_values),
        keep: &keep,
        expanded: false,
    };
    let (prefill, features) = model.prefill_with_features(&input, particles)?;
    let pooled = match features {
        Some(f) => pool_image_features(&f, n)?,
        None => Vec::new(),
    };
    let generated = generate_batch(&model.language_model, &prefill, particles, n, gen)?;
    let rows = generated.len();

    // Per question: distinct normalised answers, each with the token sequence of the first
    // particle that gave it (plus the end token when it finished, so "red" and "red circle"
    // differ).
    let end = gen.eos.first().copied();
    let mut found: Vec<Found> = (0..n).map(|_| Found::default()).collect();
    let mut own: Vec<(usize, String)> = Vec::with_capacity(rows);
    for (r, g) in generated.iter().enumerate() {
        let f = &mut found[r % n];
        let raw = prompter.decode(&g.tokens, true)?.trim().to_string();
        let norm = normalize_answer(&raw);
        let k = match f.normalized.iter().position(|x| *x == norm) {
            Some(k) => k,
            None => {
                let mut seq = g.tokens.clone();
                if let (true, Some(e)) = (g.finished(), end) {
                    seq.push(e);
                }
                if seq.is_empty() {
                    seq.extend(end);
                }
                if seq.is_empty() {
                    bail!("a particle produced an empty answer and the tokenizer has no end token");
                }
                f.candidates.push(raw.clone());
                f.normalized.push(norm);
                f.sequences.push(seq);
                f.normalized.len() - 1
            }
        };
        own.push((k, raw));
    }
    let sequences: Vec<Vec<Vec<u32>>> = found.iter().map(|f| f.sequences.clone()).collect();
    // Where every particle of every question decoded the one candidate of its question, token
    // for token (fine-tuned particles mostly agree), decoding already computed each particle's
    // log-likelihood of it: scoring it again would run the same sequence through the model.
    let decoded_only = generated
        .iter()
        .enumerate()
        .all(|(r, g)| sequences[r % n] == [g.sequence()]);
    let loglik = if decoded_only {
        generated.iter().map(|g| vec![g.log_likelihood]).collect()
    } else {
        score_candidates_batch(&model.language_model, &prefill, &sequences, particles)?
    };
    let mut out: Vec<Scored> = found
        .iter()
        .enumerate()
        .map(|(q, f)| Scored {
            particle_answers: Vec::new(),
            candidates: f.candidates.clone(),
            probs: Vec::new(),
            other: true,
            prompt_tokens: 0,
            generated_tokens: 0,
            image_features: pooled.get(q).cloned(),
        })
        .collect();
    for (r, row) in loglik.iter().enumerate() {
        let (f, s) = (&found[r % n], &mut out[r % n]);
        let (k, raw) = &own[r];
        let k = *k;
        let mut p: Vec<f64> = row.iter().map(|&l| l.exp()).collect();
        let sum: f64 = p.iter().sum();
        if sum > 1.0 {
            // Rounding can push the total past 1; renormalise, leaving no other mass.
            p.iter_mut().for_each(|x| *x /= sum);
        }
        p.push((1.0 - p.iter().sum::<f64>()).max(0.0));
        s.probs.push(p);
        s.particle_answers.push(ParticleAnswer {
            answer: raw.clone(),
            normalized: f.normalized[k].clone(),
            log_likelihood: row[k],
            truncated: !generated[r].finished(),
        });
        s.generated_tokens += generated[r].tokens.len();
    }
    for (s, p) in out.iter_mut().zip(&prompts) {
        s.prompt_tokens = p.len();
    }
    Ok(out)
}

/// Each of `images` images' projected features averaged over its tokens and over the particles
/// (`features` `[rows, tokens, hidden]`, rows particle-major when they carry the particle axis):
/// what the image check compares.
fn pool_image_features(features: &Tensor, images: usize) -> Result<Vec<Vec<f32>>> {
    let per_row = features.to_dtype(DType::F32)?.mean(1)?;
    let (rows, hidden) = per_row.dims2()?;
    Ok(per_row
        .reshape((rows / images.max(1), images, hidden))?
        .mean(0)?
        .to_vec2::<f32>()?)
}

/// One question's distinct answers while they are collected.
#[derive(Default)]
struct Found {
    candidates: Vec<String>,
    normalized: Vec<String>,
    sequences: Vec<Vec<u32>>,
}

/// The text CLIP embeds for one candidate answer.
pub fn clip_prompt(question: &str, answer: &str) -> String {
    format!("question: {} answer: {}", question.trim(), answer.trim())
}

/// CLIP: every particle scores every vocabulary answer against the image; softmax of the scaled
/// cosine similarities over the vocabulary.
pub fn clip_candidates(
    model: &ClipModel,
    prompter: &Prompter,
    pixel_values: &Tensor,
    question: &str,
    vocabulary: &[String],
    particles: usize,
) -> Result<Scored> {
    if vocabulary.is_empty() {
        bail!("a CLIP model answers from an answer vocabulary: give one with --answers FILE or use particles trained with one");
    }
    // Named as the question (its candidate texts would be named with the wrapper's bytes).
    crate::models::prompt::check_user_text("question", question)?;
    let k = vocabulary.len();
    let texts: Vec<String> = vocabulary
        .iter()
        .map(|a| clip_prompt(question, a))
        .collect();
    let max_len = model.config().text_config.max_position_embeddings;
    let mut prompt_tokens = 0;
    let mut chunks = Vec::new();
    for chunk in texts.chunks(CLIP_TEXT_BATCH) {
        let n = chunk.len();
        let (ids, mask) = prompter.encode_clip_batch(chunk, max_len, false)?;
        prompt_tokens += mask.iter().flatten().sum::<u32>() as usize;
        let len = ids[0].len();
        let ids = Tensor::from_vec(ids.concat(), (n, len), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask.concat(), (n, len), &Device::Cpu)?;
        chunks.push((
            normalize(&model.text_embeds(&ids, Some(&mask), particles)?)?,
            n,
        ));
    }
    let txt = join_text_rows(chunks)?;
    let img = normalize(&model.image_embeds(pixel_values, particles)?)?;
    let scale = model
        .logit_scale()
        .exp()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()? as f64;
    let txt_rows = txt.dim(0)? / k;
    let img_rows = img.dim(0)?;
    let rows = txt_rows.max(img_rows);
    let mut probs = Vec::with_capacity(rows);
    for p in 0..rows {
        let t = txt.narrow(0, (p % txt_rows) * k, k)?;
        let i = img.narrow(0, p % img_rows, 1)?;
        // In f64: an f32 softmax over 10 000 answers sums to 1 only within ~1e-6.
        let logits = (i.matmul(&t.t()?)?.to_dtype(DType::F64)? * scale)?
            .squeeze(0)?
            .to_vec1::<f64>()?;
        probs.push(super::aggregate::softmax(&logits));
    }
    let image_features = img.mean(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let particle_answers = probs
        .iter()
        .map(|row| {
            let best = (0..k)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .context("empty vocabulary")?;
            Ok(ParticleAnswer {
                answer: vocabulary[best].clone(),
                normalized: normalize_answer(&vocabulary[best]),
                log_likelihood: row[best].ln(),
                truncated: false,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Scored {
        particle_answers,
        candidates: vocabulary.to_vec(),
        probs,
        other: false,
        prompt_tokens,
        generated_tokens: 0,
        image_features: Some(image_features),
    })
}

/// Candidate texts CLIP's text tower reads in one batch. Its activations grow with the batch
/// (times the particles), so a vocabulary goes through in batches of this many: in one batch,
/// 10 000 answers took 1 GB with the 0.5M-parameter demo CLIP, and memory grew without bound
/// with the `--answers` file.
const CLIP_TEXT_BATCH: usize = 256;

/// The text embeddings of consecutive batches of the vocabulary, `(rows, texts)` each, joined as
/// one batch's rows are laid out: particle-major, `particle * k + answer` (or `answer` alone
/// where the text tower carries no particle axis).
fn join_text_rows(mut chunks: Vec<(Tensor, usize)>) -> Result<Tensor> {
    if chunks.len() == 1 {
        return Ok(chunks.remove(0).0);
    }
    let (first, n) = chunks.first().context("empty vocabulary")?;
    let per_text = first.dim(0)? / n;
    let mut parts = Vec::with_capacity(per_text * chunks.len());
    for p in 0..per_text {
        for (rows, n) in &chunks {
            parts.push(rows.narrow(0, p * n, *n)?);
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}
