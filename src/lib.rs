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
pub mod serve;
pub mod train;

// The public door: what a front end needs to load a model once and ask from many threads.
pub use answer::aggregate::Uncertainty;
pub use answer::candidates::ParticleAnswer;
pub use answer::generate::Sampling;
pub use answer::{AskOptions, BellaVqa, CandidateAnswer, LoadOptions, Question, Response};
pub use hub::{HubOptions, ModelSource};
pub use models::image::{decode_image, load_image};

/// Sets `RAYON_NUM_THREADS` to candle's default thread count when it is unset. Without it candle
/// asks the OS for the number of cores on every matrix product (on Linux it reads and parses
/// `/proc/cpuinfo`), which costs 4–9 % of a decoding step (`eval/LATENCY.md`). Call it first
/// thing in `main`, before any thread starts: changing the environment of a running
/// multi-threaded program is unsound, so the library cannot do it for its callers.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
