//! The Mistral decoder as an embedding model: e5-mistral (and, same computation without a
//! sliding window, Llama-layout checkpoints such as SmolLM2).
//!
//! Jiang et al., 2023, "Mistral 7B"; Wang et al., 2024, "Improving Text Embeddings with Large
//! Language Models" (e5-mistral). Upstream: `transformers/models/mistral/modeling_mistral.py`
//! (`MistralModel`): token embeddings, then per layer RMSNorm → causal grouped-query attention
//! with rotary positions → residual, RMSNorm → SwiGLU MLP → residual, then a final RMSNorm.
//!
//! candle-transformers' `mistral` returns logits and keeps a KV cache for generation; an embedder
//! needs neither, so this file runs the stack once over a packed batch (see `packed.rs`): causal
//! attention within each packed sequence is the causal + padding mask of a padded batch without
//! computing what the mask would throw away. Only the last token of each sequence is pooled, so
//! the final norm runs on those rows alone. The LM head is never loaded.
//!
//! Tensor names follow the checkpoint: `layers.N.self_attn.q_proj`, ... as e5-mistral stores
//! its `MistralModel`, or the same under `model.` as a causal-LM checkpoint stores them.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::projection::{Projection, Projections};
use crate::cpu_kernels;
use crate::decoder_kernels::{
    add_in_place, apply_rope, packed_causal_attention, rms_norm, silu_mul, AttentionShape,
    RopeTable,
};
use crate::dtype::Dtype;
use crate::packed::PackedBatch;

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".into()
}

/// `config.json` of a Mistral or Llama checkpoint: the fields the forward pass uses, by their
/// upstream names. Fields this file does not implement are rejected by [`MistralConfig::validate`].
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention; absent means one key/value head per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4 writes `rope_theta`; transformers 5 writes `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    /// Each token sees at most this many tokens, itself included; `null` (and Llama) for none.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// A token id field that may be one id or a list (`eos_token_id: [1, 2]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl MistralConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The first end-of-sequence id, if the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self.eos_token_id.as_ref()? {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }

    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            q_heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            window: self.sliding_window,
        }
    }

    /// Checks that the config is one this file implements; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(self.model_type.as_str(), "mistral" | "llama") {
            return Err(format!(
                "model_type `{}` is not a Mistral/Llama decoder",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        let (heads, kv_heads) = (self.num_attention_heads, self.kv_heads());
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even", self.head_dim()));
        }
        if self.attention_bias || self.mlp_bias {
            return Err("attention_bias / mlp_bias are not supported".into());
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window 0 would let a token see nothing".into());
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.clone())
            .or_else(|| {
                let scaling = self.rope_scaling.as_ref().filter(|v| !v.is_null())?;
                Some(
                    scaling
                        .get("rope_type")
                        .or_else(|| scaling.get("type"))
                        .and_then(|t| t.as_str())
                        .unwrap_or("unknown")
                        .to_string(),
                )
            });
        match rope_type.as_deref() {
            None | Some("default") => Ok(()),
            Some(other) => Err(format!(
                "RoPE scaling `{other}` is not supported (only the default rotary embedding)"
            )),
        }
    }

    /// Every tensor the decoder reads and the shape config.json implies for it, named without
    /// the `model.` prefix; used to check each shard before loading.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (hidden, inter, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut shapes = vec![
            (
                "embed_tokens.weight".to_string(),
                vec![self.vocab_size, hidden],
            ),
            ("norm.weight".to_string(), vec![hidden]),
        ];
        for layer in 0..self.num_hidden_layers {
            let p = format!("layers.{layer}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![hidden]),
                (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, hidden]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]),
                (format!("{p}.self_attn.o_proj.weight"), vec![hidden, q]),
                (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
                (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
                (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            ]);
        }
        shapes
    }
}

