//! Images end to end: `embedfleet embed --image` in process, and the same images as `inputs`
//! through `embedfleet serve` over NATS, on the small random CLIP checkpoint of
//! `crates/embedfleet-models/tests/fixtures/checkpoints/clip/` next to the real minilm. An image
//! reaches clip-vit-l only (minilm's slot is masked: no partial), text reaches both, the fleet's
//! vectors are the in-process ones, and every bad image is a typed error that leaves the fleet
//! serving.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

mod support;
use support::*;

const MODELS: &str = "clip-vit-l,minilm";
/// The fixture's projection width, and minilm's.
const CLIP_DIM: usize = 16;
const WAIT: Duration = Duration::from_secs(60);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../embedfleet-models/tests/fixtures")
}

fn image_path(name: &str) -> String {
    fixtures().join("images").join(name).display().to_string()
}

/// A `--model-dir` with the CLIP fixture and the real minilm.
fn model_dir() -> tempfile::TempDir {
    linked_model_dir(&[
        (
            &fixtures().join("checkpoints/clip/clip-vit-l"),
            "clip-vit-l",
        ),
        (&models_dir().join("minilm"), "minilm"),
    ])
}

fn lines(output: Output) -> Vec<Value> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "embedfleet failed: {stderr}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// What every output of the mixed command must say: images first, each with a clip-vit-l
/// partial only, then the text with both; every fused vector full width.
fn check_mixed(elements: &[Value]) {
    assert_eq!(elements.len(), 3, "{elements:?}");
    for (i, element) in elements.iter().enumerate() {
        assert_eq!(element["index"], i);
        assert_eq!(vector(&element["embedding"]).len(), FUSED_DIM);
        let partials = element["partials"].as_object().unwrap();
        assert_eq!(vector(&partials["clip-vit-l"]).len(), CLIP_DIM);
        assert_eq!(
            partials.contains_key("minilm"),
            i == 2,
            "element {i}: {partials:?}"
        );
    }
    assert_eq!(vector(&elements[2]["partials"]["minilm"]).len(), MINILM_DIM);
}

fn mixed_args<'a>(dir: &'a str, shapes: &'a str, photo: &'a str) -> Vec<&'a str> {
    vec![
        "embed",
        "--models",
        MODELS,
        "--model-dir",
        dir,
        "--partials",
        "--image",
        shapes,
        "--image",
        photo,
        "a red circle",
    ]
}

#[test]
fn embed_takes_images_mixed_with_text() {
    let dir = model_dir();
    let (shapes, photo) = (image_path("shapes.png"), image_path("photo.jpg"));
    let output = run_with_stdin(
        embedfleet(&mixed_args(dir.path().to_str().unwrap(), &shapes, &photo)),
        None,
    );
    check_mixed(&lines(output));

    let missing = run_with_stdin(
        embedfleet(&["embed", "--models", MODELS, "--image", "/nonexistent.png"]),
        None,
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.png"));
}

fn image_item(bytes: &[u8]) -> Value {
    json!({ "image_b64": base64::engine::general_purpose::STANDARD.encode(bytes), "format": "png" })
}

/// A complete PNG of 20,000 x 20,000 one-bit pixels: tens of KiB that decode to gigabytes.
fn png_bomb() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, 20_000, 20_000);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::One);
        encoder.set_compression(png::Compression::High);
        let mut writer = encoder.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; 2_500];
        for _ in 0..20_000 {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

#[test]
fn images_through_the_fleet_match_in_process_and_bad_ones_get_their_codes() {
    let server = embedfleet_testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let dir = model_dir();
    let dir = dir.path().to_str().unwrap();
    let mut serve = start_role(
        "serve",
        &[
            "serve",
            "--nats-url",
            &url,
            "--models",
            MODELS,
            "--model-dir",
            dir,
        ],
    );
    let (shapes, photo) = (image_path("shapes.png"), image_path("photo.jpg"));
    let local = lines(run_with_stdin(
        embedfleet(&mixed_args(dir, &shapes, &photo)),
        None,
    ));
    let mut remote_args = mixed_args(dir, &shapes, &photo);
    remote_args.splice(1..1, ["--nats-url", url.as_str()]);
    let remote = run_with_stdin(embedfleet(&remote_args), None);
    assert!(
        remote.status.success(),
        "{}\nserve:\n{}",
        String::from_utf8_lossy(&remote.stderr),
        serve.log()
    );
    let remote = lines(remote);
    check_mixed(&remote);
    for (fleet, local) in remote.iter().zip(&local) {
        for pointer in ["/embedding", "/partials/clip-vit-l"] {
            let similarity = cosine(
                &vector(fleet.pointer(pointer).unwrap()),
                &vector(local.pointer(pointer).unwrap()),
            );
            assert!(similarity > 0.9999, "{pointer}: {similarity}");
        }
    }

    let photo_bytes = std::fs::read(fixtures().join("images/photo.png")).unwrap();
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0; 60]);
    let one_pixel = tiny_png();
    let cases = [
        (
            "truncated png",
            image_item(&photo_bytes[..photo_bytes.len() / 2]),
            400,
            "invalid_media",
        ),
        ("bmp", image_item(&bmp), 422, "unsupported_media"),
        ("1x1", image_item(&one_pixel), 422, "unsupported_media"),
        (
            "20000x20000 bomb",
            image_item(&png_bomb()),
            413,
            "too_large",
        ),
        (
            "invalid base64",
            json!({ "image_b64": "not base64!" }),
            400,
            "invalid_base64",
        ),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = client(&url).await;
        for (case, item, code, kind) in cases {
            let body = json!({ "inputs": [{ "text": "a cat" }, item], "models": ["clip-vit-l", "minilm"] });
            let outcome = request_json(&client, &body, WAIT).await;
            assert_eq!(outcome.error(case), (code, kind), "{case}: {outcome:?}");
            let good = json!({ "inputs": [image_item(&photo_bytes)], "models": ["clip-vit-l"] });
            match request_json(&client, &good, WAIT).await {
                Outcome::Ok(reply) => assert_eq!(reply["data"].as_array().unwrap().len(), 1),
                error => panic!("after {case}: {error:?}\nserve log:\n{}", serve.log()),
            }
            assert_all_running(&mut [&mut serve]);
        }
    });
    serve
        .terminate_within(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, 1, 1);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[1, 2, 3]).unwrap();
        writer.finish().unwrap();
    }
    out
}
