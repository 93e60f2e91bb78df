//! The LLaVA objective: teacher-forced answer tokens after the prompt, loss on the answer tokens
//! only (design §4), batched over particles.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::data::normalize::normalize_answer;
use crate::data::VqaExample;
use crate::models::clip::{ClipModel, TowerRows};
use crate::models::image::{load_image, ImageProcessor};
use crate::models::nn::{backward_from, grad_or_zeros, VarGrads};
use crate::models::prompt::Prompter;

/// The answer an example is trained towards: `multiple_choice_answer` when the data has one,
/// else the most frequent human answer as VQAv2 derives that field: answers counted together when
/// they normalise alike ("Blue", "blue." and "blue" are one answer; [`normalize_answer`]), empty
/// ones left out; of the winning answer, its most frequent spelling. Ties: the first given.
pub fn target_answer(ex: &VqaExample) -> Option<String> {
    // VQAv2's consensus answer, unless empty (then the answers decide: none, nothing to train).
    if let Some(a) = ex
        .extra
        .get("multiple_choice_answer")
        .and_then(|v| v.as_str())
        .filter(|a| !normalize_answer(a).is_empty())
    {
        return Some(a.to_string());
    }
    let normalized: Vec<Option<String>> = ex
        .answers
        .iter()
        .map(|a| Some(normalize_answer(a)).filter(|n| !n.is_empty()))
        .collect();
    let answer = most_frequent(&normalized)?;
    let spellings: Vec<Option<&String>> = ex
        .answers
        .iter()
        .zip(&normalized)
        .map(|(a, n)| (*n == normalized[answer]).then_some(a))
        .collect();
    most_frequent(&spellings).map(|i| ex.answers[i].clone())
}

