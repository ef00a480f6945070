//! Bad requests get the right typed error and leave the fleet serving; a flood past
//! `--max-in-flight` is refused with 429 while the admitted requests succeed.
//!
//! One `embedfleet serve` per test on its own nats-server (whose `max_payload` is the fleet's
//! 8 MiB request limit). After each bad request a good one must still succeed, and the process
//! must still run at the end.
//!
//! About payloads over 8 MiB: the nats-server refuses any message past its `max_payload`
//! (8 MiB, equal to the fleet's limit), and async-nats refuses to send one
//! (`MaxPayloadExceeded`), so the coordinator's own payload check cannot be reached through NATS.
//! The test asserts that refusal, and covers the coordinator's `too_large` with the limits it
//! can see: one item over 1 MiB, and more than 256 inputs.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use embedfleet_proto::CONTENT_TYPE_MSGPACK;
use embedfleet_testkit::{NatsServer, RoleProcess};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A good request, and the check that it succeeds (the process is still up and serving).
async fn still_serves(client: &async_nats::Client, role: &mut RoleProcess, after: &str) {
    let body = json!({ "input": "Still serving after a bad request.", "models": ["minilm"] });
    match request_json(client, &body, WAIT).await {
        Outcome::Ok(reply) => {
            check_fused_reply(&reply, 1);
        }
        error => panic!(
            "after {after}: a good request failed: {error:?}\nserve log:\n{}",
            role.log()
        ),
    }
    assert_all_running(&mut [role]);
}

