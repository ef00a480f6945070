//! The `embedfleet` binary as a user runs it: real checkpoints from `models/` (filled by
//! `scripts/fetch-models.sh`, which the README's test command runs first), no network.
//!
//! Each successful `embed` loads minilm and mpnet (about a second), so the tests share one
//! reference run and the error cases use `--models minilm` where the set does not matter.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::sync::OnceLock;

use serde_json::Value;

mod support;
use support::{embedfleet, models_dir, run_with_stdin, FUSED_DIM};

/// Five varied inputs: short, punctuation, non-Latin, code, emoji.
const TEXTS: [&str; 5] = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors; similar meaning, nearby vectors.",
    "東京は日本の首都です。",
    "fn main() { println!(\"hello\"); }",
    "Weekend plans: hiking 🥾 and coffee ☕",
];

fn stdout_of(output: &Output) -> &str {
    std::str::from_utf8(&output.stdout).expect("stdout is UTF-8")
}

fn succeed(output: Output) -> String {
    assert!(
        output.status.success(),
        "embedfleet failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "a successful run writes nothing to stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout_of(&output).to_owned()
}

/// A failure as the CLI promises it: non-zero exit (not a signal, so no abort or crash), nothing
/// on stdout, exactly one line on stderr that starts with `error:` and mentions each of `needles`.
fn assert_clean_failure(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(code) if code != 0),
        "expected a non-zero exit, got {}; stderr: {stderr}",
        output.status
    );
    assert!(
        output.stdout.is_empty(),
        "stdout must be empty on failure, got: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got: {stderr:?}"
    );
    assert!(
        stderr.ends_with('\n'),
        "the error line is terminated: {stderr:?}"
    );
    assert!(
        lines[0].starts_with("error: "),
        "stderr line must start with `error:`: {stderr:?}"
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "error should mention {needle:?}: {stderr:?}"
        );
    }
}

fn parse_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:.200}"))
        })
        .collect()
}

fn vector(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of numbers, got {value:.100}"))
        .iter()
        .map(|x| x.as_f64().expect("vector element is a number"))
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of different widths");
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}

fn assert_unit_vector(v: &[f64], dim: usize, what: &str) {
    assert_eq!(v.len(), dim, "{what}: width");
    assert!(
        v.iter().all(|x| x.is_finite()),
        "{what}: non-finite element"
    );
    let n = norm(v);
    assert!((n - 1.0).abs() < 1e-4, "{what}: norm {n}");
}

/// stdin lines for `TEXTS`, with Windows line endings to check that `\r` is stripped.
fn crlf_lines() -> Vec<u8> {
    TEXTS
        .iter()
        .flat_map(|t| format!("{t}\r\n").into_bytes())
        .collect()
}

/// `embed --partials TEXTS...` in argument mode, run once and shared by the tests that compare
/// against it.
fn reference() -> &'static str {
    static REFERENCE: OnceLock<String> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let mut args = vec!["embed", "--partials"];
        args.extend(TEXTS);
        succeed(run_with_stdin(embedfleet(&args), None))
    })
}

#[test]
fn embed_prints_one_fused_line_per_input_with_experts_and_partials() {
    let lines = parse_lines(reference());
    assert_eq!(lines.len(), TEXTS.len(), "one line per input");
    let mut fused = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i, "line {i}: index");
        assert_eq!(line["object"], "embedding", "line {i}: object");

        let embedding = vector(&line["embedding"]);
        assert_unit_vector(&embedding, FUSED_DIM, &format!("line {i} embedding"));

        let experts = &line["experts"];
        let weights = vector(&experts["weights"]);
        let sum: f64 = weights.iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "line {i}: expert weights sum to {sum}"
        );
        assert!(
            weights.iter().all(|w| (0.0..=1.0).contains(w)),
            "line {i}: weights {weights:?}"
        );
        let selected: Vec<usize> = experts["selected"]
            .as_array()
            .expect("selected is an array")
            .iter()
            .map(|s| s.as_u64().expect("expert index") as usize)
            .collect();
        assert_eq!(selected.len(), 2, "line {i}: top-2 experts");
        assert_eq!(
            selected.iter().collect::<BTreeSet<_>>().len(),
            2,
            "line {i}: distinct experts {selected:?}"
        );
        for (expert, weight) in weights.iter().enumerate() {
            assert_eq!(
                selected.contains(&expert),
                *weight > 0.0,
                "line {i}: only selected experts weigh ({weights:?}, {selected:?})"
            );
        }

        let partials = line["partials"]
            .as_object()
            .expect("--partials adds `partials`");
        assert_eq!(
            partials.keys().map(String::as_str).collect::<Vec<_>>(),
            ["minilm", "mpnet"],
            "line {i}"
        );
        assert_unit_vector(
            &vector(&partials["minilm"]),
            384,
            &format!("line {i} minilm"),
        );
        assert_unit_vector(&vector(&partials["mpnet"]), 768, &format!("line {i} mpnet"));
        fused.push(embedding);
    }
    // Different inputs get different vectors (a pipeline that ignored its input would pass the
    // shape checks above).
    for a in 0..fused.len() {
        for b in a + 1..fused.len() {
            assert!(
                cosine(&fused[a], &fused[b]) < 0.999,
                "inputs {a} and {b} fused to the same vector"
            );
        }
    }
}

