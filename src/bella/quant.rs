//! A frozen base weight held quantized (GGML blocks: q8_0, q4k), with a backward pass.
//!
//! candle's `QMatMul` multiplies through `apply_op1_no_bwd`: no gradient reaches the input, so
//! particles below a quantized layer would never learn. [`QuantizedWeight`] is the same product
//! as a custom op whose backward returns `∂L/∂x = ∂L/∂y · W`, with `W` dequantized for that one
//! call and dropped: a dense copy of the weight never stays in memory.
//!
//! The product quantizes the activations too (to q8_0 blocks for a q8_0 weight,
//! q8k for k-quants: GGML multiplies integer blocks), so the backward is the gradient of
//! `x · dequant(W)ᵀ`, the straight-through estimate for the activation rounding; the tests bound
//! the difference.
//!
//! On the CPU, candle's own `QTensor` forward repacks an x86 weight on first use into expanded
//! tiles (q4k always, q8_0 with AVX512-VNNI) and keeps them next to the compact blocks for good:
//! for a 7B q4k model that is ~5 GB on top of a 3.6 GB base, which defeats the point of
//! quantizing. So a few rows (decoding) multiply the compact blocks directly
//! (`k_quants::matmul`, GGML's row-by-block loop), and many rows go through candle's tiles made
//! from a throw-away copy of one weight ([`REPACK_FROM_ROWS`]).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::k_quants::{self, BlockQ4K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// From this many rows on (a prompt, candidate scoring, training), the CPU product hands a
/// throw-away copy of the blocks to candle's kernel, which repacks it into its fast tiles for
/// this call only; fewer rows (decoding) multiply the compact blocks directly.
/// `benches/quant_product.rs` measures where the copy starts to pay.
pub const REPACK_FROM_ROWS: usize = 64;

/// A quantized `[out, in]` weight; cloning shares the blocks.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    q: Arc<QTensor>,
    repack_from_rows: usize,
}

impl QuantizedWeight {
    /// Wraps a 2-D quantized tensor `[out, in]`.
    pub fn new(q: Arc<QTensor>) -> Result<Self> {
        q.shape().dims2()?;
        Ok(Self {
            q,
            repack_from_rows: REPACK_FROM_ROWS,
        })
    }

    /// The same weight with another row count from which the CPU product uses candle's tiles
    /// (`usize::MAX`: never; 1: always) — for measuring both paths.
    pub fn with_repack_from_rows(mut self, rows: usize) -> Self {
        self.repack_from_rows = rows;
        self
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    pub fn device(&self) -> candle_core::Device {
        self.q.device()
    }

    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.q
    }

    /// The weight as a dense f32 tensor (a fresh copy).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.q.dequantize(&self.q.device())
    }

    /// `x Wᵀ` for `x` `[…, in]` (f32, f16 or bf16), differentiable in `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The quantized kernels take f32 activations; a half-precision model converts around them.
        let dtype = x.dtype();
        let y = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(self.clone())?;
        y.to_dtype(dtype)
    }
}

impl CustomOp1 for QuantizedWeight {
    fn name(&self) -> &'static str {
        "bella-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.shape();
        let CpuStorage::F32(x) = storage else {
            bail!(
                "the quantized product takes f32 activations, got {:?}",
                storage.dtype()
            );
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("the quantized product takes contiguous activations");
        };
        let x = &x[start..end];
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&k) {
            bail!("activations {dims:?} do not end in the weight's input size {k}");
        }
        let m = x.len() / k;
        let data = self.q.data()?;
        if m >= self.repack_from_rows {
            // The copy and its tiles (~2.3× one weight's blocks) are dropped after the call.
            let copy = qtensor_from_ggml(self.q.dtype(), &data, vec![n, k], &Device::Cpu)?;
            return copy.cpu_fwd(storage, layout);
        }
        *dims.last_mut().expect("checked above") = n;
        let mut y = vec![0f32; m * n];
        match self.q.dtype() {
            GgmlDType::Q4K => k_quants::matmul((m, k, n), x, blocks::<BlockQ4K>(&data)?, &mut y)?,
            GgmlDType::Q8_0 => k_quants::matmul((m, k, n), x, blocks::<BlockQ8_0>(&data)?, &mut y)?,
            other => bail!("no quantized product for {other:?}"),
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.q.as_ref().cuda_fwd(storage, layout)
    }

    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.q.as_ref().metal_fwd(storage, layout)
    }

    /// `∂L/∂x = ∂L/∂y · W`, `W` dequantized for this call only.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (out, inp) = self.shape();
        let rows = grad_res.elem_count() / out;
        let w = self.q.dequantize(grad_res.device())?;
        let w = if grad_res.dtype() == DType::F32 {
            w
        } else {
            w.to_dtype(grad_res.dtype())?
        };
        let grad = grad_res.reshape((rows, out))?.matmul(&w)?;
        debug_assert_eq!(rows * inp, arg.elem_count());
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

