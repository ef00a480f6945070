//! Traces across hops, against a real nats-server: a request with a W3C `traceparent` goes
//! through a real coordinator and a real model worker (minilm and mpnet on their real weights
//! from `models/`, or the testkit's fixed-vector stand-ins where `models/` is not fetched), and
//! the spans, collected by the SDK's in-memory exporter through the same tracing-opentelemetry
//! layer the CLI installs, form one connected trace: the client's span → the coordinator's
//! request span → its stages and one `job` span per model → the worker's queue wait and reply
//! under each job; each worker `batch` span starts a trace of its own and links to the jobs it
//! served. A request without a `traceparent`, or with a malformed one, starts a new trace.
//!
//! One test function: the tracing subscriber and the tracer provider are process-global.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use embedfleet_cache::{CacheConfig, VectorCache};
use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::fusion::{catalogue_widths, FusionStage};
use embedfleet_fleet::trace_context::{self, TRACEPARENT, TRACER_NAME};
use embedfleet_fleet::worker::{run_worker, WorkerConfig};
use embedfleet_fleet::{BatchConfig, CoordinatorConfig, QueueConfig};
use embedfleet_models::{
    catalogue, Device, EmbeddingModel, ModelRegistry, ModelSpec, WeightResolver,
};
use embedfleet_proto::{model_job_subject, EmbedReply, EMBED_ENDPOINT, SERVICE_ERROR_CODE};
use embedfleet_testkit::{FixedVectorModel, NatsServer};

const MODELS: [&str; 2] = ["minilm", "mpnet"];
const CLIENT_TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CLIENT_SPAN: &str = "eee19b7ec3c1b174";

fn exporter() -> &'static InMemorySpanExporter {
    static SPANS: OnceLock<InMemorySpanExporter> = OnceLock::new();
    SPANS.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(TRACER_NAME))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        tracing_subscriber::registry().with(layer).init();
        exporter
    })
}

/// The real checkpoints when `models/` has them (CI fetches them), the fixed-vector stand-ins
/// otherwise: the spans under test are the same either way.
fn hosted_models() -> Vec<Arc<dyn EmbeddingModel>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    if MODELS
        .iter()
        .all(|m| dir.join(m).join("config.json").exists())
    {
        let registry = ModelRegistry::new(
            WeightResolver {
                models_dir: Some(dir),
                offline: true,
            },
            Device::Cpu,
        );
        MODELS
            .iter()
            .map(|name| registry.get(name).expect("real checkpoint loads"))
            .collect()
    } else {
        eprintln!("no models/minilm and models/mpnet: fixed-vector stand-ins instead");
        MODELS
            .iter()
            .map(|name| Arc::new(FixedVectorModel::new(name).unwrap()) as Arc<dyn EmbeddingModel>)
            .collect()
    }
}

struct Fleet {
    _nats: NatsServer,
    client: async_nats::Client,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_fleet() -> Fleet {
    let nats = NatsServer::start().expect("nats-server");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let cache = VectorCache::connect(CacheConfig::default())
        .await
        .expect("cache");
    let config = CoordinatorConfig::default();
    let set: Vec<&'static ModelSpec> = catalogue::in_slot_order(
        MODELS
            .iter()
            .map(|name| catalogue::find(name).unwrap())
            .collect(),
    );
    let fusion = FusionStage::seeded();
    fusion
        .layer(&set, &catalogue_widths(&set))
        .expect("fusion layer");
    let queues = QueueConfig {
        ack_wait: Duration::from_secs(5),
        ..QueueConfig::default()
    };
    let coordinator = Coordinator::new(
        client.clone(),
        config,
        queues.clone(),
        Arc::new(cache),
        fusion,
    );
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let run = coordinator.clone().run(shutdown.clone(), move || {
        let _ = ready_tx.send(());
    });
    let mut tasks = vec![tokio::spawn(async move {
        run.await.expect("coordinator");
    })];
    ready_rx.await.expect("coordinator ready");

