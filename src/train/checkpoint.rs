//! Training checkpoints: everything needed to resume exactly, committed so that a kill at any
//! instant leaves either the previous state or the new one.
//!
//! ```text
//! OUT/checkpoints/step-00000120/particles.safetensors   the particle set at that step
//! OUT/checkpoints/step-00000120/bella_config.json
//! OUT/checkpoints/step-00000120/optimizer.safetensors   AdamW moments
//! OUT/checkpoints/step-00000120/trainer_state.json      step, options, data fingerprint
//! OUT/checkpoints/step-00000120/train_log.jsonl         the training log up to that step
//! OUT/checkpoints/latest                                the name of the committed checkpoint
//! OUT/particles.safetensors, OUT/bella_config.json      copies of the committed checkpoint's
//! ```
//!
//! A checkpoint directory is written whole (a temporary directory renamed when complete); then
//! `latest` is switched to it by an atomic rename — that rename is the commit. The top-level
//! particle files are derived from the committed checkpoint ([`publish`]): after the commit, and
//! again by every later run, which repairs them if a kill came in between. So is the top-level
//! `train_log.jsonl` (the log travels with each checkpoint): a resumed run's log is the one its
//! checkpoint saw, never lines of steps after it, nor of another run. The files of a set that a
//! run replaces (`train --force`) go only then, so that a run failing before its first commit
//! leaves that set whole, log included. The committed
//! checkpoint and the one before it are kept; other checkpoint directories (older ones, or one
//! written but never committed) are removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{TrainOptions, LOG_FILE};
use crate::bella::particles::{ParticleConfig, ParticleSet, CONFIG_FILE, PARTICLES_FILE};
use crate::io::{remove_dir_all, safetensors_bytes, write_bytes_atomically, write_dir_atomically};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const LATEST: &str = "latest";

/// What the particles were trained on: the training questions, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub questions: usize,
    /// SHA-256 over every question's id, text, human answers and image file name.
    pub sha256: String,
}

