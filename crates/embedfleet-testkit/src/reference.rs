//! The reference-embeddings fixture: vectors sentence-transformers produced on the real minilm
//! and mpnet checkpoints (`scripts/make-reference-fixtures.py`). The model tests compare against
//! it; the fusion tests use its vectors as real partials. One loader, so the two never disagree
//! about the file's layout.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole fixture file.
#[derive(Debug, Deserialize)]
pub struct ReferenceFixture {
    pub inputs: Vec<String>,
    pub models: HashMap<String, ReferenceModel>,
}

/// One model's reference output, one entry per input.
#[derive(Debug, Deserialize)]
pub struct ReferenceModel {
    pub dim: usize,
    pub max_seq_length: usize,
    /// Tokens after truncation, special tokens included.
    pub token_counts: Vec<usize>,
    /// L2-normalised vectors.
    pub embeddings: Vec<Vec<f32>>,
}

/// Where the fixture lives in the repository.
pub fn reference_fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../embedfleet-models/tests/fixtures/reference_embeddings.json")
}

/// Loads the fixture; panics with the path on failure (it is committed, so a failure is a bug).
pub fn reference_fixture() -> ReferenceFixture {
    let path = reference_fixture_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the reference fixture is committed)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
