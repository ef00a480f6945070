//! The embed.v1 request.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::input::checked_text;
use crate::output::{EncodingFormat, OutputOptions};
use crate::{Input, InputItem, ProtoError, RequestLimits};

/// The OpenAI-style `input` shorthand: one string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TextInput {
    /// `"input": "text"`.
    One(String),
    /// `"input": ["text", ...]`.
    Many(Vec<String>),
}

impl TextInput {
    /// The texts, one or many.
    pub fn as_slice(&self) -> &[String] {
        match self {
            TextInput::One(text) => std::slice::from_ref(text),
            TextInput::Many(texts) => texts,
        }
    }
}

/// Hand-written so that a wrong type says "expected a string or an array of strings" instead of
/// serde's "data did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for TextInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextInputVisitor;

        impl<'de> Visitor<'de> for TextInputVisitor {
            type Value = TextInput;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<TextInput, E> {
                Ok(TextInput::One(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<TextInput, E> {
                Ok(TextInput::One(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextInput, A::Error> {
                let mut texts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(text) = seq.next_element::<String>()? {
                    texts.push(text);
                }
                Ok(TextInput::Many(texts))
            }
        }

        deserializer.deserialize_any(TextInputVisitor)
    }
}

/// An embed.v1 request (JSON, or MessagePack with the same field names).
///
/// Exactly one of `input` (text shorthand) and `inputs` (any modality) must be set. Unknown
/// fields are refused: a misspelt `return_partial` would otherwise silently change the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbedRequest {
    /// Text shorthand, OpenAI style.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<TextInput>,
    /// Multimodal items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<InputItem>>,
    /// Model names to run; `None` means the fleet's default set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Fuse the per-model vectors with FuseMoE into `embedding`. Default true.
    pub fuse: bool,
    /// Also return the per-model vectors in `partials`. Default false.
    pub return_partials: bool,
    /// L2-normalise returned vectors. Default true.
    pub normalize: bool,
    /// Truncate text past a model's maximum length instead of failing with `input_too_long`.
    /// Default true.
    pub truncate: bool,
    /// Instruction for instruction-tuned models (instructor-xl, e5-mistral); part of the
    /// content key because it changes the vector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    /// Whether the inputs are search queries or documents. Asymmetric models embed the two
    /// differently (bge-large prepends its query instruction, e5-mistral wraps queries in its
    /// `Instruct: ... Query: ...` template); symmetric models ignore it. Default `document`.
    pub input_type: InputType,
    /// What to do when a model is unavailable (its circuit breaker open, no answer in time, a
    /// failure of its own): `strict` (default) fails the request with 503 naming the model;
    /// `partial` fuses the models that did answer and lists the others in `degraded`.
    pub fallback: Fallback,
    /// Matryoshka: return the first N components of the fused vector, renormalised (1 to the
    /// fused width, 1536). Absent: the whole vector. Applied on the way out: the cache keeps
    /// the full vector. Needs `fuse: true`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::output::deserialize_dimensions"
    )]
    pub dimensions: Option<usize>,
    /// How the fused vector is sent: `float` (default), `base64`, `int8`, `uint8`, `binary`,
    /// `ubinary` ([`crate::output`]). Partials are always float.
    #[serde(skip_serializing_if = "is_float")]
    pub encoding_format: EncodingFormat,
}

fn is_float(format: &EncodingFormat) -> bool {
    *format == EncodingFormat::Float
}

/// A request's answer to an unavailable model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// 503 naming the model.
    #[default]
    Strict,
    /// Answer without it: the reply lists it in `degraded`, and is not cached as a full result.
    Partial,
}

/// What the inputs of a request are, for the models that embed queries and documents apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    /// A passage to be found: embedded as it is by every model.
    #[default]
    Document,
    /// A search query: asymmetric models add their query instruction or template.
    Query,
}

impl InputType {
    /// The wire name, `"document"` or `"query"`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputType::Document => "document",
            InputType::Query => "query",
        }
    }
}

impl Default for EmbedRequest {
    fn default() -> Self {
        EmbedRequest {
            input: None,
            inputs: None,
            models: None,
            fuse: true,
            return_partials: false,
            normalize: true,
            truncate: true,
            instruction: None,
            input_type: InputType::Document,
            fallback: Fallback::Strict,
            dimensions: None,
            encoding_format: EncodingFormat::Float,
        }
    }
}

impl EmbedRequest {
    /// A text request with the default options: `"input": [texts...]`.
    pub fn texts(texts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EmbedRequest {
            input: Some(TextInput::Many(texts.into_iter().map(Into::into).collect())),
            ..Default::default()
        }
    }

