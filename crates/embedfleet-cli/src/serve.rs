//! `embedfleet serve`: the whole fleet in one process — coordinator, fusion and a worker for
//! the given models — on a given NATS, or on a child nats-server it starts itself.

use clap::Args;

use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::embedded_nats::EmbeddedNats;
use embedfleet_fleet::metrics::{CoordinatorCollector, WorkerCollector};
use embedfleet_fleet::worker::{ModelWorker, WorkerConfig};

use crate::coordinator::{FUSION_BUILT, SERVING};
use crate::fleet_args::{self, CacheArgs, CoordinatorArgs, QueueArgs, WorkerArgs};
use crate::http_args::{HttpArgs, RoleHttp};
use crate::worker::{declare_queues, load_models, CONSUMERS_BOUND, MODELS_LOADED};

#[derive(Args)]
pub struct ServeArgs {
    /// Models to host and to run for requests that name none, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    models: Vec<String>,
    /// NATS server with JetStream. Without it, serve starts its own `nats-server -js` on a free
    /// loopback port with a temporary store, and prints its URL.
    #[arg(long, env = "EMBEDFLEET_NATS_URL")]
    nats_url: Option<String>,
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    queues: QueueArgs,
    #[command(flatten)]
    http: HttpArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let conditions = [MODELS_LOADED, CONSUMERS_BOUND, FUSION_BUILT, SERVING];
    let http = RoleHttp::start(&args.http, "serve", &conditions)?;
    let specs = fleet_args::model_specs(&args.models)?;
    let models = load_models(&args.models, &args.worker)?;
    http.ready(MODELS_LOADED);
    // Slot order, like the specs: the fusion layer is built for what these checkpoints produce.
    let widths: Vec<usize> = specs
        .iter()
        .map(|spec| {
            models
                .iter()
                .find(|m| m.spec().name == spec.name)
                .map_or(spec.dim, |m| m.dim())
        })
        .collect();
    let fusion = args.coordinator.fusion_stage(&specs, Some(&widths))?;
    http.ready(FUSION_BUILT);
    // Started before the runtime and dropped after it, so the server outlives every client.
    let embedded = match &args.nats_url {
        Some(_) => None,
        None => Some(EmbeddedNats::start()?),
    };
    let url = match (&args.nats_url, &embedded) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url().to_string(),
        (None, None) => unreachable!("a server was started when no URL was given"),
    };
    if embedded.is_some() {
        eprintln!("embedfleet: started nats-server -js at {url} (temporary store)");
    }

    let result = fleet_args::runtime()?.block_on(async {
        let shutdown = fleet_args::shutdown_on_signals()?;
        // Separate connections: a burst of replies on one never delays the other's acks.
        let coordinator_client = fleet_args::connect(&url, "embedfleet-serve-coordinator").await?;
        let worker_client = fleet_args::connect(&url, "embedfleet-serve-worker").await?;
        http.watch_nats(&coordinator_client);
        let cache = args.cache.connect().await?;
        let queues = args.queues.config();
        let coordinator = Coordinator::new(
            coordinator_client.clone(),
            args.coordinator.config(&args.models),
            queues.clone(),
            cache,
            fusion,
        );
        for model in &models {
            coordinator.prime_revision(model.spec().name, model.revision());
            coordinator.prime_width(model.spec().name, model.dim());
        }
        declare_queues(&worker_client, &models, &queues).await?;
        http.ready(CONSUMERS_BOUND);
        http.collect(CoordinatorCollector::new(&coordinator));

        // The workers stop only after the coordinator has answered everything it admitted,
        // since those answers need them.
        let stop_workers = tokio_util::sync::CancellationToken::new();
        let worker = ModelWorker::new(
            worker_client.clone(),
            models,
            WorkerConfig {
                queues,
                batch: args.worker.batch_config(),
            },
        )?;
        http.collect(WorkerCollector::new(worker.stats()));
        let worker = tokio::spawn(worker.run(stop_workers.clone()));
        let detail = format!("models={}", args.models.join(","));
        let served = coordinator
            .run(shutdown, || {
                http.ready(SERVING);
                fleet_args::announce_ready("serve", &url, &detail)
            })
            .await;
        stop_workers.cancel();
        let report = worker.await?;
        fleet_args::drain(coordinator_client).await;
        fleet_args::drain(worker_client).await;
        served?;
        let report = report?;
        tracing::info!(?report, "workers stopped");
        anyhow::Ok(())
    });
    drop(embedded);
    result
}
