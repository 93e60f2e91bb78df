//! The one thread that owns the compute (design §11): it loads the model, then takes every
//! question waiting in the bounded queue (up to the batch limit), answers them in one
//! particle-folded pass with [`BellaVqa::ask_batch`] and sends each result back on its own
//! channel. Compute never runs on the async runtime's threads; a panic fails its batch only.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use anyhow::{anyhow, Result};
use image::DynamicImage;
use tokio::sync::oneshot;

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
    /// The asker's connection, where the server could watch it.
    pub peer: Option<Peer>,
}

impl Job {
    /// Its asker no longer waits: the request was dropped (the connection closed, a 504 at the
    /// deadline), or the connection was closed by its client while hyper was not reading it
    /// (bytes sent after the request: a pipelined request, a stray CRLF).
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.peer.is_some_and(Peer::hung_up)
    }

    /// Drops the job of an asker who left, telling its request so (one whose connection closed
    /// unseen by hyper is still there, and answers 499, not a dropped question's 500).
    fn give_up(self) {
        let _ = self.reply.send(Err(crate::cancel::Cancelled.into()));
    }
}

/// A client's connection, watched for its end. hyper reads a connection only while it has no
/// request to answer, and sees a client that leaves only when it reads; a client that sent more
/// bytes after its request has them waiting unread, so it would be seen gone only when the
/// answer is written. `poll` with `POLLRDHUP` says at once that the client has closed (or shut
/// down its sending side, which hyper treats as leaving too), whatever is still unread.
///
/// Holds the socket's descriptor number, not a duplicate (which would double the server's open
/// files): should the connection close and the number be reused before a check, the check reads
/// another socket, but then the request has been dropped with its connection and
/// the job already counts as abandoned.
#[derive(Clone, Copy, Debug)]
pub struct Peer(#[cfg(target_os = "linux")] std::os::fd::RawFd);

impl Peer {
    /// Watches `socket`; `None` where the system cannot tell (other than Linux).
    pub fn of(socket: &tokio::net::TcpStream) -> Option<Self> {
        #[cfg(target_os = "linux")]
        return Some(Self(std::os::fd::AsRawFd::as_raw_fd(socket)));
        #[cfg(not(target_os = "linux"))]
        {
            let _ = socket;
            None
        }
    }

    /// The client has closed the connection, or it failed.
    fn hung_up(self) -> bool {
        #[cfg(target_os = "linux")]
        {
            let mut watched = libc::pollfd {
                fd: self.0,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid `pollfd`, a zero timeout; `poll` only writes its `revents`.
            let ready = unsafe { libc::poll(&mut watched, 1, 0) };
            let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
            ready > 0 && watched.revents & gone != 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    }
}

/// Why [`Queue::push`] refused a question.
pub enum Refused {
    /// `--queue` questions are waiting, each for an asker who still waits.
    Full,
    /// The server is stopping.
    Closed,
}

/// The questions waiting for the worker: at most `capacity` of them. A question whose asker has
/// left (a front end's Stop button, a closed tab) gives up its place to a new one, so abandoned
/// questions never make the server refuse people who wait.
pub struct Queue {
    state: Mutex<Waiting>,
    ready: Condvar,
    capacity: usize,
}

/// What the queue's lock guards.
#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Job>,
    /// No more questions are taken; the worker ends once `jobs` is empty.
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A panic while holding the lock leaves a queue that is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, or says why not (the job is dropped: its image and memory share go).
    pub fn push(&self, job: Job) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.jobs.len() >= self.capacity {
            state.drop_abandoned();
        }
        if state.jobs.len() >= self.capacity {
            return Err(Refused::Full);
        }
        state.jobs.push_back(job);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Drops the waiting questions whose askers have left, with their images and image-memory
    /// shares (a new question that finds the image memory full asks for this first).
    pub fn drop_abandoned(&self) {
        self.lock().drop_abandoned();
    }

    /// Questions waiting.
    pub fn waiting(&self) -> usize {
        self.lock().jobs.len()
    }

    /// No more questions: the worker answers those waiting, then ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Up to `max` questions that decode alike ([`AskOptions::decodes_like`] the first waiting,
    /// the others keeping their places): one pass of the model, whose answers all leave when it
    /// ends and which stops once all its askers have gone. At once when some wait; otherwise the
    /// freed memory of the last batches is handed back to the system first (glibc keeps it
    /// otherwise, and the server's RSS would stay at its largest batch), then it waits. `None`
    /// once closed and empty.
    fn next_batch(&self, max: usize) -> Option<Vec<Job>> {
        let mut state = self.lock();
        if state.jobs.is_empty() {
            drop(state);
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free heap pages; it is thread-safe in glibc.
            unsafe {
                libc::malloc_trim(0);
            }
            state = self.lock();
        }
        loop {
            if let Some(first) = state.jobs.front() {
                let options = first.options.clone();
                let (mut batch, mut others) = (Vec::new(), VecDeque::new());
                for job in state.jobs.drain(..) {
                    if batch.len() < max && job.options.decodes_like(&options) {
                        batch.push(job);
                    } else {
                        others.push_back(job);
                    }
                }
                state.jobs = others;
                return Some(batch);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Waiting {
    fn drop_abandoned(&mut self) {
        let (gone, waiting) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition::<VecDeque<_>, _>(Job::abandoned);
        self.jobs = waiting;
        gone.into_iter().for_each(Job::give_up);
    }
}

/// Closes the queue when dropped: the worker ends however the server stops.
pub struct CloseOnDrop(pub Arc<Queue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The model once the worker has loaded it (the handlers read it for limits and token counts).
pub type Loaded = Arc<OnceLock<Arc<BellaVqa>>>;

/// Runs on its own thread: loads the model with `load`, publishes it in `loaded`, then answers
/// batches until the queue is closed and empty. Returns the load error, if any.
pub fn run(
    load: impl FnOnce() -> Result<BellaVqa>,
    loaded: Loaded,
    queue: Arc<Queue>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let vqa = Arc::new(load()?);
    metrics.particles.set(vqa.particles() as i64);
    // The worker is the only writer; a second set cannot happen.
    let _ = loaded.set(vqa.clone());
    metrics.ready.set(1.0);
    while let Some(batch) = queue.next_batch(max_batch) {
        let now = Instant::now();
        let (batch, gone): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|j| !j.abandoned() && j.deadline > now);
        // Past its deadline, its asker answers 504 itself: dropped.
        gone.into_iter()
            .filter(Job::abandoned)
            .for_each(Job::give_up);
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
        // Stops between layers once nobody waits for any of the batch's answers (their clients
        // left, or were answered 504 at their deadline): the next batch need not wait for it.
        let everyone_gone = || batch.iter().all(Job::abandoned);
        let results = catch_unwind(AssertUnwindSafe(|| {
            vqa.ask_batch_until(&questions, &everyone_gone)
        }))
        .unwrap_or_else(|panic| {
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
            match &result {
                Ok(r) => {
                    metrics.answers.inc();
                    if r.abstained {
                        metrics.abstentions.inc();
                    }
                }
                Err(e) if e.is::<crate::cancel::Cancelled>() => {
                    metrics.cancelled.inc();
                }
                Err(_) => {}
            }
            // The asker may have gone (timeout, closed connection): nothing to do then. One that
            // left while others of its batch waited is told so (499), not handed its answer.
            if job.abandoned() {
                job.give_up();
            } else {
                let _ = job.reply.send(result);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job, and the receiver its asker waits on.
    fn job() -> (Job, oneshot::Receiver<Result<Response>>) {
        job_with("q", AskOptions::default())
    }

    /// A job asking `question` with `options`.
    fn job_with(question: &str, options: AskOptions) -> (Job, oneshot::Receiver<Result<Response>>) {
        let (reply, answer) = oneshot::channel();
        let memory = Arc::new(tokio::sync::Semaphore::new(1));
        let job = Job {
            image: DynamicImage::new_rgb8(1, 1),
            image_memory: memory.try_acquire_owned().expect("a permit"),
            question: question.into(),
            options,
            reply,
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            peer: None,
        };
        (job, answer)
    }

    #[test]
    fn questions_whose_askers_left_give_their_places_to_new_ones() {
        let queue = Queue::new(2);
        let (a, a_waits) = job();
        let (b, b_gone) = job();
        assert!(queue.push(a).is_ok() && queue.push(b).is_ok());
        // Full while both askers wait.
        let (c, _c_waits) = job();
        assert!(matches!(queue.push(c), Err(Refused::Full)));
        // One leaves: its place goes to the next question.
        drop(b_gone);
        let (e, _e_waits) = job();
        assert!(queue.push(e).is_ok());
        assert_eq!(queue.waiting(), 2);
        drop(a_waits);
        // The worker takes what waits, then, closed and empty, ends.
        queue.close();
        let (d, _) = job();
        assert!(matches!(queue.push(d), Err(Refused::Closed)));
        assert_eq!(queue.next_batch(8).map(|b| b.len()), Some(2));
        assert!(queue.next_batch(8).is_none());
    }

    #[test]
    fn a_batch_holds_questions_that_decode_alike_and_the_others_keep_their_places() {
        let queue = Queue::new(8);
        let short = AskOptions {
            max_new_tokens: 1,
            ..AskOptions::default()
        };
        // The threshold does not split a batch; the answer length does.
        let strict = AskOptions {
            threshold: Some(0.9),
            ..AskOptions::default()
        };
        let mut askers = Vec::new();
        for (q, options) in [
            ("a1", AskOptions::default()),
            ("b1", short.clone()),
            ("a2", strict),
            ("a3", AskOptions::default()),
            ("b2", short),
        ] {
            let (job, asker) = job_with(q, options);
            assert!(queue.push(job).is_ok());
            askers.push(asker);
        }
        let questions = |batch: Option<Vec<Job>>| -> Vec<String> {
            batch
                .expect("a batch")
                .into_iter()
                .map(|j| j.question)
                .collect()
        };
        assert_eq!(questions(queue.next_batch(2)), ["a1", "a2"]);
        assert_eq!(questions(queue.next_batch(8)), ["b1", "b2"]);
        assert_eq!(questions(queue.next_batch(8)), ["a3"]);
        assert_eq!(queue.waiting(), 0);
    }
}
