//! The fusion stage: one FuseMoE layer per fusable model set, built on first use.
//!
//! The layer's input width depends on the set and on the width each model's loaded checkpoint
//! produces (the width rule: a checkpoint may be narrower or wider than its catalogue slot), so
//! the stage keeps the layers it has built, keyed by the set in slot order and those widths.
//! Which sets may be fused at all is the coordinator's admission rule (`plan::FusableSets`):
//! only configured sets reach the stage, and subsets of them are fused by their set's layer with
//! the absent models masked. Seeded layers are deterministic (same set, widths and seed → same
//! weights and version on every node), so coordinators never need to agree on anything but the
//! seed. A weights file fixes one set and its widths: a trained layer cannot be stretched to
//! other models or widths, so anything else is refused with an error naming both.
//!
//! The layers held are bounded by bytes (a twelve-model layer is about 2 GB): past the budget the
//! least recently used other layers are dropped (and rebuilt on demand), and a layer bigger than
//! the whole budget is refused before it is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use embedfleet_fusion::weights::tensor_specs;
use embedfleet_fusion::{FuseMoe, FuseMoeConfig, FusedEmbedding, FusionError};

use crate::fusion_device::FusionDevice;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{ErrorKind, ProtoError};

use crate::pipeline::DEFAULT_FUSION_SEED;

/// Default bound of the seeded layers one coordinator holds: two twelve-model layers.
pub const DEFAULT_LAYER_BUDGET_BYTES: usize = 4 << 30;

/// The layer configuration for partials of these widths (one per model, slot order).
pub fn layer_config(widths: &[usize]) -> FuseMoeConfig {
    FuseMoeConfig::for_input_dims(widths.to_vec())
}

