//! A model worker killed with SIGKILL mid-run loses no request and answers none twice.
//!
//! A coordinator and two `worker` processes per model (minilm and mpnet) on a real nats-server;
//! 16 concurrent clients send 512 distinct one-sentence requests. After about a third of the
//! replies one mpnet worker is killed, after about two thirds one minilm worker: the jobs they
//! held unacknowledged come back from JetStream after `--ack-wait-ms` and the surviving workers
//! run them. Every request must get exactly one reply (replies go to per-request inboxes that are
//! watched for a while after the run, so a duplicate would be seen), and every reply must be
//! right: a unit-norm 1536-d fused embedding and per-model partials equal to what the in-process
//! pipeline (`embedfleet embed`) gives for the same text.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use embedfleet_testkit::NatsServer;
use support::*;

const REQUESTS: usize = 512;
const CLIENTS: usize = 16;
/// Far past the fleet's own 60 s deadline, so a lost request shows as the fleet's 503 rather
/// than as a client timeout.
const REPLY_WAIT: Duration = Duration::from_secs(90);
/// How long inboxes are watched after the last reply for a second answer: longer than a
/// redelivery cycle (ack wait 2 s) several times over.
const DUPLICATE_GRACE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_workers_mid_run_loses_and_duplicates_nothing() {
    let texts = numbered_sentences("Kill test", REQUESTS);
    // References first, while the machine is otherwise idle: one in-process run for all inputs.
    let references = tokio::task::spawn_blocking({
        let texts = texts.clone();
        move || reference_embeddings(&texts, "minilm,mpnet")
    })
    .await
    .expect("reference run");

    let nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();
    let common = ["--nats-url", &url, "--ack-wait-ms", "2000"];
    let mut coordinator = start_role(
        "coordinator",
        &[
            &["coordinator"][..],
            &common,
            &[
                "--models",
                "minilm,mpnet",
                "--request-timeout-ms",
                "60000",
                "--max-in-flight",
                "1024",
            ],
        ]
        .concat(),
    );
    let worker = |name: &str, model: &str| {
        start_role(
            name,
            &[&["worker"][..], &common, &["--models", model]].concat(),
        )
    };
    let mut minilm_a = worker("worker minilm A", "minilm");
    let mut minilm_b = worker("worker minilm B", "minilm");
    let mut mpnet_a = worker("worker mpnet A", "mpnet");
    let mut mpnet_b = worker("worker mpnet B", "mpnet");

    let client = client(&url).await;
    let inbox = Arc::new(InboxCollector::new(&client).await);
    let replied = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, inbox, replied, texts) = (
            client.clone(),
            inbox.clone(),
            replied.clone(),
            texts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for i in (c..REQUESTS).step_by(CLIENTS) {
                let body = json!({ "input": texts[i], "return_partials": true });
                let first = inbox.expect(i);
                inbox.publish(&client, i, &body).await;
                let reply = tokio::time::timeout(REPLY_WAIT, first)
                    .await
                    .unwrap_or_else(|_| panic!("request {i}: no reply within {REPLY_WAIT:?}"))
                    .expect("collector alive");
                replied.fetch_add(1, Ordering::SeqCst);
                firsts.push((i, reply));
            }
            firsts
        }));
    }

    // The kills, at about one third and two thirds of the replies.
    let mut killed = Vec::new();
    for (at, victim) in [
        (REQUESTS / 3, &mut mpnet_a),
        (2 * REQUESTS / 3, &mut minilm_a),
    ] {
        let deadline = Instant::now() + Duration::from_secs(600);
        while replied.load(Ordering::SeqCst) < at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            replied.load(Ordering::SeqCst) >= at,
            "stuck before {at} replies; coordinator log:\n{}",
            coordinator.log()
        );
        let status = victim.kill9().expect("kill -9");
        killed.push((
            victim.name().to_owned(),
            replied.load(Ordering::SeqCst),
            status,
        ));
    }

    let mut replies = Vec::new();
    for task in tasks {
        replies.extend(task.await.unwrap_or_else(|e| {
            panic!(
                "a client failed: {e}\ncoordinator log:\n{}",
                coordinator.log()
            )
        }));
    }
    let run_time = started.elapsed();
    tokio::time::sleep(DUPLICATE_GRACE).await;

    // Exactly one reply per request.
    let counts = inbox.counts();
    let mut wrong: Vec<(usize, usize)> = (0..REQUESTS)
        .map(|i| (i, counts.get(&i).copied().unwrap_or(0)))
        .filter(|&(_, n)| n != 1)
        .collect();
    wrong.sort_unstable();
    assert!(
        wrong.is_empty(),
        "requests with other than one reply (index, replies): {wrong:?}"
    );

    // Every reply a success, and right.
    assert_eq!(replies.len(), REQUESTS);
    for (i, reply) in &replies {
        let body = outcome(reply).ok(&format!("request {i}"));
        let data = check_fused_reply(&body, 1);
        let reference = &references[*i];
        for (model, dim) in [("minilm", MINILM_DIM), ("mpnet", MPNET_DIM)] {
            let got = vector(&data[0]["partials"][model]);
            let want = vector(&reference["partials"][model]);
            assert_eq!(got.len(), dim, "request {i}: {model} width");
            let similarity = cosine(&got, &want);
            assert!(
                similarity > 0.9999,
                "request {i}: {model} partial differs from the in-process one (cosine {similarity})"
            );
        }
        let fused = cosine(
            &vector(&data[0]["embedding"]),
            &vector(&reference["embedding"]),
        );
        assert!(
            fused > 0.999,
            "request {i}: fused embedding differs from the in-process one (cosine {fused})"
        );
    }

    // The rest of the fleet is still up, and the killed ones died of the signal.
    assert_all_running(&mut [&mut coordinator, &mut minilm_b, &mut mpnet_b]);
    for (name, at, status) in &killed {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "{name} killed at {at} replies: {status}"
        );
    }
    let stats = service_stats(&client).await;
    eprintln!(
        "{REQUESTS} requests in {run_time:?}; killed {:?}; coordinator stats: {}",
        killed
            .iter()
            .map(|(name, at, _)| format!("{name} after {at} replies"))
            .collect::<Vec<_>>(),
        stats.first().map(Value::to_string).unwrap_or_default()
    );
}
