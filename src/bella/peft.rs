//! Particles as standard PEFT LoRA adapters, both ways.
//!
//! A Bella particle on a layer is exactly a PEFT LoRA adapter on it: ΔW_p = (α/r)·B_p·A_p with
//! `lora_alpha = α`, `r = rank`, no rsLoRA, no DoRA, `bias = "none"`, dropout 0. `export_peft`
//! writes particle p of a set as
//!
//! ```text
//! OUT/particle-{p}/adapter_config.json         LoraConfig (peft_type LORA, r, lora_alpha, …)
//! OUT/particle-{p}/adapter_model.safetensors   base_model.model.{name}.lora_A.weight  [r, in]  f32
//!                                              base_model.model.{name}.lora_B.weight  [out, r] f32
//!                                              metadata {"format": "pt"}
//! ```
//!
//! which `PeftModel.from_pretrained(base, OUT/particle-{p})` and `model.load_adapter(…)` load onto
//! the transformers model of the base checkpoint; `import_peft` reads such a directory (or several,
//! stacked as particles) back.
//!
//! ## Module names
//!
//! Our module paths are the hub checkpoint names; PEFT keys use the module names of the model *in
//! memory*, prefixed with `base_model.model.`, which for LLaVA differ under transformers ≥ 4.52
//! (checked against an adapter saved by `peft` 0.21.2 on transformers 5.24,
//! `tests/fixtures/peft/llava-lora`):
//!
//! | our path (hub checkpoint)        | PEFT module name (transformers 5)   |
//! |----------------------------------|-------------------------------------|
//! | `language_model.model.{rest}`    | `model.language_model.{rest}`       |
//! | `language_model.lm_head`         | `lm_head`                           |
//! | `vision_tower.vision_model.{rest}` | `model.vision_tower.{rest}`       |
//! | `multi_modal_projector.{rest}`   | `model.multi_modal_projector.{rest}`|
//! | CLIP `text_model.…`, `vision_model.…`, `visual_projection`, `text_projection` | unchanged |
//!
//! Import also accepts the names of older transformers: `model.vision_tower.vision_model.{rest}`
//! (4.52 – 4.x) and the hub names themselves (before 4.52, when they were the in-memory names),
//! and adapters made on a CLIP tower alone (`CLIPVisionModel`/`CLIPTextModel` of transformers 5,
//! names from `encoder.`), placed on the base's tower whose layers they fit ([`bind_base`]).
//! It takes plain LoRA (rsLoRA folded into alpha; MiCA, VeLoRA and MonteCLoRA, which are plain
//! LoRA at inference; rank/alpha patterns equal to r/lora_alpha) and refuses, with what to do,
//! every adapter whose forward pass is not ΔW = α/r·B·A at every position: DoRA, aLoRA, BD-LoRA,
//! Arrow, KaSA, QA-LoRA, biases, saved modules, per-layer ranks, and PiSSA / OLoRA / CorDA /
//! LoftQ / LoRA-GA initialisations (PEFT changes the base weight when it loads those;
//! `path_initial_model_for_weight_conversion` re-saves them as plain LoRA). Every key of PEFT
//! 0.21's `LoraConfig` is listed in `LORA_KEYS`; an unknown key is accepted only when it is
//! null, false or empty.
//!
//! ## adapter_config.json
//!
//! The export writes the fields every PEFT version since 0.9 knows, not the ~40 fields 0.21 writes:
//! recent PEFT ignores unknown fields with a warning, older versions refuse them, and every field
//! left out takes PEFT's default, which is what a plain LoRA needs. Every value written equals the
//! one in the PEFT-saved fixture except `target_modules` and the base model: `peft_type`,
//! `task_type` (`CAUSAL_LM` for LLaVA, as in the fixture and usual LLaVA LoRA recipes; `null` for
//! CLIP, with the `auto_mapping` PEFT writes then), `auto_mapping`, `base_model_name_or_path`,
//! `revision`, `inference_mode`, `r`, `lora_alpha`, `lora_dropout`, `target_modules` (the exact
//! PEFT module names, sorted; PEFT matches a list entry by equality or `.`-suffix),
//! `bias`, `fan_in_fan_out`, `modules_to_save`, `init_lora_weights`, `layers_to_transform`,
//! `layers_pattern`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::particles::{hash_weights, BaseModel, ParticleConfig, ParticleSet};
use super::Adapter;
use crate::hub::{ModelFiles, Origin};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What `PeftModel.save_pretrained` puts before every module name.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";
/// The `method` of an imported set.
pub const IMPORTED_METHOD: &str = "peft-import";

/// (our hub prefix, PEFT's in-memory prefix) for LLaVA; a prefix without a trailing dot is a whole
/// name.
const LLAVA_NAMES: &[(&str, &str)] = &[
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
];
/// CLIP's in-memory names are the hub names.
const CLIP_NAMES: &[&str] = &[
    "text_model.",
    "vision_model.",
    "visual_projection",
    "text_projection",
];

fn strip_name<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.ends_with('.') {
        path.strip_prefix(prefix)
    } else if path == prefix {
        Some("")
    } else {
        None
    }
}

/// Our module path (hub checkpoint name) → the module name PEFT uses under transformers 5.
pub fn peft_module_name(path: &str) -> Result<String> {
    for (ours, theirs) in LLAVA_NAMES {
        if let Some(rest) = strip_name(path, ours) {
            return Ok(format!("{theirs}{rest}"));
        }
    }
    if CLIP_NAMES.iter().any(|p| strip_name(path, p).is_some()) {
        return Ok(path.to_string());
    }
    bail!("no PEFT module name known for the layer {path} (expected a LLaVA or CLIP module path)")
}

/// A PEFT module name (transformers 5, 4.52+ or older; `base_model.model.` already removed) → our
/// module path.
pub fn hub_module_path(name: &str) -> String {
    if name == "lm_head" {
        return "language_model.lm_head".to_string();
    }
    const IMPORT: &[(&str, &str)] = &[
        ("model.language_model.", "language_model.model."),
        (
            "model.vision_tower.vision_model.",
            "vision_tower.vision_model.",
        ),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ];
    for (theirs, ours) in IMPORT {
        if let Some(rest) = name.strip_prefix(theirs) {
            return format!("{ours}{rest}");
        }
    }
    name.to_string()
}

fn is_llava_path(path: &str) -> bool {
    LLAVA_NAMES
        .iter()
        .any(|(ours, _)| strip_name(path, ours).is_some())
}

