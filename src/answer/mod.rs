//! Answering with particles (design §5): load once, then [`BellaVqa::ask`] per question or
//! [`BellaVqa::ask_batch`] for several (see the crate root for a runnable example).

pub mod aggregate;
pub mod candidates;
pub mod confidence_map;
pub mod generate;
pub mod image_check;
pub mod score;
pub mod selector;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::bella::particles::{answers_sha256, Abstention, ParticleConfig, ParticleSet};
use crate::bella::ParticleModel;
use crate::hub::{HubOptions, ModelFiles, ModelSource};
use crate::models::compute::ComputeOptions;
use crate::models::{self, LoadedModel, Model};
use aggregate::Uncertainty;
use candidates::{clip_candidates, llava_candidates_batch, ParticleAnswer, Scored};
use candle_core::Tensor;
use confidence_map::ConfidenceMap;
use generate::{GenerateOptions, Sampling};
use image_check::{ImageCheck, ImageVerdict};
use selector::Selector;

/// The abstention threshold used when neither the particles' calibration nor the caller gives one.
pub const UNCALIBRATED_THRESHOLD: f64 = 0.5;

/// The built-in response template (`prompts/response.jinja`).
pub const DEFAULT_RESPONSE_TEMPLATE: &str = include_str!("../../prompts/response.jinja");

/// The normalised answer that means "this cannot be answered" (VizWiz, the shapes world).
pub const UNANSWERABLE: &str = "unanswerable";

/// Reads a CLIP answer vocabulary: one answer per line; blank lines and `#` comments skipped;
/// the answers as [`distinct_answers`] keeps them.
pub fn read_answer_list(path: &Path) -> Result<Vec<String>> {
    let text = crate::input::read_to_string(path, "answer list")?;
    let lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from);
    let answers = distinct_answers(lines).with_context(|| format!("in {}", path.display()))?;
    if answers.is_empty() {
        bail!("{} holds no answers (one per line)", path.display());
    }
    Ok(answers)
}

/// Candidate answers, trimmed, each once: an answer that normalises (VQA) like an earlier one is
/// the same answer and is left out, so that it does not split the probability of one answer
/// between two; one that normalises to nothing (blanks, punctuation, an article) is refused:
/// it could only be declined.
pub fn distinct_answers(answers: impl IntoIterator<Item = String>) -> Result<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    let mut kept = Vec::new();
    for a in answers {
        let normalized = crate::data::normalize::normalize_answer(&a);
        if normalized.is_empty() {
            bail!(
                "the candidate answer {a:?} says nothing once normalised as VQA answers are \
                 (blanks, punctuation or an article only): leave it out"
            );
        }
        if seen.insert(normalized) {
            kept.push(a.trim().to_string());
        }
    }
    Ok(kept)
}

/// A model, its particles and a CLIP answer list, resolved and checked from their files before
/// the (slow) load: particles of another architecture or base, a tokenizer or image settings
/// missing, an answer list given to a LLaVA, a CLIP without candidate answers or with a list
/// other than the calibrated one. A server checks them before it listens, a benchmark before its
/// first question.
pub struct ModelInputs {
    source: ModelSource,
    files: ModelFiles,
    adapters: Option<PathBuf>,
    answers: Option<Vec<String>>,
}

impl ModelInputs {
    /// `threshold_given`: the caller's threshold replaces the calibrated rule.
    pub fn check(
        source: ModelSource,
        adapters: Option<PathBuf>,
        answers: Option<Vec<String>>,
        threshold_given: bool,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let particles = adapters
            .as_deref()
            .map(ParticleSet::read_config)
            .transpose()?;
        let files = crate::hub::resolve(&source, &opts.hub)?;
        BellaVqa::check_inputs(
            &files,
            particles.as_ref(),
            answers.as_deref(),
            threshold_given,
            opts.skip_base_check,
        )?;
        Ok(Self {
            source,
            files,
            adapters,
            answers,
        })
    }

    /// Loads the model with its particles and answer list.
    pub fn load(&self, opts: &LoadOptions) -> Result<BellaVqa> {
        let mut vqa =
            BellaVqa::load_resolved(&self.source, &self.files, self.adapters.as_deref(), opts)?;
        if let Some(answers) = &self.answers {
            vqa.set_answer_vocabulary(answers.clone())?;
        }
        vqa.check_ready()?;
        Ok(vqa)
    }
}

/// How a model is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub hub: HubOptions,
    /// Attach particles even when their base-model hashes differ (not recommended).
    pub skip_base_check: bool,
    /// Device and dtype (`auto` by default).
    pub compute: ComputeOptions,
    /// Quantize the frozen base (`--quantize`); the particles stay f32.
    pub quantize: Option<models::quant::Quantize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            hub: HubOptions::from_env(),
            skip_base_check: false,
            compute: ComputeOptions::default(),
            quantize: None,
        }
    }
}

