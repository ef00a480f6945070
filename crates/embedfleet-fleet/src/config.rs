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
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_inputs: 64,
            token_budget: 16_384,
            max_wait: Duration::from_millis(2),
            batches_in_flight: 2,
        }
    }
}

/// The coordinator: admission, deadlines, defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Requests handled at once by this coordinator; one more is refused with 429 at once rather
    /// than queued in memory.
    pub max_in_flight: usize,
    /// How long a request may take end to end; past it the reply is 503 (`no_worker` when the
    /// model's consumer has no worker pulling, `timeout` otherwise).
    pub request_timeout: Duration,
    /// Size limits of a request.
    pub limits: RequestLimits,
    /// The model set of requests that name none.
    pub default_models: Vec<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            max_in_flight: 256,
            request_timeout: Duration::from_secs(30),
            limits: RequestLimits::default(),
            default_models: vec!["minilm".into(), "mpnet".into()],
        }
    }
}