/// The tensors of one decoder layer, with Q/K/V and gate/up each fused into one product.
struct LayerWeights {
    input_norm: Tensor,
    /// `[q + 2 kv, hidden]`: q_proj, k_proj, v_proj stacked.
    qkv: Projection,
    o_proj: Projection,
    post_attention_norm: Tensor,
    /// `[2 intermediate, hidden]`: gate_proj then up_proj.
    gate_up: Projection,
    down: Projection,
}

impl LayerWeights {
    fn load(vb: VarBuilder, cfg: &MistralConfig, projections: &Projections) -> Result<Self> {
        let (hidden, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_norm: vb.get(hidden, "input_layernorm.weight")?,
            qkv: projections.build(
                Tensor::cat(
                    &[
                        attn.get((q, hidden), "q_proj.weight")?,
                        attn.get((kv, hidden), "k_proj.weight")?,
                        attn.get((kv, hidden), "v_proj.weight")?,
                    ],
                    0,
                )?,
                None,
            )?,
            o_proj: projections.build(attn.get((hidden, q), "o_proj.weight")?, None)?,
            post_attention_norm: vb.get(hidden, "post_attention_layernorm.weight")?,
            gate_up: projections.build(
                Tensor::cat(
                    &[
                        mlp.get((inter, hidden), "gate_proj.weight")?,
                        mlp.get((inter, hidden), "up_proj.weight")?,
                    ],
                    0,
                )?,
                None,
            )?,
            down: projections.build(mlp.get((hidden, inter), "down_proj.weight")?, None)?,
        })
    }
}

/// A bias-free linear layer for the CPU kernels: the weight transposed to `[in, out]` once at
/// load (gemm streams it as it lies; see `cpu_kernels::linear`).
struct CpuLinear {
    weight_t: Vec<f32>,
    /// Zeros: `cpu_kernels::linear` starts each output row from a bias.
    zero_bias: Vec<f32>,
    in_dim: usize,
}

impl CpuLinear {
    fn new(projection: &Projection) -> Result<Self> {
        let Some(linear) = projection.cpu_f32() else {
            candle_core::bail!("the CPU kernels take dense f32 layers only");
        };
        let weight = linear.weight();
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self {
            weight_t: weight.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            zero_bias: vec![0.0; out_dim],
            in_dim,
        })
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.in_dim;
        cpu_kernels::linear(x, rows, self.in_dim, &self.weight_t, &self.zero_bias)
    }
}

struct CpuLayer {
    input_norm: Vec<f32>,
    qkv: CpuLinear,
    o_proj: CpuLinear,
    post_attention_norm: Vec<f32>,
    gate_up: CpuLinear,
    down: CpuLinear,
}

impl CpuLayer {
    fn new(w: &LayerWeights) -> Result<Self> {
        Ok(Self {
            input_norm: w.input_norm.to_vec1::<f32>()?,
            qkv: CpuLinear::new(&w.qkv)?,
            o_proj: CpuLinear::new(&w.o_proj)?,
            post_attention_norm: w.post_attention_norm.to_vec1::<f32>()?,
            gate_up: CpuLinear::new(&w.gate_up)?,
            down: CpuLinear::new(&w.down)?,
        })
    }

    /// One layer over the packed hidden states `x`, `[tokens, hidden]`, in place.
    fn forward(&self, x: &mut [f32], batch: &PackedBatch, rope: &RopeTable, dims: &Dims) {
        let h = rms_norm(x, &self.input_norm, dims.eps);
        let mut qkv = self.qkv.forward(&h);
        let shape = dims.attention;
        apply_rope(&mut qkv, batch, rope, shape.q_heads, shape.kv_heads);
        let context = packed_causal_attention(&qkv, batch, shape);
        add_in_place(x, &self.o_proj.forward(&context));
        let h = rms_norm(x, &self.post_attention_norm, dims.eps);
        let act = silu_mul(&self.gate_up.forward(&h), dims.intermediate);
        add_in_place(x, &self.down.forward(&act));
    }
}

/// The same layer in candle tensor ops, for GPUs, half precision and quantised weights; one
/// sequence at a time
/// through attention, everything else over the whole packed batch.
struct TensorLayer(LayerWeights);

