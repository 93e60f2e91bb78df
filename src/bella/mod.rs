//! Bella particles: P low-rank perturbations of frozen linear layers.

mod few_rows;
mod linear;
pub mod particles;
pub mod peft;
pub mod svgd;

pub use linear::{expand_particles, Adapter, ParticleLinear, ParticleModel};

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Which layers get particles and their shape.
/// The most particles a set may have.
pub const MAX_PARTICLES: usize = 256;

/// The highest rank a particle may have.
pub const MAX_RANK: usize = 1024;

/// The most memory the adapter factors of a fresh particle set may take (f32 values).
pub const MAX_ADAPTER_BYTES: usize = 8 << 30;

#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// Module-path patterns: a path matches a pattern when it equals it, ends with `.pattern`
    /// (PEFT's `target_modules` rule), or matches it as a glob with `*`
    /// (`language_model.*.q_proj`).
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
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            bail!(
                "alpha = {}: must be a finite non-zero number (--alpha)",
                self.alpha
            );
        }
        Ok(())
    }

    pub fn matches(&self, path: &str) -> bool {
        self.targets.iter().any(|t| target_matches(t, path))
    }
}

/// PEFT's suffix rule, or a `*` glob over the whole path.
pub fn target_matches(pattern: &str, path: &str) -> bool {
    if pattern.contains('*') {
        return glob_match(pattern.as_bytes(), path.as_bytes());
    }
    path == pattern || path.ends_with(&format!(".{pattern}"))
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

/// How the B factors start.
#[derive(Clone, Copy, Debug)]
pub enum InitB {
    /// PEFT's default: every particle starts at the base model.
    Zero,
    /// Small random B: particles start apart.
    Normal { std: f64 },
}

/// Attaches fresh particle factors to every matching layer: A from PEFT's kaiming-uniform
/// (U(−1/√in, 1/√in)), distinct per particle; B as `init_b`. Returns the adapted module paths.
pub fn attach<M: ParticleModel + ?Sized>(
    model: &mut M,
    spec: &AdapterSpec,
    init_b: InitB,
    seed: u64,
) -> Result<Vec<String>> {
    spec.validate()?;
    let (p, r) = (spec.particles, spec.rank);
    let values: usize = model
        .linears()
        .iter()
        .filter(|(path, _)| spec.matches(path))
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
    let mut rng = StdRng::seed_from_u64(seed);
    let mut adapted = Vec::new();
    for (path, layer) in model.linears_mut() {
        if !spec.matches(&path) {
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
        let device = layer.weight().device().clone();
        let dtype = layer.weight().dtype();
        let a = Tensor::from_vec(a, (p, r, inp), &device)?.to_dtype(dtype)?;
        let b = Tensor::from_vec(b, (p, out, r), &device)?.to_dtype(dtype)?;
        layer.set_adapter(Some(Adapter::new(a, b, spec.alpha / r as f64)?))?;
        adapted.push(path);
    }
    if adapted.is_empty() {
        bail!(
            "no layer matches the targets {:?}; layer names look like {:?}",
            spec.targets,
            model.linears().first().map(|(n, _)| n.clone())
        );
    }
    Ok(adapted)
}

/// The plain model of particle `p`: every adapted layer merged to `W + (α/r)·B_p·A_p`.
pub fn merged_particle<M: ParticleModel + Clone>(model: &M, p: usize) -> Result<M> {
    let mut merged = model.clone();
    for (_, layer) in merged.linears_mut() {
        *layer = layer.merged(p)?;
    }
    Ok(merged)
}
