//! The coordinator: the `embedfleet` NATS service and its `embed.v1` endpoint.
//!
//! Per request: admit (or 429) → decode (JSON or MessagePack, by `Content-Type`) → validate →
//! cache lookups (fused, then per-model partials) → one [`ModelJob`] per model for the misses,
//! published to JetStream → gather the [`PartialResult`]s on this coordinator's partial subject
//! → normalise, fuse → reply in the request's encoding → write the new vectors to the cache.
//!
//! Nothing here blocks on a model: the coordinator holds no weights, only the fusion layers, so
//! it scales apart from the workers and any number of coordinators share the queue group.
//!
//! # Modules
//! - `service`: the service loop, admission (429), the request's timeout, replies and error
//!   replies (through the micro service's error path, so `$SRV.STATS` counts them);
//! - `request`: decoding, validation, the cache and fusion steps of one request;
//! - `jobs`: job fan-out to the model queues, the wait for each partial (re-asking for a lost
//!   one), the `fallback` policy; `breaker`: the per-model circuit breakers;
//! - `routing`: the partial subscription and the table of jobs waiting;
//! - `table`: one request's partials; `cache_keys`: the keys of partials and fused vectors.

mod breaker;
mod cache_keys;
mod jobs;
mod request;
mod routing;
mod service;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use async_nats::jetstream;
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};

use embedfleet_cache::{CacheStats, VectorCache};

use crate::config::{CoordinatorConfig, QueueConfig};
use crate::fusion::FusionStage;
use crate::job::PartialResult;
use crate::plan::FusableSets;
use breaker::Breakers;
pub use breaker::{BreakerConfig, BreakerState};

/// Queue group of the `embed.v1` endpoint: every coordinator joins it, NATS gives each request
/// to one of them.
pub const QUEUE_GROUP: &str = "embedfleet";

/// Counters of one coordinator, exported in `$SRV.STATS.embedfleet` (endpoint `data`).
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    pub requests: AtomicU64,
    pub succeeded: AtomicU64,
    /// Error replies with a 4xx code (the client's fault), 429 excluded.
    pub client_errors: AtomicU64,
    /// Error replies with a 5xx code.
    pub server_errors: AtomicU64,
    /// Requests refused with 429 at admission.
    pub overloaded: AtomicU64,
    /// Inputs answered from the fused cache.
    pub fused_hits: AtomicU64,
    /// (input, model) pairs answered from the partial cache.
    pub partial_hits: AtomicU64,
    pub jobs_published: AtomicU64,
    /// Partials that arrived for no waiting job: late (after a timeout) or duplicates after a
    /// redelivery. Harmless, counted to make redeliveries visible.
    pub stray_partials: AtomicU64,
    /// Jobs published again because they left the queue without their partial arriving.
    pub reasked_jobs: AtomicU64,
    /// Replies answered without some model under `fallback: "partial"`.
    pub degraded: AtomicU64,
}

/// A point-in-time copy of [`CoordinatorStats`] plus the cache's counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub succeeded: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub overloaded: u64,
    pub fused_hits: u64,
    pub partial_hits: u64,
    pub jobs_published: u64,
    pub stray_partials: u64,
    pub reasked_jobs: u64,
    pub degraded: u64,
    /// Times a model's circuit breaker opened.
    pub breakers_opened: u64,
    /// Each model's breaker that has seen a job (closed / open / half_open).
    pub breakers: std::collections::BTreeMap<String, BreakerState>,
    pub in_flight: usize,
    pub cache: CacheStats,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
}

/// A running coordinator's shared state.
pub struct Coordinator {
    /// Unique per process; names this coordinator's partial subjects and job ids.
    id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    config: CoordinatorConfig,
    queues: QueueConfig,
    cache: Arc<VectorCache>,
    fusion: Arc<FusionStage>,
    /// The admission rule for model sets (the default set and `fusable_sets`).
    fusable: FusableSets,
    breakers: Breakers,
    /// Model → revision of the weights that last answered for it. Cache keys need revisions
    /// before a job runs; they are learnt from partials (or primed by `serve`, which hosts the
    /// workers). Until then a model's inputs skip the cache lookup, never serve a stale vector.
    revisions: RwLock<HashMap<String, String>>,
    /// Model → the revision its workers last announced, and when that arrived. For
    /// `max_request_timeout` after it, an announcement outranks partials: partials of the old
    /// weights from batches in flight at a swap arrive after it and must not switch the cache
    /// keys back (lookups would serve the old revision's vectors again). Past that, a revision
    /// that keeps answering wins over the announcement (its workers are gone: a rollback).
    announced: RwLock<HashMap<String, (String, Instant)>>,
    /// Model → width of the vectors its workers' checkpoint produces (the width rule: it may
    /// differ from the catalogue's), announced with the revision and confirmed by every vector
    /// seen. Fusion is built for these; the catalogue width stands in until one is known.
    widths: RwLock<HashMap<String, usize>>,
    /// Jobs waiting for their partial, by job id.
    pending: Mutex<HashMap<u64, oneshot::Sender<PartialResult>>>,
    next_job: AtomicU64,
    admission: Arc<Semaphore>,
    stats: CoordinatorStats,
}