/// `LLaVA` or `CLIP`, from the module paths.
fn architecture_of<'a>(paths: impl IntoIterator<Item = &'a String>) -> &'static str {
    if paths.into_iter().any(|p| is_llava_path(p)) {
        "LLaVA"
    } else {
        "CLIP"
    }
}

/// The `adapter_config.json` of every particle of `set`.
pub fn adapter_config(set: &ParticleSet) -> Result<Value> {
    let c = &set.config;
    ensure!(
        c.alpha.is_finite() && c.alpha > 0.0 && c.rank > 0,
        "the particle config has rank {} and alpha {}: not a LoRA",
        c.rank,
        c.alpha
    );
    let mut targets = set
        .adapters
        .iter()
        .map(|(path, _)| peft_module_name(path))
        .collect::<Result<Vec<_>>>()?;
    targets.sort_by(|a, b| natural_cmp(a, b));
    let llava = architecture_of(set.adapters.iter().map(|(p, _)| p)) == "LLaVA";
    // PEFT writes an integral lora_alpha as an integer.
    let alpha = if c.alpha.fract() == 0.0 && c.alpha < 1e15 {
        json!(c.alpha as i64)
    } else {
        json!(c.alpha)
    };
    let (base_name, revision) = peft_base(&c.base_model);
    let fields: BTreeMap<&str, Value> = BTreeMap::from([
        ("alpha_pattern", json!({})),
        (
            "auto_mapping",
            if llava {
                Value::Null
            } else {
                json!({
                    "base_model_class": "CLIPModel",
                    "parent_library": "transformers.models.clip.modeling_clip"
                })
            },
        ),
        ("base_model_name_or_path", json!(base_name)),
        ("bias", json!("none")),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("lora_alpha", alpha),
        ("lora_dropout", json!(0.0)),
        ("modules_to_save", Value::Null),
        ("peft_type", json!("LORA")),
        ("r", json!(c.rank)),
        ("rank_pattern", json!({})),
        ("revision", json!(revision)),
        ("target_modules", json!(targets)),
        (
            "task_type",
            if llava {
                json!("CAUSAL_LM")
            } else {
                Value::Null
            },
        ),
        ("use_dora", json!(false)),
        ("use_rslora", json!(false)),
    ]);
    Ok(json!(fields))
}

/// Writes every particle of `set` as a PEFT LoRA adapter in `out/particle-{p}/`, replacing the
/// directories of `replace` (adapters already there); returns the new directories. The set is
/// written as a whole ([`crate::io::write_dirs_atomically`]); other files in `out` are left
/// alone.
pub fn export_peft(set: &ParticleSet, out: &Path, replace: &[PathBuf]) -> Result<Vec<PathBuf>> {
    ensure!(!set.adapters.is_empty(), "the particle set adapts no layer");
    if out.exists() && !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let config = adapter_config(set)?;
    let config_bytes = format!("{}\n", serde_json::to_string_pretty(&config)?);
    // A CLIP's particles score the answers of their vocabulary: it travels with them.
    let vocabulary = match &set.config.answer_vocabulary {
        Some(v) => Some(serde_json::to_vec_pretty(v)?),
        None => None,
    };
    let particles = set.adapters[0].1.particles();
    let mut names = Vec::with_capacity(set.adapters.len());
    for (path, ad) in &set.adapters {
        ensure!(
            ad.particles() == particles && ad.rank() == set.config.rank,
            "{path} has {} particles of rank {}, the set has {particles} of rank {}",
            ad.particles(),
            ad.rank(),
            set.config.rank
        );
        names.push(format!("{PEFT_KEY_PREFIX}{}", peft_module_name(path)?));
    }
    let mut dirs = Vec::with_capacity(particles);
    for p in 0..particles {
        let mut tensors = Vec::with_capacity(2 * names.len());
        for (name, (path, ad)) in names.iter().zip(&set.adapters) {
            let a = ad.a.get(p)?.to_dtype(DType::F32)?;
            let b = ad.b.get(p)?.to_dtype(DType::F32)?;
            let bad = |t: &Tensor| -> Result<bool> {
                Ok(!t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|v| v.is_finite()))
            };
            if bad(&a)? || bad(&b)? {
                bail!("particle {p} has non-finite factors on {path}: refusing to export it");
            }
            tensors.push((format!("{name}.lora_A.weight"), a));
            tensors.push((format!("{name}.lora_B.weight"), b));
        }
        let weights = safetensors_with_metadata(&mut tensors, &[("format", "pt")])?;
        let mut files = vec![
            (ADAPTER_WEIGHTS_FILE, weights),
            (ADAPTER_CONFIG_FILE, config_bytes.clone().into_bytes()),
        ];
        if let Some(vocabulary) = &vocabulary {
            files.push((ANSWERS_FILE, vocabulary.clone()));
        }
        dirs.push((out.join(format!("particle-{p}")), files));
    }
    // All or none: an interrupted export leaves the adapters that were there (or nothing), never
    // a part of the set that reads as a whole one.
    crate::io::write_dirs_atomically(&dirs, replace)?;
    Ok(dirs.into_iter().map(|(dir, _)| dir).collect())
}

/// What to do with an adapter that cannot become particles but still works in PEFT.
const MERGE: &str = "merge it into the base (PeftModel.merge_and_unload(), then save_pretrained) \
                     and pass the merged model as --model, or retrain it as a plain LoRA";

/// How bella-vqa reads a key of PEFT's `LoraConfig` (and `PeftConfig`), as of PEFT 0.21.2.
enum Key {
    /// Any value: read elsewhere, or it does not change PEFT's forward pass at inference.
    Any,
    /// Checked by hand in [`check_lora_keys`].
    Checked,
    /// Refused unless neutral: (what it does that a particle cannot, what to do instead).
    /// `null_only`: PEFT turns any other value, `{}` too, into an active sub-config.
    Refused {
        why: &'static str,
        todo: &'static str,
        null_only: bool,
    },
}

const fn refused(why: &'static str, todo: &'static str) -> Key {
    Key::Refused {
        why,
        todo,
        null_only: false,
    }
}

/// A LoRA variant whose sub-config turns it on (`LoraLayer.lora_variants`).
const fn variant(why: &'static str, todo: &'static str) -> Key {
    Key::Refused {
        why,
        todo,
        null_only: true,
    }
}

