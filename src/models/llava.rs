//! LLaVA-1.5: CLIP vision tower → 2-layer GELU projector → LLaMA decoder (`llava-hf` layout).
//!
//! The prompt already holds one image token per image feature (the `<image>` placeholder is
//! expanded in the text); their embeddings are replaced by the projected image features.

use candle_core::{Result, Tensor, Var};

use crate::bella::{expand_particles, ParticleLinear, ParticleModel};
use crate::error::WeightError;
use crate::models::clip::{ClipVisionTransformer, EncoderTape};
use crate::models::config::{FeatureSelect, LlavaConfig};
use crate::models::llama::{DecoderOutput, KvCache, LlamaModel, Outputs, Prefill};
use crate::models::nn::{activate, backward_from, grad_or_zeros, linear, VarGrads};
use crate::models::weights::{Alias, Scope};

/// Hub names (llava-hf, transformers 4.x) and where other savers put the same tensors
/// (transformers ≥ 4.52 and 5.x: `model.vision_tower…`, `model.language_model…`, `lm_head`).
pub const LAYOUT_ALIASES: &[Alias] = &[
    (
        "vision_tower.vision_model.",
        &[
            "model.vision_tower.vision_model.",
            "vision_tower.",
            "model.vision_tower.",
        ],
    ),
    ("multi_modal_projector.", &["model.multi_modal_projector."]),
    (
        "language_model.model.",
        &["model.language_model.", "language_model."],
    ),
    ("language_model.lm_head.", &["lm_head."]),
];

#[derive(Clone, Debug)]
pub struct LlavaModel {
    pub vision_tower: ClipVisionTransformer,
    linear_1: ParticleLinear,
    linear_2: ParticleLinear,
    pub language_model: LlamaModel,
    feature_layers: Vec<usize>,
    config: LlavaConfig,
}

/// The vision tower's hidden state (a variable: its backward pass starts there) and the tape of
/// the layers below it, from a checkpointed pass ([`LlavaModel::window_loss_checkpointed`]).
type LayeredVision = (Tensor, EncoderTape);

/// Inputs of one LLaVA pass.
pub struct LlavaInput<'a> {
    /// `[batch, len]` u32, with the image tokens already expanded.
    pub input_ids: &'a Tensor,
    /// `[images, C, H, W]`, one image per `<image>` placeholder in row-major order.
    pub pixel_values: Option<&'a Tensor>,
    /// `keep[row][j]`: real token (true) or left padding.
    pub keep: &'a [Vec<bool>],
    /// The rows already carry the particle axis: `P·batch` rows (and `P·images` images),
    /// particle-major, with different examples per particle (training with a per-particle data
    /// order). `keep` may then have `batch` or `P·batch` rows.
    pub expanded: bool,
}

/// Outputs of one LLaVA pass, every stage kept for parity checks.
pub struct LlavaOutput {
    pub image_features: Option<Tensor>,
    pub inputs_embeds: Tensor,
    pub decoder: DecoderOutput,
    /// `[rows, len, vocab]`
    pub logits: Tensor,
}

