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

#[test]
fn fusion_is_sized_for_the_active_set() {
    let pipeline = Pipeline::new(registry(), &["minilm".into(), "mpnet".into()], None).unwrap();
    assert_eq!(pipeline.fusion().config().input_dim(), 384 + 768);
}
