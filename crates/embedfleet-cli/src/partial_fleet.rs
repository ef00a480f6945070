//! Partials from a running fleet (`--nats-url` of `eval`, `fusion train` and `fusion partials`):
//! the texts go to the fleet as unfused `embed.v1` requests for one model at a time, and the
//! per-model vectors that come back fill the same on-disk cache the in-process models fill.
//!
//! Why it shares the cache: a worker's vectors are the in-process model's (same code, same
//! weights, same normalisation), and both are filed under the weights' revision. The fleet's
//! revision of each model is read from the workers' announcements (the JetStream key-value bucket
//! `embedfleet_revisions`), so partials computed by a fleet on GPUs and partials computed here
//! land in the same file when the checkpoints are the same, and in different files when not.
//!
//! A fleet can roll out new weights while a fill runs (hot swap, a rolling upgrade). The
//! revision is read before and after each model's fill; if it changed, what was appended in
//! between is cut off again and the fill fails, so no file mixes two revisions.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use embedfleet_client::{ClientError, EmbedClient, NatsSecurity};
use embedfleet_fleet::revisions::{Announcement, REVISIONS_BUCKET};
use embedfleet_proto::{EmbedRequest, InputType};
use futures::{StreamExt, TryStreamExt};

/// Texts per request: small enough that a request of long documents on a CPU worker stays well
/// inside the deadline, large enough for the worker to batch.
pub const REQUEST_TEXTS: usize = 16;

/// Requests in flight at once: keeps every worker of the model busy (the fleet batches what
/// arrives together) while bounding what waits in the queue and in memory.
pub const IN_FLIGHT: usize = 4;

/// How long the fleet may take over one request. Requests queue behind each other in the fleet,
/// so this is larger than an interactive request's default.
const DEADLINE: Duration = Duration::from_secs(120);

/// Called with each request's texts and their vectors, in the texts' order.
pub type OnBatch<'a> = dyn FnMut(&[&String], Vec<Vec<f32>>) -> anyhow::Result<()> + 'a;

/// A connection to a fleet that computes partials.
pub struct FleetPartials {
    runtime: tokio::runtime::Runtime,
    client: EmbedClient,
    jetstream: jetstream::Context,
    url: String,
}

impl FleetPartials {
    pub fn connect(url: &str, security: &NatsSecurity) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let client = runtime
            .block_on(EmbedClient::connect_with(url, security))
            .map_err(|e| fleet_error(e, url))?
            .with_fleet_deadline(DEADLINE);
        // The JetStream context starts a task of its own: it needs the runtime.
        let jetstream = runtime.block_on(async { jetstream::new(client.nats().clone()) });
        Ok(FleetPartials {
            runtime,
            client,
            jetstream,
            url: url.to_string(),
        })
    }

    /// What the fleet's workers announced for `model`: its revision and width.
    pub fn announcement(&self, model: &str) -> anyhow::Result<Announcement> {
        let url = &self.url;
        let missing = || {
            format!(
                "no worker of {model} has announced itself on the fleet at {url}: start one \
                 (`embedfleet worker --models {model}`, or `serve` with it)"
            )
        };
        let value = self.runtime.block_on(async {
            // No bucket (or none readable): no worker of any model has started on this server.
            let Ok(bucket) = self.jetstream.get_key_value(REVISIONS_BUCKET).await else {
                return Ok(None);
            };
            bucket
                .get(model)
                .await
                .with_context(|| format!("reading {model}'s revision from the fleet on {url}"))
        })?;
        let value = value.with_context(missing)?;
        Announcement::decode(&value)
            .with_context(|| format!("{model}'s revision on the fleet at {url} is not UTF-8"))
    }

    /// `model`'s vector of every text, `IN_FLIGHT` requests of `REQUEST_TEXTS` at a time;
    /// `on_batch(texts, vectors)` for each request, in the texts' order.
    pub fn embed(
        &self,
        model: &str,
        texts: &[&String],
        input_type: InputType,
        on_batch: &mut OnBatch<'_>,
    ) -> anyhow::Result<()> {
        let url = &self.url;
        self.runtime.block_on(async {
            let mut replies = futures::stream::iter(texts.chunks(REQUEST_TEXTS))
                .map(|chunk| async move {
                    let request = EmbedRequest::texts(chunk.iter().map(|t| t.as_str()))
                        .with_models([model])
                        .with_fuse(false)
                        .with_partials(true)
                        .with_input_type(input_type);
                    let reply = self
                        .client
                        .embed(&request)
                        .await
                        .map_err(|e| fleet_error(e, url))?;
                    anyhow::ensure!(
                        reply.data.len() == chunk.len(),
                        "the fleet on {url} answered {} vectors for {} texts",
                        reply.data.len(),
                        chunk.len()
                    );
                    let vectors = reply
                        .data
                        .into_iter()
                        .map(|data| {
                            data.partials
                                .and_then(|mut partials| partials.remove(model))
                                .with_context(|| {
                                    format!("the fleet on {url} sent no {model} partial")
                                })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    Ok::<_, anyhow::Error>((chunk, vectors))
                })
                .buffered(IN_FLIGHT);
            while let Some((chunk, vectors)) = replies.try_next().await? {
                on_batch(chunk, vectors)?;
            }
            Ok(())
        })
    }
}

fn fleet_error(error: ClientError, url: &str) -> anyhow::Error {
    match error {
        ClientError::NoResponders => anyhow::anyhow!(
            "no embedfleet service answers on {url}: start one with `embedfleet serve`"
        ),
        other => anyhow::anyhow!("partials from the fleet on {url}: {other}"),
    }
}
