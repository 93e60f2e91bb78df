//! Training Bella particles on VQA data (design §4): P low-rank particles on a frozen LLaVA or
//! CLIP, as a
//! plain ensemble (independent particles, own initialisation and data order, one batched
//! forward/backward) or with SVGD (one RBF kernel over the particles, the repulsive term keeps
//! them apart).
//!
//! The objective per particle is the mean NLL of the answer tokens plus a Gaussian prior
//! N(0, σ²) on its adapter parameters, scaled per example: `‖φ_p‖² / (2σ²N)` (so the sum over
//! the data is the negative log posterior). AdamW's own weight decay is 0: the prior is the
//! regulariser.

pub mod checkpoint;
pub mod diversity;
pub mod objective;
pub mod optim;
pub mod validate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::answer::candidates::{clip_candidates, clip_prompt};
use crate::answer::generate::{generate, GenerateOptions, Sampling};
use crate::bella::particles::{hash_weights, BaseModel, ParticleConfig, ParticleSet};
use crate::bella::svgd::{
    delta_w_sq_distances, svgd_direction_weighted, KernelSpace, LayerFactors,
};
use crate::bella::{attach, Adapter, AdapterSpec, InitB, ParticleModel};
use crate::data::normalize::normalize_answer;
use crate::data::VqaExample;
use crate::hub::Origin;
use crate::interrupt::Interrupted;
use crate::metrics::{vqa_accuracy, NormalizeMode};
use crate::models::image::{load_image, ImageProcessor};
use crate::models::llava::LlavaInput;
use crate::models::nn::VarGrads;
use crate::models::prompt::Prompter;
use crate::models::{LoadedModel, Model};
use objective::{
    clip_loss_and_grads, clip_trainable, clip_vocabulary, encode_example, make_batch, particle_nll,
    target_answer, EncodedExample,
};
use optim::{clip_per_particle, learning_rate, AdamW};

/// How the particles are trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Independent particles, each with its own data order.
    Ensemble,
    /// Canonical SVGD; all particles see the same minibatch.
    Svgd,
}

/// Where the SVGD kernel measures distances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernel {
    /// The stacked adapter parameters.
    Params,
    /// ΔW = (α/r)·B·A per layer.
    DeltaW,
}

/// Everything that decides the result of a run (stored in checkpoints; a resume must match).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub particles: usize,
    pub method: Method,
    pub kernel: Kernel,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Fraction of the steps spent warming up.
    pub warmup: f64,
    /// The cosine ends at `lr · min_lr`.
    pub min_lr: f64,
    /// Per-particle gradient-norm limit.
    pub grad_clip: f64,
    /// σ of the Gaussian prior on adapter parameters.
    pub prior_std: f64,
    /// Std of the initial B (0 = PEFT's zero init; particles then start equal in function).
    pub init_b_std: f64,
    pub seed: u64,
    /// SVGD: the weight of the repulsive term (1 = canonical SVGD; w is SVGD on the tempered
    /// posterior p^{1/w}, see [`crate::bella::svgd`]). Ignored by the ensemble.
    #[serde(default = "default_repulsion")]
    pub repulsion: f64,
}

fn default_repulsion() -> f64 {
    1.0
}

impl TrainOptions {
    /// Defaults for a LLaVA: the attention projections of the language model.
    pub fn llava_defaults() -> Self {
        let spec = AdapterSpec::default_for_llava();
        Self {
            targets: spec.targets,
            rank: spec.rank,
            alpha: spec.alpha,
            particles: spec.particles,
            method: Method::Ensemble,
            kernel: Kernel::DeltaW,
            epochs: 3,
            batch_size: 8,
            lr: 1e-3,
            warmup: 0.1,
            min_lr: 0.1,
            grad_clip: 1.0,
            prior_std: 1.0,
            init_b_std: 1e-3,
            seed: 0,
            repulsion: 1.0,
        }
    }

    /// Defaults for a model: LLaVA as [`Self::llava_defaults`]; CLIP with the attention
    /// projections of both towers.
    pub fn defaults_for(model: &Model) -> Self {
        let llava = Self::llava_defaults();
        match model {
            Model::Llava(_) => llava,
            Model::Clip(_) => Self {
                targets: AdapterSpec::default_for_clip().targets,
                ..llava
            },
        }
    }

    fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            targets: self.targets.clone(),
            rank: self.rank,
            alpha: self.alpha,
            particles: self.particles,
        }
    }
}

/// How a run is driven (does not change its result).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub resume: bool,
    /// Train over a particle set in `out` that has no committed checkpoint.
    pub force: bool,
    /// Evaluate on the validation sample every this many steps (and at the end).
    pub eval_every: u64,
    /// Questions of the validation set used for the running evaluation.
    pub val_sample: usize,
    pub checkpoint_every: u64,
    /// Stop after this many steps in total (e.g. to split a run); the checkpoint allows resuming.
    pub max_steps: Option<u64>,
    pub progress: bool,
    /// What `--model` was (recorded as the base model of the particles, as given: the CLI stores
    /// a directory as its absolute path).
    pub model_source: String,
    /// Keep one decoder layer's activations at a time and run each layer again for its backward
    /// pass (LLaVA): a step's memory no longer grows with the depth, for one more forward pass.
    /// Gradients equal those without it up to rounding; not part of the run's settings.
    pub gradient_checkpointing: bool,
}

/// The training log in the output directory: one [`Evaluation`] a line.
pub const LOG_FILE: &str = "train_log.jsonl";
/// The summary of a run in the output directory ([`TrainSummary`]).
pub const SUMMARY_FILE: &str = "train_summary.json";

/// The longest answer a particle generates to a validation question at each evaluation.
const EVAL_MAX_NEW_TOKENS: usize = 8;

/// What a run does with a set of questions, which decides what it needs of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trained on: the prompt with its answer must fit the model.
    Training,
    /// Answered at each evaluation (`--val`): the prompt must fit the model.
    Validation,
}