/// The index of the first of the most frequent keys (`None` left out; ties: the first).
fn most_frequent<K: PartialEq>(keys: &[Option<K>]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, k) in keys.iter().enumerate() {
        let Some(k) = k else { continue };
        let n = keys.iter().filter(|o| o.as_ref() == Some(k)).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((i, n));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(answers: &[&str]) -> VqaExample {
        VqaExample {
            question_id: "q".into(),
            image: "i.png".into(),
            question: "?".into(),
            answers: answers.iter().map(|a| a.to_string()).collect(),
            answer_type: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn the_target_is_the_most_frequent_answer_once_normalised() {
        // "Blue" counts with "blue": three votes against two, and "blue" is its usual spelling.
        let ex = example(&["Blue", "green", "blue", "green", "blue"]);
        assert_eq!(target_answer(&ex).as_deref(), Some("blue"));
        // Empty answers do not win; ties go to the first given.
        assert_eq!(
            target_answer(&example(&["", "", "two", "2", "red"])).as_deref(),
            Some("two")
        );
        assert_eq!(target_answer(&example(&["", " "])), None);
        assert_eq!(target_answer(&example(&[])), None);
        // VQAv2's multiple_choice_answer wins, unless empty.
        let with_mc = |mc: &str, answers: &[&str]| {
            let mut ex = example(answers);
            ex.extra
                .insert("multiple_choice_answer".into(), serde_json::json!(mc));
            target_answer(&ex)
        };
        assert_eq!(with_mc("yes", &["no"]).as_deref(), Some("yes"));
        assert_eq!(with_mc("", &[]), None);
        assert_eq!(with_mc(" ", &["red"]).as_deref(), Some("red"));
    }

    #[test]
    fn clip_trains_only_on_answers_it_can_give() {
        let mut train: Vec<VqaExample> = ["red", "Red.", "blue", "blue", "green", "teal"]
            .iter()
            .enumerate()
            .map(|(i, a)| VqaExample {
                question_id: format!("q{i}"),
                ..example(&[a])
            })
            .collect();
        train.push(VqaExample {
            question_id: "none".into(),
            ..example(&[])
        });
        // The two most frequent answers: "blue" (2) and "red" (2, with "Red."); "green" and
        // "teal" (1 each) lie outside. The question without an answer stays, to be refused.
        assert_eq!(clip_vocabulary(&train, 2), ["blue", "red"]);
        let (kept, left_out) = clip_trainable(&train, 2);
        let ids: Vec<&str> = kept.iter().map(|ex| ex.question_id.as_str()).collect();
        assert_eq!(ids, ["q0", "q1", "q2", "q3", "none"]);
        assert_eq!(left_out, 2);
        // The vocabulary of what is kept is the one it was chosen by.
        assert_eq!(clip_vocabulary(&kept, 2), clip_vocabulary(&train, 2));
        // A vocabulary that holds every answer leaves nothing out.
        assert_eq!(clip_trainable(&train, 4).1, 0);
    }
}

/// The token ids of one training sequence: prompt, answer, end token.
#[derive(Clone, Debug)]
pub struct EncodedExample {
    pub ids: Vec<u32>,
    /// Tokens of the prompt; the answer starts at this index.
    pub prompt_len: usize,
}

/// Tokenises prompt + answer the way `ask` will see them: the chat template with generation
/// prompt, then the answer as its continuation, then the end token.
pub fn encode_example(
    prompter: &Prompter,
    image_tokens: usize,
    question: &str,
    answer: &str,
) -> Result<EncodedExample> {
    let prompt_ids = prompter.encode_question(question, true, image_tokens, None)?;
    let full = prompter.encode_question(question, true, image_tokens, Some(answer))?;
    let answer_ids: Vec<u32> = if full.starts_with(&prompt_ids) {
        full[prompt_ids.len()..].to_vec()
    } else {
        // The boundary merged into the prompt's last token: tokenise the answer alone.
        prompter
            .tokenizer()
            .encode(format!(" {}", answer.trim()), false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec()
    };
    if answer_ids.is_empty() {
        bail!("the answer {answer:?} tokenises to nothing");
    }
    let eos = prompter
        .eos_token_id()
        .context("the tokenizer has no end-of-sequence token to end answers with")?;
    let mut ids = prompt_ids;
    let prompt_len = ids.len();
    ids.extend(answer_ids);
    ids.push(eos);
    Ok(EncodedExample { ids, prompt_len })
}

/// A teacher-forcing batch of `rows` sequences (right padded).
pub struct Batch {
    pub input_ids: Tensor,
    pub pixel_values: Tensor,
    pub keep: Vec<Vec<bool>>,
    /// Logits at positions `window_start..window_start + window` predict `targets`.
    pub window_start: usize,
    /// `[rows, window]` u32 next tokens.
    pub targets: Tensor,
    /// `[rows, window]` f32, 1 on answer tokens.
    pub mask: Tensor,
}

/// Builds a batch from encoded examples and their images.
pub fn make_batch(
    encoded: &[&EncodedExample],
    images: &[&std::path::Path],
    processor: &ImageProcessor,
    pad_id: u32,
) -> Result<Batch> {
    let rows = encoded.len();
    let len = encoded.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let start = encoded.iter().map(|e| e.prompt_len - 1).min().unwrap_or(0);
    let window = len - 1 - start;
    let mut ids = Vec::with_capacity(rows * len);
    let mut keep = Vec::with_capacity(rows);
    let mut targets = Vec::with_capacity(rows * window);
    let mut mask = Vec::with_capacity(rows * window);
    for e in encoded {
        let n = e.ids.len();
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, len - n));
        keep.push((0..len).map(|j| j < n).collect());
        for pos in start..start + window {
            // Position `pos` predicts token `pos + 1`; answer tokens start at `prompt_len`.
            let target = pos + 1;
            let is_answer = target >= e.prompt_len && target < n;
            targets.push(if target < n { e.ids[target] } else { pad_id });
            mask.push(if is_answer { 1f32 } else { 0.0 });
        }
    }
    let pixels = images
        .iter()
        .map(|p| processor.preprocess(&load_image(p)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows, len), &Device::Cpu)?,
        pixel_values: Tensor::stack(&pixels, 0)?,
        keep,
        window_start: start,
        targets: Tensor::from_vec(targets, (rows, window), &Device::Cpu)?,
        mask: Tensor::from_vec(mask, (rows, window), &Device::Cpu)?,
    })
}

