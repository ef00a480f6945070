//! e5-mistral as an `EmbeddingModel`: the query template, the EOS the model pools on, the
//! Mistral decoder, last-token pooling and normalisation.
//!
//! The recipe is intfloat/e5-mistral-7b-instruct's documented usage (its model card and
//! `unilm/e5`): queries are `Instruct: {task}\nQuery: {text}`, documents are plain text; the
//! tokenizer adds `<s>`, the input is cut to `max_len - 1` tokens and `</s>` is appended; the
//! vector is the last token's final hidden state, L2-normalised. A tokenizer whose template
//! already appends `</s>` (the newer files of the same repository) is detected at load and gets
//! nothing appended, which gives the same ids.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use embedfleet_proto::InputType;
use tokenizers::Tokenizer;

use crate::arch::mistral::{MistralConfig, MistralModel};
use crate::catalogue::ModelSpec;
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{l2_normalize, EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::packed::PackedBatch;
use crate::resolve::{ModelFiles, WeightFiles};
use crate::text::split_by_token_budget;
use crate::tokenize::TextTokenizer;

/// The task a query is embedded for when the request names none: the model card's example and
/// sentence-transformers' `web_search_query` prompt.
pub const DEFAULT_QUERY_TASK: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

/// Most tokens one forward pass packs. The SwiGLU block holds `tokens x 2 x intermediate` floats
/// (4096 x 28672 x 4 B = 470 MiB for e5-mistral), so the budget is one full-length input.
pub const DECODER_TOKENS_PER_FORWARD: usize = 4096;

/// The text a query becomes: e5-mistral's instruction template.
pub fn query_prompt(task: &str, query: &str) -> String {
    format!("Instruct: {task}\nQuery: {query}")
}

pub struct DecoderEmbedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    /// Cuts at `max_len - 1` when the EOS is appended here, at `max_len` when the template adds it.
    tokenizer: TextTokenizer,
    /// The same tokenizer uncut, to measure an instruction's share of the length limit.
    counter: Tokenizer,
    /// The EOS id to append, or `None` when the tokenizer's template already appends it.
    append_eos: Option<u32>,
    max_len: usize,
    model: MistralModel,
}

impl DecoderEmbedder {
    /// Loads with f32 weights (checkpoints stored as bf16 are widened on load).
    pub fn load(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_at(spec, files, device, Dtype::F32)
    }

    /// Loads with the weights at `dtype` (on CPU: f32 runs the decoder kernels, the others
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
        let config: MistralConfig =
            serde_json::from_str(&text).map_err(|e| bad_config(e.to_string()))?;
        config.validate().map_err(bad_config)?;
        check_shard_shapes(&files.weights, &config)?;

        let vb = files
            .weights
            .var_builder(dtype.activation_dtype(), device)?;
        let projections = crate::arch::projection::Projections::new(dtype);
        let model = MistralModel::load(vb, &config, &projections).map_err(|e| {
            ModelError::CorruptWeights {
                path: files.weights.primary().to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        projections.warn_fallbacks(spec.name);
        if config.hidden_size != spec.dim {
            tracing::warn!(
                model = spec.name,
                loaded = config.hidden_size,
                catalogue = spec.dim,
                "checkpoint width differs from the catalogue's; serving its own width"
            );
        }

        let max_len = spec.max_seq_len.min(config.max_position_embeddings);
        if max_len < 3 {
            return Err(bad_config(format!(
                "max_position_embeddings {} leaves no room for <s>, text and </s>",
                config.max_position_embeddings
            )));
        }
        let tokenizer_json = files.require("tokenizer.json", "the tokenizer")?;
        let bad_tokenizer = |reason: String| ModelError::BadTokenizer {
            path: tokenizer_json.clone(),
            reason,
        };
        let mut counter =
            Tokenizer::from_file(&tokenizer_json).map_err(|e| bad_tokenizer(e.to_string()))?;
        counter.with_padding(None);
        counter
            .with_truncation(None)
            .map_err(|e| bad_tokenizer(e.to_string()))?;
        let tokenizer_vocab = counter.get_vocab_size(true);
        if tokenizer_vocab > config.vocab_size {
            return Err(bad_tokenizer(format!(
                "{tokenizer_vocab} tokens, more than config.json's vocab_size {}",
                config.vocab_size
            )));
        }
        let eos = config
            .eos_token_id()
            .or_else(|| counter.token_to_id("</s>"))
            .filter(|&id| (id as usize) < config.vocab_size)
            .ok_or_else(|| bad_config("no usable eos_token_id (and no `</s>` token)".into()))?;
        let probe = counter
            .encode("a", true)
            .map_err(|e| bad_tokenizer(e.to_string()))?;
        let template_appends_eos = probe.get_ids().last() == Some(&eos);
        let cut_at = if template_appends_eos {
            max_len
        } else {
            max_len - 1
        };
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            tokenizer: TextTokenizer::load(&tokenizer_json, spec.name, cut_at)?,
            counter,
            append_eos: (!template_appends_eos).then_some(eos),
            max_len,
            model,
        })
    }

