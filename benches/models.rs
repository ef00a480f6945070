//! Model worker bench, group `per_model_latency`: every model that runs, one input per call
//! (`<model>/single`, cycling through `benches/data/sentences.txt`) and a batch of 32
//! (`<model>/batch32`, `Throughput::Elements`), after warm-up.
//!
//! - Real weights (`models/`, from `scripts/fetch-models.sh`): `minilm`, `mpnet`, and any other
//!   catalogue model whose checkpoint is there; the id is the model's name.
//! - Fixture checkpoints (`crates/embedfleet-models/tests/fixtures/checkpoints/<variant>/<name>`,
//!   tiny random-weight models made for the architecture tests) of models with no real
//!   checkpoint here: the id is `<name> (fixture <variant>)`, and the figure is the
//!   architecture's code path at toy size, not the real model's speed.
//!
//! Specification targets (on GPU; CPU figures in docs/benchmarks.md): a semantic model < 5 ms
//! single, a code model < 10 ms single.
//!
//! Compare with sentence-transformers side by side: `scripts/bench-models-side-by-side.sh`
//! (reads `per_model_latency/<model>/single` and `/batch32`). Thread count: candle uses every
//! core by default; set `RAYON_NUM_THREADS` to match the Python side's `--threads`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{bench_dir, models_dir, sentences};
use embedfleet_models::{
    catalogue, Device, EmbedOptions, EmbeddingModel, ModelInput, ModelRegistry, WeightResolver,
};

const BATCH: usize = 32;

/// A model to bench and the label its figures go under.
struct Subject {
    label: String,
    model: Arc<dyn EmbeddingModel>,
}

fn load(name: &str, dir: &Path) -> Option<Arc<dyn EmbeddingModel>> {
    let resolver = WeightResolver {
        models_dir: Some(dir.to_path_buf()),
        offline: true,
    };
    match ModelRegistry::new(resolver, Device::Cpu).get(name) {
        Ok(model) => Some(model),
        Err(error) => {
            eprintln!(
                "models bench: skipping {name} in {}: {error}",
                dir.display()
            );
            None
        }
    }
}

/// Real checkpoints first; then fixture checkpoints of the models that have none.
fn subjects() -> Vec<Subject> {
    let real_dir = models_dir();
    let mut subjects = Vec::new();
    let mut seen = Vec::new();
    for spec in catalogue::CATALOGUE {
        if real_dir.join(spec.name).join("config.json").is_file() {
            eprintln!("models bench: loading {} (real weights)", spec.name);
            if let Some(model) = load(spec.name, &real_dir) {
                subjects.push(Subject {
                    label: spec.name.to_string(),
                    model,
                });
                seen.push(spec.name);
            }
        }
    }
    assert!(
        seen.contains(&"minilm") && seen.contains(&"mpnet"),
        "minilm and mpnet must load from {}: run scripts/fetch-models.sh first",
        real_dir.display()
    );
    let fixtures = bench_dir().join("../crates/embedfleet-models/tests/fixtures/checkpoints");
    for variant in sorted_dirs(&fixtures) {
        let variant_name = file_name(&variant);
        for model_dir in sorted_dirs(&variant) {
            let name = file_name(&model_dir);
            let Some(spec) = catalogue::find(&name) else {
                continue;
            };
            if seen.contains(&spec.name) || !model_dir.join("config.json").is_file() {
                continue;
            }
            if let Some(model) = load(spec.name, &variant) {
                subjects.push(Subject {
                    label: format!("{name} (fixture {variant_name})"),
                    model,
                });
                seen.push(spec.name);
            }
        }
    }
    subjects
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn bench_models(c: &mut Criterion) {
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    assert!(
        sentences.len() >= BATCH,
        "need at least {BATCH} bench sentences"
    );
    let options = EmbedOptions::default();
    let mut group = c.benchmark_group("per_model_latency");
    group
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sample_size(20);
    for subject in subjects() {
        let model = &subject.model;
        let takes_text = model.spec().takes(embedfleet_proto::Modality::Text);
        if !takes_text {
            eprintln!("models bench: {} takes no text; skipped", subject.label);
            continue;
        }
        // One sentence per call, cycling through the set as the Python side does.
        group.throughput(Throughput::Elements(1));
        let mut next = 0;
        group.bench_function(BenchmarkId::new(&subject.label, "single"), |b| {
            b.iter(|| {
                let input = &sentences[next % sentences.len()];
                next += 1;
                model
                    .embed_batch(std::slice::from_ref(input), &options)
                    .expect("embeds")
            })
        });

        group.throughput(Throughput::Elements(BATCH as u64));
        let batch = &sentences[..BATCH];
        let id = BenchmarkId::new(&subject.label, format!("batch{BATCH}"));
        group.bench_with_input(id, batch, |b, batch| {
            b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_models);
criterion_main!(benches);
