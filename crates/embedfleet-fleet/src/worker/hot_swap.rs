//! Hot swap: a worker replaces a hosted model's weights while it serves.
//!
//! # The command
//! Every worker that can swap (it was given a [`ModelLoader`]) subscribes to
//! [`swap_subject`]`(model)` = `embedfleet.admin.swap.<model>` for each model it hosts, and answers
//! a request there with a JSON [`SwapReply`]. The request body is a JSON [`SwapRequest`]:
//! `{"dir": "/path/to/checkpoint"}` loads the checkpoint directory named (it holds `config.json`
//! and the weights, like `<models dir>/<model>/`); an empty body or `{}` re-reads the model's
//! configured source (what the worker loaded at start: `--model-dir`, then the Hugging Face
//! cache). Every worker hosting the model answers, each with its own reply; `SIGHUP` to a worker
//! process does the same as `{}` for each of its models, one after another.
//!
//! # A swap
//! 1. **Claim** the model: one swap per model at a time. A second request while one runs is
//!    refused at once with [`SwapErrorCode::InProgress`] (not queued: a queue of multi-gigabyte
//!    loads is not something to hold on an operator's behalf).
//! 2. **Load** the new weights on a blocking thread, beside the copy serving, which goes on
//!    taking and running batches meanwhile: the worker needs room for two copies of the model
//!    (on a GPU the load's free-memory check sees the first copy as used, and refuses with
//!    [`SwapErrorCode::NoMemory`]).
//! 3. **Check and warm**: the new copy must produce vectors of the same width (the coordinators'
//!    fusion layers are built for the width announced), and runs one small batch, so the first
//!    job does not pay for lazy initialisation and a checkpoint that loads but cannot run is
//!    refused before it serves anything.
//! 4. **Switch**: the model's slot now hands the new copy to every batch that starts. A batch
//!    takes its copy once, when it starts, and uses it for its forward pass and for the revision
//!    in each of its partials, so batches already running finish on the old weights, and no
//!    batch mixes revisions.
//! 5. **Announce** the new revision in the revisions bucket (see `revisions.rs`), so coordinators
//!    key cache lookups by it at once.
//! 6. **Free**: the old copy is dropped when the last batch holding it ends.
//!
//! A failure at any step before the switch leaves the old copy serving, untouched. A new
//! checkpoint with the revision already serving is not switched to (`ok`, old = new).
//! At shutdown, a swap still loading is abandoned: nothing is switched, nothing is announced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use async_nats::jetstream;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use embedfleet_models::{EmbedOptions, EmbeddingModel, ModelError};
use embedfleet_proto::{Input, Modality};

use crate::revisions;

/// Prefix of the swap command subjects: `embedfleet.admin.swap.<model>`. Admin subjects are for
/// operators only: deploy/nats/permissions.conf lets no client, coordinator or worker publish
/// them.
pub const SWAP_SUBJECT_PREFIX: &str = "embedfleet.admin.swap";

/// The subject a swap of `model` is requested on.
pub fn swap_subject(model: &str) -> String {
    format!("{SWAP_SUBJECT_PREFIX}.{model}")
}

/// Loads a fresh copy of a model: from the checkpoint directory when one is named, else from the
/// model's configured source. Runs on a blocking thread; must not return a cached copy (the
/// old weights could then never be freed). `ModelRegistry::load_fresh` is one.
pub type ModelLoader =
    Arc<dyn Fn(&str, Option<&Path>) -> Result<Arc<dyn EmbeddingModel>, ModelError> + Send + Sync>;

/// What to swap to; the body of a swap command (JSON; an empty body is the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    /// A checkpoint directory, as the worker's machine sees it. `None`: the configured source,
    /// read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// The answer to a swap command (JSON, `"status"` says which).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SwapReply {
    /// New batches run on `new_revision` (the same as `old_revision` when the checkpoint was the
    /// one serving: nothing was switched). `announced` is false when the revisions bucket could
    /// not be written; partials still carry the new revision.
    Ok {
        model: String,
        old_revision: String,
        new_revision: String,
        announced: bool,
    },
    /// Nothing was switched: the old weights serve on.
    Error {
        model: String,
        code: SwapErrorCode,
        message: String,
    },
}

