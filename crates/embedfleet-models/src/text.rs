//! A text embedding model: tokenizer + encoder + pooling, for every transformer text encoder in
//! the catalogue. This is the `EmbeddingModel` the registry hands out for minilm, mpnet and the
//! other BERT-family checkpoints.

use std::cmp::Reverse;

use candle_core::{DType, Device};

use crate::arch::projection::Projections;
use crate::arch::{TextEncoder, TextEncoderConfig};
use crate::catalogue::{Architecture, ModelSpec};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{l2_normalize, EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::packed::PackedBatch;
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
        let vb = files.weights.var_builder(dtype.activation_dtype(), device)?;
        let projections = Projections::new(dtype);
        let encoder = TextEncoder::load(vb, &config, &projections).map_err(corrupt)?;
        projections.warn_fallbacks(spec.name);

        let hidden = match &config {
            TextEncoderConfig::Bert(c)
            | TextEncoderConfig::Roberta(c)
            | TextEncoderConfig::XlmRoberta(c) => c.hidden_size,
            TextEncoderConfig::Mpnet(c) => c.hidden_size,
        };
        if hidden != spec.dim {
            return Err(bad_config(format!(
                "hidden_size {hidden} does not match `{}`'s dim {}",
                spec.name, spec.dim
            )));
        }
        let max_len = spec.max_seq_len.min(encoder.max_positions());
        let tokenizer_json = files.require("tokenizer.json", "the tokenizer")?;
        let tokenizer = TextTokenizer::load(&tokenizer_json, spec.name, max_len)?;
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            tokenizer,
            encoder,
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
        self.spec.dim
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        let texts = inputs
            .iter()
            .map(|input| match input.text() {
                Some(text) if self.spec.takes(input.modality()) => Ok(text),
                _ => Err(ModelError::UnsupportedModality {
                    model: self.spec.name.to_string(),
                    modality: input.modality(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = self.tokenizer.encode(&texts, options.truncate, 0)?;

        // Longest first, so each forward pass packs sequences of similar length and the token
        // budget splits the batch into as few passes as possible.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| Reverse(ids[i].len()));

        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for pass in split_by_token_budget(&order, &ids, MAX_TOKENS_PER_FORWARD) {
            let batch =
                PackedBatch::new(&pass.iter().map(|&i| ids[i].as_slice()).collect::<Vec<_>>());
            let infer = ModelError::inference(self.spec.name);
            let hidden_states = self.encoder.forward(&batch).map_err(&infer)?;
            let pooled = pool(&hidden_states, &batch, self.spec.pooling).map_err(&infer)?;
            let rows = pooled
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(infer)?;
            for (mut row, &index) in rows.into_iter().zip(pass) {
                if options.normalize {
                    l2_normalize(&mut row);
                }
                vectors[index] = row;
            }
        }
        Ok(vectors
            .into_iter()
            .zip(&ids)
            .map(|(vector, ids)| ModelEmbedding {
                vector,
                tokens: ids.len(),
            })
            .collect())
    }
}

/// Consecutive runs of `order` whose token counts fit the budget (a single sequence longer than
/// the budget still gets a pass of its own).
pub(crate) fn split_by_token_budget<'a>(
    order: &'a [usize],
    ids: &'a [Vec<u32>],
    budget: usize,
) -> Vec<&'a [usize]> {
    let mut passes = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (position, &index) in order.iter().enumerate() {
        let len = ids[index].len();
        if position > start && tokens + len > budget {
            passes.push(&order[start..position]);
            (start, tokens) = (position, 0);
        }
        tokens += len;
    }
    if start < order.len() {
        passes.push(&order[start..]);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_splits_passes_without_dropping_any_input() {
        let ids = vec![vec![0; 6], vec![0; 5], vec![0; 4], vec![0; 20], vec![0; 1]];
        let order = [3, 0, 1, 2, 4];
        let passes = split_by_token_budget(&order, &ids, 10);
        assert_eq!(passes, vec![&[3][..], &[0][..], &[1, 2, 4][..]]);
        assert!(split_by_token_budget(&[], &ids, 10).is_empty());
    }
}
