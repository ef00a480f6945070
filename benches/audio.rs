//! Audio bench (whisper-large's worker): the stages of one clip, in the group `audio`.
//!
//! - `mel/30s/<bins>`: Whisper's log-mel features of one full 30-s window of speech (the
//!   committed espeak-ng clip tiled to 30 s), 80 and 128 bins. Compare with transformers'
//!   `WhisperFeatureExtractor` (numpy path) on the same samples:
//!   `scripts/bench-whisper-mel.py` (single-threaded both sides; see docs/benchmarks.md).
//! - `decode/flac-44k-stereo`: decode, mix and resample to 16 kHz of the 2.8-s 44.1 kHz stereo
//!   FLAC clip.
//! - `encoder/tiny.en-real/30s-window`: one clip through the whole `whisper-large` embedder on
//!   the real tiny.en weights (384 wide, 4 layers; `models/whisper-tiny-en`, made by
//!   `scripts/fetch-models.sh`). Whisper always reads a full 30-s window, so this is the cost of
//!   any clip up to 30 s. tiny.en is ~1/50 of large-v3's compute: the figure says nothing about
//!   large-v3's speed, which has not been run here.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use embedfleet_benches::models_dir;
use embedfleet_models::audio_input::{decode_audio, AudioLimits};
use embedfleet_models::mel::{LogMel, WINDOW_SAMPLES};
use embedfleet_models::{Device, EmbedOptions, ModelInput, ModelRegistry, WeightResolver};

fn clip(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/embedfleet-models/tests/fixtures/audio")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// 30 s of speech: the 16 kHz clip repeated.
fn thirty_seconds() -> Vec<f32> {
    let speech = decode_audio(&clip("speech-16k.wav"), None, &AudioLimits::default(), 0)
        .expect("the clip decodes")
        .samples;
    speech
        .iter()
        .copied()
        .cycle()
        .take(WINDOW_SAMPLES)
        .collect()
}

fn bench_audio(c: &mut Criterion) {
    let mut group = c.benchmark_group("audio");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10);

    let samples = thirty_seconds();
    for bins in [80, 128] {
        let mel = LogMel::new(bins);
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("mel/30s/{bins}"), |b| {
            b.iter(|| mel.window_features(&samples))
        });
    }

    let flac = clip("speech-44k-stereo.flac");
    group.bench_function("decode/flac-44k-stereo", |b| {
        b.iter(|| decode_audio(&flac, None, &AudioLimits::default(), 0).expect("decodes"))
    });

    let tiny = models_dir().join("whisper-tiny-en");
    if tiny.join("whisper-large/model.safetensors").is_file() {
        let resolver = WeightResolver {
            models_dir: Some(tiny),
            offline: true,
        };
        let model = ModelRegistry::new(resolver, Device::Cpu)
            .get("whisper-large")
            .expect("tiny.en loads");
        let input = [ModelInput::Audio {
            bytes: clip("speech-16k.wav"),
            sample_rate: None,
        }];
        let options = EmbedOptions::default();
        group.bench_function("encoder/tiny.en-real/30s-window", |b| {
            b.iter(|| model.embed_batch(&input, &options).expect("embeds"))
        });
    } else {
        eprintln!(
            "audio bench: no models/whisper-tiny-en, encoder skipped (scripts/fetch-models.sh)"
        );
    }
    group.finish();
}

criterion_group!(benches, bench_audio);
criterion_main!(benches);
