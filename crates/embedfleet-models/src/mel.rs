//! Whisper's log-mel spectrogram, computed as transformers' `WhisperFeatureExtractor` does
//! (`feature_extraction_whisper.py`, the numpy path `_np_extract_fbank_features`, with
//! `audio_utils.spectrogram` and `mel_filter_bank`):
//!
//! 1. the 16 kHz waveform is zero-padded (or cut) to 30 s, 480,000 samples;
//! 2. STFT: centred frames (200 samples of reflect padding each side), 400-sample periodic Hann
//!    window, hop 160, 400-point real FFT, power spectrum: 3,001 frames of 201 bins;
//! 3. Slaney-style mel filters over 0–8 kHz (Slaney mel scale, area-normalised), floor 1e-10,
//!    log10; the last frame is dropped (3,000 frames);
//! 4. clamp to the window's maximum − 8, then `(x + 4) / 4`.
//!
//! The filters are computed here, not loaded, so 80-bin (tiny … large-v2) and 128-bin (large-v3)
//! checkpoints take the same code. The FFT and the mel products run in f64 like numpy's, so the
//! features agree with the reference to well under 1e-4 (tests/real_whisper.rs).

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// Sample rate Whisper reads.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size and window length.
pub const N_FFT: usize = 400;
/// Samples between frames.
pub const HOP: usize = 160;
/// One window: 30 s of 16 kHz samples.
pub const WINDOW_SAMPLES: usize = 480_000;
/// Mel frames in a window (the encoder halves them with its strided convolution).
pub const WINDOW_FRAMES: usize = WINDOW_SAMPLES / HOP;

const BINS: usize = N_FFT / 2 + 1;
const MEL_FLOOR: f64 = 1e-10;

/// One mel filter: its weights over the FFT bins `first..first + weights.len()` (the others are
/// zero; a filter spans a few bins, so storing only those makes the product ~30× cheaper).
#[derive(Debug, Clone)]
struct MelFilter {
    first: usize,
    weights: Vec<f64>,
}

/// Turns 16 kHz audio into Whisper's input features. Build once per model (the filters and the
/// FFT plan), use from any thread.
pub struct LogMel {
    filters: Vec<MelFilter>,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel")
            .field("mel_bins", &self.filters.len())
            .finish()
    }
}

impl LogMel {
    /// An extractor for `mel_bins` bands (80 or 128 for the published checkpoints).
    pub fn new(mel_bins: usize) -> Self {
        // Periodic Hann (`window_function(400, "hann")`: np.hanning(401)[:-1]).
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        Self {
            filters: mel_filters(mel_bins),
            window,
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT),
        }
    }

    pub fn mel_bins(&self) -> usize {
        self.filters.len()
    }

    /// The features of one 30-s window, `[mel_bins, WINDOW_FRAMES]` row-major. `samples` longer
    /// than a window are cut; shorter ones are zero-padded, as the extractor pads them.
    pub fn window_features(&self, samples: &[f32]) -> Vec<f32> {
        let samples = &samples[..samples.len().min(WINDOW_SAMPLES)];
        let pad = N_FFT / 2;
        // The padded window with `pad` reflected samples each side (numpy `mode="reflect"`: the
        // edge sample is not repeated). Past the audio the window is zeros, so only a clip
        // shorter than `pad` reflects into real samples at the right edge.
        let mut padded = vec![0.0f64; WINDOW_SAMPLES + 2 * pad];
        let signal = |i: usize| samples.get(i).map_or(0.0, |&s| f64::from(s));
        for (i, value) in padded.iter_mut().enumerate() {
            *value = if i < pad {
                signal(pad - i)
            } else if i - pad < WINDOW_SAMPLES {
                signal(i - pad)
            } else {
                signal(2 * (WINDOW_SAMPLES - 1) - (i - pad))
            };
        }

        let bins = self.filters.len();
        let mut log_mel = vec![0.0f64; bins * WINDOW_FRAMES];
        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f64; BINS];
        // The frame starting past the audio's last reflected sample is all zeros: its log-mel is
        // log10(floor), with no FFT needed (most of a short clip's window).
        let silent_from = (samples.len() + 2 * pad).div_ceil(HOP);
        for t in 0..WINDOW_FRAMES {
            if t >= silent_from {
                for band in 0..bins {
                    log_mel[band * WINDOW_FRAMES + t] = MEL_FLOOR.log10();
                }
                continue;
            }
            let start = t * HOP;
            for ((out, &x), &w) in frame
                .iter_mut()
                .zip(&padded[start..start + N_FFT])
                .zip(&self.window)
            {
                *out = x * w;
            }
            // The buffers are sized by the plan, so the FFT cannot fail.
            self.fft
                .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
                .expect("FFT buffers sized by their plan");
            // numpy stores the FFT as complex64 before squaring; rounding through f32 the same
            // way keeps the tiniest bins identical.
            for (p, c) in power.iter_mut().zip(&spectrum) {
                let (re, im) = (f64::from(c.re as f32), f64::from(c.im as f32));
                *p = re * re + im * im;
            }
            for (band, filter) in self.filters.iter().enumerate() {
                let energy: f64 = filter
                    .weights
                    .iter()
                    .zip(&power[filter.first..])
                    .map(|(w, p)| w * p)
                    .sum();
                log_mel[band * WINDOW_FRAMES + t] = energy.max(MEL_FLOOR).log10();
            }
        }
        // The extractor casts to float32 before the clamp and scale.
        let log_mel: Vec<f32> = log_mel.into_iter().map(|x| x as f32).collect();
        let ceiling = log_mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        log_mel
            .into_iter()
            .map(|x| (x.max(ceiling - 8.0) + 4.0) / 4.0)
            .collect()
    }
}

