//! CPU kernels of the pre-norm decoder layer (Mistral, Llama): RMSNorm, rotary position
//! embeddings, the SwiGLU gate, and causal grouped-query attention over packed batches.
//!
//! They sit beside [`crate::cpu_kernels`] (whose gemm `linear`, `dot` and `exp` they use) for the
//! same reason: one pass over memory per step, no per-op allocation, no libm calls in the inner
//! loops, all parallel work on rayon's pool. See docs/benchmarks.md for why candle's element-wise
//! ops are not used on CPU.

use rayon::prelude::*;

use crate::cpu_kernels::{dot, exp};
use crate::packed::PackedBatch;

/// Rows per parallel task for element-wise work: large enough to amortise scheduling.
fn rows_per_task(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// `out = RMSNorm(x) * weight` row by row, as transformers' `MistralRMSNorm` (f32 throughout).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = x.to_vec();
    out.par_chunks_mut(rows_per_task(width) * width)
        .for_each(|rows| {
            for row in rows.chunks_exact_mut(width) {
                let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let inv = 1.0 / (mean_square + eps).sqrt();
                row.iter_mut()
                    .zip(weight)
                    .for_each(|(v, w)| *v = *v * inv * w);
            }
        });
    out
}

/// `x += delta`, in parallel: the residual connections.
pub fn add_in_place(x: &mut [f32], delta: &[f32]) {
    x.par_chunks_mut(16 * 1024)
        .zip(delta.par_chunks(16 * 1024))
        .for_each(|(x, d)| x.iter_mut().zip(d).for_each(|(x, d)| *x += d));
}

/// SwiGLU: each row of `gate_up` holds the gate projection then the up projection
/// (`[tokens, 2 * intermediate]`); returns `silu(gate) * up`, `[tokens, intermediate]`.
pub fn silu_mul(gate_up: &[f32], intermediate: usize) -> Vec<f32> {
    let tokens = gate_up.len() / (2 * intermediate);
    let mut out = vec![0f32; tokens * intermediate];
    let rows = rows_per_task(intermediate);
    out.par_chunks_mut(rows * intermediate)
        .zip(gate_up.par_chunks(rows * 2 * intermediate))
        .for_each(|(out, gate_up)| {
            for (out, row) in out
                .chunks_exact_mut(intermediate)
                .zip(gate_up.chunks_exact(2 * intermediate))
            {
                let (gate, up) = row.split_at(intermediate);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    // silu(g) = g * sigmoid(g); `exp` is the vectorisable one.
                    *o = g / (1.0 + exp(-g)) * u;
                }
            }
        });
    out
}

/// Cosine and sine of every (position, frequency) pair up to `positions`, `[positions, half]`
/// each, with transformers' default RoPE frequencies `theta^(-2i / head_dim)`.
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(positions: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        // As transformers: inverse frequencies and the angle product in f32, the cosine of that.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for position in 0..positions {
            for &freq in &inv_freq {
                let angle = (position as f32 * freq) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { cos, sin, half }
    }
}

/// Rotates the query and key heads of a packed `[tokens, (q_heads + 2 * kv_heads) * head_dim]`
/// projection in place, each token by its position within its own sequence. transformers'
/// `rotate_half` convention: dimension `i` pairs with `i + head_dim / 2` (not `2i` with `2i + 1`).
pub fn apply_rope(
    qkv: &mut [f32],
    batch: &PackedBatch,
    table: &RopeTable,
    q_heads: usize,
    kv_heads: usize,
) {
    let half = table.half;
    let head_dim = 2 * half;
    let width = (q_heads + 2 * kv_heads) * head_dim;
    let positions = batch.positions(0);
    qkv.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &position)| {
            let cos = &table.cos[position as usize * half..][..half];
            let sin = &table.sin[position as usize * half..][..half];
            // Queries then keys: the first q_heads + kv_heads heads of the row; values stay.
            for head in row[..(q_heads + kv_heads) * head_dim].chunks_exact_mut(head_dim) {
                let (first, second) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (first[i], second[i]);
                    first[i] = x1 * cos[i] - x2 * sin[i];
                    second[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        });
}

/// The head layout of a packed decoder projection.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub q_heads: usize,
    /// Key/value heads; each serves `q_heads / kv_heads` query heads (grouped-query attention).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// A token sees at most this many tokens, itself included (Mistral's sliding window);
    /// `None` for the full causal prefix.
    pub window: Option<usize>,
}

