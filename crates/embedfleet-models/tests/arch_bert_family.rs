//! bge-large, gte-large, contriever, dragon-plus (BERT) and codebert (RoBERTa) on small random
//! checkpoints in their upstream layouts, against the vectors transformers gives on the same
//! files (`scripts/fixtures/make_bert_family.py`). Each loads through the registry, as in
//! production, from `tests/fixtures/checkpoints/bert-family/<name>/`.
//!
//! The fixtures differ in hidden size, head and layer counts, intermediate size, position table
//! and tokenizer kind (tokenizer.json, vocab.txt cased and uncased, vocab.json + merges.txt with
//! a pytorch_model.bin), so a loader that hard-codes any one of them fails here. All are narrower
//! than their catalogue slots, which is the width rule at work.

use std::path::{Path, PathBuf};

use embedfleet_models::{
    Device, EmbedOptions, ModelEmbedding, ModelError, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::InputType;
use serde::Deserialize;

const MODELS: [&str; 5] = [
    "bge-large",
    "gte-large",
    "contriever",
    "dragon-plus",
    "codebert",
];

/// What `reference.json` in each fixture directory holds.
#[derive(Deserialize)]
struct Reference {
    max_len: usize,
    hidden_size: usize,
    documents: Vec<ReferenceRow>,
    /// Embedded as queries (bge-large's query instruction prepended).
    queries: Vec<ReferenceRow>,
}

#[derive(Deserialize)]
struct ReferenceRow {
    text: String,
    tokens: usize,
    /// Raw pooled vector, before normalisation.
    vector: Vec<f32>,
}

fn variant_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints/bert-family")
}

