//! Stein variational gradient descent over the particles (design §4).
//!
//! Canonical SVGD (Liu & Wang, 2016). With φ_i the adapter vector of particle i and
//! g_j = ∇ log p(φ_j | D), the update direction of particle i is
//!
//! ```text
//! ψ_i = (1/P) Σ_j [ k(φ_j, φ_i) g_j + ∇_{φ_j} k(φ_j, φ_i) ]
//!        └ attraction: kernel-weighted ┘ └ repulsion: pushes φ_i away from close φ_j ┘
//!          posterior gradients
//! k(x, y) = exp(−‖x − y‖² / h),   h = med_{i<j} ‖φ_i − φ_j‖² / log P   (median heuristic)
//! ```
//!
//! A repulsion weight w ≥ 0 (`train --repulsion`, default 1 = canonical SVGD) scales the second
//! term: ψ_i = (1/P) Σ_j [ k(φ_j, φ_i) g_j + w ∇_{φ_j} k(φ_j, φ_i) ]. This is SVGD on the
//! tempered posterior p(φ | D)^{1/w} (multiply ψ by w: the attraction becomes ∇ log p / w), the
//! "temperature" of the Bella reference code: w > 1 spreads the particles wider than the posterior,
//! w = 0 drops the repulsion (kernel-weighted gradient averaging: the particles collapse onto
//! a mode together).
//!
//! Particles move *along* ψ (ascent on log p). A training loop that minimises a loss with AdamW
//! hands it `−ψ` as the gradient; see [`svgd_direction`].
//!
//! Everything works on the stacked, particle-major factors of the particle layer
//! (`A: [P, r, in]`, `B: [P, out, r]`): the P×P kernel times the stacked gradients is one matmul per
//! tensor, and the repulsion is a handful of batched matmuls. Distances, the kernel and both terms are
//! computed in f64 (on CPU and CUDA; in f32 on Metal, which has no f64) and ψ is returned in the
//! dtype of the gradients. The bandwidth is a constant of the step (not differentiated), as usual.
//!
//! Two spaces for the kernel ([`KernelSpace`]):
//! - `Parameters`: φ is every layer's A and B, flattened and concatenated;
//! - `DeltaW`: the kernel sees only ΔW_l = s_l·B_l·A_l of every layer l, with
//!   ‖φ_i − φ_j‖² := Σ_l ‖ΔW_{l,i} − ΔW_{l,j}‖²_F. This is invariant to LoRA's rescaling symmetry
//!   (A → cA, B → B/c leaves ΔW and therefore the kernel unchanged), so particles are only pushed
//!   apart when the *functions* they add differ. The repulsion is the chain rule through ΔW (below).
//!
//! Using it in a training loop:
//! - g_j must be the gradient of particle j's *own* full-data log posterior. From the batched
//!   forward, backpropagate the SUM over particles of each particle's loss (the stacked gradient
//!   row p is then ∂L_p/∂φ_p; with the mean over particles, multiply by P). With a minibatch mean
//!   NLL over b of N examples: g = −N·∇(mean NLL) + ∇ log prior (Gaussian prior N(0, σ²):
//!   ∇ log prior = −φ/σ²). The N matters: it sets the balance between attraction and repulsion
//!   (Adam is invariant to the overall scale of ψ, not to this ratio); leaving it out is SVGD on a
//!   posterior tempered by N, whose particles spread far too wide.
//! - Hand `−ψ` to AdamW as the gradient, with weight decay 0 when the prior is in g.
//! - With PEFT's B = 0 start all ΔW coincide: in the `DeltaW` space the first step has kernel 1 and
//!   no repulsion, so every particle gets the same (mean) update of B; A's gradient is zero there.
//!   Start with small random B or use the `Parameters` space if that matters.

use candle_core::{DType, Device, Result, Tensor};

use super::Adapter;

