//! The `bella-vqa` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use bella_vqa::answer::generate::Sampling;
use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions, Response};
use bella_vqa::hub::{HubOptions, ModelSource};
use bella_vqa::inspect::ModelSummary;
use bella_vqa::logits;
use bella_vqa::models::image::load_image;
use bella_vqa::models::{self, LoadedModel};

#[derive(Parser)]
#[command(
    name = "bella-vqa",
    version,
    about = "Calibrated uncertainty for CLIP and LLaVA with Bella particles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Use only the local hub cache (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,
    /// No progress bars or status lines.
    #[arg(long, short, global = true)]
    quiet: bool,
}

/// Where the model comes from.
#[derive(Args)]
struct ModelArgs {
    /// A hub id (`org/name`, `org/name@revision`) or a local directory in the Hugging Face layout.
    #[arg(long)]
    model: String,
    /// Hub revision (branch, tag or commit); overrides `@revision` in --model.
    #[arg(long)]
    revision: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a model is: architecture, sizes, parameter count, dtype, files and their source.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer a question about an image with every particle, with a confidence and an
    /// uncertainty split; says "I'm not sure" below the abstention threshold.
    Ask {
        #[command(flatten)]
        model: ModelArgs,
        /// The image (PNG or JPEG).
        #[arg(long)]
        image: PathBuf,
        /// A particle directory (from `bella-vqa train`).
        #[arg(long)]
        adapters: Option<PathBuf>,
        /// Print one JSON object (answer, abstained, confidence, uncertainty, particles, response).
        #[arg(long)]
        json: bool,
        /// Also list every particle's own answer.
        #[arg(long)]
        show_particles: bool,
        /// Abstain below this confidence (default: the calibrated threshold of the particles).
        #[arg(long)]
        threshold: Option<f64>,
        /// A minijinja response template replacing prompts/response.jinja.
        #[arg(long)]
        template: Option<PathBuf>,
        /// CLIP: a file with one candidate answer per line.
        #[arg(long)]
        answers: Option<PathBuf>,
        /// Longest answer in tokens (LLaVA).
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Sample with this temperature instead of greedy decoding (LLaVA).
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling mass, with --temperature.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Sampling seed, with --temperature.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The question.
        question: String,
    },
    /// Write the input ids, pixel values, image features and logits of one prompt to a
    /// safetensors file, to compare the checkpoint with another implementation.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// An image (PNG or JPEG); the prompt then holds one `<image>` expanded to its features.
        #[arg(long)]
        image: Option<PathBuf>,
        /// The user's text; the model's chat template is applied unless --raw.
        #[arg(long)]
        prompt: String,
        /// Use --prompt as the exact text (it may contain `<image>`), without the chat template.
        #[arg(long)]
        raw: bool,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Answer a VQA set and write results.json, samples.jsonl and a Markdown/HTML report with
    /// calibration and selective-prediction metrics; `bench merge` combines shards.
    Bench(bella_vqa::bench::cli::BenchArgs),
    /// Choose the abstention threshold on validation questions and store it with the particles.
    Calibrate(bella_vqa::bench::cli::CalibrateArgs),
}

impl Cli {
    fn hub_options(&self) -> HubOptions {
        let mut opts = HubOptions::from_env();
        opts.offline |= self.offline;
        opts.progress &= !self.quiet;
        opts
    }
}

impl ModelArgs {
    fn source(&self) -> Result<ModelSource> {
        let mut source = ModelSource::parse(&self.model)?;
        if let (ModelSource::Hub { revision, .. }, Some(r)) = (&mut source, &self.revision) {
            *revision = Some(r.clone());
        }
        Ok(source)
    }

    fn load(&self, cli: &Cli) -> Result<LoadedModel> {
        models::load_source(&self.source()?, &cli.hub_options())
    }
}

/// One answer per line; blank lines and `#` comments skipped.
fn read_answers(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the answer list {}", path.display()))?;
    let answers: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if answers.is_empty() {
        anyhow::bail!("{} holds no answers (one per line)", path.display());
    }
    Ok(answers)
}

fn print_response(r: &Response, show_particles: bool) {
    println!("{}", r.response);
    let agree = r.particles.iter().filter(|p| p.answer == r.answer).count();
    println!(
        "confidence {:.0} % (threshold {:.0} %{}) · uncertainty {:.3} = aleatoric {:.3} + epistemic {:.3} nats · {agree}/{} particle(s) say \"{}\"",
        r.confidence * 100.0,
        r.threshold * 100.0,
        if r.calibrated { ", calibrated" } else { ", uncalibrated" },
        r.uncertainty.total,
        r.uncertainty.aleatoric,
        r.uncertainty.epistemic,
        r.particles.len(),
        r.answer
    );
    if show_particles {
        for (i, p) in r.particles.iter().enumerate() {
            println!(
                "  particle {i}: {:?} (log-likelihood {:.3})",
                p.answer, p.log_likelihood
            );
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Inspect { model, json } => {
            let loaded = model.load(cli)?;
            let summary = ModelSummary::new(&loaded);
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).context("serialising the summary")?
                );
            } else {
                print!("{summary}");
            }
        }
        Command::Ask {
            model,
            image,
            adapters,
            json,
            show_particles,
            threshold,
            template,
            answers,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            question,
        } => {
            let source = model.source()?;
            let opts = LoadOptions {
                hub: cli.hub_options(),
                ..LoadOptions::default()
            };
            let mut vqa = BellaVqa::load(&source, adapters.as_deref(), &opts)?;
            if let Some(path) = template {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the template {}", path.display()))?;
                vqa.set_response_template(&text)?;
            }
            if let Some(path) = answers {
                vqa.set_answer_vocabulary(read_answers(path)?);
            }
            let img = load_image(image)?;
            let ask = AskOptions {
                max_new_tokens: *max_new_tokens,
                sampling: match temperature {
                    Some(t) => Sampling::Sample {
                        temperature: *t,
                        top_p: *top_p,
                        seed: *seed,
                    },
                    None => Sampling::Greedy,
                },
                threshold: *threshold,
            };
            let response = vqa.ask_with(&img, question, &ask)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&response)?);
            } else {
                print_response(&response, *show_particles);
            }
        }
        Command::Bench(args) => bella_vqa::bench::cli::bench(args, cli.hub_options(), cli.quiet)?,
        Command::Calibrate(args) => {
            bella_vqa::bench::cli::calibrate(args, cli.hub_options(), cli.quiet)?
        }
        Command::Logits {
            model,
            image,
            prompt,
            raw,
            out,
        } => {
            let loaded = model.load(cli)?;
            let outputs = logits::prompt_outputs(&loaded, image.as_deref(), prompt, *raw)?;
            outputs.save(out)?;
            if !cli.quiet {
                eprintln!(
                    "wrote {}: input_ids {:?}, logits {:?}{}",
                    out.display(),
                    outputs.input_ids.dims(),
                    outputs.logits.dims(),
                    outputs
                        .image_features
                        .as_ref()
                        .map(|f| format!(", image_features {:?}", f.dims()))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
