//! Job fan-out: the partials a request still needs after the cache, one [`ModelJob`] per model
//! published to JetStream, each awaited until the request's deadline; per-model circuit
//! breakers and the `fallback` policy decide what a failing model costs the request; a job
//! whose partial was lost after the worker settled it is asked again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use embedfleet_cache::CacheKey;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{
    model_consumer_name, model_job_subject, ErrorKind, Fallback, Input, ProtoError, NATS_MSG_ID,
};

use super::breaker::Permit;
use super::cache_keys::{partial_key, CacheWrites};
use super::request::RequestWork;
use super::routing::PendingGuard;
use super::table::{PartialTable, Source};
use super::Coordinator;
use crate::job::{self, ModelJob, PartialOutcome, PartialResult};
use crate::{queues, stage_timings, trace_context};

/// Times one job is published again after its partial was lost.
const MAX_REASKS: u32 = 2;
/// With `fallback: "partial"`, the share of the time left that is kept back from the jobs, so
/// that a late model is left out and the rest still fused and answered before the deadline.
const PARTIAL_RESERVE_DIVISOR: u32 = 10;
const PARTIAL_RESERVE_MIN: Duration = Duration::from_millis(20);

impl Coordinator {
    /// Fills `partials` for `inputs` (request indices) from the cache and the workers. Returns
    /// the models left out under `fallback: "partial"` (empty under `strict`, which fails the
    /// request instead).
    pub(super) async fn fill_partials(
        &self,
        work: &RequestWork,
        inputs: &[usize],
        read_cache: bool,
        partials: &mut PartialTable,
        writes: &mut CacheWrites,
        deadline: Instant,
    ) -> Result<Vec<&'static str>, ProtoError> {
        let revisions = self.revisions.read().expect("revisions poisoned").clone();
        // (slot, request indices) still to compute after the cache.
        let mut misses: Vec<(usize, Vec<usize>)> = Vec::new();
        for (slot, spec) in work.models.iter().enumerate() {
            let taken: Vec<usize> = inputs
                .iter()
                .copied()
                .filter(|&i| spec.takes(work.inputs[i].modality()))
                .collect();
            if taken.is_empty() {
                continue;
            }
            let mut open = taken.clone();
            if let (true, Some(revision)) = (read_cache, revisions.get(spec.name)) {
                let keys: Vec<CacheKey> = taken
                    .iter()
                    .map(|&i| partial_key(work, spec, revision, &work.inputs[i]))
                    .collect();
                let started = Instant::now();
                let found = self
                    .cache
                    .get_many(&keys)
                    .instrument(tracing::info_span!(
                        "cache.lookup",
                        entry = "partial",
                        model = spec.name,
                        keys = keys.len()
                    ))
                    .await;
                let revision: Arc<str> = Arc::from(revision.as_str());
                stage_timings::record("cache_get", started.elapsed());
                open.clear();
                for (&i, vector) in taken.iter().zip(found) {
                    match vector {
                        Some(vector) => {
                            self.stats.partial_hits.fetch_add(1, Ordering::Relaxed);
                            partials.set(slot, i, vector, Source::Cached, revision.clone());
                        }
                        None => open.push(i),
                    }
                }
            }
            if !open.is_empty() {
                misses.push((slot, open));
            }
        }
        if misses.is_empty() {
            return Ok(Vec::new());
        }