    /// The longest input in tokens, `<s>` and `</s>` included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Refuses a task whose template alone (with `<s>` and `</s>`) leaves no token for the query.
    fn check_instruction(&self, task: &str) -> Result<(), ModelError> {
        let prefix = self
            .counter
            .encode(query_prompt(task, ""), true)
            .map_err(|e| ModelError::Tokenize {
                model: self.spec.name.to_string(),
                reason: e.to_string(),
            })?;
        let tokens = prefix.get_ids().len() + usize::from(self.append_eos.is_some());
        if tokens >= self.max_len {
            return Err(ModelError::InstructionTooLong {
                model: self.spec.name.to_string(),
                tokens,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Token ids of each text as the model reads them: `<s> ... </s>`.
    fn token_ids(&self, texts: &[&str], truncate: bool) -> Result<Vec<Vec<u32>>, ModelError> {
        let appended = usize::from(self.append_eos.is_some());
        let mut ids = self
            .tokenizer
            .encode(texts, truncate, 0)
            .map_err(|error| match error {
                // Report the length and limit the caller can act on: with the EOS, against max_len.
                ModelError::InputTooLong {
                    model,
                    index,
                    tokens,
                    ..
                } => ModelError::InputTooLong {
                    model,
                    index,
                    tokens: tokens + appended,
                    max: self.max_len,
                },
                other => other,
            })?;
        if let Some(eos) = self.append_eos {
            ids.iter_mut().for_each(|ids| ids.push(eos));
        }
        Ok(ids)
    }
}

impl EmbeddingModel for DecoderEmbedder {
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
        self.model.hidden_size()
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        let mut texts = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            match input.text() {
                Some(text) if self.spec.takes(input.modality()) => {
                    // Checked before templating: a blank query must not pass as its template.
                    if text.trim().is_empty() {
                        return Err(ModelError::EmptyInput { index });
                    }
                    texts.push(text);
                }
                _ => {
                    return Err(ModelError::UnsupportedModality {
                        model: self.spec.name.to_string(),
                        modality: input.modality(),
                    })
                }
            }
        }
        let prompts: Vec<String> = match options.input_type {
            InputType::Document => texts.iter().map(|t| t.to_string()).collect(),
            InputType::Query => {
                let task = options
                    .instruction
                    .as_deref()
                    .map(str::trim)
                    .filter(|task| !task.is_empty())
                    .unwrap_or(DEFAULT_QUERY_TASK);
                self.check_instruction(task)?;
                texts.iter().map(|text| query_prompt(task, text)).collect()
            }
        };
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self.token_ids(&prompts, options.truncate)?;

        // Longest first, so the token budget splits the batch into as few passes as possible.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| Reverse(ids[i].len()));
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        for pass in split_by_token_budget(&order, &ids, DECODER_TOKENS_PER_FORWARD) {
            let batch =
                PackedBatch::new(&pass.iter().map(|&i| ids[i].as_slice()).collect::<Vec<_>>());
            let infer = ModelError::inference(self.spec.name);
            let rows = self
                .model
                .forward_last_tokens(&batch)
                .and_then(|t| t.to_dtype(DType::F32))
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

/// Checks every tensor of every safetensors shard against the shape config.json implies, so a
/// shard from another checkpoint is an error naming that shard, not a failed reshape later.
fn check_shard_shapes(weights: &WeightFiles, config: &MistralConfig) -> Result<(), ModelError> {
    let WeightFiles::Safetensors(paths) = weights else {
        // A pickle has no header to read cheaply; the loader's own shape checks apply.
        return Ok(());
    };
    let expected: HashMap<String, Vec<usize>> = config.expected_shapes().into_iter().collect();
    for path in paths {
        let corrupt = |reason: String| ModelError::CorruptWeights {
            path: path.clone(),
            reason,
        };
        for (name, shape) in shard_shapes(path).map_err(corrupt)? {
            let key = name.strip_prefix("model.").unwrap_or(&name);
            if let Some(want) = expected.get(key) {
                if *want != shape {
                    return Err(corrupt(format!(
                        "tensor `{name}` has shape {shape:?}, config.json implies {want:?}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Tensor names and shapes from a safetensors header (only the header pages are read).
fn shard_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: read-only map of an immutable checkpoint file, as every safetensors loader does.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| e.to_string())?;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect())
}
