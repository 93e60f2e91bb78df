//! A saved particle set: the stacked factors of every adapted layer plus a JSON config that names
//! the base model (source, revision, commit, weight-file hashes), the targets, rank, α, P, the
//! training method and, after calibration, the abstention threshold.
//!
//! ```text
//! DIR/particles.safetensors   {module path}.bella_A [P, r, in], {module path}.bella_B [P, out, r]
//! DIR/bella_config.json       ParticleConfig
//! ```
//!
//! Both files are written atomically, the config last, so a crash leaves the previous set intact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::{Adapter, AdapterSpec, ParticleModel};
use crate::answer::confidence_map::ConfidenceMap;
use crate::answer::image_check::ImageCheck;
use crate::answer::selector::{Selector, TEMPERATURE_RANGE};
pub use crate::guarantee::RiskGuarantee;
use crate::hub::ModelFiles;
use crate::models::weights::count_non_finite;

pub const PARTICLES_FILE: &str = "particles.safetensors";
pub const CONFIG_FILE: &str = "bella_config.json";
const FORMAT_VERSION: u32 = 1;

/// One weight file of the base model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The base model the particles were trained on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaseModel {
    /// As given to `--model` (hub id or directory).
    pub source: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub commit: Option<String>,
    pub weights: Vec<FileHash>,
}

impl BaseModel {
    /// The model as a `--model` argument: for a hub id, the id at the commit the particles were
    /// trained on (a branch moves on, and its new weights are not the ones the particles fit),
    /// else at the revision kept apart (which wins over an `@rev` in the name, as PEFT keeps
    /// `revision` apart from `base_model_name_or_path`); a directory as it is.
    pub fn model_arg(&self) -> String {
        let Some((repo_id, _)) = crate::hub::split_hub_id(&self.source) else {
            return self.source.clone();
        };
        match self.commit.as_ref().or(self.revision.as_ref()) {
            Some(pinned) => format!("{repo_id}@{pinned}"),
            None => self.source.clone(),
        }
    }
}

/// The abstention rule chosen by calibration. Configs written before selectors and temperature
/// existed load as the `confidence` selector at temperature 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Abstention {
    /// Abstain when the selector's score is below this.
    pub threshold: f64,
    /// How it was chosen, e.g. `"risk<=0.05"` or `"max phi_10"`.
    pub objective: String,
    /// The validation data it was chosen on.
    #[serde(default)]
    pub data: Option<String>,
    /// The score compared with the threshold, with its fitted parameters.
    #[serde(default)]
    pub selector: Selector,
    /// The temperature every particle's probabilities are tempered with before aggregation
    /// (`None`: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The map from the model average's confidence (after the temperature) to the confidence
    /// shown and scored (`None`: as it is). Strictly increasing: it changes no answer, nor a
    /// ranking under the confidence selector; the risk-averse and learned selectors read the
    /// mapped confidence (and were fitted on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_map: Option<ConfidenceMap>,
    /// The finite-sample guarantee the threshold carries, if it was chosen with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<RiskGuarantee>,
    /// Abstain on images unlike the validation images, whatever the score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_check: Option<ImageCheck>,
    /// CLIP: the answer list the threshold was chosen with ([`answers_sha256`]); answering
    /// from another list with this calibration is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers_sha256: Option<String>,
    /// What the base computed in when this was chosen (`f32`, `bf16, q8_0`); answering in
    /// another is allowed (the scores move a little) and noted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_in: Option<String>,
}

/// The fingerprint of a CLIP answer list: the sha256 of its answers in sorted order, one a line
/// (the order of the lines changes no answer's probability).
pub fn answers_sha256(answers: &[String]) -> String {
    let mut sorted: Vec<&str> = answers.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    crate::io::sha256_bytes(sorted.join("\n").as_bytes())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParticleConfig {
    pub format_version: u32,
    pub base_model: BaseModel,
    pub architecture: String,
    /// The target patterns asked for.
    pub targets: Vec<String>,
    /// The module paths that carry particles.
    pub layers: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub particles: usize,
    /// `ensemble`, `svgd`, …
    pub method: String,
    pub seed: u64,
    /// Optimiser steps taken.
    pub step: u64,
    #[serde(default)]
    pub abstention: Option<Abstention>,
    /// The thresholds that calibrations replaced, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abstention_history: Vec<Abstention>,
    /// CLIP: the candidate answers the particles score.
    #[serde(default)]
    pub answer_vocabulary: Option<Vec<String>>,
    /// The sha256 of the `particles.safetensors` this config describes, set when the pair is
    /// written: the two files are replaced one after the other, and a run killed in between
    /// must not leave new factors under an old calibration unnoticed (older sets lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub particles_sha256: Option<String>,
}

/// Particles ready to attach to a base model.
#[derive(Clone, Debug)]
pub struct ParticleSet {
    pub config: ParticleConfig,
    /// Module path → factors, in the order of `config.layers`.
    pub adapters: Vec<(String, Adapter)>,
}

/// Hashes every weight file; a hub-cache file whose blob is named by its sha256 (LFS) is not read.
pub fn hash_weights(files: &ModelFiles) -> Result<Vec<FileHash>> {
    files
        .weights
        .iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            Ok(FileHash {
                name,
                bytes,
                sha256: sha256_of(path)?,
            })
        })
        .collect()
}

