//! How the fused vector leaves the fleet: Matryoshka `dimensions` and `encoding_format`.
//!
//! Inside the fleet every vector stays full-width float (the cache keeps the 1536-d fused
//! vector); a request's output options are applied to the reply on the way out, by
//! [`OutputOptions::apply`], so one cached vector serves every width and encoding.
//!
//! - `dimensions: N` keeps the first `N` components of the fused vector and renormalises them
//!   to unit L2 norm (the fusion layer is trained with a Matryoshka loss so that short
//!   prefixes stay good).
//! - `encoding_format`:
//!   - `float` (default): an array of numbers;
//!   - `base64`: the little-endian f32 bytes in standard base64, as OpenAI sends them;
//!   - `int8` / `uint8`: scalar quantisation with a fixed calibration (below);
//!   - `binary` / `ubinary`: one sign bit per component (1 where the value is > 0), packed 8 to
//!     a byte, first component in the highest bit, the last byte zero-padded; `ubinary` sends
//!     the bytes, `binary` sends `byte − 128` as a signed byte (sentence-transformers'
//!     `quantize_embeddings` convention).
//!
//! **int8 / uint8 calibration.** A unit vector of `n` components has components of typical
//! size `1/√n`; the fused vector's components (measured on STS-B and SciFact texts) stay within
//! a few of those. So each component `v` is sent as `round(v · √n · 32)` clamped to
//! `[−127, 127]` (int8), i.e. ±4 typical sizes span the range, and uint8 adds 128 (clamped to
//! `[0, 255]`). The scale is the same for every vector of a width, so integer dot products rank
//! exactly as the dequantised vectors do (`v ≈ q / (32·√n)`), and no per-vector scale has to
//! travel with the reply.

use std::fmt;

use base64::Engine;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ProtoError;

/// `encoding_format` of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// An array of floats.
    #[default]
    Float,
    /// Little-endian f32 bytes, standard base64 (OpenAI's `base64`).
    Base64,
    /// Signed bytes, scalar quantisation (see the module docs for the calibration).
    Int8,
    /// Unsigned bytes: int8 + 128.
    Uint8,
    /// Packed sign bits as signed bytes (`byte − 128`).
    Binary,
    /// Packed sign bits as unsigned bytes.
    Ubinary,
}

impl EncodingFormat {
    /// Every format, for tests and documentation.
    pub const ALL: [EncodingFormat; 6] = [
        EncodingFormat::Float,
        EncodingFormat::Base64,
        EncodingFormat::Int8,
        EncodingFormat::Uint8,
        EncodingFormat::Binary,
        EncodingFormat::Ubinary,
    ];

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
            EncodingFormat::Int8 => "int8",
            EncodingFormat::Uint8 => "uint8",
            EncodingFormat::Binary => "binary",
            EncodingFormat::Ubinary => "ubinary",
        }
    }
}

impl fmt::Display for EncodingFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EncodingFormat {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, ProtoError> {
        EncodingFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                ProtoError::bad_request(format!(
                    "unknown encoding_format `{s}`: use float, base64, int8, uint8, binary or \
                     ubinary"
                ))
            })
    }
}

/// One input's fused vector in the encoding the request asked for.
///
/// On the wire: an array of numbers (`float`, `int8`, `uint8`, `binary`, `ubinary`) or a
/// string (`base64`). An array of integers cannot say which of the integer formats it is, so a
/// decoded reply should be passed through [`Embedding::conform`] with the requested format
/// (`embedfleet-client` does).
#[derive(Debug, Clone, PartialEq)]
pub enum Embedding {
    Float(Vec<f32>),
    Base64(String),
    Int8(Vec<i8>),
    Uint8(Vec<u8>),
    Binary(Vec<i8>),
    Ubinary(Vec<u8>),
}

impl From<Vec<f32>> for Embedding {
    fn from(vector: Vec<f32>) -> Self {
        Embedding::Float(vector)
    }
}