/// Why a swap did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapErrorCode {
    /// The body is not a [`SwapRequest`].
    BadRequest,
    /// This worker does not host the model.
    UnknownModel,
    /// A swap of this model is still loading; try again when it has answered.
    InProgress,
    /// The weights could not be found or loaded (missing files, corrupt weights, bad config).
    LoadFailed,
    /// The device has no room for a second copy of the model.
    NoMemory,
    /// The new checkpoint is not a drop-in replacement (other vector width).
    Incompatible,
    /// The new copy loaded but failed its warm-up batch.
    WarmUpFailed,
    /// This worker was started without a loader: it cannot swap.
    Disabled,
}

impl SwapReply {
    fn error(model: &str, code: SwapErrorCode, message: impl Into<String>) -> Self {
        SwapReply::Error {
            model: model.to_string(),
            code,
            message: message.into(),
        }
    }
}

/// The copy of one model that new batches take, replaced by a swap.
pub(super) struct ModelSlot {
    current: RwLock<Arc<dyn EmbeddingModel>>,
    /// A swap of this model is under way.
    swapping: AtomicBool,
}

impl ModelSlot {
    pub(super) fn new(model: Arc<dyn EmbeddingModel>) -> Self {
        ModelSlot {
            current: RwLock::new(model),
            swapping: AtomicBool::new(false),
        }
    }

    /// The copy serving now; a batch takes it once and keeps it to the end.
    pub(super) fn current(&self) -> Arc<dyn EmbeddingModel> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs `model` for every batch that starts from now on; returns the copy it replaced.
    fn replace(&self, model: Arc<dyn EmbeddingModel>) -> Arc<dyn EmbeddingModel> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, model)
    }
}

/// A claimed swap of one model; the claim ends when this is dropped, however the swap ends.
struct Claim(Arc<ModelSlot>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.swapping.store(false, Ordering::Release);
    }
}

/// The swaps of one worker's models; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct HotSwap {
    slots: Arc<HashMap<&'static str, Arc<ModelSlot>>>,
    loader: Option<ModelLoader>,
    js: jetstream::Context,
}

