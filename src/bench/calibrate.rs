//! `calibrate`: choose the abstention threshold on validation questions and store it in the
//! particles' `bella_config.json` (only that file, only its `abstention` key and, when it replaces
//! a threshold, the `abstention_history` list that keeps the old one; the rest of the file is
//! kept as it was, key order included).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use super::kept_answers::{fingerprint, KeptAnswers};
use super::{read_set, DataInput, EvalSet, Role};
use crate::answer::candidates::Scored;
use crate::answer::confidence_map::{self, ConfidenceMap, MapChoice, MapRow};
use crate::answer::generate::Sampling;
use crate::answer::image_check::ImageCheck;
use crate::answer::selector::{
    assess, cannot_rank, cross_fit, fit_temperature, Facts, Selector, TemperatureObjective,
    SELECTOR_NAMES,
};
use crate::answer::{AskOptions, BellaVqa};
use crate::bella::particles::{Abstention, ParticleConfig, CONFIG_FILE};
use crate::console::number;
use crate::metrics::{self, NormalizeMode};
use crate::models::image::load_image;

/// How the threshold is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// The largest coverage whose selective risk on the validation set is within the target
    /// ([`metrics::choose_threshold_for_risk`]).
    TargetRisk(f64),
    /// The largest effective reliability Φ_c ([`metrics::choose_threshold_phi`]).
    Phi(f64),
    /// Answer (at least) this share of the validation questions
    /// ([`metrics::choose_threshold_for_coverage`]).
    TargetCoverage(f64),
}

impl Objective {
    /// `phi10`, `phi_10`, `phi-100` … → [`Objective::Phi`]; `risk0.05`, `risk=0.05` →
    /// [`Objective::TargetRisk`]; `coverage0.85` → [`Objective::TargetCoverage`].
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let value = |rest: &str| {
            rest.trim_start_matches(['_', '-', '=', ' '])
                .parse::<f64>()
                .ok()
        };
        let parsed = if let Some(rest) = t.strip_prefix("phi") {
            value(rest)
                .filter(|c| (0.0..=1e6).contains(c))
                .map(Objective::Phi)
        } else if let Some(rest) = t.strip_prefix("risk") {
            // As --target-risk: risk 1 always holds, risk 0 is never certified.
            value(rest)
                .filter(|r| *r > 0.0 && *r < 1.0)
                .map(Objective::TargetRisk)
        } else if let Some(rest) = t.strip_prefix("coverage") {
            value(rest)
                .filter(|c| *c > 0.0 && *c <= 1.0)
                .map(Objective::TargetCoverage)
        } else {
            None
        };
        parsed.ok_or_else(|| {
            crate::error::BadOption(format!(
                "objective {s:?}: use phi1, phi10 or phi100 (max Φ_c, c in [0, 1e6]), risk0.05 \
                 (or --target-risk 0.05; in (0, 1)) or coverage0.85 (or --target-coverage 0.85; \
                 in (0, 1])"
            ))
            .into()
        })
    }

    /// As stored in the config: `risk<=0.05` or `max phi_10`.
    pub fn describe(&self) -> String {
        match self {
            Objective::TargetRisk(r) => format!("risk<={}", number(*r)),
            Objective::Phi(c) => format!("max phi_{}", super::results::key_number(*c)),
            Objective::TargetCoverage(c) => format!("coverage>={}", number(*c)),
        }
    }

    /// Chooses the threshold on `(confidence, accuracy)` pairs.
    pub fn choose(&self, pairs: &[(f64, f64)]) -> Result<f64> {
        Ok(match self {
            Objective::TargetRisk(r) => metrics::choose_threshold_for_risk(pairs, *r)?,
            Objective::Phi(c) => metrics::choose_threshold_phi(pairs, *c)?,
            Objective::TargetCoverage(c) => {
                let conf: Vec<f64> = pairs.iter().map(|&(c, _)| c).collect();
                metrics::choose_threshold_for_coverage(&conf, *c)?
            }
        })
    }
}

/// Which selector `calibrate` fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorChoice {
    /// Fit every selector that can rank with these particles ([`cannot_rank`]) and keep the one
    /// with the lowest (cross-fitted) AURC.
    Auto,
    /// One of [`SELECTOR_NAMES`].
    Named(&'static str),
}

impl SelectorChoice {
    /// `auto` or a name of [`SELECTOR_NAMES`].
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "auto" {
            return Ok(SelectorChoice::Auto);
        }
        SELECTOR_NAMES
            .iter()
            .find(|n| **n == t)
            .map(|n| SelectorChoice::Named(n))
            .with_context(|| {
                format!(
                    "selector {s:?}: use auto or one of {}",
                    SELECTOR_NAMES.join(", ")
                )
            })
    }
}

/// How a target-risk threshold is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guarantee {
    /// The empirical choice: the largest coverage whose validation risk is within the target.
    None,
    /// Learn then Test ([`crate::guarantee::learn_then_test`]): the risk on new questions is
    /// within the target with probability at least 1 − `delta`.
    Ltt { delta: f64 },
}

