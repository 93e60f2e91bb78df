//! CLIP: text and vision transformers, projections and logit scale (`openai/clip-vit-base-patch32`
//! layout), also the vision tower of LLaVA.

use candle_core::{IndexOp, Result, Tensor, Var, D};

use crate::bella::{expand_particles, ParticleLinear, ParticleModel};
use crate::error::WeightError;
use crate::models::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
use crate::models::nn::{
    activate, add, attention, attention_bias, backward_from, grad_or_zeros, linear, stop_point,
    LayerNorm, VarGrads,
};
use crate::models::weights::Scope;

type LoadResult<T> = std::result::Result<T, WeightError>;

#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: ParticleLinear,
    k_proj: ParticleLinear,
    v_proj: ParticleLinear,
    out_proj: ParticleLinear,
    heads: usize,
}

impl ClipAttention {
    fn load(s: &Scope, hidden: usize, heads: usize) -> LoadResult<Self> {
        Ok(Self {
            q_proj: linear(&s.pp("q_proj"), hidden, hidden, true)?,
            k_proj: linear(&s.pp("k_proj"), hidden, hidden, true)?,
            v_proj: linear(&s.pp("v_proj"), hidden, hidden, true)?,
            out_proj: linear(&s.pp("out_proj"), hidden, hidden, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (rows, len, hidden) = x.dims3()?;
        let head_dim = hidden / self.heads;
        let split = |t: Tensor| {
            t.reshape((rows, len, self.heads, head_dim))?
                .transpose(1, 2)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let out = attention(&q, &k, &v, bias)?
            .transpose(1, 2)?
            .reshape((rows, len, hidden))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: ParticleLinear,
    fc2: ParticleLinear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn load(
        s: &Scope,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> LoadResult<Self> {
        Ok(Self {
            self_attn: ClipAttention::load(&s.pp("self_attn"), hidden, heads)?,
            layer_norm1: LayerNorm::load(&s.pp("layer_norm1"), hidden, eps)?,
            fc1: linear(&s.pp("mlp.fc1"), hidden, inter, true)?,
            fc2: linear(&s.pp("mlp.fc2"), inter, hidden, true)?,
            layer_norm2: LayerNorm::load(&s.pp("layer_norm2"), hidden, eps)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let h = add(
            x,
            &self
                .self_attn
                .forward(&self.layer_norm1.forward(x)?, bias)?,
        )?;
        let m = activate(self.act, &self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?;
        add(&h, &self.fc2.forward(&m)?)
    }

    fn linears(&self) -> [(&'static str, &ParticleLinear); 6] {
        let a = &self.self_attn;
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.out_proj", &a.out_proj),
            ("mlp.fc1", &self.fc1),
            ("mlp.fc2", &self.fc2),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut ParticleLinear); 6] {
        let a = &mut self.self_attn;
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.out_proj", &mut a.out_proj),
            ("mlp.fc1", &mut self.fc1),
            ("mlp.fc2", &mut self.fc2),
        ]
    }

    fn has_particles(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.adapter().is_some())
    }
}

/// The stack of pre-norm transformer layers shared by both towers.
#[derive(Clone, Debug)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

/// What an encoder pass produced. Rows are `P·batch` once a layer with particles was reached
/// (`expanded`), `batch` before.
struct EncoderOutput {
    last: Tensor,
    /// Input of layer 0 followed by every layer's output, when asked for.
    hidden_states: Vec<Tensor>,
    expanded: bool,
}

impl Encoder {
    /// The index of the lowest layer with particles (`None`: none has).
    fn lowest_adapted_layer(&self) -> Option<usize> {
        self.layers.iter().position(EncoderLayer::has_particles)
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        s: &Scope,
        layers: usize,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> LoadResult<Self> {
        let layers = (0..layers)
            .map(|i| EncoderLayer::load(&s.pp(i), hidden, inter, heads, eps, act))
            .collect::<LoadResult<_>>()?;
        Ok(Self { layers })
    }

    /// Runs the first `n_layers` layers. `bias` has one row per input row (or broadcasts);
    /// `expanded`: the input rows already carry the particle axis.
    fn forward(
        &self,
        mut x: Tensor,
        mut expanded: bool,
        mut bias: Option<Tensor>,
        particles: usize,
        n_layers: usize,
        keep_hidden: bool,
    ) -> Result<EncoderOutput> {
        let mut hidden_states = Vec::new();
        for layer in &self.layers[..n_layers] {
            // An answer whose asker has gone stops here too (ViT-L/14-336: 24 layers of 577).
            crate::cancel::check().map_err(candle_core::Error::wrap)?;
            enter(layer, &mut x, &mut bias, &mut expanded, particles)?;
            if keep_hidden {
                hidden_states.push(x.clone());
            }
            x = layer.forward(&x, bias.as_ref())?;
        }
        if keep_hidden {
            hidden_states.push(x.clone());
        }
        Ok(EncoderOutput {
            last: x,
            hidden_states,
            expanded,
        })
    }

    /// The first `upto` layers, each on the detached output of the one below: one layer's
    /// activations are alive at a time, and the output is detached. Returns it, whether its rows
    /// carry the particle axis, whether any layer's output depended on trained variables, and
    /// with `tape` what [`Self::backward_layered`] needs: the input of each layer from the lowest
    /// with particles up.
    fn forward_layered(
        &self,
        mut x: Tensor,
        mut expanded: bool,
        mut bias: Option<Tensor>,
        particles: usize,
        (upto, tape): (usize, bool),
    ) -> Result<(Tensor, bool, bool, EncoderTape)> {
        let lowest = self.lowest_adapted_layer();
        let mut inputs = Vec::new();
        let mut tracked = false;
        for (i, layer) in self.layers.iter().enumerate().take(upto) {
            stop_point()?;
            enter(layer, &mut x, &mut bias, &mut expanded, particles)?;
            if tape && lowest.is_some_and(|lowest| i >= lowest) {
                inputs.push(x.clone());
            }
            let out = layer.forward(&x, bias.as_ref())?;
            tracked |= out.track_op();
            x = out.detach();
        }
        let first = upto.min(self.layers.len()) - inputs.len();
        let tape = EncoderTape {
            inputs,
            bias,
            first,
        };
        Ok((x, expanded, tracked, tape))
    }

    /// Runs the taped layers again, one at a time from the top, with gradients: `grad` is the
    /// loss's gradient with respect to the encoder's output; the trained variables' gradients
    /// are added to `grads`.
    fn backward_layered(
        &self,
        tape: EncoderTape,
        mut grad: Tensor,
        grads: &mut VarGrads,
    ) -> Result<()> {
        let taped = &self.layers[tape.first..tape.first + tape.inputs.len()];
        for (layer, input) in taped.iter().zip(tape.inputs).rev() {
            stop_point()?;
            let input = Var::from_tensor(&input)?;
            let out = layer.forward(input.as_tensor(), tape.bias.as_ref())?;
            let store = backward_from(&out, &grad)?;
            grads.add(&store)?;
            grad = grad_or_zeros(&store, input.as_tensor())?;
        }
        Ok(())
    }

    fn linears<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a ParticleLinear)>) {
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, l) in layer.linears() {
                out.push((format!("{prefix}.layers.{i}.{name}"), l));
            }
        }
    }

    fn linears_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut ParticleLinear)>,
    ) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, l) in layer.linears_mut() {
                out.push((format!("{prefix}.layers.{i}.{name}"), l));
            }
        }
    }
}