/// Mean negative log-likelihood of the answer tokens per particle: `logits` `[P·m, window,
/// vocab]` (particle-major rows), returns `[P]`.
pub fn particle_nll(
    logits: &Tensor,
    batch: &Batch,
    particles: usize,
) -> candle_core::Result<Tensor> {
    let (rows, window, _) = logits.dims3()?;
    let reps = rows / batch.targets.dim(0)?;
    let targets = if reps > 1 {
        crate::bella::expand_particles(&batch.targets, reps)?
    } else {
        batch.targets.clone()
    };
    let mask = if reps > 1 {
        crate::bella::expand_particles(&batch.mask, reps)?
    } else {
        batch.mask.clone()
    };
    let (targets, mask) = (
        targets.to_device(logits.device())?,
        mask.to_device(logits.device())?,
    );
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    let per_particle = (picked * &mask)?
        .reshape((particles, rows / particles * window))?
        .sum(1)?;
    let counts = mask
        .reshape((particles, rows / particles * window))?
        .sum(1)?
        .clamp(1.0, f64::INFINITY)?;
    (per_particle / counts)?.neg()
}

/// The CLIP answer vocabulary: every distinct normalised training answer, most frequent first
/// (ties alphabetical), at most `max` of them.
pub fn clip_vocabulary<'a>(
    train: impl IntoIterator<Item = &'a VqaExample>,
    max: usize,
) -> Vec<String> {
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for ex in train {
        if let Some(a) = target_answer(ex) {
            *counts
                .entry(crate::data::normalize::normalize_answer(&a))
                .or_insert(0) += 1;
        }
    }
    let mut vocab: Vec<(String, usize)> = counts.into_iter().collect();
    vocab.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    vocab.into_iter().take(max).map(|(a, _)| a).collect()
}

/// The training questions a CLIP can learn from: those whose answer is in the vocabulary of the
/// `max` most frequent training answers ([`clip_vocabulary`], the same vocabulary before and
/// after), and those without an answer (refused later, by name). A question whose answer lies
/// outside could never be answered right, and training it towards another answer would teach a
/// wrong one. Returns them with the number left out.
pub fn clip_trainable(train: &[VqaExample], max: usize) -> (Vec<VqaExample>, usize) {
    let vocabulary: std::collections::HashSet<String> =
        clip_vocabulary(train, max).into_iter().collect();
    let kept: Vec<VqaExample> = train
        .iter()
        .filter(|ex| target_answer(ex).is_none_or(|a| vocabulary.contains(&normalize_answer(&a))))
        .cloned()
        .collect();
    let left_out = train.len() - kept.len();
    (kept, left_out)
}

/// What CLIP answers with: its tokenizer, image processor and answer vocabulary; and the
/// activations one chunk of a training step may keep ([`CLIP_CHUNK_BYTES`]).
pub struct ClipTask<'a> {
    pub prompter: &'a Prompter,
    pub processor: &'a ImageProcessor,
    pub vocabulary: &'a [String],
    pub chunk_bytes: usize,
}

/// Bytes of activations a training forward pass keeps per token, per unit of width and per layer
/// (measured: ~350 on ViT-B/32's text tower, f32; candle keeps every intermediate of the graph).
const ACTIVATION_BYTES_PER_UNIT: usize = 400;

/// Bytes of activations a training pass keeps for `rows` rows of `tokens` tokens through
/// `layers` layers of width `hidden`: every layer's, or when `layered` (gradient checkpointing)
/// one layer's and the input of each layer.
pub fn activation_bytes(
    rows: usize,
    tokens: usize,
    hidden: usize,
    layers: usize,
    layered: bool,
) -> usize {
    let per_layer = ACTIVATION_BYTES_PER_UNIT * tokens * hidden * rows;
    if layered {
        per_layer + std::mem::size_of::<f32>() * tokens * hidden * layers * rows
    } else {
        per_layer * layers
    }
}

