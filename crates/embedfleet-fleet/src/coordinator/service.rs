//! The service loop: the `embedfleet` micro service and its `embed.v1` endpoint, admission
//! (or 429), and the reply (or the error reply) in the request's encoding.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::service::ServiceExt;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use opentelemetry::context::FutureExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use embedfleet_proto::{
    Encoding, ProtoError, CONTENT_TYPE, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, EMBED_ENDPOINT,
    SERVICE_NAME, SERVICE_VERSION, TIMEOUT_HEADER, TIMINGS_HEADER,
};

use super::cache_keys::CacheWrites;
use super::request::Answer;
use super::{Coordinator, CoordinatorError, QUEUE_GROUP};
use crate::{job, queues, revisions, stage_timings, trace_context};

impl Coordinator {
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
        // Revisions (and widths) workers announce, so a new revision changes cache keys before any partial
        // of it arrives (see revisions.rs). Weak: the watch must not keep the coordinator alive.
        let stop_watch = shutdown.child_token();
        let learner = Arc::downgrade(&self);
        let revision_watch = tokio::spawn(revisions::watch(
            self.js.clone(),
            stop_watch.clone(),
            move |model, announcement| {
                if let Some(coordinator) = learner.upgrade() {
                    coordinator.learn_announced_revision(model, &announcement.revision);
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
                // The request's span continues the client's trace (its `traceparent`); the
                // client's context is also made current on the task, so that the jobs pass it
                // on even when this process exports no spans (trace_context.rs).
                let parent = trace_context::extract(request.message.headers.as_ref());
                let span = tracing::info_span!(
                    "embed.request",
                    otel.kind = "server",
                    messaging.system = "nats",
                    otel.status_code = tracing::field::Empty,
                    error.kind = tracing::field::Empty,
                );
                trace_context::continue_trace(&span, &parent);
                let request_span = span.clone();
                let serve = async move {
                    let timer = crate::metrics::global().request_timer();
                    let timed = request.message.headers.as_ref();
                    let timed = timed.is_some_and(|h| h.get(TIMINGS_HEADER).is_some());
                    let handling = async {
                        match request_timeout(&request.message, &self.config) {
                            Ok(timeout) => {
                                let deadline = Instant::now() + timeout;
                                self.handle(&request.message.payload, encoding, deadline)
                                    .await
                            }
                            Err(error) => Err(error),
                        }
                    };
                    let (outcome, timings) = stage_timings::collect(timed, handling).await;
                    if let Err(error) = &outcome {
                        record_error(&request_span, error);
                    }
                    let after_reply = self
                        .reply(&request, encoding, outcome, timings)
                        .instrument(tracing::info_span!("reply"))
                        .await;
                    drop(timer);
                    if let Some(writes) = after_reply {
                        let entries = writes.entries.len();
                        self.cache_writes(writes)
                            .instrument(tracing::info_span!("cache.write", entries))
                            .await;
                    }
                    drop(permit);
                };
                tasks.spawn(serve.instrument(span).with_context(parent));
            }
            Err(_) => {
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                let error = ProtoError::overloaded(format!(
                    "{} requests in flight on this coordinator; retry with backoff",
                    self.config.max_in_flight
                ));
                let _ = self.reply(&request, encoding, Err(error), None).await;
            }
        }
    }

    /// Sends the reply; on success returns the cache writes still to do.
    async fn reply(
        &self,
        request: &async_nats::service::Request,
        encoding: Encoding,
        outcome: Result<Answer, ProtoError>,
        timings: Option<String>,
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
                let mut headers = content_type(encoding);
                if let Some(timings) = timings {
                    headers.insert(TIMINGS_HEADER, timings.as_str());
                }
                match request
                    .respond_with_headers(Ok(Bytes::from(body)), headers)
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
        crate::metrics::global().request_failed(error.kind);
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
        // Through the micro service's error path, so that `$SRV.STATS` counts the error
        // (`num_errors`, `last_error`). That path sends no body: the error travels in the
        // `Nats-Service-Error` header as `<kind>: <message>` (ProtoError's Display), which
        // `ProtoError::from_service_error` parses back exactly.
        let status = error.to_string();
        request
            .respond_with_headers(
                Err(async_nats::service::error::Error {
                    status,
                    code: usize::from(error.code()),
                }),
                content_type(encoding),
            )
            .await
    }
}

/// Marks the request's span as failed for a server error (5xx); a 4xx is the client's doing,
/// which OpenTelemetry's conventions do not count as the server's error. The kind goes on the
/// span either way.
fn record_error(span: &tracing::Span, error: &ProtoError) {
    span.record("error.kind", error.kind.as_str());
    if error.code() >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// The request's own timeout: the `Embedfleet-Timeout-Ms` header, or the configured default.
/// A header that is not a whole number of milliseconds in `1..=max_request_timeout` is refused
/// (400) rather than guessed at.
fn request_timeout(
    message: &async_nats::Message,
    config: &crate::config::CoordinatorConfig,
) -> Result<std::time::Duration, ProtoError> {
    let Some(value) = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(TIMEOUT_HEADER))
    else {
        return Ok(config.request_timeout);
    };
    let max = config.max_request_timeout.as_millis() as u64;
    match value.as_str().trim().parse::<u64>() {
        Ok(ms) if (1..=max).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        _ => Err(ProtoError::bad_request(format!(
            "header {TIMEOUT_HEADER}: `{}` is not a timeout in milliseconds from 1 to {max}",
            value.as_str()
        ))),
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
