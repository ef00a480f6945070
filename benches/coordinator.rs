//! Coordinator overhead: what the fleet adds to the same work done in one process.
//!
//! The models are the testkit's `FixedVectorModel` (a hash expanded into a vector: test support
//! code whose cost is near zero), so what is measured is everything around the models. Fusion is
//! real: the seeded FuseMoE layer of minilm + mpnet (1,152 → 1,536). Side by side, batch 1 and 32:
//!
//! - `in-process`: fixed-vector partials → normalise → the fusion stage's layer, `fuse_batch`,
//!   on the calling thread; no NATS, no cache.
//! - `fleet cold`: `EmbedClient` → `embed.v1` → coordinator (cache miss) → one JetStream job per
//!   model → worker (default batching, `max_wait` 2 ms) → partials → fusion → reply. Distinct
//!   inputs each iteration (a counter in the text), so every lookup misses.
//! - `fleet cold, max_wait 0`: the same with a worker that runs what is queued at once instead
//!   of waiting up to 2 ms for company: the share of the batching window in the figure above.
//! - `fleet warm`: the same request repeatedly: answered from the coordinator's fused cache
//!   (in-process LRU), no job, no fusion.
//! - `fleet warm, msgpack`: the warm round trip with MessagePack instead of JSON bodies.
//!
//! Everything runs in this process against a real `nats-server -js` started by
//! `embedfleet-testkit`: one tokio runtime with two worker threads for the client, the
//! coordinator and the worker, each on its own NATS connection, as in `embedfleet serve`.
//! Run: `cargo bench -p embedfleet-benches --bench coordinator`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput};
use embedfleet_benches::sentences;
use embedfleet_cache::{CacheConfig, VectorCache};
use embedfleet_client::EmbedClient;
use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::fusion::{fuse_rows, FusionStage};
use embedfleet_fleet::fusion_device::FusionDevice;
use embedfleet_fleet::worker::{run_worker, WorkerConfig};
use embedfleet_fleet::{BatchConfig, CoordinatorConfig, QueueConfig};
use embedfleet_fusion::FuseMoe;
use embedfleet_models::{catalogue, EmbedOptions, EmbeddingModel, ModelInput, ModelSpec};
use embedfleet_proto::{EmbedRequest, Encoding};
use embedfleet_testkit::{FixedVectorModel, NatsServer};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const MODELS: [&str; 2] = ["minilm", "mpnet"];
const BATCHES: [usize; 2] = [1, 32];
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let specs = catalogue::in_slot_order(
        MODELS
            .iter()
            .map(|name| catalogue::find(name).expect("catalogue model"))
            .collect(),
    );
    let texts = Texts::new();

    eprintln!("coordinator bench: starting nats-server and two in-process fleets");
    let batching = runtime.block_on(Fleet::start(&specs, BatchConfig::default()));
    let no_wait = runtime.block_on(Fleet::start(
        &specs,
        BatchConfig {
            max_wait: Duration::ZERO,
            ..BatchConfig::default()
        },
    ));
    let in_process = InProcess::new(&specs);

    for batch in BATCHES {
        let mut group = criterion.benchmark_group(format!("coordinator/batch {batch}"));
        group.throughput(Throughput::Elements(batch as u64));

        group.bench_function("in-process", |b| {
            b.iter_batched(
                || texts.inputs(batch),
                |inputs| in_process.embed(&inputs),
                BatchSize::SmallInput,
            )
        });
        bench_cold(&mut group, "fleet cold", &runtime, &batching, &texts, batch);
        bench_cold(
            &mut group,
            "fleet cold, max_wait 0",
            &runtime,
            &no_wait,
            &texts,
            batch,
        );
        for (name, encoding) in [
            ("fleet warm", Encoding::Json),
            ("fleet warm, msgpack", Encoding::MsgPack),
        ] {
            let client = batching.client.clone().with_encoding(encoding);
            let request = texts.request(batch);
            // Fill the cache, and check that the next round trip really is a hit.
            for _ in 0..2 {
                runtime.block_on(embed(&client, &request));
            }
            let reply = runtime.block_on(embed(&client, &request));
            assert!(
                reply.data.iter().all(|data| data.cached),
                "{name}: the repeated request was not answered from the cache"
            );
            group.bench_function(name, |b| {
                b.iter(|| runtime.block_on(embed(&client, &request)))
            });
        }
        group.finish();
    }

    runtime.block_on(batching.stop());
    runtime.block_on(no_wait.stop());
    criterion.final_summary();
}

fn bench_cold(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    runtime: &Runtime,
    fleet: &Fleet,
    texts: &Texts,
    batch: usize,
) {
    group.bench_function(name, |b| {
        b.iter_batched(
            || texts.request(batch),
            |request| runtime.block_on(embed(&fleet.client, &request)),
            BatchSize::SmallInput,
        )
    });
}

async fn embed(client: &EmbedClient, request: &EmbedRequest) -> embedfleet_proto::EmbedReply {
    match client.embed(request).await {
        Ok(reply) => reply,
        Err(error) => panic!("embed.v1 request failed: {error}"),
    }
}

