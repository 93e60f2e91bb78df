//! Model implementations in the Hugging Face layout, every linear layer particle-capable.

pub mod clip;
pub mod compute;
pub mod config;
mod decode_attention;
pub mod image;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod prompt;
pub mod quant;
pub mod weights;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::bella::{ParticleLinear, ParticleModel};
use crate::hub::ModelFiles;
use clip::ClipModel;
use compute::ComputeOptions;
use config::ModelConfig;
use image::ImageProcessor;
use llava::LlavaModel;
use prompt::Prompter;
use quant::{QuantSummary, Quantize, Quantizer};
use weights::Weights;

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub enum Model {
    Clip(Box<ClipModel>),
    Llava(Box<LlavaModel>),
}

impl ParticleModel for Model {
    fn linears(&self) -> Vec<(String, &ParticleLinear)> {
        match self {
            Model::Clip(m) => m.linears(),
            Model::Llava(m) => m.linears(),
        }
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut ParticleLinear)> {
        match self {
            Model::Clip(m) => m.linears_mut(),
            Model::Llava(m) => m.linears_mut(),
        }
    }

    fn inert_linears(&self) -> Vec<String> {
        match self {
            Model::Clip(m) => m.inert_linears(),
            Model::Llava(m) => m.inert_linears(),
        }
    }
}

/// What was loaded, for `bella-vqa inspect` and for particle configs.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub architecture: &'static str,
    /// Exact number of values in the weight files.
    pub parameters: usize,
    /// Values per stored dtype.
    pub stored_dtypes: std::collections::BTreeMap<String, usize>,
    /// `torch_dtype` / `dtype` from config.json.
    pub declared_dtype: Option<String>,
    /// The dtype the model computes in.
    pub compute_dtype: DType,
    /// The device it computes on (`cpu`, `cuda:0`).
    pub device: String,
    /// What `--quantize` did (`None`: the base is dense).
    pub quantization: Option<QuantSummary>,
    /// Stored tensors the model does not read (see [`weights::Weights::unused`]).
    pub unused_tensors: Vec<String>,
}

impl ModelInfo {
    /// What the base computes in, as runs record it: `f32`, `bf16, q8_0`, `f16, q4k with the
    /// vision tower` (a `--quantize` that quantized no layer leaves the base as it was).
    pub fn compute_label(&self) -> String {
        let dtype = self.compute_dtype.as_str();
        match self
            .quantization
            .as_ref()
            .filter(|q| q.quantized_layers > 0)
        {
            Some(q) if q.vision => format!("{dtype}, {} with the vision tower", q.kind),
            Some(q) => format!("{dtype}, {}", q.kind),
            None => dtype.to_string(),
        }
    }
}

/// A model with its files, config, summary, tokenizer + chat template and image processor.
pub struct LoadedModel {
    pub model: Model,
    /// Where the weights live and the model computes.
    pub device: Device,
    pub config: ModelConfig,
    pub files: ModelFiles,
    pub info: ModelInfo,
    /// `None` when the directory has no `tokenizer.json`.
    pub prompter: Option<Prompter>,
    /// `None` when the directory has no image processor config.
    pub image_processor: Option<ImageProcessor>,
    /// `eos_token_id` of `generation_config.json` (one id or a list; empty without the file),
    /// which transformers' `generate` stops on.
    pub generation_eos: Vec<u32>,
}

/// Fails when `files` lack what answering a question needs (a tokenizer, image settings), with
/// the way to get it: checked before the weights are loaded, not at the first question.
pub fn check_answering_files(files: &ModelFiles) -> Result<()> {
    if files.optional("tokenizer.json").is_none() {
        return Err(missing_tokenizer(&files.dir));
    }
    if image::ProcessorSettings::find(&files.dir)?.is_none() {
        return Err(missing_image_processor(&files.dir));
    }
    Ok(())
}

fn missing_tokenizer(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} has no tokenizer.json: a tokenizer is needed for prompts; download it with the model, \
         or write it with transformers (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) \
         makes it from tokenizer.model)",
        dir.display()
    )
}

