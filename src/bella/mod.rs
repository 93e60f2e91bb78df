//! Bella particles: P low-rank perturbations of frozen linear layers.

pub mod bf16_gemm;
pub mod few_rows;
mod linear;
pub mod particles;
pub mod peft;
pub mod quant;
pub mod svgd;

pub use linear::{expand_particles, Adapter, Base, ParticleLinear, ParticleModel};

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Which layers get particles and their shape.
/// The most particles a set may have.
pub const MAX_PARTICLES: usize = 256;

/// The highest rank a particle may have.
pub const MAX_RANK: usize = 1024;

/// The largest α: the scale α/r multiplies every particle's ΔW, and past this it overflows half
/// precision and means nothing in f32 (LoRA's α is a few times the rank).
pub const MAX_ALPHA: f64 = 1e6;

/// The most memory the adapter factors of a fresh particle set may take (f32 values).
pub const MAX_ADAPTER_BYTES: usize = 8 << 30;

#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// Module-path patterns (see [`target_matches`]): PEFT suffixes (`q_proj`), globs with `*`
    /// (`language_model.*.q_proj`) and layer ranges (`language_model.layers.24-31.*.q_proj`).
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f64,
    pub particles: usize,
}

impl AdapterSpec {
    /// The design default: attention projections of the language model (LLaVA) or of both towers
    /// (CLIP), r = 8, α = 16, P = 4.
    pub fn default_for_llava() -> Self {
        Self {
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .iter()
                .map(|t| format!("language_model.*.{t}"))
                .collect(),
            rank: 8,
            alpha: 16.0,
            particles: 4,
        }
    }

    pub fn default_for_clip() -> Self {
        Self {
            targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .iter()
                .map(|t| t.to_string())
                .collect(),
            rank: 8,
            alpha: 16.0,
            particles: 4,
        }
    }

    /// Checks the sizes and α before anything is allocated from them (`--particles`, `--rank`,
    /// `--alpha` of `train`, and the same fields of a stored particle set).
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_PARTICLES).contains(&self.particles) {
            bail!(
                "particles = {}: must be 1 to {MAX_PARTICLES} (--particles)",
                self.particles
            );
        }
        if !(1..=MAX_RANK).contains(&self.rank) {
            bail!("rank = {}: must be 1 to {MAX_RANK} (--rank)", self.rank);
        }
        if !(self.alpha > 0.0 && self.alpha <= MAX_ALPHA) {
            // 1e300 as 1e300, not its 301 digits.
            let alpha = if self.alpha.abs() > MAX_ALPHA {
                format!("{:e}", self.alpha)
            } else {
                self.alpha.to_string()
            };
            bail!(
                "alpha = {alpha}: must be above 0 and at most {MAX_ALPHA:e} (--alpha; LoRA's is a \
                 few times the rank)"
            );
        }
        for target in &self.targets {
            if let Some((lo, hi)) = glob_tokens(target).into_iter().find_map(|t| match t {
                GlobToken::Range(lo, hi) if lo > hi => Some((lo, hi)),
                _ => None,
            }) {
                bail!(
                    "the layer range {lo}-{hi} in the target {target:?} is reversed: write \
                     {hi}-{lo}"
                );
            }
        }
        Ok(())
    }

    pub fn matches(&self, path: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, path))
    }
}

/// Whether a module path matches a target pattern:
/// - without `*`: PEFT's suffix rule (the path equals the pattern or ends with `.pattern`);
/// - with `*`: a glob over the whole path, `*` matching any text;
/// - in both, a segment `N-M` matches any layer index from N to M, so particles can go on the top
///   layers only (`language_model.*.layers.24-31.*.q_proj`, `layers.30-31.self_attn.v_proj`).
///
/// Paths are also tried in the naming of transformers ≥ 4.52 (`language_model.layers.…` for our
/// `language_model.model.layers.…`), so patterns written for either match.
pub fn target_matches(pattern: &str, path: &str) -> bool {
    let tokens = glob_tokens(pattern);
    let whole = pattern.contains('*');
    let renamed = path.replacen("language_model.model.", "language_model.", 1);
    let matches = |path: &str| {
        let s = path.as_bytes();
        glob_match(&tokens, s)
            || (!whole && (0..s.len()).any(|i| s[i] == b'.' && glob_match(&tokens, &s[i + 1..])))
    };
    matches(path) || matches(&renamed)
}

