//! `embedfleet worker`: hosts the given models and serves their JetStream job queues.

use std::sync::Arc;

use clap::Args;

use embedfleet_fleet::worker::{run_worker, WorkerConfig};
use embedfleet_models::{Device, EmbeddingModel, ModelRegistry, WeightResolver};

use crate::fleet_args::{self, NatsArgs, QueueArgs, WorkerArgs};

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
}

/// Loads `names` now (a missing checkpoint fails the start, not the first job).
pub fn load_models(
    names: &[String],
    worker: &WorkerArgs,
) -> anyhow::Result<Vec<Arc<dyn EmbeddingModel>>> {
    let specs = fleet_args::model_specs(names)?;
    let registry = ModelRegistry::new(
        WeightResolver::from_env(worker.model_dir.clone()),
        Device::Cpu,
    );
    specs
        .iter()
        .map(|spec| {
            eprintln!("embedfleet: loading {}", spec.name);
            registry.get(spec.name).map_err(anyhow::Error::from)
        })
        .collect()
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
    let models = load_models(&args.models, &args.worker)?;
    fleet_args::runtime()?.block_on(async {
        let shutdown = fleet_args::shutdown_on_signals()?;
        let client = fleet_args::connect(&args.nats.nats_url, "embedfleet-worker").await?;
        let config = WorkerConfig {
            queues: args.queues.config(),
            batch: args.worker.batch_config(),
        };
        declare_queues(&client, &models, &config.queues).await?;
        fleet_args::announce_ready(
            "worker",
            &args.nats.nats_url,
            &format!("models={}", args.models.join(",")),
        );
        let report = run_worker(client.clone(), models, config, shutdown).await?;
        tracing::info!(?report, "worker stopped");
        fleet_args::drain(client).await;
        Ok(())
    })
}
