//! Prometheus metrics of the fleet roles, served on `/metrics` by [`crate::http`].
//!
//! Names follow text-embeddings-inference's `te_*` family where the meaning is the same
//! (`te_request_duration`, `te_request_queue_duration`, `te_batch_next_size`, ...), so dashboards
//! written for TEI read embedfleet too; the rest are `embedfleet_*`. Durations are in seconds.
//! Counters carry the `_total` suffix of the Prometheus/OpenMetrics conventions
//! (`te_request_count_total`).
//!
//! Two sources:
//! - **Events** the roles report as they happen, through [`global`]: histograms (request,
//!   queue-wait, batch, fusion durations; batch sizes and tokens) and the counters that have no
//!   home in a role's stats (failures by error kind, redeliveries, model load time). The hooks
//!   in the roles are one line each.
//! - **Stats the roles already keep** (`$SRV.STATS` counters, cache and worker counters), read
//!   at scrape time by the collectors [`CoordinatorCollector`] and [`WorkerCollector`], so the
//!   numbers on `/metrics` and in `$SRV.STATS` can never disagree.
//!
//! Label values are bounded: model names come from the catalogue and error kinds from
//! [`ErrorKind`], never from client input.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use embedfleet_proto::ErrorKind;

use crate::coordinator::Coordinator;
use crate::worker::WorkerStats;

/// A label set of one label.
type Labels = [(&'static str, &'static str); 1];
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The event metrics of this process; every role reports into the same one.
#[derive(Debug)]
pub struct FleetMetrics {
    request_duration: Histogram,
    request_failure: Family<Labels, Counter>,
    fusion_duration: Histogram,
    queue_duration: HistogramFamily,
    batch_duration: HistogramFamily,
    batch_size: HistogramFamily,
    batch_tokens: HistogramFamily,
    redeliveries: Family<Labels, Counter>,
    model_load: Family<Labels, Gauge<f64, AtomicU64>>,
}

/// The process's metrics, created on first use.
pub fn global() -> &'static FleetMetrics {
    static METRICS: OnceLock<FleetMetrics> = OnceLock::new();
    METRICS.get_or_init(FleetMetrics::new)
}

/// 1 ms .. ~65 s: a cached answer takes a millisecond, a cold 7B batch tens of seconds.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 1 .. 4096 (inputs or tokens per batch).
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// 1 .. 2^19 tokens per batch (the token budget is 16 Ki by default).
fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 20))
}

impl FleetMetrics {
    fn new() -> Self {
        FleetMetrics {
            request_duration: duration_histogram(),
            request_failure: Family::default(),
            fusion_duration: duration_histogram(),
            queue_duration: Family::new_with_constructor(duration_histogram),
            batch_duration: Family::new_with_constructor(duration_histogram),
            batch_size: Family::new_with_constructor(size_histogram),
            batch_tokens: Family::new_with_constructor(token_histogram),
            redeliveries: Family::default(),
            model_load: Family::default(),
        }
    }

