//! Settings of the fleet roles. Plain structs with production defaults; the CLI maps its flags
//! onto them and tests shrink the timings.

use std::time::Duration;

use embedfleet_proto::RequestLimits;

/// The JetStream side: the job stream and the per-model durable consumers.
///
/// Every number here bounds something: stream bytes and age bound what a dead fleet can pile up,
/// `max_ack_pending` bounds what one model's workers hold unacknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// How long a worker may hold a job without acking before JetStream redelivers it to another
    /// worker. Workers send in-progress acks on long batches, so this only has to cover the gap
    /// between two of those, not a whole batch. It is also how long a request waits when the
    /// worker holding its job dies: keep it well under the request timeout.
    pub ack_wait: Duration,
    /// Deliveries before a job is given up on: the worker that sees the last delivery fail
    /// terminates it and answers the request with the error, so a poison job cannot loop.
    pub max_deliver: i64,
    /// Unacknowledged jobs per model consumer, across all its workers.
    pub max_ack_pending: i64,
    /// Upper bound of the job stream's bytes; publishing past it is refused (429), never
    /// silently dropping jobs already accepted.
    pub stream_max_bytes: i64,
    /// Jobs older than this are dropped by the stream: nobody waits for them any more.
    pub stream_max_age: Duration,
    /// JetStream de-duplication window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Queued jobs per model (per subject of the stream). Past it that model's new jobs are
    /// refused (429) while other models' queues go on: a model nobody serves fills its own
    /// queue, not the whole stream. `-1`: no per-model bound.
    pub max_jobs_per_model: i64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            ack_wait: Duration::from_secs(10),
            max_deliver: 4,
            max_ack_pending: 1024,
            stream_max_bytes: 1 << 30,
            stream_max_age: Duration::from_secs(600),
            duplicate_window: Duration::from_secs(120),
            max_jobs_per_model: 10_000,
        }
    }
}

/// How a model worker forms batches out of queued jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Most inputs in one forward batch.
    pub max_inputs: usize,
    /// Estimated tokens per batch (see the worker for the estimate). A job bigger than the whole
    /// budget runs as a batch of its own: it is never split across batches nor retried for size.
    pub token_budget: usize,
    /// How long the first job of a batch waits for company. Zero runs whatever is queued at once.
    pub max_wait: Duration,
    /// Batches of one model that run at once in a worker. Two lets the next batch be gathered
    /// and tokenised while the last one is in the model, and lets small CPU batches, which do
    /// not spread over every core on their own, run side by side.
    pub batches_in_flight: usize,
    /// The watchdog: a model call running longer than this is abandoned, its jobs nakked for
    /// another worker, and the worker reports itself unready until the call returns. Zero turns
    /// the watchdog off. Set it well above the slowest legitimate batch.
    pub hung_after: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_inputs: 64,
            token_budget: 16_384,
            max_wait: Duration::from_millis(2),
            batches_in_flight: 2,
            hung_after: Duration::from_secs(120),
        }
    }
}

/// The coordinator: admission, deadlines, defaults, breakers.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Requests handled at once by this coordinator; one more is refused with 429 at once rather
    /// than queued in memory.
    pub max_in_flight: usize,
    /// How long a request may take end to end unless it says otherwise (the
    /// `Embedfleet-Timeout-Ms` header); past it the reply is 503 (`no_worker` when the model's
    /// consumer has no worker pulling, `timeout` otherwise).
    pub request_timeout: Duration,
    /// The longest timeout a request may ask for in its header.
    pub max_request_timeout: Duration,
    /// Size limits of a request.
    pub limits: RequestLimits,
    /// The model set of requests that name none; always fusable.
    pub default_models: Vec<String>,
    /// More model sets this coordinator fuses (each gets a FuseMoE layer). A fused request must
    /// name one of these sets or the default set (or, with `fuse_subsets`, a subset of one);
    /// anything else is refused with 400 before any work.
    pub fusable_sets: Vec<Vec<String>>,
    /// Whether a subset of a fusable set may be fused, by that set's layer with the absent
    /// models masked.
    pub fuse_subsets: bool,
    /// While a request waits for a partial, how often the coordinator checks that its job is
    /// still queued or held; a job gone from the stream whose partial never came (lost when a
    /// worker's connection broke after its ack) is published again.
    pub reask_interval: Duration,
    /// The per-model circuit breakers.
    pub breaker: crate::coordinator::BreakerConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            max_in_flight: 256,
            request_timeout: Duration::from_secs(30),
            max_request_timeout: Duration::from_secs(300),
            limits: RequestLimits::default(),
            default_models: vec!["minilm".into(), "mpnet".into()],
            fusable_sets: Vec::new(),
            fuse_subsets: true,
            reask_interval: Duration::from_secs(2),
            breaker: crate::coordinator::BreakerConfig::default(),
        }
    }
}
