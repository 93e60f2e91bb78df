//! A frozen linear layer (`ParticleLinear` without particles) with a q8_0 base (candle's CPU kernel,
//! through [`QuantizedWeight`]) against the dense f32 one (gemm, or the few-rows kernel for up to 8
//! rows), for layer sizes from the demo model's
//! (128×128, 352×128) to a 7B model's (4096×4096) and 1 to 320 rows (decoding P particles to a
//! prefill). Microseconds per call, medians of 3 timed loops.
//!
//! Run: `cargo bench --profile dev --bench quant_product` (the dev profile builds the
//! dependencies, where both products run, with opt-level 3).

use std::sync::Arc;
use std::time::Instant;

use bella_vqa::bella::quant::QuantizedWeight;
use bella_vqa::bella::{Base, ParticleLinear};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn median_us(
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<f64> {
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
    println!("| W [out, in] | rows | q8_0 µs | f32 µs |");
    println!("|---|---|---|---|");
    for (out, inp, iters) in [
        (128, 128, 100),
        (352, 128, 100),
        (1024, 1024, 10),
        (4096, 4096, 2),
    ] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let q = QuantizedWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))?;
        let quantized_layer = ParticleLinear::with_base(Base::Quantized(q), None);
        let dense_layer = ParticleLinear::new(w, None);
        for rows in [1, 4, 64, 320] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
            let quantized = median_us(iters, || quantized_layer.forward(&x))?;
            let dense = median_us(iters, || dense_layer.forward(&x))?;
            println!("| {out}×{inp} | {rows} | {quantized:.0} | {dense:.0} |");
        }
    }
    Ok(())
}