/// The questions of `examples` that a run cannot use in `role` taken out, each with why: a
/// question with nothing visible in it, a LLaVA prompt (with its answer, in training) longer
/// than the model's positions, an answer that tokenises to nothing, a CLIP question and answer
/// longer than its text positions. Found before the first step, so that no evaluation stops a
/// run midway; `train` stops at the first one named, or leaves them out with `--skip-bad`.
pub fn take_unfit(
    loaded: &LoadedModel,
    examples: &mut Vec<VqaExample>,
    role: Role,
) -> Result<Vec<(String, String)>> {
    let prompter = loaded.prompter()?;
    // CLIP: every question with its own answer (a record whose answer is too long is that
    // record's fault), in one pass; then a training question that fits with the longest answer
    // of the vocabulary those make (every step scores it against each answer). A validation
    // question meets the training vocabulary's longest in `Objective::new`.
    let clip_unfit = match &loaded.model {
        Model::Clip(m) => {
            let positions = m.config().text_config.max_position_embeddings;
            let texts: Vec<String> = examples
                .iter()
                .map(|ex| clip_prompt(&ex.question, &target_answer(ex).unwrap_or_default()))
                .collect();
            let mut unfit = prompter.clip_texts_unfit(&texts, positions)?;
            if role == Role::Training {
                let fitting = examples
                    .iter()
                    .zip(&unfit)
                    .filter(|(_, why)| why.is_none())
                    .map(|(ex, _)| ex);
                let vocabulary = clip_vocabulary(fitting, MAX_CLIP_VOCABULARY);
                if let Some(longest) = longest_answer(prompter, &vocabulary) {
                    let texts: Vec<String> = examples
                        .iter()
                        .map(|ex| clip_prompt(&ex.question, &longest))
                        .collect();
                    let with_longest = prompter.clip_texts_unfit(&texts, positions)?;
                    for (why, other) in unfit.iter_mut().zip(with_longest) {
                        if why.is_none() {
                            *why = other.map(|o| longest_answer_unfit(&longest, &o));
                        }
                    }
                }
            }
            unfit
        }
        Model::Llava(_) => Vec::new(),
    };
    let fits = |i: usize, ex: &VqaExample| -> Result<()> {
        match &loaded.model {
            Model::Llava(m) => {
                let image_tokens = m.config().image_tokens_per_image();
                match role {
                    Role::Training => encode_training(prompter, image_tokens, ex).map(drop),
                    Role::Validation => {
                        let prompt = prompter
                            .encode_question(&ex.question, true, image_tokens, None)?
                            .len();
                        let positions = m.config().text_config.max_position_embeddings;
                        if prompt + EVAL_MAX_NEW_TOKENS > positions {
                            bail!(
                                "the prompt is {prompt} tokens long: with the {EVAL_MAX_NEW_TOKENS} \
                                 tokens of an answer at each evaluation, more than the model's \
                                 {positions} positions (max_position_embeddings): shorten the \
                                 question"
                            );
                        }
                        Ok(())
                    }
                }
            }
            Model::Clip(_) => {
                crate::models::prompt::visible_question(&ex.question).context(
                    "the question is empty (blanks, control or invisible characters only)",
                )?;
                match clip_unfit.get(i).cloned().flatten() {
                    Some(why) => bail!("{why}"),
                    None => Ok(()),
                }
            }
        }
    };
    // Tokenising tens of thousands of prompts takes seconds: on every core.
    let verdicts: Vec<Option<String>> = examples
        .par_iter()
        .enumerate()
        .map(|(i, ex)| fits(i, ex).err().map(|e| format!("{e:#}")))
        .collect();
    let mut unfit = Vec::new();
    let mut kept = Vec::with_capacity(examples.len());
    for (ex, why) in std::mem::take(examples).into_iter().zip(verdicts) {
        match why {
            None => kept.push(ex),
            Some(why) => unfit.push((ex.question_id.clone(), why)),
        }
    }
    *examples = kept;
    Ok(unfit)
}

/// The answer of `vocabulary` with the most tokens (`None` for an empty one).
fn longest_answer(prompter: &Prompter, vocabulary: &[String]) -> Option<String> {
    vocabulary
        .iter()
        .max_by_key(|a| prompter.count_text_tokens(a).unwrap_or(usize::MAX))
        .cloned()
}

/// Why a CLIP question does not fit with the vocabulary's longest answer `longest` (`why`: what
/// the tokenizer said of the question with it), saying where that answer comes from.
fn longest_answer_unfit(longest: &str, why: &str) -> String {
    format!(
        "scored against every answer of the vocabulary, it does not fit with the longest, \
         {longest:?}: {why}"
    )
}

/// A LLaVA training question as token ids: its prompt and its target answer.
fn encode_training(
    prompter: &Prompter,
    image_tokens: usize,
    ex: &VqaExample,
) -> Result<EncodedExample> {
    let answer = target_answer(ex).context("no answers to train on")?;
    encode_example(prompter, image_tokens, &ex.question, &answer)
}

