//! Content keys: what the cache and de-duplication know a result by.
//!
//! A key is xxh3-128 over a canonical encoding of everything that changes a vector: the decoded
//! input, the options that reach the model (instruction, input type), the model and its
//! revision. Callers pass the options *as the model reads them* (the models crate's
//! `Prompting::effective`): a model that ignores `instruction` or `input_type` gets `None` and
//! `document` whatever the request said, so symmetric models share one entry per input. xxh3 because it is fast (the key of a
//! 1 MiB image costs well under a millisecond), its output is specified and identical across
//! platforms and library versions (keys outlive processes in Redis), and 128 bits make an
//! accidental collision negligible at any cache size we will see. It is not a security boundary:
//! anyone can craft collisions, so keys must never guard access to data.
//!
//! Canonical form, all integers little-endian:
//!
//! ```text
//! u8  format version (2)
//! u8  modality tag: text 1, code 2, image 3, audio 4
//! fields of the modality, each length-prefixed (u64 length, then bytes):
//!     text:  text
//!     code:  code, opt(language)
//!     image: bytes, opt(format)
//!     audio: bytes, opt(sample_rate as u32)
//! opt(instruction)
//! u8  input type: document 0, query 1
//! str model, str revision
//! ```
//!
//! `opt(x)` is a `0` byte for absent, or a `1` byte and then `x`, so absent and empty differ. The
//! length prefixes make the encoding unambiguous: `("ab", "c")` and `("a", "bc")` cannot meet.
//! Changing any of this changes every key and orphans the cache: bump the version byte.
//! Version 2 added the input type (version 1 keys, which had none, are orphaned).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::Xxh3Default;

use crate::{Input, InputType, ProtoError};

/// Version of the canonical form above.
const FORMAT_VERSION: u8 = 2;

/// The 128-bit key of one (input, instruction, input type, model, revision). Displays as 32 lowercase hex
/// digits (big-endian, the canonical XXH128 representation); serde uses the same string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentKey([u8; 16]);

/// Feeds the canonical encoding into the hasher without copying the input.
struct Canonical(Xxh3Default);

impl Canonical {
    fn byte(&mut self, b: u8) {
        self.0.update(&[b]);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
    }

    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            None => self.byte(0),
            Some(b) => {
                self.byte(1);
                self.bytes(b);
            }
        }
    }
}

impl ContentKey {
    /// The key for `input` as embedded by `model` at `revision`, with `instruction` if any and
    /// as `input_type`. Pass the options the model reads (blank instruction already `None`, see
    /// [`crate::EmbedRequest::effective_instruction`]; ignored options already dropped).
    pub fn new(
        input: &Input,
        instruction: Option<&str>,
        input_type: InputType,
        model: &str,
        revision: &str,
    ) -> Self {
        let mut h = Canonical(Xxh3Default::new());
        h.byte(FORMAT_VERSION);
        match input {
            Input::Text(text) => {
                h.byte(1);
                h.bytes(text.as_bytes());
            }
            Input::Code { code, language } => {
                h.byte(2);
                h.bytes(code.as_bytes());
                h.opt_bytes(language.as_deref().map(str::as_bytes));
            }
            Input::Image { bytes, format } => {
                h.byte(3);
                h.bytes(bytes);
                h.opt_bytes(format.as_deref().map(str::as_bytes));
            }
            Input::Audio { bytes, sample_rate } => {
                h.byte(4);
                h.bytes(bytes);
                h.opt_bytes(sample_rate.map(u32::to_le_bytes).as_ref().map(|b| &b[..]));
            }
        }
        h.opt_bytes(instruction.map(str::as_bytes));
        h.byte(match input_type {
            InputType::Document => 0,
            InputType::Query => 1,
        });
        h.bytes(model.as_bytes());
        h.bytes(revision.as_bytes());
        ContentKey(h.0.digest128().to_be_bytes())
    }

    /// The key from its raw bytes (e.g. read back from a binary store).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        ContentKey(bytes)
    }

    /// The raw bytes, big-endian.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 lowercase hex digits, as used in Redis keys and `Nats-Msg-Id`.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for ContentKey {
    type Err = ProtoError;

    /// Parses 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            || ProtoError::bad_request(format!("`{s}` is not a 32-digit hex content key"));
        // `from_str_radix` alone would take a sign ("+f"), so check the digits first.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let mut out = [0u8; 16];
        for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(ContentKey(out))
    }
}