/// Where the kernel measures distances between particles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelSpace {
    /// The stacked adapter parameters: A and B of every layer, flattened and concatenated.
    #[default]
    Parameters,
    /// ΔW = scale·B·A per layer (invariant to LoRA's A/B rescaling); squared Frobenius distances
    /// summed over layers.
    DeltaW,
}

/// The factors of one adapted layer, all particles: `a: [P, r, in]`, `b: [P, out, r]`,
/// ΔW_p = `scale`·B_p·A_p (the layout of [`Adapter`]).
#[derive(Clone, Copy, Debug)]
pub struct LayerFactors<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

impl<'a> From<&'a Adapter> for LayerFactors<'a> {
    fn from(ad: &'a Adapter) -> Self {
        Self {
            a: &ad.a,
            b: &ad.b,
            scale: ad.scale,
        }
    }
}

/// The result of one SVGD step.
#[derive(Clone, Debug)]
pub struct SvgdStep {
    /// ψ for every layer's A, same shapes as A (`[P, r, in]`), dtype of the given gradient.
    pub grad_a: Vec<Tensor>,
    /// ψ for every layer's B, same shapes as B (`[P, out, r]`), dtype of the given gradient.
    pub grad_b: Vec<Tensor>,
    /// The bandwidth h used (median heuristic; 1.0 for a single particle).
    pub bandwidth: f64,
    /// The mean off-diagonal kernel value (1.0 for a single particle). Near 0: particles no longer
    /// interact (bandwidth too small for their spread); near 1: they all look alike to the kernel.
    pub mean_kernel: f64,
    /// P×P squared distances in the chosen kernel space (zero diagonal).
    pub sq_distances: Vec<Vec<f64>>,
}

/// Bandwidths below this count as zero (all particles, or more than half of the pairs, coincide):
/// see [`median_bandwidth`].
pub const MIN_BANDWIDTH: f64 = 1e-12;

/// The SVGD direction ψ for every layer's A and B, given g = ∇ log p for every layer's A and B
/// (`grad_logp_a[l]` has the shape of `layers[l].a`, `grad_logp_b[l]` that of `layers[l].b`).
///
/// The kernel is one RBF kernel over the whole particle (all layers together), with the distances
/// of `space` and the median-heuristic bandwidth. With a single particle ψ = g.
///
/// Sign: ψ is an *ascent* direction on log p. To use it with a minimiser (AdamW) pass `−ψ` as the
/// gradient. g must be the gradient of the full log posterior: from a minibatch loss
/// `L_b = mean NLL over b examples` use g = −(N·∇L_b + ∇(−log prior)), N the data size.
///
/// Errors (never panics) on an empty layer list, inconsistent particle counts or shapes, gradient
/// lists that do not match the layers, a non-finite scale, or non-finite distances.
pub fn svgd_direction(
    layers: &[LayerFactors],
    grad_logp_a: &[Tensor],
    grad_logp_b: &[Tensor],
    space: KernelSpace,
) -> Result<SvgdStep> {
    svgd_direction_weighted(layers, grad_logp_a, grad_logp_b, space, 1.0)
}

