//! Memory-mapped safetensors weights (one file or shards) with clear errors.
//!
//! Model code asks for tensors by their hub name (`language_model.model.layers.0.self_attn.q_proj.weight`)
//! and the expected shape; [`Weights`] finds the tensor in whichever shard holds it, under the hub
//! name or one of the layout aliases (transformers 5 renames the LLaVA prefixes), checks the shape and
//! converts it to the compute dtype.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;

use crate::bella::Base;
use crate::error::WeightError;
use crate::models::quant::Quantizer;

/// Tensors with at most this many values are checked for NaN and infinities as they load: norms,
/// biases, position embeddings and every weight of a small model. Larger matrices are not: the
/// check would cost a pass over all weights of a large checkpoint.
pub const FINITE_CHECK_MAX_VALUES: usize = 1 << 20;

/// The number of NaN or infinite values in `t` (any float dtype; integer tensors have none),
/// read [`FINITE_CHECK_MAX_VALUES`] values at a time: a whole f32 copy of a 7B model's
/// embedding matrix would take gigabytes at the load's peak.
pub fn count_non_finite(t: &Tensor) -> candle_core::Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let flat = t.flatten_all()?;
    let total = flat.elem_count();
    let mut count = 0;
    for start in (0..total).step_by(FINITE_CHECK_MAX_VALUES) {
        let len = FINITE_CHECK_MAX_VALUES.min(total - start);
        let values = flat
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        count += values.iter().filter(|v| !v.is_finite()).count();
    }
    Ok(count)
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

/// Values each worker converts at a time when a tensor loads on the CPU (16 KiB of f32 on the stack).
const CONVERT_BLOCK: usize = 4096;

/// A float dtype weights load into on the CPU.
trait LoadDType: candle_core::WithDType {
    /// `dst[i] = src[i]`, rounded to nearest even as candle's `to_dtype` rounds.
    fn from_f32s(src: &[f32], dst: &mut [Self]);
}

impl LoadDType for f32 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl LoadDType for f16 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl LoadDType for bf16 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

/// A stored f16, bf16 or f32 tensor read straight from the file's bytes into a CPU tensor of
/// `dtype` (f16, bf16 or f32), converted in parallel blocks: one allocation and one pass whose
/// fresh pages are touched by every core. Loading in the stored dtype and converting after
/// (candle's way) copies the tensor twice, on one thread: the conversion was most of a 7B load.
/// `None` for other dtypes, which take that way.
fn load_on_cpu(view: &TensorView<'_>, dtype: DType) -> Option<candle_core::Result<Tensor>> {
    let stored = match view.dtype() {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F32 => DType::F32,
        _ => return None,
    };
    // safetensors stores little-endian values; reading them as the host's needs that host.
    if cfg!(target_endian = "big") {
        return None;
    }
    let (bytes, shape) = (view.data(), view.shape().to_vec());
    Some(match dtype {
        DType::F32 => convert::<f32>(bytes, stored, shape),
        DType::F16 => convert::<f16>(bytes, stored, shape),
        DType::BF16 => convert::<bf16>(bytes, stored, shape),
        _ => return None,
    })
}

