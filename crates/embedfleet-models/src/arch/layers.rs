//! The post-norm transformer layer that BERT, RoBERTa and MPNet share, run over packed batches.
//!
//! The three checkpoints differ in tensor names, position handling and MPNet's relative bias, and
//! each architecture file maps its names onto this one block. The computation is identical, so it
//! lives once.

use candle_core::{DType, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, Linear, Module, VarBuilder};

use super::projection::{Projection, Projections};
use crate::cpu_kernels;
use crate::packed::{packed_attention, packed_attention_f32, PackedBatch, RelativeBias};

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
pub fn fused_qkv(
    query: VarBuilder,
    key: VarBuilder,
    value: VarBuilder,
    hidden: usize,
    projections: &Projections,
) -> Result<Projection> {
    let weight = Tensor::cat(
        &[
            query.get((hidden, hidden), "weight")?,
            key.get((hidden, hidden), "weight")?,
            value.get((hidden, hidden), "weight")?,
        ],
        0,
    )?;
    let bias = Tensor::cat(
        &[
            query.get(hidden, "bias")?,
            key.get(hidden, "bias")?,
            value.get(hidden, "bias")?,
        ],
        0,
    )?;
    projections.build(weight, Some(bias))
}

/// A checkpoint's `nn.Linear(in_dim, out_dim)` (`weight`, `bias`) as a projection.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    projections: &Projections,
) -> Result<Projection> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    projections.build(weight, Some(bias))
}

/// Token + absolute position embeddings (+ one token-type row), then LayerNorm: the input block
/// BERT, RoBERTa and MPNet share. Tensor names follow the checkpoints (`word_embeddings`,
/// `position_embeddings`, `token_type_embeddings`, `LayerNorm`).
pub struct TokenEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    /// Row 0 of `token_type_embeddings`: single-segment inputs all use type 0, so the lookup is
    /// a broadcast add of one row. MPNet has no token types.
    token_type_row: Option<Tensor>,
    layer_norm: LayerNorm,
    /// Position of a sequence's first token: 0 for BERT, `pad_token_id + 1` for RoBERTa and
    /// MPNet, whose position tables reserve the rows up to the padding index.
    first_position: u32,
}

/// The sizes [`TokenEmbeddings::load`] reads from a config.
pub struct EmbeddingSizes {
    pub vocab: usize,
    pub hidden: usize,
    pub max_positions: usize,
    /// `None` for checkpoints without token types.
    pub token_types: Option<usize>,
    pub layer_norm_eps: f64,
    pub first_position: u32,
}

impl TokenEmbeddings {
    pub fn load(vb: VarBuilder, sizes: &EmbeddingSizes) -> Result<Self> {
        let token_type_row = match sizes.token_types {
            Some(types) if types > 0 => Some(
                vb.get((types, sizes.hidden), "token_type_embeddings.weight")?
                    .get(0)?,
            ),
            _ => None,
        };
        Ok(Self {
            word_embeddings: embedding(sizes.vocab, sizes.hidden, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                sizes.max_positions,
                sizes.hidden,
                vb.pp("position_embeddings"),
            )?,
            token_type_row,
            layer_norm: layer_norm(sizes.hidden, sizes.layer_norm_eps, vb.pp("LayerNorm"))?,
            first_position: sizes.first_position,
        })
    }

