//! Pipeline checks that need no weights: they fail before any model loads. The full path on real
//! weights is covered by the CLI's tests (crates/embedfleet-cli/tests/cli.rs).

use std::sync::Arc;

use embedfleet_fleet::{Pipeline, PipelineRequest};
use embedfleet_models::{Device, ModelInput, ModelRegistry, WeightResolver};
use embedfleet_proto::ErrorKind;

fn registry() -> Arc<ModelRegistry> {
    let empty = std::env::temp_dir().join("embedfleet-no-models-here");
    Arc::new(ModelRegistry::new(
        WeightResolver {
            models_dir: Some(empty),
            offline: true,
        },
        Device::Cpu,
    ))
}

#[test]
fn an_input_no_active_model_takes_is_a_422_naming_it() {
    let pipeline = Pipeline::new(registry(), &["mpnet".into(), "minilm".into()], None).unwrap();
    assert_eq!(
        pipeline.models().iter().map(|s| s.name).collect::<Vec<_>>(),
        ["minilm", "mpnet"]
    );
    let inputs = [
        ModelInput::Text("fine".into()),
        ModelInput::Audio {
            bytes: vec![0; 32],
            sample_rate: Some(16_000),
        },
    ];
    let request = PipelineRequest {
        fuse: true,
        ..PipelineRequest::default()
    };
    let error = pipeline.embed(&inputs, &request, 10).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnsupportedModality);
    assert!(error.to_string().contains("input 11"), "{error}");
}

#[test]
fn unknown_model_and_missing_weights_are_typed() {
    let error = Pipeline::new(registry(), &["minilm".into(), "nope".into()], None)
        .err()
        .unwrap();
    assert_eq!(error.kind(), ErrorKind::UnknownModel);
    let pipeline = Pipeline::new(registry(), &["minilm".into()], None).unwrap();
    let error = pipeline.warm_up().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoWorker, "{error}");
}

/// The BERT-family fixture checkpoints (narrower than their catalogue slots).
fn fixture_registry() -> Arc<ModelRegistry> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../embedfleet-models/tests/fixtures/checkpoints/bert-family");
    Arc::new(ModelRegistry::new(
        WeightResolver {
            models_dir: Some(dir),
            offline: true,
        },
        Device::Cpu,
    ))
}

#[test]
fn fusion_is_sized_for_the_widths_the_checkpoints_produce() {
    let names = ["gte-large".into(), "bge-large".into()];
    let pipeline = Pipeline::new(fixture_registry(), &names, None).unwrap();
    // Catalogue widths would be 1024 + 1024; the loaded checkpoints are 64 and 48 wide.
    assert_eq!(pipeline.widths().unwrap(), [64, 48]);
    assert_eq!(pipeline.fusion().unwrap().config().input_dims, [64, 48]);
    let request = PipelineRequest {
        fuse: true,
        return_partials: true,
        ..PipelineRequest::default()
    };
    let output = pipeline
        .embed(&[ModelInput::Text("hello".into())], &request, 0)
        .unwrap();
    let partials = output.data[0].partials.as_ref().unwrap();
    assert_eq!(partials["bge-large"].len(), 64);
    assert_eq!(partials["gte-large"].len(), 48);
    assert!(output.data[0].embedding.is_some());
}

#[test]
fn a_fusion_file_for_other_widths_fails_at_warm_up_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fusion.safetensors");
    let catalogue_widths = embedfleet_fusion::FuseMoeConfig::for_input_dims(vec![1024, 1024]);
    embedfleet_fusion::FuseMoe::from_seed(catalogue_widths, 7)
        .unwrap()
        .save(&path)
        .unwrap();
    let names = ["bge-large".into(), "gte-large".into()];
    let pipeline = Pipeline::new(fixture_registry(), &names, Some(&path)).unwrap();
    let error = pipeline.warm_up().unwrap_err();
    let message = error.to_string();
    assert_eq!(error.kind(), ErrorKind::Internal);
    assert!(
        message.contains("fusion.safetensors")
            && message.contains("[64, 48]")
            && message.contains("bge-large, gte-large"),
        "{message}"
    );
}
