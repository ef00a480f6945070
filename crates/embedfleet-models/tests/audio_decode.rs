//! Audio input without model weights: every supported format and sample width of the committed
//! speech clip decodes to the same 16 kHz waveform (or, lossy, close to it); each kind of bad
//! input is its typed error with its wire code; byte mutations of the real files never panic.
//!
//! The clips (tests/fixtures/audio/, 330 KB) are one espeak-ng sentence, "The quick brown fox
//! jumps over the lazy dog." (2.8 s), converted with sox and ffmpeg: 16 kHz and 8 kHz 16-bit WAV,
//! 44.1 kHz stereo FLAC and MP3 (right channel at half gain), 22.05 kHz Ogg Vorbis. The 8, 24,
//! 32-bit integer and float WAVs are written here from the 16-bit samples.

use std::path::PathBuf;

use embedfleet_models::audio_input::{decode_audio, AudioLimits, Waveform};
use embedfleet_models::ModelError;
use embedfleet_proto::ErrorKind;
use proptest::prelude::*;

fn clip(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audio")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode(bytes: &[u8]) -> Result<Waveform, ModelError> {
    decode_audio(bytes, None, &AudioLimits::default(), 0)
}

/// A WAV file: `format` 1 (integer PCM) or 3 (IEEE float), `data` already encoded.
fn wav(format: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The 16-bit samples of the 16 kHz clip (its data chunk starts at byte 44).
fn speech_i16() -> Vec<i16> {
    let bytes = clip("speech-16k.wav");
    assert_eq!(&bytes[36..40], b"data", "sox wrote a plain 44-byte header");
    bytes[44..]
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn kind(result: Result<Waveform, ModelError>) -> (ErrorKind, u16) {
    let error = result.expect_err("bad input decoded");
    let kind = error.kind();
    assert!(error.is_permanent_for_input(), "{error}");
    (kind, kind.code())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_pcm_width_of_the_same_clip_decodes_to_the_same_waveform() {
    let samples = speech_i16();
    let reference = decode(&clip("speech-16k.wav")).unwrap();
    assert_eq!(reference.samples.len(), samples.len());
    assert_eq!(
        (reference.source_rate, reference.source_channels),
        (16_000, 1)
    );
    assert_eq!(reference.samples[1000], f32::from(samples[1000]) / 32768.0);

    let s24: Vec<u8> = samples
        .iter()
        .flat_map(|&s| (i32::from(s) << 8).to_le_bytes()[..3].to_vec())
        .collect();
    let s32: Vec<u8> = samples
        .iter()
        .flat_map(|&s| (i32::from(s) << 16).to_le_bytes())
        .collect();
    let f32le: Vec<u8> = samples
        .iter()
        .flat_map(|&s| (f32::from(s) / 32768.0).to_le_bytes())
        .collect();
    for (name, bytes) in [
        ("24-bit", wav(1, 1, 16_000, 24, &s24)),
        ("32-bit", wav(1, 1, 16_000, 32, &s32)),
        ("float", wav(3, 1, 16_000, 32, &f32le)),
    ] {
        let got = decode(&bytes).unwrap();
        assert_eq!(max_diff(&got.samples, &reference.samples), 0.0, "{name}");
    }
    // 8-bit WAV is unsigned with 128 as zero: the same clip to within one 8-bit step.
    let u8s: Vec<u8> = samples.iter().map(|&s| ((s >> 8) + 128) as u8).collect();
    let got = decode(&wav(1, 1, 16_000, 8, &u8s)).unwrap();
    assert!(max_diff(&got.samples, &reference.samples) <= 1.0 / 128.0);
}

#[test]
fn other_rates_channels_and_codecs_land_on_the_16k_timeline() {
    let reference = decode(&clip("speech-16k.wav")).unwrap();
    for (name, rate, channels) in [
        ("speech-8k.wav", 8_000, 1),
        ("speech-44k-stereo.flac", 44_100, 2),
        ("speech-44k-stereo.mp3", 44_100, 2),
        ("speech-22k.ogg", 22_050, 1),
    ] {
        let got = decode(&clip(name)).unwrap();
        assert_eq!(
            (got.source_rate, got.source_channels),
            (rate, channels),
            "{name}"
        );
        // Same duration to within the codec's padding (MP3 frames, Vorbis blocks): 60 ms.
        let diff = got.samples.len().abs_diff(reference.samples.len());
        assert!(
            diff <= 960,
            "{name}: {} vs {} samples",
            got.samples.len(),
            reference.samples.len()
        );
        let peak = got.samples.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        assert!(peak > 0.1 && peak <= 1.5, "{name}: peak {peak}");
    }
}

#[test]
fn a_declared_sample_rate_must_match_the_file() {
    let bytes = clip("speech-16k.wav");
    assert!(decode_audio(&bytes, Some(16_000), &AudioLimits::default(), 0).is_ok());
    let wrong = decode_audio(&bytes, Some(44_100), &AudioLimits::default(), 0);
    assert_eq!(kind(wrong), (ErrorKind::InvalidMedia, 400));
}

#[test]
fn bad_input_gets_its_code() {
    let good = clip("speech-16k.wav");
    let samples: Vec<u8> = speech_i16().iter().flat_map(|s| s.to_le_bytes()).collect();

    // Not audio at all, and a WAV of a codec we do not decode (MPEG audio in WAV, format 0x55).
    assert_eq!(
        kind(decode(b"hello, this is not a sound file at all")),
        (ErrorKind::UnsupportedMedia, 422)
    );
    assert_eq!(
        kind(decode(&wav(0x55, 1, 16_000, 16, &samples[..4096]))),
        (ErrorKind::UnsupportedMedia, 422)
    );

    // Truncated: the header promises more frames than the file holds.
    assert_eq!(
        kind(decode(&good[..good.len() / 2])),
        (ErrorKind::InvalidMedia, 400)
    );
    let flac = clip("speech-44k-stereo.flac");
    assert_eq!(
        kind(decode(&flac[..flac.len() / 2])),
        (ErrorKind::InvalidMedia, 400)
    );
    // Corrupt: FLAC frames carry CRCs.
    let mut corrupt = flac.clone();
    for byte in &mut corrupt[flac.len() / 2..flac.len() / 2 + 64] {
        *byte ^= 0x5a;
    }
    assert_eq!(kind(decode(&corrupt)), (ErrorKind::InvalidMedia, 400));

    // Impossible sample rates in the header.
    for rate in [0, 10_000_000] {
        assert_eq!(
            kind(decode(&wav(1, 1, rate, 16, &samples))),
            (ErrorKind::InvalidMedia, 400),
            "{rate} Hz"
        );
    }

    // Nothing to embed: no bytes, no frames, only silence.
    assert_eq!(kind(decode(b"")), (ErrorKind::EmptyInput, 400));
    assert_eq!(
        kind(decode(&wav(1, 1, 16_000, 16, &[]))),
        (ErrorKind::EmptyInput, 400)
    );
    assert_eq!(
        kind(decode(&wav(1, 1, 16_000, 16, &vec![0; 32_000]))),
        (ErrorKind::EmptyInput, 400)
    );
}

#[test]
fn audio_past_the_limit_is_too_large_before_it_is_decoded() {
    let short = AudioLimits { max_seconds: 1.0 };
    for name in [
        "speech-16k.wav",
        "speech-44k-stereo.flac",
        "speech-44k-stereo.mp3",
        "speech-22k.ogg",
    ] {
        let result = decode_audio(&clip(name), None, &short, 3);
        let error = result.expect_err(name);
        assert!(
            matches!(error, ModelError::AudioTooLong { index: 3, .. }),
            "{name}: {error}"
        );
        assert_eq!(error.kind().code(), 413);
    }
    // A 44-byte header that claims eleven minutes is refused from the header alone.
    let mut claim = wav(1, 1, 16_000, 16, &[1, 0, 2, 0]);
    let huge = 11 * 60 * 16_000 * 2u32;
    claim[4..8].copy_from_slice(&(huge + 36).to_le_bytes());
    claim[40..44].copy_from_slice(&huge.to_le_bytes());
    let error = decode(&claim).expect_err("eleven minutes");
    assert!(matches!(error, ModelError::AudioTooLong { .. }), "{error}");
}

/// A mutation of a real file: flipped bytes, a cut, a spliced-in run.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Cut { at: usize },
    Splice { at: usize, bytes: Vec<u8> },
}

fn mutated(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len().max(1);
        match mutation {
            Mutation::Flip { at, mask } => {
                if let Some(byte) = bytes.get_mut(at % len) {
                    *byte ^= mask;
                }
            }
            Mutation::Cut { at } => bytes.truncate(at % len),
            Mutation::Splice { at, bytes: run } => {
                let at = at % len;
                bytes.splice(
                    at.min(bytes.len())..at.min(bytes.len()),
                    run.iter().copied(),
                );
            }
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), 1u8..).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        1 => any::<usize>().prop_map(|at| Mutation::Cut { at }),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
    ]
}

/// Cases of the mutation test: 256 by default (about a second on two cores); more with
/// `AUDIO_FUZZ_CASES` for a longer local run.
fn fuzz_cases() -> u32 {
    std::env::var("AUDIO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: fuzz_cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_decode_or_fail_typed(
        file in 0usize..5,
        mutations in proptest::collection::vec(mutation(), 1..8),
    ) {
        let names = ["speech-16k.wav", "speech-8k.wav", "speech-44k-stereo.flac", "speech-44k-stereo.mp3", "speech-22k.ogg"];
        let bytes = mutated(clip(names[file]), &mutations);
        let limits = AudioLimits { max_seconds: 30.0 };
        match decode_audio(&bytes, None, &limits, 0) {
            Ok(waveform) => {
                prop_assert!(!waveform.samples.is_empty());
                prop_assert!(waveform.samples.iter().all(|s| s.is_finite()));
                prop_assert!(waveform.seconds() <= 30.5);
            }
            Err(error) => {
                let code = error.kind().code();
                prop_assert!(matches!(code, 400 | 413 | 422), "{error}: {code}");
                prop_assert!(error.is_permanent_for_input());
            }
        }
    }
}
