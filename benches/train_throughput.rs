//! Training throughput of Bella particles on the tiny fixture LLaVA (issue 3's figures):
//! examples per second for P = 1, 4, 8 in one batched run against P separate single-particle
//! runs, and the cost of an SVGD step relative to an ensemble step.
//!
//! Run: `cargo bench --profile dev --bench train_throughput` (the dev profile builds the
//! dependencies with opt-level 3; numbers are medians of 3 runs).

use std::time::Instant;

use bella_vqa::data::shapes::{generate, ShapesOptions};
use bella_vqa::data::{read_jsonl, ReadOptions};
use bella_vqa::hub::{resolve, HubOptions, ModelSource};
use bella_vqa::models::load;
use bella_vqa::train::{train, Kernel, Method, RunOptions, TrainOptions};
use candle_core::{DType, Device};

const STEPS: u64 = 6;
const BATCH: usize = 4;
const REPEATS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny-hub");
    let files = resolve(&ModelSource::Dir(fixture.clone()), &HubOptions::from_env())?;
    let data_dir = tempfile::tempdir()?;
    generate(&ShapesOptions {
        n: 64,
        ..ShapesOptions::new(data_dir.path())
    })?;
    let data = read_jsonl(
        &data_dir.path().join("train.jsonl"),
        &ReadOptions::default(),
    )?
    .examples;

    // Seconds for STEPS optimiser steps of `particles` particles.
    let time_run = |particles: usize, method: Method| -> anyhow::Result<f64> {
        let mut loaded = load(&files, &Device::Cpu, DType::F32)?;
        let out = tempfile::tempdir()?;
        let opts = TrainOptions {
            particles,
            method,
            kernel: Kernel::DeltaW,
            batch_size: BATCH,
            epochs: 1,
            ..TrainOptions::llava_defaults()
        };
        let run = RunOptions {
            out: out.path().to_path_buf(),
            resume: false,
            force: false,
            eval_every: u64::MAX,
            val_sample: 0,
            checkpoint_every: u64::MAX,
            max_steps: Some(STEPS),
            progress: false,
            model_source: fixture.display().to_string(),
            gradient_checkpointing: false,
        };
        let start = Instant::now();
        train(&mut loaded, &data, &[], &opts, &run)?;
        Ok(start.elapsed().as_secs_f64())
    };

    println!(
        "tiny fixture LLaVA, {STEPS} steps, batch {BATCH} per particle, targets q/k/v/o, r = 8"
    );
    println!("| P | batched: s | batched: examples/s | {{P}} separate runs: s | separate: examples/s | speed-up |");
    println!("|---|---|---|---|---|---|");
    let mut ensemble4 = 0.0;
    for p in [1usize, 4, 8] {
        let batched = median(
            (0..REPEATS)
                .map(|_| time_run(p, Method::Ensemble))
                .collect::<anyhow::Result<_>>()?,
        );
        let single = median(
            (0..REPEATS)
                .map(|_| time_run(1, Method::Ensemble))
                .collect::<anyhow::Result<_>>()?,
        );
        let separate = single * p as f64;
        let examples = (p * BATCH) as f64 * STEPS as f64;
        println!(
            "| {p} | {batched:.2} | {:.1} | {separate:.2} | {:.1} | {:.2}× |",
            examples / batched,
            examples / separate,
            separate / batched
        );
        if p == 4 {
            ensemble4 = batched;
        }
    }
    let svgd4 = median(
        (0..REPEATS)
            .map(|_| time_run(4, Method::Svgd))
            .collect::<anyhow::Result<_>>()?,
    );
    println!();
    println!(
        "P = 4: ensemble step {:.3} s, SVGD step {:.3} s ({:.2}× the ensemble step; SVGD particles share one minibatch)",
        ensemble4 / STEPS as f64,
        svgd4 / STEPS as f64,
        svgd4 / ensemble4
    );
    Ok(())
}
