//! Every error path of the contract yields the documented kind and status code.

use embedfleet_proto::{
    EmbedRequest, Encoding, ErrorBody, ErrorKind, InputItem, Modality, ProtoError, RequestLimits,
};

fn limits() -> RequestLimits {
    RequestLimits {
        max_inputs: 3,
        max_input_bytes: 8,
        max_payload_bytes: 64,
    }
}

/// Decodes `json` as a request and validates it; returns the error's kind and code.
fn reject(json: &str) -> (ErrorKind, u16) {
    let err = Encoding::Json
        .decode::<EmbedRequest>(json.as_bytes())
        .and_then(|req| req.to_inputs(&limits()))
        .expect_err(json);
    assert!(!err.message.is_empty(), "{json}: empty message");
    assert!(
        !err.to_string().contains('\n'),
        "{json}: multi-line message"
    );
    (err.kind, err.code())
}

fn assert_rejects(kind: ErrorKind, code: u16, cases: &[&str]) {
    for json in cases {
        assert_eq!(reject(json), (kind, code), "{json}");
    }
}

#[test]
fn undecodable_payloads_are_invalid_payload() {
    assert_rejects(
        ErrorKind::InvalidPayload,
        400,
        &[
            "",
            "{",
            "not json",
            r#"{"input": "a"} trailing"#,
            r#"{"input": 5}"#,
            r#"{"input": "a", "fuse": "yes"}"#,
            r#"{"input": "a", "return_partial": true}"#,
            r#"{"inputs": [{"txt": "a"}]}"#,
            r#"{"inputs": [{"audio_b64": "AAAA", "sample_rate": -1}]}"#,
        ],
    );
    let err = Encoding::MsgPack
        .decode::<EmbedRequest>(&[0xc1])
        .expect_err("0xc1 is never valid MessagePack");
    assert_eq!((err.kind, err.code()), (ErrorKind::InvalidPayload, 400));
}

