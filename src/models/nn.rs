//! Building blocks shared by the models, all in differentiable form: candle's fused `softmax_last_dim`,
//! `layer_norm` and `rms_norm` return no gradient (design §9), and training goes through these.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var, D};

use crate::bella::ParticleLinear;
use crate::error::WeightError;
use crate::models::config::Activation;
use crate::models::weights::Scope;

/// The gradients of the trained variables, summed over the backward passes of one step (one
/// pass, or one per decoder layer with gradient checkpointing). Nothing else of a pass's
/// gradients is kept: candle also computes those of the frozen weights, weight-sized each.
pub struct VarGrads {
    vars: Vec<Var>,
    sums: HashMap<TensorId, Tensor>,
}

impl VarGrads {
    pub fn new(vars: &[Var]) -> Self {
        Self {
            vars: vars.to_vec(),
            sums: HashMap::new(),
        }
    }

    /// Adds the variables' gradients of one backward pass (detached).
    pub fn add(&mut self, store: &GradStore) -> Result<()> {
        for var in &self.vars {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let sum = match self.sums.remove(&var.id()) {
                Some(sum) => (sum + g)?,
                None => g.clone(),
            };
            self.sums.insert(var.id(), sum.detach());
        }
        Ok(())
    }

    /// The summed gradient of `var` (zeros where no pass reached it).
    pub fn get(&self, var: &Var) -> Result<Tensor> {
        match self.sums.get(&var.id()) {
            Some(g) => Ok(g.clone()),
            None => var.as_tensor().zeros_like(),
        }
    }
}

/// The gradients of ⟨`out`, `grad`⟩: the vector–Jacobian product of whatever computed `out`,
/// given the loss's gradient with respect to it (a backward pass resumed at `out`).
pub fn backward_from(out: &Tensor, grad: &Tensor) -> Result<GradStore> {
    (to_f32(out)? * to_f32(grad)?)?.sum_all()?.backward()
}

/// Fails once a stop was asked for ([`crate::interrupt`]): asked between the layers of a
/// training pass that runs them one at a time, whose caller drops the step.
pub fn stop_point() -> Result<()> {
    if crate::interrupt::check().is_err() {
        candle_core::bail!("interrupted");
    }
    Ok(())
}

/// The gradient `store` holds for `t`, detached, or zeros where the pass did not reach it.
pub fn grad_or_zeros(store: &GradStore, t: &Tensor) -> Result<Tensor> {
    match store.get(t) {
        Some(g) => Ok(g.detach()),
        None => t.zeros_like(),
    }
}

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
        add(
            &normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?,
            &self.bias,
        )
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

/// `a + b` (broadcasting) in `a`'s dtype. On the CPU a bf16 sum is computed in f32 and rounded
/// once: candle 0.11 adds bf16 tensors through an AVX512-BF16 conversion it calls, not inlines,
/// per 8 values (a `[601, 4096]` sum took 21 ms, 30× its bf16 product of the same tensors).
/// Every residual, bias and particle sum of the models goes through here. `b` may be f32 (a
/// particle's low-rank term) and is then not rounded before the sum.
///
/// Answering (no gradient) with `a` contiguous and `b` of `a`'s shape or of its trailing dims
/// (a bias, a position table) takes `Bf16Add`: one parallel pass, no f32 copies (P = 8 rows
/// of a 601-token prompt: 140 ms through f32 tensors, which are mapped afresh at that size).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dtype = a.dtype();
    if dtype == DType::BF16 && a.device().is_cpu() {
        let trailing = {
            let lead = b.dims().iter().take_while(|&&d| d == 1).count();
            a.dims().ends_with(&b.dims()[lead..])
        };
        if !a.track_op() && !b.track_op() && trailing && a.is_contiguous() && b.is_contiguous() {
            return a.apply_op2_no_bwd(b, &Bf16Add);
        }
        return to_f32(a)?.broadcast_add(&to_f32(b)?)?.to_dtype(dtype);
    }
    a.broadcast_add(&b.to_dtype(dtype)?)
}