/// Every key PEFT 0.21's `LoraConfig` writes (with `PeftConfig`'s), checked against its source
/// (`tuners/lora/config.py`, `layer.py`, `variants.py`).
const LORA_KEYS: &[(&str, Key)] = &[
    ("peft_type", Key::Checked),
    ("r", Key::Checked),
    ("lora_alpha", Key::Checked),
    ("use_rslora", Key::Checked),
    ("init_lora_weights", Key::Checked),
    ("bias", Key::Checked),
    ("modules_to_save", Key::Checked),
    ("rank_pattern", Key::Checked),
    ("alpha_pattern", Key::Checked),
    ("base_model_name_or_path", Key::Any),
    ("revision", Key::Any),
    ("task_type", Key::Any),
    ("auto_mapping", Key::Any),
    ("peft_version", Key::Any),
    ("inference_mode", Key::Any),
    // Which modules were adapted: every saved tensor must be of one they select
    // ([`check_selected`]).
    ("target_modules", Key::Checked),
    ("exclude_modules", Key::Checked),
    ("layers_to_transform", Key::Checked),
    ("layers_pattern", Key::Checked),
    ("ensure_weight_tying", Key::Any),
    // Off at inference.
    ("lora_dropout", Key::Any),
    // PEFT 0.2's switch to merge the factors at eval time (the same numbers); PEFT drops it.
    ("merge_weights", Key::Any),
    // Where PEFT computes, not what.
    ("runtime_config", Key::Any),
    // Read only with their switch (megatron_config, use_qalora, init_lora_weights), checked.
    ("megatron_core", Key::Any),
    ("qalora_group_size", Key::Any),
    ("loftq_config", Key::Any),
    ("eva_config", Key::Any),
    ("corda_config", Key::Any),
    ("lora_ga_config", Key::Any),
    // Variants that are plain LoRA in eval: VeloraLinearVariant and MontecloraLinearVariant
    // project or perturb lora_A only while training; their forward is then lora_B(lora_A(x)).
    ("velora_config", Key::Any),
    ("monteclora_config", Key::Any),
    (
        "use_dora",
        refused(
            "DoRA rescales every column of the adapted weight by a learnt magnitude",
            MERGE,
        ),
    ),
    // For Conv1D layers (GPT-2), which store their weight transposed; on a Linear layer, as
    // every one here, PEFT warns and sets it to false (`LoraLayer` in tuners/lora/layer.py).
    ("fan_in_fan_out", Key::Any),
    (
        "lora_bias",
        refused(
            "it adds a bias to lora_B, which particles do not have",
            MERGE,
        ),
    ),
    (
        "use_qalora",
        refused("QA-LoRA pools the input before lora_A", MERGE),
    ),
    (
        "layer_replication",
        refused(
            "the adapter was trained on a model with repeated layers",
            MERGE,
        ),
    ),
    (
        "trainable_token_indices",
        refused("it trains embedding rows too", MERGE),
    ),
    (
        "target_parameters",
        refused("it adapts parameters, not Linear layers", MERGE),
    ),
    (
        "megatron_config",
        refused(
            "the adapter was made for a Megatron-LM model",
            "bella-vqa loads transformers LLaVA and CLIP checkpoints",
        ),
    ),
    (
        "alora_invocation_tokens",
        refused(
            "aLoRA applies the adapter only from its invocation tokens on, a particle at every \
             position",
            "PEFT cannot merge an aLoRA either: retrain it as a plain LoRA (without \
             alora_invocation_tokens)",
        ),
    ),
    (
        "use_bdlora",
        variant(
            "BD-LoRA's lora_A or lora_B are block-diagonal, not the dense [r, in] / [out, r] \
             factors of a LoRA",
            MERGE,
        ),
    ),
    (
        "arrow_config",
        variant(
            "Arrow routes every token among several LoRA experts",
            "pass the task adapters it routes among as particles, or retrain it as a plain LoRA",
        ),
    ),
    (
        "kasa_config",
        variant(
            "KaSA truncates the base weight by SVD and scales the factors by a learnt diagonal \
             (lora_diag)",
            MERGE,
        ),
    ),
];

