//! Retrieval over sign-quantised vectors (`encoding_format: "binary"`): Hamming search over
//! the sign bits, then a float rescore of the best candidates, as a vector database with binary
//! indexes would run it. `embedfleet eval --binary-rescore` measures what it keeps of nDCG@10.

use embedfleet_fusion::metrics::Matrix;

/// Sign bits of each row, packed 64 per word (bit set where the value is > 0).
fn sign_bits(m: &Matrix) -> Vec<Vec<u64>> {
    (0..m.rows)
        .map(|i| {
            let mut words = vec![0u64; m.cols.div_ceil(64)];
            for (j, &v) in m.row(i).iter().enumerate() {
                if v > 0.0 {
                    words[j / 64] |= 1 << (j % 64);
                }
            }
            words
        })
        .collect()
}

/// For each query: the `candidates` corpus rows nearest in Hamming distance (ties: lower
/// index), re-ranked by the float dot product, best first.
pub fn binary_then_rescore(
    queries: &Matrix,
    corpus: &Matrix,
    candidates: usize,
) -> Vec<Vec<(usize, f32)>> {
    let (q_bits, d_bits) = (sign_bits(queries), sign_bits(corpus));
    q_bits
        .iter()
        .enumerate()
        .map(|(qi, q)| {
            let mut by_hamming: Vec<(u32, usize)> = d_bits
                .iter()
                .enumerate()
                .map(|(di, d)| (q.iter().zip(d).map(|(a, b)| (a ^ b).count_ones()).sum(), di))
                .collect();
            let keep = candidates.min(by_hamming.len());
            if keep < by_hamming.len() {
                by_hamming.select_nth_unstable(keep);
                by_hamming.truncate(keep);
            }
            let mut rescored: Vec<(usize, f32)> = by_hamming
                .into_iter()
                .map(|(_, di)| {
                    let dot = queries
                        .row(qi)
                        .iter()
                        .zip(corpus.row(di))
                        .map(|(a, b)| a * b)
                        .sum();
                    (di, dot)
                })
                .collect();
            rescored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            rescored
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hamming_candidates_are_rescored_by_float_dot_product() {
        // Rows 0 and 1 share the query's signs; row 1 is closer in float terms.
        let corpus = Matrix::from_rows(&[vec![0.1, 0.9], vec![0.7, 0.7], vec![-1.0, 0.1]]);
        let queries = Matrix::from_rows(&[vec![0.8, 0.6]]);
        let hits = binary_then_rescore(&queries, &corpus, 2);
        let ids: Vec<usize> = hits[0].iter().map(|h| h.0).collect();
        assert_eq!(ids, vec![1, 0]);
    }
}
