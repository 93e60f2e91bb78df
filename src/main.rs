//! The `bella-vqa` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use bella_vqa::answer::generate::Sampling;
use bella_vqa::answer::{AskOptions, BellaVqa, LoadOptions, Response};
use bella_vqa::console::StdoutError;
use bella_vqa::hub::{HubOptions, ModelSource};
use bella_vqa::inspect::ModelSummary;
use bella_vqa::interrupt::Interrupted;
use bella_vqa::logits;
use bella_vqa::models::compute::ComputeArgs;
use bella_vqa::models::image::load_image;
use bella_vqa::models::{self, LoadedModel};
use bella_vqa::train::{self, Kernel, Method, RunOptions, TrainOptions};
use bella_vqa::{note, out};

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
#[derive(Args, Clone)]
struct ModelArgs {
    /// A hub id (`org/name`, `org/name@revision`) or a local directory in the Hugging Face layout
    /// (default: the embedded shapes-world demo LLaVA, also named `demo`; `demo:clip` its CLIP).
    #[arg(long)]
    model: Option<String>,
    /// Hub revision (branch, tag or commit); overrides `@revision` in --model.
    #[arg(long)]
    revision: Option<String>,
    #[command(flatten)]
    compute: ComputeArgs,
    #[command(flatten)]
    quantize: bella_vqa::models::quant::QuantizeArgs,
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
    // A negative number is a value (`--grad-clip -1` is then refused by the range check).
    #[command(allow_negative_numbers = true)]
    Ask {
        #[command(flatten)]
        vqa: VqaArgs,
        /// The image (PNG, JPEG, WebP, GIF, BMP or TIFF).
        #[arg(long)]
        image: PathBuf,
        /// Print one JSON object (answer, abstained, confidence, uncertainty, particles, response).
        #[arg(long)]
        json: bool,
        /// Also list every particle's own answer.
        #[arg(long)]
        show_particles: bool,
        /// Abstain below this score of the selector, and only then: it replaces the calibrated rule
        /// (the particles' threshold and their image check, whose verdict is still reported).
        #[arg(long)]
        threshold: Option<f64>,
        /// Longest answer in tokens (LLaVA) [default: 16, or the room a long question leaves in
        /// the model's positions].
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Sample with this temperature instead of greedy decoding (LLaVA). The calibrated
        /// threshold and image check still apply, but the answer is marked uncalibrated: they
        /// were chosen on greedy answers.
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling mass, with --temperature (default 1).
        #[arg(long, requires = "temperature")]
        top_p: Option<f64>,
        /// Sampling seed, with --temperature (default 0).
        #[arg(long, requires = "temperature")]
        seed: Option<u64>,
        /// The question.
        question: String,
    },
    /// Serve the model over HTTP: an OpenAI-compatible `POST /v1/chat/completions` whose answers
    /// carry a `bella` object (confidence, uncertainty, abstention, particles), a web page at `/`,
    /// `/v1/models`, `/health` and `/metrics`.
    Serve(Box<ServeArgs>),
    /// Train Bella particles on VQA data (JSONL, VQAv2, VizWiz, TextVQA, GQA or A-OKVQA).
    // A negative number is a value (`--grad-clip -1` is then refused by the range check).
    #[command(allow_negative_numbers = true)]
    Train(Box<TrainArgs>),
    /// Generate VQA data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write the input ids, pixel values, image features and logits of one prompt to a
    /// safetensors file, to compare the checkpoint with another implementation.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// An image (PNG, JPEG, WebP, GIF, BMP or TIFF); the prompt then holds one `<image>` expanded to its features.
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
    // A negative number is a value (`--grad-clip -1` is then refused by the range check).
    #[command(allow_negative_numbers = true)]
    Bench(bella_vqa::bench::cli::BenchArgs),
    /// Choose the abstention threshold on validation questions and store it with the particles.
    ///
    /// The particles' answers are kept with them (calibrate_answers.jsonl) until a calibration
    /// is stored: after a Ctrl-C, a question that stopped the run, or a --dry-run, the same
    /// particles are not asked the same questions again (with the same model, dtype, device,
    /// quantization and --max-new-tokens).
    // A negative number is a value (`--grad-clip -1` is then refused by the range check).
    #[command(allow_negative_numbers = true)]
    Calibrate(bella_vqa::bench::cli::CalibrateArgs),
    /// Write every particle of a particle directory as a standard PEFT LoRA adapter
    /// (OUT/particle-{p}/adapter_config.json + adapter_model.safetensors).
    ExportPeft {
        /// A particle directory (from `bella-vqa train`).
        #[arg(long)]
        adapters: PathBuf,
        /// Where the adapter directories go.
        #[arg(long)]
        out: PathBuf,
        /// Replace the adapters already in --out (every particle-N/, whatever the size of their set).
        #[arg(long)]
        force: bool,
    },
    /// Read PEFT LoRA adapters (one per particle: same layers, rank and alpha) into a particle
    /// directory, checked against and tied to the base model.
    ImportPeft {
        /// PEFT adapter directories (adapter_config.json + adapter_model.safetensors), or hub
        /// adapter ids org/name[@revision] already in the hub cache.
        #[arg(long, num_args = 1.., required = true)]
        peft: Vec<PathBuf>,
        /// The particle directory to write.
        #[arg(long)]
        out: PathBuf,
        /// The base model (default: base_model_name_or_path and revision of the adapter config).
        #[arg(long)]
        model: Option<String>,
        /// Replace a particle set already in --out (its calibration, training checkpoints,
        /// train_log.jsonl, train_summary.json, training_questions.bin and
        /// calibrate_answers.jsonl are removed).
        #[arg(long)]
        force: bool,
    },
}

