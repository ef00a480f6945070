//! T5 encoder: the token encoder of sentence-t5-xxl and instructor-xl (GTR / T5 v1.1).
//!
//! Raffel et al., 2019, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
//! Transformer". Upstream: `transformers/models/t5/modeling_t5.py` (`T5EncoderModel`).
//! candle-transformers has a T5 encoder, but it takes no attention mask, so a padded batch would
//! attend to its padding; this one runs packed batches (see `packed.rs`) like BERT does.
//!
//! What differs from the BERT layer: pre-norm blocks with T5's RMS LayerNorm (no mean, no bias),
//! no biases anywhere, attention without the 1/sqrt(d_kv) scaling, an attention width
//! (`num_heads * d_kv`) that need not equal `d_model`, one bucketed relative position bias
//! computed by layer 0 and shared by every layer, and a feed-forward that is either
//! `relu` (T5) or `gated-gelu` (T5 v1.1: `gelu_new(wi_0 x) * wi_1 x`). Tensor names follow the
//! checkpoint (`shared`, `encoder.block.N.layer.0.SelfAttention.q`, ...).

use candle_core::{DType, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use rayon::prelude::*;
use serde::Deserialize;

use super::layers::CpuLinear;
use super::projection::{Projection, Projections};
use crate::cpu_kernels;
use crate::packed::{packed_attention, packed_attention_f32, PackedBatch, RelativeBias};

fn default_buckets() -> usize {
    32
}

fn default_max_distance() -> usize {
    128
}

fn default_epsilon() -> f64 {
    1e-6
}

fn default_feed_forward() -> String {
    "relu".into()
}

/// `config.json` of a T5 checkpoint: the fields the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_feed_forward")]
    pub feed_forward_proj: String,
}

/// The two feed-forward kinds T5 checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForward {
    /// `wo(relu(wi x))`: the original T5 (and sentence-t5).
    Relu,
    /// `wo(gelu_new(wi_0 x) * wi_1 x)`: T5 v1.1 (GTR, INSTRUCTOR).
    GatedGelu,
}

impl T5Config {
    /// The feed-forward kind, or an error naming the unsupported `feed_forward_proj`.
    pub fn feed_forward(&self) -> std::result::Result<FeedForward, String> {
        match self.feed_forward_proj.as_str() {
            "relu" => Ok(FeedForward::Relu),
            "gated-gelu" => Ok(FeedForward::GatedGelu),
            other => Err(format!(
                "feed_forward_proj `{other}` is not supported (only `relu` and `gated-gelu`)"
            )),
        }
    }

    /// Checks that the config is one this file implements; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.feed_forward()?;
        if self.num_heads == 0 || self.d_kv == 0 || self.d_model == 0 {
            return Err("num_heads, d_kv and d_model must be positive".into());
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(format!(
                "relative_attention_num_buckets {} is too small (at least 4)",
                self.relative_attention_num_buckets
            ));
        }
        if self.relative_attention_max_distance < self.relative_attention_num_buckets / 4 * 2 {
            return Err(format!(
                "relative_attention_max_distance {} is below the exact range of {} buckets",
                self.relative_attention_max_distance, self.relative_attention_num_buckets
            ));
        }
        Ok(())
    }

    fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// The bucket of the offset `key - query`, exactly as transformers' bidirectional
/// `T5Attention._relative_position_bucket`: half the buckets per direction (keys after the query
/// in the upper half), exact up to half of those, then log-spaced up to `max_distance`, where
/// every further offset shares the last bucket. The log is taken in f32 as PyTorch does (with the
/// denominator from a double, as `math.log` gives it), so offsets on a boundary land in the same
/// bucket.
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.abs();
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let denominator = (max_distance as f64 / max_exact as f64).ln() as f32;
        let scaled =
            (distance as f32 / max_exact as f32).ln() / denominator * (half - max_exact) as f32;
        (max_exact + scaled as i64).min(half - 1)
    };
    bucket as usize
}