    /// Position of a sequence's first token in the position table.
    pub fn first_position(&self) -> u32 {
        self.first_position
    }

    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
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

/// The tensors of one layer as the checkpoint stores them (QKV already fused).
#[derive(Clone)]
pub struct LayerWeights {
    pub qkv: Projection,
    pub attention_out: Projection,
    pub attention_norm: LayerNorm,
    pub intermediate: Projection,
    pub output: Projection,
    pub output_norm: LayerNorm,
}

/// Self-attention, residual + LayerNorm, feed-forward, residual + LayerNorm.
pub struct PostNormLayer {
    weights: LayerImpl,
    heads: usize,
    act: HiddenAct,
}

/// On a CPU with dense f32 weights the layer runs on [`crate::cpu_kernels`]; anywhere else (GPU,
/// half precision, quantised weights) on candle tensor ops. One computation, two executors; the
/// parity test in this file keeps them equal.
enum LayerImpl {
    Cpu(Box<CpuLayer>),
    Tensor(LayerWeights),
}

struct CpuLayer {
    hidden: usize,
    qkv: CpuLinear,
    attention_out: CpuLinear,
    attention_norm: CpuNorm,
    intermediate: CpuLinear,
    output: CpuLinear,
    output_norm: CpuNorm,
}

/// A linear layer in the layout the CPU kernels want; also used by the T5 encoder.
pub(crate) struct CpuLinear {
    /// `[in, out]` row-major: the checkpoint's `[out, in]` transposed once at load.
    weight_t: Vec<f32>,
    bias: Vec<f32>,
    in_dim: usize,
}

struct CpuNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl CpuLinear {
    /// The layer in the kernels' layout; the projection must be dense f32 on the CPU.
    pub(crate) fn from_projection(projection: &Projection) -> Result<Self> {
        match projection.cpu_f32() {
            Some(linear) => Self::new(linear),
            None => candle_core::bail!("the CPU kernels take dense f32 layers only"),
        }
    }

    fn new(linear: &Linear) -> Result<Self> {
        let (_, in_dim) = linear.weight().dims2()?;
        let bias = match linear.bias() {
            Some(bias) => bias.to_vec1::<f32>()?,
            None => vec![0.0; linear.weight().dim(0)?],
        };
        Ok(Self {
            weight_t: linear
                .weight()
                .t()?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?,
            bias,
            in_dim,
        })
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        cpu_kernels::linear(
            x,
            x.len() / self.in_dim,
            self.in_dim,
            &self.weight_t,
            &self.bias,
        )
    }
}

impl CpuNorm {
    fn new(norm: &LayerNorm) -> Result<Self> {
        let weight = norm.weight().to_vec1::<f32>()?;
        let bias = match norm.bias() {
            Some(bias) => bias.to_vec1::<f32>()?,
            None => vec![0.0; weight.len()],
        };
        Ok(Self {
            weight,
            bias,
            eps: norm.eps() as f32,
        })
    }
}

impl PostNormLayer {
    pub fn new(weights: LayerWeights, heads: usize, act: HiddenAct) -> Result<Self> {
        let w = &weights;
        let all_cpu_f32 = [&w.qkv, &w.attention_out, &w.intermediate, &w.output]
            .iter()
            .all(|p| p.cpu_f32().is_some());
        let weights = if all_cpu_f32 && w.attention_norm.weight().dtype() == DType::F32 {
            LayerImpl::Cpu(Box::new(CpuLayer {
                hidden: w.attention_norm.weight().dim(0)?,
                qkv: CpuLinear::from_projection(&w.qkv)?,
                attention_out: CpuLinear::from_projection(&w.attention_out)?,
                attention_norm: CpuNorm::new(&w.attention_norm)?,
                intermediate: CpuLinear::from_projection(&w.intermediate)?,
                output: CpuLinear::from_projection(&w.output)?,
                output_norm: CpuNorm::new(&w.output_norm)?,
            }))
        } else {
            LayerImpl::Tensor(weights)
        };
        Ok(Self {
            weights,
            heads,
            act,
        })
    }

    /// `hidden_states` is `[tokens, hidden]` for the whole packed batch.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        batch: &PackedBatch,
        bias: Option<&RelativeBias>,
    ) -> Result<Tensor> {
        match &self.weights {
            LayerImpl::Cpu(layer) => {
                let x = hidden_states.flatten_all()?.to_vec1::<f32>()?;
                let out = layer.forward(x, batch, self.heads, self.act, bias)?;
                Tensor::from_vec(out, hidden_states.shape(), hidden_states.device())
            }
            LayerImpl::Tensor(w) => {
                let qkv = w.qkv.forward(hidden_states)?;
                let context = packed_attention(&qkv, batch, self.heads, bias)?;
                let attention = w
                    .attention_norm
                    .forward(&(w.attention_out.forward(&context)? + hidden_states)?)?;
                let intermediate = self.act.apply(&w.intermediate.forward(&attention)?)?;
                w.output_norm
                    .forward(&(w.output.forward(&intermediate)? + attention)?)
            }
        }
    }
}

