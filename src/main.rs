//! The `bella-vqa` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use bella_vqa::hub::{HubOptions, ModelSource};
use bella_vqa::inspect::ModelSummary;
use bella_vqa::logits;
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
}

impl ModelArgs {
    fn load(&self, cli: &Cli) -> Result<LoadedModel> {
        let mut source = ModelSource::parse(&self.model)?;
        if let (ModelSource::Hub { revision, .. }, Some(r)) = (&mut source, &self.revision) {
            *revision = Some(r.clone());
        }
        let mut opts = HubOptions::from_env();
        opts.offline |= cli.offline;
        opts.progress &= !cli.quiet;
        models::load_source(&source, &opts)
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
