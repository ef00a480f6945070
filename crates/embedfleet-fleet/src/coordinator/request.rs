//! Request handling: decode, validate, resolve the model set, then answer from the cache, the
//! workers (jobs.rs) and the fusion layer.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use embedfleet_cache::CacheKey;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{
    EmbedReply, EmbedRequest, EmbeddingData, Encoding, ErrorKind, ExpertSelection, Input,
    ProtoError, Usage, FUSED_MODEL_NAME,
};

use super::cache_keys::{fused_key, CacheWrites};
use super::table::PartialTable;
use super::Coordinator;
use crate::fusion::fuse_rows;

impl Coordinator {
    /// Decodes and answers one request.
    pub(super) async fn handle(
        &self,
        payload: &[u8],
        encoding: Encoding,
        deadline: Instant,
    ) -> Result<Answer, ProtoError> {
        self.config.limits.check_payload_len(payload.len())?;
        let request: EmbedRequest = encoding.decode(payload)?;
        let inputs = request.to_inputs(&self.config.limits)?;
        let models = self.resolve_models(request.models.as_deref())?;
        crate::plan::check_modalities(&inputs, &models).map_err(|untaken| {
            ProtoError::new(
                ErrorKind::UnsupportedModality,
                format!(
                    "input {} ({}) is taken by none of the requested models ({})",
                    untaken.index, untaken.modality, untaken.models
                ),
            )
        })?;
        let work = RequestWork {
            inputs,
            models,
            instruction: request.effective_instruction().map(str::to_string),
            fuse: request.fuse,
            partials: request.wants_partials(),
            normalize: request.normalize,
            truncate: request.truncate,
        };
        self.embed(work, deadline).await
    }

    /// The request's model set in slot order; the configured default when it names none.
    fn resolve_models(
        &self,
        names: Option<&[String]>,
    ) -> Result<Vec<&'static ModelSpec>, ProtoError> {
        let names = names.unwrap_or(&self.config.default_models);
        crate::plan::resolve_models(names)
            .map_err(|error| ProtoError::new(error.kind(), error.to_string()))
    }

    async fn embed(&self, work: RequestWork, deadline: Instant) -> Result<Answer, ProtoError> {
        let n = work.inputs.len();
        let revisions = self.known_revisions(&work.models);
        // Truncation changes nothing for inputs that fit, but a cached vector cannot tell
        // whether its input was cut: with `truncate: false` the models must see the input.
        let read_cache = work.truncate;

        // A fused layer exists only for sets this coordinator can fuse; fail before any work.
        // (Building a seeded layer the first time takes a while: off the async threads.)
        let layer = match (work.fuse, self.fusion.ready_layer(&work.models)) {
            (false, _) => None,
            (true, Some(ready)) => Some(ready?),
            (true, None) => {
                let (stage, models) = (self.fusion.clone(), work.models.clone());
                Some(
                    tokio::task::spawn_blocking(move || stage.layer(&models))
                        .await
                        .map_err(|e| ProtoError::internal(format!("fusion layer task: {e}")))??,
                )
            }
        };

        // 1. Fused vectors, when that is all the reply needs.
        let mut fused: Vec<Option<Vec<f32>>> = vec![None; n];
        if let (Some(layer), Some(revisions), true, false) =
            (&layer, &revisions, read_cache, work.partials)
        {
            let version = layer.version();
            let keys: Vec<CacheKey> = work
                .inputs
                .iter()
                .map(|input| fused_key(&work, &version, revisions, input))
                .collect();
            fused = self.cache.get_many(&keys).await;
            let hits = fused.iter().filter(|v| v.is_some()).count();
            self.stats
                .fused_hits
                .fetch_add(hits as u64, Ordering::Relaxed);
        }
        let cached: Vec<bool> = fused.iter().map(Option::is_some).collect();

        // 2. Partials of the inputs still open: cache, then one job per model for the misses.
        let needs_partials: Vec<usize> = (0..n)
            .filter(|&i| work.partials || fused[i].is_none())
            .collect();
        let mut partials = PartialTable::new(work.models.len(), n);
        let mut writes = CacheWrites::default();
        if !needs_partials.is_empty() {
            self.fill_partials(
                &work,
                &needs_partials,
                read_cache,
                &mut partials,
                &mut writes,
                deadline,
            )
            .await?;
        }

        // 3. Normalise (the cache keeps raw vectors; see job.rs), fuse what is open.
        if work.normalize {
            partials.normalize();
        }
        let mut experts: Vec<Option<ExpertSelection>> = vec![None; n];
        let open: Vec<usize> = (0..n).filter(|&i| fused[i].is_none()).collect();
        if let (Some(layer), false) = (&layer, open.is_empty()) {
            // FuseMoE costs milliseconds per row on a CPU: a blocking thread, with the table
            // moved there and back rather than copied.
            let (task_layer, rows_of) = (layer.clone(), open.clone());
            let (table, results) = tokio::task::spawn_blocking(move || {
                let rows: Vec<Vec<Option<&[f32]>>> =
                    rows_of.iter().map(|&i| partials.row(i)).collect();
                let results = fuse_rows(&task_layer, &rows);
                drop(rows);
                (partials, results)
            })
            .await
            .map_err(|e| ProtoError::internal(format!("fusion task: {e}")))?;
            partials = table;
            // Revisions as they are after this request's partials (a worker may have answered
            // with new weights): the key must name the weights that made the vector.
            let revisions = self.known_revisions(&work.models);
            let version = layer.version();
            for (&i, result) in open.iter().zip(results?) {
                if let Some(revisions) = &revisions {
                    let key = fused_key(&work, &version, revisions, &work.inputs[i]);
                    writes.entries.push((key, result.embedding.clone()));
                }
                fused[i] = Some(result.embedding);
                experts[i] = Some(ExpertSelection {
                    weights: result.expert_weights,
                    selected: result.selected,
                });
            }
        }
        let data = (0..n)
            .map(|i| {
                let mut element = EmbeddingData::new(i);
                element.embedding = fused[i].take();
                element.experts = experts[i].take();
                element.cached = cached[i] || (!work.fuse && partials.all_cached(i));
                if work.partials {
                    element.partials = Some(partials.take_named(i, &work.models));
                }
                element
            })
            .collect();
        let model = if work.fuse {
            FUSED_MODEL_NAME.to_string()
        } else {
            work.models
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join("+")
        };
        Ok(Answer {
            reply: EmbedReply::new(model, data, Usage::new(partials.tokens)),
            writes,
        })
    }
}

/// The validated request.
pub(super) struct RequestWork {
    pub(super) inputs: Vec<Input>,
    pub(super) models: Vec<&'static ModelSpec>,
    pub(super) instruction: Option<String>,
    pub(super) fuse: bool,
    pub(super) partials: bool,
    pub(super) normalize: bool,
    pub(super) truncate: bool,
}

pub(super) struct Answer {
    pub(super) reply: EmbedReply,
    pub(super) writes: CacheWrites,
}