        // The breakers first: an open one sends nothing, and costs the request either the
        // model (partial) or a 503 naming it (strict) at once.
        let partial_ok = work.fallback == Fallback::Partial;
        let mut degraded = Vec::new();
        let mut sent = Vec::with_capacity(misses.len());
        for (slot, indices) in misses {
            let spec = work.models[slot];
            match self.breakers.permit(spec.name) {
                Permit::Refused if partial_ok => degraded.push(spec.name),
                Permit::Refused => return Err(breaker_open(spec.name)),
                permit => sent.push((slot, indices, permit)),
            }
        }
        let wait_until = if partial_ok {
            let left = deadline.saturating_duration_since(Instant::now());
            deadline
                - (left / PARTIAL_RESERVE_DIVISOR)
                    .max(PARTIAL_RESERVE_MIN)
                    .min(left)
        } else {
            deadline
        };
        let jobs = sent.iter().map(|(slot, indices, _)| {
            let spec = work.models[*slot];
            let inputs: Vec<Input> = indices.iter().map(|&i| work.inputs[i].clone()).collect();
            // The job's span is the parent the worker's side of it hangs under: its context
            // travels in the job's `traceparent` (publish_before).
            let span = tracing::info_span!(
                "job",
                otel.kind = "producer",
                model = spec.name,
                inputs = inputs.len()
            );
            async move {
                let started = Instant::now();
                let result = self.run_job(spec, inputs, work, deadline, wait_until).await;
                stage_timings::record_model("jobs", spec.name, started.elapsed());
                result
            }
            .instrument(span)
        });
        let results = futures::future::join_all(jobs).await;
        // The first error (in slot order) answers the request; the other jobs' vectors are
        // still good and still cached.
        let mut first_error = None;
        for ((slot, indices, permit), result) in sent.into_iter().zip(results) {
            let spec = work.models[slot];
            let failure = match result {
                Ok(partial) => match partial.outcome {
                    PartialOutcome::Vectors(vectors) if vectors.len() == indices.len() => {
                        self.breakers.record(spec.name, permit, true);
                        self.learn_revision(spec.name, &partial.revision);
                        let revision: Arc<str> = Arc::from(partial.revision.as_str());
                        for (&i, v) in indices.iter().zip(vectors) {
                            partials.tokens += u64::from(v.tokens);
                            writes.entries.push((
                                partial_key(work, spec, &partial.revision, &work.inputs[i]),
                                v.vector.clone(),
                            ));
                            partials.set(slot, i, v.vector, Source::Fresh, revision.clone());
                        }
                        continue;
                    }
                    PartialOutcome::Vectors(vectors) => ProtoError::internal(format!(
                        "`{}` answered {} vectors for {} inputs",
                        spec.name,
                        vectors.len(),
                        indices.len()
                    )),
                    PartialOutcome::Failed(failure) => {
                        let message = match failure.input.and_then(|j| indices.get(j)) {
                            Some(i) => format!("input {i}: {}", failure.message),
                            None => failure.message,
                        };
                        ProtoError::new(failure.kind, message)
                    }
                },
                Err(error) => error,
            };
            // A 4xx is the request's own fault (an input too long, ...): the model did its
            // job, and leaving it out would hide the client's mistake. 429 (the queue is full)
            // is back-pressure, not a broken model.
            let models_fault = failure.code() >= 500;
            if failure.kind != ErrorKind::Overloaded {
                self.breakers.record(spec.name, permit, !models_fault);
            }
            if partial_ok && models_fault {
                tracing::info!(model = spec.name, error = %failure, "left out of a partial-fallback request");
                degraded.push(spec.name);
            } else {
                first_error.get_or_insert(failure);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => {
                degraded.sort_by_key(|name| work.models.iter().position(|m| m.name == *name));
                Ok(degraded)
            }
        }
    }