/// A model with its particles, ready to answer (ask, serve).
#[derive(Args, Clone)]
struct VqaArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A particle directory (from `bella-vqa train`; without --model it is loaded onto the base
    /// model it was trained on; default with the demo model: its particles).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// A minijinja response template replacing prompts/response.jinja.
    #[arg(long)]
    template: Option<PathBuf>,
    /// CLIP: a file with one candidate answer per line.
    #[arg(long)]
    answers: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    vqa: VqaArgs,
    /// Address to listen on, or a host name such as localhost (a non-loopback address without
    /// --api-key gets a warning).
    #[arg(long, default_value = "127.0.0.1", value_parser = listen_address)]
    host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "BELLA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id in /v1/models and requests (default: the model's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// The most questions answered together in one pass.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Questions that may wait; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Seconds before an unanswered request gets 504.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Largest request body in MB (413 above).
    #[arg(long, default_value_t = 20)]
    max_body_mb: usize,
    /// Largest image in pixels (width × height).
    #[arg(long, default_value_t = bella_vqa::models::image::MAX_IMAGE_PIXELS)]
    max_image_pixels: u64,
    /// MB that the images of the questions in flight may hold in all, while decoded and at the
    /// peak of their preprocessing, reckoned from the image's header before anything is decoded
    /// (503 above, 413 for one image larger than all of it).
    #[arg(long, default_value_t = 1024)]
    max_image_memory_mb: u64,
    /// MB that the bodies of the chat requests in flight may hold in all (their announced
    /// length, or --max-body-mb when not announced), from when they arrive until they are
    /// answered (503 above): with --max-image-memory-mb, bounds the server's memory whatever
    /// the clients send.
    #[arg(long, default_value_t = 256)]
    max_body_memory_mb: u64,
    /// Longest question in tokens.
    #[arg(long, default_value_t = 512)]
    max_question_tokens: usize,
    /// The most answer tokens a request gets (a larger max_tokens is lowered to this).
    #[arg(long, default_value_t = 256)]
    max_new_tokens_limit: usize,
    /// Also fetch http(s) image URLs (public addresses only); default: data URLs only.
    #[arg(long)]
    allow_remote_images: bool,
    /// Let web pages from this origin call the API (CORS; repeatable; `*`: any origin).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// The seeded shapes world: coloured shapes with questions, in- and out-of-distribution splits.
    Shapes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training questions (validation, test and each OOD split get a fifth of this, at least
        /// 10; ood-mismatched fewer: the test questions that name an object, asked about another
        /// image that does not show it).
        #[arg(long, default_value_t = 2000)]
        n: usize,
        /// Canvas size in pixels.
        #[arg(long, default_value_t = bella_vqa::data::shapes::DEFAULT_IMAGE_SIZE)]
        image_size: u32,
        /// Share (0..1) of the training scenes asked about an absent object, answered
        /// "unanswerable" as in VizWiz, to teach a model to say so. Val, test and OOD splits
        /// are unchanged.
        #[arg(long, default_value_t = 0.0)]
        absent_share: f64,
        /// Overwrite a data set already in --out.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training data: our JSONL, a VQAv2 or VQA-CP questions JSON (with --annotations), VizWiz,
    /// TextVQA, GQA or A-OKVQA JSON, or Hugging Face datasets Parquet (a file, or a folder of one
    /// split's shards).
    #[arg(long)]
    data: PathBuf,
    /// VQAv2, VQA-CP: the annotations JSON of --data.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// The image folder of --data, where its relative image paths are read (every format; JSONL:
    /// replaces the file's folder; GQA's Parquet questions: also lmms-lab/GQA's images as Parquet,
    /// a file or shards folder) [default: the data file's folder].
    #[arg(long)]
    images: Option<PathBuf>,
    /// Validation data (a sample is evaluated during training).
    #[arg(long)]
    val: Option<PathBuf>,
    /// VQAv2: the annotations JSON of --val.
    #[arg(long, requires = "val")]
    val_annotations: Option<PathBuf>,
    /// The image folder of --val (JSON formats; default: its file's folder; GQA's Parquet
    /// questions: also lmms-lab/GQA's images as Parquet).
    #[arg(long, requires = "val")]
    val_images: Option<PathBuf>,
    /// Output directory: particles, checkpoints, train_log.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Number of particles P.
    #[arg(long, default_value_t = 4)]
    particles: usize,
    #[arg(long, value_enum, default_value_t = MethodArg::Ensemble)]
    method: MethodArg,
    /// Where the SVGD kernel measures distances.
    #[arg(long, value_enum, default_value_t = KernelArg::DeltaW)]
    kernel: KernelArg,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Module-path patterns, comma-separated: PEFT suffixes (q_proj), globs
    /// (language_model.*.q_proj) and layer ranges (language_model.layers.24-31.*.q_proj:
    /// particles on the top layers only) [default: LLaVA q/k/v/o_proj of the language model;
    /// CLIP q/k/v/out_proj of both towers].
    #[arg(long, value_delimiter = ',', value_name = "PATTERN,...")]
    targets: Option<Vec<String>>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// σ of the Gaussian prior on the adapter parameters.
    #[arg(long, default_value_t = 1.0)]
    prior_std: f64,
    /// Std of the initial B factors (0: start every particle at the base model).
    #[arg(long, default_value_t = 1e-3)]
    init_b_std: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// SVGD: weight of the repulsive term, ≥ 0 (1: canonical SVGD; w: SVGD on the tempered
    /// posterior p^(1/w), the Bella code's temperature; 0: no repulsion). Stored in
    /// train_summary.json and the checkpoints; the ensemble ignores it.
    #[arg(long, default_value_t = 1.0)]
    repulsion: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep one decoder layer's activations at a time and run each layer again for the
    /// backward pass (LLaVA; as transformers' gradient_checkpointing), the vision tower's too
    /// where it carries particles: the memory of a step no longer grows with the depth, for one
    /// more forward pass. Use it when training runs out of
    /// memory on a large model.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Train over a particle set already in --out that has no checkpoint to resume (its
    /// particles and calibration are replaced).
    #[arg(long)]
    force: bool,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Validation questions evaluated each time.
    #[arg(long, default_value_t = 64)]
    val_sample: usize,
    /// Save a checkpoint (particles, optimizer state, log) every N steps, and at the end of each
    /// epoch and of the run; the last two are kept, and --resume continues from the newest.
    #[arg(long, value_name = "N", default_value_t = 100)]
    checkpoint_every: u64,
    /// Stop after this many steps (resume later with --resume).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Skip bad data records (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Train on the first N training questions only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Ensemble,
    Svgd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KernelArg {
    /// The RBF kernel on the particles' factors A and B themselves.
    Params,
    /// The RBF kernel on each layer's ΔW = B·A (invariant to LoRA's rescaling of A against B).
    /// Canonical SVGD takes its gradient along the other particle's factors: from particles that
    /// start with the same ΔW (--init-b-std 0) the repulsion can draw them together.
    DeltaW,
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
        self.source_of(self.model.as_deref())
    }

    /// [`Self::source`] of `model` in place of --model (with --revision).
    fn source_of(&self, model: Option<&str>) -> Result<ModelSource> {
        let Some(model) = model else {
            return Ok(ModelSource::Dir(bella_vqa::demo::path(
                bella_vqa::demo::LLAVA,
            )?));
        };
        let mut source = ModelSource::parse(model)?;
        if let (ModelSource::Hub { revision, .. }, Some(r)) = (&mut source, &self.revision) {
            *revision = Some(r.clone());
        }
        Ok(source)
    }

    fn load(&self, cli: &Cli) -> Result<LoadedModel> {
        let (loaded, note) = models::load_source(
            &self.source()?,
            &cli.hub_options(),
            self.compute.options(),
            self.quantize.options().as_ref(),
        )?;
        if !cli.quiet {
            note!("{note}");
        }
        Ok(loaded)
    }
}

/// What [`VqaArgs`] name, read and checked before the model is loaded.
struct VqaInputs {
    model: bella_vqa::answer::ModelInputs,
    opts: LoadOptions,
    template: Option<String>,
}

impl VqaInputs {
    /// Loads the model and its particles, with the template and answers.
    fn load(self) -> Result<BellaVqa> {
        let mut vqa = self.model.load(&self.opts)?;
        if let Some(text) = &self.template {
            vqa.set_response_template(text)?;
        }
        Ok(vqa)
    }
}

impl VqaArgs {
    /// Loads the model and its particles (the demo's own particles when no model is given).
    /// `threshold_given`: the caller's threshold replaces the calibrated rule.
    fn load(&self, hub: HubOptions, threshold_given: bool) -> Result<BellaVqa> {
        self.inputs(hub, threshold_given)?.load()
    }

    /// Reads and checks what can be without the model: a typo in a file name should not cost a
    /// model load (minutes for a real one), nor a server that says it listens and then stops.
    fn inputs(&self, hub: HubOptions, threshold_given: bool) -> Result<VqaInputs> {
        let model = self.model_name()?;
        let source = match (&self.model.model, &self.adapters) {
            (None, Some(dir)) => {
                bella_vqa::bench::cli::particles_base(dir, &self.model.revision, !hub.progress)?.1
            }
            _ => self.model.source()?,
        };
        let opts = LoadOptions {
            hub,
            compute: self.model.compute.options(),
            quantize: self.model.quantize.options(),
            ..LoadOptions::default()
        };
        // The demo LLaVA comes with its calibrated particles unless others are given.
        let demo = match model.as_deref() {
            None => Some(bella_vqa::demo::LLAVA),
            Some(m) => bella_vqa::hub::demo_model(m),
        };
        let adapters = match (demo, &self.adapters) {
            (Some(bella_vqa::demo::LLAVA), None) => {
                Some(bella_vqa::demo::path(bella_vqa::demo::PARTICLES)?)
            }
            (_, a) => a.clone(),
        };
        let template = match &self.template {
            Some(path) => {
                let text = bella_vqa::input::read_to_string(path, "response template")?;
                BellaVqa::check_response_template(&text)?;
                Some(text)
            }
            None => None,
        };
        // The demo CLIP's candidate answers ship with it (particles of one's own bring theirs).
        let answers = match &self.answers {
            Some(path) => Some(path.clone()),
            None => bella_vqa::demo::default_answers(demo, adapters.is_some())?,
        }
        .map(|path| bella_vqa::answer::read_answer_list(&path))
        .transpose()?;
        Ok(VqaInputs {
            model: bella_vqa::answer::ModelInputs::check(
                source,
                adapters,
                answers,
                threshold_given,
                &opts,
            )?,
            opts,
            template,
        })
    }

    /// --model, or without it the base model the particles (--adapters) were trained on, as
    /// PEFT's `AutoPeftModel` loads an adapter's `base_model_name_or_path`; `None`: the demo.
    fn model_name(&self) -> Result<Option<String>> {
        match (&self.model.model, &self.adapters) {
            (Some(m), _) => Ok(Some(m.clone())),
            (None, Some(dir)) => Ok(Some(
                bella_vqa::bella::particles::ParticleSet::read_config(dir)?
                    .base_model
                    .model_arg(),
            )),
            (None, None) => Ok(None),
        }
    }

    /// The id a server gives the model: the demo's name, a hub id without its revision (as
    /// vLLM names a model), or a directory's name.
    fn served_name(&self) -> String {
        match self.model_name().ok().flatten().as_deref() {
            None => "bella-vqa-demo".into(),
            Some(m) if bella_vqa::hub::demo_model(m) == Some(bella_vqa::demo::LLAVA) => {
                "bella-vqa-demo".into()
            }
            Some(m) => {
                if let Some((repo_id, _)) = bella_vqa::hub::split_hub_id(m) {
                    return repo_id.into();
                }
                let path = std::path::Path::new(m);
                match (path.is_dir(), path.file_name()) {
                    (true, Some(name)) => name.to_string_lossy().into_owned(),
                    _ => m.to_string(),
                }
            }
        }
    }
}

fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let opts = bella_vqa::serve::ServeOptions {
        host: args.host,
        port: args.port,
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.vqa.served_name()),
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        queue: args.queue,
        timeout: std::time::Duration::from_secs(args.timeout_secs),
        max_body_bytes: args.max_body_mb.saturating_mul(1024 * 1024),
        max_image_pixels: args.max_image_pixels,
        max_question_tokens: args.max_question_tokens,
        max_new_tokens_limit: args.max_new_tokens_limit,
        allow_remote_images: args.allow_remote_images,
        max_image_memory_bytes: args.max_image_memory_mb.saturating_mul(1024 * 1024),
        max_body_memory_bytes: args.max_body_memory_mb.saturating_mul(1024 * 1024),
        cors_origins: args.cors_origins.clone(),
        access_log: !cli.quiet,
    };
    // The server listens (with /health saying "loading") while the worker loads the model.
    // Requests may give a threshold of their own, but most will not.
    let inputs = args.vqa.inputs(cli.hub_options(), false)?;
    bella_vqa::serve::run(opts, move || inputs.load())
}

