//! What every text embedder does around its forward pass, written once: the batch's texts
//! (modality checked, blank refused before any prompt is added), and the token ids run in packed
//! passes of bounded size, longest first, with each row put back in input order and normalised
//! when asked. The embedders differ only in the forward pass they hand to [`embed_in_passes`].

use std::cmp::Reverse;

use crate::catalogue::ModelSpec;
use crate::error::ModelError;
use crate::model::{l2_normalize, ModelEmbedding, ModelInput};
use crate::packed::PackedBatch;

/// Each input's text (code goes through as its text: `language` is for the cache key, not the
/// encoder). An input of a modality the model does not take, or a blank one, fails the batch.
pub(crate) fn input_texts<'a>(
    spec: &ModelSpec,
    inputs: &'a [ModelInput],
) -> Result<Vec<&'a str>, ModelError> {
    inputs
        .iter()
        .enumerate()
        .map(|(index, input)| match input.text() {
            Some(text) if spec.takes(input.modality()) => {
                // Checked before prompting: a blank query must not pass as its prompt.
                if text.trim().is_empty() {
                    Err(ModelError::EmptyInput { index })
                } else {
                    Ok(text)
                }
            }
            _ => Err(ModelError::UnsupportedModality {
                model: spec.name.to_string(),
                modality: input.modality(),
            }),
        })
        .collect()
}

/// Runs `ids` through `forward` in packed passes of at most `budget` tokens and returns one
/// embedding per sequence, in input order. `forward` returns one row per sequence of its batch.
///
/// Longest first, so each pass packs sequences of similar length and the budget splits the
/// batch into as few passes as possible; the budget bounds activation memory whatever batch a
/// caller sends.
pub(crate) fn embed_in_passes(
    spec: &ModelSpec,
    ids: &[Vec<u32>],
    budget: usize,
    normalize: bool,
    mut forward: impl FnMut(&PackedBatch) -> candle_core::Result<Vec<Vec<f32>>>,
) -> Result<Vec<ModelEmbedding>, ModelError> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| Reverse(ids[i].len()));
    let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
    let infer = ModelError::inference(spec.name);
    for pass in split_by_token_budget(&order, ids, budget) {
        let batch = PackedBatch::new(&pass.iter().map(|&i| ids[i].as_slice()).collect::<Vec<_>>());
        let rows = forward(&batch).map_err(&infer)?;
        for (mut row, &index) in rows.into_iter().zip(pass) {
            if normalize {
                l2_normalize(&mut row);
            }
            vectors[index] = row;
        }
    }
    Ok(vectors
        .into_iter()
        .zip(ids)
        .map(|(vector, ids)| ModelEmbedding {
            vector,
            tokens: ids.len(),
        })
        .collect())
}

/// Consecutive runs of `order` whose token counts fit the budget (a single sequence longer than
/// the budget still gets a pass of its own).
fn split_by_token_budget<'a>(
    order: &'a [usize],
    ids: &'a [Vec<u32>],
    budget: usize,
) -> Vec<&'a [usize]> {
    let mut passes = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (position, &index) in order.iter().enumerate() {
        let len = ids[index].len();
        if position > start && tokens + len > budget {
            passes.push(&order[start..position]);
            (start, tokens) = (position, 0);
        }
        tokens += len;
    }
    if start < order.len() {
        passes.push(&order[start..]);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_splits_passes_without_dropping_any_input() {
        let ids = vec![vec![0; 6], vec![0; 5], vec![0; 4], vec![0; 20], vec![0; 1]];
        let order = [3, 0, 1, 2, 4];
        let passes = split_by_token_budget(&order, &ids, 10);
        assert_eq!(passes, vec![&[3][..], &[0][..], &[1, 2, 4][..]]);
        assert!(split_by_token_budget(&[], &ids, 10).is_empty());
    }

    #[test]
    fn rows_come_back_in_input_order_normalised() {
        let spec = crate::catalogue::find("minilm").unwrap();
        let ids = vec![vec![1; 2], vec![1; 5], vec![1; 3]];
        // Each row says how long its sequence was, so a row put back in the wrong place shows.
        let embedded = embed_in_passes(spec, &ids, 6, true, |batch| {
            Ok((0..batch.sequences())
                .map(|s| vec![batch.len_of(s) as f32, 0.0])
                .collect())
        })
        .unwrap();
        assert_eq!(
            embedded.iter().map(|e| e.tokens).collect::<Vec<_>>(),
            [2, 5, 3]
        );
        assert!(embedded.iter().all(|e| e.vector == [1.0, 0.0]));
        let raw = embed_in_passes(spec, &ids, 6, false, |batch| {
            Ok((0..batch.sequences())
                .map(|s| vec![batch.len_of(s) as f32])
                .collect())
        })
        .unwrap();
        assert_eq!(
            raw.iter().map(|e| e.vector[0]).collect::<Vec<_>>(),
            [2.0, 5.0, 3.0]
        );
    }
}