/// transformers' `hertz_to_mel(mel_scale="slaney")`: linear below 1 kHz, logarithmic above.
fn hertz_to_mel(hertz: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if hertz >= MIN_LOG_HERTZ {
        MIN_LOG_MEL + (hertz / MIN_LOG_HERTZ).ln() * logstep
    } else {
        3.0 * hertz / 200.0
    }
}

fn mel_to_hertz(mel: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HERTZ * (logstep * (mel - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// transformers' `mel_filter_bank(201, mel_bins, 0, 8000, 16000, norm="slaney",
/// mel_scale="slaney")`: triangles between mel-spaced edges, each scaled to unit area.
fn mel_filters(mel_bins: usize) -> Vec<MelFilter> {
    let (mel_min, mel_max) = (hertz_to_mel(0.0), hertz_to_mel(8000.0));
    let edges: Vec<f64> = (0..mel_bins + 2)
        .map(|i| mel_to_hertz(mel_min + (mel_max - mel_min) * i as f64 / (mel_bins + 1) as f64))
        .collect();
    // np.linspace(0, sampling_rate // 2, 201)
    let fft_freqs: Vec<f64> = (0..BINS)
        .map(|i| f64::from(SAMPLE_RATE / 2) * i as f64 / (BINS - 1) as f64)
        .collect();
    (0..mel_bins)
        .map(|m| {
            let (lower, centre, upper) = (edges[m], edges[m + 1], edges[m + 2]);
            let norm = 2.0 / (upper - lower);
            let full: Vec<f64> = fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - lower) / (centre - lower);
                    let up = (upper - f) / (upper - centre);
                    down.min(up).max(0.0) * norm
                })
                .collect();
            let first = full.iter().position(|&w| w > 0.0).unwrap_or(0);
            let last = full.iter().rposition(|&w| w > 0.0).map_or(first, |i| i + 1);
            MelFilter {
                first,
                weights: full[first..last].to_vec(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_cover_the_band_with_unit_area_triangles() {
        for bins in [80, 128] {
            let filters = mel_filters(bins);
            assert_eq!(filters.len(), bins);
            // Every filter spans at least one bin, and they move up the spectrum.
            for pair in filters.windows(2) {
                assert!(!pair[0].weights.is_empty());
                assert!(pair[0].first <= pair[1].first);
            }
            // The top filter ends at 8 kHz, the last bin.
            let top = filters.last().unwrap();
            assert!(top.first + top.weights.len() <= BINS);
        }
    }

    #[test]
    fn mel_scale_round_trips() {
        for hertz in [0.0, 440.0, 999.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hertz(hertz_to_mel(hertz)) - hertz).abs() < 1e-9);
        }
    }

    #[test]
    fn silence_gives_the_floor_and_a_tone_lights_its_band() {
        let mel = LogMel::new(80);
        let silent = mel.window_features(&[0.0; 16_000]);
        assert_eq!(silent.len(), 80 * WINDOW_FRAMES);
        // All at log10(1e-10) = -10 → clamp (max - 8 is below) → (-10 + 4) / 4.
        assert!(silent.iter().all(|&x| (x - -1.5).abs() < 1e-6));

        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let features = mel.window_features(&tone);
        let frame = 50;
        let loudest = (0..80)
            .max_by(|&a, &b| {
                features[a * WINDOW_FRAMES + frame].total_cmp(&features[b * WINDOW_FRAMES + frame])
            })
            .unwrap();
        // 1 kHz is mel 15 of 0..~45.2 over 80 bands: band ≈ 15 / 45.25 × 81 - 1 ≈ 25.
        assert!((24..=27).contains(&loudest), "loudest band {loudest}");
    }
}