#[test]
fn output_is_identical_across_runs() {
    let mut args = vec!["embed", "--partials"];
    args.extend(TEXTS);
    let again = succeed(run_with_stdin(embedfleet(&args), None));
    assert!(again == reference(), "a second run printed different bytes");
}

#[test]
fn stdin_lines_with_crlf_match_argument_mode_exactly() {
    let from_stdin = succeed(run_with_stdin(
        embedfleet(&["embed", "--partials"]),
        Some(&crlf_lines()),
    ));
    assert!(
        from_stdin == reference(),
        "stdin mode differs from argument mode:\n{from_stdin:.300}\nvs\n{:.300}",
        reference()
    );
}

#[test]
fn small_stdin_batches_give_the_same_vectors_as_one_batch() {
    let stdin: Vec<u8> = TEXTS
        .iter()
        .flat_map(|t| format!("{t}\n").into_bytes())
        .collect();
    let batched = parse_lines(&succeed(run_with_stdin(
        embedfleet(&["embed", "--partials", "--batch-size", "2"]),
        Some(&stdin),
    )));
    let whole = parse_lines(reference());
    assert_eq!(batched.len(), TEXTS.len());
    for (i, (got, want)) in batched.iter().zip(&whole).enumerate() {
        assert_eq!(got["index"], i, "indices run on across batches");
        let similarity = cosine(&vector(&got["embedding"]), &vector(&want["embedding"]));
        assert!(
            similarity >= 0.99999,
            "input {i}: fused cosine {similarity}"
        );
        for model in ["minilm", "mpnet"] {
            let similarity = cosine(
                &vector(&got["partials"][model]),
                &vector(&want["partials"][model]),
            );
            assert!(
                similarity >= 0.99999,
                "input {i}: {model} cosine {similarity}"
            );
        }
    }
}

#[test]
fn no_fuse_prints_partials_only() {
    let lines = parse_lines(&succeed(run_with_stdin(
        embedfleet(&["embed", "--no-fuse", TEXTS[0], TEXTS[2]]),
        None,
    )));
    let whole = parse_lines(reference());
    assert_eq!(lines.len(), 2);
    for (line, (i, want)) in lines.iter().zip([(0, &whole[0]), (1, &whole[2])]) {
        assert_eq!(line["index"], i);
        assert!(
            line.get("embedding").is_none(),
            "--no-fuse must leave out `embedding`: {line:.200}"
        );
        assert!(
            line.get("experts").is_none(),
            "--no-fuse must leave out `experts`"
        );
        let partials = line["partials"]
            .as_object()
            .expect("--no-fuse prints partials without --partials");
        assert_eq!(partials.len(), 2);
        for (model, dim) in [("minilm", 384), ("mpnet", 768)] {
            let got = vector(&partials[model]);
            assert_unit_vector(&got, dim, model);
            let similarity = cosine(&got, &vector(&want["partials"][model]));
            assert!(
                similarity >= 0.99999,
                "input {i}: {model} differs from the fused run ({similarity})"
            );
        }
    }
}

