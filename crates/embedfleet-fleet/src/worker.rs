//! The model worker role: pulls one model's jobs from JetStream, batches them, embeds, publishes
//! each job's [`PartialResult`] and only then acks the job.
//!
//! # API
//! - [`run_worker`]`(client, models, config, shutdown) -> Result<WorkerReport, WorkerError>`: the
//!   role in one call.
//! - [`ModelWorker`]: the same in two steps, for callers that want the live [`WorkerStats`]
//!   (`ModelWorker::new(..)?`, `.stats()`, `.run(shutdown)`).
//! - [`WorkerConfig`]: the queue and batch settings; [`WorkerReport`]: the final counts.
//! - [`estimate_tokens`]: the token estimate the batch budget is measured in.
//!
//! # One model's loop
//! Each hosted model gets a task of its own that binds the model's durable consumer
//! (`embedfleet-model-<model>`, declared here too, as either role may start first) and repeats:
//! 1. **Wait** for a job: a pull request for one message, re-issued every second while idle.
//! 2. **Gather** company for up to `max_wait` after it — but only while the consumer reports more
//!    jobs queued behind the newest one (a lightly loaded worker runs a job at once rather than
//!    wait for company that is not there) — with pull requests for no more than the batch has
//!    room for, until `max_inputs` inputs or the token budget is reached. Jobs with other
//!    options (truncate, instruction) or that do not fit wait in a small carry-over queue for the
//!    next batch; every message this worker holds counts against `max_inputs`, so the worker
//!    never has more than that many jobs delivered and unanswered. A job bigger than the whole
//!    budget runs as a batch of its own.
//! 3. **Run** the batch on a blocking thread, sending in-progress acks for every held message
//!    each `ack_wait / 3` so that a long batch is not redelivered elsewhere.
//! 4. **Answer**: publish each job's partial on its `reply_to`, then ack it, on the same
//!    connection, so the ack can never overtake the partial (at-least-once: a worker killed in
//!    between leaves the job to be redelivered; duplicate partials are harmless).
//!
//! How each outcome settles a job:
//!
//! | outcome | partial | message |
//! |---|---|---|
//! | vectors | `Vectors` | ack |
//! | a permanent error blamed on one input (empty, too long, modality) | `Failed`, naming the input | ack; the rest of the batch runs again without it |
//! | a transient error (forward pass, panic), deliveries left | none | nak with a short delay |
//! | a transient error on the last delivery (`max_deliver`) | `Failed(internal)` | term ("poison") |
//! | deadline passed before the job ran | none | ack, not run |
//! | undecodable payload | none (no reply subject to use) | term |
//!
//! NATS errors never end the role: async-nats reconnects by itself, and a failed pull makes the
//! loop declare the stream and consumer again, with back-off. Cancelling `shutdown` stops the
//! pulling; the running batch finishes and is answered, jobs held for later batches are nakked
//! without delay for another worker, and the client is flushed before `run` returns. An idle
//! loop notices shutdown when its pull request ends: within about a second, or up to six while
//! the server is unreachable (async-nats then ends the request on its own timer).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use async_nats::PublishErrorKind;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use embedfleet_models::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelError};
use embedfleet_proto::{ErrorKind, Input};

use crate::config::{BatchConfig, QueueConfig};
use crate::job::{self, JobFailure, ModelJob, PartialOutcome, PartialResult, PartialVector};
use crate::queues::{ensure_job_stream, ensure_model_consumer};

/// How long an idle pull request waits for a job. Short, because shutdown waits for the pull in
/// flight (dropping it could strand a job delivered to it until `ack_wait` runs out).
const IDLE_PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Shorter gather windows than this are not worth a pull request.
const MIN_GATHER_PULL: Duration = Duration::from_millis(1);
/// Back-off between attempts to bind the consumer after a NATS error.
const REBIND_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const REBIND_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Redelivery delay after a transient failure: this much per delivery so far, up to the maximum.
const NAK_DELAY_STEP: Duration = Duration::from_millis(250);
const NAK_DELAY_MAX: Duration = Duration::from_secs(1);
/// Floor of the in-progress ack period, for tiny test `ack_wait`s.
const MIN_PROGRESS_PERIOD: Duration = Duration::from_millis(10);
/// How long shutdown waits for the last partials and acks to reach the server.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens a text input costs on top of its content (`[CLS]`/`[SEP]` and the like).
const SPECIAL_TOKENS: usize = 2;

