//! The fleet the coordinator tests run: a real nats-server (and redis-server when asked), a
//! coordinator, and workers hosting the testkit's fixed-vector models, so every expected vector
//! can be computed in the test.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use embedfleet_cache::{CacheConfig, VectorCache};
use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::fusion::{catalogue_widths, FusionStage};
use embedfleet_fleet::worker::{run_worker, WorkerConfig};
use embedfleet_fleet::{BatchConfig, CoordinatorConfig, QueueConfig};
use embedfleet_models::{catalogue, model::l2_normalize, EmbeddingModel, ModelSpec};
use embedfleet_proto::{
    EmbedReply, EmbedRequest, ProtoError, CONTENT_TYPE, CONTENT_TYPE_MSGPACK, EMBED_ENDPOINT,
    SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use embedfleet_testkit::{FixedVectorModel, NatsServer};

pub struct Fleet {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub coordinator: Arc<Coordinator>,
    pub models: Vec<Arc<FixedVectorModel>>,
    pub shutdown: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn queues() -> QueueConfig {
    QueueConfig {
        ack_wait: Duration::from_secs(2),
        ..QueueConfig::default()
    }
}

impl Fleet {
    /// A coordinator and one worker hosting `worker_models` (fixed-vector), default set
    /// minilm+mpnet.
    pub async fn start(
        worker_models: &[&str],
        config: CoordinatorConfig,
        redis_url: Option<String>,
        delay: Duration,
    ) -> Fleet {
        let models = worker_models
            .iter()
            .map(|name| FixedVectorModel::new(name).unwrap().with_delay(delay))
            .collect();
        Fleet::start_with(models, config, queues(), redis_url).await
    }

    /// A coordinator with `config` and `queues`, and one worker hosting `models` (none: no
    /// worker).
    pub async fn start_with(
        models: Vec<FixedVectorModel>,
        config: CoordinatorConfig,
        queues: QueueConfig,
        redis_url: Option<String>,
    ) -> Fleet {
        let nats = NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let cache = VectorCache::connect(CacheConfig {
            redis_url,
            ..CacheConfig::default()
        })
        .await
        .expect("cache");
        // Built up front, as `serve` does: a seeded layer takes a while to build, which would
        // otherwise come out of the first request's deadline.
        let fusion = FusionStage::seeded();
        fusion
            .layer(
                &default_set(&config),
                &catalogue_widths(&default_set(&config)),
            )
            .expect("default fusion layer");
        let coordinator = Coordinator::new(
            client.clone(),
            config,
            queues.clone(),
            Arc::new(cache),
            fusion,
        );
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut tasks = Vec::new();
        let run = coordinator.clone().run(shutdown.clone(), move || {
            let _ = ready_tx.send(());
        });
        tasks.push(tokio::spawn(async move {
            run.await.expect("coordinator");
        }));
        ready_rx.await.expect("coordinator ready");

        let models: Vec<Arc<FixedVectorModel>> = models.into_iter().map(Arc::new).collect();
        if !models.is_empty() {
            let worker_client = async_nats::connect(nats.url()).await.expect("connect");
            let hosted: Vec<Arc<dyn EmbeddingModel>> = models
                .iter()
                .map(|m| m.clone() as Arc<dyn EmbeddingModel>)
                .collect();
            let config = WorkerConfig {
                queues,
                batch: BatchConfig::default(),
            };
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                run_worker(worker_client, hosted, config, stop)
                    .await
                    .expect("worker");
            }));
        }
        Fleet {
            nats,
            client,
            coordinator,
            models,
            shutdown,
            tasks,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("roles stop after shutdown")
                .expect("role task");
        }
    }

    /// Sends raw bytes with `headers`; returns (error code header, the reply).
    pub async fn raw_with(
        &self,
        mut headers: HeaderMap,
        payload: Vec<u8>,
        msgpack: bool,
    ) -> (Option<u16>, async_nats::Message) {
        if msgpack {
            headers.insert(CONTENT_TYPE, CONTENT_TYPE_MSGPACK);
        }
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            self.client
                .request_with_headers(EMBED_ENDPOINT, headers, payload.into()),
        )
        .await
        .expect("a reply within 30 s")
        .expect("request");
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVICE_ERROR_CODE))
            .map(|v| v.as_str().parse().expect("numeric code"));
        (code, reply)
    }

    /// Sends raw bytes; returns (error code header, body).
    pub async fn raw(&self, payload: Vec<u8>, msgpack: bool) -> (Option<u16>, Bytes) {
        let (code, reply) = self.raw_with(HeaderMap::new(), payload, msgpack).await;
        (code, reply.payload)
    }

    pub async fn embed(&self, request: &EmbedRequest) -> EmbedReply {
        let (code, body) = self.raw(serde_json::to_vec(request).unwrap(), false).await;
        assert_eq!(
            code,
            None,
            "error reply: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("reply decodes")
    }

    /// The error a request gets, from the micro service error headers.
    pub async fn error(&self, payload: Vec<u8>, msgpack: bool) -> ProtoError {
        self.error_with(HeaderMap::new(), payload, msgpack).await
    }

    pub async fn error_with(
        &self,
        headers: HeaderMap,
        payload: Vec<u8>,
        msgpack: bool,
    ) -> ProtoError {
        let (code, reply) = self.raw_with(headers, payload, msgpack).await;
        let code = code.expect("an error reply");
        let description = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVICE_ERROR))
            .map(|v| v.as_str().to_string())
            .expect("an error description");
        let error = ProtoError::from_service_error(code, &description);
        assert_eq!(error.code(), code, "the kind and the code agree");
        error
    }

    pub fn model(&self, name: &str) -> &FixedVectorModel {
        self.models
            .iter()
            .find(|m| m.spec().name == name)
            .expect("hosted model")
    }
}

pub fn default_set(config: &CoordinatorConfig) -> Vec<&'static ModelSpec> {
    catalogue::in_slot_order(
        config
            .default_models
            .iter()
            .map(|name| catalogue::find(name).expect("catalogue model"))
            .collect(),
    )
}

pub fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    l2_normalize(&mut v);
    v
}

pub fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

/// A worker hosting `model` alone, on its own shutdown token.
pub fn spawn_worker(
    url: String,
    model: FixedVectorModel,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_worker_with(url, Arc::new(model), queues(), stop)
}

pub fn spawn_worker_with(
    url: String,
    model: Arc<FixedVectorModel>,
    queues: QueueConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = async_nats::connect(url).await.expect("connect");
        let config = WorkerConfig {
            queues,
            batch: BatchConfig::default(),
        };
        run_worker(client, vec![model as Arc<dyn EmbeddingModel>], config, stop)
            .await
            .expect("worker");
    })
}

pub async fn wait_for_revision(coordinator: &Coordinator, model: &str, revision: &str) {
    for _ in 0..500 {
        if coordinator.revision_of(model).as_deref() == Some(revision) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the coordinator still has {model} at {:?}, not {revision}",
        coordinator.revision_of(model)
    );
}

/// Repeats `request` until every input is answered from the cache (writes follow the reply),
/// and returns that reply.
pub async fn cached_repeat(fleet: &Fleet, request: &EmbedRequest) -> EmbedReply {
    let mut reply = fleet.embed(request).await;
    for _ in 0..100 {
        if reply.data.iter().all(|d| d.cached) {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply = fleet.embed(request).await;
    }
    panic!("a repeat was never served from the cache: {reply:?}");
}
