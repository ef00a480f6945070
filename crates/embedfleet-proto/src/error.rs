//! The one error type of the wire contract.
//!
//! Every failure a client can see is a [`ProtoError`]: an [`ErrorKind`] (which fixes the HTTP-like
//! status code) plus a one-line message. On the wire it travels twice: in the NATS micro headers
//! `Nats-Service-Error` / `Nats-Service-Error-Code` (see [`crate::subjects`]) and as an
//! [`ErrorBody`] in the reply payload, so clients that ignore headers still get a typed error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What went wrong, coarse enough for a client to branch on.
///
/// The serialised form (`snake_case`) is part of the contract: clients match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The payload is not valid JSON / MessagePack, or does not match the request schema.
    InvalidPayload,
    /// Decodable but malformed: neither or both of `input`/`inputs`, an item with no or several
    /// kinds, a field that does not belong to the item's kind.
    BadRequest,
    /// An empty input list, or text / code / media with no content.
    EmptyInput,
    /// `image_b64` or `audio_b64` is not valid base64.
    InvalidBase64,
    /// A requested model is not in the catalogue.
    UnknownModel,
    /// Too many inputs, or a payload or item over its byte limit.
    TooLarge,
    /// Text longer than a model's maximum length while `truncate` is false.
    InputTooLong,
    /// A requested model cannot take the modality of an input.
    UnsupportedModality,
    /// The fleet is at its in-flight limit; retry later.
    Overloaded,
    /// No worker currently serves a needed model.
    NoWorker,
    /// A needed partial did not arrive in time.
    Timeout,
    /// A bug or an unexpected failure on the server side.
    Internal,
    /// An image or audio payload that does not decode: corrupt or truncated data, or impossible
    /// parameters (an audio sample rate of 0 or 10 MHz).
    InvalidMedia,
    /// Media in a format or codec the server does not decode, or that it cannot embed (an image
    /// under the minimum size).
    UnsupportedMedia,
}

impl ErrorKind {
    /// Every kind, in declaration order (for tests and documentation tables).
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::InvalidPayload,
        ErrorKind::BadRequest,
        ErrorKind::EmptyInput,
        ErrorKind::InvalidBase64,
        ErrorKind::UnknownModel,
        ErrorKind::TooLarge,
        ErrorKind::InputTooLong,
        ErrorKind::UnsupportedModality,
        ErrorKind::Overloaded,
        ErrorKind::NoWorker,
        ErrorKind::Timeout,
        ErrorKind::Internal,
        ErrorKind::InvalidMedia,
        ErrorKind::UnsupportedMedia,
    ];

    /// The HTTP-like status code, sent as `Nats-Service-Error-Code` and in [`ErrorDetail::code`].
    pub const fn code(self) -> u16 {
        match self {
            ErrorKind::InvalidPayload
            | ErrorKind::BadRequest
            | ErrorKind::EmptyInput
            | ErrorKind::InvalidBase64
            | ErrorKind::InvalidMedia => 400,
            ErrorKind::UnknownModel => 404,
            ErrorKind::TooLarge | ErrorKind::InputTooLong => 413,
            ErrorKind::UnsupportedModality | ErrorKind::UnsupportedMedia => 422,
            ErrorKind::Overloaded => 429,
            ErrorKind::NoWorker | ErrorKind::Timeout => 503,
            ErrorKind::Internal => 500,
        }
    }

    /// The wire name, identical to the serde form.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidPayload => "invalid_payload",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::EmptyInput => "empty_input",
            ErrorKind::InvalidBase64 => "invalid_base64",
            ErrorKind::UnknownModel => "unknown_model",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::InputTooLong => "input_too_long",
            ErrorKind::UnsupportedModality => "unsupported_modality",
            ErrorKind::InvalidMedia => "invalid_media",
            ErrorKind::UnsupportedMedia => "unsupported_media",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NoWorker => "no_worker",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }

    /// The most likely kind for a bare status code, for replies that carry only the service
    /// error headers (e.g. from a server newer than this crate). Unknown codes map to `Internal`.
    pub const fn from_code(code: u16) -> ErrorKind {
        match code {
            400 => ErrorKind::BadRequest,
            404 => ErrorKind::UnknownModel,
            413 => ErrorKind::TooLarge,
            422 => ErrorKind::UnsupportedModality,
            429 => ErrorKind::Overloaded,
            503 => ErrorKind::NoWorker,
            _ => ErrorKind::Internal,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorKind {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ProtoError::bad_request(format!("unknown error kind `{s}`")))
    }
}

/// An error of the wire contract: a kind and a human-readable, single-line message.
///
/// `Display` is `"<kind>: <message>"` on one line, because it is what goes into the
/// `Nats-Service-Error` header, where a line break would corrupt the protocol;
/// [`ProtoError::from_service_error`] parses it back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", .kind, one_line(.message))]
pub struct ProtoError {
    /// What went wrong; fixes the status code.
    pub kind: ErrorKind,
    /// Details for a human; not meant to be matched on.
    pub message: String,
}