impl Embedding {
    /// The float vector, for `float` replies.
    pub fn as_float(&self) -> Option<&[f32]> {
        match self {
            Embedding::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The format this value is in.
    pub fn format(&self) -> EncodingFormat {
        match self {
            Embedding::Float(_) => EncodingFormat::Float,
            Embedding::Base64(_) => EncodingFormat::Base64,
            Embedding::Int8(_) => EncodingFormat::Int8,
            Embedding::Uint8(_) => EncodingFormat::Uint8,
            Embedding::Binary(_) => EncodingFormat::Binary,
            Embedding::Ubinary(_) => EncodingFormat::Ubinary,
        }
    }

    /// Encodes a float vector (already cut and renormalised) in `format`.
    pub fn encode(vector: &[f32], format: EncodingFormat) -> Embedding {
        match format {
            EncodingFormat::Float => Embedding::Float(vector.to_vec()),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Embedding::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            EncodingFormat::Int8 => Embedding::Int8(quantize_int8(vector)),
            EncodingFormat::Uint8 => Embedding::Uint8(
                quantize_int8(vector)
                    .into_iter()
                    .map(|q| (q as i16 + 128) as u8)
                    .collect(),
            ),
            EncodingFormat::Binary => Embedding::Binary(
                pack_signs(vector)
                    .into_iter()
                    .map(|b| (b as i16 - 128) as i8)
                    .collect(),
            ),
            EncodingFormat::Ubinary => Embedding::Ubinary(pack_signs(vector)),
        }
    }

    /// The value as `format`, for a reply decoded from the wire: integer arrays are re-tagged
    /// (an int8 array may be `binary`, a uint8 array `ubinary`; small non-negative values fit
    /// both), and a base64 string is decoded for `float`. A value that cannot be `format` is
    /// an `invalid_payload` error.
    pub fn conform(self, format: EncodingFormat) -> Result<Embedding, ProtoError> {
        use EncodingFormat as F;
        let mismatch = |got: &Embedding| {
            ProtoError::invalid_payload(format!(
                "asked for encoding_format `{format}`, the reply carries {}",
                got.format()
            ))
        };
        let as_i8 =
            |v: &[u8]| -> Option<Vec<i8>> { v.iter().map(|&b| i8::try_from(b).ok()).collect() };
        let as_u8 =
            |v: &[i8]| -> Option<Vec<u8>> { v.iter().map(|&b| u8::try_from(b).ok()).collect() };
        Ok(match (self, format) {
            (e, f) if e.format() == f => e,
            (Embedding::Int8(v), F::Binary) => Embedding::Binary(v),
            (Embedding::Uint8(v), F::Ubinary) => Embedding::Ubinary(v),
            (Embedding::Uint8(v), F::Int8 | F::Binary) => match as_i8(&v) {
                Some(v) if format == F::Int8 => Embedding::Int8(v),
                Some(v) => Embedding::Binary(v),
                None => return Err(mismatch(&Embedding::Uint8(v))),
            },
            (Embedding::Int8(v), F::Uint8 | F::Ubinary) => match as_u8(&v) {
                Some(v) if format == F::Uint8 => Embedding::Uint8(v),
                Some(v) => Embedding::Ubinary(v),
                None => return Err(mismatch(&Embedding::Int8(v))),
            },
            // A float vector whose every component is a whole number (all zeros, say) may
            // arrive from another encoder as integers.
            (Embedding::Int8(v), F::Float) => {
                Embedding::Float(v.iter().map(|&x| x as f32).collect())
            }
            (Embedding::Uint8(v), F::Float) => {
                Embedding::Float(v.iter().map(|&x| x as f32).collect())
            }
            (other, _) => return Err(mismatch(&other)),
        })
    }

    /// The float vector of a `base64` value.
    pub fn decode_base64(text: &str) -> Result<Vec<f32>, ProtoError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ProtoError::invalid_payload(format!("embedding is not base64: {e}")))?;
        if bytes.len() % 4 != 0 {
            return Err(ProtoError::invalid_payload(format!(
                "base64 embedding of {} bytes is not a whole number of f32",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Scale of the int8 calibration at width `n`: `32·√n` (±4 typical component sizes of a unit
/// vector fill ±127).
pub fn int8_scale(n: usize) -> f32 {
    32.0 * (n as f32).sqrt()
}

/// `encoding_format: int8` of a vector (already cut and renormalised).
pub fn quantize_int8(vector: &[f32]) -> Vec<i8> {
    let scale = int8_scale(vector.len());
    vector
        .iter()
        .map(|&v| (v * scale).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

/// Sign bits, 8 per byte, first component in the highest bit, the last byte zero-padded.
pub fn pack_signs(vector: &[f32]) -> Vec<u8> {
    vector
        .chunks(8)
        .map(|chunk| {
            chunk.iter().enumerate().fold(
                0u8,
                |byte, (j, &v)| if v > 0.0 { byte | (0x80 >> j) } else { byte },
            )
        })
        .collect()
}

impl Serialize for Embedding {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Embedding::Float(v) => v.serialize(serializer),
            Embedding::Base64(s) => serializer.serialize_str(s),
            Embedding::Int8(v) | Embedding::Binary(v) => v.serialize(serializer),
            Embedding::Uint8(v) | Embedding::Ubinary(v) => v.serialize(serializer),
        }
    }
}

/// One array element: integers and floats kept apart (JSON writes a float `1.0`, MessagePack
/// has float types), so an integer array is recognised as one.
enum Number {
    Int(i64),
    Float(f64),
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumberVisitor;

        impl Visitor<'_> for NumberVisitor {
            type Value = Number;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(i64::try_from(v).map_or(Number::Float(v as f64), Number::Int))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number::Float(v))
            }
        }

        deserializer.deserialize_any(NumberVisitor)
    }
}

/// A string is `base64`; an array of integers in −128..=127 is `int8`, of integers in 0..=255
/// `uint8`; any other array is `float`. [`Embedding::conform`] settles the rest.
impl<'de> Deserialize<'de> for Embedding {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EmbeddingVisitor;

        impl<'de> Visitor<'de> for EmbeddingVisitor {
            type Value = Embedding;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of numbers or a base64 string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Embedding, E> {
                Ok(Embedding::Base64(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Embedding, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16_384));
                while let Some(n) = seq.next_element::<Number>()? {
                    values.push(n);
                }
                let ints: Option<Vec<i64>> = values
                    .iter()
                    .map(|n| match n {
                        Number::Int(i) => Some(*i),
                        Number::Float(_) => None,
                    })
                    .collect();
                if let Some(ints) = ints.filter(|v| !v.is_empty()) {
                    if let Some(v) = ints.iter().map(|&i| i8::try_from(i).ok()).collect() {
                        return Ok(Embedding::Int8(v));
                    }
                    if let Some(v) = ints.iter().map(|&i| u8::try_from(i).ok()).collect() {
                        return Ok(Embedding::Uint8(v));
                    }
                }
                Ok(Embedding::Float(
                    values
                        .into_iter()
                        .map(|n| match n {
                            Number::Int(i) => i as f32,
                            Number::Float(f) => f as f32,
                        })
                        .collect(),
                ))
            }
        }

        deserializer.deserialize_any(EmbeddingVisitor)
    }
}

/// A request's output options, validated ([`crate::EmbedRequest::output_options`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// Keep the first N components of the fused vector, renormalised; `None`: all.
    pub dimensions: Option<usize>,
    pub encoding_format: EncodingFormat,
}

impl OutputOptions {
    /// Whether the reply is exactly the fused float vectors (nothing to apply).
    pub fn is_identity(&self) -> bool {
        self.dimensions.is_none() && self.encoding_format == EncodingFormat::Float
    }

