//! `x·Wᵀ` for a handful of rows on the CPU: the base product of a decoding step, where every
//! particle contributes one row (P ≤ 8).
//!
//! A decoding step with few rows is bound by reading the weights from memory. Candle's gemm is
//! built for large products: with 8 rows it reached about a quarter of the CPU's arithmetic peak
//! in a decoding step of the medium model of `benches/ask_latency.rs`, so decoding 8 particles
//! cost 2–2.5× decoding one (`eval/LATENCY.md`). This kernel reads each row of `W` once and
//! multiplies it with every row of `x` while it is in registers (AVX2 + FMA, 8 lanes, one
//! accumulator per row of `x`; software prefetch of `W` from 4 rows on). It runs when the CPU
//! has AVX2, FMA and F16C (checked at run time) and the tensors are contiguous on the CPU;
//! otherwise [`matmul`] returns `None` and the caller uses candle.
//!
//! Half-precision weights (`f16`, `bf16`) are widened to f32 lane by lane as they are read (F16C
//! for f16, a shift for bf16): the product accumulates in f32 and reads half the bytes. Candle's
//! own half-precision products with a few rows were 1.1–6× slower than f32 ones on this machine
//! (bf16 at one row: 6×), so this path matters most for a half-precision model.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

/// At most this many rows take the kernel.
pub const MAX_ROWS: usize = 8;

/// `x Wᵀ` for `x` `[n, in]` and `W` `[out, in]`, with the kernel when it applies (`n ≤ MAX_ROWS`,
/// contiguous on the CPU, `x` in W's dtype, `W` in f32, f16 or bf16, AVX2 + FMA + F16C), else
/// `None`. The result has x's dtype.
pub fn matmul(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    let n = x.dim(0)?;
    let dtype_ok = x.dtype() == weight.dtype()
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16);
    let usable = (1..=MAX_ROWS).contains(&n)
        && kernel_available()
        && matches!(x.device(), Device::Cpu)
        && dtype_ok
        && x.rank() == 2
        && weight.rank() == 2
        && x.dim(1)? == weight.dim(1)?
        && x.is_contiguous()
        && weight.is_contiguous();
    if !usable {
        return Ok(None);
    }
    let dtype = x.dtype();
    x.to_dtype(DType::F32)?
        .apply_op2(weight, FewRowsMatmul)?
        .to_dtype(dtype)
        .map(Some)
}

fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The custom op: forward with the kernel; the gradient flows to `x` only (`W` is frozen).
struct FewRowsMatmul;

impl CustomOp2 for FewRowsMatmul {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s1 else {
            candle_core::bail!("few-rows-matmul: f32 activations expected");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("few-rows-matmul: contiguous tensors expected");
        };
        let (n, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 || n == 0 || n > MAX_ROWS {
            candle_core::bail!("few-rows-matmul: [{n}, {k}] times [{out}, {k2}]ᵀ");
        }
        let x = &x[x0..x1];
        let y = match s2 {
            CpuStorage::F32(w) => rows_times_weight(x, n, &w[w0..w1], out, k),
            CpuStorage::F16(w) => rows_times_weight(x, n, &w[w0..w1], out, k),
            CpuStorage::BF16(w) => rows_times_weight(x, n, &w[w0..w1], out, k),
            _ => candle_core::bail!("few-rows-matmul: f32, f16 or bf16 weights expected"),
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&weight.to_dtype(grad.dtype())?)?), None))
    }
}

/// Output features per parallel task.
const BLOCK: usize = 32;

/// Weights smaller than this (floats; 256 KiB) are multiplied on the calling thread: waking the
/// thread pool costs more than the product (the tiny test LLaVA decoded 2× slower in parallel).
const PARALLEL_MIN: usize = 1 << 16;

/// `y [n, out] = x [n, k] · w [out, k]ᵀ`, parallel over blocks of output features.
fn rows_times_weight<W: Lanes>(x: &[f32], n: usize, w: &[W], out: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Computed feature-major ([out, n]: each task writes one contiguous chunk), then transposed.
    let mut yt = vec![0f32; out * n];
    let task = |(block, chunk): (usize, &mut [f32])| {
        let first = block * BLOCK;
        let rows = chunk.len() / n;
        let w_block = &w[first * k..(first + rows) * k];
        block_product(x, n, w_block, k, chunk);
    };
    if w.len() < PARALLEL_MIN {
        yt.chunks_mut(BLOCK * n).enumerate().for_each(task);
    } else {
        yt.par_chunks_mut(BLOCK * n).enumerate().for_each(task);
    }
    let mut y = vec![0f32; n * out];
    for (j, col) in yt.chunks_exact(n).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * out + j] = *v;
        }
    }
    y
}

