//! The model runtime of embedfleet: what the ensemble is, and how one model turns inputs into
//! vectors.
//!
//! # Layout
//! - [`catalogue`]: the twelve models (names, dims, limits, pooling, modalities, memory).
//! - [`model`]: the [`EmbeddingModel`] trait every architecture implements and roles call.
//! - [`registry`]: models by name, loaded lazily and once.
//! - [`resolve`]: where weights come from (local directory, HF cache, hub).
//! - [`text`]: tokenizer + encoder + pooling for transformer text encoders.
//! - [`arch`]: one file per architecture (`bert.rs`, `mpnet.rs`) over shared layers.
//! - [`packed`]: padding-free batches and the attention that runs on them.
//! - [`cpu_kernels`]: fused CPU kernels the shared encoder layer runs on.
//! - [`tokenize`], [`pooling`]: shared steps around the encoders.
//! - [`error`]: [`ModelError`] and its wire codes.

pub mod arch;
pub mod catalogue;
pub mod cpu_kernels;
pub mod error;
pub mod model;
pub mod packed;
pub mod pooling;
pub mod registry;
pub mod resolve;
pub mod text;
pub mod tokenize;

pub use candle_core::Device;
pub use catalogue::{ModelSpec, Pooling, Prompting, CATALOGUE};
/// The type of [`EmbedOptions::input_type`], re-exported so model users need not name the proto
/// crate.
pub use embedfleet_proto::InputType;
pub use error::ModelError;
pub use model::{EmbedOptions, EmbeddingModel, ModelEmbedding, ModelInput};
pub use registry::ModelRegistry;
pub use resolve::{ModelFiles, WeightFiles, WeightResolver};
pub use text::TextEmbedder;