/// The compact GGML blocks of a CPU `QTensor`, seen as `T` (no copy).
fn blocks<T: GgmlType>(data: &[u8]) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !data.len().is_multiple_of(size)
        || data.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        bail!("quantized storage is not a whole number of aligned {size}-byte blocks");
    }
    // SAFETY: the bytes are a CPU `QTensor`'s storage, which candle allocates as a `Vec<T>` of
    // these plain-old-data blocks (every bit pattern is valid); length and alignment are checked
    // above, and the slice borrows `data`, so it cannot outlive the tensor.
    Ok(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), data.len() / size) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn quantized(out: usize, inp: usize, dtype: GgmlDType) -> QuantizedWeight {
        let w = random(&[out, inp], 7);
        QuantizedWeight::new(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap()
    }

    /// max |a − b| / max |b|.
    fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// The cases: a small layer per quantization, 2-D and batch × seq 3-D inputs.
    fn cases() -> Vec<(GgmlDType, usize, usize, Vec<usize>)> {
        vec![
            (GgmlDType::Q8_0, 24, 64, vec![5, 64]),
            (GgmlDType::Q8_0, 40, 96, vec![2, 3, 96]),
            (GgmlDType::Q8_0, 8, 32, vec![1, 32]),
            (GgmlDType::Q4K, 16, 256, vec![3, 256]),
            (GgmlDType::Q4K, 12, 512, vec![2, 4, 512]),
            // Enough rows for candle's tiles (`REPACK_FROM_ROWS`).
            (GgmlDType::Q4K, 16, 256, vec![2, 40, 256]),
            (GgmlDType::Q8_0, 32, 64, vec![REPACK_FROM_ROWS, 64]),
        ]
    }

    #[test]
    fn the_forward_is_the_product_with_the_dequantized_weight() {
        for (dtype, out, inp, xs) in cases() {
            let q = quantized(out, inp, dtype);
            let x = random(&xs, 1);
            let y = q.forward(&x).unwrap();
            let mut want_dims = xs.clone();
            *want_dims.last_mut().unwrap() = out;
            assert_eq!(y.dims(), want_dims.as_slice());
            let dense = x
                .broadcast_matmul(&q.dequantize().unwrap().t().unwrap())
                .unwrap();
            // Only the activations' 8-bit rounding separates the two.
            let rel = relative_error(&y, &dense);
            assert!(rel < 2e-2, "{dtype:?} {xs:?}: relative error {rel}");
        }
    }

    /// The compact-block product and candle's own `QTensor` forward (repacked tiles on x86 where
    /// the CPU has them) quantize the activations alike and differ only in summation order.
    #[test]
    fn the_compact_product_agrees_with_candles_kernel() {
        for (dtype, out, inp, xs) in cases() {
            let q = quantized(out, inp, dtype);
            let x = random(&xs, 11);
            let theirs = x.apply_op1_no_bwd(q.qtensor().as_ref()).unwrap();
            // Whichever path the row count picks, and the compact blocks for every row count.
            for ours in [q.clone(), q.clone().with_repack_from_rows(usize::MAX)] {
                let rel = relative_error(&x.apply_op1_no_bwd(&ours).unwrap(), &theirs);
                assert!(rel < 1e-4, "{dtype:?} {xs:?}: relative difference {rel}");
            }
        }
    }

    #[test]
    fn the_input_gradient_is_the_dense_gradient_of_the_dequantized_weight() {
        for (dtype, out, inp, xs) in cases() {
            let q = quantized(out, inp, dtype);
            let mut ys = xs.clone();
            *ys.last_mut().unwrap() = out;
            let r = random(&ys, 3);
            let x = Var::from_tensor(&random(&xs, 2)).unwrap();
            let grads = (q.forward(x.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got = grads.get(x.as_tensor()).expect("a gradient for x");
            let w = Var::from_tensor(&q.dequantize().unwrap()).unwrap();
            let dense = x
                .as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap();
            let dgrads = (dense * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let want = dgrads.get(x.as_tensor()).unwrap();
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(err.to_scalar::<f32>().unwrap() < 1e-5, "{dtype:?} {xs:?}");
        }
    }

    /// Central differences of `f(x) = Σ y·R` along random directions. The quantized forward
    /// rounds the activations, so its difference quotient may differ from the gradient by at
    /// most the rounding error of the two evaluations over the step; the dequantized product is
    /// linear and must match to float precision.
    #[test]
    fn the_input_gradient_matches_finite_differences() {
        for (dtype, out, inp, xs) in cases() {
            let q = quantized(out, inp, dtype);
            let w = q.dequantize().unwrap();
            let mut ys = xs.clone();
            *ys.last_mut().unwrap() = out;
            let r = random(&ys, 5);
            let x = Var::from_tensor(&random(&xs, 4)).unwrap();
            let grads = (q.forward(x.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(x.as_tensor()).unwrap().clone();
            let fq = |x: &Tensor| dot(&q.forward(x).unwrap(), &r);
            let fd = |x: &Tensor| dot(&x.broadcast_matmul(&w.t().unwrap()).unwrap(), &r);
            // The dequantized product is linear, so a large step costs nothing there and shrinks
            // the share of the activation rounding in the quantized quotient.
            let h = 1.0;
            for seed in 0..4 {
                let v = random(&xs, 100 + seed);
                let plus = (x.as_tensor() + (&v * h).unwrap()).unwrap();
                let minus = (x.as_tensor() - (&v * h).unwrap()).unwrap();
                let analytic = dot(&g, &v);
                let dense_fd = (fd(&plus) - fd(&minus)) / (2.0 * h);
                assert!(
                    (dense_fd - analytic).abs() <= 1e-4 * (1.0 + analytic.abs()),
                    "{dtype:?} {xs:?}: dequantized FD {dense_fd} vs gradient {analytic}"
                );
                let rounding = (fq(&plus) - fd(&plus)).abs() + (fq(&minus) - fd(&minus)).abs();
                let quant_fd = (fq(&plus) - fq(&minus)) / (2.0 * h);
                let bound = rounding / (2.0 * h) + 1e-4 * (1.0 + analytic.abs());
                assert!(
                    (quant_fd - analytic).abs() <= bound,
                    "{dtype:?} {xs:?}: quantized FD {quant_fd} vs gradient {analytic} (bound {bound})"
                );
                assert!(
                    (quant_fd - analytic).abs() <= 0.1 * (1.0 + analytic.abs()),
                    "{dtype:?} {xs:?}: quantized FD {quant_fd} vs gradient {analytic}"
                );
            }
        }
    }
}
