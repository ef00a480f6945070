//! The fusion stage: one FuseMoE layer per active model set, built on first use.
//!
//! A request may name any subset of the catalogue, and the layer's input width depends on the
//! set, so the stage keeps the layers it has built, keyed by the set in slot order. Seeded layers
//! are deterministic (same set, same seed → same weights and version on every node), so
//! coordinators never need to agree on anything but the seed. A weights file fixes one set: a
//! trained layer cannot be stretched to other models, so other sets are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
        None => FuseMoe::from_seed(config, DEFAULT_FUSION_SEED),
    }
}

/// The layers of one coordinator.
pub struct FusionStage {
    weights: Option<PathBuf>,
    /// With a weights file: the one set it covers, loaded at start.
    fixed: Option<(Vec<&'static str>, Arc<FuseMoe>)>,
    seeded: Mutex<HashMap<Vec<&'static str>, Arc<FuseMoe>>>,
}

impl FusionStage {
    /// Seeded layers for any set.
    pub fn seeded() -> Self {
        FusionStage {
            weights: None,
            fixed: None,
            seeded: Mutex::new(HashMap::new()),
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
        let key = names(models);
        self.seeded
            .lock()
            .expect("fusion map poisoned")
            .get(&key)
            .map(|layer| Ok(layer.clone()))
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
        if let Some(layer) = self.seeded.lock().expect("fusion map poisoned").get(&key) {
            return Ok(layer.clone());
        }
        // Built outside the lock: two racing first requests build twice, which is harmless
        // (seeded layers are identical), while a lock held over the build would stall every
        // request for other sets.
        let layer = Arc::new(
            build_layer(models, None)
                .map_err(|e| ProtoError::internal(format!("building the fusion layer: {e}")))?,
        );
        let mut seeded = self.seeded.lock().expect("fusion map poisoned");
        if seeded.len() >= MAX_CACHED_LAYERS {
            seeded.clear();
        }
        Ok(seeded.entry(key).or_insert(layer).clone())
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
}
