//! The CPU matrix product behind every FuseMoE layer (Han et al., 2024, "FuseMoE:
//! Mixture-of-Experts Transformers for Fleximodal Fusion"): `out = x · Wᵀ + b` for a few rows
//! `x` against row-major PyTorch-layout weights `W` (`[out_features, in_features]`).
//!
//! Why hand-rolled rather than a general GEMM: FuseMoE's products are skinny. At batch 1 each
//! chosen expert is two matrix-vector products that stream ~241 MB of weights, and at batch 32
//! each expert still sees only ~8 rows, so the work is bound by how fast the weights stream
//! from memory, not by arithmetic. The kernel below reads each weight row once per block of
//! input rows and keeps the partial sums in registers (a 4×4 tile of 16-lane accumulators on
//! AVX-512), which is what a streaming read needs; `benches/fusemoe.rs` compares it with
//! candle's GEMM.
//!
//! Why a fixed summation order: every output element is the dot product of one input row
//! and one weight row, summed as 16 interleaved lanes (lane `l` takes the elements `k ≡ l mod
//! 16` with fused multiply-adds, in increasing `k`, a zero-padded tail last) and then a fixed
//! pairwise tree over the lanes. The AVX-512, AVX2 and portable paths all follow that order,
//! and no element's sum depends on the tiling, the batch it is in or the thread count, so a
//! row fused alone and the same row fused in a batch give the same bits, on every machine.

use rayon::prelude::*;

/// Lanes per accumulator; part of the numeric definition, not a tuning knob.
const LANES: usize = 16;
/// How far ahead of the loads (in floats) weights are prefetched.
const PREFETCH_AHEAD: usize = 512;

/// Computes `out[i][j] = Σ_k x[i][k] · weight[j][k] + bias[j]` for `rows` rows of `x` (row `i`
/// starts at `i * x_stride`, `in_features` wide) into `out` (`rows × out_features`, row-major),
/// on rayon's thread pool. Public so the benches can compare it with other matrix products.
///
/// # Panics
///
/// When the slice lengths do not match the dimensions (a caller bug, never input data).
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    x: &[f32],
    x_stride: usize,
    rows: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    out_features: usize,
    in_features: usize,
    out: &mut [f32],
) {
    assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + in_features);
    assert!(x_stride >= in_features);
    assert_eq!(weight.len(), out_features * in_features);
    assert_eq!(out.len(), rows * out_features);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_features);
    }
    if rows == 0 || out_features == 0 {
        return;
    }

    // Each task owns a block of weight rows and computes them for all input rows, so weights
    // are read once; results land transposed (`[out_features, rows]`) in disjoint slices.
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = (out_features / (threads * 8)).clamp(8, 256);
    let mut transposed = vec![0.0f32; out_features * rows];
    let isa = Isa::detect();
    transposed
        .par_chunks_mut(rows_per_task * rows)
        .enumerate()
        .for_each(|(task, out_block)| {
            let first = task * rows_per_task;
            let count = out_block.len() / rows;
            let w_block = &weight[first * in_features..(first + count) * in_features];
            isa.run_block(x, x_stride, rows, w_block, count, in_features, out_block);
        });

    for (i, out_row) in out.chunks_exact_mut(out_features).enumerate() {
        for (j, o) in out_row.iter_mut().enumerate() {
            let dot = transposed[j * rows + i];
            *o = match bias {
                Some(b) => dot + b[j],
                None => dot,
            };
        }
    }
}

/// Which instruction set the block kernel runs on; all give identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    #[allow(clippy::too_many_arguments)]
    fn run_block(
        self,
        x: &[f32],
        x_stride: usize,
        rows: usize,
        w_block: &[f32],
        w_rows: usize,
        k: usize,
        out_block: &mut [f32],
    ) {
        // SAFETY: the slices were bounds-checked by `linear_forward`, and each SIMD path is
        // only chosen after `detect` confirmed the CPU has its instructions.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::block_avx512(x, x_stride, rows, w_block, w_rows, k, out_block),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::block_avx2(x, x_stride, rows, w_block, w_rows, k, out_block),
                Isa::Portable => {
                    block::<Portable, 1, 1>(x, x_stride, rows, w_block, w_rows, k, out_block)
                }
            }
        }
    }
}

/// 16 f32 lanes held in whatever registers an instruction set has.
trait Lanes: Copy {
    unsafe fn zero() -> Self;
    /// Loads 16 consecutive floats (unaligned).
    unsafe fn load(ptr: *const f32) -> Self;
    /// `a · b + acc` per lane, rounded once.
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self;
    unsafe fn store(self, out: &mut [f32; LANES]);
    /// Hints that the cache line at `ptr` will be read soon; `ptr` may be out of bounds.
    #[inline(always)]
    unsafe fn prefetch(_ptr: *const f32) {}
}

