//! The coordinator: the `embedfleet` NATS service and its `embed.v1` endpoint.
//!
//! Per request: admit (or 429) → decode (JSON or MessagePack, by `Content-Type`) → validate →
//! cache lookups (fused, then per-model partials) → one [`ModelJob`] per model for the misses,
//! published to JetStream → gather the [`PartialResult`]s on this coordinator's partial subject
//! → normalise, fuse → reply in the request's encoding → write the new vectors to the cache.
//!
//! Nothing here blocks on a model: the coordinator holds no weights, only the fusion layers, so
//! it scales apart from the workers and any number of coordinators share the queue group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::service::ServiceExt;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use embedfleet_cache::{CacheKey, CacheStats, VectorCache};
use embedfleet_models::{catalogue, ModelSpec};
use embedfleet_proto::{
    model_consumer_name, model_job_subject, ContentKey, EmbedReply, EmbedRequest, EmbeddingData,
    Encoding, ErrorBody, ErrorKind, ExpertSelection, Input, InputType, ProtoError, Usage,
    CONTENT_TYPE, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, EMBED_ENDPOINT, FUSED_MODEL_NAME,
    NATS_MSG_ID, SERVICE_ERROR, SERVICE_ERROR_CODE, SERVICE_NAME, SERVICE_VERSION,
};

use crate::config::{CoordinatorConfig, QueueConfig};
use crate::fusion::{fuse_rows, FusionStage};
use crate::job::{self, ModelJob, PartialOutcome, PartialResult};
use crate::{queues, revisions};

/// Queue group of the `embed.v1` endpoint: every coordinator joins it, NATS gives each request
/// to one of them.
pub const QUEUE_GROUP: &str = "embedfleet";

/// Counters of one coordinator, exported in `$SRV.STATS.embedfleet` (endpoint `data`).
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    pub requests: AtomicU64,
    pub succeeded: AtomicU64,
    /// Error replies with a 4xx code (the client's fault), 429 excluded.
    pub client_errors: AtomicU64,
    /// Error replies with a 5xx code.
    pub server_errors: AtomicU64,
    /// Requests refused with 429 at admission.
    pub overloaded: AtomicU64,
    /// Inputs answered from the fused cache.
    pub fused_hits: AtomicU64,
    /// (input, model) pairs answered from the partial cache.
    pub partial_hits: AtomicU64,
    pub jobs_published: AtomicU64,
    /// Partials that arrived for no waiting job: late (after a timeout) or duplicates after a
    /// redelivery. Harmless, counted to make redeliveries visible.
    pub stray_partials: AtomicU64,
}

/// A point-in-time copy of [`CoordinatorStats`] plus the cache's counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub succeeded: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub overloaded: u64,
    pub fused_hits: u64,
    pub partial_hits: u64,
    pub jobs_published: u64,
    pub stray_partials: u64,
    pub in_flight: usize,
    pub cache: CacheStats,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
}

/// A running coordinator's shared state.
pub struct Coordinator {
    /// Unique per process; names this coordinator's partial subjects and job ids.
    id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    config: CoordinatorConfig,
    queues: QueueConfig,
    cache: Arc<VectorCache>,
    fusion: Arc<FusionStage>,
    /// Model → revision of the weights that last answered for it. Cache keys need revisions
    /// before a job runs; they are learnt from partials (or primed by `serve`, which hosts the
    /// workers). Until then a model's inputs skip the cache lookup, never serve a stale vector.
    revisions: RwLock<HashMap<String, String>>,
    /// Model → width of the vectors its workers' checkpoint produces (the width rule: it may
    /// differ from the catalogue's), announced with the revision and confirmed by every vector
    /// seen. Fusion is built for these; the catalogue width stands in until one is known.
    widths: RwLock<HashMap<String, usize>>,
    /// Jobs waiting for their partial, by job id.
    pending: Mutex<HashMap<u64, oneshot::Sender<PartialResult>>>,
    next_job: AtomicU64,
    admission: Arc<Semaphore>,
    stats: CoordinatorStats,
}