fn reference(name: &str) -> Reference {
    let path = variant_dir().join(name).join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (fixtures are committed)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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

fn texts(rows: &[ReferenceRow]) -> Vec<ModelInput> {
    rows.iter()
        .map(|row| ModelInput::Text(row.text.clone()))
        .collect()
}

/// Unnormalised, as the reference is: the scale must match too, not only the direction.
fn raw(input_type: InputType) -> EmbedOptions {
    EmbedOptions {
        normalize: false,
        input_type,
        ..EmbedOptions::default()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Cosine ≥ 0.9999 and the same length to 1e-3, input by input.
fn assert_matches(model: &str, what: &str, got: &[ModelEmbedding], want: &[ReferenceRow]) {
    assert_eq!(got.len(), want.len(), "{model} {what}");
    for (got, want) in got.iter().zip(want) {
        let similarity = cosine(&got.vector, &want.vector);
        assert!(
            similarity >= 0.9999,
            "{model} {what} {:?}: cosine {similarity}",
            want.text
        );
        let (a, b) = (norm(&got.vector), norm(&want.vector));
        assert!(
            (a - b).abs() <= 1e-3 * b,
            "{model} {what} {:?}: norm {a} vs {b}",
            want.text
        );
        assert_eq!(got.tokens, want.tokens, "{model} {what} {:?}", want.text);
    }
}

#[test]
fn every_checkpoint_matches_transformers_and_reports_its_own_width() {
    let registry = registry(&variant_dir());
    for name in MODELS {
        let reference = reference(name);
        let model = registry.get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.dim(), reference.hidden_size, "{name}");
        assert!(model.dim() < model.spec().dim, "{name}: a narrow fixture");
        let got = model
            .embed_batch(&texts(&reference.documents), &raw(InputType::Document))
            .unwrap();
        assert_matches(name, "document", &got, &reference.documents);
        assert!(got.iter().all(|e| e.vector.len() == model.dim()));
        // The long input is cut at the catalogue limit or the position table, whichever is less.
        let longest = got.iter().map(|e| e.tokens).max().unwrap();
        assert_eq!(longest, reference.max_len, "{name}");
    }
}

#[test]
fn queries_differ_only_for_bge_and_instructions_change_none_of_them() {
    let registry = registry(&variant_dir());
    for name in MODELS {
        let reference = reference(name);
        let model = registry.get(name).unwrap();
        let inputs = texts(&reference.queries);
        let as_documents = model
            .embed_batch(&inputs, &raw(InputType::Document))
            .unwrap();
        let as_queries = model.embed_batch(&inputs, &raw(InputType::Query)).unwrap();
        assert_matches(name, "query", &as_queries, &reference.queries);
        let uses_input_type = model.spec().prompting.uses_input_type();
        assert_eq!(uses_input_type, name == "bge-large", "{name}");
        assert_eq!(as_queries != as_documents, uses_input_type, "{name}");

        // No model of this family reads an instruction: it changes nothing, query or not.
        assert!(!model.spec().prompting.uses_instruction(), "{name}");
        for input_type in [InputType::Document, InputType::Query] {
            let instructed = EmbedOptions {
                instruction: Some("Represent the Science title:".into()),
                ..raw(input_type)
            };
            let plain = model.embed_batch(&inputs, &raw(input_type)).unwrap();
            assert_eq!(
                model.embed_batch(&inputs, &instructed).unwrap(),
                plain,
                "{name}"
            );
        }
    }
}

#[test]
fn a_packed_batch_equals_single_calls_and_runs_repeat_exactly() {
    let registry = registry(&variant_dir());
    for name in MODELS {
        let reference = reference(name);
        let model = registry.get(name).unwrap();
        let inputs = texts(&reference.documents);
        let options = raw(InputType::Document);
        let batch = model.embed_batch(&inputs, &options).unwrap();
        assert_eq!(
            model.embed_batch(&inputs, &options).unwrap(),
            batch,
            "{name}: a second run differs"
        );
        for (input, batched) in inputs.iter().zip(&batch) {
            let single = model
                .embed_batch(std::slice::from_ref(input), &options)
                .unwrap();
            let diff = single[0]
                .vector
                .iter()
                .zip(&batched.vector)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-4 * norm(&batched.vector),
                "{name} {input:?}: {diff}"
            );
            assert_eq!(single[0].tokens, batched.tokens);
        }
    }
}

#[test]
fn normalisation_follows_the_request_for_every_model() {
    // contriever and dragon-plus are unnormalised upstream; here `normalize` decides for all.
    let registry = registry(&variant_dir());
    for name in MODELS {
        let model = registry.get(name).unwrap();
        let inputs = [ModelInput::Text("The cat sat on the mat.".into())];
        let unit = model
            .embed_batch(&inputs, &EmbedOptions::default())
            .unwrap();
        assert!((norm(&unit[0].vector) - 1.0).abs() < 1e-5, "{name}");
        let scaled = model
            .embed_batch(&inputs, &raw(InputType::Document))
            .unwrap();
        assert!((norm(&scaled[0].vector) - 1.0).abs() > 1e-3, "{name}");
        assert!(
            cosine(&unit[0].vector, &scaled[0].vector) > 0.99999,
            "{name}"
        );
    }
}

#[test]
fn code_goes_through_as_its_text_whatever_its_language() {
    let registry = registry(&variant_dir());
    let model = registry.get("codebert").unwrap();
    let code = "def add(a, b):\n    return a + b\n";
    let inputs = [
        ModelInput::Text(code.into()),
        ModelInput::Code {
            code: code.into(),
            language: Some("python".into()),
        },
        ModelInput::Code {
            code: code.into(),
            language: None,
        },
    ];
    let got = model
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    assert_eq!(got[0], got[1]);
    assert_eq!(got[0], got[2]);
}

#[test]
fn without_truncation_a_long_input_is_refused_at_the_position_table_limit() {
    let registry = registry(&variant_dir());
    // gte-large's fixture has 128 positions, under the catalogue's 512.
    let model = registry.get("gte-large").unwrap();
    let long = ModelInput::Text("word ".repeat(400));
    let strict = EmbedOptions {
        truncate: false,
        ..EmbedOptions::default()
    };
    let error = model
        .embed_batch(&[ModelInput::Text("short".into()), long], &strict)
        .unwrap_err();
    assert!(
        matches!(
            error,
            ModelError::InputTooLong {
                index: 1,
                max: 128,
                ..
            }
        ),
        "{error}"
    );
}

/// A copy of fixture `name` in a fresh models directory, without `drop`, then `edit`ed.
fn broken_copy(name: &str, drop: &[&str], edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(variant_dir().join(name)).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name();
        if !drop.iter().any(|d| file == *d) {
            std::fs::copy(entry.path(), dir.join(&file)).unwrap();
        }
    }
    edit(&dir);
    root
}