#[test]
fn dimensions_and_encoding_formats_apply_to_the_fused_vector() {
    let full: Vec<Vec<f64>> = parse_lines(reference())
        .iter()
        .map(|line| vector(&line["embedding"]))
        .collect();
    let cut = |v: &[f64], n: usize| -> Vec<f64> {
        let norm = norm(&v[..n]);
        v[..n].iter().map(|x| x / norm).collect()
    };
    let run = |extra: &[&str]| {
        let mut args = vec!["embed"];
        args.extend(extra);
        args.extend(&TEXTS[..2]);
        parse_lines(&succeed(run_with_stdin(embedfleet(&args), None)))
    };
    let floats = run(&["--dimensions", "64"]);
    for (line, full) in floats.iter().zip(&full) {
        let v = vector(&line["embedding"]);
        assert_unit_vector(&v, 64, "--dimensions 64");
        assert!(
            cosine(&v, &cut(full, 64)) > 0.99999,
            "the renormalised prefix"
        );
    }
    let base64 = run(&["--dimensions", "256", "--encoding-format", "base64"]);
    let text = base64[0]["embedding"].as_str().expect("a base64 string");
    let floats = embedfleet_proto::Embedding::decode_base64(text).expect("base64 of f32");
    let floats: Vec<f64> = floats.iter().map(|&x| f64::from(x)).collect();
    assert!(cosine(&floats, &cut(&full[0], 256)) > 0.99999);
    let int8 = run(&["--encoding-format", "int8"]);
    let q = vector(&int8[0]["embedding"]);
    assert_eq!(q.len(), FUSED_DIM);
    assert!(q
        .iter()
        .all(|&x| x.fract() == 0.0 && (-127.0..=127.0).contains(&x)));
    assert!(cosine(&q, &full[0]) > 0.99, "int8 keeps the direction");
    let ubinary = run(&["--dimensions", "12", "--encoding-format", "ubinary"]);
    let bytes = vector(&ubinary[1]["embedding"]);
    assert_eq!(bytes.len(), 2, "12 bits in 2 bytes");
    let signs = cut(&full[1], 12);
    for (j, v) in signs.iter().enumerate() {
        let bit = (bytes[j / 8] as u8) & (0x80 >> (j % 8)) != 0;
        assert_eq!(bit, *v > 0.0, "bit {j}");
    }
}

#[test]
fn bad_dimensions_and_encoding_formats_are_refused() {
    for (args, needles) in [
        (vec!["--dimensions", "0"], vec!["dimensions", "0"]),
        (
            vec!["--dimensions", "1537"],
            vec!["dimensions", "1537", "1536"],
        ),
        (vec!["--dimensions", "64.5"], vec!["dimensions", "64.5"]),
        (vec!["--encoding-format", "int4"], vec!["int4"]),
        (
            vec!["--no-fuse", "--dimensions", "64"],
            vec!["dimensions", "fuse"],
        ),
    ] {
        let mut all = vec!["embed", "--models", "minilm,mpnet"];
        all.extend(&args);
        all.push("text");
        let output = run_with_stdin(embedfleet(&all), None);
        assert_clean_failure(&output, &needles);
    }
}

#[test]
fn long_input_is_truncated_by_default_and_refused_with_no_truncate() {
    let long = vec!["word"; 600].join(" ");
    let lines = parse_lines(&succeed(run_with_stdin(
        embedfleet(&["embed", "--models", "minilm", &long]),
        None,
    )));
    assert_eq!(lines.len(), 1);
    assert_unit_vector(
        &vector(&lines[0]["embedding"]),
        FUSED_DIM,
        "truncated input",
    );

    let refused = run_with_stdin(
        embedfleet(&["embed", "--models", "minilm", "--no-truncate", &long]),
        None,
    );
    assert_clean_failure(&refused, &["minilm", "256", "truncation is off"]);
}

#[test]
fn empty_and_whitespace_text_is_refused() {
    assert_clean_failure(
        &run_with_stdin(embedfleet(&["embed", "--models", "minilm", ""]), None),
        &["input 0 is empty"],
    );
    assert_clean_failure(
        &run_with_stdin(
            embedfleet(&["embed", "--models", "minilm", "fine", " \t "]),
            None,
        ),
        &["input 1 is empty"],
    );
    // On stdin a blank line is an input too, and its index is its line's.
    assert_clean_failure(
        &run_with_stdin(
            embedfleet(&["embed", "--models", "minilm"]),
            Some(b"fine\n   \r\nalso fine\n"),
        ),
        &["input 1 is empty"],
    );
}

#[test]
fn invalid_utf8_on_stdin_is_refused() {
    let output = run_with_stdin(
        embedfleet(&["embed", "--models", "minilm"]),
        Some(b"fine\nbad \xff\xfe bytes\n"),
    );
    assert_clean_failure(&output, &["line 2", "UTF-8"]);
}

#[test]
fn no_input_at_all_is_refused() {
    assert_clean_failure(
        &run_with_stdin(embedfleet(&["embed", "--models", "minilm"]), None),
        &["no input"],
    );
}

#[test]
fn unknown_model_is_refused_with_the_known_names() {
    let output = run_with_stdin(
        embedfleet(&["embed", "--models", "minilm,no-such-model", "hello"]),
        None,
    );
    assert_clean_failure(&output, &["no-such-model", "minilm", "mpnet", "e5-mistral"]);
}

