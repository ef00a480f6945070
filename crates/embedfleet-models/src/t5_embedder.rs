//! The `EmbeddingModel` for T5 sentence encoders: `sentence-t5-xxl` and `instructor-xl`.
//!
//! Both are sentence-transformers pipelines around a T5 encoder: tokenize (`tokenizer.json`,
//! `</s>` appended), encode, mean-pool, the `Dense` head(s) of `modules.json` down to the output
//! width, normalise. sentence-t5 embeds the text as it is and ignores instructions.
//!
//! instructor-xl follows the INSTRUCTOR recipe (Su et al., 2022, "One Embedder, Any Task";
//! `InstructorEmbedding` 1.0.1, `instructor.py`): the input is `instruction + text.strip()`
//! (concatenated as they are, then stripped), the encoder attends to all of it, and the mean pool
//! skips the instruction's tokens (`len(tokenize(instruction)) - 1`, i.e. without its `</s>`;
//! none when that is at most 1). Without a request instruction it uses
//! [`DEFAULT_INSTRUCTION`]; an empty instruction embeds the bare text (INSTRUCTOR's plain-string
//! input). The query/document switch does not change it: the instruction says what the text is.

use std::cmp::Reverse;

use candle_core::{DType, Device, Tensor};

use crate::arch::projection::Projections;
use crate::arch::t5::{T5Config, T5Encoder};
use crate::catalogue::{Architecture, ModelSpec};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{l2_normalize, EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::packed::PackedBatch;
use crate::resolve::ModelFiles;
use crate::st_modules::SentenceModules;
use crate::text::{split_by_token_budget, MAX_TOKENS_PER_FORWARD};
use crate::tokenize::TextTokenizer;

/// instructor-xl's instruction when a request gives none: INSTRUCTOR's retrieval-document form
/// ("Represent the [domain] [text type] for [task]:", README), without a domain, as the common
/// integrations (LangChain's `HuggingFaceInstructEmbeddings`) default to.
pub const DEFAULT_INSTRUCTION: &str = "Represent the document for retrieval: ";

/// The catalogue models that read `instruction` the INSTRUCTOR way.
const INSTRUCTOR_MODELS: &[&str] = &["instructor-xl"];

pub struct T5Embedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    tokenizer: TextTokenizer,
    encoder: T5Encoder,
    modules: SentenceModules,
    /// Width of the vectors after the Dense heads.
    dim: usize,
    /// Whether `instruction` is read (instructor) or ignored (sentence-t5).
    instructed: bool,
}

impl T5Embedder {
    /// Loads with f32 weights (checkpoints stored as bf16 or f16 are widened on load).
    pub fn load(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_at(spec, files, device, Dtype::F32)
    }

