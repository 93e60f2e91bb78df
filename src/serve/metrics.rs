//! `GET /metrics`: Prometheus text exposition of what the server did.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Every metric the server exports, registered once.
pub struct Metrics {
    registry: Registry,
    /// Chat-completion requests by HTTP status.
    pub requests: Family<StatusLabel, Counter>,
    /// Seconds from arrival to the answer (answered requests).
    pub latency: Histogram,
    /// Questions per batch the worker answered in one pass.
    pub batch_size: Histogram,
    pub answers: Counter,
    pub abstentions: Counter,
    /// Questions whose answering stopped because every asker of their batch had left.
    pub cancelled: Counter,
    /// Questions waiting for the worker (set at each scrape).
    pub queue_depth: Gauge,
    pub particles: Gauge,
    pub ready: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bella");
        let requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "chat_requests",
            "Chat-completion requests by HTTP status",
            requests.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "chat_latency_seconds",
            "Seconds from a request's arrival to its answer",
            latency.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register(
            "batch_size",
            "Questions answered together in one pass",
            batch_size.clone(),
        );
        let answers = Counter::default();
        registry.register(
            "answers",
            "Questions answered (abstentions included)",
            answers.clone(),
        );
        let abstentions = Counter::default();
        registry.register(
            "abstentions",
            "Questions where the server said it is not sure",
            abstentions.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "cancelled",
            "Questions whose answering stopped because every asker of their batch had left",
            cancelled.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Questions waiting for the model",
            queue_depth.clone(),
        );
        let particles = Gauge::default();
        registry.register("particles", "Particles per answer", particles.clone());
        let ready = Gauge::<f64, AtomicU64>::default();
        registry.register("ready", "1 once the model is loaded", ready.clone());
        Self {
            registry,
            requests,
            latency,
            batch_size,
            answers,
            abstentions,
            cancelled,
            queue_depth,
            particles,
            ready,
        }
    }

    pub fn count(&self, status: u16) {
        self.requests.get_or_create(&StatusLabel { status }).inc();
    }

    /// A chat request answered with `status`: counted, and timed from `arrived` when it succeeded.
    pub fn answered(&self, status: u16, arrived: std::time::Instant) {
        self.count(status);
        if (200..300).contains(&status) {
            self.latency.observe(arrived.elapsed().as_secs_f64());
        }
    }

    /// The text exposition (`text/plain; version=0.0.4` compatible OpenMetrics text).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
