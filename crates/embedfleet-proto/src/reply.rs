//! The embed.v1 reply (OpenAI-shaped, plus partials, expert selection and cache flags).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Embedding;

/// Defines a zero-sized marker that serialises as one constant string and deserialises only
/// from it, so the OpenAI-compatible `object` fields cannot be set to anything else.
macro_rules! object_tag {
    ($(#[$doc:meta])* $name:ident = $value:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name;

        impl $name {
            /// The wire string.
            pub const VALUE: &'static str = $value;
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str($value)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct TagVisitor;

                impl Visitor<'_> for TagVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "the string \"{}\"", $value)
                    }

                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        if v == $value {
                            Ok($name)
                        } else {
                            Err(E::invalid_value(de::Unexpected::Str(v), &self))
                        }
                    }
                }

                deserializer.deserialize_str(TagVisitor)
            }
        }
    };
}

object_tag!(
    /// `"object": "list"` of an [`EmbedReply`].
    ListObject = "list"
);
object_tag!(
    /// `"object": "embedding"` of an [`EmbeddingData`].
    EmbeddingObject = "embedding"
);

/// A successful reply. `model` is [`crate::FUSED_MODEL_NAME`] for fused replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedReply {
    /// Always `"list"`; may be omitted by other implementations.
    #[serde(default)]
    pub object: ListObject,
    /// What produced `embedding`.
    pub model: String,
    /// One entry per input, in request order.
    pub data: Vec<EmbeddingData>,
    /// Token accounting over all inputs.
    pub usage: Usage,
    /// Models left out under `fallback: "partial"` (unavailable or late); the fused vectors are
    /// of the others only. Absent when every model answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

impl EmbedReply {
    /// A reply with `object: "list"`.
    pub fn new(model: impl Into<String>, data: Vec<EmbeddingData>, usage: Usage) -> Self {
        EmbedReply {
            object: ListObject,
            model: model.into(),
            data,
            usage,
            degraded: Vec::new(),
        }
    }
}

/// The vectors for one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingData {
    /// Always `"embedding"`; may be omitted by other implementations.
    #[serde(default)]
    pub object: EmbeddingObject,
    /// Position of the input in the request.
    pub index: usize,
    /// The fused vector in the request's `encoding_format` (float unless asked otherwise);
    /// absent when the request had `fuse: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Embedding>,
    /// Per-model vectors by model name; present when partials were asked for. A `BTreeMap` so
    /// that the encoded reply is deterministic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partials: Option<BTreeMap<String, Vec<f32>>>,
    /// Which FuseMoE experts the gate chose, for debugging and analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertSelection>,
    /// Whether the result came from the cache.
    #[serde(default)]
    pub cached: bool,
}

impl EmbeddingData {
    /// An entry with nothing filled in yet.
    pub fn new(index: usize) -> Self {
        EmbeddingData {
            object: EmbeddingObject,
            index,
            embedding: None,
            partials: None,
            experts: None,
            cached: false,
        }
    }

    /// An entry with only the fused vector.
    pub fn fused(index: usize, embedding: Vec<f32>) -> Self {
        EmbeddingData {
            object: EmbeddingObject,
            index,
            embedding: Some(Embedding::Float(embedding)),
            partials: None,
            experts: None,
            cached: false,
        }
    }
}

impl EmbeddingData {
    /// The fused vector of a `float` reply.
    pub fn float_embedding(&self) -> Option<&[f32]> {
        self.embedding.as_ref().and_then(Embedding::as_float)
    }
}

/// The gate's top-k choice for one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertSelection {
    /// Gate weight of every expert, zero for those not selected; sums to 1.
    pub weights: Vec<f32>,
    /// Indices of the selected experts.
    pub selected: Vec<usize>,
}

/// Token counts, OpenAI style. Media inputs count the tokens (patches, frames) the models saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the inputs.
    pub prompt_tokens: u64,
    /// Equal to `prompt_tokens`: embedding generates nothing.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage for `prompt_tokens` input tokens.
    pub fn new(prompt_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_tags_serialise_as_constants() {
        let reply = EmbedReply::new("m", vec![EmbeddingData::fused(0, vec![1.0])], Usage::new(3));
        let json = serde_json::to_value(&reply).expect("serialise");
        assert_eq!(json["object"], "list");
        assert_eq!(json["data"][0]["object"], "embedding");
        assert_eq!(json["usage"]["total_tokens"], 3);
        // Absent optional vectors are left out, not sent as null.
        assert!(json["data"][0].get("partials").is_none());
        assert!(json["data"][0].get("experts").is_none());
    }

    #[test]
    fn wrong_object_tag_is_refused_missing_is_accepted() {
        let wrong = r#"{"object":"dict","model":"m","data":[],"usage":{"prompt_tokens":0,"total_tokens":0}}"#;
        let err = serde_json::from_str::<EmbedReply>(wrong).expect_err("wrong tag");
        assert!(err.to_string().contains("\"list\""), "{err}");
        let missing =
            r#"{"model":"m","data":[{"index":0}],"usage":{"prompt_tokens":0,"total_tokens":0}}"#;
        let reply: EmbedReply = serde_json::from_str(missing).expect("tags default");
        assert_eq!(reply.data[0].embedding, None);
        assert!(!reply.data[0].cached);
    }
}