/// Refuses input files (`--data`, `--val`, their annotations) that are files `train` writes or
/// rewrites in `out`: a data file named `train_log.jsonl` in `out` was cut to the log's lines.
pub fn check_inputs_are_not_outputs(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(out) else {
        return Ok(()); // Not there yet: nothing in it to write over.
    };
    let written = [
        crate::bella::particles::PARTICLES_FILE,
        crate::bella::particles::CONFIG_FILE,
        crate::data::seen::FILE,
        LOG_FILE,
        SUMMARY_FILE,
    ];
    for (option, input) in inputs {
        let Ok(path) = std::fs::canonicalize(input) else {
            continue;
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let over = (path.parent() == Some(out.as_path()) && written.contains(&name))
            || path.starts_with(checkpoint::checkpoints_dir(&out));
        if over {
            bail!(
                "{option} {} is a file train writes in --out {}: move it out of there, or choose \
                 another --out",
                input.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Evaluation {
    pub step: u64,
    pub epoch: f64,
    /// Mean training loss (NLL + prior, per particle) since the last evaluation.
    pub train_loss: f64,
    pub lr: f64,
    /// Mean VQA accuracy of each particle's own greedy answer on the validation sample.
    pub val_accuracy: Option<f64>,
    /// VQA accuracy of the particles' majority answer.
    pub val_accuracy_vote: Option<f64>,
    /// Mean pairwise ‖ΔW_i − ΔW_j‖_F over all adapted layers.
    pub mean_pairwise_distance: f64,
    /// The share of particle pairs whose greedy answers differ on the validation sample
    /// ([`diversity::pairwise_disagreement`]); `None` with one particle or no validation data.
    #[serde(default)]
    pub val_disagreement: Option<f64>,
    /// Training questions per second (a step takes `batch_size` questions, whatever the method),
    /// over the steps of this invocation.
    pub examples_per_second: f64,
    /// Question–particle pairs per second (`particles` × `examples_per_second`).
    #[serde(default)]
    pub particle_examples_per_second: f64,
    /// Seconds since this invocation's first step (a `--resume` counts from its own start: the
    /// time a stopped run spent is not known, only its steps).
    pub elapsed_seconds: f64,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub steps: u64,
    pub total_steps: u64,
    pub last: Option<Evaluation>,
    pub out: PathBuf,
    pub finished: bool,
    /// Stopped before `--max-steps` or the last step by Ctrl-C ([`crate::interrupt`]), after a
    /// checkpoint of `steps`.
    pub interrupted: bool,
    /// The stop came in the evaluation of `steps`: a resumed run makes it first.
    pub evaluation_pending: bool,
    /// The particles' diversity over the whole run (every evaluation of `train_log.jsonl`,
    /// resumed parts included); `None` when nothing was evaluated.
    pub diversity: Option<diversity::DiversitySummary>,
}

/// `train_summary.json`: the options of the run (the repulsion weight among them) and the
/// particles' diversity over training, rewritten whenever a run stops or finishes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub step: u64,
    pub total_steps: u64,
    pub options: TrainOptions,
    /// What the frozen base computed in (`f32`, `bf16, q8_0`: [`crate::models::ModelInfo::compute_label`]).
    #[serde(default)]
    pub compute: Option<String>,
    pub diversity: Option<diversity::DiversitySummary>,
}

/// Summarises the diversity of every evaluation in the log and writes `train_summary.json`.
fn write_summary(
    out: &Path,
    log_path: &Path,
    opts: &TrainOptions,
    compute: &str,
    step: u64,
    total_steps: u64,
) -> Result<Option<diversity::DiversitySummary>> {
    let text = match std::fs::read_to_string(log_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", log_path.display())),
    };
    let points: Vec<diversity::DiversityPoint> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Evaluation>(line).ok())
        .map(|e| diversity::DiversityPoint {
            step: e.step,
            val_disagreement: e.val_disagreement,
            mean_pairwise_distance: e.mean_pairwise_distance,
        })
        .collect();
    let summary = TrainSummary {
        step,
        total_steps,
        options: opts.clone(),
        compute: Some(compute.to_string()),
        diversity: diversity::summarize(&points),
    };
    crate::io::write_bytes_atomically(
        &out.join(SUMMARY_FILE),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary.diversity)
}

/// Trainable factors of every adapted layer, as variables.
struct Params {
    names: Vec<String>,
    a: Vec<Var>,
    b: Vec<Var>,
    scale: f64,
}

impl Params {
    /// Makes every adapter's factors variables and puts the variables' tensors into the layers.
    fn install<M: ParticleModel + ?Sized>(model: &mut M) -> Result<Self> {
        let mut p = Params {
            names: Vec::new(),
            a: Vec::new(),
            b: Vec::new(),
            scale: 1.0,
        };
        for (name, layer) in model.linears_mut() {
            let Some(ad) = layer.adapter().cloned() else {
                continue;
            };
            let a = Var::from_tensor(&ad.a.to_dtype(DType::F32)?)?;
            let b = Var::from_tensor(&ad.b.to_dtype(DType::F32)?)?;
            layer.set_adapter(Some(Adapter::new(
                a.as_tensor().clone(),
                b.as_tensor().clone(),
                ad.scale,
            )?))?;
            p.scale = ad.scale;
            p.names.push(name);
            p.a.push(a);
            p.b.push(b);
        }
        if p.names.is_empty() {
            bail!("no layer carries particles");
        }
        Ok(p)
    }

    fn vars(&self) -> Vec<Var> {
        self.a.iter().chain(&self.b).cloned().collect()
    }

    /// Puts the factors into the model's layers: as the variables (training), or detached
    /// (answering, which needs no gradients: a variable in a product keeps the product's whole
    /// graph while its result lives, gigabytes for the thousands of texts a CLIP scores for one
    /// question). Both share the variables' storage, so a detached factor sees every update.
    fn put<M: ParticleModel + ?Sized>(&self, model: &mut M, detached: bool) -> Result<()> {
        for (name, layer) in model.linears_mut() {
            let Some(i) = self.names.iter().position(|n| *n == name) else {
                continue;
            };
            let scale = layer.adapter().map_or(self.scale, |ad| ad.scale);
            let (a, b) = (self.a[i].as_tensor(), self.b[i].as_tensor());
            let (a, b) = if detached {
                (a.detach(), b.detach())
            } else {
                (a.clone(), b.clone())
            };
            layer.set_adapter(Some(Adapter::new(a, b, scale)?))?;
        }
        Ok(())
    }

    fn var_names(&self) -> Vec<String> {
        let a = self.names.iter().map(|n| format!("{n}.bella_A"));
        let b = self.names.iter().map(|n| format!("{n}.bella_B"));
        a.chain(b).collect()
    }

    /// ‖φ_p‖² per particle, `[P]`.
    fn sq_norms(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for v in self.a.iter().chain(&self.b) {
            let per = v.as_tensor().sqr()?.flatten_from(1)?.sum(1)?;
            total = Some(match total {
                Some(t) => (t + per)?,
                None => per,
            });
        }
        total.context("no parameters")
    }

    fn mean_pairwise_distance(&self) -> Result<f64> {
        let layers: Vec<LayerFactors> = self
            .a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| LayerFactors {
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: self.scale,
            })
            .collect();
        let d = delta_w_sq_distances(&layers)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        Ok(diversity::mean_pairwise_distance(&d))
    }
}

/// Per-particle data order: a permutation of `0..n` for (seed, epoch, stream).
fn order(n: usize, seed: u64, epoch: usize, stream: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((epoch as u64) << 32)
        .wrapping_add(stream as u64);
    idx.shuffle(&mut StdRng::seed_from_u64(mix));
    idx
}

/// The fingerprint of the training questions, in order (moving the data set keeps it: only the
/// image file names count, not their folders).
fn fingerprint(train: &[VqaExample]) -> Result<checkpoint::DataFingerprint> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for ex in train {
        let image = ex.image.file_name().map(|n| n.to_string_lossy());
        hasher.update(serde_json::to_vec(&(
            &ex.question_id,
            &ex.question,
            &ex.answers,
            image,
        ))?);
        hasher.update(b"\n");
    }
    Ok(checkpoint::DataFingerprint {
        questions: train.len(),
        sha256: format!("{:x}", hasher.finalize()),
    })
}

/// `out` has no committed checkpoint. Checkpoint directories there without one are what a kill
/// before the first commit leaves (pruned; the run starts at step 0, as `--resume` after such a
/// kill must). But particles at the top of `out` mean finished work (perhaps calibrated) whose
/// checkpoints were lost or deleted: not trained over without `--force`.
fn check_nothing_to_lose(run: &RunOptions) -> Result<()> {
    let out = &run.out;
    if ParticleSet::is_in(out) && !run.force {
        let left = match checkpoint::step_dirs(out).last() {
            Some(_) if imported_here(out) => format!(
                " (they were imported from PEFT adapters: {} holds leftovers of the training run \
                 they replaced; remove it)",
                checkpoint::checkpoints_dir(out).display()
            ),
            Some(newest) => format!(
                " (if {} is the checkpoint to continue, write its name into checkpoints/latest and \
                 resume)",
                newest.display()
            ),
            None => String::new(),
        };
        bail!(
            "{} holds particles but no committed checkpoint{}: training would replace them; \
             choose another --out, or pass --force to train over them{left}",
            out.display(),
            if run.resume { " to resume" } else { "" }
        );
    }
    if run.resume && run.progress {
        crate::note!("nothing to resume in {}: starting at step 0", out.display());
    }
    Ok(())
}

/// Whether the particle set in `out` was imported from PEFT adapters (import-peft): training
/// files beside it are leftovers of a set it replaced.
fn imported_here(out: &Path) -> bool {
    ParticleSet::read_config(out).is_ok_and(|c| c.method == crate::bella::peft::IMPORTED_METHOD)
}

/// What differs between a checkpoint and the run asked to resume it, one line each.
fn resume_differences(
    ck: &checkpoint::Loaded,
    opts: &TrainOptions,
    data: &checkpoint::DataFingerprint,
    base: &BaseModel,
    compute: &str,
) -> Result<Vec<String>> {
    let mut diffs = Vec::new();
    if let Some(old) = ck.state.compute.as_deref().filter(|old| *old != compute) {
        diffs.push(format!(
            "the base computes in {old} in the checkpoint, {compute} now (--dtype, --quantize, \
             --quantize-vision)"
        ));
    }
    let (before, now) = (
        serde_json::to_value(&ck.state.options)?,
        serde_json::to_value(opts)?,
    );
    if let (serde_json::Value::Object(before), serde_json::Value::Object(now)) = (&before, &now) {
        for (key, old) in before {
            let new = now.get(key).unwrap_or(&serde_json::Value::Null);
            if old != new {
                diffs.push(format!("option {key}: {old} in the checkpoint, {new} now"));
            }
        }
    }
    if let Some(old) = &ck.state.data {
        if old != data {
            diffs.push(format!(
                "training data: {} questions (sha256 {}) in the checkpoint, {} questions (sha256 {}) now",
                old.questions, old.sha256, data.questions, data.sha256
            ));
        }
    }
    let old = &ck.set.config.base_model.weights;
    if *old != base.weights {
        let list = |w: &[crate::bella::particles::FileHash]| {
            w.iter()
                .map(|f| format!("{} sha256 {}", f.name, f.sha256))
                .collect::<Vec<_>>()
                .join(", ")
        };
        diffs.push(format!(
            "base model weights: {} in the checkpoint, {} now ({})",
            list(old),
            list(&base.weights),
            base.source
        ));
    }
    Ok(diffs)
}

/// Keeps the lines of the training log up to `step` (what the committed checkpoint has seen):
/// lines of steps after it, or cut off by a kill, belong to lost work. Returns the lines kept.
/// (A checkpoint that carries its log has had it copied to `path` already; this is for those of
/// older versions, and for a fresh run over a log that no checkpoint committed.)
fn truncate_log(path: &Path, step: u64) -> Result<Vec<u8>> {
    let Some(bytes) = crate::input::read_if_present(path, "training log")? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&bytes);
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| {
            line.ends_with('\n')
                && serde_json::from_str::<Evaluation>(line).is_ok_and(|e| e.step <= step)
        })
        .collect();
    if kept != text {
        crate::io::write_bytes_atomically(path, kept.as_bytes())?;
    }
    Ok(kept.into_bytes())
}

