//! Deterministic, distance-preserving initialisation of a FuseMoE layer (Han et al., 2024,
//! "FuseMoE: Mixture-of-Experts Transformers for Fleximodal Fusion") from a seed, so every node
//! without a weights file computes the same weights, bit for bit.
//!
//! # Why the experts are not random MLPs
//!
//! An untrained random MLP scrambles the geometry of its input, so fused vectors would not keep
//! the cosine order of the partials. Instead every expert starts from one shared linear map
//! `M` (input → output, a near-isometry) plus a small per-expert perturbation ("sparse
//! upcycling"), and the MLP computes `M·x` exactly despite its GELU, through the identity
//! `gelu(z) − gelu(−z) = z`:
//!
//! ```text
//! fc1 = [ R ; −R ]   (hidden/2 rows each)      fc2 = [ S , −S ]      with  S·R = M
//! fc2 · gelu(fc1 · x) = S·gelu(R·x) − S·gelu(−R·x) = S·R·x = M·x
//! ```
//!
//! The gate weights of the chosen experts sum to 1, so the fused vector is `M·x` up to the
//! perturbations, and cosines between fused vectors are those between the inputs `x`: exactly
//! when `input_dim ≤ min(hidden/2, output)` (`R` and `M` are then isometries; the two-model
//! case, 1,152 → 1,536), and in the Johnson–Lindenstrauss sense when the input is wider (all
//! twelve models, 13,184 → 1,536). Training moves away from this start.
//!
//! # How `R`, `S` and `M` are built
//!
//! From `MixingTransform`s: seeded orthogonal operators on `ℝⁿ` made of rounds of random
//! sign flips, a random permutation and block Walsh–Hadamard transforms (block sizes are the
//! binary digits of `n`, so any `n` works). Rows and columns of such an operator are
//! orthonormal, they cost `O(n log n)` to produce, and they use only additions,
//! multiplications and square roots in a fixed order, so they are the same on every platform.
//! Random numbers come from ChaCha8 keyed by the seed, with one stream per tensor.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::{FuseMoeConfig, GatingKind};
use crate::expert::ExpertWeights;
use crate::gate::GateWeights;

/// Settings of the initialisation that are not part of the layer's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct InitOptions {
    /// Per-expert perturbation of the shared map, as a fraction of the typical weight size.
    /// Zero would make all experts identical (training could not tell them apart); larger
    /// values blur the distance preservation.
    pub expert_perturbation: f32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            expert_perturbation: 0.02,
        }
    }
}

/// Stream ids: one per tensor family, experts offset by their index.
const STREAM_R: u64 = 1;
const STREAM_M: u64 = 2;
const STREAM_S: u64 = 3;
const STREAM_GATE: u64 = 4;
const STREAM_EXPERTS: u64 = 1 << 32;

/// Builds the gate and experts for `cfg` (already validated) from `seed`.
pub(crate) fn initialize(
    cfg: &FuseMoeConfig,
    seed: u64,
    options: &InitOptions,
) -> (GateWeights, Vec<ExpertWeights>) {
    let gate = init_gate(cfg, seed);
    let (r, s) = shared_factors(cfg, seed);
    let experts = (0..cfg.num_experts)
        .into_par_iter()
        .map(|e| upcycled_expert(cfg, &r, &s, seed, e as u64, options))
        .collect();
    (gate, experts)
}

/// The keyed stream for one tensor family.
pub(crate) fn stream(seed: u64, id: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(b"FuseMoE1");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(id);
    rng
}

/// Uniform in `[-bound, bound)`, from 24 random bits, exactly representable.
fn uniform(rng: &mut ChaCha8Rng, bound: f32) -> f32 {
    let unit = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
    (2.0 * unit - 1.0) * bound
}

