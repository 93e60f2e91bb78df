//! `x·Wᵀ` for bf16 activations and weights on a CPU with AVX512-BF16 or AMX: the base products
//! of a bf16 model's prompt (vision tower and language model), where many rows meet a large
//! weight. A CPU with AMX (Intel Xeon since Sapphire Rapids) takes the tile kernel of
//! `amx`, 3.7–5.7× faster again on this project's Xeon machine, where `vdpbf16ps` runs no faster
//! than f32 multiply-adds; the rest of this page is the `vdpbf16ps` kernel.
//!
//! Candle 0.11's CPU gemm has no bf16 kernel of its own: it widens to f32 as it packs, and a
//! 601×4096×4096 product ran at 148 GFLOP/s in bf16 against 257 in f32 on this project's Zen 5
//! machine, so `--dtype bf16` answered 2–3.5× slower than transformers, whose oneDNN kernels use
//! `vdpbf16ps`. This kernel uses it too: one instruction multiplies 16 pairs of bf16 values and
//! adds both products into 16 f32 sums, twice the arithmetic of an f32 multiply-add. The same
//! product ran at ~480 GFLOP/s in a stand-alone copy (`eval/SCALE.md`). The sums are f32 and
//! only the result is rounded to bf16, as torch does.
//!
//! Layout (the usual register-blocked gemm, without cache blocking along `k`): `x` is packed
//! once per call into blocks of `MR` rows with each pair of consecutive `k` values of a row
//! side by side (`[k/2][MR]` pairs); each parallel task packs `NR` output features of `W` the
//! same way (`[k/2][NR]` pairs, 256 KiB for a 4096-wide weight: it stays in L2) and runs every
//! row block against it, with the `MR × NR` sums in 28 of the 32 vector registers. An odd `k`
//! is padded with a zero pair half. Other dtypes, layouts and CPUs return `None` and the
//! caller uses candle.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use half::bf16;

/// Rows of `x` per block: `MR × 2` accumulators, two weight vectors and one broadcast value
/// fill 31 of the 32 AVX-512 registers.
const MR: usize = 14;

/// Output features per panel: two vectors of 16 f32 sums.
const NR: usize = 32;

/// Weights smaller than this (values) are multiplied on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

mod amx;

/// Whether this CPU has the instructions (AVX-512 F and AVX512-BF16, or AMX-BF16).
pub fn available() -> bool {
    instructions().is_some()
}

/// The bf16 instructions the products use on this CPU: `"AMX-BF16"`, `"AVX512-BF16"` or none.
pub fn instructions() -> Option<&'static str> {
    if amx::ready() {
        return Some("AMX-BF16");
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        return Some("AVX512-BF16");
    }
    None
}

/// `x Wᵀ` for `x` `[n, in]` and `W` `[out, in]`, both bf16, contiguous and on the CPU, when
/// this CPU has AVX512-BF16 or AMX; else `None`. The result is bf16 (f32 sums rounded once).
/// A few rows (decoding) are left to [`super::few_rows`] unless AMX takes them
/// (`amx::few_rows`).
pub fn matmul(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    let usable = available()
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::BF16
        && weight.dtype() == DType::BF16
        && x.rank() == 2
        && weight.rank() == 2
        && x.dim(0)? > 0
        && x.dim(1)? == weight.dim(1)?
        && x.is_contiguous()
        && weight.is_contiguous();
    if !usable {
        return Ok(None);
    }
    let (n, (out, k)) = (x.dim(0)?, weight.dims2()?);
    let amx_few = amx::ready() && amx::few_rows_fit(n, out, k);
    if n <= super::few_rows::MAX_ROWS && !amx_few {
        return Ok(None);
    }
    x.apply_op2(weight, Bf16Matmul).map(Some)
}

/// The custom op: forward with the kernel; the gradient flows to `x` only (`W` is frozen).
struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(w)) = (s1, s2) else {
            candle_core::bail!("bf16-matmul: bf16 activations and weights expected");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bf16-matmul: contiguous tensors expected");
        };
        let (n, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 || !available() {
            candle_core::bail!("bf16-matmul: [{n}, {k}] times [{out}, {k2}]ᵀ on this CPU");
        }
        let y = product(&x[x0..x1], n, &w[w0..w1], out, k);
        Ok((CpuStorage::BF16(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(weight)?), None))
    }
}

