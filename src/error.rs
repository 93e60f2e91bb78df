//! Typed errors that callers may want to match on.

use std::path::PathBuf;

/// What can be wrong with a checkpoint's weight files.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read weight file {file}: {reason} (is it a complete safetensors file? re-download or re-save it)")]
    BadFile { file: PathBuf, reason: String },
    #[error("tensor {key:?} is missing from {files} (tried {tried:?})")]
    MissingTensor {
        key: String,
        tried: Vec<String>,
        files: String,
    },
    #[error("tensor {key:?} in {file} has shape {actual:?}, the config implies {expected:?}")]
    ShapeMismatch {
        key: String,
        file: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
}