fn sha256_of(path: &Path) -> Result<String> {
    if let Ok(target) = std::fs::read_link(path) {
        let blob = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if blob.len() == 64 && blob.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(blob.to_ascii_lowercase());
        }
    }
    crate::io::sha256_file_cached(path)
}

/// Scores lie in [0, 1], and calibration stores "abstain on everything" as the number just above
/// the highest score: at most the `f64` just above 1.
fn stored_threshold_in_range(t: f64) -> bool {
    (0.0..=f64::from_bits(1.0f64.to_bits() + 1)).contains(&t)
}

impl ParticleConfig {
    /// The invariants loading and answering rely on: sizes and α as [`AdapterSpec::validate`]
    /// checks them, at least one layer, a stored threshold in [0, 1], a usable selector, a
    /// temperature in the range calibrate fits it in, an increasing confidence map and a
    /// guarantee whose numbers agree.
    pub fn validate(&self) -> Result<()> {
        AdapterSpec {
            targets: self.targets.clone(),
            rank: self.rank,
            alpha: self.alpha,
            particles: self.particles,
        }
        .validate()?;
        if self.layers.is_empty() {
            bail!("\"layers\" is empty: the particle set adapts no layer");
        }
        if let Some(a) = &self.abstention {
            if !stored_threshold_in_range(a.threshold) {
                bail!(
                    "abstention.threshold {} is outside [0, 1]: recalibrate with `bella-vqa calibrate`",
                    a.threshold
                );
            }
            a.selector
                .check()
                .map_err(anyhow::Error::msg)
                .context("abstention.selector")?;
            let (lo, hi) = TEMPERATURE_RANGE;
            if let Some(t) = a.temperature.filter(|t| !(lo..=hi).contains(t)) {
                bail!(
                    "abstention.temperature {t:?} is outside [{lo}, {hi}], the range calibrate fits \
                     it in: recalibrate"
                );
            }
            if let Some(m) = &a.confidence_map {
                m.check()
                    .map_err(anyhow::Error::msg)
                    .context("abstention.confidence_map: recalibrate")?;
            }
            if let Some(g) = &a.guarantee {
                g.check()
                    .map_err(anyhow::Error::msg)
                    .context("abstention.guarantee: recalibrate")?;
            }
            if let Some(c) = &a.image_check {
                c.check()
                    .map_err(anyhow::Error::msg)
                    .context("abstention.image_check: recalibrate")?;
            }
        }
        Ok(())
    }
}

impl ParticleSet {
    /// Collects the adapters attached to `model`.
    pub fn from_model<M: ParticleModel + ?Sized>(model: &M, config: ParticleConfig) -> Self {
        let adapters = model
            .linears()
            .into_iter()
            .filter_map(|(name, l)| l.adapter().map(|a| (name, a.clone())))
            .collect();
        Self { config, adapters }
    }