    let models = hosted_models();
    let revisions: Vec<(&'static str, String)> = models
        .iter()
        .map(|m| (m.spec().name, m.revision().to_string()))
        .collect();
    let worker_client = async_nats::connect(nats.url()).await.expect("connect");
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let config = WorkerConfig {
            queues,
            batch: BatchConfig::default(),
        };
        run_worker(worker_client, models, config, stop)
            .await
            .expect("worker");
    }));
    // Known revisions make the coordinator look partials up in the cache (a stage of its own).
    for (model, revision) in revisions {
        for _ in 0..500 {
            if coordinator.revision_of(model).as_deref() == Some(revision.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(coordinator.revision_of(model), Some(revision));
    }
    Fleet {
        _nats: nats,
        client,
        shutdown,
        tasks,
    }
}

impl Fleet {
    /// Sends `text` with `traceparent` (if any); returns the `traceparent` of each model's job
    /// as published (a plain subscription sees JetStream publishes too).
    async fn embed(&self, text: &str, traceparent: Option<&str>) -> Vec<Option<String>> {
        let mut jobs = Vec::new();
        for model in MODELS {
            jobs.push(
                self.client
                    .subscribe(model_job_subject(model))
                    .await
                    .unwrap(),
            );
        }
        self.client.flush().await.unwrap();
        let mut headers = HeaderMap::new();
        if let Some(traceparent) = traceparent {
            headers.insert(TRACEPARENT, traceparent);
        }
        let payload = serde_json::to_vec(&serde_json::json!({ "input": [text] })).unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(60),
            self.client
                .request_with_headers(EMBED_ENDPOINT, headers, payload.into()),
        )
        .await
        .expect("a reply within 60 s")
        .expect("request");
        let failed = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVICE_ERROR_CODE));
        assert!(failed.is_none(), "error reply: {:?}", reply.headers);
        let body: EmbedReply = serde_json::from_slice(&reply.payload).expect("reply decodes");
        assert_eq!(body.data.len(), 1);
        let mut published = Vec::new();
        for mut subscription in jobs {
            let job = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("the job was published")
                .unwrap();
            published.push(
                job.headers
                    .as_ref()
                    .and_then(|h| h.get(TRACEPARENT))
                    .map(|v| v.as_str().to_string()),
            );
        }
        published
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("roles stop")
                .expect("role task");
        }
    }
}

/// Waits until `ready` holds for the finished spans; returns them.
async fn spans_when(ready: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    for _ in 0..500 {
        let spans = exporter().get_finished_spans().unwrap();
        if ready(&spans) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spans = exporter().get_finished_spans().unwrap();
    let names: Vec<_> = spans
        .iter()
        .map(|s| (s.name.to_string(), s.span_context.trace_id()))
        .collect();
    panic!("the expected spans never finished; have: {names:?}");
}

fn named<'a>(spans: &'a [SpanData], trace: TraceId, name: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && s.name == name)
        .collect()
}

/// The batch spans that link to the job span `job`.
fn batches_linking<'a>(spans: &'a [SpanData], job: &SpanData) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == "batch"
                && s.links
                    .iter()
                    // The link's copy came out of the job's headers, so it is remote:
                    // compare the ids.
                    .any(|link| {
                        link.span_context.trace_id() == job.span_context.trace_id()
                            && link.span_context.span_id() == job.span_context.span_id()
                    })
        })
        .collect()
}

/// A request's trace is complete once the request span, its two jobs' replies and the two
/// batch spans linking to those jobs have finished.
fn complete(spans: &[SpanData], trace: TraceId) -> bool {
    let jobs = named(spans, trace, "job");
    named(spans, trace, "embed.request").len() == 1
        && jobs.len() == MODELS.len()
        && named(spans, trace, "job.reply").len() == MODELS.len()
        && jobs
            .iter()
            .all(|job| batches_linking(spans, job).len() == 1)
}

