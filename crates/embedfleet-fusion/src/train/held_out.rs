//! Held-out scoring during training: STS Spearman and retrieval nDCG@10 of any vectors, the
//! references the trained layer is measured against (each model alone, the concatenation), and
//! the selection figure early stopping compares.

use crate::config::FuseMoeConfig;
use crate::metrics::{self, Matrix};

use super::{PairData, RetrievalHeldOut};

/// (STS Spearman ×100, nDCG@10 ×100), each `None` without such held-out data.
pub(super) type TaskScores = [Option<f64>; 2];

/// Each reference's scores, and the best of them per task.
pub(super) type ReferenceScores = (Vec<(Reference, TaskScores)>, [f64; 2]);

/// Held-out scores of one epoch: STS Spearman ×100 and retrieval nDCG@10 ×100 (where there is
/// such data), and `selection`, what early stopping compares: the smallest margin, over the
/// held-out tasks, by which the layer beats the best [`Reference`] on that task (negative while
/// some single model or the concatenation is still better on some task). So an epoch that
/// gains on one task by losing on the other is not chosen over one that gains on both: the
/// goal is a fused vector better than each model alone on every task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOutScores {
    pub sts_spearman: Option<f64>,
    pub ndcg_at_10: Option<f64>,
    pub selection: f64,
}

/// What the trained layer is compared with on the held-out data, computed from the partials
/// themselves: each model alone (cosine of its own vector) and their normalised concatenation
/// (what the seeded layer preserves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The model in this slot (slot order of the config).
    Slot(usize),
    Concatenation,
}

/// Held-out (STS Spearman, nDCG@10) of the vectors `embed` gives each row.
pub(super) fn task_scores(
    data: &PairData,
    retrieval: Option<&RetrievalHeldOut>,
    embed: &dyn Fn(&[usize]) -> candle_core::Result<Matrix>,
) -> candle_core::Result<TaskScores> {
    let sts = if data.held_out_scored.len() >= 2 {
        let a: Vec<usize> = data.held_out_scored.iter().map(|p| p.a).collect();
        let b: Vec<usize> = data.held_out_scored.iter().map(|p| p.b).collect();
        let gold: Vec<f64> = data
            .held_out_scored
            .iter()
            .map(|p| p.score as f64)
            .collect();
        Some(metrics::sts_spearman(&embed(&a)?, &embed(&b)?, &gold))
    } else {
        None
    };
    let ndcg = match retrieval {
        Some(r) => {
            let queries = embed(&r.queries)?;
            let corpus = embed(&r.corpus)?;
            let rankings = metrics::top_k_search(&queries, &corpus, 10);
            let mut total = 0.0;
            for (ranking, relevant) in rankings.iter().zip(&r.relevant) {
                let ids: Vec<String> = ranking.iter().map(|(i, _)| i.to_string()).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                let rel = relevant.iter().map(|i| (i.to_string(), 1)).collect();
                total += metrics::ndcg_at_k(&ids, &rel, 10);
            }
            Some(100.0 * total / r.queries.len() as f64)
        }
        None => None,
    };
    Ok([sts, ndcg])
}

/// Each model alone and the concatenation on the held-out data, straight from the rows'
/// assembled input (each slot's block is its normalised partial), and the best of them per
/// task: what [`HeldOutScores::selection`] is a margin over.
/// `x` holds every row's assembled input, `input_dim` wide.
pub(super) fn references(
    cfg: &FuseMoeConfig,
    x: &[f32],
    input_dim: usize,
    data: &PairData,
    retrieval: Option<&RetrievalHeldOut>,
) -> candle_core::Result<ReferenceScores> {
    let block = |offset: usize, width: usize| {
        move |rows: &[usize]| -> candle_core::Result<Matrix> {
            let mut data = Vec::with_capacity(rows.len() * width);
            for &r in rows {
                data.extend_from_slice(&x[r * input_dim + offset..][..width]);
            }
            Ok(Matrix {
                rows: rows.len(),
                cols: width,
                data,
            }
            .prefix_normalized(width))
        }
    };
    let mut references = Vec::new();
    for (slot, (&offset, &width)) in cfg.slot_offsets().iter().zip(&cfg.input_dims).enumerate() {
        let scores = task_scores(data, retrieval, &block(offset, width))?;
        references.push((Reference::Slot(slot), scores));
    }
    let concatenation = task_scores(data, retrieval, &block(0, input_dim))?;
    references.push((Reference::Concatenation, concatenation));
    let mut best = [f64::NEG_INFINITY; 2];
    for (_, scores) in &references {
        for (b, s) in best.iter_mut().zip(scores) {
            if let Some(s) = s {
                *b = b.max(*s);
            }
        }
    }
    Ok((references, best))
}

/// The scores and the selection figure: the smallest margin over `best`, per task.
pub(super) fn scores(raw: TaskScores, best: [f64; 2]) -> HeldOutScores {
    let selection = raw
        .iter()
        .zip(best)
        .filter_map(|(s, b)| s.map(|s| s - b))
        .fold(f64::INFINITY, f64::min);
    HeldOutScores {
        sts_spearman: raw[0],
        ndcg_at_10: raw[1],
        selection,
    }
}