impl LlavaModel {
    pub fn load(s: &Scope, c: &LlavaConfig) -> std::result::Result<Self, WeightError> {
        let vision_hidden = c.vision_config.hidden_size;
        let feature_layers = c.feature_layers().map_err(|e| WeightError::BadFile {
            file: "config.json".into(),
            reason: e.to_string(),
        })?;
        let text_hidden = c.text_config.hidden_size;
        let p = s.pp("multi_modal_projector");
        let bias = c.multimodal_projector_bias;
        Ok(Self {
            vision_tower: ClipVisionTransformer::load(
                &s.pp("vision_tower.vision_model"),
                &c.vision_config,
                false,
            )?,
            linear_1: linear(
                &p.pp("linear_1"),
                vision_hidden * feature_layers.len(),
                text_hidden,
                bias,
            )?,
            linear_2: linear(&p.pp("linear_2"), text_hidden, text_hidden, bias)?,
            language_model: LlamaModel::load(&s.pp("language_model"), &c.text_config)?,
            feature_layers,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// Projected image features `[rows, tokens_per_image, text_hidden]` and whether the rows carry
    /// the particle axis. The tower runs once per image unless it carries particles itself.
    pub fn image_features(
        &self,
        pixel_values: &Tensor,
        particles: usize,
        input_expanded: bool,
    ) -> Result<(Tensor, bool)> {
        let (hidden, expanded) = self.vision_tower.hidden_states_at(
            pixel_values,
            &self.feature_layers,
            particles,
            input_expanded,
        )?;
        self.project(hidden, expanded, particles)
    }

    /// The projector over the vision tower's hidden states `hidden` (its selected positions).
    fn project(
        &self,
        hidden: Tensor,
        mut expanded: bool,
        particles: usize,
    ) -> Result<(Tensor, bool)> {
        let hidden = match self.config.vision_feature_select_strategy {
            FeatureSelect::Default => hidden.narrow(1, 1, hidden.dim(1)? - 1)?,
            FeatureSelect::Full => hidden,
        };
        let mut x = hidden;
        for (i, layer) in [&self.linear_1, &self.linear_2].into_iter().enumerate() {
            if !expanded && layer.adapter().is_some() {
                x = expand_particles(&x, particles)?;
                expanded = true;
            }
            x = layer.forward(&x)?;
            if i == 0 {
                x = activate(self.config.projector_hidden_act, &x)?;
            }
        }
        Ok((x, expanded))
    }

    /// Whether a checkpointed training pass runs the vision tower one layer at a time where it
    /// carries particles: when LLaVA reads one of its hidden states (LLaVA-1.5 reads one).
    pub fn vision_checkpointed(&self) -> bool {
        self.feature_layers.len() == 1
    }

    /// How many vision-tower layers a pass runs: hidden state i is the output of layer i − 1,
    /// so the layers from the deepest one read on are never run.
    pub fn vision_layers_run(&self) -> usize {
        self.feature_layers.iter().copied().max().unwrap_or(0)
    }

    /// Token embeddings with the image tokens replaced by `features` in row-major order. When the
    /// features carry the particle axis and the ids do not, the ids are shared by all particles and
    /// the result carries the axis too (`P` blocks of `batch` rows).
    pub fn merge_image_features(
        &self,
        input_ids: &Tensor,
        ids_expanded: bool,
        features: &Tensor,
        features_expanded: bool,
        particles: usize,
    ) -> Result<(Tensor, bool)> {
        let (rows, len) = input_ids.dims2()?;
        let ids = input_ids.to_vec2::<u32>()?;
        let image_token = self.config.image_token_index;
        let (feat_rows, per_image, hidden) = features.dims3()?;
        let blocks = if features_expanded { particles } else { 1 };
        if ids_expanded && !features_expanded {
            candle_core::bail!("ids carry the particle axis but the image features do not");
        }
        // `batch` rows of ids per block; ids shared by all blocks unless they are expanded.
        let batch = if ids_expanded { rows / blocks } else { rows };
        let images = feat_rows / blocks;
        let ids_row = |blk: usize, i: usize| -> &Vec<u32> {
            if ids_expanded {
                &ids[blk * batch + i]
            } else {
                &ids[i]
            }
        };
        for blk in 0..blocks {
            let n: usize = (0..batch)
                .map(|i| {
                    ids_row(blk, i)
                        .iter()
                        .filter(|&&t| t == image_token)
                        .count()
                })
                .sum();
            if n != images * per_image {
                candle_core::bail!(
                    "the prompt holds {n} image tokens but {images} image(s) give {} features \
                     (one <image> per image, expanded to {per_image} tokens each): the chat \
                     template (tokenizer_config.json or chat_template.json) must place one \
                     <image> per image, and image_token_index in config.json must be its id",
                    images * per_image
                );
            }
        }
        // Embed with the image tokens mapped to id 0 (the image token may lie outside the table).
        let safe: Vec<u32> = ids
            .iter()
            .flatten()
            .map(|&t| if t == image_token { 0 } else { t })
            .collect();
        let safe = Tensor::from_vec(safe, (rows, len), input_ids.device())?;
        let text = self.language_model.embed(&safe)?;
        let text = if features_expanded && !ids_expanded {
            expand_particles(&text, particles)?
        } else {
            text
        };
        // One gather over [text positions; feature positions] builds the merged sequence.
        let text_rows = blocks * batch * len;
        let mut index = Vec::with_capacity(text_rows);
        for blk in 0..blocks {
            let mut next_feature = blk * images * per_image;
            for i in 0..batch {
                for (j, &t) in ids_row(blk, i).iter().enumerate() {
                    if t == image_token {
                        index.push((text_rows + next_feature) as u32);
                        next_feature += 1;
                    } else {
                        index.push(((blk * batch + i) * len + j) as u32);
                    }
                }
            }
        }
        let source = Tensor::cat(
            &[
                text.reshape((text_rows, hidden))?,
                features.reshape((feat_rows * per_image, hidden))?,
            ],
            0,
        )?;
        let index = Tensor::from_vec(index, text_rows, text.device())?;
        let merged = source
            .index_select(&index, 0)?
            .reshape((blocks * batch, len, hidden))?;
        Ok((merged, features_expanded))
    }

    /// Image features, and the embeddings with the image features merged in (and whether their
    /// rows carry the particle axis).
    fn embeds(
        &self,
        input: &LlavaInput,
        particles: usize,
    ) -> Result<(Option<Tensor>, Tensor, bool)> {
        Ok(match input.pixel_values {
            Some(pixels) => {
                let (features, fexp) = self.image_features(pixels, particles, input.expanded)?;
                let (embeds, exp) = self.merge_image_features(
                    input.input_ids,
                    input.expanded,
                    &features,
                    fexp,
                    particles,
                )?;
                (Some(features), embeds, exp)
            }
            None => (
                None,
                self.language_model.embed(input.input_ids)?,
                input.expanded,
            ),
        })
    }

    /// Everything before the language-model head: image features, merged embeddings, decoder.
    fn forward_hidden(
        &self,
        input: &LlavaInput,
        cache: &mut KvCache,
        particles: usize,
        outputs: Outputs,
    ) -> Result<(Option<Tensor>, Tensor, DecoderOutput)> {
        let (image_features, inputs_embeds, expanded) = self.embeds(input, particles)?;
        let decoder = self.language_model.forward(
            &inputs_embeds,
            expanded,
            input.keep,
            cache,
            particles,
            outputs,
        )?;
        Ok((image_features, inputs_embeds, decoder))
    }

    /// A full pass (or one cached step): logits for every position.
    pub fn forward(
        &self,
        input: &LlavaInput,
        cache: &mut KvCache,
        particles: usize,
        keep_layer_outputs: bool,
    ) -> Result<LlavaOutput> {
        let outputs = if keep_layer_outputs {
            Outputs::AllAndLayers
        } else {
            Outputs::All
        };
        let (image_features, inputs_embeds, decoder) =
            self.forward_hidden(input, cache, particles, outputs)?;
        let (logits, _) =
            self.language_model
                .logits(&decoder.last_hidden_state, decoder.expanded, particles)?;
        Ok(LlavaOutput {
            image_features,
            inputs_embeds,
            decoder,
            logits,
        })
    }

    /// Logits only for positions `start..start + len` (`[rows, len, vocab]`): training needs the
    /// answer positions only, and the language-model head is a large share of the cost.
    pub fn forward_window(
        &self,
        input: &LlavaInput,
        particles: usize,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let mut cache = self.language_model.new_cache();
        // The last layer runs its queries from `start` on only.
        let total = input.input_ids.dim(1)?;
        if start + len > total {
            candle_core::bail!("positions {start}..{} of {total}", start + len);
        }
        let tail = Outputs::Tail(total - start);
        let (_, _, decoder) = self.forward_hidden(input, &mut cache, particles, tail)?;
        let hidden = decoder.last_hidden_state.narrow(1, 0, len)?;
        let (logits, _) = self
            .language_model
            .logits(&hidden, decoder.expanded, particles)?;
        Ok(logits)
    }

    /// [`Self::forward_window`] with the loss and its gradients, under gradient checkpointing
    /// (`train --gradient-checkpointing`): `nll` maps the window's logits to the per-particle
    /// loss `[P]`; the gradients of its sum with respect to the trained variables are added to
    /// `grads`. The language model keeps one decoder layer's activations at a time
    /// ([`LlamaModel::forward_taped`]); the vision tower, run once, keeps its own. Returns the loss,
    /// detached.
    pub fn window_loss_checkpointed(
        &self,
        input: &LlavaInput,
        particles: usize,
        (start, len): (usize, usize),
        nll: &dyn Fn(&Tensor) -> Result<Tensor>,
        grads: &mut VarGrads,
    ) -> Result<Tensor> {
        let total = input.input_ids.dim(1)?;
        if start + len > total {
            candle_core::bail!("positions {start}..{} of {total}", start + len);
        }
        let (inputs_embeds, expanded, vision) = self.embeds_checkpointed(input, particles)?;
        let lm = &self.language_model;
        let (tape, top, expanded) = lm.forward_taped(
            &inputs_embeds,
            expanded,
            input.keep,
            particles,
            Outputs::Tail(total - start),
        )?;
        let top = Var::from_tensor(&top)?;
        let hidden = lm.final_norm(top.as_tensor())?.narrow(1, 0, len)?;
        let (logits, _) = lm.logits(&hidden, expanded, particles)?;
        let loss = nll(&logits)?;
        let store = loss.sum_all()?.backward()?;
        grads.add(&store)?;
        let grad = grad_or_zeros(&store, top.as_tensor())?;
        drop(store);
        // The vision tower's (or projector's) particles: through the merged embeddings.
        if let Some(grad) = lm.backward_taped(tape, grad, grads, inputs_embeds.track_op())? {
            let store = backward_from(&inputs_embeds, &grad)?;
            grads.add(&store)?;
            if let Some((top, tape)) = vision {
                let grad = grad_or_zeros(&store, &top)?;
                drop(store);
                self.vision_tower.backward_layered(tape, grad, grads)?;
            }
        }
        Ok(loss.detach())
    }

    /// [`Self::embeds`] for [`Self::window_loss_checkpointed`]: where the vision tower carries
    /// particles below the one hidden state it reads, its layers run one at a time too, and
    /// that state (a variable, where the tower's backward pass starts) comes back with the tape.
    fn embeds_checkpointed(
        &self,
        input: &LlavaInput,
        particles: usize,
    ) -> Result<(Tensor, bool, Option<LayeredVision>)> {
        let index = self.vision_layers_run();
        let layered = input
            .pixel_values
            .filter(|_| self.vision_checkpointed() && self.vision_layered(index));
        let Some(pixels) = layered else {
            let (_, embeds, expanded) = self.embeds(input, particles)?;
            return Ok((embeds, expanded, None));
        };
        let (hidden, expanded, tape) =
            self.vision_tower
                .hidden_state_layered(pixels, index, particles, input.expanded)?;
        let top = Var::from_tensor(&hidden)?.into_inner();
        let (features, fexp) = self.project(top.clone(), expanded, particles)?;
        let (embeds, expanded) =
            self.merge_image_features(input.input_ids, input.expanded, &features, fexp, particles)?;
        Ok((embeds, expanded, Some((top, tape))))
    }

    /// Whether the vision tower carries particles below hidden state `index`.
    fn vision_layered(&self, index: usize) -> bool {
        self.vision_tower
            .lowest_adapted_layer()
            .is_some_and(|lowest| lowest < index)
    }

    /// Runs the prompt once and keeps the cache: the start of decoding and of answer scoring.
    /// Only the last position goes through the language-model head.
    pub fn prefill(&self, input: &LlavaInput, particles: usize) -> Result<Prefill> {
        Ok(self.prefill_with_features(input, particles)?.0)
    }

    /// [`Self::prefill`], and the projected image features it computed on the way
    /// (`[rows, tokens_per_image, text_hidden]` as [`Self::image_features`]; `None` without
    /// images).
    pub fn prefill_with_features(
        &self,
        input: &LlavaInput,
        particles: usize,
    ) -> Result<(Prefill, Option<Tensor>)> {
        let mut cache = self.language_model.new_cache();
        let (features, _, decoder) =
            self.forward_hidden(input, &mut cache, particles, Outputs::Tail(1))?;
        let (last_logits, expanded) =
            self.language_model
                .logits(&decoder.last_hidden_state, decoder.expanded, particles)?;
        Ok((
            Prefill {
                cache,
                last_logits: last_logits.squeeze(1)?,
                expanded,
            },
            features,
        ))
    }
}

impl ParticleModel for LlavaModel {
    fn linears(&self) -> Vec<(String, &ParticleLinear)> {
        let mut out = Vec::new();
        self.vision_tower
            .linears("vision_tower.vision_model", &mut out);
        out.push(("multi_modal_projector.linear_1".into(), &self.linear_1));
        out.push(("multi_modal_projector.linear_2".into(), &self.linear_2));
        self.language_model.linears("language_model", &mut out);
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut ParticleLinear)> {
        let mut out = Vec::new();
        self.vision_tower
            .linears_mut("vision_tower.vision_model", &mut out);
        out.push(("multi_modal_projector.linear_1".into(), &mut self.linear_1));
        out.push(("multi_modal_projector.linear_2".into(), &mut self.linear_2));
        self.language_model.linears_mut("language_model", &mut out);
        out
    }

    fn inert_linears(&self) -> Vec<String> {
        let read = self.vision_layers_run();
        let vision_layer = |name: &str| {
            name.strip_prefix("vision_tower.vision_model.encoder.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        };
        self.linears()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| vision_layer(name).is_some_and(|k| k >= read))
            .collect()
    }
}