/// Prints an answer; `given_threshold`: the threshold came from --threshold.
fn print_response(r: &Response, show_particles: bool, given_threshold: bool) -> Result<()> {
    // Generated text is shown with its control characters escaped (not acted on by the terminal).
    use bella_vqa::console::printable;
    out!("{}", printable(&r.response))?;
    let answer = bella_vqa::data::normalize::normalize_answer(&r.answer);
    let agree = r
        .particles
        .iter()
        .filter(|p| p.normalized == answer)
        .count();
    let calibrated = if given_threshold {
        "given by --threshold"
    } else if r.calibrated {
        "calibrated"
    } else {
        "uncalibrated"
    };
    // What abstention compared: the confidence itself, or another selector's score.
    let decision = if r.selector == "confidence" {
        // As many decimals as it takes to tell them apart (0.9977 against 0.9999999 printed
        // "100 % (threshold 100 %)" beside "I'm not sure").
        let (c, t) = (r.confidence * 100.0, r.threshold * 100.0);
        let places = (0..4)
            .find(|&p| c == t || format!("{c:.p$}") != format!("{t:.p$}"))
            .unwrap_or(4);
        format!("confidence {c:.places$} % (threshold {t:.places$} %, {calibrated})")
    } else {
        format!(
            "confidence {:.0} % · {} score {:.3} (threshold {:.3}, {calibrated})",
            r.confidence * 100.0,
            r.selector,
            r.score,
            r.threshold
        )
    };
    out!(
        "{decision} · uncertainty {:.3} = aleatoric {:.3} + epistemic {:.3} nats · {agree}/{} particle(s) say \"{}\"",
        r.uncertainty.total,
        r.uncertainty.aleatoric,
        r.uncertainty.epistemic,
        r.particles.len(),
        printable(&r.answer)
    )?;
    // Scored as a beginning (no end token): its probability is that of answers starting so.
    if agree > 0
        && r.particles
            .iter()
            .filter(|p| p.normalized == answer)
            .all(|p| p.truncated)
    {
        out!(
            "the answer was cut at its token limit: its confidence is that of answers that begin \
             so; for the whole answer give more tokens (--max-new-tokens) or, where the prompt \
             fills the model's positions, a shorter question"
        )?;
    }
    if let Some(v) = &r.image_check {
        out!(
            "image check: distance {:.2} from the calibration images (threshold {:.2}): {}",
            v.distance,
            v.threshold,
            match (v.familiar, r.calibrated) {
                (true, _) => "familiar",
                (false, true) => "unfamiliar, so abstained",
                // --threshold replaced the calibrated rule, the image check with it.
                (false, false) =>
                    "unfamiliar (not applied: --threshold replaces the calibrated rule)",
            }
        )?;
    }
    if show_particles {
        for (i, p) in r.particles.iter().enumerate() {
            out!(
                "  particle {i}: {:?} (log-likelihood {:.3})",
                p.answer,
                p.log_likelihood
            )?;
        }
    }
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Inspect { model, json } => {
            let loaded = model.load(cli)?;
            let summary = ModelSummary::new(&loaded);
            if *json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&summary).context("serialising the summary")?
                )?;
            } else {
                use std::io::Write as _;
                write!(std::io::stdout(), "{summary}").map_err(StdoutError)?;
            }
        }
        Command::Ask {
            vqa,
            image,
            json,
            show_particles,
            threshold,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            question,
        } => {
            let mut ask = AskOptions {
                max_new_tokens: max_new_tokens.unwrap_or(AskOptions::default().max_new_tokens),
                sampling: match temperature {
                    Some(t) => Sampling::Sample {
                        temperature: *t,
                        top_p: top_p.unwrap_or(1.0),
                        seed: seed.unwrap_or(0),
                    },
                    None => Sampling::Greedy,
                },
                threshold: *threshold,
            };
            // Bad options fail before the (slow) model load.
            ask.validate()?;
            let vqa = vqa.load(cli.hub_options(), threshold.is_some())?;
            if temperature.is_some()
                && matches!(vqa.model().model, bella_vqa::models::Model::Clip(_))
            {
                anyhow::bail!(
                    "--temperature (with --top-p, --seed) samples a LLaVA's answers; a CLIP scores \
                     its candidate answers and samples nothing: leave them out"
                );
            }
            // Without --max-new-tokens, as the server does: an answer as long as the room the
            // prompt leaves, when that is less than the default (a long question is refused
            // only when it leaves none).
            if let (None, Some(room)) = (max_new_tokens, vqa.answer_room(question)?) {
                if (1..ask.max_new_tokens).contains(&room) {
                    if !cli.quiet {
                        note!(
                            "the prompt leaves room for {room} answer token(s) in the model's \
                             positions: the answer takes at most {room} (not the default {})",
                            ask.max_new_tokens
                        );
                    }
                    ask.max_new_tokens = room;
                }
            }
            let img = load_image(image)?;
            if let Some(answers) = vqa
                .answer_vocabulary()
                .filter(|a| a.len() >= MANY_ANSWERS && !cli.quiet)
            {
                note!(
                    "scoring {} candidate answers: CLIP's text tower reads each with the \
                     question, for every particle (a long --answers list takes a while)",
                    answers.len()
                );
            }
            let response = vqa
                .ask_with(&img, question, &ask)
                .with_context(|| format!("answering about {}", image.display()))?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&response)?)?;
            } else {
                print_response(&response, *show_particles, threshold.is_some())?;
            }
        }
        Command::Serve(args) => serve(cli, args)?,
        Command::Train(args) => run_train(cli, args).map_err(|e| {
            bella_vqa::io::DiskFull::advise(
                e,
                "train ran out of disk space (once there is space, the same command with \
                 --resume continues from its last checkpoint, checkpoints/ in --out)",
            )
        })?,
        Command::Data(DataCommand::Shapes {
            out,
            seed,
            n,
            image_size,
            absent_share,
            force,
        }) => {
            let _lock = bella_vqa::io::OutputLock::acquire(out)?;
            let summary =
                bella_vqa::data::shapes::generate(&bella_vqa::data::shapes::ShapesOptions {
                    out: out.clone(),
                    seed: *seed,
                    n: *n,
                    image_size: *image_size,
                    progress: !cli.quiet,
                    absent_share: *absent_share,
                    force: *force,
                })
                .map_err(|e| {
                    bella_vqa::io::DiskFull::advise(
                        e,
                        "data shapes ran out of disk space (once there is space, the same \
                         command with --force replaces the incomplete set)",
                    )
                })?;
            if !cli.quiet {
                for (split, count) in &summary.splits {
                    out!("{split:<20} {count:>6} questions")?;
                }
                out!("{} images in {}", summary.images, out.display())?;
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
                let optional = [
                    ("pixel_values", outputs.pixel_values.as_ref()),
                    ("image_features", outputs.image_features.as_ref()),
                ]
                .into_iter()
                .filter_map(|(name, t)| Some(format!(", {name} {:?}", t?.dims())))
                .collect::<String>();
                note!(
                    "wrote {}: input_ids {:?}, logits {:?}{optional}",
                    out.display(),
                    outputs.input_ids.dims(),
                    outputs.logits.dims(),
                );
            }
        }
        Command::ExportPeft {
            adapters,
            out,
            force,
        } => export_peft(cli, adapters, out, *force)?,
        Command::ImportPeft {
            peft,
            out,
            model,
            force,
        } => import_peft(cli, peft, out, model.as_deref(), *force)?,
    }
    Ok(())
}