/// null, false, "", [] or {}: what PEFT reads as "off" for a key it does not care about.
fn is_neutral(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// A JSON value for a message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Refuses every key of an adapter config whose value changes PEFT's forward pass in a way
/// particles (ΔW = α/r · B·A on every position) cannot follow; `peft_type`, `r` and `lora_alpha`
/// are already read.
fn check_lora_keys(config: &serde_json::Map<String, Value>, what: &str) -> Result<()> {
    let field = |k: &str| config.get(k).filter(|v| !v.is_null());
    let written_by = match field("peft_version").and_then(Value::as_str) {
        Some(v) => format!(" (the config was written by PEFT {v})"),
        None => String::new(),
    };
    for (key, value) in config {
        match LORA_KEYS.iter().find(|(k, _)| k == key).map(|(_, how)| how) {
            Some(Key::Any | Key::Checked) => {}
            Some(Key::Refused {
                why,
                todo,
                null_only,
            }) => {
                let off = if *null_only {
                    value.is_null()
                } else {
                    is_neutral(value)
                };
                if !off {
                    bail!(
                        "{what}: {key} is set ({}): {why}; bella-vqa reads plain LoRA only: {todo}",
                        short(value)
                    );
                }
            }
            None if is_neutral(value) => {}
            None => bail!(
                "{what}: {key} = {} is a setting bella-vqa does not know{written_by}; it reads \
                 plain LoRA adapters and cannot tell whether it changes the numbers: if the \
                 adapter is a plain LoRA without it, delete the key, otherwise {MERGE}",
                short(value)
            ),
        }
    }

    // PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA move part of the base weight into the factors, and
    // PEFT changes the base weight again when it loads them: the factors alone are not a LoRA of
    // the base. MiCA only initialises the factors (LoraLayer.mica_init leaves the base alone).
    match field("init_lora_weights") {
        None | Some(Value::Bool(_)) => {}
        Some(Value::String(init))
            if ["gaussian", "orthogonal", "eva", "mica"].contains(&init.as_str()) => {}
        Some(Value::String(init))
            if ["pissa", "olora", "corda", "loftq", "lora_ga"]
                .iter()
                .any(|p| init.to_ascii_lowercase().starts_with(p)) =>
        {
            bail!(
                "{what}: init_lora_weights {init:?} changes the base model's weights when PEFT \
                 loads the adapter, so its factors are not a LoRA of the base: re-save it with \
                 save_pretrained(…, path_initial_model_for_weight_conversion=INITIAL_ADAPTER_DIR), \
                 which makes it one, or {MERGE}"
            )
        }
        Some(other) => bail!(
            "{what}: init_lora_weights {} is none bella-vqa knows (true, false, \"gaussian\", \
             \"orthogonal\", \"eva\", \"mica\"; \"pissa\", \"olora\", \"corda\", \"loftq\" and \
             \"lora_ga\" are refused){written_by}: is the config damaged?",
            short(other)
        ),
    }
    match field("bias") {
        None => {}
        Some(b) if b == "none" => {}
        Some(b) => bail!(
            "{what}: bias = {b} trains the biases too; particles only carry LoRA factors \
             (bias \"none\"): {MERGE}"
        ),
    }
    if let Some(m) = field("modules_to_save") {
        if m.as_array().is_none_or(|a| !a.is_empty()) {
            bail!(
                "{what}: modules_to_save {} are full copies of modules, which particles cannot \
                 hold: {MERGE}",
                short(m)
            );
        }
    }
    match field("use_rslora") {
        None | Some(Value::Bool(_)) => {}
        Some(other) => bail!(
            "{what}: use_rslora = {} is not true or false (it decides the scale: lora_alpha / r, \
             or lora_alpha / √r): write true or false",
            short(other)
        ),
    }
    Ok(())
}

/// PEFT's reading of a module key against `target_modules` and the rest
/// (`check_target_module_exists` in PEFT 0.21's tuners/tuners_utils.py), to check that every
/// saved tensor belongs to a module the config selects: PEFT loads only those (the rest it
/// warns of and leaves out), so an adapter whose tensors and config disagree is refused rather
/// than read differently from PEFT.
struct Selection {
    /// `None`: no target_modules, or "all-linear" (every Linear layer: any tensor here).
    targets: Option<Names>,
    exclude: Option<Names>,
    /// With a list of target_modules matched by suffix: the layer indices it keeps.
    layers: Option<Vec<i64>>,
    /// Where a key's layer index is: the first numbered segment, after one of
    /// `layers_pattern` if given (tried in order).
    layer_index: Vec<fancy_regex::Regex>,
}

/// A regular expression matched against the whole key, or names matched exactly or as a suffix
/// after a dot.
enum Names {
    Regex(fancy_regex::Regex),
    List(Vec<String>),
}

impl Names {
    fn read(key: &str, v: &Value, what: &str) -> Result<Option<Self>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if key == "target_modules" && s.eq_ignore_ascii_case("all-linear") => {
                None
            }
            Value::String(s) => Some(Names::Regex(
                fancy_regex::Regex::new(&format!("^(?:{s})$")).with_context(|| {
                    format!("{what}: {key} {s:?} is not a regular expression bella-vqa can read")
                })?,
            )),
            Value::Array(list) => Some(Names::List(
                list.iter()
                    .map(|v| v.as_str().map(String::from))
                    .collect::<Option<_>>()
                    .with_context(|| {
                        format!("{what}: {key} must be a string or a list of strings")
                    })?,
            )),
            other => bail!(
                "{what}: {key} must be a string or a list of strings, found {}",
                short(other)
            ),
        })
    }

    /// `(matched, exactly)`: exactly when a list names the whole key.
    fn matches(&self, key: &str) -> (bool, bool) {
        match self {
            Names::Regex(re) => (re.is_match(key).unwrap_or(false), false),
            Names::List(names) => {
                let exact = names.iter().any(|n| n == key);
                let suffix = names.iter().any(|n| key.ends_with(&format!(".{n}")));
                (exact || suffix, exact)
            }
        }
    }
}

impl Selection {
    fn read(config: &serde_json::Map<String, Value>, what: &str) -> Result<Self> {
        let get = |k: &str| config.get(k).unwrap_or(&Value::Null);
        let layers = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n.as_i64().with_context(|| {
                format!("{what}: layers_to_transform must be an integer or a list of them")
            })?]),
            Value::Array(list) if list.is_empty() => None,
            Value::Array(list) => Some(
                list.iter()
                    .map(Value::as_i64)
                    .collect::<Option<_>>()
                    .with_context(|| {
                        format!("{what}: layers_to_transform must be an integer or a list of them")
                    })?,
            ),
            other => bail!(
                "{what}: layers_to_transform must be an integer or a list of them, found {}",
                short(other)
            ),
        };
        let layers_pattern: Vec<String> = match get("layers_pattern") {
            Value::Null => Vec::new(),
            Value::String(s) if s.is_empty() => Vec::new(),
            Value::String(s) => vec![s.clone()],
            Value::Array(list) => list
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<_>>()
                .with_context(|| format!("{what}: layers_pattern must be a string or a list"))?,
            other => bail!(
                "{what}: layers_pattern must be a string or a list of strings, found {}",
                short(other)
            ),
        };
        let patterns = if layers_pattern.is_empty() {
            vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()]
        } else {
            layers_pattern
                .iter()
                .map(|p| format!(r"^(?:^|.*?\.){p}\.(\d+)\."))
                .collect()
        };
        let layer_index = patterns
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(p).with_context(|| {
                    format!("{what}: layers_pattern gives {p:?}, which is not a regular expression")
                })
            })
            .collect::<Result<_>>()?;
        Ok(Selection {
            targets: Names::read("target_modules", get("target_modules"), what)?,
            exclude: Names::read("exclude_modules", get("exclude_modules"), what)?,
            layers,
            layer_index,
        })
    }

    /// Whether PEFT adapts the module `key` (as PEFT names it, without `base_model.model.`).
    fn selects(&self, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(key).0) {
            return false;
        }
        let Some(targets) = &self.targets else {
            return true;
        };
        let (found, exactly) = targets.matches(key);
        let (Some(layers), Names::List(_), false, true) = (&self.layers, targets, exactly, found)
        else {
            return found;
        };
        self.layer_index
            .iter()
            .find_map(|re| {
                re.captures(key)
                    .ok()
                    .flatten()
                    .and_then(|c| c.get(1)?.as_str().parse::<i64>().ok())
            })
            .is_some_and(|index| layers.contains(&index))
    }
}