/// One block: `dst[j·n + r] = w[j] · x[r]` for the block's rows `j` of `w`.
fn block_product<W: Lanes>(x: &[f32], n: usize, w: &[W], k: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($($rows:literal)*) => {
                match n {
                    // SAFETY: `matmul` only builds the op after checking AVX2, FMA and F16C at
                    // run time.
                    $($rows => unsafe { avx2::block::<$rows, W>(x, w, k, dst) },)*
                    _ => unreachable!("few-rows-matmul takes 1..={MAX_ROWS} rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, n, w, k, dst);
        unreachable!("few-rows-matmul is only built on x86-64");
    }
}

/// A weight element type the kernel reads: 8 lanes at a time widened to f32, or one value.
pub trait Lanes: Copy + Send + Sync {
    /// # Safety
    /// `p` points at 8 readable values; the CPU supports AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    fn to_f32(self) -> f32;
}

impl Lanes for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Lanes for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

impl Lanes for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen each 16-bit lane to 32 bits and shift it up.
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// With 4 or more rows the arithmetic per weight is high enough that the hardware prefetcher
    /// alone no longer keeps the weight stream flowing from memory: the kernel then prefetches
    /// the weights this many floats (8 KiB) ahead into L2. Measured on the products of one
    /// decoding step of the medium LLaVA of `benches/ask_latency.rs` (2 cores, 8 rows): no
    /// prefetch 21 ms, into L1 4 KiB ahead 17 ms, into L2 8 KiB ahead 13 ms; 1 row: 7 ms with
    /// or without.
    const PREFETCH_AHEAD: usize = 2048;

    /// `dst[j·N + r] = w[j] · x[r]`; `x` is `[N, k]`, `w` `[rows, k]`. Each row of `w` is
    /// loaded once and multiplied with all N rows of `x`, one 8-lane accumulator per row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x.len() == N·k`, `w.len() % k == 0`,
    /// `dst.len() == w.len() / k · N`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block<const N: usize, W: Lanes>(x: &[f32], w: &[W], k: usize, dst: &mut [f32]) {
        debug_assert_eq!(x.len(), N * k);
        let lanes = k / 8 * 8;
        let end = w.as_ptr_range().end;
        for (wrow, d) in w.chunks_exact(k).zip(dst.chunks_exact_mut(N)) {
            let mut acc = [_mm256_setzero_ps(); N];
            let mut c = 0;
            while c < lanes {
                if N >= 4 && c % 16 == 0 {
                    // once per 64-byte line; a prefetch never faults, but stay inside `w`
                    let ahead = wrow.as_ptr().wrapping_add(c + PREFETCH_AHEAD);
                    if ahead < end {
                        _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
                    }
                }
                // c + 8 <= lanes <= k: every load is inside its row.
                let wv = W::load8(wrow.as_ptr().add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(r * k + c));
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
                c += 8;
            }
            for (r, a) in acc.iter().enumerate() {
                let mut s = hsum(*a);
                for i in lanes..k {
                    s += x[r * k + i] * wrow[i].to_f32();
                }
                d[r] = s;
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_candle_matmul_for_every_row_count_and_odd_widths() -> Result<()> {
        if !kernel_available() {
            return Ok(()); // nothing to compare: `matmul` returns None (checked below)
        }
        let dev = Device::Cpu;
        for (n, k, out) in [
            (1, 8, 3),
            (3, 37, 70),
            (8, 768, 65),
            (5, 3, 33),
            (8, 130, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?;
            let want = x.matmul(&w.t()?)?;
            let got = matmul(&x, &w)?.expect("the kernel applies");
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4 * (k as f32).sqrt(),
                "n={n} k={k} out={out}: {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn half_precision_weights_equal_candle_on_the_widened_weights() -> Result<()> {
        if !kernel_available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for dtype in [DType::F16, DType::BF16] {
            for (n, k, out) in [(1, 8, 3), (4, 37, 70), (8, 264, 65)] {
                let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?.to_dtype(dtype)?;
                // The exact product of the half-precision values, in f32.
                let want = x
                    .to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(DType::F32)?.t()?)?;
                let got = matmul(&x, &w)?.expect("the kernel applies");
                assert_eq!(got.dtype(), dtype);
                let diff = (got.to_dtype(DType::F32)? - &want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                // only the final rounding to the half dtype differs
                let step = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
                assert!(
                    diff <= step * scale,
                    "{dtype:?} n={n} k={k}: {diff} (scale {scale})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_does_not_handle() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let many = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 6), &dev)?;
        assert!(matmul(&many, &w)?.is_none());
        let f64x = Tensor::randn(0f64, 1.0, (2, 6), &dev)?;
        assert!(matmul(&f64x, &w.to_dtype(DType::F64)?)?.is_none());
        let mixed = Tensor::randn(0f32, 1.0, (2, 6), &dev)?;
        assert!(matmul(&mixed, &w.to_dtype(DType::F16)?)?.is_none());
        let strided = Tensor::randn(0f32, 1.0, (6, 2), &dev)?.t()?;
        assert!(matmul(&strided, &w)?.is_none());
        let x = Tensor::randn(0f32, 1.0, (2, 6), &dev)?;
        assert_eq!(matmul(&x, &w)?.is_some(), kernel_available());
        Ok(())
    }

    #[test]
    fn the_gradient_reaches_x() -> Result<()> {
        if !kernel_available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (3, 16), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5, 16), &dev)?;
        let y = matmul(x.as_tensor(), &w)?.expect("the kernel applies");
        let grads = y.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        let want = w.sum(0)?.unsqueeze(0)?.broadcast_as((3, 16))?;
        let diff = (gx - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
