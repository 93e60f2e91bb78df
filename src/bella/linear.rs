//! The particle-capable linear layer (design §2).
//!
//! ```text
//! W : [out, in]        frozen, shared by all particles
//! A : [P, r, in]       trainable
//! B : [P, out, r]      trainable
//! y_p = x_p Wᵀ + bias + (α/r) · (x_p A_pᵀ) B_pᵀ
//! ```
//!
//! Activations carry the particle axis folded into the batch, particle-major: row `p·batch + i` is
//! example `i` under particle `p`. The base product is one matmul for all particles, the low-rank
//! part one batched matmul.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor,
};

use super::quant::QuantizedWeight;
use crate::models::nn::add;

/// The low-rank factors of P particles on one linear layer.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// `[P, r, in]`
    pub a: Tensor,
    /// `[P, out, r]`
    pub b: Tensor,
    /// `α / r`
    pub scale: f64,
}

impl Adapter {
    /// Checks the factor shapes against the layer and each other.
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        let (p, r, _) = a.dims3()?;
        let (pb, _, rb) = b.dims3()?;
        if p != pb || r != rb {
            candle_core::bail!(
                "adapter factors disagree: A is {:?}, B is {:?} (expected [P, r, in] and [P, out, r])",
                a.dims(),
                b.dims()
            );
        }
        Ok(Self { a, b, scale })
    }

    pub fn particles(&self) -> usize {
        self.a.dims()[0]
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// `scale · Bᵀ` `[P, r, out]`: the scale applied to the small factor, not to the
    /// `[P, rows, out]` product.
    fn scaled_b_t(&self) -> Result<Tensor> {
        (&self.b * self.scale)?.transpose(1, 2)
    }

    /// ΔW_p = scale · B_p A_p, `[out, in]`.
    pub fn delta(&self, p: usize) -> Result<Tensor> {
        self.b.get(p)?.matmul(&self.a.get(p)?)? * self.scale
    }
}

/// The frozen base weight `[out, in]` of a linear layer: dense, or quantized blocks
/// (`--quantize`).
#[derive(Clone, Debug)]
pub enum Base {
    Dense(Tensor),
    Quantized(QuantizedWeight),
}

impl Base {
    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Base::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Base::Quantized(q) => q.shape(),
        }
    }

    /// `x Wᵀ` for `x` `[n, in]`, differentiable in `x` either way.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Base::Dense(w) if x.track_op() => x.contiguous()?.apply_op1(FrozenProduct(w.clone())),
            Base::Dense(w) => base_product(x, w),
            Base::Quantized(q) => q.forward(x),
        }
    }
}

/// `x Wᵀ` for training, differentiable in `x` only. candle's matmul backward also computes the
/// gradient of the frozen weight — a product as costly as the forward and a weight-sized tensor
/// kept to the end of the backward pass, per layer and step — which nothing reads. The forward is
/// the plain product on whichever device holds the activations (CPU or GPU).
struct FrozenProduct(Tensor);

impl FrozenProduct {
    /// The product of the activations held in `storage` (contiguous, as laid out by `layout`),
    /// computed as untracked tensors, as a storage of its own.
    fn forward(&self, storage: Storage, layout: &Layout) -> Result<(Storage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the frozen product takes contiguous activations");
        };
        let x = Tensor::from_storage(storage, end, BackpropOp::none(), false)
            .narrow(0, start, end - start)?
            .reshape(layout.shape())?;
        let y = base_product(&x, &self.0)?.contiguous()?;
        let (y_storage, y_layout) = y.storage_and_layout();
        if y_layout.start_offset() != 0 {
            candle_core::bail!("the frozen product did not come out as one block");
        }
        Ok((y_storage.try_clone(y_layout)?, y.shape().clone()))
    }
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "bella-frozen-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.forward(Storage::Cpu(storage.clone()), layout)? {
            (Storage::Cpu(y), shape) => Ok((y, shape)),
            _ => candle_core::bail!("the frozen product left the CPU"),
        }
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.forward(Storage::Cuda(storage.try_clone(layout)?), layout)? {
            (Storage::Cuda(y), shape) => Ok((y, shape)),
            _ => candle_core::bail!("the frozen product left the GPU"),
        }
    }

    /// `∂L/∂x = ∂L/∂y · W`; no gradient for `W`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.0)?.reshape(arg.shape())?))
    }
}

