//! `embedfleet coordinator`: the embed.v1 service alone, against a given NATS (and Redis). It
//! holds no model weights; workers (`embedfleet worker`) do the embedding.

use clap::Args;

use embedfleet_fleet::coordinator::Coordinator;

use crate::fleet_args::{self, CacheArgs, CoordinatorArgs, NatsArgs, QueueArgs};

#[derive(Args)]
pub struct CoordinatorRoleArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Model set of requests that name none, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    models: Vec<String>,
    #[command(flatten)]
    coordinator: CoordinatorArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    queues: QueueArgs,
}

pub fn run(args: CoordinatorRoleArgs) -> anyhow::Result<()> {
    let specs = fleet_args::model_specs(&args.models)?;
    let fusion = args.coordinator.fusion_stage(&specs, None)?;
    fleet_args::runtime()?.block_on(async {
        let shutdown = fleet_args::shutdown_on_signals()?;
        let client = fleet_args::connect(&args.nats.nats_url, "embedfleet-coordinator").await?;
        let cache = args.cache.connect().await?;
        let coordinator = Coordinator::new(
            client.clone(),
            args.coordinator.config(&args.models),
            args.queues.config(),
            cache,
            fusion,
        );
        let url = args.nats.nats_url.clone();
        let models = args.models.join(",");
        coordinator
            .run(shutdown, || {
                fleet_args::announce_ready("coordinator", &url, &format!("default-models={models}"))
            })
            .await?;
        fleet_args::drain(client).await;
        Ok(())
    })
}
