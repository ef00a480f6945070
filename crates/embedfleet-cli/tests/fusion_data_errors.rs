//! `embedfleet eval` and `embedfleet fusion ...` on bad pair files: each is one line on stderr
//! naming the file (and line), and a non-zero exit; nothing loads a model before the data is
//! known to be good, so these run in milliseconds.

use std::path::Path;
use std::process::{Command, Output};

fn embedfleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_embedfleet"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EMBEDFLEET_FUSION_WEIGHTS")
        .output()
        .expect("run embedfleet")
}

/// Asserts a failure with exactly one stderr line that contains every `needle`.
fn fails_with(output: Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected a failure, stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} not in {:?}",
            lines[0]
        );
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn bad_scored_pair_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = write(
        dir.path(),
        "missing.jsonl",
        b"{\"a\": \"x\", \"b\": \"y\"}\n",
    );
    fails_with(
        embedfleet(&["eval", "--sts", &missing]),
        &["missing.jsonl", "line 1", "score"],
    );
    let empty = write(dir.path(), "empty.jsonl", b"\n\n");
    fails_with(
        embedfleet(&["eval", "--sts", &empty]),
        &["empty.jsonl", "no pairs"],
    );
    let latin1 = write(
        dir.path(),
        "latin1.jsonl",
        b"{\"a\": \"caf\xe9\", \"b\": \"x\", \"score\": 1}\n",
    );
    fails_with(
        embedfleet(&["eval", "--sts", &latin1]),
        &["latin1.jsonl", "line 1", "UTF-8"],
    );
    let unknown = write(
        dir.path(),
        "unknown.jsonl",
        b"{\"a\": \"x\", \"b\": \"y\", \"score\": 1, \"s\": 2}\n",
    );
    fails_with(
        embedfleet(&["eval", "--sts", &unknown]),
        &["unknown.jsonl", "unknown field"],
    );
}

#[test]
fn bad_retrieval_pairs_and_a_missing_held_out_split_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.jsonl",
        b"{\"a\": \"x\", \"b\": \"y\", \"score\": 1}\n",
    );
    let no_positive = write(dir.path(), "retrieval.jsonl", b"\n{\"query\": \"q\"}\n");
    let out = dir.path().join("w.safetensors").display().to_string();
    fails_with(
        embedfleet(&[
            "fusion",
            "train",
            "--retrieval",
            &no_positive,
            "--held-out-scored",
            &good,
            "--out",
            &out,
        ]),
        &["retrieval.jsonl", "line 2", "positive"],
    );
    fails_with(
        embedfleet(&["fusion", "train", "--scored", &good, "--out", &out]),
        &["held-out"],
    );
}

#[test]
fn a_held_out_fraction_that_leaves_nothing_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(dir.path(), "sts.csv", b"a b,c d,1.5\n\"x, y\",z,4\n");
    let out = dir.path().join("train.jsonl").display().to_string();
    let held = dir.path().join("held.jsonl").display().to_string();
    fails_with(
        embedfleet(&[
            "fusion",
            "prepare-sts",
            &csv,
            "--out",
            &out,
            "--held-out",
            &held,
            "--held-out-fraction",
            "0.1",
        ]),
        &["held-out split", "empty"],
    );
    // Without a held-out part the conversion succeeds, quoted commas included.
    let ok = embedfleet(&["fusion", "prepare-sts", &csv, "--out", &out]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["a"], "x, y");
    assert_eq!(lines[1]["score"], 4.0);
}
