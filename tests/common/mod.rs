//! Helpers shared by the integration tests: fixture paths, reference tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use bella_vqa::data::ReadOptions;
use bella_vqa::hub::{resolve, HubOptions, ModelFiles, ModelSource};
use bella_vqa::models::llava::LlavaInput;
use bella_vqa::models::{self, LoadedModel};
use candle_core::{DType, Device, Tensor};

/// Reading options of the data tests: a bad record is an error, or is skipped.
pub const STRICT: ReadOptions = ReadOptions {
    skip_bad: false,
    check_images: true,
};
pub const SKIP: ReadOptions = ReadOptions {
    skip_bad: true,
    check_images: true,
};

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// The files of a model directory, resolved as the CLI does.
pub fn dir_files(dir: &std::path::Path) -> anyhow::Result<ModelFiles> {
    resolve(
        &ModelSource::Dir(dir.to_path_buf()),
        &HubOptions::from_env(),
    )
}

pub fn load_model(name: &str) -> LoadedModel {
    load_model_in(name, DType::F32)
}

/// A fixture model computing in `dtype` on the CPU.
pub fn load_model_in(name: &str, dtype: DType) -> LoadedModel {
    let files = dir_files(&fixture(name)).expect("fixture files");
    models::load(&files, &Device::Cpu, dtype).expect("fixture model loads")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .expect("reference tensors")
}

pub fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference tensor {key} missing"))
}

/// Reference ids (int64) as u32 rows.
pub fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

pub fn ids_tensor(rows: &[Vec<u32>]) -> Tensor {
    let len = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), len), &Device::Cpu).unwrap()
}

/// The largest |value|.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Σ value² (a gradient's squared norm).
pub fn sq_norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest |actual − expected| relative to the largest |expected|.
pub fn relative_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    max_abs_diff(actual, expected) / max_abs(expected)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

pub const TOL: f32 = 1e-4;

#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let d = max_abs_diff(actual, expected);
    assert!(d <= TOL, "{what}: max abs diff {d} > {TOL}");
}

/// Compares `[rows, len, …]` tensors only where `mask[row][j]` is set.
#[track_caller]
pub fn assert_close_masked(what: &str, actual: &Tensor, expected: &Tensor, mask: &[Vec<u32>]) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes differ");
    for (r, row) in mask.iter().enumerate() {
        for (j, &m) in row.iter().enumerate() {
            if m != 0 {
                let a = actual.get(r).unwrap().get(j).unwrap();
                let e = expected.get(r).unwrap().get(j).unwrap();
                let d = max_abs_diff(&a, &e);
                assert!(d <= TOL, "{what}: row {r} position {j}: max abs diff {d}");
            }
        }
    }
}

pub fn keep_from_mask(mask: &[Vec<u32>]) -> Vec<Vec<bool>> {
    mask.iter()
        .map(|r| r.iter().map(|&v| v != 0).collect())
        .collect()
}

/// Greedy decoding of `n` tokens (no early stop) through the library's prefill + generate path.
pub fn greedy(
    m: &bella_vqa::models::llava::LlavaModel,
    input: &bella_vqa::models::llava::LlavaInput,
    particles: usize,
    n: usize,
) -> Vec<Vec<u32>> {
    use bella_vqa::answer::generate::{generate, GenerateOptions, Sampling};
    let prefill = m.prefill(input, particles).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: n,
        eos: vec![],
        sampling: Sampling::Greedy,
    };
    generate(&m.language_model, &prefill, particles, &opts)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect()
}

/// The greedy tokens (8, no early stop) of every reference prompt equal transformers'; `what`
/// names the model in a failure.
#[track_caller]
pub fn assert_greedy_tokens_equal_transformers(
    m: &bella_vqa::models::llava::LlavaModel,
    what: &str,
) {
    let r = reference("llava");
    for prefix in ["image", "text", "batch"] {
        let p = reference_prompt(prefix);
        let tokens = greedy(m, &p.input(), 1, 8);
        assert_eq!(
            tokens,
            ids(get(&r, &format!("{prefix}.greedy_tokens"))),
            "{what}: {prefix}"
        );
    }
}

/// One of the reference LLaVA prompts (`image`, `text`, `batch` in reference/llava.safetensors):
/// its token ids, pixel values (none for `text`) and the positions its attention mask keeps.
pub struct ReferencePrompt {
    pub ids: Tensor,
    pub pixels: Option<Tensor>,
    pub keep: Vec<Vec<bool>>,
}

pub fn reference_prompt(prefix: &str) -> ReferencePrompt {
    let r = reference("llava");
    ReferencePrompt {
        ids: get(&r, &format!("{prefix}.input_ids"))
            .to_dtype(DType::U32)
            .unwrap(),
        pixels: r.get(&format!("{prefix}.pixel_values")).cloned(),
        keep: keep_from_mask(&ids(get(&r, &format!("{prefix}.attention_mask")))),
    }
}

impl ReferencePrompt {
    /// The model input, one row per prompt (not particle-expanded).
    pub fn input(&self) -> LlavaInput<'_> {
        LlavaInput {
            input_ids: &self.ids,
            pixel_values: self.pixels.as_ref(),
            keep: &self.keep,
            expanded: false,
        }
    }
}

