//! A text embedding model: tokenizer + encoder + pooling, for every transformer text encoder in
//! the catalogue. This is the `EmbeddingModel` the registry hands out for minilm, mpnet and the
//! other BERT-family checkpoints.

use candle_core::{DType, Device};

use crate::arch::projection::Projections;
use crate::arch::{TextEncoder, TextEncoderConfig};
use crate::catalogue::{Architecture, ModelSpec};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::passes::{embed_in_passes, input_texts};
use crate::pooling::pool;
use crate::resolve::ModelFiles;
use crate::tokenize::TextTokenizer;

/// Most tokens one forward pass packs. Bounds activation memory (the feed-forward block holds
/// `tokens x intermediate` floats: 16k x 4096 x 4 B = 256 MiB for a large model) whatever batch
/// a caller sends; longer batches run as several passes.
pub const MAX_TOKENS_PER_FORWARD: usize = 16_384;

pub struct TextEmbedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    tokenizer: TextTokenizer,
    encoder: TextEncoder,
    /// The checkpoint's hidden size: the width of its pooled vectors (see [`warn_if_width_differs`]).
    dim: usize,
}

/// The width rule: a checkpoint may be narrower or wider than its catalogue slot (a smaller
/// sibling of the family, bge-base in the `bge-large` slot, or a tiny test checkpoint). It loads,
/// with a warning, and reports its own width through [`EmbeddingModel::dim`]; fusion is built for
/// the widths actually loaded, so nothing downstream assumes the catalogue's.
pub(crate) fn warn_if_width_differs(spec: &ModelSpec, width: usize, config: &std::path::Path) {
    if width != spec.dim {
        tracing::warn!(
            model = spec.name,
            width,
            catalogue_dim = spec.dim,
            config = %config.display(),
            "checkpoint width differs from the catalogue's; serving its vectors as they are"
        );
    }
}

impl TextEmbedder {
    /// Loads with f32 weights.
    pub fn load(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_at(spec, files, device, Dtype::F32)
    }

    /// Loads with the weights at `dtype` (on CPU: f32 runs the packed kernels, the others
    /// candle tensor ops).
    pub fn load_at(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
        dtype: Dtype,
    ) -> Result<Self, ModelError> {
        dtype.check_for(spec)?;
        let bad_config = |reason: String| ModelError::BadConfig {
            path: files.config.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&files.config).map_err(|e| bad_config(e.to_string()))?;
        let config: TextEncoderConfig =
            serde_json::from_str(&text).map_err(|e| bad_config(e.to_string()))?;
        let architecture = config.architecture();
        let compatible = architecture == spec.architecture
            // A RoBERTa-family checkpoint may declare itself `bert` only if the catalogue says BERT.
            || (spec.architecture == Architecture::Roberta && architecture == Architecture::Roberta);
        if !compatible {
            return Err(bad_config(format!(
                "`{}` expects a {:?} checkpoint, config.json describes {:?}",
                spec.name, spec.architecture, architecture
            )));
        }
        config.validate().map_err(bad_config)?;

        let corrupt = |e: candle_core::Error| ModelError::CorruptWeights {
            path: files.weights.primary().to_path_buf(),
            reason: e.to_string(),
        };
        let vb = files
            .weights
            .var_builder(dtype.activation_dtype(), device)?;
        let projections = Projections::new(dtype);
        let encoder = TextEncoder::load(vb, &config, &projections).map_err(corrupt)?;
        projections.warn_fallbacks(spec.name);

        let hidden = match &config {
            TextEncoderConfig::Bert(c)
            | TextEncoderConfig::Roberta(c)
            | TextEncoderConfig::XlmRoberta(c) => c.hidden_size,
            TextEncoderConfig::Mpnet(c) => c.hidden_size,
        };
        warn_if_width_differs(spec, hidden, &files.config);
        let max_len = spec.max_seq_len.min(encoder.max_positions());
        let tokenizer = TextTokenizer::from_files(files, spec.name, max_len)?;
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            tokenizer,
            encoder,
            dim: hidden,
        })
    }

    /// The longest input in tokens; longer ones are cut, or rejected when `truncate` is off.
    pub fn max_len(&self) -> usize {
        self.tokenizer.max_len()
    }
}

impl EmbeddingModel for TextEmbedder {
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
        let texts = input_texts(self.spec, inputs)?;
        let texts =
            self.spec
                .prompting
                .apply(options.instruction.as_deref(), options.input_type, &texts);
        let texts: Vec<&str> = texts.iter().map(|text| text.as_ref()).collect();
        let ids = self.tokenizer.encode(&texts, options.truncate, 0)?;
        embed_in_passes(
            self.spec,
            &ids,
            MAX_TOKENS_PER_FORWARD,
            options.normalize,
            |batch| {
                let hidden_states = self.encoder.forward(batch)?;
                pool(&hidden_states, batch, self.spec.pooling)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()
            },
        )
    }
}