/// Two consecutive values of a row (the last pair of an odd row: one, and a zero) as one
/// 32-bit lane, the first in the low half: the order `vdpbf16ps` pairs them in.
fn pair(two: &[bf16]) -> u32 {
    let hi = two.get(1).map_or(0, |v| v.to_bits() as u32);
    two[0].to_bits() as u32 | (hi << 16)
}

/// `x` `[n, k]` as row blocks of [`MR`] (the last one shorter): block `b` starts at
/// `b·MR·pairs` and holds `[pairs][rows of the block]`.
fn pack_rows(x: &[bf16], k: usize, pairs: usize) -> Vec<u32> {
    let mut packed = vec![0u32; x.len() / k * pairs];
    for (block, rows) in packed.chunks_mut(MR * pairs).zip(x.chunks(MR * k)) {
        let m = block.len() / pairs;
        for (r, row) in rows.chunks(k).enumerate() {
            for (p, two) in row.chunks(2).enumerate() {
                block[p * m + r] = pair(two);
            }
        }
    }
    packed
}

/// Rows `first..first + NR` of `w` `[rows, k]` (zero past its end) as `[pairs][NR]` into `dst`.
fn pack_panel(w: &[bf16], k: usize, first: usize, dst: &mut [u32]) {
    let rows = w.len() / k;
    for i in 0..NR {
        let j = first + i;
        if j < rows {
            for (p, two) in w[j * k..(j + 1) * k].chunks(2).enumerate() {
                dst[p * NR + i] = pair(two);
            }
        } else {
            dst.iter_mut().skip(i).step_by(NR).for_each(|v| *v = 0);
        }
    }
}