/// A linear layer with a frozen base weight and optional particle factors.
#[derive(Clone, Debug)]
pub struct ParticleLinear {
    base: Base,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl ParticleLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_base(Base::Dense(weight), bias)
    }

    pub fn with_base(base: Base, bias: Option<Tensor>) -> Self {
        Self {
            base,
            bias,
            adapter: None,
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        self.base.shape()
    }

    pub fn base(&self) -> &Base {
        &self.base
    }

    /// The base weight as a dense tensor: the weight itself, or a fresh dequantized (f32) copy.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.base {
            Base::Dense(w) => Ok(w.clone()),
            Base::Quantized(q) => q.dequantize(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.base {
            Base::Dense(w) => w.device().clone(),
            Base::Quantized(q) => q.device(),
        }
    }

    /// The dtype of the base weight (f32 for a quantized one: its products come out in the
    /// activations' dtype, and particles on it stay f32).
    pub fn dtype(&self) -> DType {
        match &self.base {
            Base::Dense(w) => w.dtype(),
            Base::Quantized(_) => DType::F32,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Attaches (or with `None` removes) particle factors; shapes are checked against the layer.
    pub fn set_adapter(&mut self, adapter: Option<Adapter>) -> Result<()> {
        if let Some(ad) = &adapter {
            let (out, inp) = self.shape();
            if ad.a.dims()[2] != inp || ad.b.dims()[1] != out {
                candle_core::bail!(
                    "adapter A {:?} / B {:?} does not fit a linear layer [out {out}, in {inp}]",
                    ad.a.dims(),
                    ad.b.dims()
                );
            }
        }
        self.adapter = adapter;
        Ok(())
    }

    /// The frozen part of `x` `[rows, …, in]`: `x`'s dims, `x` as `[n, in]`, and `x Wᵀ + bias`
    /// `[n, out]`.
    fn frozen(&self, x: &Tensor) -> Result<(Vec<usize>, Tensor, Tensor)> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.shape().1))?;
        let y = self.base.product(&x2)?;
        let y = match &self.bias {
            Some(bias) => add(&y, bias)?,
            None => y,
        };
        Ok((dims, x2, y))
    }

    /// `x`: `[rows, …, in]`. With an adapter, `rows` must be `P · batch` (particle-major).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (dims, x2, mut y) = self.frozen(x)?;
        let (n, inp, out) = (x2.dim(0)?, x2.dim(1)?, y.dim(1)?);
        if let Some(ad) = &self.adapter {
            let p = ad.particles();
            let rows = dims[0];
            if rows % p != 0 {
                candle_core::bail!(
                    "activations with {rows} rows cannot carry {p} particles (rows must be P·batch)"
                );
            }
            // The factors stay in their own dtype (f32) over a half-precision base: the low-rank
            // product runs in f32 and is added to the base product before rounding (`add`).
            let xp = x2.reshape((p, n / p, inp))?.to_dtype(ad.a.dtype())?;
            let low = xp.matmul(&ad.a.transpose(1, 2)?)?; // [P, m, r]
            let delta = low.matmul(&ad.scaled_b_t()?)?; // [P, m, out]
            y = add(&y, &delta.reshape((n, out))?)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = out;
        y.reshape(out_dims)
    }

    /// `x` `[batch, …, in]` shared by all particles (the layer where the rows fork) →
    /// `[particles · batch, …, out]`, particle-major: equal to `forward(expand_particles(x))`,
    /// but the base product runs once for the batch instead of once per particle (only the
    /// low-rank part sees P copies).
    pub fn forward_forked(&self, x: &Tensor, particles: usize) -> Result<Tensor> {
        let (dims, x2, y) = self.frozen(x)?;
        let (n, out) = (x2.dim(0)?, y.dim(1)?);
        let y = match &self.adapter {
            Some(ad) => {
                if ad.particles() != particles {
                    candle_core::bail!(
                        "forking into {particles} particles a layer that carries {}",
                        ad.particles()
                    );
                }
                let xa = x2.to_dtype(ad.a.dtype())?;
                let low = xa.broadcast_matmul(&ad.a.transpose(1, 2)?)?; // [P, n, r]
                let delta = low.matmul(&ad.scaled_b_t()?)?; // [P, n, out]
                add(&y, &delta)?
            }
            None => y.unsqueeze(0)?.broadcast_as((particles, n, out))?,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[0] *= particles;
        out_dims[last] = out;
        y.contiguous()?.reshape(out_dims)
    }

    /// The plain layer of particle `p`: weight `W + (α/r)·B_p·A_p`, no adapter (dense: a
    /// quantized `W` is dequantized first).
    pub fn merged(&self, p: usize) -> Result<ParticleLinear> {
        let Some(ad) = &self.adapter else {
            return Ok(ParticleLinear::with_base(
                self.base.clone(),
                self.bias.clone(),
            ));
        };
        let weight = self.dense_weight()?;
        let weight = (&weight + ad.delta(p)?.to_dtype(weight.dtype())?)?;
        Ok(ParticleLinear::new(weight, self.bias.clone()))
    }
}

/// Up to this many rows, [`base_product`] multiplies as `(W·xᵀ)ᵀ`.
const FEW_ROWS: usize = 32;

