//! Memory-mapped safetensors weights (one file or shards) with clear errors.
//!
//! Model code asks for tensors by their hub name (`language_model.model.layers.0.self_attn.q_proj.weight`)
//! and the expected shape; [`Weights`] finds the tensor in whichever shard holds it, under the hub
//! name or one of the layout aliases (transformers 5 renames the LLaVA prefixes), checks the shape and
//! converts it to the compute dtype.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::bella::Base;
use crate::error::WeightError;
use crate::models::quant::Quantizer;

/// Tensors with at most this many values are checked for NaN and infinities as they load: norms,
/// biases, position embeddings and every weight of a small model. Larger matrices are not: the
/// check would cost a pass over all weights of a large checkpoint.
pub const FINITE_CHECK_MAX_VALUES: usize = 1 << 20;

/// The number of NaN or infinite values in `t` (any float dtype; integer tensors have none).
pub fn count_non_finite(t: &Tensor) -> candle_core::Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(values.iter().filter(|v| !v.is_finite()).count())
}

/// Drops the pages of a tensor's bytes in the memory-mapped file from this process once the tensor
/// is copied out, so that loading peaks at the loaded weights plus one tensor, not the weights plus
/// the whole mapped file. The mapping is read-only and file-backed: touching the bytes again would
/// read them back from the file.
fn release_pages(bytes: &[u8]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let page = 4096usize;
        let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside a read-only file mapping that stays mapped; MADV_DONTNEED
            // only drops its resident pages, and no reference reads them afterwards (a read would
            // fault them back in from the file).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// A canonical key prefix and the other prefixes the same tensors may be saved under.
pub type Alias = (&'static str, &'static [&'static str]);

pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    aliases: &'static [Alias],
    device: Device,
    dtype: DType,
    quantizer: Option<Quantizer>,
}

impl Weights {
    /// Memory-maps every file and reads its header; a truncated or corrupt file is an error naming it.
    pub fn open(paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self, WeightError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            crate::input::check_regular(path, "weight file").map_err(|e| WeightError::BadFile {
                file: path.clone(),
                reason: format!("{e:#}"),
            })?;
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on the
            // checkpoint not being modified while it is in use.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| WeightError::BadFile {
                file: path.clone(),
                reason: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, index);
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            files,
            routing,
            aliases: &[],
            device: device.clone(),
            dtype,
            quantizer: None,
        })
    }

    /// The same files, loaded onto `device` in `dtype` (once the headers have decided them).
    pub fn to(mut self, device: &Device, dtype: DType) -> Self {
        self.device = device.clone();
        self.dtype = dtype;
        self
    }

    /// Layout aliases tried, in order, when a hub name is not in the files.
    pub fn with_aliases(mut self, aliases: &'static [Alias]) -> Self {
        self.aliases = aliases;
        self
    }

    /// Linear layers' bases go through `quantizer` (`--quantize`).
    pub fn with_quantizer(mut self, quantizer: Quantizer) -> Self {
        self.quantizer = Some(quantizer);
        self
    }

    /// The quantizer, once the model has loaded.
    pub fn take_quantizer(&mut self) -> Option<Quantizer> {
        self.quantizer.take()
    }

    /// The base weight `{path}.weight` `[out, in]` of a linear layer: dense, or quantized when a
    /// quantizer selects the layer.
    pub fn base(&self, path: &str, out: usize, inp: usize) -> Result<Base, WeightError> {
        let key = if path.is_empty() {
            "weight".to_string()
        } else {
            format!("{path}.weight")
        };
        match &self.quantizer {
            Some(q) => q.base(path, (out, inp), || self.get(&key, &[out, inp])),
            None => self.get(&key, &[out, inp]).map(Base::Dense),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The names a hub key may be stored under: itself first, then its aliases.
    fn candidates(&self, key: &str) -> Vec<String> {
        let mut out = vec![key.to_string()];
        for (canonical, alternatives) in self.aliases {
            if let Some(rest) = key.strip_prefix(canonical) {
                out.extend(alternatives.iter().map(|alt| format!("{alt}{rest}")));
            }
        }
        out
    }

    /// Whether the tensor exists under its hub name or an alias.
    pub fn contains(&self, key: &str) -> bool {
        self.candidates(key)
            .iter()
            .any(|k| self.routing.contains_key(k))
    }

    /// Loads a tensor, checks its shape, converts it to the compute dtype.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor, WeightError> {
        let tried = self.candidates(key);
        let Some((name, &index)) = tried
            .iter()
            .find_map(|k| self.routing.get(k).map(|i| (k, i)))
        else {
            return Err(WeightError::MissingTensor {
                key: key.to_string(),
                tried,
                files: self.file_list(),
            });
        };
        let (path, st) = &self.files[index];
        let bad = |e: candle_core::Error| WeightError::BadFile {
            file: path.clone(),
            reason: format!("tensor {name:?}: {e}"),
        };
        let view = st.get(name).map_err(bad)?;
        if view.shape() != shape {
            return Err(WeightError::ShapeMismatch {
                key: name.clone(),
                file: path.clone(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let tensor = st.load(name, &self.device).map_err(bad)?;
        release_pages(view.data());
        if tensor.elem_count() <= FINITE_CHECK_MAX_VALUES {
            let count = count_non_finite(&tensor).map_err(bad)?;
            if count > 0 {
                return Err(WeightError::NonFinite {
                    key: name.clone(),
                    file: path.clone(),
                    count,
                });
            }
        }
        tensor.to_dtype(self.dtype).map_err(bad)
    }

    /// Loads a tensor if it exists (optional biases).
    pub fn get_opt(&self, key: &str, shape: &[usize]) -> Result<Option<Tensor>, WeightError> {
        if self.contains(key) {
            self.get(key, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The exact number of values stored in the weight files.
    pub fn num_values(&self) -> usize {
        self.files
            .iter()
            .flat_map(|(_, st)| st.tensors())
            .map(|(_, view)| view.shape().iter().product::<usize>())
            .sum()
    }

    /// The dtype most values are stored in (f32 for an empty file set).
    pub fn dominant_dtype(&self) -> DType {
        let mut counts: HashMap<DType, usize> = HashMap::new();
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                if let Ok(dtype) = DType::try_from(view.dtype()) {
                    *counts.entry(dtype).or_insert(0) += view.shape().iter().product::<usize>();
                }
            }
        }
        counts
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map_or(DType::F32, |(dtype, _)| dtype)
    }

    /// Every stored tensor's name and shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.files
            .iter()
            .flat_map(|(_, st)| st.tensors())
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect()
    }

    /// Values per stored dtype, e.g. `{"F32": 1234}`.
    pub fn stored_dtypes(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                *out.entry(format!("{:?}", view.dtype())).or_insert(0) +=
                    view.shape().iter().product::<usize>();
            }
        }
        out
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A view of the weights under a key prefix.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            weights: self,
            prefix: prefix.to_string(),
        }
    }
}

/// Weights under a key prefix, like candle's `VarBuilder::pp` but with our errors.
#[derive(Clone)]
pub struct Scope<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> Scope<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        Scope {
            weights: self.weights,
            prefix: self.key(&name.to_string()),
        }
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The module path of this scope (the PEFT-style name of a linear layer).
    pub fn path(&self) -> &str {
        &self.prefix
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, WeightError> {
        self.weights.get(&self.key(name), shape)
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>, WeightError> {
        self.weights.get_opt(&self.key(name), shape)
    }

    /// The base weight of the linear layer at this scope (see [`Weights::base`]).
    pub fn base(&self, out: usize, inp: usize) -> Result<Base, WeightError> {
        self.weights.base(&self.prefix, out, inp)
    }

    pub fn weights(&self) -> &'a Weights {
        self.weights
    }
}
