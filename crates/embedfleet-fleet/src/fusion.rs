//! The fusion stage: one FuseMoE layer per active model set, built on first use.
//!
//! A request may name any subset of the catalogue, and the layer's input width depends on the
//! set, so the stage keeps the layers it has built, keyed by the set in slot order. Seeded layers
//! are deterministic (same set, same seed → same weights and version on every node), so
//! coordinators never need to agree on anything but the seed. A weights file fixes one set: a
//! trained layer cannot be stretched to other models, so other sets are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use embedfleet_fusion::{FuseMoe, FuseMoeConfig, FusedEmbedding, FusionError};
use embedfleet_models::ModelSpec;
use embedfleet_proto::ProtoError;

use crate::pipeline::DEFAULT_FUSION_SEED;

/// Seeded layers kept at once. A full 12-model layer is large, and distinct sets in live
/// traffic are few; past the bound the stage drops every layer and rebuilds on demand rather than
/// grow without limit on a client that cycles through subsets.
const MAX_CACHED_LAYERS: usize = 16;

/// Builds or loads the FuseMoE layer for `models` (slot order).
pub fn build_layer(
    models: &[&'static ModelSpec],
    weights: Option<&Path>,
) -> Result<FuseMoe, FusionError> {
    let config =
        FuseMoeConfig::for_input_dims(models.iter().map(|spec| spec.dim).collect::<Vec<_>>());
    match weights {
        Some(path) => FuseMoe::load_expecting(path, &config),
        None => embedfleet_fusion::shipped::default_layer(config, DEFAULT_FUSION_SEED),
    }
}

/// A seeded layer, built once however many requests ask for it at the same time: the first
/// builds while holding the slot's own lock, the others wait there for its result.
type LayerSlot = Arc<Mutex<Option<Arc<FuseMoe>>>>;

/// The layers of one coordinator.
pub struct FusionStage {
    weights: Option<PathBuf>,
    /// With a weights file: the one set it covers, loaded at start.
    fixed: Option<(Vec<&'static str>, Arc<FuseMoe>)>,
    seeded: Mutex<HashMap<Vec<&'static str>, LayerSlot>>,
    /// Seeded layers built so far.
    builds: AtomicU64,
}

impl FusionStage {
    /// Seeded layers for any set.
    pub fn seeded() -> Self {
        FusionStage {
            weights: None,
            fixed: None,
            seeded: Mutex::new(HashMap::new()),
            builds: AtomicU64::new(0),
        }
    }

    /// The layer in `path`, trained for `models` (slot order); loaded now so that a bad file
    /// fails at start, not on the first request.
    pub fn from_file(path: &Path, models: &[&'static ModelSpec]) -> Result<Self, FusionError> {
        let layer = build_layer(models, Some(path))?;
        Ok(FusionStage {
            weights: Some(path.to_path_buf()),
            fixed: Some((names(models), Arc::new(layer))),
            seeded: Mutex::new(HashMap::new()),
            builds: AtomicU64::new(0),
        })
    }

    /// The layer for `models` when it needs no building: the weights file's set (or the refusal
    /// of any other set), or a seeded layer built before. Cheap; fine on an async thread.
    pub fn ready_layer(
        &self,
        models: &[&'static ModelSpec],
    ) -> Option<Result<Arc<FuseMoe>, ProtoError>> {
        if self.fixed.is_some() {
            return Some(self.layer(models));
        }
        let slot = self
            .seeded
            .lock()
            .expect("fusion map poisoned")
            .get(&names(models))
            .cloned()?;
        // try_lock: a slot being built is locked, and is not ready.
        let built = slot.try_lock().ok()?.clone();
        built.map(Ok)
    }

    /// Seeded layers built so far (each set once, unless the kept layers were dropped).
    pub fn layers_built(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// The layer for `models` (slot order). Building a seeded layer takes milliseconds to
    /// seconds depending on the set: call from a blocking context.
    pub fn layer(&self, models: &[&'static ModelSpec]) -> Result<Arc<FuseMoe>, ProtoError> {
        let key = names(models);
        if let Some((set, layer)) = &self.fixed {
            return if *set == key {
                Ok(layer.clone())
            } else {
                Err(ProtoError::bad_request(format!(
                    "the fusion weights {} were trained for models [{}]; this request names [{}] \
                     (ask with `fuse: false` for other sets)",
                    self.weights.as_deref().unwrap_or(Path::new("?")).display(),
                    set.join(", "),
                    key.join(", ")
                )))
            };
        }
        let slot = {
            let mut seeded = self.seeded.lock().expect("fusion map poisoned");
            if seeded.len() >= MAX_CACHED_LAYERS && !seeded.contains_key(&key) {
                seeded.clear();
            }
            seeded.entry(key).or_default().clone()
        };
        // The map's lock is not held over the build, so other sets are not held up; requests
        // for this set wait on its slot instead of each building the same layer (seconds of
        // CPU apiece for a big set, all at once in a burst of first requests).
        let mut built = slot.lock().expect("fusion slot poisoned");
        if let Some(layer) = built.as_ref() {
            return Ok(layer.clone());
        }
        let layer = Arc::new(
            build_layer(models, None)
                .map_err(|e| ProtoError::internal(format!("building the fusion layer: {e}")))?,
        );
        self.builds.fetch_add(1, Ordering::Relaxed);
        *built = Some(layer.clone());
        Ok(layer)
    }
}

/// Fuses rows of partials (one slot per model of the layer, `None` where a model does not take
/// the input), mapping a fusion failure onto the wire.
pub fn fuse_rows(
    layer: &FuseMoe,
    rows: &[Vec<Option<&[f32]>>],
) -> Result<Vec<FusedEmbedding>, ProtoError> {
    layer.fuse_batch(rows).map_err(|e| {
        if e.is_bad_input() {
            ProtoError::bad_request(format!("fusion: {e}"))
        } else {
            ProtoError::internal(format!("fusion: {e}"))
        }
    })
}

fn names(models: &[&'static ModelSpec]) -> Vec<&'static str> {
    models.iter().map(|spec| spec.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_models::catalogue;

    #[test]
    fn seeded_layers_are_shared_per_set_and_a_file_fixes_its_set() {
        let minilm = catalogue::find("minilm").unwrap();
        let mpnet = catalogue::find("mpnet").unwrap();
        let stage = FusionStage::seeded();
        assert!(
            stage.ready_layer(&[minilm, mpnet]).is_none(),
            "nothing built yet"
        );
        let both = stage.layer(&[minilm, mpnet]).unwrap();
        assert!(Arc::ptr_eq(&both, &stage.layer(&[minilm, mpnet]).unwrap()));
        assert!(Arc::ptr_eq(
            &both,
            &stage.ready_layer(&[minilm, mpnet]).unwrap().unwrap()
        ));
        let one = stage.layer(&[minilm]).unwrap();
        assert_ne!(one.version(), both.version());
        assert_eq!(stage.layers_built(), 2);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fusion.safetensors");
        both.save(&path).unwrap();
        let fixed = FusionStage::from_file(&path, &[minilm, mpnet]).unwrap();
        assert_eq!(
            fixed.layer(&[minilm, mpnet]).unwrap().version(),
            both.version()
        );
        let refused = fixed.ready_layer(&[minilm]).unwrap().unwrap_err();
        assert_eq!(refused.kind, embedfleet_proto::ErrorKind::BadRequest);
    }

    #[test]
    fn racing_first_requests_build_a_set_once() {
        let specs = catalogue::in_slot_order(vec![
            catalogue::find("minilm").unwrap(),
            catalogue::find("mpnet").unwrap(),
            catalogue::find("bge-large").unwrap(),
        ]);
        let stage = FusionStage::seeded();
        let layers: Vec<Arc<FuseMoe>> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..6)
                .map(|_| scope.spawn(|| stage.layer(&specs).unwrap()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(stage.layers_built(), 1, "one build for six racing requests");
        assert!(layers.iter().all(|layer| Arc::ptr_eq(layer, &layers[0])));
    }
}