/// Bench inputs: the bench sentences with a counter appended, so that every call gets inputs
/// no earlier call had (cold cache) at the sentences' lengths.
struct Texts {
    sentences: Vec<String>,
    next: AtomicU64,
    /// Distinguishes this run's inputs from an earlier run's.
    run: u64,
}

impl Texts {
    fn new() -> Self {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Texts {
            sentences: sentences(),
            next: AtomicU64::new(0),
            run,
        }
    }

    fn texts(&self, batch: usize) -> Vec<String> {
        (0..batch)
            .map(|_| {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let sentence = &self.sentences[n as usize % self.sentences.len()];
                format!("{sentence} [{} {n}]", self.run)
            })
            .collect()
    }

    fn inputs(&self, batch: usize) -> Vec<ModelInput> {
        self.texts(batch)
            .into_iter()
            .map(ModelInput::Text)
            .collect()
    }

    fn request(&self, batch: usize) -> EmbedRequest {
        EmbedRequest::texts(self.texts(batch)).with_models(MODELS)
    }
}

/// The fleet's work without the fleet: the fixed models, normalisation and fusion in a row.
struct InProcess {
    models: Vec<FixedVectorModel>,
    layer: Arc<FuseMoe>,
}

impl InProcess {
    fn new(specs: &[&'static ModelSpec]) -> Self {
        InProcess {
            models: specs
                .iter()
                .map(|spec| FixedVectorModel::new(spec.name).expect("fixed model"))
                .collect(),
            layer: FusionStage::seeded()
                .layer(specs, &embedfleet_fleet::fusion::catalogue_widths(specs))
                .expect("fusion layer"),
        }
    }

    fn embed(&self, inputs: &[ModelInput]) -> Vec<embedfleet_fusion::FusedEmbedding> {
        // normalize: true is the coordinator's l2_normalize of each partial.
        let options = EmbedOptions::default();
        let partials: Vec<Vec<Vec<f32>>> = self
            .models
            .iter()
            .map(|model| {
                model
                    .embed_batch(inputs, &options)
                    .expect("fixed model embeds")
                    .into_iter()
                    .map(|embedding| embedding.vector)
                    .collect()
            })
            .collect();
        let rows: Vec<Vec<Option<&[f32]>>> = (0..inputs.len())
            .map(|i| {
                partials
                    .iter()
                    .map(|slot| Some(slot[i].as_slice()))
                    .collect()
            })
            .collect();
        fuse_rows(&FusionDevice::cpu(), &self.layer, &rows).expect("fusion")
    }
}

/// A coordinator and a worker hosting both fixed models, on their own nats-server.
struct Fleet {
    _nats: NatsServer,
    client: EmbedClient,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(specs: &[&'static ModelSpec], batch: BatchConfig) -> Fleet {
        let nats = NatsServer::start().unwrap_or_else(|e| panic!("nats-server: {e}"));
        let connect = || async {
            async_nats::connect(nats.url())
                .await
                .unwrap_or_else(|e| panic!("connect to {}: {e}", nats.url()))
        };
        let cache = VectorCache::connect(CacheConfig::default())
            .await
            .expect("in-process cache");
        let fusion = FusionStage::seeded();
        // Built now, as `serve` does, so no request pays for it.
        fusion
            .layer(specs, &embedfleet_fleet::fusion::catalogue_widths(specs))
            .expect("fusion layer");
        let coordinator = Coordinator::new(
            connect().await,
            CoordinatorConfig {
                default_models: MODELS.map(String::from).to_vec(),
                ..CoordinatorConfig::default()
            },
            QueueConfig::default(),
            Arc::new(cache),
            fusion,
        );
        let models: Vec<Arc<dyn EmbeddingModel>> = specs
            .iter()
            .map(|spec| {
                Arc::new(FixedVectorModel::new(spec.name).expect("fixed model"))
                    as Arc<dyn EmbeddingModel>
            })
            .collect();
        for model in &models {
            coordinator.prime_revision(model.spec().name, model.revision());
        }

        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let run = coordinator.run(shutdown.clone(), move || {
            let _ = ready_tx.send(());
        });
        let mut tasks = vec![tokio::spawn(async move {
            run.await.expect("coordinator");
        })];
        ready_rx.await.expect("coordinator ready");
        let worker = run_worker(
            connect().await,
            models,
            WorkerConfig {
                queues: QueueConfig::default(),
                batch,
            },
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(async move {
            worker.await.expect("worker");
        }));

        let client = EmbedClient::new(connect().await).with_timeout(REQUEST_TIMEOUT);
        // One round trip before any timing: the consumers exist and the worker pulls.
        embed(
            &client,
            &EmbedRequest::texts(["coordinator bench warm-up"]).with_models(MODELS),
        )
        .await;
        Fleet {
            _nats: nats,
            client,
            shutdown,
            tasks,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                eprintln!("coordinator bench: a fleet role did not stop within 10 s");
            }
        }
    }
}
