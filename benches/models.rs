//! Model worker bench: each real model's single-input latency and batch-32 throughput on fixed
//! sentences (`benches/data/sentences.txt`), after warm-up. Compare with
//! `scripts/bench-sentence-transformers.py` side by side: `scripts/bench-models-side-by-side.sh`.
//!
//! Thread count: candle uses every core by default; set `RAYON_NUM_THREADS` to match the Python
//! side's `--threads` when comparing.
//!
//! The T5 groups (`t5-fixture/...`) run the small random checkpoints of the architecture tests
//! (`crates/embedfleet-models/tests/fixtures/checkpoints/`), not real weights: they track the
//! T5 path's own cost (kernels, packing, instruction handling) from change to change, and say
//! nothing about instructor-xl's or sentence-t5-xxl's real speed.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{models_dir, sentences};
use embedfleet_models::{
    catalogue, Device, EmbedOptions, EmbeddingModel, ModelInput, T5Embedder, TextEmbedder,
    WeightResolver,
};

const BATCH: usize = 32;

fn load(name: &str) -> TextEmbedder {
    let spec = catalogue::find(name).expect("catalogue model");
    let resolver = WeightResolver {
        models_dir: Some(models_dir()),
        offline: true,
    };
    let files = resolver
        .resolve(spec)
        .unwrap_or_else(|e| panic!("{e}\nrun scripts/fetch-models.sh first"));
    TextEmbedder::load(spec, &files, &Device::Cpu).expect("model loads")
}

fn bench_models(c: &mut Criterion) {
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    assert!(
        sentences.len() >= BATCH,
        "need at least {BATCH} bench sentences"
    );
    let options = EmbedOptions::default();
    for name in ["minilm", "mpnet"] {
        eprintln!("models bench: loading {name}");
        let model = load(name);

        let mut group = c.benchmark_group(name);
        group
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(8))
            .sample_size(20);

        // One sentence per call, cycling through the set as the Python side does.
        group.throughput(Throughput::Elements(1));
        let mut next = 0;
        group.bench_function("single", |b| {
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
        group.bench_with_input(BenchmarkId::new("batch", BATCH), batch, |b, batch| {
            b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
        });
        group.finish();
    }
}

/// The T5 path on its fixture checkpoints (see the file header): batch 32 of the bench sentences,
/// sentence-t5 (relu fixture) and instructor (gated fixture, with its default instruction).
fn bench_t5_fixtures(c: &mut Criterion) {
    let fixtures = embedfleet_benches::bench_dir()
        .join("../crates/embedfleet-models/tests/fixtures/checkpoints");
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    let options = EmbedOptions::default();
    for (variant, name) in [
        ("t5-relu", "sentence-t5-xxl"),
        ("t5-gated", "instructor-xl"),
    ] {
        let spec = catalogue::find(name).expect("catalogue model");
        let resolver = WeightResolver {
            models_dir: Some(fixtures.join(variant)),
            offline: true,
        };
        let files = resolver.resolve(spec).expect("fixture checkpoint");
        let model = T5Embedder::load(spec, &files, &Device::Cpu).expect("fixture loads");
        let mut group = c.benchmark_group(format!("t5-fixture/{variant}/{name}"));
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4))
            .sample_size(20)
            .throughput(Throughput::Elements(BATCH as u64));
        let batch = &sentences[..BATCH];
        group.bench_with_input(BenchmarkId::new("batch", BATCH), batch, |b, batch| {
            b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
        });
        group.finish();
    }
}

criterion_group!(benches, bench_models, bench_t5_fixtures);
criterion_main!(benches);
