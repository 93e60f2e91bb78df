//! Attention of a decoding step on the CPU: a few query rows per head over a cached prefix shared
//! by the particles and the rows' own continuation, in one pass that reads the cached keys and
//! values in their stored dtype.
//!
//! The composed path (`attention_shared_prefix` in `llama.rs`) widens a half-precision cache to
//! f32 and multiplies it with candle's products. Where the particles carry the key and value
//! projections, the prompt's cache has one row per particle: at P = 8 on a 601-token prompt the
//! widened copies were 160 MB per layer and step, allocated afresh (mapped and zeroed by the
//! kernel) and read once — most of a P = 8 bf16 step outside the weight products. Here each
//! (row, head) task reads its keys and values once, widens a row at a time into a small buffer and
//! keeps the scores in f32, as the composed path does.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::models::nn::softmax_row;

/// Query rows per head up to which [`attend_split`] applies (a decoding step of a model with
/// grouped-query attention has `heads / kv_heads` of them).
pub const MAX_QUERIES: usize = 16;

/// `softmax(q·kᵀ/√d + bias)·v` for a few query rows per head, with the keys and values in two
/// parts: a prefix `(pk, pv)` of `b` rows shared by the `R = P·b` query rows (particle-major: row
/// `r` reads prefix row `r mod b`) and the rows' own continuation `(k, v)`.
///
/// `q` `[R, kv, m, d]` (m ≤ [`MAX_QUERIES`]), prefix `[b, kv, T, d]`, own `[R, kv, t, d]`, `bias`
/// `[R, 1, m, T + t]`; keys and values in f32, bf16 or f16 on the CPU. Computes in f32 and
/// returns `[R, kv, m, d]` in `q`'s dtype. No gradient.
pub fn attend_split(
    q: &Tensor,
    (pk, pv): (&Tensor, &Tensor),
    (k, v): (&Tensor, &Tensor),
    bias: &Tensor,
) -> Result<Tensor> {
    let (rows, kv, m, d) = q.dims4()?;
    let (b, t_prefix) = (pk.dim(0)?, pk.dim(2)?);
    let t_own = k.dim(2)?;
    let keys = t_prefix + t_own;
    if m == 0 || m > MAX_QUERIES || b == 0 || !rows.is_multiple_of(b) {
        candle_core::bail!(
            "attend_split: {m} queries per head of {rows} rows over {b} prefix rows"
        );
    }
    let expect = |t: &Tensor, shape: &[usize], what: &str| {
        if t.dims() == shape {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!(
                "attend_split: {what} has shape {:?}, expected {shape:?}",
                t.dims()
            )))
        }
    };
    expect(pk, &[b, kv, t_prefix, d], "prefix keys")?;
    expect(pv, &[b, kv, t_prefix, d], "prefix values")?;
    expect(k, &[rows, kv, t_own, d], "own keys")?;
    expect(v, &[rows, kv, t_own, d], "own values")?;
    expect(bias, &[rows, 1, m, keys], "bias")?;
    let queries = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bias = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (pk, pv, k, v) = (
        pk.contiguous()?,
        pv.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
    );
    let held = [&pk, &pv, &k, &v].map(|t| t.storage_and_layout());
    let [pk, pv, k, v] = [0, 1, 2, 3].map(|i| Values::of(&held[i].0, held[i].1));
    let (pk, pv, k, v) = (pk?, pv?, k?, v?);

    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; rows * kv * m * d];
    out.par_chunks_mut(m * d)
        .enumerate()
        .for_each(|(task, out)| {
            let (r, h) = (task / kv, task % kv);
            // Where key/value j of this (row, head) starts: the shared prefix, then its own.
            let at = |j: usize| {
                if j < t_prefix {
                    (true, (((r % b) * kv + h) * t_prefix + j) * d)
                } else {
                    (false, ((r * kv + h) * t_own + j - t_prefix) * d)
                }
            };
            let q = &queries[task * m * d..][..m * d];
            let bias = &bias[r * m * keys..][..m * keys];
            let mut row = vec![0f32; d];
            let mut probs = vec![0f32; m * keys];
            for j in 0..keys {
                let (shared, start) = at(j);
                (if shared { pk } else { k }).read(start, &mut row);
                for i in 0..m {
                    probs[i * keys + j] = dot(&q[i * d..][..d], &row) * scale + bias[i * keys + j];
                }
            }
            probs.chunks_exact_mut(keys).for_each(softmax_row);
            for j in 0..keys {
                let (shared, start) = at(j);
                (if shared { pv } else { v }).read(start, &mut row);
                for i in 0..m {
                    let p = probs[i * keys + j];
                    for (o, x) in out[i * d..][..d].iter_mut().zip(&row) {
                        *o += p * x;
                    }
                }
            }
        });
    drop(held);
    Tensor::from_vec(out, (rows, kv, m, d), q.device())?.to_dtype(q.dtype())
}

