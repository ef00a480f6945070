//! Every architecture at every dtype against its own f32 vectors, on the CPU (candle's quantised
//! matmul runs there): the fixture checkpoints of each architecture (small random models,
//! `tests/fixtures/checkpoints/`), the real minilm (BERT) and mpnet (MPNet) weights, and the
//! real SmolLM2 decoder in the e5-mistral slot when `scripts/fetch-models.sh` made it.
//!
//! The floors are measured, with a margin, not wished for (docs/benchmarks.md, "Quantised
//! weights", has the measured minima). Random fixture weights are the hard case for quantisation:
//! every weight is as large as any other, there are no outlier-free trained distributions, and a
//! 48-wide model has few dimensions to average errors out over; so their floors are lower than
//! the real models'. On the real models, the STS-B Spearman in docs/benchmarks.md is what says
//! whether a dtype is good enough; these floors catch a broken path (wrong layout, wrong block,
//! a layer left out), which shows up as cosines near 0, not 0.98.

use std::path::{Path, PathBuf};

use embedfleet_models::{
    Device, Dtype, EmbedOptions, EmbeddingModel, ModelDtypes, ModelError, ModelInput,
    ModelRegistry, WeightResolver,
};
use embedfleet_testkit::reference_fixture;

fn checkpoints() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoints")
}

fn models_dir() -> PathBuf {
    std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn registry(dir: &Path, dtypes: ModelDtypes) -> ModelRegistry {
    ModelRegistry::new(
        WeightResolver {
            models_dir: Some(dir.to_path_buf()),
            offline: true,
        },
        Device::Cpu,
    )
    .with_dtypes(dtypes)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn embed(model: &dyn EmbeddingModel, inputs: &[ModelInput]) -> Vec<Vec<f32>> {
    model
        .embed_batch(inputs, &EmbedOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", model.spec().name))
        .into_iter()
        .map(|e| e.vector)
        .collect()
}

/// The lowest cosine over the inputs at each dtype is at least that dtype's floor; the loaded
/// model reports its dtype and a revision of its own.
fn check(dir: &Path, name: &str, floors: &[(Dtype, f32)]) {
    let inputs: Vec<ModelInput> = reference_fixture()
        .inputs
        .into_iter()
        .map(ModelInput::Text)
        .collect();
    let f32_model = registry(dir, ModelDtypes::all(Dtype::F32))
        .get(name)
        .unwrap();
    let want = embed(f32_model.as_ref(), &inputs);
    let mut below = Vec::new();
    for &(dtype, floor) in floors {
        let model = registry(dir, ModelDtypes::all(dtype)).get(name).unwrap();
        assert_eq!(model.dtype(), dtype);
        assert_eq!(model.revision(), dtype.revision(f32_model.revision()));
        let got = embed(model.as_ref(), &inputs);
        let lowest = got
            .iter()
            .zip(&want)
            .map(|(g, w)| cosine(g, w))
            .fold(f32::INFINITY, f32::min);
        eprintln!(
            "{} {name} {dtype}: lowest cosine to f32 {lowest:.5}",
            dir.display()
        );
        if lowest < floor {
            below.push(format!("{dtype}: {lowest} < {floor}"));
        }
    }
    assert!(
        below.is_empty(),
        "{} {name}, lowest cosine to f32 under the floor: {below:?}",
        dir.display()
    );
}

/// Real encoder weights, floors under the lowest cosine measured over the 27 reference inputs
/// (minilm / mpnet, 2026-11-27): f16 0.99998 / 0.99993, bf16 0.9960 / 0.9836, q8_0 0.9985 /
/// 0.9977, q4k 0.9473 / 0.9540. bf16 keeps 8 mantissa bits to f16's 11, and it shows.
const REAL: [(Dtype, f32); 4] = [
    (Dtype::F16, 0.9995),
    (Dtype::Bf16, 0.98),
    (Dtype::Q8_0, 0.995),
    (Dtype::Q4k, 0.93),
];

#[test]
fn minilm_at_every_dtype_stays_close_to_f32() {
    check(&models_dir(), "minilm", &REAL);
}

#[test]
fn mpnet_at_every_dtype_stays_close_to_f32() {
    check(&models_dir(), "mpnet", &REAL);
}

/// Random fixture weights (see the file header); lowest measured over every fixture: bf16 0.9940,
/// q8_0 0.9952, q4k 0.8323 (mistral-gqa2-sharded; the T5 fixtures 0.9267), f16 0.9999.
const FIXTURE: [(Dtype, f32); 3] = [(Dtype::Bf16, 0.99), (Dtype::Q8_0, 0.99), (Dtype::Q4k, 0.8)];

#[test]
fn t5_fixtures_at_every_dtype_but_f16_stay_close_to_f32() {
    for variant in ["t5-relu", "t5-gated"] {
        for name in ["sentence-t5-xxl", "instructor-xl"] {
            check(&checkpoints().join(variant), name, &FIXTURE);
        }
    }
}

#[test]
fn mistral_fixtures_at_every_dtype_stay_close_to_f32() {
    for variant in [
        "mistral-mha",
        "mistral-gqa4-headdim",
        "mistral-gqa2-sharded",
    ] {
        let mut floors = FIXTURE.to_vec();
        floors.push((Dtype::F16, 0.999));
        check(&checkpoints().join(variant), "e5-mistral", &floors);
    }
}

#[test]
fn real_decoder_at_every_dtype_stays_close_to_f32() {
    let dir = models_dir().join("smollm2");
    if !dir.join("e5-mistral/model.safetensors").is_file() {
        eprintln!("no models/smollm2 (scripts/fetch-models.sh): real decoder skipped");
        return;
    }
    // Measured: f16 0.9975, q8_0 0.9927, q4k 0.9377; bf16 only 0.8051 (the lowest input; 30 layers
    // of a bf16 residual stream and rotary tables), so the decoder's half precision is f16.
    let floors = [
        (Dtype::F16, 0.995),
        (Dtype::Bf16, 0.75),
        (Dtype::Q8_0, 0.985),
        (Dtype::Q4k, 0.9),
    ];
    check(&dir, "e5-mistral", &floors);
}

#[test]
fn f16_t5_is_a_typed_error_naming_the_reason() {
    let dtypes: ModelDtypes = "sentence-t5-xxl=f16".parse().unwrap();
    let error = registry(&checkpoints().join("t5-relu"), dtypes)
        .get("sentence-t5-xxl")
        .err()
        .expect("T5 must refuse f16");
    assert!(
        matches!(&error, ModelError::UnsupportedDtype { model, dtype: Dtype::F16, reason }
            if model == "sentence-t5-xxl" && reason.contains("bf16")),
        "{error}"
    );
    assert_eq!(error.kind(), embedfleet_proto::ErrorKind::NoWorker);
}
