//! CPU kernels for the encoder layers: bias fused into the matrix product, GELU and softmax
//! without libm calls so they vectorise, residual add fused into LayerNorm.
//!
//! Why not candle's tensor ops on CPU: each op is a separate pass over memory with its own
//! allocation, element-wise ops run on a second spin-waiting thread pool next to rayon's, and
//! `gelu_erf`/`exp` call scalar libm. Profiling minilm at batch 32 put more time in those than in
//! the matrix products. Here a layer is three passes plus its products, all on rayon's pool.

use rayon::prelude::*;

/// `out[rows, n] = x[rows, k] · w + bias`, with `w` row-major `[k, n]`: the transpose of how
/// checkpoints store it, made once at load. In this layout gemm streams the weights as they lie;
/// in the checkpoint's it repacks all of them on every call, which at a few rows (one sentence)
/// cost three times the arithmetic (mpnet, one sentence: 209 ms before, see docs/benchmarks.md).
pub fn linear(x: &[f32], rows: usize, k: usize, w: &[f32], bias: &[f32]) -> Vec<f32> {
    let n = bias.len();
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), n * k);
    let mut out = Vec::with_capacity(rows * n);
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    if rows == 0 {
        return out;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover exactly the described matrices: out is rows×n (row stride n),
    // x is rows×k (row stride k), w is k×n (row stride n).
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    out
}

/// Dot product with the widest vector unit the CPU has.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature this function is compiled for was just detected.
            return unsafe { dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// 32 independent accumulators: two 16-lane vectors' worth, so the compiler can keep two FMA
/// chains in flight; the target-feature wrappers above pick the vector width. Attention calls
/// this once per (query, key, head).
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            acc[lane] = x[lane].mul_add(y[lane], acc[lane]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows per parallel task for element-wise work: large enough to amortise scheduling.
fn rows_per_task(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// `x = LayerNorm(x + residual)` row by row, in place.
pub fn add_layer_norm(x: &mut [f32], residual: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
    let width = weight.len();
    let chunk = rows_per_task(width) * width;
    x.par_chunks_mut(chunk)
        .zip(residual.par_chunks(chunk))
        .for_each(|(x, residual)| {
            for (row, residual) in x.chunks_exact_mut(width).zip(residual.chunks_exact(width)) {
                row.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
                layer_norm_row(row, weight, bias, eps);
            }
        });
}

/// `x = LayerNorm(x)` row by row, in place.
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let width = weight.len();
    x.par_chunks_mut(rows_per_task(width) * width)
        .for_each(|x| {
            x.chunks_exact_mut(width)
                .for_each(|row| layer_norm_row(row, weight, bias, eps));
        });
}

#[inline]
fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// T5's RMS LayerNorm of each row into a new buffer (the residual stream stays as it is):
/// `x / sqrt(mean(x²) + eps) * weight`, no mean subtracted, no bias.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = vec![0f32; x.len()];
    let chunk = rows_per_task(width) * width;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (out, row) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let inv = 1.0 / (mean_square + eps).sqrt();
                for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
                    *o = v * inv * w;
                }
            }
        });
    out
}

/// `x += y` element-wise, in parallel (the pre-norm residual connections).
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(16 * 1024)
        .zip(y.par_chunks(16 * 1024))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
}

/// The tanh approximation of GELU (`gelu_new`, T5 v1.1's gated feed-forward), with tanh built on
/// the vectorisable [`exp`].
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    // tanh(y) = 1 - 2 / (e^{2y} + 1); exp saturates cleanly at both ends.
    let tanh = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// Exact (erf) GELU in place, in parallel, with the widest vector unit the CPU has.
pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(16 * 1024).for_each(gelu_erf_chunk);
}

fn gelu_erf_chunk(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features this function is compiled for were just detected.
        unsafe { gelu_erf_avx2(x) };
        return;
    }
    gelu_erf_portable(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_erf_avx2(x: &mut [f32]) {
    gelu_erf_portable(x)
}

#[inline(always)]
fn gelu_erf_portable(x: &mut [f32]) {
    x.iter_mut()
        .for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), branch-free so it vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// e^x for x in roughly [-87, 88], relative error ~2e-7; no libm call, so loops over it
/// vectorise. Range reduction to 2^n · e^r with |r| ≤ ln2/2, then a degree-6 polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a rounding call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}) = {got}, libm {want}"
            );
        }
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = libm_erf(x as f64) as f32;
            assert!(
                (erf(x) - want).abs() < 3e-7,
                "erf({x}) = {}, reference {want}",
                erf(x)
            );
        }
    }

    /// erf by its Taylor series in f64: slow, but exact enough to check the fast one.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut sum, mut term, mut n) = (0.0, x, 0.0);
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn linear_adds_bias_to_the_product() {
        // x: 2×3, w: 3×2 (k=3, n=2)
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.5, 0.0, 0.5, -1.0, 0.5];
        let out = linear(&x, 2, 3, &w, &[10.0, 20.0]);
        assert_eq!(out, [10.0 - 2.0, 20.0 + 3.0, 10.0 - 2.0, 20.0 + 7.5]);
    }

    #[test]
    fn fused_layer_norm_normalises_the_sum() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        add_layer_norm(&mut x, &[1.0, 1.0, 1.0, 1.0], &[1.0; 4], &[0.0; 4], 0.0);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{x:?}");
    }

    #[test]
    fn rms_norm_and_tanh_gelu_match_their_definitions() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0];
        let out = rms_norm(&x, &[1.0, 2.0, 0.5], 1e-6);
        for (row, out) in x.chunks(3).zip(out.chunks(3)) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 3.0 + 1e-6).sqrt();
            for ((v, o), w) in row.iter().zip(out).zip([1.0, 2.0, 0.5]) {
                assert!((v / rms * w - o).abs() < 1e-6, "{out:?}");
            }
        }
        for i in -600..600 {
            let v = i as f32 / 50.0;
            let want = 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh());
            assert!(
                (gelu_tanh(v) - want).abs() < 2e-6,
                "{v}: {} vs {want}",
                gelu_tanh(v)
            );
        }
    }

    #[test]
    fn gelu_matches_its_definition() {
        let mut x: Vec<f32> = (-300..300).map(|i| i as f32 / 50.0).collect();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| 0.5 * v * (1.0 + libm_erf(v as f64 / 2f64.sqrt()) as f32))
            .collect();
        gelu_erf(&mut x);
        for (got, want) in x.iter().zip(&want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