    /// A multimodal request with the default options: `"inputs": [items...]`.
    pub fn items(items: impl IntoIterator<Item = InputItem>) -> Self {
        EmbedRequest {
            inputs: Some(items.into_iter().collect()),
            ..Default::default()
        }
    }

    /// Sets `models`.
    pub fn with_models(mut self, models: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `input_type`.
    pub fn with_input_type(mut self, input_type: InputType) -> Self {
        self.input_type = input_type;
        self
    }

    /// Sets `instruction`.
    pub fn with_instruction(mut self, instruction: impl Into<String>) -> Self {
        self.instruction = Some(instruction.into());
        self
    }

    /// Sets `fuse`.
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    pub fn with_fuse(mut self, fuse: bool) -> Self {
        self.fuse = fuse;
        self
    }

    /// Sets `return_partials`.
    pub fn with_partials(mut self, return_partials: bool) -> Self {
        self.return_partials = return_partials;
        self
    }

    /// Sets `normalize`.
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    /// Sets `truncate`.
    pub fn with_truncate(mut self, truncate: bool) -> Self {
        self.truncate = truncate;
        self
    }

    /// Sets `dimensions`.
    pub fn with_dimensions(mut self, dimensions: usize) -> Self {
        self.dimensions = Some(dimensions);
        self
    }

    /// Sets `encoding_format`.
    pub fn with_encoding_format(mut self, format: EncodingFormat) -> Self {
        self.encoding_format = format;
        self
    }

    /// `dimensions` and `encoding_format`, checked as far as the request alone allows:
    /// `dimensions: 0` and output options on an unfused request are `bad_request`. The upper
    /// bound is the fused layer's width, checked with [`OutputOptions::check_width`].
    pub fn output_options(&self) -> Result<OutputOptions, ProtoError> {
        let options = OutputOptions {
            dimensions: self.dimensions,
            encoding_format: self.encoding_format,
        };
        if self.dimensions == Some(0) {
            return Err(ProtoError::bad_request(
                "`dimensions` is 0: ask for at least one component",
            ));
        }
        if !self.fuse && !options.is_identity() {
            return Err(ProtoError::bad_request(
                "`dimensions` and `encoding_format` apply to the fused vector; they need \
                 `fuse: true`",
            ));
        }
        Ok(options)
    }

    /// The instruction, with a blank one treated as absent so that `""` and `null` share a
    /// content key. Use this, not the raw field, when computing keys or prompting models.
    pub fn effective_instruction(&self) -> Option<&str> {
        self.instruction.as_deref().filter(|i| !i.trim().is_empty())
    }

    /// Whether the reply carries `partials`: when asked for, and always without fusion, since
    /// otherwise an unfused reply would carry no vectors at all.
    pub fn wants_partials(&self) -> bool {
        self.return_partials || !self.fuse
    }

    /// Validates the request and decodes its inputs, in order (index `i` of the result is
    /// `data[i]` of the reply).
    ///
    /// Errors: `bad_request` for neither or both of `input`/`inputs`, a malformed item, an empty
    /// or repeated model list entry; `empty_input` for an empty list or blank content;
    /// `too_large` for more than `limits.max_inputs` inputs or an item / instruction over
    /// `limits.max_input_bytes`; `invalid_base64`. Item errors name the item (`inputs[2]: ...`).
    pub fn to_inputs(&self, limits: &RequestLimits) -> Result<Vec<Input>, ProtoError> {
        let count = match (&self.input, &self.inputs) {
            (None, None) => {
                return Err(ProtoError::bad_request(
                    "give `input` (text) or `inputs` (any modality)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ProtoError::bad_request(
                    "give only one of `input` and `inputs`, not both",
                ))
            }
            (Some(text), None) => text.as_slice().len(),
            (None, Some(items)) => items.len(),
        };
        if count == 0 {
            return Err(ProtoError::empty_input("the input list is empty"));
        }
        limits.check_input_count(count)?;
        self.check_models()?;
        if let Some(instruction) = self.effective_instruction() {
            limits.check_input_len("`instruction`", instruction.len())?;
        }

        match (&self.input, &self.inputs) {
            (Some(text), _) => text
                .as_slice()
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    checked_text("input", t, limits)
                        .map(|t| Input::Text(t.to_owned()))
                        .map_err(|e| at(&format!("input[{i}]"), e))
                })
                .collect(),
            (None, Some(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.to_input(limits)
                        .map_err(|e| at(&format!("inputs[{i}]"), e))
                })
                .collect(),
            (None, None) => Err(ProtoError::internal("input presence checked above")),
        }
    }

    /// Catalogue membership is the models crate's business (`unknown_model`); here only the
    /// shape: non-empty, no blank or repeated names.
    fn check_models(&self) -> Result<(), ProtoError> {
        let Some(models) = &self.models else {
            return Ok(());
        };
        if models.is_empty() {
            return Err(ProtoError::bad_request(
                "`models` is empty; leave it out to use the default set",
            ));
        }
        let mut seen = BTreeSet::new();
        for model in models {
            if model.trim().is_empty() {
                return Err(ProtoError::bad_request("`models` has a blank name"));
            }
            if !seen.insert(model.as_str()) {
                return Err(ProtoError::bad_request(format!(
                    "model `{model}` is listed twice"
                )));
            }
        }
        Ok(())
    }
}

