//! One file per architecture family. `config.json`'s `model_type` picks the family, and it must
//! agree with the catalogue's, so a wrong directory fails at load rather than embedding garbage.

pub mod bert;
pub mod clip;
pub mod layers;
pub mod mistral;
pub mod mpnet;
pub mod projection;
pub mod t5;
pub mod whisper;

use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::catalogue::Architecture;
use crate::packed::PackedBatch;

/// The `config.json` of a supported text encoder, by `model_type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "model_type", rename_all = "lowercase")]
pub enum TextEncoderConfig {
    Bert(bert::BertConfig),
    Roberta(bert::BertConfig),
    #[serde(rename = "xlm-roberta")]
    XlmRoberta(bert::BertConfig),
    Mpnet(mpnet::MpNetConfig),
}

impl TextEncoderConfig {
    /// The catalogue architecture this config describes.
    pub fn architecture(&self) -> Architecture {
        match self {
            Self::Bert(_) => Architecture::Bert,
            Self::Roberta(_) | Self::XlmRoberta(_) => Architecture::Roberta,
            Self::Mpnet(_) => Architecture::MpNet,
        }
    }

    /// Rejects options the implementation does not support, naming them.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Self::Bert(cfg) | Self::Roberta(cfg) | Self::XlmRoberta(cfg) => {
                bert::BertModel::validate(cfg)
            }
            Self::Mpnet(cfg) => mpnet::MpNetModel::validate(cfg),
        }
    }
}

/// A loaded text encoder of any supported family.
pub enum TextEncoder {
    Bert(bert::BertModel),
    MpNet(mpnet::MpNetModel),
}

impl TextEncoder {
    pub fn load(
        vb: candle_nn::VarBuilder,
        config: &TextEncoderConfig,
        projections: &projection::Projections,
    ) -> Result<Self> {
        Ok(match config {
            TextEncoderConfig::Bert(cfg) => Self::Bert(bert::BertModel::load(
                vb,
                cfg,
                bert::PositionScheme::Bert,
                projections,
            )?),
            TextEncoderConfig::Roberta(cfg) | TextEncoderConfig::XlmRoberta(cfg) => Self::Bert(
                bert::BertModel::load(vb, cfg, bert::PositionScheme::Roberta, projections)?,
            ),
            TextEncoderConfig::Mpnet(cfg) => {
                Self::MpNet(mpnet::MpNetModel::load(vb, cfg, projections)?)
            }
        })
    }

    /// Last hidden states of a packed batch, `[tokens, hidden]`.
    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        match self {
            Self::Bert(model) => model.forward(batch),
            Self::MpNet(model) => model.forward(batch),
        }
    }

    /// The longest sequence the position table can hold.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Bert(model) => model.max_positions(),
            Self::MpNet(model) => model.max_positions(),
        }
    }
}