/// Brings the rows to `P·rows` (particle-major) at the first layer with particles, the
/// attention bias with them where it has one row per input row.
fn enter(
    layer: &EncoderLayer,
    x: &mut Tensor,
    bias: &mut Option<Tensor>,
    expanded: &mut bool,
    particles: usize,
) -> Result<()> {
    if !*expanded && layer.has_particles() {
        *x = expand_particles(x, particles)?;
        if let Some(b) = bias.as_ref() {
            if b.dim(0)? > 1 {
                *bias = Some(expand_particles(b, particles)?);
            }
        }
        *expanded = true;
    }
    Ok(())
}

/// What a layered backward pass of an encoder reads: the input of each layer it runs again
/// ([`ClipVisionTransformer::hidden_state_layered`] makes one).
pub struct EncoderTape {
    /// Detached inputs of the layers from the lowest with particles to the top one run.
    inputs: Vec<Tensor>,
    /// The attention bias those layers saw.
    bias: Option<Tensor>,
    /// The index of the first taped layer.
    first: usize,
}

/// Every stage of a tower, for parity checks and for callers that need features.
pub struct TowerOutput {
    /// Embeddings (token + position, or patches + class + position), before any norm.
    pub embeddings: Tensor,
    /// Encoder input followed by every layer's output (`output_hidden_states` in transformers).
    pub hidden_states: Vec<Tensor>,
    /// Text: after `final_layer_norm`; vision: the last layer's output (no norm), as transformers.
    pub last_hidden_state: Tensor,
    /// Text: the EOS position of `last_hidden_state`; vision: `post_layernorm` of the class token.
    pub pooled: Tensor,
    /// Rows are `P·batch` (particle-major) when the tower carries particles.
    pub expanded: bool,
}