/// One encoder block as the checkpoint stores it, with q, k and v fused.
struct BlockWeights {
    /// `[3 * inner, d_model]`: q (pre-scaled, see `load_block`), k, v.
    qkv: Projection,
    /// `[d_model, inner]`.
    o: Projection,
    attention_norm: Tensor,
    /// `[d_ff, d_model]` (relu) or `[2 * d_ff, d_model]`: `wi_0` rows, then `wi_1` rows.
    wi: Projection,
    wo: Projection,
    feed_forward_norm: Tensor,
}

/// The same block in the CPU kernels' layout.
struct CpuBlock {
    qkv: CpuLinear,
    o: CpuLinear,
    attention_norm: Vec<f32>,
    wi: CpuLinear,
    wo: CpuLinear,
    feed_forward_norm: Vec<f32>,
}

/// On a CPU with dense f32 weights the blocks run on [`crate::cpu_kernels`]; anywhere else (GPU,
/// bf16, quantised weights) on candle tensor ops. One computation, two executors; a test keeps them equal.
enum Blocks {
    Cpu(Vec<CpuBlock>, Vec<f32>),
    Tensor(Vec<BlockWeights>, Tensor),
}

fn no_bias_linear(vb: &VarBuilder, out: usize, inp: usize, name: &str) -> Result<Tensor> {
    vb.get((out, inp), &format!("{name}.weight"))
}

fn load_block(
    vb: VarBuilder,
    cfg: &T5Config,
    feed_forward: FeedForward,
    projections: &Projections,
) -> Result<BlockWeights> {
    let (d_model, inner) = (cfg.d_model, cfg.inner());
    let attention = vb.pp("layer.0");
    let sa = attention.pp("SelfAttention");
    // T5 does not scale scores by 1/sqrt(d_kv) (the scale is folded into its init); the shared
    // packed attention kernel does. Scaling q by sqrt(d_kv) here cancels it exactly, so T5 runs on
    // the same kernel with no flag in its inner loop.
    let q = (no_bias_linear(&sa, inner, d_model, "q")? * (cfg.d_kv as f64).sqrt())?;
    let qkv = Tensor::cat(
        &[
            q,
            no_bias_linear(&sa, inner, d_model, "k")?,
            no_bias_linear(&sa, inner, d_model, "v")?,
        ],
        0,
    )?;
    let ff = vb.pp("layer.1");
    let dense = ff.pp("DenseReluDense");
    let wi = match feed_forward {
        FeedForward::Relu => no_bias_linear(&dense, cfg.d_ff, d_model, "wi")?,
        FeedForward::GatedGelu => Tensor::cat(
            &[
                no_bias_linear(&dense, cfg.d_ff, d_model, "wi_0")?,
                no_bias_linear(&dense, cfg.d_ff, d_model, "wi_1")?,
            ],
            0,
        )?,
    };
    Ok(BlockWeights {
        qkv: projections.build(qkv, None)?,
        o: projections.build(no_bias_linear(&sa, d_model, inner, "o")?, None)?,
        attention_norm: attention.get(d_model, "layer_norm.weight")?,
        wi: projections.build(wi, None)?,
        wo: projections.build(no_bias_linear(&dense, d_model, cfg.d_ff, "wo")?, None)?,
        feed_forward_norm: ff.get(d_model, "layer_norm.weight")?,
    })
}

/// The T5 encoder stack; returns the final-norm hidden states of a packed batch,
/// `[tokens, d_model]`.
pub struct T5Encoder {
    embed_tokens: Embedding,
    blocks: Blocks,
    feed_forward: FeedForward,
    heads: usize,
    d_ff: usize,
    eps: f32,
    /// Layer 0's `relative_attention_bias.weight`, `[buckets, heads]` row-major.
    bias_table: Vec<f32>,
    /// Bucket of each offset `key - query` in `-max_offset..=max_offset`.
    bucket_of_offset: Vec<usize>,
    max_offset: usize,
}

impl T5Encoder {
    /// Loads the encoder for sequences of up to `max_len` tokens (the relative-bias lookup table
    /// covers exactly that range), its linear layers built by `projections`.
    pub fn load(
        vb: VarBuilder,
        cfg: &T5Config,
        max_len: usize,
        projections: &Projections,
    ) -> Result<Self> {
        Self::load_with(vb, cfg, max_len, projections, true)
    }

