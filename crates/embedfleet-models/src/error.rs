//! The one error type of the model runtime, and how each case maps onto a wire error code.

use std::path::PathBuf;

use embedfleet_proto::{ErrorKind, Modality};

use crate::dtype::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },

    #[error("no weights for `{model}`: tried {}", tried.join("; "))]
    WeightsNotFound { model: String, tried: Vec<String> },

    #[error("{}: {reason}", path.display())]
    MissingFile { path: PathBuf, reason: String },

    #[error("corrupt weights in {}: {reason}", path.display())]
    CorruptWeights { path: PathBuf, reason: String },

    #[error("bad config {}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },

    #[error("tokenizer {}: {reason}", path.display())]
    BadTokenizer { path: PathBuf, reason: String },

    #[error("`{model}` does not take {modality} input")]
    UnsupportedModality { model: String, modality: Modality },

    #[error("input {index} is empty")]
    EmptyInput { index: usize },

    #[error(
        "input {index} is {tokens} tokens, over `{model}`'s limit of {max} and truncation is off"
    )]
    InputTooLong {
        model: String,
        index: usize,
        tokens: usize,
        max: usize,
    },

    #[error(
        "the instruction is {tokens} tokens; `{model}` reads at most {max} tokens, and the \
         instruction must leave room for the text"
    )]
    InstructionTooLong {
        model: String,
        tokens: usize,
        max: usize,
    },

    #[error("`{model}` ({architecture}) has no implementation in this build yet")]
    ArchitectureUnavailable { model: String, architecture: String },

    #[error("device {device} is not usable: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    #[error(
        "`{model}` needs about {need_mib} MiB on {device}, which has {free_mib} MiB free \
         (place it on another device, or pick a smaller --dtype)"
    )]
    DeviceMemory {
        model: String,
        device: String,
        need_mib: u64,
        free_mib: u64,
    },

    #[error("`{model}` cannot run at {dtype}: {reason}")]
    UnsupportedDtype {
        model: String,
        dtype: Dtype,
        reason: String,
    },

    /// An image input that cannot be embedded (corrupt, unsupported, too large: its kind says).
    #[error("input {index}: {source}")]
    BadImage {
        index: usize,
        #[source]
        source: crate::image_input::ImageInputError,
    },

    #[error("tokenizing for `{model}` failed: {reason}")]
    Tokenize { model: String, reason: String },

    #[error("`{model}` forward pass failed: {source}")]
    Inference {
        model: String,
        #[source]
        source: candle_core::Error,
    },

    // Media input (audio_input.rs; images share the kinds).
    #[error("input {index}: {reason}")]
    InvalidMedia { index: usize, reason: String },

    #[error("input {index}: {reason}")]
    UnsupportedFormat { index: usize, reason: String },

    #[error("input {index} is {seconds:.1} s of audio, over the limit of {max_seconds:.0} s")]
    AudioTooLong {
        index: usize,
        seconds: f64,
        max_seconds: f64,
    },

    #[error("input {index} holds only silence")]
    SilentAudio { index: usize },
}

impl ModelError {
    /// The wire error this becomes when it answers a request.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownModel { .. } => ErrorKind::UnknownModel,
            Self::UnsupportedModality { .. } => ErrorKind::UnsupportedModality,
            Self::EmptyInput { .. } | Self::SilentAudio { .. } => ErrorKind::EmptyInput,
            Self::InvalidMedia { .. } => ErrorKind::InvalidMedia,
            Self::UnsupportedFormat { .. } => ErrorKind::UnsupportedMedia,
            Self::AudioTooLong { .. } => ErrorKind::TooLarge,
            Self::InputTooLong { .. } | Self::InstructionTooLong { .. } => ErrorKind::InputTooLong,
            Self::BadImage { source, .. } => source.kind(),
            // The model exists in the catalogue but this node cannot serve it: another node may.
            Self::WeightsNotFound { .. }
            | Self::ArchitectureUnavailable { .. }
            | Self::DeviceUnavailable { .. }
            | Self::DeviceMemory { .. }
            | Self::UnsupportedDtype { .. } => ErrorKind::NoWorker,
            Self::MissingFile { .. }
            | Self::CorruptWeights { .. }
            | Self::BadConfig { .. }
            | Self::BadTokenizer { .. }
            | Self::Tokenize { .. }
            | Self::Inference { .. } => ErrorKind::Internal,
        }
    }

    /// True when the same input will fail again however often it is retried; a queue consumer
    /// terminates such a job instead of redelivering it.
    pub fn is_permanent_for_input(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedModality { .. }
                | Self::EmptyInput { .. }
                | Self::InputTooLong { .. }
                | Self::InstructionTooLong { .. }
                | Self::Tokenize { .. }
                | Self::InvalidMedia { .. }
                | Self::UnsupportedFormat { .. }
                | Self::AudioTooLong { .. }
                | Self::SilentAudio { .. }
                | Self::BadImage { .. }
        )
    }

    pub(crate) fn inference(model: &str) -> impl Fn(candle_core::Error) -> Self + '_ {
        move |source| Self::Inference {
            model: model.to_string(),
            source,
        }
    }
}

impl From<&ModelError> for embedfleet_proto::ProtoError {
    fn from(error: &ModelError) -> Self {
        embedfleet_proto::ProtoError::new(error.kind(), error.to_string())
    }
}
