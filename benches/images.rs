//! Image input and CLIP bench.
//!
//! `image_preprocess`: encoded bytes to the 3 x 224 x 224 pixel tensor (`image_input.rs`), per
//! image: the fixture images (`photo.png` 160 x 120 upscaled, `photo.jpg`, `shapes.png` 300 x 200
//! downscaled) and a 1920 x 1080 JPEG made here (a camera-sized input); `decode` and `resize`
//! of that JPEG apart, to show where the time goes (the resize is PIL's exact fixed-point
//! bicubic, over the crop window only).
//!
//! `clip-fixture`: the CLIP towers on the small random fixture checkpoint of the architecture
//! tests (`crates/embedfleet-models/tests/fixtures/checkpoints/clip/`: two layers of width 32 and
//! 24), through the registry: one image, 16 images, 32 texts. Labelled so: it tracks the path's
//! own cost (patch unfolding, towers, pooling) from change to change and says nothing about
//! ViT-L/14's speed. No real CLIP weights are here.

use std::io::Cursor;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embedfleet_benches::{bench_dir, sentences};
use embedfleet_models::image_input::{self, ImageLimits, ImagePreprocessor};
use embedfleet_models::{Device, EmbedOptions, ModelInput, ModelRegistry, WeightResolver};

fn fixtures() -> std::path::PathBuf {
    bench_dir().join("../crates/embedfleet-models/tests/fixtures")
}

/// A 1920 x 1080 JPEG (quality 90) of smooth gradients and texture, made once.
fn camera_jpeg() -> Vec<u8> {
    let (width, height) = (1920u32, 1080u32);
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        let texture = ((x * 7 + y * 13) % 29) as u8;
        image::Rgb([
            (x * 255 / width) as u8 ^ texture,
            (y * 255 / height) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&pixels)
        .expect("encode");
    out.into_inner()
}

fn bench_preprocess(c: &mut Criterion) {
    let limits = ImageLimits::default();
    let preprocessor = ImagePreprocessor::default();
    let mut inputs: Vec<(String, Vec<u8>)> = ["photo.png", "photo.jpg", "shapes.png"]
        .iter()
        .map(|name| {
            let bytes = std::fs::read(fixtures().join("images").join(name)).expect("fixture");
            (name.to_string(), bytes)
        })
        .collect();
    inputs.push(("camera-1920x1080.jpg".into(), camera_jpeg()));
    let mut group = c.benchmark_group("image_preprocess");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    for (name, bytes) in &inputs {
        group.bench_with_input(
            BenchmarkId::new("bytes-to-tensor", name),
            bytes,
            |b, bytes| {
                b.iter(|| {
                    let image = image_input::decode(bytes, &limits).expect("decodes");
                    preprocessor.pixels(&image)
                })
            },
        );
    }
    let (_, camera) = inputs.last().expect("camera jpeg");
    group.bench_function("decode/camera-1920x1080.jpg", |b| {
        b.iter(|| image_input::decode(camera, &limits).expect("decodes"))
    });
    let decoded = image_input::decode(camera, &limits).expect("decodes");
    group.bench_function("resize-crop-normalise/camera-1920x1080", |b| {
        b.iter(|| preprocessor.pixels(&decoded))
    });
    group.finish();
}

fn bench_clip_fixture(c: &mut Criterion) {
    let registry = ModelRegistry::new(
        WeightResolver {
            models_dir: Some(fixtures().join("checkpoints/clip")),
            offline: true,
        },
        Device::Cpu,
    );
    let model = registry.get("clip-vit-l").expect("fixture loads");
    let image = ModelInput::Image {
        bytes: std::fs::read(fixtures().join("images/photo.png")).expect("fixture"),
        format: Some("png".into()),
    };
    let images = vec![image.clone(); 16];
    let texts: Vec<ModelInput> = sentences()
        .into_iter()
        .take(32)
        .map(ModelInput::Text)
        .collect();
    let options = EmbedOptions::default();
    let mut group = c.benchmark_group("clip-fixture");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    for (label, batch) in [
        ("image", std::slice::from_ref(&image)),
        ("images", &images[..]),
        ("texts", &texts[..]),
    ] {
        group.throughput(Throughput::Elements(batch.len() as u64));
        group.bench_with_input(BenchmarkId::new(label, batch.len()), batch, |b, batch| {
            b.iter(|| model.embed_batch(batch, &options).expect("embeds"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_preprocess, bench_clip_fixture);
criterion_main!(benches);
