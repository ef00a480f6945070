//! `embedfleet plan` as an operator runs it: the two cases of the GPU issue, bad flags, and
//! (with `models`) output piped into a reader that stops early.

mod support;
use support::embedfleet;

fn run(args: &[&str]) -> std::process::Output {
    embedfleet(&["plan"])
        .args(args)
        .output()
        .expect("embedfleet runs")
}

#[test]
fn a_16gb_card_gets_a_plan_for_all_twelve_models() {
    let output = run(&["--gpus", "16GB", "--format", "json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["devices"][0]["models"].as_array().unwrap().len(), 12);
}

#[test]
fn two_cards_print_a_table_commands_and_helm_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plan.json");
    let output = run(&[
        "--gpus",
        "80GB,24GB",
        "--replicas",
        "minilm=2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("embedfleet worker --device cuda:0 --models"),
        "{text}"
    );
    assert!(
        text.contains("embedfleet worker --device cuda:1 --models minilm"),
        "{text}"
    );
    assert!(text.contains("workerGroups:"), "{text}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(saved["devices"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_flags_and_impossible_plans_are_one_line_errors() {
    // A flag clap itself rejects is a usage error (exit 2); a plan that cannot be made is a
    // run-time error (exit 1). Both are one line on stderr.
    const USAGE: i32 = 2;
    const FAILED: i32 = 1;
    for (args, code, says) in [
        (vec!["--gpus", "16TB"], FAILED, "unit"),
        (
            vec!["--gpus", "16GB", "--models", "gpt5"],
            FAILED,
            "unknown model `gpt5`",
        ),
        (
            vec!["--gpus", "16GB", "--dtype", "int2"],
            USAGE,
            "unknown dtype",
        ),
        (
            vec!["--gpus", "16GB", "--dtype", "sentence-t5-xxl=f16"],
            FAILED,
            "bf16",
        ),
        (
            vec!["--gpus", "16GB", "--replicas", "minilm=0"],
            FAILED,
            "at least 1",
        ),
        (
            vec!["--gpus", "16GB", "--replicas", "minilm=2"],
            FAILED,
            "replicas",
        ),
        (
            vec!["--gpus", "2GB", "--models", "e5-mistral"],
            FAILED,
            "e5-mistral",
        ),
        (vec!["--gpus", "16GB", "--dtype", "f32"], FAILED, "GiB"),
    ] {
        let output = run(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A reader that goes away early (`| head -3`) ends the command quietly with status 0: no
/// panic from a print to a closed pipe, no error line.
#[test]
fn a_closed_stdout_pipe_is_a_quiet_success() {
    for args in [
        vec!["models"],
        vec!["models", "--json"],
        vec!["plan", "--gpus", "80GB,24GB", "--format", "all"],
    ] {
        let mut child = embedfleet(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the command writes anything.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {:?} {stderr}",
            output.status
        );
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
