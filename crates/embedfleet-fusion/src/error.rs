//! The one error type of the fusion crate.
//!
//! Everything that can go wrong in FuseMoE fusion (Han et al., 2024, "FuseMoE:
//! Mixture-of-Experts Transformers for Fleximodal Fusion") is a variant here: a bad
//! configuration, a bad row of partial vectors, a weights file that disagrees with its
//! configuration, or a GPU that is not there. The fusion stage maps the input variants onto
//! the wire's 400 and the rest onto 500, so the variants keep the two apart
//! ([`FusionError::is_bad_input`]).

use std::path::PathBuf;

/// Why a fusion, a load, a save or a GPU set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    /// A configuration field is out of range (zero sizes, top-k outside `1..=experts`, a
    /// temperature that is not a positive finite number, ...).
    #[error("invalid FuseMoE config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field, as named in the serde config.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A row carries a different number of slots than the config has active models.
    #[error("expected {expected} partial slots (one per active model), got {got}")]
    SlotCount { expected: usize, got: usize },

    /// A present partial vector does not have its model's width.
    #[error("slot {slot}: expected a partial of width {expected}, got {got}")]
    SlotWidth {
        slot: usize,
        expected: usize,
        got: usize,
    },

    /// A present partial vector contains NaN or an infinity.
    #[error("slot {slot}: partial has a non-finite value at index {index}")]
    NonFinitePartial { slot: usize, index: usize },

    /// A present partial vector is all zeros, so it has no direction to normalise.
    #[error("slot {slot}: partial is all zeros")]
    ZeroPartial { slot: usize },

    /// Every slot of a row is empty: there is nothing to fuse.
    #[error("no partial vector is present in the row")]
    NoPartials,

    /// One row of a batch is bad; the batch is refused as a whole.
    #[error("row {row}: {source}")]
    BadRow {
        row: usize,
        #[source]
        source: Box<FusionError>,
    },

    /// The fused vector came out with zero or non-finite norm (only broken weights do that).
    #[error("fused vector is degenerate (norm {norm})")]
    DegenerateOutput { norm: f32 },

    /// Reading or writing a weights file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The safetensors container itself is malformed.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),

    /// The weights file lacks its config metadata, or the metadata does not parse.
    #[error("weights metadata: {0}")]
    Metadata(String),

    /// The config in a weights file differs from the config the caller expected.
    #[error("weights file config differs from the expected config: {0}")]
    ConfigMismatch(String),

    /// A tensor the config requires is absent from the weights file.
    #[error("weights file lacks tensor {name}")]
    MissingTensor { name: String },

    /// The weights file has a tensor the config does not use (a sign of a mismatched file).
    #[error("weights file has unexpected tensor {name}")]
    UnexpectedTensor { name: String },

    /// A tensor has a different shape than the config implies.
    #[error("tensor {name}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A tensor is stored in a dtype the loader does not read (F32, BF16 and F16 are read).
    #[error("tensor {name}: unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },

    /// A tensor holds NaN or an infinity.
    #[error("tensor {name}: non-finite value at index {index}")]
    NonFiniteWeight { name: String, index: usize },

    /// Training data or settings that cannot train (an empty held-out split, no pairs, ...).
    #[error("training: {0}")]
    Training(String),

    /// No CUDA driver or NVRTC library could be loaded, or no device is present.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver, NVRTC or kernel call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl FusionError {
    /// Whether the error is the caller's input (a 400 on the wire) rather than the service's
    /// fault.
    pub fn is_bad_input(&self) -> bool {
        if let FusionError::BadRow { source, .. } = self {
            return source.is_bad_input();
        }
        matches!(
            self,
            FusionError::SlotCount { .. }
                | FusionError::SlotWidth { .. }
                | FusionError::NonFinitePartial { .. }
                | FusionError::ZeroPartial { .. }
                | FusionError::NoPartials
        )
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        FusionError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