/// Plain arrays with `f32::mul_add` (correctly rounded even where it is done in software).
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; LANES])
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(ptr as *const [f32; LANES]))
    }
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
        let mut r = acc.0;
        for l in 0..LANES {
            r[l] = a.0[l].mul_add(b.0[l], acc.0[l]);
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn store(self, out: &mut [f32; LANES]) {
        *out = self.0;
    }
}

/// The lane sum in a fixed pairwise order (8, 4, 2, 1 apart).
#[inline(always)]
fn reduce_lanes(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            v[l] += v[l + half];
        }
        half /= 2;
    }
    v[0]
}

/// Computes a `w_rows × rows` block of dot products (`out_block[j * rows + i]`), tiling
/// `JR` weight rows by `IR` input rows; edges fall back to smaller tiles.
#[inline(always)]
unsafe fn block<L: Lanes, const JR: usize, const IR: usize>(
    x: &[f32],
    x_stride: usize,
    rows: usize,
    w_block: &[f32],
    w_rows: usize,
    k: usize,
    out_block: &mut [f32],
) {
    let mut j = 0;
    while j < w_rows {
        let jr = if w_rows - j >= JR { JR } else { 1 };
        let mut i = 0;
        while i < rows {
            let ir = if rows - i >= IR { IR } else { 1 };
            let w = w_block.as_ptr().add(j * k);
            let xp = x.as_ptr().add(i * x_stride);
            let out = &mut out_block[j * rows + i..];
            match (jr == JR, ir == IR) {
                (true, true) => tile::<L, JR, IR>(xp, x_stride, w, k, out, rows),
                (true, false) => tile::<L, JR, 1>(xp, x_stride, w, k, out, rows),
                (false, true) => tile::<L, 1, IR>(xp, x_stride, w, k, out, rows),
                (false, false) => tile::<L, 1, 1>(xp, x_stride, w, k, out, rows),
            }
            i += ir;
        }
        j += jr;
    }
}