/// The config of a particle set on the tiny LLaVA fixture (whose weight files are `files`):
/// ensemble, seed 0, no threshold, no layers. Tests set the rest with struct update syntax, so a
/// new config field is added here once.
pub fn tiny_llava_particle_config(
    files: &ModelFiles,
) -> bella_vqa::bella::particles::ParticleConfig {
    use bella_vqa::bella::particles::{hash_weights, BaseModel, ParticleConfig};
    ParticleConfig {
        format_version: 1,
        base_model: BaseModel {
            source: fixture("llava-tiny-hub").display().to_string(),
            revision: None,
            commit: None,
            weights: hash_weights(files).expect("fixture weights hash"),
        },
        architecture: "LLaVA".into(),
        targets: Vec::new(),
        layers: Vec::new(),
        rank: 1,
        alpha: 1.0,
        particles: 1,
        method: "ensemble".into(),
        seed: 0,
        step: 0,
        abstention: None,
        abstention_history: Vec::new(),
        answer_vocabulary: None,
        particles_sha256: None,
    }
}

/// A stored abstention threshold as a test sets it (the confidence selector, no temperature).
pub fn test_abstention(threshold: f64) -> bella_vqa::bella::particles::Abstention {
    bella_vqa::bella::particles::Abstention {
        threshold,
        objective: "test".into(),
        data: None,
        selector: Default::default(),
        temperature: None,
        confidence_map: None,
        guarantee: None,
        image_check: None,
        answers_sha256: None,
        computed_in: None,
    }
}

/// Trains 2 epochs of 16 shapes-world questions on `loaded` (particles on q/v of the language
/// model), checks the training loss falls by 10 % and stays finite, and returns the output
/// directory (particles, logs). Shared by the tests of training over other bases (half precision,
/// quantized).
pub fn train_briefly_and_check_the_loss_falls(
    loaded: &mut LoadedModel,
    method: bella_vqa::train::Method,
    particles: usize,
) -> tempfile::TempDir {
    use bella_vqa::data::shapes::{generate, ShapesOptions};
    use bella_vqa::data::{read_jsonl, ReadOptions};
    use bella_vqa::train::{self, Kernel, RunOptions, TrainOptions};
    let data = tempfile::tempdir().unwrap();
    generate(&ShapesOptions {
        n: 16,
        ..ShapesOptions::new(data.path())
    })
    .unwrap();
    let read = |f: &str| {
        read_jsonl(&data.path().join(f), &ReadOptions::default())
            .unwrap()
            .examples
    };
    let out = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        targets: vec![
            "language_model.*.q_proj".into(),
            "language_model.*.v_proj".into(),
        ],
        rank: 4,
        alpha: 8.0,
        particles,
        method,
        kernel: Kernel::DeltaW,
        epochs: 2,
        batch_size: 4,
        lr: 1e-2,
        ..TrainOptions::llava_defaults()
    };
    let run = RunOptions {
        out: out.path().to_path_buf(),
        resume: false,
        force: false,
        eval_every: 4,
        val_sample: 2,
        checkpoint_every: 100,
        max_steps: None,
        progress: false,
        model_source: "tests/fixtures/llava-tiny-hub".into(),
        gradient_checkpointing: false,
    };
    let report = train::train(
        loaded,
        &read("train.jsonl"),
        &read("val.jsonl"),
        &opts,
        &run,
    )
    .unwrap();
    assert!(report.finished);
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = log.first().unwrap()["train_loss"].as_f64().unwrap();
    let last = log.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(
        last.is_finite() && last < first * 0.9,
        "loss {first} → {last}"
    );
    out
}

/// The CRC-32 of PNG chunks (and zlib), to edit a PNG's chunks in a test.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A TIFF-structured EXIF block (little endian) holding one tag: Orientation = `orientation`.
pub fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut exif = b"II*\0".to_vec();
    exif.extend_from_slice(&8u32.to_le_bytes()); // the first IFD follows the header
    exif.extend_from_slice(&1u16.to_le_bytes()); // one entry:
    exif.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation,
    exif.extend_from_slice(&3u16.to_le_bytes()); // SHORT,
    exif.extend_from_slice(&1u32.to_le_bytes()); // one value,
    exif.extend_from_slice(&orientation.to_le_bytes());
    exif.extend_from_slice(&[0, 0]);
    exif.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    exif
}

/// A `w` × `h` PNG of the given colour layout (its bytes zero), with an EXIF orientation tag.
pub fn png_of(layout: image::ExtendedColorType, (w, h): (u32, u32), orientation: u16) -> Vec<u8> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    let mut e = image::codecs::png::PngEncoder::new(&mut bytes);
    e.set_exif_metadata(exif_orientation(orientation)).unwrap();
    let row = (usize::from(layout.bits_per_pixel()) * w as usize).div_ceil(8);
    let data = vec![0u8; row * h as usize];
    e.write_image(&data, w, h, layout).unwrap();
    bytes
}

/// What [`limited`] limits.
#[cfg(target_os = "linux")]
pub enum Limit {
    /// `ulimit -n`: open files.
    OpenFiles,
    /// `ulimit -f`: the size of a file written (bytes here).
    FileSize,
    /// `ulimit -v`: the address space (bytes here).
    AddressSpace,
}

/// `cmd`, to run under a resource limit of `value` (soft and hard), as a shell's `ulimit` sets
/// it for the programs it starts.
#[cfg(target_os = "linux")]
pub fn limited(
    cmd: &mut std::process::Command,
    limit: Limit,
    value: u64,
) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    let resource = match limit {
        Limit::OpenFiles => libc::RLIMIT_NOFILE,
        Limit::FileSize => libc::RLIMIT_FSIZE,
        Limit::AddressSpace => libc::RLIMIT_AS,
    };
    // SAFETY: setrlimit is async-signal-safe, as a function run between fork and exec must be.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            match libc::setrlimit(resource, &l) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })
    }
}
