//! `embedfleet fusion partials --nats-url`: partials for training and evaluation computed by a
//! running fleet (real `serve` on a real nats-server, real minilm) land in the same cache file,
//! with the same vectors, as the in-process models' partials; a filled cache sends nothing; no
//! fleet, or a fleet without the model, is a one-line error.

use std::path::Path;

use embedfleet_testkit::NatsServer;

mod support;
use support::{cosine, start_role, MINILM_DIM};

const PAIRS: &str = r#"{"a": "A man is playing a guitar.", "b": "Someone plays an instrument.", "score": 3.8}
{"a": "A cat sleeps on the sofa.", "b": "The stock market fell sharply today.", "score": 0.1}
{"a": "Two dogs run across a field.", "b": "Dogs are running outside.", "score": 4.2}
"#;

/// `(key, vector)` of every record of a partials file: 16-byte key, then `dim` f32s.
fn records(path: &Path, dim: usize) -> Vec<([u8; 16], Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let record = 16 + 4 * dim;
    assert_eq!(
        bytes.len() % record,
        0,
        "{} has a torn record",
        path.display()
    );
    bytes
        .chunks_exact(record)
        .map(|r| {
            let key = r[..16].try_into().unwrap();
            let vector = r[16..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (key, vector)
        })
        .collect()
}

/// The one `.partials` file a cache directory holds.
fn only_file(dir: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

/// `fusion partials` of `model` for the texts of `pairs`, in process or through `nats_url`.
fn partials(
    model: &str,
    cache: &Path,
    pairs: &Path,
    nats_url: Option<&str>,
) -> std::process::Output {
    let mut args = vec![
        "fusion",
        "partials",
        "--models",
        model,
        "--scored",
        pairs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    if let Some(url) = nats_url {
        args.extend(["--nats-url", url]);
    }
    support::embedfleet(&args).output().unwrap()
}

fn assert_one_line_error(output: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{needle:?} in {stderr:?}"
    );
}

#[test]
fn a_fleet_fills_the_same_partials_as_the_in_process_models() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, PAIRS).unwrap();
    let (from_fleet, in_process) = (dir.path().join("fleet"), dir.path().join("local"));

    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    // Nothing serves yet: no worker has announced minilm.
    assert_one_line_error(
        &partials("minilm", &from_fleet, &pairs, Some(&url)),
        "minilm",
    );

    let mut serve = start_role(
        "serve",
        &["serve", "--nats-url", &url, "--models", "minilm"],
    );
    let output = partials("minilm", &from_fleet, &pairs, Some(&url));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{stderr}\nserve log:\n{}",
        serve.log()
    );
    assert!(stderr.contains("6/6"), "progress reaches 6 texts: {stderr}");

    let output = partials("minilm", &in_process, &pairs, None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Same revision, so the same file name; same texts, same vectors.
    let (fleet_file, local_file) = (only_file(&from_fleet), only_file(&in_process));
    assert_eq!(fleet_file.file_name(), local_file.file_name());
    let mut fleet = records(&fleet_file, MINILM_DIM);
    let mut local = records(&local_file, MINILM_DIM);
    assert_eq!(fleet.len(), 6);
    fleet.sort_by_key(|(key, _)| *key);
    local.sort_by_key(|(key, _)| *key);
    for ((fk, fv), (lk, lv)) in fleet.iter().zip(&local) {
        assert_eq!(fk, lk);
        let similarity = cosine(fv, lv);
        assert!(
            similarity > 0.9999,
            "fleet vs in-process cosine {similarity}"
        );
    }

    // A filled cache asks the fleet for nothing and appends nothing.
    let before = std::fs::metadata(&fleet_file).unwrap().len();
    let output = partials("minilm", &from_fleet, &pairs, Some(&url));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("partials "), "nothing to embed: {stderr}");
    assert_eq!(std::fs::metadata(&fleet_file).unwrap().len(), before);

    // A model the fleet does not serve is named.
    let output = partials("mpnet", &from_fleet, &pairs, Some(&url));
    assert_one_line_error(&output, "mpnet");

    serve
        .terminate_within(std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}