/// The catalogue widths of `models`: what a coordinator assumes until workers tell it the
/// widths their checkpoints produce.
pub fn catalogue_widths(models: &[&'static ModelSpec]) -> Vec<usize> {
    models.iter().map(|spec| spec.dim).collect()
}

/// Bytes of f32 weights a layer of `config` holds, known before building it.
pub fn layer_bytes(config: &FuseMoeConfig) -> usize {
    tensor_specs(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() * std::mem::size_of::<f32>())
        .sum()
}

/// Builds or loads the FuseMoE layer for partials of `widths` (slot order): the file's, which
/// must be for these widths, or the default (shipped trained weights where they apply, else
/// seeded).
pub fn build_layer(widths: &[usize], weights: Option<&Path>) -> Result<FuseMoe, FusionError> {
    let config = layer_config(widths);
    match weights {
        Some(path) => FuseMoe::load_expecting(path, &config),
        None => embedfleet_fusion::shipped::default_layer(config, DEFAULT_FUSION_SEED),
    }
}

/// A seeded layer's identity: the model set (slot order) and each model's width.
type LayerKey = (Vec<&'static str>, Vec<usize>);

/// A seeded layer, built once however many requests ask for it at the same time: the first
/// builds while holding the slot's own lock, the others wait there for its result.
type LayerSlot = Arc<Mutex<Option<Arc<FuseMoe>>>>;

/// The seeded layers held, with what each weighs and when it was last asked for.
#[derive(Default)]
struct SeededLayers {
    slots: HashMap<LayerKey, HeldLayer>,
    bytes: usize,
    /// A counter, not a clock: the order of use is all eviction needs.
    uses: u64,
}

struct HeldLayer {
    slot: LayerSlot,
    bytes: usize,
    last_used: u64,
}

/// The layers of one coordinator.
pub struct FusionStage {
    weights: Option<PathBuf>,
    /// With a weights file: the one set it covers, loaded at start (its widths are in its
    /// config).
    fixed: Option<(Vec<&'static str>, Arc<FuseMoe>)>,
    seeded: Mutex<SeededLayers>,
    /// Bound of `seeded`'s bytes.
    budget_bytes: usize,
    /// Seeded layers built so far.
    builds: AtomicU64,
    /// Where the layers run.
    device: Arc<FusionDevice>,
}

impl FusionStage {
    /// Seeded layers, within [`DEFAULT_LAYER_BUDGET_BYTES`].
    pub fn seeded() -> Self {
        FusionStage {
            weights: None,
            fixed: None,
            seeded: Mutex::default(),
            budget_bytes: DEFAULT_LAYER_BUDGET_BYTES,
            builds: AtomicU64::new(0),
            device: Arc::new(FusionDevice::cpu()),
        }
    }

    /// The same stage fusing on `device` (`--fusion-device`).
    pub fn with_device(mut self, device: FusionDevice) -> Self {
        self.device = Arc::new(device);
        self
    }

    /// Where this stage fuses.
    pub fn device(&self) -> Arc<FusionDevice> {
        self.device.clone()
    }

    /// The same stage with another bound on the seeded layers' bytes.
    pub fn with_budget_bytes(mut self, budget_bytes: usize) -> Self {
        self.budget_bytes = budget_bytes;
        self
    }

    /// Bytes of the seeded layers held now (built or being built).
    pub fn held_bytes(&self) -> usize {
        self.seeded.lock().expect("fusion map poisoned").bytes
    }

    /// The layer in `path`, trained for `models` (slot order); loaded now so that a bad file
    /// fails at start, not on the first request. Its widths are checked against the loaded
    /// checkpoints' on each request (a lone coordinator does not know them at start).
    pub fn from_file(path: &Path, models: &[&'static ModelSpec]) -> Result<Self, FusionError> {
        let layer = FuseMoe::load(path)?;
        if layer.config().num_slots() != models.len() {
            return Err(FusionError::ConfigMismatch(format!(
                "{} has {} slots; the model set [{}] has {}",
                path.display(),
                layer.config().num_slots(),
                names(models).join(", "),
                models.len()
            )));
        }
        Ok(FusionStage {
            weights: Some(path.to_path_buf()),
            fixed: Some((names(models), Arc::new(layer))),
            seeded: Mutex::default(),
            budget_bytes: DEFAULT_LAYER_BUDGET_BYTES,
            builds: AtomicU64::new(0),
            device: Arc::new(FusionDevice::cpu()),
        })
    }

    /// The layer for `models` of these `widths` when it needs no building: the weights file's
    /// set (or the refusal of any other set or widths), or a seeded layer built before. Cheap;
    /// fine on an async thread.
    pub fn ready_layer(
        &self,
        models: &[&'static ModelSpec],
        widths: &[usize],
    ) -> Option<Result<Arc<FuseMoe>, ProtoError>> {
        if self.fixed.is_some() {
            return Some(self.layer(models, widths));
        }
        let slot = self
            .seeded
            .lock()
            .expect("fusion map poisoned")
            .slots
            .get(&(names(models), widths.to_vec()))
            .map(|held| held.slot.clone())?;
        // try_lock: a slot being built is locked, and is not ready.
        let built = slot.try_lock().ok()?.clone();
        built.map(Ok)
    }

    /// Seeded layers built so far (each set once, unless the kept layers were dropped).
    pub fn layers_built(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// The layer for `models` (slot order) whose partials are `widths` wide. Building a seeded
    /// layer takes milliseconds to seconds depending on the set: call from a blocking context.
    pub fn layer(
        &self,
        models: &[&'static ModelSpec],
        widths: &[usize],
    ) -> Result<Arc<FuseMoe>, ProtoError> {
        let set = names(models);
        if let Some((fixed_set, layer)) = &self.fixed {
            let path = self.weights.as_deref().unwrap_or(Path::new("?")).display();
            if *fixed_set != set {
                return Err(ProtoError::bad_request(format!(
                    "the fusion weights {path} were trained for models [{}]; this request names \
                     [{}] (ask with `fuse: false` for other sets)",
                    fixed_set.join(", "),
                    set.join(", ")
                )));
            }
            // The fleet's fault, not the caller's: the workers load checkpoints of other widths
            // than the layer was trained for.
            if layer.config().input_dims != widths {
                return Err(ProtoError::internal(format!(
                    "the fusion weights {path} were trained for widths {:?} of [{}]; the loaded \
                     checkpoints give {widths:?}",
                    layer.config().input_dims,
                    set.join(", ")
                )));
            }
            return Ok(layer.clone());
        }
        let slot = self.reserve((set, widths.to_vec()))?;
        // The map's lock is not held over the build, so other sets are not held up; requests
        // for this set wait on its slot instead of each building the same layer (seconds of
        // CPU apiece for a big set, all at once in a burst of first requests).
        let mut built = slot.lock().expect("fusion slot poisoned");
        if let Some(layer) = built.as_ref() {
            return Ok(layer.clone());
        }
        let layer = Arc::new(
            build_layer(widths, None)
                .map_err(|e| ProtoError::internal(format!("building the fusion layer: {e}")))?,
        );
        self.builds.fetch_add(1, Ordering::Relaxed);
        *built = Some(layer.clone());
        Ok(layer)
    }
}

impl FusionStage {
    /// The slot of `key`'s layer, making room for it within the budget first: least recently
    /// used other layers are dropped (a request still holding one keeps it alive until it is
    /// done). A layer bigger than the whole budget is refused before anything is built.
    fn reserve(&self, key: LayerKey) -> Result<LayerSlot, ProtoError> {
        let mut seeded = self.seeded.lock().expect("fusion map poisoned");
        seeded.uses += 1;
        let now = seeded.uses;
        if let Some(held) = seeded.slots.get_mut(&key) {
            held.last_used = now;
            return Ok(held.slot.clone());
        }
        let bytes = layer_bytes(&layer_config(&key.1));
        if bytes > self.budget_bytes {
            return Err(ProtoError::new(
                ErrorKind::TooLarge,
                format!(
                    "the fusion layer of [{}] needs {} MiB, over this coordinator's fusion budget \
                     of {} MiB",
                    key.0.join(", "),
                    bytes >> 20,
                    self.budget_bytes >> 20
                ),
            ));
        }
        while seeded.bytes + bytes > self.budget_bytes {
            let Some(oldest) = seeded
                .slots
                .iter()
                .min_by_key(|(_, held)| held.last_used)
                .map(|(set, _)| set.clone())
            else {
                break;
            };
            if let Some(dropped) = seeded.slots.remove(&oldest) {
                seeded.bytes -= dropped.bytes;
                tracing::info!(set = ?oldest, mib = dropped.bytes >> 20,
                    "fusion layer dropped to stay within the budget");
            }
        }
        let slot = LayerSlot::default();
        seeded.bytes += bytes;
        seeded.slots.insert(
            key,
            HeldLayer {
                slot: slot.clone(),
                bytes,
                last_used: now,
            },
        );
        Ok(slot)
    }
}

/// Fuses rows of partials (one slot per model of the layer, `None` where a model does not take
/// the input), mapping a fusion failure onto the wire.
pub fn fuse_rows(
    device: &FusionDevice,
    layer: &Arc<FuseMoe>,
    rows: &[Vec<Option<&[f32]>>],
) -> Result<Vec<FusedEmbedding>, ProtoError> {
    device.fuse_batch(layer, rows).map_err(|e| {
        if e.is_bad_input() {
            ProtoError::bad_request(format!("fusion: {e}"))
        } else {
            ProtoError::internal(format!("fusion: {e}"))
        }
    })
}

/// The names of `models`, in their order.
pub fn names(models: &[&'static ModelSpec]) -> Vec<&'static str> {
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
        let both_models = [minilm, mpnet];
        let widths = catalogue_widths(&both_models);
        let stage = FusionStage::seeded();
        assert!(
            stage.ready_layer(&both_models, &widths).is_none(),
            "nothing built yet"
        );
        let both = stage.layer(&both_models, &widths).unwrap();
        assert!(Arc::ptr_eq(
            &both,
            &stage.layer(&both_models, &widths).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &both,
            &stage.ready_layer(&both_models, &widths).unwrap().unwrap()
        ));
        let one = stage.layer(&[minilm], &[384]).unwrap();
        assert_ne!(one.version(), both.version());
        assert_eq!(stage.layers_built(), 2);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fusion.safetensors");
        both.save(&path).unwrap();
        let fixed = FusionStage::from_file(&path, &both_models).unwrap();
        assert_eq!(
            fixed.layer(&both_models, &widths).unwrap().version(),
            both.version()
        );
        let refused = fixed.ready_layer(&[minilm], &[384]).unwrap().unwrap_err();
        assert_eq!(refused.kind, embedfleet_proto::ErrorKind::BadRequest);
        assert!(FusionStage::from_file(&path, &[minilm]).is_err());
    }

    #[test]
    fn a_narrower_checkpoint_gets_its_own_layer_and_a_trained_file_refuses_it() {
        let minilm = catalogue::find("minilm").unwrap();
        let mpnet = catalogue::find("mpnet").unwrap();
        let models = [minilm, mpnet];
        let stage = FusionStage::seeded();
        let catalogue_layer = stage.layer(&models, &[384, 768]).unwrap();
        let narrow = stage.layer(&models, &[384, 48]).unwrap();
        assert_eq!(narrow.config().input_dims, [384, 48]);
        assert_ne!(narrow.version(), catalogue_layer.version());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fusion.safetensors");
        catalogue_layer.save(&path).unwrap();
        let fixed = FusionStage::from_file(&path, &models).unwrap();
        let error = fixed.layer(&models, &[384, 48]).unwrap_err();
        assert_eq!(error.kind, embedfleet_proto::ErrorKind::Internal);
        assert!(
            error.message.contains("[384, 768]") && error.message.contains("[384, 48]"),
            "{error}"
        );
    }

    #[test]
    fn seeded_layers_are_held_within_the_byte_budget() {
        let minilm = catalogue::find("minilm").unwrap();
        let mpnet = catalogue::find("mpnet").unwrap();
        let one = layer_bytes(&layer_config(&[384]));
        let both = layer_bytes(&layer_config(&[384, 768]));
        let stage = FusionStage::seeded().with_budget_bytes(both + one / 2);
        stage.layer(&[minilm, mpnet], &[384, 768]).unwrap();
        assert_eq!(stage.held_bytes(), both);
        // Room for minilm's layer only by dropping the pair's.
        stage.layer(&[minilm], &[384]).unwrap();
        assert_eq!(stage.held_bytes(), one);
        assert!(
            stage.ready_layer(&[minilm, mpnet], &[384, 768]).is_none(),
            "dropped"
        );
        let small = FusionStage::seeded().with_budget_bytes(one);
        let refused = small.layer(&[minilm, mpnet], &[384, 768]).unwrap_err();
        assert_eq!(refused.kind, embedfleet_proto::ErrorKind::TooLarge);
        assert_eq!(small.layers_built(), 0, "refused before building");
        assert_eq!(small.held_bytes(), 0);
    }

    #[test]
    fn racing_first_requests_build_a_set_once() {
        let specs = catalogue::in_slot_order(vec![
            catalogue::find("minilm").unwrap(),
            catalogue::find("mpnet").unwrap(),
            catalogue::find("bge-large").unwrap(),
        ]);
        let widths = catalogue_widths(&specs);
        let stage = FusionStage::seeded();
        let layers: Vec<Arc<FuseMoe>> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..6)
                .map(|_| scope.spawn(|| stage.layer(&specs, &widths).unwrap()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(stage.layers_built(), 1, "one build for six racing requests");
        assert!(layers.iter().all(|layer| Arc::ptr_eq(layer, &layers[0])));
    }
}
