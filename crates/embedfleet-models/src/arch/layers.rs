//! The post-norm transformer layer that BERT, RoBERTa and MPNet share, run over packed batches.
//!
//! The three checkpoints differ in tensor names, position handling and MPNet's relative bias, and
//! each architecture file maps its names onto this one block. The computation is identical, so it
//! lives once.

use candle_core::{Result, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder};

use crate::packed::{packed_attention, PackedBatch, RelativeBias};

/// Activations the supported checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// The exact, erf-based GELU that BERT-family checkpoints were trained with.
    Gelu,
    /// The tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluApproximate,
    Relu,
}

impl HiddenAct {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluApproximate => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

/// Query, key and value projections concatenated into one `[3 * hidden, hidden]` matrix, so the
/// three products become one larger one (better cache and thread use on small hidden sizes).
pub fn fused_qkv(query: VarBuilder, key: VarBuilder, value: VarBuilder, hidden: usize) -> Result<Linear> {
    let weight = Tensor::cat(
        &[query.get((hidden, hidden), "weight")?, key.get((hidden, hidden), "weight")?, value.get((hidden, hidden), "weight")?],
        0,
    )?;
    let bias = Tensor::cat(&[query.get(hidden, "bias")?, key.get(hidden, "bias")?, value.get(hidden, "bias")?], 0)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// Self-attention, residual + LayerNorm, feed-forward, residual + LayerNorm.
pub struct PostNormLayer {
    pub qkv: Linear,
    pub attention_out: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
    pub heads: usize,
    pub act: HiddenAct,
}

impl PostNormLayer {
    /// `hidden_states` is `[tokens, hidden]` for the whole packed batch.
    pub fn forward(&self, hidden_states: &Tensor, batch: &PackedBatch, bias: Option<&RelativeBias>) -> Result<Tensor> {
        let qkv = self.qkv.forward(hidden_states)?;
        let context = packed_attention(&qkv, batch, self.heads, bias)?;
        let attention = self.attention_norm.forward(&(self.attention_out.forward(&context)? + hidden_states)?)?;
        let intermediate = self.act.apply(&self.intermediate.forward(&attention)?)?;
        self.output_norm.forward(&(self.output.forward(&intermediate)? + attention)?)
    }
}

/// Checks a head count against the hidden size at load, so a bad config fails there and not
/// inside a reshape on the first request.
pub fn check_heads(hidden: usize, heads: usize) -> std::result::Result<(), String> {
    if heads == 0 || hidden % heads != 0 {
        return Err(format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}"));
    }
    Ok(())
}