fn init_gate(cfg: &FuseMoeConfig, seed: u64) -> GateWeights {
    let mut rng = stream(seed, STREAM_GATE);
    let in_dim = cfg.gate_input_dim();
    let hidden = cfg.gate_hidden;
    // PyTorch's nn.Linear default: U(±1/√fan_in) for weight and bias.
    let proj_bound = 1.0 / (in_dim as f32).sqrt();
    let proj_weight = (0..hidden * in_dim)
        .map(|_| uniform(&mut rng, proj_bound))
        .collect();
    let proj_bias = (0..hidden).map(|_| uniform(&mut rng, proj_bound)).collect();
    // Laplace centroids live in the space of the LayerNorm+GELU output, whose entries are O(1):
    // centroids of that size make the untrained gate's distances, and so its routing, differ
    // between experts instead of being uniform.
    let router_bound = match cfg.gating {
        GatingKind::Softmax => 1.0 / (hidden as f32).sqrt(),
        GatingKind::Laplace => 1.0,
    };
    let router_weight = (0..cfg.num_experts * hidden)
        .map(|_| uniform(&mut rng, router_bound))
        .collect();
    let router_bias = match cfg.gating {
        GatingKind::Softmax => Some(vec![0.0; cfg.num_experts]),
        GatingKind::Laplace => None,
    };
    GateWeights {
        proj_weight,
        proj_bias,
        norm_weight: vec![1.0; hidden],
        norm_bias: vec![0.0; hidden],
        router_weight,
        router_bias,
    }
}

/// The shared factors `R` (`half × input_dim`, row-major) and `S` (`output × half`) with
/// `S·R = M` ([`target_map_columns`]), where `half = expert_hidden / 2`.
pub(crate) fn shared_factors(cfg: &FuseMoeConfig, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let d = cfg.input_dim();
    let half = cfg.expert_hidden / 2;
    let out = cfg.output_dim;
    let mut r = vec![0.0f32; half * d];
    let mut s = vec![0.0f32; out * half];
    if half == 0 {
        return (r, s);
    }
    if d <= half {
        // R = first d columns of U_half: orthonormal columns, RᵀR = I. S = M·Rᵀ, so
        // S·R = M·RᵀR = M; row o of S is U_half · pad(M row o).
        let u_half = MixingTransform::new(half, &mut stream(seed, STREAM_R));
        r.par_chunks_mut(d).enumerate().for_each(|(a, row)| {
            copy_rounded(&u_half.row(a)[..d], row);
        });
        let m = target_map_columns(cfg, seed);
        s.par_chunks_mut(half).enumerate().for_each(|(o, row)| {
            let mut padded = vec![0.0f64; half];
            for (p, column) in padded.iter_mut().zip(&m) {
                *p = column[o];
            }
            u_half.apply(&mut padded);
            copy_rounded(&padded, row);
        });
    } else if half >= out {
        // R = V·[M; 0] and S = [I, 0]·Vᵀ with V = U_half orthogonal: S·R = [I, 0]·[M; 0] = M.
        // V only spreads M over all hidden units, so none of them starts out special.
        let v = MixingTransform::new(half, &mut stream(seed, STREAM_R));
        let m = target_map_columns(cfg, seed);
        let r_columns: Vec<Vec<f64>> = m
            .par_iter()
            .map(|column| {
                let mut padded = vec![0.0f64; half];
                padded[..out].copy_from_slice(column);
                v.apply(&mut padded);
                padded
            })
            .collect();
        r.par_chunks_mut(d).enumerate().for_each(|(a, row)| {
            for (x, column) in row.iter_mut().zip(&r_columns) {
                *x = column[a] as f32;
            }
        });
        s.par_chunks_mut(half).enumerate().for_each(|(o, row)| {
            let mut unit = vec![0.0f64; half];
            unit[o] = 1.0;
            v.apply(&mut unit);
            copy_rounded(&unit, row);
        });
    } else {
        // Hidden narrower than both input and output (no default shape does this): R is a
        // Johnson–Lindenstrauss projection to `half`, S an isometric embedding of it.
        let u_d = MixingTransform::new(d, &mut stream(seed, STREAM_R));
        let scale = (d as f64 / half as f64).sqrt();
        r.par_chunks_mut(d).enumerate().for_each(|(a, row)| {
            let full: Vec<f64> = u_d.row(a).iter().map(|v| v * scale).collect();
            copy_rounded(&full, row);
        });
        let u_out = MixingTransform::new(out, &mut stream(seed, STREAM_S));
        s.par_chunks_mut(half).enumerate().for_each(|(o, row)| {
            copy_rounded(&u_out.row(o)[..half], row);
        });
    }
    (r, s)
}

