//! A LLaMA-family decoder with a KV cache, per-row positions (left padding) and full-sequence
//! outputs for training; every linear layer particle-capable.
//!
//! Rows: a batch of `b` sequences is `b` rows until the first layer with particles, `P·b` rows
//! (particle-major) from there on; the rows fork inside that layer, whose projections of the
//! shared input run their base product once. The cache keeps, per layer, whatever rows that layer
//! saw; when the sequences of the particles diverge (decoding), a layer below the fork keeps the
//! prompt's rows shared and only the new tokens per particle (`LayerCache`).

use candle_core::{DType, Device, Result, Tensor, Var, D};

use crate::bella::{expand_particles, ParticleLinear};
use crate::error::WeightError;
use crate::models::config::{Activation, LlamaConfig};
use crate::models::decode_attention;
use crate::models::nn::{
    activate, add, attention, attention_bias, attention_probs, backward_from, grad_or_zeros,
    linear, stop_point, to_f32, RmsNorm, VarGrads, MASKED,
};
use crate::models::weights::Scope;

type LoadResult<T> = std::result::Result<T, WeightError>;

#[derive(Clone, Debug)]
struct Attention {
    q_proj: ParticleLinear,
    k_proj: ParticleLinear,
    v_proj: ParticleLinear,
    o_proj: ParticleLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: ParticleLinear,
    up_proj: ParticleLinear,
    down_proj: ParticleLinear,
    act: Activation,
}

/// The MLP's intermediate activations of at most this many values are computed at once.
const MLP_VALUES_AT_ONCE: usize = 1 << 22;

impl Mlp {
    /// `h + down(act(gate(norm)) · up(norm))` for `h`, `norm` `[rows, len, hidden]`, over
    /// chunks of positions whose intermediate activations stay under `at_once` values
    /// ([`MLP_VALUES_AT_ONCE`]: 16 MiB in f32). P = 8 rows of a 601-token prompt make `[8, 601, 11008]` activations,
    /// ~100–200 MB each: by default glibc maps tensors that size afresh on every allocation
    /// (its largest mmap threshold is 32 MiB; [`crate::prepare_process`] turns mapping off for
    /// the programs that call it), and chunks stay in the cache either way. Chunks keep every
    /// row, so particle rows stay particle-major.
    fn forward_residual(&self, h: &Tensor, norm: &Tensor, at_once: usize) -> Result<Tensor> {
        let (rows, len, _) = norm.dims3()?;
        let inter = self.up_proj.shape().0;
        let step = (at_once / (rows * inter).max(1)).clamp(1, len.max(1));
        let chunk = |start: usize, n: usize| -> Result<Tensor> {
            let x = norm.narrow(1, start, n)?;
            let gate = activate(self.act, &self.gate_proj.forward(&x)?)?;
            let gated = (gate * self.up_proj.forward(&x)?)?;
            add(&h.narrow(1, start, n)?, &self.down_proj.forward(&gated)?)
        };
        if step >= len {
            return chunk(0, len);
        }
        let chunks = (0..len)
            .step_by(step)
            .map(|start| chunk(start, step.min(len - start)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 1)
    }
}

#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// `rotate_half` RoPE as transformers' LLaMA: `x·cos + rotate_half(x)·sin`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    add(&x.broadcast_mul(cos)?, &rotated.broadcast_mul(sin)?)
}

/// The attention bias `[rows, 1, len, T]` for `n` query heads folded into the query axis:
/// `[rows, 1, n·len, T]` (see the grouped-query attention in [`Attention::forward`]).
fn group_bias(bias: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(bias.clone());
    }
    let (rows, one, len, t) = bias.dims4()?;
    bias.unsqueeze(2)?
        .broadcast_as((rows, one, n, len, t))?
        .reshape((rows, one, n * len, t))
}

/// Brings `t` (leading dim `rows_t`) to `rows` rows by particle expansion.
fn match_rows(t: Tensor, rows: usize) -> Result<Tensor> {
    let have = t.dim(0)?;
    if have == rows {
        Ok(t)
    } else if have > 0 && rows.is_multiple_of(have) {
        expand_particles(&t, rows / have)
    } else {
        candle_core::bail!("cannot match {have} rows to {rows} rows")
    }
}

/// One layer's cached keys and values, `[rows, kv_heads, T, head_dim]` each. The first step (the
/// prompt) is the `prefix`; it is never copied again. Every later step's keys and values are
/// kept in `own`, which alone grows: appending a decoded token copies the tokens decoded so far,
/// not the prompt (a 601-token prompt is 10 MB per row and layer in a 7B model). When the
/// particles' sequences diverge above a prompt computed once for them (decoding with the rows
/// forked at a higher layer), the prefix keeps the prompt's `batch` rows, shared, and `own` has
/// `P·batch` rows: the prompt's cache is never copied P times either.
#[derive(Clone, Debug, Default)]
struct LayerCache {
    prefix: Option<(Tensor, Tensor)>,
    own: Option<(Tensor, Tensor)>,
}