/// Collapses line breaks so that a message is safe for a NATS header and a log line.
fn one_line(message: &str) -> String {
    message
        .split(['\r', '\n'])
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl ProtoError {
    /// An error of `kind`; line breaks in `message` are replaced by spaces.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = if message.contains(['\r', '\n']) {
            one_line(&message)
        } else {
            message
        };
        ProtoError { kind, message }
    }

    /// The HTTP-like status code of the kind.
    pub const fn code(&self) -> u16 {
        self.kind.code()
    }

    /// Rebuilds an error from the NATS service error headers, for replies without an
    /// [`ErrorBody`]. A description of the form `"<kind>: <message>"` (this type's `Display`)
    /// recovers the kind exactly; anything else falls back to [`ErrorKind::from_code`].
    pub fn from_service_error(code: u16, description: &str) -> Self {
        if let Some((kind, message)) = description.split_once(": ") {
            if let Ok(kind) = kind.parse::<ErrorKind>() {
                return ProtoError::new(kind, message);
            }
        }
        ProtoError::new(ErrorKind::from_code(code), description)
    }

    /// The payload is undecodable or does not match the schema.
    pub fn invalid_payload(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidPayload, message)
    }

    /// The request is decodable but malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// Nothing to embed.
    pub fn empty_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::EmptyInput, message)
    }

    /// A base64 field does not decode.
    pub fn invalid_base64(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidBase64, message)
    }

    /// `model` is not in the catalogue.
    pub fn unknown_model(model: &str) -> Self {
        Self::new(ErrorKind::UnknownModel, format!("unknown model `{model}`"))
    }

    /// Over a count or byte limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, message)
    }

    /// Text past a model's maximum length with `truncate: false`.
    pub fn input_too_long(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InputTooLong, message)
    }

    /// `model` cannot take `modality`.
    pub fn unsupported_modality(model: &str, modality: crate::Modality) -> Self {
        Self::new(
            ErrorKind::UnsupportedModality,
            format!("model `{model}` does not take {modality} input"),
        )
    }

    /// At the in-flight limit.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Overloaded, message)
    }

    /// No worker serves `model`.
    pub fn no_worker(model: &str) -> Self {
        Self::new(
            ErrorKind::NoWorker,
            format!("no worker serves model `{model}`"),
        )
    }

    /// A deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// An unexpected server-side failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

/// The error reply payload: `{"error": {"code": 400, "kind": "empty_input", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Wrapped in an object so a client can tell an error reply from an [`crate::EmbedReply`]
    /// by the presence of this one key.
    pub error: ErrorDetail,
}

/// The contents of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Same value as the `Nats-Service-Error-Code` header.
    pub code: u16,
    /// The typed kind; `code` is derived from it.
    pub kind: ErrorKind,
    /// Human-readable details.
    pub message: String,
}

impl From<&ProtoError> for ErrorBody {
    fn from(err: &ProtoError) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: err.code(),
                kind: err.kind,
                message: err.message.clone(),
            },
        }
    }
}

impl From<ProtoError> for ErrorBody {
    fn from(err: ProtoError) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: err.code(),
                kind: err.kind,
                message: err.message,
            },
        }
    }
}

impl ErrorBody {
    /// The error this body describes. The kind wins over `code`: the code is derived data.
    pub fn into_error(self) -> ProtoError {
        ProtoError::new(self.error.kind, self.error.message)
    }
}

impl From<ErrorBody> for ProtoError {
    fn from(body: ErrorBody) -> Self {
        body.into_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_contract() {
        let expected = [
            400, 400, 400, 400, 404, 413, 413, 422, 429, 503, 503, 500, 400, 422,
        ];
        let got: Vec<u16> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn kind_names_match_serde() {
        for kind in ErrorKind::ALL {
            let json = serde_json::to_string(&kind).expect("serialise kind");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
        }
        assert_eq!(
            "nope".parse::<ErrorKind>().map_err(|e| e.kind),
            Err(ErrorKind::BadRequest)
        );
    }

    #[test]
    fn display_is_one_line() {
        let err = ProtoError::new(ErrorKind::Internal, "first\r\nsecond\nthird");
        assert_eq!(err.message, "first second third");
        let raw = ProtoError {
            kind: ErrorKind::Timeout,
            message: "a\nb".into(),
        };
        assert_eq!(raw.to_string(), "timeout: a b");
    }

    #[test]
    fn body_round_trips_to_the_same_error() {
        let err = ProtoError::empty_input("inputs[0] is empty");
        let body = ErrorBody::from(&err);
        assert_eq!(body.error.code, 400);
        let json = serde_json::to_string(&body).expect("serialise body");
        assert_eq!(
            json,
            r#"{"error":{"code":400,"kind":"empty_input","message":"inputs[0] is empty"}}"#
        );
        let back: ErrorBody = serde_json::from_str(&json).expect("decode body");
        assert_eq!(ProtoError::from(back), err);
    }

    #[test]
    fn service_error_headers_parse_back() {
        let err = ProtoError::unknown_model("nope");
        let back = ProtoError::from_service_error(err.code(), &err.to_string());
        assert_eq!(back, err);
        let foreign = ProtoError::from_service_error(503, "worker pool drained");
        assert_eq!(foreign.kind, ErrorKind::NoWorker);
        assert_eq!(foreign.message, "worker pool drained");
        let odd = ProtoError::from_service_error(418, "teapot: short and stout");
        assert_eq!(odd.kind, ErrorKind::Internal);
        assert_eq!(odd.message, "teapot: short and stout");
    }
}