/// The map every expert starts as, `M` (`output × input_dim`), as its columns:
///
/// - input no wider than the output: the first `input_dim` columns of a seeded orthogonal
///   `U_out`, an exact isometry, so cosines are kept exactly (the two-model case);
/// - wider (twelve models, 13,184 → 1,536): no linear map keeps every cosine, so each slot
///   gets its own isometric embedding into the output (a Johnson–Lindenstrauss projection for
///   a slot wider than the output, e5-mistral's 4,096), from its own seed. Then the cosine
///   between two rows' own-slot terms is exact and only cross-slot terms add noise
///   (≈ 1/√output each), about half the distortion of one projection of the whole row.
fn target_map_columns(cfg: &FuseMoeConfig, seed: u64) -> Vec<Vec<f64>> {
    let (d, out) = (cfg.input_dim(), cfg.output_dim);
    let unit_columns = |u: &MixingTransform, n: usize, count: usize, scale: f64| {
        (0..count)
            .into_par_iter()
            .map(|j| {
                let mut e = vec![0.0f64; n];
                e[j] = 1.0;
                u.apply(&mut e);
                e.truncate(out);
                e.iter_mut().for_each(|x| *x *= scale);
                e
            })
            .collect::<Vec<_>>()
    };
    if d <= out {
        let u_out = MixingTransform::new(out, &mut stream(seed, STREAM_M));
        return unit_columns(&u_out, out, d, 1.0);
    }
    let mut columns = Vec::with_capacity(d);
    for (slot, &width) in cfg.input_dims.iter().enumerate() {
        let slot_stream = STREAM_M + ((slot as u64 + 1) << 16);
        let n = width.max(out);
        let u = MixingTransform::new(n, &mut stream(seed, slot_stream));
        // Rows of U_n are orthonormal: keeping `out` of them and scaling by √(n/out) keeps
        // norms on average; with n = out this is an exact isometry.
        columns.extend(unit_columns(&u, n, width, (n as f64 / out as f64).sqrt()));
    }
    columns
}

fn copy_rounded(from: &[f64], to: &mut [f32]) {
    for (t, &f) in to.iter_mut().zip(from) {
        *t = f as f32;
    }
}

/// Expert `e`: `fc1 = [R; −R]`, `fc2 = [S, −S]`, each entry perturbed by a uniform amount
/// scaled to the factor's typical entry; zero biases. An odd `expert_hidden` leaves its last
/// hidden unit at zero.
fn upcycled_expert(
    cfg: &FuseMoeConfig,
    r: &[f32],
    s: &[f32],
    seed: u64,
    e: u64,
    options: &InitOptions,
) -> ExpertWeights {
    let d = cfg.input_dim();
    let hidden = cfg.expert_hidden;
    let half = hidden / 2;
    let out = cfg.output_dim;
    let mut rng = stream(seed, STREAM_EXPERTS + e);
    // Uniform(±b) has standard deviation b/√3; scale so the noise is `perturbation` times
    // the factor's root-mean-square entry.
    let r_bound = options.expert_perturbation * rms(r) * 3f32.sqrt();
    let s_bound = options.expert_perturbation * rms(s) * 3f32.sqrt();

    let mut fc1_weight = vec![0.0f32; hidden * d];
    for (unit, row) in fc1_weight.chunks_exact_mut(d).take(2 * half).enumerate() {
        let base = &r[(unit % half) * d..(unit % half + 1) * d];
        let sign = if unit < half { 1.0 } else { -1.0 };
        for (w, &b) in row.iter_mut().zip(base) {
            *w = sign * b + uniform(&mut rng, r_bound);
        }
    }
    let mut fc2_weight = vec![0.0f32; out * hidden];
    for (o, row) in fc2_weight.chunks_exact_mut(hidden).enumerate() {
        let base = &s[o * half..(o + 1) * half];
        for (unit, w) in row.iter_mut().take(2 * half).enumerate() {
            let sign = if unit < half { 1.0 } else { -1.0 };
            *w = sign * base[unit % half] + uniform(&mut rng, s_bound);
        }
    }
    ExpertWeights {
        fc1_weight,
        fc1_bias: vec![0.0; hidden],
        fc2_weight,
        fc2_bias: vec![0.0; out],
    }
}

