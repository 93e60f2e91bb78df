//! Bella particles: P low-rank perturbations of frozen linear layers.

mod linear;

pub use linear::{expand_particles, Adapter, ParticleLinear, ParticleModel};