    /// Publishes one job and waits for its partial until `wait_until` (the request's deadline,
    /// or a little before it under `fallback: "partial"`). The job carries `deadline`, after
    /// which workers drop it unrun.
    ///
    /// A worker publishes the partial and then acks, on one connection; if that connection
    /// breaks in between the server may have the ack and not the partial. So while it waits,
    /// every `reask_interval` the coordinator looks the job up in the stream: a job that is no
    /// longer there (settled, or lost with a nats-server that restarted without its store)
    /// and whose partial still has not come on two looks in a row is published again.
    async fn run_job(
        &self,
        spec: &'static ModelSpec,
        inputs: Vec<Input>,
        work: &RequestWork,
        deadline: Instant,
        wait_until: Instant,
    ) -> Result<PartialResult, ProtoError> {
        let job_id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending poisoned")
            .insert(job_id, sender);
        // Whatever happens below, the job leaves `pending` with this call.
        let _pending = PendingGuard {
            coordinator: self,
            job_id,
        };

        let remaining = deadline.saturating_duration_since(Instant::now());
        let (instruction, input_type) = work.options_for(spec);
        let job = ModelJob {
            job_id,
            model: spec.name.to_string(),
            inputs,
            instruction: instruction.map(str::to_string),
            input_type,
            truncate: work.truncate,
            reply_to: job::partial_subject(&self.id, job_id),
            deadline_unix_ms: job::unix_ms_now() + remaining.as_millis() as u64,
        };
        let payload = Bytes::from(job::encode(&job));
        let mut sequence = self
            .publish_before(spec.name, job_id, 0, payload.clone(), wait_until)
            .await?;
        tokio::pin!(receiver);
        let mut reasks = 0;
        let mut missing_looks = 0;
        loop {
            let look_at = (Instant::now() + self.config.reask_interval).min(wait_until);
            tokio::select! {
                partial = &mut receiver => {
                    return partial.map_err(|_| ProtoError::internal("the partial router stopped"));
                }
                _ = tokio::time::sleep_until(look_at) => {}
            }
            if Instant::now() >= wait_until {
                return Err(self.deadline_error(spec.name).await);
            }
            if reasks >= MAX_REASKS || !self.job_is_gone(sequence).await {
                missing_looks = 0;
                continue;
            }
            missing_looks += 1;
            if missing_looks < 2 {
                continue;
            }
            missing_looks = 0;
            reasks += 1;
            self.stats.reasked_jobs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                model = spec.name,
                job_id,
                "the job left the queue but its partial never came; asking again"
            );
            sequence = self
                .publish_before(spec.name, job_id, reasks, payload.clone(), wait_until)
                .await?;
        }
    }

    /// Publishes a job (attempt `attempt` of job `job_id`) before `until`; its stream sequence.
    async fn publish_before(
        &self,
        model: &str,
        job_id: u64,
        attempt: u32,
        payload: Bytes,
        until: Instant,
    ) -> Result<u64, ProtoError> {
        let mut headers = HeaderMap::new();
        // Per job (and attempt), so a retried publish is stored once while two requests for
        // the same content each get their own job (and partial). See NATS_MSG_ID.
        let id = match attempt {
            0 => format!("{}.{job_id}", self.id),
            n => format!("{}.{job_id}.{n}", self.id),
        };
        headers.insert(NATS_MSG_ID, id.as_str());
        trace_context::inject_current(&mut headers);
        match tokio::time::timeout_at(until, self.publish_job(model, headers, payload)).await {
            Ok(Ok(sequence)) => {
                self.stats.jobs_published.fetch_add(1, Ordering::Relaxed);
                Ok(sequence)
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ProtoError::timeout(format!(
                "the job queue did not accept `{model}`'s job in time"
            ))),
        }
    }

    /// Whether the job at `sequence` has left the stream (acked, terminated, or lost). Any
    /// trouble asking counts as "still there": re-asking is for a job known to be gone.
    async fn job_is_gone(&self, sequence: u64) -> bool {
        let look = async {
            let stream = self
                .js
                .get_stream_no_info(embedfleet_proto::JOB_STREAM)
                .await
                .ok()?;
            match stream.get_raw_message(sequence).await {
                Ok(_) => Some(false),
                Err(error) => Some(matches!(
                    error.kind(),
                    jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                )),
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), look).await,
            Ok(Some(true))
        )
    }

    /// Publishes a job and waits for the stream's acknowledgement; the job's stream sequence.
    /// A stream that is gone (a nats-server restarted without its store) is declared again and
    /// the publish retried once, with the same `Nats-Msg-Id`, so a publish that did land is not
    /// stored twice.
    async fn publish_job(
        &self,
        model: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<u64, ProtoError> {
        let subject = model_job_subject(model);
        let mut redeclared = false;
        loop {
            let attempt = async {
                self.js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
            };
            let error = match attempt.await {
                Ok(ack) => return Ok(ack.sequence),
                Err(error) => error,
            };
            use async_nats::jetstream::context::PublishErrorKind as Kind;
            match error.kind() {
                Kind::StreamNotFound if !redeclared => {
                    redeclared = true;
                    tracing::warn!("the job stream is missing; declaring it again");
                    queues::ensure_job_stream(&self.js, &self.queues)
                        .await
                        .map_err(|e| {
                            ProtoError::timeout(format!("the job stream is unavailable: {e}"))
                        })?;
                }
                Kind::MaxPayloadExceeded => {
                    return Err(ProtoError::too_large(format!(
                        "`{model}`'s job ({} bytes) is over the NATS server's max_payload; \
                         raise it to 8MB (see docs/operations.md) or send fewer inputs",
                        payload.len()
                    )))
                }
                _ => return Err(publish_error(model, error)),
            }
        }
    }

    /// Why a job got no answer in time: nobody serves the model's queue (no_worker), or its
    /// workers are there but behind (timeout). Both are 503; the kind tells operators which. A
    /// worker is "there" when it has a pull waiting or holds jobs unacknowledged (a worker in the
    /// middle of a batch has no pull waiting).
    async fn deadline_error(&self, model: &str) -> ProtoError {
        let consumer = async {
            let stream: stream::Stream = self
                .js
                .get_stream(embedfleet_proto::JOB_STREAM)
                .await
                .ok()?;
            let mut consumer: jetstream::consumer::PullConsumer = stream
                .get_consumer(&model_consumer_name(model))
                .await
                .ok()?;
            consumer
                .info()
                .await
                .ok()
                .map(|info| info.num_waiting > 0 || info.num_ack_pending > 0)
        };
        match tokio::time::timeout(Duration::from_secs(1), consumer).await {
            Ok(Some(true)) => ProtoError::timeout(format!(
                "`{model}`'s workers did not answer before the request's deadline; the fleet \
                 is behind"
            )),
            _ => ProtoError::no_worker(model),
        }
    }
}

fn publish_error(model: &str, error: impl std::fmt::Display) -> ProtoError {
    let text = error.to_string();
    // A full stream refuses new jobs (discard: new) with "maximum bytes/messages exceeded":
    // back-pressure, not failure.
    if text.contains("maximum") {
        ProtoError::overloaded(format!(
            "the job queue is full ({text}); retry with backoff"
        ))
    } else {
        ProtoError::timeout(format!("could not queue `{model}`'s job: {text}"))
    }
}

/// The strict answer for a model whose breaker is open.
fn breaker_open(model: &str) -> ProtoError {
    ProtoError::new(
        ErrorKind::NoWorker,
        format!(
            "model `{model}` is unavailable: its circuit breaker is open after consecutive \
             failures; retry later, or ask with `fallback: \"partial\"` to be answered without it"
        ),
    )
}
