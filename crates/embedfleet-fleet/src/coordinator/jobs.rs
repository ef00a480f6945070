//! Job fan-out: the partials a request still needs after the cache, one [`ModelJob`] per model
//! published to JetStream, each awaited until the request's deadline.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use embedfleet_cache::CacheKey;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{model_consumer_name, model_job_subject, Input, ProtoError, NATS_MSG_ID};

use super::cache_keys::{partial_key, CacheWrites};
use super::request::RequestWork;
use super::routing::PendingGuard;
use super::table::{PartialTable, Source};
use super::Coordinator;
use crate::job::{self, ModelJob, PartialOutcome, PartialResult};
use crate::queues;

impl Coordinator {
    /// Fills `partials` for `inputs` (request indices) from the cache and the workers.
    pub(super) async fn fill_partials(
        &self,
        work: &RequestWork,
        inputs: &[usize],
        read_cache: bool,
        partials: &mut PartialTable,
        writes: &mut CacheWrites,
        deadline: Instant,
    ) -> Result<(), ProtoError> {
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
                    .map(|&i| partial_key(work, spec.name, revision, &work.inputs[i]))
                    .collect();
                let found = self.cache.get_many(&keys).await;
                open.clear();
                for (&i, vector) in taken.iter().zip(found) {
                    match vector {
                        Some(vector) => {
                            self.stats.partial_hits.fetch_add(1, Ordering::Relaxed);
                            partials.set(slot, i, vector, Source::Cached);
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
            return Ok(());
        }

        let jobs = misses.iter().map(|(slot, indices)| {
            let spec = work.models[*slot];
            let inputs: Vec<Input> = indices.iter().map(|&i| work.inputs[i].clone()).collect();
            self.run_job(spec, inputs, work, deadline)
        });
        let results = futures::future::join_all(jobs).await;
        // The first error (in slot order) answers the request; the other jobs' vectors are
        // still good and still cached.
        let mut first_error = None;
        for ((slot, indices), result) in misses.into_iter().zip(results) {
            let spec = work.models[slot];
            let partial = match result {
                Ok(partial) => partial,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            match partial.outcome {
                PartialOutcome::Vectors(vectors) if vectors.len() == indices.len() => {
                    self.learn_revision(spec.name, &partial.revision);
                    for (&i, v) in indices.iter().zip(vectors) {
                        partials.tokens += u64::from(v.tokens);
                        writes.entries.push((
                            partial_key(work, spec.name, &partial.revision, &work.inputs[i]),
                            v.vector.clone(),
                        ));
                        partials.set(slot, i, v.vector, Source::Fresh);
                    }
                }
                PartialOutcome::Vectors(vectors) => {
                    first_error.get_or_insert(ProtoError::internal(format!(
                        "`{}` answered {} vectors for {} inputs",
                        spec.name,
                        vectors.len(),
                        indices.len()
                    )));
                }
                PartialOutcome::Failed(failure) => {
                    let message = match failure.input.and_then(|j| indices.get(j)) {
                        Some(i) => format!("input {i}: {}", failure.message),
                        None => failure.message,
                    };
                    first_error.get_or_insert(ProtoError::new(failure.kind, message));
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Publishes one job and waits for its partial until `deadline`.
    async fn run_job(
        &self,
        spec: &'static ModelSpec,
        inputs: Vec<Input>,
        work: &RequestWork,
        deadline: Instant,
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
        let job = ModelJob {
            job_id,
            model: spec.name.to_string(),
            inputs,
            instruction: work.instruction.clone(),
            truncate: work.truncate,
            reply_to: job::partial_subject(&self.id, job_id),
            deadline_unix_ms: job::unix_ms_now() + remaining.as_millis() as u64,
        };
        let mut headers = HeaderMap::new();
        // Per job, so a retried publish is stored once while two requests for the same content
        // each get their own job (and partial). See embedfleet_proto::NATS_MSG_ID.
        headers.insert(NATS_MSG_ID, format!("{}.{}", self.id, job_id).as_str());
        let payload = Bytes::from(job::encode(&job));
        match tokio::time::timeout_at(deadline, self.publish_job(spec.name, headers, payload)).await
        {
            Ok(Ok(())) => {
                self.stats.jobs_published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(ProtoError::timeout(format!(
                    "the job queue did not accept `{}`'s job in time",
                    spec.name
                )))
            }
        }
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(partial)) => Ok(partial),
            Ok(Err(_)) => Err(ProtoError::internal("the partial router stopped")),
            Err(_) => Err(self.deadline_error(spec.name).await),
        }
    }

    /// Publishes a job and waits for the stream's acknowledgement. A stream that is gone (a
    /// nats-server restarted without its store) is declared again and the publish retried once,
    /// with the same `Nats-Msg-Id`, so a publish that did land is not stored twice.
    async fn publish_job(
        &self,
        model: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), ProtoError> {
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
                Ok(_ack) => return Ok(()),
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
                "`{model}`'s workers did not answer within the request timeout ({} ms); the \
                 fleet is behind",
                self.config.request_timeout.as_millis()
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
