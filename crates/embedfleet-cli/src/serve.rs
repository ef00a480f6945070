//! `embedfleet serve`: the whole fleet in one process — coordinator, fusion and a worker for
//! the given models — on a given NATS, or on a child nats-server it starts itself. With
//! `--plan`, one worker per GPU of a placement plan (`embedfleet plan --format json`).

use std::path::PathBuf;

use clap::Args;

use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::embedded_nats::EmbeddedNats;
use embedfleet_fleet::metrics::{CoordinatorCollector, WorkerCollector};
use embedfleet_fleet::worker::{ModelWorker, WorkerConfig};

use crate::coordinator::{FUSION_BUILT, SERVING};
use crate::fleet_args::{self, CacheArgs, CoordinatorArgs, QueueArgs, WorkerArgs};
use crate::http_args::{HttpArgs, RoleHttp};
use crate::plan_file::{read_plan, DeviceGroup};
use crate::security_args::NatsSecurityArgs;
use crate::worker::{declare_queues, load_models, CONSUMERS_BOUND, MODELS_LOADED};

#[derive(Args)]
pub struct ServeArgs {
    /// Models to host and to run for requests that name none, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    models: Vec<String>,
    /// A placement plan (`embedfleet plan --format json --out plan.json`): one worker per GPU
    /// it uses, each hosting the models the plan put there; the plan's models are the default
    /// set, at the plan's dtypes. Replaces --models, --device and --dtype.
    #[arg(long, conflicts_with = "models")]
    plan: Option<PathBuf>,
    /// NATS server with JetStream. Without it, serve starts its own `nats-server -js` on a free
    /// loopback port with a temporary store, and prints its URL.
    #[arg(long, env = "EMBEDFLEET_NATS_URL")]
    nats_url: Option<String>,
    #[command(flatten)]
    nats_security: NatsSecurityArgs,
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
    // Secret files are read first: a wrong path fails in milliseconds, not after the load.
    let security = args.nats_security.security()?;
    let conditions = [MODELS_LOADED, CONSUMERS_BOUND, FUSION_BUILT, SERVING];
    let http = RoleHttp::start(&args.http, "serve", &conditions)?;
    let groups = match &args.plan {
        Some(path) => read_plan(path)?,
        None => vec![DeviceGroup {
            device: args.worker.device,
            models: args.models.clone(),
            dtypes: Vec::new(),
        }],
    };
    let default_models = plan_models(&groups);
    let specs = fleet_args::model_specs(&default_models)?;
    let mut hosted = Vec::with_capacity(groups.len());
    for group in &groups {
        let dtype = match group.dtypes.is_empty() {
            true => args.worker.dtype.clone(),
            false => Some(
                group
                    .dtypes
                    .join(",")
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--plan: dtypes of {}: {e}", group.device))?,
            ),
        };
        let worker = WorkerArgs {
            device: group.device,
            dtype,
            ..args.worker.clone()
        };
        // serve's in-process workers take no swap commands: the registry is not kept.
        hosted.push(load_models(&group.models, &worker)?.models);
    }
    http.ready(MODELS_LOADED);
    // Slot order, like the specs: the fusion layer is built for what these checkpoints produce.
    let widths: Vec<usize> = specs
        .iter()
        .map(|spec| {
            hosted
                .iter()
                .flatten()
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
        let coordinator_client =
            fleet_args::connect(&url, "embedfleet-serve-coordinator", &security).await?;
        let worker_client = fleet_args::connect(&url, "embedfleet-serve-worker", &security).await?;
        http.watch_nats(&coordinator_client);
        let cache = args.cache.connect().await?;
        let queues = args.queues.config();
        let coordinator = Coordinator::new(
            coordinator_client.clone(),
            args.coordinator.config(&default_models),
            queues.clone(),
            cache,
            fusion,
        );
        for model in hosted.iter().flatten() {
            coordinator.prime_revision(model.spec().name, model.revision());
            coordinator.prime_width(model.spec().name, model.dim());
        }
        for models in &hosted {
            declare_queues(&worker_client, models, &queues).await?;
        }
        http.ready(CONSUMERS_BOUND);
        http.collect(CoordinatorCollector::new(&coordinator));

        // The workers stop only after the coordinator has answered everything it admitted,
        // since those answers need them.
        let stop_workers = tokio_util::sync::CancellationToken::new();
        let mut workers = Vec::with_capacity(hosted.len());
        for models in hosted {
            let worker = ModelWorker::new(
                worker_client.clone(),
                models,
                WorkerConfig {
                    queues: queues.clone(),
                    batch: args.worker.batch_config(),
                },
            )?;
            http.collect(WorkerCollector::new(worker.stats()));
            workers.push(tokio::spawn(worker.run(stop_workers.clone())));
        }
        let detail = format!("models={}", default_models.join(","));
        let served = coordinator
            .run(shutdown, || {
                http.ready(SERVING);
                fleet_args::announce_ready("serve", &url, &detail)
            })
            .await;
        stop_workers.cancel();
        let mut reports = Vec::with_capacity(workers.len());
        for worker in workers {
            reports.push(worker.await?);
        }
        fleet_args::drain(coordinator_client).await;
        fleet_args::drain(worker_client).await;
        served?;
        for report in reports {
            let report = report?;
            tracing::info!(?report, "worker stopped");
        }
        anyhow::Ok(())
    });
    drop(embedded);
    result
}

/// Every model of the plan once, in the order the plan names them.
fn plan_models(groups: &[DeviceGroup]) -> Vec<String> {
    let mut models: Vec<String> = Vec::new();
    for model in groups.iter().flat_map(|group| &group.models) {
        if !models.contains(model) {
            models.push(model.clone());
        }
    }
    models
}
