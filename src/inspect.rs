//! `bella-vqa inspect`: what was loaded, from where, how big.

use std::fmt;

use serde::Serialize;

use crate::bella::ParticleModel;
use crate::models::config::ModelConfig;
use crate::models::prompt::{TemplateSource, NO_TEMPLATE};
use crate::models::LoadedModel;

#[derive(Debug, Serialize)]
pub struct FileSummary {
    pub name: String,
    pub bytes: u64,
}

/// A description of a loaded checkpoint.
#[derive(Debug, Serialize)]
pub struct ModelSummary {
    pub architecture: String,
    /// One line per component with its sizes.
    pub components: Vec<String>,
    /// Exact number of values in the weight files.
    pub parameters: usize,
    pub stored_dtypes: std::collections::BTreeMap<String, usize>,
    pub declared_dtype: Option<String>,
    pub compute_dtype: String,
    pub device: String,
    /// What `--quantize` did (absent: a dense base).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::models::quant::QuantSummary>,
    /// Linear layers that can carry particles (`train --targets` chooses among them).
    pub particle_capable_layers: usize,
    /// Stored tensors the model does not read (another architecture's, layers the config lacks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unused_tensors: Vec<String>,
    /// Where a LLaVA's prompt template comes from (absent for CLIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub source: String,
    pub directory: String,
    pub files: Vec<FileSummary>,
}

impl ModelSummary {
    pub fn new(loaded: &LoadedModel) -> Self {
        let components = match &loaded.config {
            ModelConfig::Clip(c) => vec![
                format!(
                    "text: {} layers, hidden {}, {} heads, vocab {}, {} positions",
                    c.text_config.num_hidden_layers,
                    c.text_config.hidden_size,
                    c.text_config.num_attention_heads,
                    c.text_config.vocab_size,
                    c.text_config.max_position_embeddings
                ),
                vision_line(&c.vision_config),
                format!("projection: {}", c.projection_dim),
            ],
            ModelConfig::Llava(c) => {
                let t = &c.text_config;
                vec![
                    vision_line(&c.vision_config),
                    format!(
                        "image features: vision hidden states {:?}, {} tokens per image",
                        c.feature_layers().unwrap_or_default(),
                        c.image_tokens_per_image()
                    ),
                    format!(
                        "language model: LLaMA, {} layers, hidden {}, {} heads ({} kv), vocab {}, \
                         {} positions (prompt and answer), rope θ {}",
                        t.num_hidden_layers,
                        t.hidden_size,
                        t.num_attention_heads,
                        t.num_kv_heads(),
                        t.vocab_size,
                        t.max_position_embeddings,
                        t.rope_theta()
                    ),
                ]
            }
        };
        let mut files: Vec<FileSummary> = std::fs::read_dir(&loaded.files.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| FileSummary {
                name: e.file_name().to_string_lossy().into_owned(),
                bytes: std::fs::metadata(e.path()).map(|m| m.len()).unwrap_or(0),
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let info = &loaded.info;
        Self {
            architecture: info.architecture.to_string(),
            components,
            parameters: info.parameters,
            stored_dtypes: info.stored_dtypes.clone(),
            declared_dtype: info.declared_dtype.clone(),
            compute_dtype: info.compute_dtype.as_str().to_string(),
            device: info.device.clone(),
            quantization: info.quantization.clone(),
            // Layers the model never runs cannot carry particles that matter (attach leaves
            // them out).
            particle_capable_layers: loaded.model.linears().len()
                - loaded.model.inert_linears().len(),
            unused_tensors: info.unused_tensors.clone(),
            chat_template: match (&loaded.config, &loaded.prompter) {
                (ModelConfig::Llava(_), Some(p)) => Some(match p.template_source() {
                    TemplateSource::File(path) => path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    TemplateSource::Default => format!("none in the model: {NO_TEMPLATE}"),
                    TemplateSource::Inline => "given in code".to_string(),
                }),
                _ => None,
            },
            source: loaded.files.origin.to_string(),
            directory: loaded.files.dir.display().to_string(),
            files,
        }
    }
}

fn vision_line(v: &crate::models::config::ClipVisionConfig) -> String {
    format!(
        "vision: CLIP ViT, {} layers, hidden {}, {} heads, {} px, patch {}",
        v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.image_size, v.patch_size
    )
}

/// Groups digits: 1234567 → "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "architecture  {}", self.architecture)?;
        for c in &self.components {
            writeln!(f, "  {c}")?;
        }
        writeln!(
            f,
            "parameters    {} (values in the weight files)",
            thousands(self.parameters)
        )?;
        let stored: Vec<String> = self
            .stored_dtypes
            .iter()
            .map(|(d, n)| format!("{d} {}", thousands(*n)))
            .collect();
        writeln!(
            f,
            "dtype         stored {}; config {}; computing in {} on {}",
            stored.join(", "),
            self.declared_dtype.as_deref().unwrap_or("not stated"),
            self.compute_dtype,
            self.device
        )?;
        if let Some(q) = &self.quantization {
            writeln!(f, "quantized     {q}")?;
        }
        writeln!(
            f,
            "particles     {} linear layers can carry them (train --targets)",
            self.particle_capable_layers
        )?;
        if let Some(t) = &self.chat_template {
            writeln!(f, "chat template {t}")?;
        }
        if !self.unused_tensors.is_empty() {
            writeln!(
                f,
                "unused        {} stored tensors the model does not read:",
                self.unused_tensors.len()
            )?;
            for name in &self.unused_tensors {
                writeln!(f, "  {name}")?;
            }
        }
        writeln!(f, "source        {}", self.source)?;
        writeln!(f, "directory     {}", self.directory)?;
        writeln!(f, "files")?;
        for file in &self.files {
            writeln!(
                f,
                "  {:<40} {:>14} bytes",
                file.name,
                thousands(file.bytes as usize)
            )?;
        }
        Ok(())
    }
}
