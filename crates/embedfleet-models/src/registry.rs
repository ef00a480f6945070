//! Loaded models by name: each loads on first use, exactly once even when many threads ask at
//! the same moment, and is shared from then on, at the dtype `--dtype` gave it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Device;
use once_cell::sync::OnceCell;

use crate::audio_embedder::WhisperEmbedder;
use crate::audio_input::AudioLimits;
use crate::catalogue::{self, Architecture, ModelSpec};
use crate::clip_embedder::ClipEmbedder;
use crate::decoder_embedder::DecoderEmbedder;
use crate::device::check_fits;
use crate::dtype::{Dtype, ModelDtypes};
use crate::error::ModelError;
use crate::image_input::ImageLimits;
use crate::model::EmbeddingModel;
use crate::resolve::{checkpoint_dir, ModelFiles, WeightResolver};
use crate::t5_embedder::T5Embedder;
use crate::text::TextEmbedder;

type Slot = Arc<OnceCell<Arc<dyn EmbeddingModel>>>;

pub struct ModelRegistry {
    resolver: WeightResolver,
    device: Device,
    /// The dtype of each model; by default the device's (f32 on a CPU).
    dtypes: ModelDtypes,
    /// Duration limit of audio inputs (whisper-large).
    audio_limits: AudioLimits,
    /// Bounds on image inputs (CLIP), checked before decoding.
    image_limits: ImageLimits,
    /// One cell per model name. The map lock is held only to find the cell; the load itself runs
    /// under the cell, so loading one model never blocks users of another.
    slots: Mutex<HashMap<&'static str, Slot>>,
    /// Completed loads, for tests and metrics: stays at one per model however many callers race.
    loads: AtomicUsize,
}

impl ModelRegistry {
    pub fn new(resolver: WeightResolver, device: Device) -> Self {
        Self {
            resolver,
            device,
            dtypes: ModelDtypes::default(),
            audio_limits: AudioLimits::default(),
            image_limits: ImageLimits::default(),
            slots: Mutex::default(),
            loads: AtomicUsize::new(0),
        }
    }

    /// Loads each model at the dtype `dtypes` gives it.
    pub fn with_dtypes(mut self, dtypes: ModelDtypes) -> Self {
        self.dtypes = dtypes;
        self
    }

    /// Applies `limits` to the audio inputs of the models loaded from now on.
    pub fn with_audio_limits(mut self, limits: AudioLimits) -> Self {
        self.audio_limits = limits;
        self
    }

    /// Bounds image inputs by `limits` instead of the defaults.
    pub fn with_image_limits(mut self, limits: ImageLimits) -> Self {
        self.image_limits = limits;
        self
    }

    /// The dtype `name` loads (or was loaded) at.
    pub fn dtype_of(&self, spec: &ModelSpec) -> Dtype {
        self.dtypes.for_model(spec, self.device.is_cpu())
    }

    /// The model, loading it if this is the first call. A failed load is not remembered, so a
    /// transient failure (a download) can succeed on the next call.
    pub fn get(&self, name: &str) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
        let spec = lookup(name)?;
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.entry(spec.name).or_default().clone()
        };
        slot.get_or_try_init(|| {
            let model = load(spec, self, self.dtype_of(spec))?;
            self.loads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                model = spec.name,
                dtype = %model.dtype(),
                revision = model.revision(),
                "model loaded"
            );
            Ok(model)
        })
        .cloned()
    }

    /// A fresh copy of `name`, loaded now and kept nowhere here (the loaded-once cache of
    /// [`ModelRegistry::get`] is neither read nor filled): from the checkpoint directory `dir`
    /// when given, else from the resolver's usual places, re-read. A hot swap loads its new
    /// weights this way, beside the copy serving, and the old copy is freed as soon as its last
    /// user drops it; a worker loads its first copies this way too, so that nothing here pins
    /// weights a swap has replaced.
    pub fn load_fresh(
        &self,
        name: &str,
        dir: Option<&Path>,
    ) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
        let spec = lookup(name)?;
        let files = match dir {
            Some(dir) => checkpoint_dir(dir)?,
            None => self.resolver.resolve(spec)?,
        };
        let model = load_files(spec, &files, self, self.dtype_of(spec))?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            model = spec.name,
            dtype = %model.dtype(),
            revision = model.revision(),
            dir = %files.dir.display(),
            "model loaded (fresh copy)"
        );
        Ok(model)
    }

    /// How many model loads have completed.
    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::Relaxed)
    }
}

/// The catalogue entry for a public name, or the typed 404 listing the known names.
pub fn lookup(name: &str) -> Result<&'static ModelSpec, ModelError> {
    catalogue::find(name).ok_or_else(|| ModelError::UnknownModel {
        name: name.to_string(),
        known: catalogue::names().collect::<Vec<_>>().join(", "),
    })
}

/// Device memory a load may use beyond its weights: the activations of one forward pass at the
/// token budget ([`crate::text::MAX_TOKENS_PER_FORWARD`]) and the allocator's slack. The placement
/// planner (`embedfleet plan`) models this per architecture; here a flat margin is enough to
/// refuse a load that cannot fit before it starts.
const ACTIVATION_MARGIN_BYTES: u64 = 512 << 20;

/// Whether this build can load checkpoints of `architecture` (the `runs` column of
/// `embedfleet models`); the arms of [`load`] below, kept next to them.
pub fn runs(architecture: Architecture) -> bool {
    matches!(
        architecture,
        Architecture::Bert
            | Architecture::Roberta
            | Architecture::MpNet
            | Architecture::T5Encoder
            | Architecture::Mistral
            | Architecture::WhisperEncoder
            | Architecture::Clip
    )
}

fn load(
    spec: &'static ModelSpec,
    registry: &ModelRegistry,
    dtype: Dtype,
) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
    // Checked before resolving too: no download for an architecture this build cannot run.
    if !runs(spec.architecture) {
        return Err(ModelError::ArchitectureUnavailable {
            model: spec.name.to_string(),
            architecture: format!("{:?}", spec.architecture),
        });
    }
    let files = registry.resolver.resolve(spec)?;
    load_files(spec, &files, registry, dtype)
}

/// Loads the checkpoint `files` as `spec`, after checking that a GPU has room for it (with
/// whatever is loaded already counted as used: a hot swap's second copy must fit beside the
/// first).
fn load_files(
    spec: &'static ModelSpec,
    files: &ModelFiles,
    registry: &ModelRegistry,
    dtype: Dtype,
) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
    let device = &registry.device;
    if !runs(spec.architecture) {
        return Err(ModelError::ArchitectureUnavailable {
            model: spec.name.to_string(),
            architecture: format!("{:?}", spec.architecture),
        });
    }
    if !device.is_cpu() {
        let weights = files.weights.parameters()? as f64 * dtype.bytes_per_weight();
        check_fits(spec.name, device, weights as u64 + ACTIVATION_MARGIN_BYTES)?;
    }
    Ok(match spec.architecture {
        Architecture::T5Encoder => Arc::new(T5Embedder::load_at(spec, files, device, dtype)?),
        Architecture::Mistral => Arc::new(DecoderEmbedder::load_at(spec, files, device, dtype)?),
        Architecture::WhisperEncoder => Arc::new(WhisperEmbedder::load_at(
            spec,
            files,
            device,
            dtype,
            registry.audio_limits,
        )?),
        Architecture::Clip => Arc::new(ClipEmbedder::load_at(
            spec,
            files,
            device,
            dtype,
            registry.image_limits,
        )?),
        _ => Arc::new(TextEmbedder::load_at(spec, files, device, dtype)?),
    })
}