/// Refuses tensors of modules the config does not select (see [`Selection`]), and
/// rank_pattern / alpha_pattern entries that give a module of the adapter its own rank or alpha
/// (PEFT's `get_pattern_key`: an entry matches a key that ends with it after a dot).
fn check_selected(
    config: &serde_json::Map<String, Value>,
    what: &str,
    modules: &[String],
    rank: usize,
    lora_alpha: f64,
) -> Result<()> {
    let selection = Selection::read(config, what)?;
    let mut modules = modules.to_vec();
    modules.sort();
    for key in &modules {
        if !selection.selects(key) {
            let shown = |k: &str| config.get(k).map_or("null".into(), short);
            bail!(
                "{what}: the adapter holds factors of {key}, which its config does not select \
                 (target_modules {}, exclude_modules {}, layers_to_transform {}, layers_pattern \
                 {}): PEFT would leave them out (warning of unexpected keys); make the config \
                 name every adapted module, or save the adapter again with PEFT",
                shown("target_modules"),
                shown("exclude_modules"),
                shown("layers_to_transform"),
                shown("layers_pattern")
            );
        }
    }
    for (k, default) in [("rank_pattern", rank as f64), ("alpha_pattern", lora_alpha)] {
        let Some(p) = config.get(k).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(entries) = p.as_object() else {
            bail!("{what}: {k} must be an object, found {}", short(p));
        };
        for (pattern, value) in entries {
            if value.as_f64() == Some(default) {
                continue; // the same rank or alpha: changes nothing
            }
            let re =
                fancy_regex::Regex::new(&format!(r"^(.*\.)?({pattern})$")).with_context(|| {
                    format!("{what}: the {k} key {pattern:?} is not a regular expression")
                })?;
            if let Some(key) = modules.iter().find(|m| re.is_match(m).unwrap_or(false)) {
                bail!(
                    "{what}: {k} gives {key} its own rank or alpha ({pattern:?}: {value}); a \
                     particle set has one rank and one alpha: retrain with one r and lora_alpha, \
                     or {MERGE}"
                );
            }
        }
    }
    Ok(())
}

/// Parts of the names of tensors PEFT saves besides LoRA factors, and what they belong to.
const TENSOR_KINDS: &[(&str, &str)] = &[
    (".lora_magnitude_vector", " but a DoRA magnitude"),
    (".lora_diag", " but KaSA's diagonal (kasa_config)"),
    (
        ".lora_velora_embed",
        " but a VeLoRA projection (velora_config)",
    ),
    (
        ".lora_monteclora_sampler.",
        " but a MonteCLoRA sampler (monteclora_config)",
    ),
    (".lora_embedding_", " but an embedding's LoRA"),
];

/// `default` in `….lora_A.default.weight`: a factor as `model.state_dict()` names it.
fn adapter_name_in_key(name: &str) -> Option<&str> {
    let rest = name.strip_suffix(".weight")?;
    let (head, adapter) = rest.rsplit_once('.')?;
    (head.ends_with(".lora_A") || head.ends_with(".lora_B")).then_some(adapter)
}

/// The LoRA hyper-parameters of one PEFT adapter directory.
struct PeftLora {
    dir: PathBuf,
    rank: usize,
    /// α such that the scale is α / r (rsLoRA's lora_alpha / √r is folded in).
    alpha: f64,
    source: String,
    revision: Option<String>,
    /// Our module path → (A [r, in], B [out, r]).
    layers: BTreeMap<String, (Tensor, Tensor)>,
    /// A CLIP's answer vocabulary ([`ANSWERS_FILE`]), when the adapter carries one.
    answers: Option<Vec<String>>,
}

/// The answer vocabulary of exported CLIP particles beside their adapter files (a JSON list of
/// strings; PEFT ignores it).
pub const ANSWERS_FILE: &str = "answer_vocabulary.json";

/// Refuses an adapter folder whose set export-peft is replacing, or was when it was stopped
/// (the set there is a mix, or for a moment not there, until the export completes).
pub fn refuse_if_being_replaced(dir: &Path) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(journal) = parent.and_then(crate::io::unfinished_swap) {
        bail!(
            "{} is being replaced as a set of adapters, or was when export-peft was stopped \
             ({} is its journal): wait for the export to finish, or run export-peft into {} \
             again, which completes an interrupted one first",
            dir.display(),
            journal.display(),
            parent.map_or(String::new(), |p| p.display().to_string())
        );
    }
    Ok(())
}