impl TensorLayer {
    fn forward(
        &self,
        x: &Tensor,
        batch: &PackedBatch,
        rope: &(Tensor, Tensor),
        dims: &Dims,
    ) -> Result<Tensor> {
        let w = &self.0;
        let h = candle_nn::ops::rms_norm(x, &w.input_norm, dims.eps)?;
        let qkv = w.qkv.forward(&h)?;
        let context = tensor_attention(&qkv, batch, rope, dims.attention)?;
        let x = (x + w.o_proj.forward(&context)?)?;
        let h = candle_nn::ops::rms_norm(&x, &w.post_attention_norm, dims.eps)?;
        let gate_up = w.gate_up.forward(&h)?;
        let gate = gate_up.narrow(D::Minus1, 0, dims.intermediate)?;
        let up = gate_up.narrow(D::Minus1, dims.intermediate, dims.intermediate)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        x + w.down.forward(&act)?
    }
}

/// Most attention scores (`sequences × q_heads × max_len²`) one padded pass holds (256 MiB in
/// f32); longer batches run in groups of sequences.
const PADDED_SCORES_BUDGET: usize = 64 << 20;

/// Causal grouped-query attention in tensor ops: the sequences gathered into a right-padded
/// `[sequences, heads, max_len, head_dim]` layout (batched products, not a loop: on a GPU kernel
/// launches bound short inputs), RoPE, repeated KV heads, an additive causal (and
/// sliding-window) mask. Right padding needs no key mask under a causal one; padded query rows
/// are dropped on the way back.
fn tensor_attention(
    qkv: &Tensor,
    batch: &PackedBatch,
    rope: &(Tensor, Tensor),
    shape: AttentionShape,
) -> Result<Tensor> {
    crate::packed::in_padded_groups(
        qkv,
        batch,
        shape.q_heads,
        PADDED_SCORES_BUDGET,
        |qkv, batch| padded_attention(qkv, batch, rope, shape),
    )
}

