//! Latency and memory of one `ask` with Bella particles (issue 4, "Figures"; design §2, §5).
//! Results and how to read them: `eval/LATENCY.md`.
//!
//! ```sh
//! cargo bench --bench ask_latency                  # bench profile (= release; the recorded
//!                                                  # numbers; a first build compiles candle
//!                                                  # in release, about 10 minutes on 2 cores)
//! cargo bench --profile dev --bench ask_latency    # dev profile: this crate at opt-level 1,
//!                                                  # dependencies at 3 but with debug assertions
//! cargo bench --bench ask_latency -- --models medium --particles 1,8 --rounds 5 --runs 3
//! ```
//!
//! Options after `--`: `--models tiny,medium`, `--particles 1,4,8`, `--runs N` (timed calls per
//! process, default 3, after one warm-up), `--rounds N` (fresh processes per configuration,
//! default 3; every number is the median over the rounds of the per-process medians, and the
//! configurations take turns, so that the load of a shared machine hits them alike),
//! `--decode N` (decode steps, default 16), `--medium-dir DIR` (write the medium model there, or
//! reuse it), `--baseline EXE` (another build of this bench binary, e.g. copied from
//! `target/release/deps/ask_latency-*` before a change, measured in the same rounds and compared
//! configuration by configuration). `BELLA_LATENCY_OUT=FILE` also writes the Markdown tables to
//! FILE.
//!
//! Real-size checkpoints (issue 10; `scripts/make_real_size.py`, `scripts/scale/compare.py`):
//! `--model-dir DIR` measures an existing checkpoint instead of the tiny/medium ones (model name
//! `dir`, the default when it is given), `--targets PATTERNS` (comma-separated, as `train
//! --targets`, e.g. `language_model.layers.6-7.*.q_proj,…`) puts the particles on chosen layers,
//! `--dtype f32|bf16|f16|auto` and `--device cpu|cuda|cuda:N` choose how the model is loaded
//! (default f32 on the CPU; `auto` = f32 on the CPU, bf16 on a GPU), `--modes batched,sequential`
//! which paths run, `--parts ask,prefill,decode,scoring` which timings are taken (the others read
//! 0; a 7B-wide prompt makes every part cost seconds), `--warmup N` untimed calls before each
//! timed part (default 1), `--no-base` skips the P = 0 row, `--b-std X` sets the particles' random
//! B (default 0.1, so that particles differ; a small one makes them agree, as fine-tuned particles
//! mostly do, which decoding exploits), and `--json FILE` writes the combined measurements as
//! JSON.
//!
//! Two LLaVA models: the tiny test fixture (`tests/fixtures/llava-tiny-hub`) and a medium random
//! one of about 107 M parameters with realistic widths, written at start-up into a temporary
//! directory in the hub layout and loaded through the normal `models::load` path:
//!
//! - vision tower: CLIP ViT-B/32 widths (hidden 768, 12 heads, MLP 3072, patch 32 at 224 px →
//!   49 image tokens), 4 layers (LLaVA's feature layer −2 runs 3 of them);
//! - projector: 768 → 768 → 768 (GELU);
//! - decoder: LLaMA, hidden 768, 8 layers, 12 heads with 4 key/value heads (GQA), head dim 64,
//!   MLP 2048 (2.67×), vocabulary 32 000, `lm_head` tied to the embeddings;
//! - tokenizer, chat template and image processor copied from the tiny fixture (its 422 ids are a
//!   prefix of the 32 000; tokens past them decode to nothing — the point is the compute).
//!
//! Particles: the design default targets (`q_proj`, `k_proj`, `v_proj`, `o_proj` of every decoder
//! layer), rank 8, α 16, random B (std 0.1, so particles differ). For every P it measures, each the
//! median of `--runs` runs after one warm-up:
//!
//! - `ask`: one full `BellaVqa::ask_with` (preprocess, prefill, greedy decode of up to 16 tokens
//!   with end-of-sequence stop, candidate scoring, aggregation, template);
//! - its parts on the same prompt: `prefill` (vision tower once + decoder over the prompt),
//!   `decode` (`generate` with no end token, so exactly `--decode` cached decoder steps), and
//!   `scoring` (`score_candidates` of 4 fixed candidates — "red", "blue circle", "two small",
//!   "a green square" plus the end token: 2, 3, 6 and 4 tokens with the fixture's tokenizer —
//!   under all particles in one batch);
//! - the same parts for P sequential single-particle runs with merged weights
//!   (`merged_particle`, merging not timed), summed over the particles.
//!
//! Memory: bytes of the base weights (f32, from the stored tensors) and of the adapters (from the
//! A and B tensors), RSS after loading, and the peak RSS (VmHWM) while answering — each
//! configuration runs in a fresh process (this binary re-executes itself with `--child`), and the
//! peak is reset after loading (`/proc/self/clear_refs`), since loading reads the memory-mapped
//! file and its copy at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bella_vqa::answer::generate::{generate, GenerateOptions, Generated, Sampling};
use bella_vqa::answer::score::score_candidates;
use bella_vqa::answer::{AskOptions, BellaVqa};
use bella_vqa::bella::{attach, merged_particle, AdapterSpec, InitB, ParticleModel};
use bella_vqa::hub::{resolve, HubOptions, ModelSource};
use bella_vqa::models::llava::{LlavaInput, LlavaModel};
use bella_vqa::models::{self, Model};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