/// Trains particles on `train` and writes them (with checkpoints and a JSON log) to `run.out`.
pub fn train(
    loaded: &mut LoadedModel,
    train: &[VqaExample],
    val: &[VqaExample],
    opts: &TrainOptions,
    run: &RunOptions,
) -> Result<TrainReport> {
    opts.validate()?;
    run.validate()?;
    if run.gradient_checkpointing && matches!(loaded.model, Model::Clip(_)) {
        bail!(
            "--gradient-checkpointing applies to LLaVA models; train this CLIP without it (a \
             CLIP's training step keeps one chunk of its texts and images at a time anyway)"
        );
    }
    let base = BaseModel {
        source: run.model_source.clone(),
        revision: match &loaded.files.origin {
            Origin::HubCache { revision, .. } => Some(revision.clone()),
            Origin::Directory => None,
        },
        commit: match &loaded.files.origin {
            Origin::HubCache { commit, .. } => Some(commit.clone()),
            Origin::Directory => None,
        },
        weights: hash_weights(&loaded.files)?,
    };
    loaded.prompter()?;
    loaded.image_processor()?;
    let (Some(prompter), Some(processor)) = (&loaded.prompter, &loaded.image_processor) else {
        bail!("the model needs a tokenizer and an image processor to train");
    };
    if train.is_empty() {
        bail!("the training data is empty");
    }
    // A CLIP answers from its most frequent training answers: questions with another answer
    // cannot teach it anything right.
    let clip_kept;
    let train = if let Model::Clip(_) = &loaded.model {
        let (kept, left_out) = clip_trainable(train, MAX_CLIP_VOCABULARY);
        if left_out > 0 && run.progress {
            crate::note!(
                "left out {left_out} of {} training questions whose answer is not among the {} \
                 most frequent training answers, the answers a CLIP can give",
                train.len(),
                MAX_CLIP_VOCABULARY
            );
        }
        clip_kept = kept;
        &clip_kept[..]
    } else {
        train
    };
    let stop = loaded.stop_token_ids();
    // The frozen base's compute, which changes what a step makes of the particles.
    let compute = loaded.info.compute_label();
    let val_sample = &val[..run.val_sample.min(val.len())];
    // Every evaluation answers these: one the model cannot answer would stop the run midway.
    if let Some((id, why)) = take_unfit(loaded, &mut val_sample.to_vec(), Role::Validation)?.first()
    {
        bail!("validation question {id:?} cannot be answered: {why}");
    }
    let model: &mut Model = &mut loaded.model;
    let objective = Objective::new(model, prompter, processor, train, val_sample, stop)?;
    let n = train.len();
    let batch = opts.batch_size.min(n);
    let steps_per_epoch = (n / batch) as u64;
    if run.progress {
        if opts.batch_size > n {
            crate::note!(
                "--batch-size {} is more than the {n} training question(s): batches of {n}",
                opts.batch_size
            );
        } else if n % batch != 0 {
            crate::note!(
                "each epoch trains on {} of the {n} questions ({} batches of {batch}): the {} \
                 left out differ from epoch to epoch",
                steps_per_epoch as usize * batch,
                steps_per_epoch,
                n % batch
            );
        }
    }
    let total_steps = steps_per_epoch * opts.epochs as u64;
    let warmup = ((total_steps as f64) * opts.warmup).round() as u64;
    let data = fingerprint(train)?;
    let val_data = fingerprint(val_sample)?;

    // Fresh particles, or the committed checkpoint (its top-level copies repaired first).
    crate::io::create_dir_all(&run.out)?;
    let existing = checkpoint::latest(&run.out)?;
    // A set trained over (--force): its files stay whole until the first checkpoint commits.
    let replacing = existing.is_none() && ParticleSet::is_in(&run.out);
    if existing.is_none() {
        check_nothing_to_lose(run)?;
    }
    checkpoint::prune(&run.out)?;
    // What calibrate and bench check their questions against (crate::data::seen).
    let questions = crate::data::seen::encode(train);
    let (params, mut optimizer, start_step, (pending_loss, pending_evaluation)) = match (
        existing, run.resume,
    ) {
        (Some(dir), true) => {
            // Resuming would put the checkpoint's particles back over imported ones.
            if imported_here(&run.out) {
                bail!(
                    "the particles in {} were imported from PEFT adapters (import-peft) after the \
                     checkpoints of its training run ({}), which an interrupted import left \
                     behind: resuming would replace the imported particles; remove {} and \
                     {LOG_FILE} there to keep them, or train into another --out",
                    run.out.display(),
                    dir.display(),
                    checkpoint::checkpoints_dir(&run.out).display()
                );
            }
            let ck = checkpoint::load(&dir)?;
            let diffs = resume_differences(&ck, opts, &data, &base, &compute)?;
            if !diffs.is_empty() {
                bail!(
                    "the checkpoint {} was made with other training options, data or base model, so it cannot be resumed:\n  {}\nresume with the same ones, or use another --out",
                    dir.display(),
                    diffs.join("\n  ")
                );
            }
            if let Some(old) = ck.state.val.as_ref().filter(|old| **old != val_data) {
                crate::note!(
                    "warning: the validation sample differs from the one this run began with ({} \
                     questions then, {} now): the evaluations of {} up to step {} were made on the \
                     other; pass the same --val and --val-sample to keep the log comparable",
                    old.questions,
                    val_data.questions,
                    run.out.join(LOG_FILE).display(),
                    ck.state.step
                );
            }
            // With the checkpoint's own questions (the fingerprint above says they are these).
            checkpoint::publish(&run.out, &dir, &questions)?;
            if run.progress {
                crate::note!(
                    "resuming from step {} of {total_steps} ({})",
                    ck.state.step,
                    dir.display()
                );
            }
            ck.set.attach_to(model)?;
            let params = Params::install(model)?;
            let mut optimizer = AdamW::new(&params.vars(), 0.0)?;
            optimizer.restore(&params.var_names(), &ck.optimizer, ck.state.step)?;
            let pending = ck.state.pending_loss.unwrap_or((0.0, 0));
            let evaluation = ck.state.pending_evaluation;
            (params, optimizer, ck.state.step, (pending, evaluation))
        }
        (Some(dir), false) => bail!(
            "{} already holds a training run (checkpoint {}): pass --resume to continue it, or choose another --out",
            run.out.display(),
            dir.display()
        ),
        (None, _) => {
            let init = if opts.init_b_std > 0.0 {
                InitB::Normal {
                    std: opts.init_b_std,
                }
            } else {
                InitB::Zero
            };
            let spec = opts.spec();
            attach(model, &spec, init, opts.seed)?;
            let inert = model
                .inert_linears()
                .into_iter()
                .filter(|path| spec.matches(path))
                .count();
            if inert > 0 && run.progress {
                crate::note!(
                    "left out {inert} targeted layer(s) the model never runs (vision layers above \
                     vision_feature_layer): particles there could not change an answer"
                );
            }
            let params = Params::install(model)?;
            let optimizer = AdamW::new(&params.vars(), 0.0)?;
            (params, optimizer, 0, ((0.0, 0), None))
        }
    };

    let p = opts.particles;
    if let Some(needed) = step_activation_bytes(model, &objective, p * batch, run) {
        let available = crate::models::compute::mem_available_bytes();
        // The estimate ran up to a fifth under the measured peaks at 7B width (eval/TRAINING.md):
        // said from 80 % of what is available.
        if let Some(available) = available.filter(|&a| needed > a / 5 * 4) {
            use crate::models::compute::size;
            let checkpointing = if run.gradient_checkpointing {
                ""
            } else {
                ", or pass --gradient-checkpointing"
            };
            crate::note!(
                "warning: a training step may keep ~{} of activations ({} rows of up to {} \
                 tokens), {} available: lower --batch-size or --particles, or put the particles \
                 on the top layers only (--targets){checkpointing}",
                size(needed),
                p * batch,
                objective.longest().unwrap_or(0),
                size(available)
            );
        }
    }
    let config = ParticleConfig {
        format_version: 1,
        base_model: base,
        architecture: loaded_architecture(model).into(),
        targets: opts.targets.clone(),
        layers: params.names.clone(),
        rank: opts.rank,
        alpha: opts.alpha,
        particles: p,
        method: match opts.method {
            Method::Ensemble => "ensemble".into(),
            Method::Svgd => "svgd".into(),
        },
        seed: opts.seed,
        step: start_step,
        abstention: None,
        abstention_history: Vec::new(),
        answer_vocabulary: objective.vocabulary(),
        particles_sha256: None,
    };
    let log_path = run.out.join(LOG_FILE);
    // A replaced set keeps its log until the first checkpoint commits: the lines wait till then.
    let mut log = if replacing {
        Log {
            lines: Vec::new(),
            file: None,
        }
    } else {
        Log {
            lines: truncate_log(&log_path, start_step)?,
            file: Some(crate::io::AppendFile::open(&log_path, None)?),
        }
    };

    // A checkpoint already past --max-steps stays where it is.
    let end_step = run
        .max_steps
        .map_or(total_steps, |m| m.min(total_steps))
        .max(start_step);
    if end_step == start_step && start_step < total_steps && run.progress {
        crate::note!("already at step {start_step} (--max-steps): nothing to train");
    }
    if end_step > start_step
        && ParticleSet::read_config(&run.out).is_ok_and(|c| c.abstention.is_some())
    {
        crate::note!(
            "warning: the particles in {} are calibrated; training replaces them, and their \
             calibration with them: run calibrate again afterwards",
            run.out.display()
        );
    }
    let bar = progress_bar(run.progress, end_step, start_step);
    let started = Instant::now();
    let (mut loss_sum, mut loss_count) = pending_loss;
    let mut steps_run = 0usize;
    let mut last_eval: Option<Evaluation> = None;
    let n_data = n as f64;

    let save_checkpoint = |step: u64,
                           params: &Params,
                           optimizer: &AdamW,
                           model: &Model,
                           pending: (f64, usize, Option<&Evaluation>),
                           log: &[u8]|
     -> Result<()> {
        let (loss_sum, loss_count, pending_evaluation) = pending;
        let mut cfg = config.clone();
        cfg.step = step;
        let set = ParticleSet::from_model(model, cfg);
        let state = checkpoint::TrainerState {
            step,
            options: opts.clone(),
            data: Some(data.clone()),
            val: Some(val_data.clone()),
            compute: Some(compute.clone()),
            pending_loss: Some((loss_sum, loss_count)),
            pending_evaluation: pending_evaluation.cloned(),
        };
        checkpoint::save(
            &run.out,
            &set,
            &optimizer.state(&params.var_names()),
            &state,
            log,
            &questions,
        )?;
        Ok(())
    };

    // A log line whose evaluation a stop interrupted comes first (its step's checkpoint holds it).
    let mut saved_at = start_step;
    let mut evaluation_pending = false;
    if let Some(mut line) = pending_evaluation {
        match evaluate_into(&mut line, &objective, model, &params, val_sample, p) {
            Err(e) if e.is::<Interrupted>() => evaluation_pending = true,
            evaluated => {
                evaluated?;
                append_log_line(&mut log, &line)?;
                last_eval = Some(line);
            }
        }
    }
    // Where the run stops: `end_step`, or earlier when interrupted (a stop asked for while the
    // model loaded ends it before its first step).
    let mut stopped_at = if crate::interrupt::requested() {
        start_step
    } else {
        end_step
    };
    for step in start_step..stopped_at {
        let epoch = (step / steps_per_epoch) as usize;
        let s = (step % steps_per_epoch) as usize;
        // Ensemble: every particle its own order (rows particle-major); SVGD: one shared batch.
        let streams: Vec<usize> = match opts.method {
            Method::Ensemble => (0..p).collect(),
            Method::Svgd => vec![p],
        };
        let mut picked: Vec<usize> = Vec::with_capacity(streams.len() * batch);
        for &stream in &streams {
            let ord = order(n, opts.seed, epoch, stream);
            picked.extend_from_slice(&ord[s * batch..(s + 1) * batch]);
        }
        let expanded = opts.method == Method::Ensemble && p > 1;
        // The NLL comes detached, its gradients already in `grads`; the prior's join them below.
        let mut grads = VarGrads::new(&params.vars());
        let checkpointing = run.gradient_checkpointing;
        let nll = match objective.loss(
            model,
            train,
            &picked,
            p,
            expanded,
            &mut grads,
            checkpointing,
        ) {
            // Ctrl-C (crate::interrupt) during the step's passes: the step is dropped (a resumed
            // run makes it again) and the last finished one kept.
            Err(e) if e.is::<Interrupted>() => {
                if step > saved_at {
                    let pending = (loss_sum, loss_count, None);
                    save_checkpoint(step, &params, &optimizer, model, pending, &log.lines)?;
                    open_log(&mut log, &log_path)?;
                }
                stopped_at = step;
                break;
            }
            nll => nll?,
        };
        let prior = (params.sq_norms()? / (2.0 * opts.prior_std.powi(2) * n_data))?;
        let per_particle = (nll + prior)?;
        let loss = per_particle.sum_all()?;
        let loss_value = loss.to_scalar::<f32>()? as f64 / p as f64;
        if !loss_value.is_finite() {
            return Err(diverged(&run.out, step, &format!("loss {loss_value}"))?);
        }
        // Detached (`VarGrads`): candle's gradient of a variable keeps the step's forward graph
        // alive, and whatever is built from it (the SVGD direction, the AdamW moments) would too.
        grads.add(&loss.backward()?)?;
        let grad_of = |v: &Var| -> Result<Tensor> { Ok(grads.get(v)?) };
        let mut update: Vec<Tensor> = match opts.method {
            Method::Ensemble => params.vars().iter().map(grad_of).collect::<Result<_>>()?,
            Method::Svgd => {
                // g = ∇ log p(φ | D) = −N·∇(per-example loss); ψ ascends; AdamW gets −ψ/N.
                let ga: Vec<Tensor> = params
                    .a
                    .iter()
                    .map(|v| Ok((grad_of(v)? * -n_data)?))
                    .collect::<Result<_>>()?;
                let gb: Vec<Tensor> = params
                    .b
                    .iter()
                    .map(|v| Ok((grad_of(v)? * -n_data)?))
                    .collect::<Result<_>>()?;
                let factors: Vec<(Tensor, Tensor)> = params
                    .a
                    .iter()
                    .zip(&params.b)
                    .map(|(a, b)| (a.as_tensor().detach(), b.as_tensor().detach()))
                    .collect();
                let layers: Vec<LayerFactors> = factors
                    .iter()
                    .map(|(a, b)| LayerFactors {
                        a,
                        b,
                        scale: params.scale,
                    })
                    .collect();
                let space = match opts.kernel {
                    Kernel::Params => KernelSpace::Parameters,
                    Kernel::DeltaW => KernelSpace::DeltaW,
                };
                let psi = svgd_direction_weighted(&layers, &ga, &gb, space, opts.repulsion)?;
                psi.grad_a
                    .iter()
                    .chain(&psi.grad_b)
                    .map(|g| Ok((g * (-1.0 / n_data))?))
                    .collect::<Result<_>>()?
            }
        };
        // An overflowed norm would scale the update to nothing (Inf) or spread NaN: diverged.
        let norms = clip_per_particle(&mut update, opts.grad_clip)?;
        if let Some((p, norm)) = norms.iter().enumerate().find(|(_, n)| !n.is_finite()) {
            let what = format!("particle {p}'s gradient norm {norm}");
            return Err(diverged(&run.out, step, &what)?);
        }
        let lr = learning_rate(step, warmup, total_steps, opts.lr, opts.min_lr);
        optimizer.step(&params.vars(), &update, lr)?;

        loss_sum += loss_value;
        loss_count += 1;
        steps_run += 1;
        let done = step + 1;
        bar.set_position(done);
        bar.set_message(format!("loss {loss_value:.4}"));

        let at_end = done == end_step;
        if done % run.eval_every.max(1) == 0 || at_end {
            let questions_per_second =
                (steps_run * batch) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let mut eval = Evaluation {
                step: done,
                epoch: done as f64 / steps_per_epoch as f64,
                train_loss: loss_sum / loss_count.max(1) as f64,
                lr,
                val_accuracy: None,
                val_accuracy_vote: None,
                mean_pairwise_distance: params.mean_pairwise_distance()?,
                val_disagreement: None,
                examples_per_second: questions_per_second,
                particle_examples_per_second: questions_per_second * p as f64,
                elapsed_seconds: started.elapsed().as_secs_f64(),
            };
            loss_sum = 0.0;
            loss_count = 0;
            match evaluate_into(&mut eval, &objective, model, &params, val_sample, p) {
                // The step is kept; its line waits in the checkpoint for a resumed run.
                Err(e) if e.is::<Interrupted>() => {
                    let pending = (0.0, 0, Some(&eval));
                    save_checkpoint(done, &params, &optimizer, model, pending, &log.lines)?;
                    open_log(&mut log, &log_path)?;
                    evaluation_pending = true;
                    stopped_at = done;
                    break;
                }
                evaluated => evaluated?,
            }
            append_log_line(&mut log, &eval)?;
            bar.set_message(format!(
                "loss {:.4} · val acc {} · distance {:.3} · disagreement {}",
                eval.train_loss,
                eval.val_accuracy
                    .map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
                eval.mean_pairwise_distance,
                eval.val_disagreement
                    .map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
            ));
            last_eval = Some(eval);
        }
        let checkpoint_due =
            done % run.checkpoint_every.max(1) == 0 || at_end || done % steps_per_epoch == 0;
        // Ctrl-C (crate::interrupt) after the step's passes: the step is finished and kept.
        let stop = !at_end && crate::interrupt::requested();
        if checkpoint_due || stop {
            let pending = (loss_sum, loss_count, None);
            // The checkpoint carries the log; committed, the top-level log is its copy.
            save_checkpoint(done, &params, &optimizer, model, pending, &log.lines)?;
            open_log(&mut log, &log_path)?;
            saved_at = done;
        }
        if stop {
            stopped_at = done;
            break;
        }
    }
    bar.finish_and_clear();
    // Stopped before its first checkpoint, a run over a set leaves that set's summary.
    let summary = match log.file {
        None => None,
        Some(_) => write_summary(&run.out, &log_path, opts, &compute, stopped_at, total_steps)?,
    };
    Ok(TrainReport {
        steps: stopped_at,
        total_steps,
        last: last_eval,
        out: run.out.clone(),
        finished: stopped_at == total_steps && !evaluation_pending,
        interrupted: stopped_at < end_step || evaluation_pending,
        evaluation_pending,
        diversity: summary,
    })
}

