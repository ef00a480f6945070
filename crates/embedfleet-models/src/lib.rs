//! The model runtime of embedfleet: what the ensemble is, and how one model turns inputs into
//! vectors.
//!
//! # Layout
//! - [`catalogue`]: the twelve models (names, dims, limits, pooling, modalities, memory).
//! - [`model`]: the [`EmbeddingModel`] trait every architecture implements and roles call.
//! - [`registry`]: models by name, loaded lazily and once, each at its [`dtype`].
//! - [`dtype`]: the weight dtypes (f32, f16, bf16, q8_0, q4k) and the per-model `--dtype` flag.
//! - [`resolve`]: where weights come from (local directory, HF cache, hub).
//! - [`text`]: tokenizer + encoder + pooling for transformer text encoders.
//! - [`arch`]: one file per architecture (`bert.rs`, `mpnet.rs`, `t5.rs`, `mistral.rs`,
//!   `whisper.rs`, `clip.rs`) over shared layers, their linear layers dense or quantised
//!   (`arch/projection.rs`).
//! - [`audio_embedder`]: whisper-large: audio bytes to a pooled Whisper encoder vector, over
//!   [`audio_input`] (decode, mono, 16 kHz, limits) and [`mel`] (Whisper's log-mel features).
//! - [`t5_embedder`]: the T5 sentence encoders (sentence-t5, INSTRUCTOR and its instructions).
//! - [`clip_embedder`]: CLIP (`clip-vit-l`): images to the vision tower, text to the text tower;
//!   [`image_input`]: image decoding, limits and `CLIPImageProcessor`'s preprocessing.
//! - [`st_modules`]: sentence-transformers module folders (pooling, `Dense` heads, `Normalize`).
//! - [`decoder_embedder`]: e5-mistral: query template, EOS, decoder, last-token pooling.
//! - [`packed`]: padding-free batches and the attention that runs on them.
//! - [`cpu_kernels`]: fused CPU kernels the shared encoder layer runs on.
//! - [`decoder_kernels`]: CPU kernels of the decoder layer (RMSNorm, RoPE, SwiGLU, causal GQA).
//! - `passes`, [`tokenize`], [`pooling`]: shared steps around the encoders (the batch's texts
//!   and its packed, token-bounded passes; tokenizers as checkpoints ship them; pooling).
//! - [`device`]: `cpu` / `cuda:N`, and the free-memory check before a GPU load.
//! - [`error`]: [`ModelError`] and its wire codes.

pub mod arch;
pub mod audio_embedder;
pub mod audio_input;
pub mod catalogue;
pub mod clip_embedder;
pub mod cpu_kernels;
pub mod decoder_embedder;
pub mod decoder_kernels;
pub mod device;
pub mod dtype;
pub mod error;
pub mod image_input;
pub mod mel;
pub mod model;
pub mod packed;
mod passes;
pub mod pooling;
pub mod registry;
pub mod resolve;
pub mod st_modules;
pub mod t5_embedder;
pub mod text;
pub mod tokenize;

pub use audio_embedder::WhisperEmbedder;
pub use audio_input::AudioLimits;
pub use candle_core::Device;
pub use catalogue::{ModelSpec, Pooling, Prompting, CATALOGUE};
pub use clip_embedder::ClipEmbedder;
pub use decoder_embedder::DecoderEmbedder;
pub use device::DeviceName;
pub use dtype::{Dtype, DtypeError, ModelDtypes};
/// The type of [`EmbedOptions::input_type`], re-exported so model users need not name the proto
/// crate.
pub use embedfleet_proto::InputType;
pub use error::ModelError;
pub use image_input::ImageLimits;
pub use model::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
pub use registry::ModelRegistry;
pub use resolve::{ModelFiles, WeightFiles, WeightResolver};
pub use t5_embedder::T5Embedder;
pub use text::TextEmbedder;
