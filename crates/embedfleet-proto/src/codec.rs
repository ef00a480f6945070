//! JSON and MessagePack, picked by the `Content-Type` header.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ProtoError, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK};

/// A payload encoding. A reply uses the encoding of its request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// `application/json`; the default, so a client that sets no header gets JSON.
    #[default]
    Json,
    /// `application/msgpack`, maps with named fields (the same field names as JSON).
    MsgPack,
}

impl Encoding {
    /// The encoding for a `Content-Type` header value. MessagePack for `application/msgpack`,
    /// `application/x-msgpack` and `application/vnd.msgpack` (case-insensitive, parameters
    /// ignored); JSON for anything else, including no header, so the lenient default never fails.
    pub fn from_content_type(content_type: Option<&str>) -> Encoding {
        let Some(value) = content_type else {
            return Encoding::Json;
        };
        let media_type = value.split(';').next().unwrap_or_default().trim();
        let is_msgpack = [
            "application/msgpack",
            "application/x-msgpack",
            "application/vnd.msgpack",
        ]
        .iter()
        .any(|m| media_type.eq_ignore_ascii_case(m));
        if is_msgpack {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }

    /// The `Content-Type` value to send with a payload in this encoding.
    pub const fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => CONTENT_TYPE_JSON,
            Encoding::MsgPack => CONTENT_TYPE_MSGPACK,
        }
    }

    /// Encodes `value`. MessagePack writes structs as maps with field names
    /// (`rmp_serde::to_vec_named`), so clients in other languages see the JSON shape.
    /// Failure means a type of ours cannot be encoded, a bug, hence `internal`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, ProtoError> {
        match self {
            Encoding::Json => serde_json::to_vec(value)
                .map_err(|e| ProtoError::internal(format!("JSON encoding failed: {e}"))),
            Encoding::MsgPack => rmp_serde::to_vec_named(value)
                .map_err(|e| ProtoError::internal(format!("MessagePack encoding failed: {e}"))),
        }
    }

    /// Decodes a `T` that must fill `bytes` exactly; trailing bytes are an error in both
    /// encodings. Every failure is `invalid_payload` with the decoder's one-line message.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, ProtoError> {
        match self {
            Encoding::Json => serde_json::from_slice(bytes)
                .map_err(|e| ProtoError::invalid_payload(format!("invalid JSON: {e}"))),
            Encoding::MsgPack => {
                let mut rest = bytes;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                let value = T::deserialize(&mut de).map_err(|e| {
                    ProtoError::invalid_payload(format!("invalid MessagePack: {e}"))
                })?;
                drop(de);
                if !rest.is_empty() {
                    return Err(ProtoError::invalid_payload(format!(
                        "invalid MessagePack: {} trailing bytes",
                        rest.len()
                    )));
                }
                Ok(value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn content_type_picks_the_encoding() {
        for (header, expected) in [
            (None, Encoding::Json),
            (Some("application/json"), Encoding::Json),
            (Some("text/plain"), Encoding::Json),
            (Some(""), Encoding::Json),
            (Some("application/msgpack"), Encoding::MsgPack),
            (Some("application/x-msgpack"), Encoding::MsgPack),
            (
                Some("Application/MsgPack; charset=binary"),
                Encoding::MsgPack,
            ),
        ] {
            assert_eq!(Encoding::from_content_type(header), expected, "{header:?}");
        }
        assert_eq!(Encoding::MsgPack.content_type(), "application/msgpack");
        assert_eq!(
            Encoding::from_content_type(Some(Encoding::MsgPack.content_type())),
            Encoding::MsgPack
        );
    }

    #[test]
    fn msgpack_uses_field_names() {
        #[derive(Serialize)]
        struct Probe {
            fuse: bool,
        }
        let bytes = Encoding::MsgPack
            .encode(&Probe { fuse: true })
            .expect("encode");
        // fixmap(1), fixstr(4) "fuse", true
        assert_eq!(bytes, [0x81, 0xa4, b'f', b'u', b's', b'e', 0xc3]);
    }

    #[test]
    fn trailing_bytes_are_invalid_in_both_encodings() {
        let json = Encoding::Json.decode::<u32>(b"1 2").map_err(|e| e.kind);
        assert_eq!(json, Err(ErrorKind::InvalidPayload));
        let msgpack = Encoding::MsgPack
            .decode::<u32>(&[0x01, 0x02])
            .map_err(|e| e.kind);
        assert_eq!(msgpack, Err(ErrorKind::InvalidPayload));
        assert_eq!(Encoding::MsgPack.decode::<u32>(&[0x01]), Ok(1));
    }
}