/// What one step attends to.
enum Keys {
    /// Keys and values with the step's rows (the first step).
    Whole(Tensor, Tensor),
    /// The prefix (`batch` rows, shared by the particles when the step has `P·batch` rows) and
    /// the rows' own continuation, this step included.
    Split {
        prefix: (Tensor, Tensor),
        own: (Tensor, Tensor),
    },
}

impl LayerCache {
    /// Adds a step's keys and values `[rows, kv, len, d]`; returns what the step attends to.
    fn extend(&mut self, k: Tensor, v: Tensor) -> Result<Keys> {
        let Some((pk, pv)) = self.prefix.clone() else {
            self.prefix = Some((k.clone(), v.clone()));
            return Ok(Keys::Whole(k, v));
        };
        let (rows, shared) = (k.dim(0)?, pk.dim(0)?);
        if shared == 0 || !rows.is_multiple_of(shared) {
            candle_core::bail!("a step of {rows} rows does not continue {shared} rows");
        }
        let (k, v) = match self.own.take() {
            Some((ok, ov)) => {
                let cat =
                    |past: Tensor, new: &Tensor| Tensor::cat(&[&match_rows(past, rows)?, new], 2);
                (cat(ok, &k)?, cat(ov, &v)?)
            }
            None => (k, v),
        };
        self.own = Some((k.clone(), v.clone()));
        Ok(Keys::Split {
            prefix: (pk, pv),
            own: (k, v),
        })
    }
}

/// [`attention`] of `q` `[R, kv, n, d]` (R = P·b rows, particle-major, P ≥ 1) over a prefix shared by
/// the particles (`[b, kv, T, d]`) followed by the rows' own keys and values (`[R, kv, t, d]`),
/// with `bias` `[R, 1, n, T + t]`: the same as over the prefix expanded to R rows, without the
/// copy. The particles' queries become extra query rows of their prefix row
/// (`[b, kv, P·n, d]`), one softmax spans both parts. On the CPU, a decoding step (a few queries
/// per head, no gradient) takes one pass that reads the cache in its dtype
/// ([`decode_attention`]); otherwise a half-precision step computes in f32, as [`attention`]
/// does: candle widens and packs the whole prefix inside every bf16 product.
fn attention_shared_prefix(
    q: &Tensor,
    (pk, pv): &(Tensor, Tensor),
    (k, v): &(Tensor, Tensor),
    bias: &Tensor,
) -> Result<Tensor> {
    let dtype = q.dtype();
    if q.device().is_cpu() && !q.track_op() && q.dim(2)? <= decode_attention::MAX_QUERIES {
        return decode_attention::attend_split(q, (pk, pv), (k, v), &bias.contiguous()?);
    }
    if q.device().is_cpu() && dtype != DType::F32 {
        let prefix = (to_f32(pk)?, to_f32(pv)?);
        let own = (to_f32(k)?, to_f32(v)?);
        return attention_shared_prefix(&to_f32(q)?, &prefix, &own, bias)?.to_dtype(dtype);
    }
    let (r, kv, n, d) = q.dims4()?;
    let b = pk.dim(0)?;
    let (p, t_prefix) = (r / b, pk.dim(2)?);
    // [P·b, kv, n, x] ⇄ [b, kv, P·n, x]
    let to_prefix_rows = |t: &Tensor, x: usize| {
        t.reshape((p, b, kv, n, x))?
            .permute((1, 2, 0, 3, 4))?
            .contiguous()?
            .reshape((b, kv, p * n, x))
    };
    let from_prefix_rows = |t: Tensor, x: usize| {
        t.reshape((b, kv, p, n, x))?
            .permute((2, 0, 1, 3, 4))?
            .contiguous()?
            .reshape((r, kv, n, x))
    };
    let scale = 1.0 / (d as f64).sqrt();
    let on_prefix = from_prefix_rows(
        to_prefix_rows(q, d)?.matmul(&pk.contiguous()?.t()?)?,
        t_prefix,
    )?;
    let on_own = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let scores = (Tensor::cat(&[&on_prefix, &on_own], 3)? * scale)?;
    let probs = attention_probs(&scores, Some(bias))?;
    let own_len = probs.dim(3)? - t_prefix;
    let from_prefix =
        to_prefix_rows(&probs.narrow(3, 0, t_prefix)?, t_prefix)?.matmul(&pv.contiguous()?)?;
    let from_own = probs
        .narrow(3, t_prefix, own_len)?
        .contiguous()?
        .matmul(&v.contiguous()?)?;
    add(&from_prefix_rows(from_prefix, d)?, &from_own)
}

