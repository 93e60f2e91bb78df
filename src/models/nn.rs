//! Building blocks shared by the models, all in differentiable form: candle's fused `softmax_last_dim`,
//! `layer_norm` and `rms_norm` return no gradient (design §9), and training goes through these.

use candle_core::{DType, Result, Tensor, D};

use crate::bella::ParticleLinear;
use crate::error::WeightError;
use crate::models::config::Activation;
use crate::models::weights::Scope;

/// Loads `{scope}.weight` `[out, in]` (quantized where `--quantize` selects the layer) and, if
/// asked, `{scope}.bias` as a particle-capable layer.
pub fn linear(
    scope: &Scope,
    inp: usize,
    out: usize,
    bias: bool,
) -> std::result::Result<ParticleLinear, WeightError> {
    let base = scope.base(out, inp)?;
    let bias = if bias {
        Some(scope.get("bias", &[out])?)
    } else {
        None
    };
    Ok(ParticleLinear::with_base(base, bias))
}

/// A linear layer whose bias is optional in the checkpoint.
pub fn linear_opt_bias(
    scope: &Scope,
    inp: usize,
    out: usize,
) -> std::result::Result<ParticleLinear, WeightError> {
    let base = scope.base(out, inp)?;
    let bias = scope.get_opt("bias", &[out])?;
    Ok(ParticleLinear::with_base(base, bias))
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> std::result::Result<Self, WeightError> {
        Ok(Self {
            weight: scope.get("weight", &[dim])?,
            bias: scope.get("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(scope: &Scope, dim: usize, eps: f64) -> std::result::Result<Self, WeightError> {
        Ok(Self {
            weight: scope.get("weight", &[dim])?,
            eps,
        })
    }

    /// As LLaMA: normalise in f32, cast back, then scale.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        x32.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluPytorchTanh => x.gelu(),
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
    }
}

/// Scaled dot-product attention. `q`: `[rows, heads, q_len, d]`, `k`/`v`: `[rows, heads, kv_len, d]`,
/// `bias`: additive mask broadcastable to `[rows, heads, q_len, kv_len]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // gemm reads the transposed keys in place; only a non-contiguous `k` (CLIP's head split) is
    // copied, not the whole key cache of every decoding step.
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    attention_probs(&scores, bias)?.matmul(&v.contiguous()?)
}

/// Softmax over the last axis of scaled attention scores plus an optional additive `bias`,
/// computed in f32 whatever the compute dtype (as transformers' eager attention) and returned in
/// the scores' dtype.
pub fn attention_probs(scores: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dtype = scores.dtype();
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)
}

/// The additive mask value for "may not attend" (finite, so fully masked rows stay finite).
pub const MASKED: f32 = f32::MIN;

/// Additive attention bias `[rows, 1, q_len, kv_len]`: key `j` is visible to query `i` when it is not
/// padding (`keep[row][j]`) and, if `causal`, when `j <= past + i`.
pub fn attention_bias(
    keep: &[Vec<bool>],
    q_len: usize,
    causal: bool,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let rows = keep.len();
    let kv_len = keep.first().map_or(0, |r| r.len());
    let past = kv_len.saturating_sub(q_len);
    let mut data = Vec::with_capacity(rows * q_len * kv_len);
    for row in keep {
        for i in 0..q_len {
            for (j, &k) in row.iter().enumerate() {
                let visible = k && (!causal || j <= past + i);
                data.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Tensor::from_vec(data, (rows, 1, q_len, kv_len), device)
}
