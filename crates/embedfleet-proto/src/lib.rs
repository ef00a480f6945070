//! The embed.v1 wire contract of embedfleet: what clients, the coordinator, model workers and
//! the fusion stage say to each other, and nothing about how they do their work (no async
//! runtime, no tensors), so every crate and every client can depend on it cheaply.
//!
//! # Layout
//!
//! - [`request`]: [`EmbedRequest`], the `input` shorthand [`TextInput`], and validation into
//!   decoded inputs with [`EmbedRequest::to_inputs`].
//! - [`input`]: one item on the wire ([`InputItem`]) and decoded ([`Input`]).
//! - [`modality`]: [`Modality`], the four kinds of input.
//! - [`limits`]: [`RequestLimits`], the size bounds checked before any model work.
//! - [`reply`]: [`EmbedReply`] and its parts.
//! - [`output`]: `dimensions` and `encoding_format` ([`OutputOptions`], [`Embedding`]),
//!   applied to the fused vectors on the way out.
//! - [`error`]: [`ProtoError`] with its [`ErrorKind`] and status code, and the error payload
//!   [`ErrorBody`].
//! - [`codec`]: [`Encoding`], JSON or MessagePack by `Content-Type`.
//! - [`subjects`]: service, endpoint, subject, stream, consumer and header names (re-exported at
//!   the root).
//! - [`content_key`]: [`ContentKey`], the xxh3-128 key that caches and de-duplicates results.
//!
//! # Example
//!
//! ```
//! use embedfleet_proto::{EmbedRequest, Encoding, RequestLimits};
//!
//! let request = EmbedRequest::texts(["hello"]).with_models(["minilm"]);
//! let bytes = Encoding::MsgPack.encode(&request)?;
//! let decoded: EmbedRequest = Encoding::MsgPack.decode(&bytes)?;
//! let inputs = decoded.to_inputs(&RequestLimits::default())?;
//! assert_eq!(inputs[0].text(), Some("hello"));
//! # Ok::<(), embedfleet_proto::ProtoError>(())
//! ```

pub mod codec;
pub mod content_key;
pub mod error;
pub mod input;
pub mod limits;
pub mod modality;
pub mod output;
pub mod reply;
pub mod request;
pub mod subjects;

pub use codec::Encoding;
pub use content_key::ContentKey;
pub use error::{ErrorBody, ErrorDetail, ErrorKind, ProtoError};
pub use input::{Input, InputItem, MAX_SAMPLE_RATE};
pub use limits::RequestLimits;
pub use modality::Modality;
pub use output::{Embedding, EncodingFormat, OutputOptions};
pub use reply::{EmbedReply, EmbeddingData, EmbeddingObject, ExpertSelection, ListObject, Usage};
pub use request::{EmbedRequest, Fallback, InputType, TextInput};
pub use subjects::*;
