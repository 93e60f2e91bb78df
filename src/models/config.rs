//! `config.json` as the hub has it: CLIP, LLaMA-family decoders and LLaVA.
//!
//! Every field that transformers fills from a class default has the same default here, so sparse
//! 4.x-era configs (the llava-hf ones leave out `vision_feature_layer`, the projector activation and
//! most of `text_config`) and transformers-5 configs (`dtype`, `rope_parameters`) read alike.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::image::MAX_PROCESSED_SIDE;

/// Activation functions by their transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    /// The exact (erf) GELU: transformers' `"gelu"`.
    Gelu,
    #[serde(alias = "gelu_new", alias = "gelu_fast")]
    GeluPytorchTanh,
    /// transformers' `"silu"` and its synonym `"swish"`.
    #[serde(alias = "swish")]
    Silu,
    Relu,
}

/// `text_config` of a CLIP checkpoint (defaults of transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

/// `vision_config` of a CLIP checkpoint or a LLaVA vision tower (defaults of `CLIPVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Positions of the vision transformer: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// A full CLIP checkpoint (`CLIPConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_clip_projection_dim")]
    pub projection_dim: usize,
}

fn default_clip_projection_dim() -> usize {
    512
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (4.x).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Whatever else it holds (`factor`, …): a non-empty section is used, as Python reads it.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl RopeParameters {
    fn is_empty(&self) -> bool {
        self.rope_type.is_none() && self.rope_theta.is_none() && self.other.is_empty()
    }
}

/// A LLaMA-family decoder (defaults of transformers' `LlamaConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<Box<RopeParameters>>,
    pub rope_scaling: Option<Box<RopeParameters>>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosTokenId>,
    pub pad_token_id: Option<u32>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: Activation::Silu,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(EosTokenId::One(2)),
            pad_token_id: None,
        }
    }
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a token id (a whole number from 0) or a list of them"
)]
pub enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokenId {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            EosTokenId::One(id) => vec![*id],
            EosTokenId::Many(ids) => ids.clone(),
        }
    }
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The RoPE section transformers 5 uses (`convert_rope_params_to_dict`): `rope_scaling`
    /// when it holds anything, else `rope_parameters`; the other is ignored.
    fn rope(&self) -> Option<&RopeParameters> {
        self.rope_scaling
            .as_deref()
            .filter(|r| !r.is_empty())
            .or(self.rope_parameters.as_deref())
    }

    /// `rope_theta` from the RoPE section (`rope_scaling` when it holds anything, else
    /// `rope_parameters`), else the 4.x key, else 10 000, as transformers 5 reads them (the
    /// legacy key only fills a section without one).
    pub fn rope_theta(&self) -> f64 {
        self.rope()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The invariants the decoder code relies on; `at` is the key path of this section
    /// (`text_config`).
    fn validate(&self, at: &str) -> Result<()> {
        if let Some(kind) = self.rope().and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                bail!("{at}: rope type {kind:?} is not supported (only the default RoPE)");
            }
        }
        let k = Keys(at);
        k.positive("vocab_size", self.vocab_size)?;
        k.positive("hidden_size", self.hidden_size)?;
        k.positive("intermediate_size", self.intermediate_size)?;
        k.positive("num_hidden_layers", self.num_hidden_layers)?;
        k.positive("max_position_embeddings", self.max_position_embeddings)?;
        k.heads(self.hidden_size, self.num_attention_heads)?;
        let kv = self.num_kv_heads();
        k.positive("num_key_value_heads", kv)?;
        if !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "{} {} is not a multiple of {} {kv}",
                k.key("num_attention_heads"),
                self.num_attention_heads,
                k.key("num_key_value_heads")
            );
        }
        let head_dim = self.head_dim();
        if self.head_dim.is_some() {
            k.positive("head_dim", head_dim)?;
        }
        if !head_dim.is_multiple_of(2) {
            bail!(
                "{} {head_dim} is odd: rotary embeddings need an even head dimension",
                k.key("head_dim")
            );
        }
        k.finite_positive("rms_norm_eps", self.rms_norm_eps)?;
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 1.0) {
            bail!(
                "{} {theta} must be a finite number above 1",
                k.key("rope_theta")
            );
        }
        Ok(())
    }
}