#[test]
fn unknown_fields_are_named() {
    let err = Encoding::Json
        .decode::<EmbedRequest>(br#"{"inputs": [{"imgae_b64": "AAAA"}]}"#)
        .expect_err("typo");
    assert!(err.message.contains("imgae_b64"), "{err}");
}

#[test]
fn malformed_requests_are_bad_request() {
    assert_rejects(
        ErrorKind::BadRequest,
        400,
        &[
            r#"{}"#,
            r#"{"input": null, "inputs": null}"#,
            r#"{"input": "a", "inputs": [{"text": "b"}]}"#,
            r#"{"inputs": [{}]}"#,
            r#"{"inputs": [{"text": "a", "code": "b"}]}"#,
            r#"{"inputs": [{"image_b64": "AAAA", "audio_b64": "AAAA"}]}"#,
            r#"{"inputs": [{"text": "a", "language": "rust"}]}"#,
            r#"{"inputs": [{"code": "a", "format": "png"}]}"#,
            r#"{"inputs": [{"image_b64": "AAAA", "sample_rate": 16000}]}"#,
            r#"{"inputs": [{"audio_b64": "AAAA", "sample_rate": 0}]}"#,
            r#"{"input": "a", "models": []}"#,
            r#"{"input": "a", "models": ["minilm", "minilm"]}"#,
            r#"{"input": "a", "models": [" "]}"#,
        ],
    );
}

#[test]
fn empty_content_is_empty_input() {
    assert_rejects(
        ErrorKind::EmptyInput,
        400,
        &[
            r#"{"input": []}"#,
            r#"{"inputs": []}"#,
            r#"{"input": ""}"#,
            r#"{"input": ["a", " \n\t "]}"#,
            r#"{"inputs": [{"text": "  "}]}"#,
            r#"{"inputs": [{"code": "\n", "language": "rust"}]}"#,
            r#"{"inputs": [{"image_b64": ""}]}"#,
            r#"{"inputs": [{"audio_b64": " "}]}"#,
        ],
    );
}

#[test]
fn bad_base64_is_invalid_base64() {
    assert_rejects(
        ErrorKind::InvalidBase64,
        400,
        &[
            r#"{"inputs": [{"image_b64": "not b64!"}]}"#,
            r#"{"inputs": [{"audio_b64": "A"}]}"#,
            r#"{"inputs": [{"image_b64": "AA AA"}]}"#,
        ],
    );
}

#[test]
fn over_limit_is_too_large() {
    assert_rejects(
        ErrorKind::TooLarge,
        413,
        &[
            r#"{"input": ["a", "b", "c", "d"]}"#,
            r#"{"inputs": [{"text": "a"}, {"text": "b"}, {"text": "c"}, {"text": "d"}]}"#,
            r#"{"input": "123456789"}"#,
            r#"{"inputs": [{"code": "123456789"}]}"#,
            // 12 base64 chars = 9 bytes, one over the limit.
            r#"{"inputs": [{"image_b64": "AAAAAAAAAAAA"}]}"#,
            r#"{"input": "a", "instruction": "123456789"}"#,
        ],
    );
    let err = limits()
        .check_payload_len(65)
        .expect_err("over payload limit");
    assert_eq!((err.kind, err.code()), (ErrorKind::TooLarge, 413));
}

#[test]
fn limits_are_inclusive() {
    let ok = r#"{"input": ["12345678", "b", "c"], "instruction": "12345678"}"#;
    let req: EmbedRequest = Encoding::Json.decode(ok.as_bytes()).expect("decode");
    assert_eq!(req.to_inputs(&limits()).map(|i| i.len()), Ok(3));
    // 8 bytes exactly, as base64 without padding.
    let item = InputItem::image(&[7; 8], None);
    assert_eq!(item.to_input(&limits()).map(|i| i.byte_len()), Ok(8));
}

#[test]
fn item_errors_name_the_item() {
    let err = EmbedRequest::items([InputItem::text("fine"), InputItem::text(" ")])
        .to_inputs(&limits())
        .expect_err("second is blank");
    assert!(err.message.starts_with("inputs[1]: "), "{err}");
    let err = EmbedRequest::texts(["fine", ""])
        .to_inputs(&limits())
        .expect_err("second is blank");
    assert!(err.message.starts_with("input[1]: "), "{err}");
}

#[test]
fn server_side_errors_have_their_codes() {
    let cases = [
        (
            ProtoError::unknown_model("nope"),
            ErrorKind::UnknownModel,
            404,
        ),
        (
            ProtoError::input_too_long("513 tokens > 512"),
            ErrorKind::InputTooLong,
            413,
        ),
        (
            ProtoError::unsupported_modality("whisper-large", Modality::Text),
            ErrorKind::UnsupportedModality,
            422,
        ),
        (
            ProtoError::overloaded("1024 jobs in flight"),
            ErrorKind::Overloaded,
            429,
        ),
        (
            ProtoError::no_worker("e5-mistral"),
            ErrorKind::NoWorker,
            503,
        ),
        (
            ProtoError::timeout("no partial from mpnet in 30s"),
            ErrorKind::Timeout,
            503,
        ),
        (ProtoError::internal("bug"), ErrorKind::Internal, 500),
    ];
    for (err, kind, code) in cases {
        assert_eq!((err.kind, err.code()), (kind, code), "{err}");
        let body = ErrorBody::from(&err);
        assert_eq!((body.error.code, body.error.kind), (code, kind));
        // Both ways a client can learn of the error give it back unchanged.
        assert_eq!(body.into_error(), err);
        assert_eq!(ProtoError::from_service_error(code, &err.to_string()), err);
    }
    let err = ProtoError::unsupported_modality("whisper-large", Modality::Text);
    assert_eq!(
        err.message,
        "model `whisper-large` does not take text input"
    );
}