fn missing_image_processor(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} has no preprocessor_config.json (or processor_config.json with an image_processor \
         entry): it is needed to read images; download it with the model, or write it with \
         transformers (AutoProcessor.from_pretrained(BASE_MODEL).save_pretrained(DIR))",
        dir.display()
    )
}

impl LoadedModel {
    pub fn prompter(&self) -> Result<&Prompter> {
        self.prompter
            .as_ref()
            .ok_or_else(|| missing_tokenizer(&self.files.dir))
    }

    pub fn image_processor(&self) -> Result<&ImageProcessor> {
        self.image_processor
            .as_ref()
            .ok_or_else(|| missing_image_processor(&self.files.dir))
    }

    /// The tokens that end a generated answer: the tokenizer's end-of-sequence token, the
    /// language model config's `eos_token_id` and `generation_config.json`'s, in that order,
    /// without repeats.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .prompter
            .as_ref()
            .and_then(Prompter::eos_token_id)
            .into_iter()
            .collect();
        if let ModelConfig::Llava(c) = &self.config {
            ids.extend(c.text_config.eos_token_id.iter().flat_map(|e| e.ids()));
        }
        ids.extend(&self.generation_eos);
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }
}

/// Loads a resolved checkpoint onto `device`, computing in `dtype`.
pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<LoadedModel> {
    load_quantized(files, device, dtype, None)
}

/// [`load`] with the frozen base quantized as `quantize` says (see [`quant`]).
pub fn load_quantized(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
    quantize: Option<&Quantize>,
) -> Result<LoadedModel> {
    let weights = Weights::open(&files.weights, device, dtype)?;
    load_weights(files, weights, quantize)
}

/// Builds the model from its opened weight files (device and dtype set on `weights`).
fn load_weights(
    files: &ModelFiles,
    mut weights: Weights,
    quantize: Option<&Quantize>,
) -> Result<LoadedModel> {
    let (device, dtype) = (weights.device().clone(), weights.dtype());
    let (config, raw) = ModelConfig::from_file(&files.required("config.json")?)?;
    if device.is_cpu() {
        if let Some(available) = compute::mem_available_bytes() {
            let needed = estimated_bytes(&weights, quantize, dtype);
            // (the caller names the model)
            compute::check_fits(needed, available, dtype)?;
        }
    }
    if let ModelConfig::Llava(_) = config {
        weights = weights.with_aliases(llava::LAYOUT_ALIASES);
    }
    let prompter = match files.optional("tokenizer.json") {
        Some(_) => {
            let image_token = match &config {
                ModelConfig::Llava(_) => Some(prompt::DEFAULT_IMAGE_TOKEN),
                ModelConfig::Clip(_) => None,
            };
            let prompter = Prompter::from_dir(&files.dir, image_token)?;
            Some(match &config {
                ModelConfig::Llava(c) => {
                    prompter.with_max_positions(c.text_config.max_position_embeddings)
                }
                ModelConfig::Clip(_) => prompter,
            })
        }
        None => None,
    };
    let settings = image::ProcessorSettings::find(&files.dir)?;
    let image_processor = settings
        .as_ref()
        .map(ImageProcessor::from_settings)
        .transpose()?;
    check_inputs_fit(
        &config,
        prompter.as_ref(),
        image_processor
            .as_ref()
            .zip(settings.as_ref().map(image::ProcessorSettings::label)),
    )?;
    if let (ModelConfig::Llava(_), Some(p)) = (&config, &prompter) {
        if *p.template_source() == prompt::TemplateSource::Default {
            crate::note!(
                "warning: {} has no chat template (chat_template.jinja, chat_template.json or a \
                 chat_template key): prompts use {}; add the model's own if it was trained with \
                 another",
                files.dir.display(),
                prompt::NO_TEMPLATE
            );
        }
    }
    if let Some(q) = quantize {
        let quantizer = Quantizer::open(q, &files.weights, &device)
            .with_context(|| format!("cannot quantize {}", files.dir.display()))?;
        weights = weights.with_quantizer(quantizer);
    }
    let root = weights.scope("");
    let model = match &config {
        ModelConfig::Clip(c) => Model::Clip(Box::new(ClipModel::load(&root, c)?)),
        ModelConfig::Llava(c) => Model::Llava(Box::new(LlavaModel::load(&root, c)?)),
    };
    let quantization = weights.take_quantizer().map(Quantizer::finish);
    if let Some(q) = quantization.as_ref().filter(|q| q.quantized_layers == 0) {
        crate::note!(
            "warning: --quantize {} quantizes nothing in {}: no layer it takes has an inner \
             dimension that is a multiple of {}{}; the model stays dense{}",
            q.kind,
            files.dir.display(),
            q.block_size,
            if q.vision {
                ""
            } else {
                " (--quantize-vision also takes the vision tower)"
            },
            if q.block_size > 32 {
                ": try --quantize q8_0 (blocks of 32)"
            } else {
                ""
            }
        );
    }
    let unused_tensors = weights.unused();
    if !unused_tensors.is_empty() {
        crate::note!(
            "warning: {} of the tensors in {} are not used by this {} ({}): weights of another \
             architecture, or layers config.json does not have; check that config.json belongs to \
             these weight files (`bella-vqa inspect` lists them)",
            unused_tensors.len(),
            files.dir.display(),
            config.architecture(),
            preview(&unused_tensors, 3)
        );
    }
    let generation_eos = match files.optional("generation_config.json") {
        Some(path) => config::generation_eos(&path)?,
        None => Vec::new(),
    };
    Ok(LoadedModel {
        info: ModelInfo {
            quantization,
            unused_tensors,
            ..info(&config, &raw, &weights, dtype)
        },
        device: device.clone(),
        model,
        config,
        files: files.clone(),
        prompter,
        image_processor,
        generation_eos,
    })
}