fn export_peft(
    cli: &Cli,
    adapters: &std::path::Path,
    out: &std::path::Path,
    force: bool,
) -> Result<()> {
    use bella_vqa::bella::peft::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
    let _lock = bella_vqa::io::OutputLock::acquire(out)?;
    let set = bella_vqa::bella::particles::ParticleSet::load(adapters, &candle_core::Device::Cpu)?;
    // Every `particle-N` adapter already there, whatever N: a set of another size must not
    // leave its extra particles beside the new ones.
    let mut taken: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|dir| {
            dir.file_name().is_some_and(|n| {
                n.to_string_lossy()
                    .strip_prefix("particle-")
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            }) && [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
                .iter()
                .any(|f| dir.join(f).exists())
        })
        .collect();
    taken.sort();
    if let (Some(dir), false) = (taken.first(), force) {
        anyhow::bail!(
            "{} already holds a PEFT adapter: pass --force to replace the adapters in {}, or choose another --out",
            dir.display(),
            out.display()
        );
    }
    // Replaced as a whole: an interrupted export never mixes two sets, nor leaves part of one.
    let dirs = bella_vqa::bella::peft::export_peft(&set, out, &taken)?;
    if !cli.quiet {
        out!(
            "wrote {} PEFT LoRA adapter(s) (r = {}, lora_alpha = {}, {} layers, base {}):",
            dirs.len(),
            set.config.rank,
            set.config.alpha,
            set.adapters.len(),
            set.config.base_model.source
        )?;
        for dir in &dirs {
            out!("  {}", dir.display())?;
        }
    }
    Ok(())
}

