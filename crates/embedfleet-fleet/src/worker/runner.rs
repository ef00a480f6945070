//! Running a formed batch through the model and answering each of its jobs: the partial on the
//! job's `reply_to` first, then the ack (see the outcome table in the worker's module docs).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use async_nats::PublishErrorKind;
use tokio::time::{Instant, Interval};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use embedfleet_models::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelError};
use embedfleet_proto::{ErrorKind, Input};

use super::batch::{locate, Pending};
use super::{bump, WorkerConfig, WorkerStats};
use crate::config::QueueConfig;
use crate::job::{self, JobFailure, PartialOutcome, PartialResult, PartialVector};
use crate::trace_context;

/// Redelivery delay after a transient failure: this much per delivery so far, up to the maximum.
const NAK_DELAY_STEP: Duration = Duration::from_millis(250);
const NAK_DELAY_MAX: Duration = Duration::from_secs(1);
/// Floor of the in-progress ack period, for tiny test `ack_wait`s.
const MIN_PROGRESS_PERIOD: Duration = Duration::from_millis(10);

/// What a batch needs to run and be answered; cheap to clone into each batch's task.
#[derive(Clone)]
pub(super) struct BatchRunner {
    pub(super) model: Arc<dyn EmbeddingModel>,
    pub(super) client: async_nats::Client,
    pub(super) config: Arc<WorkerConfig>,
    pub(super) stats: Arc<WorkerStats>,
    /// This model's calls stuck past `hung_after` (shared by the model's batches).
    pub(super) hung: Arc<AtomicUsize>,
}

