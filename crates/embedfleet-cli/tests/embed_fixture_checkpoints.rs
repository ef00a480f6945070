//! `embedfleet embed --models <model> --model-dir <dir>` for every text model of the catalogue:
//! the small random fixture checkpoints of `crates/embedfleet-models/tests/fixtures/checkpoints/`
//! (BERT family and codebert, the T5 encoders, e5-mistral), and the real minilm and mpnet
//! weights (`models/`, the only real text weights here). Each model runs from its upstream
//! layout, fusion is built for the widths those narrow checkpoints produce (the width rule), and
//! `--input-type` / `--instruction` change exactly the partials they should.

use std::path::{Path, PathBuf};
use std::process::Output;

use embedfleet_models::catalogue;
use serde_json::Value;

mod support;
use support::{embedfleet, models_dir, run_with_stdin, FUSED_DIM};

/// Every text model, the checkpoint folder it runs from here, and the width that checkpoint
/// produces (catalogue width for the real weights, the fixture's own for the rest).
const TEXT_MODELS: [(&str, &str, usize); 10] = [
    ("minilm", "real", 384),
    ("bge-large", "bert-family", 64),
    ("instructor-xl", "t5-gated", 56),
    ("codebert", "bert-family", 56),
    ("sentence-t5-xxl", "t5-gated", 32),
    ("mpnet", "real", 768),
    ("contriever", "bert-family", 32),
    ("dragon-plus", "bert-family", 40),
    ("gte-large", "bert-family", 48),
    ("e5-mistral", "mistral-mha", 64),
];

/// The BERT-family fixture models alone (all narrower than their catalogue slots).
const BERT_FAMILY: [&str; 5] = [
    "bge-large",
    "codebert",
    "contriever",
    "dragon-plus",
    "gte-large",
];

fn checkpoints() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../embedfleet-models/tests/fixtures/checkpoints")
}

fn fixture_dir() -> PathBuf {
    checkpoints().join("bert-family")
}

/// One `--model-dir` holding every text model: links to the fixture folders and to the real
/// minilm and mpnet checkpoints.
fn all_text_models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source, _) in TEXT_MODELS {
        let target = match source {
            "real" => models_dir().join(name),
            variant => checkpoints().join(variant).join(name),
        };
        link(&target, &dir.path().join(name));
    }
    dir
}

#[cfg(unix)]
fn link(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn embed_in(dir: &Path, models: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "embed",
        "--models",
        models,
        "--model-dir",
        dir.to_str().unwrap(),
        "--partials",
    ];
    args.extend_from_slice(extra);
    run_with_stdin(embedfleet(&args), None)
}

