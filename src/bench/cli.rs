//! The `bench`, `bench merge` and `calibrate` subcommands (clap arguments and their runners), kept
//! here so that `main.rs` only forwards to them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::{
    BenchOptions, CalibrateOptions, CompareEntry, DataInput, Guarantee, ImageCheckRequest,
    ModelSpec, Objective, SelectorChoice, Shard,
};
use crate::answer::{AskOptions, BellaVqa, LoadOptions, ModelInputs};
use crate::hub::{HubOptions, ModelSource};
use crate::metrics::NormalizeMode;
use crate::models::compute::ComputeArgs;

fn parse_normalize(s: &str) -> std::result::Result<NormalizeMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "official" => Ok(NormalizeMode::Official),
        "always" => Ok(NormalizeMode::Always),
        _ => Err(format!(
            "{s:?}: use always (normalise every answer, as lmms-eval and LLaVA's submission script \
             prepare a generated answer) or official (vqaEval.py on the answer as generated: \
             normalise only when the human answers differ)"
        )),
    }
}

fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    s.parse::<Shard>().map_err(|e| e.to_string())
}

/// A number for which `ok` holds (never NaN), else an error naming the `range`.
fn parse_number(
    s: &str,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if ok(x) => Ok(x),
        _ => Err(format!("{s:?} is not a number in {range}")),
    }
}

fn parse_unit(s: &str) -> std::result::Result<f64, String> {
    parse_number(s, |x| (0.0..=1.0).contains(&x), "[0, 1]")
}

/// A share of the questions to answer: in (0, 1] (answering none measures nothing).
fn parse_coverage(s: &str) -> std::result::Result<f64, String> {
    parse_number(s, |x| x > 0.0 && x <= 1.0, "(0, 1]")
}

fn parse_open_unit(s: &str) -> std::result::Result<f64, String> {
    parse_number(s, |x| x > 0.0 && x < 1.0, "(0, 1)")
}

/// A target risk: in (0, 1). Risk 1 always holds (to answer everything, ask for coverage 1)
/// and risk 0 can never be certified from finitely many questions.
fn parse_risk(s: &str) -> std::result::Result<f64, String> {
    if s.parse::<f64>() == Ok(1.0) {
        return Err("risk 1 always holds: to answer everything, use --target-coverage 1".into());
    }
    parse_open_unit(s)
}

/// The image check's false-alarm rate: 1e-4 needs 10 000 validation images already; a smaller
/// rate is not something a validation set can calibrate.
fn parse_false_alarm_rate(s: &str) -> std::result::Result<f64, String> {
    parse_number(s, |x| (1e-4..1.0).contains(&x), "[0.0001, 1)")
}

fn parse_positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// The most bootstrap resamples: 1000 already gives the interval ends to about ±0.5 % of
/// their width; more only costs time (each resample recomputes every metric).
pub const MAX_BOOTSTRAP: usize = 100_000;

/// The fewest bootstrap resamples: each end of a 95 % interval is 2.5 % of them, so with fewer
/// than 50 it is not even one resample and the interval can miss the point estimate itself.
pub const MIN_BOOTSTRAP: usize = 50;

fn parse_bootstrap(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 && n < MIN_BOOTSTRAP => Err(format!(
            "{s} resamples are too few for a 95 % interval: use at least {MIN_BOOTSTRAP} (1000 is \
             plenty), or 0 for no intervals"
        )),
        Ok(n) if n <= MAX_BOOTSTRAP => Ok(n),
        Ok(_) => Err(format!(
            "{s} resamples is more than the {MAX_BOOTSTRAP} that bench allows (1000 is plenty)"
        )),
        Err(_) => Err(format!(
            "{s:?} is not a whole number (0 disables the intervals)"
        )),
    }
}