fn padded_attention(
    qkv: &Tensor,
    batch: &PackedBatch,
    (cos, sin): &(Tensor, Tensor),
    shape: AttentionShape,
) -> Result<Tensor> {
    let AttentionShape {
        q_heads,
        kv_heads,
        head_dim,
        window,
    } = shape;
    let (tokens, width) = qkv.dims2()?;
    let device = qkv.device();
    let (sequences, len) = (batch.sequences(), batch.max_len());
    let group = q_heads / kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let source = Tensor::cat(&[qkv, &Tensor::zeros((1, width), qkv.dtype(), device)?], 0)?;
    let gather = Tensor::from_vec(batch.padded_rows(tokens as u32), sequences * len, device)?;
    let padded = source
        .index_select(&gather, 0)?
        .reshape((sequences, len, width))?;
    let heads = |offset: usize, count: usize| -> Result<Tensor> {
        padded
            .narrow(2, offset * head_dim, count * head_dim)?
            .reshape((sequences, len, count, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (cos, sin) = (cos.narrow(0, 0, len)?, sin.narrow(0, 0, len)?);
    let q = candle_nn::rotary_emb::rope(&heads(0, q_heads)?, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope(&heads(q_heads, kv_heads)?, &cos, &sin)?;
    let v = heads(q_heads + kv_heads, kv_heads)?;
    let repeat = |t: Tensor| -> Result<Tensor> {
        t.unsqueeze(2)?
            .expand((sequences, kv_heads, group, len, head_dim))?
            .reshape((sequences, q_heads, len, head_dim))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut mask = vec![0f32; len * len];
    for i in 0..len {
        for j in 0..len {
            let visible = j <= i && window.is_none_or(|w| j + w > i);
            if !visible {
                mask[i * len + j] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (1, 1, len, len), device)?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let context = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((sequences * len, q_heads * head_dim))?;
    let keep = Tensor::from_vec(batch.unpadded_slots(), tokens, device)?;
    context.index_select(&keep, 0)
}

/// The sizes every layer's forward needs.
struct Dims {
    attention: AttentionShape,
    intermediate: usize,
    eps: f32,
    rope_theta: f64,
}

/// On a CPU with dense f32 weights the layers run on the CPU kernels; anywhere else on tensor ops.
/// One computation, two executors; the parity test below keeps them equal.
enum Layers {
    Cpu(Vec<CpuLayer>),
    Tensor(Vec<TensorLayer>),
}

/// The Mistral decoder stack: packed token ids in, each sequence's final-normed last-token state
/// out.
pub struct MistralModel {
    embed_tokens: Tensor,
    layers: Layers,
    norm: Tensor,
    dims: Dims,
    hidden: usize,
}

impl MistralModel {
    /// Loads the decoder with its linear layers built by `projections` (`vb` holds the weights
    /// at the dtype's [`Dtype::activation_dtype`]): dense f32 on a CPU runs on the CPU kernels.
    pub fn load(vb: VarBuilder, cfg: &MistralConfig, projections: &Projections) -> Result<Self> {
        let cpu_kernels =
            projections.dtype() == Dtype::F32 && vb.device().is_cpu() && vb.dtype() == DType::F32;
        Self::build(vb, cfg, projections, cpu_kernels)
    }

    /// [`MistralModel::load`] of dense weights with the executor chosen by the caller:
    /// `cpu_kernels` false runs candle tensor ops even on CPU (parity tests, and the bench that
    /// compares the two).
    pub fn load_with(vb: VarBuilder, cfg: &MistralConfig, cpu_kernels: bool) -> Result<Self> {
        Self::build(vb, cfg, &Projections::dense(), cpu_kernels)
    }

    fn build(
        vb: VarBuilder,
        cfg: &MistralConfig,
        projections: &Projections,
        cpu_kernels: bool,
    ) -> Result<Self> {
        if cpu_kernels && !(vb.device().is_cpu() && vb.dtype() == DType::F32) {
            candle_core::bail!("the CPU kernels need f32 weights on the CPU");
        }
        // A causal-LM checkpoint nests the decoder under `model.`; e5-mistral's does not.
        let vb = if vb.contains_tensor("model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb
        };
        let mut weights = Vec::with_capacity(cfg.num_hidden_layers);
        let mut cpu_layers = Vec::new();
        for index in 0..cfg.num_hidden_layers {
            let layer = LayerWeights::load(vb.pp(format!("layers.{index}")), cfg, projections)?;
            if cpu_kernels {
                // Converted one layer at a time, so the tensor copy never exists for all layers.
                cpu_layers.push(CpuLayer::new(&layer)?);
            } else {
                weights.push(TensorLayer(layer));
            }
        }
        let layers = if cpu_kernels {
            Layers::Cpu(cpu_layers)
        } else {
            Layers::Tensor(weights)
        };
        Ok(Self {
            embed_tokens: vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?,
            layers,
            norm: vb.get(cfg.hidden_size, "norm.weight")?,
            dims: Dims {
                attention: cfg.attention_shape(),
                intermediate: cfg.intermediate_size,
                eps: cfg.rms_norm_eps as f32,
                rope_theta: cfg.rope_theta(),
            },
            hidden: cfg.hidden_size,
        })
    }

    /// Width of the vectors this checkpoint produces.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The final-normed state of each sequence's last token, `[sequences, hidden]`. The final
    /// norm is per row, so it runs on the pooled rows only.
    pub fn forward_last_tokens(&self, batch: &PackedBatch) -> Result<Tensor> {
        let device = self.embed_tokens.device();
        let x = self
            .embed_tokens
            .index_select(&batch.ids_tensor(device)?, 0)?;
        let rope = RopeTable::new(
            batch.max_len(),
            self.dims.attention.head_dim,
            self.dims.rope_theta,
        );
        let last = batch.last_rows(device)?;
        match &self.layers {
            Layers::Cpu(layers) => {
                let mut x = x.flatten_all()?.to_vec1::<f32>()?;
                for layer in layers {
                    layer.forward(&mut x, batch, &rope, &self.dims);
                }
                let x = Tensor::from_vec(x, (batch.tokens(), self.hidden), device)?;
                let last = x.index_select(&last, 0)?.flatten_all()?.to_vec1::<f32>()?;
                let normed = rms_norm(&last, &self.norm.to_vec1::<f32>()?, self.dims.eps);
                Tensor::from_vec(normed, (batch.sequences(), self.hidden), device)
            }
            Layers::Tensor(layers) => {
                let half = rope.half;
                let table = |values: Vec<f32>| {
                    Tensor::from_vec(values, (batch.max_len(), half), device)?.to_dtype(x.dtype())
                };
                let rope = (table(rope.cos)?, table(rope.sin)?);
                let mut x = x;
                for layer in layers {
                    x = layer.forward(&x, batch, &rope, &self.dims)?;
                }
                candle_nn::ops::rms_norm(&x.index_select(&last, 0)?, &self.norm, self.dims.eps)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    fn config(
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> MistralConfig {
        serde_json::from_value(serde_json::json!({
            "model_type": "mistral", "vocab_size": 50, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": q_heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "rope_theta": 10000.0, "max_position_embeddings": 64,
            "sliding_window": window, "rms_norm_eps": 1e-5,
        }))
        .unwrap()
    }

    fn random_weights(cfg: &MistralConfig, prefix: &str) -> Result<VarBuilder<'static>> {
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.expected_shapes() {
            let t = if shape.len() == 1 {
                (Tensor::rand(0.5f32, 1.5, shape, &Device::Cpu))?
            } else {
                (Tensor::randn(0f32, 0.3, shape, &Device::Cpu))?
            };
            tensors.insert(format!("{prefix}{name}"), t);
        }
        Ok(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
    }

    #[test]
    fn cpu_kernels_match_tensor_ops_across_shapes() -> Result<()> {
        let batch = PackedBatch::new(&[vec![1, 5, 7, 9, 2], vec![3], vec![4, 4, 8, 1, 0, 6, 2, 2]]);
        for (cfg, prefix) in [
            (config(4, 4, 8, None), ""),
            (config(4, 2, 8, Some(3)), "model."),
            (config(8, 2, 16, None), ""),
        ] {
            cfg.validate().unwrap();
            let vb = random_weights(&cfg, prefix)?;
            let cpu = MistralModel::load_with(vb.clone(), &cfg, true)?;
            assert!(matches!(cpu.layers, Layers::Cpu(_)));
            let reference = MistralModel::load_with(vb, &cfg, false)?;
            let (a, b) = (
                cpu.forward_last_tokens(&batch)?,
                reference.forward_last_tokens(&batch)?,
            );
            assert_eq!(a.dims(), [3, 32]);
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "{:?}: max abs difference {diff}",
                cfg.attention_shape()
            );
        }
        Ok(())
    }

    #[test]
    fn unsupported_configs_are_named() {
        let mut cfg = config(6, 4, 8, None);
        assert!(cfg.validate().unwrap_err().contains("num_key_value_heads"));
        cfg = config(4, 2, 8, None);
        cfg.hidden_act = "gelu".into();
        assert!(cfg.validate().unwrap_err().contains("hidden_act"));
        cfg = config(4, 2, 8, None);
        cfg.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
        assert!(cfg.validate().unwrap_err().contains("llama3"));
        cfg = config(4, 2, 8, None);
        cfg.model_type = "bert".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn rope_theta_is_read_from_either_config_style() {
        let old: MistralConfig = serde_json::from_value(serde_json::json!({
            "model_type": "mistral", "vocab_size": 1, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
            "rope_theta": 1e6, "eos_token_id": [7, 8],
        }))
        .unwrap();
        assert_eq!(old.rope_theta(), 1e6);
        assert_eq!(old.eos_token_id(), Some(7));
        assert_eq!((old.kv_heads(), old.head_dim()), (2, 4));
        let new: MistralConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 1, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        }))
        .unwrap();
        assert_eq!(new.rope_theta(), 5e5);
        new.validate().unwrap();
    }
}