fn traceparent_parts(header: &str) -> (TraceId, SpanId) {
    let parent = trace_context::remote_span_context(Some(&{
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, header);
        headers
    }))
    .expect("a valid traceparent");
    (parent.trace_id(), parent.span_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_through_coordinator_and_worker_is_one_connected_trace() {
    exporter();
    let fleet = start_fleet().await;
    let client_trace = TraceId::from_hex(CLIENT_TRACE).unwrap();
    let client_span = SpanId::from_hex(CLIENT_SPAN).unwrap();

    // 1. The client's trace is continued.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let published = fleet
        .embed("traces cross every hop", Some(&traceparent))
        .await;
    let spans = spans_when(|spans| complete(spans, client_trace)).await;

    let request = named(&spans, client_trace, "embed.request");
    let request = request[0];
    assert_eq!(request.span_kind, SpanKind::Server);
    assert_eq!(
        request.parent_span_id, client_span,
        "a child of the client's span"
    );
    assert!(request.parent_span_is_remote);
    let request_id = request.span_context.span_id();

    // The coordinator's stages are children of the request span. Both models' partials are
    // looked up (their revisions are known) and missed, then written with the fused vector.
    for (stage, count) in [
        ("decode", 1),
        ("cache.lookup", 1 + MODELS.len()),
        ("fusion", 1),
        ("reply", 1),
        ("cache.write", 1),
    ] {
        let found = named(&spans, client_trace, stage);
        assert_eq!(found.len(), count, "{stage} spans: {found:?}");
        assert!(
            found.iter().all(|s| s.parent_span_id == request_id),
            "{stage} is a child of the request span"
        );
    }

    // One job span per model, each published with a traceparent of the same trace naming it.
    let jobs = named(&spans, client_trace, "job");
    let mut job_ids = HashSet::new();
    for job in &jobs {
        assert_eq!(job.span_kind, SpanKind::Producer);
        assert_eq!(job.parent_span_id, request_id);
        job_ids.insert(job.span_context.span_id());
    }
    let mut published_ids = HashSet::new();
    for header in &published {
        let (trace, span) = traceparent_parts(header.as_deref().expect("the job's traceparent"));
        assert_eq!(trace, client_trace, "the job carries the client's trace");
        published_ids.insert(span);
    }
    assert_eq!(
        published_ids, job_ids,
        "each job's traceparent names its job span"
    );

    // The worker's side: queue wait and reply under each job span, in the same trace.
    for stage in ["queue.wait", "job.reply"] {
        let found = named(&spans, client_trace, stage);
        let parents: HashSet<SpanId> = found.iter().map(|s| s.parent_span_id).collect();
        assert_eq!(parents, job_ids, "one {stage} under each job");
    }
    // Each batch span starts its own trace and links to the job span it served; the model
    // call is its child.
    for job in &jobs {
        let batch = batches_linking(&spans, job)[0];
        assert_eq!(
            batch.parent_span_id,
            SpanId::INVALID,
            "a batch has no one parent"
        );
        assert_ne!(batch.span_context.trace_id(), client_trace);
        let models = named(&spans, batch.span_context.trace_id(), "model");
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].parent_span_id, batch.span_context.span_id());
    }

    // Connected: every span of the trace hangs, through its parents, off the client's span.
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == client_trace)
        .collect();
    let ids: HashSet<SpanId> = in_trace.iter().map(|s| s.span_context.span_id()).collect();
    for span in &in_trace {
        assert!(
            span.parent_span_id == client_span || ids.contains(&span.parent_span_id),
            "{} has a parent outside the trace",
            span.name
        );
    }

    // 2. No traceparent, and 3. a malformed one: the request works and starts a new trace,
    // which its jobs carry on.
    for (text, traceparent) in [
        ("no trace from the client", None),
        ("a garbage trace header", Some("00-not-a-trace-context")),
    ] {
        let known: HashSet<TraceId> = exporter()
            .get_finished_spans()
            .unwrap()
            .iter()
            .filter(|s| s.name == "embed.request")
            .map(|s| s.span_context.trace_id())
            .collect();
        let published = fleet.embed(text, traceparent).await;
        let spans = spans_when(|spans| {
            spans.iter().any(|s| {
                s.name == "embed.request"
                    && !known.contains(&s.span_context.trace_id())
                    && complete(spans, s.span_context.trace_id())
            })
        })
        .await;
        let request = spans
            .iter()
            .find(|s| s.name == "embed.request" && !known.contains(&s.span_context.trace_id()))
            .unwrap();
        assert_eq!(
            request.parent_span_id,
            SpanId::INVALID,
            "{text}: a new root"
        );
        let trace = request.span_context.trace_id();
        assert_ne!(trace, client_trace);
        for header in &published {
            let (job_trace, _) = traceparent_parts(header.as_deref().expect("traceparent"));
            assert_eq!(job_trace, trace, "{text}: the jobs carry the new trace");
        }
    }
    fleet.stop().await;
}
