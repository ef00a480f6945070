//! Flags and plumbing the fleet roles (`serve`, `coordinator`, `worker`) share: NATS, cache,
//! queue and batching settings, the runtime, and shutdown on SIGTERM/SIGINT. Credentials and TLS
//! flags are in `security_args.rs`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use embedfleet_cache::{CacheConfig, VectorCache};
use embedfleet_client::NatsSecurity;
use embedfleet_fleet::fusion::{catalogue_widths, FusionStage};
use embedfleet_fleet::fusion_device::FusionDevice;
use embedfleet_fleet::{BatchConfig, CoordinatorConfig, QueueConfig};
use embedfleet_models::{catalogue, DeviceName, ImageLimits, ModelDtypes, ModelSpec};

use crate::security_args::{NatsSecurityArgs, RedisSecurityArgs};

/// Where NATS is, and how to prove who we are to it.
#[derive(Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server with JetStream, e.g. nats://10.0.0.5:4222 (tls://... for TLS).
    #[arg(
        long,
        env = "EMBEDFLEET_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    #[command(flatten)]
    pub security: NatsSecurityArgs,
}

/// The job queues (JetStream) as the roles declare them.
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// How long a worker may hold a job unacknowledged before it is redelivered to another.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub ack_wait_ms: u64,
    /// Deliveries of a job before it is given up on and its request answered with the error.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(1..=100))]
    pub max_deliver: i64,
    /// Queued jobs per model; past it that model's requests get 429 while others go on.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub max_jobs_per_model: i64,
}

impl QueueArgs {
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            max_deliver: self.max_deliver,
            max_jobs_per_model: self.max_jobs_per_model,
            ..QueueConfig::default()
        }
    }
}

/// The coordinator's admission, deadline and fusion settings.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Requests handled at once; more are refused with 429 (overloaded) rather than queued.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_in_flight: u64,
    /// End-to-end deadline of a request that sends no Embedfleet-Timeout-Ms header; past it
    /// the reply is 503.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub request_timeout_ms: u64,
    /// The longest timeout a request may ask for in its Embedfleet-Timeout-Ms header.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub max_request_timeout_ms: u64,
    /// More model sets to fuse besides the default one, each as models joined by `+`
    /// (`minilm+mpnet+bge-large`), comma-separated. Subsets of a set are fused too.
    #[arg(long, value_delimiter = ',')]
    pub fuse_sets: Vec<String>,
    /// Consecutive failed jobs of a model that open its circuit breaker (0: no breakers).
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,
    /// How long an open breaker sends no jobs before one probe.
    #[arg(long, default_value_t = 10_000)]
    pub breaker_cool_down_ms: u64,
    /// Trained FuseMoE weights (safetensors) for the default model set; without it, the seeded
    /// weights every node shares.
    #[arg(long, env = "EMBEDFLEET_FUSION_WEIGHTS")]
    pub fusion_weights: Option<PathBuf>,
    /// Where FuseMoE runs: `cpu`, or `cuda:N` in a CUDA build; without a usable GPU at start the
    /// coordinator says so and fuses on the CPU.
    #[arg(long, env = "EMBEDFLEET_FUSION_DEVICE", default_value = "cpu")]
    pub fusion_device: DeviceName,
}

impl CoordinatorArgs {
    pub fn config(&self, default_models: &[String]) -> CoordinatorConfig {
        CoordinatorConfig {
            max_in_flight: self.max_in_flight as usize,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_request_timeout: Duration::from_millis(
                self.max_request_timeout_ms.max(self.request_timeout_ms),
            ),
            default_models: default_models.to_vec(),
            fusable_sets: self.fusable_sets(),
            breaker: embedfleet_fleet::coordinator::BreakerConfig {
                failure_threshold: self.breaker_failures,
                cool_down: Duration::from_millis(self.breaker_cool_down_ms),
            },
            ..CoordinatorConfig::default()
        }
    }

    /// `--fuse-sets` as model-name lists.
    pub fn fusable_sets(&self) -> Vec<Vec<String>> {
        self.fuse_sets
            .iter()
            .map(|set| set.split('+').map(|name| name.trim().to_string()).collect())
            .collect()
    }