/// `bella-vqa bench`: answer a VQA set and write results.json, samples.jsonl and a report.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// A hub id (`org/name[@revision]`), a local directory in the Hugging Face layout, or `demo`
    /// (the embedded demo LLaVA; `demo:clip` its CLIP). Required without --adapters; with
    /// them, by default the base model the particles were trained on.
    #[arg(long, required_unless_present = "adapters")]
    pub model: Option<String>,
    /// Hub revision; overrides `@revision` in --model.
    #[arg(long)]
    pub revision: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quantize: crate::models::quant::QuantizeArgs,
    /// A particle directory (from `bella-vqa train`); without it, the base model.
    #[arg(long, conflicts_with = "compare")]
    pub adapters: Option<PathBuf>,
    /// The test questions: our JSONL, a VQAv2 or VQA-CP questions JSON (with --annotations),
    /// VizWiz, TextVQA, GQA or A-OKVQA JSON, or Hugging Face datasets Parquet (a file, or a folder
    /// of one split's shards).
    #[arg(long, required = true)]
    pub data: Option<PathBuf>,
    /// VQAv2, VQA-CP: the annotations JSON of --data.
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// The image folder of --data, where its relative image paths are read (every format; JSONL:
    /// replaces the file's folder; GQA's Parquet questions: also lmms-lab/GQA's images as Parquet,
    /// a file or shards folder) [default: the data file's folder].
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The output directory (rerun with the same one to continue an interrupted run).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Out-of-distribution questions (JSONL or a JSON format that holds its answers), each detected
    /// against --data; repeatable.
    #[arg(long = "ood-data", num_args = 1..)]
    pub ood_data: Vec<PathBuf>,
    /// The image folder of every --ood-data file (JSON formats; JSONL: replaces each file's
    /// folder; GQA's Parquet questions: also lmms-lab/GQA's images as Parquet) [default: each
    /// file's folder].
    #[arg(long, requires = "ood_data")]
    pub ood_images: Option<PathBuf>,
    /// Validation questions: the Φ_c and target-risk thresholds are chosen on them (without it,
    /// on the test questions themselves, flagged in the results).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// VQAv2, VQA-CP: the annotations JSON of --val.
    #[arg(long, requires = "val")]
    pub val_annotations: Option<PathBuf>,
    /// The image folder of --val (JSON formats; JSONL: replaces the file's folder; GQA's Parquet
    /// questions: also lmms-lab/GQA's images as Parquet).
    #[arg(long, requires = "val")]
    pub val_images: Option<PathBuf>,
    /// Only the first N questions of every data file.
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub limit: Option<usize>,
    /// Answer only slice i of n (questions whose position % n == i); combine with `bench merge`.
    #[arg(long, value_name = "i/n", value_parser = parse_shard)]
    pub shard: Option<Shard>,
    /// Answer normalisation for VQA accuracy: always (every answer normalised, as lmms-eval and
    /// LLaVA's submission script prepare a generated answer: "Yes" is right against ten "yes") or
    /// official (vqaEval.py on the answer as generated: normalised only when the human answers
    /// differ). results.json has both.
    #[arg(long, default_value = "always", value_parser = parse_normalize)]
    pub normalize: NormalizeMode,
    /// Skip bad data records and unreadable images instead of stopping (listed with why in
    /// bad_records.jsonl and skipped.jsonl).
    #[arg(long)]
    pub skip_bad: bool,
    /// Abstain below this selector score (default: the particles' calibrated threshold, else 0.5).
    #[arg(long, value_parser = parse_unit)]
    pub threshold: Option<f64>,
    /// Longest answer in tokens (LLaVA; default 16, and shorter for a question whose prompt
    /// leaves less room in the model's positions; a limit given here is kept, and such a
    /// question cannot be answered).
    #[arg(long, value_parser = parse_positive)]
    pub max_new_tokens: Option<usize>,
    /// Resamples of the 95 % bootstrap intervals of every metric (paired over questions in
    /// --compare); 0 disables them.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_bootstrap)]
    pub bootstrap: usize,
    /// Seed of the bootstrap resamples.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// CLIP: a file with one candidate answer per line (default: the particles' vocabulary).
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Compare several particle sets on the same questions: `base` (no particles), DIR or
    /// name=DIR, comma-separated; each run goes to OUT/name, the table to OUT/comparison.md.
    #[arg(long, value_delimiter = ',', value_name = "ENTRIES")]
    pub compare: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Combine the shard directories of one run (`bench --shard i/n`) into one results directory
    /// (of a `--compare` run: every entry's shards, then the comparison).
    Merge {
        /// Every shard directory of the run.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The merged directory (results.json, samples.jsonl, report).
        #[arg(long)]
        out: PathBuf,
        /// Resamples of the 95 % bootstrap intervals (as the shards' `bench --bootstrap`);
        /// 0 disables them.
        #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_bootstrap)]
        bootstrap: usize,
        /// Seed of the bootstrap resamples.
        #[arg(long, default_value_t = 0)]
        bootstrap_seed: u64,
    },
}