/// `a·b` in 16 lanes, so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The values of a contiguous CPU tensor, borrowed in their dtype.
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> Values<'a> {
    fn of(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("attend_split: a contiguous cache expected");
        };
        Ok(match storage {
            Storage::Cpu(CpuStorage::F32(v)) => Values::F32(&v[start..end]),
            Storage::Cpu(CpuStorage::BF16(v)) => Values::Bf16(&v[start..end]),
            Storage::Cpu(CpuStorage::F16(v)) => Values::F16(&v[start..end]),
            _ => candle_core::bail!("attend_split: f32, bf16 or f16 keys and values on the CPU"),
        })
    }

    /// Values `start..start + out.len()` in f32.
    fn read(self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Values::F32(v) => out.copy_from_slice(&v[start..start + n]),
            // Exact, and a loop the compiler vectorises (`half` converts bf16 value by value).
            Values::Bf16(v) => {
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = f32::from_bits(u32::from(x.to_bits()) << 16);
                }
            }
            Values::F16(v) => v[start..start + n].convert_to_f32_slice(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::{attention, MASKED};
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// The reference: each row's prefix row copied in front of its own keys and values, then the
    /// composed attention in f32.
    fn reference(
        q: &Tensor,
        pk: &Tensor,
        pv: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let (rows, b) = (q.dim(0)?, pk.dim(0)?);
        let whole = |prefix: &Tensor, own: &Tensor| -> Result<Tensor> {
            let per_row: Vec<Tensor> = (0..rows)
                .map(|r| Tensor::cat(&[&prefix.narrow(0, r % b, 1)?, &own.narrow(0, r, 1)?], 2))
                .collect::<Result<_>>()?;
            Tensor::cat(&per_row, 0)?.to_dtype(DType::F32)
        };
        attention(
            &q.to_dtype(DType::F32)?,
            &whole(pk, k)?,
            &whole(pv, v)?,
            Some(bias),
        )
    }

    #[test]
    fn equals_attention_over_the_prefix_copied_to_every_row() -> Result<()> {
        // 3 particles × 2 prefix rows, 2 key/value heads, 3 queries per head (grouped heads),
        // a prefix of 37 keys (past one 16-lane block) and 4 own ones, d = 20 (a remainder).
        let (p, b, kv, m, d, tp, t) = (3, 2, 2, 3, 20, 37, 4);
        let rows = p * b;
        let q = random(&[rows, kv, m, d], 1)?;
        let (pk, pv) = (random(&[b, kv, tp, d], 2)?, random(&[b, kv, tp, d], 3)?);
        let (k, v) = (random(&[rows, kv, t, d], 4)?, random(&[rows, kv, t, d], 5)?);
        // Every row masks other keys: the prefix's first `r` positions and its own last key for
        // the first query.
        let mut bias = vec![0f32; rows * m * (tp + t)];
        for r in 0..rows {
            for i in 0..m {
                let row = &mut bias[(r * m + i) * (tp + t)..][..tp + t];
                row[..r].iter_mut().for_each(|x| *x = MASKED);
                if i == 0 {
                    row[tp + t - 1] = MASKED;
                }
            }
        }
        let bias = Tensor::from_vec(bias, (rows, 1, m, tp + t), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let cast = |t: &Tensor| t.to_dtype(dtype);
            let (q, pk, pv, k, v) = (cast(&q)?, cast(&pk)?, cast(&pv)?, cast(&k)?, cast(&v)?);
            let got = attend_split(&q, (&pk, &pv), (&k, &v), &bias)?;
            assert_eq!(got.dims(), &[rows, kv, m, d]);
            assert_eq!(got.dtype(), dtype);
            let want = reference(&q, &pk, &pv, &k, &v, &bias)?;
            let diff = (got.to_dtype(DType::F32)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            // f32: the sums' order; half: the output's rounding (|values| < 1).
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
            assert!(diff < tolerance, "{dtype:?}: max difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_does_not_compute() -> Result<()> {
        let q = random(&[2, 1, MAX_QUERIES + 1, 4], 1)?;
        let prefix = random(&[1, 1, 3, 4], 2)?;
        let own = random(&[2, 1, 1, 4], 3)?;
        let bias = Tensor::zeros((2, 1, MAX_QUERIES + 1, 4), DType::F32, &Device::Cpu)?;
        assert!(attend_split(&q, (&prefix, &prefix), (&own, &own), &bias).is_err());
        let q = q.narrow(2, 0, 1)?;
        let bias = bias.narrow(2, 0, 1)?;
        assert!(attend_split(&q, (&prefix, &prefix), (&own, &own), &bias).is_ok());
        let wrong = random(&[3, 1, 1, 4], 3)?;
        assert!(attend_split(&q, (&prefix, &prefix), (&wrong, &own), &bias).is_err());
        Ok(())
    }
}
