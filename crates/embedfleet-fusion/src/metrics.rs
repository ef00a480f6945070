//! Evaluation metrics as MTEB computes them: STS is the Spearman correlation (×100) between the
//! cosine of each pair's vectors and the gold score; retrieval is nDCG@10 and Recall@100 of an
//! exact cosine ranking of the whole corpus.
//!
//! Search is brute force, as one blocked matrix product of the queries against the corpus
//! (candle's CPU matmul, gemm underneath) followed by a partial top-k per query, so a
//! 5,000-document corpus costs one GEMM, not a loop over pairs.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

/// Rows of vectors as one row-major buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn from_rows(rows: &[Vec<f32>]) -> Matrix {
        let cols = rows.first().map_or(0, Vec::len);
        let mut data = Vec::with_capacity(rows.len() * cols);
        for r in rows {
            assert_eq!(r.len(), cols, "ragged rows");
            data.extend_from_slice(r);
        }
        Matrix {
            rows: rows.len(),
            cols,
            data,
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The first `dims` columns of every row, each row scaled to unit norm (Matryoshka
    /// truncation); `dims` is clamped to the width.
    pub fn prefix_normalized(&self, dims: usize) -> Matrix {
        let dims = dims.min(self.cols);
        let mut data = Vec::with_capacity(self.rows * dims);
        for i in 0..self.rows {
            let r = &self.row(i)[..dims];
            let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            data.extend(r.iter().map(|&v| (v as f64 * inv) as f32));
        }
        Matrix {
            rows: self.rows,
            cols: dims,
            data,
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Cosine of row `i` of `a` with row `i` of `b`, for every `i`.
pub fn paired_cosines(a: &Matrix, b: &Matrix) -> Vec<f64> {
    (0..a.rows).map(|i| cosine(a.row(i), b.row(i))).collect()
}

/// Ranks (1-based, ties get their average rank), as Spearman's correlation needs.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = average;
        }
        i = j + 1;
    }
    ranks
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Spearman's rank correlation of `x` and `y` (tie-corrected: Pearson of average ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    if x.len() < 2 {
        return 0.0;
    }
    pearson(&ranks(x), &ranks(y))
}

/// STS score: Spearman ×100 between the pairs' cosines and the gold scores.
pub fn sts_spearman(a: &Matrix, b: &Matrix, gold: &[f64]) -> f64 {
    100.0 * spearman(&paired_cosines(a, b), gold)
}

/// For every query, the `k` best corpus rows by dot product (cosine for unit rows), best first
/// (ties: lower index). Queries run in blocks through one matrix product each.
pub fn top_k_search(queries: &Matrix, corpus: &Matrix, k: usize) -> Vec<Vec<(usize, f32)>> {
    const BLOCK: usize = 256;
    let k = k.min(corpus.rows);
    let device = Device::Cpu;
    let corpus_t = Tensor::from_slice(&corpus.data, (corpus.rows, corpus.cols), &device)
        .and_then(|t| t.t())
        .expect("a corpus matrix of its own shape");
    let mut results = Vec::with_capacity(queries.rows);
    for start in (0..queries.rows).step_by(BLOCK) {
        let rows = BLOCK.min(queries.rows - start);
        let block = &queries.data[start * queries.cols..(start + rows) * queries.cols];
        let scores: Vec<f32> = Tensor::from_slice(block, (rows, queries.cols), &device)
            .and_then(|q| q.matmul(&corpus_t))
            .and_then(|s| s.flatten_all())
            .and_then(|s| s.to_vec1())
            .expect("query block × corpus with matching widths");
        for row in scores.chunks_exact(corpus.rows) {
            results.push(best_k(row, k));
        }
    }
    results
}

fn best_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut all: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    if k < all.len() {
        all.select_nth_unstable_by(k, order);
        all.truncate(k);
    }
    all.sort_by(order);
    all
}

/// nDCG@k of one ranking (`ranked`: document ids, best first) against graded relevance, with
/// the gain `grade` and discount `1/log2(rank + 1)` (pytrec_eval's, which BEIR uses).
pub fn ndcg_at_k(ranked: &[&str], relevant: &HashMap<String, u32>, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, id)| relevant.get(*id).copied().unwrap_or(0) as f64 / (i as f64 + 2.0).log2())
        .sum();
    let mut ideal: Vec<u32> = relevant.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &g)| g as f64 / (i as f64 + 2.0).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