#[derive(Clone, Debug)]
pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn load(s: &Scope, c: &ClipTextConfig) -> LoadResult<Self> {
        // Older checkpoints store the position ids (0, 1, …) as a buffer; transformers ignores it.
        s.skip("embeddings.position_ids");
        let h = c.hidden_size;
        Ok(Self {
            token_embedding: s.get("embeddings.token_embedding.weight", &[c.vocab_size, h])?,
            position_embedding: s.get(
                "embeddings.position_embedding.weight",
                &[c.max_position_embeddings, h],
            )?,
            encoder: Encoder::load(
                &s.pp("encoder.layers"),
                c.num_hidden_layers,
                h,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
            )?,
            final_layer_norm: LayerNorm::load(&s.pp("final_layer_norm"), h, c.layer_norm_eps)?,
            config: c.clone(),
        })
    }

    /// `input_ids`, `attention_mask`: `[batch, len]` (u32; mask 1 = token, 0 = padding).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        particles: usize,
    ) -> Result<TowerOutput> {
        self.forward_rows(input_ids, attention_mask, particles, false)
    }

    /// As [`Self::forward`]; with `input_expanded` the rows already carry the particle axis
    /// (different texts per particle, particle-major).
    pub fn forward_rows(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        particles: usize,
        input_expanded: bool,
    ) -> Result<TowerOutput> {
        let (embeddings, bias) = self.stem(input_ids, attention_mask)?;
        let out = self.encoder.forward(
            embeddings.clone(),
            input_expanded,
            Some(bias),
            particles,
            self.encoder.layers.len(),
            true,
        )?;
        let (last, pooled) = self.head(&out.last, input_ids)?;
        Ok(TowerOutput {
            embeddings,
            hidden_states: out.hidden_states,
            last_hidden_state: last,
            pooled,
            expanded: out.expanded,
        })
    }

    /// The encoder's input: token + position embeddings `[batch, len, hidden]`, and the causal
    /// attention bias that also hides the padding.
    fn stem(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, len) = input_ids.dims2()?;
        if len > self.config.max_position_embeddings {
            candle_core::bail!(
                "text of {len} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        let h = self.config.hidden_size;
        let tokens = self
            .token_embedding
            .index_select(
                &input_ids
                    .to_device(self.token_embedding.device())?
                    .flatten_all()?,
                0,
            )?
            .reshape((batch, len, h))?;
        let positions = self.position_embedding.i(..len)?;
        let embeddings = add(&tokens, &positions)?;

        let keep: Vec<Vec<bool>> = match attention_mask {
            Some(m) => m
                .to_dtype(candle_core::DType::U32)?
                .to_vec2::<u32>()?
                .into_iter()
                .map(|r| r.into_iter().map(|v| v != 0).collect())
                .collect(),
            None => vec![vec![true; len]; batch],
        };
        let bias = attention_bias(&keep, len, true, embeddings.device())?;
        Ok((embeddings, bias))
    }

    /// From the encoder's output: `final_layer_norm` of it, and that at each text's EOS token
    /// (the pooled output).
    fn head(&self, encoded: &Tensor, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, len) = input_ids.dims2()?;
        let h = self.config.hidden_size;
        let last = self.final_layer_norm.forward(encoded)?;

        // transformers: with the legacy eos id 2 the EOS is the largest id, else its first position.
        let ids = input_ids
            .to_dtype(candle_core::DType::U32)?
            .to_vec2::<u32>()?;
        let eos_positions: Vec<u32> = ids
            .iter()
            .map(|row| {
                let pos = if self.config.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, &v)| (v, std::cmp::Reverse(*i)))
                        .map(|(i, _)| i)
                } else {
                    row.iter().position(|&v| v == self.config.eos_token_id)
                };
                pos.unwrap_or(row.len() - 1) as u32
            })
            .collect();
        let rows = last.dim(0)?;
        let reps = rows / batch;
        let index: Vec<u32> = (0..rows)
            .map(|r| (r * len) as u32 + eos_positions[r % batch])
            .collect();
        debug_assert_eq!(reps * batch, rows);
        let index = Tensor::from_vec(index, rows, last.device())?;
        let pooled = last.reshape((rows * len, h))?.index_select(&index, 0)?;
        Ok((last, pooled))
    }
}