/// What the tokenizer and the image processor hand the model must fit it: checked before the
/// weights are read, so that files that disagree fail at load, not at the first question.
fn check_inputs_fit(
    config: &ModelConfig,
    prompter: Option<&Prompter>,
    processor: Option<(&ImageProcessor, &str)>,
) -> Result<()> {
    let side = match config {
        ModelConfig::Clip(c) => c.vision_config.image_size,
        ModelConfig::Llava(c) => c.vision_config.image_size,
    };
    if let Some((p, file)) = processor {
        match p.output_size() {
            Some((h, w)) if (h, w) != (side, side) => bail!(
                "the image processor ({file}) makes {w}×{h} images (crop_size, \
                 or size without a crop), but the vision tower takes {side}×{side} \
                 (config.json: vision_config.image_size): the two files disagree; take both \
                 from the same checkpoint"
            ),
            None => bail!(
                "the image processor ({file}) makes images whose size follows \
                 the input's aspect ratio (no do_center_crop, no do_pad), but the vision tower \
                 takes {side}×{side} only (config.json: vision_config.image_size): set \
                 do_center_crop with crop_size {side}, or do_pad"
            ),
            Some(_) => {}
        }
    }
    if let Some(p) = prompter {
        let vocab = match config {
            ModelConfig::Clip(c) => c.text_config.vocab_size,
            ModelConfig::Llava(c) => c.text_config.vocab_size,
        };
        if let Some((token, id)) = p.largest_token_id().filter(|(_, id)| *id as usize >= vocab) {
            bail!(
                "tokenizer.json has the token {token:?} with id {id}, but the model's embedding \
                 has {vocab} rows (config.json: text_config.vocab_size): the tokenizer is not \
                 this checkpoint's; take both from the same one"
            );
        }
    }
    if let (ModelConfig::Llava(c), Some(p)) = (config, prompter) {
        // The chat template must place the image: rendered once here, so that one without it
        // fails at load, not after the model has run on the first question.
        if let Some(token) = p.image_token() {
            let template = match p.template_source() {
                prompt::TemplateSource::File(path) => path.display().to_string(),
                _ => "the built-in llava-1.5 template".to_string(),
            };
            let text = p
                .render_question("What is in the image?", true)
                .with_context(|| {
                    format!("the chat template ({template}) cannot render a question")
                })?;
            let n = text.matches(token).count();
            if n != 1 {
                bail!(
                    "the chat template ({template}) puts {n} image token(s) {token:?} in a \
                     question with one image, where the model needs one: use the checkpoint's \
                     own chat template"
                );
            }
        }
        if let Some(id) = p.image_token_id() {
            if id != c.image_token_index {
                bail!(
                    "the tokenizer's image token {:?} has id {id}, but config.json's \
                     image_token_index is {}: the tokenizer and the config disagree (files of two \
                     checkpoints?)",
                    p.image_token().unwrap_or(prompt::DEFAULT_IMAGE_TOKEN),
                    c.image_token_index
                );
            }
        }
    }
    Ok(())
}