fn rms(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let sum: f64 = values.iter().map(|&v| v as f64 * v as f64).sum();
    (sum / values.len() as f64).sqrt() as f32
}

/// A seeded orthogonal operator `U` on `ℝⁿ`: [`ROUNDS`] rounds of sign flips, a permutation
/// and block Walsh–Hadamard transforms.
pub(crate) struct MixingTransform {
    n: usize,
    rounds: Vec<MixingRound>,
}

/// Rounds of mixing; three spread every coordinate over all blocks for any `n`.
const ROUNDS: usize = 3;

struct MixingRound {
    /// ±1 per coordinate.
    signs: Vec<f64>,
    /// `out[i] = in[permutation[i]]`.
    permutation: Vec<usize>,
    /// `(offset, size)` of each power-of-two Hadamard block.
    blocks: Vec<(usize, usize)>,
}

impl MixingTransform {
    pub(crate) fn new(n: usize, rng: &mut ChaCha8Rng) -> Self {
        let rounds = (0..ROUNDS)
            .map(|round| {
                let signs = (0..n)
                    .map(|_| if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 })
                    .collect();
                let mut permutation: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    // Multiply-shift bounded integer: at most 2⁻⁴⁰ bias for n < 2²⁴, and
                    // the same on every platform.
                    let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
                    permutation.swap(i, j);
                }
                // Binary digits of n, largest first; odd rounds reversed so block edges move.
                let mut sizes: Vec<usize> = (0..usize::BITS)
                    .rev()
                    .map(|bit| 1usize << bit)
                    .filter(|&size| n & size != 0)
                    .collect();
                if round % 2 == 1 {
                    sizes.reverse();
                }
                let mut offset = 0;
                let blocks = sizes
                    .into_iter()
                    .map(|size| {
                        let block = (offset, size);
                        offset += size;
                        block
                    })
                    .collect();
                MixingRound {
                    signs,
                    permutation,
                    blocks,
                }
            })
            .collect();
        MixingTransform { n, rounds }
    }

    /// `v ← U·v`.
    pub(crate) fn apply(&self, v: &mut [f64]) {
        debug_assert_eq!(v.len(), self.n);
        let mut scratch = vec![0.0f64; self.n];
        for round in &self.rounds {
            for (x, s) in v.iter_mut().zip(&round.signs) {
                *x *= s;
            }
            for (o, &p) in scratch.iter_mut().zip(&round.permutation) {
                *o = v[p];
            }
            v.copy_from_slice(&scratch);
            for &(offset, size) in &round.blocks {
                hadamard(&mut v[offset..offset + size]);
            }
        }
    }

    /// `v ← Uᵀ·v` (the inverse).
    pub(crate) fn apply_transpose(&self, v: &mut [f64]) {
        debug_assert_eq!(v.len(), self.n);
        let mut scratch = vec![0.0f64; self.n];
        for round in self.rounds.iter().rev() {
            for &(offset, size) in &round.blocks {
                hadamard(&mut v[offset..offset + size]);
            }
            for (x, &p) in v.iter().zip(&round.permutation) {
                scratch[p] = *x;
            }
            for ((x, s), &y) in v.iter_mut().zip(&round.signs).zip(&scratch) {
                *x = y * s;
            }
        }
    }

    /// Row `i` of `U` (as `Uᵀ·eᵢ`).
    pub(crate) fn row(&self, i: usize) -> Vec<f64> {
        let mut v = vec![0.0f64; self.n];
        v[i] = 1.0;
        self.apply_transpose(&mut v);
        v
    }
}

