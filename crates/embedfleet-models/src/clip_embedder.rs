//! The `EmbeddingModel` for CLIP (`clip-vit-l`): images through the vision tower, text through
//! the text tower, both into the shared projection space.
//!
//! A batch may mix the two: each input goes to the tower of its modality and comes back in
//! input order. Images are decoded and preprocessed one at a time (`image_input.rs`), so one
//! decoded image at most is alive, and run through the vision tower in groups of
//! [`IMAGES_PER_FORWARD`]; text is tokenized with the checkpoint's `tokenizer.json` and cut at
//! the text tower's 77 positions (or refused with 413 when `truncate` is off).

use candle_core::Device;

use crate::arch::clip::{ClipConfig, ClipTextTower, ClipVisionTower};
use crate::arch::projection::Projections;
use crate::catalogue::{Architecture, ModelSpec};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::image_input::{self, ImageLimits, ImagePreprocessor};
use crate::model::{l2_normalize, EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::resolve::ModelFiles;
use crate::text::warn_if_width_differs;
use crate::tokenize::TextTokenizer;

/// Images per vision forward: bounds activation memory (ViT-L/14 at 224: 257 tokens x 4,096
/// wide in the MLP, about 4 MiB per image in f32) whatever batch a caller sends.
pub const IMAGES_PER_FORWARD: usize = 16;

/// Texts per text forward (77 tokens each at most).
const TEXTS_PER_FORWARD: usize = 64;

pub struct ClipEmbedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    device: Device,
    tokenizer: TextTokenizer,
    vision: ClipVisionTower,
    text: ClipTextTower,
    preprocessor: ImagePreprocessor,
    limits: ImageLimits,
    dim: usize,
}

impl ClipEmbedder {
    /// Loads a `CLIPModel` checkpoint: `config.json`, the weights, `tokenizer.json` and
    /// `preprocessor_config.json` (CLIP's values when the file is absent).
    pub fn load_at(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
        dtype: Dtype,
        limits: ImageLimits,
    ) -> Result<Self, ModelError> {
        dtype.check_for(spec)?;
        let bad_config = |path: &std::path::Path, reason: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        if spec.architecture != Architecture::Clip {
            return Err(bad_config(
                &files.config,
                format!(
                    "`{}` is a {:?} model, not CLIP",
                    spec.name, spec.architecture
                ),
            ));
        }
        let text = std::fs::read_to_string(&files.config)
            .map_err(|e| bad_config(&files.config, e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_config(&files.config, e.to_string()))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("clip") => {}
            other => {
                return Err(bad_config(
                    &files.config,
                    format!(
                        "`{}` expects a CLIPModel checkpoint (model_type `clip`), config.json \
                         says {other:?}",
                        spec.name
                    ),
                ))
            }
        }
        let config: ClipConfig =
            serde_json::from_value(value).map_err(|e| bad_config(&files.config, e.to_string()))?;
        config
            .validate()
            .map_err(|e| bad_config(&files.config, e))?;

        let preprocessor = match files.file("preprocessor_config.json") {
            Some(path) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|e| bad_config(&path, e.to_string()))?;
                ImagePreprocessor::from_json(&text).map_err(|e| bad_config(&path, e))?
            }
            None => {
                tracing::warn!(
                    model = spec.name,
                    "no preprocessor_config.json; using CLIP's image preprocessing"
                );
                ImagePreprocessor::default()
            }
        };
        let side = config.vision_config.image_size;
        // Every image must come out at the tower's size; only a crop guarantees that for any
        // input, or an exact resize to it.
        let fixed = match (preprocessor.crop, preprocessor.resize) {
            (Some(crop), _) => crop == (side, side),
            (None, Some(image_input::ResizeTo::Exact { height, width })) => {
                (height, width) == (side, side)
            }
            (None, _) => false,
        };
        if !fixed {
            return Err(bad_config(
                &files.dir.join("preprocessor_config.json"),
                format!("images must come out {side} x {side} (vision_config.image_size)"),
            ));
        }

        let vb = files
            .weights
            .var_builder(dtype.activation_dtype(), device)?;
        let corrupt = |e: candle_core::Error| ModelError::CorruptWeights {
            path: files.weights.primary().to_path_buf(),
            reason: e.to_string(),
        };
        let projections = Projections::new(dtype);
        let vision = ClipVisionTower::load(vb.clone(), &config, &projections).map_err(corrupt)?;
        let text_tower = ClipTextTower::load(vb, &config, &projections).map_err(corrupt)?;
        projections.warn_fallbacks(spec.name);
        let max_len = spec.max_seq_len.min(text_tower.max_positions());
        let tokenizer = TextTokenizer::load(
            &files.require("tokenizer.json", "the text tower's tokenizer")?,
            spec.name,
            max_len,
        )?;
        warn_if_width_differs(spec, config.projection_dim, &files.config);
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            device: device.clone(),
            tokenizer,
            vision,
            text: text_tower,
            preprocessor,
            limits,
            dim: config.projection_dim,
        })
    }

    /// The pixel tensor of one encoded image, `[3, side, side]`; `index` names it in errors.
    pub fn pixels(&self, bytes: &[u8], index: usize) -> Result<Vec<f32>, ModelError> {
        let image = image_input::decode(bytes, &self.limits)
            .map_err(|source| ModelError::BadImage { index, source })?;
        Ok(self.preprocessor.pixels(&image))
    }

    fn embed_images(&self, images: &[(usize, &[u8])]) -> Result<Vec<Vec<f32>>, ModelError> {
        let infer = ModelError::inference(self.spec.name);
        let mut vectors = Vec::with_capacity(images.len());
        for group in images.chunks(IMAGES_PER_FORWARD) {
            let mut pixels = Vec::new();
            for &(index, bytes) in group {
                pixels.extend(self.pixels(bytes, index)?);
            }
            let out = self
                .vision
                .forward(&pixels, &self.device, self.dtype.activation_dtype())
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(&infer)?;
            vectors.extend(out);
        }
        Ok(vectors)
    }

    fn embed_texts(
        &self,
        texts: &[(usize, &str)],
        truncate: bool,
    ) -> Result<Vec<(Vec<f32>, usize)>, ModelError> {
        let infer = ModelError::inference(self.spec.name);
        let mut out = Vec::with_capacity(texts.len());
        for group in texts.chunks(TEXTS_PER_FORWARD) {
            let strings: Vec<&str> = group.iter().map(|&(_, text)| text).collect();
            let ids = self
                .tokenizer
                .encode(&strings, truncate, 0)
                .map_err(|e| reindex(e, group))?;
            let vectors = self
                .text
                .forward(&ids, &self.device)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(&infer)?;
            out.extend(vectors.into_iter().zip(ids.iter().map(Vec::len)));
        }
        Ok(out)
    }
}