fn import_peft(
    cli: &Cli,
    dirs: &[PathBuf],
    out: &std::path::Path,
    model: Option<&str>,
    force: bool,
) -> Result<()> {
    use bella_vqa::bella::peft;
    // Locked before looking: two imports into one --out cannot both find it empty.
    let _lock = bella_vqa::io::OutputLock::acquire(out)?;
    use bella_vqa::train::checkpoint;
    // Particles without their config and checkpoints are what an import cut short leaves (no
    // set can be loaded from them): the same command completes it.
    let config = out.join(bella_vqa::bella::particles::CONFIG_FILE);
    let taken = config.exists() || checkpoint::any(out);
    if taken && !force {
        anyhow::bail!(
            "{} already holds a particle set: pass --force to replace it (its calibration and \
             training checkpoints are lost), or choose another --out",
            out.display()
        );
    }
    // A hub adapter id (`PeftModel.from_pretrained(base, "org/name")`) is read from the cache.
    let dirs = dirs
        .iter()
        .map(
            |dir| match dir.to_str().and_then(bella_vqa::hub::split_hub_id) {
                Some((repo_id, revision)) => {
                    // Not there for the moment export-peft swaps its set in: not a hub id.
                    peft::refuse_if_being_replaced(dir)?;
                    bella_vqa::hub::cached_snapshot(repo_id, revision, &cli.hub_options())
                        .with_context(|| {
                            format!(
                                "--peft {} is no directory; as a hub adapter id",
                                dir.display()
                            )
                        })
                }
                None => Ok(dir.clone()),
            },
        )
        .collect::<Result<Vec<_>>>()?;
    let mut set = peft::import_peft_stacked(&dirs)?;
    let base = &set.config.base_model;
    let source_text = match model {
        Some(m) => m.to_string(),
        None if base.source.is_empty() => anyhow::bail!(
            "the adapter config names no base model (base_model_name_or_path): pass --model"
        ),
        None => base.model_arg(),
    };
    let source = ModelSource::parse(&source_text).with_context(|| {
        format!(
            "the adapter's base model {source_text:?} (base_model_name_or_path, read from the \
             current directory when relative) cannot be found: pass --model DIR or a hub id"
        )
    })?;
    let files = bella_vqa::hub::resolve(&source, &cli.hub_options())
        .with_context(|| format!("cannot find the base model {source_text} (pass --model DIR)"))?;
    peft::bind_base(
        &mut set,
        &files,
        &bella_vqa::io::stored_model_source(&source_text),
    )?;
    // The new set is written in full before anything of the old one goes, so that a failure
    // (a full disk) leaves the old one whole.
    let staged = set
        .files()?
        .iter()
        .map(|(name, bytes)| bella_vqa::io::stage_file(&out.join(name), bytes))
        .collect::<Result<Vec<_>>>()?;
    // Particles first, then the config: a stop in between is refused at load, naming it.
    for file in staged {
        file.commit()?;
    }
    // Only then the old set's training state (a stop before leaves the old set whole, able to
    // resume): `train --resume` would bring the replaced particles back from their
    // checkpoints, and the training log and summary would describe particles that are gone.
    checkpoint::remove_all(out)?;
    for stale in [
        "train_log.jsonl",
        "train_summary.json",
        bella_vqa::data::seen::FILE,
        bella_vqa::bench::kept_answers::FILE,
    ] {
        bella_vqa::io::remove_file(&out.join(stale))?;
    }
    if !cli.quiet {
        out!(
            "wrote {} ({} particle(s), r = {}, alpha = {}, {} layers, base {source_text})",
            out.display(),
            set.config.particles,
            set.config.rank,
            set.config.alpha,
            set.adapters.len()
        )?;
    }
    Ok(())
}

