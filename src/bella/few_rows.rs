//! `x·Wᵀ` for a handful of rows on the CPU: the base product of a decoding step, where every
//! particle contributes one row (P ≤ 8).
//!
//! A decoding step with few rows is bound by reading the weights from memory. Candle's gemm is
//! built for large products: with 8 rows it reached about a quarter of the CPU's arithmetic peak
//! in a decoding step of the medium model of `benches/ask_latency.rs`, so decoding 8 particles
//! cost 2–2.5× decoding one (`eval/LATENCY.md`). This kernel reads each row of `W` once and
//! multiplies it with every row of `x` while it is in registers. Two instruction sets, picked at
//! run time ([`Isa::detect`]):
//!
//! - AVX-512 (`avx512f`): 16 lanes, tiles of 3–4 rows of `W` × every row of `x` in the 32
//!   vector registers;
//! - AVX2 + FMA + F16C: 8 lanes, tiles of 1–4 rows of `W` in the 16 vector registers.
//!
//! One kernel body serves both (`kernel::tiles`): a tile keeps its rows × every row of `x` in
//! accumulator registers, so each load of `x` feeds several products and even one row of `x` has
//! several independent chains of multiply-adds; each row of the tile is prefetched into L1. On the
//! 7B model's weights (`cargo bench --bench few_rows`, f16, two runs on a shared machine) the
//! AVX-512 tiles ran 8 rows at 120–217 GFLOP/s where the earlier AVX2 kernel, one row of `W` at a
//! time, ran 110–114, and one row at 28–45 GB/s where it read 17–21; the AVX2 tiles read 22–31
//! GB/s at one row (`eval/SCALE.md`).
//!
//! Otherwise (no AVX2, not contiguous, not on the CPU) [`matmul`] returns `None` and the caller
//! uses candle.
//!
//! Half-precision weights (`f16`, `bf16`) are widened to f32 lane by lane as they are read (F16C
//! for f16, a shift for bf16): the product accumulates in f32 and reads half the bytes. Candle's
//! own half-precision products with a few rows were 1.1–6× slower than f32 ones on this machine
//! (bf16 at one row: 6×), so this path matters most for a half-precision model.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};

/// At most this many rows take the kernel.
pub const MAX_ROWS: usize = 8;

/// The instruction set a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512 F (with AVX2 + FMA + F16C), 16 lanes.
    Avx512,
}

impl Isa {
    /// The best kernel this CPU runs, if any.
    pub fn detect() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") {
                Some(Isa::Avx512)
            } else if avx2 {
                Some(Isa::Avx2)
            } else {
                None
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// Whether this CPU runs this kernel.
    pub fn available(self) -> bool {
        match (self, Isa::detect()) {
            (_, None) => false,
            (Isa::Avx2, Some(_)) => true,
            (Isa::Avx512, Some(best)) => best == Isa::Avx512,
        }
    }
}

/// `x Wᵀ` for `x` `[n, in]` and `W` `[out, in]`, with the best kernel of this CPU when one
/// applies (`n ≤ MAX_ROWS`, contiguous on the CPU, `x` in W's dtype, `W` in f32, f16 or bf16),
/// else `None`. The result has x's dtype.
pub fn matmul(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    match Isa::detect() {
        Some(isa) => product(x, weight, isa),
        None => Ok(None),
    }
}

/// [`matmul`] with a chosen kernel (for tests and `benches/few_rows.rs`); `None` also when this
/// CPU lacks `isa`.
pub fn matmul_with(x: &Tensor, weight: &Tensor, isa: Isa) -> Result<Option<Tensor>> {
    if !isa.available() {
        return Ok(None);
    }
    product(x, weight, isa)
}

/// [`matmul_with`] for a kernel this CPU is known to run.
fn product(x: &Tensor, weight: &Tensor, isa: Isa) -> Result<Option<Tensor>> {
    let n = x.dim(0)?;
    let dtype_ok = x.dtype() == weight.dtype()
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16);
    let usable = (1..=MAX_ROWS).contains(&n)
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
        .apply_op2(weight, FewRowsMatmul(isa))?
        .to_dtype(dtype)
        .map(Some)
}