/// The worker's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerConfig {
    /// The job stream and the model consumers: `ack_wait` sets the in-progress ack period,
    /// `max_deliver` when a failing job is given up on.
    pub queues: QueueConfig,
    /// How jobs are gathered into forward batches.
    pub batch: BatchConfig,
}

/// Why the worker could not run, or stopped abnormally. NATS trouble is not here: the worker
/// rides it out.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("a model worker needs at least one model")]
    NoModels,
    #[error("model `{0}` is hosted twice; each model has one consumer loop per worker")]
    DuplicateModel(String),
    #[error("the job loop of model `{model}` panicked: {reason}")]
    LoopPanicked { model: String, reason: String },
}

/// Live counters of a worker, over all its models. Relaxed atomics: cheap enough to bump per job,
/// read for logs and tests.
#[derive(Debug, Default)]
pub struct WorkerStats {
    jobs_done: AtomicU64,
    jobs_failed: AtomicU64,
    expired_skipped: AtomicU64,
    poison_terminated: AtomicU64,
    undecodable: AtomicU64,
    retries: AtomicU64,
    batches: AtomicU64,
}

/// A snapshot of [`WorkerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Jobs answered with vectors.
    pub jobs_done: u64,
    /// Jobs answered with a permanent failure (a bad input, or a partial too big to send).
    pub jobs_failed: u64,
    /// Jobs acked without running because their deadline had passed.
    pub expired_skipped: u64,
    /// Jobs that failed on their last delivery: answered with `internal` and terminated.
    pub poison_terminated: u64,
    /// Messages terminated because they did not decode as a [`ModelJob`].
    pub undecodable: u64,
    /// Naks after a transient failure, each one a redelivery to come.
    pub retries: u64,
    /// Forward batches started (re-runs after a bad input count once).
    pub batches: u64,
}