/// `bella-vqa calibrate`: choose the abstention threshold on validation questions and store it
/// with the particles.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// A hub id (`org/name[@revision]`), a local directory in the Hugging Face layout, or `demo`
    /// (the embedded demo LLaVA; `demo:clip` its CLIP); by default the base model the particles
    /// were trained on.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision; overrides `@revision` in --model.
    #[arg(long)]
    pub revision: Option<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quantize: crate::models::quant::QuantizeArgs,
    /// The particle directory whose bella_config.json receives the threshold.
    #[arg(long)]
    pub adapters: PathBuf,
    /// Validation questions with human answers (JSONL, VQAv2 questions JSON, VizWiz, TextVQA, GQA,
    /// A-OKVQA JSON, Parquet).
    #[arg(long)]
    pub data: PathBuf,
    /// VQAv2, VQA-CP: the annotations JSON of --data.
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// The image folder of --data (GQA's Parquet questions: also lmms-lab/GQA's images as
    /// Parquet).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Answer as many questions as possible with at most this selective risk [default: 0.05].
    #[arg(long, value_parser = parse_risk, conflicts_with_all = ["objective", "target_coverage"])]
    pub target_risk: Option<f64>,
    /// Or answer at least this share of the validation questions (e.g. 0.85).
    #[arg(long, value_parser = parse_coverage, conflicts_with = "objective")]
    pub target_coverage: Option<f64>,
    /// Or maximise effective reliability: phiC, Φ_c with cost c per wrong answer (e.g. phi1,
    /// phi10, phi100).
    #[arg(long)]
    pub objective: Option<String>,
    /// Answer normalisation for VQA accuracy (what counts as right): always or official (see
    /// `bench --help`).
    #[arg(long, default_value = "always", value_parser = parse_normalize)]
    pub normalize: NormalizeMode,
    /// Only the first N validation questions, and the first N of --ood-val.
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub limit: Option<usize>,
    /// Skip bad records and unreadable images instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Longest answer in tokens (LLaVA; default 16, and shorter for a question whose prompt
    /// leaves less room in the model's positions; a limit given here is kept, and such a
    /// question cannot be answered).
    #[arg(long, value_parser = parse_positive)]
    pub max_new_tokens: Option<usize>,
    /// CLIP: a file with one candidate answer per line.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Print the threshold without storing it.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The score that decides abstention: confidence, epistemic, risk-averse, vote, learned, or
    /// auto (the one with the lowest AURC on validation). epistemic and vote need two or more
    /// particles (auto skips them with one).
    #[arg(long, default_value = "confidence")]
    pub selector: String,
    /// Validation questions that must be declined (e.g. unanswerable ones): answering one counts
    /// as an error when selectors are fitted and compared.
    #[arg(long, value_name = "FILE")]
    pub ood_val: Option<PathBuf>,
    /// The image folder of --ood-val (JSON formats; JSONL: replaces the file's folder; GQA's
    /// Parquet questions: also lmms-lab/GQA's images as Parquet).
    #[arg(long, requires = "ood_val")]
    pub ood_val_images: Option<PathBuf>,
    /// With --target-risk: ltt (Learn then Test, the risk on new questions is within the target
    /// with probability 1 − δ) or none (the empirical choice) [default: ltt with a target risk].
    #[arg(long, value_parser = ["ltt", "none"])]
    pub guarantee: Option<String>,
    /// δ of the Learn-then-Test guarantee of --target-risk [default: 0.1].
    #[arg(long, value_parser = parse_open_unit)]
    pub delta: Option<f64>,
    /// Do not fit a temperature (keep the particles' probabilities as they are).
    #[arg(long)]
    pub no_temperature: bool,
    /// What the temperature is fitted to: `answers`, the NLL of the model-average distribution
    /// over the answers; or `confidence`, the log loss of the confidence of the answer given
    /// against its accuracy (what ECE and abstention look at).
    #[arg(long, value_enum, default_value_t, conflicts_with = "no_temperature")]
    pub temperature_objective: crate::answer::selector::TemperatureObjective,
    /// The map from the model average's confidence (after the temperature) to the confidence
    /// shown and scored: none, auto (the lowest cross-fitted Brier score on the validation
    /// questions, none included), platt (σ(a·logit c + b)) or isotonic (centered isotonic
    /// regression). It changes no answer, nor an abstention under the confidence, epistemic or
    /// vote selectors (risk-averse and learned read the mapped confidence and are fitted on
    /// it); it calibrates the confidence on
    /// questions like the validation ones and raises it on unlike ones it declines.
    #[arg(long, value_enum, default_value_t)]
    pub confidence_map: crate::answer::confidence_map::MapChoice,
    /// The image check's false-alarm rate: abstain on images farther from the validation images
    /// than all but this share of images like them would be (split conformal; needs about 2/α
    /// distinct validation images) [default: 0.01 when there are enough images].
    #[arg(long, value_name = "ALPHA", value_parser = parse_false_alarm_rate, conflicts_with = "no_image_check")]
    pub image_check_alpha: Option<f64>,
    /// Store no image check (abstention then looks at the selector's score alone).
    #[arg(long)]
    pub no_image_check: bool,
}

