//! Model worker bench: each real model's single-input latency and batch-32 throughput on fixed
//! sentences (`benches/data/sentences.txt`), after warm-up, in the group `per_model_latency`
//! (`<model>/single`, `<model>/batch32`). Compare with `scripts/bench-sentence-transformers.py`
//! side by side: `scripts/bench-models-side-by-side.sh`.
//!
//! Specification targets (on GPU; CPU figures in docs/benchmarks.md): a semantic model < 5 ms
//! single, a code model < 10 ms single.
//!
//! Thread count: candle uses every core by default; set `RAYON_NUM_THREADS` to match the Python
//! side's `--threads` when comparing.
//!
//! The fixture groups (`t5-fixture/...`, `bert-fixture/...`) run the small random checkpoints of
//! the architecture tests (`crates/embedfleet-models/tests/fixtures/checkpoints/`), not real
//! weights: they track each path's own cost (kernels, packing, tokenizers built from vocabulary
//! files, instruction handling) from change to change, and say nothing about the real models'
//! speed.
//!
//! `per_model_dtype` runs minilm and mpnet at every weight dtype (`<model>/<dtype>/single` and
//! `/batch32`): f32 on the packed CPU kernels, f16/bf16/q8_0/q4k on candle tensor ops and its
//! quantised matmul. What each costs in quality: docs/benchmarks.md, "Quantised weights".
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
    catalogue, DecoderEmbedder, Device, Dtype, EmbedOptions, EmbeddingModel, ModelInput,
    ModelRegistry, TextEmbedder, WeightResolver,
};

const BATCH: usize = 32;

fn load(name: &str) -> TextEmbedder {
    load_at(name, Dtype::F32)
}

fn load_at(name: &str, dtype: Dtype) -> TextEmbedder {
    let spec = catalogue::find(name).expect("catalogue model");
    let resolver = WeightResolver {
        models_dir: Some(models_dir()),
        offline: true,
    };
    let files = resolver
        .resolve(spec)
        .unwrap_or_else(|e| panic!("{e}\nrun scripts/fetch-models.sh first"));
    TextEmbedder::load_at(spec, &files, &Device::Cpu, dtype).expect("model loads")
}

/// Each real model at each weight dtype: one sentence per call, and batch 32.
fn bench_dtypes(c: &mut Criterion) {
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    let options = EmbedOptions::default();
    let mut group = c.benchmark_group("per_model_dtype");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10);
    for name in ["minilm", "mpnet"] {
        for dtype in Dtype::ALL {
            eprintln!("models bench: loading {name} at {dtype}");
            let model = load_at(name, dtype);
            group.throughput(Throughput::Elements(1));
            let mut next = 0;
            group.bench_function(BenchmarkId::new(format!("{name}/{dtype}"), "single"), |b| {
                b.iter(|| {
                    let input = &sentences[next % sentences.len()];
                    next += 1;
                    model
                        .embed_batch(std::slice::from_ref(input), &options)
                        .expect("embeds")
                })
            });
            group.throughput(Throughput::Elements(BATCH as u64));
            let id = BenchmarkId::new(format!("{name}/{dtype}"), format!("batch{BATCH}"));
            group.bench_with_input(id, &sentences[..BATCH], |b, batch| {
                b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
            });
        }
    }
    group.finish();
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

        let mut group = c.benchmark_group("per_model_latency");
        group
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(8))
            .sample_size(20);

        // One sentence per call, cycling through the set as the Python side does.
        group.throughput(Throughput::Elements(1));
        let mut next = 0;
        group.bench_function(BenchmarkId::new(name, "single"), |b| {
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
        let id = BenchmarkId::new(name, format!("batch{BATCH}"));
        group.bench_with_input(id, batch, |b, batch| {
            b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
        });
        group.finish();
    }
}