/// Settings of [`calibrate`].
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    pub data: DataInput,
    pub objective: Objective,
    pub normalize: NormalizeMode,
    pub limit: Option<usize>,
    pub skip_bad: bool,
    pub progress: bool,
    pub max_new_tokens: usize,
    /// A question whose prompt leaves less room in the model's positions than
    /// `max_new_tokens` gets an answer as long as the room, as `ask` without
    /// `--max-new-tokens` answers it (false: it cannot be answered, as when the limit was asked
    /// for).
    pub answer_within_room: bool,
    /// Choose and report the threshold without storing it.
    pub dry_run: bool,
    pub selector: SelectorChoice,
    /// Questions that must be declined (answering one counts as an error): they weigh in the
    /// choice and the fitting of the selector, not in the threshold.
    pub ood_val: Option<DataInput>,
    /// Only with [`Objective::TargetRisk`].
    pub guarantee: Guarantee,
    /// Fit a temperature ([`fit_temperature`]) to this objective before everything else (none:
    /// keep the particles' probabilities).
    pub temperature: Option<TemperatureObjective>,
    /// The map of the confidence shown, fitted after the temperature ([`confidence_map::choose`]).
    pub confidence_map: MapChoice,
    /// Fit an image check ([`ImageCheck`]) on the validation images.
    pub image_check: Option<ImageCheckRequest>,
}

/// The image check `calibrate` is asked to fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageCheckRequest {
    /// The false-alarm rate on images like the validation ones.
    pub alpha: f64,
    /// Fail when the validation set has too few distinct images (else: store no check and say
    /// why in [`CalibrationOutcome::image_check_skipped`]).
    pub required: bool,
}

impl CalibrateOptions {
    /// Today's behaviour as a library default: the confidence selector, no temperature, no
    /// confidence map, the empirical threshold (the CLI turns the temperature and the guarantee
    /// on).
    pub fn new(data: DataInput, objective: Objective) -> Self {
        Self {
            data,
            objective,
            normalize: NormalizeMode::default(),
            limit: None,
            skip_bad: false,
            progress: false,
            max_new_tokens: AskOptions::default().max_new_tokens,
            answer_within_room: true,
            dry_run: false,
            selector: SelectorChoice::Named("confidence"),
            ood_val: None,
            guarantee: Guarantee::None,
            temperature: None,
            confidence_map: MapChoice::None,
            image_check: None,
        }
    }
}

/// One selector as `calibrate` fitted and scored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectorRow {
    pub selector: Selector,
    /// AURC of its cross-fitted scores ([`FOLDS`]-fold) on the validation questions, with the
    /// `--ood-val` questions as errors.
    pub aurc: f64,
    /// The same on the validation questions alone.
    pub aurc_val: f64,
}

/// Folds of the cross-fitting that scores selectors with fitted parameters on questions they
/// were not fitted on.
pub const FOLDS: usize = 5;

/// What [`calibrate`] chose, and how it does on the validation questions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationOutcome {
    pub abstention: Abstention,
    /// Validation questions answered.
    pub count: usize,
    /// Validation questions skipped (`--skip-bad`): bad records of the file, and questions that
    /// could not be answered.
    pub skipped: usize,
    /// Mean VQA accuracy of all validation answers.
    pub accuracy: f64,
    /// Fraction answered at the threshold.
    pub coverage: f64,
    /// Selective risk (1 − mean accuracy of the answered); `None` when nothing is answered.
    pub risk: Option<f64>,
    /// Φ_c at the threshold, for a Φ objective.
    pub phi: Option<f64>,
    /// Every selector that was fitted, with its AURC (one row unless `--selector auto`).
    pub selectors: Vec<SelectorRow>,
    /// `--ood-val` questions, and the share of them answered at the threshold.
    pub ood_count: usize,
    pub ood_answered: Option<f64>,
    /// Whether the threshold was written to the particles' config.
    pub stored: bool,
    /// The threshold the particles had before (replaced when `stored`).
    #[serde(default)]
    pub previous: Option<Abstention>,
    /// Shares of the validation and `--ood-val` questions whose image the stored image check
    /// flags (in-sample for the validation images it was fitted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_flagged: Option<ImageFlagged>,
    /// Why no temperature was stored although one was asked for (the particles' probabilities
    /// are kept as they are).
    pub temperature_skipped: Option<String>,
    /// The confidence maps compared on the validation questions (`--confidence-map`).
    #[serde(default)]
    pub confidence_maps: Vec<MapRow>,
    /// Why no image check was stored although one was asked for (too few images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_check_skipped: Option<String>,
    /// Validation questions that are training questions of these particles
    /// ([`crate::data::seen`]); `None` when the particles record none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_questions: Option<usize>,
    /// What makes the stored rule doubtful (e.g. every validation question scored alike).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// See [`CalibrationOutcome::image_flagged`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageFlagged {
    pub val: f64,
    pub ood: Option<f64>,
}

/// One validation question, answered: its particles' matrix and each candidate's accuracy.
struct Answered {
    scored: Scored,
    accuracy: Vec<f64>,
    image: PathBuf,
    /// The question's image and text ([`crate::data::seen::key`]): a copy answers as the first.
    key: u64,
}

impl Answered {
    /// The target distribution over the matrix's columns for the temperature: the candidates'
    /// accuracies (scaled down when they add up to more than 1), the rest on the "other" column
    /// (LLaVA: an answer 2 of 3 humans gave is 1/3 something else); CLIP has no such column,
    /// so its target is the accuracies alone (nothing when none is right: left out).
    fn target(&self) -> Vec<f64> {
        let mut t = self.accuracy.clone();
        if self.scored.other {
            let total: f64 = t.iter().sum();
            if total > 1.0 {
                t.iter_mut().for_each(|a| *a /= total);
            }
            t.push((1.0 - total).max(0.0));
        }
        t
    }
}