/// A rough figure for the activations a LLaVA training step keeps for its backward pass
/// ([`objective::activation_bytes`] of `rows` rows): of the longest sequence through the
/// language-model layers from the lowest with particles up, and of their images through the
/// vision-tower layers from the lowest with particles up to the one read (each layered under
/// `--gradient-checkpointing`, the tower where one hidden state is read). It runs 1.5× over
/// the demo's measured peaks (P = 16 to 64, batch 1 to 8), and 4–22 % under them at 7B width
/// with ViT-L/14-336 (eval/TRAINING.md); `None` for a CLIP, whose step is chunked, and without
/// particles in either.
fn step_activation_bytes(
    model: &Model,
    objective: &Objective,
    rows: usize,
    run: &RunOptions,
) -> Option<u64> {
    let Model::Llava(m) = model else {
        return None;
    };
    let (t, v) = (&m.config().text_config, &m.config().vision_config);
    let language = m.language_model.lowest_adapted_layer().map(|lowest| {
        let (tokens, layered) = (objective.longest().unwrap_or(0), run.gradient_checkpointing);
        let layers = t.num_hidden_layers - lowest;
        objective::activation_bytes(rows, tokens, t.hidden_size, layers, layered)
    });
    let run_layers = m.vision_layers_run();
    let vision = m
        .vision_tower
        .lowest_adapted_layer()
        .filter(|&lowest| lowest < run_layers)
        .map(|lowest| {
            let (tokens, layers) = (v.grid().pow(2) + 1, run_layers - lowest);
            let layered = run.gradient_checkpointing && m.vision_checkpointed();
            objective::activation_bytes(rows, tokens, v.hidden_size, layers, layered)
        });
    match (language, vision) {
        (None, None) => None,
        (l, v) => Some((l.unwrap_or(0) + v.unwrap_or(0)) as u64),
    }
}

