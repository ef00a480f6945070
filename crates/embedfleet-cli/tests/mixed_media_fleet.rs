//! One request mixing an image, a text and a sound through `embedfleet serve` over NATS, on the
//! CLIP fixture checkpoint, the real minilm and the real Whisper tiny.en (in the whisper-large
//! slot):
//!
//! - every input gets a fused vector; which partials exist shows FuseMoE's presence mask (the
//!   image reaches clip-vit-l only, the text clip-vit-l and minilm, the sound whisper-large
//!   only), and `experts` shows the routing of each;
//! - a repeat of the request comes from the cache in the same shape;
//! - the Python example (`examples/python/embed.py --image --audio`, plain nats-py, no
//!   embedfleet code) gets the same vectors as a Rust client.
//!
//! Needs `models/whisper-tiny-en` (scripts/fetch-models.sh) and Python's `nats` package
//! (`pip install -r examples/python/requirements.txt`, which scripts/test.sh does); without the
//! Whisper checkpoint the test says so and passes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

mod support;
use support::*;

const MODELS: &str = "clip-vit-l,minilm,whisper-large";
const WAIT: Duration = Duration::from_secs(120);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../embedfleet-models/tests/fixtures")
}

fn image_file() -> PathBuf {
    fixtures().join("images/shapes.png")
}

fn audio_file() -> PathBuf {
    fixtures().join("audio/speech-16k.wav")
}

/// A `--model-dir` with the three models, if the converted Whisper checkpoint is there.
fn model_dir() -> Option<tempfile::TempDir> {
    let whisper = models_dir().join("whisper-tiny-en/whisper-large");
    if !whisper.join("model.safetensors").is_file() {
        eprintln!("SKIPPED: no models/whisper-tiny-en (scripts/fetch-models.sh makes it)");
        return None;
    }
    Some(linked_model_dir(&[
        (
            &fixtures().join("checkpoints/clip/clip-vit-l"),
            "clip-vit-l",
        ),
        (&models_dir().join("minilm"), "minilm"),
        (&whisper, "whisper-large"),
    ]))
}

fn base64_of(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

/// The request the Python example sends for `--image shapes.png --audio speech-16k.wav`.
fn mixed_request(extra: Value) -> Value {
    let mut request = json!({
        "inputs": [
            { "image_b64": base64_of(&image_file()), "format": "png" },
            { "text": "hello" },
            { "audio_b64": base64_of(&audio_file()) },
        ],
        "models": ["clip-vit-l", "minilm", "whisper-large"],
    });
    for (key, value) in extra.as_object().unwrap() {
        request[key] = value.clone();
    }
    request
}

fn partial_models(element: &Value) -> BTreeSet<&str> {
    element["partials"]
        .as_object()
        .unwrap_or_else(|| panic!("no partials in {:.300}", element.to_string()))
        .keys()
        .map(String::as_str)
        .collect()
}

/// `experts` of a fused element: gate weights summing to 1, non-zero exactly on `selected`.
fn check_experts(element: &Value) -> Vec<u64> {
    let experts = &element["experts"];
    let weights = vector(&experts["weights"]);
    let selected: Vec<u64> = experts["selected"]
        .as_array()
        .unwrap_or_else(|| panic!("no experts in {:.300}", element.to_string()))
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    assert!(!selected.is_empty());
    let sum: f32 = weights.iter().sum();
    assert!((sum - 1.0).abs() < 1e-4, "gate weights sum to {sum}");
    for (i, weight) in weights.iter().enumerate() {
        assert_eq!(
            *weight > 0.0,
            selected.contains(&(i as u64)),
            "expert {i}: weight {weight}, selected {selected:?}"
        );
    }
    selected
}

/// The first five values of each fused vector, from the example's
/// `input I: dimension D, first values: [a, b, c, d, e, ...]` lines.
fn python_heads(stdout: &str) -> Vec<(usize, usize, Vec<f32>)> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("input "))
        .map(|rest| {
            let (index, rest) = rest.split_once(": dimension ").unwrap();
            let (dimension, rest) = rest.split_once(", first values: [").unwrap();
            let values = rest
                .trim_end_matches(", ...]")
                .split(", ")
                .map(|x| x.parse().unwrap())
                .collect();
            (index.parse().unwrap(), dimension.parse().unwrap(), values)
        })
        .collect()
}

