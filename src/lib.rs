//! bella-vqa: calibrated uncertainty for multimodal models with Bella particles.
//!
//! The data flows one way: [`hub`] (where the files are) → [`models`] (CLIP, LLaMA, LLaVA with
//! particle-capable linear layers) → [`bella`] (the particles) → answers → aggregation.
//!
//! The door for front ends is at the crate root: load a [`BellaVqa`] once (a hub id, a cache
//! entry or a directory, with a particle directory; [`BellaVqa::load_particles`] finds the base
//! the particles were trained on, [`BellaVqa::demo`] is the embedded demo as the command line
//! has it), share it behind an [`Arc`](std::sync::Arc), and ask from as many threads as you
//! like; [`BellaVqa::ask_batch`] answers several questions in one pass, and
//! [`BellaVqa::ask_batch_until`] stops them at the next layer once their askers have gone. The
//! HTTP server ([`serve`]) is written against exactly this API.
//!
//! ```
//! use std::sync::Arc;
//! use bella_vqa::{load_image, AskOptions, BellaVqa, LoadOptions, ModelSource, Question};
//!
//! # fn main() -> anyhow::Result<()> {
//! # let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
//! // Load once (particles with `Some(dir)`), then share.
//! let source = ModelSource::Dir(root.join("tests/fixtures/llava-tiny-hub"));
//! let vqa = Arc::new(BellaVqa::load(&source, None, &LoadOptions::default())?);
//!
//! // A chat front end asks from many threads (or `spawn_blocking` tasks) at once.
//! let image = Arc::new(load_image(&root.join("tests/fixtures/images/square.png"))?);
//! let askers: Vec<_> = ["What color is the circle?", "What shape is it?"]
//!     .into_iter()
//!     .map(|question| {
//!         let (vqa, image) = (vqa.clone(), image.clone());
//!         std::thread::spawn(move || vqa.ask(&image, question))
//!     })
//!     .collect();
//! for asker in askers {
//!     let response = asker.join().expect("no panic")?;
//!     // The rendered text ("I'm not sure …" below the threshold) and the numbers behind it.
//!     println!("{} (confidence {:.2})", response.response, response.confidence);
//!     assert!((0.0..=1.0).contains(&response.confidence));
//! }
//!
//! // Or several questions in one particle-folded pass.
//! let opts = AskOptions::default();
//! let batch = [
//!     Question { image: &image, text: "What color is the circle?", options: &opts },
//!     Question { image: &image, text: "Is there a square?", options: &opts },
//! ];
//! for result in vqa.ask_batch(&batch) {
//!     let response = result?;
//!     assert_eq!(response.particles.len(), vqa.particles());
//! }
//! # Ok(())
//! # }
//! ```

pub mod answer;
pub mod bella;
pub mod bench;
pub mod cancel;
pub mod console;
pub mod data;
pub mod demo;
pub mod error;
pub mod guarantee;
pub mod hub;
pub mod input;
pub mod inspect;
pub mod interrupt;
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
/// The `image` crate this one is built with: [`image::DynamicImage`] is what [`BellaVqa::ask`]
/// reads, without a second copy of the crate to keep in step.
pub use image;
pub use models::image::{decode_image, load_image};

/// Process-wide settings for a program that runs these models. Call it first thing in `main`,
/// before any thread starts, as the CLI and the benches do: changing the environment of a running
/// multi-threaded program is unsound, so the library cannot do it for its callers.
///
/// - `RAYON_NUM_THREADS` is set to candle's default thread count when it is unset. Without it
///   candle asks the OS for the number of cores on every matrix product (on Linux it reads and
///   parses `/proc/cpuinfo`), which costs 4–9 % of a decoding step (`eval/LATENCY.md`).
/// - glibc's allocator serves every block from its heap and keeps freed ones for reuse. By
///   default it maps blocks above a moving threshold (128 KiB, rising to at most 32 MiB) afresh
///   from the system and unmaps them when freed, so the activations a forward pass allocates and
///   frees (a P = 8 prefill of a 7B-wide layer: 80–370 MB each, several GB per answer) start
///   over every time with page faults that clear their pages. Mapping is turned off
///   (`M_MMAP_MAX` 0; the heap grows as one) and the heap is trimmed only above 1 GiB of free
///   top memory: a P = 8 f32 answer of the 2-layer 7B-wide model took 43 s instead of 60 s
///   (1.7 M fewer page faults) and peaked 6 % higher (`eval/SCALE.md`, stop 24). A long-running
///   caller hands freed memory back when idle with `malloc_trim`, as the server does.
/// - SIGXFSZ is ignored: a write past `ulimit -f` is an error like a full disk.
pub fn prepare_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; glibc takes its own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    // A write past the file-size limit (`ulimit -f`) fails with "File too large", said with the
    // file's name and the work kept as any failed write is, instead of killing the process
    // (SIGXFSZ) without a word, a record half-written.
    #[cfg(target_os = "linux")]
    // SAFETY: ignoring a signal installs no handler; done before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Starts the compute threads (candle's worker pool, rayon's global pool) now, while the
/// address space is free: started at the first product, after the model and an image had taken
/// it, their stacks could not be mapped under a memory limit (`ulimit -v`), and candle panicked
/// in the middle of an answer ("failed to spawn candle barrier pool worker").
pub fn start_compute_threads() -> anyhow::Result<()> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(|| {
        candle_core::utils::barrier_pool();
        rayon::current_num_threads();
    });
    std::panic::set_hook(quiet);
    started.map_err(|_| {
        anyhow::anyhow!(
            "cannot start the compute threads: the process may not take the memory for their \
             stacks (a limit such as ulimit -v is too low); raise the limit, or set \
             RAYON_NUM_THREADS=1 for one thread"
        )
    })
}