fn read_peft_dir(dir: &Path) -> Result<PeftLora> {
    refuse_if_being_replaced(dir)?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text =
        crate::input::read_to_string(&config_path, "PEFT adapter config").with_context(|| {
            // An adapter saved under a name of its own lies in a folder of that name.
            let named: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join(ADAPTER_CONFIG_FILE).is_file())
                .map(|e| e.path().display().to_string())
                .collect();
            match named.as_slice() {
                [] => format!(
                    "{} is not a PEFT adapter directory: cannot read {ADAPTER_CONFIG_FILE}",
                    dir.display()
                ),
                found => format!(
                    "{} holds no {ADAPTER_CONFIG_FILE}, but its folder(s) {} do (adapters saved \
                     under their own names): pass those",
                    dir.display(),
                    found.join(", ")
                ),
            }
        })?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let config = config
        .as_object()
        .with_context(|| format!("{} is not a JSON object", config_path.display()))?;
    let field = |k: &str| config.get(k).filter(|v| !v.is_null());
    let what = config_path.display();

    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => bail!(
            "{what}: peft_type {other:?}; only LoRA adapters (peft_type \"LORA\") can become \
             particles: train a LoRA (LoraConfig) instead"
        ),
        None => bail!("{what}: no peft_type (is it a PEFT adapter config?)"),
    }
    let rank = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .with_context(|| format!("{what}: `r` must be a positive integer"))?
        as usize;
    let lora_alpha = match field("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(v) => v
            .as_f64()
            .filter(|a| *a > 0.0 && *a <= super::MAX_ALPHA)
            .with_context(|| {
                format!(
                    "{what}: `lora_alpha` must be a number above 0 and at most {:e}",
                    super::MAX_ALPHA
                )
            })?,
    };
    check_lora_keys(config, &what.to_string())?;
    // rsLoRA scales by lora_alpha / √r; as α / r that is α = lora_alpha · √r.
    let alpha = if field("use_rslora").and_then(Value::as_bool) == Some(true) {
        lora_alpha * (rank as f64).sqrt()
    } else {
        lora_alpha
    };
    // VeLoRA and MonteCLoRA save tensors that PEFT uses in training only (see LORA_KEYS).
    let train_only: Vec<&str> = [
        ("velora_config", ".lora_velora_embed"),
        ("monteclora_config", ".lora_monteclora_sampler."),
    ]
    .into_iter()
    .filter(|(k, _)| field(k).is_some())
    .map(|(_, tensor)| tensor)
    .collect();

    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.exists() {
        if dir.join("adapter_model.bin").exists() {
            bail!(
                "{} holds adapter_model.bin (pickle), not {ADAPTER_WEIGHTS_FILE}: re-save it with \
                 save_pretrained(…, safe_serialization=True)",
                dir.display()
            );
        }
        bail!("{} has no {ADAPTER_WEIGHTS_FILE}", dir.display());
    }
    crate::input::check_regular(&weights, "PEFT adapter weights")?;
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).with_context(|| {
        format!(
            "cannot read {} (truncated or not safetensors?)",
            weights.display()
        )
    })?;
    let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    // The adapted modules as PEFT names them.
    let mut modules = Vec::new();
    for (key, t) in tensors {
        let name = key.strip_prefix(PEFT_KEY_PREFIX).unwrap_or(&key);
        if train_only.iter().any(|part| name.contains(part)) {
            continue;
        }
        let (module, is_a) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, false)
        } else if name.ends_with(".base_layer.weight") {
            // PEFT saves the targeted lm_head's (or an embedding's) whole weight by default.
            bail!(
                "{}: the tensor {key} is a whole base weight, which PEFT saves when lm_head or \
                 an embedding is targeted (save_embedding_layers): re-save the adapter with \
                 save_pretrained(…, save_embedding_layers=False) if that weight is the base's \
                 own, or {MERGE}",
                weights.display()
            );
        } else if let Some(adapter) = adapter_name_in_key(name) {
            bail!(
                "{}: the tensor {key} is a LoRA factor with the adapter name {adapter:?} left in \
                 its key, as model.state_dict() saves it: save the adapter with \
                 PeftModel.save_pretrained (or get_peft_model_state_dict), which drops the name",
                weights.display()
            );
        } else {
            let what = TENSOR_KINDS
                .iter()
                .find(|(part, _)| name.contains(part))
                .map_or("", |(_, what)| what);
            bail!(
                "{}: the tensor {key} is not a LoRA factor{what} (expected …lora_A.weight / \
                 …lora_B.weight; embeddings, DoRA magnitudes, biases and saved modules cannot \
                 become particles): {MERGE}",
                weights.display()
            );
        };
        ensure!(
            t.rank() == 2,
            "{}: {key} has shape {:?}, expected a matrix",
            weights.display(),
            t.dims()
        );
        let bad = crate::models::weights::count_non_finite(&t)?;
        ensure!(
            bad == 0,
            "{}: {key} holds {bad} NaN or infinite value(s): the adapter is damaged (training \
             diverged?); retrain it or export it again",
            weights.display()
        );
        let t = t.to_dtype(DType::F32)?;
        if is_a {
            modules.push(module.to_string());
        }
        let slot = halves.entry(hub_module_path(module)).or_default();
        let target = if is_a { &mut slot.0 } else { &mut slot.1 };
        if target.replace(t).is_some() {
            bail!(
                "{}: two tensors map to {key} (mixed transformers naming?)",
                weights.display()
            );
        }
    }
    ensure!(!halves.is_empty(), "{} holds no tensors", weights.display());
    check_selected(config, &what.to_string(), &modules, rank, lora_alpha)?;
    let mut layers = BTreeMap::new();
    for (path, pair) in halves {
        let (a, b) = match pair {
            (Some(a), Some(b)) => (a, b),
            (a, _) => bail!(
                "{}: {path} has lora_{} but not lora_{}",
                weights.display(),
                if a.is_some() { "A" } else { "B" },
                if a.is_some() { "B" } else { "A" }
            ),
        };
        let (ra, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        ensure!(
            ra == rank && rb == rank,
            "{}: {path} has lora_A {:?} and lora_B {:?}, but r = {rank} (expected [r, in] and [out, r])",
            weights.display(),
            a.dims(),
            b.dims()
        );
        layers.insert(path, (a, b));
    }
    Ok(PeftLora {
        dir: dir.to_path_buf(),
        rank,
        alpha,
        source: field("base_model_name_or_path")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        revision: field("revision").and_then(Value::as_str).map(String::from),
        layers,
        answers: match crate::input::read_if_present(&dir.join(ANSWERS_FILE), "answer vocabulary")?
        {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a JSON list of answers",
                    dir.join(ANSWERS_FILE).display()
                )
            })?),
        },
    })
}