#[derive(Clone, Debug)]
pub struct ClipVisionTransformer {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: Option<LayerNorm>,
    config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `with_post_layernorm`: LLaVA never uses it, and checkpoints may leave it out.
    pub fn load(s: &Scope, c: &ClipVisionConfig, with_post_layernorm: bool) -> LoadResult<Self> {
        s.skip("embeddings.position_ids");
        let h = c.hidden_size;
        let p = c.patch_size;
        let post_layernorm = if with_post_layernorm {
            Some(LayerNorm::load(
                &s.pp("post_layernorm"),
                h,
                c.layer_norm_eps,
            )?)
        } else {
            // transformers loads it with the tower; LLaVA's forward never reads it.
            s.skip("post_layernorm.weight");
            s.skip("post_layernorm.bias");
            None
        };
        Ok(Self {
            patch_embedding: s.get(
                "embeddings.patch_embedding.weight",
                &[h, c.num_channels, p, p],
            )?,
            class_embedding: s.get("embeddings.class_embedding", &[h])?,
            position_embedding: s.get(
                "embeddings.position_embedding.weight",
                &[c.num_positions(), h],
            )?,
            pre_layrnorm: LayerNorm::load(&s.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            encoder: Encoder::load(
                &s.pp("encoder.layers"),
                c.num_hidden_layers,
                h,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                c.hidden_act,
            )?,
            post_layernorm,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Patch + class + position embeddings of `pixel_values` `[n, C, H, W]`: `[n, 1 + patches, hidden]`.
    pub fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (n, ch, height, width) = pixel_values.dims4()?;
        if ch != c.num_channels || height != c.image_size || width != c.image_size {
            candle_core::bail!(
                "pixel values are [{n}, {ch}, {height}, {width}], the vision tower expects [n, {}, {}, {}]",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let (p, g, h) = (c.patch_size, c.grid(), c.hidden_size);
        let pixel_values = pixel_values
            .to_device(self.patch_embedding.device())?
            .to_dtype(self.patch_embedding.dtype())?;
        // The stride-p convolution as one matmul over flattened patches. Like the convolution,
        // it leaves out the last `image_size % p` rows and columns.
        let side = g * p;
        let pixel_values = match side == c.image_size {
            true => pixel_values,
            false => pixel_values.narrow(2, 0, side)?.narrow(3, 0, side)?,
        };
        let patches = pixel_values
            .reshape((n, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * g * g, ch * p * p))?;
        let kernel = self.patch_embedding.reshape((h, ch * p * p))?;
        let patches = patches.matmul(&kernel.t()?)?.reshape((n, g * g, h))?;
        let class = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((n, 1, h))?;
        add(
            &Tensor::cat(&[&class, &patches], 1)?,
            &self.position_embedding,
        )
    }

    /// The full tower: every hidden state, the last one and the pooled class token.
    pub fn forward(&self, pixel_values: &Tensor, particles: usize) -> Result<TowerOutput> {
        self.forward_rows(pixel_values, particles, false)
    }

    /// As [`Self::forward`]; with `input_expanded` the images already carry the particle axis.
    pub fn forward_rows(
        &self,
        pixel_values: &Tensor,
        particles: usize,
        input_expanded: bool,
    ) -> Result<TowerOutput> {
        let embeddings = self.embeddings(pixel_values)?;
        let x = self.pre_layrnorm.forward(&embeddings)?;
        let layers = self.encoder.layers.len();
        let out = self
            .encoder
            .forward(x, input_expanded, None, particles, layers, true)?;
        let pooled = self.head(&out.last)?;
        Ok(TowerOutput {
            embeddings,
            hidden_states: out.hidden_states,
            last_hidden_state: out.last,
            pooled,
            expanded: out.expanded,
        })
    }

    /// `post_layernorm` of the class token of the encoder's output (the pooled output).
    fn head(&self, encoded: &Tensor) -> Result<Tensor> {
        let post = self.post_layernorm.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this vision tower was loaded without post_layernorm".into())
        })?;
        post.forward(&encoded.i((.., 0))?)
    }

    /// Hidden states at the given indices (0 = after `pre_layrnorm`, i = output of layer i),
    /// concatenated on the feature axis; runs only the layers needed. `input_expanded`: the images
    /// already carry the particle axis. Returns `(features, expanded)`.
    pub fn hidden_states_at(
        &self,
        pixel_values: &Tensor,
        indices: &[usize],
        particles: usize,
        input_expanded: bool,
    ) -> Result<(Tensor, bool)> {
        let needed = indices.iter().copied().max().unwrap_or(0);
        let x = self.pre_layrnorm.forward(&self.embeddings(pixel_values)?)?;
        let out = self
            .encoder
            .forward(x, input_expanded, None, particles, needed, true)?;
        let mut picked = Vec::with_capacity(indices.len());
        for &i in indices {
            let mut t = out.hidden_states[i].clone();
            // Hidden states from before the expansion are shared: bring them to P·n rows.
            if out.expanded && t.dim(0)? != out.last.dim(0)? {
                t = expand_particles(&t, particles)?;
            }
            picked.push(t);
        }
        Ok((Tensor::cat(&picked, D::Minus1)?, out.expanded))
    }

    pub(crate) fn linears<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a ParticleLinear)>) {
        self.encoder.linears(&format!("{prefix}.encoder"), out)
    }

    /// The index of the lowest encoder layer with particles (`None`: none has).
    pub fn lowest_adapted_layer(&self) -> Option<usize> {
        self.encoder.lowest_adapted_layer()
    }

    /// Hidden state `index` (the output of layer `index − 1`, as [`Self::hidden_states_at`])
    /// with the layers below it run one at a time (gradient checkpointing): detached, with
    /// whether its rows carry the particle axis and what [`Self::backward_layered`] needs.
    pub fn hidden_state_layered(
        &self,
        pixel_values: &Tensor,
        index: usize,
        particles: usize,
        input_expanded: bool,
    ) -> Result<(Tensor, bool, EncoderTape)> {
        let x = self.pre_layrnorm.forward(&self.embeddings(pixel_values)?)?;
        let (out, expanded, _, tape) =
            self.encoder
                .forward_layered(x, input_expanded, None, particles, (index, true))?;
        Ok((out, expanded, tape))
    }

    /// The taped layers of [`Self::hidden_state_layered`] again, one at a time from the top, with
    /// gradients: `grad` is the loss's gradient with respect to its hidden state; the trained
    /// variables' gradients are added to `grads`.
    pub fn backward_layered(
        &self,
        tape: EncoderTape,
        grad: Tensor,
        grads: &mut VarGrads,
    ) -> Result<()> {
        self.encoder.backward_layered(tape, grad, grads)
    }

    pub(crate) fn linears_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut ParticleLinear)>,
    ) {
        self.encoder.linears_mut(&format!("{prefix}.encoder"), out)
    }
}