/// The questions of a data file; a Parquet file only up to its first `limit` good questions (its
/// images are extracted as its rows are read). With `skip_bad`, also what was left out, said.
fn read_data(
    path: &std::path::Path,
    annotations: Option<&std::path::Path>,
    images: Option<&std::path::Path>,
    skip_bad: bool,
    limit: Option<u64>,
) -> Result<(Vec<bella_vqa::data::VqaExample>, Option<String>)> {
    let opts = bella_vqa::data::ReadOptions {
        skip_bad,
        check_images: true,
    };
    let limit = limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    let data = bella_vqa::data::read_dataset_up_to(path, annotations, images, &opts, limit)?
        .require_questions()?;
    let skipped = data.skipped.first().map(|first| {
        format!(
            "skipped {} bad record(s) in {} (first: {first})",
            data.skipped.len(),
            path.display(),
        )
    });
    Ok((data.examples, skipped))
}

/// `--host`: an IP address (an IPv6 one also in brackets, as URLs write it), or a name resolved
/// as the system resolves it (`localhost`: its first address).
fn listen_address(host: &str) -> Result<std::net::IpAddr, String> {
    use std::net::ToSocketAddrs;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse() {
        return Ok(ip);
    }
    match (host, 0).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| format!("{host:?} has no address")),
        Err(e) => Err(format!(
            "{host:?} is neither an IP address nor a name this machine resolves ({e}): use \
             127.0.0.1 or ::1 (this machine only), or 0.0.0.0 or :: (every interface)"
        )),
    }
}

