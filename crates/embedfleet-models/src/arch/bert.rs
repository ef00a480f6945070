//! BERT and RoBERTa encoders: minilm, bge-large, contriever, dragon-plus, gte-large (BERT) and
//! codebert (RoBERTa).
//!
//! Devlin et al., 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language
//! Understanding"; Liu et al., 2019, "RoBERTa". Upstream: `transformers/models/bert/modeling_bert.py`
//! and `models/roberta/modeling_roberta.py`. candle-transformers has a BERT, but it pads every
//! batch to its longest sequence; this one runs packed batches (see `packed.rs`) with fused QKV.
//! Block and tensor names follow the checkpoint (`embeddings.word_embeddings`,
//! `encoder.layer.N.attention.self.query`, ...).

use candle_core::{Result, Tensor};
use candle_nn::{layer_norm, VarBuilder};
use serde::Deserialize;

use super::layers::{
    check_heads, fused_qkv, linear, EmbeddingSizes, HiddenAct, LayerWeights, PostNormLayer,
    TokenEmbeddings,
};
use super::projection::Projections;
use crate::packed::PackedBatch;

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_type_vocab_size() -> usize {
    2
}

/// `config.json` of a BERT or RoBERTa checkpoint: the fields the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only absolute positions are implemented; others are rejected at load.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

/// Where positions start: BERT counts from 0; RoBERTa from `pad_token_id + 1`, because its
/// position table reserves the rows up to the padding index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionScheme {
    Bert,
    Roberta,
}

fn load_layer(
    vb: VarBuilder,
    cfg: &BertConfig,
    projections: &Projections,
) -> Result<PostNormLayer> {
    let hidden = cfg.hidden_size;
    let attention = vb.pp("attention");
    let self_attention = attention.pp("self");
    let weights = LayerWeights {
        qkv: fused_qkv(
            self_attention.pp("query"),
            self_attention.pp("key"),
            self_attention.pp("value"),
            hidden,
            projections,
        )?,
        attention_out: linear(hidden, hidden, attention.pp("output.dense"), projections)?,
        attention_norm: layer_norm(hidden, cfg.layer_norm_eps, attention.pp("output.LayerNorm"))?,
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

/// The BERT encoder stack; returns the last hidden states, `[tokens, hidden]`.
pub struct BertModel {
    embeddings: TokenEmbeddings,
    layers: Vec<PostNormLayer>,
    max_positions: usize,
}

impl BertModel {
    /// Checks that the config is one this file implements; the error names the field.
    pub fn validate(cfg: &BertConfig) -> std::result::Result<(), String> {
        check_heads(cfg.hidden_size, cfg.num_attention_heads)?;
        match cfg.position_embedding_type.as_deref() {
            None | Some("absolute") => Ok(()),
            Some(other) => Err(format!(
                "position_embedding_type `{other}` is not supported (only absolute)"
            )),
        }
    }

    pub fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        scheme: PositionScheme,
        projections: &Projections,
    ) -> Result<Self> {
        // Checkpoints saved from a task head nest the encoder under `bert.` / `roberta.`.
        let vb = ["bert", "roberta"]
            .into_iter()
            .find(|prefix| {
                vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight"))
            })
            .map_or(vb.clone(), |prefix| vb.pp(prefix));
        let layers = (0..cfg.num_hidden_layers)
            .map(|index| load_layer(vb.pp(format!("encoder.layer.{index}")), cfg, projections))
            .collect::<Result<Vec<_>>>()?;
        let first_position = match scheme {
            PositionScheme::Bert => 0,
            PositionScheme::Roberta => cfg.pad_token_id + 1,
        };
        let sizes = EmbeddingSizes {
            vocab: cfg.vocab_size,
            hidden: cfg.hidden_size,
            max_positions: cfg.max_position_embeddings,
            token_types: Some(cfg.type_vocab_size),
            layer_norm_eps: cfg.layer_norm_eps,
            first_position,
        };
        Ok(Self {
            embeddings: TokenEmbeddings::load(vb.pp("embeddings"), &sizes)?,
            layers,
            max_positions: cfg
                .max_position_embeddings
                .saturating_sub(first_position as usize),
        })
    }

    /// The longest sequence the position table can hold.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let mut hidden_states = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            hidden_states = layer.forward(&hidden_states, batch, None)?;
        }
        Ok(hidden_states)
    }
}
