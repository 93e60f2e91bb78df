//! Training checkpoints: everything needed to resume exactly, written so that a crash at any
//! moment leaves the previous checkpoint usable.
//!
//! ```text
//! OUT/checkpoints/step-00000120/particles.safetensors   the particle set at that step
//! OUT/checkpoints/step-00000120/bella_config.json
//! OUT/checkpoints/step-00000120/optimizer.safetensors   AdamW moments
//! OUT/checkpoints/step-00000120/trainer_state.json      step, options, RNG-free data position
//! OUT/checkpoints/latest                                the name of the newest complete one
//! ```
//!
//! A checkpoint directory is complete before `latest` names it (every file written atomically);
//! the two newest are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainOptions;
use crate::bella::particles::ParticleSet;
use crate::io::{save_safetensors_atomically, write_bytes_atomically};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const LATEST: &str = "latest";
const KEEP: usize = 2;

/// Where the trainer is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub step: u64,
    pub options: TrainOptions,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes a complete checkpoint and then points `latest` at it.
pub fn save(
    out: &Path,
    set: &ParticleSet,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    let name = format!("step-{:08}", state.step);
    let dir = root.join(&name);
    set.save(&dir)?;
    save_safetensors_atomically(&dir.join(OPTIMIZER_FILE), optimizer)?;
    write_bytes_atomically(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(state)?)?;
    write_bytes_atomically(&root.join(LATEST), name.as_bytes())?;
    prune(&root, &name);
    Ok(dir)
}

/// Removes all but the newest `KEEP` checkpoint directories (never the one just written).
fn prune(root: &Path, newest: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for n in names.into_iter().take(excess) {
        if n != newest {
            let _ = std::fs::remove_dir_all(root.join(n));
        }
    }
}

/// The newest complete checkpoint, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let path = checkpoints_dir(out).join(LATEST);
    if !path.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(checkpoints_dir(out).join(name.trim())))
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
        format!(
            "checkpoint {} is damaged; older checkpoints (if any) are in {}",
            dir.display(),
            dir.parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
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