/// Prefixes an item error with where the item sits in the request.
fn at(place: &str, err: ProtoError) -> ProtoError {
    ProtoError::new(err.kind, format!("{place}: {}", err.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_missing_fields() {
        let req: EmbedRequest = serde_json::from_str(r#"{"input": "hi"}"#).expect("decode");
        assert_eq!(
            req,
            EmbedRequest {
                input: Some(TextInput::One("hi".into())),
                ..Default::default()
            }
        );
        assert!(req.fuse && req.normalize && req.truncate && !req.return_partials);
    }

    #[test]
    fn builder_sets_fields() {
        let req = EmbedRequest::texts(["a", "b"])
            .with_models(["minilm"])
            .with_instruction("Represent the query")
            .with_fuse(false)
            .with_partials(true)
            .with_normalize(false)
            .with_truncate(false);
        assert_eq!(
            req.input,
            Some(TextInput::Many(vec!["a".into(), "b".into()]))
        );
        assert_eq!(req.models.as_deref(), Some(&["minilm".to_owned()][..]));
        assert_eq!(req.effective_instruction(), Some("Represent the query"));
        assert!(!req.fuse && req.return_partials && !req.normalize && !req.truncate);
    }

    #[test]
    fn blank_instruction_is_absent() {
        assert_eq!(
            EmbedRequest::texts(["a"])
                .with_instruction("  ")
                .effective_instruction(),
            None
        );
    }

    #[test]
    fn unfused_requests_always_want_partials() {
        assert!(!EmbedRequest::texts(["a"]).wants_partials());
        assert!(EmbedRequest::texts(["a"]).with_fuse(false).wants_partials());
        assert!(EmbedRequest::texts(["a"])
            .with_partials(true)
            .wants_partials());
    }

    #[test]
    fn text_input_rejects_other_types_clearly() {
        let err = serde_json::from_str::<EmbedRequest>(r#"{"input": 5}"#).expect_err("a number");
        assert!(
            err.to_string().contains("a string or an array of strings"),
            "{err}"
        );
        let err =
            serde_json::from_str::<EmbedRequest>(r#"{"input": ["a", 5]}"#).expect_err("mixed");
        assert!(err.to_string().contains("expected a string"), "{err}");
    }

    #[test]
    fn dimensions_must_be_a_positive_whole_number_on_a_fused_request() {
        let req: EmbedRequest =
            serde_json::from_str(r#"{"input": "a", "dimensions": 256, "encoding_format": "int8"}"#)
                .expect("decode");
        let options = req.output_options().expect("valid");
        assert_eq!(options.dimensions, Some(256));
        assert_eq!(options.encoding_format, EncodingFormat::Int8);
        for bad in [r#"256.5"#, r#"256.0"#, r#""256""#, r#"-3"#] {
            let json = format!(r#"{{"input": "a", "dimensions": {bad}}}"#);
            let err = crate::Encoding::Json
                .decode::<EmbedRequest>(json.as_bytes())
                .expect_err(bad);
            assert_eq!(err.kind, crate::ErrorKind::InvalidPayload, "{bad}");
            assert!(err.message.contains("dimensions"), "{bad}: {err}");
        }
        let zero = EmbedRequest::texts(["a"]).with_dimensions(0);
        assert_eq!(
            zero.output_options().unwrap_err().kind,
            crate::ErrorKind::BadRequest
        );
        let unfused = EmbedRequest::texts(["a"])
            .with_fuse(false)
            .with_encoding_format(EncodingFormat::Binary);
        assert_eq!(
            unfused.output_options().unwrap_err().kind,
            crate::ErrorKind::BadRequest
        );
        // Defaults stay off the wire, so older readers see the request they know.
        let json = serde_json::to_value(EmbedRequest::texts(["a"])).unwrap();
        assert!(json.get("dimensions").is_none() && json.get("encoding_format").is_none());
    }

    #[test]
    fn text_inputs_keep_order_and_content() {
        let req = EmbedRequest::texts(["  padded  ", "b"]);
        let inputs = req.to_inputs(&RequestLimits::default()).expect("valid");
        assert_eq!(
            inputs,
            vec![Input::Text("  padded  ".into()), Input::Text("b".into())]
        );
    }
}