fn load_error(root: &Path, name: &str) -> ModelError {
    match registry(root).get(name) {
        Ok(_) => panic!("{name} loaded from a broken directory"),
        Err(error) => error,
    }
}

/// Rewrites one field of a JSON file.
fn set_json(path: &Path, field: &str, value: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[field] = value;
    std::fs::write(path, json.to_string()).unwrap();
}

#[test]
fn a_directory_without_a_tokenizer_names_what_was_looked_for() {
    for (name, tokenizer_files) in [
        ("gte-large", &["tokenizer.json"][..]),
        ("contriever", &["vocab.txt"][..]),
        ("codebert", &["vocab.json", "merges.txt"][..]),
    ] {
        let root = broken_copy(name, tokenizer_files, |_| {});
        let error = load_error(root.path(), name);
        let message = error.to_string();
        assert!(
            matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
            "{name}: {message}"
        );
        assert!(
            message.contains("vocab.json + merges.txt") && message.contains("vocab.txt"),
            "{message}"
        );
    }
    // Half a byte-level BPE is named as such.
    let root = broken_copy("codebert", &["merges.txt"], |_| {});
    let error = load_error(root.path(), "codebert");
    assert!(
        matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("merges.txt")),
        "{error}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_an_error_naming_the_file() {
    // 64 wide in the weights, 96 in config.json (still a multiple of the 4 heads).
    let root = broken_copy("bge-large", &[], |dir| {
        set_json(&dir.join("config.json"), "hidden_size", 96.into())
    });
    let error = load_error(root.path(), "bge-large");
    assert!(
        matches!(&error, ModelError::CorruptWeights { path, .. } if path.ends_with("model.safetensors")),
        "{error}"
    );
    assert!(error.to_string().contains("shape"), "{error}");

    // The same for a pickled checkpoint.
    let root = broken_copy("codebert", &[], |dir| {
        set_json(&dir.join("config.json"), "intermediate_size", 120.into())
    });
    let error = load_error(root.path(), "codebert");
    assert!(
        matches!(&error, ModelError::CorruptWeights { path, .. } if path.ends_with("pytorch_model.bin")),
        "{error}"
    );

    let root = broken_copy("dragon-plus", &[], |dir| {
        set_json(&dir.join("config.json"), "num_attention_heads", 6.into())
    });
    let error = load_error(root.path(), "dragon-plus");
    assert!(
        matches!(&error, ModelError::BadConfig { path, .. } if path.ends_with("config.json")),
        "{error}"
    );
    assert!(error.to_string().contains("num_attention_heads"), "{error}");
}

#[test]
fn a_checkpoint_of_the_wrong_family_or_a_bad_tokenizer_config_is_refused() {
    // A RoBERTa config in the BERT slot.
    let root = broken_copy("gte-large", &[], |dir| {
        set_json(&dir.join("config.json"), "model_type", "roberta".into())
    });
    let error = load_error(root.path(), "gte-large");
    assert!(matches!(&error, ModelError::BadConfig { .. }), "{error}");

    let root = broken_copy("contriever", &[], |dir| {
        set_json(
            &dir.join("tokenizer_config.json"),
            "do_lower_case",
            "yes".into(),
        )
    });
    let error = load_error(root.path(), "contriever");
    assert!(
        matches!(&error, ModelError::BadTokenizer { path, .. } if path.ends_with("tokenizer_config.json")),
        "{error}"
    );
    assert!(error.to_string().contains("do_lower_case"), "{error}");
}
