//! The in-process pipeline: inputs → every active model → FuseMoE → `data` elements of the wire
//! reply.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use embedfleet_fusion::{FuseMoe, FusionError};
use embedfleet_models::{EmbedOptions, ModelError, ModelInput, ModelRegistry, ModelSpec};
use embedfleet_proto::{EmbeddingData, ErrorKind, ExpertSelection, OutputOptions, ProtoError};

/// Seed of the untrained fusion weights. Fixed so that every node of a fleet, and every run of
/// the CLI, fuses identically without shipping a weights file.
pub const DEFAULT_FUSION_SEED: u64 = 0x0e3b_f1ee_7f05_e0e1;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("fusion: {0}")]
    Fusion(#[from] FusionError),
    /// A trained fusion layer whose slots do not fit the checkpoints loaded (the width rule:
    /// a checkpoint may be narrower than its catalogue slot, and the layer must match it).
    #[error(
        "the fusion weights {} do not fit the loaded models [{models}] of widths {widths:?}: {source}",
        path.display()
    )]
    FusionWeights {
        path: PathBuf,
        models: String,
        widths: Vec<usize>,
        source: FusionError,
    },

    #[error(
        "`dimensions` is {dimensions}: it must be from 1 to the fused vector's {width} components"
    )]
    Dimensions { dimensions: usize, width: usize },
    #[error("input {index} ({modality}) is taken by none of the active models ({models})")]
    NoModelTakesInput {
        index: usize,
        modality: embedfleet_proto::Modality,
        models: String,
    },
}

impl PipelineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Model(error) => error.kind(),
            Self::Fusion(error) if error.is_bad_input() => ErrorKind::BadRequest,
            Self::Fusion(_) | Self::FusionWeights { .. } => ErrorKind::Internal,
            Self::NoModelTakesInput { .. } => ErrorKind::UnsupportedModality,
            Self::Dimensions { .. } => ErrorKind::BadRequest,
        }
    }
}

impl From<&PipelineError> for ProtoError {
    fn from(error: &PipelineError) -> Self {
        ProtoError::new(error.kind(), error.to_string())
    }
}

/// What one call asks of the pipeline; mirrors the per-request options of the wire contract.
#[derive(Debug, Clone, Default)]
pub struct PipelineRequest {
    pub options: EmbedOptions,
    /// Produce the fused `embedding`.
    pub fuse: bool,
    /// Include the per-model vectors.
    pub return_partials: bool,
    /// `dimensions` and `encoding_format` of the fused vector, applied on the way out.
    pub output: OutputOptions,
}

/// The `data` elements for a batch of inputs, plus the tokens read.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOutput {
    pub data: Vec<EmbeddingData>,
    /// Tokens read by all models together (each model tokenizes the input its own way).
    pub prompt_tokens: u64,
}

pub struct Pipeline {
    registry: Arc<ModelRegistry>,
    /// The active models in fusion slot order.
    models: Vec<&'static ModelSpec>,
    /// Trained fusion weights, or `None` for the default layer.
    fusion_weights: Option<PathBuf>,
    /// Sized for the widths the active models' checkpoints produce, which are known once they
    /// load: built by [`Pipeline::warm_up`] or the first fused request.
    fusion: OnceLock<FuseMoe>,
}

impl Pipeline {
    /// A pipeline over `model_names` (any order; slot order is restored) with fusion weights from
    /// `fusion_weights`, or the default layer when there is no file: the shipped trained weights
    /// for minilm + mpnet, else seeded from [`DEFAULT_FUSION_SEED`]. Nothing loads yet:
    /// [`Pipeline::warm_up`] loads the models and builds the fusion layer for their widths.
    pub fn new(
        registry: Arc<ModelRegistry>,
        model_names: &[String],
        fusion_weights: Option<&Path>,
    ) -> Result<Self, PipelineError> {
        Ok(Self {
            registry,
            models: crate::plan::resolve_models(model_names)?,
            fusion_weights: fusion_weights.map(Path::to_path_buf),
            fusion: OnceLock::new(),
        })
    }

    /// The width each active model's checkpoint produces, in slot order (loads the models).
    pub fn widths(&self) -> Result<Vec<usize>, PipelineError> {
        self.models
            .iter()
            .map(|spec| Ok(self.registry.get(spec.name)?.dim()))
            .collect()
    }

    pub fn models(&self) -> &[&'static ModelSpec] {
        &self.models
    }

    /// The fusion layer for the loaded widths, built on first use. A weights file that does
    /// not fit them is a [`PipelineError::FusionWeights`] naming both.
    pub fn fusion(&self) -> Result<&FuseMoe, PipelineError> {
        if let Some(layer) = self.fusion.get() {
            return Ok(layer);
        }
        let widths = self.widths()?;
        let weights = self.fusion_weights.as_deref();
        let layer =
            crate::fusion::build_layer(&widths, weights).map_err(|source| match weights {
                Some(path) => PipelineError::FusionWeights {
                    path: path.to_path_buf(),
                    models: crate::fusion::names(&self.models).join(", "),
                    widths: widths.clone(),
                    source,
                },
                None => PipelineError::Fusion(source),
            })?;
        // Two first calls may both build; the layers are identical and one is kept.
        Ok(self.fusion.get_or_init(|| layer))
    }