/// The rows of one CLIP tower ([`ClipModel::embeds_layered`]).
#[derive(Clone, Copy)]
pub enum TowerRows<'a> {
    /// Token ids and attention mask `[rows, len]` (u32; mask 1 = token, 0 = padding).
    Text { ids: &'a Tensor, mask: &'a Tensor },
    /// Preprocessed images `[rows, C, H, W]`.
    Vision { pixels: &'a Tensor },
}

/// A CLIP checkpoint.
#[derive(Clone, Debug)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    visual_projection: ParticleLinear,
    text_projection: ParticleLinear,
    logit_scale: Tensor,
    config: ClipConfig,
}

impl ClipModel {
    pub fn load(s: &Scope, c: &ClipConfig) -> LoadResult<Self> {
        Ok(Self {
            text_model: ClipTextTransformer::load(&s.pp("text_model"), &c.text_config)?,
            vision_model: ClipVisionTransformer::load(
                &s.pp("vision_model"),
                &c.vision_config,
                true,
            )?,
            visual_projection: linear(
                &s.pp("visual_projection"),
                c.vision_config.hidden_size,
                c.projection_dim,
                false,
            )?,
            text_projection: linear(
                &s.pp("text_projection"),
                c.text_config.hidden_size,
                c.projection_dim,
                false,
            )?,
            logit_scale: s.get("logit_scale", &[])?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Projected (not normalised) text embeddings `[rows, projection_dim]`.
    pub fn text_embeds(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        particles: usize,
    ) -> Result<Tensor> {
        Ok(self
            .text_embeds_rows(input_ids, attention_mask, particles, false)?
            .0)
    }

    /// Text embeddings and whether their rows carry the particle axis; `input_expanded`: the
    /// texts already do.
    pub fn text_embeds_rows(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        particles: usize,
        input_expanded: bool,
    ) -> Result<(Tensor, bool)> {
        let out =
            self.text_model
                .forward_rows(input_ids, attention_mask, particles, input_expanded)?;
        self.project(&self.text_projection, out.pooled, out.expanded, particles)
    }

    /// Projected (not normalised) image embeddings `[rows, projection_dim]`.
    pub fn image_embeds(&self, pixel_values: &Tensor, particles: usize) -> Result<Tensor> {
        Ok(self.image_embeds_rows(pixel_values, particles, false)?.0)
    }

    /// Image embeddings and whether their rows carry the particle axis.
    pub fn image_embeds_rows(
        &self,
        pixel_values: &Tensor,
        particles: usize,
        input_expanded: bool,
    ) -> Result<(Tensor, bool)> {
        let out = self
            .vision_model
            .forward_rows(pixel_values, particles, input_expanded)?;
        self.project(&self.visual_projection, out.pooled, out.expanded, particles)
    }

    /// The projected embeddings of one tower's `rows`, as [`Self::text_embeds_rows`] and
    /// [`Self::image_embeds_rows`] give them but with one encoder layer's activations alive at a
    /// time (gradient checkpointing, for training steps whose rows do not fit whole): detached,
    /// with whether their rows carry the particle axis and whether they depend on trained
    /// variables. With `backward`, `(grad, grads)`, each layer runs again from the top with
    /// gradients: the gradients of the trained variables for `grad`, the loss's gradient with
    /// respect to the embeddings, are added to `grads`.
    pub fn embeds_layered(
        &self,
        rows: TowerRows,
        particles: usize,
        input_expanded: bool,
        backward: Option<(&Tensor, &mut VarGrads)>,
    ) -> Result<(Tensor, bool, bool)> {
        let (encoder, x, bias) = match rows {
            TowerRows::Text { ids, mask } => {
                let (x, bias) = self.text_model.stem(ids, Some(mask))?;
                (&self.text_model.encoder, x, Some(bias))
            }
            TowerRows::Vision { pixels } => {
                let x = self.vision_model.embeddings(pixels)?;
                let x = self.vision_model.pre_layrnorm.forward(&x)?;
                (&self.vision_model.encoder, x, None)
            }
        };
        let layers = (encoder.layers.len(), backward.is_some());
        let (encoded, expanded, encoder_tracked, tape) =
            encoder.forward_layered(x, input_expanded, bias, particles, layers)?;
        // The encoder's output is where its layers' gradient starts, when they have one.
        let top = if encoder_tracked {
            Var::from_tensor(&encoded)?.into_inner()
        } else {
            encoded
        };
        let (proj, pooled) = match rows {
            TowerRows::Text { ids, .. } => {
                (&self.text_projection, self.text_model.head(&top, ids)?.1)
            }
            TowerRows::Vision { .. } => (&self.visual_projection, self.vision_model.head(&top)?),
        };
        let (out, expanded) = self.project(proj, pooled, expanded, particles)?;
        let tracked = out.track_op();
        if let Some((grad, grads)) = backward.filter(|_| tracked) {
            let store = backward_from(&out, grad)?;
            grads.add(&store)?;
            let grad = grad_or_zeros(&store, &top)?;
            drop(store);
            if encoder_tracked {
                encoder.backward_layered(tape, grad, grads)?;
            }
        }
        Ok((out.detach(), expanded, tracked))
    }

    fn project(
        &self,
        proj: &ParticleLinear,
        pooled: Tensor,
        expanded: bool,
        particles: usize,
    ) -> Result<(Tensor, bool)> {
        if !expanded && proj.adapter().is_some() {
            return Ok((proj.forward(&expand_particles(&pooled, particles)?)?, true));
        }
        Ok((proj.forward(&pooled)?, expanded))
    }

    /// `logit_scale.exp() · cos(image, text)`: `[images, texts]` (without particles).
    pub fn logits_per_image(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let img = normalize(&self.image_embeds(pixel_values, 1)?)?;
        let txt = normalize(&self.text_embeds(input_ids, attention_mask, 1)?)?;
        img.matmul(&txt.t()?)?
            .broadcast_mul(&self.logit_scale.exp()?)
    }

    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }
}

impl ParticleModel for ClipModel {
    fn linears(&self) -> Vec<(String, &ParticleLinear)> {
        let mut out = Vec::new();
        self.text_model
            .encoder
            .linears("text_model.encoder", &mut out);
        self.vision_model.linears("vision_model", &mut out);
        out.push(("visual_projection".into(), &self.visual_projection));
        out.push(("text_projection".into(), &self.text_projection));
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut ParticleLinear)> {
        let mut out = Vec::new();
        self.text_model
            .encoder
            .linears_mut("text_model.encoder", &mut out);
        self.vision_model.linears_mut("vision_model", &mut out);
        out.push(("visual_projection".into(), &mut self.visual_projection));
        out.push(("text_projection".into(), &mut self.text_projection));
        out
    }
}

/// L2-normalises the last axis.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