/// [`svgd_direction`] with the repulsive term scaled by `repulsion` (w ≥ 0, finite; 1 is
/// canonical SVGD, 0 leaves the kernel-weighted average of the gradients): see the module notes.
/// Errors as [`svgd_direction`], and on a negative or non-finite weight.
pub fn svgd_direction_weighted(
    layers: &[LayerFactors],
    grad_logp_a: &[Tensor],
    grad_logp_b: &[Tensor],
    space: KernelSpace,
    repulsion: f64,
) -> Result<SvgdStep> {
    if !(repulsion.is_finite() && repulsion >= 0.0) {
        candle_core::bail!("svgd: the repulsion weight must be finite and ≥ 0, got {repulsion}");
    }
    let p = check_layers(layers)?;
    if grad_logp_a.len() != layers.len() || grad_logp_b.len() != layers.len() {
        candle_core::bail!(
            "svgd: {} layers but {} gradients for A and {} for B",
            layers.len(),
            grad_logp_a.len(),
            grad_logp_b.len()
        );
    }
    for (l, layer) in layers.iter().enumerate() {
        for (name, g, x) in [
            ("A", &grad_logp_a[l], layer.a),
            ("B", &grad_logp_b[l], layer.b),
        ] {
            if g.dims() != x.dims() {
                candle_core::bail!(
                    "svgd: layer {l}: gradient of {name} is {:?} but {name} is {:?}",
                    g.dims(),
                    x.dims()
                );
            }
        }
    }
    if p == 1 {
        return Ok(SvgdStep {
            grad_a: grad_logp_a.to_vec(),
            grad_b: grad_logp_b.to_vec(),
            bandwidth: 1.0,
            mean_kernel: 1.0,
            sq_distances: vec![vec![0.0]],
        });
    }

    let device = layers[0].a.device().clone();
    let wd = work_dtype(&device);
    let sq = match space {
        KernelSpace::Parameters => parameter_sq_distances(layers)?,
        KernelSpace::DeltaW => delta_w_sq_distances(layers)?,
    };
    let sq_distances = checked_sq_distances(&sq)?;
    let h = median_of(&sq_distances)?;
    let k = rbf_kernel(&sq, h)?; // [P, P], symmetric, k[i][j] = k(φ_j, φ_i)
    let mean_kernel = mean_off_diagonal(&k.to_dtype(DType::F64)?.to_vec2::<f64>()?);
    let inv_p = 1.0 / p as f64;

    let mut grad_a = Vec::with_capacity(layers.len());
    let mut grad_b = Vec::with_capacity(layers.len());
    match space {
        KernelSpace::Parameters => {
            // Repulsion in parameter space, per tensor (the distance is a sum over coordinates,
            // so the gradient splits by tensor):
            //   Σ_j ∇_{φ_j} k(φ_j, φ_i) = Σ_j (2/h) k_ij (φ_i − φ_j)
            //                           = (2/h) [ (Σ_j k_ij) φ_i − Σ_j k_ij φ_j ].
            let rowsum = k.sum_keepdim(1)?; // [P, 1]
            for (l, layer) in layers.iter().enumerate() {
                for (x, g, out) in [
                    (layer.a, &grad_logp_a[l], &mut grad_a),
                    (layer.b, &grad_logp_b[l], &mut grad_b),
                ] {
                    let attract = attraction(&k, g, wd)?;
                    let repulse = parameter_repulsion(&k, &rowsum, x, h, wd)?;
                    out.push(finish(&attract, &repulse, repulsion, inv_p, g)?);
                }
            }
        }
        KernelSpace::DeltaW => {
            for (l, layer) in layers.iter().enumerate() {
                let (rep_a, rep_b) = delta_w_repulsion(&k, layer, h, wd)?;
                let ga = &grad_logp_a[l];
                let gb = &grad_logp_b[l];
                grad_a.push(finish(
                    &attraction(&k, ga, wd)?,
                    &rep_a,
                    repulsion,
                    inv_p,
                    ga,
                )?);
                grad_b.push(finish(
                    &attraction(&k, gb, wd)?,
                    &rep_b,
                    repulsion,
                    inv_p,
                    gb,
                )?);
            }
        }
    }
    Ok(SvgdStep {
        grad_a,
        grad_b,
        bandwidth: h,
        mean_kernel,
        sq_distances,
    })
}