/// A training set from which on `train` says what it does before its first step (seconds).
const MANY_QUESTIONS: usize = 10_000;

/// A CLIP answer list from which `ask` says it is scoring them (on the demo CLIP, 20 000 answers
/// took 36 s to score).
const MANY_ANSWERS: usize = 2_000;

/// Takes the questions of `file` that `train` cannot use in `role` out of `data`
/// ([`train::take_unfit`]): found before the first step; named and stopping the run unless
/// `skip_bad` (then counted, and said).
fn leave_out_unfit(
    loaded: &LoadedModel,
    data: &mut Vec<bella_vqa::data::VqaExample>,
    role: train::Role,
    file: &Path,
    skip_bad: bool,
) -> Result<Option<String>> {
    let unfit = train::take_unfit(loaded, data, role)?;
    let Some((id, why)) = unfit.first() else {
        return Ok(None);
    };
    let what = match role {
        train::Role::Training => "training question(s) the model cannot train on",
        train::Role::Validation => "validation question(s) the model cannot answer",
    };
    let (n, file) = (unfit.len(), file.display());
    if !skip_bad {
        anyhow::bail!(
            "{file}: {n} {what} (first: question {id:?}: {why}); fix them, or pass --skip-bad to \
             leave them out"
        );
    }
    Ok(Some(format!(
        "skipped {n} {what} in {file} (first: question {id:?}: {why})"
    )))
}

/// The training options `args` give, the rest from `defaults` (the model's).
fn train_options(args: &TrainArgs, defaults: TrainOptions) -> TrainOptions {
    TrainOptions {
        targets: args.targets.clone().unwrap_or(defaults.targets),
        rank: args.rank,
        alpha: args.alpha,
        particles: args.particles,
        method: match args.method {
            MethodArg::Ensemble => Method::Ensemble,
            MethodArg::Svgd => Method::Svgd,
        },
        kernel: match args.kernel {
            KernelArg::Params => Kernel::Params,
            KernelArg::DeltaW => Kernel::DeltaW,
        },
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        prior_std: args.prior_std,
        init_b_std: args.init_b_std,
        grad_clip: args.grad_clip,
        seed: args.seed,
        repulsion: args.repulsion,
        ..defaults
    }
}

/// How `args` run the training.
fn run_options(cli: &Cli, args: &TrainArgs) -> RunOptions {
    RunOptions {
        out: args.out.clone(),
        resume: args.resume,
        force: args.force,
        eval_every: args.eval_every,
        val_sample: args.val_sample,
        checkpoint_every: args.checkpoint_every,
        max_steps: args.max_steps,
        progress: !cli.quiet,
        model_source: match &args.model.model {
            Some(m) => bella_vqa::io::stored_model_source(m),
            None => "demo".to_string(),
        },
        gradient_checkpointing: args.gradient_checkpointing,
    }
}

