//! The `EmbeddingModel` for `whisper-large`: encoded audio in, one vector out.
//!
//! decode (WAV/FLAC/MP3/Ogg Vorbis) → mono → 16 kHz ([`crate::audio_input`]) → 30-s windows →
//! log-mel features per window ([`crate::mel`]) → Whisper encoder ([`crate::arch::whisper`]) →
//! the mean of the hidden states over the positions that hold audio (not the window's zero
//! padding) → across windows, the mean weighted by each window's audio positions (so the
//! vector is the mean over every audio position of the clip) → L2 norm when asked.
//!
//! A window of `n` samples holds audio in `ceil(n / 160)` mel frames and so in
//! `ceil(ceil(n / 160) / 2)` encoder positions (the stem's stride 2). Whisper itself always reads
//! 30-s windows; shorter clips are zero-padded exactly as `WhisperFeatureExtractor` pads them.
//! `truncate` does not apply: long audio is read whole, in windows, up to the duration limit
//! (413 past it). `tokens` in the result counts the encoder positions read.

use candle_core::{Device, Tensor};

use crate::arch::whisper::{mean_over_frames, WhisperConfig, WhisperEncoder};
use crate::audio_input::{decode_audio, AudioLimits};
use crate::catalogue::{Architecture, ModelSpec};
use crate::dtype::Dtype;
use crate::error::ModelError;
use crate::mel::{LogMel, HOP, WINDOW_SAMPLES};
use crate::model::{l2_normalize, EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
use crate::resolve::ModelFiles;
use crate::text::warn_if_width_differs;

pub struct WhisperEmbedder {
    spec: &'static ModelSpec,
    revision: String,
    dtype: Dtype,
    encoder: WhisperEncoder,
    mel: LogMel,
    limits: AudioLimits,
    device: Device,
}

impl WhisperEmbedder {
    /// Loads with the weights at `dtype`: f32, f16 or bf16 (the quantised dtypes are refused:
    /// no quantised Whisper path is built).
    pub fn load_at(
        spec: &'static ModelSpec,
        files: &ModelFiles,
        device: &Device,
        dtype: Dtype,
        limits: AudioLimits,
    ) -> Result<Self, ModelError> {
        let bad_config = |reason: String| ModelError::BadConfig {
            path: files.config.clone(),
            reason,
        };
        dtype.check_for(spec)?;
        if dtype.is_quantized() {
            return Err(ModelError::UnsupportedDtype {
                model: spec.name.to_string(),
                dtype,
                reason: "the Whisper encoder runs at f32, f16 or bf16 only".into(),
            });
        }
        if spec.architecture != Architecture::WhisperEncoder {
            return Err(bad_config(format!(
                "`{}` is a {:?} model, not a Whisper encoder",
                spec.name, spec.architecture
            )));
        }
        let text = std::fs::read_to_string(&files.config).map_err(|e| bad_config(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad_config(e.to_string()))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("whisper") => {}
            other => {
                return Err(bad_config(format!(
                    "`{}` expects a Whisper checkpoint (model_type `whisper`), config.json says \
                     {other:?}",
                    spec.name
                )))
            }
        }
        let config: WhisperConfig =
            serde_json::from_value(value).map_err(|e| bad_config(e.to_string()))?;
        config.validate().map_err(bad_config)?;
        let vb = files
            .weights
            .var_builder(dtype.activation_dtype(), device)?;
        let encoder =
            WhisperEncoder::load(vb, &config).map_err(|e| ModelError::CorruptWeights {
                path: files.weights.primary().to_path_buf(),
                reason: e.to_string(),
            })?;
        warn_if_width_differs(spec, config.d_model, &files.config);
        Ok(Self {
            spec,
            revision: dtype.revision(&files.revision),
            dtype,
            mel: LogMel::new(config.num_mel_bins),
            encoder,
            limits,
            device: device.clone(),
        })
    }

    /// The pooled (not normalised) vector of one clip and the encoder positions it read.
    fn embed_audio(
        &self,
        bytes: &[u8],
        sample_rate: Option<u32>,
        index: usize,
    ) -> Result<(Vec<f32>, usize), ModelError> {
        let waveform = decode_audio(bytes, sample_rate, &self.limits, index)?;
        let positions = self.encoder.config().max_source_positions;
        let mut sum = vec![0f32; self.dim()];
        let mut total = 0;
        for window in waveform.samples.chunks(WINDOW_SAMPLES) {
            let frames = audio_positions(window.len()).min(positions);
            let mean = self
                .encode_window(window, frames)
                .map_err(ModelError::inference(self.spec.name))?;
            for (acc, x) in sum.iter_mut().zip(mean) {
                *acc += x * frames as f32;
            }
            total += frames;
        }
        sum.iter_mut().for_each(|x| *x /= total as f32);
        Ok((sum, total))
    }

    fn encode_window(&self, window: &[f32], frames: usize) -> candle_core::Result<Vec<f32>> {
        let features = self.mel.window_features(window);
        let input_frames = self.encoder.config().input_frames();
        let mel = Tensor::from_vec(
            features,
            (1, self.mel.mel_bins(), input_frames),
            &self.device,
        )?
        .to_dtype(self.dtype.activation_dtype())?;
        let hidden = self.encoder.forward(&mel)?.squeeze(0)?;
        mean_over_frames(&hidden, frames)
    }
}

/// Encoder positions that hold audio in a window of `samples` 16 kHz samples.
pub fn audio_positions(samples: usize) -> usize {
    samples.div_ceil(HOP).div_ceil(2).max(1)
}

impl EmbeddingModel for WhisperEmbedder {
    fn spec(&self) -> &'static ModelSpec {
        self.spec
    }

    fn revision(&self) -> &str {
        &self.revision
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn dim(&self) -> usize {
        self.encoder.config().d_model
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        // Modality first, so a mixed batch fails before any audio is decoded.
        if let Some(input) = inputs
            .iter()
            .find(|input| !self.spec.takes(input.modality()))
        {
            return Err(ModelError::UnsupportedModality {
                model: self.spec.name.to_string(),
                modality: input.modality(),
            });
        }
        inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let ModelInput::Audio { bytes, sample_rate } = input else {
                    return Err(ModelError::UnsupportedModality {
                        model: self.spec.name.to_string(),
                        modality: input.modality(),
                    });
                };
                let (mut vector, tokens) = self.embed_audio(bytes, *sample_rate, index)?;
                if options.normalize {
                    l2_normalize(&mut vector);
                }
                Ok(ModelEmbedding { vector, tokens })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_positions_count_half_the_mel_frames_rounded_up() {
        assert_eq!(audio_positions(1), 1);
        assert_eq!(audio_positions(160), 1);
        assert_eq!(audio_positions(321), 2);
        assert_eq!(audio_positions(16_000), 50);
        assert_eq!(audio_positions(WINDOW_SAMPLES), 1500);
    }
}