/// The flat version, for tests and small problems: `phi: [P, D]`, `grad_logp: [P, D]` →
/// (ψ `[P, D]` in the dtype of `grad_logp`, bandwidth). Parameter-space kernel with the median
/// bandwidth; with one particle ψ = g (bandwidth reported as 1.0).
pub fn svgd_direction_flat(phi: &Tensor, grad_logp: &Tensor) -> Result<(Tensor, f64)> {
    let (p, _) = phi.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "svgd: particles must be [P, D], got {:?}",
            phi.dims()
        ))
    })?;
    if grad_logp.dims() != phi.dims() {
        candle_core::bail!(
            "svgd: gradient is {:?} but the particles are {:?}",
            grad_logp.dims(),
            phi.dims()
        );
    }
    if p == 0 {
        candle_core::bail!("svgd: no particles");
    }
    if p == 1 {
        return Ok((grad_logp.clone(), 1.0));
    }
    let wd = work_dtype(phi.device());
    let sq = add_gram_distances(None, phi, wd)?;
    let sq = sq_from_gram(&sq)?;
    let h = median_of(&checked_sq_distances(&sq)?)?;
    let k = rbf_kernel(&sq, h)?;
    let rowsum = k.sum_keepdim(1)?;
    let attract = attraction(&k, grad_logp, wd)?;
    let repulse = parameter_repulsion(&k, &rowsum, phi, h, wd)?;
    Ok((
        finish(&attract, &repulse, 1.0, 1.0 / p as f64, grad_logp)?,
        h,
    ))
}

/// The RBF kernel `exp(−sq_dist / h)` of a `[P, P]` matrix of squared distances, same dtype.
/// Errors unless `h` is finite and positive and `sq_dist` is square.
pub fn rbf_kernel(sq_dist: &Tensor, h: f64) -> Result<Tensor> {
    let (p, q) = sq_dist.dims2()?;
    if p != q {
        candle_core::bail!(
            "rbf_kernel: distances must be [P, P], got {:?}",
            sq_dist.dims()
        );
    }
    if !(h.is_finite() && h > 0.0) {
        candle_core::bail!("rbf_kernel: bandwidth must be finite and positive, got {h}");
    }
    sq_dist.affine(-1.0 / h, 0.0)?.exp()
}

/// The median-heuristic bandwidth of a `[P, P]` matrix of squared distances:
/// h = med_{i<j} d_ij / log P (Liu & Wang 2016), the particle count P taken from the shape.
///
/// Guards: P = 1 → 1.0 (there are no pairs; SVGD with one particle is gradient ascent and h is
/// unused). If the median is zero (below [`MIN_BANDWIDTH`] after the division), the mean of the
/// positive distances / log P is used instead, and if all distances are zero, 1.0 — when all
/// particles coincide the repulsion is zero and the kernel is 1 for any h, so the value does not
/// matter. Errors on a non-square matrix or negative/non-finite off-diagonal entries.
pub fn median_bandwidth(sq_dist: &Tensor) -> Result<f64> {
    let (p, q) = sq_dist.dims2()?;
    if p != q || p == 0 {
        candle_core::bail!(
            "median_bandwidth: distances must be [P, P] with P ≥ 1, got {:?}",
            sq_dist.dims()
        );
    }
    median_of(&checked_sq_distances(sq_dist)?)
}