impl WorkerStats {
    /// The counters now.
    pub fn report(&self) -> WorkerReport {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WorkerReport {
            jobs_done: read(&self.jobs_done),
            jobs_failed: read(&self.jobs_failed),
            expired_skipped: read(&self.expired_skipped),
            poison_terminated: read(&self.poison_terminated),
            undecodable: read(&self.undecodable),
            retries: read(&self.retries),
            batches: read(&self.batches),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Runs a model worker for `models` until `shutdown` is cancelled; see the module docs.
pub async fn run_worker(
    client: async_nats::Client,
    models: Vec<Arc<dyn EmbeddingModel>>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<WorkerReport, WorkerError> {
    ModelWorker::new(client, models, config)?
        .run(shutdown)
        .await
}

/// A model worker, built and then run; see the module docs.
pub struct ModelWorker {
    client: async_nats::Client,
    models: Vec<Arc<dyn EmbeddingModel>>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
}

impl ModelWorker {
    /// Checks the model set: at least one model, each once.
    pub fn new(
        client: async_nats::Client,
        models: Vec<Arc<dyn EmbeddingModel>>,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        if models.is_empty() {
            return Err(WorkerError::NoModels);
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = models.iter().find(|m| !seen.insert(m.spec().name)) {
            return Err(WorkerError::DuplicateModel(twice.spec().name.to_string()));
        }
        Ok(ModelWorker {
            client,
            models,
            config,
            stats: Arc::default(),
        })
    }

    /// The live counters, readable while [`ModelWorker::run`] runs.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Serves every model until `shutdown` is cancelled, then returns the final counts.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport, WorkerError> {
        let js = jetstream::new(self.client.clone());
        let config = Arc::new(self.config);
        // A child token, so that a panicking loop can stop its siblings without touching the
        // caller's token.
        let stop = shutdown.child_token();
        let mut loops = JoinSet::new();
        let mut names = HashMap::new();
        for model in self.models {
            let name = model.spec().name;
            let job_loop = ModelLoop {
                model,
                client: self.client.clone(),
                js: js.clone(),
                config: config.clone(),
                stats: self.stats.clone(),
                carry: VecDeque::new(),
            };
            let handle = loops.spawn(job_loop.run(stop.clone()));
            names.insert(handle.id(), name);
        }
        tracing::info!(models = ?names.values().collect::<Vec<_>>(), "model worker started");

        let mut panicked = None;
        while let Some(joined) = loops.join_next_with_id().await {
            if let Err(error) = joined {
                let model = names.get(&error.id()).copied().unwrap_or("?").to_string();
                tracing::error!(model, %error, "model job loop panicked; stopping the worker");
                stop.cancel();
                panicked.get_or_insert(WorkerError::LoopPanicked {
                    model,
                    reason: error.to_string(),
                });
            }
        }
        // Partials and acks are buffered in the client; get them onto the wire before the caller
        // drops the connection.
        match tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "flushing the last acks failed"),
            Err(_) => tracing::warn!("flushing the last acks timed out"),
        }
        let report = self.stats.report();
        tracing::info!(?report, "model worker stopped");
        match panicked {
            Some(error) => Err(error),
            None => Ok(report),
        }
    }
}

/// A delivered, decoded job waiting for or in a batch.
struct Pending {
    message: Message,
    job: ModelJob,
    /// [`estimate_tokens`] summed over the job's inputs.
    tokens: usize,
}

impl Pending {
    /// Jobs batch together only when the model would run them with the same options.
    fn same_options(&self, other: &Pending) -> bool {
        self.job.truncate == other.job.truncate && self.job.instruction == other.job.instruction
    }

    /// Deliveries so far, this one included (1 when the ack subject cannot be parsed).
    fn delivered(&self) -> i64 {
        self.message.info().map(|info| info.delivered).unwrap_or(1)
    }

    /// Jobs the consumer still had queued when this one was delivered (1 when unknown, so an
    /// unparsable ack subject errs towards gathering).
    fn queued_behind(&self) -> u64 {
        self.message.info().map_or(1, |info| info.pending)
    }

    fn expired(&self) -> bool {
        self.job.deadline_unix_ms <= job::unix_ms_now()
    }
}

/// A forward batch being formed.
#[derive(Default)]
struct Batch {
    jobs: Vec<Pending>,
    inputs: usize,
    tokens: usize,
    /// A compatible job did not fit: stop gathering.
    full: bool,
}

impl Batch {
    /// Takes `pending` if it may join; hands it back otherwise.
    fn offer(&mut self, pending: Pending, limits: &BatchConfig) -> Option<Pending> {
        if let Some(first) = self.jobs.first() {
            if !first.same_options(&pending) {
                return Some(pending);
            }
        }
        let empty = self.jobs.is_empty();
        let (inputs, tokens) = (pending.job.inputs.len(), pending.tokens);
        if !fits(self.inputs, self.tokens, inputs, tokens, empty, limits) {
            self.full = true;
            return Some(pending);
        }
        self.inputs += inputs;
        self.tokens += tokens;
        self.jobs.push(pending);
        None
    }
}

/// Whether a job of `inputs`/`tokens` may join a batch holding `batch_inputs`/`batch_tokens`.
/// The first job of a batch always may, however big: it then runs alone rather than never.
fn fits(
    batch_inputs: usize,
    batch_tokens: usize,
    inputs: usize,
    tokens: usize,
    batch_empty: bool,
    limits: &BatchConfig,
) -> bool {
    batch_empty
        || (batch_inputs + inputs <= limits.max_inputs
            && batch_tokens + tokens <= limits.token_budget)
}

/// Estimated tokens of one input, for the batch budget only: the model counts exact tokens and
/// splits its own forward passes. Text and code take about 3 bytes per token in the WordPiece and
/// BPE vocabularies here, plus the special tokens; when truncating, no input costs more than the
/// model's `max_seq_len`, since that is all it reads. A media input costs a full sequence.
pub fn estimate_tokens(input: &Input, max_seq_len: usize, truncate: bool) -> usize {
    let estimate = match input.text() {
        Some(text) => text.len() / 3 + SPECIAL_TOKENS,
        None => max_seq_len,
    };
    if truncate {
        estimate.min(max_seq_len)
    } else {
        estimate
    }
}

/// The job (position in `jobs`) and input within it that batch input `index` belongs to.
fn locate(input_counts: impl IntoIterator<Item = usize>, index: usize) -> Option<(usize, usize)> {
    let mut start = 0;
    for (job, count) in input_counts.into_iter().enumerate() {
        if index < start + count {
            return Some((job, index - start));
        }
        start += count;
    }
    None
}

/// The batch index a permanent error blames, when it names one.
fn blamed_input(error: &ModelError) -> Option<usize> {
    match error {
        ModelError::EmptyInput { index } | ModelError::InputTooLong { index, .. } => Some(*index),
        _ => None,
    }
}

/// `error`'s message with the batch index replaced by the index within the job, which is what
/// the request's author can act on.
fn message_for_job(error: &ModelError, input: usize) -> String {
    match error {
        ModelError::EmptyInput { .. } => ModelError::EmptyInput { index: input }.to_string(),
        ModelError::InputTooLong {
            model, tokens, max, ..
        } => ModelError::InputTooLong {
            model: model.clone(),
            index: input,
            tokens: *tokens,
            max: *max,
        }
        .to_string(),
        other => other.to_string(),
    }
}

/// Redelivery delay after the `delivered`-th delivery failed.
fn nak_delay(delivered: i64) -> Duration {
    let step = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    NAK_DELAY_STEP.saturating_mul(step).min(NAK_DELAY_MAX)
}

/// Why a model call gave no vectors.
enum EmbedFailure {
    Model(ModelError),
    /// The call panicked or broke the trait's contract: treated as transient, so a model that
    /// always does it ends as poison after `max_deliver` tries.
    Broken(String),
}

/// What a job is answered with, which also decides how its message is settled and counted.
enum Answer {
    Vectors(Vec<PartialVector>),
    /// Permanent: acked.
    Failed(JobFailure),
    /// Given up after the last delivery: terminated.
    Poison(JobFailure),
}

/// One hosted model's job loop; see the module docs.
struct ModelLoop {
    model: Arc<dyn EmbeddingModel>,
    client: async_nats::Client,
    js: jetstream::Context,
    config: Arc<WorkerConfig>,
    stats: Arc<WorkerStats>,
    /// Jobs delivered to this worker but left out of the last batch (other options, or no
    /// room), oldest first. Bounded: gathering never holds more than `max_inputs` messages.
    carry: VecDeque<Pending>,
}

impl ModelLoop {
    fn name(&self) -> &'static str {
        self.model.spec().name
    }

    fn max_inputs(&self) -> usize {
        self.config.batch.max_inputs.max(1)
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            let Some(consumer) = self.bind(&shutdown, &mut backoff).await else {
                break;
            };
            match self.serve(&consumer, &shutdown, &mut backoff).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(model = self.name(), %error, "pulling jobs failed; binding the consumer again");
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                }
            }
        }
        self.release_carry().await;
        tracing::info!(model = self.name(), "job loop stopped");
    }

    /// Declares the stream and this model's consumer, retrying with back-off until it works or
    /// shutdown. `None` on shutdown.
    async fn bind(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<PullConsumer> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let bound = async {
                let stream = ensure_job_stream(&self.js, &self.config.queues).await?;
                ensure_model_consumer(&stream, self.name(), &self.config.queues).await
            };
            match bound.await {
                Ok(consumer) => return Some(consumer),
                Err(error) => {
                    tracing::warn!(model = self.name(), %error, "cannot bind the job consumer; retrying");
                    if !backoff.sleep(shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits, gathers, runs and answers batches until shutdown (`Ok`) or a pull error (`Err`).
    async fn serve(
        &mut self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), async_nats::Error> {
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if self.carry.is_empty() {
                let first = pull(consumer, 1, Some(IDLE_PULL_EXPIRES)).await?;
                backoff.reset();
                for message in first {
                    if let Some(pending) = self.admit(message).await {
                        self.carry.push_back(pending);
                    }
                }
                continue;
            }
            let batch = self.gather(consumer).await;
            self.run_batch(batch).await;
        }
    }

    /// Forms the next batch: compatible jobs from the carry-over first, then whatever arrives
    /// within `max_wait`, within the input and token limits.
    async fn gather(&mut self, consumer: &PullConsumer) -> Vec<Pending> {
        let limits = self.config.batch.clone();
        let mut batch = Batch::default();
        let mut left = VecDeque::with_capacity(self.carry.len());
        while let Some(pending) = self.carry.pop_front() {
            if pending.expired() {
                self.skip_expired(&pending).await;
            } else if batch.full {
                left.push_back(pending);
            } else if let Some(pending) = batch.offer(pending, &limits) {
                left.push_back(pending);
            }
        }
        self.carry = left;

        let deadline = Instant::now() + limits.max_wait;
        let mut pulled_once = false;
        // Waiting for company that is not queued would charge every lightly loaded request the
        // whole `max_wait` (measured: ~5 ms at batch 1, more than the nominal 2 ms, as each
        // short pull is a round trip). So the worker gathers only while the queue says more jobs
        // are waiting behind the newest one; under load they are, and batches fill at once.
        let mut queued_behind = batch.jobs.last().map_or(1, Pending::queued_behind);
        while !batch.full && queued_behind > 0 {
            let held = batch.jobs.len() + self.carry.len();
            let room = self
                .max_inputs()
                .saturating_sub(batch.inputs)
                .min(self.max_inputs().saturating_sub(held));
            let wait = deadline.saturating_duration_since(Instant::now());
            let expires = if limits.max_wait.is_zero() {
                // No waiting: one look at what is queued right now.
                None
            } else {
                Some(wait)
            };
            if room == 0
                || (expires.is_none() && pulled_once)
                || expires.is_some_and(|wait| wait < MIN_GATHER_PULL)
            {
                break;
            }
            pulled_once = true;
            let messages = match pull(consumer, room, expires).await {
                Ok(messages) => messages,
                Err(error) => {
                    // The next idle pull meets the error again if it lasts, and rebinds.
                    tracing::debug!(model = self.name(), %error, "gather pull failed");
                    break;
                }
            };
            queued_behind = messages
                .last()
                .and_then(|message| message.info().ok())
                .map_or(0, |info| info.pending);
            for message in messages {
                if let Some(pending) = self.admit(message).await {
                    if let Some(pending) = batch.offer(pending, &limits) {
                        self.carry.push_back(pending);
                    }
                }
            }
            if batch.jobs.is_empty() {
                // Everything gathered so far was expired or answered at admission.
                break;
            }
        }
        batch.jobs
    }

    /// Decodes a delivered message into a job, or settles it at once: undecodable (term),
    /// expired (ack, not run), or with an input the model does not take (answered).
    async fn admit(&self, message: Message) -> Option<Pending> {
        let job: ModelJob = match job::decode(&message.payload) {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(model = self.name(), subject = %message.subject, %error,
                    "undecodable job; terminating it (no reply subject to answer on)");
                bump(&self.stats.undecodable);
                settle(&message, AckKind::Term).await;
                return None;
            }
        };
        let spec = self.model.spec();
        let tokens = job
            .inputs
            .iter()
            .map(|input| estimate_tokens(input, spec.max_seq_len, job.truncate))
            .sum();
        let pending = Pending {
            message,
            job,
            tokens,
        };
        if pending.expired() {
            self.skip_expired(&pending).await;
            return None;
        }
        let refused = pending
            .job
            .inputs
            .iter()
            .position(|input| !spec.takes(input.modality()));
        if let Some(index) = refused {
            let error = ModelError::UnsupportedModality {
                model: spec.name.to_string(),
                modality: pending.job.inputs[index].modality(),
            };
            let failure = job_failure(&error, Some(index));
            self.reply(&pending, Answer::Failed(failure)).await;
            return None;
        }
        Some(pending)
    }

    async fn skip_expired(&self, pending: &Pending) {
        tracing::debug!(
            model = self.name(),
            job_id = pending.job.job_id,
            "deadline passed; skipping job"
        );
        bump(&self.stats.expired_skipped);
        settle(&pending.message, AckKind::Ack).await;
    }

    /// Runs a batch and answers every job in it. A permanent error blamed on one input answers
    /// that job and re-runs the others without it; one that names no input isolates the jobs.
    async fn run_batch(&self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        bump(&self.stats.batches);
        let mut groups = VecDeque::from([batch]);
        while let Some(mut jobs) = groups.pop_front() {
            match self.embed(&jobs).await {
                Ok(embeddings) => self.answer_vectors(jobs, embeddings).await,
                Err(EmbedFailure::Model(error)) if error.is_permanent_for_input() => {
                    let counts = jobs.iter().map(|p| p.job.inputs.len());
                    match blamed_input(&error).and_then(|index| locate(counts, index)) {
                        Some((culprit, input)) => {
                            let bad = jobs.remove(culprit);
                            self.reply(&bad, Answer::Failed(job_failure(&error, Some(input))))
                                .await;
                            if !jobs.is_empty() {
                                groups.push_front(jobs);
                            }
                        }
                        None if jobs.len() == 1 => {
                            self.reply(&jobs[0], Answer::Failed(job_failure(&error, None)))
                                .await;
                        }
                        // No index to blame: run each job alone to find the bad one.
                        None => groups.extend(jobs.into_iter().map(|job| vec![job])),
                    }
                }
                Err(failure) => {
                    let reason = match failure {
                        EmbedFailure::Model(error) => error.to_string(),
                        EmbedFailure::Broken(reason) => reason,
                    };
                    for pending in &jobs {
                        self.retry_or_give_up(pending, &reason).await;
                    }
                }
            }
        }
    }

    /// One `embed_batch` call over all the jobs' inputs, on a blocking thread, with in-progress
    /// acks while it runs. Raw vectors (`normalize: false`): the coordinator normalises.
    async fn embed(&self, jobs: &[Pending]) -> Result<Vec<ModelEmbedding>, EmbedFailure> {
        let Some(first) = jobs.first() else {
            return Ok(Vec::new());
        };
        // A copy, because the blocking thread needs owned inputs while the jobs stay here to be
        // answered; text is small next to a forward pass.
        let inputs: Vec<Input> = jobs
            .iter()
            .flat_map(|p| p.job.inputs.iter().cloned())
            .collect();
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let expected = inputs.len();
        let options = EmbedOptions {
            truncate: first.job.truncate,
            normalize: false,
            instruction: first.job.instruction.clone(),
        };
        let model = self.model.clone();
        let call = tokio::task::spawn_blocking(move || model.embed_batch(&inputs, &options));
        match self.keep_alive(jobs, call).await {
            Ok(Ok(embeddings)) if embeddings.len() == expected => Ok(embeddings),
            Ok(Ok(embeddings)) => Err(EmbedFailure::Broken(format!(
                "model returned {} vectors for {expected} inputs",
                embeddings.len()
            ))),
            Ok(Err(error)) => Err(EmbedFailure::Model(error)),
            Err(join) => Err(EmbedFailure::Broken(format!("model call panicked: {join}"))),
        }
    }

    /// Awaits `work`, sending an in-progress ack for each held message (the batch and the
    /// carry-over) every `ack_wait / 3`, so JetStream does not redeliver them meanwhile.
    async fn keep_alive<F: Future>(&self, jobs: &[Pending], work: F) -> F::Output {
        let period = (self.config.queues.ack_wait / 3).max(MIN_PROGRESS_PERIOD);
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return output,
                _ = ticks.tick() => {
                    for pending in jobs.iter().chain(&self.carry) {
                        if let Err(error) = pending.message.ack_with(AckKind::Progress).await {
                            tracing::debug!(model = self.name(), %error, "in-progress ack failed");
                        }
                    }
                }
            }
        }
    }

    /// Hands each job its slice of the batch's vectors.
    async fn answer_vectors(&self, jobs: Vec<Pending>, embeddings: Vec<ModelEmbedding>) {
        let mut embeddings = embeddings.into_iter();
        for pending in &jobs {
            let vectors = embeddings
                .by_ref()
                .take(pending.job.inputs.len())
                .map(|e| PartialVector {
                    vector: e.vector,
                    tokens: u32::try_from(e.tokens).unwrap_or(u32::MAX),
                })
                .collect();
            self.reply(pending, Answer::Vectors(vectors)).await;
        }
    }

    /// After a transient failure: nak for redelivery, or on the last delivery answer with
    /// `internal` and terminate, so a poison job cannot loop.
    async fn retry_or_give_up(&self, pending: &Pending, reason: &str) {
        let delivered = pending.delivered();
        let max_deliver = self.config.queues.max_deliver;
        if max_deliver > 0 && delivered >= max_deliver {
            tracing::error!(
                model = self.name(),
                job_id = pending.job.job_id,
                delivered,
                reason,
                "job failed on its last delivery; terminating it"
            );
            let failure = JobFailure {
                kind: ErrorKind::Internal,
                message: format!(
                    "`{}` failed on all {delivered} deliveries: {reason}",
                    self.name()
                ),
                input: None,
            };
            self.reply(pending, Answer::Poison(failure)).await;
        } else {
            tracing::warn!(
                model = self.name(),
                job_id = pending.job.job_id,
                delivered,
                reason,
                "batch failed; job will be redelivered"
            );
            bump(&self.stats.retries);
            settle(&pending.message, AckKind::Nak(Some(nak_delay(delivered)))).await;
        }
    }

    /// Publishes the job's partial on its `reply_to`, then settles the message. A partial over
    /// the server's max payload becomes a `Failed` one (the request could never get it); a
    /// publish that did not go out leaves the job to be redelivered.
    async fn reply(&self, pending: &Pending, answer: Answer) {
        let mut answer = answer;
        loop {
            let (outcome, counter, settle_with) = match answer {
                Answer::Vectors(vectors) => (
                    PartialOutcome::Vectors(vectors),
                    &self.stats.jobs_done,
                    AckKind::Ack,
                ),
                Answer::Failed(failure) => (
                    PartialOutcome::Failed(failure),
                    &self.stats.jobs_failed,
                    AckKind::Ack,
                ),
                Answer::Poison(failure) => (
                    PartialOutcome::Failed(failure),
                    &self.stats.poison_terminated,
                    AckKind::Term,
                ),
            };
            let partial = PartialResult {
                job_id: pending.job.job_id,
                model: self.name().to_string(),
                revision: self.model.revision().to_string(),
                outcome,
            };
            let payload = job::encode(&partial);
            let size = payload.len();
            let published = self
                .client
                .publish(pending.job.reply_to.clone(), payload.into())
                .await;
            let error = match published {
                Ok(()) => {
                    bump(counter);
                    settle(&pending.message, settle_with).await;
                    return;
                }
                Err(error) => error,
            };
            match error.kind() {
                PublishErrorKind::MaxPayloadExceeded
                    if matches!(partial.outcome, PartialOutcome::Vectors(_)) =>
                {
                    answer = Answer::Failed(JobFailure {
                        kind: ErrorKind::Internal,
                        message: format!(
                            "the partial of job {} is {size} bytes, over the NATS max payload",
                            pending.job.job_id
                        ),
                        input: None,
                    });
                }
                PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject => {
                    tracing::warn!(model = self.name(), job_id = pending.job.job_id,
                        reply_to = %pending.job.reply_to, %error, "cannot answer job; terminating it");
                    bump(&self.stats.jobs_failed);
                    settle(&pending.message, AckKind::Term).await;
                    return;
                }
                PublishErrorKind::Send => {
                    tracing::warn!(model = self.name(), job_id = pending.job.job_id, %error,
                        "publishing the partial failed; the job will be redelivered");
                    return;
                }
            }
        }
    }

    /// At shutdown: jobs held for a later batch go back at once, for another worker.
    async fn release_carry(&mut self) {
        for pending in self.carry.drain(..) {
            settle(&pending.message, AckKind::Nak(None)).await;
        }
    }
}

