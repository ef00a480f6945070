//! minilm and mpnet on their real checkpoints against vectors sentence-transformers produced from
//! the same files (`scripts/make-reference-fixtures.py`). The checkpoints come from
//! `scripts/fetch-models.sh`, which the README's test command runs first.

use std::path::PathBuf;

use embedfleet_models::Device;
use embedfleet_models::{
    catalogue, EmbedOptions, EmbeddingModel, ModelInput, TextEmbedder, WeightResolver,
};
use embedfleet_testkit::reference_fixture as fixture;

fn models_dir() -> PathBuf {
    std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn load(name: &str) -> TextEmbedder {
    let spec = catalogue::find(name).unwrap();
    let resolver = WeightResolver {
        models_dir: Some(models_dir()),
        offline: true,
    };
    let files = resolver.resolve(spec).unwrap_or_else(|e| {
        panic!("{e}\nrun scripts/fetch-models.sh first (the README's test command does)")
    });
    TextEmbedder::load(spec, &files, &Device::Cpu).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn check_against_reference(name: &str) {
    let fixture = fixture();
    let reference = &fixture.models[name];
    let model = load(name);
    let inputs: Vec<ModelInput> = fixture
        .inputs
        .iter()
        .cloned()
        .map(ModelInput::Text)
        .collect();
    let batch = model
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    assert_eq!(batch.len(), inputs.len());
    for (index, (got, want)) in batch.iter().zip(&reference.embeddings).enumerate() {
        let similarity = cosine(&got.vector, want);
        assert!(
            similarity >= 0.9999,
            "{name} input {index} ({:?}): cosine {similarity}",
            &fixture.inputs[index]
        );
        assert_eq!(
            got.tokens, reference.token_counts[index],
            "{name} input {index} token count"
        );
        let norm = got.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "{name} input {index} norm {norm}"
        );
    }
    // Packing several sequences into one pass must not change any of them.
    for (index, input) in inputs.iter().enumerate() {
        let single = model
            .embed_batch(std::slice::from_ref(input), &EmbedOptions::default())
            .unwrap();
        let similarity = cosine(&single[0].vector, &batch[index].vector);
        assert!(
            similarity >= 0.99999,
            "{name} input {index}: single vs batch cosine {similarity}"
        );
    }
}

#[test]
fn minilm_matches_sentence_transformers() {
    check_against_reference("minilm");
}

#[test]
fn mpnet_matches_sentence_transformers() {
    check_against_reference("mpnet");
}

#[test]
fn truncate_false_rejects_long_input_with_its_length() {
    let fixture = fixture();
    let model = load("minilm");
    let long = fixture
        .inputs
        .iter()
        .zip(&fixture.models["minilm"].token_counts)
        .find(|(_, &n)| n == 256)
        .unwrap()
        .0;
    let options = EmbedOptions {
        truncate: false,
        ..EmbedOptions::default()
    };
    let error = model
        .embed_batch(
            &[
                ModelInput::Text("short".into()),
                ModelInput::Text(long.clone()),
            ],
            &options,
        )
        .unwrap_err();
    assert_eq!(error.kind(), embedfleet_proto::ErrorKind::InputTooLong);
    assert!(error.to_string().contains("input 1"), "{error}");
}

#[test]
fn empty_text_and_foreign_modalities_are_typed_errors() {
    let model = load("minilm");
    let error = model
        .embed_batch(&[ModelInput::Text(" \t".into())], &EmbedOptions::default())
        .unwrap_err();
    assert_eq!(error.kind(), embedfleet_proto::ErrorKind::EmptyInput);
    let audio = ModelInput::Audio {
        bytes: vec![0; 16],
        sample_rate: Some(16_000),
    };
    let error = model
        .embed_batch(&[audio], &EmbedOptions::default())
        .unwrap_err();
    assert_eq!(
        error.kind(),
        embedfleet_proto::ErrorKind::UnsupportedModality
    );
}

#[test]
fn unnormalized_output_keeps_the_pooled_scale() {
    let model = load("minilm");
    let raw = model
        .embed_batch(
            &[ModelInput::Text("Hello, world!".into())],
            &EmbedOptions {
                normalize: false,
                ..EmbedOptions::default()
            },
        )
        .unwrap();
    let norm = raw[0].vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "mean-pooled minilm states are not unit length: {norm}"
    );
}