fn embed(extra: &[&str]) -> Output {
    embed_in(&fixture_dir(), &BERT_FAMILY.join(","), extra)
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

fn is_unit(vector: &[f64]) -> bool {
    (vector.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-4
}

#[test]
fn each_text_model_embeds_and_fuses_from_its_checkpoint() {
    let dir = all_text_models();
    for (name, _, width) in TEXT_MODELS {
        let output = embed_in(dir.path(), name, &["what is the capital of france"]);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let element = line(output);
        let partial = vector(&element["partials"][name]);
        assert_eq!(partial.len(), width, "{name}");
        assert!(is_unit(&partial), "{name}: partial not normalised");
        let fused = vector(&element["embedding"]);
        assert_eq!(fused.len(), FUSED_DIM, "{name}");
        assert!(is_unit(&fused), "{name}: fused vector not normalised");
        // The width rule warns for a checkpoint narrower than its slot, and only then.
        let spec = catalogue::find(name).unwrap();
        assert_eq!(
            stderr.contains("width differs"),
            width != spec.dim,
            "{name}: {stderr}"
        );
    }
}

/// `--input-type query` and `--instruction` change the partials of exactly the models whose
/// catalogue prompting reads them, and nothing else.
#[test]
fn instruction_and_input_type_change_exactly_the_models_that_read_them() {
    let dir = all_text_models();
    let models = TEXT_MODELS.map(|(name, _, _)| name).join(",");
    let text = "what is the capital of france";
    let instruction = "Represent the Wikipedia question for retrieving supporting documents: ";
    let run = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push(text);
        line(embed_in(dir.path(), &models, &args))
    };
    let document = run(&[]);
    let query = run(&["--input-type", "query"]);
    let instructed_document = run(&["--instruction", instruction]);
    let instructed_query = run(&["--input-type", "query", "--instruction", instruction]);
    for (name, _, _) in TEXT_MODELS {
        let prompting = catalogue::find(name).unwrap().prompting;
        let partial = |reply: &Value| reply["partials"][name].clone();
        let doc = partial(&document);
        // Which models read what is the catalogue's to say; the test holds the list to it.
        let expected_readers = match name {
            "bge-large" => (true, false),
            "instructor-xl" => (false, true),
            "e5-mistral" => (true, true),
            _ => (false, false),
        };
        assert_eq!(
            (prompting.uses_input_type(), prompting.uses_instruction()),
            expected_readers,
            "{name}"
        );
        assert_eq!(
            partial(&query) != doc,
            prompting.uses_input_type(),
            "{name}: --input-type query"
        );
        // e5-mistral reads the instruction for queries only; instructor reads it always.
        assert_eq!(
            partial(&instructed_document) != doc,
            name == "instructor-xl",
            "{name}: --instruction on documents"
        );
        assert_eq!(
            partial(&instructed_query) != partial(&query),
            prompting.uses_instruction(),
            "{name}: --instruction on queries"
        );
    }
    assert_ne!(query["embedding"], document["embedding"]);
    assert_ne!(instructed_document["embedding"], document["embedding"]);
}

#[test]
fn bert_family_input_type_changes_only_bge_and_instruction_changes_none() {
    let text = "what is the capital of france";
    let document = line(embed(&[text]));
    let query = line(embed(&["--input-type", "query", text]));
    let instructed = line(embed(&["--instruction", "Represent the question:", text]));
    for name in BERT_FAMILY {
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
    for (name, _, _) in TEXT_MODELS {
        assert_eq!(runs(name), Some(Value::Bool(true)), "{name}");
    }
    assert_eq!(runs("whisper-large"), Some(Value::Bool(true)));
    assert_eq!(runs("clip-vit-l"), Some(Value::Bool(true)));
    assert_eq!(rows.len(), 12);
    let bge = rows.iter().find(|row| row["name"] == "bge-large").unwrap();
    assert_eq!(bge["prompting"], "query-prefix");
    let table = String::from_utf8(run_with_stdin(embedfleet(&["models"]), None).stdout).unwrap();
    assert!(table.lines().next().unwrap().contains("runs"), "{table}");
}

/// The coordinator of a fleet learns the narrow widths from the worker's announcement and its
/// partials (it loads no model), passes the input type and instruction on in its jobs as each
/// model reads them, and answers what the in-process `embed` prints.
#[test]
fn a_fleet_of_separate_roles_serves_narrow_checkpoints_like_the_library() {
    let server = embedfleet_testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let dir = all_text_models();
    let dir = dir.path().to_str().unwrap();
    let models = "bge-large,instructor-xl,gte-large,e5-mistral";
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
    // The default set is minilm alone, so that the layer the coordinator builds at start (for
    // catalogue widths: it loads no model) stays small; the fixture set is fusable through
    // `--fuse-sets`, and its layer is built for the widths the worker announces.
    let fuse_set = models.replace(',', "+");
    let mut coordinator = support::start_role(
        "coordinator",
        &[
            "coordinator",
            "--nats-url",
            &url,
            "--models",
            "minilm",
            "--fuse-sets",
            &fuse_set,
        ],
    );
    let text = "how do I reverse a linked list";
    let instruction = "Represent the programming question for retrieval: ";
    for input_type in ["document", "query"] {
        let common = [
            "--models",
            models,
            "--partials",
            "--input-type",
            input_type,
            "--instruction",
            instruction,
        ];
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
        let fields = models.split(',').map(|name| format!("partials/{name}"));
        for field in std::iter::once("embedding".to_string()).chain(fields) {
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