fn model_source(model: &str, revision: &Option<String>) -> Result<ModelSource> {
    let mut source = ModelSource::parse(model)?;
    if let (ModelSource::Hub { revision: r, .. }, Some(rev)) = (&mut source, revision) {
        *r = Some(rev.clone());
    }
    Ok(source)
}

/// The base model the particles in `adapters` were trained on, as a `--model` argument, for a
/// command given particles and no `--model` (as PEFT's `AutoPeftModel` loads an adapter's
/// `base_model_name_or_path`), and its source; said on stderr unless `quiet`.
pub fn particles_base(
    adapters: &Path,
    revision: &Option<String>,
    quiet: bool,
) -> Result<(String, ModelSource)> {
    let model = crate::bella::particles::ParticleSet::read_config(adapters)?
        .base_model
        .model_arg();
    let source = model_source(&model, revision).with_context(|| {
        format!(
            "the base model of the particles in {} (base_model.source of their \
             bella_config.json) cannot be found: pass --model DIR or a hub id",
            adapters.display()
        )
    })?;
    if !quiet {
        crate::note!(
            "base model {model}: the one the particles were trained on (--model to choose)"
        );
    }
    Ok((model, source))
}

/// Refuses, before the model loads, to continue a run in `out` in another `--dtype` than it
/// computed in, or with another `--quantize` (found after the load too, with every other
/// difference; a 7B model's load is minutes).
fn refuse_another_compute(
    out: &Path,
    dtype: crate::models::compute::DTypeChoice,
    quantize: &crate::models::quant::QuantizeArgs,
) -> Result<()> {
    use crate::models::compute::DTypeChoice;
    if !out.join(super::config::CONFIG_FILE).is_file() {
        return Ok(());
    }
    let old = super::config::RunConfig::read(out)?.model;
    let asked = match dtype {
        DTypeChoice::Auto => None,
        DTypeChoice::F32 => Some("f32"),
        DTypeChoice::Bf16 => Some("bf16"),
        DTypeChoice::F16 => Some("f16"),
    };
    let was = old.compute_dtype;
    if let Some(asked) = asked.filter(|a| !was.is_empty() && *a != was) {
        bail!(
            "{} holds a benchmark run computed in {was}, so it cannot be continued in {asked}: \
             pass --dtype {was} to continue it, or use another --out",
            out.display()
        );
    }
    let asked = quantize
        .options()
        .map(|q| super::config::quantization_name(q.kind.name(), q.vision));
    if asked != old.quantization {
        let name = |q: &Option<String>| q.clone().unwrap_or_else(|| "dense".into());
        let flags = match &old.quantization {
            None => "no --quantize".to_string(),
            Some(q) => match q.split_once('+') {
                Some((kind, _)) => format!("--quantize {kind} --quantize-vision"),
                None => format!("--quantize {q}"),
            },
        };
        bail!(
            "{} holds a benchmark run of a {} base, so it cannot be continued with a {} one: \
             pass {flags} to continue it, or use another --out",
            out.display(),
            name(&old.quantization),
            name(&asked)
        );
    }
    Ok(())
}

