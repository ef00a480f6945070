//! Request handling: decode, validate, admit (the model set must be fusable here and known to
//! the fleet), then answer from the cache, the workers (jobs.rs) and the fusion layer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use embedfleet_cache::CacheKey;
use embedfleet_fusion::FuseMoe;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{
    EmbedReply, EmbedRequest, EmbeddingData, Encoding, ErrorKind, ExpertSelection, Fallback, Input,
    InputType, ProtoError, Usage, FUSED_MODEL_NAME,
};

use super::cache_keys::{fused_key, CacheWrites, FusedEntry};
use super::table::PartialTable;
use super::Coordinator;
use crate::fusion::fuse_rows;
use crate::stage_timings;

impl Coordinator {
    /// Decodes and answers one request.
    pub(super) async fn handle(
        &self,
        payload: &[u8],
        encoding: Encoding,
        deadline: Instant,
    ) -> Result<Answer, ProtoError> {
        let (request, inputs, output, models) = tracing::info_span!(
            "decode",
            bytes = payload.len(),
            inputs = tracing::field::Empty
        )
        .in_scope(|| {
            self.config.limits.check_payload_len(payload.len())?;
            let request: EmbedRequest = encoding.decode(payload)?;
            let inputs = request.to_inputs(&self.config.limits)?;
            tracing::Span::current().record("inputs", inputs.len());
            let output = request.output_options()?;
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
            Ok::<_, ProtoError>((request, inputs, output, models))
        })?;
        let layer_set = self.admit(&models, request.fuse)?;
        if let (Some(set), Some(_)) = (&layer_set, output.dimensions) {
            output.check_width(self.fusion_layer(set).await?.config().output_dim)?;
        }
        let work = RequestWork {
            inputs,
            models,
            layer_set,
            instruction: request.effective_instruction().map(str::to_string),
            input_type: request.input_type,
            partials: request.wants_partials(),
            normalize: request.normalize,
            truncate: request.truncate,
            fallback: request.fallback,
        };
        // `dimensions` and `encoding_format` on the way out: the cache holds full floats.
        let mut answer = self.embed(work, deadline).await?;
        output.apply(&mut answer.reply)?;
        Ok(answer)
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

    /// Admission, before any work: a fused request's set must be fusable here (a configured set
    /// or a subset of one; 400 otherwise), and every model must be part of this fleet: in a
    /// configured set, or announced by a worker. A model that is neither has no queue anybody
    /// will ever serve, so the answer is 503 at once rather than after the deadline. A
    /// configured model whose workers are scaled to zero is admitted: its job queues, and
    /// queue-depth autoscaling can start a worker within the request's deadline.
    ///
    /// Returns the set whose fusion layer fuses the request (`None` for `fuse: false`).
    fn admit(
        &self,
        models: &[&'static ModelSpec],
        fuse: bool,
    ) -> Result<Option<Vec<&'static ModelSpec>>, ProtoError> {
        let layer_set = if fuse {
            let set = self.fusable.layer_set(models).ok_or_else(|| {
                let names: Vec<&str> = models.iter().map(|spec| spec.name).collect();
                ProtoError::bad_request(format!(
                    "the model set [{}] is not fusable on this fleet; fusable sets: {}{} (ask \
                     with `fuse: false` for other sets)",
                    names.join(", "),
                    self.fusable.describe(),
                    if self.config.fuse_subsets {
                        ", or any subset of one"
                    } else {
                        ""
                    }
                ))
            })?;
            Some(set.to_vec())
        } else {
            None
        };
        let revisions = self.revisions.read().expect("revisions poisoned");
        if let Some(stranger) = models
            .iter()
            .find(|spec| !self.fusable.configures(spec.name) && !revisions.contains_key(spec.name))
        {
            return Err(ProtoError::new(
                ErrorKind::NoWorker,
                format!(
                    "model `{}` is not part of this fleet: no worker has announced it and the \
                     coordinator is not configured for it",
                    stranger.name
                ),
            ));
        }
        Ok(layer_set)
    }

    /// The layer of `set` for the widths its models are known to produce, built on the
    /// blocking pool the first time (a big set takes seconds).
    async fn fusion_layer(&self, set: &[&'static ModelSpec]) -> Result<Arc<FuseMoe>, ProtoError> {
        let widths = self.known_widths(set);
        if let Some(ready) = self.fusion.ready_layer(set, &widths) {
            return ready;
        }
        let (stage, set) = (self.fusion.clone(), set.to_vec());
        tokio::task::spawn_blocking(move || stage.layer(&set, &widths))
            .await
            .map_err(|e| ProtoError::internal(format!("fusion layer task: {e}")))?
    }

    async fn embed(&self, work: RequestWork, deadline: Instant) -> Result<Answer, ProtoError> {
        let n = work.inputs.len();
        // Truncation changes nothing for inputs that fit, but a cached vector cannot tell
        // whether its input was cut: with `truncate: false` the models must see the input.
        let read_cache = work.truncate;
        let mut layer = match &work.layer_set {
            Some(set) => Some(self.fusion_layer(set).await?),
            None => None,
        };

        // 1. Fused vectors (with the gate's choice) from the cache, under the revisions known
        //    now. With partials asked for, the partials are looked up as well (step 2), so a
        //    repeat is answered from the cache in the same shape as the first reply.
        let mut fused: Vec<Option<FusedEntry>> = vec![None; n];
        if let (Some(layer), true) = (&layer, read_cache) {
            let known = self.revisions.read().expect("revisions poisoned").clone();
            let version = layer.version();
            let keys: Vec<Option<CacheKey>> = work
                .inputs
                .iter()
                .map(|input| {
                    let revisions = work
                        .models
                        .iter()
                        .map(|spec| {
                            if spec.takes(input.modality()) {
                                known.get(spec.name).map(|r| Some(r.as_str()))
                            } else {
                                Some(None)
                            }
                        })
                        .collect::<Option<Vec<Option<&str>>>>()?;
                    Some(fused_key(&work, &version, &revisions, input))
                })
                .collect();
            let lookups: Vec<CacheKey> = keys.iter().flatten().cloned().collect();
            if !lookups.is_empty() {
                let started = Instant::now();
                let mut found = self
                    .cache
                    .get_many(&lookups)
                    .instrument(tracing::info_span!(
                        "cache.lookup",
                        entry = "fused",
                        keys = lookups.len()
                    ))
                    .await
                    .into_iter();
                stage_timings::record("cache_get", started.elapsed());
                for (i, key) in keys.iter().enumerate() {
                    if key.is_some() {
                        fused[i] = found
                            .next()
                            .flatten()
                            .and_then(|value| FusedEntry::decode(value, layer.config()));
                    }
                }
            }
            let hits = fused.iter().filter(|v| v.is_some()).count();
            self.stats
                .fused_hits
                .fetch_add(hits as u64, Ordering::Relaxed);
        }
        let fused_hit: Vec<bool> = fused.iter().map(Option::is_some).collect();

        // 2. Partials of the inputs still open (and of all, when the reply lists them): cache,
        //    then one job per model for the misses.
        let needs_partials: Vec<usize> = (0..n)
            .filter(|&i| work.partials || fused[i].is_none())
            .collect();
        let mut partials = PartialTable::new(work.models.len(), n);
        let mut writes = CacheWrites::default();
        let mut degraded: Vec<&'static str> = Vec::new();
        if !needs_partials.is_empty() {
            degraded = self
                .fill_partials(
                    &work,
                    &needs_partials,
                    read_cache,
                    &mut partials,
                    &mut writes,
                    deadline,
                )
                .await?;
        }
        if !degraded.is_empty() {
            if let Some(&i) = needs_partials.iter().find(|&&i| partials.row_is_empty(i)) {
                return Err(ProtoError::new(
                    ErrorKind::NoWorker,
                    format!(
                        "input {i}: every model that takes it is unavailable ({})",
                        degraded.join(", ")
                    ),
                ));
            }
            self.stats.degraded.fetch_add(1, Ordering::Relaxed);
        }

        // The vectors in hand say how wide each checkpoint really is; on first contact with one
        // of another width than its catalogue slot, the layer chosen above was for the wrong
        // widths.
        for (spec, width) in work.models.iter().zip(partials.widths()) {
            if let Some(width) = width {
                self.learn_width(spec.name, width);
            }
        }
        if let (Some(current), Some(set)) = (&layer, &work.layer_set) {
            if self.known_widths(set) != current.config().input_dims {
                layer = Some(self.fusion_layer(set).await?);
            }
        }

        // 3. Normalise (the cache keeps raw vectors; see job.rs), fuse what is open.
        if work.normalize {
            partials.normalize();
        }
        let open: Vec<usize> = (0..n).filter(|&i| fused[i].is_none()).collect();
        if let (Some(layer), Some(layer_set), false) = (&layer, &work.layer_set, open.is_empty()) {
            // The layer's slot → the request's slot: a subset of a configured set leaves the
            // other slots empty, and FuseMoE's presence mask tells the gate so.
            let slot_of: Vec<Option<usize>> = layer_set
                .iter()
                .map(|spec| work.models.iter().position(|m| m == spec))
                .collect();
            // FuseMoE costs milliseconds per row on a CPU: a blocking thread, with the table
            // moved there and back rather than copied.
            let (task_layer, rows_of) = (layer.clone(), open.clone());
            let device = self.fusion.device();
            let started = Instant::now();
            let fusion_span = tracing::info_span!("fusion", rows = open.len());
            let (table, results) = tokio::task::spawn_blocking(move || {
                let _timer = crate::metrics::global().fusion_timer();
                let rows: Vec<Vec<Option<&[f32]>>> =
                    rows_of.iter().map(|&i| partials.row(i, &slot_of)).collect();
                let results = fuse_rows(&device, &task_layer, &rows);
                drop(rows);
                (partials, results)
            })
            .instrument(fusion_span)
            .await
            .map_err(|e| ProtoError::internal(format!("fusion task: {e}")))?;
            stage_timings::record("fusion", started.elapsed());
            partials = table;
            let version = layer.version();
            for (&i, result) in open.iter().zip(results?) {
                let entry = FusedEntry {
                    embedding: result.embedding,
                    experts: ExpertSelection {
                        weights: result.expert_weights,
                        selected: result.selected,
                    },
                };
                // Keyed by the revisions of the partials actually fused (a rolling upgrade
                // may answer with old and new weights side by side); a degraded vector is not
                // the full result and is not cached as one.
                if degraded.is_empty() {
                    let revisions = partials.revisions(i);
                    let key = fused_key(&work, &version, &revisions, &work.inputs[i]);
                    writes.entries.push((key, entry.encode()));
                }
                fused[i] = Some(entry);
            }
        }
        let data = (0..n)
            .map(|i| {
                let mut element = EmbeddingData::new(i);
                if let Some(entry) = fused[i].take() {
                    element.embedding = Some(entry.embedding.into());
                    element.experts = Some(entry.experts);
                }
                element.cached = match (&layer, work.partials) {
                    (Some(_), false) => fused_hit[i],
                    (Some(_), true) => fused_hit[i] && partials.all_cached(i),
                    (None, _) => partials.all_cached(i),
                };
                if work.partials {
                    element.partials = Some(partials.take_named(i, &work.models));
                }
                element
            })
            .collect();
        let model = if layer.is_some() {
            FUSED_MODEL_NAME.to_string()
        } else {
            work.models
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join("+")
        };
        let mut reply = EmbedReply::new(model, data, Usage::new(partials.tokens));
        reply.degraded = degraded.iter().map(|name| name.to_string()).collect();
        Ok(Answer { reply, writes })
    }
}

/// The validated, admitted request.
pub(super) struct RequestWork {
    pub(super) inputs: Vec<Input>,
    /// The request's models, slot order.
    pub(super) models: Vec<&'static ModelSpec>,
    /// The configured set whose layer fuses this request (`models` or a superset of it);
    /// `None` with `fuse: false`.
    pub(super) layer_set: Option<Vec<&'static ModelSpec>>,
    /// The request's options as sent; each model reads the part its prompting uses
    /// (`options_for`, cache_keys.rs).
    pub(super) instruction: Option<String>,
    pub(super) input_type: InputType,
    pub(super) partials: bool,
    pub(super) normalize: bool,
    pub(super) truncate: bool,
    pub(super) fallback: Fallback,
}

pub(super) struct Answer {
    pub(super) reply: EmbedReply,
    pub(super) writes: CacheWrites,
}
