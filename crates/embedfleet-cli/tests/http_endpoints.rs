//! `/healthz`, `/readyz` and `/metrics` on the real roles: a worker is ready only once its models
//! are loaded (and warmed) and its consumers bound, and not ready while NATS is gone; a
//! coordinator's and a worker's `/metrics` parse with a Prometheus text parser and their counters
//! move with traffic; `serve` answers on all three.

mod http_support;
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use embedfleet_testkit::NatsServer;
use http_support::{free_http_addr, get};
use support::*;

/// Bound on a state change the test waits for (a role noticing NATS went away or came back, a
/// model load on a loaded machine).
const WAIT_BOUND: Duration = Duration::from_secs(60);

/// Polls `url` until `accept(status, body)` or the bound; returns the last answer.
fn wait_for(url: &str, accept: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let started = Instant::now();
    loop {
        let answer = get(url).unwrap_or((0, String::new()));
        if accept(answer.0, &answer.1) || started.elapsed() > WAIT_BOUND {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The samples of `/metrics` at `base`, parsed by `prometheus-parse`.
fn scrape(base: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(&format!("{base}/metrics")).expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|line| Ok(line.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("/metrics is the Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels` (0 when absent: a family
/// shows no series before its first event).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_is_ready_only_with_models_and_nats_and_metrics_follow_traffic() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let url = nats.url();

    // The worker's listener is up before its models load: the first answer is "not ready".
    let worker_addr = free_http_addr();
    let worker_http = format!("http://{worker_addr}");
    // Started on a thread: `start_role` returns only once the role is ready, and the test
    // probes it meanwhile.
    let args: Vec<String> = ["worker", "--nats-url", &url, "--models", "minilm,mpnet"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--http-addr".to_string(), worker_addr.clone()])
        .collect();
    let starting = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_role("worker", &args)
    });
    let (status, body) = wait_for(&format!("{worker_http}/readyz"), |status, _| status != 0);
    assert_eq!(status, 503, "not ready while loading: {body}");
    assert!(body.contains("models loaded"), "{body}");
    assert_eq!(
        get(&format!("{worker_http}/healthz")).map(|a| a.0),
        Some(200)
    );
    let mut worker = starting.join().expect("the worker starts");
    let (status, body) = wait_for(&format!("{worker_http}/readyz"), |s, _| s == 200);
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // A coordinator, and traffic through both.
    let coordinator_addr = free_http_addr();
    let coordinator_http = format!("http://{coordinator_addr}");
    let mut coordinator = start_role(
        "coordinator",
        &[
            "coordinator",
            "--nats-url",
            &url,
            "--models",
            "minilm,mpnet",
            "--http-addr",
            &coordinator_addr,
        ],
    );
    let (status, _) = wait_for(&format!("{coordinator_http}/readyz"), |s, _| s == 200);
    assert_eq!(status, 200);
    let before = scrape(&coordinator_http);
    assert_eq!(sample(&before, "te_request_count_total", &[]), 0.0);

    let client = client(&url).await;
    let requests = 3;
    for i in 0..requests {
        let body = json!({ "input": format!("metrics move with traffic, request {i}") });
        request_json(&client, &body, Duration::from_secs(60))
            .await
            .ok("request");
    }
    let bad = json!({ "input": "", "models": ["minilm"] });
    let refused = request_json(&client, &bad, Duration::from_secs(60)).await;
    assert_eq!(refused.error("empty input"), (400, "empty_input"));

    let after = scrape(&coordinator_http);
    assert_eq!(
        sample(&after, "te_request_count_total", &[]),
        f64::from(requests + 1)
    );
    assert_eq!(
        sample(&after, "te_request_success_total", &[]),
        f64::from(requests)
    );
    assert_eq!(
        sample(
            &after,
            "te_request_failure_total",
            &[("err", "empty_input")]
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "te_request_duration_count", &[]),
        f64::from(requests + 1)
    );
    assert!(sample(&after, "embedfleet_jobs_published_total", &[]) >= 2.0);
    assert_eq!(
        sample(&after, "embedfleet_fusion_duration_count", &[]),
        f64::from(requests)
    );

    let worker_metrics = scrape(&worker_http);
    for model in ["minilm", "mpnet"] {
        assert!(
            sample(
                &worker_metrics,
                "te_batch_next_size_count",
                &[("model", model)]
            ) >= 1.0,
            "{model} ran batches"
        );
        assert!(
            sample(
                &worker_metrics,
                "te_request_queue_duration_count",
                &[("model", model)]
            ) >= 1.0
        );
        assert!(
            sample(
                &worker_metrics,
                "embedfleet_model_load_duration_seconds",
                &[("model", model)]
            ) > 0.0
        );
    }
    assert!(
        sample(
            &worker_metrics,
            "embedfleet_worker_jobs_total",
            &[("outcome", "done")]
        ) >= f64::from(2 * requests)
    );

    // NATS goes away: both roles stay alive but are not ready; back, and they are ready again.
    nats.stop().expect("stop nats-server");
    for base in [&worker_http, &coordinator_http] {
        let (status, body) = wait_for(&format!("{base}/readyz"), |s, _| s == 503);
        assert_eq!(status, 503, "{base}: {body}");
        assert!(body.contains("nats connected"), "{body}");
        assert_eq!(get(&format!("{base}/healthz")).map(|a| a.0), Some(200));
    }
    nats.restart().expect("restart nats-server");
    for base in [&worker_http, &coordinator_http] {
        let (status, body) = wait_for(&format!("{base}/readyz"), |s, _| s == 200);
        assert_eq!(status, 200, "{base}: {body}");
    }
    assert_all_running(&mut [&mut worker, &mut coordinator]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_health_readiness_and_metrics_of_both_roles() {
    let nats = NatsServer::start().expect("start nats-server");
    let addr = free_http_addr();
    let base = format!("http://{addr}");
    let mut serve = start_role(
        "serve",
        &[
            "serve",
            "--nats-url",
            &nats.url(),
            "--models",
            "minilm",
            "--http-addr",
            &addr,
        ],
    );
    let (status, body) = wait_for(&format!("{base}/readyz"), |s, _| s == 200);
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(get(&format!("{base}/healthz")).map(|a| a.0), Some(200));
    let metrics = scrape(&base);
    let names: std::collections::HashSet<_> =
        metrics.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in ["te_request_count_total", "embedfleet_worker_batches_total"] {
        assert!(names.contains(name), "{name} in {names:?}");
    }
    assert_all_running(&mut [&mut serve]);
}

#[test]
fn a_taken_http_address_fails_the_start_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = embedfleet(&[
        "coordinator",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--http-addr",
        &addr,
    ])
    .output()
    .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
}