/// A pattern as tokens: literal bytes, `*`, and whole `N-M` segments.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GlobToken {
    Byte(u8),
    Any,
    Range(u64, u64),
}

fn glob_tokens(pattern: &str) -> Vec<GlobToken> {
    let mut tokens = Vec::new();
    for (i, segment) in pattern.split('.').enumerate() {
        if i > 0 {
            tokens.push(GlobToken::Byte(b'.'));
        }
        let range = segment.split_once('-').and_then(|(lo, hi)| {
            let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
            (digits(lo) && digits(hi)).then(|| Some((lo.parse().ok()?, hi.parse().ok()?)))?
        });
        match range {
            Some((lo, hi)) => tokens.push(GlobToken::Range(lo, hi)),
            None => tokens.extend(segment.bytes().map(|b| match b {
                b'*' => GlobToken::Any,
                b => GlobToken::Byte(b),
            })),
        }
    }
    tokens
}

fn glob_match(p: &[GlobToken], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((GlobToken::Any, rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some((GlobToken::Range(lo, hi), rest)) => {
            let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
            let value = std::str::from_utf8(&s[..n])
                .ok()
                .and_then(|d| d.parse::<u64>().ok());
            n > 0 && value.is_some_and(|v| (*lo..=*hi).contains(&v)) && glob_match(rest, &s[n..])
        }
        Some((GlobToken::Byte(c), rest)) => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

#[cfg(test)]
mod target_tests {
    use super::{layer_stacks, target_matches, AdapterSpec};

    #[test]
    fn messages_say_which_layers_there_are_and_refuse_a_reversed_range() {
        let paths: Vec<String> = [
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
            "vision_tower.vision_model.encoder.layers.22.self_attn.q_proj",
            "language_model.model.layers.1.self_attn.q_proj",
            "language_model.model.layers.0.mlp.up_proj",
            "multi_modal_projector.linear_1",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            layer_stacks(&paths),
            [
                "vision_tower.vision_model.encoder.layers.0-22",
                "language_model.model.layers.0-1"
            ]
        );
        let spec = AdapterSpec {
            targets: vec!["language_model.layers.1-0.*.q_proj".into()],
            ..AdapterSpec::default_for_llava()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(
            err.contains("1-0") && err.contains("reversed: write 0-1"),
            "{err}"
        );
    }

    #[test]
    fn suffixes_globs_and_layer_ranges() {
        let q = |i: usize| format!("language_model.model.layers.{i}.self_attn.q_proj");
        // PEFT's suffix rule, at segment boundaries only.
        assert!(target_matches("q_proj", &q(3)));
        assert!(!target_matches("_proj", &q(3)));
        assert!(target_matches("self_attn.q_proj", &q(3)));
        // Globs over the whole path.
        assert!(target_matches("language_model.*.q_proj", &q(3)));
        assert!(!target_matches("vision_tower.*.q_proj", &q(3)));
        // Layer ranges, inclusive, with or without `*`, in either naming.
        for pattern in [
            "language_model.layers.24-31.*.q_proj",
            "language_model.model.layers.24-31.self_attn.q_proj",
            "layers.24-31.self_attn.q_proj",
            "language_model.*.24-31.*.q_proj",
        ] {
            let hits: Vec<usize> = (0..40)
                .filter(|&i| target_matches(pattern, &q(i)))
                .collect();
            assert_eq!(hits, (24..=31).collect::<Vec<_>>(), "{pattern}");
        }
        assert!(!target_matches(
            "layers.24-31.self_attn.q_proj",
            "language_model.model.layers.24.self_attn.k_proj"
        ));
        // A range is a whole segment: "2-3" does not match the "2" of "24".
        assert!(!target_matches("layers.2-3.self_attn.q_proj", &q(24)));
        // A plain number is literal.
        assert!(target_matches("layers.7.self_attn.q_proj", &q(7)));
        assert!(!target_matches("layers.7.self_attn.q_proj", &q(17)));
    }
}

/// What a target pattern may be, in words (errors).
const TARGET_PATTERNS: &str = "patterns: a module name such as q_proj, or a path with * and \
     layer ranges N-M (N ≤ M) such as language_model.layers.24-31.*.q_proj";

/// How the B factors start.
#[derive(Clone, Copy, Debug)]
pub enum InitB {
    /// PEFT's default: every particle starts at the base model.
    Zero,
    /// Small random B: particles start apart.
    Normal { std: f64 },
}

/// Attaches fresh particle factors to every matching layer that can change an output (not the
/// model's [`ParticleModel::inert_linears`]): A from PEFT's kaiming-uniform (U(−1/√in, 1/√in)),
/// distinct per particle; B as `init_b`. Returns the adapted module paths.
pub fn attach<M: ParticleModel + ?Sized>(
    model: &mut M,
    spec: &AdapterSpec,
    init_b: InitB,
    seed: u64,
) -> Result<Vec<String>> {
    spec.validate()?;
    let (p, r) = (spec.particles, spec.rank);
    let inert = model.inert_linears();
    let chosen = |path: &str| spec.matches(path) && !inert.iter().any(|i| i == path);
    let values: usize = model
        .linears()
        .iter()
        .filter(|(path, _)| chosen(path))
        .map(|(_, layer)| {
            let (out, inp) = layer.shape();
            p * r * (out + inp)
        })
        .sum();
    if values.saturating_mul(4) > MAX_ADAPTER_BYTES {
        bail!(
            "{p} particles of rank {r} on these layers need {:.1} GiB of adapter factors, more than \
             the {} GiB allowed: lower --particles or --rank, or adapt fewer layers (--targets)",
            values as f64 * 4.0 / (1u64 << 30) as f64,
            MAX_ADAPTER_BYTES >> 30
        );
    }
    // ΔW = B·A of an `out × in` layer has rank at most min(out, in): a higher rank buys only
    // parameters and memory there.
    let narrowest = model
        .linears()
        .iter()
        .filter(|(path, _)| chosen(path))
        .map(|(path, layer)| {
            let (out, inp) = layer.shape();
            (out.min(inp), path.clone())
        })
        .min();
    if let Some((dim, path)) = narrowest.filter(|(dim, _)| r > *dim) {
        crate::note!(
            "warning: rank {r} is above the smallest dimension of some adapted layers ({dim}, \
             in {path} and others): there ΔW = B·A has rank at most that dimension, so the rank \
             past it adds parameters and memory but nothing it can learn"
        );
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut adapted = Vec::new();
    for (path, layer) in model.linears_mut() {
        if !chosen(&path) {
            continue;
        }
        let (out, inp) = layer.shape();
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..p * r * inp)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let b: Vec<f32> = match init_b {
            InitB::Zero => vec![0.0; p * out * r],
            InitB::Normal { std } => {
                let normal = Normal::new(0.0, std)?;
                (0..p * out * r)
                    .map(|_| normal.sample(&mut rng) as f32)
                    .collect()
            }
        };
        // f32 whatever the base's dtype (the particles are what training moves).
        let device = layer.device();
        let a = Tensor::from_vec(a, (p, r, inp), &device)?;
        let b = Tensor::from_vec(b, (p, out, r), &device)?;
        layer.set_adapter(Some(Adapter::new(a, b, spec.alpha / r as f64)?))?;
        adapted.push(path);
    }
    if let (true, Some(first)) = (
        adapted.is_empty(),
        inert.iter().find(|path| spec.matches(path)),
    ) {
        bail!(
            "the targets {:?} match only layers the model never runs ({first}, …: vision layers \
             above vision_feature_layer), where particles could not change an answer: choose others",
            spec.targets,
        );
    }
    let example = || {
        let paths: Vec<String> = model
            .linears()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !inert.contains(n))
            .collect();
        let stacks = layer_stacks(&paths);
        match (stacks.is_empty(), paths.first()) {
            (false, _) => format!("; this model's layers are {}", stacks.join(", ")),
            (true, Some(n)) => format!("; layer names look like {n:?}"),
            (true, None) => String::new(),
        }
    };
    if adapted.is_empty() {
        bail!(
            "no layer matches the targets {:?}{} ({TARGET_PATTERNS})",
            spec.targets,
            example()
        );
    }
    // A layer range that runs past the model's layers (24-40 of 32) would adapt fewer layers
    // than asked without a word: its ends must be layers the pattern finds.
    for target in &spec.targets {
        let ranges: Vec<(u64, u64)> = glob_tokens(target)
            .into_iter()
            .filter_map(|t| match t {
                GlobToken::Range(lo, hi) => Some((lo, hi)),
                _ => None,
            })
            .collect();
        let [(lo, hi)] = ranges[..] else { continue };
        // The layers the pattern finds with every number in its range.
        let every = format!("0-{}", u64::MAX);
        let any_layer: Vec<&str> = target
            .split('.')
            .map(|segment| match glob_tokens(segment)[..] {
                [GlobToken::Range(..)] => every.as_str(),
                _ => segment,
            })
            .collect();
        let any_layer = any_layer.join(".");
        let found: std::collections::BTreeSet<u64> = model
            .linears()
            .iter()
            .filter(|(path, _)| target_matches(&any_layer, path))
            .filter_map(|(path, _)| layer_index(path))
            .collect();
        if let (Some(first), Some(last)) = (found.first(), found.last()) {
            if !found.contains(&lo) || !found.contains(&hi) {
                bail!(
                    "the target {target:?} names layers {lo}-{hi}, but this model has only \
                     {first}-{last} there{}: write a range inside them",
                    example()
                );
            }
        }
    }
    // A pattern that adds nothing beside others that do is a typo (a reversed range, a
    // misspelt name) the user would never see.
    if let Some(idle) = spec
        .targets
        .iter()
        .find(|t| !adapted.iter().any(|path| target_matches(t, path)))
    {
        let inert_only = if inert.iter().any(|path| target_matches(idle, path)) {
            " (the layers it names are vision layers above vision_feature_layer, never run)"
        } else {
            ""
        };
        bail!(
            "the target {idle:?} matches no layer that runs{inert_only}{} ({TARGET_PATTERNS}); \
             fix it or leave it out",
            example()
        );
    }
    Ok(adapted)
}

/// The layer number of a module path (`….layers.N.…`), if it has one.
fn layer_index(path: &str) -> Option<u64> {
    let (_, rest) = path.split_once(".layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// The stacks of numbered layers among module `paths`, each as `prefix.layers.FIRST-LAST` (for
/// a message saying which layer ranges a target can name).
fn layer_stacks(paths: &[String]) -> Vec<String> {
    let mut stacks: Vec<(String, u64, u64)> = Vec::new();
    for path in paths {
        let (Some((prefix, _)), Some(n)) = (path.split_once(".layers."), layer_index(path)) else {
            continue;
        };
        match stacks.iter_mut().find(|(p, ..)| p == prefix) {
            Some((_, lo, hi)) => (*lo, *hi) = ((*lo).min(n), (*hi).max(n)),
            None => stacks.push((prefix.to_string(), n, n)),
        }
    }
    stacks
        .into_iter()
        .map(|(prefix, lo, hi)| format!("{prefix}.layers.{lo}-{hi}"))
        .collect()
}

/// The plain model of particle `p`: every adapted layer merged to `W + (α/r)·B_p·A_p`.
pub fn merged_particle<M: ParticleModel + Clone>(model: &M, p: usize) -> Result<M> {
    let mut merged = model.clone();
    for (_, layer) in merged.linears_mut() {
        *layer = layer.merged(p)?;
    }
    Ok(merged)
}
