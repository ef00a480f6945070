//! Token states to one vector per sequence. Architectures return hidden states; pooling lives
//! here once, for all of them.

use candle_core::{DType, Result, Tensor};

use crate::catalogue::Pooling;
use crate::packed::PackedBatch;

/// Pools packed `[tokens, hidden]` states into `[sequences, hidden]`.
pub fn pool(hidden_states: &Tensor, batch: &PackedBatch, pooling: Pooling) -> Result<Tensor> {
    let device = hidden_states.device();
    match pooling {
        // One matrix product averages every sequence at once; there is no padding to mask. The
        // average is taken in f32 whatever the model computed in (f16/bf16 sums lose digits).
        Pooling::Mean => batch
            .mean_pooling_matrix(device)?
            .matmul(&hidden_states.to_dtype(DType::F32)?),
        Pooling::Cls => hidden_states.index_select(&batch.first_rows(device)?, 0),
        Pooling::LastToken => hidden_states.index_select(&batch.last_rows(device)?, 0),
        Pooling::Projection => {
            candle_core::bail!("projection pooling belongs to the model's own head")
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn each_pooling_reads_its_own_sequence() -> Result<()> {
        let batch = PackedBatch::new(&[vec![0, 0], vec![0, 0, 0]]);
        let states = Tensor::new(
            &[[1f32, 10.], [3., 30.], [5., 50.], [7., 70.], [9., 90.]],
            &Device::Cpu,
        )?;
        let mean = pool(&states, &batch, Pooling::Mean)?.to_vec2::<f32>()?;
        let expected = [[2f32, 20.], [7., 70.]];
        for (got, want) in mean.iter().flatten().zip(expected.iter().flatten()) {
            assert!((got - want).abs() < 1e-4, "{mean:?}");
        }
        assert_eq!(
            pool(&states, &batch, Pooling::Cls)?.to_vec2::<f32>()?,
            [[1., 10.], [5., 50.]]
        );
        assert_eq!(
            pool(&states, &batch, Pooling::LastToken)?.to_vec2::<f32>()?,
            [[3., 30.], [9., 90.]]
        );
        assert!(pool(&states, &batch, Pooling::Projection).is_err());
        Ok(())
    }
}
