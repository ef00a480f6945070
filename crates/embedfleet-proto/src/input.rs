//! One input: its wire shape ([`InputItem`]) and its validated, decoded form ([`Input`]).

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{Modality, ProtoError, RequestLimits};

/// Standard base64 alphabet; padding optional on decode (clients differ), always written on
/// encode. Line breaks (MIME style) are not accepted.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The highest audio sample rate the contract takes (Hz): past every studio format (384 kHz), so
/// that a rate like 10 MHz is refused as the client error it is rather than resampled.
pub const MAX_SAMPLE_RATE: u32 = 384_000;

/// One multimodal item as it travels in `inputs`: exactly one of `text`, `code`, `image_b64`,
/// `audio_b64`, plus the companion field of that kind.
///
/// A flat struct rather than an enum so that a mixed item (`{"text": .., "code": ..}`) decodes and
/// is then rejected by [`InputItem::to_input`] with a `bad_request` that names the clash. Unknown
/// fields are still refused at decode time (`invalid_payload`, naming the field), because a
/// misspelt field would otherwise be silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputItem {
    /// Natural-language text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Source code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Language of `code` (e.g. `rust`); only with `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// An encoded image, standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_b64: Option<String>,
    /// Image format hint (e.g. `png`); only with `image_b64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Audio, standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_b64: Option<String>,
    /// Sample rate of raw audio in Hz; only with `audio_b64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
}

impl InputItem {
    /// `{"text": text}`.
    pub fn text(text: impl Into<String>) -> Self {
        InputItem {
            text: Some(text.into()),
            ..Default::default()
        }
    }

    /// `{"code": code, "language": language}`.
    pub fn code(code: impl Into<String>, language: Option<&str>) -> Self {
        InputItem {
            code: Some(code.into()),
            language: language.map(str::to_owned),
            ..Default::default()
        }
    }

    /// `{"image_b64": base64(bytes), "format": format}`.
    pub fn image(bytes: &[u8], format: Option<&str>) -> Self {
        InputItem {
            image_b64: Some(BASE64.encode(bytes)),
            format: format.map(str::to_owned),
            ..Default::default()
        }
    }

    /// `{"audio_b64": base64(bytes), "sample_rate": sample_rate}`.
    pub fn audio(bytes: &[u8], sample_rate: Option<u32>) -> Self {
        InputItem {
            audio_b64: Some(BASE64.encode(bytes)),
            sample_rate,
            ..Default::default()
        }
    }

    /// Validates the item and decodes it.
    ///
    /// Errors: `bad_request` for no kind, several kinds, a companion field of another kind or a
    /// zero sample rate; `empty_input` for blank text/code or empty media; `too_large` past
    /// `limits.max_input_bytes`; `invalid_base64`.
    pub fn to_input(&self, limits: &RequestLimits) -> Result<Input, ProtoError> {
        let kinds: Vec<&str> = [
            ("text", self.text.is_some()),
            ("code", self.code.is_some()),
            ("image_b64", self.image_b64.is_some()),
            ("audio_b64", self.audio_b64.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect();
        match kinds.as_slice() {
            [] => {
                return Err(ProtoError::bad_request(
                    "item has none of `text`, `code`, `image_b64`, `audio_b64`",
                ))
            }
            [_] => {}
            [..] => {
                return Err(ProtoError::bad_request(format!(
                    "item mixes `{}`; give exactly one kind per item",
                    kinds.join("` and `")
                )))
            }
        }
        self.check_companions()?;

        if let Some(text) = &self.text {
            return Ok(Input::Text(checked_text("text", text, limits)?.to_owned()));
        }
        if let Some(code) = &self.code {
            return Ok(Input::Code {
                code: checked_text("code", code, limits)?.to_owned(),
                language: normalised_tag(self.language.as_deref()),
            });
        }
        if let Some(b64) = &self.image_b64 {
            return Ok(Input::Image {
                bytes: decode_media("image_b64", b64, limits)?,
                format: normalised_tag(self.format.as_deref()),
            });
        }
        if let Some(b64) = &self.audio_b64 {
            if self.sample_rate == Some(0) {
                return Err(ProtoError::bad_request("`sample_rate` must be positive"));
            }
            if let Some(rate) = self.sample_rate.filter(|&rate| rate > MAX_SAMPLE_RATE) {
                return Err(ProtoError::bad_request(format!(
                    "`sample_rate` {rate} Hz is over the {MAX_SAMPLE_RATE} Hz this contract takes"
                )));
            }
            return Ok(Input::Audio {
                bytes: decode_media("audio_b64", b64, limits)?,
                sample_rate: self.sample_rate,
            });
        }
        Err(ProtoError::internal("input item kind check fell through"))
    }

    /// A companion field on the wrong kind is a client bug worth reporting, not ignoring.
    fn check_companions(&self) -> Result<(), ProtoError> {
        let stray = [
            (
                "language",
                "code",
                self.language.is_some() && self.code.is_none(),
            ),
            (
                "format",
                "image_b64",
                self.format.is_some() && self.image_b64.is_none(),
            ),
            (
                "sample_rate",
                "audio_b64",
                self.sample_rate.is_some() && self.audio_b64.is_none(),
            ),
        ];
        match stray.into_iter().find(|(_, _, is_stray)| *is_stray) {
            Some((field, owner, _)) => Err(ProtoError::bad_request(format!(
                "`{field}` only goes with `{owner}`"
            ))),
            None => Ok(()),
        }
    }
}

/// Text or code that is non-blank and within the byte limit. Returned unchanged: whitespace can
/// matter to a tokenizer, and the content key must see what the model sees.
pub(crate) fn checked_text<'a>(
    what: &str,
    text: &'a str,
    limits: &RequestLimits,
) -> Result<&'a str, ProtoError> {
    if text.trim().is_empty() {
        return Err(ProtoError::empty_input(format!("`{what}` is empty")));
    }
    limits.check_input_len(&format!("`{what}`"), text.len())?;
    Ok(text)
}

