//! The in-process pipeline end to end (`embedfleet embed` without `--nats-url`, and what every
//! fleet request does minus NATS): the ensemble (minilm + mpnet, real weights) → normalise →
//! FuseMoE (seeded) → one fused vector per input.
//!
//! - `single_embed_latency`: one sentence per call, cycling through
//!   `benches/data/sentences.txt`. Specification target: < 200 ms P95 for the ensemble on GPU.
//! - `batch_embed_throughput`: batches of 8, 16, 32 and 64 sentences, `Throughput::Elements`.
//!   Specification target: batch 32 > 100 items/s.
//!
//! Figures, with the machine and commit, in docs/benchmarks.md. Run:
//! `cargo bench -p embedfleet-benches --bench pipeline`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{models_dir, sentences};
use embedfleet_fleet::{Pipeline, PipelineRequest};
use embedfleet_models::{Device, ModelInput, ModelRegistry, WeightResolver};

const BATCHES: [usize; 4] = [8, 16, 32, 64];

fn pipeline() -> Pipeline {
    let resolver = WeightResolver {
        models_dir: Some(models_dir()),
        offline: true,
    };
    let registry = Arc::new(ModelRegistry::new(resolver, Device::Cpu));
    let models = ["minilm".to_string(), "mpnet".to_string()];
    let pipeline = Pipeline::new(registry, &models, None).expect("seeded fusion for the pair");
    pipeline
        .warm_up()
        .unwrap_or_else(|e| panic!("{e}\nrun scripts/fetch-models.sh first"));
    pipeline
}

fn bench_pipeline(c: &mut Criterion) {
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    // 64 inputs for the largest batch: the set again, numbered, if the file is shorter.
    let inputs: Vec<ModelInput> = (0..BATCHES[3])
        .map(|i| match &sentences[i % sentences.len()] {
            ModelInput::Text(t) if i >= sentences.len() => ModelInput::Text(format!("{t} ({i})")),
            input => input.clone(),
        })
        .collect();
    eprintln!("pipeline bench: loading minilm + mpnet");
    let pipeline = pipeline();
    let request = PipelineRequest {
        fuse: true,
        ..PipelineRequest::default()
    };

    let mut group = c.benchmark_group("single_embed_latency");
    group
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function("minilm+mpnet fused", |b| {
        b.iter(|| {
            let input = &sentences[next % sentences.len()];
            next += 1;
            pipeline
                .embed(std::slice::from_ref(input), &request, 0)
                .expect("embeds")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("batch_embed_throughput");
    group
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .sample_size(10);
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        let id = BenchmarkId::new("minilm+mpnet fused", batch);
        group.bench_with_input(id, &inputs[..batch], |b, batch| {
            b.iter(|| pipeline.embed(batch, &request, 0).expect("embeds"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pipeline);
criterion_main!(benches);
