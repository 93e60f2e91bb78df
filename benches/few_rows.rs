//! The base product of a decoding step, `x·Wᵀ` with 1–8 rows (one per particle), on the 7B
//! model's weight shapes in f16 and f32: candle's product against the few-rows kernels
//! (`src/bella/few_rows.rs`) on AVX2 and AVX-512. Microseconds per call (median of 5 timed loops,
//! the three ways interleaved), and what that means as weight bytes read per second and as
//! multiply-add throughput.
//!
//! Run: `cargo bench --bench few_rows` (release).

use std::time::Instant;

use bella_vqa::bella::few_rows::{matmul_with, Isa};
use candle_core::{DType, Device, Tensor};

fn main() -> anyhow::Result<()> {
    let kernels: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|isa| isa.available())
        .collect();
    println!("kernels on this CPU: {kernels:?}\n");
    print!("| W [out, in] | dtype | rows | candle µs |");
    for isa in &kernels {
        print!(" {isa:?} µs | {isa:?} GB/s | {isa:?} GFLOP/s |");
    }
    println!();
    println!(
        "|---|---|---:|---:|{}",
        "---:|---:|---:|".repeat(kernels.len())
    );
    for (out, inp) in [(4096, 4096), (11008, 4096), (4096, 11008)] {
        for dtype in [DType::F16, DType::F32] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?.to_dtype(dtype)?;
            for rows in [1, 2, 4, 8] {
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?.to_dtype(dtype)?;
                // A few tens of milliseconds per timed loop.
                let iters = (2e8 / (out * inp) as f64).clamp(3.0, 100.0) as usize;
                let mut ways: Vec<Box<dyn Fn() -> anyhow::Result<Tensor>>> =
                    vec![Box::new(|| Ok(x.matmul(&w.t()?)?))];
                for &isa in &kernels {
                    let (x, w) = (&x, &w);
                    ways.push(Box::new(move || {
                        matmul_with(x, w, isa)?.ok_or_else(|| anyhow::anyhow!("{isa:?} declined"))
                    }));
                }
                let mut times = vec![Vec::new(); ways.len()];
                for way in &ways {
                    way()?; // warm-up
                }
                for _ in 0..5 {
                    for (way, t) in ways.iter().zip(&mut times) {
                        let start = Instant::now();
                        for _ in 0..iters {
                            way()?;
                        }
                        t.push(start.elapsed().as_secs_f64() * 1e6 / iters as f64);
                    }
                }
                let median = |t: &mut Vec<f64>| {
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
                };
                let bytes = (out * inp * dtype.size_in_bytes()) as f64;
                let flops = 2.0 * (rows * out * inp) as f64;
                print!(
                    "| {out}×{inp} | {dtype:?} | {rows} | {:.0} |",
                    median(&mut times[0])
                );
                for t in &mut times[1..] {
                    let us = median(t);
                    print!(
                        " {us:.0} | {:.1} | {:.1} |",
                        bytes / us / 1e3,
                        flops / us / 1e3
                    );
                }
                println!();
            }
        }
    }
    Ok(())
}