impl CpuLayer {
    fn forward(
        &self,
        x: Vec<f32>,
        batch: &PackedBatch,
        heads: usize,
        act: HiddenAct,
        bias: Option<&RelativeBias>,
    ) -> Result<Vec<f32>> {
        let tokens = x.len() / self.hidden;
        let qkv = self.qkv.forward(&x);
        let context = packed_attention_f32(&qkv, self.hidden, batch, heads, bias);
        let mut attention = self.attention_out.forward(&context);
        let norm = &self.attention_norm;
        cpu_kernels::add_layer_norm(&mut attention, &x, &norm.weight, &norm.bias, norm.eps);
        let mut intermediate = self.intermediate.forward(&attention);
        match act {
            HiddenAct::Gelu => cpu_kernels::gelu_erf(&mut intermediate),
            HiddenAct::GeluApproximate | HiddenAct::Relu => {
                let t = act.apply(&Tensor::from_vec(
                    intermediate,
                    (tokens, self.intermediate.bias.len()),
                    &candle_core::Device::Cpu,
                )?)?;
                intermediate = t.flatten_all()?.to_vec1::<f32>()?;
            }
        }
        let mut output = self.output.forward(&intermediate);
        let norm = &self.output_norm;
        cpu_kernels::add_layer_norm(&mut output, &attention, &norm.weight, &norm.bias, norm.eps);
        Ok(output)
    }
}

#[cfg(test)]
impl PostNormLayer {
    /// The tensor-op executor even on CPU, to check the CPU kernels against it.
    fn with_tensor_ops(weights: LayerWeights, heads: usize, act: HiddenAct) -> Self {
        Self {
            weights: LayerImpl::Tensor(weights),
            heads,
            act,
        }
    }
}

/// Checks a head count against the hidden size at load, so a bad config fails there and not
/// inside a reshape on the first request.
pub fn check_heads(hidden: usize, heads: usize) -> std::result::Result<(), String> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn weights(hidden: usize, intermediate: usize, seed: u64) -> Result<LayerWeights> {
        let device = Device::Cpu;
        let linear = |out: usize, inp: usize, salt: u64| -> Result<Projection> {
            let w = Tensor::randn(0f32, 0.2, (out, inp), &device)?;
            let b = (Tensor::randn(0f32, 0.1, out, &device)? + salt as f64 * 0.0)?;
            Ok(Projection::Dense(Linear::new(w, Some(b))))
        };
        let norm = || -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                (Tensor::randn(0f32, 0.1, hidden, &device)? + 1.0)?,
                Tensor::randn(0f32, 0.1, hidden, &device)?,
                1e-5,
            ))
        };
        Ok(LayerWeights {
            qkv: linear(3 * hidden, hidden, seed)?,
            attention_out: linear(hidden, hidden, seed)?,
            attention_norm: norm()?,
            intermediate: linear(intermediate, hidden, seed)?,
            output: linear(hidden, intermediate, seed)?,
            output_norm: norm()?,
        })
    }

    #[test]
    fn cpu_kernels_match_tensor_ops() -> Result<()> {
        let (hidden, intermediate, heads) = (64, 256, 4);
        let batch = PackedBatch::new(&[vec![0; 7], vec![0; 3], vec![0; 12]]);
        let x = Tensor::randn(0f32, 1.0, (batch.tokens(), hidden), &Device::Cpu)?;
        for act in [HiddenAct::Gelu, HiddenAct::GeluApproximate, HiddenAct::Relu] {
            let w = weights(hidden, intermediate, 1)?;
            let reference =
                PostNormLayer::with_tensor_ops(w.clone(), heads, act).forward(&x, &batch, None)?;
            let cpu = PostNormLayer::new(w, heads, act)?;
            assert!(matches!(cpu.weights, LayerImpl::Cpu(_)));
            let fast = cpu.forward(&x, &batch, None)?;
            let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{act:?}: max abs difference {diff}");
        }
        Ok(())
    }
}
