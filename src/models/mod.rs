//! Model implementations in the Hugging Face layout, every linear layer particle-capable.

pub mod clip;
pub mod config;
pub mod image;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod prompt;
pub mod quant;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::bella::{ParticleLinear, ParticleModel};
use crate::hub::ModelFiles;
use clip::ClipModel;
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
    /// What `--quantize` did (`None`: the base is dense).
    pub quantization: Option<QuantSummary>,
}

/// A model with its files, config, summary, tokenizer + chat template and image processor.
pub struct LoadedModel {
    pub model: Model,
    pub config: ModelConfig,
    pub files: ModelFiles,
    pub info: ModelInfo,
    /// `None` when the directory has no `tokenizer.json`.
    pub prompter: Option<Prompter>,
    /// `None` when the directory has no image processor config.
    pub image_processor: Option<ImageProcessor>,
}

impl LoadedModel {
    pub fn prompter(&self) -> Result<&Prompter> {
        self.prompter.as_ref().with_context(|| {
            format!(
                "{} has no tokenizer.json: a tokenizer is needed for prompts",
                self.files.dir.display()
            )
        })
    }

    pub fn image_processor(&self) -> Result<&ImageProcessor> {
        self.image_processor.as_ref().with_context(|| {
            format!(
                "{} has no preprocessor_config.json (or processor_config.json with an image_processor): \
                 it is needed to read images",
                self.files.dir.display()
            )
        })
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
    let (config, raw) = ModelConfig::from_file(&files.required("config.json")?)?;
    let mut weights = Weights::open(&files.weights, device, dtype)?;
    if let Some(available) = mem_available_bytes() {
        let needed = match quantize {
            Some(q) => {
                let shapes = weights.shapes();
                let list = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
                q.estimated_bytes(list, dtype.size_in_bytes())
            }
            None => weights.num_values() as u64 * dtype.size_in_bytes() as u64,
        };
        check_fits(needed, available, dtype)
            .with_context(|| format!("cannot load {}", files.dir.display()))?;
    }
    if let ModelConfig::Llava(_) = config {
        weights = weights.with_aliases(llava::LAYOUT_ALIASES);
    }
    if let Some(q) = quantize {
        let quantizer = Quantizer::open(q, &files.weights, device)
            .with_context(|| format!("cannot quantize {}", files.dir.display()))?;
        weights = weights.with_quantizer(quantizer);
    }
    let root = weights.scope("");
    let model = match &config {
        ModelConfig::Clip(c) => Model::Clip(Box::new(ClipModel::load(&root, c)?)),
        ModelConfig::Llava(c) => Model::Llava(Box::new(LlavaModel::load(&root, c)?)),
    };
    let quantization = weights.take_quantizer().map(Quantizer::finish);
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
    // transformers 5 nests the image processor in processor_config.json.
    let nested = files.optional("processor_config.json").is_some_and(|p| {
        crate::input::read_to_string(&p, "processor config")
            .is_ok_and(|t| t.contains("\"image_processor\""))
    });
    let image_processor = if files.optional("preprocessor_config.json").is_some() || nested {
        Some(ImageProcessor::from_dir(&files.dir)?)
    } else {
        None
    };
    Ok(LoadedModel {
        info: ModelInfo {
            quantization,
            ..info(&config, &raw, &weights, dtype)
        },
        model,
        config,
        files: files.clone(),
        prompter,
        image_processor,
    })
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where there is no such file).
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a load whose weights (in the compute dtype) need more memory than is available,
/// before anything is read, instead of being killed halfway.
fn check_fits(needed: u64, available: u64, dtype: DType) -> Result<()> {
    if needed > available {
        let gb = |b: u64| b as f64 / 1e9;
        anyhow::bail!(
            "the weights need ~{:.1} GB in {dtype:?}, but MemAvailable is {:.1} GB: free memory \
             or use a machine with more",
            gb(needed),
            gb(available)
        );
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
        quantization: None,
    }
}

/// Resolves a source (hub id, cache, directory) and loads it on the CPU in f32, its base
/// quantized if `quantize` says so (with a status line on stderr when `opts.progress`).
pub fn load_source(
    source: &crate::hub::ModelSource,
    opts: &crate::hub::HubOptions,
    quantize: Option<&Quantize>,
) -> Result<LoadedModel> {
    let files = crate::hub::resolve(source, opts)?;
    let loaded = load_quantized(&files, &Device::Cpu, DType::F32, quantize).map_err(|e| {
        e.context(format!(
            "cannot load the model {source} ({})",
            files.dir.display()
        ))
    })?;
    if let (Some(q), true) = (&loaded.info.quantization, opts.progress) {
        eprintln!("--quantize: {q}");
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_that_does_not_fit_says_how_much_it_needs() {
        check_fits(1 << 30, 2 << 30, DType::F32).unwrap();
        let err = check_fits(28_000_000_000, 9_500_000_000, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("~28.0 GB in F32") && err.contains("MemAvailable is 9.5 GB"),
            "{err}"
        );
        assert!(mem_available_bytes().is_some_and(|b| b > 0));
    }
}