/// Answers every question of `input` (accuracies against its human answers, all 0 without),
/// taking the answers `kept` holds and keeping the new ones.
fn answer_all(
    vqa: &BellaVqa,
    input: &DataInput,
    set: &EvalSet,
    opts: &CalibrateOptions,
    kept: &mut KeptAnswers,
) -> Result<(Vec<Answered>, usize)> {
    let ask = AskOptions {
        max_new_tokens: opts.max_new_tokens,
        sampling: Sampling::Greedy,
        // Calibrating replaces the stored rule: it does not apply here (nor its answer list).
        threshold: Some(crate::answer::UNCALIBRATED_THRESHOLD),
    };
    let pb = super::progress_bar(set.record.selected, opts.progress);
    pb.set_message(crate::console::on_terminal(&set.record.split).into_owned());
    let mut answered = Vec::with_capacity(set.record.selected);
    // Bad records the read left out count as skipped, and are said.
    if let Some(first) = set.skipped.first() {
        crate::note!(
            "skipped {} bad record(s) in {} (first: {first})",
            set.skipped.len(),
            input.path.display()
        );
    }
    let mut skipped = set.skipped.len();
    let rule = set.record.format.accuracy_rule();
    // A Ctrl-C stops after the question being answered (the one that came with the last stops
    // there too, as said): the answers so far are kept for the next run, nothing is stored.
    let stopped = |done: usize, kept: &KeptAnswers| {
        crate::interrupt::requested().then(|| {
            crate::interrupt::Interrupted(format!(
                "calibrate stopped after {done} of {} questions of {}; nothing was stored (the \
                 particles keep the calibration they had): {}",
                set.record.selected,
                input.path.display(),
                rerun_note(kept)
            ))
        })
    };
    let mut reused = 0usize;
    for (done, example) in set.examples.iter().take(set.record.selected).enumerate() {
        if let Some(stop) = stopped(done, kept) {
            pb.finish_and_clear();
            return Err(stop.into());
        }
        let scored = match kept.get(example) {
            Some(scored) => {
                reused += 1;
                Ok(scored)
            }
            None => {
                // Within the room the prompt leaves, as bench and ask answer it.
                let fitted =
                    super::fitted_options(vqa, &example.question, &ask, opts.answer_within_room);
                let fresh = fitted.and_then(|ask| {
                    load_image(&example.image)
                        .and_then(|img| vqa.scored(&img, &example.question, &ask))
                });
                if let Ok(scored) = &fresh {
                    if let Some(why) = kept.keep(example, scored) {
                        pb.suspend(|| {
                            crate::note!(
                                "warning: answers are no longer kept for a rerun ({why}); \
                                 calibrating goes on"
                            )
                        });
                    }
                }
                fresh
            }
        };
        match scored {
            Ok(scored) => {
                let accuracy = scored
                    .candidates
                    .iter()
                    .map(|c| rule.accuracy(c, &example.answers, opts.normalize))
                    .collect();
                answered.push(Answered {
                    scored,
                    accuracy,
                    image: example.image.clone(),
                    key: crate::data::seen::key(example),
                });
            }
            Err(e) => {
                let reason = format!(
                    "cannot answer question {:?} of {}: {e:#}",
                    example.question_id,
                    input.path.display()
                );
                if !opts.skip_bad {
                    bail!(
                        "{reason} (--skip-bad skips such questions); {}",
                        rerun_note(kept)
                    );
                }
                pb.suspend(|| crate::note!("skipped: {reason}"));
                skipped += 1;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if reused > 0 && opts.progress {
        let (how_many, now) = match reused == set.record.selected {
            true => (format!("all {reused} answers"), String::new()),
            false => (
                format!("{reused} of the {} answers", set.record.selected),
                format!("; {} answered now", answered.len() - reused),
            ),
        };
        crate::note!(
            "{how_many} to {} were kept by an earlier run of calibrate on these particles \
             ({}){now}",
            input.path.display(),
            kept.path().display(),
        );
    }
    if let Some(stop) = stopped(set.record.selected, kept) {
        return Err(stop.into());
    }
    // Every question answered: what is left takes seconds, and is finished.
    crate::interrupt::stops(match opts.dry_run {
        true => "once the calibration is made (--dry-run: nothing is stored)",
        false => "once the calibration is made and stored with the particles",
    });
    Ok((answered, skipped))
}

/// What a rerun of the same command does with the answers made so far.
fn rerun_note(kept: &KeptAnswers) -> String {
    match kept.unwritable() {
        None => format!(
            "the answers so far are kept in {}, and the same command goes on from there",
            kept.path().display()
        ),
        Some(why) => {
            format!("run the same command again to calibrate (answers could not be kept: {why})")
        }
    }
}

/// The facts of every answered question at temperature `t` and through `map`, with the accuracy
/// of its answer (`force_error`: 0, a question that must be declined) and whether the answer
/// normalises to nothing ("", ".", "the"): `ask` and `bench` decline those whatever their score.
fn facts_of(
    answered: &[Answered],
    t: f64,
    map: Option<&ConfidenceMap>,
    force_error: bool,
) -> Result<Vec<(Facts, f64, bool)>> {
    answered
        .iter()
        .map(|a| {
            let (agg, facts) = assess(
                &a.scored.probs,
                a.scored.other,
                &a.scored.candidates,
                t,
                map,
            )
            .map_err(anyhow::Error::msg)?;
            let empty = a
                .scored
                .candidates
                .get(agg.best)
                .is_none_or(|c| crate::data::normalize::normalize_answer(c).is_empty());
            Ok((
                facts,
                if force_error {
                    0.0
                } else {
                    a.accuracy[agg.best]
                },
                empty,
            ))
        })
        .collect()
}

/// Scores of `name` on every question, each from a fit on the other [`FOLDS`] − 1 folds
/// (questions `i` with `i % FOLDS` as fold); fewer than 2·[`FOLDS`] questions: fitted on all.
fn cross_fitted_scores(name: &str, facts: &[Facts], acc: &[f64]) -> Result<Vec<f64>> {
    if facts.len() < 2 * FOLDS {
        return Ok(Selector::fit(name, facts, acc)?.scores(facts));
    }
    cross_fit(
        facts,
        acc,
        FOLDS,
        |f, a| Selector::fit(name, f, a),
        |selector, f| selector.score(f),
    )
}

/// Answers the validation questions with `vqa` (loaded with the particles in `adapters`), fits
/// the temperature and the selector, chooses the threshold and stores all three in
/// `adapters/bella_config.json` (unless `dry_run`). The answers are kept in
/// `adapters/`[`super::kept_answers::FILE`] as they are made, and taken from there by the next
/// call with the same model and settings, until a calibration is stored.
pub fn calibrate(
    vqa: &BellaVqa,
    adapters: &Path,
    opts: &CalibrateOptions,
) -> Result<CalibrationOutcome> {
    // Fail before answering when the config cannot be read or the options do not fit.
    let previous = crate::bella::particles::ParticleSet::read_config(adapters)?.abstention;
    if let (Guarantee::Ltt { .. }, Objective::Phi(_) | Objective::TargetCoverage(_)) =
        (opts.guarantee, opts.objective)
    {
        bail!(
            "a risk guarantee needs a target risk (--target-risk), not {}",
            opts.objective.describe()
        );
    }
    if let SelectorChoice::Named(name) = opts.selector {
        if let Some(why) = cannot_rank(name, vqa.particles()) {
            bail!(
                "--selector {name}: {why}; choose confidence, risk-averse or learned (or auto), \
                 or train two or more particles"
            );
        }
    }
    let set = read_set(&opts.data, "val", Role::Val, opts.limit, opts.skip_bad)?;
    let training_questions = crate::data::seen::read(adapters)?
        .map(|keys| crate::data::seen::count(&keys, &set.examples[..set.record.selected]));
    if !set.examples.iter().any(|e| !e.answers.is_empty()) {
        bail!(
            "{} has no human answers: calibration needs validation questions with answers",
            opts.data.path.display()
        );
    }
    let ood_set = match &opts.ood_val {
        Some(input) => Some(read_set(
            input,
            "ood-val",
            Role::Ood,
            opts.limit,
            opts.skip_bad,
        )?),
        None => None,
    };
    let mut warnings = Vec::new();
    if let Some(seen) = training_questions.filter(|&n| n > 0) {
        warnings.push(crate::data::seen::warning(
            seen,
            set.record.selected,
            "validation questions",
        ));
    }
    if let (Some(input), Some(ood)) = (&opts.ood_val, &ood_set) {
        warnings.extend(ood_in_val(&opts.data, &set, input, ood));
    }
    let mut kept_answers = KeptAnswers::open(
        adapters,
        fingerprint(vqa, adapters, opts.max_new_tokens, opts.answer_within_room)?,
        vqa.particles(),
    );
    if let Some(why) = kept_answers.unwritable() {
        crate::note!("warning: the answers are not kept for a rerun: {why}");
    }
    let (val, skipped) = answer_all(vqa, &opts.data, &set, opts, &mut kept_answers)?;
    if val.is_empty() {
        bail!("no validation question could be answered");
    }
    let ood = match (&opts.ood_val, &ood_set) {
        (Some(input), Some(s)) => answer_all(vqa, input, s, opts, &mut kept_answers)?.0,
        _ => Vec::new(),
    };
    let (temperature, temperature_skipped) = if let Some(objective) = opts.temperature {
        let targets: Vec<Vec<f64>> = val.iter().map(Answered::target).collect();
        let questions: Vec<(&[Vec<f64>], Vec<f64>)> = val
            .iter()
            .zip(targets)
            .map(|(a, t)| (a.scored.probs.as_slice(), t))
            .collect();
        let other = val.first().is_some_and(|a| a.scored.other);
        match fit_temperature(&questions, other, objective) {
            Ok(t) => (Some(t), None),
            Err(why) => (None, Some(why)),
        }
    } else {
        (None, None)
    };
    let t = temperature.unwrap_or(1.0);
    // The map is fitted to the model average's confidences; the selectors see them through it.
    let (val_conf, acc): (Vec<f64>, Vec<f64>) = facts_of(&val, t, None, false)?
        .into_iter()
        .map(|(f, a, _)| (f.confidence, a))
        .unzip();
    let (confidence_map, confidence_maps) =
        confidence_map::choose(opts.confidence_map, &val_conf, &acc, FOLDS).map_err(|why| {
            anyhow::anyhow!("--confidence-map: {why} (auto keeps no map then, or choose none)")
        })?;
    let map = confidence_map.as_ref();
    let (val_facts, val_empty): (Vec<Facts>, Vec<bool>) = facts_of(&val, t, map, false)?
        .into_iter()
        .map(|(f, _, empty)| (f, empty))
        .unzip();
    let mut pool_facts = val_facts.clone();
    let mut pool_acc = acc.clone();
    for (f, a, _) in facts_of(&ood, t, map, true)? {
        pool_facts.push(f);
        pool_acc.push(a);
    }
    let names: Vec<&str> = match opts.selector {
        SelectorChoice::Auto => SELECTOR_NAMES
            .into_iter()
            .filter(|n| cannot_rank(n, vqa.particles()).is_none())
            .collect(),
        SelectorChoice::Named(n) => vec![n],
    };
    // The image check first: the selectors are ranked as bench ranks answers, a flagged image
    // below all (`image_check::gate`).
    let (image_check, image_check_skipped) = match opts.image_check {
        Some(request) => match fit_image_check(&val, request.alpha) {
            Ok(check) => (Some(check), None),
            Err(e) if !request.required => (None, Some(e)),
            Err(e) => bail!("{e}"),
        },
        None => (None, None),
    };
    let val_flagged = flagged(image_check.as_ref(), &val)?;
    let ood_flagged = flagged(image_check.as_ref(), &ood)?;
    let pool_flagged: Vec<bool> = val_flagged.iter().chain(&ood_flagged).copied().collect();
    let mut rows = Vec::with_capacity(names.len());
    for name in names {
        let scores: Vec<f64> = cross_fitted_scores(name, &pool_facts, &pool_acc)?
            .into_iter()
            .zip(&pool_flagged)
            .map(|(s, &f)| crate::answer::image_check::gate(s, f))
            .collect();
        rows.push(SelectorRow {
            selector: Selector::fit(name, &pool_facts, &pool_acc)?,
            aurc: metrics::aurc(&scores, &pool_acc)?,
            aurc_val: metrics::aurc(&scores[..acc.len()], &acc)?,
        });
    }
    let chosen = rows
        .iter()
        .min_by(|a, b| a.aurc.total_cmp(&b.aurc))
        .map(|r| r.selector.clone())
        .context("no selector was fitted")?;
    // Declined whatever the threshold: an unfamiliar image, or an answer that says nothing.
    let declined: Vec<bool> = val_flagged
        .iter()
        .zip(&val_empty)
        .map(|(f, e)| *f || *e)
        .collect();
    // The threshold is chosen on the questions the image check lets through (the others are
    // declined whatever their score). A coverage target stays a share of all questions: the
    // check will decline its expected false alarms on new questions like these (the fitted
    // half of the validation images is flagged less than new ones are), or the share it
    // flags here, whichever is larger.
    let conf = chosen.scores(&val_facts);
    if let Some(why) = same_score(&chosen, &conf, &acc) {
        warnings.push(why);
    }
    warnings.extend(thin_evidence(&acc));
    let keys: Vec<u64> = val.iter().map(|a| a.key).collect();
    warnings.extend(repeated_questions(&keys));
    let kept: Vec<usize> = (0..conf.len()).filter(|&i| !declined[i]).collect();
    if kept.is_empty() {
        bail!(
            "every validation question is declined whatever the threshold (the image check \
             flags its image, or its answer normalises to nothing): nothing is left to calibrate \
             on"
        );
    }
    let n = conf.len() as f64;
    let pairs: Vec<(f64, f64)> = kept.iter().map(|&i| (conf[i], acc[i])).collect();
    let objective = match (opts.objective, &image_check) {
        (Objective::TargetCoverage(c), check) => {
            let check = check.as_ref();
            let flagged = val_flagged.iter().filter(|f| **f).count() as f64 / n;
            let empty = (0..conf.len())
                .filter(|&i| val_empty[i] && !val_flagged[i])
                .count() as f64
                / n;
            let alarms = check.map_or(0.0, |c| c.expected_false_alarms());
            let lost = alarms.max(flagged) + empty;
            // Coverage lost to the check and to empty answers that no threshold can win back
            // (beyond rounding).
            if c > (1.0 - lost) + 1e-9 {
                let check_part = check.map_or(String::new(), |check| {
                    format!(
                        "the image check is expected to decline {:.1} % of new questions like \
                         these (it flags {:.1} % of the validation questions, and its \
                         false-alarm rate is up to {}); ",
                        alarms.max(flagged) * 100.0,
                        flagged * 100.0,
                        check.alpha
                    )
                });
                bail!(
                    "coverage {:.1} % cannot be met: {check_part}{:.1} % of the validation \
                     questions get an answer that normalises to nothing (declined whatever the \
                     threshold); so at most {:.1} % can be answered; lower --target-coverage{}",
                    c * 100.0,
                    empty * 100.0,
                    (1.0 - lost) * 100.0,
                    if check.is_some() {
                        ", or choose a smaller --image-check-alpha (or --no-image-check)"
                    } else {
                        ""
                    }
                );
            }
            Objective::TargetCoverage(c / (1.0 - lost))
        }
        (other, _) => other,
    };
    let (threshold, guarantee) = match (objective, opts.guarantee) {
        (Objective::TargetRisk(alpha), Guarantee::Ltt { delta }) => {
            let (kept_conf, loss) = once_per_question(&kept, &keys, &conf, &acc);
            let g = crate::guarantee::learn_then_test(&kept_conf, &loss, alpha, delta).map_err(
                |refusal| {
                    // What explains a refusal (too few questions, copies) is said with it.
                    let said: String = warnings.iter().map(|w| format!("\n  ({w})")).collect();
                    anyhow::anyhow!("{refusal}{said}")
                },
            )?;
            (g.threshold, Some(g.guarantee))
        }
        (objective, _) => (objective.choose(&pairs)?, None),
    };
    let decisions: Vec<bool> = conf
        .iter()
        .zip(&declined)
        .map(|(c, d)| !d && *c >= threshold)
        .collect();
    let answered: Vec<f64> = acc
        .iter()
        .zip(&decisions)
        .filter(|(_, d)| **d)
        .map(|(a, _)| *a)
        .collect();
    let phi = match opts.objective {
        Objective::Phi(c) => Some(metrics::effective_reliability_of_decisions(
            &acc, &decisions, c,
        )?),
        Objective::TargetRisk(_) | Objective::TargetCoverage(_) => None,
    };
    let ood_scores = chosen.scores(&pool_facts[acc.len()..]);
    let share = |flags: &[bool]| flags.iter().filter(|f| **f).count() as f64 / flags.len() as f64;
    let image_flagged = image_check.as_ref().map(|_| ImageFlagged {
        val: share(&val_flagged),
        ood: (!ood_flagged.is_empty()).then(|| share(&ood_flagged)),
    });
    let abstention = Abstention {
        threshold,
        objective: match &guarantee {
            Some(g) => format!(
                "{} with probability >= {} (ltt)",
                opts.objective.describe(),
                number(1.0 - g.delta)
            ),
            None => opts.objective.describe(),
        },
        data: Some(crate::io::stored_path(&opts.data.path)),
        selector: chosen,
        temperature,
        confidence_map,
        guarantee,
        image_check,
        answers_sha256: vqa.answers_sha256().map(str::to_string),
        computed_in: Some(vqa.model().info.compute_label()),
    };
    if !opts.dry_run {
        if let (Some(old), true) = (&previous, opts.progress) {
            crate::note!(
                "rewriting the threshold stored in {}: {:.6} ({}) → {:.6} ({}); the old one is \
                 kept in its abstention_history",
                adapters.join(CONFIG_FILE).display(),
                old.threshold,
                old.objective,
                abstention.threshold,
                abstention.objective
            );
        }
        store_abstention(adapters, &abstention)?;
        // The answers served this calibration; a --dry-run keeps them for the run that stores.
        kept_answers.remove();
    }
    Ok(CalibrationOutcome {
        count: conf.len(),
        skipped,
        accuracy: acc.iter().sum::<f64>() / n,
        coverage: answered.len() as f64 / n,
        risk: (!answered.is_empty())
            .then(|| 1.0 - answered.iter().sum::<f64>() / answered.len() as f64),
        phi,
        selectors: rows,
        ood_count: ood_scores.len(),
        ood_answered: (!ood_scores.is_empty()).then(|| {
            let answered = ood_scores.iter().zip(&ood_flagged);
            answered.filter(|(s, f)| !**f && **s >= threshold).count() as f64
                / ood_scores.len() as f64
        }),
        stored: !opts.dry_run,
        abstention,
        previous,
        image_flagged,
        image_check_skipped,
        temperature_skipped,
        confidence_maps,
        training_questions,
        warnings,
    })
}

/// Says so when `--ood-val` questions are also validation questions (the same question id in the
/// same file, or the same image and question): each would count both as one to answer right and
/// as one to decline.
fn ood_in_val(
    val_input: &DataInput,
    val: &EvalSet,
    ood_input: &DataInput,
    ood: &EvalSet,
) -> Option<String> {
    let same_file = crate::io::same_path(&val_input.path, &ood_input.path);
    // An image however its path is written (relative, absolute, through `..` or a link).
    let image = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let val = &val.examples[..val.record.selected];
    let ids: HashSet<&str> = val.iter().map(|e| e.question_id.as_str()).collect();
    let asked: HashSet<(PathBuf, &str)> = val
        .iter()
        .map(|e| (image(&e.image), e.question.as_str()))
        .collect();
    let ood = &ood.examples[..ood.record.selected];
    let both = ood
        .iter()
        .filter(|e| {
            (same_file && ids.contains(e.question_id.as_str()))
                || asked.contains(&(image(&e.image), e.question.as_str()))
        })
        .count();
    (both > 0).then(|| {
        format!(
            "{both} of the {} --ood-val questions ({}) are also validation questions ({}: the \
             same question id in the same file, or the same image and question): each counts both \
             as one to answer right and as one to decline; give --ood-val questions the \
             validation data does not hold",
            ood.len(),
            ood_input.path.display(),
            val_input.path.display()
        )
    })
}

/// Says so when validation questions repeat (the same image and question, `keys`): the particles
/// answer a copy as they answered the first, so it adds no evidence.
fn repeated_questions(keys: &[u64]) -> Option<String> {
    let distinct = keys.iter().collect::<HashSet<_>>().len();
    let copies = keys.len() - distinct;
    (copies > 0).then(|| {
        format!(
            "{copies} of the {} validation questions repeat another one (the same image and \
             question): the particles answer a copy as they answered the first, so it adds no \
             evidence; a risk guarantee counts each question once ({distinct}), an empirical \
             threshold weighs the copies as more questions",
            keys.len()
        )
    })
}

/// The scores and losses (1 − accuracy) of the validation questions `kept`, each distinct
/// question (`keys`: image and text) once, with its copies' mean score and loss: Learn then Test
/// assumes exchangeable draws, and a copy is the same draw again.
fn once_per_question(
    kept: &[usize],
    keys: &[u64],
    conf: &[f64],
    acc: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let mut slot: HashMap<u64, usize> = HashMap::new();
    // (score sum, loss sum, copies) per distinct question, in order of first appearance.
    let mut sums: Vec<(f64, f64, f64)> = Vec::new();
    for &i in kept {
        let at = *slot.entry(keys[i]).or_insert_with(|| {
            sums.push((0.0, 0.0, 0.0));
            sums.len() - 1
        });
        let s = &mut sums[at];
        *s = (s.0 + conf[i], s.1 + 1.0 - acc[i], s.2 + 1.0);
    }
    sums.into_iter().map(|(c, l, n)| (c / n, l / n)).unzip()
}

/// Says so when `selector` gives every validation question the same score (`conf`): the threshold
/// then answers all of them or none, whatever the objective says. A learned selector does when
/// the validation answers (`acc`) are all right or all wrong: there is nothing to learn from.
fn same_score(selector: &Selector, conf: &[f64], acc: &[f64]) -> Option<String> {
    let (lo, hi) = conf
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &c| {
            (lo.min(c), hi.max(c))
        });
    // The same up to rounding, relative to the scores (random weights score 1e-21 apart).
    if conf.len() < 2 || hi - lo > 1e-9 * hi.abs().max(lo.abs()) {
        return None;
    }
    let labels = match acc.iter().all(|&a| a == acc[0]) {
        true if acc[0] > 0.0 => " (its validation answers are all right: nothing to tell apart)",
        true => " (its validation answers are all wrong: nothing to tell apart)",
        false => "",
    };
    Some(format!(
        "the {} selector gives every validation question the same score {lo:.6e}{labels}: the \
         threshold answers all of them or none, whatever the objective; calibrate on questions \
         the model gets both right and wrong, or choose another --selector",
        selector.name()
    ))
}

/// Fits the image check on the pooled features of the distinct validation images, in the order
/// they first appear.
fn fit_image_check(val: &[Answered], alpha: f64) -> Result<ImageCheck, String> {
    let mut seen = std::collections::HashSet::new();
    let features: Vec<Vec<f32>> = val
        .iter()
        .filter(|a| seen.insert(&a.image))
        .filter_map(|a| a.scored.image_features.clone())
        .collect();
    if features.is_empty() {
        return Err("the model gives no image features to fit an image check on".into());
    }
    ImageCheck::fit(&features, alpha)
}

/// Whether `check` flags each answered question's image (all false without a check).
fn flagged(check: Option<&ImageCheck>, answered: &[Answered]) -> Result<Vec<bool>> {
    answered
        .iter()
        .map(|a| match (check, &a.scored.image_features) {
            (Some(c), Some(f)) => Ok(!c.verdict(f).map_err(anyhow::Error::msg)?.familiar),
            _ => Ok(false),
        })
        .collect()
}

/// How many replaced calibrations `abstention_history` keeps (the most recent): each can hold an
/// image check of two hidden-size vectors, ~100 KB of JSON for a 7B model.
pub const MAX_ABSTENTION_HISTORY: usize = 10;

/// Sets the `abstention` key of `dir/bella_config.json` atomically, appending the value it
/// replaces to `abstention_history` (the [`MAX_ABSTENTION_HISTORY`] most recent are kept); every
/// other key and its order are kept as they were.
pub fn store_abstention(dir: &Path, abstention: &Abstention) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a particle directory: cannot read {CONFIG_FILE}",
            dir.display()
        )
    })?;
    // The typed config must be valid before and after.
    serde_json::from_str::<ParticleConfig>(&text)
        .with_context(|| format!("{} is not a valid particle config", path.display()))?;
    let mut doc: Ordered = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let Ordered::Object(entries) = &mut doc else {
        bail!("{} does not hold a JSON object", path.display());
    };
    let value: Ordered = serde_json::from_str(&serde_json::to_string(abstention)?)?;
    let replaced = match entries.iter_mut().find(|(k, _)| k == "abstention") {
        Some((_, v)) => Some(std::mem::replace(v, value)),
        None => {
            entries.push(("abstention".into(), value));
            None
        }
    };
    if let Some(old) = replaced.filter(|v| *v != Ordered::Null) {
        match entries.iter_mut().find(|(k, _)| k == "abstention_history") {
            Some((_, Ordered::Array(history))) => {
                history.push(old);
                let excess = history.len().saturating_sub(MAX_ABSTENTION_HISTORY);
                history.drain(..excess);
            }
            Some((_, other)) => *other = Ordered::Array(vec![old]),
            None => entries.push(("abstention_history".into(), Ordered::Array(vec![old]))),
        }
    }
    // A set written before configs recorded their factors' hash gets it now (calibrate has
    // measured these factors, under the directory's lock).
    if !entries.iter().any(|(k, _)| k == "particles_sha256") {
        let sha = crate::io::sha256_file(&dir.join(crate::bella::particles::PARTICLES_FILE))?;
        entries.push(("particles_sha256".into(), Ordered::String(sha)));
    }
    let out = serde_json::to_vec_pretty(&doc)?;
    serde_json::from_slice::<ParticleConfig>(&out).context("the updated config does not parse")?;
    crate::io::write_bytes_atomically(&path, &out)
}

