//! `embedfleet coordinator`: the embed.v1 service alone, against a given NATS (and Redis). It
//! holds no model weights; workers (`embedfleet worker`) do the embedding.

use clap::Args;

use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::metrics::CoordinatorCollector;

use crate::fleet_args::{self, CacheArgs, CoordinatorArgs, NatsArgs, QueueArgs};
use crate::http_args::{HttpArgs, RoleHttp};

/// Readiness conditions of a coordinator, besides NATS.
pub const FUSION_BUILT: &str = "fusion layer built";
pub const SERVING: &str = "embed.v1 subscribed";

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
    #[command(flatten)]
    http: HttpArgs,
}

pub fn run(args: CoordinatorRoleArgs) -> anyhow::Result<()> {
    // Secret files are read first: a wrong path fails in milliseconds, not after the build.
    let security = args.nats.security.security()?;
    let http = RoleHttp::start(&args.http, "coordinator", &[FUSION_BUILT, SERVING])?;
    let specs = fleet_args::model_specs(&args.models)?;
    let fusion = args.coordinator.fusion_stage(&specs, None)?;
    http.ready(FUSION_BUILT);
    fleet_args::runtime()?.block_on(async {
        let shutdown = fleet_args::shutdown_on_signals()?;
        let client =
            fleet_args::connect(&args.nats.nats_url, "embedfleet-coordinator", &security).await?;
        http.watch_nats(&client);
        let cache = args.cache.connect().await?;
        let coordinator = Coordinator::new(
            client.clone(),
            args.coordinator.config(&args.models),
            args.queues.config(),
            cache,
            fusion,
        );
        http.collect(CoordinatorCollector::new(&coordinator));
        let url = args.nats.nats_url.clone();
        let models = args.models.join(",");
        coordinator
            .run(shutdown, || {
                http.ready(SERVING);
                fleet_args::announce_ready("coordinator", &url, &format!("default-models={models}"))
            })
            .await?;
        fleet_args::drain(client).await;
        Ok(())
    })
}
