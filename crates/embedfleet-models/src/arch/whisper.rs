//! The Whisper audio encoder (Radford et al., 2022, "Robust Speech Recognition via Large-Scale
//! Weak Supervision"), as transformers' `WhisperEncoder` (`modeling_whisper.py`) computes it:
//!
//! - a convolutional stem over the log-mel spectrogram: `conv1` (mel bins → d_model, kernel 3,
//!   padding 1) and `conv2` (kernel 3, stride 2, padding 1), each followed by GELU; 3,000 mel
//!   frames become 1,500 positions;
//! - the sinusoidal position table (`embed_positions`, stored in the checkpoint; computed as
//!   Whisper's `sinusoids()` when a checkpoint omits it);
//! - pre-LN transformer layers: `self_attn_layer_norm` → attention (q and v with bias, k
//!   without, 1/√head_dim on q) → residual; `final_layer_norm` → fc1 → GELU → fc2 → residual;
//! - a final `layer_norm`.
//!
//! Tensor names follow the Hugging Face layout: `encoder.*` in a `WhisperModel` checkpoint,
//! `model.encoder.*` in a `WhisperForConditionalGeneration` one (openai/whisper-large-v3); the
//! decoder is never loaded. The configuration comes from `config.json` (`model_type: whisper`),
//! so large-v3 (1280 wide, 128 mel bins) and the smaller checkpoints (tiny: 384, 80 bins) take
//! the same code. Pooling lives in the embedder (`audio_embedder.rs`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{
    conv1d, layer_norm, linear, linear_no_bias, Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

/// The encoder's part of a Whisper `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    /// 128 for large-v3, 80 for every earlier checkpoint (and transformers' default).
    #[serde(default = "default_mel_bins")]
    pub num_mel_bins: usize,
    /// Encoder positions: 1,500 for Whisper's 30-s windows.
    #[serde(default = "default_source_positions")]
    pub max_source_positions: usize,
    #[serde(default = "default_activation")]
    pub activation_function: String,
}

fn default_mel_bins() -> usize {
    80
}

fn default_source_positions() -> usize {
    1500
}

fn default_activation() -> String {
    "gelu".to_string()
}

/// transformers' `nn.LayerNorm` default; Whisper's config does not carry one.
const LAYER_NORM_EPS: f64 = 1e-5;

impl WhisperConfig {
    /// Rejects options this implementation does not support, naming them.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.activation_function != "gelu" {
            return Err(format!(
                "activation_function `{}` is not supported (Whisper uses `gelu`)",
                self.activation_function
            ));
        }
        if self.encoder_attention_heads == 0
            || !self.d_model.is_multiple_of(self.encoder_attention_heads)
        {
            return Err(format!(
                "d_model {} is not a multiple of encoder_attention_heads {}",
                self.d_model, self.encoder_attention_heads
            ));
        }
        if self.num_mel_bins == 0 || self.max_source_positions == 0 || self.encoder_layers == 0 {
            return Err("num_mel_bins, max_source_positions and encoder_layers must be > 0".into());
        }
        Ok(())
    }

    /// Mel frames one forward pass reads (the stride-2 stem halves them).
    pub fn input_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

/// `WhisperAttention` for the encoder (no mask: every window is the full 30 s).
struct WhisperAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl WhisperAttention {
    fn load(vb: VarBuilder, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.encoder_attention_heads,
            scale: ((d / cfg.encoder_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, len, width) = xs.dims3()?;
        let head_dim = width / self.heads;
        let split = |t: Tensor| {
            t.reshape((batch, len, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * self.scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, len, width))?;
        self.out_proj.forward(&context)
    }
}

/// `WhisperEncoderLayer`: pre-LN attention and feed-forward blocks.
struct WhisperEncoderLayer {
    self_attn: WhisperAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl WhisperEncoderLayer {
    fn load(vb: VarBuilder, cfg: &WhisperConfig) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            self_attn: WhisperAttention::load(vb.pp("self_attn"), cfg)?,
            self_attn_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("self_attn_layer_norm"))?,
            fc1: linear(d, cfg.encoder_ffn_dim, vb.pp("fc1"))?,
            fc2: linear(cfg.encoder_ffn_dim, d, vb.pp("fc2"))?,
            final_layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.self_attn_layer_norm.forward(xs)?)?;
        let xs = (xs + attended)?;
        let hidden = self.fc1.forward(&self.final_layer_norm.forward(&xs)?)?;
        let hidden = self.fc2.forward(&hidden.gelu_erf()?)?;
        xs + hidden
    }
}