/// Pairwise squared distances of ΔW between particles, summed over layers:
/// `d_ij = Σ_l ‖s_l B_{l,i} A_{l,i} − s_l B_{l,j} A_{l,j}‖²_F`, a `[P, P]` tensor (f64; f32 on
/// Metal) on the factors' device. Never forms ΔW: ⟨ΔW_i, ΔW_j⟩ = s² Σ_ab (B_iᵀB_j)_ab (A_i A_jᵀ)_ab,
/// one particle's row at a time (r × P·r products: the whole (P·r)² Gram matrices took 1.5 GB a
/// layer in f64 at P = 32, r = 256). Also the particle-diversity measure to report in training.
/// Values only: of tracked variables (training's) it keeps no graph, which would hold every
/// product of the sum alive with the result (19.8 GB at P = 32, r = 256 on the demo).
pub fn delta_w_sq_distances(layers: &[LayerFactors]) -> Result<Tensor> {
    let p = check_layers(layers)?;
    let wd = work_dtype(layers[0].a.device());
    let mut gram: Option<Tensor> = None;
    for layer in layers {
        let (_, r, inp) = layer.a.dims3()?;
        let (_, out, _) = layer.b.dims3()?;
        let a = layer.a.detach().to_dtype(wd)?.reshape((p * r, inp))?;
        // [P, out, r] → [out, P, r] → [out, P·r]: column i·r + a is B_i[:, a].
        let b = layer
            .b
            .detach()
            .to_dtype(wd)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((out, p * r))?;
        let (at, bt) = (a.t()?, b.t()?.contiguous()?);
        let rows = (0..p)
            .map(|i| {
                let aa = a.narrow(0, i * r, r)?.matmul(&at)?; // (A_i A_jᵀ)_ab at [a, j·r + b]
                let bb = bt.narrow(0, i * r, r)?.matmul(&b)?; // (B_iᵀ B_j)_ab at [a, j·r + b]
                (aa * bb)?.reshape((r, p, r))?.sum(2)?.sum(0) // ⟨ΔW_i, ΔW_j⟩ / s², [P]
            })
            .collect::<Result<Vec<_>>>()?;
        let inner = Tensor::stack(&rows, 0)?.affine(layer.scale * layer.scale, 0.0)?; // [P, P]
        gram = Some(match gram {
            None => inner,
            Some(g) => (g + inner)?,
        });
    }
    match gram {
        Some(g) => sq_from_gram(&g),
        None => candle_core::bail!("svgd: no layers"),
    }
}

/// Pairwise squared distances of the stacked parameters (every layer's A and B, flattened),
/// `[P, P]` (f64; f32 on Metal). Not invariant to A → cA, B → B/c.
pub fn parameter_sq_distances(layers: &[LayerFactors]) -> Result<Tensor> {
    check_layers(layers)?;
    let wd = work_dtype(layers[0].a.device());
    let mut gram: Option<Tensor> = None;
    for layer in layers {
        gram = Some(add_gram_distances(gram, layer.a, wd)?);
        gram = Some(add_gram_distances(gram, layer.b, wd)?);
    }
    match gram {
        Some(g) => sq_from_gram(&g),
        None => candle_core::bail!("svgd: no layers"),
    }
}

// ---------------------------------------------------------------------------------------------
// internals

/// f64 where the device has it.
fn work_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// Checks the layer list; returns P.
fn check_layers(layers: &[LayerFactors]) -> Result<usize> {
    let Some(first) = layers.first() else {
        candle_core::bail!("svgd: no layers");
    };
    let p = first.a.dims().first().copied().unwrap_or(0);
    if p == 0 {
        candle_core::bail!("svgd: no particles (A is {:?})", first.a.dims());
    }
    for (l, layer) in layers.iter().enumerate() {
        let (pa, r, _) = layer.a.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "svgd: layer {l}: A must be [P, r, in], got {:?}",
                layer.a.dims()
            ))
        })?;
        let (pb, _, rb) = layer.b.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "svgd: layer {l}: B must be [P, out, r], got {:?}",
                layer.b.dims()
            ))
        })?;
        if pa != p || pb != p || rb != r {
            candle_core::bail!(
                "svgd: layer {l}: A {:?} and B {:?} do not agree with each other or with {p} particles",
                layer.a.dims(),
                layer.b.dims()
            );
        }
        if !layer.scale.is_finite() {
            candle_core::bail!("svgd: layer {l}: scale {} is not finite", layer.scale);
        }
    }
    Ok(p)
}

/// Adds the Gram matrix C Cᵀ of `x` (flattened per particle and centred over particles) to `acc`.
/// Centring leaves the distances unchanged and keeps ‖c_i‖² + ‖c_j‖² − 2⟨c_i, c_j⟩ of the order
/// of the distances themselves (less cancellation).
fn add_gram_distances(acc: Option<Tensor>, x: &Tensor, wd: DType) -> Result<Tensor> {
    let c = centred(x, wd)?;
    let g = c.matmul(&c.t()?)?;
    match acc {
        None => Ok(g),
        Some(a) => a + g,
    }
}

