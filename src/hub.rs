//! Model sources: a hub id (with revision), the local hub cache, or a directory.
//! (Placeholder until the hub branch lands.)

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub weights: Vec<PathBuf>,
    pub index: Option<PathBuf>,
}

impl ModelFiles {
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .context("weight_map")?
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            return Ok(Self {
                dir: dir.into(),
                weights: files.iter().map(|f| dir.join(f)).collect(),
                index: Some(index),
            });
        }
        Ok(Self {
            dir: dir.into(),
            weights: vec![dir.join("model.safetensors")],
            index: None,
        })
    }

    pub fn required(&self, name: &str) -> Result<PathBuf> {
        Ok(self.dir.join(name))
    }
}