/// Fills in `line`'s evaluation of the particles on the validation sample (answering through
/// detached factors). `Err(Interrupted)` when a stop came first.
fn evaluate_into(
    line: &mut Evaluation,
    objective: &Objective,
    model: &mut Model,
    params: &Params,
    val: &[VqaExample],
    particles: usize,
) -> Result<()> {
    params.put(model, true)?;
    let evaluated = objective.evaluate(model, val, particles);
    params.put(model, false)?;
    (
        line.val_accuracy,
        line.val_accuracy_vote,
        line.val_disagreement,
    ) = evaluated?;
    Ok(())
}

fn append_log_line(log: &mut Log, eval: &Evaluation) -> Result<()> {
    let mut line = serde_json::to_vec(eval)?;
    line.push(b'\n');
    log.lines.extend_from_slice(&line);
    if let Some(file) = &mut log.file {
        file.append(&line)?;
    }
    Ok(())
}

/// After a checkpoint commits, the top-level log is its copy: lines are appended there from now.
fn open_log(log: &mut Log, path: &Path) -> Result<()> {
    if log.file.is_none() {
        log.file = Some(crate::io::AppendFile::open(path, None)?);
    }
    Ok(())
}

/// The lines of `train_log.jsonl`: all of the run's so far, which each checkpoint carries, and
/// the file they are appended to as they come.
struct Log {
    lines: Vec<u8>,
    /// `None` while held back: the log there is still that of the set being replaced, until the
    /// first checkpoint commits.
    file: Option<crate::io::AppendFile>,
}