fn run_train(cli: &Cli, args: &TrainArgs) -> Result<()> {
    let inputs: Vec<(&str, &Path)> = [
        ("--data", Some(args.data.as_path())),
        ("--annotations", args.annotations.as_deref()),
        ("--val", args.val.as_deref()),
        ("--val-annotations", args.val_annotations.as_deref()),
    ]
    .into_iter()
    .filter_map(|(option, path)| Some((option, path?)))
    .collect();
    train::check_inputs_are_not_outputs(&args.out, &inputs)?;
    // Options out of range are refused before the model loads (the targets are checked against
    // the model's layers once it has).
    train_options(args, TrainOptions::llava_defaults()).validate()?;
    run_options(cli, args).validate()?;
    let _lock = bella_vqa::io::OutputLock::acquire(&args.out)?;
    bella_vqa::interrupt::watch("soon: a checkpoint keeps the last finished training step")?;
    let mut loaded = args.model.load(cli)?;
    // A question without an answer (a test set's) has nothing to train on.
    // With --limit a Parquet file is read only that far: questions without answers or that the
    // model cannot train on (--skip-bad) are then left out of the limit's share, not replaced.
    // What --skip-bad left out: said unless --quiet, and in the error when nothing is left.
    let mut skipped = Vec::new();
    let (read, skipped_records) = read_data(
        &args.data,
        args.annotations.as_deref(),
        args.images.as_deref(),
        args.skip_bad,
        args.limit,
    )?;
    skipped.extend(skipped_records);
    let (answered, unanswered): (Vec<_>, Vec<_>) = read
        .into_iter()
        .partition(|e| train::objective::target_answer(e).is_some());
    if let Some(first) = unanswered.first() {
        let (n, file, id) = (unanswered.len(), args.data.display(), &first.question_id);
        if !args.skip_bad {
            anyhow::bail!(
                "{file}: {n} training question(s) have no answers to train on (first: {id:?}): \
                 none given, or only ones VQA's normalisation empties (such as \"a\" or \".\"); \
                 give answers, or pass --skip-bad to leave them out"
            );
        }
        skipped.push(format!(
            "skipped {n} training question(s) without answers in {file} (first: {id:?})"
        ));
    }
    let mut train_data = answered;
    if train_data.len() >= MANY_QUESTIONS {
        note!(
            "preparing the {} training questions (tokenised and checked against the model{})",
            train_data.len(),
            if args.limit.is_none() {
                "; --limit N trains on the first N"
            } else {
                ""
            }
        );
    }
    let skip = args.skip_bad;
    let role = train::Role::Training;
    skipped.extend(leave_out_unfit(
        &loaded,
        &mut train_data,
        role,
        &args.data,
        skip,
    )?);
    if train_data.is_empty() && !skipped.is_empty() {
        anyhow::bail!(
            "{}: no training question is left: {}",
            args.data.display(),
            skipped.join("; ")
        );
    }
    if let Some(limit) = args.limit {
        train_data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let val_data = match &args.val {
        Some(v) => {
            let (mut val, skipped_records) = read_data(
                v,
                args.val_annotations.as_deref(),
                args.val_images.as_deref(),
                args.skip_bad,
                None,
            )
            .context(
                "in --val (for a VQAv2 or VizWiz file there, its annotations are \
                 --val-annotations and its images --val-images)",
            )?;
            skipped.extend(skipped_records);
            let role = train::Role::Validation;
            skipped.extend(leave_out_unfit(&loaded, &mut val, role, v, skip)?);
            if val.iter().all(|e| e.answers.is_empty()) {
                anyhow::bail!(
                    "--val {} has no human answers to score the particles against: give a \
                     validation set with answers, or leave --val out",
                    v.display()
                );
            }
            val
        }
        None => Vec::new(),
    };
    if !cli.quiet {
        for line in &skipped {
            note!("{line}");
        }
    }
    if !val_data.is_empty() {
        use bella_vqa::data::seen;
        let n = seen::count(&seen::keys(&train_data), &val_data);
        if n > 0 {
            note!(
                "warning: {}",
                seen::warning(n, val_data.len(), "--val questions")
            );
        }
    }
    let opts = train_options(args, TrainOptions::defaults_for(&loaded.model));
    if opts.method == Method::Svgd
        && opts.kernel == Kernel::DeltaW
        && opts.init_b_std == 0.0
        && opts.repulsion > 0.0
    {
        note!(
            "warning: with --init-b-std 0 every particle starts with the same ΔW, and the delta-w \
             kernel's repulsion can then draw the particles together rather than apart; use \
             --kernel params, or a small --init-b-std (the default is 0.001)"
        );
    }
    let run = run_options(cli, args);
    let report = train::train(&mut loaded, &train_data, &val_data, &opts, &run)?;
    if report.interrupted {
        return Err(Interrupted(match report.steps {
            0 => "interrupted before the first training step finished: nothing was trained"
                .to_string(),
            step => format!(
                "interrupted at step {step}/{}{}: the particles and a checkpoint of that step are \
                 in {}; the same command with --resume continues",
                report.total_steps,
                if report.evaluation_pending {
                    ", in its evaluation (--resume makes it first)"
                } else {
                    ""
                },
                report.out.display()
            ),
        })
        .into());
    }
    if !cli.quiet {
        let state = if report.finished {
            "finished"
        } else {
            "stopped"
        };
        out!(
            "{state} at step {}/{}; particles in {} (log: train_log.jsonl)",
            report.steps,
            report.total_steps,
            report.out.display()
        )?;
        if let Some(e) = &report.last {
            out!(
                "train loss {:.4} · val accuracy {} (vote {}) · mean pairwise distance {:.4} · {:.1} questions/s ({:.1} question-particle pairs/s)",
                e.train_loss,
                e.val_accuracy.map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
                e.val_accuracy_vote.map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
                e.mean_pairwise_distance,
                e.examples_per_second,
                e.particle_examples_per_second
            )?;
        }
        if let Some(d) = &report.diversity {
            let pct = |v: Option<f64>| v.map_or("-".into(), |a| format!("{:.1} %", a * 100.0));
            out!(
                "diversity over {} evaluation(s): answer disagreement {} → {} (max {}), mean pairwise ΔW distance {:.4} → {:.4} (train_summary.json)",
                d.evaluations,
                pct(d.first.val_disagreement),
                pct(d.last.val_disagreement),
                pct(d.max_val_disagreement),
                d.first.mean_pairwise_distance,
                d.last.mean_pairwise_distance
            )?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    bella_vqa::prepare_process();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors, and --help and --version, which clap reports the same way: a text that
        // cannot be written (`--help > /dev/full`) is a failure, not clap's silent exit 0.
        Err(e) => {
            let code = ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            return match e.print() {
                Ok(()) => code,
                // The reader closed the pipe (`--help | head -1`): it has what it wanted.
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => code,
                Err(_) => ExitCode::FAILURE,
            };
        }
    };
    let outcome = bella_vqa::start_compute_threads().and_then(|()| run(&cli));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The reader closed the pipe (`| head -1`): it has what it wanted.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<StdoutError>()
                    .is_some_and(StdoutError::is_closed_pipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<Interrupted>() => {
            note!("{e}");
            ExitCode::from(bella_vqa::interrupt::exit_status())
        }
        // An option out of its range: a usage error, status 2 as clap's own.
        Err(e) if e.chain().any(|c| c.is::<bella_vqa::error::BadOption>()) => {
            note!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            note!("error: {e:#}");
            if let Some(hint) = bella_vqa::models::compute::out_of_memory_hint(&e) {
                note!("{hint}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::listen_address;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn host_is_an_address_bracketed_or_not_or_a_name() {
        assert_eq!(
            listen_address("127.0.0.1"),
            Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(listen_address("::1"), Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(listen_address("[::1]"), Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert!(listen_address("localhost").is_ok_and(|ip| ip.is_loopback()));
        let err = listen_address("no-such-host.invalid").unwrap_err();
        assert!(err.contains("neither an IP address nor a name"), "{err}");
    }
}