/// The wire failure of a permanent model error, with the input index within the job.
fn job_failure(error: &ModelError, input: Option<usize>) -> JobFailure {
    JobFailure {
        kind: error.kind(),
        message: input.map_or_else(|| error.to_string(), |i| message_for_job(error, i)),
        input,
    }
}

/// Acks, naks or terminates; a failure only costs a redelivery later, so it is logged, not fatal.
async fn settle(message: &Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(subject = %message.subject, ?kind, %error, "settling a job failed; it will be redelivered");
    }
}

/// One pull request for up to `max` messages: waiting up to `expires`, or (`None`) taking only
/// what is queued now. The request is always read to its end, never dropped half-way, so no
/// message is delivered to an inbox nobody reads. Messages that arrived before an error are kept.
async fn pull(
    consumer: &PullConsumer,
    max: usize,
    expires: Option<Duration>,
) -> Result<Vec<Message>, async_nats::Error> {
    let mut batch = match expires {
        Some(expires) => {
            consumer
                .batch()
                .max_messages(max)
                .expires(expires)
                .messages()
                .await?
        }
        None => consumer.fetch().max_messages(max).messages().await?,
    };
    let mut messages = Vec::new();
    while let Some(next) = batch.next().await {
        match next {
            Ok(message) => messages.push(message),
            Err(error) if messages.is_empty() => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "pull ended early");
                break;
            }
        }
    }
    Ok(messages)
}