    /// `use_cpu_kernels: false` keeps the tensor-op executor even for f32 on CPU (the parity test).
    fn load_with(
        vb: VarBuilder,
        cfg: &T5Config,
        max_len: usize,
        projections: &Projections,
        use_cpu_kernels: bool,
    ) -> Result<Self> {
        let feed_forward = cfg.feed_forward().map_err(candle_core::Error::msg)?;
        // T5EncoderModel saves the tied table as `shared.weight`; some exports keep only
        // `encoder.embed_tokens.weight`.
        let embedding_name = if vb.contains_tensor("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let embed_tokens = Embedding::new(
            vb.get((cfg.vocab_size, cfg.d_model), embedding_name)?,
            cfg.d_model,
        );
        let encoder = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|index| {
                load_block(
                    encoder.pp(format!("block.{index}")),
                    cfg,
                    feed_forward,
                    projections,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = encoder.get(cfg.d_model, "final_layer_norm.weight")?;
        let buckets = cfg.relative_attention_num_buckets;
        let bias_table = encoder
            .get(
                (buckets, cfg.num_heads),
                "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let max_offset = max_len.max(1);
        let bucket_of_offset = (0..=2 * max_offset)
            .map(|index| {
                relative_position_bucket(
                    index as i64 - max_offset as i64,
                    buckets,
                    cfg.relative_attention_max_distance,
                )
            })
            .collect();
        let dense_f32 = blocks.iter().all(|b| {
            [&b.qkv, &b.o, &b.wi, &b.wo]
                .iter()
                .all(|p| p.cpu_f32().is_some())
        });
        let on_cpu_f32 = use_cpu_kernels
            && dense_f32
            && final_norm.device().is_cpu()
            && final_norm.dtype() == DType::F32;
        let blocks = if on_cpu_f32 {
            let cpu = blocks
                .iter()
                .map(|b| {
                    Ok(CpuBlock {
                        qkv: CpuLinear::from_projection(&b.qkv)?,
                        o: CpuLinear::from_projection(&b.o)?,
                        attention_norm: b.attention_norm.to_vec1::<f32>()?,
                        wi: CpuLinear::from_projection(&b.wi)?,
                        wo: CpuLinear::from_projection(&b.wo)?,
                        feed_forward_norm: b.feed_forward_norm.to_vec1::<f32>()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Blocks::Cpu(cpu, final_norm.to_vec1::<f32>()?)
        } else {
            Blocks::Tensor(blocks, final_norm)
        };
        Ok(Self {
            embed_tokens,
            blocks,
            feed_forward,
            heads: cfg.num_heads,
            d_ff: cfg.d_ff,
            eps: cfg.layer_norm_epsilon as f32,
            bias_table,
            bucket_of_offset,
            max_offset,
        })
    }

    /// The longest sequence the relative-bias table was built for.
    pub fn max_positions(&self) -> usize {
        self.max_offset
    }

    pub fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        if batch.max_len() > self.max_offset {
            candle_core::bail!(
                "a sequence of {} tokens is longer than the {} the encoder was loaded for",
                batch.max_len(),
                self.max_offset
            );
        }
        let bias = RelativeBias {
            values: &self.bias_table,
            heads: self.heads,
            bucket_of_offset: &self.bucket_of_offset,
            max_offset: self.max_offset,
        };
        let device = self.embed_tokens.embeddings().device();
        let embedded = self.embed_tokens.forward(&batch.ids_tensor(device)?)?;
        match &self.blocks {
            Blocks::Cpu(blocks, final_norm) => {
                let shape = embedded.shape().clone();
                let mut x = embedded.flatten_all()?.to_vec1::<f32>()?;
                for block in blocks {
                    self.cpu_block(block, &mut x, batch, &bias);
                }
                let out = cpu_kernels::rms_norm(&x, final_norm, self.eps);
                Tensor::from_vec(out, shape, device)
            }
            Blocks::Tensor(blocks, final_norm) => {
                let mut x = embedded;
                for block in blocks {
                    x = self.tensor_block(block, &x, batch, &bias)?;
                }
                candle_nn::ops::rms_norm(&x, final_norm, self.eps)
            }
        }
    }

    fn cpu_block(&self, b: &CpuBlock, x: &mut [f32], batch: &PackedBatch, bias: &RelativeBias) {
        let normed = cpu_kernels::rms_norm(x, &b.attention_norm, self.eps);
        let qkv = b.qkv.forward(&normed);
        let inner = qkv.len() / batch.tokens().max(1) / 3;
        let context = packed_attention_f32(&qkv, inner, batch, self.heads, Some(bias));
        cpu_kernels::add_in_place(x, &b.o.forward(&context));

        let normed = cpu_kernels::rms_norm(x, &b.feed_forward_norm, self.eps);
        let mut hidden = b.wi.forward(&normed);
        let hidden = match self.feed_forward {
            FeedForward::Relu => {
                hidden
                    .par_chunks_mut(16 * 1024)
                    .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
                hidden
            }
            FeedForward::GatedGelu => gate(&hidden, self.d_ff),
        };
        cpu_kernels::add_in_place(x, &b.wo.forward(&hidden));
    }

    fn tensor_block(
        &self,
        b: &BlockWeights,
        x: &Tensor,
        batch: &PackedBatch,
        bias: &RelativeBias,
    ) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(x, &b.attention_norm, self.eps)?;
        let context = packed_attention(&b.qkv.forward(&normed)?, batch, self.heads, Some(bias))?;
        let x = (x + b.o.forward(&context)?)?;
        let normed = candle_nn::ops::rms_norm(&x, &b.feed_forward_norm, self.eps)?;
        let hidden = b.wi.forward(&normed)?;
        let hidden = match self.feed_forward {
            FeedForward::Relu => hidden.relu()?,
            FeedForward::GatedGelu => {
                (hidden.narrow(1, 0, self.d_ff)?.gelu()?
                    * hidden.narrow(1, self.d_ff, self.d_ff)?)?
            }
        };
        x + b.wo.forward(&hidden)?
    }
}

/// `gelu_new(a) * b` for rows laid out `[a (d_ff) | b (d_ff)]`: the gated feed-forward's middle.
fn gate(rows: &[f32], d_ff: usize) -> Vec<f32> {
    let tokens = rows.len() / (2 * d_ff);
    let mut out = vec![0f32; tokens * d_ff];
    out.par_chunks_mut(d_ff)
        .zip(rows.par_chunks(2 * d_ff))
        .for_each(|(out, row)| {
            let (a, b) = row.split_at(d_ff);
            for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
                *o = cpu_kernels::gelu_tanh(*a) * b;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // T5Attention._relative_position_bucket(torch.tensor(OFFSETS), bidirectional=True,
        // num_buckets=..., max_distance=...), transformers 5.24.
        const OFFSETS: [i64; 37] = [
            -300, -128, -127, -64, -33, -32, -31, -17, -16, -15, -9, -8, -7, -4, -1, 0, 1, 2, 3, 4,
            7, 8, 9, 15, 16, 17, 20, 31, 32, 33, 64, 100, 127, 128, 129, 300, 511,
        ];
        let expected: [(usize, usize, [usize; 37]); 4] = [
            (
                32,
                128,
                [
                    15, 15, 15, 14, 12, 12, 11, 10, 10, 9, 8, 8, 7, 4, 1, 0, 17, 18, 19, 20, 23,
                    24, 24, 25, 26, 26, 26, 27, 28, 28, 30, 31, 31, 31, 31, 31, 31,
                ],
            ),
            (
                16,
                20,
                [
                    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 5, 5, 4, 1, 0, 9, 10, 11, 12, 13, 13, 14, 15,
                    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
                ],
            ),
            (
                8,
                16,
                [
                    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 1, 0, 5, 6, 6, 6, 7, 7, 7, 7, 7, 7,
                    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
                ],
            ),
            (
                64,
                256,
                [
                    31, 28, 27, 24, 20, 20, 19, 16, 16, 15, 9, 8, 7, 4, 1, 0, 33, 34, 35, 36, 39,
                    40, 41, 47, 48, 48, 49, 51, 52, 52, 56, 58, 59, 60, 60, 63, 63,
                ],
            ),
        ];
        for (buckets, max_distance, want) in expected {
            let got: Vec<usize> = OFFSETS
                .iter()
                .map(|&o| relative_position_bucket(o, buckets, max_distance))
                .collect();
            assert_eq!(got, want, "{buckets} buckets, max distance {max_distance}");
        }
    }

    #[test]
    fn unsupported_feed_forward_is_named() {
        let mut cfg: T5Config = serde_json::from_str(
            r#"{"vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1,
                "num_heads": 2, "feed_forward_proj": "gated-silu"}"#,
        )
        .unwrap();
        let error = cfg.validate().unwrap_err();
        assert!(error.contains("`gated-silu`"), "{error}");
        cfg.feed_forward_proj = "gated-gelu".into();
        assert_eq!(cfg.validate(), Ok(()));
    }

    fn random_weights(cfg: &T5Config, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
            tensors.insert(name, Tensor::randn(mean, std, shape, device)?);
            Ok(())
        };
        let (d, inner, ff) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        put("shared.weight".into(), &[cfg.vocab_size, d], 0.0, 1.0)?;
        put(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
            &[cfg.relative_attention_num_buckets, cfg.num_heads],
            0.0,
            1.0,
        )?;
        put("encoder.final_layer_norm.weight".into(), &[d], 1.0, 0.1)?;
        for layer in 0..cfg.num_layers {
            let p = format!("encoder.block.{layer}.layer");
            for name in ["q", "k", "v"] {
                put(
                    format!("{p}.0.SelfAttention.{name}.weight"),
                    &[inner, d],
                    0.0,
                    0.3,
                )?;
            }
            put(
                format!("{p}.0.SelfAttention.o.weight"),
                &[d, inner],
                0.0,
                0.3,
            )?;
            put(format!("{p}.0.layer_norm.weight"), &[d], 1.0, 0.1)?;
            put(format!("{p}.1.layer_norm.weight"), &[d], 1.0, 0.1)?;
            for name in ["wi", "wi_0", "wi_1"] {
                put(
                    format!("{p}.1.DenseReluDense.{name}.weight"),
                    &[ff, d],
                    0.0,
                    0.3,
                )?;
            }
            put(
                format!("{p}.1.DenseReluDense.wo.weight"),
                &[d, ff],
                0.0,
                0.2,
            )?;
        }
        Ok(tensors)
    }

    #[test]
    fn cpu_kernels_match_tensor_ops_for_both_feed_forwards() -> Result<()> {
        let device = Device::Cpu;
        for feed_forward in ["relu", "gated-gelu"] {
            let cfg: T5Config = serde_json::from_str(&format!(
                r#"{{"vocab_size": 50, "d_model": 24, "d_kv": 5, "d_ff": 40, "num_layers": 2,
                    "num_heads": 3, "relative_attention_num_buckets": 8,
                    "relative_attention_max_distance": 12, "feed_forward_proj": "{feed_forward}"}}"#
            ))
            .unwrap();
            let tensors = random_weights(&cfg, &device)?;
            let batch =
                PackedBatch::new(&[vec![3u32, 7, 1], vec![4, 9, 9, 12, 40, 2, 1], vec![5, 1]]);
            let vb = |t| VarBuilder::from_tensors(t, DType::F32, &device);
            let dense = Projections::dense();
            let fast = T5Encoder::load(vb(tensors.clone()), &cfg, 16, &dense)?;
            assert!(matches!(fast.blocks, Blocks::Cpu(..)));
            let reference = T5Encoder::load_with(vb(tensors), &cfg, 16, &dense, false)?;
            assert!(matches!(reference.blocks, Blocks::Tensor(..)));
            let a = fast.forward(&batch)?;
            let b = reference.forward(&batch)?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{feed_forward}: max abs difference {diff}");
        }
        Ok(())
    }
}
