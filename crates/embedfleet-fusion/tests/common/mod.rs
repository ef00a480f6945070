//! Helpers shared by the fusion integration tests.
#![allow(dead_code)]

use embedfleet_fusion::FuseMoeConfig;

/// A small config with every default except the widths, so tests run in milliseconds.
pub fn small_config(input_dims: Vec<usize>) -> FuseMoeConfig {
    FuseMoeConfig {
        expert_hidden: 96,
        gate_hidden: 32,
        output_dim: 64,
        ..FuseMoeConfig::for_input_dims(input_dims)
    }
}

/// Deterministic pseudo-random values in [-1, 1) (a splitmix64 stream).
pub fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// Ranks with ties averaged (1-based).
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
        for &o in &order[i..=j] {
            ranks[o] = average;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation: Pearson's correlation of the ranks.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Cosines of every unordered pair, in a fixed order.
pub fn pairwise_cosines(vectors: &[Vec<f32>]) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            out.push(cosine(&vectors[i], &vectors[j]));
        }
    }
    out
}

#[test]
fn spearman_of_a_monotone_map_is_one_and_of_a_reversal_minus_one() {
    let a = [0.1, 0.5, 0.2, 0.9];
    let b: Vec<f64> = a.iter().map(|x: &f64| x.powi(3)).collect();
    let c: Vec<f64> = a.iter().map(|x| -x).collect();
    assert!((spearman(&a, &b) - 1.0).abs() < 1e-12);
    assert!((spearman(&a, &c) + 1.0).abs() < 1e-12);
}