    /// The fusion stage, with the default set's layer built now (seconds for large sets) so
    /// the first request does not pay for it. `loaded_widths` are the widths the default set's
    /// checkpoints produce, when this process loads them (`serve`): a weights file that does
    /// not fit them fails here. A lone coordinator learns them from the workers, so it builds
    /// for the catalogue widths and checks a file on each request.
    pub fn fusion_stage(
        &self,
        default_models: &[&'static ModelSpec],
        loaded_widths: Option<&[usize]>,
    ) -> anyhow::Result<FusionStage> {
        let stage = match &self.fusion_weights {
            Some(path) => FusionStage::from_file(path, default_models)
                .with_context(|| format!("fusion weights {}", path.display()))?,
            None => FusionStage::seeded(),
        }
        .with_device(FusionDevice::open(self.fusion_device));
        let prebuilt = match (loaded_widths, &self.fusion_weights) {
            (Some(widths), _) => Some(widths.to_vec()),
            // The file's layer is loaded; its widths are checked on each request.
            (None, Some(_)) => None,
            (None, None) => Some(catalogue_widths(default_models)),
        };
        if let Some(widths) = prebuilt {
            stage
                .layer(default_models, &widths)
                .map_err(|e| anyhow::anyhow!("fusion layer: {e}"))?;
        }
        // The other fusable sets are checked now (an unknown name is a start-up error) and
        // their layers built on first use.
        for set in self.fusable_sets() {
            model_specs(&set).context("--fuse-sets")?;
        }
        Ok(stage)
    }
}

/// The two-tier vector cache.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Redis shared by the fleet, e.g. redis://10.0.0.6:6379. Without it, results are cached in
    /// this process only.
    #[arg(long, env = "EMBEDFLEET_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Bound of the in-process cache, in MiB (0 disables it).
    #[arg(long, default_value_t = 128)]
    pub cache_mb: usize,
    /// Expiry of Redis entries, in seconds; 0 for none (Redis' maxmemory policy evicts).
    #[arg(long, default_value_t = embedfleet_cache::DEFAULT_TTL_SECS)]
    pub cache_ttl_secs: u64,
    /// Store vectors as f16: half the memory, about 1e-3 absolute error.
    #[arg(long)]
    pub cache_f16: bool,
    #[command(flatten)]
    pub security: RedisSecurityArgs,
}

impl CacheArgs {
    pub async fn connect(&self) -> anyhow::Result<Arc<VectorCache>> {
        if self.redis_url.is_none() {
            eprintln!(
                "embedfleet: no --redis-url: caching in this process only ({} MiB)",
                self.cache_mb
            );
        }
        let config = self.security.apply(CacheConfig {
            lru_bytes: self.cache_mb << 20,
            redis_url: self.redis_url.clone(),
            ttl_secs: (self.cache_ttl_secs > 0).then_some(self.cache_ttl_secs),
            f16: self.cache_f16,
            ..CacheConfig::default()
        });
        Ok(Arc::new(
            VectorCache::connect(config).await.context("cache")?,
        ))
    }
}

/// How a worker hosts its models.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Directory with one checkpoint directory per model (`<dir>/minilm/config.json`, ...).
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Where the models run: `cpu`, or `cuda:N` in a CUDA build (`--features cuda`); one worker
    /// per GPU (`embedfleet plan` says which models go where). A model that does not fit in the
    /// GPU's free memory is refused at start.
    #[arg(long, env = "EMBEDFLEET_DEVICE", default_value = "cpu")]
    pub device: DeviceName,
    /// Weight dtype (f32, f16, bf16, q8_0, q4k) of every model (`q8_0`), per model
    /// (`e5-mistral=q4k,minilm=f32`, as `embedfleet plan` prints it), or both (`f32,e5-mistral=q4k`).
    /// q8_0/q4k quantise the linear layers at load. Default: f32 on a CPU. T5 refuses f16.
    #[arg(long)]
    pub dtype: Option<ModelDtypes>,
    /// Longest audio input whisper-large embeds, in seconds; longer is `too_large` (413).
    #[arg(long, env = "EMBEDFLEET_MAX_AUDIO_SECONDS", default_value_t = 600.0)]
    pub max_audio_seconds: f64,
    /// Most inputs in one forward batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// Estimated tokens in one forward batch.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(512..))]
    pub token_budget: u64,
    /// How long the first job of a batch waits for company.
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
    /// Batches of one model that run at once: the next is gathered while one is in the model.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub batches_in_flight: u64,
    /// The watchdog: a model call past this many milliseconds is abandoned, its jobs go to
    /// other workers and this worker reports itself unready until the call returns (0: off).
    #[arg(long, default_value_t = 120_000)]
    pub hung_after_ms: u64,
    #[command(flatten)]
    pub images: ImageLimitArgs,
}