impl HotSwap {
    pub(super) fn new(
        slots: HashMap<&'static str, Arc<ModelSlot>>,
        loader: Option<ModelLoader>,
        client: async_nats::Client,
    ) -> Self {
        HotSwap {
            slots: Arc::new(slots),
            loader,
            js: jetstream::new(client),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.loader.is_some()
    }

    /// The hosted models' names.
    pub fn models(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.slots.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// The revision `model` serves new batches with, if this worker hosts it.
    pub fn revision_of(&self, model: &str) -> Option<String> {
        let slot = self.slots.get(model)?;
        Some(slot.current().revision().to_string())
    }

    /// Swaps `model` as `request` says and answers how it went; see the module docs.
    pub async fn swap(&self, model: &str, request: SwapRequest) -> SwapReply {
        match self.claim(model) {
            Ok(claim) => self.run(model, claim, request).await,
            Err(refused) => refused,
        }
    }

    /// Claims `model` for a swap, or the reply refusing it (not hosted, disabled, in progress).
    fn claim(&self, model: &str) -> Result<Claim, SwapReply> {
        let Some(slot) = self.slots.get(model) else {
            return Err(SwapReply::error(
                model,
                SwapErrorCode::UnknownModel,
                format!("this worker does not host `{model}`"),
            ));
        };
        if !self.enabled() {
            return Err(SwapReply::error(
                model,
                SwapErrorCode::Disabled,
                "this worker was started without a model loader",
            ));
        }
        if slot
            .swapping
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(SwapReply::error(
                model,
                SwapErrorCode::InProgress,
                format!("a swap of `{model}` is still loading"),
            ));
        }
        Ok(Claim(slot.clone()))
    }

    async fn run(&self, model: &str, claim: Claim, request: SwapRequest) -> SwapReply {
        let Some(loader) = self.loader.clone() else {
            unreachable!("claim refuses swaps without a loader");
        };
        let slot = claim.0.clone();
        let old = slot.current();
        let (old_revision, old_dim) = (old.revision().to_string(), old.dim());
        // Only the slot keeps the old copy from here on, so in-flight batches alone decide when
        // it is freed.
        drop(old);
        tracing::info!(model, dir = ?request.dir, %old_revision, "hot swap: loading new weights");
        let name = model.to_string();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            let new = loader(&name, request.dir.as_deref()).map_err(|error| {
                let code = match error {
                    ModelError::DeviceMemory { .. } => SwapErrorCode::NoMemory,
                    ModelError::UnknownModel { .. } => SwapErrorCode::UnknownModel,
                    _ => SwapErrorCode::LoadFailed,
                };
                (code, error.to_string())
            })?;
            if new.spec().name != name || new.dim() != old_dim {
                return Err((
                    SwapErrorCode::Incompatible,
                    format!(
                        "the new checkpoint is `{}` producing {} wide vectors; `{name}` serves {old_dim}",
                        new.spec().name,
                        new.dim()
                    ),
                ));
            }
            warm_up(new.as_ref()).map_err(|error| {
                (
                    SwapErrorCode::WarmUpFailed,
                    format!("the new weights failed their warm-up batch: {error}"),
                )
            })?;
            Ok(new)
        })
        .await;
        let new = match loaded {
            Ok(Ok(new)) => new,
            Ok(Err((code, message))) => {
                tracing::warn!(model, ?code, reason = %message, "hot swap refused; the old weights serve on");
                return SwapReply::error(model, code, message);
            }
            Err(join) => {
                let message = format!("loading the new weights panicked: {join}");
                tracing::error!(model, reason = %message, "hot swap failed; the old weights serve on");
                return SwapReply::error(model, SwapErrorCode::LoadFailed, message);
            }
        };
        // The load-time gauge a worker's start sets, now for the new copy.
        crate::metrics::global().model_loaded(new.spec().name, started.elapsed());
        let new_revision = new.revision().to_string();
        if new_revision == old_revision {
            tracing::info!(model, revision = %new_revision, "hot swap: revision unchanged; kept the copy serving");
            return SwapReply::Ok {
                model: model.to_string(),
                old_revision,
                new_revision,
                announced: true,
            };
        }
        let announcement = revisions::Announcement {
            revision: new_revision.clone(),
            dim: Some(new.dim()),
        };
        // The switch. The returned old copy is dropped at once: batches still running hold
        // their own references, and the last one to end frees the weights.
        drop(slot.replace(new));
        let announced = match revisions::announce(&self.js, model, &announcement).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(model, %error, "hot swap: cannot announce the new revision; partials carry it");
                false
            }
        };
        tracing::info!(model, %old_revision, %new_revision, "hot swap done: new batches run on the new weights");
        drop(claim);
        SwapReply::Ok {
            model: model.to_string(),
            old_revision,
            new_revision,
            announced,
        }
    }
}

/// One forward pass of one short text, before a model serves: lazy initialisation (allocator,
/// kernels) is paid here rather than by the first job, and a checkpoint that loads but cannot
/// run is refused. Models that take no text (whisper) are not warmed.
pub fn warm_up(model: &dyn EmbeddingModel) -> Result<(), ModelError> {
    if !model.spec().takes(Modality::Text) {
        return Ok(());
    }
    model
        .embed_batch(&[Input::Text("warm up".into())], &EmbedOptions::default())
        .map(drop)
}