/// `t` in f32. Answering, a contiguous half-precision CPU tensor is widened in parallel
/// (`Widen`): candle converts value by value on one thread (`unary_map`), which was 16 % of a
/// P = 8 bf16 decoding step, spent widening the prompt's keys and values for attention.
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    let half = matches!(t.dtype(), DType::BF16 | DType::F16);
    if half && t.device().is_cpu() && t.is_contiguous() && !t.track_op() {
        return t.apply_op1_no_bwd(&Widen);
    }
    t.to_dtype(DType::F32)
}

/// Widens a contiguous bf16 or f16 tensor to f32, in parallel chunks (`half`'s slice
/// conversions use the CPU's vector instructions).
struct Widen;

impl candle_core::CustomOp1 for Widen {
    fn name(&self) -> &'static str {
        "bella-widen"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        use half::slice::HalfFloatSliceExt;
        use rayon::prelude::*;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("widen: a contiguous tensor expected");
        };
        let mut out = vec![0f32; end - start];
        const CHUNK: usize = 1 << 16;
        match s {
            S::BF16(v) => out
                .par_chunks_mut(CHUNK)
                .zip(v[start..end].par_chunks(CHUNK))
                .for_each(|(o, v)| v.convert_to_f32_slice(o)),
            S::F16(v) => out
                .par_chunks_mut(CHUNK)
                .zip(v[start..end].par_chunks(CHUNK))
                .for_each(|(o, v)| v.convert_to_f32_slice(o)),
            _ => candle_core::bail!("widen: a bf16 or f16 tensor expected"),
        }
        Ok((S::F32(out), l.shape().clone()))
    }
}

/// `a + b` for a contiguous bf16 `a` and a contiguous bf16 or f32 `b` repeated along `a`'s
/// leading dims, in f32, rounded once (no gradient: [`add`] uses it only while answering).
struct Bf16Add;

impl candle_core::CustomOp2 for Bf16Add {
    fn name(&self) -> &'static str {
        "bella-bf16-add"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bf16 add: contiguous tensors expected");
        };
        let S::BF16(a) = s1 else {
            candle_core::bail!("bf16 add: a bf16 left-hand side expected");
        };
        let a = &a[a0..a1];
        let sum = match s2 {
            S::BF16(b) => sum_rows(a, &b[b0..b1], |v: half::bf16| v.to_f32())?,
            S::F32(b) => sum_rows(a, &b[b0..b1], |v: f32| v)?,
            _ => candle_core::bail!("bf16 add: a bf16 or f32 right-hand side expected"),
        };
        Ok((S::BF16(sum), l1.shape().clone()))
    }
}

/// `a[i] + b[i mod b.len()]`, in parallel.
fn sum_rows<B: Copy + Send + Sync>(
    a: &[half::bf16],
    b: &[B],
    to_f32: impl Fn(B) -> f32 + Send + Sync,
) -> Result<Vec<half::bf16>> {
    use rayon::prelude::*;
    if b.is_empty() || !a.len().is_multiple_of(b.len()) {
        candle_core::bail!("bf16 add: {} values cannot repeat {}", a.len(), b.len());
    }
    let mut out = vec![half::bf16::ZERO; a.len()];
    let sum = |(out, (a, b)): (&mut [half::bf16], (&[half::bf16], &[B]))| {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o = half::bf16::from_f32(a.to_f32() + to_f32(*b));
        }
    };
    const CHUNK: usize = 1 << 16;
    if b.len() == a.len() {
        let pairs = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK));
        out.par_chunks_mut(CHUNK).zip(pairs).for_each(sum);
    } else {
        let rows = a.par_chunks(b.len()).map(|a| (a, b));
        out.par_chunks_mut(b.len()).zip(rows).for_each(sum);
    }
    Ok(out)
}

pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        // x·σ(1.702x) = silu(1.702x) / 1.702 in f32: candle's silu is one pass, its sigmoid
        // op and half-precision scaling are not (a bf16 [577, 4096] CLIP activation: 31 ms
        // through the sigmoid, 24 ms as silu in bf16, 6 ms as silu in f32).
        Activation::QuickGelu => {
            let z = (to_f32(x)? * 1.702)?;
            (z.silu()? * (1.0 / 1.702))?.to_dtype(x.dtype())
        }
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluPytorchTanh => x.gelu(),
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
    }
}

/// Attention scores of at most this many values (8 MiB in f32) are computed at once.
const SCORES_AT_ONCE: usize = 1 << 21;

/// Scaled dot-product attention. `q`: `[rows, heads, q_len, d]`, `k`/`v`: `[rows, heads, kv_len, d]`,
/// `bias`: additive mask broadcastable to `[rows, heads, q_len, kv_len]`.
///
/// A long prompt's scores are large (P = 8 rows of a 601-token prompt with 32 heads: 370 MB in
/// f32, and the softmax makes three more of them); they run in chunks of rows and heads whose
/// scores stay under `SCORES_AT_ONCE`, so each chunk's buffers are reused from the heap and
/// stay in the cache instead of being mapped and zeroed afresh by the kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, heads, q_len, _) = q.dims4()?;
    let per_head = q_len * k.dim(2)?;
    if rows * heads * per_head <= SCORES_AT_ONCE {
        return attention_at_once(q, k, v, bias);
    }
    let step = (SCORES_AT_ONCE / per_head).clamp(1, heads);
    let mut outputs = Vec::with_capacity(rows);
    for row in 0..rows {
        let one = |t: &Tensor| t.narrow(0, row, 1);
        let (q, k, v) = (one(q)?, one(k)?, one(v)?);
        let bias = match bias {
            Some(b) if b.dim(0)? == rows => Some(one(b)?),
            other => other.cloned(),
        };
        let mut chunks = Vec::with_capacity(heads.div_ceil(step));
        for first in (0..heads).step_by(step) {
            let n = step.min(heads - first);
            let some = |t: &Tensor| t.narrow(1, first, n);
            let bias = match &bias {
                Some(b) if b.dim(1)? == heads => Some(some(b)?),
                other => other.clone(),
            };
            chunks.push(attention_at_once(
                &some(&q)?,
                &some(&k)?,
                &some(&v)?,
                bias.as_ref(),
            )?);
        }
        outputs.push(Tensor::cat(&chunks, 1)?);
    }
    Tensor::cat(&outputs, 0)
}

/// [`attention`] in one go. On the CPU a half-precision attention computes in f32 (as torch's
/// CPU attention kernel accumulates) and returns its dtype: candle's half-precision products of
/// these shapes ran several times slower than f32 ones, and the softmax is f32 either way.
fn attention_at_once(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    if q.device().is_cpu() && dtype != DType::F32 {
        return attention_at_once(&to_f32(q)?, &to_f32(k)?, &to_f32(v)?, bias)?.to_dtype(dtype);
    }
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // gemm reads the transposed keys in place; only a non-contiguous `k` (CLIP's head split) is
    // copied, not the whole key cache of every decoding step.
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    attention_probs(&scores, bias)?.matmul(&v.contiguous()?)
}

/// Softmax over the last axis of scaled attention scores plus an optional additive `bias`,
/// computed in f32 whatever the compute dtype (as transformers' eager attention) and returned in
/// the scores' dtype. Without a gradient to carry (answering), candle's fused softmax runs: a
/// parallel pass per row, 3× the composed one on CLIP-L's 16 × 577² scores.
pub fn attention_probs(scores: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dtype = scores.dtype();
    let mut scores = scores.to_dtype(DType::F32)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else if scores.device().is_cpu() && scores.is_contiguous() {
        scores.apply_op1_no_bwd(&SoftmaxRows)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs.to_dtype(dtype)
}

/// Softmax over the last axis of a contiguous f32 CPU tensor, rows in parallel, with [`exp`]:
/// candle's fused softmax calls libm's `expf` value by value, a tenth of a bf16 LLaVA prompt
/// (CLIP-L's attention alone takes 122 M of them).
struct SoftmaxRows;

impl candle_core::CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "bella-softmax-rows"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (Some((start, end)), candle_core::CpuStorage::F32(v)) = (l.contiguous_offsets(), s)
        else {
            candle_core::bail!("softmax: a contiguous f32 tensor expected");
        };
        let width = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = v[start..end].to_vec();
        out.par_chunks_mut(width).for_each(softmax_row);
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The largest value of `row` (−∞ for an empty row; NaNs are passed over), in 8 lanes.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `row ← softmax(row)` in place, in 8 lanes so that the passes vectorise.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row_max(row);
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, x) in sums.iter_mut().zip(c) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    let scale = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= scale);
}