/// `WhisperEncoder`: mel features `[batch, mel_bins, 2 × positions]` to hidden states
/// `[batch, positions, d_model]`.
pub struct WhisperEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    embed_positions: Tensor,
    layers: Vec<WhisperEncoderLayer>,
    layer_norm: LayerNorm,
    config: WhisperConfig,
}

impl WhisperEncoder {
    /// Loads the encoder from a whole-checkpoint `vb` (either Hugging Face prefix).
    pub fn load(vb: VarBuilder, cfg: &WhisperConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("model.encoder.conv1.weight") {
            vb.pp("model.encoder")
        } else {
            vb.pp("encoder")
        };
        let d = cfg.d_model;
        let stem = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let positions = cfg.max_source_positions;
        let embed_positions = if vb.contains_tensor("embed_positions.weight") {
            vb.get((positions, d), "embed_positions.weight")?
        } else {
            sinusoids(positions, d, vb.device())?.to_dtype(vb.dtype())?
        };
        Ok(Self {
            conv1: conv1d(cfg.num_mel_bins, d, 3, stem(1), vb.pp("conv1"))?,
            conv2: conv1d(d, d, 3, stem(2), vb.pp("conv2"))?,
            embed_positions,
            layers: (0..cfg.encoder_layers)
                .map(|i| WhisperEncoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
                .collect::<Result<_>>()?,
            layer_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("layer_norm"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.config
    }

    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let (_, bins, frames) = mel.dims3()?;
        if bins != self.config.num_mel_bins || frames != self.config.input_frames() {
            candle_core::bail!(
                "Whisper reads [batch, {}, {}] features, got [_, {bins}, {frames}]",
                self.config.num_mel_bins,
                self.config.input_frames()
            );
        }
        let xs = self.conv1.forward(mel)?.gelu_erf()?;
        let xs = self.conv2.forward(&xs)?.gelu_erf()?;
        let mut xs = xs.transpose(1, 2)?.broadcast_add(&self.embed_positions)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        self.layer_norm.forward(&xs)
    }
}

/// Whisper's `sinusoids(length, channels)`: sin in the first half of the channels, cos in the
/// second, timescales from 1 to 10,000.
fn sinusoids(length: usize, channels: usize, device: &Device) -> Result<Tensor> {
    let half = channels / 2;
    let increment = 10_000f64.ln() / (half.max(2) - 1) as f64;
    let mut table = vec![0f32; length * channels];
    for t in 0..length {
        for i in 0..half {
            let angle = t as f64 * (-increment * i as f64).exp();
            table[t * channels + i] = angle.sin() as f32;
            table[t * channels + half + i] = angle.cos() as f32;
        }
    }
    Tensor::from_vec(table, (length, channels), device)?.to_dtype(DType::F32)
}

/// The mean of `hidden` (`[positions, d]`) over its first `frames` positions, as f32.
pub fn mean_over_frames(hidden: &Tensor, frames: usize) -> Result<Vec<f32>> {
    hidden
        .narrow(0, 0, frames)?
        .to_dtype(DType::F32)?
        .mean(0)?
        .to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoids_start_with_sin_zero_and_cos_one() {
        let table = sinusoids(4, 8, &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = table.to_vec2().unwrap();
        assert_eq!(rows[0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        // Channel 0 has timescale 1: position 1 is sin(1).
        assert!((rows[1][0] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn config_defaults_to_the_80_bin_layout_and_rejects_other_activations() {
        let cfg: WhisperConfig = serde_json::from_str(
            r#"{"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6,
                "encoder_ffn_dim": 1536}"#,
        )
        .unwrap();
        assert_eq!((cfg.num_mel_bins, cfg.input_frames()), (80, 3000));
        assert_eq!(cfg.validate(), Ok(()));
        let relu = WhisperConfig {
            activation_function: "relu".into(),
            ..cfg
        };
        assert!(relu.validate().unwrap_err().contains("relu"));
    }
}