/// `language` / `format` hints are case-insensitive; lower-casing them here keeps `"PNG"` and
/// `"png"` on one content key. Blank means absent.
fn normalised_tag(tag: Option<&str>) -> Option<String> {
    tag.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
}

fn decode_media(what: &str, b64: &str, limits: &RequestLimits) -> Result<Vec<u8>, ProtoError> {
    if b64.trim().is_empty() {
        return Err(ProtoError::empty_input(format!("`{what}` is empty")));
    }
    // Refuse before allocating: valid base64 of at most `max` bytes has at most
    // ceil(max / 3) * 4 characters.
    let max_chars = limits.max_input_bytes.div_ceil(3).saturating_mul(4);
    if b64.len() > max_chars {
        return Err(ProtoError::too_large(format!(
            "`{what}` decodes to more than {} bytes",
            limits.max_input_bytes
        )));
    }
    let bytes = BASE64
        .decode(b64)
        .map_err(|e| ProtoError::invalid_base64(format!("`{what}`: {e}")))?;
    limits.check_input_len(&format!("decoded `{what}`"), bytes.len())?;
    Ok(bytes)
}

/// A validated input, media decoded: what workers embed and content keys hash.
///
/// Serialisable so that fleet roles can pass it on (model jobs); media travel as raw bytes
/// (`serde_bytes`: a MessagePack bin, not an array of integers). Clients never send this form:
/// the wire contract is [`InputItem`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Non-blank text.
    Text(String),
    /// Non-blank code; `language` lower-cased.
    Code {
        /// The source.
        code: String,
        /// Lower-cased language hint.
        language: Option<String>,
    },
    /// Decoded image bytes.
    Image {
        /// The encoded image file (png, jpeg, ...), not pixels.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Lower-cased format hint.
        format: Option<String>,
    },
    /// Decoded audio bytes.
    Audio {
        /// The audio payload.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Sample rate in Hz, when given.
        sample_rate: Option<u32>,
    },
}

impl Input {
    /// The modality, which decides the models that take this input.
    pub fn modality(&self) -> Modality {
        match self {
            Input::Text(_) => Modality::Text,
            Input::Code { .. } => Modality::Code,
            Input::Image { .. } => Modality::Image,
            Input::Audio { .. } => Modality::Audio,
        }
    }

    /// The text a tokenizer sees: the text, or the code. `None` for media.
    pub fn text(&self) -> Option<&str> {
        match self {
            Input::Text(text) => Some(text),
            Input::Code { code, .. } => Some(code),
            Input::Image { .. } | Input::Audio { .. } => None,
        }
    }

    /// Size of the content in bytes (UTF-8 for text, decoded for media).
    pub fn byte_len(&self) -> usize {
        match self {
            Input::Text(text) => text.len(),
            Input::Code { code, .. } => code.len(),
            Input::Image { bytes, .. } | Input::Audio { bytes, .. } => bytes.len(),
        }
    }