/// Whether two adapters hold the same factors on the same layers.
fn same_factors(a: &PeftLora, b: &PeftLora) -> Result<bool> {
    if !a.layers.keys().eq(b.layers.keys()) {
        return Ok(false);
    }
    let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
        Ok(x.dims() == y.dims()
            && x.flatten_all()?.to_vec1::<f32>()? == y.flatten_all()?.to_vec1::<f32>()?)
    };
    for ((a_a, a_b), (b_a, b_b)) in a.layers.values().zip(b.layers.values()) {
        if !(same(a_a, b_a)? && same(a_b, b_b)?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads one PEFT LoRA adapter directory as a one-particle set. The base model is recorded as
/// `base_model_name_or_path` without weight hashes: see [`bind_base`].
pub fn import_peft(dir: &Path) -> Result<ParticleSet> {
    import_peft_stacked(&[dir.to_path_buf()])
}

/// Reads several PEFT LoRA adapters (same layers, rank, alpha and base model) as the particles
/// of one set, in the order given.
pub fn import_peft_stacked(dirs: &[PathBuf]) -> Result<ParticleSet> {
    // The same adapter twice would be two identical particles: no spread, no epistemic signal.
    let mut seen = std::collections::HashMap::new();
    for dir in dirs {
        let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        if let Some(first) = seen.insert(key, dir) {
            bail!(
                "{} and {} are the same adapter: each particle needs its own",
                first.display(),
                dir.display()
            );
        }
    }
    let adapters = dirs
        .iter()
        .map(|d| read_peft_dir(d))
        .collect::<Result<Vec<_>>>()?;
    let first = adapters
        .first()
        .context("no PEFT adapter directory given")?;
    for other in &adapters[1..] {
        let (f, o) = (first.dir.display(), other.dir.display());
        ensure!(
            other.rank == first.rank && other.alpha == first.alpha,
            "{o} has r = {}, alpha = {}, but {f} has r = {}, alpha = {}: particles share rank and alpha",
            other.rank,
            other.alpha,
            first.rank,
            first.alpha
        );
        if !other.layers.keys().eq(first.layers.keys()) {
            let only = |a: &PeftLora, b: &PeftLora| {
                let mut only: Vec<&str> = a
                    .layers
                    .keys()
                    .filter(|k| !b.layers.contains_key(*k))
                    .map(String::as_str)
                    .collect();
                let more = only.len().saturating_sub(3);
                only.truncate(3);
                match (only.is_empty(), more) {
                    (true, _) => "none".to_string(),
                    (false, 0) => only.join(", "),
                    (false, more) => format!("{} and {more} more", only.join(", ")),
                }
            };
            bail!(
                "{o} adapts other layers than {f} (only in {o}: {}; only in {f}: {}): particles \
                 adapt the same layers",
                only(other, first),
                only(first, other)
            );
        }
        ensure!(
            other.source == first.source,
            "{o} is for the base model {:?}, {f} for {:?}: particles share one base model \
             (edit base_model_name_or_path if they name the same model differently)",
            other.source,
            first.source
        );
        for (path, (a, b)) in &other.layers {
            let (fa, fb) = &first.layers[path];
            ensure!(
                a.dims() == fa.dims() && b.dims() == fb.dims(),
                "{path}: {o} has factors {:?} / {:?}, {f} has {:?} / {:?}",
                a.dims(),
                b.dims(),
                fa.dims(),
                fb.dims()
            );
        }
    }
    if let Some(other) = adapters[1..].iter().find(|o| o.answers != first.answers) {
        bail!(
            "{} and {} carry different answer vocabularies ({ANSWERS_FILE}): particles score \
             one vocabulary",
            first.dir.display(),
            other.dir.display()
        );
    }
    // The same adapter twice would be identical particles; so would a copy of one (`cp -r`).
    for (i, a) in adapters.iter().enumerate() {
        for b in &adapters[i + 1..] {
            if same_factors(a, b)? {
                bail!(
                    "{} and {} hold the same factors (a copy of one adapter?): each particle \
                     needs its own",
                    a.dir.display(),
                    b.dir.display()
                );
            }
        }
    }
    let mut paths: Vec<&String> = first.layers.keys().collect();
    paths.sort_by(|a, b| natural_cmp(a, b));
    let scale = first.alpha / first.rank as f64;
    let mut stacked = Vec::with_capacity(paths.len());
    for path in &paths {
        let a: Vec<&Tensor> = adapters.iter().map(|x| &x.layers[*path].0).collect();
        let b: Vec<&Tensor> = adapters.iter().map(|x| &x.layers[*path].1).collect();
        let adapter = Adapter::new(Tensor::stack(&a, 0)?, Tensor::stack(&b, 0)?, scale)?;
        stacked.push(((*path).clone(), adapter));
    }
    let layers: Vec<String> = paths.iter().map(|p| (*p).clone()).collect();
    let config = ParticleConfig {
        format_version: 1,
        base_model: BaseModel {
            source: first.source.clone(),
            revision: first.revision.clone(),
            commit: None,
            weights: Vec::new(),
        },
        architecture: architecture_of(&layers).to_string(),
        // Exact paths: they select the same layers under our target rule.
        targets: layers.clone(),
        layers,
        rank: first.rank,
        alpha: first.alpha,
        particles: adapters.len(),
        method: IMPORTED_METHOD.to_string(),
        seed: 0,
        step: 0,
        abstention: None,
        abstention_history: Vec::new(),
        answer_vocabulary: first.answers.clone(),
        particles_sha256: None,
    };
    Ok(ParticleSet {
        config,
        adapters: stacked,
    })
}

/// Ties an imported set to the base model in `files`: every adapted layer must exist there with
/// the factors' shape (read from the safetensors headers, nothing is loaded), then the source, its
/// revision/commit and the weight-file hashes are recorded (what `ask` checks).
pub fn bind_base(set: &mut ParticleSet, files: &ModelFiles, source: &str) -> Result<()> {
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for file in &files.weights {
        shapes.extend(read_safetensors_shapes(file)?);
    }
    place_on_tower(set, &shapes, &files.dir)?;
    // The base the adapters name (base_model_name_or_path), for a model that does not fit them.
    let named = match set.config.base_model.source.as_str() {
        "" => "their own base model".to_string(),
        named => format!("their own base model (base_model_name_or_path: {named})"),
    };
    for (path, ad) in &set.adapters {
        let Some(shape) = weight_shape(&shapes, path) else {
            bail!(
                "the adapter adapts {path}, which the model in {} does not have (another \
                 architecture?): pass {named} as --model",
                files.dir.display()
            );
        };
        let want = [ad.b.dims()[1], ad.a.dims()[2]];
        ensure!(
            shape.as_slice() == want,
            "the adapter on {path} is for a [{}, {}] layer, the model in {} has {shape:?}: the \
             adapters were made for another model; pass {named} as --model",
            want[0],
            want[1],
            files.dir.display()
        );
    }
    let (revision, commit) = match &files.origin {
        Origin::HubCache {
            revision, commit, ..
        } => (Some(revision.clone()), Some(commit.clone())),
        Origin::Directory => (None, None),
    };
    set.config.base_model = BaseModel {
        source: source.to_string(),
        revision,
        commit,
        weights: hash_weights(files)?,
    };
    Ok(())
}

/// The shape of the weight of the layer at our module `path` in a checkpoint's `shapes`.
fn weight_shape<'a>(shapes: &'a HashMap<String, Vec<usize>>, path: &str) -> Option<&'a Vec<usize>> {
    let transformers5 = path
        .strip_prefix("vision_tower.vision_model.")
        .map(|rest| format!("vision_tower.{rest}.weight"));
    std::iter::once(format!("{path}.weight"))
        .chain(transformers5)
        .find_map(|k| shapes.get(&k))
}

/// Module names of an adapter made on a CLIP tower alone: transformers 5's `CLIPVisionModel` and
/// `CLIPTextModel` have no `vision_model.`/`text_model.` wrapper, so PEFT names their layers from
/// `encoder.`, `embeddings.` and the layer norms.
const TOWER_ROOTS: &[&str] = &[
    "encoder.",
    "embeddings.",
    "pre_layrnorm",
    "post_layernorm",
    "final_layer_norm",
];

