//! CLIP (`clip-vit-l`) against transformers, on the small random `CLIPModel` checkpoint and the
//! test images `scripts/fixtures/make_clip.py` writes: our pixel tensors against
//! `CLIPImageProcessor`'s (PIL backend), our image and text vectors against
//! `get_image_features` / `get_text_features`, and every bad image a typed error with its wire
//! code. The model loads through the registry, as the fleet loads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use embedfleet_models::image_input::{
    self, ImageLimits, ImagePreprocessor, RgbImage, CLIP_MEAN, CLIP_STD,
};
use embedfleet_models::{
    Device, EmbedOptions, EmbeddingModel, ModelError, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::ErrorKind;
use serde_json::Value;

const MIN_COSINE: f32 = 0.9999;
/// The bound on our pixel tensor against transformers'.
const MAX_PIXEL_DIFF: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn images_dir() -> PathBuf {
    fixtures().join("images")
}

fn model() -> Arc<dyn EmbeddingModel> {
    ModelRegistry::new(
        WeightResolver {
            models_dir: Some(fixtures().join("checkpoints/clip")),
            offline: true,
        },
        Device::Cpu,
    )
    .get("clip-vit-l")
    .unwrap_or_else(|e| panic!("clip-vit-l: {e}"))
}

fn reference() -> Value {
    let path = fixtures().join("checkpoints/clip/clip-vit-l/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn image_names(reference: &Value) -> Vec<String> {
    reference["images"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn image(name: &str) -> ModelInput {
    ModelInput::Image {
        bytes: std::fs::read(images_dir().join(name)).unwrap(),
        format: None,
    }
}

fn vector(value: &Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn raw() -> EmbedOptions {
    EmbedOptions {
        normalize: false,
        ..EmbedOptions::default()
    }
}

/// A reference PNG as the RGB image our preprocessing reads.
fn png(path: &Path) -> RgbImage {
    let image = image_input::decode(&std::fs::read(path).unwrap(), &ImageLimits::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(image.channels, 3, "{}", path.display());
    image
}

/// transformers' pixel tensor, from the 8-bit crop the fixture stores it as (the generator
/// checks that this recovers the tensor to 1e-6), in transformers' precisions.
fn reference_tensor(crop: &RgbImage) -> Vec<f32> {
    let plane = crop.width * crop.height;
    let mut tensor = vec![0f32; 3 * plane];
    for (i, pixel) in crop.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let scaled = (f64::from(pixel[c]) * (1.0 / 255.0)) as f32;
            tensor[c * plane + i] = (scaled - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    tensor
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn preprocessor() -> ImagePreprocessor {
    let path = fixtures().join("checkpoints/clip/clip-vit-l/preprocessor_config.json");
    ImagePreprocessor::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pixel_tensors_match_clip_image_processor() {
    let reference = reference();
    let preprocessor = preprocessor();
    for name in image_names(&reference) {
        let entry = &reference["images"][&name];
        let want = reference_tensor(&png(&images_dir().join(entry["pixels"].as_str().unwrap())));
        let ours = image_input::decode(
            &std::fs::read(images_dir().join(&name)).unwrap(),
            &ImageLimits::default(),
        )
        .unwrap();
        let diff = max_diff(&preprocessor.pixels(&ours), &want);
        eprintln!("{name}: max |ours - transformers| = {diff:.2e}");
        if name.ends_with(".jpg") {
            // zune-jpeg and libjpeg-turbo round some samples differently; held apart below.
            assert!(diff < 0.1, "{name}: {diff}");
        } else {
            assert!(diff <= MAX_PIXEL_DIFF, "{name}: {diff}");
        }
    }
}

/// On the pixels PIL decoded, our preprocessing is transformers' exactly; our JPEG decoder's
/// difference from libjpeg is measured on its own.
#[test]
fn jpeg_preprocessing_is_exact_on_pils_decode_and_the_decoders_differ_by_little() {
    let reference = reference();
    let entry = &reference["images"]["photo.jpg"];
    let pil = png(&images_dir().join(entry["decoded"].as_str().unwrap()));
    let want = reference_tensor(&png(&images_dir().join(entry["pixels"].as_str().unwrap())));
    let diff = max_diff(&preprocessor().pixels(&pil), &want);
    assert!(
        diff <= MAX_PIXEL_DIFF,
        "preprocessing on PIL's decode: {diff}"
    );

    let ours = image_input::decode(
        &std::fs::read(images_dir().join("photo.jpg")).unwrap(),
        &ImageLimits::default(),
    )
    .unwrap();
    assert_eq!((ours.width, ours.height), (pil.width, pil.height));
    let levels: Vec<i32> = ours
        .data
        .iter()
        .zip(&pil.data)
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .collect();
    let worst = levels.iter().copied().max().unwrap();
    let differing = levels.iter().filter(|&&d| d > 0).count() as f64 / levels.len() as f64;
    eprintln!(
        "photo.jpg: our decode vs libjpeg: max {worst} levels, {:.2}% of samples differ",
        differing * 100.0
    );
    assert!(worst <= 3, "{worst} levels");
}

#[test]
fn image_vectors_match_transformers() {
    let reference = reference();
    let names = image_names(&reference);
    let inputs: Vec<ModelInput> = names.iter().map(|name| image(name)).collect();
    let model = model();
    let got = model.embed_batch(&inputs, &raw()).unwrap();
    for (name, embedding) in names.iter().zip(&got) {
        let want = vector(&reference["images"][name]["vector"]);
        let similarity = cosine(&embedding.vector, &want);
        eprintln!("{name}: cosine {similarity:.7}");
        assert!(similarity >= MIN_COSINE, "{name}: {similarity}");
        assert_eq!(embedding.tokens, 257, "{name}: 16 x 16 patches + class");
    }
}

#[test]
fn text_vectors_match_transformers() {
    let reference = reference();
    let texts = reference["texts"].as_array().unwrap();
    let inputs: Vec<ModelInput> = texts
        .iter()
        .map(|t| ModelInput::Text(t["text"].as_str().unwrap().to_string()))
        .collect();
    let got = model().embed_batch(&inputs, &raw()).unwrap();
    for (entry, embedding) in texts.iter().zip(&got) {
        let text = entry["text"].as_str().unwrap();
        let label: String = text.chars().take(30).collect();
        assert_eq!(
            embedding.tokens as u64,
            entry["tokens"].as_u64().unwrap(),
            "{label}"
        );
        let similarity = cosine(&embedding.vector, &vector(&entry["vector"]));
        assert!(similarity >= MIN_COSINE, "{label}: {similarity}");
    }
}

/// A batch mixing both towers answers in input order, each input as it is alone, normalised.
#[test]
fn a_mixed_batch_keeps_input_order() {
    let model = model();
    let inputs = vec![
        ModelInput::Text("a photo of a cat".into()),
        image("shapes.png"),
        ModelInput::Text("a red circle".into()),
        image("gray.png"),
    ];
    let together = model
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    for (input, embedding) in inputs.iter().zip(&together) {
        let alone = model
            .embed_batch(std::slice::from_ref(input), &EmbedOptions::default())
            .unwrap();
        assert!(cosine(&alone[0].vector, &embedding.vector) > 0.99999);
        let norm: f32 = embedding.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert_eq!(model.dim(), 16);
}

fn error_of(model: &dyn EmbeddingModel, inputs: &[ModelInput], label: &str) -> ModelError {
    match model.embed_batch(inputs, &raw()) {
        Ok(_) => panic!("{label}: accepted"),
        Err(error) => error,
    }
}

fn bytes(inputs: Vec<u8>) -> ModelInput {
    ModelInput::Image {
        bytes: inputs,
        format: Some("png".into()),
    }
}

/// A real, complete PNG of `width x height` one-bit pixels, all black: tens of KiB that decode
/// to gigabytes. Streamed row by row, so the test itself stays small.
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::One);
        encoder.set_compression(png::Compression::High);
        let mut writer = encoder.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; width.div_ceil(8) as usize];
        for _ in 0..height {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

fn tiny_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer
            .write_image_data(&vec![128; (width * height * 3) as usize])
            .unwrap();
        writer.finish().unwrap();
    }
    out
}

#[test]
fn bad_images_are_typed_errors_with_their_codes() {
    let model = model();
    let photo = std::fs::read(images_dir().join("photo.png")).unwrap();
    let jpeg = std::fs::read(images_dir().join("photo.jpg")).unwrap();
    let gif = std::fs::read(images_dir().join("frames.gif")).unwrap();
    let webp = std::fs::read(images_dir().join("lossless.webp")).unwrap();
    let mut corrupt = photo.clone();
    // Past the signature and IHDR: the compressed pixel data turns to garbage.
    for byte in corrupt.iter_mut().skip(100).step_by(7) {
        *byte ^= 0x5a;
    }
    let bomb = png_bomb(20_000, 20_000);
    assert!(bomb.len() < 200 << 10, "the bomb is {} bytes", bomb.len());
    // BMP and TIFF signatures: real formats this build does not decode.
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0; 60]);
    let cases: Vec<(&str, Vec<u8>, ErrorKind)> = vec![
        (
            "truncated png",
            photo[..photo.len() / 2].to_vec(),
            ErrorKind::InvalidMedia,
        ),
        (
            "truncated jpeg",
            jpeg[..jpeg.len() / 3].to_vec(),
            ErrorKind::InvalidMedia,
        ),
        (
            "truncated gif",
            gif[..gif.len() / 4].to_vec(),
            ErrorKind::InvalidMedia,
        ),
        (
            "truncated webp",
            webp[..webp.len() / 2].to_vec(),
            ErrorKind::InvalidMedia,
        ),
        ("corrupt png", corrupt, ErrorKind::InvalidMedia),
        (
            "png signature only",
            photo[..8].to_vec(),
            ErrorKind::InvalidMedia,
        ),
        ("bmp", bmp, ErrorKind::UnsupportedMedia),
        (
            "tiff",
            b"II*\0\x08\0\0\0".to_vec(),
            ErrorKind::UnsupportedMedia,
        ),
        (
            "not an image",
            b"hello, world".to_vec(),
            ErrorKind::UnsupportedMedia,
        ),
        ("1x1", tiny_png(1, 1), ErrorKind::UnsupportedMedia),
        ("20000x20000 bomb", bomb, ErrorKind::TooLarge),
    ];
    for (label, data, kind) in cases {
        // Second in the batch, after a good text, so the error must name index 1.
        let error = error_of(
            model.as_ref(),
            &[ModelInput::Text("a cat".into()), bytes(data)],
            label,
        );
        assert_eq!(error.kind(), kind, "{label}: {error}");
        assert!(
            matches!(error, ModelError::BadImage { index: 1, .. }),
            "{label}: {error:?}"
        );
        assert!(error.is_permanent_for_input(), "{label}");
        let code = embedfleet_proto::ProtoError::from(&error).code();
        assert_eq!(code, kind.code(), "{label}");
    }
    // The model is unharmed: a good image still embeds.
    assert!(model.embed_batch(&[image("shapes.png")], &raw()).is_ok());
    // 2 x 2 is the smallest accepted.
    assert!(model.embed_batch(&[bytes(tiny_png(2, 2))], &raw()).is_ok());
}

#[test]
fn limits_are_configurable_and_checked_before_decoding() {
    let strict = ImageLimits {
        max_side: 100,
        max_pixels: 5_000,
        min_side: 10,
    };
    let photo = std::fs::read(images_dir().join("photo.png")).unwrap(); // 160 x 120
    let error = image_input::decode(&photo, &strict).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    assert!(error.to_string().contains("160 x 120"), "{error}");
    // The header alone is enough to refuse: the pixel data can be missing.
    let idat = photo.windows(4).position(|w| w == b"IDAT").unwrap();
    let error = image_input::decode(&photo[..idat + 4], &strict).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    let gradient = std::fs::read(images_dir().join("gradient.png")).unwrap(); // 64 x 48
    assert!(image_input::decode(&gradient, &strict).is_ok());
    let gray = std::fs::read(images_dir().join("gray.png")).unwrap(); // 120 x 160
    let error = image_input::decode(&gray, &strict).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooLarge, "{error}");
    let error = image_input::decode(
        &gray,
        &ImageLimits {
            min_side: 200,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnsupportedMedia, "{error}");
}

/// Byte mutations of every test image: whatever the decoders meet, an answer or a typed error,
/// never a panic. Bounded: a fixed seed and a fixed number of mutants (a few seconds).
#[test]
fn mutated_images_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let preprocessor = preprocessor();
    let limits = ImageLimits::default();
    let reference = reference();
    let mut outcomes = [0usize; 2];
    for name in image_names(&reference) {
        let original = std::fs::read(images_dir().join(&name)).unwrap();
        for _ in 0..60 {
            let mut data = original.clone();
            match rng.random_range(0..3) {
                0 => {
                    for _ in 0..rng.random_range(1..8) {
                        let at = rng.random_range(0..data.len());
                        data[at] = rng.random();
                    }
                }
                1 => data.truncate(rng.random_range(0..data.len())),
                _ => {
                    let at = rng.random_range(0..data.len());
                    let len = rng.random_range(1..64).min(data.len() - at);
                    data.drain(at..at + len);
                }
            }
            let outcome = std::panic::catch_unwind(|| {
                image_input::decode(&data, &limits).map(|image| preprocessor.pixels(&image).len())
            });
            match outcome {
                Ok(Ok(len)) => {
                    assert_eq!(len, 3 * 224 * 224, "{name}");
                    outcomes[0] += 1;
                }
                Ok(Err(error)) => {
                    assert!(matches!(
                        error.kind(),
                        ErrorKind::InvalidMedia | ErrorKind::UnsupportedMedia | ErrorKind::TooLarge
                    ));
                    outcomes[1] += 1;
                }
                Err(_) => panic!("{name}: a mutant panicked the decoder"),
            }
        }
    }
    eprintln!("mutants: {} decoded, {} refused", outcomes[0], outcomes[1]);
    assert!(
        outcomes[1] > 0,
        "no mutant was refused: the mutations do nothing"
    );
}
