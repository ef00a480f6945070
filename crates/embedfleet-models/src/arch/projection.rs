//! The linear layers of every architecture, dense or quantised: one type, so that a dtype is
//! decided once at load and each architecture's forward is the same code at every dtype.
//!
//! Dense layers keep the checkpoint's `[out, in]` weight at the float dtype the model was loaded
//! at (f32, f16, bf16) and run candle's matmul; on a CPU in f32 the architectures take the weight
//! out again for their packed kernels (`layers::CpuLinear`), so the f32 path is unchanged.
//! Quantised layers are quantised here, at load, from the normal checkpoint: GGML blocks
//! (`candle_core::quantized`), run by `QMatMul` on f32 activations. Only linear layers are
//! quantised; embeddings, norms and biases stay float, as in llama.cpp's k-quant mixes.
//!
//! A GGML block spans a run of one weight row, so a layer can only be quantised when its input
//! width is a multiple of the block: 32 for Q8_0, 256 for Q4_K. Where Q4_K does not fit (minilm's
//! 384-wide layers, SmolLM2's 576) the layer falls back as llama.cpp's quantiser does
//! (`llama_tensor_get_type`): Q4_K → Q5_0, a 32-weight block at 5.5 bits instead of 4.5. Where
//! not even 32 divides the width (only the tiny test checkpoints) the layer stays dense f32. The
//! fallbacks of a model are summed up in one warning at load ([`Projections::warn_fallbacks`]).

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;

use crate::dtype::Dtype;

/// One linear layer: `x W^T + b`.
#[derive(Clone)]
pub enum Projection {
    /// Float weights, `[out, in]`.
    Dense(Linear),
    /// GGML blocks; `bias` stays float.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
        format: GgmlDType,
    },
}

impl Projection {
    /// `x` is `[rows, in]`; the result `[rows, out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => linear.forward(x),
            Self::Quantized { weight, bias, .. } => {
                // The quantised kernels read their input as one contiguous f32 block.
                let y = weight.forward(&x.contiguous()?)?;
                match bias {
                    Some(bias) => y.broadcast_add(bias),
                    None => Ok(y),
                }
            }
        }
    }

    /// The dense layer when it is f32 on the CPU: what the packed CPU kernels can take over.
    pub fn cpu_f32(&self) -> Option<&Linear> {
        match self {
            Self::Dense(linear)
                if linear.weight().device().is_cpu() && linear.weight().dtype() == DType::F32 =>
            {
                Some(linear)
            }
            _ => None,
        }
    }

    /// The GGML format of a quantised layer; `None` for a dense one.
    pub fn format(&self) -> Option<GgmlDType> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized { format, .. } => Some(*format),
        }
    }
}

/// The GGML format a layer with rows `in_dim` long is stored in at `dtype`: `None` for the float
/// dtypes, and for a width no block of the dtype (or its fallback) divides.
pub fn block_format(dtype: Dtype, in_dim: usize) -> Option<GgmlDType> {
    let candidates: &[GgmlDType] = match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::Bf16 => &[],
        Dtype::Q8_0 => &[GgmlDType::Q8_0],
        Dtype::Q4k => &[GgmlDType::Q4K, GgmlDType::Q5_0],
    };
    candidates
        .iter()
        .copied()
        .find(|format| in_dim.is_multiple_of(format.block_size()))
}

/// Builds an architecture's projections at one dtype and remembers which layers fell back.
pub struct Projections {
    dtype: Dtype,
    /// `(in_dim, what the layer became)` → how many layers: for the one warning at load.
    fallbacks: RefCell<BTreeMap<(usize, String), usize>>,
    layers: RefCell<usize>,
}

impl Projections {
    /// Projections at `dtype`: dense for f32/f16/bf16 (the weights stay as the `VarBuilder`
    /// loaded them), quantised for q8_0/q4k.
    pub fn new(dtype: Dtype) -> Self {
        Self {
            dtype,
            fallbacks: RefCell::default(),
            layers: RefCell::new(0),
        }
    }