/// Causal grouped-query attention over a packed batch.
///
/// `qkv` is `[tokens, (q_heads + 2 * kv_heads) * head_dim]` row-major (queries, keys, values,
/// heads side by side, RoPE already applied). Token `i` of a sequence attends to tokens
/// `max(0, i - window + 1)..=i` of the same sequence: the causal mask and the padding mask of a
/// padded batch, done by not visiting anything else. Returns the context,
/// `[tokens, q_heads * head_dim]`.
pub fn packed_causal_attention(
    qkv: &[f32],
    batch: &PackedBatch,
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        q_heads,
        kv_heads,
        head_dim,
        window,
    } = shape;
    let width = (q_heads + 2 * kv_heads) * head_dim;
    let (k_offset, v_offset) = (q_heads * head_dim, (q_heads + kv_heads) * head_dim);
    let group = q_heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut start_of_row = Vec::with_capacity(batch.tokens());
    for s in 0..batch.sequences() {
        start_of_row.extend(std::iter::repeat_n(batch.offsets[s], batch.len_of(s)));
    }
    let out_width = q_heads * head_dim;
    let mut context = vec![0f32; batch.tokens() * out_width];
    context.par_chunks_mut(out_width).enumerate().for_each_init(
        || vec![0f32; batch.max_len()],
        |scores, (row, out)| {
            let start = start_of_row[row];
            let first = match window {
                Some(window) => start.max((row + 1).saturating_sub(window)),
                None => start,
            };
            let keys = first..=row;
            let scores = &mut scores[..keys.clone().count()];
            for head in 0..q_heads {
                let kv_head = head / group;
                let q = &qkv[row * width + head * head_dim..][..head_dim];
                let mut max = f32::NEG_INFINITY;
                for (score, key) in scores.iter_mut().zip(keys.clone()) {
                    let k = &qkv[key * width + k_offset + kv_head * head_dim..][..head_dim];
                    *score = dot(q, k) * scale;
                    max = max.max(*score);
                }
                let mut sum = 0.0;
                for score in scores.iter_mut() {
                    *score = exp(*score - max);
                    sum += *score;
                }
                let out = &mut out[head * head_dim..][..head_dim];
                out.fill(0.0);
                for (&p, key) in scores.iter().zip(keys.clone()) {
                    let v = &qkv[key * width + v_offset + kv_head * head_dim..][..head_dim];
                    let p = p / sum;
                    out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                }
            }
        },
    );
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Attention written out the slow way: per sequence, per head, full score rows with the
    /// causal and window masks as -inf.
    fn naive_attention(qkv: &[f32], batch: &PackedBatch, shape: AttentionShape) -> Vec<f32> {
        let AttentionShape {
            q_heads,
            kv_heads,
            head_dim: d,
            window,
        } = shape;
        let width = (q_heads + 2 * kv_heads) * d;
        let mut out = vec![0f32; batch.tokens() * q_heads * d];
        for s in 0..batch.sequences() {
            let (start, len) = (batch.offsets[s], batch.len_of(s));
            for h in 0..q_heads {
                let kv = h / (q_heads / kv_heads);
                for i in 0..len {
                    let q = &qkv[(start + i) * width + h * d..][..d];
                    let scores: Vec<f32> = (0..len)
                        .map(|j| {
                            let visible = j <= i && window.is_none_or(|w| j + w > i);
                            if !visible {
                                return f32::NEG_INFINITY;
                            }
                            let k = &qkv[(start + j) * width + (q_heads + kv) * d..][..d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = weights.iter().sum();
                    for (j, w) in weights.iter().enumerate() {
                        let v = &qkv[(start + j) * width + (q_heads + kv_heads + kv) * d..][..d];
                        for t in 0..d {
                            out[(start + i) * q_heads * d + h * d + t] += w / sum * v[t];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn causal_gqa_attention_matches_the_masked_definition() {
        let batch = PackedBatch::new(&[vec![0; 7], vec![0; 1], vec![0; 12]]);
        for (q_heads, kv_heads, window) in [(4, 4, None), (6, 3, Some(5)), (8, 2, Some(1))] {
            let shape = AttentionShape {
                q_heads,
                kv_heads,
                head_dim: 8,
                window,
            };
            let qkv = random(batch.tokens() * (q_heads + 2 * kv_heads) * 8, 5);
            let fast = packed_causal_attention(&qkv, &batch, shape);
            let slow = naive_attention(&qkv, &batch, shape);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-5, "{shape:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_token_never_sees_later_tokens_or_other_sequences() {
        // Changing the last token of the first sequence, and all of the second, must leave every
        // earlier row of the first sequence as it was.
        let shape = AttentionShape {
            q_heads: 2,
            kv_heads: 1,
            head_dim: 4,
            window: None,
        };
        let width = 4 * 4;
        let batch = PackedBatch::new(&[vec![0; 5], vec![0; 3]]);
        let qkv = random(8 * width, 9);
        let mut changed = qkv.clone();
        changed[4 * width..].iter_mut().for_each(|v| *v += 1.0);
        let (a, b) = (
            packed_causal_attention(&qkv, &batch, shape),
            packed_causal_attention(&changed, &batch, shape),
        );
        assert_eq!(a[..4 * 8], b[..4 * 8]);
        assert_ne!(a[4 * 8..5 * 8], b[4 * 8..5 * 8]);
    }

    #[test]
    fn rope_rotates_halves_and_leaves_position_zero_and_values_alone() {
        let (q_heads, kv_heads, head_dim) = (1, 1, 4);
        let batch = PackedBatch::new(&[vec![0; 2]]);
        let table = RopeTable::new(2, head_dim, 10_000.0);
        let mut qkv = random(2 * 3 * head_dim, 3);
        let before = qkv.clone();
        apply_rope(&mut qkv, &batch, &table, q_heads, kv_heads);
        assert_eq!(qkv[..12], before[..12], "position 0 is the identity");
        assert_eq!(qkv[20..], before[20..], "values are not rotated");
        // Position 1, frequency 0 (angle 1 rad) pairs dimension 0 with dimension 2.
        let (x1, x2) = (before[12], before[14]);
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((qkv[12] - (x1 * c - x2 * s)).abs() < 1e-6);
        assert!((qkv[14] - (x2 * c + x1 * s)).abs() < 1e-6);
        // Rotations keep each pair's length.
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((norm(&qkv[16..20]) - norm(&before[16..20])).abs() < 1e-5);
    }

    #[test]
    fn rms_norm_and_swiglu_match_their_definitions() {
        let x = [1.0, -2.0, 3.0, 0.5];
        let out = rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 1e-6);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
        assert!((out[1] - 2.0 * -2.0 / rms).abs() < 1e-6, "{out:?}");
        let gate_up = [1.0, -3.0, 2.0, 0.5];
        let out = silu_mul(&gate_up, 2);
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert!((out[0] - silu(1.0) * 2.0).abs() < 1e-6);
        assert!((out[1] - silu(-3.0) * 0.5).abs() < 1e-6);
    }
}
