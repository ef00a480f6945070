//! Audio end to end on real Whisper tiny.en weights (in the whisper-large slot, the width rule)
//! next to the real minilm:
//!
//! - `embedfleet embed "text" --audio a.wav --audio b.mp3` prints one fused vector per input, texts
//!   first; each input's partials show which models took it (minilm the text, whisper-large the
//!   audio);
//! - the same inputs through `embedfleet serve` over NATS (`embed --nats-url`, sending
//!   `inputs` items with `audio_b64`) give the in-process vectors;
//! - bad audio sent as a plain NATS request gets its typed error, and the fleet answers the
//!   next request.
//!
//! Needs `models/whisper-tiny-en` from scripts/fetch-models.sh; without it the tests say so and
//! pass.

use std::path::{Path, PathBuf};
use std::time::Duration;

use embedfleet_proto::{EmbedRequest, InputItem, EMBED_ENDPOINT};
use embedfleet_testkit::NatsServer;
use serde_json::Value;

mod support;
use support::{
    client, cosine, embedfleet, linked_model_dir, models_dir, outcome, run_with_stdin, start_role,
    vector,
};

fn clip(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../embedfleet-models/tests/fixtures/audio")
        .join(name)
}

/// A `--model-dir` with the real minilm and Whisper tiny.en in the whisper-large slot, if the
/// converted checkpoint is there.
fn minilm_and_whisper() -> Option<tempfile::TempDir> {
    let whisper = models_dir().join("whisper-tiny-en/whisper-large");
    if !whisper.join("model.safetensors").is_file() {
        eprintln!("SKIPPED: no models/whisper-tiny-en (scripts/fetch-models.sh makes it)");
        return None;
    }
    Some(linked_model_dir(&[
        (&models_dir().join("minilm"), "minilm"),
        (&whisper, "whisper-large"),
    ]))
}

fn lines(output: &std::process::Output) -> Vec<Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn partial_models(element: &Value) -> Vec<String> {
    element["partials"]
        .as_object()
        .expect("partials")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn text_and_audio_in_process_and_through_the_fleet() {
    let Some(dir) = minilm_and_whisper() else {
        return;
    };
    let model_dir = dir.path().to_str().unwrap();
    let wav = clip("speech-16k.wav");
    let mp3 = clip("speech-44k-stereo.mp3");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "embed",
            "--models",
            "minilm,whisper-large",
            "--model-dir",
            model_dir,
            "--partials",
            "a quick brown fox",
            "--audio",
            wav.to_str().unwrap(),
            "--audio",
            mp3.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_with_stdin(embedfleet(&args), None)
    };

    let local = lines(&run(&[]));
    assert_eq!(local.len(), 3);
    assert_eq!(partial_models(&local[0]), ["minilm"]);
    assert_eq!(partial_models(&local[1]), ["whisper-large"]);
    assert_eq!(partial_models(&local[2]), ["whisper-large"]);
    for element in &local {
        assert_eq!(vector(&element["embedding"]).len(), support::FUSED_DIM);
    }
    // tiny.en reports its own width in the 1280-wide slot.
    assert_eq!(vector(&local[1]["partials"]["whisper-large"]).len(), 384);
    // The same sentence as WAV and as 44.1 kHz stereo MP3.
    let similarity = cosine(
        &vector(&local[1]["partials"]["whisper-large"]),
        &vector(&local[2]["partials"]["whisper-large"]),
    );
    assert!(similarity >= 0.99, "wav vs mp3: {similarity}");

    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut serve = start_role(
        "serve",
        &[
            "serve",
            "--nats-url",
            &url,
            "--models",
            "minilm,whisper-large",
            "--model-dir",
            model_dir,
        ],
    );
    let fleet = lines(&run(&["--nats-url", &url]));
    assert_eq!(fleet.len(), 3, "serve log:\n{}", serve.log());
    for (i, (got, want)) in fleet.iter().zip(&local).enumerate() {
        assert_eq!(got["index"], want["index"]);
        assert_eq!(partial_models(got), partial_models(want), "input {i}");
        let fused = cosine(&vector(&got["embedding"]), &vector(&want["embedding"]));
        assert!(fused > 0.9999, "input {i}: fused cosine {fused}");
        for model in partial_models(want) {
            let similarity = cosine(
                &vector(&got["partials"][&model]),
                &vector(&want["partials"][&model]),
            );
            assert!(
                similarity > 0.9999,
                "input {i}: {model} cosine {similarity}"
            );
        }
    }

    // Plain NATS requests: bad audio gets its code, and the fleet still answers after it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let nats = client(&url).await;
        let send = |request: EmbedRequest| {
            let nats = nats.clone();
            async move {
                let payload = serde_json::to_vec(&request).unwrap();
                let reply = tokio::time::timeout(
                    Duration::from_secs(120),
                    nats.request(EMBED_ENDPOINT, payload.into()),
                )
                .await
                .expect("an answer in time")
                .expect("a reply");
                outcome(&reply)
            }
        };
        let good = std::fs::read(&wav).unwrap();
        // The clip's 44-byte header, saying so: a WAV of no frames.
        let mut no_frames = good[..44].to_vec();
        no_frames[4..8].copy_from_slice(&36u32.to_le_bytes());
        no_frames[40..44].copy_from_slice(&0u32.to_le_bytes());
        let cases: [(Vec<u8>, Option<u32>, u16, &str); 4] = [
            (b"not a sound file".to_vec(), None, 422, "unsupported_media"),
            (good[..good.len() / 2].to_vec(), None, 400, "invalid_media"),
            (good.clone(), Some(44_100), 400, "invalid_media"),
            (no_frames, None, 400, "empty_input"),
        ];
        for (bytes, rate, code, kind) in cases {
            let request = EmbedRequest::items([InputItem::audio(&bytes, rate)]);
            let got = send(request).await;
            assert_eq!(got.error(kind), (code, kind));
        }
        let request = EmbedRequest::items([InputItem::audio(&good, Some(16_000))]);
        let body = send(request).await.ok("good audio after bad");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    });
    serve
        .terminate_within(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}