/// Places an adapter made on a CLIP tower alone onto the base's tower where every adapted layer
/// exists with its shape: LLaVA's vision tower, or whichever of CLIP's two towers fits (refused
/// when both do: the names cannot tell which one it was trained on).
fn place_on_tower(
    set: &mut ParticleSet,
    shapes: &HashMap<String, Vec<usize>>,
    dir: &Path,
) -> Result<()> {
    let tower_only = |p: &str| TOWER_ROOTS.iter().any(|r| p.starts_with(r));
    if !set.adapters.iter().all(|(p, _)| tower_only(p)) {
        return Ok(());
    }
    let fits = |prefix: &str| {
        set.adapters.iter().all(|(p, ad)| {
            weight_shape(shapes, &format!("{prefix}{p}"))
                .is_some_and(|s| s.as_slice() == [ad.b.dims()[1], ad.a.dims()[2]])
        })
    };
    let towers: Vec<&str> = ["vision_tower.vision_model.", "vision_model.", "text_model."]
        .into_iter()
        .filter(|t| fits(t))
        .collect();
    let first = set.adapters.first().map_or("", |(p, _)| p.as_str());
    let prefix = match towers.as_slice() {
        [tower] => *tower,
        [] => bail!(
            "the adapter was made on a CLIP tower alone (CLIPVisionModel or CLIPTextModel: module \
             names such as {first} without vision_model. or text_model.), and no tower of the \
             model in {} has all its layers with those shapes (another model?)",
            dir.display()
        ),
        _ => bail!(
            "the adapter was made on a CLIP tower alone (module names such as {first} without \
             vision_model. or text_model.), and both towers of the model in {} have its layers: \
             prefix its keys with the tower it was trained on (base_model.model.vision_model.… \
             or base_model.model.text_model.…)",
            dir.display()
        ),
    };
    for (path, _) in &mut set.adapters {
        *path = format!("{prefix}{path}");
    }
    set.config.layers = set.adapters.iter().map(|(p, _)| p.clone()).collect();
    set.config.architecture = architecture_of(&set.config.layers).to_string();
    Ok(())
}

/// Names and shapes of the tensors of a safetensors file, from its header.
fn read_safetensors_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    let header = read_safetensors_header(path)?;
    let mut out = HashMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .with_context(|| format!("{}: bad header entry for {name}", path.display()))?;
        out.insert(name, shape);
    }
    Ok(out)
}

/// The JSON header of a safetensors file (tensor entries and `__metadata__`).
pub fn read_safetensors_header(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let mut file = crate::input::open(path, "safetensors file")?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata()?.len();
    ensure!(
        len <= size.saturating_sub(8) && len <= 100 << 20,
        "{} is not a safetensors file (header length {len})",
        path.display()
    );
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .with_context(|| format!("{} is truncated", path.display()))?;
    serde_json::from_slice(&header)
        .with_context(|| format!("{} has no valid safetensors header", path.display()))
}

/// f32 tensors as the bytes of a safetensors file with a `__metadata__` entry (candle's writer
/// has none). Tensors are sorted by name, like the Python writer does for one dtype.
fn safetensors_with_metadata(
    tensors: &mut [(String, Tensor)],
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>> {
    /// One header entry, fields in the order the reference writer uses.
    #[derive(serde::Serialize)]
    struct Entry<'a> {
        dtype: &'static str,
        shape: &'a [usize],
        data_offsets: [usize; 2],
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: serde_json::Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    // `__metadata__` first, then the tensors in data order (as the `safetensors` package writes).
    let mut header = format!("{{\"__metadata__\":{}", Value::Object(meta)).into_bytes();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors.iter() {
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let entry = Entry {
            dtype: "F32",
            shape: t.dims(),
            data_offsets: [start, data.len()],
        };
        header.push(b',');
        header.extend(serde_json::to_vec(name)?);
        header.push(b':');
        header.extend(serde_json::to_vec(&entry)?);
    }
    header.push(b'}');
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + data.len());
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&data);
    Ok(bytes)
}

/// Orders `layers.2` before `layers.10`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then(ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len()).then(a.cmp(b))
}

/// `base_model_name_or_path` and `revision` as PEFT loads them
/// (`from_pretrained(base_model_name_or_path, revision=revision)`): a hub id without our
/// `@revision` syntax, the revision pinned to the commit when it is known; the embedded demo's
/// names (`demo`, `demo:clip`) become the directory the demo is written to; a directory is kept
/// as recorded.
fn peft_base(base: &BaseModel) -> (String, Option<String>) {
    let source = &base.source;
    let recorded = base.commit.as_ref().or(base.revision.as_ref()).cloned();
    if let Some(dir) = crate::hub::demo_model(source).and_then(|m| crate::demo::path(m).ok()) {
        return (dir.display().to_string(), recorded);
    }
    match crate::hub::split_hub_id(source) {
        Some((repo_id, revision)) => (
            repo_id.to_string(),
            recorded.or(revision.map(str::to_string)),
        ),
        None => (source.clone(), recorded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (ours, theirs) in [
            (
                "language_model.model.layers.0.self_attn.q_proj",
                "model.language_model.layers.0.self_attn.q_proj",
            ),
            ("language_model.lm_head", "lm_head"),
            (
                "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj",
                "model.vision_tower.encoder.layers.1.self_attn.out_proj",
            ),
            (
                "multi_modal_projector.linear_1",
                "model.multi_modal_projector.linear_1",
            ),
            (
                "text_model.encoder.layers.0.self_attn.q_proj",
                "text_model.encoder.layers.0.self_attn.q_proj",
            ),
            ("visual_projection", "visual_projection"),
        ] {
            assert_eq!(peft_module_name(ours).unwrap(), theirs);
            assert_eq!(hub_module_path(theirs), ours);
        }
        // older transformers
        assert_eq!(
            hub_module_path("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"),
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1"
        );
        assert_eq!(
            hub_module_path("language_model.model.layers.3.self_attn.v_proj"),
            "language_model.model.layers.3.self_attn.v_proj"
        );
        assert!(peft_module_name("transformer.h.0.attn").is_err());
        assert!(peft_module_name("language_model.lm_head_extra").is_err());
    }

    #[test]
    fn natural_order() {
        let mut v = vec![
            "a.layers.10.q",
            "a.layers.2.q",
            "a.layers.1.k",
            "a.layers.1.q",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "a.layers.1.k",
                "a.layers.1.q",
                "a.layers.2.q",
                "a.layers.10.q"
            ]
        );
    }
}
