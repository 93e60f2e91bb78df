//! The base products of a bf16 model's prompt, `x·Wᵀ` with hundreds of rows, on the 7B model's
//! weight shapes: candle's product in bf16, f16 and f32 against the AVX512-BF16 kernel
//! (`src/bella/bf16_gemm.rs`). Milliseconds per call (median of 5 rounds, the ways interleaved)
//! and GFLOP/s.
//!
//! Run: `cargo bench --bench bf16_product` (release; the kernel needs AVX512-BF16).

use std::time::Instant;

use bella_vqa::bella::bf16_gemm;
use candle_core::{DType, Device, Tensor};

fn main() -> anyhow::Result<()> {
    println!(
        "bf16 instructions of the kernel on this CPU: {}\n",
        bf16_gemm::instructions().unwrap_or("none (candle's product)")
    );
    println!("| x [rows, in] · W [out, in]ᵀ | candle f32 ms | candle f16 ms | candle bf16 ms | kernel bf16 ms | kernel GFLOP/s | kernel / candle bf16 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    // The language model's q/k/v/o, up/gate and down over a 601-token prompt; the CLIP
    // ViT-L/14-336 tower's q/k/v/o over 577 tokens.
    for (rows, out, inp) in [
        (601, 4096, 4096),
        (601, 11008, 4096),
        (601, 4096, 11008),
        (577, 1024, 1024),
    ] {
        let x32 = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
        let w32 = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let cast = |t: &Tensor, d| t.to_dtype(d);
        let (x16, w16) = (cast(&x32, DType::F16)?, cast(&w32, DType::F16)?);
        let (xb, wb) = (cast(&x32, DType::BF16)?, cast(&w32, DType::BF16)?);
        let ways: Vec<Box<dyn Fn() -> anyhow::Result<Tensor>>> = vec![
            Box::new(|| Ok(x32.matmul(&w32.t()?)?)),
            Box::new(|| Ok(x16.matmul(&w16.t()?)?)),
            Box::new(|| Ok(xb.matmul(&wb.t()?)?)),
            Box::new(|| {
                bf16_gemm::matmul(&xb, &wb)?.ok_or_else(|| anyhow::anyhow!("the kernel declined"))
            }),
        ];
        let runs: Vec<bool> = ways.iter().map(|way| way().is_ok()).collect(); // warm-up
        let mut times = vec![Vec::new(); ways.len()];
        for _ in 0..5 {
            for ((way, t), runs) in ways.iter().zip(&mut times).zip(&runs) {
                if *runs {
                    let start = Instant::now();
                    way()?;
                    t.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let median: Vec<Option<f64>> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t.get(t.len() / 2).copied()
            })
            .collect();
        let ms = |m: Option<f64>| m.map_or("–".to_string(), |m| format!("{m:.1}"));
        let flops = 2.0 * (rows * out * inp) as f64;
        let (kernel, bf16) = (median[3], median[2]);
        println!(
            "| [{rows}, {inp}] · [{out}, {inp}]ᵀ | {} | {} | {} | {} | {} | {} |",
            ms(median[0]),
            ms(median[1]),
            ms(bf16),
            ms(kernel),
            kernel.map_or("–".to_string(), |k| format!("{:.0}", flops / k / 1e6)),
            kernel
                .zip(bf16)
                .map_or("–".to_string(), |(k, b)| format!("{:.2}×", b / k)),
        );
    }
    Ok(())
}
