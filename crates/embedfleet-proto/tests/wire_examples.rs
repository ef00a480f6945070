//! The request and reply examples of the wire contract (ARCHITECTURE.md, "Wire contract
//! (embed.v1)") decode into the types, with the pseudo-JSON made concrete.

use embedfleet_proto::{
    EmbedReply, EmbedRequest, Encoding, ErrorBody, ErrorKind, Input, InputItem, RequestLimits,
    TextInput, FUSED_MODEL_NAME,
};

/// The documented request with the `inputs` form (the example shows both forms; a real request
/// has one) and real base64 in place of `"..."`.
const REQUEST_INPUTS: &str = r#"
{ "inputs": [ {"text": "a cat"}, {"code": "fn main() {}", "language": "rust"},
              {"image_b64": "iVBORw0KGgo=", "format": "png"}, {"audio_b64": "AAAAAA==", "sample_rate": 16000} ],
  "models": ["minilm", "mpnet"],
  "fuse": true, "return_partials": false, "normalize": true, "truncate": true,
  "instruction": null }
"#;

#[test]
fn documented_inputs_request_decodes_and_validates() {
    let req: EmbedRequest = Encoding::Json
        .decode(REQUEST_INPUTS.as_bytes())
        .expect("decode");
    assert_eq!(
        req.models,
        Some(vec!["minilm".to_owned(), "mpnet".to_owned()])
    );
    assert!(req.fuse && !req.return_partials && req.normalize && req.truncate);
    assert_eq!(req.instruction, None);
    let inputs = req
        .to_inputs(&RequestLimits::default())
        .expect("valid request");
    assert_eq!(
        inputs,
        vec![
            Input::Text("a cat".into()),
            Input::Code {
                code: "fn main() {}".into(),
                language: Some("rust".into())
            },
            Input::Image {
                bytes: vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'],
                format: Some("png".into())
            },
            Input::Audio {
                bytes: vec![0; 4],
                sample_rate: Some(16_000)
            },
        ]
    );
}

#[test]
fn documented_placeholder_media_decodes_but_is_not_base64() {
    // Verbatim item from the example: the wire shape is fine, the content is not.
    let req: EmbedRequest = Encoding::Json
        .decode(br#"{"inputs": [{"image_b64": "...", "format": "png"}]}"#)
        .expect("decode");
    assert_eq!(
        req.inputs.as_deref(),
        Some(
            &[InputItem {
                image_b64: Some("...".into()),
                format: Some("png".into()),
                ..Default::default()
            }][..]
        )
    );
    let err = req
        .to_inputs(&RequestLimits::default())
        .expect_err("not base64");
    assert_eq!((err.kind, err.code()), (ErrorKind::InvalidBase64, 400));
}

#[test]
fn documented_input_shorthand_decodes_both_forms() {
    let one: EmbedRequest = Encoding::Json
        .decode(br#"{"input": "text"}"#)
        .expect("string");
    assert_eq!(one.input, Some(TextInput::One("text".into())));
    let many: EmbedRequest = Encoding::Json
        .decode(br#"{"input": ["text", "..."]}"#)
        .expect("array");
    let inputs = many.to_inputs(&RequestLimits::default()).expect("valid");
    assert_eq!(
        inputs,
        vec![Input::Text("text".into()), Input::Text("...".into())]
    );
}

const REPLY: &str = r#"
{ "object": "list", "model": "embedfleet-fusemoe",
  "data": [ { "object": "embedding", "index": 0, "embedding": [ 0.6, 0.8 ],
              "partials": {"minilm": [ 1.0, 0.0 ], "mpnet": [ 0.0, 1.0 ]},
              "experts": {"weights": [ 0.7, 0.3 ], "selected": [3, 5]},
              "cached": false } ],
  "usage": { "prompt_tokens": 12, "total_tokens": 12 } }
"#;

#[test]
fn documented_reply_decodes() {
    let reply: EmbedReply = Encoding::Json.decode(REPLY.as_bytes()).expect("decode");
    assert_eq!(reply.model, FUSED_MODEL_NAME);
    assert_eq!(reply.usage.prompt_tokens, 12);
    assert_eq!(reply.usage.total_tokens, 12);
    let item = &reply.data[0];
    assert_eq!(item.index, 0);
    assert_eq!(item.float_embedding(), Some(&[0.6f32, 0.8][..]));
    let partials = item.partials.as_ref().expect("partials");
    assert_eq!(partials.keys().collect::<Vec<_>>(), ["minilm", "mpnet"]);
    let experts = item.experts.as_ref().expect("experts");
    assert_eq!(experts.selected, [3, 5]);
    assert_eq!(experts.weights, [0.7, 0.3]);
    assert!(!item.cached);
}

#[test]
fn documented_error_body_decodes() {
    let body: ErrorBody = Encoding::Json
        .decode(br#"{"error": {"code": 400, "kind": "empty_input", "message": "..."}}"#)
        .expect("decode");
    let err = body.into_error();
    assert_eq!(
        (err.kind, err.code(), err.message.as_str()),
        (ErrorKind::EmptyInput, 400, "...")
    );
}