/// Each architecture on its fixture checkpoints (see the file header), loaded through the
/// registry as the fleet loads it: batch 32 of the bench sentences; sentence-t5 (relu fixture),
/// instructor (gated fixture, with its default instruction) and the BERT family (bge-large,
/// gte-large and contriever, dragon-plus: tokenizer.json and vocab.txt; codebert: RoBERTa with a
/// byte-level BPE from vocab.json + merges.txt).
fn bench_fixtures(c: &mut Criterion) {
    let fixtures = embedfleet_benches::bench_dir()
        .join("../crates/embedfleet-models/tests/fixtures/checkpoints");
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    let options = EmbedOptions::default();
    for (path, variant, name) in [
        ("t5", "t5-relu", "sentence-t5-xxl"),
        ("t5", "t5-gated", "instructor-xl"),
        ("bert", "bert-family", "bge-large"),
        ("bert", "bert-family", "gte-large"),
        ("bert", "bert-family", "contriever"),
        ("bert", "bert-family", "dragon-plus"),
        ("bert", "bert-family", "codebert"),
    ] {
        let registry = ModelRegistry::new(
            WeightResolver {
                models_dir: Some(fixtures.join(variant)),
                offline: true,
            },
            Device::Cpu,
        );
        let model = registry.get(name).expect("fixture loads");
        let mut group = c.benchmark_group(format!("{path}-fixture/{variant}/{name}"));
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

/// e5-mistral's embedder from a models directory holding `e5-mistral/`.
fn load_decoder(models_dir: std::path::PathBuf) -> DecoderEmbedder {
    let spec = catalogue::find("e5-mistral").expect("catalogue model");
    let resolver = WeightResolver {
        models_dir: Some(models_dir),
        offline: true,
    };
    let files = resolver.resolve(spec).unwrap_or_else(|e| panic!("{e}"));
    DecoderEmbedder::load(spec, &files, &Device::Cpu).expect("model loads")
}

fn bench_decoder(c: &mut Criterion) {
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    let options = EmbedOptions::default();
    let fixture = embedfleet_benches::bench_dir()
        .join("../crates/embedfleet-models/tests/fixtures/checkpoints/mistral-gqa2-sharded");
    let smollm2 = models_dir().join("smollm2");
    let mut setups = vec![("e5-mistral-fixture", fixture)];
    if smollm2.join("e5-mistral/model.safetensors").is_file() {
        setups.push(("e5-mistral-smollm2", smollm2.clone()));
    } else {
        eprintln!(
            "models bench: no models/smollm2 (scripts/fetch-models.sh), real-size decoder skipped"
        );
    }
    for (label, dir) in setups {
        eprintln!("models bench: loading {label}");
        let model = load_decoder(dir);
        let mut group = c.benchmark_group(label);
        group
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(8))
            .sample_size(10);
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
        group.bench_with_input(
            BenchmarkId::new("batch", BATCH),
            &sentences[..BATCH],
            |b, batch| b.iter(|| model.embed_batch(batch, &options).expect("embeds")),
        );
        group.finish();
    }

    // The decoder stack alone, CPU kernels against candle tensor ops, on the real-size weights.
    if !smollm2.join("e5-mistral/model.safetensors").is_file() {
        return;
    }
    let dir = smollm2.join("e5-mistral");
    let config: MistralConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // Word-count-long sequences of arbitrary ids: the speed depends on lengths, not on the ids.
    let ids: Vec<Vec<u32>> = embedfleet_benches::sentences()
        .iter()
        .take(BATCH)
        .map(|s| {
            (0..s.split_whitespace().count() as u32 + 2)
                .map(|i| 100 + i * 7)
                .collect()
        })
        .collect();
    let batch = PackedBatch::new(&ids);
    let mut group = c.benchmark_group("e5-mistral-smollm2-stack");
    group
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sample_size(10)
        .throughput(Throughput::Elements(BATCH as u64));
    for (executor, cpu_kernels) in [("cpu-kernels", true), ("tensor-ops", false)] {
        let vb = embedfleet_models::WeightFiles::Safetensors(vec![dir.join("model.safetensors")])
            .var_builder(candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        let model = MistralModel::load_with(vb, &config, cpu_kernels).unwrap();
        group.bench_function(BenchmarkId::new(executor, BATCH), |b| {
            b.iter(|| model.forward_last_tokens(&batch).unwrap())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_models,
    bench_dtypes,
    bench_fixtures,
    bench_decoder
);
criterion_main!(benches);