/// Range checks of one config section whose errors name the key path
/// (`text_config.num_attention_heads`).
struct Keys<'a>(&'a str);

impl Keys<'_> {
    fn key(&self, name: &str) -> String {
        if self.0.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.0)
        }
    }

    fn positive(&self, name: &str, value: usize) -> Result<()> {
        if value == 0 {
            bail!("{} is 0; it must be at least 1", self.key(name));
        }
        Ok(())
    }

    fn finite_positive(&self, name: &str, value: f64) -> Result<()> {
        if !(value.is_finite() && value > 0.0) {
            bail!(
                "{} {value} must be a finite positive number",
                self.key(name)
            );
        }
        Ok(())
    }

    /// `num_attention_heads` is positive and divides `hidden_size`.
    fn heads(&self, hidden: usize, heads: usize) -> Result<()> {
        self.positive("num_attention_heads", heads)?;
        if !hidden.is_multiple_of(heads) {
            bail!(
                "{} {hidden} is not divisible by {} {heads}",
                self.key("hidden_size"),
                self.key("num_attention_heads")
            );
        }
        Ok(())
    }

    /// A side length in pixels within `1..=MAX_PROCESSED_SIDE`.
    fn pixels(&self, name: &str, value: usize) -> Result<()> {
        self.positive(name, value)?;
        if value > MAX_PROCESSED_SIDE {
            bail!(
                "{} {value} is larger than {MAX_PROCESSED_SIDE} pixels",
                self.key(name)
            );
        }
        Ok(())
    }
}

impl ClipTextConfig {
    fn validate(&self, at: &str) -> Result<()> {
        let k = Keys(at);
        k.positive("vocab_size", self.vocab_size)?;
        k.positive("hidden_size", self.hidden_size)?;
        k.positive("intermediate_size", self.intermediate_size)?;
        k.positive("num_hidden_layers", self.num_hidden_layers)?;
        k.positive("max_position_embeddings", self.max_position_embeddings)?;
        k.heads(self.hidden_size, self.num_attention_heads)?;
        k.finite_positive("layer_norm_eps", self.layer_norm_eps)
    }
}

impl ClipVisionConfig {
    fn validate(&self, at: &str) -> Result<()> {
        let k = Keys(at);
        k.positive("hidden_size", self.hidden_size)?;
        k.positive("intermediate_size", self.intermediate_size)?;
        k.positive("num_hidden_layers", self.num_hidden_layers)?;
        k.heads(self.hidden_size, self.num_attention_heads)?;
        if self.num_channels != 3 {
            bail!(
                "{} {} is not supported: images are read as RGB (3 channels)",
                k.key("num_channels"),
                self.num_channels
            );
        }
        k.pixels("image_size", self.image_size)?;
        k.positive("patch_size", self.patch_size)?;
        if self.patch_size > self.image_size {
            bail!(
                "{} {} is larger than {} {}",
                k.key("patch_size"),
                self.patch_size,
                k.key("image_size"),
                self.image_size
            );
        }
        k.finite_positive("layer_norm_eps", self.layer_norm_eps)
    }
}

/// `vision_feature_layer`: one layer index or several whose features are concatenated.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

/// Which vision positions feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSelect {
    /// Drop the class token.
    Default,
    /// Keep every position.
    Full,
}

/// A LLaVA-1.5 checkpoint (`LlavaConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    #[serde(default = "default_llava_vision")]
    pub vision_config: ClipVisionConfig,
    #[serde(default)]
    pub text_config: LlamaConfig,
    #[serde(default = "default_image_token_index", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: Activation,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "default_feature_select")]
    pub vision_feature_select_strategy: FeatureSelect,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// The model's own key; transformers 5 ties the output layer to the embeddings when it or
    /// `text_config`'s is true (read into `text_config.tie_word_embeddings`).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// transformers' `LlavaConfig` builds this vision config when none is given.