/// Runs `bench` (or `bench merge`).
pub fn bench(args: &BenchArgs, hub: HubOptions, quiet: bool) -> Result<()> {
    if let Some(BenchCommand::Merge {
        dirs,
        out,
        bootstrap,
        bootstrap_seed,
    }) = &args.command
    {
        let _lock = crate::io::OutputLock::acquire(out)?;
        let bootstrap = super::Bootstrap {
            resamples: *bootstrap,
            seed: *bootstrap_seed,
            progress: !quiet,
        };
        // Shards of a --compare run: each entry's shards, then the comparison.
        let compared = dirs
            .first()
            .is_some_and(|d| d.join(super::merge::COMPARISON_FILE).is_file());
        let (results, written) = if compared {
            super::merge::merge_comparison(dirs, out, &bootstrap)?
        } else {
            let (results, written) = super::merge(dirs, out, &bootstrap)?;
            (vec![(String::new(), results)], written)
        };
        if !quiet {
            for (entry, results) in &results {
                let entry = if entry.is_empty() {
                    String::new()
                } else {
                    format!("{entry}: ")
                };
                crate::note!(
                    "{entry}merged {} shard(s): {} questions answered",
                    dirs.len(),
                    results.progress.answered
                );
                print_summary(results);
            }
            for w in written {
                crate::note!("wrote {}", w.display());
            }
        }
        return Ok(());
    }
    let (Some(data), Some(out)) = (&args.data, &args.out) else {
        bail!("bench needs --data and --out");
    };
    crate::interrupt::watch(super::STOPS_WHILE_ANSWERING)?;
    let opts = BenchOptions {
        data: DataInput {
            path: data.clone(),
            annotations: args.annotations.clone(),
            images: args.images.clone(),
        },
        val: args.val.clone().map(|path| DataInput {
            path,
            annotations: args.val_annotations.clone(),
            images: args.val_images.clone(),
        }),
        ood: args
            .ood_data
            .iter()
            .map(|path| DataInput {
                path: path.clone(),
                annotations: None,
                images: args.ood_images.clone(),
            })
            .collect(),
        out: out.clone(),
        limit: args.limit,
        shard: args.shard,
        normalize: args.normalize,
        skip_bad: args.skip_bad,
        progress: !quiet,
        threshold: args.threshold,
        max_new_tokens: args
            .max_new_tokens
            .unwrap_or(AskOptions::default().max_new_tokens),
        answer_within_room: args.max_new_tokens.is_none(),
        bootstrap: super::Bootstrap {
            resamples: args.bootstrap,
            seed: args.bootstrap_seed,
            progress: !quiet,
        },
    };
    // Check the inputs before the (slow) model load.
    for path in std::iter::once(data)
        .chain(args.val.iter())
        .chain(args.ood_data.iter())
    {
        if !path.exists() {
            bail!("data file {} does not exist", path.display());
        }
    }
    // An OOD file that is the test or validation file would count its questions both as in
    // and as out of distribution (an OOD AUROC of 0.5 by construction).
    let same = crate::io::same_path;
    for ood in &args.ood_data {
        for (role, path) in
            std::iter::once(("--data", data)).chain(args.val.iter().map(|v| ("--val", v)))
        {
            if same(ood, path) {
                bail!(
                    "--ood-data {} is the {role} file: its questions would count as both in and \
                     out of distribution; give --ood-data questions unlike the {role} ones",
                    ood.display()
                );
            }
        }
    }
    // Validation questions that are the test questions choose the thresholds on the very
    // questions they are measured on: the report would call them held out.
    if let Some(val) = args.val.as_ref().filter(|v| same(v, data)) {
        bail!(
            "--val {} is the --data file: the thresholds would be chosen on the test questions \
             themselves and reported as chosen on held-out ones; give held-out validation \
             questions, or leave --val out (the report then says the numbers are optimistic)",
            val.display()
        );
    }
    // An input among the files a run writes would be overwritten by them.
    let inputs = [
        ("--data", Some(data)),
        ("--annotations", args.annotations.as_ref()),
        ("--val", args.val.as_ref()),
        ("--val-annotations", args.val_annotations.as_ref()),
    ]
    .into_iter()
    .filter_map(|(flag, path)| Some((flag, path?)))
    .chain(args.ood_data.iter().map(|p| ("--ood-data", p)));
    for (flag, path) in inputs {
        if let Some(name) = super::RECORD_FILES
            .iter()
            .chain(&super::RESULT_FILES)
            .find(|name| same(path, &out.join(name)))
        {
            bail!(
                "{flag} {} is the {name} that bench writes into --out {}: move the input \
                 elsewhere, or choose another --out",
                path.display(),
                out.display()
            );
        }
    }
    // Results beside particles would mix a run's files into the set (merge refuses it too).
    if crate::bella::particles::ParticleSet::is_in(out) {
        bail!(
            "{} holds a particle set; write the benchmark into a new or empty directory (e.g. {})",
            out.display(),
            out.join("bench").display()
        );
    }
    let _lock = crate::io::OutputLock::acquire(out)?;
    refuse_another_compute(out, args.compute.options().dtype, &args.quantize)?;
    let (model, source) = match (&args.model, &args.adapters) {
        (Some(model), _) => (model.clone(), model_source(model, &args.revision)?),
        (None, Some(adapters)) => particles_base(adapters, &args.revision, quiet)?,
        (None, None) => bail!("bench needs --model (or --adapters, whose base model it takes)"),
    };
    let model = &model;
    // The demo CLIP's candidate answers ship with it, as `ask` uses them.
    let answers_file = match &args.answers {
        Some(p) => Some(p.clone()),
        None => {
            crate::demo::default_answers(crate::hub::demo_model(model), args.adapters.is_some())?
        }
    };
    let spec = ModelSpec {
        source: crate::io::stored_model_source(model),
        adapters: args.adapters.clone(),
        answers_file,
    };
    let answers = spec
        .answers_file
        .as_deref()
        .map(crate::answer::read_answer_list)
        .transpose()?;
    let load = LoadOptions {
        hub,
        compute: args.compute.options(),
        quantize: args.quantize.options(),
        ..LoadOptions::default()
    };
    if !args.compare.is_empty() {
        let entries = CompareEntry::parse_all(&args.compare)?;
        let (_, written) =
            super::compare(&source, &spec, &entries, &load, &opts, answers.as_deref())?;
        if !quiet {
            for w in written {
                crate::note!("wrote {}", w.display());
            }
        }
        return Ok(());
    }
    // `ask --model demo` answers with the demo's particles; a benchmark names its particles.
    if args.adapters.is_none()
        && !quiet
        && crate::hub::demo_model(model) == Some(crate::demo::LLAVA)
    {
        let particles = crate::demo::path(crate::demo::PARTICLES)
            .map_or_else(|_| "its particles".into(), |p| p.display().to_string());
        crate::note!(
            "note: benchmarking the demo's base model, without particles; its Bella ensemble: \
             --adapters {particles}"
        );
    }
    let vqa = ModelInputs::check(
        source,
        args.adapters.clone(),
        answers,
        args.threshold.is_some(),
        &load,
    )?
    .load(&load)?;
    let outcome = super::run(&vqa, &spec, &opts)?;
    if !quiet {
        let t = &outcome.results.timing;
        crate::note!(
            "answered {} question(s) now{}{}",
            outcome.answered_now,
            if outcome.resumed > 0 {
                format!(", {} from before", outcome.resumed)
            } else {
                String::new()
            },
            t.answers_per_second
                .map_or(String::new(), |r| format!(" ({r:.2} answers/s overall)"))
        );
        print_summary(&outcome.results);
        for w in outcome.written {
            crate::note!("wrote {}", w.display());
        }
    }
    Ok(())
}

