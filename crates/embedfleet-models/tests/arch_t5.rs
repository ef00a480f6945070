//! The T5 sentence encoders (`sentence-t5-xxl`, `instructor-xl`) against the Python reference, on
//! the small random checkpoints `scripts/fixtures/make_t5.py` writes in the upstream layouts
//! (`tests/fixtures/checkpoints/t5-relu/`: classic sentence-transformers layout, relu
//! feed-forward, pytorch_model.bin; `t5-gated/`: the newer layout, gated-gelu, safetensors, bf16
//! weights for instructor). Every model loads through the registry, as the fleet loads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use embedfleet_models::{
    catalogue, Device, Dtype, EmbedOptions, EmbeddingModel, ModelError, ModelInput, ModelRegistry,
    T5Embedder, WeightResolver,
};
use embedfleet_proto::{ErrorKind, InputType};
use serde_json::Value;

const VARIANTS: [&str; 2] = ["t5-relu", "t5-gated"];
const MIN_COSINE: f32 = 0.9999;

fn checkpoints() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
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

fn model(variant: &str, name: &str) -> Arc<dyn EmbeddingModel> {
    registry(&checkpoints().join(variant))
        .get(name)
        .unwrap_or_else(|e| panic!("{variant}/{name}: {e}"))
}

fn reference(variant: &str, name: &str) -> Value {
    let path = checkpoints()
        .join(variant)
        .join(format!("{name}.reference.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn inputs(reference: &Value) -> Vec<ModelInput> {
    reference["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| ModelInput::Text(t.as_str().unwrap().to_string()))
        .collect()
}

fn vectors(value: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn embed(
    model: &dyn EmbeddingModel,
    inputs: &[ModelInput],
    options: &EmbedOptions,
) -> Vec<Vec<f32>> {
    model
        .embed_batch(inputs, options)
        .unwrap_or_else(|e| panic!("{}: {e}", model.spec().name))
        .into_iter()
        .map(|e| e.vector)
        .collect()
}

fn assert_matches(label: &str, got: &[Vec<f32>], want: &[Vec<f32>], min_cosine: f32) {
    assert_eq!(got.len(), want.len(), "{label}");
    for (index, (got, want)) in got.iter().zip(want).enumerate() {
        assert_eq!(got.len(), want.len(), "{label}: input {index} width");
        let similarity = cosine(got, want);
        assert!(
            similarity >= min_cosine,
            "{label}: input {index} cosine {similarity} < {min_cosine}"
        );
    }
}

fn with_instruction(instruction: Option<&str>) -> EmbedOptions {
    EmbedOptions {
        instruction: instruction.map(String::from),
        ..EmbedOptions::default()
    }
}

#[test]
fn sentence_t5_matches_sentence_transformers_on_both_variants() {
    for variant in VARIANTS {
        let reference = reference(variant, "sentence-t5-xxl");
        let model = model(variant, "sentence-t5-xxl");
        // Narrower than the catalogue's 768: loads with a warning and reports its own width.
        assert_eq!(model.dim(), reference["dim"].as_u64().unwrap() as usize);
        let inputs = inputs(&reference);
        let embedded = model
            .embed_batch(&inputs, &EmbedOptions::default())
            .unwrap();
        let got: Vec<Vec<f32>> = embedded.iter().map(|e| e.vector.clone()).collect();
        assert_matches(
            variant,
            &got,
            &vectors(&reference["embeddings"]),
            MIN_COSINE,
        );
        let tokens: Vec<usize> = embedded.iter().map(|e| e.tokens).collect();
        let want: Vec<usize> = serde_json::from_value(reference["token_counts"].clone()).unwrap();
        assert_eq!(tokens, want, "{variant}: token counts");
        assert_eq!(
            *tokens.iter().max().unwrap(),
            256,
            "the long input is cut at 256"
        );
    }
}

#[test]
fn instructor_matches_the_instructor_recipe_with_and_without_instruction() {
    for variant in VARIANTS {
        let reference = reference(variant, "instructor-xl");
        let model = model(variant, "instructor-xl");
        assert_eq!(model.dim(), reference["dim"].as_u64().unwrap() as usize);
        let inputs = inputs(&reference);
        for (key, want) in reference["instructions"].as_object().unwrap() {
            let options = match key.as_str() {
                "default" => with_instruction(None),
                instruction => with_instruction(Some(instruction)),
            };
            let got = embed(model.as_ref(), &inputs, &options);
            assert_matches(
                &format!("{variant} [{key}]"),
                &got,
                &vectors(want),
                MIN_COSINE,
            );
        }
        // The query/document switch does not change instructor: its instruction says it all.
        let query = EmbedOptions {
            input_type: InputType::Query,
            ..EmbedOptions::default()
        };
        assert_eq!(
            embed(model.as_ref(), &inputs[..3], &query),
            embed(model.as_ref(), &inputs[..3], &EmbedOptions::default())
        );
    }
}

#[test]
fn instruction_changes_instructor_and_not_sentence_t5() {
    let instruction = with_instruction(Some("Represent the Science title:"));
    let inputs = [ModelInput::Text("The cat sat on the mat.".into())];
    for variant in VARIANTS {
        let sentence_t5 = model(variant, "sentence-t5-xxl");
        assert_eq!(
            embed(sentence_t5.as_ref(), &inputs, &instruction),
            embed(sentence_t5.as_ref(), &inputs, &EmbedOptions::default()),
            "{variant}: sentence-t5 ignores instructions"
        );
        let instructor = model(variant, "instructor-xl");
        let with = embed(instructor.as_ref(), &inputs, &instruction);
        let without = embed(instructor.as_ref(), &inputs, &with_instruction(Some("")));
        let default = embed(instructor.as_ref(), &inputs, &EmbedOptions::default());
        assert!(
            cosine(&with[0], &without[0]) < 0.999,
            "{variant}: instruction ignored"
        );
        assert!(
            cosine(&with[0], &default[0]) < 0.999,
            "{variant}: default used instead"
        );
    }
}

#[test]
fn a_batch_gives_what_single_calls_give_and_runs_repeat_exactly() {
    for (variant, name) in [
        ("t5-relu", "instructor-xl"),
        ("t5-gated", "sentence-t5-xxl"),
    ] {
        let reference = reference(variant, name);
        let model = model(variant, name);
        let inputs = inputs(&reference);
        let options = EmbedOptions::default();
        let batch = embed(model.as_ref(), &inputs, &options);
        for (index, input) in inputs.iter().enumerate() {
            let single = embed(model.as_ref(), std::slice::from_ref(input), &options);
            let diff = single[0]
                .iter()
                .zip(&batch[index])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-5,
                "{variant}/{name}: input {index} differs by {diff}"
            );
        }
        assert_eq!(
            batch,
            embed(model.as_ref(), &inputs, &options),
            "{variant}/{name}"
        );
    }
}

#[test]
fn bf16_compute_stays_close_and_f16_is_refused() {
    let spec = catalogue::find("sentence-t5-xxl").unwrap();
    let resolver = WeightResolver {
        models_dir: Some(checkpoints().join("t5-relu")),
        offline: true,
    };
    let files = resolver.resolve(spec).unwrap();
    let error = T5Embedder::load_at(spec, &files, &Device::Cpu, Dtype::F16)
        .err()
        .expect("f16 must be refused");
    assert!(
        matches!(&error, ModelError::UnsupportedDtype { dtype: Dtype::F16, reason, .. }
            if reason.contains("f16")),
        "{error}"
    );
    let bf16 = T5Embedder::load_at(spec, &files, &Device::Cpu, Dtype::Bf16).unwrap();
    assert_eq!(bf16.dtype(), Dtype::Bf16);
    let reference = reference("t5-relu", "sentence-t5-xxl");
    let inputs = inputs(&reference);
    let got = embed(&bf16, &inputs[..6], &EmbedOptions::default());
    assert_matches("bf16", &got, &vectors(&reference["embeddings"])[..6], 0.98);
}

// --- bad inputs -----------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A writable copy of one fixture checkpoint, changed by `damage`, then loaded.
fn load_damaged(
    variant: &str,
    name: &str,
    damage: impl FnOnce(&Path),
) -> Result<Arc<dyn EmbeddingModel>, ModelError> {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(name);
    copy_dir(&checkpoints().join(variant).join(name), &dir);
    damage(&dir);
    registry(root.path()).get(name)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

fn missing_file(result: Result<Arc<dyn EmbeddingModel>, ModelError>) -> (PathBuf, String) {
    match result.err().expect("the load must fail") {
        ModelError::MissingFile { path, reason } => (path, reason),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn missing_module_files_are_named() {
    let (path, _) = missing_file(load_damaged("t5-relu", "sentence-t5-xxl", |dir| {
        std::fs::remove_file(dir.join("modules.json")).unwrap()
    }));
    assert!(path.ends_with("modules.json"), "{path:?}");

    let (path, _) = missing_file(load_damaged("t5-gated", "instructor-xl", |dir| {
        std::fs::remove_dir_all(dir.join("2_Dense")).unwrap()
    }));
    assert!(path.ends_with("2_Dense/config.json"), "{path:?}");

    let (path, reason) = missing_file(load_damaged("t5-relu", "instructor-xl", |dir| {
        std::fs::remove_file(dir.join("2_Dense/pytorch_model.bin")).unwrap()
    }));
    assert!(path.ends_with("2_Dense/model.safetensors"), "{path:?}");
    assert!(reason.contains("pytorch_model.bin"), "{reason}");

    let (path, reason) = missing_file(load_damaged("t5-relu", "sentence-t5-xxl", |dir| {
        std::fs::rename(dir.join("tokenizer.json"), dir.join("spiece.model")).unwrap()
    }));
    assert!(path.ends_with("tokenizer.json"), "{path:?}");
    assert!(reason.contains("spiece.model"), "{reason}");
}

#[test]
fn unsupported_configs_are_refused_naming_the_file_and_value() {
    let error = load_damaged("t5-relu", "sentence-t5-xxl", |dir| {
        edit_json(&dir.join("config.json"), |c| {
            c["feed_forward_proj"] = "gated-silu".into()
        })
    })
    .err()
    .unwrap();
    assert!(
        matches!(&error, ModelError::BadConfig { path, reason }
            if path.ends_with("config.json") && reason.contains("gated-silu")),
        "{error}"
    );

    let error = load_damaged("t5-gated", "sentence-t5-xxl", |dir| {
        edit_json(&dir.join("1_Pooling/config.json"), |c| {
            c["pooling_mode"] = "cls".into()
        })
    })
    .err()
    .unwrap();
    assert!(
        matches!(&error, ModelError::BadConfig { path, .. } if path.ends_with("1_Pooling/config.json")),
        "{error}"
    );

    let error = load_damaged("t5-relu", "instructor-xl", |dir| {
        edit_json(&dir.join("2_Dense/config.json"), |c| {
            c["in_features"] = 65.into()
        })
    })
    .err()
    .unwrap();
    assert!(
        matches!(&error, ModelError::BadConfig { path, reason }
            if path.ends_with("2_Dense/config.json") && reason.contains("65")),
        "{error}"
    );
}

#[test]
fn weights_that_disagree_with_the_config_are_named() {
    for (variant, file) in [
        ("t5-relu", "pytorch_model.bin"),
        ("t5-gated", "model.safetensors"),
    ] {
        let error = load_damaged(variant, "sentence-t5-xxl", |dir| {
            edit_json(&dir.join("config.json"), |c| c["d_ff"] = 100.into())
        })
        .err()
        .unwrap();
        assert!(
            matches!(&error, ModelError::CorruptWeights { path, reason }
                if path.ends_with(file) && reason.contains("shape")),
            "{variant}: {error}"
        );
    }
}

#[test]
fn bad_requests_are_typed_errors() {
    let instructor = model("t5-relu", "instructor-xl");
    let text = [ModelInput::Text("a short text".into())];
    let long_instruction = "Represent this ".repeat(300);
    let error = instructor
        .embed_batch(&text, &with_instruction(Some(&long_instruction)))
        .unwrap_err();
    assert!(
        matches!(&error, ModelError::InstructionTooLong { max: 512, tokens, .. } if *tokens >= 512),
        "{error}"
    );
    assert_eq!(error.kind(), ErrorKind::InputTooLong);
    assert!(error.is_permanent_for_input());

    let empty = [text[0].clone(), ModelInput::Text("  \n ".into())];
    for model in [instructor.clone(), model("t5-relu", "sentence-t5-xxl")] {
        let error = model
            .embed_batch(&empty, &EmbedOptions::default())
            .unwrap_err();
        assert!(
            matches!(error, ModelError::EmptyInput { index: 1 }),
            "{error}"
        );
        let long = [ModelInput::Text("word ".repeat(2000))];
        let strict = EmbedOptions {
            truncate: false,
            ..EmbedOptions::default()
        };
        let error = model.embed_batch(&long, &strict).unwrap_err();
        assert!(
            matches!(error, ModelError::InputTooLong { index: 0, .. }),
            "{error}"
        );
    }
}