impl Coordinator {
    /// A coordinator on `client`; call [`Coordinator::run`] to serve.
    pub fn new(
        client: async_nats::Client,
        config: CoordinatorConfig,
        queues: QueueConfig,
        cache: Arc<VectorCache>,
        fusion: FusionStage,
    ) -> Arc<Self> {
        let js = jetstream::new(client.clone());
        Arc::new(Coordinator {
            id: instance_id(),
            admission: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            client,
            js,
            config,
            queues,
            cache,
            fusion: Arc::new(fusion),
            revisions: RwLock::new(HashMap::new()),
            widths: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(1),
            stats: CoordinatorStats::default(),
        })
    }

    /// Tells the coordinator which weights serve `model`, so the cache works from the first
    /// request (`serve` knows, hosting the workers itself).
    pub fn prime_revision(&self, model: &str, revision: &str) {
        self.revisions
            .write()
            .expect("revisions poisoned")
            .insert(model.to_string(), revision.to_string());
    }

    /// Tells the coordinator the width `model`'s loaded checkpoint produces (`serve` knows).
    pub fn prime_width(&self, model: &str, width: usize) {
        self.learn_width(model, width);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&s.requests),
            succeeded: get(&s.succeeded),
            client_errors: get(&s.client_errors),
            server_errors: get(&s.server_errors),
            overloaded: get(&s.overloaded),
            fused_hits: get(&s.fused_hits),
            partial_hits: get(&s.partial_hits),
            jobs_published: get(&s.jobs_published),
            stray_partials: get(&s.stray_partials),
            in_flight: self.config.max_in_flight.max(1) - self.admission.available_permits(),
            cache: self.cache.stats(),
        }
    }

    /// Serves `embed.v1` until `shutdown` fires, then stops taking requests, finishes those in
    /// flight (each is bounded by the request timeout) and returns.
    ///
    /// `ready` is called once the endpoint is subscribed, i.e. once requests can be answered.
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        ready: impl FnOnce(),
    ) -> Result<(), CoordinatorError> {
        queues::ensure_job_stream(&self.js, &self.queues).await?;
        let partials = self
            .client
            .subscribe(job::partial_wildcard(&self.id))
            .await
            .map_err(async_nats::Error::from)?;
        let router = tokio::spawn(self.clone().route_partials(partials));
        // Revisions workers announce, so a new revision changes cache keys before any partial
        // of it arrives (see revisions.rs). Weak: the watch must not keep the coordinator alive.
        let stop_watch = shutdown.child_token();
        let learner = Arc::downgrade(&self);
        let revision_watch = tokio::spawn(revisions::watch(
            self.js.clone(),
            stop_watch.clone(),
            move |model, announcement| {
                if let Some(coordinator) = learner.upgrade() {
                    coordinator.learn_revision(model, &announcement.revision);
                    if let Some(width) = announcement.dim {
                        coordinator.learn_width(model, width);
                    }
                }
            },
        ));

        let stats_source = Arc::downgrade(&self);
        let service = self
            .client
            .service_builder()
            .description("embedfleet: embeddings from an ensemble of models, fused with FuseMoE")
            .queue_group(QUEUE_GROUP)
            .stats_handler(move |_endpoint, _stats| {
                stats_source
                    .upgrade()
                    .and_then(|c| serde_json::to_value(c.stats()).ok())
                    .unwrap_or(serde_json::Value::Null)
            })
            .start(SERVICE_NAME, SERVICE_VERSION)
            .await?;
        let mut endpoint = service
            .endpoint_builder()
            .name("embed-v1")
            .add(EMBED_ENDPOINT)
            .await?;
        // The endpoint's SUB must reach the server before anyone is told we are ready.
        self.client.flush().await.map_err(async_nats::Error::from)?;
        tracing::info!(id = %self.id, "coordinator serving {EMBED_ENDPOINT}");
        ready();

        let tasks = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                request = endpoint.next() => match request {
                    Some(request) => self.clone().accept(request, &tasks).await,
                    None => break,
                },
            }
        }
        // Unsubscribe first so the queue group hands new requests to other coordinators, then
        // let the admitted ones finish.
        if let Err(error) = endpoint.stop().await {
            tracing::warn!(%error, "stopping the endpoint");
        }
        tasks.close();
        tasks.wait().await;
        let _ = service.stop().await;
        router.abort();
        stop_watch.cancel();
        let _ = revision_watch.await;
        let _ = self.client.flush().await;
        tracing::info!(stats = ?self.stats(), "coordinator stopped");
        Ok(())
    }

    /// Admits a request into its own task, or refuses it with 429 when `max_in_flight` requests
    /// are already being handled: a flood costs one small reply each, sent from this loop (so
    /// refusals cannot pile up either), never queued memory.
    async fn accept(self: Arc<Self>, request: async_nats::service::Request, tasks: &TaskTracker) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let encoding = request_encoding(&request.message);
        match self.admission.clone().try_acquire_owned() {
            Ok(permit) => {
                tasks.spawn(async move {
                    let deadline = Instant::now() + self.config.request_timeout;
                    let outcome = self
                        .handle(&request.message.payload, encoding, deadline)
                        .await;
                    let after_reply = self.reply(&request, encoding, outcome).await;
                    if let Some(writes) = after_reply {
                        self.cache_writes(writes).await;
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                let error = ProtoError::overloaded(format!(
                    "{} requests in flight on this coordinator; retry with backoff",
                    self.config.max_in_flight
                ));
                let _ = self.reply(&request, encoding, Err(error)).await;
            }
        }
    }

    /// Sends the reply; on success returns the cache writes still to do.
    async fn reply(
        &self,
        request: &async_nats::service::Request,
        encoding: Encoding,
        outcome: Result<Answer, ProtoError>,
    ) -> Option<CacheWrites> {
        let (result, writes) = match outcome {
            Ok(answer) => match encoding.encode(&answer.reply) {
                Ok(body) => (Ok(body), Some(answer.writes)),
                Err(error) => (Err(error), None),
            },
            Err(error) => (Err(error), None),
        };
        let sent = match result {
            Ok(body) => {
                let len = body.len();
                match request
                    .respond_with_headers(Ok(Bytes::from(body)), content_type(encoding))
                    .await
                {
                    Ok(()) => {
                        self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                        return writes;
                    }
                    // Almost always the server's max_payload: partials of many inputs in JSON
                    // run to megabytes. Say so rather than leave the client to time out.
                    Err(error) => {
                        tracing::warn!(%error, len, "reply not sent");
                        self.send_error(
                            request,
                            encoding,
                            ProtoError::too_large(format!(
                                "the reply ({len} bytes) could not be sent ({error}); ask for \
                                 fewer inputs per request, no partials, or MessagePack"
                            )),
                        )
                        .await
                    }
                }
            }
            Err(error) => self.send_error(request, encoding, error).await,
        };
        if let Err(error) = sent {
            tracing::warn!(%error, "error reply not sent");
        }
        None
    }

    async fn send_error(
        &self,
        request: &async_nats::service::Request,
        encoding: Encoding,
        error: ProtoError,
    ) -> Result<(), async_nats::PublishError> {
        let counter = match error.code() {
            429 => None,
            code if code >= 500 => Some(&self.stats.server_errors),
            _ => Some(&self.stats.client_errors),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if error.code() >= 500 {
            tracing::warn!(%error, "request failed");
        } else {
            tracing::debug!(%error, "request refused");
        }
        let mut headers = content_type(encoding);
        headers.insert(SERVICE_ERROR, error.to_string().as_str());
        headers.insert(SERVICE_ERROR_CODE, error.code().to_string().as_str());
        let body = encoding
            .encode(&ErrorBody::from(&error))
            .unwrap_or_default();
        request
            .respond_with_headers(Ok(Bytes::from(body)), headers)
            .await
    }

    /// Decodes and answers one request.
    async fn handle(
        &self,
        payload: &[u8],
        encoding: Encoding,
        deadline: Instant,
    ) -> Result<Answer, ProtoError> {
        self.config.limits.check_payload_len(payload.len())?;
        let request: EmbedRequest = encoding.decode(payload)?;
        let inputs = request.to_inputs(&self.config.limits)?;
        let models = self.resolve_models(request.models.as_deref())?;
        for (index, input) in inputs.iter().enumerate() {
            if !models.iter().any(|spec| spec.takes(input.modality())) {
                return Err(ProtoError::new(
                    ErrorKind::UnsupportedModality,
                    format!(
                        "input {index} ({}) is taken by none of the requested models ({})",
                        input.modality(),
                        models.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let work = RequestWork {
            inputs,
            models,
            instruction: request.effective_instruction().map(str::to_string),
            input_type: request.input_type,
            fuse: request.fuse,
            partials: request.wants_partials(),
            normalize: request.normalize,
            truncate: request.truncate,
        };
        self.embed(work, deadline).await
    }

    /// The request's model set in slot order; the configured default when it names none.
    fn resolve_models(
        &self,
        names: Option<&[String]>,
    ) -> Result<Vec<&'static ModelSpec>, ProtoError> {
        let names = names.unwrap_or(&self.config.default_models);
        let specs = names
            .iter()
            .map(|name| catalogue::find(name).ok_or_else(|| ProtoError::unknown_model(name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(catalogue::in_slot_order(specs))
    }

    async fn embed(&self, work: RequestWork, deadline: Instant) -> Result<Answer, ProtoError> {
        let n = work.inputs.len();
        let revisions = self.known_revisions(&work.models);
        // Truncation changes nothing for inputs that fit, but a cached vector cannot tell
        // whether its input was cut: with `truncate: false` the models must see the input.
        let read_cache = work.truncate;

        // A fused layer exists only for sets this coordinator can fuse; fail before any work.
        // (Building a seeded layer the first time takes a while: off the async threads.)
        let widths = self.known_widths(&work.models);
        let mut layer = match work.fuse {
            false => None,
            true => Some(self.fusion_layer(&work.models, &widths).await?),
        };

        // 1. Fused vectors, when that is all the reply needs.
        let mut fused: Vec<Option<Vec<f32>>> = vec![None; n];
        if let (Some(layer), Some(revisions), true, false) =
            (&layer, &revisions, read_cache, work.partials)
        {
            let version = layer.version();
            let keys: Vec<CacheKey> = work
                .inputs
                .iter()
                .map(|input| fused_key(&work, &version, revisions, input))
                .collect();
            fused = self.cache.get_many(&keys).await;
            let hits = fused.iter().filter(|v| v.is_some()).count();
            self.stats
                .fused_hits
                .fetch_add(hits as u64, Ordering::Relaxed);
        }
        let cached: Vec<bool> = fused.iter().map(Option::is_some).collect();

        // 2. Partials of the inputs still open: cache, then one job per model for the misses.
        let needs_partials: Vec<usize> = (0..n)
            .filter(|&i| work.partials || fused[i].is_none())
            .collect();
        let mut partials = PartialTable::new(work.models.len(), n);
        let mut writes = CacheWrites::default();
        if !needs_partials.is_empty() {
            self.fill_partials(
                &work,
                &needs_partials,
                read_cache,
                &mut partials,
                &mut writes,
                deadline,
            )
            .await?;
        }

        // The vectors in hand say how wide each checkpoint really is; on first contact with one
        // narrower than its catalogue slot the layer chosen above was for the wrong widths.
        let seen = partials.widths();
        for (spec, width) in work.models.iter().zip(&seen) {
            if let Some(width) = width {
                self.learn_width(spec.name, *width);
            }
        }
        if let Some(current) = &layer {
            let actual: Vec<usize> = seen
                .iter()
                .zip(&current.config().input_dims)
                .map(|(seen, assumed)| seen.unwrap_or(*assumed))
                .collect();
            if actual != current.config().input_dims {
                layer = Some(self.fusion_layer(&work.models, &actual).await?);
            }
        }

        // 3. Normalise (the cache keeps raw vectors; see job.rs), fuse what is open.
        if work.normalize {
            partials.normalize();
        }
        let mut experts: Vec<Option<ExpertSelection>> = vec![None; n];
        let open: Vec<usize> = (0..n).filter(|&i| fused[i].is_none()).collect();
        if let (Some(layer), false) = (&layer, open.is_empty()) {
            // FuseMoE costs milliseconds per row on a CPU: a blocking thread, with the table
            // moved there and back rather than copied.
            let (task_layer, rows_of) = (layer.clone(), open.clone());
            let (table, results) = tokio::task::spawn_blocking(move || {
                let rows: Vec<Vec<Option<&[f32]>>> =
                    rows_of.iter().map(|&i| partials.row(i)).collect();
                let results = fuse_rows(&task_layer, &rows);
                drop(rows);
                (partials, results)
            })
            .await
            .map_err(|e| ProtoError::internal(format!("fusion task: {e}")))?;
            partials = table;
            // Revisions as they are after this request's partials (a worker may have answered
            // with new weights): the key must name the weights that made the vector.
            let revisions = self.known_revisions(&work.models);
            let version = layer.version();
            for (&i, result) in open.iter().zip(results?) {
                if let Some(revisions) = &revisions {
                    let key = fused_key(&work, &version, revisions, &work.inputs[i]);
                    writes.entries.push((key, result.embedding.clone()));
                }
                fused[i] = Some(result.embedding);
                experts[i] = Some(ExpertSelection {
                    weights: result.expert_weights,
                    selected: result.selected,
                });
            }
        }
        let data = (0..n)
            .map(|i| {
                let mut element = EmbeddingData::new(i);
                element.embedding = fused[i].take();
                element.experts = experts[i].take();
                element.cached = cached[i] || (!work.fuse && partials.all_cached(i));
                if work.partials {
                    element.partials = Some(partials.take_named(i, &work.models));
                }
                element
            })
            .collect();
        let model = if work.fuse {
            FUSED_MODEL_NAME.to_string()
        } else {
            work.models
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join("+")
        };
        Ok(Answer {
            reply: EmbedReply::new(model, data, Usage::new(partials.tokens)),
            writes,
        })
    }

    /// Fills `partials` for `inputs` (request indices) from the cache and the workers.
    async fn fill_partials(
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
                    .map(|&i| partial_key(work, spec, revision, &work.inputs[i]))
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
                            partial_key(work, spec, &partial.revision, &work.inputs[i]),
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

    /// Forwards each partial to the job waiting for it; partials for no waiting job (late or
    /// duplicate) are dropped, since the request they belonged to is already answered.
    async fn route_partials(self: Arc<Self>, mut subscription: async_nats::Subscriber) {
        while let Some(message) = subscription.next().await {
            let partial: PartialResult = match job::decode(&message.payload) {
                Ok(partial) => partial,
                Err(error) => {
                    tracing::warn!(%error, subject = %message.subject, "undecodable partial dropped");
                    continue;
                }
            };
            let waiting = self
                .pending
                .lock()
                .expect("pending poisoned")
                .remove(&partial.job_id);
            match waiting {
                Some(sender) => {
                    let _ = sender.send(partial);
                }
                None => {
                    self.stats.stray_partials.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The fusion layer for `models` of these widths, built off the async threads when it is
    /// new (building a seeded layer takes a while).
    async fn fusion_layer(
        &self,
        models: &[&'static ModelSpec],
        widths: &[usize],
    ) -> Result<Arc<embedfleet_fusion::FuseMoe>, ProtoError> {
        if let Some(ready) = self.fusion.ready_layer(models, widths) {
            return ready;
        }
        let (stage, models, widths) = (self.fusion.clone(), models.to_vec(), widths.to_vec());
        tokio::task::spawn_blocking(move || stage.layer(&models, &widths))
            .await
            .map_err(|e| ProtoError::internal(format!("fusion layer task: {e}")))?
    }

    /// Each model's width as far as this coordinator knows: learnt, or the catalogue's.
    fn known_widths(&self, models: &[&'static ModelSpec]) -> Vec<usize> {
        let widths = self.widths.read().expect("widths poisoned");
        models
            .iter()
            .map(|spec| widths.get(spec.name).copied().unwrap_or(spec.dim))
            .collect()
    }

    fn learn_width(&self, model: &str, width: usize) {
        let known = self
            .widths
            .read()
            .expect("widths poisoned")
            .get(model)
            .copied();
        if known != Some(width) {
            tracing::info!(model, width, "model width learnt");
            self.widths
                .write()
                .expect("widths poisoned")
                .insert(model.to_string(), width);
        }
    }

    /// The revision cache keys use for `model` now (announced by a worker or seen in a partial).
    pub fn revision_of(&self, model: &str) -> Option<String> {
        self.revisions
            .read()
            .expect("revisions poisoned")
            .get(model)
            .cloned()
    }

    fn known_revisions(&self, models: &[&'static ModelSpec]) -> Option<Vec<String>> {
        let revisions = self.revisions.read().expect("revisions poisoned");
        models
            .iter()
            .map(|spec| revisions.get(spec.name).cloned())
            .collect()
    }

    fn learn_revision(&self, model: &str, revision: &str) {
        let known = self
            .revisions
            .read()
            .expect("revisions poisoned")
            .get(model)
            .cloned();
        if known.as_deref() != Some(revision) {
            if let Some(old) = known {
                tracing::info!(model, old, new = revision, "model revision changed");
            }
            self.prime_revision(model, revision);
        }
    }

    async fn cache_writes(&self, writes: CacheWrites) {
        if writes.entries.is_empty() {
            return;
        }
        let entries: Vec<(CacheKey, &[f32])> = writes
            .entries
            .iter()
            .map(|(key, vector)| (key.clone(), vector.as_slice()))
            .collect();
        self.cache.put_many(&entries).await;
    }
}

/// The validated request.
struct RequestWork {
    inputs: Vec<Input>,
    models: Vec<&'static ModelSpec>,
    instruction: Option<String>,
    input_type: InputType,
    fuse: bool,
    partials: bool,
    normalize: bool,
    truncate: bool,
}

impl RequestWork {
    /// (`instruction`, `input_type`) as `spec`'s model reads them: what its jobs carry and its
    /// partials are keyed by, so models that ignore an option share entries whatever it is.
    fn options_for(&self, spec: &ModelSpec) -> (Option<&str>, InputType) {
        spec.prompting
            .effective(self.instruction.as_deref(), self.input_type)
    }

    /// The options that reach any model of the set, for the fused key: the instruction if some
    /// model reads it, `query` if some model reads the input type as one.
    fn fused_options(&self) -> (Option<&str>, InputType) {
        let each: Vec<_> = self
            .models
            .iter()
            .map(|spec| self.options_for(spec))
            .collect();
        let instruction = each.iter().find_map(|(instruction, _)| *instruction);
        let input_type = each
            .iter()
            .map(|(_, input_type)| *input_type)
            .find(|input_type| *input_type == InputType::Query)
            .unwrap_or(InputType::Document);
        (instruction, input_type)
    }
}

struct Answer {
    reply: EmbedReply,
    writes: CacheWrites,
}

/// New vectors to store once the reply is out.
#[derive(Default)]
struct CacheWrites {
    entries: Vec<(CacheKey, Vec<f32>)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Source {
    Cached,
    Fresh,
}

/// One model's vector for one input, and where it came from.
type Cell = Option<(Vec<f32>, Source)>;

/// partials[slot][input] for one request.
struct PartialTable {
    cells: Vec<Vec<Cell>>,
    tokens: u64,
}

impl PartialTable {
    fn new(slots: usize, inputs: usize) -> Self {
        PartialTable {
            cells: vec![vec![None; inputs]; slots],
            tokens: 0,
        }
    }

    fn set(&mut self, slot: usize, input: usize, vector: Vec<f32>, source: Source) {
        self.cells[slot][input] = Some((vector, source));
    }

    fn normalize(&mut self) {
        for (vector, _) in self.cells.iter_mut().flatten().flatten() {
            embedfleet_models::model::l2_normalize(vector);
        }
    }

    fn row(&self, input: usize) -> Vec<Option<&[f32]>> {
        self.cells
            .iter()
            .map(|slot| slot[input].as_ref().map(|(v, _)| v.as_slice()))
            .collect()
    }

    /// Per slot, the width of the vectors it holds (`None` for a slot with none).
    fn widths(&self) -> Vec<Option<usize>> {
        self.cells
            .iter()
            .map(|slot| slot.iter().flatten().map(|(v, _)| v.len()).next())
            .collect()
    }

    fn all_cached(&self, input: usize) -> bool {
        let mut present = self
            .cells
            .iter()
            .filter_map(|slot| slot[input].as_ref())
            .peekable();
        present.peek().is_some() && present.all(|(_, source)| *source == Source::Cached)
    }

    fn take_named(
        &mut self,
        input: usize,
        models: &[&'static ModelSpec],
    ) -> BTreeMap<String, Vec<f32>> {
        models
            .iter()
            .zip(&mut self.cells)
            .filter_map(|(spec, slot)| slot[input].take().map(|(v, _)| (spec.name.to_string(), v)))
            .collect()
    }
}

/// Removes a job from `pending` when its `run_job` ends, however it ends.
struct PendingGuard<'a> {
    coordinator: &'a Coordinator,
    job_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.coordinator
            .pending
            .lock()
            .expect("pending poisoned")
            .remove(&self.job_id);
    }
}

/// Cache key of one model's raw partial for one input, under the options the model reads.
fn partial_key(work: &RequestWork, spec: &ModelSpec, revision: &str, input: &Input) -> CacheKey {
    let (instruction, input_type) = work.options_for(spec);
    let content = ContentKey::new(input, instruction, input_type, spec.name, revision);
    CacheKey::partial(spec.name, revision, &content)
}

/// Cache key of a fused vector: the input and the options any of its models read, the whole model set with each
/// model's revision, whether the partials were normalised before fusion, and (in the key's
/// namespace) the fusion layer's version. Anything that changes the vector changes the key.
fn fused_key(
    work: &RequestWork,
    fusion_version: &str,
    revisions: &[String],
    input: &Input,
) -> CacheKey {
    let set = work
        .models
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join("+");
    let model = format!(
        "{set}:{}",
        if work.normalize { "normalized" } else { "raw" }
    );
    let (instruction, input_type) = work.fused_options();
    let content = ContentKey::new(input, instruction, input_type, &model, &revisions.join("+"));
    CacheKey::fused(fusion_version, &content)
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

fn request_encoding(message: &async_nats::Message) -> Encoding {
    let content_type = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(CONTENT_TYPE))
        .map(|value| value.as_str());
    Encoding::from_content_type(content_type)
}

fn content_type(encoding: Encoding) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        match encoding {
            Encoding::Json => CONTENT_TYPE_JSON,
            Encoding::MsgPack => CONTENT_TYPE_MSGPACK,
        },
    );
    headers
}

/// A process-unique token for subjects: pid and start time, base 36 (subject-safe).
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{}-{}", std::process::id(), radix36(nanos))
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}
