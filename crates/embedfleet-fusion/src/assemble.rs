//! Input assembly: per-model partial vectors → one row that the FuseMoE gate and experts read
//! (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for Fleximodal Fusion", treat
//! missing modalities the same way: an explicit absence signal, not fake data).
//!
//! A row is `[x ; mask]`: `x` is the concatenation of the slots in catalogue order (the
//! experts' input, width `input_dim`), `mask` has one entry per slot, 1 where the model
//! produced a partial and 0 where it did not take the input's modality (the gate sees it, so
//! an absent model does not look like a model that answered with a zero vector).
//!
//! Scaling: each present partial is L2-normalised, and the concatenation is divided by
//! `sqrt(present slots)`, so `x` has unit norm. Why: the models' raw norms differ by orders
//! of magnitude (mean-pooled BERT vs. last-token Mistral), and without this one model would
//! dominate both the gate and the cosine geometry; with it every present model carries the
//! same weight, and `x` is exactly the "L2-normalised concatenation" that the distance-
//! preservation property is stated against. Rows are assembled in f64 and rounded once, so
//! every platform gets the same bits.

use crate::config::FuseMoeConfig;
use crate::error::FusionError;

/// Checks one row of partials and writes it, assembled, into `row` (length
/// `cfg.gate_input_dim()`): the scaled concatenation, then the presence mask.
pub fn assemble_row(
    cfg: &FuseMoeConfig,
    partials: &[Option<&[f32]>],
    row: &mut [f32],
) -> Result<(), FusionError> {
    let input_dim = cfg.input_dim();
    debug_assert_eq!(row.len(), cfg.gate_input_dim());
    if partials.len() != cfg.num_slots() {
        return Err(FusionError::SlotCount {
            expected: cfg.num_slots(),
            got: partials.len(),
        });
    }

    // Validate everything before writing, and collect each present slot's norm.
    let mut norms = Vec::with_capacity(partials.len());
    for (slot, (partial, &width)) in partials.iter().zip(&cfg.input_dims).enumerate() {
        let Some(values) = partial else {
            norms.push(None);
            continue;
        };
        if values.len() != width {
            return Err(FusionError::SlotWidth {
                slot,
                expected: width,
                got: values.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(FusionError::NonFinitePartial { slot, index });
        }
        let norm = values
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 {
            return Err(FusionError::ZeroPartial { slot });
        }
        norms.push(Some(norm));
    }
    let present = norms.iter().filter(|n| n.is_some()).count();
    if present == 0 {
        return Err(FusionError::NoPartials);
    }

    let row_scale = 1.0 / (present as f64).sqrt();
    let (x, mask) = row.split_at_mut(input_dim);
    let mut offset = 0;
    for ((partial, norm), (&width, mask_entry)) in partials
        .iter()
        .zip(&norms)
        .zip(cfg.input_dims.iter().zip(mask.iter_mut()))
    {
        let out = &mut x[offset..offset + width];
        match (partial, norm) {
            (Some(values), Some(norm)) => {
                let scale = row_scale / norm;
                for (o, &v) in out.iter_mut().zip(values.iter()) {
                    *o = (v as f64 * scale) as f32;
                }
                *mask_entry = 1.0;
            }
            _ => {
                out.fill(0.0);
                *mask_entry = 0.0;
            }
        }
        offset += width;
    }
    Ok(())
}

/// The experts' input for one row: the unit-norm scaled concatenation (no mask). The
/// distance-preservation property compares fused vectors against these.
pub fn normalized_concatenation(
    cfg: &FuseMoeConfig,
    partials: &[Option<&[f32]>],
) -> Result<Vec<f32>, FusionError> {
    let mut row = vec![0.0; cfg.gate_input_dim()];
    assemble_row(cfg, partials, &mut row)?;
    row.truncate(cfg.input_dim());
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FuseMoeConfig {
        FuseMoeConfig::for_input_dims(vec![3, 2])
    }

    #[test]
    fn present_slots_are_normalised_and_the_row_has_unit_norm() {
        let a = [3.0, 0.0, 4.0];
        let b = [0.0, -10.0];
        let mut row = vec![f32::NAN; 7];
        assemble_row(&cfg(), &[Some(&a), Some(&b)], &mut row).unwrap();
        let s = 1.0 / 2f32.sqrt();
        let expected = [0.6 * s, 0.0, 0.8 * s, 0.0, -s, 1.0, 1.0];
        for (got, want) in row.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
        let norm: f32 = row[..5].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_missing_slot_is_zeros_with_mask_zero() {
        let b = [1.0, 1.0];
        let mut row = vec![f32::NAN; 7];
        assemble_row(&cfg(), &[None, Some(&b)], &mut row).unwrap();
        assert_eq!(&row[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(&row[5..], &[0.0, 1.0]);
        let s = 1.0 / 2f32.sqrt();
        assert!((row[3] - s).abs() < 1e-6 && (row[4] - s).abs() < 1e-6);
    }

    #[test]
    fn bad_rows_are_typed_errors() {
        let mut row = vec![0.0; 7];
        let good = [1.0, 2.0];
        let cases: Vec<(Vec<Option<&[f32]>>, &str)> = vec![
            (vec![Some(&[1.0, 2.0][..])], "slot count"),
            (vec![Some(&[1.0, 2.0][..]), Some(&good[..])], "width"),
            (vec![Some(&[1.0, f32::NAN, 0.0][..]), None], "nan"),
            (vec![Some(&[1.0, 0.0, f32::INFINITY][..]), None], "inf"),
            (vec![Some(&[0.0, 0.0, 0.0][..]), None], "zero"),
            (vec![None, None], "empty"),
        ];
        for (partials, what) in cases {
            let err = assemble_row(&cfg(), &partials, &mut row).unwrap_err();
            let ok = match what {
                "slot count" => matches!(
                    err,
                    FusionError::SlotCount {
                        expected: 2,
                        got: 1
                    }
                ),
                "width" => matches!(
                    err,
                    FusionError::SlotWidth {
                        slot: 0,
                        expected: 3,
                        got: 2
                    }
                ),
                "nan" => matches!(err, FusionError::NonFinitePartial { slot: 0, index: 1 }),
                "inf" => matches!(err, FusionError::NonFinitePartial { slot: 0, index: 2 }),
                "zero" => matches!(err, FusionError::ZeroPartial { slot: 0 }),
                _ => matches!(err, FusionError::NoPartials),
            };
            assert!(ok, "{what}: got {err:?}");
            assert!(err.is_bad_input());
        }
    }
}
