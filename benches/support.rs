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
