//! e5-mistral's decoder against transformers, on the small random checkpoints of
//! `tests/fixtures/checkpoints/mistral-*/e5-mistral/` (made with their reference vectors by
//! `scripts/fixtures/make_mistral.py`). Everything loads through `ModelRegistry`, as the fleet
//! loads it.

use std::path::{Path, PathBuf};

use embedfleet_models::{
    Device, EmbedOptions, EmbeddingModel, ModelError, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::{ErrorKind, InputType};
use serde::Deserialize;

/// GQA ratio 1, 2 (bf16, sharded, sliding window), 4 (explicit head_dim, `model.` prefix,
/// EOS added by the tokenizer's template).
const VARIANTS: [&str; 3] = [
    "mistral-mha",
    "mistral-gqa2-sharded",
    "mistral-gqa4-headdim",
];
const MIN_COSINE: f32 = 0.9999;

fn variant_dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/checkpoints")
        .join(variant)
}

#[derive(Deserialize)]
struct Reference {
    max_len: usize,
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
    #[serde(default)]
    instruction: Option<String>,
}

fn reference(variant: &str) -> Reference {
    let path = variant_dir(variant).join("e5-mistral/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn registry(models_dir: &Path) -> ModelRegistry {
    ModelRegistry::new(
        WeightResolver {
            models_dir: Some(models_dir.to_path_buf()),
            offline: true,
        },
        Device::Cpu,
    )
}

fn load(variant: &str) -> std::sync::Arc<dyn EmbeddingModel> {
    registry(&variant_dir(variant))
        .get("e5-mistral")
        .unwrap_or_else(|e| panic!("{variant}: {e}"))
}

fn texts(texts: &[&str]) -> Vec<ModelInput> {
    texts
        .iter()
        .map(|t| ModelInput::Text(t.to_string()))
        .collect()
}

fn query_options(instruction: Option<&str>) -> EmbedOptions {
    EmbedOptions {
        input_type: InputType::Query,
        instruction: instruction.map(str::to_string),
        ..EmbedOptions::default()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn every_variant_matches_transformers_on_documents_and_queries() {
    for variant in VARIANTS {
        let model = load(variant);
        let reference = reference(variant);
        // The width rule: a tiny checkpoint loads and reports its own width.
        assert_eq!(model.dim(), reference.dim, "{variant}");
        assert_ne!(
            model.dim(),
            model.spec().dim,
            "{variant} is narrower than e5-mistral"
        );

        let documents: Vec<&str> = reference
            .documents
            .iter()
            .map(|e| e.text.as_str())
            .collect();
        let got = model
            .embed_batch(&texts(&documents), &EmbedOptions::default())
            .unwrap();
        for (entry, got) in reference.documents.iter().zip(&got) {
            assert_eq!(got.tokens, entry.token_count, "{variant}: {:?}", entry.text);
            assert!(got.tokens <= reference.max_len);
            let cos = cosine(&got.vector, &entry.embedding);
            assert!(
                cos >= MIN_COSINE,
                "{variant}: cosine {cos} for {:?}",
                entry.text
            );
        }

        for entry in &reference.queries {
            let query = entry
                .query
                .as_deref()
                .expect("query entries name their query");
            let got = model
                .embed_batch(
                    &texts(&[query]),
                    &query_options(entry.instruction.as_deref()),
                )
                .unwrap();
            assert_eq!(
                got[0].tokens, entry.token_count,
                "{variant}: {:?}",
                entry.text
            );
            let cos = cosine(&got[0].vector, &entry.embedding);
            assert!(
                cos >= MIN_COSINE,
                "{variant}: cosine {cos} for {:?}",
                entry.text
            );
        }
    }
}

#[test]
fn a_packed_batch_gives_what_single_calls_give() {
    // The sliding-window variant: the long input runs past its window of 24 tokens.
    for variant in ["mistral-gqa2-sharded", "mistral-gqa4-headdim"] {
        let model = load(variant);
        let reference = reference(variant);
        let documents: Vec<&str> = reference
            .documents
            .iter()
            .map(|e| e.text.as_str())
            .collect();
        let options = EmbedOptions::default();
        let batch = model.embed_batch(&texts(&documents), &options).unwrap();
        for (text, packed) in documents.iter().zip(&batch) {
            let single = model.embed_batch(&texts(&[text]), &options).unwrap();
            let cos = cosine(&packed.vector, &single[0].vector);
            assert!(cos >= 0.99999, "{variant}: {cos} for {text:?}");
            assert_eq!(packed.tokens, single[0].tokens);
        }
    }
}

#[test]
fn vectors_are_deterministic_across_calls_and_loads() {
    let inputs = texts(&["The cat sat on the mat.", "东京是日本的首都", "a"]);
    let first = load("mistral-mha");
    let a = first
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    let b = first
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    let c = load("mistral-mha")
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a, c);
    for embedding in &a {
        let norm: f32 = embedding.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
}

#[test]
fn the_instruction_changes_query_vectors_only() {
    let model = load("mistral-gqa2-sharded");
    let inputs = texts(&["symptoms of the common cold"]);
    let embed = |options: EmbedOptions| model.embed_batch(&inputs, &options).unwrap()[0].clone();

    // Documents are plain text: an instruction does not reach them.
    let document = embed(EmbedOptions::default());
    let instructed_document = embed(EmbedOptions {
        instruction: Some("Represent the Science title:".into()),
        ..EmbedOptions::default()
    });
    assert_eq!(document, instructed_document);

    // Queries take the template, with the default task when none is given.
    let default_task = embed(query_options(None));
    let explicit_default = embed(query_options(Some(
        embedfleet_models::catalogue::E5_DEFAULT_QUERY_TASK,
    )));
    let blank = embed(query_options(Some("   ")));
    let science = embed(query_options(Some("Represent the Science title:")));
    assert_eq!(default_task, explicit_default);
    assert_eq!(
        default_task, blank,
        "a blank instruction means the default task"
    );
    assert!(cosine(&default_task.vector, &document.vector) < 0.999);
    assert!(cosine(&default_task.vector, &science.vector) < 0.999);
    assert!(default_task.tokens > document.tokens);
}

#[test]
fn bad_input_is_a_typed_error() {
    let model = load("mistral-mha");
    let max_len = reference("mistral-mha").max_len;

    let error = model
        .embed_batch(&texts(&["fine", "   "]), &query_options(None))
        .unwrap_err();
    assert!(
        matches!(error, ModelError::EmptyInput { index: 1 }),
        "{error:?}"
    );

    let long = "word ".repeat(2 * max_len);
    let strict = EmbedOptions {
        truncate: false,
        ..EmbedOptions::default()
    };
    let error = model.embed_batch(&texts(&[&long]), &strict).unwrap_err();
    assert!(
        matches!(error, ModelError::InputTooLong { index: 0, max, tokens, .. } if max == max_len && tokens > max_len),
        "{error:?}"
    );
    assert_eq!(error.kind(), ErrorKind::InputTooLong);
    // With truncation the same input is cut to the limit, EOS included.
    let cut = model
        .embed_batch(&texts(&[&long]), &EmbedOptions::default())
        .unwrap();
    assert_eq!(cut[0].tokens, max_len);

    let error = model
        .embed_batch(&texts(&["q"]), &query_options(Some(&long)))
        .unwrap_err();
    assert!(
        matches!(error, ModelError::InstructionTooLong { max, .. } if max == max_len),
        "{error:?}"
    );
    assert_eq!(error.kind().code(), 413);
    assert!(error.is_permanent_for_input());

    let image = ModelInput::Image {
        bytes: vec![1, 2, 3],
        format: None,
    };
    let error = model
        .embed_batch(&[image], &EmbedOptions::default())
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnsupportedModality, "{error:?}");
}

/// Copies a fixture variant into a temporary models directory for a test to damage.
fn copy_variant(variant: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let (from, to) = (
        variant_dir(variant).join("e5-mistral"),
        root.path().join("e5-mistral"),
    );
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    root
}

#[test]
fn a_shard_that_disagrees_with_config_json_is_named() {
    let root = copy_variant("mistral-gqa2-sharded");
    let config_path = root.path().join("e5-mistral/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = 200.into();
    std::fs::write(&config_path, config.to_string()).unwrap();

    let error = registry(root.path())
        .get("e5-mistral")
        .err()
        .expect("must fail");
    let ModelError::CorruptWeights { path, reason } = &error else {
        panic!("{error:?}")
    };
    let shard = path.file_name().unwrap().to_string_lossy();
    assert!(
        shard.starts_with("model-0000") && shard.ends_with(".safetensors"),
        "{shard}"
    );
    assert!(
        reason.contains("mlp") && reason.contains("config.json"),
        "{reason}"
    );
}

#[test]
fn a_missing_shard_or_tokenizer_and_a_bad_config_are_named() {
    let root = copy_variant("mistral-gqa2-sharded");
    let dir = root.path().join("e5-mistral");
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    let error = registry(root.path())
        .get("e5-mistral")
        .err()
        .expect("must fail");
    assert!(
        matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("model-00003-of-00004.safetensors")),
        "{error:?}"
    );

    let root = copy_variant("mistral-mha");
    let dir = root.path().join("e5-mistral");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let error = registry(root.path())
        .get("e5-mistral")
        .err()
        .expect("must fail");
    assert!(
        matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{error:?}"
    );

    let root = copy_variant("mistral-mha");
    let config_path = root.path().join("e5-mistral/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_key_value_heads"] = 3.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = registry(root.path())
        .get("e5-mistral")
        .err()
        .expect("must fail");
    assert!(
        matches!(&error, ModelError::BadConfig { reason, .. } if reason.contains("num_key_value_heads")),
        "{error:?}"
    );
}