    /// Loads every active model and builds the fusion layer now rather than on the first
    /// request, so a missing checkpoint or a fusion file that does not fit fails at start.
    pub fn warm_up(&self) -> Result<(), PipelineError> {
        self.fusion()?;
        Ok(())
    }

    /// Embeds a batch; `first_index` numbers the output (`index` of each `data` element).
    pub fn embed(
        &self,
        inputs: &[ModelInput],
        request: &PipelineRequest,
        first_index: usize,
    ) -> Result<PipelineOutput, PipelineError> {
        // Before any model work: a width over the fused vector's is the caller's mistake.
        // The fused width does not depend on the models (the layer need not be built yet).
        let width = embedfleet_fusion::FuseMoeConfig::for_input_dims(vec![1]).output_dim;
        if let Some(dimensions) = request.output.dimensions.filter(|&d| d > width || d == 0) {
            return Err(PipelineError::Dimensions { dimensions, width });
        }
        crate::plan::check_modalities(inputs, &self.models).map_err(|untaken| {
            PipelineError::NoModelTakesInput {
                index: first_index + untaken.index,
                modality: untaken.modality,
                models: untaken.models,
            }
        })?;

        // partials[slot][input]: None where the slot's model does not take the input's modality.
        let mut partials: Vec<Vec<Option<Vec<f32>>>> = Vec::with_capacity(self.models.len());
        let mut prompt_tokens = 0u64;
        for spec in &self.models {
            let taken: Vec<usize> = (0..inputs.len())
                .filter(|&i| spec.takes(inputs[i].modality()))
                .collect();
            let mut slot = vec![None; inputs.len()];
            if !taken.is_empty() {
                let model = self.registry.get(spec.name)?;
                // The usual case, every input of one modality, borrows the caller's slice; only
                // a mixed batch copies out the inputs this model takes.
                let subset: Vec<ModelInput>;
                let batch = if taken.len() == inputs.len() {
                    inputs
                } else {
                    subset = taken.iter().map(|&i| inputs[i].clone()).collect();
                    &subset
                };
                let embedded = model
                    .embed_batch(batch, &request.options)
                    .map_err(|error| renumber(error, &taken, first_index))?;
                for (&i, embedding) in taken.iter().zip(embedded) {
                    prompt_tokens += embedding.tokens as u64;
                    slot[i] = Some(embedding.vector);
                }
            }
            partials.push(slot);
        }

        let fused = if request.fuse {
            let rows: Vec<Vec<Option<&[f32]>>> = (0..inputs.len())
                .map(|i| partials.iter().map(|slot| slot[i].as_deref()).collect())
                .collect();
            Some(self.fusion()?.fuse_batch(&rows)?)
        } else {
            None
        };

        let mut fused = fused.map(Vec::into_iter);
        let mut data: Vec<EmbeddingData> = (0..inputs.len())
            .map(|i| {
                let mut element = EmbeddingData::new(first_index + i);
                if let Some(fusion) = fused.as_mut().and_then(Iterator::next) {
                    element.embedding = Some(fusion.embedding.into());
                    element.experts = Some(ExpertSelection {
                        weights: fusion.expert_weights,
                        selected: fusion.selected,
                    });
                }
                if request.return_partials || !request.fuse {
                    let by_name: BTreeMap<String, Vec<f32>> = self
                        .models
                        .iter()
                        .zip(&mut partials)
                        .filter_map(|(spec, slot)| {
                            slot[i].take().map(|vector| (spec.name.to_string(), vector))
                        })
                        .collect();
                    element.partials = Some(by_name);
                }
                element
            })
            .collect();
        // The width was checked above, so this cannot fail.
        request
            .output
            .apply_to(&mut data)
            .map_err(|_| PipelineError::Dimensions {
                dimensions: request.output.dimensions.unwrap_or(0),
                width,
            })?;
        Ok(PipelineOutput {
            data,
            prompt_tokens,
        })
    }
}

/// A model numbers inputs within the sub-batch it was given; callers need their own numbering.
fn renumber(error: ModelError, taken: &[usize], first_index: usize) -> ModelError {
    let global = |index: usize| first_index + taken.get(index).copied().unwrap_or(index);
    match error {
        ModelError::EmptyInput { index } => ModelError::EmptyInput {
            index: global(index),
        },
        ModelError::InputTooLong {
            model,
            index,
            tokens,
            max,
        } => ModelError::InputTooLong {
            model,
            index: global(index),
            tokens,
            max,
        },
        ModelError::BadImage { index, source } => ModelError::BadImage {
            index: global(index),
            source,
        },
        other => other,
    }
}