/// What one chunk of a CLIP training step may keep for its backward pass. A row whose every
/// layer does not fit (ViT-L/14-336's 577 tokens × 24 layers with particles) keeps one layer's
/// at a time ([`ClipModel::embeds_layered`]), for one more forward pass of its tower.
pub const CLIP_CHUNK_BYTES: usize = 1 << 30;

/// CLIP's per-particle cross-entropy over the answer vocabulary for a batch of examples whose
/// correct answers are `targets` (vocabulary indices), `[P]`, detached; the gradients of its sum
/// with respect to the particles are added to `grads`. `expanded`: P·m examples,
/// particle-major, each particle its own; else m examples shared by all particles.
/// `Err(Interrupted)` between chunks once a stop was asked for ([`crate::interrupt::check`]).
///
/// Every example is scored against every vocabulary answer (m · k texts per particle, up to
/// thousands), so one backward pass through the whole batch would keep tens of gigabytes of
/// activations. Instead, as GradCache (Gao et al., 2021): (1) every text and image embedding is
/// computed chunk by chunk and kept without its graph; (2) the loss is computed from the
/// embeddings, with its gradient with respect to each; (3) each chunk runs again and passes its
/// share of that gradient down to the particles. The gradients are those of one backward pass;
/// memory is one chunk's (`task.chunk_bytes`; a row at least, and of a row too large for it one
/// layer at a time), for one more forward pass of the towers.
pub fn clip_loss_and_grads(
    model: &ClipModel,
    task: &ClipTask,
    examples: &[&VqaExample],
    targets: &[usize],
    particles: usize,
    expanded: bool,
    grads: &mut VarGrads,
) -> Result<Tensor> {
    use crate::answer::candidates::clip_prompt;
    use crate::models::clip::normalize;
    let k = task.vocabulary.len();
    // Rows: particle-major blocks of m examples (one block when they are shared).
    let blocks = if expanded { particles } else { 1 };
    if !examples.len().is_multiple_of(blocks) || targets.len() != examples.len() {
        bail!("{} examples do not form {blocks} blocks", examples.len());
    }
    let m = examples.len() / blocks;
    let texts: Vec<String> = examples
        .iter()
        .flat_map(|ex| task.vocabulary.iter().map(|a| clip_prompt(&ex.question, a)))
        .collect();
    let max_len = model.config().text_config.max_position_embeddings;
    let (ids, mask) = task.prompter.encode_clip_batch(&texts, max_len, false)?;
    let pixels = examples
        .iter()
        .map(|ex| task.processor.preprocess(&load_image(&ex.image)?))
        .collect::<Result<Vec<_>>>()?;
    let text = Tower::Text {
        ids: &ids,
        mask: &mask,
    };
    let vision = Tower::Vision { pixels: &pixels };
    // Shared rows become P rows at the first layer with particles: a chunk counts P per row.
    let layout = Layout {
        blocks,
        particles,
        expanded,
    };
    let text_chunks = text.chunks(layout, task.chunk_bytes, model);
    let image_chunks = vision.chunks(layout, task.chunk_bytes, model);

    // (1) The embeddings, `[P or 1, rows per block, d]`, without their graphs.
    let run_all = |tower: &Tower, chunks: &Chunks| -> Result<(Tensor, bool)> {
        let mut parts = Vec::with_capacity(chunks.rows.len());
        let mut tracked = false;
        for &rows in &chunks.rows {
            crate::interrupt::check()?;
            let (out, out_tracked) = tower.embed(model, rows, chunks.layered, layout, None)?;
            tracked |= out_tracked;
            parts.push(out.to_dtype(DType::F32)?);
        }
        Ok((Tensor::cat(&parts, 1)?, tracked))
    };
    let (txt, text_tracked) = run_all(&text, &text_chunks)?;
    let (img, image_tracked) = run_all(&vision, &image_chunks)?;

    // (2) The loss from the embeddings, and its gradient with respect to each.
    let txt = candle_core::Var::from_tensor(&txt)?;
    let img = candle_core::Var::from_tensor(&img)?;
    let d = txt.dim(2)?;
    let t = normalize(txt.as_tensor())?
        .reshape(((), m, k, d))?
        .broadcast_as((particles, m, k, d))?;
    let i = normalize(img.as_tensor())?
        .reshape(((), m, 1, d))?
        .broadcast_as((particles, m, 1, d))?;
    let scale = model.logit_scale().exp()?.to_dtype(DType::F32)?;
    let logits = i
        .contiguous()?
        .matmul(&t.transpose(2, 3)?.contiguous()?)?
        .squeeze(2)?
        .broadcast_mul(&scale)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let per_row: Vec<u32> = (0..particles * m)
        .map(|r| targets[r % examples.len()] as u32)
        .collect();
    let target = Tensor::from_vec(per_row, (particles, m, 1), logp.device())?;
    let nll = logp.gather(&target, 2)?.squeeze(2)?.mean(1)?.neg()?;
    let store = nll.sum_all()?.backward()?;
    let (grad_txt, grad_img) = (
        grad_or_zeros(&store, txt.as_tensor())?,
        grad_or_zeros(&store, img.as_tensor())?,
    );
    drop(store);

    // (3) Each chunk again, its share of the gradient passed down to the particles.
    for (tower, chunks, grad, tracked) in [
        (&text, &text_chunks, &grad_txt, text_tracked),
        (&vision, &image_chunks, &grad_img, image_tracked),
    ] {
        if !tracked {
            continue; // no particles in this tower: nothing to pass the gradient to
        }
        for &(a, b) in &chunks.rows {
            crate::interrupt::check()?;
            let grad = grad.narrow(1, a, b - a)?;
            let backward = Some((&grad, &mut *grads));
            tower.embed(model, (a, b), chunks.layered, layout, backward)?;
        }
    }
    Ok(nll.detach())
}