/// Attention bias and rotary tables for one step, built for the step's input rows.
#[derive(Clone)]
struct StepContext {
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl StepContext {
    fn rows(&self) -> Result<usize> {
        self.bias.dim(0)
    }

    fn expanded(&self, rows: usize) -> Result<Self> {
        Ok(Self {
            bias: match_rows(self.bias.clone(), rows)?,
            cos: match_rows(self.cos.clone(), rows)?,
            sin: match_rows(self.sin.clone(), rows)?,
        })
    }
}

/// How a layer's input rows relate to its particles.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// As many rows as the step has (`batch`, or `P·batch` once forked).
    AsGiven,
    /// `batch` rows shared by every particle, forked into `P·batch` inside this layer: the
    /// projections that read the shared input compute their base product once
    /// ([`ParticleLinear::forward_forked`]).
    Fork(usize),
}

impl Rows {
    /// The layer's output rows for `batch` input rows.
    fn out(self, batch: usize) -> usize {
        match self {
            Rows::AsGiven => batch,
            Rows::Fork(p) => p * batch,
        }
    }

    fn project(self, linear: &ParticleLinear, x: &Tensor) -> Result<Tensor> {
        match self {
            Rows::AsGiven => linear.forward(x),
            Rows::Fork(p) => linear.forward_forked(x, p),
        }
    }
}