/// A tokenizer error names the position within `group`; the caller's index is what it needs.
fn reindex(error: ModelError, group: &[(usize, &str)]) -> ModelError {
    match error {
        ModelError::EmptyInput { index } => ModelError::EmptyInput {
            index: group[index].0,
        },
        ModelError::InputTooLong {
            model,
            index,
            tokens,
            max,
        } => ModelError::InputTooLong {
            model,
            index: group[index].0,
            tokens,
            max,
        },
        other => other,
    }
}

impl EmbeddingModel for ClipEmbedder {
    fn spec(&self) -> &'static ModelSpec {
        self.spec
    }

    fn revision(&self) -> &str {
        &self.revision
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        let (mut images, mut texts) = (Vec::new(), Vec::new());
        for (index, input) in inputs.iter().enumerate() {
            match input {
                ModelInput::Image { bytes, .. } => images.push((index, bytes.as_slice())),
                ModelInput::Text(text) => {
                    if text.trim().is_empty() {
                        return Err(ModelError::EmptyInput { index });
                    }
                    texts.push((index, text.as_str()));
                }
                other => {
                    return Err(ModelError::UnsupportedModality {
                        model: self.spec.name.to_string(),
                        modality: other.modality(),
                    })
                }
            }
        }
        let mut out: Vec<Option<ModelEmbedding>> = vec![None; inputs.len()];
        let image_tokens = self.vision.sequence_len();
        for (&(index, _), vector) in images.iter().zip(self.embed_images(&images)?) {
            out[index] = Some(ModelEmbedding {
                vector,
                tokens: image_tokens,
            });
        }
        for (&(index, _), (vector, tokens)) in texts
            .iter()
            .zip(self.embed_texts(&texts, options.truncate)?)
        {
            out[index] = Some(ModelEmbedding { vector, tokens });
        }
        Ok(out
            .into_iter()
            .map(|embedding| {
                let mut embedding = embedding.expect("every input went to one tower");
                if options.normalize {
                    l2_normalize(&mut embedding.vector);
                }
                embedding
            })
            .collect())
    }
}
