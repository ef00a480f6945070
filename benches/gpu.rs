//! GPU bench (feature `cuda`; run by scripts/gpu-check.sh where a GPU is lent): each model's
//! batch-1 latency and batch-32 throughput on `cuda:0`, and the FuseMoE forward on the GPU at the
//! full specification shape (12 models: 13,184 → 1,536) and the two-model shape, batch 1 and 32,
//! f32 and bf16 weights.
//!
//! Checkpoints: every `<model>/` folder under `$EMBEDFLEET_GPU_CHECKPOINTS` named after a
//! catalogue model. scripts/gpu/make_full_size.py generates them on the GPU machine with torch:
//! random weights at the real configs' sizes (a 7B e5-mistral, a 335M bge-large...), so the
//! figures are the real shapes' speed and say nothing of quality. Without the variable, the
//! fixture checkpoints run (ids end in `-fixture`: tiny models, figures only for the path's
//! overhead).
//!
//! Dtypes: every model at its GPU default (f16; bf16 for T5), and at q8_0 and q4k too when named
//! in `$GPU_BENCH_QUANTIZED` (comma-separated models).
//!
//! Groups: `gpu_per_model_latency` (`<model>@<dtype>/single`, `<model>@<dtype>/batch32`), `gpu_fusemoe_fusion`
//! (`<shape> <precision>/batch <n>`). Specification targets (GPU): semantic model < 5 ms single,
//! code model < 10 ms, fusion < 3 ms, batch-32 > 100 items/s end to end.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{pseudo_random, sentences};
use embedfleet_fusion::{CudaFuseMoe, FuseMoe, FuseMoeConfig, WeightPrecision};
use embedfleet_models::{
    catalogue, DeviceName, Dtype, EmbedOptions, ModelDtypes, ModelInput, ModelRegistry,
    WeightResolver,
};

const BATCH: usize = 32;
const ALL_MODEL_DIMS: [usize; 12] = [
    384, 1024, 768, 768, 1280, 768, 768, 768, 768, 768, 1024, 4096,
];
const TWO_MODEL_DIMS: [usize; 2] = [384, 768];

/// `(label, checkpoint root, model)` for every checkpoint to bench.
fn checkpoints() -> Vec<(String, PathBuf, &'static str)> {
    let (root, suffix) = match std::env::var_os("EMBEDFLEET_GPU_CHECKPOINTS") {
        Some(root) => (PathBuf::from(root), ""),
        None => (
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../crates/embedfleet-models/tests/fixtures/checkpoints/t5-gated"),
            "-fixture",
        ),
    };
    let mut found: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let spec = catalogue::find(&name).filter(|_| entry.path().is_dir())?;
            Some((format!("{}{suffix}", spec.name), root.clone(), spec.name))
        })
        .collect();
    found.sort();
    found
}

fn bench_models(criterion: &mut Criterion) {
    let device = DeviceName::Cuda(0).open().expect("a CUDA device");
    let sentences: Vec<ModelInput> = sentences().into_iter().map(ModelInput::Text).collect();
    let quantized: Vec<String> = std::env::var("GPU_BENCH_QUANTIZED")
        .map(|list| list.split(',').map(|m| m.trim().to_string()).collect())
        .unwrap_or_default();
    for (label, root, model) in checkpoints() {
        let spec = catalogue::find(model).expect("catalogue model");
        let mut dtypes = vec![Dtype::default_for(spec)];
        if quantized.iter().any(|m| m == model) {
            dtypes.extend([Dtype::Q8_0, Dtype::Q4k]);
        }
        for dtype in dtypes {
            bench_model(criterion, &device, &sentences, &label, &root, model, dtype);
        }
    }
}

fn bench_model(
    criterion: &mut Criterion,
    device: &embedfleet_models::Device,
    sentences: &[ModelInput],
    label: &str,
    root: &std::path::Path,
    model: &str,
    dtype: Dtype,
) {
    let options = EmbedOptions::default();
    let label = format!("{label}@{dtype}");
    eprintln!("gpu bench: loading {label}");
    let resolver = WeightResolver {
        models_dir: Some(root.to_path_buf()),
        offline: true,
    };
    let registry =
        ModelRegistry::new(resolver, device.clone()).with_dtypes(ModelDtypes::all(dtype));
    let model = registry.get(model).unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut group = criterion.benchmark_group("gpu_per_model_latency");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    group.throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function(BenchmarkId::new(&label, "single"), |b| {
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
    group.bench_function(BenchmarkId::new(&label, format!("batch{BATCH}")), |b| {
        b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
    });
    group.finish();
}

fn bench_fusion(criterion: &mut Criterion) {
    for (label, dims) in [
        ("two-model 1152", &TWO_MODEL_DIMS[..]),
        ("full 13184", &ALL_MODEL_DIMS[..]),
    ] {
        eprintln!("gpu bench: building the seeded {label} layer");
        let model = FuseMoe::from_seed(FuseMoeConfig::for_input_dims(dims.to_vec()), 0)
            .expect("seeded layer");
        let partials: Vec<Vec<Vec<f32>>> = (0..BATCH)
            .map(|row| {
                dims.iter()
                    .enumerate()
                    .map(|(slot, &dim)| pseudo_random(dim, (row * 16 + slot) as u64))
                    .collect()
            })
            .collect();
        for (precision, name) in [(WeightPrecision::F32, "f32"), (WeightPrecision::Bf16, "bf16")] {
            let gpu = CudaFuseMoe::new(&model, precision, 0).expect("layer uploads");
            let mut group = criterion.benchmark_group("gpu_fusemoe_fusion");
            group
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2))
                .sample_size(20);
            for batch in [1usize, BATCH] {
                let rows: Vec<Vec<Option<&[f32]>>> = partials[..batch]
                    .iter()
                    .map(|row| row.iter().map(|p| Some(&p[..])).collect())
                    .collect();
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_function(format!("{label} {name}/batch {batch}"), |b| {
                    b.iter(|| gpu.fuse_batch(&rows).expect("fuses"))
                });
            }
            group.finish();
        }
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_fusion(&mut criterion);
    bench_models(&mut criterion);
    criterion.final_summary();
}