fn progress_bar(show: bool, total: u64, start: u64) -> crate::console::Progress {
    crate::console::Progress::new(
        show,
        total,
        start,
        "steps",
        "{elapsed_precise} [{bar:30}] step {pos}/{len} ({eta} left) {msg}",
    )
}

fn loaded_architecture(model: &Model) -> &'static str {
    match model {
        Model::Llava(_) => "LLaVA",
        Model::Clip(_) => "CLIP",
    }
}

/// What the particles are trained to predict, per architecture (design §4).
enum Objective<'a> {
    /// Teacher-forced answer tokens after the prompt.
    Llava {
        prompter: &'a Prompter,
        processor: &'a ImageProcessor,
        encoded: Vec<EncodedExample>,
        pad_id: u32,
        /// The tokens that end a greedy validation answer ([`LoadedModel::stop_token_ids`]).
        stop: Vec<u32>,
    },
    /// Cross-entropy over an answer vocabulary built from the training answers.
    Clip {
        prompter: &'a Prompter,
        processor: &'a ImageProcessor,
        vocabulary: Vec<String>,
        targets: Vec<usize>,
    },
}

/// Largest CLIP answer vocabulary built from training answers.
const MAX_CLIP_VOCABULARY: usize = 500;

impl<'a> Objective<'a> {
    fn new(
        model: &Model,
        prompter: &'a Prompter,
        processor: &'a ImageProcessor,
        train: &[VqaExample],
        val: &[VqaExample],
        stop: Vec<u32>,
    ) -> Result<Self> {
        match model {
            Model::Llava(m) => {
                let image_tokens = m.config().image_tokens_per_image();
                // On every core: tens of thousands of prompts take seconds.
                let encoded = train
                    .par_iter()
                    .map(|ex| {
                        encode_training(prompter, image_tokens, ex)
                            .with_context(|| format!("training question {}", ex.question_id))
                    })
                    .collect::<Result<_>>()?;
                Ok(Objective::Llava {
                    prompter,
                    processor,
                    encoded,
                    pad_id: prompter
                        .pad_token_id()
                        .or(prompter.eos_token_id())
                        .unwrap_or(0),
                    stop,
                })
            }
            Model::Clip(m) => {
                let vocabulary = clip_vocabulary(train, MAX_CLIP_VOCABULARY);
                // A CLIP answers from the training answers: one of them would always be the
                // answer, with confidence 1, and nothing could abstain.
                if let [only] = vocabulary.as_slice() {
                    bail!(
                        "every training question has the answer {only:?}: a CLIP answers from the \
                         training answers, so it would always say {only:?}; give questions with \
                         at least two different answers"
                    );
                }
                // Every question, training or validation (answered at each evaluation), must
                // fit CLIP's text positions with the longest answer: found now, not mid-run.
                let positions = m.config().text_config.max_position_embeddings;
                let longest = longest_answer(prompter, &vocabulary).unwrap_or_default();
                let questions: Vec<(&str, &VqaExample)> = train
                    .iter()
                    .map(|ex| ("training", ex))
                    .chain(val.iter().map(|ex| ("validation (--val)", ex)))
                    .collect();
                let texts: Vec<String> = questions
                    .iter()
                    .map(|(_, ex)| clip_prompt(&ex.question, &longest))
                    .collect();
                let unfit = prompter.clip_texts_unfit(&texts, positions)?;
                if let Some(((kind, ex), why)) = questions
                    .iter()
                    .zip(&unfit)
                    .find_map(|(q, why)| Some((q, why.as_ref()?)))
                {
                    let why = longest_answer_unfit(&longest, why);
                    bail!("{kind} question {}: {why}", ex.question_id);
                }
                let targets = train
                    .iter()
                    .map(|ex| {
                        let answer = target_answer(ex).with_context(|| {
                            format!(
                                "training question {} has no answers to train on",
                                ex.question_id
                            )
                        })?;
                        let a = normalize_answer(&answer);
                        // `train` left out the questions beyond the vocabulary (clip_trainable).
                        vocabulary.iter().position(|v| *v == a).with_context(|| {
                            format!(
                                "training question {}: its answer {a:?} is not among the {} most \
                                 frequent training answers",
                                ex.question_id, MAX_CLIP_VOCABULARY
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(Objective::Clip {
                    prompter,
                    processor,
                    vocabulary,
                    targets,
                })
            }
        }
    }

    /// The longest training sequence in tokens (LLaVA; a CLIP's step is chunked).
    fn longest(&self) -> Option<usize> {
        match self {
            Objective::Llava { encoded, .. } => encoded.iter().map(|e| e.ids.len()).max(),
            Objective::Clip { .. } => None,
        }
    }

    fn vocabulary(&self) -> Option<Vec<String>> {
        match self {
            Objective::Clip { vocabulary, .. } => Some(vocabulary.clone()),
            Objective::Llava { .. } => None,
        }
    }

    /// Mean NLL per particle `[P]` of the examples `picked` (particle-major when `expanded`),
    /// detached; the gradients of its sum are added to `grads`. `checkpointing` (LLaVA): one
    /// decoder layer's activations at a time. A CLIP always keeps one chunk's
    /// ([`clip_loss_and_grads`]).
    #[allow(clippy::too_many_arguments)]
    fn loss(
        &self,
        model: &Model,
        train: &[VqaExample],
        picked: &[usize],
        particles: usize,
        expanded: bool,
        grads: &mut VarGrads,
        checkpointing: bool,
    ) -> Result<Tensor> {
        match (self, model) {
            (
                Objective::Llava {
                    processor,
                    encoded,
                    pad_id,
                    ..
                },
                Model::Llava(m),
            ) => {
                let enc: Vec<&EncodedExample> = picked.iter().map(|&i| &encoded[i]).collect();
                let images: Vec<&Path> = picked.iter().map(|&i| train[i].image.as_path()).collect();
                let b = make_batch(&enc, &images, processor, *pad_id)?;
                let input = LlavaInput {
                    input_ids: &b.input_ids,
                    pixel_values: Some(&b.pixel_values),
                    keep: &b.keep,
                    expanded,
                };
                let window = b.targets.dim(1)?;
                // A stop asked for in the forward pass drops the step before its backward one
                // (under checkpointing, between the backward pass's layers too).
                if checkpointing {
                    let nll = |logits: &Tensor| {
                        if crate::interrupt::check().is_err() {
                            candle_core::bail!("interrupted");
                        }
                        particle_nll(logits, &b, particles)
                    };
                    let window = (b.window_start, window);
                    let loss = m.window_loss_checkpointed(&input, particles, window, &nll, grads);
                    if loss.is_err() {
                        crate::interrupt::check()?;
                    }
                    return Ok(loss?);
                }
                let logits = m.forward_window(&input, particles, b.window_start, window)?;
                let nll = particle_nll(&logits, &b, particles)?;
                crate::interrupt::check()?;
                grads.add(&nll.sum_all()?.backward()?)?;
                Ok(nll.detach())
            }
            (
                Objective::Clip {
                    prompter,
                    processor,
                    vocabulary,
                    targets,
                },
                Model::Clip(m),
            ) => {
                let examples: Vec<&VqaExample> = picked.iter().map(|&i| &train[i]).collect();
                let t: Vec<usize> = picked.iter().map(|&i| targets[i]).collect();
                let task = objective::ClipTask {
                    prompter,
                    processor,
                    vocabulary,
                    chunk_bytes: objective::CLIP_CHUNK_BYTES,
                };
                clip_loss_and_grads(m, &task, &examples, &t, particles, expanded, grads)
            }
            _ => bail!("the objective does not match the model"),
        }
    }

    /// Every particle's own answer on the validation sample: (mean per-particle VQA accuracy,
    /// accuracy of the particles' majority answer, pairwise disagreement of the particles'
    /// answers). `None` without validation data (the disagreement also with one particle).
    fn evaluate(
        &self,
        model: &Model,
        val: &[VqaExample],
        particles: usize,
    ) -> Result<(Option<f64>, Option<f64>, Option<f64>)> {
        if val.is_empty() {
            return Ok((None, None, None));
        }
        let mut acc = 0.0;
        let mut vote = 0.0;
        let mut all_answers = Vec::with_capacity(val.len());
        for ex in val {
            crate::interrupt::check()?;
            let answers = self.particle_answers(model, ex, particles)?;
            let scores: Vec<f64> = answers
                .iter()
                .map(|a| vqa_accuracy(a, &ex.answers, NormalizeMode::default()))
                .collect();
            acc += scores.iter().sum::<f64>() / scores.len() as f64;
            let normalized: Vec<String> = answers.iter().map(|a| normalize_answer(a)).collect();
            let best = (0..answers.len())
                .max_by_key(|&i| normalized.iter().filter(|n| **n == normalized[i]).count())
                .unwrap_or(0);
            vote += scores[best];
            all_answers.push(answers);
        }
        let n = val.len() as f64;
        Ok((
            Some(acc / n),
            Some(vote / n),
            diversity::pairwise_disagreement(&all_answers),
        ))
    }

    fn particle_answers(
        &self,
        model: &Model,
        ex: &VqaExample,
        particles: usize,
    ) -> Result<Vec<String>> {
        let (prompter, processor) = match self {
            Objective::Llava {
                prompter,
                processor,
                ..
            }
            | Objective::Clip {
                prompter,
                processor,
                ..
            } => (*prompter, *processor),
        };
        let pixels = processor
            .preprocess(&load_image(&ex.image)?)?
            .unsqueeze(0)?;
        match (self, model) {
            (Objective::Clip { vocabulary, .. }, Model::Clip(m)) => {
                let scored =
                    clip_candidates(m, prompter, &pixels, &ex.question, vocabulary, particles)?;
                Ok(scored
                    .particle_answers
                    .into_iter()
                    .map(|a| a.answer)
                    .collect())
            }
            (Objective::Llava { stop, .. }, Model::Llava(m)) => {
                let gen = GenerateOptions {
                    max_new_tokens: EVAL_MAX_NEW_TOKENS,
                    eos: stop.clone(),
                    sampling: Sampling::Greedy,
                };
                let ids = prompter.encode_question(
                    &ex.question,
                    true,
                    m.config().image_tokens_per_image(),
                    None,
                )?;
                let len = ids.len();
                let ids = Tensor::from_vec(ids, (1, len), &candle_core::Device::Cpu)?;
                let keep = vec![vec![true; len]];
                let input = LlavaInput {
                    input_ids: &ids,
                    pixel_values: Some(&pixels),
                    keep: &keep,
                    expanded: false,
                };
                let prefill = m.prefill(&input, particles)?;
                generate(&m.language_model, &prefill, particles, &gen)?
                    .iter()
                    .map(|g| {
                        prompter
                            .decode(&g.tokens, true)
                            .map(|t| t.trim().to_string())
                    })
                    .collect()
            }
            _ => bail!("the objective does not match the model"),
        }
    }
}

/// The error of a step (0-based `step`) whose `what` (its loss, a gradient norm) is not finite,
/// saying where the last good particles are.
fn diverged(out: &Path, step: u64, what: &str) -> Result<anyhow::Error> {
    // Checkpoints are named by the steps done: this step started from `step-{step}`.
    let kept = match checkpoint::latest(out)? {
        Some(dir) if dir.ends_with(format!("step-{step:08}")) => format!(
            "this step started from the particles of checkpoint {} (published in {}), so \
             they may be what diverged: check them with `ask`; earlier checkpoints are \
             kept in {}",
            dir.display(),
            out.display(),
            checkpoint::checkpoints_dir(out).display()
        ),
        Some(dir) => format!(
            "the last good particles are in {} (checkpoint {})",
            out.display(),
            dir.display()
        ),
        None => "no checkpoint was written yet".to_string(),
    };
    Ok(anyhow::anyhow!(
        "training diverged at step {} ({what}): lower --lr, or check --alpha, --init-b-std, \
         --prior-std and --repulsion (and try --dtype bf16 or f32 after f16), in a new --out \
         (--resume keeps the settings a run began with); {kept}",
        step + 1
    ))
}