/// The custom op: forward with the kernel; the gradient flows to `x` only (`W` is frozen).
struct FewRowsMatmul(Isa);

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
        let isa = self.0;
        let y = match s2 {
            CpuStorage::F32(w) => rows_times_weight(isa, x, n, &w[w0..w1], out, k),
            CpuStorage::F16(w) => rows_times_weight(isa, x, n, &w[w0..w1], out, k),
            CpuStorage::BF16(w) => rows_times_weight(isa, x, n, &w[w0..w1], out, k),
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

/// Output features per parallel task (a multiple of every tile size, 1 to 4 rows).
const BLOCK: usize = 48;

/// Weights smaller than this (floats; 256 KiB) are multiplied on the calling thread: waking the
/// thread pool costs more than the product (the tiny test LLaVA decoded 2× slower in parallel).
const PARALLEL_MIN: usize = 1 << 16;

/// `y [n, out] = x [n, k] · w [out, k]ᵀ`, parallel over blocks of output features.
fn rows_times_weight<W: Lanes>(
    isa: Isa,
    x: &[f32],
    n: usize,
    w: &[W],
    out: usize,
    k: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    // Computed feature-major ([out, n]: each task writes one contiguous chunk), then transposed.
    let mut yt = vec![0f32; out * n];
    let task = |(block, chunk): (usize, &mut [f32])| {
        let first = block * BLOCK;
        let rows = chunk.len() / n;
        let w_block = &w[first * k..(first + rows) * k];
        block_product(isa, x, n, w_block, k, chunk);
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
fn block_product<W: Lanes>(isa: Isa, x: &[f32], n: usize, w: &[W], k: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the op is only built for a kernel the CPU has, checked at run time
        // ([`matmul`] through `Isa::detect`, [`matmul_with`] through `Isa::available`).
        macro_rules! dispatch {
            ($($rows:literal: $avx2:literal $avx512:literal)*) => {
                match (isa, n) {
                    $((Isa::Avx2, $rows) => unsafe {
                        kernel::avx2::<$rows, $avx2, W>(x, w, k, dst)
                    },)*
                    $((Isa::Avx512, $rows) => unsafe {
                        kernel::avx512::<$rows, $avx512, W>(x, w, k, dst)
                    },)*
                    _ => unreachable!("few-rows-matmul takes 1..={MAX_ROWS} rows"),
                }
            };
        }
        // rows of x: rows of W per tile with AVX2, with AVX-512 — as many as keep the
        // accumulators (rows × tile), the tile's weights and one row of x within the 16 (AVX2)
        // or 32 (AVX-512) vector registers.
        dispatch!(1: 4 4  2: 4 4  3: 3 4  4: 3 4  5: 2 4  6: 2 4  7: 1 3  8: 1 3);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, x, n, w, k, dst);
        unreachable!("few-rows-matmul is only built on x86-64");
    }
}

/// A weight element type the kernels read: 8 or 16 lanes at a time widened to f32, or one value.
pub trait Lanes: Copy + Send + Sync {
    /// # Safety
    /// `p` points at 8 readable values; the CPU supports AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// # Safety
    /// `p` points at 16 readable values; the CPU supports AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    fn to_f32(self) -> f32;
}

impl Lanes for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// One instruction set as the tile kernel uses it: `LANES` f32 per vector.
    trait Simd {
        type V: Copy;
        const LANES: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load_x(p: *const f32) -> Self::V;
        unsafe fn load_w<W: Lanes>(p: *const W) -> Self::V;
        /// `a·b + c`
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn sum(v: Self::V) -> f32;
    }

    struct Avx2;
    struct Avx512;

    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_w<W: Lanes>(p: *const W) -> __m256 {
            W::load8(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps::<1>(v);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_x(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_w<W: Lanes>(p: *const W) -> __m512 {
            W::load16(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    /// [`tiles`] on AVX2 + FMA + F16C.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; the slices as [`tiles`] says.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn avx2<const N: usize, const R: usize, W: Lanes>(
        x: &[f32],
        w: &[W],
        k: usize,
        dst: &mut [f32],
    ) {
        tiles::<Avx2, N, R, W>(x, w, k, dst)
    }

    /// [`tiles`] on AVX-512 F.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2, FMA and F16C; the slices as [`tiles`] says.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn avx512<const N: usize, const R: usize, W: Lanes>(
        x: &[f32],
        w: &[W],
        k: usize,
        dst: &mut [f32],
    ) {
        tiles::<Avx512, N, R, W>(x, w, k, dst)
    }

    /// Each row of a tile is prefetched this many bytes ahead into L1. Streaming a 7B-wide
    /// weight from memory with 8 rows of `x`, a stand-alone copy of the AVX-512 kernel on one
    /// core went from 95 to 123 GFLOP/s (2 KiB ahead; 4 and 8 KiB into L2: 104–110).
    const PREFETCH_BYTES: usize = 2048;

    /// `dst[j·N + r] = w[j] · x[r]`; `x` is `[N, k]`, `w` `[rows, k]`, in tiles of `R` rows of
    /// `w` (the rows past the last whole tile one by one).
    ///
    /// # Safety
    /// The CPU must support `S`; `x.len() == N·k`, `w.len() % k == 0`,
    /// `dst.len() == w.len() / k · N`.
    #[inline(always)]
    unsafe fn tiles<S: Simd, const N: usize, const R: usize, W: Lanes>(
        x: &[f32],
        w: &[W],
        k: usize,
        dst: &mut [f32],
    ) {
        debug_assert_eq!(x.len(), N * k);
        let rows = w.len() / k;
        let whole = rows / R * R;
        for j in (0..whole).step_by(R) {
            tile::<S, N, R, W>(x, w, k, j, dst);
        }
        for j in whole..rows {
            tile::<S, N, 1, W>(x, w, k, j, dst);
        }
    }

    /// Rows `j..j + R` of `w` times every row of `x`: each step loads `S::LANES` values of the
    /// `R` rows and of the `N` rows of `x` once and does `R·N` multiply-adds into `R·N`
    /// accumulators held in registers (so each load of `x` feeds `R` products, and even one row
    /// of `x` has `R` independent chains).
    ///
    /// # Safety
    /// As [`tiles`], and `j + R ≤ rows`.
    #[inline(always)]
    unsafe fn tile<S: Simd, const N: usize, const R: usize, W: Lanes>(
        x: &[f32],
        w: &[W],
        k: usize,
        j: usize,
        dst: &mut [f32],
    ) {
        let lanes = k / S::LANES * S::LANES;
        let ahead = PREFETCH_BYTES / std::mem::size_of::<W>();
        let line = 64 / std::mem::size_of::<W>();
        let end = w.as_ptr_range().end;
        // acc[r][i]: row r of x times row j + i of w
        let mut acc = [[S::zero(); R]; N];
        let mut c = 0;
        while c < lanes {
            if c.is_multiple_of(line) {
                for i in 0..R {
                    // a prefetch never faults, but stay inside `w`
                    let p = w.as_ptr().wrapping_add((j + i) * k + c + ahead);
                    if p < end {
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
            }
            // c + LANES <= lanes <= k: every load is inside its row.
            let mut wv = [S::zero(); R];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = S::load_w(w.as_ptr().add((j + i) * k + c));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = S::load_x(x.as_ptr().add(r * k + c));
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = S::fmadd(xv, *wv, *a);
                }
            }
            c += S::LANES;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (i, a) in acc.iter().enumerate() {
                let wrow = &w[(j + i) * k..(j + i + 1) * k];
                let mut s = S::sum(*a);
                for c in lanes..k {
                    s += x[r * k + c] * wrow[c].to_f32();
                }
                dst[(j + i) * N + r] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this CPU runs (none: nothing to compare, `matmul` returns None, checked in
    /// `declines_what_it_does_not_handle`).
    fn kernels() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.available())
            .collect()
    }

    #[test]
    fn equals_candle_matmul_for_every_row_count_and_odd_widths() -> Result<()> {
        let dev = Device::Cpu;
        // Widths below one vector and with tails; output features that leave partial tiles of
        // 3 and 4 rows and a partial parallel block.
        let shapes = (1..=MAX_ROWS).map(|n| (n, 37, 70)).chain([
            (1, 8, 3),
            (8, 768, 101),
            (5, 3, 33),
            (8, 130, 1),
            (7, 64, 2),
        ]);
        for (n, k, out) in shapes {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?;
            let want = x.matmul(&w.t()?)?;
            for isa in kernels() {
                let got = matmul_with(&x, &w, isa)?.expect("the kernel applies");
                let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4 * (k as f32).sqrt(),
                    "{isa:?} n={n} k={k} out={out}: {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_weights_equal_candle_on_the_widened_weights() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, isa) in [DType::F16, DType::BF16]
            .into_iter()
            .flat_map(|d| kernels().into_iter().map(move |isa| (d, isa)))
        {
            for (n, k, out) in [(1, 8, 3), (4, 37, 70), (8, 264, 65), (7, 48, 50)] {
                let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
                let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?.to_dtype(dtype)?;
                // The exact product of the half-precision values, in f32.
                let want = x
                    .to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(DType::F32)?.t()?)?;
                let got = matmul_with(&x, &w, isa)?.expect("the kernel applies");
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
                    "{isa:?} {dtype:?} n={n} k={k}: {diff} (scale {scale})"
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
        assert_eq!(matmul(&x, &w)?.is_some(), Isa::detect().is_some());
        for isa in [Isa::Avx2, Isa::Avx512] {
            assert_eq!(matmul_with(&x, &w, isa)?.is_some(), isa.available());
        }
        Ok(())
    }

    #[test]
    fn the_gradient_reaches_x() -> Result<()> {
        if Isa::detect().is_none() {
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