/// `y [n, out] = x [n, k] · w [out, k]ᵀ`: with AMX where the CPU has it, else `vdpbf16ps`.
fn product(x: &[bf16], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<bf16> {
    match (amx::ready(), amx::few_rows_fit(n, out, k)) {
        (true, true) => amx::few_rows(x, n, w, out, k),
        (true, false) => amx::product(x, n, w, out, k),
        (false, _) => dot_product(x, n, w, out, k),
    }
}

/// [`product`] with `vdpbf16ps`, parallel over panels of [`NR`] output features.
fn dot_product(x: &[bf16], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<bf16> {
    use rayon::prelude::*;
    let pairs = k.div_ceil(2);
    let xp = pack_rows(x, k, pairs);
    // Panel-major: panel `q` holds `[n][NR]` (its features of every row), so each task writes
    // one contiguous chunk; transposed to `[n, out]` at the end.
    let mut yp = vec![bf16::ZERO; out.div_ceil(NR) * n * NR];
    let task = |panel: &mut Vec<u32>, (q, chunk): (usize, &mut [bf16])| {
        pack_panel(w, k, q * NR, panel);
        for (b, rows) in chunk.chunks_mut(MR * NR).enumerate() {
            let m = rows.len() / NR;
            let block = &xp[b * MR * pairs..(b * MR + m) * pairs];
            block_times_panel(block, m, panel, pairs, rows);
        }
    };
    let new_panel = || vec![0u32; pairs * NR];
    if w.len() < PARALLEL_MIN {
        let mut panel = new_panel();
        yp.chunks_mut(n * NR)
            .enumerate()
            .for_each(|item| task(&mut panel, item));
    } else {
        yp.par_chunks_mut(n * NR)
            .enumerate()
            .for_each_init(new_panel, task);
    }
    from_panels(&yp, n, out, NR)
}

/// `[n, out]` from panel-major `yp`: panel `q` holds `[n][width]`, features `q·width..` of
/// every row (the last panel's columns past `out` are dropped).
fn from_panels(yp: &[bf16], n: usize, out: usize, width: usize) -> Vec<bf16> {
    let mut y = vec![bf16::ZERO; n * out];
    for (q, chunk) in yp.chunks(n * width).enumerate() {
        let first = q * width;
        let cols = width.min(out - first);
        for (r, row) in chunk.chunks(width).enumerate() {
            y[r * out + first..r * out + first + cols].copy_from_slice(&row[..cols]);
        }
    }
    y
}

/// `dst[r·NR + i] = x[r] · w[i]` for the `m` rows of a packed block and the packed panel.
fn block_times_panel(block: &[u32], m: usize, panel: &[u32], pairs: usize, dst: &mut [bf16]) {
    debug_assert!(block.len() == m * pairs && panel.len() == pairs * NR);
    debug_assert!(dst.len() == m * NR);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($($m:literal)*) => {
                match m {
                    // SAFETY: the op only runs where `available()` found AVX-512 F and
                    // AVX512-BF16 (checked again in `cpu_fwd`); the lengths are as asserted.
                    $($m => unsafe { kernel::block::<$m>(block, panel, pairs, dst) },)*
                    _ => unreachable!("row blocks have 1..={MR} rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (block, m, panel, pairs, dst);
        unreachable!("bf16-matmul is only built on x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::NR;
    use half::bf16;
    use std::arch::x86_64::*;

    /// `M` rows × [`NR`] features: per pair of `k` values, two loads of the panel and `M`
    /// broadcasts of the block feed `2·M` `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and AVX512-BF16; `block.len() == M·pairs`,
    /// `panel.len() == pairs·NR`, `dst.len() == M·NR`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block<const M: usize>(
        block: &[u32],
        panel: &[u32],
        pairs: usize,
        dst: &mut [bf16],
    ) {
        let (a, b) = (block.as_ptr(), panel.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for p in 0..pairs {
            // SAFETY (loads): p < pairs, so p·NR + 32 ≤ panel.len() and p·M + r < block.len().
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * M + r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], xv, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], xv, w1);
            }
        }
        let d = dst.as_mut_ptr();
        for (r, acc) in acc.iter().enumerate() {
            for (h, sums) in acc.iter().enumerate() {
                // round to nearest even, as `half::bf16::from_f32`
                let halves: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(*sums));
                _mm256_storeu_si256(d.add(r * NR + h * 16).cast(), halves);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this CPU can run.
    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut kernels: Vec<(&'static str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            kernels.push(("vdpbf16ps", dot_product));
        }
        if amx::ready() {
            kernels.push(("amx", amx::product));
            kernels.push(("amx few rows", few_rows_or_product));
        }
        kernels
    }

    type Kernel = fn(&[bf16], usize, &[bf16], usize, usize) -> Vec<bf16>;

    /// [`amx::few_rows`] where it applies, else the product (the shapes it declines).
    fn few_rows_or_product(x: &[bf16], n: usize, w: &[bf16], out: usize, k: usize) -> Vec<bf16> {
        if amx::few_rows_fit(n, out, k) {
            amx::few_rows(x, n, w, out, k)
        } else {
            dot_product(x, n, w, out, k)
        }
    }

    /// The exact product of the bf16 values, in f32, against each kernel's (and `matmul`'s).
    fn check(n: usize, k: usize, out: usize) -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (out, k), &dev)?.to_dtype(DType::BF16)?;
        let want = x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?;
        // A few rows are left to `few_rows` unless AMX takes them.
        let takes = n > super::super::few_rows::MAX_ROWS || amx::few_rows_fit(n, out, k);
        match matmul(&x, &w)? {
            Some(got) => {
                assert!(takes, "n={n} k={k} out={out}: few rows taken");
                assert_eq!(got.dtype(), DType::BF16);
                assert_eq!(got.dims(), &[n, out]);
                close(&got, &want, n, k, out)?;
            }
            None => assert!(!takes || !amx::ready(), "n={n} k={k} out={out}: declined"),
        }
        let (xs, ws) = (x.flatten_all()?.to_vec1()?, w.flatten_all()?.to_vec1()?);
        for (name, kernel) in kernels() {
            let got = Tensor::from_vec(kernel(&xs, n, &ws, out, k), (n, out), &dev)?;
            close(&got, &want, n, k, out).map_err(|e| e.context(name))?;
        }
        Ok(())
    }

    fn close(got: &Tensor, want: &Tensor, n: usize, k: usize, out: usize) -> Result<()> {
        // Only the final rounding to bf16 (8 bits of mantissa) and the order of the f32 sums
        // differ: each value within half a bf16 step of its own size, plus the sums' rounding.
        let got = got.to_dtype(DType::F32)?;
        let err = (&got - want)?.abs()?;
        let bound = ((want.abs()? * (1.0 / 256.0))? + 1e-5 * k as f64)?;
        let over = err.gt(&bound)?.to_dtype(DType::F32)?.sum_all()?;
        if over.to_scalar::<f32>()? > 0.0 {
            candle_core::bail!("n={n} k={k} out={out}: values off by more than the rounding");
        }
        Ok(())
    }

    #[test]
    fn equals_the_f32_product_of_the_bf16_values() -> Result<()> {
        if !available() {
            return Ok(());
        }
        crate::note!(
            "bf16 kernels on this CPU: {:?}",
            kernels().iter().map(|k| k.0).collect::<Vec<_>>()
        );
        // Every row-block remainder 1..=14; odd and even k (an odd one pads a zero half);
        // output features that leave partial panels; a product large enough to run in parallel.
        for n in 1..=2 * MR + 1 {
            check(n, 37, 70)?;
            check(n, 64, 64)?;
        }
        // AMX: rows past a multiple of 32, `k` past a tile and over one cache block (1100 > 512
        // + 512), features past a task of 128.
        for (n, k, out) in [
            (9, 1, 1),
            (20, 64, 31),
            (15, 130, 33),
            (601, 256, 300),
            (33, 1100, 129),
            (64, 1024, 256),
            // AMX's few rows: 1..=16 rows, whole tiles of W, several tasks of 256 features.
            (1, 64, 32),
            (8, 4096, 96),
            (16, 96, 544),
        ] {
            check(n, k, out)?;
        }
        Ok(())
    }

    /// candle's q4k products (with AMX from 32 rows) configure the tiles once per thread and
    /// expect to find them so: the AMX kernels must give a thread back the tiles it had (a
    /// `tilerelease` there made the next q4k product an illegal instruction: the process died).
    #[test]
    fn amx_leaves_a_thread_its_tiles_as_candle_configured_them() -> Result<()> {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::Module as _;
        if !amx::ready() {
            return Ok(());
        }
        // One thread: candle's product and the kernels run on the same one.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .map_err(candle_core::Error::wrap)?;
        one.install(|| {
            let dev = Device::Cpu;
            let w = Tensor::randn(0f32, 1.0, (256, 256), &dev)?;
            let q4k = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K)?)?;
            let x = Tensor::randn(0f32, 1.0, (512, 256), &dev)?;
            let first = q4k.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let (xs, ws) = (
                x.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?,
                w.to_dtype(DType::BF16)?.flatten_all()?.to_vec1()?,
            );
            amx::product(&xs, 64, &ws, 256, 256);
            amx::few_rows(&xs, 8, &ws, 256, 256);
            let again = q4k.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(first, again);
            Ok(())
        })
    }

    #[test]
    fn declines_what_it_does_not_handle() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (20, 6), &dev)?;
        assert!(matmul(&x, &w)?.is_none(), "f32");
        let (xh, wh) = (x.to_dtype(DType::F16)?, w.to_dtype(DType::F16)?);
        assert!(matmul(&xh, &wh)?.is_none(), "f16");
        let (xb, wb) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
        assert!(matmul(&xb, &w)?.is_none(), "mixed dtypes");
        assert!(matmul(&xb.t()?, &wb.t()?)?.is_none(), "strided");
        assert_eq!(matmul(&xb, &wb)?.is_some(), available());
        Ok(())
    }

    #[test]
    fn the_gradient_reaches_x() -> Result<()> {
        if !available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (10, 16), &dev)?.to_dtype(DType::BF16)?,
        )?;
        let w = Tensor::randn(0f32, 1.0, (5, 16), &dev)?.to_dtype(DType::BF16)?;
        let y = matmul(x.as_tensor(), &w)?.expect("the kernel applies");
        let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x has a gradient");
        let want = w
            .to_dtype(DType::F32)?
            .sum(0)?
            .unsqueeze(0)?
            .broadcast_as((10, 16))?;
        let diff = (gx.to_dtype(DType::F32)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 0.1, "{diff}");
        Ok(())
    }
}