/// Share of the relevant documents found in the first `k`.
pub fn recall_at_k(ranked: &[&str], relevant: &HashMap<String, u32>, k: usize) -> f64 {
    let total = relevant.values().filter(|&&g| g > 0).count();
    if total == 0 {
        return 0.0;
    }
    let found = ranked
        .iter()
        .take(k)
        .filter(|id| relevant.get(**id).is_some_and(|&g| g > 0))
        .count();
    found as f64 / total as f64
}

/// Retrieval scores of one system, ×100, averaged over queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrievalScores {
    pub ndcg_at_10: f64,
    pub recall_at_100: f64,
}

/// Ranks the corpus for every query and averages nDCG@10 and Recall@100 (×100).
/// `rerank`: optional function that re-scores a query's top candidates (e.g. a float rescore
/// after a binary search); it receives the query index and candidate rows, returns new scores.
pub fn retrieval_scores(
    rankings: &[Vec<(usize, f32)>],
    corpus_ids: &[String],
    query_ids: &[String],
    qrels: &HashMap<String, HashMap<String, u32>>,
) -> RetrievalScores {
    let empty = HashMap::new();
    let (mut ndcg, mut recall) = (0.0, 0.0);
    for (ranking, qid) in rankings.iter().zip(query_ids) {
        let ids: Vec<&str> = ranking
            .iter()
            .map(|&(i, _)| corpus_ids[i].as_str())
            .collect();
        let relevant = qrels.get(qid).unwrap_or(&empty);
        ndcg += ndcg_at_k(&ids, relevant, 10);
        recall += recall_at_k(&ids, relevant, 100);
    }
    let n = rankings.len().max(1) as f64;
    RetrievalScores {
        ndcg_at_10: 100.0 * ndcg / n,
        recall_at_100: 100.0 * recall / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_hand_computed_ranks() {
        // x ranks 1,2,3,4; y ranks 1,3,2,4: d² = 0+1+1+0 = 2, ρ = 1 − 6·2/(4·15) = 0.8.
        let r = spearman(&[0.1, 0.2, 0.3, 0.4], &[1.0, 3.0, 2.0, 4.0]);
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        // Ties take their average rank: [1, 2.5, 2.5, 4] against itself is 1.
        assert!((spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn ndcg_and_recall_of_a_hand_computed_ranking() {
        let relevant: HashMap<String, u32> = [("a".to_string(), 1), ("c".to_string(), 2)].into();
        // Ranking b, a, c: DCG = 0/log2(2) + 1/log2(3) + 2/log2(4) = 0.63093 + 1 = 1.63093;
        // ideal c, a: 2/1 + 1/log2(3) = 2.63093; nDCG = 0.61991.
        let ndcg = ndcg_at_k(&["b", "a", "c"], &relevant, 10);
        assert!((ndcg - 1.630_929_753_571_457 / 2.630_929_753_571_457).abs() < 1e-12);
        assert!((ndcg_at_k(&["c", "a"], &relevant, 10) - 1.0).abs() < 1e-12);
        // Cut at 2: only a counts; ideal@2 still 2.63093.
        assert!(
            (ndcg_at_k(&["b", "a", "c"], &relevant, 2)
                - 0.630_929_753_571_457 / 2.630_929_753_571_457)
                .abs()
                < 1e-12
        );
        assert_eq!(recall_at_k(&["b", "a", "c"], &relevant, 2), 0.5);
        assert_eq!(recall_at_k(&["b", "a", "c"], &relevant, 3), 1.0);
    }

    #[test]
    fn matrix_search_finds_the_nearest_rows_in_order() {
        let corpus = Matrix::from_rows(&[
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![0.6, 0.8],
            vec![-1.0, 0.0],
        ]);
        let queries = Matrix::from_rows(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let hits = top_k_search(&queries, &corpus, 3);
        let ids: Vec<Vec<usize>> = hits
            .iter()
            .map(|h| h.iter().map(|x| x.0).collect())
            .collect();
        assert_eq!(ids, vec![vec![0, 2, 1], vec![1, 2, 0]]);
        assert!((hits[0][1].1 - 0.6).abs() < 1e-6);
    }

    #[test]
    fn prefix_rows_are_renormalised() {
        let m = Matrix::from_rows(&[vec![3.0, 4.0, 12.0]]);
        let p = m.prefix_normalized(2);
        assert_eq!(p.cols, 2);
        assert!((p.data[0] - 0.6).abs() < 1e-6 && (p.data[1] - 0.8).abs() < 1e-6);
    }
}
