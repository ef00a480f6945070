//! `embedfleet bench fleet` against a real fleet: `embedfleet serve --models minilm` (real
//! checkpoint) on a testkit nats-server. The table must show both passes (and the in-process
//! one) with every request answered and parseable percentiles. No timing is asserted: this
//! machine's speed is not the test's business; docs/benchmarks.md has the figures.

use std::process::Output;
use std::time::Duration;

use embedfleet_testkit::{NatsServer, RoleProcess};

mod support;
use support::embedfleet;

fn run(args: &[&str]) -> Output {
    embedfleet(args).output().expect("embedfleet runs")
}

/// The URL in serve's ready line: `embedfleet serve ready: nats=<url> models=...`.
fn ready_url(serve: &RoleProcess) -> String {
    serve
        .ready_line()
        .split_whitespace()
        .find_map(|word| word.strip_prefix("nats="))
        .unwrap_or_else(|| panic!("no nats= in the ready line: {}", serve.ready_line()))
        .to_string()
}

/// The table row of `pass`, split into columns: pass requests errors req/s inputs/s p50 p90
/// p99 max.
fn row<'a>(table: &'a str, pass: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&pass))
        .unwrap_or_else(|| panic!("no `{pass}` row in the table:\n{table}"))
}

#[test]
fn bench_fleet_reports_cold_warm_and_in_process_passes() {
    let nats = NatsServer::start().expect("nats-server");
    let mut serve = RoleProcess::spawn(
        "serve minilm",
        embedfleet(&["serve", "--models", "minilm", "--nats-url", &nats.url()]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let url = ready_url(&serve);

    let output = run(&[
        "bench",
        "fleet",
        "--nats-url",
        &url,
        "--clients",
        "4",
        "--requests",
        "40",
        "--batch",
        "2",
        "--models",
        "minilm",
        "--in-process",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}\nserve log:\n{}",
        output.status,
        serve.log()
    );
    for pass in ["cold", "warm", "in-process"] {
        let cols = row(&stdout, pass);
        assert_eq!(cols.len(), 9, "`{pass}` row: {cols:?}");
        assert_eq!(cols[1], "40", "`{pass}` requests:\n{stdout}");
        assert_eq!(cols[2], "0", "`{pass}` errors:\n{stdout}\n{stderr}");
        let numbers: Vec<f64> = cols[3..]
            .iter()
            .map(|c| {
                c.parse()
                    .unwrap_or_else(|_| panic!("`{pass}`: `{c}` is not a number:\n{stdout}"))
            })
            .collect();
        assert!(numbers.iter().all(|&n| n > 0.0), "`{pass}`: {numbers:?}");
        let (p50, p90, p99, max) = (numbers[2], numbers[3], numbers[4], numbers[5]);
        assert!(
            p50 <= p90 && p90 <= p99 && p99 <= max,
            "`{pass}`: percentiles out of order: {numbers:?}"
        );
        // Both rates are printed to one decimal, so twice the rounded req/s may differ from the
        // rounded inputs/s by up to 2 × 0.05 + 0.05.
        assert!(
            (numbers[1] - 2.0 * numbers[0]).abs() <= 0.15 + 1e-9,
            "`{pass}`: inputs/s is twice req/s at batch 2: {numbers:?}"
        );
    }
    assert!(
        stdout.contains("cold vs in-process: throughput ratio"),
        "{stdout}"
    );
    assert!(
        stderr.contains("cold: 100%"),
        "progress on stderr:\n{stderr}"
    );

    serve
        .terminate_within(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bad_arguments_exit_2_and_an_unreachable_fleet_exits_1_with_one_line() {
    let bad = run(&[
        "bench",
        "fleet",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--clients",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let down = run(&["bench", "fleet", "--nats-url", &url, "--requests", "5"]);
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(down.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(&url),
        "{stderr}"
    );
    assert!(down.stdout.is_empty());

    // NATS is there, but no embedfleet service answers on it.
    let nats = NatsServer::start().expect("nats-server");
    let idle = run(&[
        "bench",
        "fleet",
        "--nats-url",
        &nats.url(),
        "--requests",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&idle.stderr);
    assert_eq!(idle.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no embedfleet service"), "{stderr}");
}