/// One register tile: `JR` weight rows × `IR` input rows, each a full-length dot product.
/// Results go to `out[jj * out_stride + ii]`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexes keep the register tile's shape visible
unsafe fn tile<L: Lanes, const JR: usize, const IR: usize>(
    x: *const f32,
    x_stride: usize,
    w: *const f32,
    k: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let mut acc = [[L::zero(); IR]; JR];
    let full = k / LANES;
    for c in 0..full {
        let offset = c * LANES;
        let mut wv = [L::zero(); JR];
        for (jj, wv) in wv.iter_mut().enumerate() {
            *wv = L::load(w.add(jj * k + offset));
            // Weights come from memory: ask for them early enough that the loads overlap
            // the arithmetic (with several input rows the hardware prefetcher falls behind).
            L::prefetch(w.wrapping_add(jj * k + offset + PREFETCH_AHEAD));
        }
        for ii in 0..IR {
            let xv = L::load(x.add(ii * x_stride + offset));
            for jj in 0..JR {
                acc[jj][ii] = L::fmadd(wv[jj], xv, acc[jj][ii]);
            }
        }
    }
    let tail = k - full * LANES;
    if tail > 0 {
        // Zero-padded lanes add 0·0, which leaves the sums as they are.
        let offset = full * LANES;
        let mut padded = [0.0f32; LANES];
        let mut wv = [L::zero(); JR];
        for (jj, wv) in wv.iter_mut().enumerate() {
            padded[..tail]
                .copy_from_slice(std::slice::from_raw_parts(w.add(jj * k + offset), tail));
            *wv = L::load(padded.as_ptr());
        }
        for ii in 0..IR {
            padded[..tail].copy_from_slice(std::slice::from_raw_parts(
                x.add(ii * x_stride + offset),
                tail,
            ));
            let xv = L::load(padded.as_ptr());
            for jj in 0..JR {
                acc[jj][ii] = L::fmadd(wv[jj], xv, acc[jj][ii]);
            }
        }
    }
    let mut lanes = [0.0f32; LANES];
    for jj in 0..JR {
        for ii in 0..IR {
            acc[jj][ii].store(&mut lanes);
            out[jj * out_stride + ii] = reduce_lanes(&lanes);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block, Lanes, LANES};
    use std::arch::x86_64::*;

    /// One zmm register.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes for Avx512 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(ptr: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(ptr))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, acc.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, out: &mut [f32; LANES]) {
            _mm512_storeu_ps(out.as_mut_ptr(), self.0)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn prefetch(ptr: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8)
        }
    }

    /// Two ymm registers: lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(ptr: *const f32) -> Self {
            Avx2(_mm256_loadu_ps(ptr), _mm256_loadu_ps(ptr.add(8)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, acc.0),
                _mm256_fmadd_ps(a.1, b.1, acc.1),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, out: &mut [f32; LANES]) {
            _mm256_storeu_ps(out.as_mut_ptr(), self.0);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), self.1);
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn prefetch(ptr: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8)
        }
    }

    /// 4×4 tiles: 16 accumulators + 4 weight vectors + 1 input vector of 32 zmm registers.
    /// A single input row (batch-1 GEMV) uses 8×1 tiles instead: eight weight rows stream at
    /// once, which kept ~10 % more bytes in flight than four in an A/B on this machine.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_avx512(
        x: &[f32],
        x_stride: usize,
        rows: usize,
        w_block: &[f32],
        w_rows: usize,
        k: usize,
        out_block: &mut [f32],
    ) {
        if rows == 1 {
            block::<Avx512, 8, 1>(x, x_stride, rows, w_block, w_rows, k, out_block)
        } else {
            block::<Avx512, 4, 4>(x, x_stride, rows, w_block, w_rows, k, out_block)
        }
    }

    /// 2×2 tiles: 8 accumulator pairs + 2 weight pairs of 16 ymm registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2(
        x: &[f32],
        x_stride: usize,
        rows: usize,
        w_block: &[f32],
        w_rows: usize,
        k: usize,
        out_block: &mut [f32],
    ) {
        block::<Avx2, 2, 2>(x, x_stride, rows, w_block, w_rows, k, out_block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0; rows * n];
        for i in 0..rows {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(count: usize, salt: u32) -> Vec<f32> {
        (0..count)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ salt) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_float64_reference_on_ragged_shapes() {
        for (rows, n, k) in [(1, 7, 5), (3, 13, 37), (9, 33, 130), (5, 300, 16)] {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let bias = values(n, 3);
            let mut out = vec![f32::NAN; rows * n];
            linear_forward(&x, k, rows, &w, Some(&bias), n, k, &mut out);
            let want = reference(&x, rows, &w, n, k);
            for (idx, (&got, want)) in out.iter().zip(want).enumerate() {
                let want = want + bias[idx % n] as f64;
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (k as f64).sqrt(),
                    "{rows}x{n}x{k}"
                );
            }
        }
    }

    #[test]
    fn each_row_gets_the_same_bits_alone_or_in_a_batch() {
        let (rows, n, k) = (11, 70, 203);
        let x = values(rows * k, 4);
        let w = values(n * k, 5);
        let mut batch = vec![0.0; rows * n];
        linear_forward(&x, k, rows, &w, None, n, k, &mut batch);
        for i in 0..rows {
            let mut single = vec![0.0; n];
            linear_forward(&x[i * k..(i + 1) * k], k, 1, &w, None, n, k, &mut single);
            assert_eq!(single, batch[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // One row takes the GEMV tiles, six the batch tiles.
        for rows in [1, 6] {
            let (n, k) = (19, 45);
            let x = values(rows * k, 6);
            let w = values(n * k, 7);
            let mut portable = vec![0.0; rows * n];
            Isa::Portable.run_block(&x, k, rows, &w, n, k, &mut portable);
            let detected = Isa::detect();
            let mut simd = vec![0.0; rows * n];
            detected.run_block(&x, k, rows, &w, n, k, &mut simd);
            assert_eq!(
                portable, simd,
                "{detected:?} differs from the portable path"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut avx2 = vec![0.0; rows * n];
                Isa::Avx2.run_block(&x, k, rows, &w, n, k, &mut avx2);
                assert_eq!(portable, avx2);
            }
        }
    }

    #[test]
    fn input_rows_may_have_a_stride() {
        let (rows, n, k, stride) = (3, 4, 20, 23);
        let x = values(rows * stride, 8);
        let w = values(n * k, 9);
        let mut strided = vec![0.0; rows * n];
        linear_forward(&x, stride, rows, &w, None, n, k, &mut strided);
        let packed: Vec<f32> = (0..rows)
            .flat_map(|i| x[i * stride..i * stride + k].to_vec())
            .collect();
        let mut dense = vec![0.0; rows * n];
        linear_forward(&packed, k, rows, &w, None, n, k, &mut dense);
        assert_eq!(strided, dense);
    }
}