/// Exponential back-off between attempts to bind the consumer, cut short by shutdown.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: REBIND_BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = REBIND_BACKOFF_FIRST;
    }

    /// Sleeps the current delay and doubles it; false when shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(REBIND_BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_is_capped_only_when_truncating() {
        let long = Input::Text("x".repeat(3000));
        assert_eq!(estimate_tokens(&long, 256, true), 256);
        assert_eq!(estimate_tokens(&long, 256, false), 1002);
        assert_eq!(estimate_tokens(&Input::Text("abcdef".into()), 256, true), 4);
        let image = Input::Image {
            bytes: vec![0; 10],
            format: None,
        };
        assert_eq!(estimate_tokens(&image, 77, true), 77);
    }

    #[test]
    fn batch_indices_map_onto_jobs() {
        let counts = [2, 0, 3];
        assert_eq!(locate(counts, 0), Some((0, 0)));
        assert_eq!(locate(counts, 1), Some((0, 1)));
        assert_eq!(locate(counts, 2), Some((2, 0)));
        assert_eq!(locate(counts, 4), Some((2, 2)));
        assert_eq!(locate(counts, 5), None);
    }

    #[test]
    fn a_job_over_the_budget_still_runs_alone() {
        let limits = BatchConfig {
            max_inputs: 4,
            token_budget: 100,
            max_wait: Duration::ZERO,
        };
        assert!(fits(0, 0, 10, 1000, true, &limits));
        assert!(!fits(1, 10, 1, 91, false, &limits));
        assert!(fits(1, 10, 1, 90, false, &limits));
        assert!(!fits(3, 10, 2, 10, false, &limits));
    }

    #[test]
    fn failures_name_the_input_within_the_job() {
        let error = ModelError::InputTooLong {
            model: "minilm".into(),
            index: 7,
            tokens: 300,
            max: 256,
        };
        let failure = job_failure(&error, Some(1));
        assert_eq!(failure.kind, ErrorKind::InputTooLong);
        assert_eq!(failure.input, Some(1));
        assert!(
            failure.message.starts_with("input 1 is 300 tokens"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn nak_delay_grows_and_is_capped() {
        assert_eq!(nak_delay(1), Duration::from_millis(250));
        assert_eq!(nak_delay(2), Duration::from_millis(500));
        assert_eq!(nak_delay(100), NAK_DELAY_MAX);
    }
}
