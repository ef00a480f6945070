//! Shared inputs for the benches, so every bench (and the Python side of the side-by-side
//! comparison) measures the same sentences and the same checkpoints.

use std::path::PathBuf;

/// The benches package directory (`benches/`).
pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `benches/data/sentences.txt`: short varied English sentences, one per line. The Python
/// benchmark (`scripts/bench-sentence-transformers.py`) reads the same file.
pub fn sentences() -> Vec<String> {
    let path = bench_dir().join("data/sentences.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect()
}

/// Where the real checkpoints are: `$EMBEDFLEET_MODELS_DIR`, else the repo's `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bench_dir().join("../models"))
}

/// Deterministic values in [-1, 1) (splitmix64 of `seed`): bench inputs whose values do not
/// matter, only that every run sees the same ones.
pub fn pseudo_random(count: usize, seed: u64) -> Vec<f32> {
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

/// A deterministic unit-norm vector of `dim` values: stands in for a fused embedding where only
/// its size and bytes matter (the cache benches).
pub fn unit_vector(dim: usize, seed: u64) -> Vec<f32> {
    let mut vector = pseudo_random(dim, seed);
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}
