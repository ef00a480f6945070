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
//!    next batch; the batch being formed and the carry-over together never hold more than
//!    `max_inputs` messages. A job bigger than the whole budget runs as a batch of its own
//!    (`batch`).
//! 3. **Run** the batch on a task of its own (the model call on a blocking thread), sending
//!    in-progress acks for its messages each `ack_wait / 3` so that a long batch is not
//!    redelivered elsewhere. Up to `batches_in_flight` batches run at once; the loop goes back to
//!    step 1 as soon as a slot is free, so the next batch forms while the last is in the model,
//!    and it pulls nothing while every slot is taken (the carry-over gets in-progress acks
//!    meanwhile). A worker therefore holds at most `batches_in_flight + 1` batches' worth of
//!    messages per model.
//! 4. **Answer** (`runner`): publish each job's partial on its `reply_to`, then ack it, on the
//!    same connection, so the ack can never overtake the partial (at-least-once: a worker killed
//!    in between leaves the job to be redelivered; duplicate partials are harmless).
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
//! Hot swap (`hot_swap`): with a [`ModelLoader`] ([`ModelWorker::with_hot_swap`]) the worker also
//! answers swap commands on `embedfleet.admin.swap.<model>`, replacing a model's weights while it
//! serves. Each model's copy sits in a slot; a batch takes the copy once, when it starts, so it
//! runs and labels its partials with one revision, and batches already running finish on the old
//! weights.
//!
//! NATS errors never end the role: async-nats reconnects by itself, and a failed pull makes the
//! loop declare the stream and consumer again, with back-off. Cancelling `shutdown` stops the
//! pulling; jobs held for later batches are nakked without delay for another worker, the
//! running batches finish and are answered, and the client is flushed before `run` returns. An idle
//! loop notices shutdown when its pull request ends: within about a second, or up to six while
//! the server is unreachable (async-nats then ends the request on its own timer).

mod batch;
mod hot_swap;
mod runner;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use embedfleet_models::{EmbeddingModel, ModelError};

use crate::config::{BatchConfig, QueueConfig};
use crate::job::{self, ModelJob};
use crate::queues::{ensure_job_stream, ensure_model_consumer};
use crate::{revisions, trace_context};
pub use batch::estimate_tokens;
use batch::{Batch, Pending};
use hot_swap::{serve_swap_commands, subscribe_swap_commands, ModelSlot};
pub use hot_swap::{
    swap_subject, warm_up, HotSwap, ModelLoader, SwapErrorCode, SwapReply, SwapRequest,
    SWAP_SUBJECT_PREFIX,
};
use runner::{job_failure, progress_ticks, send_progress, settle, Answer, BatchRunner};

