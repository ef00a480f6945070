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
//! none when that is at most 1). Which model reads an instruction, its default and the prompt
//! are the catalogue's ([`Prompting::Instruction`]); an empty instruction embeds the bare text
//! (INSTRUCTOR's plain-string input). The query/document switch does not change it: the
//! instruction says what the text is.

use candle_core::{DType, Device, Tensor};

use crate::arch::projection::Projections;
use crate::arch::t5::{T5Config, T5Encoder};
use crate::catalogue::{Architecture, ModelSpec, Prompting};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::model::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::packed::PackedBatch;
use crate::passes::{embed_in_passes, input_texts};
use crate::resolve::ModelFiles;
use crate::st_modules::SentenceModules;
use crate::text::{warn_if_width_differs, MAX_TOKENS_PER_FORWARD};
use crate::tokenize::TextTokenizer;

pub struct T5Embedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    tokenizer: TextTokenizer,
    encoder: T5Encoder,
    modules: SentenceModules,
    /// Width of the vectors after the Dense heads.
    dim: usize,
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
        warn_if_width_differs(spec, dim, &files.config);
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            tokenizer,
            encoder,
            modules,
            dim,
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
        let texts = input_texts(self.spec, inputs)?;
        let prompting = self.spec.prompting;
        let (ids, skip) =
            match prompting.instruction_for(options.instruction.as_deref(), options.input_type) {
                // Only INSTRUCTOR's instruction is left out of the pool; a prefix another prompting
                // adds (none of the T5 models has one today) is pooled with the text.
                Some(instruction) => {
                    let skip = match prompting {
                        Prompting::Instruction { .. } => self.instruction_tokens(instruction)?,
                        _ => 0,
                    };
                    let prompts: Vec<String> = texts
                        .iter()
                        .map(|text| prompting.prompt(instruction, text))
                        .collect();
                    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
                    (self.tokenizer.encode(&prompts, options.truncate, 0)?, skip)
                }
                None => (self.tokenizer.encode(&texts, options.truncate, 0)?, 0),
            };
        embed_in_passes(
            self.spec,
            &ids,
            MAX_TOKENS_PER_FORWARD,
            options.normalize,
            |batch| {
                let hidden_states = self.encoder.forward(batch)?;
                let pooled = self.pool(&hidden_states, batch, skip)?;
                self.modules.project(&pooled)?.to_vec2::<f32>()
            },
        )
    }
}