/// Orthonormal Walsh–Hadamard transform in place (`len` a power of two); symmetric and its own
/// inverse.
fn hadamard(v: &mut [f64]) {
    let n = v.len();
    let mut half = 1;
    while half < n {
        for start in (0..n).step_by(2 * half) {
            for i in start..start + half {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a + b;
                v[i + half] = a - b;
            }
        }
        half *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    for x in v.iter_mut() {
        *x *= scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn mixing_transform_is_orthogonal_for_any_size() {
        for n in [1, 6, 13, 64, 100] {
            let u = MixingTransform::new(n, &mut stream(7, 9));
            let rows: Vec<Vec<f64>> = (0..n).map(|i| u.row(i)).collect();
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot(&rows[i], &rows[j]) - want).abs() < 1e-12, "n {n}");
                }
            }
            // apply is U: (U·e_j)_i = U[i][j].
            let mut e = vec![0.0; n];
            e[n - 1] = 1.0;
            u.apply(&mut e);
            for i in 0..n {
                assert!((e[i] - rows[i][n - 1]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn mixing_spreads_every_coordinate() {
        let u = MixingTransform::new(100, &mut stream(1, 1));
        let row = u.row(0);
        let nonzero = row.iter().filter(|v| v.abs() > 1e-9).count();
        assert!(
            nonzero > 50,
            "row 0 touches only {nonzero} of 100 coordinates"
        );
    }

    /// `MᵀM` for the composed map `M = S·R` (`d × d`, row-major).
    fn gram_of_composed_map(cfg: &FuseMoeConfig) -> Vec<f64> {
        let (r, s) = shared_factors(cfg, 3);
        let (d, half, out) = (cfg.input_dim(), cfg.expert_hidden / 2, cfg.output_dim);
        let mut m = vec![0.0f64; out * d];
        for o in 0..out {
            for b in 0..d {
                m[o * d + b] = (0..half)
                    .map(|a| s[o * half + a] as f64 * r[a * d + b] as f64)
                    .sum();
            }
        }
        let mut gram = vec![0.0f64; d * d];
        for b in 0..d {
            for c in 0..d {
                gram[b * d + c] = (0..out).map(|o| m[o * d + b] * m[o * d + c]).sum();
            }
        }
        gram
    }

    /// The upcycled MLP computes S·R·x: with the input narrower than the output, S·R must be
    /// an exact isometry.
    #[test]
    fn shared_factors_compose_to_an_isometry_when_the_input_is_narrow() {
        let cfg = FuseMoeConfig {
            expert_hidden: 64,
            output_dim: 40,
            ..FuseMoeConfig::for_input_dims(vec![10, 14])
        };
        let gram = gram_of_composed_map(&cfg);
        for b in 0..24 {
            for c in 0..24 {
                let want = if b == c { 1.0 } else { 0.0 };
                let g = gram[b * 24 + c];
                assert!((g - want).abs() < 1e-5, "MᵀM[{b}][{c}] = {g}");
            }
        }
    }

    /// Inputs wider than both the hidden layer and the output: each slot on its own is still
    /// embedded isometrically; only cross-slot blocks of MᵀM are non-zero.
    #[test]
    fn each_slot_is_embedded_isometrically_when_the_input_is_wide() {
        let cfg = FuseMoeConfig {
            expert_hidden: 40,
            output_dim: 16,
            ..FuseMoeConfig::for_input_dims(vec![10, 14, 9])
        };
        let gram = gram_of_composed_map(&cfg);
        let d = 33;
        let slot_of = |i: usize| {
            if i < 10 {
                0
            } else if i < 24 {
                1
            } else {
                2
            }
        };
        let mut cross = 0.0f64;
        for b in 0..d {
            for c in 0..d {
                let g = gram[b * d + c];
                if slot_of(b) == slot_of(c) {
                    let want = if b == c { 1.0 } else { 0.0 };
                    assert!((g - want).abs() < 1e-5, "MᵀM[{b}][{c}] = {g}");
                } else {
                    cross = cross.max(g.abs());
                }
            }
        }
        assert!(
            cross > 1e-3,
            "33 inputs cannot all be orthogonal in 16 outputs"
        );
    }

    #[test]
    fn initialisation_is_reproducible_and_seed_dependent() {
        let cfg = FuseMoeConfig {
            num_experts: 3,
            expert_hidden: 16,
            output_dim: 8,
            gate_hidden: 8,
            ..FuseMoeConfig::for_input_dims(vec![5, 7])
        };
        let a = initialize(&cfg, 11, &InitOptions::default());
        let b = initialize(&cfg, 11, &InitOptions::default());
        let c = initialize(&cfg, 12, &InitOptions::default());
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
        assert_ne!(a.1, c.1);
        assert_ne!(a.1[0], a.1[1], "experts must differ by their perturbations");
    }
}
