//! The nats-server restarting mid-run (killed, then started again on the same port with the same
//! JetStream store) is an outage the fleet rides out: no role exits, requests in the outage
//! window either succeed, get a 503, or fail on the client side (timeout / no responders, as
//! NATS clients see an outage), and once the fleet is reachable again every request succeeds.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use embedfleet_testkit::NatsServer;
use support::*;

const CLIENTS: usize = 8;
/// Client-side wait per request: past the fleet's 20 s deadline, so a stuck request shows as
/// the fleet's 503 when the fleet is reachable.
const REPLY_WAIT: Duration = Duration::from_secs(30);
/// Requests that must all succeed after the recovery.
const AFTER: usize = 40;

/// How one request ended, and when it was sent.
#[derive(Debug)]
enum Ended {
    Ok,
    ServiceUnavailable(String),
    /// Any other error reply: always a failure.
    OtherError(u16, String, String),
    /// No reply: timeout, no responders, or the connection down (only allowed in the outage).
    Client(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_is_ridden_out_by_every_role() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();
    let mut coordinator = start_role(
        "coordinator",
        &[
            "coordinator",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--request-timeout-ms",
            "20000",
            "--ack-wait-ms",
            "2000",
        ],
    );
    let mut worker = start_role(
        "worker minilm",
        &[
            "worker",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--ack-wait-ms",
            "2000",
        ],
    );
    let client = client(&url).await;
    wait_for_success(
        &client,
        &json!({ "input": "warm-up" }),
        Duration::from_secs(60),
    )
    .await;

    // Clients send distinct requests back to back until told to stop; each outcome is kept
    // with the time the request was sent.
    let texts = Arc::new(numbered_sentences("NATS restart", 100_000));
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, Ended)>>> = Arc::default();
    let ok_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, texts, next, stop, log, ok_count) = (
            client.clone(),
            texts.clone(),
            next.clone(),
            stop.clone(),
            log.clone(),
            ok_count.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let body = json!({ "input": texts[i] });
                let sent = Instant::now();
                let payload = serde_json::to_vec(&body).expect("encode");
                let ended = match request_raw(&client, payload, None, REPLY_WAIT).await {
                    Ok(reply) => match outcome(&reply) {
                        Outcome::Ok(body) => {
                            check_fused_reply(&body, 1);
                            ok_count.fetch_add(1, Ordering::SeqCst);
                            Ended::Ok
                        }
                        Outcome::Error {
                            code: 503, kind, ..
                        } => Ended::ServiceUnavailable(kind),
                        Outcome::Error {
                            code,
                            kind,
                            message,
                        } => Ended::OtherError(code, kind, message),
                    },
                    Err(e) => {
                        // Do not spin on an unreachable server.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ended::Client(format!("{:?}: {e}", e.kind()))
                    }
                };
                log.lock().unwrap().push((sent, ended));
            }
        }));
    }

    // Some traffic, then the outage.
    let deadline = Instant::now() + Duration::from_secs(120);
    while ok_count.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ok_count.load(Ordering::SeqCst) >= 40,
        "no steady traffic before the restart; coordinator log:\n{}",
        coordinator.log()
    );
    let outage_start = Instant::now();
    nats.stop().expect("stop nats-server");
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().expect("restart nats-server");
    let restarted = Instant::now();

    // Recovered once a fresh request succeeds; the fleet gets a generous bound for it.
    wait_for_success(
        &client,
        &json!({ "input": "Are we back?" }),
        Duration::from_secs(60),
    )
    .await;
    let recovered = Instant::now();
    let ok_at_recovery = ok_count.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    while ok_count.load(Ordering::SeqCst) < ok_at_recovery + AFTER && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a client task panicked");
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    let (mut ok, mut client_side) = (0, 0);
    let mut unavailable: Vec<&str> = Vec::new();
    let mut after_recovery = 0;
    for (sent, ended) in &log {
        let in_outage = *sent < recovered;
        after_recovery += usize::from(!in_outage);
        match ended {
            Ended::Ok => ok += 1,
            Ended::OtherError(code, kind, message) => {
                panic!("a request got {code} {kind}: {message}")
            }
            Ended::ServiceUnavailable(kind) => {
                assert!(
                    in_outage,
                    "503 {kind} for a request sent {:?} after the recovery",
                    sent.duration_since(recovered)
                );
                unavailable.push(kind);
            }
            Ended::Client(error) => {
                assert!(
                    in_outage,
                    "client-side failure ({error}) for a request sent {:?} after the recovery",
                    sent.duration_since(recovered)
                );
                client_side += 1;
            }
        }
    }
    assert!(
        after_recovery >= AFTER,
        "only {after_recovery} requests after the recovery"
    );
    assert_all_running(&mut [&mut coordinator, &mut worker]);
    eprintln!(
        "{} requests: {ok} ok, 503 {unavailable:?}, {client_side} client-side failures \
         (outage window only); nats down for {:?}, fleet back {:?} after the restart",
        log.len(),
        restarted.duration_since(outage_start),
        recovered.duration_since(restarted)
    );

    // Both roles still shut down cleanly.
    let status = worker.terminate().expect("worker exits on SIGTERM");
    assert!(status.success(), "worker: {status}\n{}", worker.log());
    let status = coordinator
        .terminate()
        .expect("coordinator exits on SIGTERM");
    assert!(
        status.success(),
        "coordinator: {status}\n{}",
        coordinator.log()
    );
}