/// The values of `bytes` (little-endian `stored` values) as a `T` tensor of `shape`.
fn convert<T: LoadDType>(
    bytes: &[u8],
    stored: DType,
    shape: Vec<usize>,
) -> candle_core::Result<Tensor> {
    let size = stored.size_in_bytes();
    let n = shape.iter().product::<usize>();
    if bytes.len() != n * size {
        candle_core::bail!(
            "{} bytes hold no {stored:?} tensor of shape {shape:?}",
            bytes.len()
        );
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    out.spare_capacity_mut()
        .par_chunks_mut(CONVERT_BLOCK)
        .zip(bytes.par_chunks(CONVERT_BLOCK * size))
        .for_each(|(dst, src)| {
            for d in dst.iter_mut() {
                d.write(T::zero());
            }
            // SAFETY: every element of `dst` was just initialised.
            let dst = unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) };
            let mut values = [0f32; CONVERT_BLOCK];
            let values = &mut values[..dst.len()];
            decode(stored, src, values);
            T::from_f32s(values, dst);
        });
    // SAFETY: the blocks cover all `n` values of the capacity, and each wrote its values.
    unsafe { out.set_len(n) };
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// `out[i]` = the `i`-th little-endian `stored` value of `src` (exactly: f32 holds every f16 and
/// bf16 value).
fn decode(stored: DType, src: &[u8], out: &mut [f32]) {
    if stored == DType::F32 {
        for (v, c) in out.iter_mut().zip(src.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return;
    }
    let mut bits = [0u16; CONVERT_BLOCK];
    let bits = &mut bits[..out.len()];
    for (b, c) in bits.iter_mut().zip(src.chunks_exact(2)) {
        *b = u16::from_le_bytes([c[0], c[1]]);
    }
    if stored == DType::F16 {
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
    } else {
        bits.reinterpret_cast::<bf16>().convert_to_f32_slice(out);
    }
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
    /// Stored names the model has read (see [`Weights::unused`]).
    used: Mutex<HashSet<String>>,
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
            if std::fs::File::open(path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
            {
                return Err(WeightError::NoAccess { file: path.clone() });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on the
            // checkpoint not being modified while it is in use.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| WeightError::BadFile {
                file: path.clone(),
                reason: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                // One save writes each tensor once: two copies cannot both be the weight.
                if let Some(first) = routing.insert(name.clone(), index) {
                    return Err(WeightError::BadFile {
                        file: path.clone(),
                        reason: format!(
                            "tensor {name:?} is also in {}: the files are not one checkpoint's \
                             shards (mixed downloads?); keep one copy of each tensor",
                            paths[first].display()
                        ),
                    });
                }
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
            used: Mutex::new(HashSet::new()),
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
            Some(q) => {
                // Read from the quantized cache, not the file, but used all the same.
                let stored = self.stored_name(&key);
                if let Some(name) = &stored {
                    self.mark_used(name.clone());
                }
                q.base(path, (out, inp), |to_quantize| {
                    let tensor = self.get(&key, &[out, inp])?;
                    // Quantized blocks would hide a NaN or Inf: a matrix too large for `get`'s
                    // scan is scanned before it is quantized (one kept dense is not, as
                    // without --quantize).
                    if let Some(name) = stored
                        .filter(|_| to_quantize && tensor.elem_count() > FINITE_CHECK_MAX_VALUES)
                    {
                        self.check_finite(&name, self.routing[&name], &tensor)?;
                    }
                    Ok(tensor)
                })
            }
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
        self.stored_name(key).is_some()
    }

    /// The name `key` is stored under (itself or an alias), if any.
    fn stored_name(&self, key: &str) -> Option<String> {
        self.candidates(key)
            .into_iter()
            .find(|k| self.routing.contains_key(k))
    }

    fn mark_used(&self, name: String) {
        // A poisoned lock only means another load panicked; the set is still a set.
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.insert(name);
    }

    /// Stored tensors the model has not read, sorted: what transformers reports as "weights of
    /// the model checkpoint … not used when initializing" (another architecture's weights, a
    /// layer the config does not have).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = self
            .routing
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        out.sort();
        out
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
        self.mark_used(name.clone());
        let (path, st) = &self.files[index];
        let bad = |e: candle_core::Error| WeightError::BadFile {
            file: path.clone(),
            reason: format!("tensor {name:?}: {e}"),
        };
        let view = st.get(name).map_err(bad)?;
        if !matches!(
            view.dtype(),
            safetensors::Dtype::F32
                | safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F64
        ) {
            return Err(WeightError::StoredDtype {
                key: name.clone(),
                file: path.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != shape {
            return Err(WeightError::ShapeMismatch {
                key: name.clone(),
                file: path.clone(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let tensor = match &self.device {
            Device::Cpu => load_on_cpu(&view, self.dtype),
            _ => None,
        }
        .unwrap_or_else(|| st.load(name, &self.device)?.to_dtype(self.dtype))
        .map_err(bad)?;
        release_pages(view.data());
        if tensor.elem_count() <= FINITE_CHECK_MAX_VALUES {
            self.check_finite(name, index, &tensor)?;
        }
        Ok(tensor)
    }

    /// Refuses the tensor stored as `name` in file `index`, as loaded (`tensor`), when it holds
    /// NaN or Inf: damaged in the file, or finite there and beyond the compute dtype.
    fn check_finite(&self, name: &str, index: usize, tensor: &Tensor) -> Result<(), WeightError> {
        let (path, st) = &self.files[index];
        let bad = |e: candle_core::Error| WeightError::BadFile {
            file: path.clone(),
            reason: format!("tensor {name:?}: {e}"),
        };
        let count = count_non_finite(tensor).map_err(bad)?;
        if count == 0 {
            return Ok(());
        }
        let stored = st.load(name, &Device::Cpu).map_err(bad)?;
        let damaged = count_non_finite(&stored).map_err(bad)?;
        Err(if damaged > 0 {
            WeightError::NonFinite {
                key: name.to_string(),
                file: path.clone(),
                count: damaged,
            }
        } else {
            WeightError::OutOfRange {
                key: name.to_string(),
                file: path.clone(),
                dtype: self.dtype,
                count,
            }
        })
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
    /// Counts `name` as read where it is stored (a tensor the reference implementation loads
    /// and the model never uses), so that [`Weights::unused`] does not list it.
    pub fn skip(&self, name: &str) {
        if let Some(stored) = self.weights.stored_name(&self.key(name)) {
            self.weights.mark_used(stored);
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file (candle's writer) whose header is padded by one more space, so that its
    /// data starts at an odd byte: no value is aligned to its size, as in files from writers
    /// that do not pad the header to 8 bytes.
    fn unaligned_file(dir: &std::path::Path, tensors: &[(&str, DType, &Tensor)]) -> PathBuf {
        let path = dir.join("unaligned.safetensors");
        let stored: HashMap<&str, Tensor> = tensors
            .iter()
            .map(|(name, dtype, t)| (*name, t.to_dtype(*dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&stored, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut out = ((header_len + 1) as u64).to_le_bytes().to_vec();
        out.extend(&bytes[8..8 + header_len]);
        out.push(b' ');
        out.extend(&bytes[8 + header_len..]);
        assert_eq!(
            (8 + header_len + 1) % 2,
            1,
            "the data starts at an odd byte"
        );
        std::fs::write(&path, out).unwrap();
        path
    }

    /// Every stored dtype read into every compute dtype equals candle's load-then-convert, bit for
    /// bit, on values that round in every conversion (and f16's largest values and subnormals), from
    /// unaligned data, over a tail block shorter than the others.
    #[test]
    fn tensors_convert_as_they_load_as_candle_converts_them() {
        let n = 3 * CONVERT_BLOCK + 7;
        let values: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as f32 * 0.618_034).fract() - 0.5;
                match i % 4 {
                    0 => x * 1e-6,  // f16 subnormals
                    1 => x * 1.3e5, // up to f16's largest values
                    _ => x * 3.7,   // rounds in every half format
                }
            })
            .collect();
        let source = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stored = [
            ("f32", DType::F32),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
        ];
        let tensors: Vec<_> = stored
            .iter()
            .map(|(name, d)| (*name, *d, &source))
            .collect();
        let path = unaligned_file(dir.path(), &tensors);
        for target in [DType::F32, DType::F16, DType::BF16] {
            let weights = Weights::open(std::slice::from_ref(&path), &Device::Cpu, target).unwrap();
            for (name, dtype) in stored {
                let loaded = weights.get(name, &[n]).unwrap();
                assert_eq!(loaded.dtype(), target);
                let expected = source.to_dtype(dtype).unwrap().to_dtype(target).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(
                    bits(&loaded),
                    bits(&expected),
                    "{name} loaded as {target:?}"
                );
            }
        }
    }

    /// A value beyond the compute dtype's range is an error that names the tensor and the way out,
    /// not a damaged checkpoint and not a silent infinity.
    #[test]
    fn a_value_beyond_the_dtype_is_an_error_naming_it() {
        let source = Tensor::new(&[1.0f32, -7.0e4, 2.0], &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = unaligned_file(dir.path(), &[("w", DType::F32, &source)]);
        let open = |dtype| Weights::open(std::slice::from_ref(&path), &Device::Cpu, dtype).unwrap();
        match open(DType::F16).get("w", &[3]) {
            Err(WeightError::OutOfRange {
                key, dtype, count, ..
            }) => {
                assert_eq!((key.as_str(), dtype, count), ("w", DType::F16, 1));
            }
            other => panic!("expected OutOfRange, got {other:?}"),
        }
        assert_eq!(
            open(DType::BF16)
                .get("w", &[3])
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, -70144.0, 2.0]
        );
    }

    /// The scan reads a large tensor a chunk at a time and counts every non-finite value, in
    /// the first chunk, across a boundary and in a short last chunk, in any float dtype.
    #[test]
    fn non_finite_values_are_counted_in_every_chunk() {
        let n = 2 * FINITE_CHECK_MAX_VALUES + 4;
        let mut values = vec![1.0f32; n];
        for i in [
            0,
            FINITE_CHECK_MAX_VALUES - 1,
            FINITE_CHECK_MAX_VALUES,
            n - 1,
        ] {
            values[i] = f32::NAN;
        }
        values[n - 2] = f32::INFINITY;
        let t = Tensor::from_vec(values, (n / 4, 4), &Device::Cpu).unwrap();
        assert_eq!(count_non_finite(&t).unwrap(), 5);
        let half = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(count_non_finite(&half).unwrap(), 5);
        let ints = Tensor::zeros(4, DType::U32, &Device::Cpu).unwrap();
        assert_eq!(count_non_finite(&ints).unwrap(), 0);
    }

    /// A matrix too large for the load-time scan is scanned all the same when it is quantized:
    /// blocks would hide its NaN (q8_0 made it a zero and answered).
    #[test]
    fn a_nan_in_a_large_matrix_is_refused_when_it_would_be_quantized() {
        use crate::models::quant::{QuantKind, Quantize, Quantizer};
        let (out, inp) = (1024, 1056);
        assert!(out * inp > FINITE_CHECK_MAX_VALUES);
        let mut values = vec![0.5f32; out * inp];
        values[100 * inp + 5] = f32::NAN;
        let matrix = Tensor::from_vec(values, (out, inp), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = "language_model.model.layers.0.mlp.up_proj";
        let path = dir.path().join("model.safetensors");
        let stored: HashMap<String, Tensor> = [(format!("{key}.weight"), matrix)].into();
        candle_core::safetensors::save(&stored, &path).unwrap();
        let open = || Weights::open(std::slice::from_ref(&path), &Device::Cpu, DType::F32).unwrap();
        // Dense, it loads (the forward pass finds the NaN later).
        assert!(open().base(key, out, inp).is_ok());
        let opts = Quantize {
            cache_dir: Some(dir.path().join("cache")),
            ..Quantize::new(QuantKind::Q8_0)
        };
        let quantizer = Quantizer::open(&opts, std::slice::from_ref(&path), &Device::Cpu).unwrap();
        let err = open()
            .with_quantizer(quantizer)
            .base(key, out, inp)
            .unwrap_err();
        assert!(
            matches!(&err, WeightError::NonFinite { key: k, count: 1, .. } if *k == format!("{key}.weight")),
            "{err}"
        );
    }

    /// Two files holding the same tensor are not one checkpoint: refused naming both, rather than
    /// the last file's copy silently winning.
    #[test]
    fn a_tensor_in_two_shards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let paths: Vec<PathBuf> = ["model-00001-of-00002", "model-00002-of-00002"]
            .iter()
            .map(|name| {
                let path = dir.path().join(format!("{name}.safetensors"));
                let stored: HashMap<&str, Tensor> = [("norm.weight", t.clone())].into();
                candle_core::safetensors::save(&stored, &path).unwrap();
                path
            })
            .collect();
        let err = Weights::open(&paths, &Device::Cpu, DType::F32)
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(
            text.contains("norm.weight")
                && text.contains("model-00001-of-00002")
                && text.contains("model-00002-of-00002"),
            "{text}"
        );
    }
}