fn print_summary(r: &super::ResultsFile) {
    let get = |k: &str| crate::report::fmt(crate::report::metric(r, k));
    if r.summary.is_some() {
        crate::note!(
            "VQA accuracy {} · coverage {} · ECE {} · AURC {} · Φ₁₀ {} (thresholds from {})",
            get("vqa_accuracy"),
            get("coverage"),
            get("ece"),
            get("aurc"),
            get("phi_10"),
            r.results
                .get("thresholds_from")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
        );
    }
    if !r.progress.complete {
        crate::note!(
            "incomplete: {} question(s) missing; rerun with the same --out",
            r.progress.missing
        );
    }
    for note in r
        .notes
        .iter()
        .filter(|n| n.starts_with(super::submission::NOT_WRITTEN))
    {
        crate::note!("{note}");
    }
}

/// The guarantee `calibrate` gives: Learn-then-Test for a target risk unless `--guarantee none`;
/// none for a target coverage or a Φ objective, where `--guarantee ltt` and `--delta` mean
/// nothing and are refused rather than ignored.
fn guarantee(args: &CalibrateArgs, objective: Objective) -> Result<Guarantee> {
    let risk = matches!(objective, Objective::TargetRisk(_));
    match (args.guarantee.as_deref(), risk) {
        (Some("ltt"), false) => bail!(
            "--guarantee ltt bounds a risk: it needs --target-risk (not --target-coverage or \
             --objective)"
        ),
        (Some("none"), _) | (None, false) if args.delta.is_some() => bail!(
            "--delta is the confidence of the Learn-then-Test guarantee of --target-risk; it has \
             no effect here"
        ),
        (Some("none"), _) | (None, false) => Ok(Guarantee::None),
        _ => Ok(Guarantee::Ltt {
            delta: args.delta.unwrap_or(0.1),
        }),
    }
}

