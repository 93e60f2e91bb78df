//! Model implementations in the Hugging Face layout, every linear layer particle-capable.

pub mod clip;
pub mod config;
pub mod image;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod prompt;
pub mod weights;

use anyhow::Result;
use candle_core::{DType, Device};

use crate::bella::{ParticleLinear, ParticleModel};
use crate::hub::ModelFiles;
use clip::ClipModel;
use config::ModelConfig;
use llava::LlavaModel;
use weights::Weights;

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub enum Model {
    Clip(ClipModel),
    Llava(LlavaModel),
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
}

/// A model with its files, config and summary.
pub struct LoadedModel {
    pub model: Model,
    pub config: ModelConfig,
    pub files: ModelFiles,
    pub info: ModelInfo,
}

/// Loads a resolved checkpoint onto `device`, computing in `dtype`.
pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let (config, raw) = ModelConfig::from_file(&files.required("config.json")?)?;
    let mut weights = Weights::open(&files.weights, device, dtype)?;
    if let ModelConfig::Llava(_) = config {
        weights = weights.with_aliases(llava::LAYOUT_ALIASES);
    }
    let root = weights.scope("");
    let model = match &config {
        ModelConfig::Clip(c) => Model::Clip(ClipModel::load(&root, c)?),
        ModelConfig::Llava(c) => Model::Llava(LlavaModel::load(&root, c)?),
    };
    Ok(LoadedModel {
        info: info(&config, &raw, &weights, dtype),
        model,
        config,
        files: files.clone(),
    })
}

fn info(config: &ModelConfig, raw: &serde_json::Value, w: &Weights, dtype: DType) -> ModelInfo {
    ModelInfo {
        architecture: config.architecture(),
        parameters: w.num_values(),
        stored_dtypes: w.stored_dtypes(),
        declared_dtype: config::declared_dtype(raw),
        compute_dtype: dtype,
    }
}

/// Resolves a source (hub id, cache, directory) and loads it on the CPU in f32.
pub fn load_source(
    source: &crate::hub::ModelSource,
    opts: &crate::hub::HubOptions,
) -> Result<LoadedModel> {
    let files = crate::hub::resolve(source, opts)?;
    load(&files, &Device::Cpu, DType::F32)
        .map_err(|e| e.context(format!("cannot load the model {source} ({})", files.dir.display())))
}
