//! The model registry under concurrent first use, with real minilm weights from `models/`
//! (filled by `scripts/fetch-models.sh`, which the README's test command runs first).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;

use embedfleet_models::{
    catalogue, Device, EmbedOptions, EmbeddingModel, ModelError, ModelInput, ModelRegistry,
    WeightResolver,
};
use embedfleet_proto::ErrorKind;

const THREADS: usize = 8;

fn models_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    assert!(
        dir.join("minilm/model.safetensors").is_file(),
        "no minilm checkpoint in {}: run scripts/fetch-models.sh first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A registry over `models_dir` that never touches the network.
fn registry(models_dir: &Path) -> ModelRegistry {
    ModelRegistry::new(
        WeightResolver {
            models_dir: Some(models_dir.to_path_buf()),
            offline: true,
        },
        Device::Cpu,
    )
}

/// Calls `get(name)` from `THREADS` threads released together by a barrier.
fn get_at_once(
    registry: &ModelRegistry,
    name: &str,
) -> Vec<Result<Arc<dyn EmbeddingModel>, ModelError>> {
    let barrier = Barrier::new(THREADS);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    registry.get(name)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a get panicked"))
            .collect()
    })
}

#[test]
fn concurrent_first_use_loads_once_and_shares_one_model() {
    let registry = registry(&models_dir());
    assert_eq!(registry.loads(), 0, "nothing loads before the first get");

    let models: Vec<_> = get_at_once(&registry, "minilm")
        .into_iter()
        .map(|result| result.unwrap_or_else(|e| panic!("get(minilm): {e}")))
        .collect();
    assert_eq!(models.len(), THREADS);
    for (thread, model) in models.iter().enumerate() {
        assert!(
            Arc::ptr_eq(model, &models[0]),
            "thread {thread} got a different instance"
        );
    }
    assert_eq!(
        registry.loads(),
        1,
        "{THREADS} racing callers must cause exactly one load"
    );

    // Later calls hand out the same instance without loading again, and it is a working model.
    let later = registry.get("minilm").unwrap();
    assert!(Arc::ptr_eq(&later, &models[0]));
    assert_eq!(registry.loads(), 1);
    assert_eq!(later.spec().name, "minilm");
    assert!(
        later.revision().starts_with("local-"),
        "local weights are identified by hash: {}",
        later.revision()
    );
    let embedded = later
        .embed_batch(
            &[ModelInput::Text("a registry test".into())],
            &EmbedOptions::default(),
        )
        .unwrap();
    assert_eq!(embedded.len(), 1);
    assert_eq!(embedded[0].vector.len(), 384);
}

#[test]
fn unknown_name_is_a_404_listing_the_known_names() {
    let registry = registry(&models_dir());
    let error = registry
        .get("no-such-model")
        .err()
        .expect("an unknown name must fail");
    assert!(
        matches!(&error, ModelError::UnknownModel { name, .. } if name == "no-such-model"),
        "{error:?}"
    );
    assert_eq!(error.kind(), ErrorKind::UnknownModel);
    assert_eq!(error.kind().code(), 404);
    let message = error.to_string();
    assert!(message.contains("no-such-model"), "{message}");
    for name in catalogue::names() {
        assert!(message.contains(name), "{name} not listed: {message}");
    }
    // Names are matched exactly: no case folding, no trimming.
    for near_miss in ["MiniLM", " minilm", "minilm "] {
        let error = registry
            .get(near_miss)
            .err()
            .expect("a near miss must fail");
        assert_eq!(error.kind(), ErrorKind::UnknownModel, "{near_miss:?}");
    }
    assert_eq!(registry.loads(), 0);
}

#[test]
fn failed_load_is_not_cached() {
    let real = models_dir().join("minilm");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("minilm");
    std::fs::create_dir(&dir).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(real.join(file), dir.join(file)).unwrap();
    }
    let registry = registry(root.path());

    // Every racing caller sees the failure, and none of them leaves a broken entry behind.
    for result in get_at_once(&registry, "minilm") {
        let error = result.err().expect("a directory without weights must fail");
        assert!(
            matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("model.safetensors")),
            "{error:?}"
        );
    }
    assert_eq!(registry.loads(), 0);

    // The operator fixes the directory; the very next call loads.
    std::fs::copy(
        real.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let model = registry
        .get("minilm")
        .unwrap_or_else(|e| panic!("get after fixing the directory: {e}"));
    assert_eq!(model.spec().name, "minilm");
    assert_eq!(registry.loads(), 1);
    assert!(Arc::ptr_eq(&model, &registry.get("minilm").unwrap()));
    assert_eq!(registry.loads(), 1);
}
