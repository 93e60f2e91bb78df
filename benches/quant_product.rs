//! A frozen linear layer with a quantized base (q8_0, q4k) against the dense f32 one, for layer
//! sizes from the demo model's (352×128) to a 7B model's (4096×4096, 11008×4096) and 1 to 601 rows
//! (decoding P particles to a LLaVA prompt). Microseconds per call, medians of 3 timed loops after
//! one warm-up call. The quantized columns:
//!
//! - `blocks`: [`QuantizedWeight`]'s own product over the compact GGML blocks (`k_quants::matmul`);
//! - `candle`: candle's `QTensor` forward, which on x86 repacks a q4k (or, with AVX512-VNNI, q8_0)
//!   weight into expanded tiles on first use and keeps them (faster for many rows, ~1.33× the
//!   blocks' memory for good);
//! - `candle, fresh copy`: candle's forward on a throw-away copy of the blocks, repacked for that
//!   call only;
//! - `dequant+gemm`: the weight dequantized for the call and multiplied densely (for comparison);
//! - `forward`: what `QuantizedWeight::forward` picks (`blocks` below `REPACK_FROM_ROWS` rows,
//!   `candle, fresh copy` from there on).
//!
//! Run: `cargo bench --bench quant_product` (release; the dev profile builds the dependencies,
//! where the products run, with opt-level 3 too: `cargo bench --profile dev --bench quant_product`).

use std::sync::Arc;
use std::time::Instant;

use bella_vqa::bella::quant::{QuantizedWeight, REPACK_FROM_ROWS};
use bella_vqa::bella::{Base, ParticleLinear};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn median_us(
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<f64> {
    f()?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        runs.push(start.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[1])
}

fn main() -> anyhow::Result<()> {
    println!("`forward` switches to a fresh copy for candle's tiles at {REPACK_FROM_ROWS} rows.\n");
    println!("| W [out, in] | quant | rows | blocks µs | candle µs | candle, fresh copy µs | dequant+gemm µs | forward µs | f32 µs |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (out, inp) in [(352, 128), (4096, 4096), (11008, 4096)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let dense_layer = ParticleLinear::new(w.clone(), None);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            if inp % dtype.block_size() != 0 {
                continue;
            }
            let q = QuantizedWeight::new(Arc::new(QTensor::quantize(&w, dtype)?))?;
            let layer = ParticleLinear::with_base(Base::Quantized(q.clone()), None);
            for rows in [1, 8, 32, 128, 601] {
                // About 0.2 s per timed loop on 2 cores.
                let iters =
                    (2e8 / (rows as f64 * out as f64 * inp as f64)).clamp(1.0, 200.0) as usize;
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
                let compact = q.clone().with_repack_from_rows(usize::MAX);
                let blocks = median_us(iters, || x.apply_op1_no_bwd(&compact))?;
                let candle = median_us(iters, || x.apply_op1_no_bwd(q.qtensor().as_ref()))?;
                let copying = q.clone().with_repack_from_rows(1);
                let fresh = median_us(iters, || x.apply_op1_no_bwd(&copying))?;
                let dequant = median_us(iters, || x.matmul(&q.dequantize()?.t()?))?;
                let forward = median_us(iters, || layer.forward(&x))?;
                let dense = median_us(iters, || dense_layer.forward(&x))?;
                println!(
                    "| {out}×{inp} | {dtype:?} | {rows} | {blocks:.0} | {candle:.0} | {fresh:.0} | {dequant:.0} | {forward:.0} | {dense:.0} |"
                );
            }
        }
    }
    Ok(())
}
