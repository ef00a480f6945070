//! Requests, replies and error bodies survive both encodings, and the two encodings decode the
//! same value.

use std::collections::BTreeMap;

use embedfleet_proto::{
    EmbedReply, EmbedRequest, EmbeddingData, Encoding, ErrorBody, ExpertSelection, InputItem,
    ProtoError, Usage,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn request() -> EmbedRequest {
    EmbedRequest::items([
        InputItem::text("a cat on a mat"),
        InputItem::code("fn main() {}", Some("rust")),
        InputItem::image(&[0x89, b'P', b'N', b'G'], Some("png")),
        InputItem::audio(&[0, 1, 2, 3], Some(16_000)),
    ])
    .with_models(["minilm", "clip-vit-l"])
    .with_instruction("Represent the document")
    .with_partials(true)
}

fn reply() -> EmbedReply {
    let partials = BTreeMap::from([
        ("minilm".to_owned(), vec![0.25f32, -0.5, 1e-7]),
        (
            "clip-vit-l".to_owned(),
            vec![f32::MIN_POSITIVE, 3.4e38, 0.1],
        ),
    ]);
    let full = EmbeddingData {
        partials: Some(partials),
        experts: Some(ExpertSelection {
            weights: vec![0.6, 0.4],
            selected: vec![3, 5],
        }),
        cached: true,
        ..EmbeddingData::fused(0, vec![0.1, 0.2, 0.3])
    };
    let unfused = EmbeddingData {
        embedding: None,
        ..EmbeddingData::fused(1, vec![])
    };
    EmbedReply::new("embedfleet-fusemoe", vec![full, unfused], Usage::new(17))
}

/// Encodes in both encodings, decodes each, and checks both equal the original.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let json = Encoding::Json.encode(value).expect("JSON encode");
    let msgpack = Encoding::MsgPack.encode(value).expect("MessagePack encode");
    assert_ne!(json, msgpack, "the encodings must actually differ");
    let from_json: T = Encoding::Json.decode(&json).expect("JSON decode");
    let from_msgpack: T = Encoding::MsgPack
        .decode(&msgpack)
        .expect("MessagePack decode");
    assert_eq!(&from_json, value);
    assert_eq!(from_json, from_msgpack);
}

#[test]
fn request_round_trips() {
    round_trip(&request());
    round_trip(&EmbedRequest::texts(["one", "two"]));
}

#[test]
fn reply_round_trips() {
    round_trip(&reply());
}

#[test]
fn error_body_round_trips() {
    round_trip(&ErrorBody::from(ProtoError::unknown_model("nope")));
}

#[test]
fn msgpack_request_from_another_client_decodes() {
    // What a Python client would send: a map with only the fields it cares about.
    let raw = rmp_serde::to_vec_named(&serde_json::json!({
        "input": ["hello"],
        "normalize": false,
    }))
    .expect("encode");
    let req: EmbedRequest = Encoding::MsgPack.decode(&raw).expect("decode");
    assert_eq!(req, EmbedRequest::texts(["hello"]).with_normalize(false));
}