const QUESTION: &str = "What color is the circle?";
const IMAGE: &str = "tests/fixtures/images/photo.png";
const SEED: u64 = 7;
/// The particles' random B (default `--b-std`): large enough that random-weight particles
/// differ.
const B_STD: f64 = 0.1;
/// Words whose tokens (plus the end token) are the scored candidates.
const CANDIDATES: &[&str] = &["red", "blue circle", "two small", "a green square"];

#[derive(Clone, Debug)]
struct Args {
    runs: usize,
    rounds: usize,
    decode: usize,
    models: Vec<String>,
    particles: Vec<usize>,
    /// Where to write (or find, if it has a config.json) the medium model; a temp dir otherwise.
    medium_dir: Option<PathBuf>,
    /// Another build of this bench binary (e.g. before a change) measured in the same rounds.
    baseline: Option<PathBuf>,
    /// An existing checkpoint measured as model `dir`.
    model_dir: Option<PathBuf>,
    /// Particle target patterns (default: the design default, attention of every decoder layer).
    targets: Option<String>,
    dtype: String,
    device: String,
    modes: Vec<String>,
    parts: Vec<String>,
    base_row: bool,
    json: Option<PathBuf>,
    /// Untimed calls before the timed ones.
    warmup: usize,
    /// Standard deviation of the particles' random B.
    b_std: f64,
}

fn parse_args(raw: &[String]) -> Result<Args> {
    let mut args = Args {
        runs: 3,
        rounds: 3,
        decode: 16,
        models: vec!["tiny".into(), "medium".into()],
        particles: vec![1, 4, 8],
        medium_dir: None,
        baseline: None,
        model_dir: None,
        targets: None,
        dtype: "f32".into(),
        device: "cpu".into(),
        modes: vec!["batched".into(), "sequential".into()],
        parts: PARTS.iter().map(|s| s.to_string()).collect(),
        base_row: true,
        json: None,
        warmup: 1,
        b_std: B_STD,
    };
    let mut models_given = false;
    let mut it = raw.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().context(format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse()?,
            "--decode" => args.decode = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--models" => {
                models_given = true;
                args.models = value()?.split(',').map(str::to_string).collect()
            }
            "--model-dir" => args.model_dir = Some(PathBuf::from(value()?)),
            "--targets" => args.targets = Some(value()?.clone()),
            "--dtype" => args.dtype = value()?.clone(),
            "--device" => args.device = value()?.clone(),
            "--modes" => args.modes = value()?.split(',').map(str::to_string).collect(),
            "--parts" => args.parts = value()?.split(',').map(str::to_string).collect(),
            "--no-base" => args.base_row = false,
            "--warmup" => args.warmup = value()?.parse()?,
            "--b-std" => args.b_std = value()?.parse()?,
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--baseline" => args.baseline = Some(PathBuf::from(value()?)),
            "--medium-dir" => args.medium_dir = Some(PathBuf::from(value()?)),
            "--particles" => {
                args.particles = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<std::result::Result<_, _>>()?
            }
            // `cargo bench` passes `--bench`; libtest filters are ignored too.
            _ => {}
        }
    }
    if args.runs == 0 || args.rounds == 0 || args.decode == 0 {
        bail!("--runs, --rounds and --decode must be at least 1");
    }
    if args.model_dir.is_some() && !models_given {
        args.models = vec!["dir".into()];
    }
    for m in &args.modes {
        if m != "batched" && m != "sequential" {
            bail!("--modes: unknown mode {m:?} (batched, sequential)");
        }
    }
    for p in &args.parts {
        if !PARTS.contains(&p.as_str()) {
            bail!("--parts: unknown part {p:?} ({})", PARTS.join(", "));
        }
    }
    parse_dtype(&args.dtype, &args.device)?;
    parse_device(&args.device)?;
    Ok(args)
}

