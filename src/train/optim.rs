//! AdamW with inspectable state (so a checkpoint can resume it exactly), the warm-up + cosine
//! schedule, and per-particle gradient clipping.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var, D};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter) over a fixed list of variables.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: u64,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            first: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            second: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of every variable with its gradient (`grads[i]` for `vars[i]`). The moments
    /// are built from detached gradients: the optimiser never holds an autograd graph (it would
    /// chain every step's graph to the next one).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = g.detach();
            let g = &g;
            let m = ((&self.first[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.second[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let theta = var.as_tensor();
            let decayed = (theta * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// The moment tensors by name, for a checkpoint.
    pub fn state(&self, names: &[String]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            out.insert(format!("{name}.adam_m"), self.first[i].clone());
            out.insert(format!("{name}.adam_v"), self.second[i].clone());
        }
        out
    }

    /// Restores the moments written by [`AdamW::state`] and the step count.
    pub fn restore(
        &mut self,
        names: &[String],
        state: &HashMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        for (i, name) in names.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .with_context(|| format!("the optimiser state has no {k}"))
            };
            self.first[i] = get(format!("{name}.adam_m"))?;
            self.second[i] = get(format!("{name}.adam_v"))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `peak·floor` at `total`.
pub fn learning_rate(step: u64, warmup: u64, total: u64, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cosine)
}

/// Scales each particle's gradient (the leading axis of every tensor) so that its global L2 norm
/// over all tensors is at most `max_norm`. Returns the norms before clipping.
pub fn clip_per_particle(grads: &mut [Tensor], max_norm: f64) -> Result<Vec<f64>> {
    let Some(first) = grads.first() else {
        return Ok(Vec::new());
    };
    let p = first.dim(0)?;
    let mut sq = Tensor::zeros(p, DType::F32, first.device())?;
    for g in grads.iter() {
        let per = g
            .to_dtype(DType::F32)?
            .sqr()?
            .flatten_from(1)?
            .sum(D::Minus1)?;
        sq = (sq + per)?;
    }
    let norms: Vec<f64> = sq
        .sqrt()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let factors: Vec<f32> = norms
        .iter()
        .map(|&n| {
            if n > max_norm && n > 0.0 {
                (max_norm / n) as f32
            } else {
                1.0
            }
        })
        .collect();
    if factors.iter().any(|&f| f < 1.0) {
        let f = Tensor::from_vec(factors, p, first.device())?;
        for g in grads.iter_mut() {
            let mut shape = vec![p];
            shape.extend(std::iter::repeat_n(1, g.rank() - 1));
            *g = g.broadcast_mul(&f.reshape(shape)?.to_dtype(g.dtype())?)?;
        }
    }
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((learning_rate(0, 10, 100, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 10, 100, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 10, 100, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 10, 100, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100, 10, 100, 1.0, 0.1) - 0.1 < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // With bias correction the first Adam update is g/|g| (ε aside).
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&var), 0.0).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&var), &[g], 0.1).unwrap();
        let v = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn the_moments_hold_no_graph_of_a_tracked_gradient() {
        // candle's gradient of a variable can carry the forward graph; moments built from it
        // would chain every step's graph to the next (training memory growing per step).
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&var), 0.0).unwrap();
        for _ in 0..2 {
            let tracked = (var.as_tensor() * 3.0).unwrap();
            assert!(tracked.track_op());
            opt.step(std::slice::from_ref(&var), &[tracked], 0.1)
                .unwrap();
        }
        assert!(opt.first.iter().chain(&opt.second).all(|m| !m.track_op()));
    }

    #[test]
    fn clipping_is_per_particle() {
        // Particle 0 has norm 5 (clipped to 1), particle 1 norm 0.5 (kept).
        let a = Tensor::new(&[[3.0f32, 0.0], [0.3, 0.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[4.0f32], [0.4]], &Device::Cpu).unwrap();
        let mut grads = vec![a, b];
        let norms = clip_per_particle(&mut grads, 1.0).unwrap();
        assert!((norms[0] - 5.0).abs() < 1e-6 && (norms[1] - 0.5).abs() < 1e-6);
        let a = grads[0].to_vec2::<f32>().unwrap();
        assert!((a[0][0] - 0.6).abs() < 1e-6 && (a[1][0] - 0.3).abs() < 1e-6);
    }
}