/// A JSON value that keeps the order of object keys (serde_json's `Value` sorts them here).
#[derive(Clone, Debug, PartialEq)]
enum Ordered {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Ordered>),
    Object(Vec<(String, Ordered)>),
}

impl Serialize for Ordered {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Ordered::Null => s.serialize_unit(),
            Ordered::Bool(b) => s.serialize_bool(*b),
            Ordered::Number(n) => n.serialize(s),
            Ordered::String(t) => s.serialize_str(t),
            Ordered::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            Ordered::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> std::result::Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Ordered, E> {
                Ok(Ordered::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(
                self,
                d: D2,
            ) -> std::result::Result<Ordered, D2::Error> {
                Ordered::deserialize(d)
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Ordered, E> {
                Ok(Ordered::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Ordered, E> {
                Ok(Ordered::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Ordered, E> {
                Ok(Ordered::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<Ordered, E> {
                serde_json::Number::from_f64(x)
                    .map(Ordered::Number)
                    .ok_or_else(|| E::custom("a non-finite number"))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Ordered, E> {
                Ok(Ordered::String(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<Ordered, E> {
                Ok(Ordered::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Ordered::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut entries: Vec<(String, Ordered)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Ordered>()? {
                    match entries.iter_mut().find(|(x, _)| *x == k) {
                        Some(e) => e.1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(Ordered::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a validation set too small or too one-sided to place a threshold says about it (`acc`:
/// each question's accuracy): a share measured on n questions is uncertain by up to ±1.96·√(¼/n)
/// (95 %), and answers that are all wrong or all right show nothing of where they go wrong.
fn thin_evidence(acc: &[f64]) -> Vec<String> {
    let n = acc.len();
    let mut warnings = Vec::new();
    if n < MIN_CONFIDENT_QUESTIONS {
        warnings.push(format!(
            "the threshold rests on {n} validation question(s): the coverage and risk of new \
             questions can differ from these by up to ±{:.0} points (95 %); calibrate on a few \
             hundred questions like the ones to answer",
            196.0 * (0.25 / n as f64).sqrt()
        ));
    }
    if acc.iter().all(|&a| a == 0.0) {
        warnings.push(
            "no validation question was answered right: a threshold cannot tell right answers \
             from wrong ones here (do the particles fit questions like these? train on such data)"
                .to_string(),
        );
    } else if acc.iter().all(|&a| a >= 1.0) {
        warnings.push(
            "every validation question was answered right: these questions show nothing of where \
             the answers go wrong, so the threshold is no guide on harder ones"
                .to_string(),
        );
    }
    warnings
}

/// Below this many validation questions, [`thin_evidence`] says how uncertain the threshold's
/// coverage and risk are.
const MIN_CONFIDENT_QUESTIONS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_evidence_says_how_uncertain_a_small_or_one_sided_set_is() {
        // 25 questions: 1.96·√(0.25/25) = 0.196, ±20 points; 400: none said.
        let mixed = |n: usize| (0..n).map(|i| (i % 2) as f64).collect::<Vec<_>>();
        let w = thin_evidence(&mixed(25));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("25 validation question(s)") && w[0].contains("±20 points"));
        assert!(thin_evidence(&mixed(400)).is_empty());
        let wrong = thin_evidence(&[0.0; 400]);
        assert!(wrong.len() == 1 && wrong[0].contains("no validation question was answered right"));
        let right = thin_evidence(&[1.0; 1]);
        assert!(
            right.len() == 2 && right[1].contains("every validation question was answered right")
        );
        // Partly right (VQA accuracy 0.3) is neither.
        assert!(thin_evidence(&[0.3; 400]).is_empty());
    }

    #[test]
    fn scores_are_the_same_up_to_rounding_relative_to_their_size() {
        let acc = [1.0, 0.0];
        // Random weights: scores 1e-21 apart are apart, and said in full.
        assert_eq!(
            same_score(&Selector::Confidence, &[1e-21, 2e-21], &acc),
            None
        );
        let said = same_score(&Selector::Confidence, &[0.5, 0.5 + 1e-12], &acc).unwrap();
        assert!(said.contains("the same score 5.000000e-1"), "{said}");
        let said = same_score(&Selector::Confidence, &[3e-21, 3e-21], &acc).unwrap();
        assert!(said.contains("3.000000e-21"), "{said}");
    }

    #[test]
    fn copies_of_a_question_are_one_draw_for_the_guarantee() {
        // 60 distinct questions, 7 of them wrong, spread over the scores.
        let conf: Vec<f64> = (0..60).map(|i| 1.0 - i as f64 / 100.0).collect();
        let acc: Vec<f64> = (0..60).map(|i| f64::from(i % 8 != 5)).collect();
        let keys: Vec<u64> = (0..60).collect();
        let all: Vec<usize> = (0..60).collect();
        assert_eq!(repeated_questions(&keys), None);
        let (c, l) = once_per_question(&all, &keys, &conf, &acc);
        assert!(crate::guarantee::learn_then_test(&c, &l, 0.25, 0.1).is_err());

        // The same questions twice: counted as 120, they would be certified; counted once, the
        // data say what they said before.
        let twice = |v: &[f64]| [v, v].concat();
        let (conf2, acc2) = (twice(&conf), twice(&acc));
        let keys2: Vec<u64> = [keys.clone(), keys.clone()].concat();
        let all2: Vec<usize> = (0..120).collect();
        let naive: Vec<f64> = acc2.iter().map(|a| 1.0 - a).collect();
        assert!(crate::guarantee::learn_then_test(&conf2, &naive, 0.25, 0.1).is_ok());
        let (c2, l2) = once_per_question(&all2, &keys2, &conf2, &acc2);
        assert_eq!((c2.as_slice(), l2.as_slice()), (c.as_slice(), l.as_slice()));
        let said = repeated_questions(&keys2).unwrap();
        assert!(
            said.starts_with("60 of the 120 validation questions repeat"),
            "{said}"
        );

        // Copies graded apart (other human answers) give their mean loss; only kept ones count.
        let (c3, l3) =
            once_per_question(&[0, 1, 2], &[7, 9, 7], &[0.8, 0.6, 0.8], &[1.0, 0.0, 0.0]);
        assert_eq!((c3, l3), (vec![0.8, 0.6], vec![0.5, 1.0]));
        let (_, l4) = once_per_question(&[1, 2], &[7, 9, 7], &[0.8, 0.6, 0.8], &[1.0, 0.0, 0.0]);
        assert_eq!(l4, vec![1.0, 1.0]);
    }

    fn target(accuracy: &[f64], other: bool) -> Vec<f64> {
        Answered {
            scored: Scored {
                particle_answers: Vec::new(),
                candidates: Vec::new(),
                probs: Vec::new(),
                other,
                prompt_tokens: 0,
                generated_tokens: 0,
                image_features: None,
            },
            accuracy: accuracy.to_vec(),
            image: PathBuf::new(),
            key: 0,
        }
        .target()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn the_temperature_target_keeps_partial_credit_off_the_answer() {
        // VQA accuracy 2/3 (two of the humans): a third of the mass is some other answer, not
        // the whole of it on the candidate (which drove the fit to T = 0.05 on easy data).
        let t = target(&[2.0 / 3.0, 0.0], true);
        assert!(close(&t, &[2.0 / 3.0, 0.0, 1.0 / 3.0]), "{t:?}");
        // Two candidates right in full: shared, nothing else.
        assert!(close(&target(&[1.0, 1.0], true), &[0.5, 0.5, 0.0]));
        assert!(close(&target(&[0.0, 0.0], true), &[0.0, 0.0, 1.0]));
        // CLIP has no "other" column: the accuracies alone.
        assert!(close(&target(&[2.0 / 3.0, 0.0], false), &[2.0 / 3.0, 0.0]));
    }
}
