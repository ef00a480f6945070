//! Model worker bench: every catalogue model that loads here, single-input latency and batch
//! throughput on fixed inputs (`benches/data/sentences.txt`; the fixture images and speech clip
//! for CLIP and Whisper), after warm-up, in the group `per_model_latency`
//! (`<model>@<source>/single`, `<model>@<source>/batch32`). `<source>` says what was timed:
//! `real` (minilm, mpnet: real weights), `real-tiny.en` / `real-smollm2-135m` (real but much
//! smaller checkpoints in the whisper-large and e5-mistral slots), `fixture` (the architecture
//! tests' tiny random checkpoints, `crates/embedfleet-models/tests/fixtures/checkpoints/`: they
//! track each path's own cost from change to change and say nothing about the real model's
//! speed). On a machine with the real checkpoints in `$EMBEDFLEET_MODELS_DIR`, every model is
//! `real`. Compare with `scripts/bench-sentence-transformers.py` side by side:
//! `scripts/bench-models-side-by-side.sh`.
//!
//! Specification targets (on GPU; CPU figures in docs/benchmarks.md): a semantic model < 5 ms
//! single, a code model < 10 ms single.
//!
//! Thread count: candle uses every core by default; set `RAYON_NUM_THREADS` to match the Python
//! side's `--threads` when comparing.
//!
//! `per_model_dtype` runs minilm and mpnet at every weight dtype (`<model>/<dtype>/single` and
//! `/batch32`): f32 on the packed CPU kernels, f16/bf16/q8_0/q4k on candle tensor ops and its
//! quantised matmul. What each costs in quality: docs/benchmarks.md, "Quantised weights".
//!
//! The decoder groups: `e5-mistral-fixture` and `e5-mistral-smollm2` (SmolLM2-135M, a real Llama
//! in the e5-mistral slot, when `scripts/fetch-models.sh` made it) through the embedder, and
//! `e5-mistral-smollm2-stack`, the decoder stack alone, CPU kernels against candle tensor ops.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{models_dir, sentences};
use embedfleet_models::arch::mistral::{MistralConfig, MistralModel};
use embedfleet_models::packed::PackedBatch;
use embedfleet_models::{
    catalogue, DecoderEmbedder, Device, Dtype, EmbedOptions, EmbeddingModel, ModelInput,
    ModelRegistry, TextEmbedder, WeightResolver,
};
use embedfleet_proto::Modality;

const BATCH: usize = 32;

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

/// Where `per_model_latency` finds each catalogue model's weights, and the label its bench ids
/// carry: `real` (the real checkpoint), `real-<name>` (a real, smaller checkpoint of the same
/// architecture in the model's slot: the width rule) or `fixture` (the architecture tests' tiny
/// random checkpoint: the code path's cost, nothing about the real model's speed).
fn weight_source(name: &str) -> (std::path::PathBuf, &'static str) {
    let fixtures = embedfleet_benches::bench_dir()
        .join("../crates/embedfleet-models/tests/fixtures/checkpoints");
    let has = |dir: &std::path::Path| dir.join(name).join("model.safetensors").is_file();
    let real = models_dir();
    if has(&real) {
        return (real, "real");
    }
    let smaller_real = match name {
        "whisper-large" => Some((real.join("whisper-tiny-en"), "real-tiny.en")),
        "e5-mistral" => Some((real.join("smollm2"), "real-smollm2-135m")),
        _ => None,
    };
    if let Some((dir, label)) = smaller_real.filter(|(dir, _)| has(dir)) {
        return (dir, label);
    }
    let variant = match name {
        "sentence-t5-xxl" => "t5-relu",
        "instructor-xl" => "t5-gated",
        "e5-mistral" => "mistral-gqa2-sharded",
        "clip-vit-l" => "clip",
        _ => "bert-family",
    };
    (fixtures.join(variant), "fixture")
}

/// The inputs a model is timed on: sentences for text models, the fixture images for CLIP, the
/// fixture speech clip for Whisper; and the batch size (Whisper reads a whole 30-s window per
/// clip, so its batch is 4).
fn bench_inputs(model: &dyn EmbeddingModel) -> (Vec<ModelInput>, usize) {
    let media = embedfleet_benches::bench_dir().join("../crates/embedfleet-models/tests/fixtures");
    let spec = model.spec();
    if spec.takes(Modality::Image) {
        let images = [
            "photo.jpg",
            "shapes.png",
            "gradient.png",
            "wide.png",
            "lossless.webp",
        ]
        .iter()
        .map(|file| ModelInput::Image {
            bytes: std::fs::read(media.join("images").join(file)).expect("fixture image"),
            format: None,
        })
        .collect();
        return (images, BATCH);
    }
    if spec.takes(Modality::Audio) {
        let clip = std::fs::read(media.join("audio/speech-16k.wav")).expect("fixture clip");
        let input = ModelInput::Audio {
            bytes: clip,
            sample_rate: None,
        };
        return (vec![input], 4);
    }
    let texts = sentences().into_iter().map(ModelInput::Text).collect();
    (texts, BATCH)
}

/// `per_model_latency`: every catalogue model that loads here, one input per call
/// (`<model>@<source>/single`) and a batch (`<model>@<source>/batch<N>`); see
/// [`weight_source`] for what `<source>` says.
fn bench_models(c: &mut Criterion) {
    let options = EmbedOptions::default();
    for spec in catalogue::CATALOGUE {
        let name = spec.name;
        let (dir, source) = weight_source(name);
        eprintln!("models bench: loading {name} ({source}, {})", dir.display());
        let registry = ModelRegistry::new(
            WeightResolver {
                models_dir: Some(dir),
                offline: true,
            },
            Device::Cpu,
        );
        let model = match registry.get(name) {
            Ok(model) => model,
            Err(e) => {
                eprintln!("models bench: {name} skipped: {e}");
                continue;
            }
        };
        let (inputs, batch_size) = bench_inputs(model.as_ref());
        let batch: Vec<ModelInput> = inputs.iter().cycle().take(batch_size).cloned().collect();
        let label = format!("{name}@{source}");

        let mut group = c.benchmark_group("per_model_latency");
        group
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(8))
            .sample_size(20);

        // One input per call, cycling through the set as the Python side does.
        group.throughput(Throughput::Elements(1));
        let mut next = 0;
        group.bench_function(BenchmarkId::new(&label, "single"), |b| {
            b.iter(|| {
                let input = &inputs[next % inputs.len()];
                next += 1;
                model
                    .embed_batch(std::slice::from_ref(input), &options)
                    .expect("embeds")
            })
        });

        group.throughput(Throughput::Elements(batch_size as u64));
        let id = BenchmarkId::new(&label, format!("batch{batch_size}"));
        group.bench_with_input(id, &batch[..], |b, batch| {
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

criterion_group!(benches, bench_models, bench_dtypes, bench_decoder);
criterion_main!(benches);