/// Per-question options.
#[derive(Clone, Debug, PartialEq)]
pub struct AskOptions {
    /// The most tokens a LLaVA generates for the answer (a CLIP generates none, and scores its
    /// answer list whatever this and `sampling` say).
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Replaces the calibrated rule: abstain when the score is below this, whatever the image
    /// check says (its verdict is still reported).
    pub threshold: Option<f64>,
}

impl AskOptions {
    /// Whether two questions can be decoded in one batch (same length limit and sampling; the
    /// threshold only matters after the batch): [`BellaVqa::ask_batch`] answers such questions
    /// together, and others one group after another.
    pub fn decodes_like(&self, other: &Self) -> bool {
        self.max_new_tokens == other.max_new_tokens && self.sampling == other.sampling
    }

    /// Range checks, each naming its option: `max_new_tokens` ≥ 1, a threshold in [0, 1], a
    /// finite positive temperature and a top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            crate::bad_option!("--max-new-tokens 0: an answer needs at least one token");
        }
        if let Some(t) = self.threshold {
            check_given_threshold(t)?;
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self.sampling
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                crate::bad_option!("--temperature {temperature} must be a finite number above 0");
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                crate::bad_option!("--top-p {top_p} must be in (0, 1]");
            }
        }
        Ok(())
    }
}

/// Refuses a threshold given in place of the calibrated one (`--threshold`) outside [0, 1], where
/// every selector's score lies. A stored threshold is checked when the particles are read
/// ([`ParticleConfig::validate`](crate::bella::particles::ParticleConfig::validate)).
pub fn check_given_threshold(t: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&t) {
        crate::bad_option!(
            "--threshold {t} is not a score in [0, 1]: give one in [0, 1] (0 answers every \
             question), or leave --threshold out to use the particles' calibrated threshold"
        );
    }
    Ok(())
}

/// One question of a batch (see [`BellaVqa::ask_batch`]).
#[derive(Clone, Copy, Debug)]
pub struct Question<'a> {
    pub image: &'a DynamicImage,
    pub text: &'a str,
    pub options: &'a AskOptions,
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            sampling: Sampling::Greedy,
            threshold: None,
        }
    }
}

/// A candidate answer with its model-averaged probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateAnswer {
    pub answer: String,
    pub probability: f64,
}

/// The structured answer to one question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The most likely answer (also when abstaining).
    pub answer: String,
    /// The score is below the threshold, the image check finds the image unfamiliar, or the
    /// answer says nothing (empty after the VQA normalisation: "", ".", "the").
    pub abstained: bool,
    /// The probability that the answer is right: p̄ of the answer through the calibrated
    /// confidence map ([`confidence_map`]), p̄ itself without one (`candidates` has p̄).
    pub confidence: f64,
    /// What decides abstention: `score` is compared with `threshold`.
    pub selector: String,
    /// The selector's score (higher means "answer"); for `confidence`, the confidence.
    pub score: f64,
    /// The threshold the score was compared with.
    pub threshold: f64,
    /// Whether the threshold came from calibration and applies as calibrated (greedy decoding,
    /// as calibration answers).
    pub calibrated: bool,
    /// The calibrated image check's verdict ([`image_check`]): an image unlike the validation
    /// images makes the answer abstain whatever the score. Absent without a calibrated check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_check: Option<ImageVerdict>,
    pub uncertainty: Uncertainty,
    /// Fraction of particles whose own answer is `answer`.
    pub vote_share: f64,
    pub particles: Vec<ParticleAnswer>,
    /// Every candidate with p̄, most likely first.
    pub candidates: Vec<CandidateAnswer>,
    /// The rendered text (answer, or "I'm not sure …").
    pub response: String,
    /// Tokens of the prompt (LLaVA: with the image tokens).
    pub prompt_tokens: usize,
    /// Tokens the particles generated, all together.
    pub generated_tokens: usize,
}

/// A model with its particles, ready to answer. `Send + Sync`: share it between threads.
pub struct BellaVqa {
    loaded: LoadedModel,
    particles: usize,
    calibrated_threshold: Option<f64>,
    /// The calibrated selector (`confidence` without calibration).
    selector: Selector,
    /// The calibrated temperature (1 without calibration).
    temperature: f64,
    /// The calibrated confidence map (none without calibration, or calibrated without one).
    confidence_map: Option<ConfidenceMap>,
    /// The calibrated image check (none without calibration, or calibrated without one).
    image_check: Option<ImageCheck>,
    /// CLIP: the answer list the calibration was made with
    /// ([`crate::bella::particles::Abstention::answers_sha256`]).
    calibrated_answers: Option<String>,
    vocabulary: Option<Vec<String>>,
    /// Its fingerprint ([`answers_sha256`]), computed once: every question compares it.
    vocabulary_sha256: Option<String>,
    template: minijinja::Environment<'static>,
}