    /// `dimensions` against the fused vector's width: more than it is `bad_request`.
    pub fn check_width(&self, width: usize) -> Result<(), ProtoError> {
        match self.dimensions {
            Some(d) if d > width => Err(ProtoError::bad_request(format!(
                "`dimensions` is {d}, more than the fused vector's {width} components"
            ))),
            _ => Ok(()),
        }
    }

    /// The output of one full float vector: cut to `dimensions`, renormalised, encoded.
    pub fn encode(&self, vector: &[f32]) -> Result<Embedding, ProtoError> {
        self.check_width(vector.len())?;
        match self.dimensions {
            None if self.encoding_format == EncodingFormat::Float => {
                Ok(Embedding::Float(vector.to_vec()))
            }
            None => Ok(Embedding::encode(vector, self.encoding_format)),
            Some(d) => {
                let prefix = &vector[..d];
                let norm = prefix
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt();
                let cut: Vec<f32> = if norm > 0.0 {
                    prefix
                        .iter()
                        .map(|&v| (f64::from(v) / norm) as f32)
                        .collect()
                } else {
                    prefix.to_vec()
                };
                Ok(Embedding::encode(&cut, self.encoding_format))
            }
        }
    }

    /// Applies the options to every fused vector of `reply`, on the way out; partials are
    /// left as they are (float, full width).
    pub fn apply(&self, reply: &mut crate::EmbedReply) -> Result<(), ProtoError> {
        self.apply_to(&mut reply.data)
    }

