//! Bella particles: P low-rank perturbations of frozen linear layers.
