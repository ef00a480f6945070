//! e5-mistral as an `EmbeddingModel`: the query template, the EOS the model pools on, the
//! Mistral decoder, last-token pooling and normalisation.
//!
//! The recipe is intfloat/e5-mistral-7b-instruct's documented usage (its model card and
//! `unilm/e5`): queries are `Instruct: {task}\nQuery: {text}`, documents are plain text (the
//! template and the default task are the catalogue's, [`Prompting::InstructedQuery`]); the
//! tokenizer adds `<s>`, the input is cut to `max_len - 1` tokens and `</s>` is appended; the
//! vector is the last token's final hidden state, L2-normalised. A tokenizer whose template
//! already appends `</s>` (the newer files of the same repository) is detected at load and gets
//! nothing appended, which gives the same ids.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::arch::mistral::{MistralConfig, MistralModel};
use crate::catalogue::{ModelSpec, Prompting};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::passes::{embed_in_passes, input_texts};
use crate::resolve::{ModelFiles, WeightFiles};
use crate::text::warn_if_width_differs;
use crate::tokenize::TextTokenizer;

/// Most tokens one forward pass packs. The SwiGLU block holds `tokens x 2 x intermediate` floats
/// (4096 x 28672 x 4 B = 470 MiB for e5-mistral), so the budget is one full-length input.
pub const DECODER_TOKENS_PER_FORWARD: usize = 4096;

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
        warn_if_width_differs(spec, config.hidden_size, &files.config);

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

    /// Refuses an instruction whose prompt alone (with `<s>` and `</s>`) leaves no token for
    /// the text.
    fn check_instruction(&self, instruction: &str) -> Result<(), ModelError> {
        let prefix = self
            .counter
            .encode(self.spec.prompting.prompt(instruction, ""), true)
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
        let texts = input_texts(self.spec, inputs)?;
        let prompting: Prompting = self.spec.prompting;
        let instruction = options.instruction.as_deref();
        if let Some(instruction) = prompting.instruction_for(instruction, options.input_type) {
            self.check_instruction(instruction)?;
        }
        let prompts = prompting.apply(instruction, options.input_type, &texts);
        let prompts: Vec<&str> = prompts.iter().map(|prompt| prompt.as_ref()).collect();
        let ids = self.token_ids(&prompts, options.truncate)?;
        embed_in_passes(
            self.spec,
            &ids,
            DECODER_TOKENS_PER_FORWARD,
            options.normalize,
            |batch| {
                self.model
                    .forward_last_tokens(batch)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()
            },
        )
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
