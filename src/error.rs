//! Typed errors that callers may want to match on.

use std::path::PathBuf;

/// An option's value outside its range (`--lr -1`, `--max-new-tokens 0`), found before anything
/// is loaded: a usage error, which the CLI ends with status 2 as clap does its own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadOption(pub String);

/// `anyhow::bail!` with a [`BadOption`].
#[macro_export]
macro_rules! bad_option {
    ($($arg:tt)*) => {
        return Err($crate::error::BadOption(format!($($arg)*)).into())
    };
}

/// What can be wrong with a checkpoint's weight files.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read weight file {file}: {reason} (is it a complete safetensors file? re-download or re-save it)")]
    BadFile { file: PathBuf, reason: String },
    #[error("cannot open weight file {file}: permission denied: give this user read access to it (downloading it again cannot help)")]
    NoAccess { file: PathBuf },
    #[error("tensor {key:?} is missing from {files} (tried {tried:?})")]
    MissingTensor {
        key: String,
        tried: Vec<String>,
        files: String,
    },
    #[error("tensor {key:?} in {file} is stored as {dtype} (quantized or integer weights): bella-vqa loads f32, f16 and bf16 checkpoints; use the unquantized checkpoint, and --quantize q8_0 or q4k to quantize it at load")]
    StoredDtype {
        key: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("tensor {key:?} in {file} holds {count} NaN or infinite value(s): the checkpoint is damaged; re-download or re-save it")]
    NonFinite {
        key: String,
        file: PathBuf,
        count: usize,
    },
    #[error("tensor {key:?} in {file} holds {count} value(s) beyond the range of {dtype:?}: load the model in a wider dtype (--dtype bf16 or f32)")]
    OutOfRange {
        key: String,
        file: PathBuf,
        dtype: candle_core::DType,
        count: usize,
    },
    #[error("tensor {key:?} in {file} has shape {actual:?}, the config implies {expected:?}")]
    ShapeMismatch {
        key: String,
        file: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("cannot quantize {key:?} to {quant}: {reason}")]
    Quantize {
        key: String,
        quant: &'static str,
        reason: String,
    },
}

/// A question that cannot be answered as it is asked (a server answers 400 for it); its text
/// says what to change.
#[derive(Debug, thiserror::Error)]
pub enum QuestionError {
    #[error("the question is empty (blanks, control or invisible characters only): ask something about the image")]
    Empty,
    #[error("{}", prompt_too_long(*.prompt, *.max_new_tokens, *.positions))]
    PromptTooLong {
        prompt: usize,
        max_new_tokens: usize,
        positions: usize,
    },
    /// Text the tokeniser refuses (too long, a reserved character), or options out of range.
    #[error("{0}")]
    Unusable(String),
}

/// What [`QuestionError::PromptTooLong`] says: fewer answer tokens help only where the prompt
/// leaves room for some.
fn prompt_too_long(prompt: usize, max_new_tokens: usize, positions: usize) -> String {
    let what = format!(
        "the prompt is {prompt} tokens (image and template included) and the answer may take \
         {max_new_tokens} more, but the model has {positions} positions"
    );
    match positions.saturating_sub(prompt) {
        0 => format!(
            "the prompt is {prompt} tokens (image and template included) and fills the model's \
             {positions} positions: the prompt leaves no room for an answer; shorten the question"
        ),
        room => format!(
            "{what}: shorten the question or allow at most {room} answer tokens (max_new_tokens, \
             --max-new-tokens)"
        ),
    }
}

/// Particle sets that do not belong to the model at hand.
#[derive(Debug, thiserror::Error)]
pub enum ParticleError {
    #[error("these particles were trained on {particles}, but the weights in {base} differ (file names, sizes or sha256; a copy saved in another dtype differs too): load them onto the base model they were trained on (--model {particles}), or retrain")]
    BaseMismatch { particles: String, base: PathBuf },
}

/// An image past the size limits (a server answers 413 for it, not 400).
#[derive(Debug, thiserror::Error)]
#[error("image {name} is too large: {width}×{height} pixels (the limit is {max_side} pixels a side and {max_pixels} pixels in all); scale it down first")]
pub struct ImageTooLarge {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub max_side: u32,
    pub max_pixels: u64,
}

#[cfg(test)]
mod prompt_tests {
    use super::*;

    #[test]
    fn a_prompt_that_fills_the_positions_is_told_to_shorten_the_question_only() {
        let no_room = QuestionError::PromptTooLong {
            prompt: 256,
            max_new_tokens: 16,
            positions: 256,
        }
        .to_string();
        assert!(no_room.contains("leaves no room for an answer; shorten the question"));
        assert!(!no_room.contains("answer tokens"), "{no_room}");
        // The limit asked for plays no part there.
        assert!(!no_room.contains("16"), "{no_room}");
        let some = QuestionError::PromptTooLong {
            prompt: 250,
            max_new_tokens: 16,
            positions: 256,
        }
        .to_string();
        assert!(some.contains("allow at most 6 answer tokens"), "{some}");
    }
}