/// `x` flattened to `[P, n]` in the work dtype, minus the particle mean.
fn centred(x: &Tensor, wd: DType) -> Result<Tensor> {
    let p = x.dims()[0];
    let x = x.to_dtype(wd)?.reshape((p, ()))?;
    x.broadcast_sub(&x.mean_keepdim(0)?)
}

/// d_ij = G_ii + G_jj − 2 G_ij, clamped at 0, exact zeros on the diagonal.
fn sq_from_gram(gram: &Tensor) -> Result<Tensor> {
    let p = gram.dims()[0];
    let eye = Tensor::eye(p, gram.dtype(), gram.device())?;
    let norms = (gram * &eye)?.sum_keepdim(1)?; // [P, 1]
    let d = norms
        .broadcast_add(&norms.t()?)?
        .sub(&gram.affine(2.0, 0.0)?)?
        .maximum(0.0)?;
    d * eye.affine(-1.0, 1.0)?
}

/// The distances as f64 rows; errors on non-finite or negative off-diagonal entries.
fn checked_sq_distances(sq: &Tensor) -> Result<Vec<Vec<f64>>> {
    let d = sq.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    for (i, row) in d.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if i != j && !(v.is_finite() && v >= 0.0) {
                candle_core::bail!(
                    "svgd: squared distance between particles {i} and {j} is {v} \
                     (diverged parameters?)"
                );
            }
        }
    }
    Ok(d)
}

/// The median heuristic on checked distances (see [`median_bandwidth`]).
fn median_of(d: &[Vec<f64>]) -> Result<f64> {
    let p = d.len();
    if p < 2 {
        return Ok(1.0);
    }
    let mut pairs: Vec<f64> = (0..p)
        .flat_map(|i| (i + 1..p).map(move |j| (i, j)))
        .map(|(i, j)| d[i][j])
        .collect();
    pairs.sort_by(f64::total_cmp);
    let n = pairs.len();
    let med = if n % 2 == 1 {
        pairs[n / 2]
    } else {
        0.5 * (pairs[n / 2 - 1] + pairs[n / 2])
    };
    let log_p = (p as f64).ln();
    let h = med / log_p;
    if h >= MIN_BANDWIDTH {
        return Ok(h);
    }
    let positive: Vec<f64> = pairs.into_iter().filter(|&v| v > 0.0).collect();
    if !positive.is_empty() {
        let h = positive.iter().sum::<f64>() / positive.len() as f64 / log_p;
        if h >= MIN_BANDWIDTH {
            return Ok(h);
        }
    }
    Ok(1.0)
}

fn mean_off_diagonal(k: &[Vec<f64>]) -> f64 {
    let p = k.len();
    if p < 2 {
        return 1.0;
    }
    let sum: f64 = (0..p)
        .flat_map(|i| (0..p).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| k[i][j])
        .sum();
    sum / (p * (p - 1)) as f64
}

/// Σ_j k_ij g_j for every i: one matmul `[P, P] × [P, n]`, result `[P, n]` in the work dtype.
fn attraction(k: &Tensor, g: &Tensor, wd: DType) -> Result<Tensor> {
    let p = g.dims()[0];
    k.matmul(&g.to_dtype(wd)?.reshape((p, ()))?)
}

/// (2/h) [ (Σ_j k_ij) φ_i − Σ_j k_ij φ_j ] for every i, `[P, n]`, computed on the centred
/// particles (identical, since Σ_j k_ij (φ_i − φ_j) does not see a common shift).
fn parameter_repulsion(
    k: &Tensor,
    rowsum: &Tensor,
    x: &Tensor,
    h: f64,
    wd: DType,
) -> Result<Tensor> {
    let c = centred(x, wd)?;
    (c.broadcast_mul(rowsum)? - k.matmul(&c)?)?.affine(2.0 / h, 0.0)
}

