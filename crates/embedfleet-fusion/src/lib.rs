//! FuseMoE fusion for embedfleet: the mixture-of-experts layer that turns the per-model
//! partial vectors of one input into one embedding (Han et al., 2024, "FuseMoE:
//! Mixture-of-Experts Transformers for Fleximodal Fusion").
//!
//! ```text
//! partials (one slot per active model, None where the model does not take the modality)
//!   → assemble: normalise each, concatenate, scale to unit norm, + presence mask
//!   → gate: proj → LayerNorm → GELU → router (softmax or Laplace) → top-k, weights sum to 1
//!   → the k chosen experts (fc1 → GELU → fc2) → weighted sum → L2-normalise
//! ```
//!
//! # Layout
//!
//! - [`config`] — [`FuseMoeConfig`] and [`GatingKind`], serde, with the specification's defaults.
//! - [`assemble`] — partials → the gate's and experts' input row; bad partials are typed errors.
//! - [`gate`] — the router and its [`Routing`].
//! - `expert` — one expert MLP.
//! - [`linear`] — the CPU matrix product (SIMD, multithreaded, fixed summation order).
//! - `cpu` — [`FuseMoe::fuse`] / [`FuseMoe::fuse_batch`] (grouped by expert), capacity
//!   limiting, and [`load_balance_loss`].
//! - [`weights`] — the safetensors file format, tensor names and the version hash.
//! - [`init`] — the deterministic, distance-preserving initialisation behind
//!   [`FuseMoe::from_seed`].
//! - `model` — [`FuseMoe`] itself.
//! - [`error`] — [`FusionError`].
//! - `cuda` (feature `cuda`) — `CudaFuseMoe`, the same forward on a GPU, kernels in
//!   `kernels/fusemoe.cu` compiled at run time with NVRTC.
//!
//! # Example
//!
//! ```
//! use embedfleet_fusion::{FuseMoe, FuseMoeConfig};
//!
//! let cfg = FuseMoeConfig {
//!     expert_hidden: 64,
//!     gate_hidden: 32,
//!     output_dim: 48,
//!     ..FuseMoeConfig::for_input_dims(vec![8, 16])
//! };
//! let layer = FuseMoe::from_seed(cfg, 42)?;
//! let text_model = vec![0.5f32; 8];
//! let fused = layer.fuse(&[Some(&text_model), None])?;
//! assert_eq!(fused.embedding.len(), 48);
//! assert_eq!(fused.selected.len(), 2);
//! # Ok::<(), embedfleet_fusion::FusionError>(())
//! ```

pub mod assemble;
pub mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod delta;
pub mod error;
mod expert;
pub mod gate;
pub mod init;
pub mod linear;
pub mod metrics;
mod model;
pub mod shipped;
pub mod train;
pub mod weights;

pub use config::{FuseMoeConfig, GatingKind};
pub use cpu::{load_balance_loss, FusedEmbedding};
#[cfg(feature = "cuda")]
pub use cuda::{compile_kernels, cuda_available, CudaFuseMoe, WeightPrecision};
pub use error::FusionError;
pub use gate::Routing;
pub use init::InitOptions;
pub use model::FuseMoe;