/// Bounds on image inputs (clip-vit-l), checked on the declared dimensions before decoding:
/// past them an image is refused with 413, so a decompression bomb costs a header read.
#[derive(Args, Clone, Debug)]
pub struct ImageLimitArgs {
    /// Widest and tallest image accepted, in pixels.
    #[arg(long, env = "EMBEDFLEET_IMAGE_MAX_SIDE", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub image_max_side: u32,
    /// Most pixels (width x height) in one image.
    #[arg(long, env = "EMBEDFLEET_IMAGE_MAX_PIXELS", default_value_t = 64_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub image_max_pixels: u64,
}

impl ImageLimitArgs {
    pub fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_side: self.image_max_side,
            max_pixels: self.image_max_pixels,
            ..ImageLimits::default()
        }
    }
}

impl WorkerArgs {
    pub fn batch_config(&self) -> BatchConfig {
        BatchConfig {
            max_inputs: self.max_batch as usize,
            token_budget: self.token_budget as usize,
            max_wait: Duration::from_millis(self.max_wait_ms),
            batches_in_flight: self.batches_in_flight as usize,
            hung_after: Duration::from_millis(self.hung_after_ms),
        }
    }
}

/// Catalogue entries for `names`, in slot order; an unknown name is an error that lists them.
pub fn model_specs(names: &[String]) -> anyhow::Result<Vec<&'static ModelSpec>> {
    let specs = names
        .iter()
        .map(|name| embedfleet_models::registry::lookup(name))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(catalogue::in_slot_order(specs))
}

/// The roles' runtime: a worker thread per core for the async side; models and fusion run on
/// tokio's blocking pool.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("embedfleet")
        .build()
        .context("starting the async runtime")
}

/// Connects to NATS with `security`'s credentials and TLS settings, failing fast (with the URL
/// and why) when it is unreachable or refuses us at start; after that the client reconnects on
/// its own, forever.
pub async fn connect(
    url: &str,
    name: &str,
    security: &NatsSecurity,
) -> anyhow::Result<async_nats::Client> {
    let options = security.apply(async_nats::ConnectOptions::new()).await?;
    options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(%other, "NATS event"),
            }
        })
        .connect(url)
        .await
        .map_err(|error| connect_error(url, security, error))
}

/// A failed first connection as one line that says what to check.
fn connect_error(
    url: &str,
    security: &NatsSecurity,
    error: async_nats::ConnectError,
) -> anyhow::Error {
    let hint = crate::security_args::connect_hint(&error);
    anyhow::anyhow!(
        "cannot connect to NATS at {url} ({}): {error}: {hint}",
        security.describe()
    )
}

/// A token cancelled on the first SIGTERM or SIGINT. A second signal exits at once, for an
/// operator who does not want to wait for the drain.
pub fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            seen += 1;
            if seen == 1 {
                eprintln!("embedfleet: shutting down: finishing work in flight (signal again to exit now)");
                cancel.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
    Ok(token)
}

/// The one line that says a role is up; scripts and tests wait for ` ready: `.
pub fn announce_ready(role: &str, nats_url: &str, detail: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "embedfleet {role} ready: nats={nats_url} {detail}");
    let _ = out.flush();
}

/// Drains a connection (flushes what is buffered, then closes), bounded: with the server gone a
/// drain would wait forever, and shutdown must end.
pub async fn drain(client: async_nats::Client) {
    match tokio::time::timeout(Duration::from_secs(5), client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "draining the NATS connection"),
        Err(_) => tracing::warn!("draining the NATS connection timed out"),
    }
}