/// Sends `payload` (JSON unless `content_type` says otherwise) and checks the error reply.
async fn expect_error(
    client: &async_nats::Client,
    role: &mut RoleProcess,
    case: &str,
    payload: Vec<u8>,
    content_type: Option<&str>,
    code: u16,
    kind: &str,
) {
    let reply = request_raw(client, payload, content_type, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{case}: no reply: {e}\nserve log:\n{}", role.log()));
    let outcome = outcome(&reply);
    let (got_code, got_kind) = outcome.error(case);
    assert_eq!(
        (got_code, got_kind),
        (code, kind),
        "{case}: wrong error: {outcome:?}"
    );
    still_serves(client, role, case).await;
}

/// A bad request: name, payload, `Content-Type`, expected code and kind.
type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, u16, &'a str);

fn json_bytes(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).expect("encode JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_the_fleet_keeps_serving() {
    let nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();
    let mut serve = start_role(
        "serve",
        &["serve", "--nats-url", &url, "--models", "minilm,mpnet"],
    );
    let client = client(&url).await;
    still_serves(&client, &mut serve, "start").await;

    // Valid base64 of a PNG signature: decodes fine, but no text model takes an image.
    let png_b64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==";
    let long_text = "word ".repeat(2000);
    let oversized_item = "a".repeat((1 << 20) + 1);
    let too_many: Vec<String> = (0..257).map(|i| format!("input {i}")).collect();

    let cases: Vec<Case> = vec![
        (
            "invalid JSON",
            b"{\"input\": \"unterminated".to_vec(),
            None,
            400,
            "invalid_payload",
        ),
        (
            "invalid JSON declared as JSON",
            b"not json at all".to_vec(),
            Some("application/json"),
            400,
            "invalid_payload",
        ),
        (
            "invalid MessagePack",
            vec![0xc1, 0xff, 0x00, 0x13, 0x37],
            Some(CONTENT_TYPE_MSGPACK),
            400,
            "invalid_payload",
        ),
        (
            "JSON sent as MessagePack",
            json_bytes(&json!({ "input": "hello" })),
            Some(CONTENT_TYPE_MSGPACK),
            400,
            "invalid_payload",
        ),
        (
            "an unknown field",
            json_bytes(&json!({ "input": "hello", "modles": ["minilm"] })),
            None,
            400,
            "invalid_payload",
        ),
        (
            "neither input nor inputs",
            json_bytes(&json!({})),
            None,
            400,
            "bad_request",
        ),
        (
            "both input and inputs",
            json_bytes(&json!({ "input": "a", "inputs": [{ "text": "b" }] })),
            None,
            400,
            "bad_request",
        ),
        (
            "an item of two kinds",
            json_bytes(&json!({ "inputs": [{ "text": "a", "code": "b" }] })),
            None,
            400,
            "bad_request",
        ),
        (
            "empty text",
            json_bytes(&json!({ "input": "   " })),
            None,
            400,
            "empty_input",
        ),
        (
            "an empty input list",
            json_bytes(&json!({ "input": [] })),
            None,
            400,
            "empty_input",
        ),
        (
            "an unknown model",
            json_bytes(&json!({ "input": "hello", "models": ["no-such-model"] })),
            None,
            404,
            "unknown_model",
        ),
        (
            "an image for a text model",
            json_bytes(&json!({ "inputs": [{ "image_b64": png_b64 }], "models": ["minilm"] })),
            None,
            422,
            "unsupported_modality",
        ),
        (
            "invalid base64",
            json_bytes(&json!({ "inputs": [{ "image_b64": "!!!!" }], "models": ["minilm"] })),
            None,
            400,
            "invalid_base64",
        ),
        (
            "257 inputs",
            json_bytes(&json!({ "input": too_many, "models": ["minilm"] })),
            None,
            413,
            "too_large",
        ),
        (
            "an item over 1 MiB",
            json_bytes(&json!({ "input": oversized_item, "models": ["minilm"] })),
            None,
            413,
            "too_large",
        ),
        (
            "2000 words with truncation off",
            json_bytes(&json!({ "input": long_text, "models": ["minilm"], "truncate": false })),
            None,
            413,
            "input_too_long",
        ),
    ];
    for (case, payload, content_type, code, kind) in cases {
        expect_error(&client, &mut serve, case, payload, content_type, code, kind).await;
    }

    // Over 8 MiB never reaches the fleet: the client refuses it against the server's
    // max_payload (8 MiB, the fleet's limit).
    let huge = json_bytes(&json!({ "input": "x".repeat(9 << 20) }));
    let refused = request_raw(&client, huge, None, WAIT)
        .await
        .expect_err("a 9 MiB request cannot be sent");
    assert_eq!(
        refused.kind(),
        async_nats::RequestErrorKind::MaxPayloadExceeded,
        "{refused}"
    );

    // Big but within every limit: three 1 MiB texts (over nats' 1 MiB default max_payload)
    // are embedded, truncated to the model's length.
    let big_text = "lorem ipsum dolor sit amet ".repeat((1 << 20) / 27);
    let big = json!({ "input": [big_text, big_text, big_text], "models": ["minilm"] });
    let reply = request_json(&client, &big, WAIT)
        .await
        .ok("three 1 MiB texts");
    check_fused_reply(&reply, 3);

    // A good MessagePack request gets a MessagePack reply.
    let reply = request_msgpack(
        &client,
        &json!({ "input": ["MessagePack works too."], "return_partials": true }),
        WAIT,
    )
    .await
    .ok("MessagePack request");
    let data = check_fused_reply(&reply, 1);
    assert_eq!(vector(&data[0]["partials"]["minilm"]).len(), MINILM_DIM);
    assert_eq!(vector(&data[0]["partials"]["mpnet"]).len(), MPNET_DIM);

    still_serves(&client, &mut serve, "all cases").await;
    let status = serve
        .terminate()
        .expect("serve drains and exits on SIGTERM");
    assert!(
        status.success(),
        "serve exited with {status}; log:\n{}",
        serve.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_max_in_flight_is_refused_with_429_and_the_rest_succeed() {
    const FLOOD: usize = 64;
    const INPUTS_PER_REQUEST: usize = 8;
    let nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();
    let mut serve = start_role(
        "serve --max-in-flight 2",
        &[
            "serve",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--max-in-flight",
            "2",
        ],
    );
    let client = client(&url).await;
    still_serves(&client, &mut serve, "start").await;

    // Distinct inputs, several per request, so that the admitted requests take real model time
    // while the rest arrive.
    let texts = numbered_sentences("Flood", FLOOD * INPUTS_PER_REQUEST);
    let mut tasks = Vec::new();
    for chunk in texts.chunks(INPUTS_PER_REQUEST) {
        let client = client.clone();
        let body = json!({ "input": chunk });
        tasks.push(tokio::spawn(async move {
            request_json(&client, &body, WAIT).await
        }));
    }
    let (mut succeeded, mut overloaded) = (0, 0);
    for task in tasks {
        match task.await.expect("request task") {
            Outcome::Ok(body) => {
                check_fused_reply(&body, INPUTS_PER_REQUEST);
                succeeded += 1;
            }
            Outcome::Error {
                code: 429, kind, ..
            } if kind == "overloaded" => overloaded += 1,
            other => panic!("a flooded request ended neither in success nor 429: {other:?}"),
        }
    }
    assert_eq!(succeeded + overloaded, FLOOD);
    assert!(
        overloaded > 0,
        "64 requests at once past --max-in-flight 2, none refused"
    );
    assert!(
        succeeded >= 2,
        "the admitted requests succeed ({succeeded} did)"
    );
    eprintln!("flood: {succeeded} succeeded, {overloaded} refused with 429");

    // Refusal is per request, not a state: once the flood is over, requests succeed again.
    still_serves(&client, &mut serve, "the flood").await;
    let stats = service_stats(&client).await;
    if let Some(stats) = stats.first() {
        assert_eq!(
            stats["overloaded"].as_u64(),
            Some(overloaded as u64),
            "{stats}"
        );
    }
}