/// `x Wᵀ` for `x` `[n, in]` and `W` `[out, in]`. A bf16 model on a CPU with AMX goes to
/// [`super::bf16_gemm`] for any number of rows; otherwise up to 8 rows (decoding P ≤ 8
/// particles) on a CPU with AVX2 go to [`super::few_rows`], which reads `W` once for all rows,
/// and more rows of a bf16 model on a CPU with AVX512-BF16 to [`super::bf16_gemm`] (candle
/// widens bf16 to f32 and ran at half speed). Otherwise, with a few
/// rows, candle's CPU gemm packs — copies with a strided gather — the whole of `W` on every call
/// for `x·Wᵀ`, which costs more than the product itself; `W·xᵀ` reads `W` in place and packs only
/// the small `x`, and transposing the `[out, n]` result back is cheap. One row takes gemm's
/// matrix-vector path either way; many rows amortise the packing and keep the usual order.
fn base_product(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::bf16_gemm::matmul(x, weight)? {
        return Ok(y);
    }
    if let Some(y) = super::few_rows::matmul(x, weight)? {
        return Ok(y);
    }
    let n = x.dim(0)?;
    if n > 1 && n <= FEW_ROWS {
        weight.matmul(&x.t()?)?.t()?.contiguous()
    } else {
        x.matmul(&weight.t()?)
    }
}

/// Folds the particle axis into the batch: `[batch, …]` shared by all particles becomes
/// `[P·batch, …]`, particle-major.
pub fn expand_particles(x: &Tensor, particles: usize) -> Result<Tensor> {
    if particles == 1 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    let mut target = vec![particles];
    target.extend_from_slice(&dims);
    let expanded = x.unsqueeze(0)?.broadcast_as(target)?.contiguous()?;
    dims[0] *= particles;
    expanded.reshape(dims)
}

/// A model whose linear layers can carry particles, addressed by their hub module path
/// (`language_model.model.layers.0.self_attn.q_proj`).
pub trait ParticleModel {
    /// Every particle-capable layer with its module path.
    fn linears(&self) -> Vec<(String, &ParticleLinear)>;
    fn linears_mut(&mut self) -> Vec<(String, &mut ParticleLinear)>;

    /// Layers that exist in the checkpoint but never touch an output (LLaVA's vision layers
    /// above `vision_feature_layer`, which the model does not run): particles there would never
    /// move, so [`super::attach`] leaves them out.
    fn inert_linears(&self) -> Vec<String> {
        Vec::new()
    }

    /// The number of particles the attached adapters carry (1 without adapters); all adapters
    /// must agree.
    fn particles(&self) -> Result<usize> {
        let mut found: Option<usize> = None;
        for (name, layer) in self.linears() {
            if let Some(ad) = layer.adapter() {
                match found {
                    None => found = Some(ad.particles()),
                    Some(p) if p != ad.particles() => candle_core::bail!(
                        "adapter on {name} has {} particles, others have {p}",
                        ad.particles()
                    ),
                    _ => {}
                }
            }
        }
        Ok(found.unwrap_or(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Through a frozen dense layer (`FrozenProduct` once the input is tracked) the input's
    /// gradient is the plain matmul's, with and without a bias, for few and many rows.
    #[test]
    fn the_frozen_product_passes_the_plain_gradient_to_its_input() -> Result<()> {
        let dev = Device::Cpu;
        for rows in [3, 40] {
            for (bias, offset) in [(false, 0), (true, 0), (true, 2)] {
                let w = Tensor::randn(0f32, 1.0, (8, 16), &dev)?;
                let b = bias
                    .then(|| Tensor::randn(0f32, 1.0, 8, &dev))
                    .transpose()?;
                let layer = ParticleLinear::new(w.clone(), b.clone());
                let r = Tensor::randn(0f32, 1.0, (rows, 8), &dev)?;
                // With an offset: rows of a larger tensor, as a slice of a batch is.
                let whole = Var::randn(0f32, 1.0, (rows + offset, 16), &dev)?;
                let x = whole.narrow(0, offset, rows)?;
                let y = layer.forward(&x)?;
                let ours = (&y * &r)?.sum_all()?.backward()?;
                let got = ours.get(whole.as_tensor()).expect("a gradient for x");
                // The frozen weight gets none.
                assert!(ours.get(&w).is_none());
                let mut plain = x.matmul(&w.t()?)?;
                if let Some(b) = &b {
                    plain = plain.broadcast_add(b)?;
                }
                let err = (&y - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "{rows} rows: forward differs by {err}");
                let grads = (&plain * &r)?.sum_all()?.backward()?;
                let want = grads.get(whole.as_tensor()).expect("a gradient for x");
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "{rows} rows: gradient differs by {err}");
            }
        }
        Ok(())
    }
}
