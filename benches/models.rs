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
//!
//! `e5-mistral` has no real weights here: its groups run the decoder on the small random fixture
//! checkpoint (`e5-mistral-fixture`, labelled so: its speed says nothing about a 7B model) and on
//! SmolLM2-135M, a real Llama in the e5-mistral slot when `scripts/fetch-models.sh` made it
//! (`e5-mistral-smollm2`), where the CPU kernels and candle tensor ops also run side by side.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{models_dir, sentences};
use embedfleet_models::arch::mistral::{MistralConfig, MistralModel};
use embedfleet_models::packed::PackedBatch;
use embedfleet_models::{
    catalogue, DecoderEmbedder, Device, EmbedOptions, EmbeddingModel, ModelInput, T5Embedder,
    TextEmbedder,
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

    catalogue, DecoderEmbedder, Device, EmbedOptions, EmbeddingModel, ModelInput, T5Embedder,
    TextEmbedder,
criterion_main!(benches);