/// `ln Σ eˣ` over `row`, in 8 lanes with the vectorisable `exp` below (−∞ for an empty row):
/// the normaliser of a log-softmax, e.g. of one decoding step's logits over the vocabulary.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row_max(row);
    if !max.is_finite() {
        return max;
    }
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += exp(x - max);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&x| exp(x - max)).sum();
    max + (sums.iter().sum::<f32>() + rest).ln()
}

/// `eˣ` in f32 without a libm call, so that loops over it vectorise: `2ⁿ·eʳ` with
/// `n = round(x / ln 2)`, `r = x − n·ln 2` in two parts, and `eʳ` by Cephes' `expf` polynomial
/// (within 2 units in the last place of `f32::exp`); 0 below −87 (where `eˣ` < 2⁻¹²⁵, below
/// anything a softmax keeps), and `x` capped at 88.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5·2²³ rounds to an integer (round half to even) in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // (Not `min`: a NaN stays NaN.)
    let v = if x > 88.0 { 88.0 } else { x };
    let t = v * LOG2E + ROUND;
    let n = t - ROUND;
    // ln 2 = 355/512 (exact in f32) − 2.121_944_4e-4.
    let r = v - n * (355.0 / 512.0) + n * 2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e_r = p * z + r + 1.0;
    // 2ⁿ from the rounded integer's bits: n + 127 in the exponent field.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let two_n = f32::from_bits(((n_bits + 127).max(0) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_within_two_ulps_of_libm() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {got}, libm {want}: {ulps} ulps");
            x += 0.001_37;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(MASKED), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn log_sum_exp_equals_candles_log_softmax_normaliser() -> Result<()> {
        for width in [1, 5, 8, 32_064] {
            let row = Tensor::randn(0f32, 8.0, width, &Device::Cpu)?;
            let values = row.to_vec1::<f32>()?;
            // log_softmax(x)_i = x_i − lse(x).
            let want = (&row - candle_nn::ops::log_softmax(&row, D::Minus1)?)?.to_vec1::<f32>()?[0];
            let got = log_sum_exp(&values);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY, 0.0]), 0.0);
        assert!(log_sum_exp(&[1.0, f32::NAN]).is_nan());
        Ok(())
    }

    #[test]
    fn softmax_rows_equal_candles_softmax() -> Result<()> {
        let dev = Device::Cpu;
        // Rows of 1, 7 (under one block of lanes), 77 and 601 values, scores up to ±30, and a
        // row half masked as attention masks them.
        for width in [1, 7, 77, 601] {
            let scores = Tensor::randn(0f32, 10.0, (3, 5, width), &dev)?;
            let mut bias = vec![0f32; 5 * width];
            bias[width * 2..width * 2 + width / 2].fill(MASKED);
            let bias = Tensor::from_vec(bias, (1, 5, width), &dev)?;
            let got = attention_probs(&scores, Some(&bias))?;
            let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "width {width}: differs by {diff}");
            let sums = got.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        }
        Ok(())
    }

    #[test]
    fn a_bf16_sum_is_the_rounded_f32_sum() -> Result<()> {
        let dev = Device::Cpu;
        let f32s = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
        let (a, b, bias) = (f32s(&[7, 33])?, f32s(&[7, 33])?, f32s(&[33])?);
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let bits = |t: Tensor| -> Result<Vec<u16>> {
            Ok(t.flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        // Answering (the parallel pass) and training (a tracked `a`: through f32 tensors).
        let tracked = candle_core::Var::from_tensor(&bf(&a)?)?;
        for a_bf in [bf(&a)?, tracked.as_tensor().clone()] {
            // Same shapes and a broadcast bias: bit for bit what candle's own bf16 sum gives.
            assert_eq!(bits(add(&a_bf, &bf(&b)?)?)?, bits((bf(&a)? + bf(&b)?)?)?);
            let candle = bf(&a)?.broadcast_add(&bf(&bias)?)?;
            assert_eq!(bits(add(&a_bf, &bf(&bias)?)?)?, bits(candle)?);
            let row = bias.unsqueeze(0)?; // [1, 33]: leading ones are a broadcast too
            assert_eq!(bits(add(&a_bf, &row)?)?, bits(add(&a_bf, &bias)?)?);
            // An f32 term is added before rounding, not rounded first.
            let once = (bf(&a)?.to_dtype(DType::F32)? + &b)?.to_dtype(DType::BF16)?;
            let sum = add(&a_bf, &b)?;
            assert_eq!(sum.dtype(), DType::BF16);
            assert_eq!(bits(sum)?, bits(once)?);
        }
        // `a` smaller than `b` (a forked layer's shared product plus P particles' terms).
        let p = f32s(&[3, 7, 33])?;
        let sum = add(&bf(&a)?, &p)?;
        assert_eq!(sum.dims(), &[3, 7, 33]);
        let once = (bf(&a)?.to_dtype(DType::F32)?.broadcast_add(&p))?.to_dtype(DType::BF16)?;
        assert_eq!(bits(sum)?, bits(once)?);
        // Other dtypes: candle's sum in `a`'s dtype.
        let f16 = |t: &Tensor| t.to_dtype(DType::F16);
        let want = (f16(&a)? + f16(&b)?)?.to_dtype(DType::F32)?;
        let got = add(&f16(&a)?, &b)?;
        assert_eq!(got.dtype(), DType::F16);
        let diff = (got.to_dtype(DType::F32)? - want)?.abs()?.max_all()?;
        assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn widening_equals_candles_conversion() -> Result<()> {
        let dev = Device::Cpu;
        // Over one parallel chunk, and a view that starts inside its storage.
        let t = Tensor::randn(0f32, 3.0, (5, 40_000), &dev)?;
        for dtype in [DType::BF16, DType::F16] {
            let h = t.to_dtype(dtype)?;
            for view in [h.clone(), h.narrow(0, 2, 3)?] {
                let (got, want) = (to_f32(&view)?, view.to_dtype(DType::F32)?);
                assert_eq!(got.dims(), want.dims());
                assert_eq!(
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?
                );
            }
        }
        Ok(())
    }

    #[test]
    fn long_attention_in_chunks_equals_it_in_one_go() -> Result<()> {
        let dev = Device::Cpu;
        // 2 rows × 8 heads of 600 × 600 scores: over the limit, chunks of 5 and 3 heads per row.
        let (rows, heads, len, d) = (2, 8, 600, 4);
        assert!(rows * heads * len * len > SCORES_AT_ONCE);
        let q = Tensor::randn(0f32, 1.0, (rows, heads, len, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (rows, heads, len, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (rows, heads, len, d), &dev)?;
        // Per-row causal masks with padding in the second row, and one bias for every row.
        let keep = vec![vec![true; len], (0..len).map(|j| j >= 7).collect()];
        let per_row = attention_bias(&keep, len, true, &dev)?;
        let shared = per_row.narrow(0, 0, 1)?;
        for bias in [None, Some(&per_row), Some(&shared)] {
            let chunked = attention(&q, &k, &v, bias)?;
            let whole = attention_at_once(&q, &k, &v, bias)?;
            assert_eq!(chunked.dims(), whole.dims());
            let diff = (chunked - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
        }
        Ok(())
    }
}
