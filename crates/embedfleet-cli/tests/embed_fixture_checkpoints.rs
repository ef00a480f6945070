//! `embedfleet embed --model-dir <fixture variant>` on the BERT-family fixture checkpoints
//! (crates/embedfleet-models/tests/fixtures/checkpoints/bert-family/): each model runs from its
//! upstream layout, fusion is built for the widths those narrow checkpoints produce (the width
//! rule), and `--input-type` / `--instruction` change exactly the partials they should.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

mod support;
use support::{embedfleet, run_with_stdin, FUSED_DIM};

/// The fixture models and the width each checkpoint produces.
const WIDTHS: [(&str, usize); 5] = [
    ("bge-large", 64),
    ("codebert", 56),
    ("contriever", 32),
    ("dragon-plus", 40),
    ("gte-large", 48),
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../embedfleet-models/tests/fixtures/checkpoints/bert-family")
}

fn embed(extra: &[&str]) -> Output {
    let dir = fixture_dir();
    let models = WIDTHS.map(|(name, _)| name).join(",");
    let mut args = vec![
        "embed",
        "--models",
        &models,
        "--model-dir",
        dir.to_str().unwrap(),
        "--partials",
    ];
    args.extend_from_slice(extra);
    run_with_stdin(embedfleet(&args), None)
}

/// The single output line; a successful run may warn (narrow checkpoints) but must not fail.
fn line(output: Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "embedfleet failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

fn vector(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("a vector")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn every_fixture_model_embeds_and_fuses_at_its_loaded_width() {
    let output = embed(&["what is the capital of france"]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let element = line(output);
    let fused = vector(&element["embedding"]);
    assert_eq!(fused.len(), FUSED_DIM);
    assert!((fused.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4);
    for (name, width) in WIDTHS {
        let partial = vector(&element["partials"][name]);
        assert_eq!(partial.len(), width, "{name}");
        // The width rule warns once per narrow checkpoint.
        assert!(
            stderr.contains(name),
            "no width warning for {name}: {stderr}"
        );
    }
}

#[test]
fn input_type_changes_only_bge_and_instruction_changes_none() {
    let text = "what is the capital of france";
    let document = line(embed(&[text]));
    let query = line(embed(&["--input-type", "query", text]));
    let instructed = line(embed(&["--instruction", "Represent the question:", text]));
    for (name, _) in WIDTHS {
        let doc = &document["partials"][name];
        assert_eq!(
            &query["partials"][name] != doc,
            name == "bge-large",
            "{name}: --input-type query"
        );
        assert_eq!(&instructed["partials"][name], doc, "{name}: --instruction");
    }
    assert_ne!(query["embedding"], document["embedding"]);
    assert_eq!(instructed["embedding"], document["embedding"]);
}

#[test]
fn a_fusion_file_for_other_widths_is_refused_naming_both() {
    // Trained (here: seeded) for the catalogue widths of bge-large + gte-large, 1024 each.
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("fusion.safetensors");
    let config = embedfleet_fusion::FuseMoeConfig::for_input_dims(vec![1024, 1024]);
    embedfleet_fusion::FuseMoe::from_seed(config, 1)
        .unwrap()
        .save(&weights)
        .unwrap();
    let fixtures = fixture_dir();
    let output = run_with_stdin(
        embedfleet(&[
            "embed",
            "--models",
            "bge-large,gte-large",
            "--model-dir",
            fixtures.to_str().unwrap(),
            "--fusion-weights",
            weights.to_str().unwrap(),
            "hello",
        ]),
        None,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty());
    let error = stderr
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains("fusion.safetensors") && error.contains("[64, 48]"),
        "{error}"
    );
}

#[test]
fn models_says_which_architectures_run() {
    let output = run_with_stdin(embedfleet(&["models", "--json"]), None);
    assert!(output.status.success());
    let rows: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let runs = |name: &str| {
        rows.iter()
            .find(|row| row["name"] == name)
            .map(|row| row["runs"].clone())
    };
    for name in ["minilm", "mpnet"]
        .into_iter()
        .chain(WIDTHS.map(|(name, _)| name))
    {
        assert_eq!(runs(name), Some(Value::Bool(true)), "{name}");
    }
    let bge = rows.iter().find(|row| row["name"] == "bge-large").unwrap();
    assert_eq!(bge["prompting"], "query-prefix");
    let table = String::from_utf8(run_with_stdin(embedfleet(&["models"]), None).stdout).unwrap();
    assert!(table.lines().next().unwrap().contains("runs"), "{table}");
}

/// The coordinator of a fleet learns the narrow widths from the worker's announcement and its
/// partials (it loads no model), passes the input type on in its jobs, and answers what the
/// in-process `embed` prints.
#[test]
fn a_fleet_of_separate_roles_serves_narrow_checkpoints_like_the_library() {
    let server = embedfleet_testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let dir = fixture_dir();
    let dir = dir.to_str().unwrap();
    let models = "bge-large,gte-large";
    let mut worker = support::start_role(
        "worker",
        &[
            "worker",
            "--nats-url",
            &url,
            "--models",
            models,
            "--model-dir",
            dir,
        ],
    );
    let mut coordinator = support::start_role(
        "coordinator",
        &["coordinator", "--nats-url", &url, "--models", models],
    );
    let text = "how do I reverse a linked list";
    for input_type in ["document", "query"] {
        let common = ["--models", models, "--partials", "--input-type", input_type];
        let mut fleet_args = vec!["embed", "--nats-url", &url];
        fleet_args.extend_from_slice(&common);
        fleet_args.push(text);
        let fleet = run_with_stdin(embedfleet(&fleet_args), None);
        assert!(
            fleet.status.success(),
            "{}\nworker:\n{}\ncoordinator:\n{}",
            String::from_utf8_lossy(&fleet.stderr),
            worker.log(),
            coordinator.log()
        );
        let fleet = line(fleet);
        let mut local_args = vec!["embed", "--model-dir", dir];
        local_args.extend_from_slice(&common);
        local_args.push(text);
        let local = line(run_with_stdin(embedfleet(&local_args), None));
        for field in ["embedding", "partials/bge-large", "partials/gte-large"] {
            let pointer = format!("/{field}");
            let (got, want) = (
                vector(fleet.pointer(&pointer).expect("in the fleet reply")),
                vector(local.pointer(&pointer).expect("in the local output")),
            );
            assert_eq!(got.len(), want.len(), "{input_type} {field}");
            let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
            let norms = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let similarity = dot / (norms(&got) * norms(&want));
            assert!(similarity > 0.9999, "{input_type} {field}: {similarity}");
        }
    }
    for role in [&mut worker, &mut coordinator] {
        role.terminate_within(std::time::Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