impl Coordinator {
    /// A coordinator on `client`; call [`Coordinator::run`] to serve.
    pub fn new(
        client: async_nats::Client,
        config: CoordinatorConfig,
        queues: QueueConfig,
        cache: Arc<VectorCache>,
        fusion: FusionStage,
    ) -> Arc<Self> {
        let js = jetstream::new(client.clone());
        // The CLI checks the names before it gets here; a library caller's typo is logged and
        // that set left out (its requests are then refused with 400, naming the fusable sets).
        let sets: Vec<Vec<String>> = std::iter::once(&config.default_models)
            .chain(&config.fusable_sets)
            .filter(|set| match crate::plan::resolve_models(set) {
                Ok(_) => true,
                Err(error) => {
                    tracing::error!(%error, ?set, "fusable model set left out");
                    false
                }
            })
            .cloned()
            .collect();
        let fusable =
            FusableSets::new(&sets, config.fuse_subsets).expect("every set was resolved above");
        let breakers = Breakers::new(config.breaker.clone());
        Arc::new(Coordinator {
            fusable,
            breakers,
            id: instance_id(),
            admission: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            client,
            js,
            config,
            queues,
            cache,
            fusion: Arc::new(fusion),
            revisions: RwLock::new(HashMap::new()),
            announced: RwLock::new(HashMap::new()),
            widths: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(1),
            stats: CoordinatorStats::default(),
        })
    }

    /// Tells the coordinator which weights serve `model`, so the cache works from the first
    /// request (`serve` knows, hosting the workers itself).
    pub fn prime_revision(&self, model: &str, revision: &str) {
        self.revisions
            .write()
            .expect("revisions poisoned")
            .insert(model.to_string(), revision.to_string());
    }

    /// Tells the coordinator the width `model`'s loaded checkpoint produces (`serve` knows).
    pub fn prime_width(&self, model: &str, width: usize) {
        self.learn_width(model, width);
    }

    /// The fusion layers this coordinator holds.
    pub fn fusion(&self) -> &FusionStage {
        &self.fusion
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&s.requests),
            succeeded: get(&s.succeeded),
            client_errors: get(&s.client_errors),
            server_errors: get(&s.server_errors),
            overloaded: get(&s.overloaded),
            fused_hits: get(&s.fused_hits),
            partial_hits: get(&s.partial_hits),
            jobs_published: get(&s.jobs_published),
            stray_partials: get(&s.stray_partials),
            reasked_jobs: get(&s.reasked_jobs),
            degraded: get(&s.degraded),
            breakers_opened: self.breakers.opened(),
            breakers: self.breakers.states(),
            in_flight: self.config.max_in_flight.max(1) - self.admission.available_permits(),
            cache: self.cache.stats(),
        }
    }
    /// The revision cache keys use for `model` now (announced by a worker or seen in a partial).
    pub fn revision_of(&self, model: &str) -> Option<String> {
        self.revisions
            .read()
            .expect("revisions poisoned")
            .get(model)
            .cloned()
    }

    /// A worker announced `revision` for `model` (the revisions bucket): cache keys switch now.
    fn learn_announced_revision(&self, model: &str, revision: &str) {
        self.announced
            .write()
            .expect("announced poisoned")
            .insert(model.to_string(), (revision.to_string(), Instant::now()));
        self.switch_revision(model, revision);
    }

    /// A partial of `model` came from `revision`: the revision that answers, unless a worker
    /// announced another one less than `max_request_timeout` ago (see `announced`).
    fn learn_revision(&self, model: &str, revision: &str) {
        let overruled = self
            .announced
            .read()
            .expect("announced poisoned")
            .get(model)
            .is_some_and(|(announced, at)| {
                announced != revision && at.elapsed() < self.config.max_request_timeout
            });
        if overruled {
            tracing::debug!(
                model,
                revision,
                "a partial of a revision other than the one just announced; keys stay"
            );
            return;
        }
        self.switch_revision(model, revision);
    }

    fn switch_revision(&self, model: &str, revision: &str) {
        let known = self
            .revisions
            .read()
            .expect("revisions poisoned")
            .get(model)
            .cloned();
        if known.as_deref() != Some(revision) {
            if let Some(old) = known {
                tracing::info!(model, old, new = revision, "model revision changed");
            }
            self.prime_revision(model, revision);
        }
    }

    /// Each model's width as far as this coordinator knows: learnt, or the catalogue's.
    fn known_widths(&self, models: &[&'static embedfleet_models::ModelSpec]) -> Vec<usize> {
        let widths = self.widths.read().expect("widths poisoned");
        models
            .iter()
            .map(|spec| widths.get(spec.name).copied().unwrap_or(spec.dim))
            .collect()
    }

    fn learn_width(&self, model: &str, width: usize) {
        let known = self
            .widths
            .read()
            .expect("widths poisoned")
            .get(model)
            .copied();
        if known != Some(width) {
            tracing::info!(model, width, "model width learnt");
            self.widths
                .write()
                .expect("widths poisoned")
                .insert(model.to_string(), width);
        }
    }
}

/// A process-unique token for subjects: pid and start time, base 36 (subject-safe).
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{}-{}", std::process::id(), radix36(nanos))
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}
