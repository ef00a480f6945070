//! Every architecture on a GPU against the same checkpoint on the CPU (feature `cuda`; runs only
//! where a GPU is lent: scripts/gpu-check.sh carries this binary there). Each fixture checkpoint
//! under `tests/fixtures/checkpoints/<variant>/<model>/` loads through `ModelRegistry` on
//! `cuda:0` and on the CPU, at each dtype: f32 on the GPU against f32 on the CPU (cosine ≥
//! 0.999), the GPU's default half precision (f16; bf16 for T5) against CPU f32 (≥ 0.99), and q8_0
//! on the GPU against q8_0 on the CPU (≥ 0.99: the same quantised weights through candle's CUDA
//! and CPU quantised kernels); a padded GPU batch must give what each input gives alone.
//!
//! Without a GPU these tests fail: a CUDA build run on a machine without one is a mistake worth
//! hearing about, and CI only compiles this file.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use embedfleet_models::device::{check_fits, device_memory};
use embedfleet_models::{
    catalogue, DeviceName, Dtype, EmbedOptions, EmbeddingModel, ModelDtypes, ModelError,
    ModelInput, ModelRegistry, WeightResolver,
};

const TEXTS: [&str; 8] = [
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; nearby vectors mean similar text.",
    "fn main() { println!(\"hello\"); }",
    "Größere Modelle brauchen mehr Speicher — 東京は日本の首都です。",
    "🙂 emoji and numbers 1234567890",
    "short",
    "A longer input that repeats itself to cross the fixture models' position limits. \
     A longer input that repeats itself to cross the fixture models' position limits. \
     A longer input that repeats itself to cross the fixture models' position limits. \
     A longer input that repeats itself to cross the fixture models' position limits.",
];

/// Every `(checkpoint folder, catalogue model)` committed as a fixture.
fn fixtures() -> Vec<(PathBuf, &'static str)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints");
    let mut found = Vec::new();
    for variant in std::fs::read_dir(&root).unwrap().flatten() {
        for model in std::fs::read_dir(variant.path()).unwrap().flatten() {
            let name = model.file_name().to_string_lossy().into_owned();
            if let Some(spec) = catalogue::find(&name).filter(|_| model.path().is_dir()) {
                found.push((variant.path(), spec.name));
            }
        }
    }
    found.sort();
    assert!(found.len() >= 7, "fixture checkpoints missing: {found:?}");
    found
}

fn load(dir: &Path, model: &str, device: DeviceName, dtype: Dtype) -> Arc<dyn EmbeddingModel> {
    let resolver = WeightResolver {
        models_dir: Some(dir.to_path_buf()),
        offline: true,
    };
    ModelRegistry::new(resolver, device.open().expect("a CUDA device"))
        .with_dtypes(ModelDtypes::all(dtype))
        .get(model)
        .unwrap_or_else(|e| panic!("{model} at {dtype} in {}: {e}", dir.display()))
}

fn inputs() -> Vec<ModelInput> {
    TEXTS
        .iter()
        .map(|t| ModelInput::Text(t.to_string()))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn vectors(model: &dyn EmbeddingModel, inputs: &[ModelInput]) -> Vec<Vec<f32>> {
    model
        .embed_batch(inputs, &EmbedOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", model.spec().name))
        .into_iter()
        .map(|e| e.vector)
        .collect()
}

/// The GPU's default half precision for `model` (what a worker on a GPU loads without --dtype).
fn half(model: &str) -> Dtype {
    Dtype::default_for(catalogue::find(model).unwrap())
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| cosine(x, y))
        .fold(f32::INFINITY, f32::min)
}

#[test]
fn every_architecture_matches_the_cpu_on_the_gpu_at_every_dtype() {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (dir, model) in fixtures() {
        let variant = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cpu_f32 = vectors(&*load(&dir, model, DeviceName::Cpu, Dtype::F32), &inputs());
        let cpu_q8 = vectors(&*load(&dir, model, DeviceName::Cpu, Dtype::Q8_0), &inputs());
        for (dtype, reference, floor) in [
            (Dtype::F32, &cpu_f32, 0.999),
            (half(model), &cpu_f32, 0.99),
            (Dtype::Q8_0, &cpu_q8, 0.99),
        ] {
            let gpu = vectors(&*load(&dir, model, DeviceName::Cuda(0), dtype), &inputs());
            let worst = min_cosine(reference, &gpu);
            report.push(format!("{variant}/{model}@{dtype}: {worst:.6}"));
            if worst < floor {
                failures.push(format!(
                    "{variant}/{model}@{dtype}: cosine {worst} < {floor}"
                ));
            }
        }
    }
    // The figures gpu-check.sh collects.
    println!("GPU_PARITY {}", report.join("; "));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_padded_gpu_batch_gives_what_each_input_gives_alone() {
    for (dir, model) in fixtures() {
        let gpu = load(&dir, model, DeviceName::Cuda(0), half(model));
        let batch = vectors(&*gpu, &inputs());
        for (input, batched) in inputs().iter().zip(&batch) {
            let alone = vectors(&*gpu, std::slice::from_ref(input)).remove(0);
            let similarity = cosine(&alone, batched);
            assert!(
                similarity >= 0.99,
                "{model}: batched vs alone cosine {similarity} for {input:?}"
            );
        }
    }
}

#[test]
fn a_model_bigger_than_free_memory_is_refused_before_loading() {
    let device = DeviceName::Cuda(0).open().unwrap();
    let (free, total) = device_memory(&device).expect("a GPU reports its memory");
    assert!(free > 0 && free <= total, "free {free} of {total}");
    let error = check_fits("e5-mistral", &device, total as u64 + 1).unwrap_err();
    assert!(matches!(error, ModelError::DeviceMemory { .. }), "{error}");
    assert!(error.to_string().contains("cuda:0"), "{error}");
    check_fits("minilm", &device, 1 << 20).unwrap();
}

#[test]
fn a_gpu_that_does_not_exist_is_a_typed_error() {
    let error = DeviceName::Cuda(97).open().unwrap_err();
    assert!(
        matches!(error, ModelError::DeviceUnavailable { .. }),
        "{error}"
    );
}