    /// The two files of the set, `(name, bytes)`: the factors (f32) and the config.
    pub fn files(&self) -> Result<[(&'static str, Vec<u8>); 2]> {
        let mut tensors = HashMap::new();
        for (name, ad) in &self.adapters {
            tensors.insert(format!("{name}.bella_A"), ad.a.to_dtype(DType::F32)?);
            tensors.insert(format!("{name}.bella_B"), ad.b.to_dtype(DType::F32)?);
        }
        let particles = crate::io::safetensors_bytes(&tensors)?;
        let mut config = self.config.clone();
        config.layers = self.adapters.iter().map(|(n, _)| n.clone()).collect();
        config.format_version = FORMAT_VERSION;
        config.particles_sha256 = Some(crate::io::sha256_bytes(&particles));
        Ok([
            (PARTICLES_FILE, particles),
            (CONFIG_FILE, serde_json::to_vec_pretty(&config)?),
        ])
    }

    /// Writes the factors and then the config, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        for (name, bytes) in self.files()? {
            crate::io::write_bytes_atomically(&dir.join(name), &bytes)?;
        }
        Ok(())
    }

    /// Whether `dir` holds a particle set (its factors or its config), finished work that a new
    /// one must not replace unasked.
    pub fn is_in(dir: &Path) -> bool {
        [PARTICLES_FILE, CONFIG_FILE]
            .iter()
            .any(|f| dir.join(f).exists())
    }

    /// Reads only the config (cheap; e.g. to find the base model).
    pub fn read_config(dir: &Path) -> Result<ParticleConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = crate::input::read_to_string(&path, "particle config").with_context(|| {
            if dir.join(super::peft::ADAPTER_CONFIG_FILE).is_file() {
                format!(
                    "{} is a PEFT adapter, not a particle directory: import it (one adapter per \
                     particle) with `bella-vqa import-peft --peft {} --out PARTICLES`",
                    dir.display(),
                    dir.display()
                )
            } else if dir.as_os_str() == "demo" && !dir.exists() {
                // The demo's particles are used without --model or --adapters; by path here.
                let shipped = crate::demo::path(crate::demo::PARTICLES).map_or_else(
                    |e| format!("not available: {e}"),
                    |p| p.display().to_string(),
                );
                format!(
                    "demo is not a particle directory: the demo's particles are used when \
                     neither --model nor --adapters is given; as --adapters, give their folder \
                     ({shipped})"
                )
            } else {
                format!(
                    "{} is not a particle directory: cannot read {CONFIG_FILE} (train one with \
                     `bella-vqa train --out DIR`)",
                    dir.display()
                )
            }
        })?;
        let config: ParticleConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
                .map_err(|e| match e.path().to_string().as_str() {
                    "." => anyhow::anyhow!(
                        "{} is not a valid particle config ({}): restore it, or recalibrate or \
                         retrain into a fresh directory",
                        path.display(),
                        e.inner()
                    ),
                    key => {
                        anyhow::anyhow!("{}: invalid key `{key}`: {}", path.display(), e.inner())
                    }
                })?;
        config
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// Loads the config and the factors onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path: PathBuf = dir.join(PARTICLES_FILE);
        // A run that writes the set (train at each checkpoint, calibrate) replaces its two files
        // one after the other: a reader in between sees a pair that does not belong together,
        // and reads it again a moment later.
        let mut tries = 0;
        let (config, bytes) = loop {
            let config = Self::read_config(dir)?;
            if config.format_version > FORMAT_VERSION {
                bail!(
                    "{} was written by a newer bella-vqa (format {}); upgrade to read it",
                    dir.display(),
                    config.format_version
                );
            }
            crate::input::check_regular(&path, "particle weights")?;
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let matches = config
                .particles_sha256
                .as_ref()
                .is_none_or(|expected| crate::io::sha256_bytes(&bytes) == *expected);
            if matches {
                break (config, bytes);
            }
            tries += 1;
            if tries == 5 {
                bail!(
                    "{} is not the file its {CONFIG_FILE} describes (another sha256): it is \
                     damaged or truncated, or writing the particle set was interrupted between its \
                     two files; rerun the command that wrote it (train --resume, import-peft \
                     --force), then calibrate again",
                    path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).with_context(|| {
            format!(
                "cannot read {} (truncated or not safetensors?)",
                path.display()
            )
        })?;
        let scale = config.alpha / config.rank as f64;
        let mut adapters = Vec::with_capacity(config.layers.len());
        for name in &config.layers {
            let get = |suffix: &str| {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .cloned()
                    .with_context(|| format!("{} has no tensor {key}", path.display()))?;
                let bad = count_non_finite(&t)?;
                if bad > 0 {
                    bail!(
                        "tensor {key} in {} holds {bad} NaN or infinite value(s): the particle set \
                         is damaged (training diverged?); retrain or restore it",
                        path.display()
                    );
                }
                Ok(t)
            };
            let adapter = Adapter::new(get("bella_A")?, get("bella_B")?, scale)
                .with_context(|| format!("{name} in {}", path.display()))?;
            if adapter.particles() != config.particles || adapter.rank() != config.rank {
                bail!(
                    "{name} in {} has {} particles of rank {}, the config says {} of rank {}",
                    path.display(),
                    adapter.particles(),
                    adapter.rank(),
                    config.particles,
                    config.rank
                );
            }
            adapters.push((name.clone(), adapter));
        }
        let listed: std::collections::HashSet<String> = config
            .layers
            .iter()
            .flat_map(|n| [format!("{n}.bella_A"), format!("{n}.bella_B")])
            .collect();
        if let Some(extra) = tensors.keys().find(|k| !listed.contains(*k)) {
            bail!(
                "{} holds the tensor {extra}, which {CONFIG_FILE} does not list: the config and the \
                 factors do not belong together; restore both from one training run",
                path.display()
            );
        }
        Ok(Self { config, adapters })
    }

    /// Refuses a base whose weight files differ from the ones the particles were trained on.
    pub fn verify_base(&self, files: &ModelFiles) -> Result<()> {
        Self::verify_base_of(&self.config, files)
    }

    /// [`Self::verify_base`] of a particle set's config alone (before its factors are read).
    pub fn verify_base_of(config: &ParticleConfig, files: &ModelFiles) -> Result<()> {
        let expected = &config.base_model.weights;
        let sizes: Vec<(String, u64)> = files
            .weights
            .iter()
            .map(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            })
            .collect();
        let same_sizes = sizes.len() == expected.len()
            && sizes
                .iter()
                .zip(expected)
                .all(|((n, b), e)| *n == e.name && *b == e.bytes);
        if !same_sizes || hash_weights(files)? != *expected {
            return Err(crate::error::ParticleError::BaseMismatch {
                particles: config.base_model.model_arg(),
                base: files.dir.clone(),
            }
            .into());
        }
        Ok(())
    }

    /// Attaches the factors to the matching layers of `model` (every saved layer must exist and
    /// fit).
    pub fn attach_to<M: ParticleModel + ?Sized>(&self, model: &mut M) -> Result<()> {
        let mut by_name: HashMap<&str, &Adapter> =
            self.adapters.iter().map(|(n, a)| (n.as_str(), a)).collect();
        for (name, layer) in model.linears_mut() {
            if let Some(adapter) = by_name.remove(name.as_str()) {
                // f32 whatever the base's dtype.
                let device = layer.device();
                let moved = Adapter::new(
                    adapter.a.to_device(&device)?.to_dtype(DType::F32)?,
                    adapter.b.to_device(&device)?.to_dtype(DType::F32)?,
                    adapter.scale,
                )?;
                layer
                    .set_adapter(Some(moved))
                    .with_context(|| format!("particles for {name} do not fit the model"))?;
            }
        }
        if let Some(missing) = by_name.keys().next() {
            bail!("the particles adapt {missing}, which this model does not have (another architecture?)");
        }
        // Only layers a pass never runs (an imported adapter's vision layers above
        // vision_feature_layer; `train` leaves them out): the set could change no answer. Some
        // among others (older sets, the shipped demo's) change nothing and are harmless.
        let inert = model.inert_linears();
        if let Some(first) = self.adapters.first().map(|(name, _)| name) {
            if self.adapters.iter().all(|(name, _)| inert.contains(name)) {
                bail!(
                    "these particles adapt only layers the model never runs ({first}, …: vision \
                     layers above vision_feature_layer), so they could not change an answer: \
                     train or export them on layers that run"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod threshold_tests {
    use super::stored_threshold_in_range;

    #[test]
    fn abstain_on_everything_above_a_score_of_one_is_a_valid_stored_threshold() {
        assert!(stored_threshold_in_range(0.0));
        assert!(stored_threshold_in_range(1.0));
        assert!(stored_threshold_in_range(f64::from_bits(
            1.0f64.to_bits() + 1
        )));
        assert!(!stored_threshold_in_range(1.0 + 1e-9));
        assert!(!stored_threshold_in_range(-0.1));
        assert!(!stored_threshold_in_range(f64::NAN));
    }
}

#[cfg(test)]
mod base_model_tests {
    use super::BaseModel;

    fn base(source: &str, revision: Option<&str>, commit: Option<&str>) -> BaseModel {
        BaseModel {
            source: source.into(),
            revision: revision.map(Into::into),
            commit: commit.map(Into::into),
            weights: Vec::new(),
        }
    }

    #[test]
    fn a_hub_base_is_loaded_at_the_commit_the_particles_were_trained_on() {
        let commit = "e468e24b5a2ad6a3b43e1b1e0d6bbd0d1f2c3a4b";
        // `main` may have moved on since: the commit is what the particles fit.
        assert_eq!(
            base("llava-hf/llava-tiny", Some("main"), Some(commit)).model_arg(),
            format!("llava-hf/llava-tiny@{commit}")
        );
        // No commit recorded (an imported PEFT adapter that named a revision only).
        assert_eq!(
            base("llava-hf/llava-tiny@v1", Some("v2"), None).model_arg(),
            "llava-hf/llava-tiny@v2"
        );
        assert_eq!(
            base("llava-hf/llava-tiny", None, None).model_arg(),
            "llava-hf/llava-tiny"
        );
        // A directory or the demo is taken as it is.
        assert_eq!(
            base("/models/llava", Some("main"), Some(commit)).model_arg(),
            "/models/llava"
        );
        assert_eq!(base("demo", None, Some(commit)).model_arg(), "demo");
    }
}