impl Serialize for ContentKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContentKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: InputType = InputType::Document;

    fn text(s: &str) -> Input {
        Input::Text(s.into())
    }

    fn key(input: &Input) -> ContentKey {
        ContentKey::new(input, None, D, "minilm", "rev1")
    }

    #[test]
    fn xxh3_128_matches_the_reference_implementation() {
        // XXH3_128bits("") from the xxHash reference, canonical (big-endian) form.
        let empty = Xxh3Default::new().digest128().to_be_bytes();
        assert_eq!(
            ContentKey::from_bytes(empty).to_hex(),
            "99aa06d3014798d86001c324468d497f"
        );
    }

    #[test]
    fn key_is_pinned() {
        // Computed once from the canonical form above, and cross-checked with an independent
        // xxh3-128 (python-xxhash) over the documented byte layout. If this fails, the form
        // changed: bump FORMAT_VERSION and update the value, knowing that every cached entry
        // is orphaned.
        // (Version 1, without the input type, gave 0a4558072df694983cf5880a47012c38 here.)
        let k = ContentKey::new(&text("hello world"), Some("query: "), D, "minilm", "rev1");
        assert_eq!(k.to_hex(), "400cf593bf5f99a0631454ea7c1caf66");
        let query = InputType::Query;
        let k = ContentKey::new(
            &text("hello world"),
            Some("query: "),
            query,
            "minilm",
            "rev1",
        );
        assert_eq!(k.to_hex(), "60de28d85285c6fbebf44696a5c152f4");
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = Input::Code {
            code: "fn f() {}".into(),
            language: Some("rust".into()),
        };
        let k = ContentKey::new(&base, Some("i"), D, "m", "r");
        let variants = [
            ContentKey::new(&base, Some("j"), D, "m", "r"),
            ContentKey::new(&base, None, D, "m", "r"),
            ContentKey::new(&base, Some(""), D, "m", "r"),
            ContentKey::new(&base, Some("i"), D, "n", "r"),
            ContentKey::new(&base, Some("i"), D, "m", "s"),
            ContentKey::new(&base, Some("i"), InputType::Query, "m", "r"),
            ContentKey::new(&text("fn f() {}"), Some("i"), D, "m", "r"),
            ContentKey::new(
                &Input::Code {
                    code: "fn f() {}".into(),
                    language: None,
                },
                Some("i"),
                D,
                "m",
                "r",
            ),
            ContentKey::new(
                &Input::Code {
                    code: "fn g() {}".into(),
                    language: Some("rust".into()),
                },
                Some("i"),
                D,
                "m",
                "r",
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&k, v, "variant {i}");
        }
    }

    #[test]
    fn media_fields_change_the_key() {
        let image = |bytes: &[u8], format: Option<&str>| Input::Image {
            bytes: bytes.to_vec(),
            format: format.map(str::to_owned),
        };
        let audio = |bytes: &[u8], sample_rate: Option<u32>| Input::Audio {
            bytes: bytes.to_vec(),
            sample_rate,
        };
        let keys = [
            key(&image(b"abc", Some("png"))),
            key(&image(b"abd", Some("png"))),
            key(&image(b"abc", Some("jpeg"))),
            key(&image(b"abc", None)),
            key(&audio(b"abc", Some(16_000))),
            key(&audio(b"abc", Some(44_100))),
            key(&audio(b"abc", None)),
            key(&text("abc")),
        ];
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = ContentKey::new(&text("ab"), Some("c"), D, "m", "r");
        let b = ContentKey::new(&text("a"), Some("bc"), D, "m", "r");
        assert_ne!(a, b);
        let c = ContentKey::new(&text("x"), None, D, "ab", "c");
        let d = ContentKey::new(&text("x"), None, D, "a", "bc");
        assert_ne!(c, d);
        let code = |c: &str, l: &str| Input::Code {
            code: c.into(),
            language: Some(l.into()),
        };
        assert_ne!(key(&code("ab", "c")), key(&code("a", "bc")));
    }

    #[test]
    fn equal_inputs_give_equal_keys() {
        assert_eq!(key(&text("same")), key(&text("same")));
    }

    #[test]
    fn hex_round_trips() {
        let k = key(&text("round trip"));
        let hex = k.to_hex();
        assert_eq!(hex.len(), 32);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(hex.parse::<ContentKey>(), Ok(k));
        assert_eq!(hex.to_uppercase().parse::<ContentKey>(), Ok(k));
        let json = serde_json::to_string(&k).expect("serialise key");
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<ContentKey>(&json).ok(), Some(k));
        let bad_inputs = [
            String::new(),
            "00".into(),
            hex[..31].into(),
            format!("{}g", &hex[..31]),
            format!("+f{}", &hex[2..]),
            format!("é{}", &hex[..30]),
        ];
        for bad in &bad_inputs {
            assert!(bad.parse::<ContentKey>().is_err(), "{bad:?}");
        }
    }
}