/// Where the trainer is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    pub options: TrainOptions,
    /// Absent in checkpoints of older versions.
    #[serde(default)]
    pub data: Option<DataFingerprint>,
    /// The validation questions the run evaluates on (`--val`, its first `--val-sample`): they
    /// change only the log's evaluations. Absent in older checkpoints.
    #[serde(default)]
    pub val: Option<DataFingerprint>,
    /// The frozen base's compute dtype and `--quantize` (`"bf16"`, `"f32, q8_0 with the vision
    /// tower"`): they change the particles a step makes. Absent in older checkpoints.
    #[serde(default)]
    pub compute: Option<String>,
    /// The sum of the training losses of the steps since the last log line, and their count:
    /// a resumed run's next line averages them all, as the uninterrupted run's does.
    #[serde(default)]
    pub pending_loss: Option<(f64, usize)>,
    /// The log line of this step, whose evaluation a stop interrupted: a resumed run evaluates
    /// and writes it first, so that its log is the uninterrupted run's.
    #[serde(default)]
    pub pending_evaluation: Option<super::Evaluation>,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes a checkpoint (with `log`, the run's training log up to its step), commits it and makes
/// the top-level particle files and log its copies, `questions` (the [`crate::data::seen`] list
/// of the run) beside them.
pub fn save(
    out: &Path,
    set: &ParticleSet,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
    log: &[u8],
    questions: &[u8],
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    let name = format!("step-{:08}", state.step);
    let dir = root.join(&name);
    let [(particles_name, particles), (config_name, config)] = set.files()?;
    let optimizer = safetensors_bytes(optimizer)?;
    let state = serde_json::to_vec_pretty(state)?;
    write_dir_atomically(
        &dir,
        &[
            (particles_name, &particles),
            (config_name, &config),
            (OPTIMIZER_FILE, &optimizer),
            (STATE_FILE, &state),
            (LOG_FILE, log),
        ],
    )?;
    write_bytes_atomically(&root.join(LATEST), name.as_bytes())?;
    prune(out)?;
    publish(out, &dir, questions)?;
    Ok(dir)
}

/// Removes every checkpoint directory except the committed one and the newest before it.
pub fn prune(out: &Path) -> Result<()> {
    let root = checkpoints_dir(out);
    let committed = latest(out)?
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let names: Vec<String> = step_dirs(out)
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let previous = names
        .iter()
        .rfind(|n| n.as_str() < committed.as_str())
        .cloned();
    for n in names {
        if n != committed && Some(&n) != previous.as_ref() {
            remove_dir_all(&root.join(n))?;
        }
    }
    Ok(())
}

/// Whether `out` holds checkpoints of a training run: a `latest` pointer or a `step-*`
/// directory in its `checkpoints/` (a folder of that name with anything else is not ours).
pub fn any(out: &Path) -> bool {
    checkpoints_dir(out).join(LATEST).exists() || !step_dirs(out).is_empty()
}

/// Removes the training run's checkpoints from `out` (the `latest` pointer first, then every
/// `step-*` directory), and `checkpoints/` itself when nothing else is in it.
pub fn remove_all(out: &Path) -> Result<()> {
    let root = checkpoints_dir(out);
    crate::io::remove_file(&root.join(LATEST))?;
    for dir in step_dirs(out) {
        remove_dir_all(&dir)?;
    }
    // Not empty: someone else's files, left alone.
    let _ = std::fs::remove_dir(&root);
    Ok(())
}

/// The checkpoint directories in `out` (`step-*`), oldest first, committed or not.
pub fn step_dirs(out: &Path) -> Vec<PathBuf> {
    let root = checkpoints_dir(out);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// The committed checkpoint, if any. A `latest` that names no checkpoint directory here
/// (damaged, or its checkpoints deleted) is an error saying what to do, so that nothing is
/// pruned or resumed on its word.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out);
    let path = root.join(LATEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::input::read_to_string(&path, "checkpoint pointer")?;
    let name = text.trim();
    let is_step = name
        .strip_prefix("step-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if is_step && root.join(name).is_dir() {
        return Ok(Some(root.join(name)));
    }
    let left: Vec<String> = step_dirs(out)
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let what_to_do = match left.last() {
        Some(newest) => format!(
            "it holds {}: write the name of the checkpoint to continue ({newest}) into it and \
             resume, or delete it",
            left.join(", ")
        ),
        None => format!(
            "no checkpoint is left there: delete it (the particles in {} stay; --force then \
             trains over them)",
            out.display()
        ),
    };
    bail!(
        "{} names {name:?}, which is not a checkpoint directory in {}; {what_to_do}",
        path.display(),
        root.display()
    )
}

/// Makes `out/particles.safetensors`, `out/bella_config.json` and `out/train_log.jsonl` byte
/// copies of those of the checkpoint `dir` (the log where the checkpoint has one: older ones do
/// not), and `questions` the training-question list beside them, writing only what differs. A
/// calibrated threshold stored in the top-level config since is kept as long as the particles are
/// the same.
pub fn publish(out: &Path, dir: &Path, questions: &[u8]) -> Result<()> {
    let read = |path: PathBuf| {
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let particles = read(dir.join(PARTICLES_FILE))?;
    let config = read(dir.join(CONFIG_FILE))?;
    let top_particles = out.join(PARTICLES_FILE);
    let same_particles = std::fs::read(&top_particles).ok() == Some(particles.clone());
    if !same_particles {
        // Another set's question list goes right before its particles do, and comes back only
        // after the new ones are in place: a kill at any instant never pairs particles with
        // another run's list (at worst with none).
        let list = out.join(crate::data::seen::FILE);
        if crate::input::read_if_present(&list, "training question list")?.as_deref()
            != Some(questions)
        {
            crate::io::remove_file(&list)?;
        }
        write_bytes_atomically(&top_particles, &particles)?;
    }
    let top_config = out.join(CONFIG_FILE);
    let keep_config = same_particles
        && std::fs::read(&top_config)
            .ok()
            .is_some_and(|top| top == config || same_but_calibrated(&top, &config));
    if !keep_config {
        write_bytes_atomically(&top_config, &config)?;
    }
    if let Some(log) = crate::input::read_if_present(&dir.join(LOG_FILE), "training log")? {
        let top_log = out.join(LOG_FILE);
        if crate::input::read_if_present(&top_log, "training log")?.as_deref() != Some(&log) {
            write_bytes_atomically(&top_log, &log)?;
        }
    }
    crate::data::seen::write(out, questions)
}

/// Whether the config `top` is `checkpoint` with only a calibration added.
fn same_but_calibrated(top: &[u8], checkpoint: &[u8]) -> bool {
    let parse = |bytes: &[u8]| {
        let mut c: ParticleConfig = serde_json::from_slice(bytes).ok()?;
        c.abstention = None;
        c.abstention_history.clear();
        serde_json::to_value(c).ok()
    };
    matches!((parse(top), parse(checkpoint)), (Some(a), Some(b)) if a == b)
}

/// Everything a checkpoint holds.
pub struct Loaded {
    pub set: ParticleSet,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
    pub dir: PathBuf,
}

/// Reads a checkpoint directory; a damaged file is an error naming it (the previous checkpoint
/// next to it is untouched).
pub fn load(dir: &Path) -> Result<Loaded> {
    let hint = || {
        let root = dir.parent().unwrap_or(dir);
        let this = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let previous = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-") && Some(n) < this.as_ref())
            .max();
        let what_to_do = match previous {
            Some(p) => format!(
                "resume from the one before it: write {p} into {} and rerun with --resume",
                root.join(LATEST).display()
            ),
            None => format!(
                "no older checkpoint is left in {}: train again into another --out",
                root.display()
            ),
        };
        format!("checkpoint {} is damaged; {what_to_do}", dir.display())
    };
    let set = ParticleSet::load(dir, &Device::Cpu).with_context(hint)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let optimizer = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", opt_path.display()))
        .with_context(hint)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))
        .with_context(hint)?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid trainer state", state_path.display()))
        .with_context(hint)?;
    Ok(Loaded {
        set,
        optimizer,
        state,
        dir: dir.to_path_buf(),
    })
}