/// Runs `calibrate`.
pub fn calibrate(args: &CalibrateArgs, hub: HubOptions, quiet: bool) -> Result<()> {
    let objective = match (&args.objective, args.target_risk, args.target_coverage) {
        (Some(o), _, _) => Objective::parse(o)?,
        (None, Some(r), _) => Objective::TargetRisk(r),
        (None, None, Some(c)) => Objective::TargetCoverage(c),
        (None, None, None) => Objective::TargetRisk(0.05),
    };
    let guarantee = guarantee(args, objective)?;
    if !args.data.exists() {
        bail!("data file {} does not exist", args.data.display());
    }
    crate::interrupt::watch("after the question being answered; nothing is stored")?;
    crate::bella::particles::ParticleSet::read_config(&args.adapters)?;
    let _lock = (!args.dry_run)
        .then(|| crate::io::OutputLock::acquire(&args.adapters))
        .transpose()
        .context("calibrate stores the threshold with the particles (--dry-run only reports it)")?;
    let source = match &args.model {
        Some(model) => model_source(model, &args.revision)?,
        None => particles_base(&args.adapters, &args.revision, quiet)?.1,
    };
    let load = LoadOptions {
        hub,
        compute: args.compute.options(),
        quantize: args.quantize.options(),
        ..LoadOptions::default()
    };
    let mut vqa = BellaVqa::load(&source, Some(&args.adapters), &load)?;
    if let Some(p) = &args.answers {
        vqa.set_answer_vocabulary(crate::answer::read_answer_list(p)?)?;
    }
    let opts = CalibrateOptions {
        data: DataInput {
            path: args.data.clone(),
            annotations: args.annotations.clone(),
            images: args.images.clone(),
        },
        objective,
        normalize: args.normalize,
        limit: args.limit,
        skip_bad: args.skip_bad,
        progress: !quiet,
        max_new_tokens: args
            .max_new_tokens
            .unwrap_or(AskOptions::default().max_new_tokens),
        answer_within_room: args.max_new_tokens.is_none(),
        dry_run: args.dry_run,
        selector: SelectorChoice::parse(&args.selector)?,
        ood_val: args.ood_val.clone().map(|path| DataInput {
            path,
            annotations: None,
            images: args.ood_val_images.clone(),
        }),
        guarantee,
        temperature: (!args.no_temperature).then_some(args.temperature_objective),
        confidence_map: args.confidence_map,
        image_check: (!args.no_image_check).then_some(ImageCheckRequest {
            alpha: args
                .image_check_alpha
                .unwrap_or(crate::answer::image_check::DEFAULT_ALPHA),
            required: args.image_check_alpha.is_some(),
        }),
    };
    let outcome = super::calibrate(&vqa, &args.adapters, &opts)?;
    if crate::interrupt::requested() {
        return Err(crate::interrupt::Interrupted(match args.dry_run {
            true => "stopped once the calibration was made (--dry-run: nothing was stored)".into(),
            false => format!(
                "stopped once the calibration was stored with the particles in {}",
                args.adapters.display()
            ),
        })
        .into());
    }
    for w in &outcome.warnings {
        crate::note!("warning: {w}");
    }
    if args.json {
        crate::out!("{}", serde_json::to_string_pretty(&outcome)?)?;
        return Ok(());
    }
    crate::out!(
        "{} threshold {:.6} ({}) on {} validation question(s): coverage {:.1} %, risk {}{}",
        outcome.abstention.selector.name(),
        outcome.abstention.threshold,
        outcome.abstention.objective,
        outcome.count,
        outcome.coverage * 100.0,
        outcome
            .risk
            .map_or("— (nothing answered)".into(), |r| format!(
                "{:.1} %",
                r * 100.0
            )),
        outcome.phi.map_or(String::new(), |p| format!(", Φ {p:.4}"))
    )?;
    if let Some(t) = outcome.abstention.temperature {
        crate::out!(
            "temperature {t:.4} (fitted on the validation questions to their {})",
            match args.temperature_objective {
                crate::answer::selector::TemperatureObjective::Answers => "answers' NLL",
                crate::answer::selector::TemperatureObjective::Confidence =>
                    "confidence's log loss",
            }
        )?;
    }
    if let Some(why) = &outcome.temperature_skipped {
        crate::out!("no temperature (the probabilities are kept as they are): {why}")?;
    }
    if !outcome.confidence_maps.is_empty() {
        let shown = outcome
            .abstention
            .confidence_map
            .as_ref()
            .map_or("none", |m| m.name());
        let rows: Vec<String> = outcome
            .confidence_maps
            .iter()
            .map(|r| {
                let brier = r.brier.map_or("—".into(), |b| format!("{b:.4}"));
                // Chosen on Brier only under auto; otherwise the one asked for.
                let chosen = match (r.map == shown, args.confidence_map) {
                    (false, _) => "",
                    (true, crate::answer::confidence_map::MapChoice::Auto) => " ← chosen",
                    (true, _) => " ← used (--confidence-map)",
                };
                format!("{} {brier}{chosen}", r.map)
            })
            .collect();
        crate::out!(
            "confidence map (Brier, cross-fitted on the validation questions): {}",
            rows.join(", ")
        )?;
    }
    if let Some(g) = &outcome.abstention.guarantee {
        // The questions whose image the check flags are declined, so not part of the test.
        let flagged = outcome.count.saturating_sub(g.questions);
        let tested = if flagged > 0 {
            format!(
                "of the {} question(s) whose image the check passes (the {flagged} it flags are \
                 declined, so not tested), {} answered ({:.1} %)",
                g.questions,
                g.answered,
                g.coverage * 100.0
            )
        } else {
            format!(
                "{} of {} answered (expected coverage {:.1} %)",
                g.answered,
                g.questions,
                g.coverage * 100.0
            )
        };
        crate::out!(
            "guarantee ({}): risk <= {} with probability >= {} — upper bound {:.4} at this \
             threshold; {tested}",
            g.method,
            g.alpha,
            1.0 - g.delta,
            g.bound,
        )?;
    }
    match (&outcome.abstention.image_check, &outcome.image_flagged) {
        (Some(c), Some(f)) => {
            crate::out!(
            "image check: abstain beyond distance {:.3} (false alarms <= {} on images like the {} \
             fitted and {} calibration images); flags {:.1} % of the validation questions{}",
            c.threshold,
            c.alpha,
            c.fit_images,
            c.calibration_images,
            f.val * 100.0,
            f.ood
                .map_or(String::new(), |o| format!(", {:.1} % of --ood-val", o * 100.0))
        )?
        }
        _ => {
            if let Some(why) = &outcome.image_check_skipped {
                crate::out!("no image check: {why}")?;
            }
        }
    }
    if let Some(share) = outcome.ood_answered {
        crate::out!(
            "--ood-val: {:.1} % of {} question(s) answered at the threshold",
            share * 100.0,
            outcome.ood_count
        )?;
    }
    // Without --ood-val both AURCs are of the validation questions alone: one column.
    let with_ood = outcome.ood_count > 0;
    crate::out!(
        "{}",
        if with_ood {
            "selector   AURC (cross-fitted, with --ood-val)   AURC (cross-fitted, val alone)"
        } else {
            "selector   AURC (cross-fitted)"
        }
    )?;
    for row in &outcome.selectors {
        let chosen = if row.selector.name() == outcome.abstention.selector.name() {
            "  ← chosen"
        } else {
            ""
        };
        let val_alone = if with_ood {
            format!("   {:.4}", row.aurc_val)
        } else {
            String::new()
        };
        crate::out!(
            "{:<12} {:.4}{val_alone}{chosen}",
            row.selector.name(),
            row.aurc,
        )?;
    }
    crate::out!(
        "{}",
        if outcome.stored {
            format!(
                "stored in {}",
                args.adapters
                    .join(crate::bella::particles::CONFIG_FILE)
                    .display()
            )
        } else {
            "not stored (--dry-run)".into()
        }
    )?;
    Ok(())
}
