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
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Module, VarBuilder};
use serde::Deserialize;

use super::layers::{check_heads, fused_qkv, HiddenAct, LayerWeights, PostNormLayer};
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

struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    /// Row 0 of `token_type_embeddings`: single-segment inputs all use type 0, so the lookup is
    /// a broadcast add of one row.
    token_type_row: Option<Tensor>,
    layer_norm: LayerNorm,
    first_position: u32,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig, scheme: PositionScheme) -> Result<Self> {
        let token_type_row = if cfg.type_vocab_size > 0 {
            let table = vb.get(
                (cfg.type_vocab_size, cfg.hidden_size),
                "token_type_embeddings.weight",
            )?;
            Some(table.get(0)?)
        } else {
            None
        };
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type_row,
            layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            first_position: match scheme {
                PositionScheme::Bert => 0,
                PositionScheme::Roberta => cfg.pad_token_id + 1,
            },
        })
    }

    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let device = self.word_embeddings.embeddings().device();
        let positions = Tensor::new(batch.positions(self.first_position), device)?;
        let mut embeddings = (self.word_embeddings.forward(&batch.ids_tensor(device)?)?
            + self.position_embeddings.forward(&positions)?)?;
        if let Some(row) = &self.token_type_row {
            embeddings = embeddings.broadcast_add(row)?;
        }
        self.layer_norm.forward(&embeddings)
    }
}

fn load_layer(vb: VarBuilder, cfg: &BertConfig) -> Result<PostNormLayer> {
    let hidden = cfg.hidden_size;
    let attention = vb.pp("attention");
    let self_attention = attention.pp("self");
    let weights = LayerWeights {
        qkv: fused_qkv(
            self_attention.pp("query"),
            self_attention.pp("key"),
            self_attention.pp("value"),
            hidden,
        )?,
        attention_out: linear(hidden, hidden, attention.pp("output.dense"))?,
        attention_norm: layer_norm(hidden, cfg.layer_norm_eps, attention.pp("output.LayerNorm"))?,
        intermediate: linear(hidden, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
        output: linear(cfg.intermediate_size, hidden, vb.pp("output.dense"))?,
        output_norm: layer_norm(hidden, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
    };
    PostNormLayer::new(weights, cfg.num_attention_heads, cfg.hidden_act)
}

/// The BERT encoder stack; returns the last hidden states, `[tokens, hidden]`.
pub struct BertModel {
    embeddings: BertEmbeddings,
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

    pub fn load(vb: VarBuilder, cfg: &BertConfig, scheme: PositionScheme) -> Result<Self> {
        // Checkpoints saved from a task head nest the encoder under `bert.` / `roberta.`.
        let vb = ["bert", "roberta"]
            .into_iter()
            .find(|prefix| {
                vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight"))
            })
            .map_or(vb.clone(), |prefix| vb.pp(prefix));
        let layers = (0..cfg.num_hidden_layers)
            .map(|index| load_layer(vb.pp(format!("encoder.layer.{index}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let first_position = match scheme {
            PositionScheme::Bert => 0,
            PositionScheme::Roberta => cfg.pad_token_id as usize + 1,
        };
        Ok(Self {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), cfg, scheme)?,
            layers,
            max_positions: cfg.max_position_embeddings.saturating_sub(first_position),
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
