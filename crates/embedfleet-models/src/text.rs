//! A text embedding model: tokenizer + encoder + pooling, for every transformer text encoder in
//! the catalogue. This is the `EmbeddingModel` the registry hands out for minilm, mpnet and the
//! other BERT-family checkpoints.

use std::borrow::Cow;
use std::cmp::Reverse;

use candle_core::{DType, Device};
use embedfleet_proto::InputType;

use crate::arch::{TextEncoder, TextEncoderConfig};
use crate::catalogue::{Architecture, ModelSpec, Prompting};
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
    tokenizer: TextTokenizer,
    encoder: TextEncoder,
    /// The checkpoint's hidden size: the width of its pooled vectors (see [`warn_if_width_differs`]).
    dim: usize,
}

/// The width rule: a checkpoint may be narrower or wider than its catalogue slot (a smaller
/// sibling of the family, bge-base in the `bge-large` slot, or a tiny test checkpoint). It loads,
/// with a warning, and reports its own width through [`EmbeddingModel::dim`]; fusion is built for
/// the widths actually loaded, so nothing downstream assumes the catalogue's.
pub fn warn_if_width_differs(spec: &ModelSpec, width: usize, config: &std::path::Path) {
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
    pub fn load(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
    ) -> Result<Self, ModelError> {
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
        let vb = files.weights.var_builder(DType::F32, device)?;
        let encoder = TextEncoder::load(vb, &config).map_err(corrupt)?;

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
            revision: files.revision.clone(),
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

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        // Code goes through as its text; `language` is for the cache key, not the encoder.
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
        // Blank is blank before any prefix is added.
        if let Some(index) = texts.iter().position(|text| text.trim().is_empty()) {
            return Err(ModelError::EmptyInput { index });
        }
        let texts = prompted(self.spec.prompting, options.input_type, texts);
        let texts: Vec<&str> = texts.iter().map(|text| text.as_ref()).collect();
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

/// The texts as the model reads them under its [`Prompting`]. Encoders here are plain or take a
/// fixed query prefix; instruction-tuned models have their own files (t5.rs, mistral.rs).
fn prompted(prompting: Prompting, input_type: InputType, texts: Vec<&str>) -> Vec<Cow<'_, str>> {
    match (prompting, input_type) {
        (Prompting::QueryPrefix(prefix), InputType::Query) => texts
            .into_iter()
            .map(|text| Cow::Owned(format!("{prefix}{text}")))
            .collect(),
        _ => texts.into_iter().map(Cow::Borrowed).collect(),
    }
}

/// Consecutive runs of `order` whose token counts fit the budget (a single sequence longer than
/// the budget still gets a pass of its own).
fn split_by_token_budget<'a>(
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