    /// Back to the wire shape, e.g. to forward the input in a job message.
    pub fn to_item(&self) -> InputItem {
        match self {
            Input::Text(text) => InputItem::text(text.clone()),
            Input::Code { code, language } => InputItem::code(code.clone(), language.as_deref()),
            Input::Image { bytes, format } => InputItem::image(bytes, format.as_deref()),
            Input::Audio { bytes, sample_rate } => InputItem::audio(bytes, *sample_rate),
        }
    }
}

impl From<&Input> for InputItem {
    fn from(input: &Input) -> Self {
        input.to_item()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn kind_of(item: &InputItem) -> Option<ErrorKind> {
        item.to_input(&RequestLimits::default())
            .err()
            .map(|e| e.kind)
    }

    #[test]
    fn decoded_inputs_round_trip_to_items() {
        let inputs = [
            Input::Text("hello".into()),
            Input::Code {
                code: "fn main() {}".into(),
                language: Some("rust".into()),
            },
            Input::Image {
                bytes: vec![0x89, b'P', b'N', b'G'],
                format: Some("png".into()),
            },
            Input::Audio {
                bytes: vec![1, 2, 3, 4, 5],
                sample_rate: Some(16_000),
            },
        ];
        for input in inputs {
            let back = input.to_item().to_input(&RequestLimits::default());
            assert_eq!(back.as_ref(), Ok(&input));
        }
    }

    #[test]
    fn accessors_follow_the_variant() {
        let code = Input::Code {
            code: "x = 1".into(),
            language: None,
        };
        assert_eq!(
            (code.modality(), code.text()),
            (Modality::Code, Some("x = 1"))
        );
        let audio = Input::Audio {
            bytes: vec![0; 3],
            sample_rate: None,
        };
        assert_eq!(
            (audio.modality(), audio.text(), audio.byte_len()),
            (Modality::Audio, None, 3)
        );
    }

    #[test]
    fn tags_are_lower_cased_and_blank_is_absent() {
        let item = InputItem {
            image_b64: Some("AAEC".into()),
            format: Some(" PNG ".into()),
            ..Default::default()
        };
        let expected = Input::Image {
            bytes: vec![0, 1, 2],
            format: Some("png".into()),
        };
        assert_eq!(item.to_input(&RequestLimits::default()), Ok(expected));
        let code = InputItem::code("x", Some("  "));
        assert_eq!(
            code.to_input(&RequestLimits::default()),
            Ok(Input::Code {
                code: "x".into(),
                language: None
            })
        );
    }

    #[test]
    fn base64_padding_is_optional() {
        let padded = InputItem {
            audio_b64: Some("AAE=".into()),
            ..Default::default()
        };
        let bare = InputItem {
            audio_b64: Some("AAE".into()),
            ..Default::default()
        };
        let limits = RequestLimits::default();
        assert_eq!(padded.to_input(&limits), bare.to_input(&limits));
        assert_eq!(padded.to_input(&limits).map(|i| i.byte_len()), Ok(2));
    }

    #[test]
    fn stray_companions_and_zero_rate_are_bad_requests() {
        let stray = InputItem {
            text: Some("hi".into()),
            format: Some("png".into()),
            ..Default::default()
        };
        assert_eq!(kind_of(&stray), Some(ErrorKind::BadRequest));
        let zero = InputItem::audio(&[1, 2], Some(0));
        assert_eq!(kind_of(&zero), Some(ErrorKind::BadRequest));
        let ten_mhz = InputItem::audio(&[1, 2], Some(10_000_000));
        assert_eq!(kind_of(&ten_mhz), Some(ErrorKind::BadRequest));
        let top = InputItem::audio(&[1, 2], Some(MAX_SAMPLE_RATE));
        assert_eq!(kind_of(&top), None);
    }

    #[test]
    fn oversized_base64_is_refused_before_decoding() {
        let limits = RequestLimits {
            max_input_bytes: 3,
            ..Default::default()
        };
        // "!!!!!!!!" is not base64, but at 8 chars it cannot be 3 bytes either: size wins.
        let item = InputItem {
            image_b64: Some("!!!!!!!!".into()),
            ..Default::default()
        };
        assert_eq!(
            item.to_input(&limits).map_err(|e| e.kind),
            Err(ErrorKind::TooLarge)
        );
        // 4 chars may be 3 bytes, so the invalid symbol is what gets reported.
        let item = InputItem {
            image_b64: Some("!!!!".into()),
            ..Default::default()
        };
        assert_eq!(
            item.to_input(&limits).map_err(|e| e.kind),
            Err(ErrorKind::InvalidBase64)
        );
    }
}