    /// Times one request from admission to reply; observes when dropped.
    pub fn request_timer(&self) -> Timer<'_> {
        Timer::new(&self.request_duration)
    }

    /// An error reply of `kind` (429 included).
    pub fn request_failed(&self, kind: ErrorKind) {
        self.request_failure
            .get_or_create(&[("err", kind.as_str())])
            .inc();
    }

    /// Times one fusion of a request's rows; observes when dropped.
    pub fn fusion_timer(&self) -> Timer<'_> {
        Timer::new(&self.fusion_duration)
    }

    /// A job of `model` handed to a worker: how long it waited in the queue since it was
    /// published, and whether this is a redelivery.
    pub fn job_delivered(&self, model: &'static str, message: &async_nats::jetstream::Message) {
        let Ok(info) = message.info() else { return };
        let labels = [("model", model)];
        if info.delivered > 1 {
            self.redeliveries.get_or_create(&labels).inc();
        }
        let waited = time::OffsetDateTime::now_utc() - info.published;
        if waited.is_positive() {
            self.queue_duration
                .get_or_create(&labels)
                .observe(waited.as_seconds_f64());
        }
    }

    /// Times one forward batch of `model` over `inputs` inputs and `tokens` estimated tokens;
    /// observes the duration, size and tokens when dropped.
    pub fn batch_timer(&self, model: &'static str, inputs: usize, tokens: usize) -> BatchTimer<'_> {
        BatchTimer {
            metrics: self,
            model,
            inputs,
            tokens,
            started: Instant::now(),
        }
    }

    /// One forward batch of `model` over `inputs` inputs and `tokens` estimated tokens.
    pub fn batch_done(&self, model: &'static str, inputs: usize, tokens: usize, took: Duration) {
        let labels = [("model", model)];
        self.batch_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.batch_size
            .get_or_create(&labels)
            .observe(inputs as f64);
        self.batch_tokens
            .get_or_create(&labels)
            .observe(tokens as f64);
    }

    /// `model` was loaded (and warmed) in `took`.
    pub fn model_loaded(&self, model: &'static str, took: Duration) {
        self.model_load
            .get_or_create(&[("model", model)])
            .set(took.as_secs_f64());
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "te_request_duration",
            "End-to-end duration of embed.v1 requests in the coordinator, in seconds",
            self.request_duration.clone(),
        );
        registry.register(
            "te_request_failure",
            "Error replies by error kind (err)",
            self.request_failure.clone(),
        );
        registry.register(
            "embedfleet_fusion_duration",
            "FuseMoE time per request, in seconds",
            self.fusion_duration.clone(),
        );
        registry.register(
            "te_request_queue_duration",
            "Time a model job waited in its JetStream queue before a worker took it, in seconds",
            self.queue_duration.clone(),
        );
        registry.register(
            "te_batch_inference_duration",
            "Model forward time per batch, in seconds",
            self.batch_duration.clone(),
        );
        registry.register(
            "te_batch_next_size",
            "Inputs per forward batch",
            self.batch_size.clone(),
        );
        registry.register(
            "te_batch_next_tokens",
            "Estimated tokens per forward batch",
            self.batch_tokens.clone(),
        );
        registry.register(
            "embedfleet_job_redeliveries",
            "Jobs delivered to a worker again (a worker died or a transient failure was retried)",
            self.redeliveries.clone(),
        );
        registry.register(
            "embedfleet_model_load_duration_seconds",
            "Time to load and warm each hosted model at start, in seconds",
            self.model_load.clone(),
        );
    }
}

/// Observes the time since its creation into a histogram when dropped, so every path out of a
/// scope (errors included) is measured.
#[must_use = "the timer observes when dropped"]
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl<'a> Timer<'a> {
    fn new(histogram: &'a Histogram) -> Self {
        Timer {
            histogram,
            started: Instant::now(),
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// See [`FleetMetrics::batch_timer`].
#[must_use = "the timer observes when dropped"]
pub struct BatchTimer<'a> {
    metrics: &'a FleetMetrics,
    model: &'static str,
    inputs: usize,
    tokens: usize,
    started: Instant,
}

impl Drop for BatchTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .batch_done(self.model, self.inputs, self.tokens, self.started.elapsed());
    }
}

/// The registry `/metrics` encodes: the event metrics plus the given collectors.
pub fn registry(collectors: Vec<Box<dyn Collector>>) -> Registry {
    let mut registry = Registry::default();
    global().register(&mut registry);
    for collector in collectors {
        registry.register_collector(collector);
    }
    registry
}