    /// Dense projections, whatever float dtype the weights were loaded at.
    pub fn dense() -> Self {
        Self::new(Dtype::F32)
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The layer `x weight^T + bias`, `weight` `[out, in]` as the checkpoint stores it. A
    /// quantised layer is quantised onto `weight`'s device (through the CPU, where candle's
    /// quantiser runs), and the float weight is dropped.
    pub fn build(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Projection> {
        *self.layers.borrow_mut() += 1;
        if !self.dtype.is_quantized() {
            return Ok(Projection::Dense(Linear::new(weight, bias)));
        }
        let (_, in_dim) = weight.dims2()?;
        let Some(format) = block_format(self.dtype, in_dim) else {
            self.note_fallback(in_dim, "dense f32".into());
            let to_f32 = |t: Tensor| t.to_dtype(DType::F32);
            return Ok(Projection::Dense(Linear::new(
                to_f32(weight)?,
                bias.map(to_f32).transpose()?,
            )));
        };
        if format != primary_format(self.dtype) {
            self.note_fallback(in_dim, format!("{format:?}"));
        }
        let device = weight.device().clone();
        let cpu = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let quantized = QTensor::quantize_onto(&cpu, format, &device)?;
        Ok(Projection::Quantized {
            weight: QMatMul::from_qtensor(quantized)?,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            format,
        })
    }

    fn note_fallback(&self, in_dim: usize, became: String) {
        *self
            .fallbacks
            .borrow_mut()
            .entry((in_dim, became))
            .or_default() += 1;
    }

    /// How many layers fell back, by `(in_dim, what they became)`.
    pub fn fallbacks(&self) -> BTreeMap<(usize, String), usize> {
        self.fallbacks.borrow().clone()
    }

    /// One warning naming every fallback of `model`'s load, if there was any.
    pub fn warn_fallbacks(&self, model: &str) {
        let fallbacks = self.fallbacks.borrow();
        if fallbacks.is_empty() {
            return;
        }
        let summary: Vec<String> = fallbacks
            .iter()
            .map(|((in_dim, became), count)| format!("{count} with rows of {in_dim} → {became}"))
            .collect();
        tracing::warn!(
            model,
            dtype = %self.dtype,
            layers = *self.layers.borrow(),
            fallbacks = %summary.join("; "),
            "some linear layers are not a whole number of the dtype's blocks wide and use another format"
        );
    }
}

fn primary_format(dtype: Dtype) -> GgmlDType {
    match dtype {
        Dtype::Q4k => GgmlDType::Q4K,
        _ => GgmlDType::Q8_0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(&a) * norm(&b))
    }

    #[test]
    fn widths_pick_the_block_or_the_documented_fallback() {
        assert_eq!(block_format(Dtype::F32, 384), None);
        assert_eq!(block_format(Dtype::Bf16, 4096), None);
        assert_eq!(block_format(Dtype::Q8_0, 384), Some(GgmlDType::Q8_0));
        assert_eq!(block_format(Dtype::Q8_0, 80), None);
        assert_eq!(block_format(Dtype::Q4k, 4096), Some(GgmlDType::Q4K));
        assert_eq!(block_format(Dtype::Q4k, 1536), Some(GgmlDType::Q4K));
        // minilm's hidden width: 1.5 blocks of 256.
        assert_eq!(block_format(Dtype::Q4k, 384), Some(GgmlDType::Q5_0));
        assert_eq!(block_format(Dtype::Q4k, 48), None);
    }

    #[test]
    fn quantised_layers_stay_close_to_the_dense_one() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (7, 512), &device)?;
        let weight = Tensor::randn(0f32, 0.05, (96, 512), &device)?;
        let bias = Tensor::randn(0f32, 0.1, 96, &device)?;
        let dense = Projections::dense().build(weight.clone(), Some(bias.clone()))?;
        assert!(dense.cpu_f32().is_some());
        let want = dense.forward(&x)?;
        for (dtype, format, floor) in [
            (Dtype::Q8_0, GgmlDType::Q8_0, 0.9995),
            (Dtype::Q4k, GgmlDType::Q4K, 0.99),
        ] {
            let layer = Projections::new(dtype).build(weight.clone(), Some(bias.clone()))?;
            assert_eq!(layer.format(), Some(format));
            assert!(
                layer.cpu_f32().is_none(),
                "{dtype} must not take the f32 kernels"
            );
            let got = layer.forward(&x)?;
            assert_eq!(got.dims(), [7, 96]);
            let similarity = cosine(&got, &want);
            assert!(similarity >= floor, "{dtype}: cosine {similarity}");
        }
        Ok(())
    }

    #[test]
    fn layers_that_do_not_fit_a_block_fall_back_and_are_counted() -> Result<()> {
        let device = Device::Cpu;
        let projections = Projections::new(Dtype::Q4k);
        let x = Tensor::randn(0f32, 1.0, (3, 384), &device)?;
        let weight = Tensor::randn(0f32, 0.05, (16, 384), &device)?;
        let q5 = projections.build(weight.clone(), None)?;
        assert_eq!(q5.format(), Some(GgmlDType::Q5_0));
        let want = Projections::dense().build(weight, None)?.forward(&x)?;
        assert!(cosine(&q5.forward(&x)?, &want) >= 0.99);
        let narrow = projections.build(Tensor::randn(0f32, 0.05, (16, 48), &device)?, None)?;
        assert!(narrow.cpu_f32().is_some());
        let expected: BTreeMap<(usize, String), usize> = [
            ((48, "dense f32".to_string()), 1),
            ((384, "Q5_0".to_string()), 1),
        ]
        .into();
        assert_eq!(projections.fallbacks(), expected);
        Ok(())
    }
}