/// The timings `--parts` can select.
const PARTS: &[&str] = &["ask", "prefill", "decode", "scoring"];

/// `--dtype`: the compute dtype of the frozen weights (`auto`: f32 on the CPU, bf16 on a GPU).
fn parse_dtype(dtype: &str, device: &str) -> Result<DType> {
    Ok(match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "auto" if device == "cpu" => DType::F32,
        "auto" => DType::BF16,
        other => bail!("--dtype {other:?}: expected auto, f32, bf16 or f16"),
    })
}

/// `--device cpu|cuda|cuda:N` (a CUDA device needs a build with candle's `cuda` feature).
fn parse_device(device: &str) -> Result<Device> {
    Ok(match device {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        d => match d.strip_prefix("cuda:") {
            Some(n) => Device::new_cuda(n.parse().context("--device cuda:N")?)?,
            None => bail!("--device {d:?}: expected cpu, cuda or cuda:N"),
        },
    })
}

fn main() -> Result<()> {
    bella_vqa::prepare_process(); // as the CLI does (child processes start here too)
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("--child") {
        return child(&raw[1..]);
    }
    let args = parse_args(&raw)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir()?;
    let mut report = String::new();
    for name in &args.models {
        let dir = match name.as_str() {
            "tiny" => root.join("tests/fixtures/llava-tiny-hub"),
            "medium" => {
                let dir = match &args.medium_dir {
                    Some(d) => d.clone(),
                    None => tmp.path().join("llava-medium"),
                };
                if !dir.join("config.json").is_file() {
                    let t = Instant::now();
                    let params = write_medium(&root.join("tests/fixtures/llava-tiny-hub"), &dir)?;
                    eprintln!(
                        "wrote the medium random LLaVA ({:.1} M parameters) to {} in {:.1} s",
                        params as f64 / 1e6,
                        dir.display(),
                        t.elapsed().as_secs_f64()
                    );
                }
                dir
            }
            "dir" => args
                .model_dir
                .clone()
                .context("model `dir` needs --model-dir DIR")?,
            other => bail!("unknown model {other:?} (tiny, medium, dir)"),
        };
        let name = &if name == "dir" {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dir".into())
        } else {
            name.clone()
        };
        // P = 0: the base model without adapters (one answer), the reference every report uses.
        let configs: Vec<(usize, &str)> = args
            .base_row
            .then_some((0, "batched"))
            .into_iter()
            .chain(args.particles.iter().flat_map(|&p| {
                ["batched", "sequential"]
                    .into_iter()
                    .filter(|m| args.modes.iter().any(|x| x == m))
                    .map(move |m| (p, m))
            }))
            .collect();
        // Rounds over all configurations (and builds), so that slow drifts of the machine's load
        // hit every configuration alike; each number is the median over the rounds of per-round
        // medians.
        let mut builds = vec![("this build".to_string(), std::env::current_exe()?)];
        if let Some(b) = &args.baseline {
            builds.push((format!("baseline {}", b.display()), b.clone()));
        }
        let mut rounds: Vec<Vec<Vec<Measured>>> =
            vec![vec![Vec::new(); configs.len()]; builds.len()];
        for round in 0..args.rounds {
            for (i, &(p, mode)) in configs.iter().enumerate() {
                // Alternate which build goes first.
                for k in 0..builds.len() {
                    let b = (k + round) % builds.len();
                    eprintln!(
                        "{name}: round {}/{}, P = {p}, {mode}, {} …",
                        round + 1,
                        args.rounds,
                        builds[b].0
                    );
                    rounds[b][i].push(run_child(&builds[b].1, &dir, mode, p, &args)?);
                }
            }
        }
        let results: Vec<Vec<Measured>> = rounds
            .iter()
            .map(|b| b.iter().map(|r| combine(r)).collect())
            .collect();
        if let Some(path) = &args.json {
            let json = serde_json::json!({
                "model": name,
                "dir": dir,
                "dtype": args.dtype,
                "device": args.device,
                "targets": args.targets,
                "rounds": args.rounds,
                "runs": args.runs,
                "decode_steps": args.decode,
                "results": results[0],
                "per_round": rounds[0],
            });
            std::fs::write(path, serde_json::to_string_pretty(&json)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        for (b, (label, _)) in builds.iter().enumerate() {
            let mut table = tables(name, &results[b], &args);
            if builds.len() > 1 {
                table = format!("#### {label}\n\n{table}");
            }
            println!("{table}");
            report.push_str(&table);
        }
        if builds.len() > 1 {
            let table = comparison(name, &results[0], &results[1], &args);
            println!("{table}");
            report.push_str(&table);
        }
    }
    if let Ok(path) = std::env::var("BELLA_LATENCY_OUT") {
        std::fs::write(&path, &report).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// Per-round measurements of one configuration → medians over the rounds.
fn combine(rounds: &[Measured]) -> Measured {
    let med = |f: &dyn Fn(&Measured) -> f64| median(rounds.iter().map(f).collect());
    let medu = |f: &dyn Fn(&Measured) -> usize| med(&|m| f(m) as f64).round() as usize;
    let first = &rounds[0];
    Measured {
        prefill_ms: med(&|m| m.prefill_ms),
        decode_ms: med(&|m| m.decode_ms),
        scoring_ms: med(&|m| m.scoring_ms),
        ask_ms: first.ask_ms.map(|_| med(&|m| m.ask_ms.unwrap_or(f64::NAN))),
        rss_loaded: medu(&|m| m.rss_loaded),
        rss_peak: medu(&|m| m.rss_peak),
        decode_per_round: rounds.iter().map(|m| m.decode_ms).collect(),
        ..first.clone()
    }
}

/// Runs one configuration in a fresh process of `exe` (this bench binary, or a baseline build of it).
fn run_child(exe: &Path, dir: &Path, mode: &str, p: usize, args: &Args) -> Result<Measured> {
    let out = Command::new(exe)
        .env("BELLA_BENCH_DTYPE", &args.dtype)
        .env("BELLA_BENCH_DEVICE", &args.device)
        .env("BELLA_BENCH_TARGETS", args.targets.as_deref().unwrap_or(""))
        .env("BELLA_BENCH_PARTS", args.parts.join(","))
        .env("BELLA_BENCH_WARMUP", args.warmup.to_string())
        .env("BELLA_BENCH_B_STD", args.b_std.to_string())
        .arg("--child")
        .arg(mode)
        .arg(dir)
        .arg(p.to_string())
        .arg(args.runs.to_string())
        .arg(args.decode.to_string())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "child {mode} P = {p} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("child printed no result")?;
    Ok(serde_json::from_str(line)?)
}

// ---------------------------------------------------------------------------------------------
// One configuration, in its own process
// ---------------------------------------------------------------------------------------------

/// Medians in milliseconds; memory in bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Measured {
    mode: String,
    particles: usize,
    params: usize,
    base_bytes: usize,
    adapter_bytes: usize,
    rss_loaded: usize,
    rss_peak: usize,
    prompt_tokens: usize,
    prefill_ms: f64,
    decode_ms: f64,
    decode_steps: usize,
    scoring_ms: f64,
    ask_ms: Option<f64>,
    ask_candidates: Option<usize>,
    /// Decode time of each round (filled in by the parent).
    #[serde(default)]
    decode_per_round: Vec<f64>,
    /// Greedy tokens of every particle (to compare the batched and sequential paths).
    tokens: Vec<Vec<u32>>,
}

/// The "P" and "path" cells of a table row.
fn row_label(r: &Measured) -> (String, String) {
    match (r.particles, r.mode.as_str()) {
        (0, _) => ("base".to_string(), "no adapters".to_string()),
        (p, "batched") => (p.to_string(), "batched".to_string()),
        (p, _) => (p.to_string(), format!("{p} × merged")),
    }
}

fn child(raw: &[String]) -> Result<()> {
    let [mode, dir, p, runs, decode] = raw else {
        bail!("usage: --child batched|sequential|decode DIR P RUNS DECODE");
    };
    let (p, runs, decode): (usize, usize, usize) = (p.parse()?, runs.parse()?, decode.parse()?);
    // Options of the parent (`--dtype`, `--device`, `--targets`, `--parts`), through the environment.
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let device_name = env("BELLA_BENCH_DEVICE").unwrap_or_else(|| "cpu".into());
    let device = parse_device(&device_name)?;
    let dtype = parse_dtype(
        &env("BELLA_BENCH_DTYPE").unwrap_or_else(|| "f32".into()),
        &device_name,
    )?;
    let parts: Vec<String> = env("BELLA_BENCH_PARTS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| PARTS.iter().map(|s| s.to_string()).collect());
    let part = |name: &str| parts.iter().any(|p| p == name);
    let files = resolve(&ModelSource::Dir(dir.into()), &HubOptions::from_env())?;
    let mut loaded = models::load(&files, &device, dtype)?;
    let params = loaded.info.parameters;
    if p > 0 {
        let mut spec = AdapterSpec {
            particles: p,
            ..AdapterSpec::default_for_llava()
        };
        if let Some(t) = env("BELLA_BENCH_TARGETS") {
            spec.targets = t.split(',').map(str::to_string).collect();
        }
        let std = env("BELLA_BENCH_B_STD").map_or(Ok(B_STD), |v| v.parse())?;
        attach(&mut loaded.model, &spec, InitB::Normal { std }, SEED)?;
    }
    let adapter_bytes: usize = loaded
        .model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.adapter())
        .map(|a| (a.a.elem_count() + a.b.elem_count()) * a.a.dtype().size_in_bytes())
        .sum();
    let rss_loaded = proc_status("VmRSS")?;
    reset_peak();

    let image = bella_vqa::models::image::load_image(IMAGE.as_ref())?;
    let vqa = BellaVqa::from_loaded(loaded, None)?;
    let loaded = vqa.model();
    let Model::Llava(model) = &loaded.model else {
        bail!("not a LLaVA model");
    };
    let prompter = loaded.prompter()?;
    let pixels = loaded.image_processor()?.preprocess(&image)?.unsqueeze(0)?;
    let text = prompter.render_question(QUESTION, true)?;
    let ids = prompter.encode(&text, model.config().image_tokens_per_image())?;
    let prompt_tokens = ids.len();
    let input_ids = Tensor::from_vec(ids, (1, prompt_tokens), &device)?;
    let pixels = pixels.to_device(&device)?;
    let keep = vec![vec![true; prompt_tokens]];
    let input = LlavaInput {
        input_ids: &input_ids,
        pixel_values: Some(&pixels),
        keep: &keep,
        expanded: false,
    };
    let end = prompter
        .eos_token_id()
        .context("the tokenizer has no end token")?;
    let candidates: Vec<Vec<u32>> = CANDIDATES
        .iter()
        .map(|w| {
            let enc = prompter
                .tokenizer()
                .encode(*w, false)
                .map_err(anyhow::Error::msg)?;
            let mut ids = enc.get_ids().to_vec();
            ids.push(end);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let gen = GenerateOptions {
        max_new_tokens: decode + 1, // the first token comes from the prefill's logits
        eos: Vec::new(),
        sampling: Sampling::Greedy,
    };
    let tokens = |g: Vec<Generated>| g.into_iter().map(|g| g.tokens).collect::<Vec<_>>();

    let measured = match mode.as_str() {
        "batched" => {
            let particles = vqa.particles();
            let opts = AskOptions::default();
            let mut k = 0;
            let ask_ms = time_if(part("ask"), runs, || {
                k = vqa.ask_with(&image, QUESTION, &opts)?.candidates.len();
                Ok(())
            })?;
            let prefill_ms = time_if(part("prefill"), runs, || {
                Ok(model.prefill(&input, particles).map(drop)?)
            })?;
            let prefill = model.prefill(&input, particles)?;
            let lm = &model.language_model;
            let decode_ms = time_if(part("decode"), runs, || {
                generate(lm, &prefill, particles, &gen).map(drop)
            })?;
            let scoring_ms = time_if(part("scoring"), runs, || {
                score_candidates(lm, &prefill, &candidates, particles).map(drop)
            })?;
            Measured {
                mode: mode.clone(),
                particles: p,
                params,
                base_bytes: 0,
                adapter_bytes,
                rss_loaded,
                rss_peak: 0,
                prompt_tokens,
                prefill_ms,
                decode_ms,
                decode_steps: decode,
                scoring_ms,
                ask_ms: part("ask").then_some(ask_ms),
                ask_candidates: part("ask").then_some(k),
                decode_per_round: Vec::new(),
                tokens: tokens(generate(lm, &prefill, particles, &gen)?),
            }
        }
        // Only the decode loop, for profilers (`perf record … --child decode DIR P RUNS DECODE`).
        "decode" => {
            let particles = vqa.particles();
            let prefill = model.prefill(&input, particles)?;
            let lm = &model.language_model;
            let decode_ms = time(runs, || generate(lm, &prefill, particles, &gen).map(drop))?;
            eprintln!("decode: {:.2} ms per step", decode_ms / decode as f64);
            return Ok(());
        }
        "sequential" => {
            let merged: Vec<LlavaModel> = (0..p)
                .map(|i| merged_particle(model.as_ref(), i))
                .collect::<Result<_>>()?;
            let mut sums = [0.0f64; 3];
            let mut all_tokens = Vec::new();
            for m in &merged {
                let lm = &m.language_model;
                sums[0] += time_if(part("prefill"), runs, || {
                    Ok(m.prefill(&input, 1).map(drop)?)
                })?;
                let prefill = m.prefill(&input, 1)?;
                sums[1] += time_if(part("decode"), runs, || {
                    generate(lm, &prefill, 1, &gen).map(drop)
                })?;
                sums[2] += time_if(part("scoring"), runs, || {
                    score_candidates(lm, &prefill, &candidates, 1).map(drop)
                })?;
                all_tokens.extend(tokens(generate(lm, &prefill, 1, &gen)?));
            }
            Measured {
                mode: mode.clone(),
                particles: p,
                params,
                base_bytes: 0,
                adapter_bytes,
                rss_loaded,
                rss_peak: 0,
                prompt_tokens,
                prefill_ms: sums[0],
                decode_ms: sums[1],
                decode_steps: decode,
                scoring_ms: sums[2],
                ask_ms: None,
                ask_candidates: None,
                decode_per_round: Vec::new(),
                tokens: all_tokens,
            }
        }
        other => bail!("unknown mode {other:?}"),
    };
    let measured = Measured {
        base_bytes: params * dtype.size_in_bytes(),
        rss_peak: proc_status("VmHWM")?,
        ..measured
    };
    println!("RESULT {}", serde_json::to_string(&measured)?);
    Ok(())
}

/// [`time`] when `on`, else 0 without calling `f` (a part left out by `--parts`).
fn time_if(on: bool, runs: usize, f: impl FnMut() -> anyhow::Result<()>) -> Result<f64> {
    if on {
        time(runs, f)
    } else {
        Ok(0.0)
    }
}

/// Median wall time in ms of `runs` calls after the warm-up calls (one, or `--warmup N`).
fn time(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> Result<f64> {
    let warmup: usize = std::env::var("BELLA_BENCH_WARMUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A `/proc/self/status` entry in bytes (`VmRSS`, `VmHWM`).
fn proc_status(key: &str) -> Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .with_context(|| format!("no {key} in /proc/self/status"))?;
    let kb: usize = line.trim().trim_end_matches("kB").trim().parse()?;
    Ok(kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); without it the peak includes loading.
fn reset_peak() {
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset the peak RSS: it includes loading");
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

fn mb(bytes: usize) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib < 10.0 {
        format!("{mib:.2}")
    } else {
        format!("{mib:.1}")
    }
}

fn tables(name: &str, results: &[Measured], args: &Args) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let first = &results[0];
    let _ = writeln!(
        s,
        "### {name} LLaVA ({:.2} M parameters, prompt {} tokens)\n",
        first.params as f64 / 1e6,
        first.prompt_tokens
    );
    let _ = writeln!(
        s,
        "ms; median over {} rounds of the median of {} runs (one fresh process per configuration \
         and round). Decode: {} cached steps, per step. Scoring: {} candidates × all particles. \
         Parts total = prefill + {} decode steps + scoring. ask: one full `ask_with` (≤ 16 tokens, \
         stops at the end token), K = distinct answers scored.\n",
        args.rounds,
        args.runs,
        args.decode,
        CANDIDATES.len(),
        args.decode
    );
    let _ = writeln!(
        s,
        "| P | path | prefill | decode / token | scoring | parts total | ask (K) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for r in results {
        let (p, path) = row_label(r);
        let ask = match (r.ask_ms, r.ask_candidates) {
            (Some(ms), Some(k)) => format!("{ms:.1} ({k})"),
            _ => "–".into(),
        };
        let cell = |part: &str, ms: f64, digits: usize| {
            if timed(args, part) {
                format!("{ms:.digits$}")
            } else {
                "–".into()
            }
        };
        let total = if all_parts_timed(args) {
            format!("{:.1}", r.prefill_ms + r.decode_ms + r.scoring_ms)
        } else {
            "–".into()
        };
        let _ = writeln!(
            s,
            "| {p} | {path} | {} | {} | {} | {total} | {ask} |",
            cell("prefill", r.prefill_ms, 1),
            cell("decode", r.decode_ms / r.decode_steps as f64, 2),
            cell("scoring", r.scoring_ms, 1),
        );
    }
    let by = |p: usize, mode: &str| results.iter().find(|r| r.particles == p && r.mode == mode);
    let _ = writeln!(s);
    // The ratios of decode steps and of the parts' totals need every part timed.
    let one = by(1, "batched").filter(|_| all_parts_timed(args));
    if let Some(one) = one {
        for &p in &args.particles {
            if p == 1 {
                continue;
            }
            if let (Some(b), Some(q)) = (by(p, "batched"), by(p, "sequential")) {
                let per_round: Vec<String> = b
                    .decode_per_round
                    .iter()
                    .zip(&one.decode_per_round)
                    .map(|(x, y)| format!("{:.2}", x / y))
                    .collect();
                let _ = writeln!(
                    s,
                    "- decode P = {p} / P = 1: batched {:.2}× (per round: {}), sequential {:.2}×; \
                     parts total batched {:.2}×, sequential {:.2}×",
                    b.decode_ms / one.decode_ms,
                    per_round.join(", "),
                    q.decode_ms / one.decode_ms,
                    (b.prefill_ms + b.decode_ms + b.scoring_ms)
                        / (one.prefill_ms + one.decode_ms + one.scoring_ms),
                    (q.prefill_ms + q.decode_ms + q.scoring_ms)
                        / (one.prefill_ms + one.decode_ms + one.scoring_ms),
                );
            }
        }
    }
    for &p in &args.particles {
        if let (Some(b), Some(q)) = (by(p, "batched"), by(p, "sequential")) {
            let same = b
                .tokens
                .iter()
                .zip(&q.tokens)
                .filter(|(x, y)| x == y)
                .count();
            let _ = writeln!(
                s,
                "- P = {p}: {same} of {} particles decode the same {} greedy tokens batched and merged",
                b.tokens.len(),
                args.decode + 1
            );
        }
    }
    let _ = writeln!(
        s,
        "\nMemory (MiB; RSS per fresh process, peak while answering):\n"
    );
    let _ = writeln!(
        s,
        "| P | path | base weights | adapters | adapters / base | RSS after load | peak RSS answering |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for r in results {
        let (p, path) = row_label(r);
        let _ = writeln!(
            s,
            "| {p} | {path} | {} | {} | {:.2} % | {} | {} |",
            mb(r.base_bytes),
            mb(r.adapter_bytes),
            100.0 * r.adapter_bytes as f64 / r.base_bytes as f64,
            mb(r.rss_loaded),
            mb(r.rss_peak),
        );
    }
    s.push('\n');
    s
}

/// Whether `--parts` took the timing `part` (the others read 0).
fn timed(args: &Args, part: &str) -> bool {
    args.parts.iter().any(|p| p == part)
}

/// Whether the parts that add up to an answer (prefill, decode, scoring) were all timed.
fn all_parts_timed(args: &Args) -> bool {
    ["prefill", "decode", "scoring"]
        .iter()
        .all(|p| timed(args, p))
}

/// This build against the baseline, configuration by configuration.
fn comparison(name: &str, this: &[Measured], base: &[Measured], args: &Args) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "#### {name}: this build / baseline (ms, same rounds)\n\n\
         | P | path | prefill | decode / token | scoring | ask |\n|---|---|---:|---:|---:|---:|\n"
    );
    for (t, b) in this.iter().zip(base) {
        let ratio = |x: f64, y: f64| format!("{x:.1} / {y:.1} ({:+.0} %)", 100.0 * (x / y - 1.0));
        let cell = |part: &str, x: f64, y: f64| {
            if timed(args, part) {
                ratio(x, y)
            } else {
                "–".into()
            }
        };
        let ask = match (t.ask_ms, b.ask_ms) {
            (Some(x), Some(y)) => ratio(x, y),
            _ => "–".into(),
        };
        let steps = t.decode_steps as f64;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {ask} |",
            if t.particles == 0 {
                "base".to_string()
            } else {
                t.particles.to_string()
            },
            t.mode,
            cell("prefill", t.prefill_ms, b.prefill_ms),
            cell("decode", t.decode_ms / steps, b.decode_ms / steps),
            cell("scoring", t.scoring_ms, b.scoring_ms),
        );
    }
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------------------------
// The medium random LLaVA
// ---------------------------------------------------------------------------------------------

/// Writes the medium random LLaVA into `dir` (hub layout); returns its parameter count.
fn write_medium(tiny: &Path, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny.join(f), dir.join(f))?;
    }
    let (vh, vi, vl, vheads, patch, size) = (768, 3072, 4, 12, 32, 224);
    let (h, inter, layers, heads, kv_heads, vocab) = (768, 2048, 8, 12, 4, 32000);
    let hd = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 420,
        "pad_token_id": 421,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vh, "intermediate_size": vi, "num_hidden_layers": vl,
            "num_attention_heads": vheads, "patch_size": patch, "image_size": size,
            "projection_dim": 512, "hidden_act": "quick_gelu"
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": vocab, "tie_word_embeddings": true, "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": 2
        },
        "vocab_size": vocab
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut pre: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        tiny.join("preprocessor_config.json"),
    )?)?;
    pre["crop_size"] = serde_json::json!({"height": size, "width": size});
    pre["size"] = serde_json::json!({ "shortest_edge": size });
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string())?;
    let mut proc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        tiny.join("processor_config.json"),
    )?)?;
    proc["patch_size"] = serde_json::json!(patch);
    std::fs::write(dir.join("processor_config.json"), proc.to_string())?;

    let mut rng = StdRng::seed_from_u64(SEED);
    let normal = Normal::new(0.0f32, 0.02)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], fill: Option<f32>| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match fill {
            Some(v) => vec![v; n],
            None => (0..n).map(|_| normal.sample(&mut rng)).collect(),
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let v = "vision_tower.vision_model";
    add(format!("{v}.embeddings.class_embedding"), &[vh], None)?;
    add(
        format!("{v}.embeddings.patch_embedding.weight"),
        &[vh, 3, patch, patch],
        None,
    )?;
    let positions = (size / patch) * (size / patch) + 1;
    add(
        format!("{v}.embeddings.position_embedding.weight"),
        &[positions, vh],
        None,
    )?;
    for ln in ["pre_layrnorm", "post_layernorm"] {
        add(format!("{v}.{ln}.weight"), &[vh], Some(1.0))?;
        add(format!("{v}.{ln}.bias"), &[vh], Some(0.0))?;
    }
    for i in 0..vl {
        let l = format!("{v}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{ln}.weight"), &[vh], Some(1.0))?;
            add(format!("{l}.{ln}.bias"), &[vh], Some(0.0))?;
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{l}.self_attn.{proj}.weight"), &[vh, vh], None)?;
            add(format!("{l}.self_attn.{proj}.bias"), &[vh], Some(0.0))?;
        }
        add(format!("{l}.mlp.fc1.weight"), &[vi, vh], None)?;
        add(format!("{l}.mlp.fc1.bias"), &[vi], Some(0.0))?;
        add(format!("{l}.mlp.fc2.weight"), &[vh, vi], None)?;
        add(format!("{l}.mlp.fc2.bias"), &[vh], Some(0.0))?;
    }
    let p = "multi_modal_projector";
    add(format!("{p}.linear_1.weight"), &[h, vh], None)?;
    add(format!("{p}.linear_1.bias"), &[h], Some(0.0))?;
    add(format!("{p}.linear_2.weight"), &[h, h], None)?;
    add(format!("{p}.linear_2.bias"), &[h], Some(0.0))?;
    let m = "language_model.model";
    add(format!("{m}.embed_tokens.weight"), &[vocab, h], None)?;
    add(format!("{m}.norm.weight"), &[h], Some(1.0))?;
    for i in 0..layers {
        let l = format!("{m}.layers.{i}");
        add(format!("{l}.input_layernorm.weight"), &[h], Some(1.0))?;
        add(
            format!("{l}.post_attention_layernorm.weight"),
            &[h],
            Some(1.0),
        )?;
        add(
            format!("{l}.self_attn.q_proj.weight"),
            &[heads * hd, h],
            None,
        )?;
        add(
            format!("{l}.self_attn.k_proj.weight"),
            &[kv_heads * hd, h],
            None,
        )?;
        add(
            format!("{l}.self_attn.v_proj.weight"),
            &[kv_heads * hd, h],
            None,
        )?;
        add(
            format!("{l}.self_attn.o_proj.weight"),
            &[h, heads * hd],
            None,
        )?;
        add(format!("{l}.mlp.gate_proj.weight"), &[inter, h], None)?;
        add(format!("{l}.mlp.up_proj.weight"), &[inter, h], None)?;
        add(format!("{l}.mlp.down_proj.weight"), &[h, inter], None)?;
    }
    let params = tensors.values().map(Tensor::elem_count).sum();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(params)
}