    /// [`OutputOptions::apply`] on `data` elements (the in-process pipeline's output).
    pub fn apply_to(&self, data: &mut [crate::EmbeddingData]) -> Result<(), ProtoError> {
        if self.is_identity() {
            return Ok(());
        }
        for element in data {
            if let Some(Embedding::Float(vector)) = &element.embedding {
                element.embedding = Some(self.encode(vector)?);
            }
        }
        Ok(())
    }
}

/// `dimensions` on the wire: a whole number (a float such as `256.5`, or `256.0`, is refused
/// with a message that says so, rather than serde's "expected usize").
pub(crate) fn deserialize_dimensions<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    struct DimensionsVisitor;

    impl<'de> Visitor<'de> for DimensionsVisitor {
        type Value = Option<usize>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("`dimensions` as a whole number")
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<usize>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<usize>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<usize>, E> {
            usize::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("`dimensions` {v} is too large")))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<usize>, E> {
            usize::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("`dimensions` must be positive, got {v}")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<usize>, E> {
            Err(E::custom(format!(
                "`dimensions` must be a whole number, got {v}"
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
            Err(E::custom(format!(
                "`dimensions` must be a whole number, got the string {v:?}"
            )))
        }
    }

    deserializer.deserialize_option(DimensionsVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_bits_pack_high_bit_first_and_pad() {
        let v = [0.5, -0.1, 0.0, 0.2, -1.0, -1.0, -1.0, 1.0, 0.3];
        assert_eq!(pack_signs(&v), vec![0b1001_0001, 0b1000_0000]);
        assert_eq!(
            Embedding::encode(&v, EncodingFormat::Binary),
            Embedding::Binary(vec![(0b1001_0001u8 as i16 - 128) as i8, 0])
        );
    }

    #[test]
    fn int8_follows_the_documented_calibration() {
        // n = 4: scale 32·2 = 64.
        let v = [0.5, -0.5, 0.01, 3.0];
        assert_eq!(
            Embedding::encode(&v, EncodingFormat::Int8),
            Embedding::Int8(vec![32, -32, 1, 127])
        );
        assert_eq!(
            Embedding::encode(&v, EncodingFormat::Uint8),
            Embedding::Uint8(vec![160, 96, 129, 255])
        );
    }

    #[test]
    fn base64_round_trips_the_floats() {
        let v = vec![0.25f32, -1.5, 3.0e-8];
        let Embedding::Base64(text) = Embedding::encode(&v, EncodingFormat::Base64) else {
            panic!("base64 expected");
        };
        assert_eq!(Embedding::decode_base64(&text).unwrap(), v);
        assert!(Embedding::decode_base64("AAA=").is_err());
    }

    #[test]
    fn dimensions_cut_and_renormalise() {
        let options = OutputOptions {
            dimensions: Some(2),
            encoding_format: EncodingFormat::Float,
        };
        let out = options.encode(&[0.6, 0.0, 0.8]).unwrap();
        assert_eq!(out, Embedding::Float(vec![1.0, 0.0]));
        let too_wide = OutputOptions {
            dimensions: Some(4),
            ..options
        };
        assert_eq!(
            too_wide.encode(&[0.6, 0.0, 0.8]).unwrap_err().kind,
            crate::ErrorKind::BadRequest
        );
    }

    #[test]
    fn every_format_survives_json_and_msgpack() {
        let v: Vec<f32> = (0..20)
            .map(|i| ((i * 7) % 11) as f32 / 10.0 - 0.5)
            .collect();
        for format in EncodingFormat::ALL {
            let sent = Embedding::encode(&v, format);
            for encoding in [crate::Encoding::Json, crate::Encoding::MsgPack] {
                let bytes = encoding.encode(&sent).unwrap();
                let back: Embedding = encoding.decode(&bytes).unwrap();
                assert_eq!(back.conform(format).unwrap(), sent, "{format} {encoding:?}");
            }
        }
    }
}
