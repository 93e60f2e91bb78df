//! `--quantize q8_0|q4k`: a quantized frozen base under f32 particles (Bella over a QLoRA-style
//! base).
//!
//! What is quantized: the linear layers of the transformer blocks of the language model (the
//! LLaMA decoder of a LLaVA, the text encoder of a CLIP) and, with [`Quantize::vision`], of the
//! vision tower. Embeddings, norms, the LLaVA projector, the CLIP projections and `lm_head` stay
//! dense: they are a small part of a 7B model, and like llama.cpp (which keeps the output layer
//! at higher precision, and LLaVA's projector in f16) we keep the layers that write the logits
//! and the image tokens exact. A layer whose inner dimension is not a multiple of the block size
//! (32 values for q8_0, 256 for q4k) cannot be cut into blocks and stays dense; the
//! [`QuantSummary`] lists them.
//!
//! The quantized blocks are cached as a GGUF file in [`crate::io::cache_dir`]`/quantized/`, named
//! by a key over the weight files' sha256, the quantization, the vision option and
//! [`FORMAT_VERSION`]; the file also holds a sha256 of its tensor data. A second load reads it
//! instead of quantizing again; a file that does not read back, belongs to other weights or whose
//! data does not match its digest is rebuilt, never trusted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bella::quant::QuantizedWeight;
use crate::bella::Base;
use crate::error::WeightError;

/// Bumped whenever the cached file's layout or the choice of quantized layers changes.
pub const FORMAT_VERSION: u32 = 1;

/// A GGML block quantization of the frozen base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum QuantKind {
    /// 8-bit blocks of 32 values (8.5 bits per weight), close to f32.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit k-quant super-blocks of 256 values (4.5 bits per weight).
    #[value(name = "q4k")]
    Q4K,
}

impl QuantKind {
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantKind::Q8_0 => GgmlDType::Q8_0,
            QuantKind::Q4K => GgmlDType::Q4K,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4K => "q4k",
        }
    }

    /// The values per block: a quantized layer's inner dimension must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the frozen base is quantized at load.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantize {
    pub kind: QuantKind,
    /// Also quantize the vision tower's blocks.
    pub vision: bool,
    /// Where quantized weights are cached (default: `cache_dir()/quantized`).
    pub cache_dir: Option<PathBuf>,
}

impl Quantize {
    pub fn new(kind: QuantKind) -> Self {
        Self {
            kind,
            vision: false,
            cache_dir: None,
        }
    }

    /// Whether the layer at `path` (a module path such as
    /// `language_model.model.layers.0.self_attn.q_proj`) is one this option quantizes: a linear
    /// layer of a transformer block, in the vision tower only with [`Quantize::vision`].
    pub fn selects(&self, path: &str) -> bool {
        let in_block = path.split('.').any(|part| part == "layers");
        let vision = path.starts_with("vision_tower.") || path.starts_with("vision_model.");
        in_block && (self.vision || !vision)
    }

    /// The bytes a checkpoint's weights take in memory under this option, from the stored tensor
    /// names (any layout) and shapes: quantized blocks for the layers it selects and whose blocks
    /// fit, `dense_bytes` per value for everything else.
    pub fn estimated_bytes<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
        dense_bytes: usize,
    ) -> u64 {
        let ggml = self.kind.ggml();
        tensors
            .into_iter()
            .map(|(name, shape)| {
                let values: usize = shape.iter().product();
                if self.quantizes(name, shape) {
                    (values / ggml.block_size() * ggml.type_size()) as u64
                } else {
                    (values * dense_bytes) as u64
                }
            })
            .sum()
    }

    /// Whether the stored tensor `name` of `shape` (any layout) will be held quantized: the
    /// weight of a layer this option selects whose inner dimension is a multiple of the block.
    pub fn quantizes(&self, name: &str, shape: &[usize]) -> bool {
        let vision = name.contains("vision_tower.") || name.starts_with("vision_model.");
        match (name.strip_suffix(".weight"), shape) {
            (Some(path), [_, inp]) => {
                path.split('.').any(|part| part == "layers")
                    && (self.vision || !vision)
                    && inp % self.kind.block_size() == 0
            }
            _ => false,
        }
    }

    fn cache_root(&self) -> anyhow::Result<PathBuf> {
        match &self.cache_dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(crate::io::cache_dir()?.join("quantized")),
        }
    }
}

