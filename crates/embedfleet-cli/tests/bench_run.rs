//! `embedfleet bench run`, the perf harness, end to end: it starts its own fleet (`serve
//! --models minilm`, real checkpoint), runs the small tier cold and warm, closed and open loop,
//! writes its three files and a baseline; a second (cold) run against that baseline with its
//! latencies planted 50x faster must exit 3 (severe regression). No timing is asserted beyond that planted factor.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod support;
use support::embedfleet;

fn run(args: &[&str]) -> Output {
    embedfleet(args).output().expect("embedfleet runs")
}

fn harness(out: &Path, baseline: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "run",
        "--tier",
        "small",
        "--models",
        "minilm",
        "--concurrency",
        "1,2",
        "--batch",
        "1,4",
        "--rate",
        "20",
        "--requests",
        "6",
        "--warmup",
        "1",
        "--connections",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--baseline",
        baseline.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_harness_reports_every_point_and_its_gate_sets_the_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, baseline) = (dir.path().join("out"), dir.path().join("baseline.json"));

    let first = harness(&out, &baseline, &["--write-baseline"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr),
    );
    assert!(
        first.status.success(),
        "{}\n{stdout}\n{stderr}",
        first.status
    );
    assert!(stderr.contains("no baseline at"), "{stderr}");

    let report = read_json(&out.join("latest.json"));
    let points = report["points"].as_array().expect("points");
    let labels: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["mode"].as_str().unwrap(),
                p["label"].as_str().unwrap()
            )
        })
        .collect();
    let expected: Vec<String> = ["cold", "warm"]
        .iter()
        .flat_map(|mode| {
            [
                "closed-c1-b1",
                "closed-c2-b1",
                "closed-c1-b4",
                "open-r20-b1",
            ]
            .iter()
            .map(move |load| format!("{mode} {load}"))
        })
        .collect();
    assert_eq!(labels, expected);
    for p in points {
        let name = format!("{} {}", p["mode"], p["label"]);
        assert_eq!(p["requests"], 6, "{name}");
        assert_eq!(p["ok"], 6, "{name}: {}", p["errors"]);
        let steps = p["steps"].as_object().expect("steps");
        let rt = &steps["round_trip"];
        assert!(rt["p50_ms"].as_f64().unwrap() > 0.0, "{name}");
        assert!(rt["p50_ms"].as_f64() <= rt["p99_ms"].as_f64(), "{name}");
        // The fleet's own timings come back: lookups always, the model's job on a miss.
        assert!(steps.contains_key("cache_get"), "{name}: {steps:?}");
        if p["mode"] == "cold" {
            assert!(steps.contains_key("jobs.minilm"), "{name}: {steps:?}");
        }
        let resources = p["resources"].as_array().expect("resources");
        assert!(
            resources
                .iter()
                .any(|r| r["name"] == "embedfleet" && r["rss_peak_mib"].as_f64().unwrap() > 0.0),
            "{name}: the embedded serve is sampled: {resources:?}"
        );
    }
    assert_eq!(report["fleet"], "embedded");
    assert!(report["recorded"]["cpu_model"].is_string());

    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(
        html.matches("<svg").count() >= 4,
        "plots by concurrency and batch"
    );
    let text = std::fs::read_to_string(out.join("latest.txt")).expect("latest.txt");
    assert_eq!(text, stdout, "latest.txt is the table printed");

    // The recorded baseline, made 50x faster in every latency: the same run is now severe.
    let mut planted = read_json(&baseline);
    let entries = planted["entries"].as_object_mut().expect("entries");
    assert!(entries.contains_key("small/cold/closed-c1-b1/round_trip"));
    for entry in entries.values_mut() {
        for (metric, value) in entry["metrics"].as_object_mut().unwrap() {
            if metric.ends_with("_ms") {
                *value = Value::from(value.as_f64().unwrap() / 50.0);
            }
        }
    }
    std::fs::write(&baseline, planted.to_string()).expect("write baseline");
    let second = harness(&out, &baseline, &["--modes", "cold", "--no-timings"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr),
    );
    assert_eq!(second.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("SEVERE small/cold/"), "{stdout}");
    // The stage timings were not asked for: reported missing, which warns but does not fail.
    assert!(
        stdout.contains("/cache_get: in the baseline, missing"),
        "{stdout}"
    );
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("severe regression"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_exit_2_and_a_bad_trace_exits_1_with_one_line() {
    let bad = run(&["bench", "run", "--concurrency", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(&trace, "{\"input\":\"fine\"}\n{\"inptu\":\"typo\"}\n").expect("write");
    let out = run(&["bench", "run", "--trace", trace.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}