fn info(config: &ModelConfig, raw: &serde_json::Value, w: &Weights, dtype: DType) -> ModelInfo {
    ModelInfo {
        architecture: config.architecture(),
        parameters: w.num_values(),
        stored_dtypes: w.stored_dtypes(),
        declared_dtype: config::declared_dtype(raw),
        compute_dtype: dtype,
        device: match w.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
        quantization: None,
        unused_tensors: Vec::new(),
    }
}

/// The first `n` names, then how many more.
fn preview(names: &[String], n: usize) -> String {
    let shown = names.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(n) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Bytes the weights need in `dtype`, quantized layers counted at their block size.
fn estimated_bytes(weights: &Weights, quantize: Option<&Quantize>, dtype: DType) -> u64 {
    match quantize {
        Some(q) => {
            let shapes = weights.shapes();
            let list = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
            q.estimated_bytes(list, dtype.size_in_bytes())
        }
        None => compute::weight_bytes(weights.num_values(), dtype),
    }
}

/// Resolves the device and dtype of `files` (`auto`: see [`compute::resolve`]) and loads it there.
/// Returns the model and one line saying what was picked.
pub fn load_with(
    files: &ModelFiles,
    opts: ComputeOptions,
    quantize: Option<&Quantize>,
) -> Result<(LoadedModel, String)> {
    // The headers decide the dtype; the tensors are read only after that.
    let weights = Weights::open(&files.weights, &Device::Cpu, DType::F32)?;
    // `auto` goes to half precision beside quantized layers, not for an option that takes none.
    let quantizing = quantize.is_some_and(|q| {
        let shapes = weights.shapes();
        shapes.iter().any(|(n, s)| q.quantizes(n, s))
    });
    let compute = compute::resolve(
        opts,
        estimated_bytes(&weights, quantize, DType::F32),
        weights.dominant_dtype(),
        compute::mem_available_bytes(),
        quantizing,
    )?;
    let weights = weights.to(&compute.device, compute.dtype);
    let loaded = load_weights(files, weights, quantize)?;
    let note = match &loaded.info.quantization {
        Some(q) => format!("{}; --quantize: {q}", compute.reason),
        None => compute.reason,
    };
    Ok((loaded, note))
}

/// Resolves a source (hub id, cache, directory) and loads it where `compute` says.
pub fn load_source(
    source: &crate::hub::ModelSource,
    opts: &crate::hub::HubOptions,
    compute: ComputeOptions,
    quantize: Option<&Quantize>,
) -> Result<(LoadedModel, String)> {
    let files = crate::hub::resolve(source, opts)?;
    load_resolved(source, &files, compute, quantize)
}

/// Loads the `files` `source` resolved to (see [`load_source`]), naming the source in errors.
pub fn load_resolved(
    source: &crate::hub::ModelSource,
    files: &ModelFiles,
    compute: ComputeOptions,
    quantize: Option<&Quantize>,
) -> Result<(LoadedModel, String)> {
    load_with(files, compute, quantize).map_err(|e| {
        // A hub id names where its files are; a directory is named once.
        let place = match &files.origin {
            crate::hub::Origin::Directory => String::new(),
            _ => format!(" ({})", files.dir.display()),
        };
        e.context(format!("cannot load the model {source}{place}"))
    })
}