fn default_llava_vision() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        projection_dim: 768,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        image_size: 336,
        patch_size: 14,
        ..ClipVisionConfig::default()
    }
}

fn default_image_token_index() -> u32 {
    32000
}
fn default_projector_act() -> Activation {
    Activation::Gelu
}
fn default_feature_layer() -> FeatureLayer {
    FeatureLayer::One(-2)
}
fn default_feature_select() -> FeatureSelect {
    FeatureSelect::Default
}
fn default_true() -> bool {
    true
}

impl LlavaConfig {
    /// The vision hidden-state indices (0 = embeddings after `pre_layrnorm`, i = output of layer i)
    /// whose features are concatenated, negative indices resolved.
    pub fn feature_layers(&self) -> Result<Vec<usize>> {
        let n = self.vision_config.num_hidden_layers as i64 + 1;
        let raw = match &self.vision_feature_layer {
            FeatureLayer::One(i) => vec![*i],
            FeatureLayer::Many(v) => v.clone(),
        };
        raw.into_iter()
            .map(|i| {
                let idx = if i < 0 { n + i } else { i };
                if idx < 0 || idx >= n {
                    bail!(
                        "vision_feature_layer {i} is out of range for {} vision layers",
                        n - 1
                    );
                }
                Ok(idx as usize)
            })
            .collect()
    }

    /// Image tokens one image expands to in the prompt.
    pub fn image_tokens_per_image(&self) -> usize {
        let patches = self.vision_config.grid() * self.vision_config.grid();
        match self.vision_feature_select_strategy {
            FeatureSelect::Default => patches,
            FeatureSelect::Full => patches + 1,
        }
    }
}

/// The architectures this crate loads.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Clip(ClipConfig),
    Llava(LlavaConfig),
}

impl ModelConfig {
    /// Reads a `config.json`, choosing the architecture by `model_type`.
    pub fn from_file(path: &Path) -> Result<(Self, serde_json::Value)> {
        let text = crate::input::read_to_string(path, "model config")?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let config = Self::from_value(&raw).with_context(|| format!("in {}", path.display()))?;
        Ok((config, raw))
    }

    pub fn from_value(raw: &serde_json::Value) -> Result<Self> {
        // A pre-quantized checkpoint's tensors mean nothing without its quantizer's scales.
        for at in ["/quantization_config", "/text_config/quantization_config"] {
            if let Some(q) = raw.pointer(at).filter(|q| !q.is_null()) {
                let method = q
                    .get("quant_method")
                    .and_then(|m| m.as_str())
                    .unwrap_or("?");
                bail!(
                    "the checkpoint is pre-quantized ({} with quant_method {method:?}), which \
                     bella-vqa cannot load: use the unquantized checkpoint (f32, f16 or bf16 \
                     weights), and --quantize q8_0 or q4k to quantize it at load",
                    &at[1..].replace('/', ".")
                );
            }
        }
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .context("missing required key \"model_type\" (expected \"clip\" or \"llava\")")?;
        match model_type {
            "clip" => {
                let config: ClipConfig = parse(raw, "CLIP")?;
                config.text_config.validate("text_config")?;
                config.vision_config.validate("vision_config")?;
                Keys("").positive("projection_dim", config.projection_dim)?;
                Ok(ModelConfig::Clip(config))
            }
            "llava" => {
                // transformers builds both towers by these names (AutoConfig), absent meaning
                // its defaults: another tower is refused by name before its keys or weights are
                // read as CLIP's or Llama's.
                for (tower, supported) in [
                    ("vision_config", "clip_vision_model"),
                    ("text_config", "llama"),
                ] {
                    match raw.pointer(&format!("/{tower}/model_type")) {
                        None | Some(serde_json::Value::Null) => {}
                        Some(t) if t == supported => {}
                        Some(t) => bail!(
                            "{tower}.model_type {t} is not supported (expected \"{supported}\"): \
                             bella-vqa loads LLaVA with a CLIP vision tower and a Llama language \
                             model"
                        ),
                    }
                }
                let mut config: LlavaConfig = parse(&one_name_each(raw)?, "LLaVA")?;
                config.text_config.tie_word_embeddings |= config.tie_word_embeddings;
                config.text_config.validate("text_config")?;
                config.vision_config.validate("vision_config")?;
                config.feature_layers()?;
                let vocab = config.text_config.vocab_size;
                if config.image_token_index as usize >= vocab {
                    bail!(
                        "image_token_index {} is outside the vocabulary (text_config.vocab_size {vocab})",
                        config.image_token_index
                    );
                }
                Ok(ModelConfig::Llava(config))
            }
            other => bail!(
                "model_type {other:?} is not supported: bella-vqa loads \"clip\" and \"llava\" checkpoints"
            ),
        }
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            ModelConfig::Clip(_) => "CLIP",
            ModelConfig::Llava(_) => "LLaVA",
        }
    }
}