    /// Loads with the weights at `dtype`: f32 (on CPU the packed kernels), bf16 or quantised
    /// (tensor ops). f16 is refused with [`ModelError::UnsupportedDtype`]: T5's activations grow
    /// past f16's range (transformers clamps them; the result is then not the model's).
    pub fn load_at(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
        dtype: Dtype,
    ) -> Result<Self, ModelError> {
        let bad_config = |reason: String| ModelError::BadConfig {
            path: files.config.clone(),
            reason,
        };
        dtype.check_for(spec)?;
        if spec.architecture != Architecture::T5Encoder {
            return Err(bad_config(format!(
                "`{}` is a {:?} model, not a T5 encoder",
                spec.name, spec.architecture
            )));
        }
        let text = std::fs::read_to_string(&files.config).map_err(|e| bad_config(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_config(e.to_string()))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("t5") => {}
            other => {
                return Err(bad_config(format!(
                    "`{}` expects a T5 checkpoint (model_type `t5`), config.json says {other:?}",
                    spec.name
                )))
            }
        }
        let config: T5Config =
            serde_json::from_value(value).map_err(|e| bad_config(e.to_string()))?;
        config.validate().map_err(bad_config)?;

        let modules = SentenceModules::load(files, config.d_model, device)?;
        let max_len = modules
            .max_seq_length
            .map_or(spec.max_seq_len, |len| len.min(spec.max_seq_len));
        let tokenizer_json = if files.file("tokenizer.json").is_none()
            && files.file("spiece.model").is_some()
        {
            files.require(
                "tokenizer.json",
                "the tokenizer: only spiece.model is here, and this build reads T5's \
                 SentencePiece vocabulary from tokenizer.json (both upstream repositories ship one)",
            )?
        } else {
            files.require("tokenizer.json", "the tokenizer")?
        };
        let tokenizer = TextTokenizer::load(&tokenizer_json, spec.name, max_len)?;

        let vb = files
            .weights
            .var_builder(dtype.activation_dtype(), device)?;
        let projections = Projections::new(dtype);
        let encoder = T5Encoder::load(vb, &config, max_len, &projections).map_err(|e| {
            ModelError::CorruptWeights {
                path: files.weights.primary().to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        projections.warn_fallbacks(spec.name);
        let dim = modules.output_width(config.d_model);
        if dim != spec.dim {
            tracing::warn!(
                model = spec.name,
                dim,
                catalogue_dim = spec.dim,
                "checkpoint width differs from the catalogue's; serving it as it is"
            );
        }
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            tokenizer,
            encoder,
            modules,
            dim,
            instructed: INSTRUCTOR_MODELS.contains(&spec.name),
        })
    }

    /// The longest input in tokens (instruction included); longer ones are cut, or rejected
    /// when `truncate` is off.
    pub fn max_len(&self) -> usize {
        self.tokenizer.max_len()
    }

    /// How many leading tokens of `instruction + text` the pool skips (INSTRUCTOR's
    /// `context_masks`).
    fn instruction_tokens(&self, instruction: &str) -> Result<usize, ModelError> {
        let instruction = instruction.trim();
        if instruction.is_empty() {
            return Ok(0);
        }
        let tokens = match self.tokenizer.encode(&[instruction], false, 0) {
            Ok(ids) => ids[0].len(),
            Err(ModelError::InputTooLong { tokens, .. }) => tokens,
            Err(other) => return Err(other),
        };
        if tokens >= self.max_len() {
            return Err(ModelError::InstructionTooLong {
                model: self.spec.name.to_string(),
                tokens,
                max: self.max_len(),
            });
        }
        // Without its `</s>`; INSTRUCTOR leaves one-token instructions unmasked.
        let skip = tokens - 1;
        Ok(if skip <= 1 { 0 } else { skip })
    }

    /// Mean of each sequence's states after its first `skip` tokens, `[sequences, hidden]` in
    /// f32. A sequence with nothing left pools to zeros, as INSTRUCTOR's clamped division gives.
    fn pool(
        &self,
        hidden_states: &Tensor,
        batch: &PackedBatch,
        skip: usize,
    ) -> candle_core::Result<Tensor> {
        let (rows, cols) = (batch.sequences(), batch.tokens());
        let mut weights = vec![0f32; rows * cols];
        for s in 0..rows {
            let (start, end) = (
                batch.offsets[s] + skip.min(batch.len_of(s)),
                batch.offsets[s + 1],
            );
            if end > start {
                weights[s * cols + start..s * cols + end].fill(1.0 / (end - start) as f32);
            }
        }
        let matrix = Tensor::from_vec(weights, (rows, cols), hidden_states.device())?;
        matrix.matmul(&hidden_states.to_dtype(DType::F32)?)
    }
}

impl EmbeddingModel for T5Embedder {
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
        if let Some(index) = texts.iter().position(|text| text.trim().is_empty()) {
            return Err(ModelError::EmptyInput { index });
        }
        let (ids, skip) = if self.instructed {
            let instruction = options
                .instruction
                .as_deref()
                .unwrap_or(DEFAULT_INSTRUCTION);
            let skip = self.instruction_tokens(instruction)?;
            let joined: Vec<String> = texts
                .iter()
                .map(|text| format!("{instruction}{}", text.trim()).trim().to_string())
                .collect();
            let joined: Vec<&str> = joined.iter().map(String::as_str).collect();
            (self.tokenizer.encode(&joined, options.truncate, 0)?, skip)
        } else {
            (self.tokenizer.encode(&texts, options.truncate, 0)?, 0)
        };

        // Longest first, so each pass packs sequences of similar length (as text.rs does).
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| Reverse(ids[i].len()));
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        let infer = ModelError::inference(self.spec.name);
        for pass in split_by_token_budget(&order, &ids, MAX_TOKENS_PER_FORWARD) {
            let batch =
                PackedBatch::new(&pass.iter().map(|&i| ids[i].as_slice()).collect::<Vec<_>>());
            let hidden_states = self.encoder.forward(&batch).map_err(&infer)?;
            let rows = self
                .pool(&hidden_states, &batch, skip)
                .and_then(|pooled| self.modules.project(&pooled))
                .and_then(|projected| projected.to_vec2::<f32>())
                .map_err(&infer)?;
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
