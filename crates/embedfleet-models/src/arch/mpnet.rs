//! MPNet encoder: all-mpnet-base-v2.
//!
//! Song et al., 2020, "MPNet: Masked and Permuted Pre-training for Language Understanding".
//! Upstream: `transformers/models/mpnet/modeling_mpnet.py`. candle-transformers has no MPNet.
//! It is BERT-shaped (post-norm layers, absolute positions counted RoBERTa-style from
//! `pad_token_id + 1`, no token types) plus one thing BERT lacks: a T5-style bucketed relative
//! position bias, one table shared by all layers (`encoder.relative_attention_bias`), added to the
//! attention scores.

use candle_core::{Result, Tensor};
use candle_nn::{layer_norm, VarBuilder};
use serde::Deserialize;

use super::layers::{
    check_heads, fused_qkv, linear, EmbeddingSizes, HiddenAct, LayerWeights, PostNormLayer,
    TokenEmbeddings,
};
use super::projection::Projections;
use crate::packed::{PackedBatch, RelativeBias};

fn default_buckets() -> usize {
    32
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

fn default_pad_token_id() -> u32 {
    1
}

/// `config.json` of an MPNet checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct MpNetConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: u32,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

/// Furthest relative distance with its own buckets; fixed in the upstream code, not in config.
const MAX_DISTANCE: i64 = 128;

/// The bucket of `key - query`, exactly as upstream `relative_position_bucket` (half the buckets
/// per direction, exact for small distances, log-spaced up to `MAX_DISTANCE`). Computed in f32 as
/// PyTorch does, so boundary offsets land in the same bucket.
fn relative_position_bucket(relative_position: i64, num_buckets: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let n = -relative_position;
    let mut bucket = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    bucket += if n < max_exact {
        n
    } else {
        let log_ratio =
            (n as f32 / max_exact as f32).ln() / (MAX_DISTANCE as f32 / max_exact as f32).ln();
        let large = max_exact + (log_ratio * (half - max_exact) as f32) as i64;
        large.min(half - 1)
    };
    bucket as usize
}

fn load_layer(
    vb: VarBuilder,
    cfg: &MpNetConfig,
    projections: &Projections,
) -> Result<PostNormLayer> {
    let hidden = cfg.hidden_size;
    let attn = vb.pp("attention.attn");
    let weights = LayerWeights {
        qkv: fused_qkv(
            attn.pp("q"),
            attn.pp("k"),
            attn.pp("v"),
            hidden,
            projections,
        )?,
        attention_out: linear(hidden, hidden, attn.pp("o"), projections)?,
        attention_norm: layer_norm(hidden, cfg.layer_norm_eps, vb.pp("attention.LayerNorm"))?,
        intermediate: linear(
            hidden,
            cfg.intermediate_size,
            vb.pp("intermediate.dense"),
            projections,
        )?,
        output: linear(
            cfg.intermediate_size,
            hidden,
            vb.pp("output.dense"),
            projections,
        )?,
        output_norm: layer_norm(hidden, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
    };
    PostNormLayer::new(weights, cfg.num_attention_heads, cfg.hidden_act)
}

/// The MPNet encoder stack; returns the last hidden states, `[tokens, hidden]`.
pub struct MpNetModel {
    embeddings: TokenEmbeddings,
    layers: Vec<PostNormLayer>,
    heads: usize,
    /// `relative_attention_bias.weight` flattened: `[buckets, heads]`, row-major.
    bias_table: Vec<f32>,
    /// Bucket of each offset `key - query` in `-max_offset..=max_offset`.
    bucket_of_offset: Vec<usize>,
    max_offset: usize,
}

impl MpNetModel {
    pub fn validate(cfg: &MpNetConfig) -> std::result::Result<(), String> {
        check_heads(cfg.hidden_size, cfg.num_attention_heads)?;
        if cfg.relative_attention_num_buckets < 4 {
            return Err(format!(
                "relative_attention_num_buckets {} is too small",
                cfg.relative_attention_num_buckets
            ));
        }
        Ok(())
    }

    pub fn load(vb: VarBuilder, cfg: &MpNetConfig, projections: &Projections) -> Result<Self> {
        let vb = if vb.contains_tensor("mpnet.embeddings.word_embeddings.weight") {
            vb.pp("mpnet")
        } else {
            vb
        };
        let first_position = cfg.pad_token_id + 1;
        let sizes = EmbeddingSizes {
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            max_positions: cfg.max_position_embeddings,
            token_types: None,
            layer_norm_eps: cfg.layer_norm_eps,
            first_position,
        };
        let embeddings = TokenEmbeddings::load(vb.pp("embeddings"), &sizes)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|index| load_layer(vb.pp(format!("encoder.layer.{index}")), cfg, projections))
            .collect::<Result<Vec<_>>>()?;
        let buckets = cfg.relative_attention_num_buckets;
        let bias_table = vb
            .get(
                (buckets, cfg.num_attention_heads),
                "encoder.relative_attention_bias.weight",
            )?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let max_offset = cfg.max_position_embeddings;
        let bucket_of_offset = (0..=2 * max_offset)
            .map(|index| relative_position_bucket(index as i64 - max_offset as i64, buckets))
            .collect();
        Ok(Self {
            embeddings,
            layers,
            heads: cfg.num_attention_heads,
            bias_table,
            bucket_of_offset,
            max_offset,
        })
    }

    /// The longest sequence the position table can hold.
    pub fn max_positions(&self) -> usize {
        self.max_offset
            .saturating_sub(self.embeddings.first_position() as usize)
    }

    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let bias = RelativeBias {
            values: &self.bias_table,
            heads: self.heads,
            bucket_of_offset: &self.bucket_of_offset,
            max_offset: self.max_offset,
        };
        let mut hidden_states = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            hidden_states = layer.forward(&hidden_states, batch, Some(&bias))?;
        }
        Ok(hidden_states)
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_upstream_values() {
        // Values from transformers' MPNetEncoder.relative_position_bucket(torch.tensor([...])).
        let offsets = [
            -200, -128, -64, -20, -8, -7, -1, 0, 1, 7, 8, 20, 64, 128, 200,
        ];
        let expected = [15, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 30, 31, 31];
        let got: Vec<usize> = offsets
            .iter()
            .map(|&o| relative_position_bucket(o, 32))
            .collect();
        assert_eq!(got, expected);
    }
}
