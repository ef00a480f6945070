//! A coordinator with no worker for a model answers 503 (`no_worker` or `timeout`) by its
//! deadline instead of leaving the client hanging, keeps serving, and serves the model once a
//! worker for it starts.
//!
//! The deadline check is a correctness bound (the reply comes, and well before 10 s for a 2 s
//! deadline), not a speed measurement.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use embedfleet_testkit::NatsServer;
use support::*;

/// The coordinator's `--request-timeout-ms`.
const DEADLINE: Duration = Duration::from_millis(2000);
/// The reply must come before this: the deadline plus a wide margin for a loaded machine.
const REPLY_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_is_a_503_by_the_deadline_and_a_late_worker_is_used() {
    let nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();
    let deadline_ms = DEADLINE.as_millis().to_string();
    let mut coordinator = start_role(
        "coordinator (no workers)",
        &[
            "coordinator",
            "--nats-url",
            &url,
            "--models",
            "minilm,mpnet",
            "--request-timeout-ms",
            &deadline_ms,
        ],
    );
    let client = client(&url).await;

    for (case, body) in [
        ("default models", json!({ "input": "Is anybody there?" })),
        (
            "minilm only",
            json!({ "input": "Anyone for minilm?", "models": ["minilm"] }),
        ),
        (
            "mpnet only, MessagePack",
            json!({ "input": "Anyone for mpnet?", "models": ["mpnet"] }),
        ),
    ] {
        let started = Instant::now();
        let outcome = if case.contains("MessagePack") {
            request_msgpack(&client, &body, Duration::from_secs(60)).await
        } else {
            request_json(&client, &body, Duration::from_secs(60)).await
        };
        let took = started.elapsed();
        let (code, kind) = outcome.error(case);
        assert_eq!(code, 503, "{case}: {outcome:?}");
        assert!(
            kind == "no_worker" || kind == "timeout",
            "{case}: 503 of kind {kind}"
        );
        assert!(
            took < REPLY_BOUND,
            "{case}: the 503 came after {took:?}, past the {DEADLINE:?} deadline + margin"
        );
        eprintln!("{case}: {code} {kind} after {took:?}");
    }
    assert_all_running(&mut [&mut coordinator]);

    // A worker that starts later is used: the coordinator recovers without a restart.
    let mut worker = start_role(
        "late worker minilm",
        &["worker", "--nats-url", &url, "--models", "minilm"],
    );
    let body = json!({ "input": "Now there is a worker.", "models": ["minilm"] });
    let reply = wait_for_success(&client, &body, Duration::from_secs(60)).await;
    check_fused_reply(&reply, 1);
    // mpnet still has none.
    let outcome = request_json(
        &client,
        &json!({ "input": "Still nobody for mpnet.", "models": ["mpnet"] }),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(outcome.error("mpnet without a worker").0, 503);
    assert_all_running(&mut [&mut coordinator, &mut worker]);
}