impl std::fmt::Debug for BellaVqa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BellaVqa")
            .field("model", &self.loaded.files.dir)
            .field("particles", &self.particles)
            .field("calibrated_threshold", &self.calibrated_threshold)
            .field("selector", &self.selector.name())
            .field("answers", &self.vocabulary.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

/// The most questions [`BellaVqa::ask_batch`] folds into one pass: more would only hold more
/// memory at once (every question × particle row of the prompt's KV cache) for no speed.
pub const MAX_FOLDED_QUESTIONS: usize = 32;

impl BellaVqa {
    /// Loads the base model and, if given, the particle directory (checked against the base).
    /// `ModelSource::parse("demo")` is the embedded demo's base model alone; [`Self::demo`] is
    /// the demo as `bella-vqa ask` answers with it.
    pub fn load(source: &ModelSource, adapters: Option<&Path>, opts: &LoadOptions) -> Result<Self> {
        let files = crate::hub::resolve(source, &opts.hub)?;
        Self::load_resolved(source, &files, adapters, opts)
    }

    /// The particles in `adapters` on the base model they were trained on (as PEFT's
    /// `AutoPeftModel` loads an adapter's `base_model_name_or_path`): a hub base at the commit
    /// they were trained on, a directory where it was, the demo by name.
    pub fn load_particles(adapters: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = ParticleSet::read_config(adapters)?.base_model.model_arg();
        let source = ModelSource::parse(&model).with_context(|| {
            format!(
                "the base model of the particles in {} (base_model.source of their \
                 bella_config.json) cannot be found: load it with BellaVqa::load",
                adapters.display()
            )
        })?;
        Self::load(&source, Some(adapters), opts)
    }

    /// The embedded demo by name, as the command line has it: `demo` (or `demo:llava`) is the
    /// shapes-world LLaVA with its calibrated particles, `demo:clip` the CLIP with its answer
    /// list.
    pub fn demo(name: &str, opts: &LoadOptions) -> Result<Self> {
        let component = crate::hub::demo_model(name).with_context(|| {
            format!("{name:?} is not a demo model: demo, demo:llava or demo:clip")
        })?;
        let source = ModelSource::Dir(crate::demo::path(component)?);
        let particles = (component == crate::demo::LLAVA)
            .then(|| crate::demo::path(crate::demo::PARTICLES))
            .transpose()?;
        let mut vqa = Self::load(&source, particles.as_deref(), opts)?;
        if let Some(list) = crate::demo::default_answers(Some(component), particles.is_some())? {
            vqa.set_answer_vocabulary(read_answer_list(&list)?)?;
        }
        Ok(vqa)
    }

    /// [`Self::load`] of the files `source` resolved to ([`ModelInputs`]).
    fn load_resolved(
        source: &ModelSource,
        files: &ModelFiles,
        adapters: Option<&Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (mut loaded, note) =
            models::load_resolved(source, files, opts.compute, opts.quantize.as_ref())?;
        if opts.hub.progress {
            crate::note!("{note}");
        }
        let set = match adapters {
            Some(dir) => {
                let set = ParticleSet::load(dir, &loaded.device)?;
                let architecture = loaded.config.architecture();
                if set.config.architecture != architecture {
                    return Err(other_architecture(&set.config, architecture));
                }
                if !opts.skip_base_check {
                    set.verify_base(&loaded.files)?;
                }
                Some(set)
            }
            None => None,
        };
        if let Some(set) = &set {
            match &mut loaded.model {
                Model::Llava(m) => set.attach_to(m.as_mut())?,
                Model::Clip(m) => set.attach_to(m.as_mut())?,
            }
            let calibrated_in = set.config.abstention.as_ref();
            let calibrated_in = calibrated_in.and_then(|a| a.computed_in.as_deref());
            let now = loaded.info.compute_label();
            if let (Some(then), true) = (calibrated_in.filter(|t| *t != now), opts.hub.progress) {
                crate::note!(
                    "note: the particles were calibrated with the base computing in {then}, \
                     now in {now}: their threshold applies, the scores may move a little \
                     (calibrate again under these settings to be exact)"
                );
            }
        }
        Self::from_loaded(loaded, set.as_ref())
    }

    /// Wraps a loaded model whose particles (if any) are attached; `set` supplies the calibrated
    /// rule ([`Self::set_calibration`]) and the CLIP answer vocabulary.
    pub fn from_loaded(loaded: LoadedModel, set: Option<&ParticleSet>) -> Result<Self> {
        let particles = loaded.model.particles()?;
        let mut template = minijinja::Environment::new();
        template.add_template_owned("response", DEFAULT_RESPONSE_TEMPLATE.to_string())?;
        let mut vqa = Self {
            particles,
            calibrated_threshold: None,
            selector: Selector::default(),
            temperature: 1.0,
            confidence_map: None,
            image_check: None,
            calibrated_answers: None,
            vocabulary_sha256: set
                .and_then(|s| s.config.answer_vocabulary.as_deref())
                .map(answers_sha256),
            vocabulary: set.and_then(|s| s.config.answer_vocabulary.clone()),
            loaded,
            template,
        };
        vqa.set_calibration(set.and_then(|s| s.config.abstention.as_ref()));
        Ok(vqa)
    }

    /// Replaces the response template (minijinja; see `prompts/response.jinja` for the variables),
    /// checked by [`Self::check_response_template`].
    pub fn set_response_template(&mut self, source: &str) -> Result<()> {
        self.template = Self::check_response_template(source)?;
        Ok(())
    }

    /// Compiles a response template and tries it on a sample of every kind of response
    /// (answered, abstained, an unfamiliar image, "unanswerable"), so a template that cannot
    /// render fails here (before any model is loaded, if the caller likes) and not at each answer.
    pub fn check_response_template(source: &str) -> Result<minijinja::Environment<'static>> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("response", source.to_string())
            .context("invalid response template")?;
        for (abstained, unfamiliar_image, unanswerable) in [
            (false, false, false),
            (true, false, false),
            (true, true, false),
            (false, false, true),
        ] {
            let sample = TemplateFacts {
                answer: if unanswerable { UNANSWERABLE } else { "red" },
                confidence: if abstained { 0.3 } else { 0.9 },
                threshold: 0.5,
                abstained,
                unfamiliar_image,
                unanswerable,
                question: "What color is the circle?",
            };
            render_response(&env, &sample).with_context(|| {
                format!(
                    "the response template cannot render a sample response (abstained: \
                     {abstained}, unfamiliar image: {unfamiliar_image}, unanswerable: {unanswerable})"
                )
            })?;
        }
        Ok(env)
    }

    /// What can be told of a model, its particles and a CLIP answer list from their files alone,
    /// before the (slow) load: particles of another architecture or base (unless
    /// `skip_base_check`), a tokenizer or image settings missing, an answer list given to a
    /// LLaVA, a CLIP without candidate answers, and a CLIP answer list other than the one the
    /// particles were calibrated with (unless the caller's threshold replaces the calibrated
    /// rule).
    fn check_inputs(
        files: &ModelFiles,
        particles: Option<&ParticleConfig>,
        answers: Option<&[String]>,
        threshold_given: bool,
        skip_base_check: bool,
    ) -> Result<()> {
        let (config, _) = models::config::ModelConfig::from_file(&files.required("config.json")?)?;
        if let Some(set) = particles.filter(|c| c.architecture != config.architecture()) {
            return Err(other_architecture(set, config.architecture()));
        }
        if let (Some(config), false) = (particles, skip_base_check) {
            ParticleSet::verify_base_of(config, files)?;
        }
        models::check_answering_files(files)?;
        let clip = matches!(config, models::config::ModelConfig::Clip(_));
        if !clip && answers.is_some() {
            return Err(answers_given_to_llava());
        }
        let vocabulary = answers.or(particles.and_then(|c| c.answer_vocabulary.as_deref()));
        check_vocabulary(clip, vocabulary)?;
        if !threshold_given {
            let calibrated = particles
                .and_then(|c| c.abstention.as_ref())
                .and_then(|a| a.answers_sha256.as_deref());
            check_answer_list(calibrated, vocabulary.map(answers_sha256).as_deref())?;
        }
        Ok(())
    }

    /// Fails when a question could not be answered whatever it is: a CLIP model without an
    /// answer vocabulary (neither `--answers` nor particles trained with one).
    pub fn check_ready(&self) -> Result<()> {
        check_vocabulary(
            matches!(self.loaded.model, Model::Clip(_)),
            self.vocabulary.as_deref(),
        )
    }

    /// The candidate answers a CLIP model scores, each once ([`distinct_answers`]). A LLaVA
    /// generates its answers, so giving it a vocabulary is an error rather than a silently
    /// ignored option; so are an empty list and an answer too long for CLIP's text encoder even
    /// after an empty question (every question would be refused).
    pub fn set_answer_vocabulary(&mut self, answers: Vec<String>) -> Result<()> {
        let Model::Clip(m) = &self.loaded.model else {
            return Err(answers_given_to_llava());
        };
        let answers = distinct_answers(answers)?;
        if answers.is_empty() {
            bail!("the answer list is empty: a CLIP model answers by choosing one of its answers");
        }
        let positions = m.config().text_config.max_position_embeddings;
        let prompter = self.loaded.prompter()?;
        for a in &answers {
            let text = candidates::clip_prompt("", a);
            if prompter
                .encode_clip_batch(&[text], positions, false)
                .is_err()
            {
                bail!(
                    "the candidate answer {a:?} is too long for CLIP's {positions} text positions, \
                     even after an empty question: shorten it or leave it out (--answers)"
                );
            }
        }
        self.vocabulary_sha256 = Some(answers_sha256(&answers));
        self.vocabulary = Some(answers);
        Ok(())
    }

    /// The candidate answers a CLIP model scores ([`Self::set_answer_vocabulary`], or the
    /// particles' own); `None` for a LLaVA, which generates its answers.
    pub fn answer_vocabulary(&self) -> Option<&[String]> {
        self.vocabulary.as_deref()
    }

    pub fn model(&self) -> &LoadedModel {
        &self.loaded
    }

    pub fn particles(&self) -> usize {
        self.particles
    }

    /// The selector whose score decides abstention.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// Replaces the whole calibrated rule (what `calibrate` stores with the particles: threshold,
    /// selector, temperature, confidence map, image check, answer list); `None`: uncalibrated.
    /// The rule is used as it is: [`ParticleConfig::validate`] checks a stored one.
    pub fn set_calibration(&mut self, abstention: Option<&Abstention>) {
        self.calibrated_threshold = abstention.map(|a| a.threshold);
        self.selector = abstention.map(|a| a.selector.clone()).unwrap_or_default();
        self.temperature = abstention.and_then(|a| a.temperature).unwrap_or(1.0);
        self.confidence_map = abstention.and_then(|a| a.confidence_map.clone());
        self.image_check = abstention.and_then(|a| a.image_check.clone());
        self.calibrated_answers = abstention.and_then(|a| a.answers_sha256.clone());
    }

    /// The particles' candidates and their P×K matrix for one question, before temperature and
    /// aggregation (what `calibrate` fits the temperature and the selectors on).
    pub fn scored(
        &self,
        image: &DynamicImage,
        question: &str,
        opts: &AskOptions,
    ) -> Result<Scored> {
        let q = Question {
            image,
            text: question,
            options: opts,
        };
        let (text, pixels) = self.prepare(&q)?;
        self.score(&pixels.unsqueeze(0)?, &[text], opts)?
            .pop()
            .context("no result for the question")
    }

    /// Tokens of user text alone, as text (a question as typed, a completion's content).
    pub fn text_tokens(&self, text: &str) -> Result<usize> {
        self.loaded.prompter()?.count_text_tokens(text)
    }

    /// The length of the whole prompt of `question` (chat template and image tokens included)
    /// and the model's positions, computed before any tensor is made; `None` for CLIP, which
    /// truncates its texts to its positions.
    fn prompt_and_positions(&self, question: &str) -> Result<Option<(usize, usize)>> {
        let Model::Llava(m) = &self.loaded.model else {
            return Ok(None);
        };
        let prompter = self.loaded.prompter()?;
        // The same tokenisation as answering: special-token strings in the question are text, and
        // an overlong question is refused before it is tokenised.
        let prompt = prompter
            .encode_question(
                question.trim(),
                true,
                m.config().image_tokens_per_image(),
                None,
            )?
            .len();
        Ok(Some((
            prompt,
            m.config().text_config.max_position_embeddings,
        )))
    }

    /// How many answer tokens fit after the prompt of `question` in the model's positions
    /// (`None`: no limit, CLIP, once its question-and-answer texts fit its text encoder).
    pub fn answer_room(&self, question: &str) -> Result<Option<usize>> {
        self.check_clip_texts_fit(question)?;
        Ok(self
            .prompt_and_positions(question)?
            .map(|(prompt, positions)| positions.saturating_sub(prompt)))
    }

    /// `max_new_tokens` limited to the room the prompt of `question` leaves in the model's
    /// positions (LLaVA), as `ask` and `serve` limit it; unchanged for CLIP, and where the prompt
    /// leaves no room ([`Self::check_prompt_fits`] refuses the question then).
    pub fn fitted_max_new_tokens(&self, question: &str, max_new_tokens: usize) -> Result<usize> {
        Ok(match self.prompt_and_positions(question)? {
            Some((prompt, positions)) if positions > prompt => {
                max_new_tokens.min(positions - prompt)
            }
            _ => max_new_tokens,
        })
    }

    /// CLIP: refuses a question whose text with an answer of the vocabulary
    /// ([`candidates::clip_prompt`]) passes the text encoder's positions (the answer would be cut
    /// off and every answer score alike).
    fn check_clip_texts_fit(&self, question: &str) -> Result<()> {
        let Model::Clip(m) = &self.loaded.model else {
            return Ok(());
        };
        let texts: Vec<String> = self
            .vocabulary
            .iter()
            .flatten()
            .map(|a| candidates::clip_prompt(question, a))
            .collect();
        let positions = m.config().text_config.max_position_embeddings;
        self.loaded
            .prompter()?
            .encode_clip_batch(&texts, positions, false)?;
        Ok(())
    }

    /// Checks that the prompt of `question` plus `max_new_tokens` fits the model's positions.
    /// (A CLIP's texts are checked as they are encoded: [`candidates::clip_candidates`].)
    pub fn check_prompt_fits(&self, question: &str, max_new_tokens: usize) -> Result<()> {
        if let Some((prompt, positions)) = self.prompt_and_positions(question)? {
            if prompt.saturating_add(max_new_tokens) > positions {
                return Err(crate::error::QuestionError::PromptTooLong {
                    prompt,
                    max_new_tokens,
                    positions,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Answers with the default options.
    pub fn ask(&self, image: &DynamicImage, question: &str) -> Result<Response> {
        self.ask_with(image, question, &AskOptions::default())
    }

    pub fn ask_with(
        &self,
        image: &DynamicImage,
        question: &str,
        opts: &AskOptions,
    ) -> Result<Response> {
        let q = Question {
            image,
            text: question,
            options: opts,
        };
        self.ask_batch(&[q])
            .pop()
            .context("no response for the question")?
    }

    /// Answers several questions, each about its own image, with one result per question in
    /// order. Questions that decode alike ([`AskOptions`] without the threshold) are answered
    /// together, [`MAX_FOLDED_QUESTIONS`] at a time: one vision pass, one prefill, one decoding
    /// loop and one scoring pass for all questions × particles (LLaVA; CLIP scores question by
    /// question). A bad question fails alone ([`crate::error::QuestionError`] for one that cannot
    /// be answered as asked, [`crate::error::ImageTooLarge`] for its image); an error of the
    /// batch's computation is reported for each of its questions.
    pub fn ask_batch(&self, questions: &[Question]) -> Vec<Result<Response>> {
        self.answer_batch(questions)
    }

    /// [`ask_batch`](Self::ask_batch) for askers who may leave: `stop` is asked between the
    /// model's layers (and so between decoding steps), on this thread, and once it says
    /// true the questions not yet answered fail with [`crate::cancel::Cancelled`] (those answered
    /// by then keep their answers). The server passes "every asker of the batch has gone".
    pub fn ask_batch_until(
        &self,
        questions: &[Question],
        stop: &dyn Fn() -> bool,
    ) -> Vec<Result<Response>> {
        crate::cancel::until(stop, || self.answer_batch(questions))
    }

    fn answer_batch(&self, questions: &[Question]) -> Vec<Result<Response>> {
        let mut out: Vec<Option<Result<Response>>> = questions.iter().map(|_| None).collect();
        let mut pending: Vec<(usize, &str, Tensor)> = Vec::new();
        for (i, q) in questions.iter().enumerate() {
            match self.prepare(q) {
                Ok((text, pixels)) => pending.push((i, text, pixels)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        while let Some(&(first, ..)) = pending.first() {
            let opts = questions[first].options;
            let (mut group, mut rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(|(i, ..)| questions[*i].options.decodes_like(opts));
            if group.len() > MAX_FOLDED_QUESTIONS {
                rest.splice(0..0, group.split_off(MAX_FOLDED_QUESTIONS));
            }
            pending = rest;
            let texts: Vec<&str> = group.iter().map(|(_, t, _)| *t).collect();
            let scored = crate::cancel::check()
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    let pixels = group.iter().map(|(.., p)| p).collect::<Vec<_>>();
                    Ok(Tensor::stack(&pixels, 0)?)
                })
                .and_then(|pixels| self.score(&pixels, &texts, opts))
                // Stopped inside the model: said as what it is.
                .map_err(|e| match crate::cancel::check() {
                    Err(cancelled) => cancelled.into(),
                    Ok(()) => e,
                });
            match scored {
                Ok(scored) => {
                    for ((i, text, _), s) in group.iter().zip(scored) {
                        out[*i] = Some(self.respond(text, s, questions[*i].options));
                    }
                }
                Err(e) => {
                    for (i, ..) in &group {
                        out[*i] = Some(Err(match e.downcast_ref::<crate::cancel::Cancelled>() {
                            Some(_) => crate::cancel::Cancelled.into(),
                            None => anyhow::anyhow!("{e:#}"),
                        }));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("the question was not answered"))))
            .collect()
    }

    /// A question's trimmed text and preprocessed pixels `[C, H, W]`.
    fn prepare<'q>(&self, q: &Question<'q>) -> Result<(&'q str, Tensor)> {
        let text = self.check_question(q.text, q.options)?;
        let pixels = self.loaded.image_processor()?.preprocess(q.image)?;
        Ok((text, pixels))
    }

    /// What can be told of a question without its image: whether it can be answered with
    /// `options` (its text not empty, its prompt within the model's positions with the answer,
    /// the options valid); its trimmed text. A benchmark checks every question so before the
    /// first is answered.
    pub fn check_question<'q>(&self, question: &'q str, options: &AskOptions) -> Result<&'q str> {
        options
            .validate()
            .map_err(|e| crate::error::QuestionError::Unusable(format!("{e:#}")))?;
        let Some(text) = crate::models::prompt::visible_question(question) else {
            return Err(crate::error::QuestionError::Empty.into());
        };
        self.check_prompt_fits(text, options.max_new_tokens)?;
        self.check_calibrated_answers(options)?;
        Ok(text)
    }

    /// CLIP: the fingerprint of the answer list in use.
    pub fn answers_sha256(&self) -> Option<&str> {
        self.vocabulary_sha256.as_deref()
    }

    /// Refuses answering with the calibrated rule from another CLIP answer list than the one it
    /// was calibrated with: its threshold and temperature are of that list's probabilities.
    fn check_calibrated_answers(&self, opts: &AskOptions) -> Result<()> {
        if opts.threshold.is_some() {
            return Ok(()); // The caller's threshold replaces the calibrated rule.
        }
        check_answer_list(self.calibrated_answers.as_deref(), self.answers_sha256())
    }

    /// The particles' candidates for questions that decode alike.
    fn score(&self, pixels: &Tensor, questions: &[&str], opts: &AskOptions) -> Result<Vec<Scored>> {
        let prompter = self.loaded.prompter()?;
        match &self.loaded.model {
            Model::Llava(m) => {
                let gen = GenerateOptions {
                    max_new_tokens: opts.max_new_tokens,
                    eos: self.loaded.stop_token_ids(),
                    sampling: opts.sampling,
                };
                llava_candidates_batch(m, prompter, pixels, questions, self.particles, &gen)
            }
            Model::Clip(m) => {
                let vocab = self.vocabulary.as_deref().unwrap_or_default();
                questions
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        let px = pixels.narrow(0, i, 1)?;
                        clip_candidates(m, prompter, &px, q, vocab, self.particles)
                    })
                    .collect()
            }
        }
    }

    fn respond(&self, question: &str, scored: Scored, opts: &AskOptions) -> Result<Response> {
        let (agg, facts) = selector::assess(
            &scored.probs,
            scored.other,
            &scored.candidates,
            self.temperature,
            self.confidence_map.as_ref(),
        )
        .map_err(anyhow::Error::msg)?;
        let raw_score = self.selector.score(&facts);
        let confidence = facts.confidence;
        // A score that is not a number (a stored selector from elsewhere) declines, and is
        // recorded as the lowest (JSON has no NaN: it would read back as no score at all).
        let score = if raw_score.is_nan() { 0.0 } else { raw_score };
        // Calibration is of greedy answers: sampled ones are compared with its threshold, but
        // not called calibrated. A CLIP samples nothing (it scores its candidates).
        let greedy = matches!(opts.sampling, Sampling::Greedy)
            || matches!(self.loaded.model, Model::Clip(_));
        let (threshold, calibrated) = match (opts.threshold, self.calibrated_threshold) {
            (Some(t), _) => (t, false),
            (None, Some(t)) => (t, greedy),
            (None, None) => (UNCALIBRATED_THRESHOLD, false),
        };
        let answer = scored.candidates[agg.best].clone();
        let image_check = match (&self.image_check, &scored.image_features) {
            (Some(check), Some(features)) => {
                Some(check.verdict(features).map_err(anyhow::Error::msg)?)
            }
            _ => None,
        };
        // A caller's threshold replaces the whole calibrated rule, the image check included.
        let unfamiliar_image = opts.threshold.is_none() && image_check.is_some_and(|v| !v.familiar);
        let normalized = crate::data::normalize::normalize_answer(&answer);
        // An answer that normalises to nothing ("", ".", "the") says nothing: no answer to give.
        let abstained =
            raw_score.is_nan() || score < threshold || unfamiliar_image || normalized.is_empty();
        let unanswerable = normalized == UNANSWERABLE;
        let response = render_response(
            &self.template,
            &TemplateFacts {
                answer: &answer,
                confidence,
                threshold,
                abstained,
                unfamiliar_image,
                unanswerable,
                question,
            },
        )
        .context("rendering the response template")?;
        let mut candidates: Vec<CandidateAnswer> = scored
            .candidates
            .iter()
            .zip(&agg.mean)
            .map(|(a, &p)| CandidateAnswer {
                answer: a.clone(),
                probability: p,
            })
            .collect();
        candidates.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        Ok(Response {
            answer,
            abstained,
            confidence,
            selector: self.selector.name().to_string(),
            score,
            threshold,
            calibrated,
            image_check,
            uncertainty: agg.uncertainty,
            vote_share: agg.vote_share,
            particles: scored.particle_answers,
            candidates,
            response: response.trim().to_string(),
            prompt_tokens: scored.prompt_tokens,
            generated_tokens: scored.generated_tokens,
        })
    }
}

/// What the response template sees (with `confidence_pct`, the confidence in whole percent).
struct TemplateFacts<'a> {
    answer: &'a str,
    confidence: f64,
    threshold: f64,
    abstained: bool,
    unfamiliar_image: bool,
    unanswerable: bool,
    question: &'a str,
}

/// A probability in whole percent, 100 only when it is 1: "I'm not sure. Most likely: red
/// (100 %)" read as a contradiction when the particles gave 0.996 and the bar was higher.
fn percent(p: f64) -> i64 {
    let rounded = (p * 100.0).round() as i64;
    if rounded >= 100 && p < 1.0 {
        99
    } else {
        rounded
    }
}

fn render_response(env: &minijinja::Environment, f: &TemplateFacts) -> Result<String> {
    Ok(env.get_template("response")?.render(minijinja::context! {
        answer => f.answer,
        confidence => f.confidence,
        confidence_pct => percent(f.confidence),
        threshold => f.threshold,
        abstained => f.abstained,
        unfamiliar_image => f.unfamiliar_image,
        unanswerable => f.unanswerable,
        question => f.question,
    })?)
}

/// Particles of one architecture given to a model of another.
fn other_architecture(particles: &ParticleConfig, model: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "these are {} particles (trained on {}), and the model is a {model}: load them onto the \
         base model they were trained on",
        particles.architecture,
        particles.base_model.source,
    )
}

/// A LLaVA generates its answers: giving it an answer list is an error, not an ignored option.
fn answers_given_to_llava() -> anyhow::Error {
    anyhow::anyhow!(
        "an answer vocabulary (--answers) applies only to CLIP models; this LLaVA generates its answers"
    )
}

/// A CLIP model answers from candidate answers: without any, every question fails.
fn check_vocabulary(clip: bool, vocabulary: Option<&[String]>) -> Result<()> {
    if clip && vocabulary.is_none_or(<[String]>::is_empty) {
        bail!(
            "a CLIP model answers from an answer vocabulary: give one with --answers FILE or \
             use particles trained with one"
        );
    }
    Ok(())
}

/// The calibrated rule of one CLIP answer list (fingerprint `calibrated`) does not apply to
/// another (`now`): its threshold and temperature are of that list's probabilities.
fn check_answer_list(calibrated: Option<&str>, now: Option<&str>) -> Result<()> {
    match (calibrated, now) {
        (Some(calibrated), Some(now)) if calibrated != now => bail!(
            "these particles were calibrated with another answer list than the one answering \
             now (--answers, or without it the particles' training answers): pass the list \
             they were calibrated with as --answers, or calibrate them with this one"
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declined_answer_is_not_called_certain() {
        let env = BellaVqa::check_response_template(DEFAULT_RESPONSE_TEMPLATE).unwrap();
        let facts = |confidence: f64, abstained: bool| TemplateFacts {
            answer: "red",
            confidence,
            threshold: 0.999,
            abstained,
            unfamiliar_image: false,
            unanswerable: false,
            question: "What color is the circle?",
        };
        let text = render_response(&env, &facts(0.996, true)).unwrap();
        assert_eq!(text, "I'm not sure. Most likely: red (99 %)");
        assert_eq!(percent(1.0), 100);
        assert_eq!(percent(0.994), 99);
        assert_eq!(percent(0.5), 50);
    }

    #[test]
    fn an_answer_list_drops_its_byte_order_mark_comments_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.txt");
        std::fs::write(
            &path,
            "\u{feff}red\n# colours\n\nred\n Red \nblue\nthe blue\n",
        )
        .unwrap();
        // "Red" and "the blue" normalise to answers already listed.
        assert_eq!(read_answer_list(&path).unwrap(), ["red", "blue"]);
        std::fs::write(&path, "# nothing\n\n").unwrap();
        let err = format!("{:#}", read_answer_list(&path).unwrap_err());
        assert!(err.contains("holds no answers"), "{err}");
    }

    #[test]
    fn the_built_in_template_shows_an_empty_answer_as_such() {
        let mut env = minijinja::Environment::new();
        env.add_template("response", DEFAULT_RESPONSE_TEMPLATE)
            .unwrap();
        let facts = |answer, abstained| TemplateFacts {
            answer,
            confidence: 0.67,
            threshold: 0.5,
            abstained,
            unfamiliar_image: false,
            unanswerable: false,
            question: "What is on the sofa?",
        };
        let render = |f| render_response(&env, &f).unwrap();
        assert_eq!(
            render(facts("", true)),
            "I'm not sure. Most likely: (no answer) (67 %)"
        );
        assert_eq!(render(facts("", false)), "(no answer)");
        assert_eq!(render(facts("cat", false)), "cat");
        assert_eq!(
            render(facts("cat", true)),
            "I'm not sure. Most likely: cat (67 %)"
        );
    }
}
