//! The one thread that owns the compute (design §11): it loads the model, then takes every
//! question waiting in the bounded queue (up to the batch limit), answers them in one
//! particle-folded pass with [`BellaVqa::ask_batch`] and sends each result back on its own
//! channel. Compute never runs on the async runtime's threads; a panic fails its batch only.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{anyhow, Result};
use image::DynamicImage;
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::{AskOptions, BellaVqa, Question, Response};

/// One question on its way to the worker.
pub struct Job {
    pub image: DynamicImage,
    /// The image's share of `--max-image-memory-mb`, given back when the job is done with (its
    /// image freed), not when its client leaves.
    pub image_memory: tokio::sync::OwnedSemaphorePermit,
    pub question: String,
    pub options: AskOptions,
    pub reply: oneshot::Sender<Result<Response>>,
    /// After this the asker has given up (it answers 504 itself); the worker skips the job.
    pub deadline: Instant,
}

/// The next question: at once when one waits; otherwise the freed memory of the last batches is
/// handed back to the system first (glibc keeps it otherwise, and the server's RSS would stay at
/// its largest batch), then it waits.
fn next_job(jobs: &mut mpsc::Receiver<Job>) -> Option<Job> {
    if let Ok(job) = jobs.try_recv() {
        return Some(job);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
    jobs.blocking_recv()
}

/// The model once the worker has loaded it (the handlers read it for limits and token counts).
pub type Loaded = Arc<OnceLock<Arc<BellaVqa>>>;

/// Runs on its own thread: loads the model with `load`, publishes it in `loaded`, then answers
/// batches until every sender of `jobs` is gone. Returns the load error, if any.
pub fn run(
    load: impl FnOnce() -> Result<BellaVqa>,
    loaded: Loaded,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let vqa = Arc::new(load()?);
    metrics.particles.set(vqa.particles() as i64);
    // The worker is the only writer; a second set cannot happen.
    let _ = loaded.set(vqa.clone());
    metrics.ready.set(1.0);
    while let Some(first) = next_job(&mut jobs) {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        batch.retain(|j| !j.reply.is_closed() && j.deadline > now);
        if batch.is_empty() {
            continue;
        }
        metrics.batch_size.observe(batch.len() as f64);
        let questions: Vec<Question> = batch
            .iter()
            .map(|j| Question {
                image: &j.image,
                text: &j.question,
                options: &j.options,
            })
            .collect();
        let results =
            catch_unwind(AssertUnwindSafe(|| vqa.ask_batch(&questions))).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown cause".into());
                batch
                    .iter()
                    .map(|_| Err(anyhow!("internal error while answering ({what})")))
                    .collect()
            });
        drop(questions);
        for (job, result) in batch.into_iter().zip(results) {
            if let Ok(r) = &result {
                metrics.answers.inc();
                if r.abstained {
                    metrics.abstentions.inc();
                }
            }
            // The asker may have gone (timeout, closed connection): nothing to do then.
            let _ = job.reply.send(result);
        }
    }
    Ok(())
}
