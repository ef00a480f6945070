//! `embedfleet worker`: hosts the given models and serves their JetStream job queues.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use embedfleet_fleet::metrics::{self, WorkerCollector};
use embedfleet_fleet::worker::{
    warm_up, HotSwap, ModelLoader, ModelWorker, SwapReply, SwapRequest, WorkerConfig,
};
use embedfleet_models::{AudioLimits, EmbeddingModel, ModelRegistry, WeightResolver};

use crate::fleet_args::{self, NatsArgs, QueueArgs, WorkerArgs};
use crate::http_args::{HttpArgs, RoleHttp};

#[derive(Args)]
pub struct WorkerRoleArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Models this worker hosts, comma-separated; it pulls each one's queue.
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    queues: QueueArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Do not answer swap commands on `embedfleet.admin.swap.<model>` (SIGHUP still re-reads
    /// the configured weights). NATS permissions are the real guard: let only operators
    /// publish `embedfleet.admin.>`.
    #[arg(long)]
    no_hot_swap: bool,
}

/// Readiness conditions of a worker, besides NATS.
pub const MODELS_LOADED: &str = "models loaded and warmed";
pub const CONSUMERS_BOUND: &str = "consumers bound";

/// A worker's models, loaded and warmed, with the registry that loaded them: it loads a hot
/// swap's new copies the same way (device, dtype, limits). Every copy is a fresh load that the
/// registry does not keep, so a swapped-out copy is freed.
pub struct LoadedModels {
    pub models: Vec<Arc<dyn EmbeddingModel>>,
    pub registry: Arc<ModelRegistry>,
}

/// Loads `names` now (a missing checkpoint fails the start, not the first job).
pub fn load_models(names: &[String], worker: &WorkerArgs) -> anyhow::Result<LoadedModels> {
    let specs = fleet_args::model_specs(names)?;
    let device = worker.device.open()?;
    let registry = ModelRegistry::new(WeightResolver::from_env(worker.model_dir.clone()), device)
        .with_dtypes(worker.dtype.clone().unwrap_or_default())
        .with_audio_limits(AudioLimits {
            max_seconds: worker.max_audio_seconds,
        })
        .with_image_limits(worker.images.limits());
    let models = specs
        .iter()
        .map(|spec| {
            eprintln!(
                "embedfleet: loading {} on {} ({})",
                spec.name,
                worker.device,
                registry.dtype_of(spec)
            );
            let started = std::time::Instant::now();
            let model = registry
                .load_fresh(spec.name, None)
                .map_err(anyhow::Error::from)?;
            // One forward pass before the worker says it is ready: the first job does not pay
            // for lazy initialisation, and a model that loads but cannot run fails the start.
            warm_up(model.as_ref())
                .map_err(|e| anyhow::anyhow!("warming up {}: {e}", spec.name))?;
            metrics::global().model_loaded(spec.name, started.elapsed());
            Ok(model)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(LoadedModels {
        models,
        registry: Arc::new(registry),
    })
}

/// A hot swap's loader: a fresh copy from the checkpoint directory named, or from the
/// configured source (`--model-dir`, then the Hugging Face cache) read again.
fn swap_loader(registry: Arc<ModelRegistry>) -> ModelLoader {
    Arc::new(move |name, dir| registry.load_fresh(name, dir))
}

/// On each SIGHUP, swaps every hosted model to its configured source read again, one model
/// after another (so at most one model has two copies loaded), and logs each outcome.
fn swap_on_sighup(swaps: HotSwap) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            for model in swaps.models() {
                match swaps.swap(model, SwapRequest::default()).await {
                    SwapReply::Ok {
                        old_revision,
                        new_revision,
                        ..
                    } => eprintln!("embedfleet: SIGHUP: {model}: {old_revision} -> {new_revision}"),
                    SwapReply::Error { code, message, .. } => {
                        eprintln!("embedfleet: SIGHUP: {model}: not swapped ({code:?}): {message}")
                    }
                }
            }
        }
    });
    Ok(())
}

/// Declares the job stream and the models' consumers, so that jobs queued from now on are kept
/// for these models even before the first pull.
pub async fn declare_queues(
    client: &async_nats::Client,
    models: &[Arc<dyn EmbeddingModel>],
    config: &embedfleet_fleet::QueueConfig,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = embedfleet_fleet::queues::ensure_job_stream(&js, config)
        .await
        .map_err(|e| anyhow::anyhow!("job stream: {e}"))?;
    for model in models {
        let name = model.spec().name;
        embedfleet_fleet::queues::ensure_model_consumer(&stream, name, config)
            .await
            .map_err(|e| anyhow::anyhow!("consumer for {name}: {e}"))?;
    }
    Ok(())
}

pub fn run(args: WorkerRoleArgs) -> anyhow::Result<()> {
    // Secret files are read first: a wrong path fails in milliseconds, not after the load.
    let security = args.nats.security.security()?;
    let http = RoleHttp::start(&args.http, "worker", &[MODELS_LOADED, CONSUMERS_BOUND])?;
    let LoadedModels { models, registry } = load_models(&args.models, &args.worker)?;
    http.ready(MODELS_LOADED);
    fleet_args::runtime()?.block_on(async {
        let shutdown = fleet_args::shutdown_on_signals()?;
        let client =
            fleet_args::connect(&args.nats.nats_url, "embedfleet-worker", &security).await?;
        http.watch_nats(&client);
        let config = WorkerConfig {
            queues: args.queues.config(),
            batch: args.worker.batch_config(),
        };
        declare_queues(&client, &models, &config.queues).await?;
        http.ready(CONSUMERS_BOUND);
        fleet_args::announce_ready(
            "worker",
            &args.nats.nats_url,
            &format!("models={}", args.models.join(",")),
        );
        // SIGHUP swaps whatever --no-hot-swap says: only someone on the worker's machine can
        // send it.
        let worker = ModelWorker::new(client.clone(), models, config)?
            .with_hot_swap(swap_loader(registry), !args.no_hot_swap);
        swap_on_sighup(worker.hot_swap())?;
        http.collect(WorkerCollector::new(worker.stats()));
        let report = worker.run(shutdown).await?;
        tracing::info!(?report, "worker stopped");
        fleet_args::drain(client).await;
        Ok(())
    })
}