#[test]
fn missing_fusion_weights_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("fusemoe.safetensors");
    let output = run_with_stdin(
        embedfleet(&[
            "embed",
            "--fusion-weights",
            missing.to_str().unwrap(),
            "hello",
        ]),
        None,
    );
    assert_clean_failure(&output, &["fusion", &missing.display().to_string()]);
    // The same through the environment variable.
    let mut command = embedfleet(&["embed", "hello"]);
    command.env("EMBEDFLEET_FUSION_WEIGHTS", &missing);
    assert_clean_failure(
        &run_with_stdin(command, None),
        &[&missing.display().to_string()],
    );
}

/// A models directory holding a `minilm/` with `config.json` plus whatever `fill` writes.
fn broken_minilm(fill: impl FnOnce(&Path)) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("minilm");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        models_dir().join("minilm/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    fill(&dir);
    root
}

fn embed_minilm_from(root: &Path) -> Output {
    run_with_stdin(
        embedfleet(&[
            "embed",
            "--models",
            "minilm",
            "--model-dir",
            root.to_str().unwrap(),
            "hello",
        ]),
        None,
    )
}

/// Copies one file of the real minilm checkpoint into `dir`.
fn copy_real(dir: &Path, file: &str) {
    std::fs::copy(models_dir().join("minilm").join(file), dir.join(file)).unwrap();
}

#[test]
fn broken_model_directories_are_refused() {
    let no_weights = broken_minilm(|dir| copy_real(dir, "tokenizer.json"));
    assert_clean_failure(
        &embed_minilm_from(no_weights.path()),
        &["model.safetensors", "missing"],
    );

    let no_tokenizer = broken_minilm(|dir| copy_real(dir, "model.safetensors"));
    assert_clean_failure(
        &embed_minilm_from(no_tokenizer.path()),
        &["tokenizer.json", "missing"],
    );

    let weights = std::fs::read(models_dir().join("minilm/model.safetensors")).unwrap();
    let truncated = broken_minilm(|dir| {
        copy_real(dir, "tokenizer.json");
        std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    });
    assert_clean_failure(
        &embed_minilm_from(truncated.path()),
        &["corrupt weights", "model.safetensors"],
    );

    let garbage = broken_minilm(|dir| {
        copy_real(dir, "tokenizer.json");
        let bytes: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    });
    assert_clean_failure(
        &embed_minilm_from(garbage.path()),
        &["corrupt weights", "model.safetensors"],
    );

    // No directory for the model at all, offline, with an empty Hugging Face cache: the error
    // names every place it looked.
    let empty = tempfile::tempdir().unwrap();
    let mut command = embedfleet(&[
        "embed",
        "--models",
        "minilm",
        "--model-dir",
        empty.path().to_str().unwrap(),
        "hello",
    ]);
    command
        .env("HF_HOME", empty.path().join("hf"))
        .env_remove("HF_HUB_CACHE");
    assert_clean_failure(
        &run_with_stdin(command, None),
        &["minilm", "Hugging Face cache", "offline"],
    );
}

#[test]
fn models_lists_the_twelve_and_the_fusion_width() {
    let table = succeed(run_with_stdin(embedfleet(&["models"]), None));
    let rows: Vec<&str> = table.lines().filter(|line| line.starts_with('E')).collect();
    assert_eq!(rows.len(), 12, "one row per model:\n{table}");
    for name in [
        "minilm",
        "bge-large",
        "instructor-xl",
        "clip-vit-l",
        "whisper-large",
        "codebert",
        "sentence-t5-xxl",
        "mpnet",
        "contriever",
        "dragon-plus",
        "gte-large",
        "e5-mistral",
    ] {
        assert!(
            rows.iter()
                .any(|row| row.split_whitespace().nth(1) == Some(name)),
            "{name} missing:\n{table}"
        );
    }
    let last = table.lines().last().unwrap_or_default();
    assert!(
        last.contains("12 models") && last.ends_with("13184"),
        "fusion width line: {last:?}"
    );

    let json = parse_lines(&succeed(run_with_stdin(
        embedfleet(&["models", "--json"]),
        None,
    )));
    assert_eq!(json.len(), 12);
    let width: u64 = json
        .iter()
        .map(|model| model["dim"].as_u64().expect("dim"))
        .sum();
    assert_eq!(width, 13_184);
    let ordinals: Vec<u64> = json
        .iter()
        .map(|model| model["ordinal"].as_u64().expect("ordinal"))
        .collect();
    assert_eq!(ordinals, (1..=12).collect::<Vec<_>>());
}
