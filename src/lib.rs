//! bella-vqa: calibrated uncertainty for multimodal models with Bella particles.
//!
//! The data flows one way: [`hub`] (where the files are) → [`models`] (CLIP, LLaMA, LLaVA with
//! particle-capable linear layers) → [`bella`] (the particles) → answers → aggregation.

pub mod answer;
pub mod bella;
pub mod bench;
pub mod data;
pub mod demo;
pub mod error;
pub mod hub;
pub mod inspect;
pub mod io;
pub mod logits;
pub mod metrics;
pub mod models;
pub mod report;
pub mod train;