/// The command-line options, shared by every command that loads a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct QuantizeArgs {
    /// Quantize the frozen base at load (q8_0: 8-bit blocks; q4k: 4-bit k-quants): the language
    /// model's block layers, cached in ~/.cache/bella-vqa/quantized/ ($BELLA_VQA_CACHE) so the
    /// next load reads them; particles stay f32.
    #[arg(long, value_enum, ignore_case = true, value_name = "KIND")]
    pub quantize: Option<QuantKind>,
    /// With --quantize: quantize the vision tower's block layers too.
    #[arg(long, requires = "quantize")]
    pub quantize_vision: bool,
}

impl QuantizeArgs {
    pub fn options(&self) -> Option<Quantize> {
        self.quantize.map(|kind| Quantize {
            vision: self.quantize_vision,
            ..Quantize::new(kind)
        })
    }
}

/// How the quantized weights of a load were obtained.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum CacheState {
    /// Read from the cache file.
    Hit,
    /// Quantized now (no cache file yet) and written to the cache.
    Written,
    /// The cache file was unusable (the reason) and was rebuilt.
    Rebuilt(String),
    /// Quantized now; writing the cache failed (the reason), so the next load quantizes again.
    NotWritten(String),
    /// No layer was quantized, so there is nothing to cache.
    Unused,
}

/// What `--quantize` did, for `inspect` and the load log line.
#[derive(Clone, Debug, Serialize)]
pub struct QuantSummary {
    pub kind: String,
    pub vision: bool,
    /// Layers held quantized.
    pub quantized_layers: usize,
    /// Their values, and their bytes quantized.
    pub quantized_values: usize,
    pub quantized_bytes: usize,
    /// Layers the option selects that stay dense: inner dimension not a multiple of the block.
    pub kept_dense: Vec<String>,
    pub block_size: usize,
    pub cache_file: PathBuf,
    pub cache: CacheState,
}

impl std::fmt::Display for QuantSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} linear layer(s) of the {} quantized to {} ({:.1} MB; particles stay f32); ",
            self.quantized_layers,
            // A LLaVA's language model, a CLIP's text encoder: the text model of both.
            if self.vision {
                "text model and vision tower"
            } else {
                "text model"
            },
            self.kind,
            self.quantized_bytes as f64 / 1e6
        )?;
        if !self.kept_dense.is_empty() {
            write!(
                f,
                "{} kept dense (inner dimension not a multiple of {}: {}); ",
                self.kept_dense.len(),
                self.block_size,
                abbreviate(&self.kept_dense)
            )?;
        }
        let cache = self.cache_file.display();
        match &self.cache {
            CacheState::Hit => write!(f, "read from the cache {cache}"),
            CacheState::Written => write!(f, "cached in {cache}"),
            CacheState::Rebuilt(why) => write!(f, "cache {cache} rebuilt ({why})"),
            CacheState::NotWritten(why) => write!(f, "not cached ({why})"),
            CacheState::Unused => write!(f, "nothing cached"),
        }
    }
}

/// The first few names and how many more.
fn abbreviate(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut out = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        out.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    out
}

#[derive(Default)]
struct State {
    /// From a valid cache file, by layer path.
    cached: HashMap<String, Arc<QTensor>>,
    /// Every quantized layer of this load, in load order.
    layers: Vec<(String, Arc<QTensor>)>,
    /// Layers quantized now rather than read from the cache.
    fresh: usize,
    kept_dense: Vec<String>,
}

/// Quantizes (or reads from the cache) the selected layers while a model loads.
pub struct Quantizer {
    opts: Quantize,
    key: String,
    path: PathBuf,
    /// Why an existing cache file was not used.
    rejected: Option<String>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Quantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quantizer")
            .field("opts", &self.opts)
            .field("path", &self.path)
            .finish()
    }
}

impl Quantizer {
    /// Keys the cache by the weight files' sha256 (remembered across loads) and reads a cache
    /// file if there is a valid one.
    pub fn open(opts: &Quantize, weight_files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(format!(
            "bella-vqa quantized base v{FORMAT_VERSION}\n{}\nvision {}\n",
            opts.kind, opts.vision
        ));
        for file in weight_files {
            h.update(crate::io::sha256_file_cached(file)?);
            h.update("\n");
        }
        let key = format!("{:x}", h.finalize());
        let path = opts
            .cache_root()?
            .join(format!("{}.{}.gguf", &key[..32], opts.kind));
        let (cached, rejected) = if path.exists() {
            match read_cache(&path, &key, device) {
                Ok(cached) => (cached, None),
                Err(e) => (HashMap::new(), Some(format!("{e:#}"))),
            }
        } else {
            (HashMap::new(), None)
        };
        Ok(Self {
            opts: opts.clone(),
            key,
            path,
            rejected,
            state: Mutex::new(State {
                cached,
                ..State::default()
            }),
        })
    }