/// Subscribes to the swap commands of every hosted model. Done before the job loops start, on
/// the same connection, so a worker that has taken a job is already listening.
pub(super) async fn subscribe_swap_commands(
    client: &async_nats::Client,
    swaps: &HotSwap,
) -> Vec<(&'static str, async_nats::Subscriber)> {
    let mut subscriptions = Vec::new();
    for model in swaps.models() {
        match client.subscribe(swap_subject(model)).await {
            Ok(subscriber) => subscriptions.push((model, subscriber)),
            Err(error) => {
                tracing::error!(model, %error, "cannot subscribe to swap commands; hot swap of this model is off")
            }
        }
    }
    subscriptions
}

/// Answers swap commands for every hosted model until `shutdown`; see the module docs. At most
/// one swap per model runs at a time (others are refused at once), so the work held here is
/// bounded by the number of models.
pub(super) async fn serve_swap_commands(
    client: async_nats::Client,
    swaps: HotSwap,
    subscriptions: Vec<(&'static str, async_nats::Subscriber)>,
    shutdown: CancellationToken,
) {
    let mut commands = futures::stream::select_all(
        subscriptions
            .into_iter()
            .map(|(model, subscriber)| subscriber.map(move |message| (model, message))),
    );
    let mut running = JoinSet::new();
    loop {
        let (model, message) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Err(error) = joined {
                    tracing::error!(%error, "a hot swap task failed");
                }
                continue;
            }
            command = commands.next() => match command {
                Some(command) => command,
                None => break,
            },
        };
        let Some(reply_to) = message.reply.clone() else {
            tracing::warn!(model, "swap command without a reply subject; ignored");
            continue;
        };
        let request = if message.payload.iter().all(u8::is_ascii_whitespace) {
            Ok(SwapRequest::default())
        } else {
            serde_json::from_slice::<SwapRequest>(&message.payload)
        };
        let claimed = match request {
            Ok(request) => swaps.claim(model).map(|claim| (claim, request)),
            Err(error) => Err(SwapReply::error(
                model,
                SwapErrorCode::BadRequest,
                format!("the body is not a swap request ({{\"dir\": \"...\"}} or empty): {error}"),
            )),
        };
        match claimed {
            Ok((claim, request)) => {
                let (swaps, client) = (swaps.clone(), client.clone());
                running.spawn(async move {
                    let reply = swaps.run(model, claim, request).await;
                    send_reply(&client, reply_to, &reply).await;
                });
            }
            Err(refused) => send_reply(&client, reply_to, &refused).await,
        }
    }
    // A load cannot be interrupted; its task is, so nothing is switched or announced after
    // shutdown (the blocking thread finishes and its copy is dropped).
    running.shutdown().await;
}

async fn send_reply(client: &async_nats::Client, reply_to: async_nats::Subject, reply: &SwapReply) {
    let body = serde_json::to_vec(reply).expect("a swap reply always serialises");
    if let Err(error) = client.publish(reply_to, body.into()).await {
        tracing::warn!(%error, "cannot send the swap reply");
    }
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "cannot flush the swap reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_as_documented() {
        let request: SwapRequest = serde_json::from_str(r#"{"dir": "/srv/minilm-v2"}"#).unwrap();
        assert_eq!(request.dir.as_deref(), Some(Path::new("/srv/minilm-v2")));
        assert_eq!(
            serde_json::from_str::<SwapRequest>("{}").unwrap(),
            SwapRequest::default()
        );
        assert!(serde_json::from_str::<SwapRequest>(r#"{"path": "/x"}"#).is_err());

        let reply = SwapReply::error("minilm", SwapErrorCode::InProgress, "busy");
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"status":"error","model":"minilm","code":"in_progress","message":"busy"}"#
        );
        let ok = SwapReply::Ok {
            model: "minilm".into(),
            old_revision: "a".into(),
            new_revision: "b".into(),
            announced: true,
        };
        let text = serde_json::to_string(&ok).unwrap();
        assert!(
            text.starts_with(r#"{"status":"ok","model":"minilm""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<SwapReply>(&text).unwrap(), ok);
    }

    #[test]
    fn swap_subjects_name_the_model() {
        assert_eq!(swap_subject("bge-large"), "embedfleet.admin.swap.bge-large");
    }
}
