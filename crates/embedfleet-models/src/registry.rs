//! Loaded models by name: each loads on first use, exactly once even when many threads ask at
//! the same moment, and is shared from then on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Device;
use once_cell::sync::OnceCell;

use crate::catalogue::{self, Architecture, ModelSpec};
use crate::decoder_embedder::DecoderEmbedder;
use crate::error::ModelError;
use crate::model::EmbeddingModel;
use crate::resolve::WeightResolver;
use crate::t5_embedder::T5Embedder;
use crate::text::TextEmbedder;

type Slot = Arc<OnceCell<Arc<dyn EmbeddingModel>>>;

pub struct ModelRegistry {
    resolver: WeightResolver,
    device: Device,
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
            slots: Mutex::default(),
            loads: AtomicUsize::new(0),
        }
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
            let model = load(spec, &self.resolver, &self.device)?;
            self.loads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                model = spec.name,
                revision = model.revision(),
                "model loaded"
            );
            Ok(model)
        })
        .cloned()
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
    )
}

fn load(
    spec: &'static ModelSpec,
    resolver: &WeightResolver,
    device: &Device,
) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
    match spec.architecture {
        Architecture::Bert | Architecture::Roberta | Architecture::MpNet => {
            let files = resolver.resolve(spec)?;
            Ok(Arc::new(TextEmbedder::load(spec, &files, device)?))
        }
        Architecture::T5Encoder => {
            let files = resolver.resolve(spec)?;
            Ok(Arc::new(T5Embedder::load(spec, &files, device)?))
        }
        Architecture::Mistral => {
            let files = resolver.resolve(spec)?;
            Ok(Arc::new(DecoderEmbedder::load(spec, &files, device)?))
        }
        other => Err(ModelError::ArchitectureUnavailable {
            model: spec.name.to_string(),
            architecture: format!("{other:?}"),
        }),
    }
}