/// A LLaVA config with each value under one name: transformers writes some under their old and
/// new names both (`rope_scaling`'s `type` and `rope_type`, `image_token_index` and
/// `image_token_id`), which must then agree.
fn one_name_each(raw: &serde_json::Value) -> Result<serde_json::Value> {
    let mut raw = raw.clone();
    for (at, old, new) in [
        ("", "image_token_id", "image_token_index"),
        ("/text_config/rope_scaling", "type", "rope_type"),
        ("/text_config/rope_parameters", "type", "rope_type"),
    ] {
        let Some(serde_json::Value::Object(m)) = raw.pointer_mut(at) else {
            continue;
        };
        // A scaling factor says a scaled RoPE is meant, whatever the (missing) type.
        if let (true, Some(factor), None, None) =
            (at.contains("rope"), m.get("factor"), m.get(old), m.get(new))
        {
            bail!(
                "{}: a rope scaling factor ({factor}) without a rope type is not supported (only \
                 the default RoPE; transformers refuses it too)",
                at[1..].replace('/', ".")
            );
        }
        if let (Some(a), Some(b)) = (m.get(old), m.get(new)) {
            if a != b {
                bail!(
                    "{at}: {old} {a} and {new} {b} disagree; keep the one the model was trained \
                     with",
                    at = if at.is_empty() {
                        "config.json".to_string()
                    } else {
                        at[1..].replace('/', ".")
                    }
                );
            }
            m.remove(old);
        }
    }
    Ok(raw)
}

/// Deserialises with the path of the offending key in the error (`text_config.hidden_size: …`).
fn parse<T: serde::de::DeserializeOwned>(raw: &serde_json::Value, what: &str) -> Result<T> {
    serde_path_to_error::deserialize(raw.clone())
        .map_err(|e| anyhow::anyhow!("invalid {what} config at key `{}`: {}", e.path(), e.inner()))
}

/// The checkpoint's declared dtype: `torch_dtype` (4.x) or `dtype` (5.x), top level or in `text_config`.
pub fn declared_dtype(raw: &serde_json::Value) -> Option<String> {
    [
        "/dtype",
        "/torch_dtype",
        "/text_config/dtype",
        "/text_config/torch_dtype",
    ]
    .iter()
    .find_map(|p| raw.pointer(p).and_then(|v| v.as_str()).map(str::to_string))
}

/// `eos_token_id` of a `generation_config.json` (one id or a list; none when absent or null).
pub fn generation_eos(path: &Path) -> Result<Vec<u32>> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        #[serde(default)]
        eos_token_id: Option<EosTokenId>,
    }
    let text = crate::input::read_to_string(path, "generation config")?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let config: GenerationConfig = parse(&raw, "generation").with_context(|| {
        format!(
            "in {} (eos_token_id must be a token id or a list of them)",
            path.display()
        )
    })?;
    Ok(config.eos_token_id.map(|e| e.ids()).unwrap_or_default())
}