/// The inputs of one CLIP tower in a training step, `blocks` particle-major blocks of rows.
enum Tower<'a> {
    /// Token ids and masks, right padded.
    Text {
        ids: &'a [Vec<u32>],
        mask: &'a [Vec<u32>],
    },
    /// Preprocessed images `[C, H, W]`.
    Vision { pixels: &'a [Tensor] },
}

impl Tower<'_> {
    /// Rows in each of `blocks` blocks.
    fn per_block(&self, blocks: usize) -> usize {
        let rows = match self {
            Tower::Text { ids, .. } => ids.len(),
            Tower::Vision { pixels } => pixels.len(),
        };
        rows / blocks.max(1)
    }

    /// Ranges of rows within each block of `layout`, each keeping about `budget` bytes of
    /// activations for the P rows a row becomes (one row at least, layered when it does not fit
    /// whole).
    fn chunks(&self, layout: Layout, budget: usize, model: &ClipModel) -> Chunks {
        let (blocks, copies) = (layout.blocks, layout.particles);
        let c = model.config();
        let (tokens, hidden, layers) = match self {
            Tower::Text { mask, .. } => (
                mask.first().map_or(1, Vec::len),
                c.text_config.hidden_size,
                c.text_config.num_hidden_layers,
            ),
            Tower::Vision { .. } => (
                c.vision_config.grid().pow(2) + 1,
                c.vision_config.hidden_size,
                c.vision_config.num_hidden_layers,
            ),
        };
        let layered = activation_bytes(copies, tokens, hidden, layers, false) > budget;
        let per_row = activation_bytes(copies, tokens, hidden, layers, layered);
        let rows = (budget / per_row.max(1)).max(1);
        let per_block = self.per_block(blocks);
        Chunks {
            rows: (0..per_block)
                .step_by(rows)
                .map(|a| (a, (a + rows).min(per_block)))
                .collect(),
            layered,
        }
    }

    /// The projected embeddings of rows `a..b` of each block of `layout`, detached: `[P, b − a,
    /// d]` where the tower carries the particle axis, else `[1, b − a, d]`; and whether they
    /// depend on trained variables. `layered`: one encoder layer's activations at a time.
    /// `backward`: `(grad, grads)`, the loss's gradient with respect to these embeddings, whose
    /// share for the trained variables is added to `grads`.
    fn embed(
        &self,
        model: &ClipModel,
        (a, b): (usize, usize),
        layered: bool,
        layout: Layout,
        backward: Option<(&Tensor, &mut VarGrads)>,
    ) -> Result<(Tensor, bool)> {
        let blocks = layout.blocks;
        let (n, per_block) = (b - a, self.per_block(blocks));
        // The gradient as the rows come out of the tower: `[P or 1 · (b − a), d]`.
        let flat_grad = match &backward {
            Some((grad, _)) => Some(grad.reshape(((), grad.dim(D::Minus1)?))?),
            None => None,
        };
        let backward = backward
            .zip(flat_grad.as_ref())
            .map(|((_, grads), grad)| (grad, grads));
        let out = match self {
            Tower::Text { ids, mask } => {
                let rows: Vec<usize> = (0..blocks)
                    .flat_map(|blk| blk * per_block + a..blk * per_block + b)
                    .collect();
                // Right padded: the chunk needs only its own longest text.
                let len = rows
                    .iter()
                    .map(|&r| mask[r].iter().filter(|&&v| v != 0).count())
                    .max()
                    .unwrap_or(1);
                let flat = |src: &[Vec<u32>]| -> Vec<u32> {
                    rows.iter()
                        .flat_map(|&r| src[r][..len].iter().copied())
                        .collect()
                };
                let shape = (rows.len(), len);
                let ids = Tensor::from_vec(flat(ids), shape, &Device::Cpu)?;
                let mask = Tensor::from_vec(flat(mask), shape, &Device::Cpu)?;
                Self::run(
                    model,
                    TowerRows::Text {
                        ids: &ids,
                        mask: &mask,
                    },
                    layered,
                    layout,
                    backward,
                )?
            }
            Tower::Vision { pixels } => {
                let rows: Vec<&Tensor> = (0..blocks)
                    .flat_map(|blk| &pixels[blk * per_block + a..blk * per_block + b])
                    .collect();
                let pixels = Tensor::stack(&rows, 0)?;
                let rows = TowerRows::Vision { pixels: &pixels };
                Self::run(model, rows, layered, layout, backward)?
            }
        };
        let (out, tracked) = out;
        let d = out.dim(1)?;
        Ok((out.reshape((out.dim(0)? / n, n, d))?, tracked))
    }

    /// One chunk's embeddings through the whole graph or layer by layer ([`Self::embed`]).
    fn run(
        model: &ClipModel,
        rows: TowerRows,
        layered: bool,
        layout: Layout,
        backward: Option<(&Tensor, &mut VarGrads)>,
    ) -> Result<(Tensor, bool)> {
        let (particles, expanded) = (layout.particles, layout.expanded);
        if layered {
            // A stop asked for between its layers ends the pass (the step is dropped).
            let result = model.embeds_layered(rows, particles, expanded, backward);
            if result.is_err() {
                crate::interrupt::check()?;
            }
            let (out, _, tracked) = result?;
            return Ok((out, tracked));
        }
        let (out, _) = match rows {
            TowerRows::Text { ids, mask } => {
                model.text_embeds_rows(ids, Some(mask), particles, expanded)?
            }
            TowerRows::Vision { pixels } => model.image_embeds_rows(pixels, particles, expanded)?,
        };
        let tracked = out.track_op();
        if let Some((grad, grads)) = backward.filter(|_| tracked) {
            grads.add(&backward_from(&out, grad)?)?;
        }
        Ok((out.detach(), tracked))
    }
}

/// How a CLIP training step's rows are laid out.
#[derive(Clone, Copy)]
struct Layout {
    /// Particle-major blocks of rows: P when each particle has its own examples, else 1.
    blocks: usize,
    particles: usize,
    /// The input rows already carry the particle axis (each particle its own examples).
    expanded: bool,
}

/// How a tower's rows are split for a training step ([`Tower::chunks`]).
struct Chunks {
    /// Ranges of rows within each block.
    rows: Vec<(usize, usize)>,
    /// Whether each row runs one encoder layer at a time.
    layered: bool,
}
