//! One FuseMoE expert (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for
//! Fleximodal Fusion"): a two-layer MLP, `fc1` (input → hidden) → GELU → `fc2` (hidden →
//! output), PyTorch layout.

use crate::gate::gelu;
use crate::linear::linear_forward;

/// Parameters of one expert MLP.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExpertWeights {
    /// `experts.{i}.fc1.weight`: `[expert_hidden, input_dim]`.
    pub fc1_weight: Vec<f32>,
    /// `experts.{i}.fc1.bias`: `[expert_hidden]`.
    pub fc1_bias: Vec<f32>,
    /// `experts.{i}.fc2.weight`: `[output_dim, expert_hidden]`.
    pub fc2_weight: Vec<f32>,
    /// `experts.{i}.fc2.bias`: `[output_dim]`.
    pub fc2_bias: Vec<f32>,
}

impl ExpertWeights {
    pub fn hidden_dim(&self) -> usize {
        self.fc1_bias.len()
    }

    pub fn output_dim(&self) -> usize {
        self.fc2_bias.len()
    }

    /// Bytes of weights and biases; what one batch-1 forward must stream from memory.
    pub fn num_bytes(&self) -> usize {
        4 * (self.fc1_weight.len()
            + self.fc1_bias.len()
            + self.fc2_weight.len()
            + self.fc2_bias.len())
    }

    /// Runs `rows` contiguous input rows (each `input_dim` wide) through the MLP as two matrix
    /// products, writing `rows × output_dim` into `out`.
    pub fn forward(&self, inputs: &[f32], rows: usize, input_dim: usize, out: &mut [f32]) {
        let hidden_dim = self.hidden_dim();
        let mut hidden = vec![0.0f32; rows * hidden_dim];
        linear_forward(
            inputs,
            input_dim,
            rows,
            &self.fc1_weight,
            Some(&self.fc1_bias),
            hidden_dim,
            input_dim,
            &mut hidden,
        );
        for h in hidden.iter_mut() {
            *h = gelu(*h);
        }
        linear_forward(
            &hidden,
            hidden_dim,
            rows,
            &self.fc2_weight,
            Some(&self.fc2_bias),
            self.output_dim(),
            hidden_dim,
            out,
        );
    }
}