#[test]
fn text_image_and_audio_in_one_request_and_from_python() {
    let Some(dir) = model_dir() else {
        return;
    };
    let server = embedfleet_testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut serve = start_role(
        "serve",
        &[
            "serve",
            "--nats-url",
            &url,
            "--models",
            MODELS,
            "--model-dir",
            dir.path().to_str().unwrap(),
        ],
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (first, repeat) = runtime.block_on(async {
        let nats = client(&url).await;
        // Ready: a small request answers (a retried one could land in the cache, so not the
        // request under test).
        wait_for_success(
            &nats,
            &json!({ "input": "warm up", "models": ["minilm"] }),
            WAIT,
        )
        .await;
        let request = mixed_request(json!({ "return_partials": true }));
        let first = request_json(&nats, &request, WAIT)
            .await
            .ok("the mixed request");
        let repeat = request_json(&nats, &request, WAIT).await.ok("the repeat");
        (first, repeat)
    });

    let data = check_fused_reply(&first, 3);
    let want: [&[&str]; 3] = [
        &["clip-vit-l"],
        &["clip-vit-l", "minilm"],
        &["whisper-large"],
    ];
    for (element, models) in data.iter().zip(want) {
        assert_eq!(
            partial_models(element),
            models.iter().copied().collect(),
            "input {}",
            element["index"]
        );
        check_experts(element);
        assert_eq!(element["cached"].as_bool().unwrap_or(false), false);
    }
    // Three different presence masks over three different inputs: three different vectors.
    let fused: Vec<Vec<f32>> = data.iter().map(|e| vector(&e["embedding"])).collect();
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let similarity = cosine(&fused[a], &fused[b]);
        assert!(
            similarity < 0.999,
            "inputs {a} and {b}: cosine {similarity}"
        );
    }

    let again = check_fused_reply(&repeat, 3);
    for (element, before) in again.iter().zip(&data) {
        assert_eq!(element["cached"], true, "a repeat comes from the cache");
        assert_eq!(partial_models(element), partial_models(before));
        assert_eq!(check_experts(element), check_experts(before));
        assert!(
            cosine(
                &vector(&element["embedding"]),
                &vector(&before["embedding"])
            ) > 0.999999
        );
    }

    let python = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python/embed.py"))
        .arg(&url)
        .arg("--image")
        .arg(image_file())
        .arg("--audio")
        .arg(audio_file())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&python.stdout);
    let stderr = String::from_utf8_lossy(&python.stderr);
    assert!(
        !stderr.contains("No module named 'nats'"),
        "the Python example needs nats-py: pip install -r examples/python/requirements.txt"
    );
    assert!(
        python.status.success(),
        "python example failed: {stderr}\nserve:\n{}",
        serve.log()
    );
    let heads = python_heads(&stdout);
    assert_eq!(heads.len(), 3, "{stdout}");
    for ((index, dimension, head), want) in heads.iter().zip(&fused) {
        assert_eq!(*dimension, FUSED_DIM);
        for (got, want) in head.iter().zip(want) {
            // Printed with four decimals.
            assert!(
                (got - want).abs() <= 6e-5,
                "input {index}: python {got} vs rust {want}"
            );
        }
    }
    serve
        .terminate_within(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The command line, `embed --image cat.png --audio hello.wav "a cat"`: one file per
/// flag, so the text after `--audio FILE` stays a text; three fused vectors, image first.
#[test]
fn embed_image_audio_and_text_in_process() {
    let Some(dir) = model_dir() else {
        return;
    };
    let output = run_with_stdin(
        embedfleet(&[
            "embed",
            "--models",
            MODELS,
            "--model-dir",
            dir.path().to_str().unwrap(),
            "--partials",
            "--image",
            image_file().to_str().unwrap(),
            "--audio",
            audio_file().to_str().unwrap(),
            "a cat",
        ]),
        None,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let elements: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(elements.len(), 3);
    let want: [&[&str]; 3] = [
        &["clip-vit-l"],
        &["clip-vit-l", "minilm"],
        &["whisper-large"],
    ];
    for (element, models) in elements.iter().zip(want) {
        assert_eq!(vector(&element["embedding"]).len(), FUSED_DIM);
        assert_eq!(partial_models(element), models.iter().copied().collect());
    }
}
