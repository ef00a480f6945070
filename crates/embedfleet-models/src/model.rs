//! The contract every architecture implements and every fleet role calls: one small trait, the
//! options a request can set, and what comes back.

use embedfleet_proto::{Input, InputType};

use crate::catalogue::ModelSpec;
use crate::dtype::Dtype;
use crate::error::ModelError;

/// What a model embeds: the decoded wire input.
pub type ModelInput = Input;

/// Per-request options that reach the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Cut input at the model's max length (true) or reject it with 413 (false).
    pub truncate: bool,
    /// L2-normalise each vector. On by default, as every model here is trained for cosine.
    pub normalize: bool,
    /// Task instruction for instruction-tuned models; others ignore it.
    pub instruction: Option<String>,
    /// Query or document, for asymmetric models (query instruction or template); symmetric
    /// models ignore it.
    pub input_type: InputType,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            truncate: true,
            normalize: true,
            instruction: None,
            input_type: InputType::Document,
        }
    }
}

impl EmbedOptions {
    /// These options as `spec`'s model reads them: `instruction` and `input_type` reduced to
    /// what its [`crate::catalogue::Prompting`] uses, so that requests differing only in options
    /// a model ignores give it identical options (and share its batches and cache entries).
    pub fn effective_for(&self, spec: &ModelSpec) -> EmbedOptions {
        let (instruction, input_type) = spec
            .prompting
            .effective(self.instruction.as_deref(), self.input_type);
        EmbedOptions {
            instruction: instruction.map(str::to_string),
            input_type,
            ..self.clone()
        }
    }
}

/// One input's vector from one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEmbedding {
    pub vector: Vec<f32>,
    /// Tokens (after truncation, special tokens included) the model read; feeds `usage`.
    pub tokens: usize,
}

/// A loaded embedding model.
///
/// Batch-first: the caller hands over everything it has, and the model orders, packs and splits
/// the batch as suits its hardware. Implementations are immutable after load (`&self`), so one
/// instance serves every thread.
pub trait EmbeddingModel: Send + Sync {
    /// The catalogue entry this model serves.
    fn spec(&self) -> &'static ModelSpec;

    /// Identifies the exact weights (hub commit, or a hash of local files); part of cache keys so
    /// that new weights never serve stale vectors.
    fn revision(&self) -> &str;

    /// The dtype the weights were loaded at; [`EmbeddingModel::revision`] includes it (but for
    /// f32), so vectors of different dtypes never share cache keys. Models without checkpoint
    /// weights (test doubles) are f32.
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    /// The width of the vectors this checkpoint produces. Usually `spec().dim`; a narrower
    /// sibling of the family (bge-base in the `bge-large` slot, a small test checkpoint) loads
    /// with a warning and reports its own width, and fusion is built for the widths loaded.
    fn dim(&self) -> usize;

    /// Embeds a batch; the output is in input order, one entry per input. The whole batch fails
    /// on the first bad input so a caller never mistakes a partial answer for a full one.
    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError>;
}

/// Scales a vector to unit length in place; a zero vector stays zero rather than becoming NaN.
pub fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing_gives_unit_length_and_leaves_zero_alone() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0; 3]);
    }
}