/// How long an idle pull request waits for a job. Short, because shutdown waits for the pull in
/// flight (dropping it could strand a job delivered to it until `ack_wait` runs out).
const IDLE_PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Shorter gather windows than this are not worth a pull request.
const MIN_GATHER_PULL: Duration = Duration::from_millis(1);
/// Back-off between attempts to bind the consumer after a NATS error.
const REBIND_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const REBIND_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last partials and acks to reach the server.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
    bad_reply_to: AtomicU64,
    batches_abandoned: AtomicU64,
    /// Model calls past `hung_after` that have not returned yet (a gauge).
    hung_calls: AtomicU64,
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
    /// Jobs terminated because their `reply_to` is not a partial subject.
    pub bad_reply_to: u64,
    /// Batches abandoned by the watchdog (their jobs nakked for another worker).
    pub batches_abandoned: u64,
    /// Model calls stuck past `hung_after` right now; the worker is not ready while any is.
    pub hung_calls: u64,
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
            bad_reply_to: read(&self.bad_reply_to),
            batches_abandoned: read(&self.batches_abandoned),
            hung_calls: read(&self.hung_calls),
        }
    }

    /// Ready to take jobs: no model call is stuck past the watchdog's limit. A readiness probe
    /// reads this; a worker that stays unready should be restarted (its stuck thread cannot
    /// be killed from inside the process).
    pub fn is_ready(&self) -> bool {
        self.hung_calls.load(Ordering::Relaxed) == 0
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
    /// Each hosted model's slot, in the order given; shared with `swaps`.
    slots: Vec<Arc<ModelSlot>>,
    swaps: HotSwap,
    answer_swap_commands: bool,
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
        let slots: Vec<Arc<ModelSlot>> = models
            .into_iter()
            .map(|model| Arc::new(ModelSlot::new(model)))
            .collect();
        let by_name = slots
            .iter()
            .map(|slot| (slot.current().spec().name, slot.clone()))
            .collect();
        Ok(ModelWorker {
            swaps: HotSwap::new(by_name, None, client.clone()),
            answer_swap_commands: false,
            client,
            slots,
            config,
            stats: Arc::default(),
        })
    }

    /// Lets the worker swap its models' weights while serving, loading new copies with
    /// `loader`, through [`ModelWorker::hot_swap`] and, when `answer_commands`, on swap commands
    /// (`embedfleet.admin.swap.<model>`; see `hot_swap`).
    pub fn with_hot_swap(mut self, loader: ModelLoader, answer_commands: bool) -> Self {
        let by_name = self
            .slots
            .iter()
            .map(|slot| (slot.current().spec().name, slot.clone()))
            .collect();
        self.swaps = HotSwap::new(by_name, Some(loader), self.client.clone());
        self.answer_swap_commands = answer_commands;
        self
    }

    /// The worker's swaps, for a caller that swaps without NATS (`SIGHUP`).
    pub fn hot_swap(&self) -> HotSwap {
        self.swaps.clone()
    }

    /// The live counters, readable while [`ModelWorker::run`] runs.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Serves every model until `shutdown` is cancelled, then returns the final counts.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport, WorkerError> {
        let config = Arc::new(self.config);
        // A child token, so that a panicking loop can stop its siblings without touching the
        // caller's token.
        let stop = shutdown.child_token();
        let swap_subscriptions = match self.answer_swap_commands {
            true => Some(subscribe_swap_commands(&self.client, &self.swaps).await),
            false => None,
        };
        let mut loops = JoinSet::new();
        let mut names = HashMap::new();
        for slot in self.slots {
            let name = slot.current().spec().name;
            let job_loop = ModelLoop::new(
                slot,
                self.client.clone(),
                config.clone(),
                self.stats.clone(),
            );
            let handle = loops.spawn(job_loop.run(stop.clone()));
            names.insert(handle.id(), name);
        }
        tracing::info!(models = ?names.values().collect::<Vec<_>>(), "model worker started");
        // Swap commands stop with the loops; a swap still loading then is abandoned.
        let swap_commands = swap_subscriptions.map(|subscriptions| {
            tokio::spawn(serve_swap_commands(
                self.client.clone(),
                self.swaps.clone(),
                subscriptions,
                stop.clone(),
            ))
        });

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
        stop.cancel();
        if let Some(swap_commands) = swap_commands {
            if let Err(error) = swap_commands.await {
                tracing::error!(%error, "the swap command task failed");
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

/// One hosted model's job loop; see the module docs.
struct ModelLoop {
    /// The model's copy serving now (replaced by a hot swap); each batch takes it once.
    slot: Arc<ModelSlot>,
    /// `runner.model` is taken from `slot` afresh before each pull and each batch.
    runner: BatchRunner,
    js: jetstream::Context,
    /// Jobs delivered to this worker but left out of the last batch (other options, or no
    /// room), oldest first. Bounded: gathering never holds more than `max_inputs` messages.
    carry: VecDeque<Pending>,
    /// The batches running now, at most `batches_in_flight`.
    running: JoinSet<()>,
}

impl ModelLoop {
    fn new(
        slot: Arc<ModelSlot>,
        client: async_nats::Client,
        config: Arc<WorkerConfig>,
        stats: Arc<WorkerStats>,
    ) -> Self {
        ModelLoop {
            js: jetstream::new(client.clone()),
            runner: BatchRunner {
                model: slot.current(),
                client,
                config,
                stats,
                hung: Arc::default(),
            },
            carry: VecDeque::new(),
            running: JoinSet::new(),
            slot,
        }
    }

    fn name(&self) -> &'static str {
        self.runner.model.spec().name
    }

    fn config(&self) -> &WorkerConfig {
        &self.runner.config
    }

    fn max_inputs(&self) -> usize {
        self.config().batch.max_inputs.max(1)
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
        // Jobs held for later go back first, so another worker can start on them while the
        // running batches finish here.
        self.release_carry().await;
        while let Some(joined) = self.running.join_next().await {
            resume_panic(joined);
        }
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
                let stream = ensure_job_stream(&self.js, &self.config().queues).await?;
                ensure_model_consumer(&stream, self.name(), &self.config().queues).await
            };
            match bound.await {
                Ok(consumer) => {
                    let serving = self.slot.current();
                    let announcement = revisions::Announcement {
                        revision: serving.revision().to_string(),
                        dim: Some(serving.dim()),
                    };
                    if let Err(error) =
                        revisions::announce(&self.js, self.name(), &announcement).await
                    {
                        // Partials still carry the revision; only cache-only traffic misses it.
                        tracing::warn!(model = self.name(), %error, "cannot announce the model revision");
                    }
                    return Some(consumer);
                }
                Err(error) => {
                    tracing::warn!(model = self.name(), %error, "cannot bind the job consumer; retrying");
                    if !backoff.sleep(shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits, gathers and starts batches until shutdown (`Ok`) or a pull error (`Err`). Up to
    /// `batches_in_flight` run at once, each on its own task, so the next batch is gathered (and
    /// its inputs tokenised) while the last one is in the model.
    async fn serve(
        &mut self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), async_nats::Error> {
        loop {
            // A free slot first: a job is pulled only when it can start at once.
            if !self.wait_for_slot(shutdown).await {
                return Ok(());
            }
            // Let go of a copy a hot swap replaced, even while idle (within a pull's expiry), so
            // that only running batches keep old weights alive.
            self.runner.model = self.slot.current();
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
            if !batch.is_empty() {
                // The batch's one copy of the model, for its forward pass and its partials'
                // revision; a swap from now on changes later batches only.
                self.runner.model = self.slot.current();
                let runner = self.runner.clone();
                self.running.spawn(async move { runner.run(batch).await });
            }
        }
    }

    /// Waits until fewer than `batches_in_flight` batches run, sending the carry-over its
    /// in-progress acks meanwhile. False when shutdown came first.
    async fn wait_for_slot(&mut self, shutdown: &CancellationToken) -> bool {
        while let Some(joined) = self.running.try_join_next() {
            resume_panic(joined);
        }
        let slots = self.config().batch.batches_in_flight.max(1);
        let mut ticks = progress_ticks(&self.config().queues);
        // A model call stuck past the watchdog's limit: take nothing more for this model until
        // it returns (its jobs already went back for other workers), and give back what is
        // held, since nothing here will run it soon.
        if self.runner.is_hung() {
            self.release_carry().await;
        }
        while self.running.len() >= slots || self.runner.is_hung() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                Some(joined) = self.running.join_next() => resume_panic(joined),
                _ = ticks.tick() => send_progress(&self.carry).await,
            }
        }
        !shutdown.is_cancelled()
    }

    /// Forms the next batch: compatible jobs from the carry-over first, then whatever arrives
    /// within `max_wait`, within the input and token limits.
    async fn gather(&mut self, consumer: &PullConsumer) -> Vec<Pending> {
        let limits = self.config().batch.clone();
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
        crate::metrics::global().job_delivered(self.name(), &message);
        let job: ModelJob = match job::decode(&message.payload) {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(model = self.name(), subject = %message.subject, %error,
                    "undecodable job; terminating it (no reply subject to answer on)");
                bump(&self.runner.stats.undecodable);
                settle(&message, AckKind::Term).await;
                return None;
            }
        };
        if !job::is_partial_subject(&job.reply_to) {
            tracing::warn!(model = self.name(), job_id = job.job_id, reply_to = %job.reply_to,
                "job names a reply subject outside the fleet's partial subjects; terminating it");
            bump(&self.runner.stats.bad_reply_to);
            settle(&message, AckKind::Term).await;
            return None;
        }
        let spec = self.runner.model.spec();
        let tokens = job
            .inputs
            .iter()
            .map(|input| estimate_tokens(input, spec.max_seq_len, job.truncate))
            .sum();
        let trace = trace_context::extract(message.headers.as_ref());
        record_queue_wait(self.name(), &message, &trace);
        let pending = Pending {
            message,
            job,
            tokens,
            trace,
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
            self.runner.reply(&pending, Answer::Failed(failure)).await;
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
        bump(&self.runner.stats.expired_skipped);
        settle(&pending.message, AckKind::Ack).await;
    }

    /// At shutdown: jobs held for a later batch go back at once, for another worker.
    async fn release_carry(&mut self) {
        for pending in self.carry.drain(..) {
            settle(&pending.message, AckKind::Nak(None)).await;
        }
    }
}

/// The job's wait in the JetStream queue as a span of the job's trace: from the server's
/// publish timestamp to its delivery here (a clock behind the server's shows it as zero).
fn record_queue_wait(model: &'static str, message: &Message, trace: &opentelemetry::Context) {
    let Ok(info) = message.info() else { return };
    let published = std::time::SystemTime::from(info.published);
    trace_context::record_finished_span(
        "queue.wait",
        trace,
        published,
        std::time::SystemTime::now(),
        vec![
            opentelemetry::KeyValue::new("model", model),
            opentelemetry::KeyValue::new("delivered", info.delivered),
        ],
    );
}

/// Re-raises a batch task's panic in the model's loop, where the worker reports it.
fn resume_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
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
