//! How much device memory a model needs at a dtype.
//!
//! A worker's device holds, for each of its models, the weights; and, while a forward runs, that
//! forward's activations. The GPU worker runs one forward at a time per device (concurrent
//! forwards of different models only contend for the same SMs), so a device needs the sum of its
//! models' weights plus the largest activation peak among them, plus one CUDA context for the
//! worker process. That rule is what [`crate::plan`] packs by.

use embedfleet_models::catalogue::ModelSpec;
use serde::Serialize;

use crate::dtype::Dtype;
use crate::shapes;

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// The knobs of the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryModel {
    /// Most tokens one forward packs on the device. 8,192 by default: half the CPU worker's
    /// 16,384, because the tensor-op attention of the GPU path holds each sequence's scores.
    pub token_budget: u64,
    /// Per worker process: the CUDA context, cuBLAS workspace and allocator slack.
    pub context_bytes: u64,
}

impl Default for MemoryModel {
    fn default() -> Self {
        Self {
            token_budget: 8_192,
            context_bytes: 768 << 20,
        }
    }
}

/// What one model needs on a device at one dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelNeed {
    pub weights: u64,
    /// Peak of one forward at the token budget.
    pub activations: u64,
}

impl MemoryModel {
    /// The need of `spec` at `dtype`.
    ///
    /// Weights: quantised dtypes quantise the linear layers only; the token embeddings stay in
    /// half precision (as llama.cpp and candle keep them). Activations: a packed forward of
    /// `token_budget` tokens keeps the layer input, Q/K/V, the attention context and output
    /// (7 × hidden per token) and the feed-forward intermediate (twice for gated blocks) alive at
    /// once, plus one sequence's attention scores (heads × L², L = the model's max length) on the
    /// tensor-op path, which has no fused attention kernel.
    pub fn need(&self, spec: &ModelSpec, dtype: Dtype) -> ModelNeed {
        let shape = shapes::of(spec.name).expect("every catalogue model has a shape");
        let embedding = (shape.vocab * shape.hidden).min(spec.parameters);
        let linear = spec.parameters - embedding;
        let weights = if dtype.is_quantized() {
            (linear as f64 * dtype.bytes_per_weight()).ceil() as u64 + embedding * 2
        } else {
            (spec.parameters as f64 * dtype.bytes_per_weight()) as u64
        };
        let act = dtype.activation_bytes();
        let tokens = self.token_budget;
        let ffn = shape.intermediate * if shape.gated { 2 } else { 1 };
        let per_token = (7 * shape.hidden + ffn) * act;
        let longest = (spec.max_seq_len as u64).min(tokens);
        let scores = shape.heads * longest * longest * act;
        ModelNeed {
            weights,
            activations: tokens * per_token + scores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_models::catalogue::{self, CATALOGUE};

    #[test]
    fn half_precision_weights_are_two_bytes_a_parameter() {
        let memory = MemoryModel::default();
        for spec in CATALOGUE {
            assert_eq!(memory.need(spec, Dtype::Bf16).weights, spec.parameters * 2);
        }
    }

    #[test]
    fn quantising_shrinks_weights_but_keeps_embeddings_in_half_precision() {
        let memory = MemoryModel::default();
        let mistral = catalogue::find("e5-mistral").unwrap();
        let f16 = memory.need(mistral, Dtype::F16).weights;
        let q8 = memory.need(mistral, Dtype::Q8_0).weights;
        let q4 = memory.need(mistral, Dtype::Q4k).weights;
        assert!(f16 > q8 && q8 > q4);
        // 7.11 B parameters: ~14.2 GB in f16, ~4.2 GB in q4k (0.5625 B/weight + f16 embeddings).
        assert!((13 * GIB..14 * GIB).contains(&f16), "{f16}");
        assert!((3 * GIB + GIB / 2..4 * GIB + GIB / 2).contains(&q4), "{q4}");
        // minilm is half embeddings: quantising it saves far less than the ratio of the dtypes.
        let minilm = catalogue::find("minilm").unwrap();
        let ratio = memory.need(minilm, Dtype::Q4k).weights as f64
            / memory.need(minilm, Dtype::F16).weights as f64;
        assert!(ratio > 0.6, "{ratio}");
    }

    #[test]
    fn activations_grow_with_the_token_budget_and_halve_in_half_precision() {
        let spec = catalogue::find("bge-large").unwrap();
        let small = MemoryModel {
            token_budget: 1024,
            ..Default::default()
        };
        let big = MemoryModel::default();
        assert!(big.need(spec, Dtype::F32).activations > small.need(spec, Dtype::F32).activations);
        assert_eq!(
            big.need(spec, Dtype::F32).activations,
            2 * big.need(spec, Dtype::F16).activations
        );
    }
}