/// Encodes one counter or gauge: a single unlabelled value, or one value per label set.
fn encode_value(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: &[(Option<Labels>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    if let [(None, value)] = series {
        return encode_one(metric, metric_type, *value);
    }
    for (labels, value) in series {
        let labels = labels.unwrap_or([("", "")]);
        encode_one(metric.encode_family(&labels)?, metric_type, *value)?;
    }
    Ok(())
}

fn encode_one(
    encoder: prometheus_client::encoding::MetricEncoder,
    metric_type: MetricType,
    value: u64,
) -> Result<(), std::fmt::Error> {
    match metric_type {
        MetricType::Counter => ConstCounter::new(value).encode(encoder),
        _ => ConstGauge::new(value as i64).encode(encoder),
    }
}

/// The coordinator's counters and its cache's, read at scrape time.
#[derive(Debug)]
pub struct CoordinatorCollector(Weak<Coordinator>);

impl CoordinatorCollector {
    pub fn new(coordinator: &Arc<Coordinator>) -> Box<dyn Collector> {
        Box::new(CoordinatorCollector(Arc::downgrade(coordinator)))
    }
}

impl Collector for CoordinatorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(coordinator) = self.0.upgrade() else {
            return Ok(());
        };
        let s = coordinator.stats();
        let c = &s.cache;
        use MetricType::{Counter as C, Gauge as G};
        let rows: [(&str, &str, MetricType, Vec<(Option<Labels>, u64)>); 10] = [
            ("te_request_count", "embed.v1 requests received", C, vec![(None, s.requests)]),
            ("te_request_success", "embed.v1 requests answered with vectors", C, vec![(None, s.succeeded)]),
            ("embedfleet_requests_in_flight", "Requests admitted and not yet answered", G, vec![(None, s.in_flight as u64)]),
            ("embedfleet_jobs_published", "Model jobs published to JetStream", C, vec![(None, s.jobs_published)]),
            (
                "embedfleet_stray_partials",
                "Partials for no waiting job: late, or duplicates after a redelivery",
                C,
                vec![(None, s.stray_partials)],
            ),
            (
                "embedfleet_cache_hits",
                "Cache hits by tier: fused and partial (what the coordinator answered from the cache), lru and redis (where each key was found)",
                C,
                vec![
                    (Some([("tier", "fused")]), s.fused_hits),
                    (Some([("tier", "partial")]), s.partial_hits),
                    (Some([("tier", "lru")]), c.lru_hits),
                    (Some([("tier", "redis")]), c.redis_hits),
                ],
            ),
            ("embedfleet_cache_misses", "Cache keys neither tier had", C, vec![(None, c.misses)]),
            ("embedfleet_redis_outages", "Times Redis went from answering to failing", C, vec![(None, c.redis_outages)]),
            ("embedfleet_redis_errors", "Redis calls that failed or timed out", C, vec![(None, c.redis_errors)]),
            ("embedfleet_redis_down", "1 while Redis is in an outage", G, vec![(None, c.redis_down as u64)]),
        ];
        for (name, help, metric_type, series) in rows {
            encode_value(&mut encoder, name, help, metric_type, &series)?;
        }
        Ok(())
    }
}

/// A worker's job counters, read at scrape time.
#[derive(Debug)]
pub struct WorkerCollector(Arc<WorkerStats>);

impl WorkerCollector {
    pub fn new(stats: Arc<WorkerStats>) -> Box<dyn Collector> {
        Box::new(WorkerCollector(stats))
    }
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = self.0.report();
        let outcome = |o| Some([("outcome", o)]);
        encode_value(
            &mut encoder,
            "embedfleet_worker_jobs",
            "Jobs settled by this worker, by outcome: done (vectors), failed (a permanent error), expired (deadline passed, not run), poison (failed on its last delivery), undecodable",
            MetricType::Counter,
            &[
                (outcome("done"), r.jobs_done),
                (outcome("failed"), r.jobs_failed),
                (outcome("expired"), r.expired_skipped),
                (outcome("poison"), r.poison_terminated),
                (outcome("undecodable"), r.undecodable),
            ],
        )?;
        encode_value(
            &mut encoder,
            "embedfleet_worker_retries",
            "Jobs nakked after a transient failure (each one a redelivery to come)",
            MetricType::Counter,
            &[(None, r.retries)],
        )?;
        encode_value(
            &mut encoder,
            "embedfleet_worker_batches",
            "Forward batches started",
            MetricType::Counter,
            &[(None, r.batches)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_metrics_appear_in_the_text_format() {
        let metrics = global();
        metrics.request_failed(ErrorKind::Overloaded);
        metrics.batch_done("minilm", 3, 40, Duration::from_millis(5));
        drop(metrics.request_timer());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry(Vec::new()))
            .expect("encode");
        assert!(
            text.contains("te_request_failure_total{err=\"overloaded\"}"),
            "{text}"
        );
        assert!(
            text.contains("te_batch_next_size_count{model=\"minilm\"}"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE te_request_duration histogram"),
            "{text}"
        );
    }

    #[test]
    fn worker_counters_are_read_at_scrape_time() {
        let stats = Arc::new(WorkerStats::default());
        let registry = registry(vec![WorkerCollector::new(stats.clone())]);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("embedfleet_worker_jobs_total{outcome=\"done\"} 0"),
            "{text}"
        );
    }
}
