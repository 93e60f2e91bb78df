//! Where and in which precision a model computes: `--device cpu|cuda|cuda:N` and
//! `--dtype auto|f32|bf16|f16` (issue 10).
//!
//! The frozen weights are held in the compute dtype (a half-precision checkpoint computed in half
//! precision is never widened to f32). Whatever must stay exact stays f32 whatever the choice:
//! particle factors and their optimizer state, the normalisations, attention softmax, the
//! log-likelihood sums and the model average.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The `--dtype` choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeChoice {
    /// The fastest dtype that fits in memory: f32 on the CPU when it fits, else half precision
    /// (bf16 on a CPU with AVX512-BF16 or AMX, else the checkpoint's own half dtype, bf16 for an
    /// f32 checkpoint); on a GPU the checkpoint's half dtype. Half precision beside a
    /// `--quantize`d base, which is there to save memory.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// The `--device` choice: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The device when the build has a GPU backend and a GPU answers, else the CPU.
    pub fn detect() -> Self {
        if cfg!(feature = "cuda") && Device::new_cuda(0).is_ok() {
            Self::Cuda(0)
        } else {
            Self::Cpu
        }
    }

    /// Opens the device; a GPU in a build without the `cuda` feature is a clear error.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) if !cfg!(feature = "cuda") => bail!(
                "--device cuda:{n} needs a build with the GPU backend: \
                 cargo build --release --features cuda (needs the CUDA toolkit); or compute on \
                 the CPU: --device cpu"
            ),
            Self::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot open GPU cuda:{n}: {e}"))
            }
        }
    }
}

/// `--device` and `--dtype`, shared by every command that loads a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ComputeArgs {
    /// Where to compute: cpu, cuda (GPU 0) or cuda:N (default: the GPU when the build has the
    /// `cuda` feature and one answers, else the CPU).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceChoice>,
    /// The dtype of the frozen weights and activations; particles, norms, softmax and
    /// log-likelihoods stay f32. auto: f32 on the CPU when it fits in memory, else half precision
    /// (bf16 on a CPU with AVX512-BF16 or AMX, else the checkpoint's own half dtype, bf16 for an
    /// f32 checkpoint); half precision with --quantize.
    #[arg(long, value_enum, ignore_case = true, default_value_t = DTypeChoice::Auto)]
    pub dtype: DTypeChoice,
}

impl ComputeArgs {
    pub fn options(&self) -> ComputeOptions {
        ComputeOptions {
            device: self.device,
            dtype: self.dtype,
        }
    }
}

/// Device and dtype as asked for (`None` device: detect).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ComputeOptions {
    pub device: Option<DeviceChoice>,
    pub dtype: DTypeChoice,
}

/// What a load resolved to, and why.
#[derive(Clone, Debug)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
    /// One line for the user: what was picked and why (for `auto`).
    pub reason: String,
}

/// The memory `auto` keeps free beside the f32 weights for the work (activations, the KV cache,
/// the particles): a quarter of the weights and 1 GB. The f32 weights alone "fitting" left
/// nothing to compute with: an answer ran the machine out of memory, and a training (about 2.4×
/// the weights) killed another program.
pub fn work_room(weight_bytes: u64) -> u64 {
    weight_bytes / 4 + 1_000_000_000
}

/// Bytes the weights need in `dtype` (values × size), what [`resolve`] and the memory check use.
pub fn weight_bytes(values: usize, dtype: DType) -> u64 {
    values as u64 * dtype.size_in_bytes() as u64
}

/// Resolves `auto`: weights needing `f32_bytes` in f32 (quantized layers at their block size),
/// stored mostly in `stored` (the dtype holding most values), `available` bytes of memory
/// (`None`: unknown, assume it fits), `quantized`: with `--quantize`.
pub fn resolve(
    opts: ComputeOptions,
    f32_bytes: u64,
    stored: DType,
    available: Option<u64>,
    quantized: bool,
) -> Result<Compute> {
    let choice = opts.device.unwrap_or_else(DeviceChoice::detect);
    let device = choice.open()?;
    // On a CPU with AVX512-BF16 or AMX bf16 products run 2–5× as fast as f16 ones
    // (`bella::bf16_gemm`); elsewhere the checkpoint's own half dtype, read without conversion.
    let native = crate::bella::bf16_gemm::instructions().filter(|_| device.is_cpu());
    let (half, why_half) = match (native, stored) {
        (Some(isa), _) => (
            DType::BF16,
            format!("; bf16: this CPU multiplies bf16 natively ({isa})"),
        ),
        (None, DType::F16 | DType::BF16) => (stored, String::new()),
        (None, _) => (DType::BF16, String::new()),
    };
    let (dtype, reason) = match opts.dtype {
        DTypeChoice::F32 => (DType::F32, "--dtype f32".to_string()),
        DTypeChoice::Bf16 => (DType::BF16, "--dtype bf16".to_string()),
        DTypeChoice::F16 => (DType::F16, "--dtype f16".to_string()),
        DTypeChoice::Auto if !device.is_cpu() => {
            (half, format!("auto: half precision on {choice}"))
        }
        // The rest of the model in f32 would take more memory than the whole model dense in
        // half precision (2.8 against 2.2 GB for a 2-layer 7B-wide LLaVA in q4k, stop 40).
        DTypeChoice::Auto if quantized => (
            half,
            format!("auto: half precision beside the quantized layers, to save memory{why_half}"),
        ),
        DTypeChoice::Auto => match available {
            Some(avail) if f32_bytes.saturating_add(work_room(f32_bytes)) > avail => (
                half,
                format!(
                    "auto: f32 would need ~{:.1} GB and ~{:.1} GB to work in, {:.1} GB \
                     available{why_half}",
                    gb(f32_bytes),
                    gb(work_room(f32_bytes)),
                    gb(avail)
                ),
            ),
            _ => (
                DType::F32,
                "auto: f32 fits in memory on the CPU, with room to work".to_string(),
            ),
        },
    };
    Ok(Compute {
        device,
        dtype,
        reason: format!("computing in {} on {choice} ({reason})", dtype.as_str()),
    })
}

pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// A size for a message: in GB with one decimal, under 1 GB in whole MB.
pub fn size(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.1} GB", gb(bytes))
    } else {
        format!("{:.0} MB", bytes as f64 / 1e6)
    }
}

/// Refuses a load whose weights need more memory than is available, before anything is read,
/// instead of being killed halfway.
pub fn check_fits(needed: u64, available: u64, dtype: DType) -> Result<()> {
    if needed > available {
        let hint = match dtype {
            DType::F32 | DType::F64 => "try --dtype bf16 or --quantize q4k",
            _ => "try --quantize q4k, or free memory",
        };
        bail!(
            "the model needs ~{:.1} GB in {}, {:.1} GB available; {hint}",
            gb(needed),
            dtype.as_str(),
            gb(available)
        );
    }
    Ok(())
}

/// For the memory tests only: `BELLA_FAULT_MEM_AVAILABLE=BYTES` in the environment stands in
/// for `MemAvailable`.
pub const MEM_AVAILABLE_ENV: &str = "BELLA_FAULT_MEM_AVAILABLE";

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where there is no such file).
pub fn mem_available_bytes() -> Option<u64> {
    if let Some(bytes) = std::env::var(MEM_AVAILABLE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(bytes);
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What to do when a GPU ran out of memory (candle reports the driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` and nothing else), or `None` for any other error.
pub fn out_of_memory_hint(error: &anyhow::Error) -> Option<&'static str> {
    let oom = error
        .chain()
        .any(|e| e.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY"));
    oom.then_some(
        "the GPU ran out of memory: train with --gradient-checkpointing (a LLaVA keeps one \
         decoder layer's activations at a time), fewer --particles or a smaller --batch-size; \
         put the particles on the top layers only (--targets \
         'language_model.layers.24-31.*.q_proj,language_model.layers.24-31.*.v_proj'); or \
         quantize the frozen base (--quantize q8_0)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_like_torch() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("CUDA:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn a_gpu_out_of_memory_error_says_what_to_do_and_no_other_error_does() {
        // As candle 0.11 reports it, under the context the commands add.
        let oom = anyhow::anyhow!(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#)
            .context("training step 1");
        let hint = out_of_memory_hint(&oom).unwrap();
        assert!(hint.contains("--gradient-checkpointing"), "{hint}");
        let other = anyhow::anyhow!("cannot read /x/config.json").context("loading the model");
        assert_eq!(out_of_memory_hint(&other), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_feature_says_how_to_build() {
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn auto_picks_f32_when_it_fits_and_half_precision_when_not() {
        let cpu = ComputeOptions {
            device: Some(DeviceChoice::Cpu),
            dtype: DTypeChoice::Auto,
        };
        // 1 G values: 4.3 GB in f32.
        let fits = resolve(cpu, 4 << 30, DType::F16, Some(8 << 30), false).unwrap();
        assert_eq!(fits.dtype, DType::F32);
        // Beside a quantized base, which is there to save memory: half precision.
        let quantized = resolve(cpu, 4 << 30, DType::F16, Some(8 << 30), true).unwrap();
        assert_ne!(quantized.dtype, DType::F32, "{}", quantized.reason);
        assert!(
            quantized.reason.contains("beside the quantized layers"),
            "{}",
            quantized.reason
        );
        let tight = resolve(cpu, 4 << 30, DType::F16, Some(3 << 30), false).unwrap();
        if crate::bella::bf16_gemm::available() {
            assert_eq!(tight.dtype, DType::BF16, "the fast half dtype of this CPU");
            assert!(tight.reason.contains("-BF16)"), "{}", tight.reason);
        } else {
            assert_eq!(tight.dtype, DType::F16, "the checkpoint's own half dtype");
        }
        assert!(
            tight.reason.contains("f32 would need ~4.3 GB"),
            "{}",
            tight.reason
        );
        // The f32 weights alone would fit, but leave nothing to work in.
        let bare = resolve(cpu, 4 << 30, DType::F16, Some(5 << 30), false).unwrap();
        assert_ne!(bare.dtype, DType::F32, "{}", bare.reason);
        assert!(
            bare.reason
                .contains("~4.3 GB and ~2.1 GB to work in, 5.4 GB available"),
            "{}",
            bare.reason
        );
        let from_f32 = resolve(cpu, 4 << 30, DType::F32, Some(3 << 30), false).unwrap();
        assert_eq!(from_f32.dtype, DType::BF16);
        let forced = ComputeOptions {
            dtype: DTypeChoice::F32,
            ..cpu
        };
        assert_eq!(
            resolve(forced, 4 << 30, DType::F16, Some(1), true)
                .unwrap()
                .dtype,
            DType::F32
        );
    }

    #[test]
    fn a_load_that_does_not_fit_says_how_much_it_needs_and_what_to_try() {
        check_fits(1 << 30, 2 << 30, DType::F32).unwrap();
        let err = check_fits(28_000_000_000, 9_500_000_000, DType::F32)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the model needs ~28.0 GB in f32, 9.5 GB available; try --dtype bf16 or --quantize q4k"
        );
        let err = check_fits(14_000_000_000, 9_500_000_000, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("in bf16") && err.contains("--quantize q4k"),
            "{err}"
        );
        assert!(mem_available_bytes().is_some_and(|b| b > 0));
    }
}