    /// The base of the linear layer at `path`, `[out, in]`: quantized (from the cache, or from
    /// `load`ed dense weights) when the option selects it and its blocks fit, else dense.
    /// `load(to_quantize)` reads the dense weight (`to_quantize`: the blocks will hide a NaN,
    /// scan it whole first).
    pub fn base(
        &self,
        path: &str,
        (out, inp): (usize, usize),
        load: impl FnOnce(bool) -> std::result::Result<Tensor, WeightError>,
    ) -> std::result::Result<Base, WeightError> {
        if !self.opts.selects(path) {
            return load(false).map(Base::Dense);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if inp % self.opts.kind.block_size() != 0 {
            state.kept_dense.push(path.to_string());
            return load(false).map(Base::Dense);
        }
        let ggml = self.opts.kind.ggml();
        let q = match state.cached.remove(path) {
            Some(q) if q.dtype() == ggml && q.shape().dims() == [out, inp] => q,
            _ => {
                let dense = load(true)?;
                let q = QTensor::quantize(&dense, ggml).map_err(|e| WeightError::Quantize {
                    key: path.to_string(),
                    quant: self.opts.kind.name(),
                    reason: e.to_string(),
                })?;
                state.fresh += 1;
                Arc::new(q)
            }
        };
        state.layers.push((path.to_string(), q.clone()));
        let weight = QuantizedWeight::new(q).map_err(|e| WeightError::Quantize {
            key: path.to_string(),
            quant: self.opts.kind.name(),
            reason: e.to_string(),
        })?;
        Ok(Base::Quantized(weight))
    }

    /// After the model has loaded: writes the cache when anything was quantized now, and says
    /// what was done.
    pub fn finish(self) -> QuantSummary {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        let cache = if state.layers.is_empty() {
            CacheState::Unused
        } else if state.fresh == 0 {
            CacheState::Hit
        } else {
            match write_cache(&self.path, &self.key, &state.layers) {
                Err(e) => CacheState::NotWritten(format!("{e:#}")),
                Ok(()) => match self.rejected {
                    Some(why) => CacheState::Rebuilt(why),
                    None => CacheState::Written,
                },
            }
        };
        QuantSummary {
            kind: self.opts.kind.name().to_string(),
            vision: self.opts.vision,
            quantized_layers: state.layers.len(),
            quantized_values: state
                .layers
                .iter()
                .map(|(_, q)| q.shape().elem_count())
                .sum(),
            quantized_bytes: state
                .layers
                .iter()
                .map(|(_, q)| q.storage_size_in_bytes())
                .sum(),
            kept_dense: state.kept_dense,
            block_size: self.opts.kind.block_size(),
            cache_file: self.path,
            cache,
        }
    }
}

const KEY: &str = "bella.key";
const DIGEST: &str = "bella.data_sha256";

/// A digest of the named tensors: names, dtypes, shapes and block data, in name order.
fn digest(tensors: &[(&str, &QTensor)]) -> Result<String> {
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, q) in sorted {
        h.update(format!("{name}\n{:?}\n{:?}\n", q.dtype(), q.shape().dims()));
        h.update(q.data()?.as_ref());
    }
    Ok(format!("{:x}", h.finalize()))
}

fn write_cache(path: &Path, key: &str, layers: &[(String, Arc<QTensor>)]) -> Result<()> {
    let tensors: Vec<(&str, &QTensor)> = layers
        .iter()
        .map(|(n, q)| (n.as_str(), q.as_ref()))
        .collect();
    let key_value = gguf_file::Value::String(key.to_string());
    let digest_value = gguf_file::Value::String(digest(&tensors)?);
    // A killed first quantization left its (multi-GB) temporary file here.
    if let Some(dir) = path.parent() {
        crate::io::remove_stale_temps(dir);
    }
    // A FIFO or device in its place would be written into (a FIFO blocking): replaced instead.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        std::fs::remove_file(path).with_context(|| format!("cannot replace {}", path.display()))?;
    }
    crate::io::write_stream_atomically(path, |w| {
        gguf_file::write(w, &[(KEY, &key_value), (DIGEST, &digest_value)], &tensors)
            .context("cannot write the GGUF file")
    })
}