/// The repulsive term of one layer's A and B for the ΔW kernel (`[P, r, in]`, `[P, out, r]`).
///
/// With d_ij = Σ_l ‖ΔW_i − ΔW_j‖²_F and k_ij = exp(−d_ij / h), differentiating in the FIRST
/// argument, particle j (φ_i fixed, h constant):
///
/// ```text
/// ∂k_ij/∂ΔW_j = −(k_ij/h) · 2(ΔW_j − ΔW_i) = (2/h) k_ij (ΔW_i − ΔW_j)            [out, in]
/// ΔW_j = s B_j A_j  ⇒  ∂f/∂A_j = s B_jᵀ (∂f/∂ΔW_j),   ∂f/∂B_j = s (∂f/∂ΔW_j) A_jᵀ
///
/// R^A_i = Σ_j ∂k_ij/∂A_j = (2s/h) Σ_j k_ij B_jᵀ (ΔW_i − ΔW_j)
///       = (2s²/h) [ B̄_iᵀ B_i A_i − Σ_j k_ij (B_jᵀ B_j) A_j ],     B̄_i = Σ_j k_ij B_j
/// R^B_i = Σ_j ∂k_ij/∂B_j = (2s/h) Σ_j k_ij (ΔW_i − ΔW_j) A_jᵀ
///       = (2s²/h) [ B_i (A_i Āᵢᵀ) − Σ_j k_ij B_j (A_j A_jᵀ) ],    Ā_i = Σ_j k_ij A_j
/// ```
///
/// The sum runs over j (the particle whose factors are differentiated); the result is added to
/// particle i's update. Note the B_j / A_j of the *other* particle in each term. Only r×r products
/// and batched matmuls, never ΔW itself.
fn delta_w_repulsion(
    k: &Tensor,
    layer: &LayerFactors,
    h: f64,
    wd: DType,
) -> Result<(Tensor, Tensor)> {
    let p = layer.a.dims()[0];
    let a = layer.a.to_dtype(wd)?; // [P, r, in]
    let b = layer.b.to_dtype(wd)?; // [P, out, r]
    let c = 2.0 * layer.scale * layer.scale / h;
    let ksum = |x: &Tensor| -> Result<Tensor> {
        let dims = x.dims().to_vec();
        k.matmul(&x.reshape((p, ()))?)?.reshape(dims)
    };
    let bt = b.transpose(1, 2)?; // [P, r, out]
    let at = a.transpose(1, 2)?; // [P, in, r]

    // A: B̄_iᵀ B_i A_i − Σ_j k_ij (B_jᵀ B_j) A_j
    let b_bar = ksum(&b)?; // [P, out, r]
    let first = b_bar.transpose(1, 2)?.matmul(&b)?.matmul(&a)?; // [P, r, in]
    let own = bt.matmul(&b)?.matmul(&a)?; // (B_jᵀ B_j) A_j, [P, r, in]
    let rep_a = (first - ksum(&own)?)?.affine(c, 0.0)?;

    // B: B_i (A_i Ā_iᵀ) − Σ_j k_ij B_j (A_j A_jᵀ)
    let a_bar = ksum(&a)?; // [P, r, in]
    let first = b.matmul(&a.matmul(&a_bar.transpose(1, 2)?)?)?; // [P, out, r]
    let own = b.matmul(&a.matmul(&at)?)?; // B_j (A_j A_jᵀ), [P, out, r]
    let rep_b = (first - ksum(&own)?)?.affine(c, 0.0)?;

    Ok((rep_a, rep_b))
}

/// (1/P)(attraction + w·repulsion), reshaped and cast to the gradient's shape and dtype.
fn finish(
    attract: &Tensor,
    repulse: &Tensor,
    weight: f64,
    inv_p: f64,
    like: &Tensor,
) -> Result<Tensor> {
    let attract = attract.reshape(repulse.dims())?;
    let repulse = if weight == 1.0 {
        repulse.clone()
    } else {
        repulse.affine(weight, 0.0)?
    };
    (attract + repulse)?
        .affine(inv_p, 0.0)?
        .reshape(like.dims())?
        .to_dtype(like.dtype())
}