impl BatchRunner {
    fn name(&self) -> &'static str {
        self.model.spec().name
    }

    /// Whether a call of this model is stuck past the watchdog's limit.
    pub(super) fn is_hung(&self) -> bool {
        self.hung.load(Ordering::Relaxed) > 0
    }

    /// Runs a batch and answers every job in it. A permanent error blamed on one input answers
    /// that job and re-runs the others without it; one that names no input isolates the jobs.
    pub(super) async fn run(&self, batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        // One batch serves many requests, so its span has no one parent: it starts a trace of
        // its own and links to the span of every job in it (the coordinator's `job` spans).
        let span = tracing::info_span!(
            "batch",
            otel.kind = "consumer",
            model = self.name(),
            jobs = batch.len(),
            inputs = batch.iter().map(|p| p.job.inputs.len()).sum::<usize>()
        );
        for pending in &batch {
            if let Some(job_span) = trace_context::span_context_of(&pending.trace) {
                span.add_link(job_span);
            }
        }
        self.run_batch(batch).instrument(span).await
    }

    async fn run_batch(&self, batch: Vec<Pending>) {
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
                Err(EmbedFailure::Hung(call)) => self.abandon(jobs, call).await,
                Err(failure) => {
                    let reason = match failure {
                        EmbedFailure::Model(error) => error.to_string(),
                        EmbedFailure::Broken(reason) => reason,
                        EmbedFailure::Hung(_) => unreachable!("handled above"),
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
        let tokens = jobs.iter().map(|p| p.tokens).sum();
        let _timer = crate::metrics::global().batch_timer(self.name(), expected, tokens);
        let options = EmbedOptions {
            truncate: first.job.truncate,
            normalize: false,
            instruction: first.job.instruction.clone(),
            input_type: first.job.input_type,
        };
        let model = self.model.clone();
        let mut call = tokio::task::spawn_blocking(move || model.embed_batch(&inputs, &options));
        let limit = self.config.batch.hung_after;
        let watched = async {
            if limit.is_zero() {
                Some((&mut call).await)
            } else {
                tokio::time::timeout(limit, &mut call).await.ok()
            }
        };
        let model_span = tracing::info_span!("model", inputs = expected, tokens);
        let Some(outcome) = self.keep_alive(jobs, watched).instrument(model_span).await else {
            return Err(EmbedFailure::Hung(call));
        };
        match outcome {
            Ok(Ok(embeddings)) if embeddings.len() == expected => Ok(embeddings),
            Ok(Ok(embeddings)) => Err(EmbedFailure::Broken(format!(
                "model returned {} vectors for {expected} inputs",
                embeddings.len()
            ))),
            Ok(Err(error)) => Err(EmbedFailure::Model(error)),
            Err(join) => Err(EmbedFailure::Broken(format!("model call panicked: {join}"))),
        }
    }

    /// The watchdog's verdict on a call past `hung_after`: its jobs go back at once (nak, no
    /// delay) for another worker, the worker reports itself unready, and this model takes no
    /// new jobs until the call returns. A blocking thread cannot be killed, so the batch task
    /// waits for it here (its result, if one ever comes, is dropped: the jobs are elsewhere).
    async fn abandon(
        &self,
        jobs: Vec<Pending>,
        call: tokio::task::JoinHandle<Result<Vec<ModelEmbedding>, ModelError>>,
    ) {
        tracing::error!(
            model = self.name(),
            jobs = jobs.len(),
            limit_ms = self.config.batch.hung_after.as_millis() as u64,
            "model call hung past the watchdog's limit; abandoning the batch, worker unready"
        );
        bump(&self.stats.batches_abandoned);
        self.hung.fetch_add(1, Ordering::Relaxed);
        self.stats.hung_calls.fetch_add(1, Ordering::Relaxed);
        for pending in &jobs {
            settle(&pending.message, AckKind::Nak(None)).await;
        }
        drop(jobs);
        let _ = call.await;
        self.stats.hung_calls.fetch_sub(1, Ordering::Relaxed);
        self.hung.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(
            model = self.name(),
            "the hung model call returned; taking jobs again"
        );
    }

    /// Awaits `work`, sending an in-progress ack for each of the batch's messages every
    /// `ack_wait / 3`, so JetStream does not redeliver them meanwhile.
    async fn keep_alive<F: Future>(&self, jobs: &[Pending], work: F) -> F::Output {
        let mut ticks = progress_ticks(&self.config.queues);
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return output,
                _ = ticks.tick() => send_progress(jobs).await,
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
    pub(super) async fn reply(&self, pending: &Pending, answer: Answer) {
        // In the request's trace, under the coordinator's job span (the batch's own trace
        // only links to it).
        let span = tracing::info_span!(
            "job.reply",
            otel.kind = "producer",
            model = self.name(),
            job_id = pending.job.job_id
        );
        trace_context::continue_trace(&span, &pending.trace);
        self.publish_partial(pending, answer).instrument(span).await
    }

    async fn publish_partial(&self, pending: &Pending, answer: Answer) {
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
                    // The partial onto the wire before the ack: an ack for a partial still in
                    // this client's buffer would be lost with it if the connection broke. (A
                    // partial lost after that is re-asked for by the coordinator.)
                    if let Err(error) = self.client.flush().await {
                        tracing::warn!(model = self.name(), job_id = pending.job.job_id, %error,
                            "flushing the partial failed; the job will be redelivered");
                        return;
                    }
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
}

/// An in-progress ack for each job, so JetStream restarts its `ack_wait`. A lost one costs at
/// most a redelivery, and the duplicate partial is dropped by the coordinator.
pub(super) async fn send_progress<'a>(jobs: impl IntoIterator<Item = &'a Pending>) {
    for pending in jobs {
        if let Err(error) = pending.message.ack_with(AckKind::Progress).await {
            tracing::debug!(subject = %pending.message.subject, %error, "in-progress ack failed");
        }
    }
}

/// Ticks every `ack_wait / 3`, the first one a period from now: when held messages get their
/// in-progress acks.
pub(super) fn progress_ticks(queues: &QueueConfig) -> Interval {
    let period = (queues.ack_wait / 3).max(MIN_PROGRESS_PERIOD);
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// The wire failure of a permanent model error, with the input index within the job.
pub(super) fn job_failure(error: &ModelError, input: Option<usize>) -> JobFailure {
    JobFailure {
        kind: error.kind(),
        message: input.map_or_else(|| error.to_string(), |i| message_for_job(error, i)),
        input,
    }
}

/// Acks, naks or terminates; a failure only costs a redelivery later, so it is logged, not fatal.
pub(super) async fn settle(message: &Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(subject = %message.subject, ?kind, %error, "settling a job failed; it will be redelivered");
    }
}

/// The batch index a permanent error blames, when it names one.
fn blamed_input(error: &ModelError) -> Option<usize> {
    match error {
        ModelError::EmptyInput { index }
        | ModelError::InputTooLong { index, .. }
        | ModelError::BadImage { index, .. } => Some(*index),
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
        ModelError::BadImage { source, .. } => ModelError::BadImage {
            index: input,
            source: source.clone(),
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
    /// Still running past `hung_after`: the watchdog abandons it (the handle is awaited apart).
    Hung(tokio::task::JoinHandle<Result<Vec<ModelEmbedding>, ModelError>>),
    /// The call panicked or broke the trait's contract: treated as transient, so a model that
    /// always does it ends as poison after `max_deliver` tries.
    Broken(String),
}

/// What a job is answered with, which also decides how its message is settled and counted.
pub(super) enum Answer {
    Vectors(Vec<PartialVector>),
    /// Permanent: acked.
    Failed(JobFailure),
    /// Given up after the last delivery: terminated.
    Poison(JobFailure),
}

#[cfg(test)]
mod tests {
    use super::*;

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