fn read_cache(path: &Path, key: &str, device: &Device) -> Result<HashMap<String, Arc<QTensor>>> {
    // A FIFO would block the read, a device never end.
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        anyhow::bail!("it is not a regular file");
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).context("not a readable GGUF file")?;
    let text = |name: &str| -> Result<String> {
        Ok(content
            .metadata
            .get(name)
            .with_context(|| format!("no {name} in the file"))?
            .to_string()?
            .clone())
    };
    if text(KEY)? != key {
        anyhow::bail!("it was made from other weights or options");
    }
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content
            .tensor(&mut reader, name, device)
            .with_context(|| format!("tensor {name} does not read back"))?;
        tensors.insert(name.clone(), Arc::new(q));
    }
    let listed: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(n, q)| (n.as_str(), q.as_ref()))
        .collect();
    if digest(&listed)? != text(DIGEST)? {
        anyhow::bail!("its data does not match its digest (damaged)");
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocks_and_the_vision_option_decide_which_layers_are_quantized() {
        let mut q = Quantize::new(QuantKind::Q8_0);
        assert!(q.selects("language_model.model.layers.0.self_attn.q_proj"));
        assert!(q.selects("text_model.encoder.layers.3.mlp.fc1"));
        assert!(!q.selects("language_model.lm_head"));
        assert!(!q.selects("multi_modal_projector.linear_1"));
        assert!(!q.selects("visual_projection"));
        assert!(!q.selects("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
        assert!(!q.selects("vision_model.encoder.layers.0.mlp.fc2"));
        q.vision = true;
        assert!(q.selects("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
        assert!(q.selects("vision_model.encoder.layers.0.mlp.fc2"));
        assert_eq!(QuantKind::Q8_0.block_size(), 32);
        assert_eq!(QuantKind::Q4K.block_size(), 256);
    }

    #[test]
    fn the_memory_estimate_counts_selected_layers_in_blocks() {
        let shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "model.language_model.layers.0.mlp.up_proj.weight".into(),
                vec![512, 256],
            ),
            (
                "language_model.model.layers.0.mlp.down_proj.weight".into(),
                vec![256, 96],
            ),
            ("language_model.model.norm.weight".into(), vec![256]),
            ("lm_head.weight".into(), vec![1000, 256]),
            (
                "vision_tower.encoder.layers.0.mlp.fc1.weight".into(),
                vec![256, 256],
            ),
        ];
        let list = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
        let dense = (512 * 256 + 256 * 96 + 256 + 1000 * 256 + 256 * 256) * 4;
        let q8 = Quantize::new(QuantKind::Q8_0);
        // q8_0: 34 bytes per 32 values for the two decoder layers.
        let want = dense - (512 * 256 + 256 * 96) * 4 + (512 * 256 + 256 * 96) / 32 * 34;
        assert_eq!(q8.estimated_bytes(list(), 4), want as u64);
        // q4k: the 96-wide layer stays dense; with the vision option the tower's layer counts.
        let q4 = Quantize {
            vision: true,
            ..Quantize::new(QuantKind::Q4K)
        };
        let per_block = GgmlDType::Q4K.type_size();
        let want = dense - (512 * 256 + 256 * 256) * 4 + (512 * 256 + 256 * 256) / 256 * per_block;
        assert_eq!(q4.estimated_bytes(list(), 4), want as u64);
    }

    fn weight(out: usize, inp: usize) -> Tensor {
        let v: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    /// Quantizes two layers (one of them too narrow for q4k blocks) through a quantizer whose
    /// cache is in `dir`, keyed by the file `weights`.
    fn load_two(dir: &Path, weights: &Path, kind: QuantKind) -> (Vec<Base>, QuantSummary) {
        let opts = Quantize {
            cache_dir: Some(dir.to_path_buf()),
            ..Quantize::new(kind)
        };
        let q = Quantizer::open(&opts, &[weights.to_path_buf()], &Device::Cpu).unwrap();
        let bases = vec![
            q.base(
                "language_model.model.layers.0.mlp.up_proj",
                (8, 256),
                |_| Ok(weight(8, 256)),
            )
            .unwrap(),
            q.base(
                "language_model.model.layers.0.mlp.down_proj",
                (4, 96),
                |_| Ok(weight(4, 96)),
            )
            .unwrap(),
            q.base("language_model.lm_head", (3, 256), |_| Ok(weight(3, 256)))
                .unwrap(),
        ];
        (bases, q.finish())
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_the_cache_file_is_replaced_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, b"weights").unwrap();
        let cache = dir.path().join("q");
        let (_, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        let file = summary.cache_file.clone();
        std::fs::remove_file(&file).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&file).status();
        assert!(made.is_ok_and(|s| s.success()));
        // On a thread: a regression blocks on the FIFO, and fails here instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(load_two(&cache, &weights, QuantKind::Q8_0).1.to_string());
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a FIFO in the cache blocked the load");
        assert!(
            line.contains("rebuilt (it is not a regular file)"),
            "{line}"
        );
        assert!(std::fs::metadata(&file).unwrap().is_file());
    }

    #[test]
    fn layers_whose_blocks_do_not_fit_stay_dense_and_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, b"weights").unwrap();
        let (bases, summary) = load_two(&dir.path().join("q"), &weights, QuantKind::Q4K);
        assert!(matches!(bases[0], Base::Quantized(_)));
        assert!(
            matches!(bases[1], Base::Dense(_)),
            "96 is not a multiple of 256"
        );
        assert!(matches!(bases[2], Base::Dense(_)), "lm_head stays dense");
        assert_eq!(summary.quantized_layers, 1);
        assert_eq!(
            summary.kept_dense,
            vec!["language_model.model.layers.0.mlp.down_proj".to_string()]
        );
        let line = summary.to_string();
        assert!(
            line.contains("1 kept dense (inner dimension not a multiple of 256"),
            "{line}"
        );
        // With q8_0 blocks (32 values), both fit.
        let (bases, summary) = load_two(&dir.path().join("q"), &weights, QuantKind::Q8_0);
        assert!(matches!(bases[1], Base::Quantized(_)));
        assert!(summary.kept_dense.is_empty());
    }

    fn blocks(base: &Base) -> Vec<u8> {
        match base {
            Base::Quantized(q) => q.qtensor().data().unwrap().into_owned(),
            Base::Dense(_) => panic!("dense"),
        }
    }

    #[test]
    fn the_second_load_reads_the_cache_and_a_damaged_cache_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, b"weights").unwrap();
        let cache = dir.path().join("q");
        let (first, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        assert_eq!(summary.cache, CacheState::Written);
        let file = summary.cache_file.clone();
        assert!(file.starts_with(&cache) && file.exists());
        // Second load: from the cache, and a loader that would fail is never called.
        let opts = Quantize {
            cache_dir: Some(cache.clone()),
            ..Quantize::new(QuantKind::Q8_0)
        };
        let q = Quantizer::open(&opts, std::slice::from_ref(&weights), &Device::Cpu).unwrap();
        let again = q
            .base(
                "language_model.model.layers.0.mlp.up_proj",
                (8, 256),
                |_| {
                    Err(WeightError::BadFile {
                        file: weights.clone(),
                        reason: "read although cached".into(),
                    })
                },
            )
            .unwrap();
        assert_eq!(blocks(&again), blocks(&first[0]));
        let (second, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        assert_eq!(summary.cache, CacheState::Hit);
        assert_eq!(blocks(&second[1]), blocks(&first[1]));
        // Flip one byte of the block data: detected by the digest, rebuilt.
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() - 40;
        bytes[at] ^= 0x5a;
        std::fs::write(&file, &bytes).unwrap();
        let (rebuilt, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        match &summary.cache {
            CacheState::Rebuilt(why) => assert!(why.contains("digest"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(blocks(&rebuilt[1]), blocks(&first[1]));
        // A truncated file too; then the next load is a hit again.
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let (_, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        assert!(
            matches!(summary.cache, CacheState::Rebuilt(_)),
            "{summary:?}"
        );
        let (_, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        assert_eq!(summary.cache, CacheState::Hit);
        // Other weights: another key, another file.
        std::fs::write(&weights, b"other weights").unwrap();
        let (_, summary) = load_two(&cache, &weights, QuantKind::Q8_0);
        assert_eq!(summary.cache, CacheState::Written);
        assert_ne!(summary.cache_file, file);
    }
}