impl Attention {
    /// `ctx` is built for the output rows (`P·batch` when `rows` forks). Keys and values are
    /// computed (and cached) for every position, queries — and so the output
    /// `[rows, q_len, hidden]` — for the last `q_len` positions.
    fn forward(
        &self,
        x: &Tensor,
        rows_in: Rows,
        ctx: &StepContext,
        cache: &mut LayerCache,
        q_len: usize,
    ) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let rows = rows_in.out(batch);
        // The query positions, with their rotary angles and mask rows.
        let queries = len - q_len;
        let split = |t: Tensor, n: usize, heads: usize| {
            t.reshape((rows, n, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rows_in.project(&self.q_proj, &x.narrow(1, queries, q_len)?)?;
        let q = split(q, q_len, self.heads)?;
        let k = split(rows_in.project(&self.k_proj, x)?, len, self.kv_heads)?;
        let v = split(rows_in.project(&self.v_proj, x)?, len, self.kv_heads)?;
        let q = apply_rope(
            &q,
            &ctx.cos.narrow(2, queries, q_len)?,
            &ctx.sin.narrow(2, queries, q_len)?,
        )?;
        let k = apply_rope(&k, &ctx.cos, &ctx.sin)?;
        // Grouped-query attention without repeating keys and values: query heads
        // g·n_rep .. g·n_rep + n_rep share key/value head g, so they become n_rep·q_len query
        // rows of that head (`[rows, kv, n_rep·q_len, d]`, a free reshape), with the bias
        // repeated to match. Same result as transformers' `repeat_kv`, without copying the cache
        // n_rep times.
        let n_rep = self.heads / self.kv_heads;
        let q = q.reshape((rows, self.kv_heads, n_rep * q_len, self.head_dim))?;
        let bias = group_bias(&ctx.bias.narrow(2, queries, q_len)?, n_rep)?;
        let out = match cache.extend(k, v)? {
            Keys::Whole(k, v) => attention(&q, &k, &v, Some(&bias))?,
            Keys::Split { prefix, own } => attention_shared_prefix(&q, &prefix, &own, &bias)?,
        };
        let out = out
            .reshape((rows, self.heads, q_len, self.head_dim))?
            .transpose(1, 2)?
            .reshape((rows, q_len, self.heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

impl DecoderLayer {
    fn load(s: &Scope, c: &LlamaConfig) -> LoadResult<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
        let a = s.pp("self_attn");
        let m = s.pp("mlp");
        Ok(Self {
            self_attn: Attention {
                q_proj: linear(&a.pp("q_proj"), h, nh * hd, c.attention_bias)?,
                k_proj: linear(&a.pp("k_proj"), h, nkv * hd, c.attention_bias)?,
                v_proj: linear(&a.pp("v_proj"), h, nkv * hd, c.attention_bias)?,
                o_proj: linear(&a.pp("o_proj"), nh * hd, h, c.attention_bias)?,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            },
            mlp: Mlp {
                gate_proj: linear(&m.pp("gate_proj"), h, c.intermediate_size, c.mlp_bias)?,
                up_proj: linear(&m.pp("up_proj"), h, c.intermediate_size, c.mlp_bias)?,
                down_proj: linear(&m.pp("down_proj"), c.intermediate_size, h, c.mlp_bias)?,
                act: c.hidden_act,
            },
            input_layernorm: RmsNorm::load(&s.pp("input_layernorm"), h, c.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::load(
                &s.pp("post_attention_layernorm"),
                h,
                c.rms_norm_eps,
            )?,
        })
    }

    /// The output holds the last `q_len` positions (all of them, or see [`Outputs::Tail`]).
    fn forward(
        &self,
        x: &Tensor,
        rows: Rows,
        ctx: &StepContext,
        cache: &mut LayerCache,
        q_len: usize,
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, rows, ctx, cache, q_len)?;
        let x = x.narrow(1, x.dim(1)? - q_len, q_len)?;
        let h = match rows {
            Rows::AsGiven => add(&x, &attn)?,
            Rows::Fork(p) => add(&expand_particles(&x, p)?, &attn)?,
        };
        let n = self.post_attention_layernorm.forward(&h)?;
        self.mlp.forward_residual(&h, &n, MLP_VALUES_AT_ONCE)
    }

    fn linears(&self) -> [(&'static str, &ParticleLinear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut ParticleLinear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    fn has_particles(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.adapter().is_some())
    }
}

/// Keys and values of every layer plus, per row, which cached positions are real tokens and the
/// next position id.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    keep: Vec<Vec<bool>>,
    next_position: Vec<u32>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
            keep: Vec::new(),
            next_position: Vec::new(),
        }
    }

    /// Cached positions (real and padding).
    pub fn len(&self) -> usize {
        self.keep.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows the first layer cached: `batch` while the particles share everything below their
    /// first layer (a prompt, candidates scored under every particle), even where the
    /// bookkeeping covers `P·batch`; `P·batch` once their sequences differ. A step needs at least
    /// this many input rows.
    pub fn bottom_rows(&self) -> Result<usize> {
        self.layers
            .first()
            .and_then(|l| l.own.as_ref().or(l.prefix.as_ref()))
            .map_or(Ok(0), |(k, _)| k.dim(0))
    }

    /// Registers a step of `new_keep[row][j]` (true = real token) and returns its position ids
    /// (one row per row of `new_keep`). Positions count real tokens only, as transformers'
    /// `generate` (cumsum of the mask − 1); padding gets position 1. A step of fewer rows than
    /// the bookkeeping (tokens shared by every particle) extends every particle's rows.
    fn advance(&mut self, new_keep: &[Vec<bool>]) -> Result<Vec<Vec<u32>>> {
        let rows = new_keep.len();
        let have = self.keep.len();
        if self.keep.is_empty() {
            self.keep = vec![Vec::new(); rows];
            self.next_position = vec![0; rows];
        } else if rows > have {
            if !rows.is_multiple_of(have) {
                candle_core::bail!("a step of {rows} rows does not fit a cache of {have} rows");
            }
            // The particles' sequences diverge: repeat the shared bookkeeping particle-major.
            self.keep = (0..rows).map(|r| self.keep[r % have].clone()).collect();
            self.next_position = (0..rows).map(|r| self.next_position[r % have]).collect();
        } else if rows < have {
            let same = |r: usize| {
                self.keep[r] == self.keep[r % rows]
                    && self.next_position[r] == self.next_position[r % rows]
            };
            if rows == 0 || !have.is_multiple_of(rows) || !(rows..have).all(same) {
                candle_core::bail!(
                    "a step of {rows} rows does not continue a cache of {have} rows"
                );
            }
            let shared: Vec<Vec<bool>> = (0..have).map(|r| new_keep[r % rows].clone()).collect();
            let mut positions = self.advance(&shared)?;
            positions.truncate(rows);
            return Ok(positions);
        }
        let mut positions = Vec::with_capacity(rows);
        for (r, step) in new_keep.iter().enumerate() {
            let mut row = Vec::with_capacity(step.len());
            for &k in step {
                if k {
                    row.push(self.next_position[r]);
                    self.next_position[r] += 1;
                } else {
                    row.push(1);
                }
            }
            self.keep[r].extend_from_slice(step);
            positions.push(row);
        }
        Ok(positions)
    }
}

/// Positions and attention bias of a segmented step ([`LlamaModel::forward_segments`]): every
/// segment continues the cached sequence on its own.
fn segment_step(
    cache: &KvCache,
    keep: &[Vec<bool>],
    segments: usize,
    device: &Device,
) -> Result<(Vec<Vec<u32>>, Tensor)> {
    let rows = keep.len();
    let len = keep.first().map_or(0, Vec::len);
    let seg = len / segments;
    let cached = cache.keep.len();
    let past = cache.len();
    let mut positions = Vec::with_capacity(rows);
    let mut bias = Vec::with_capacity(rows * len * (past + len));
    for (r, row) in keep.iter().enumerate() {
        let (past_keep, start) = match cached {
            0 => (&[][..], 0),
            n => (&cache.keep[r % n][..], cache.next_position[r % n]),
        };
        let mut pos = Vec::with_capacity(len);
        for s in 0..segments {
            let mut next = start;
            for &k in &row[s * seg..(s + 1) * seg] {
                pos.push(if k { next } else { 1 });
                next += u32::from(k);
            }
        }
        positions.push(pos);
        for i in 0..len {
            bias.extend(past_keep.iter().map(|&k| if k { 0.0f32 } else { MASKED }));
            let own = i / seg;
            bias.extend((0..len).map(|j| {
                let visible = j / seg == own && j <= i && row[j];
                if visible {
                    0.0
                } else {
                    MASKED
                }
            }));
        }
    }
    Ok((
        positions,
        Tensor::from_vec(bias, (rows, 1, len, past + len), device)?,
    ))
}

/// Which positions of a decoder pass the caller reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// The final hidden state of every position (training, scoring, logits everywhere).
    All,
    /// The same, and each decoder layer's output (parity checks against transformers).
    AllAndLayers,
    /// The final hidden states of the last `n` positions only: a prompt before decoding needs
    /// the last one, training the answer's. The last layer computes the keys and values of
    /// every position (the cache keeps them) and the rest of the layer — queries, attention,
    /// `o_proj`, the MLP — for those positions alone, which spares most of a layer per
    /// particle row (and its activations while training).
    Tail(usize),
}

/// What a checkpointed pass keeps (see [`LlamaModel::forward_taped`]).
pub struct LayerTape {
    steps: Vec<TapeStep>,
    top: Option<Tensor>,
}

/// One decoder layer as it ran: its input (detached), rows, context and query length.
struct TapeStep {
    input: Tensor,
    rows: Rows,
    ctx: StepContext,
    q_len: usize,
}

/// What a decoder pass produced; rows are `P·batch` when `expanded`.
pub struct DecoderOutput {
    /// After the final RMSNorm: `[rows, len, hidden]` (`len` = n for [`Outputs::Tail`]).
    pub last_hidden_state: Tensor,
    /// Each decoder layer's output, for [`Outputs::AllAndLayers`].
    pub layer_outputs: Vec<Tensor>,
    pub expanded: bool,
}

/// The state after a prompt: the cache and the next-token logits `[rows, vocab]` of every row.
#[derive(Clone, Debug)]
pub struct Prefill {
    pub cache: KvCache,
    pub last_logits: Tensor,
    /// Whether the rows carry the particle axis (`P·batch` rows).
    pub expanded: bool,
}

#[derive(Clone, Debug)]
pub struct LlamaModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: ParticleLinear,
    inv_freq: Vec<f32>,
    config: LlamaConfig,
}

impl LlamaModel {
    /// `s` is the scope holding `model.*` and `lm_head.*` (`language_model` in the LLaVA hub layout).
    pub fn load(s: &Scope, c: &LlamaConfig) -> LoadResult<Self> {
        let m = s.pp("model");
        let embed_tokens = m.get("embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(&m.pp("layers").pp(i), c))
            .collect::<LoadResult<_>>()?;
        let head = s.pp("lm_head");
        let lm_head = if c.tie_word_embeddings && !s.weights().contains(&head.key("weight")) {
            ParticleLinear::new(embed_tokens.clone(), None)
        } else {
            linear(&head, c.hidden_size, c.vocab_size, false)?
        };
        let d = c.head_dim();
        let theta = c.rope_theta() as f32;
        let inv_freq = (0..d / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&m.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            lm_head,
            inv_freq,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings `[rows, len, hidden]` of `input_ids` `[rows, len]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (rows, len) = input_ids.dims2()?;
        let input_ids = input_ids.to_device(self.embed_tokens.device())?;
        self.embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((rows, len, self.config.hidden_size))
    }

    /// cos/sin tables `[rows, 1, len, head_dim]` for per-row positions.
    fn rope_tables(&self, positions: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let rows = positions.len();
        let len = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(rows * len * half * 2);
        let mut sin = Vec::with_capacity(rows * len * half * 2);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let shape = (rows, 1, len, half * 2);
        let dtype = self.embed_tokens.dtype();
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// One pass over `embeds` `[rows, len, hidden]`: `rows` = batch, or P·batch (particle-major,
    /// `input_expanded`) when the sequences already differ per particle. `keep[row][j]` marks real
    /// tokens of this step (false = left padding). The cache is extended; use a fresh one for a
    /// full-sequence pass.
    pub fn forward(
        &self,
        embeds: &Tensor,
        input_expanded: bool,
        keep: &[Vec<bool>],
        cache: &mut KvCache,
        particles: usize,
        outputs: Outputs,
    ) -> Result<DecoderOutput> {
        self.forward_with(
            embeds,
            input_expanded,
            keep,
            1,
            cache,
            true,
            particles,
            outputs,
            None,
        )
    }

    /// Several continuations of each cached sequence in one pass, without copying the cache:
    /// the `len` new tokens of a row are `segments` equal segments, each attending to the cached
    /// tokens and to its own earlier tokens only, with positions counted from the cache's end for
    /// every segment. The cache is only read: no layer keeps the segments' keys and values
    /// beyond its own step, so scoring never holds a second copy of the prompt's cache.
    pub fn forward_segments(
        &self,
        embeds: &Tensor,
        input_expanded: bool,
        keep: &[Vec<bool>],
        segments: usize,
        cache: &KvCache,
        particles: usize,
    ) -> Result<DecoderOutput> {
        // Cloning shares the tensors; the clone's bookkeeping advances, its layers are not extended.
        self.forward_with(
            embeds,
            input_expanded,
            keep,
            segments,
            &mut cache.clone(),
            false,
            particles,
            Outputs::All,
            None,
        )
    }

    /// The first half of a training step with gradient checkpointing: a full-sequence pass that
    /// keeps, of each decoder layer, only its input (detached) and how it ran — not the
    /// activations its backward pass would read. Returns the tape, the last layer's output
    /// before the final norm (detached: the caller makes it a variable and runs the head and
    /// the loss on it) and whether the rows carry the particle axis. [`Self::backward_taped`]
    /// runs the layers again, one at a time and from the top, with gradients.
    pub fn forward_taped(
        &self,
        embeds: &Tensor,
        input_expanded: bool,
        keep: &[Vec<bool>],
        particles: usize,
        outputs: Outputs,
    ) -> Result<(LayerTape, Tensor, bool)> {
        let mut tape = LayerTape {
            steps: Vec::new(),
            top: None,
        };
        let out = self.forward_with(
            &embeds.detach(),
            input_expanded,
            keep,
            1,
            &mut self.new_cache(),
            false,
            particles,
            outputs,
            Some(&mut tape),
        )?;
        let top = tape.top.take().unwrap_or_else(|| embeds.detach());
        Ok((tape, top, out.expanded))
    }

    /// The second half: given `grad`, the gradient of the loss with respect to the last layer's
    /// output, runs each layer again from its taped input with gradients, adds the gradients of
    /// the trained variables to `grads` and passes the input's gradient down. Returns the
    /// gradient with respect to the embeddings when `embeds_need_grad` (particles below the
    /// decoder, in the vision tower or the projector); without, it stops below the lowest layer
    /// with particles, as the plain backward pass does. One layer's activations are alive at a
    /// time: a step costs one more forward pass and its memory no longer grows with the depth.
    pub fn backward_taped(
        &self,
        tape: LayerTape,
        mut grad: Tensor,
        grads: &mut VarGrads,
        embeds_need_grad: bool,
    ) -> Result<Option<Tensor>> {
        let lowest = self.lowest_adapted_layer();
        for (i, (layer, step)) in self.layers.iter().zip(tape.steps).enumerate().rev() {
            if !embeds_need_grad && lowest.is_none_or(|lowest| i < lowest) {
                return Ok(None);
            }
            stop_point()?;
            let input = Var::from_tensor(&step.input)?;
            let out = layer.forward(
                input.as_tensor(),
                step.rows,
                &step.ctx,
                &mut LayerCache::default(),
                step.q_len,
            )?;
            let store = backward_from(&out, &grad)?;
            grads.add(&store)?;
            grad = grad_or_zeros(&store, input.as_tensor())?;
        }
        Ok(embeds_need_grad.then_some(grad))
    }

    /// The index of the lowest decoder layer with particles (`None`: none has).
    pub fn lowest_adapted_layer(&self) -> Option<usize> {
        self.layers.iter().position(|l| l.has_particles())
    }

    /// The final RMSNorm (see [`Self::forward_taped`]).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// `extend`: whether the layers' caches keep this step's keys and values (false: they are
    /// attended to for this step only; the bookkeeping advances either way).
    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        embeds: &Tensor,
        input_expanded: bool,
        keep: &[Vec<bool>],
        segments: usize,
        cache: &mut KvCache,
        extend: bool,
        particles: usize,
        outputs: Outputs,
        mut tape: Option<&mut LayerTape>,
    ) -> Result<DecoderOutput> {
        let (rows_in, len, _) = embeds.dims3()?;
        if segments == 0 || len % segments != 0 {
            candle_core::bail!("{len} tokens do not split into {segments} segments");
        }
        // The mask may be given per example for input that already carries the particle axis.
        let fits = keep.len() == rows_in || (input_expanded && keep.len() * particles == rows_in);
        if !fits || keep.iter().any(|r| r.len() != len) {
            candle_core::bail!("attention mask does not match the input [{rows_in}, {len}]");
        }
        // Every segment continues the cache from the same position.
        let max_pos = self.config.max_position_embeddings;
        if cache.len() + len / segments > max_pos {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {max_pos} positions",
                cache.len() + len / segments
            );
        }
        let mut x = embeds.clone();
        let mut keep: Vec<Vec<bool>> = (0..rows_in).map(|r| keep[r % keep.len()].clone()).collect();
        let mut expanded = input_expanded;
        // Shared tokens fed to particles whose sequences already diverged in the first layer:
        // expand them first. (Where the first layer still holds the shared rows, the tokens run
        // once up to the first layer with particles and fork there.)
        if !expanded && cache.bottom_rows()? > rows_in {
            x = expand_particles(&x, particles)?;
            keep = (0..rows_in * particles)
                .map(|r| keep[r % rows_in].clone())
                .collect();
            expanded = true;
        }
        let device = embeds.device();
        let (positions, bias) = if segments == 1 {
            let positions = cache.advance(&keep)?;
            // The bookkeeping may cover more rows (the particles'): the step's come first.
            let bias = attention_bias(&cache.keep[..keep.len()], len, true, device)?;
            (positions, bias)
        } else {
            let step = segment_step(cache, &keep, segments, device)?;
            // Keeps the bookkeeping's lengths in step with the layers' caches.
            cache.advance(&keep)?;
            step
        };
        let (cos, sin) = self.rope_tables(&positions, device)?;
        let mut ctx = StepContext {
            // f32 whatever the compute dtype: the mask value overflows half precision.
            bias,
            cos,
            sin,
        };
        let mut layer_outputs = Vec::new();
        let q_len = match outputs {
            Outputs::Tail(n) if n == 0 || n > len => {
                candle_core::bail!("cannot return the last {n} of {len} positions")
            }
            Outputs::Tail(n) => n,
            Outputs::All | Outputs::AllAndLayers => len,
        };
        let last_layer = self.layers.len().saturating_sub(1);
        for (i, (layer, layer_cache)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate()
        {
            // An answer whose asker has gone stops here (training and plain answers never do).
            crate::cancel::check().map_err(candle_core::Error::wrap)?;
            let q_len = if i == last_layer { q_len } else { len };
            // The rows fork to the particles inside the first layer that carries any.
            let rows = if !expanded && layer.has_particles() && particles > 1 {
                expanded = true;
                Rows::Fork(particles)
            } else {
                expanded |= layer.has_particles();
                Rows::AsGiven
            };
            let rows_out = rows.out(x.dim(0)?);
            if ctx.rows()? != rows_out {
                ctx = ctx.expanded(rows_out)?;
            }
            if let Some(tape) = tape.as_deref_mut() {
                tape.steps.push(TapeStep {
                    input: x.clone(),
                    rows,
                    ctx: ctx.clone(),
                    q_len,
                });
            }
            x = if extend {
                layer.forward(&x, rows, &ctx, layer_cache, q_len)?
            } else {
                // This step's keys and values live for this layer only.
                layer.forward(&x, rows, &ctx, &mut layer_cache.clone(), q_len)?
            };
            if tape.is_some() {
                // The layer's activations go with its graph; the tape keeps the output only.
                x = x.detach();
            }
            if outputs == Outputs::AllAndLayers {
                layer_outputs.push(x.clone());
            }
        }
        // The bookkeeping follows the widest rows any layer cached.
        if cache.keep.len() < x.dim(0)? {
            let have = cache.keep.len();
            let target = x.dim(0)?;
            cache.keep = (0..target).map(|r| cache.keep[r % have].clone()).collect();
            cache.next_position = (0..target).map(|r| cache.next_position[r % have]).collect();
        }
        if let Some(tape) = tape {
            tape.top = Some(x.clone());
        }
        Ok(DecoderOutput {
            last_hidden_state: self.norm.forward(&x)?,
            layer_outputs,
            expanded,
        })
    }

    /// `lm_head` over hidden states `[rows, len, hidden]` → `[rows', len, vocab]`, and whether the
    /// output rows carry the particle axis (the head may be the first layer with particles).
    pub fn logits(
        &self,
        hidden: &Tensor,
        expanded: bool,
        particles: usize,
    ) -> Result<(Tensor, bool)> {
        if !expanded && self.lm_head.adapter().is_some() {
            let x = expand_particles(hidden, particles)?;
            return Ok((self.lm_head.forward(&x)?, true));
        }
        Ok((self.lm_head.forward(hidden)?, expanded))
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub(crate) fn linears<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a ParticleLinear)>) {
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, l) in layer.linears() {
                out.push((format!("{prefix}.model.layers.{i}.{name}"), l));
            }
        }
        out.push((format!("{prefix}.lm_head"), &self.lm_head));
    }

    pub(crate) fn linears_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut ParticleLinear)>,
    ) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, l) in layer.linears_mut() {
                out.push((format!("{prefix}.model.layers.{i}.{name}"), l));
            }
        }
        out.push((format!("{prefix}.lm_head"), &mut self.lm_head));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        // A fixed pseudo-random fill (splitmix-like), so the test needs no RNG state.
        let data: Vec<f32> = (0..n as u64)
            .map(|i| {
                let x =
                    (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    #[test]
    fn the_mlp_in_chunks_of_positions_equals_it_in_one_go() -> Result<()> {
        let (p, len, hidden, inter) = (2, 7, 4, 6);
        let w = |out: usize, inp: usize, seed: u64| -> Result<Tensor> {
            random((1, 1, out, inp), seed)?.squeeze(0)?.squeeze(0)
        };
        let mut up_proj = ParticleLinear::new(w(inter, hidden, 1)?, None);
        // Particles on one projection: the chunks must keep the rows particle-major.
        let a = random((1, p, 3, hidden), 4)?.squeeze(0)?;
        let b = random((1, p, inter, 3), 5)?.squeeze(0)?;
        up_proj.set_adapter(Some(crate::bella::Adapter::new(a, b, 2.0)?))?;
        let mlp = Mlp {
            gate_proj: ParticleLinear::new(w(inter, hidden, 2)?, None),
            up_proj,
            down_proj: ParticleLinear::new(w(hidden, inter, 3)?, None),
            act: Activation::Silu,
        };
        let h = random((1, p, len, hidden), 6)?.squeeze(0)?;
        let norm = random((1, p, len, hidden), 7)?.squeeze(0)?;
        let whole = mlp.forward_residual(&h, &norm, usize::MAX)?;
        // 3 positions of 2 rows × 6 features at once: chunks of 3, 3 and 1 positions.
        let chunked = mlp.forward_residual(&h, &norm, p * inter * 3)?;
        assert_eq!(chunked.dims(), &[p, len, hidden]);
        let diff = (chunked - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // And the chunked MLP is the formula.
        let gate = norm.broadcast_matmul(&mlp.gate_proj.dense_weight()?.t()?)?;
        let gated = (gate.silu()? * mlp.up_proj.forward(&norm)?)?;
        let want = (&h + gated.broadcast_matmul(&mlp.down_proj.dense_weight()?.t()?)?)?;
        let diff = (whole - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// Decoding steps after a prompt keep the prompt's keys and values where the prompt put them
    /// (the same tensors, never copied) and attend over prompt + own tokens exactly as over one
    /// concatenated cache — with the step's rows equal to the prompt's, and forked to 2 particles.
    #[test]
    fn decoding_steps_never_copy_the_prompts_cache() -> Result<()> {
        let (kv, t, d) = (2, 5, 4);
        for particles in [1, 2] {
            let mut cache = LayerCache::default();
            let (pk, pv) = (random((1, kv, t, d), 1)?, random((1, kv, t, d), 2)?);
            let Keys::Whole(..) = cache.extend(pk.clone(), pv.clone())? else {
                candle_core::bail!("the prompt is the first step");
            };
            let rows = particles;
            let (mut all_k, mut all_v) =
                (expand_particles(&pk, rows)?, expand_particles(&pv, rows)?);
            for step in 0..3u64 {
                let k = random((rows, kv, 1, d), 10 + step)?;
                let v = random((rows, kv, 1, d), 20 + step)?;
                all_k = Tensor::cat(&[&all_k, &k], 2)?;
                all_v = Tensor::cat(&[&all_v, &v], 2)?;
                let Keys::Split { prefix, own } = cache.extend(k, v)? else {
                    candle_core::bail!("a step after the prompt attends to prefix + own");
                };
                assert_eq!(prefix.0.id(), pk.id(), "the prompt's keys were copied");
                assert_eq!(prefix.1.id(), pv.id(), "the prompt's values were copied");
                assert_eq!(own.0.dims(), &[rows, kv, step as usize + 1, d]);
                let q = random((rows, kv, 1, d), 30 + step)?;
                let len = t + step as usize + 1;
                // The last prompt position is padding in every row.
                let bias: Vec<f32> = (0..rows * len)
                    .map(|i| if i % len == t - 1 { MASKED } else { 0.0 })
                    .collect();
                let bias = Tensor::from_vec(bias, (rows, 1, 1, len), &Device::Cpu)?;
                let split = attention_shared_prefix(&q, &prefix, &own, &bias)?;
                let whole = attention(&q, &all_k, &all_v, Some(&bias))?;
                let diff = (split - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-6,
                    "P = {particles}, step {step}: differs by {diff}"
                );
            }
        }
        Ok(())
    }
}
