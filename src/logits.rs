//! `bella-vqa logits`: the input ids, pixel values, image features and logits of one prompt, so a
//! checkpoint can be compared with another implementation (the parity tests use this path too).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::models::llava::LlavaInput;
use crate::models::{image::load_image, LoadedModel, Model};

/// What one prompt produced.
pub struct PromptOutputs {
    /// The text the tokenizer saw (chat template applied, `<image>` not yet expanded).
    pub prompt: String,
    /// `[1, len]`
    pub input_ids: Tensor,
    /// `[1, 3, H, W]`
    pub pixel_values: Option<Tensor>,
    /// LLaVA: the projector output `[1, tokens, hidden]`; CLIP: the projected image embedding.
    pub image_features: Option<Tensor>,
    /// LLaVA: `[1, len, vocab]`; CLIP: `logits_per_image` `[1, 1]`.
    pub logits: Tensor,
}

/// Runs one prompt (with `raw`, the prompt is used as is instead of through the chat template).
pub fn prompt_outputs(
    loaded: &LoadedModel,
    image: Option<&Path>,
    prompt: &str,
    raw: bool,
) -> Result<PromptOutputs> {
    let prompter = loaded.prompter()?;
    let pixel_values = match image {
        Some(path) => {
            let img = load_image(path)?;
            Some(loaded.image_processor()?.preprocess(&img)?.unsqueeze(0)?)
        }
        None => None,
    };
    match &loaded.model {
        Model::Llava(m) => {
            let per_image = m.config().image_tokens_per_image();
            let (text, ids) = if raw {
                (prompt.to_string(), prompter.encode(prompt, per_image)?)
            } else {
                // As `ask` reads a question: without the blanks around it.
                let prompt = prompt.trim();
                let with_image = pixel_values.is_some();
                (
                    prompter.render_question(prompt, with_image)?,
                    prompter.encode_question(prompt, with_image, per_image, None)?,
                )
            };
            // Image tokens without an image would run on the placeholder's own embedding:
            // logits no pipeline produces (transformers refuses the pair as well).
            let image_tokens = prompter
                .image_token_id()
                .map_or(0, |t| ids.iter().filter(|&&i| i == t).count());
            if pixel_values.is_none() && image_tokens > 0 {
                bail!(
                    "the prompt holds {image_tokens} image tokens but no --image was given: pass \
                     the image, or leave {} out of the prompt",
                    prompter.image_token().unwrap_or("<image>")
                );
            }
            // A --raw prompt is the user's own: its count of <image> is what to fix.
            if raw && pixel_values.is_some() && image_tokens != per_image {
                let token = prompter.image_token().unwrap_or("<image>");
                bail!(
                    "the --raw prompt holds {image_tokens} image tokens, not the {per_image} of \
                     one {token} for the one --image: put exactly one {token} where the image goes"
                );
            }
            let len = ids.len();
            let input_ids = Tensor::from_vec(ids, (1, len), &Device::Cpu)?;
            let keep = vec![vec![true; len]];
            let input = LlavaInput {
                input_ids: &input_ids,
                pixel_values: pixel_values.as_ref(),
                keep: &keep,
                expanded: false,
            };
            let mut cache = m.language_model.new_cache();
            let out = m.forward(&input, &mut cache, 1, false)?;
            Ok(PromptOutputs {
                prompt: text,
                input_ids,
                pixel_values,
                image_features: out.image_features,
                logits: out.logits,
            })
        }
        Model::Clip(m) => {
            let Some(pixels) = pixel_values else {
                bail!("a CLIP model scores an image against the prompt: pass --image");
            };
            let max_len = m.config().text_config.max_position_embeddings;
            let (ids, mask) = prompter.encode_clip_batch(&[prompt.to_string()], max_len, true)?;
            let len = ids[0].len();
            let input_ids = Tensor::from_vec(ids.concat(), (1, len), &Device::Cpu)?;
            let mask = Tensor::from_vec(mask.concat(), (1, len), &Device::Cpu)?;
            let logits = m.logits_per_image(&pixels, &input_ids, Some(&mask))?;
            let features = m.image_embeds(&pixels, 1)?;
            Ok(PromptOutputs {
                prompt: prompt.to_string(),
                input_ids,
                image_features: Some(features),
                pixel_values: Some(pixels),
                logits,
            })
        }
    }
}

impl PromptOutputs {
    /// Writes `input_ids` (i64, as transformers), `pixel_values`, `image_features`, `logits`
    /// (f32) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        tensors.insert(
            "input_ids".to_string(),
            self.input_ids.to_dtype(DType::I64)?,
        );
        tensors.insert("logits".to_string(), self.logits.to_dtype(DType::F32)?);
        if let Some(p) = &self.pixel_values {
            tensors.insert("pixel_values".to_string(), p.to_dtype(DType::F32)?);
        }
        if let Some(f) = &self.image_features {
            tensors.insert("image_features".to_string(), f.to_dtype(DType::F32)?);
        }
        crate::io::save_safetensors_atomically(path, &tensors)
    }
}
