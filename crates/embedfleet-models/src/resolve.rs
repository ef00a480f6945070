//! Finding a model's files: an explicit local directory first, then the Hugging Face cache, then
//! a hub download when the machine is online.
//!
//! Offline machines (CI, air-gapped GPU nodes) run from a local directory that
//! `scripts/fetch-models.sh` fills; online ones use hf-hub exactly as any HF tool would, sharing
//! its cache. When nothing is found, the error lists every place tried.

use std::path::{Path, PathBuf};

use crate::catalogue::ModelSpec;
use crate::error::ModelError;

/// The files one checkpoint is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: PathBuf,
    /// Identifies the exact weights: the hub commit, or `local-<xxh3 of the weights>`.
    pub revision: String,
}

/// Environment variable naming the directory of local checkpoints, one subdirectory per model.
pub const MODELS_DIR_ENV: &str = "EMBEDFLEET_MODELS_DIR";

/// The files every text checkpoint needs, in the hub's layout.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Where to look for weights, in order.
#[derive(Debug, Clone, Default)]
pub struct WeightResolver {
    /// `--model-dir` or `$EMBEDFLEET_MODELS_DIR`: holds `<name>/config.json` and friends.
    pub models_dir: Option<PathBuf>,
    /// Never touch the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl WeightResolver {
    /// `models_dir` if given, else `$EMBEDFLEET_MODELS_DIR`; offline if `HF_HUB_OFFLINE` is set
    /// to anything but `0`.
    pub fn from_env(models_dir: Option<PathBuf>) -> Self {
        let models_dir = models_dir.or_else(|| std::env::var_os(MODELS_DIR_ENV).map(PathBuf::from));
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
        Self {
            models_dir,
            offline,
        }
    }

    pub fn resolve(&self, spec: &ModelSpec) -> Result<ModelFiles, ModelError> {
        let mut tried = Vec::new();
        if let Some(root) = &self.models_dir {
            let dir = root.join(spec.name);
            if dir.is_dir() {
                // A directory that exists but is incomplete is an operator's mistake: say so
                // instead of quietly falling back to the network.
                return local_files(&dir);
            }
            tried.push(format!("{} (no such directory)", dir.display()));
        }

        let cache = hf_hub::Cache::from_env();
        let cached = cache.model(spec.hf_repo.to_string());
        match REQUIRED.map(|file| cached.get(file)) {
            [Some(config), Some(tokenizer), Some(weights)] => {
                let revision = snapshot_revision(&weights).unwrap_or_else(|| "main".into());
                return Ok(ModelFiles {
                    config,
                    tokenizer,
                    weights,
                    revision,
                });
            }
            _ => tried.push(format!(
                "Hugging Face cache {} ({})",
                cache.path().display(),
                spec.hf_repo
            )),
        }

        if self.offline {
            tried.push("hub download (skipped: offline)".into());
        } else {
            match download(spec) {
                Ok(files) => return Ok(files),
                Err(reason) => tried.push(format!("hub download of {} ({reason})", spec.hf_repo)),
            }
        }
        Err(ModelError::WeightsNotFound {
            model: spec.name.to_string(),
            tried,
        })
    }
}

fn local_files(dir: &Path) -> Result<ModelFiles, ModelError> {
    let [config, tokenizer, weights] = REQUIRED.map(|file| dir.join(file));
    for path in [&config, &tokenizer, &weights] {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.clone(),
                reason: "missing from the model directory".into(),
            });
        }
    }
    let revision = format!("local-{}", hash_file(&weights)?);
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        revision,
    })
}

/// xxh3-64 of the whole weights file: local checkpoints have no commit id, and a cheap full hash
/// (GB/s) is the only revision that changes exactly when the weights do.
fn hash_file(path: &Path) -> Result<String, ModelError> {
    let unreadable = |e: std::io::Error| ModelError::MissingFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    // SAFETY: read-only map of a file we only read; a concurrent writer would give a wrong hash,
    // never unsoundness in our code, since the bytes are only hashed.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(unreadable)?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&map)))
}

/// The hub cache keeps files under `snapshots/<commit>/`; that commit is the revision.
fn snapshot_revision(file: &Path) -> Option<String> {
    let snapshot = file.parent()?;
    (snapshot.parent()?.file_name()? == "snapshots")
        .then(|| snapshot.file_name()?.to_str().map(String::from))?
}

fn download(spec: &ModelSpec) -> Result<ModelFiles, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.model(spec.hf_repo.to_string());
    let [config, tokenizer, weights] = REQUIRED.map(|file| repo.get(file));
    let (config, tokenizer, weights) = (
        config.map_err(|e| e.to_string())?,
        tokenizer.map_err(|e| e.to_string())?,
        weights.map_err(|e| e.to_string())?,
    );
    let revision = snapshot_revision(&weights).unwrap_or_else(|| "main".into());
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue;

    #[test]
    fn offline_miss_names_every_place_tried() {
        let root = tempfile::tempdir().unwrap();
        let resolver = WeightResolver {
            models_dir: Some(root.path().to_path_buf()),
            offline: true,
        };
        let error = resolver
            .resolve(catalogue::find("bge-large").unwrap())
            .unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, ModelError::WeightsNotFound { .. }),
            "{message}"
        );
        assert!(
            message.contains(&root.path().join("bge-large").display().to_string()),
            "{message}"
        );
        assert!(message.contains("Hugging Face cache"), "{message}");
        assert!(message.contains("offline"), "{message}");
    }

    #[test]
    fn incomplete_local_directory_is_an_error_not_a_fallback() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("minilm")).unwrap();
        std::fs::write(root.path().join("minilm/config.json"), "{}").unwrap();
        let resolver = WeightResolver {
            models_dir: Some(root.path().to_path_buf()),
            offline: true,
        };
        let error = resolver
            .resolve(catalogue::find("minilm").unwrap())
            .unwrap_err();
        assert!(
            matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
            "{error}"
        );
    }

    #[test]
    fn revision_of_a_local_directory_follows_the_weights() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("minilm");
        std::fs::create_dir(&dir).unwrap();
        for file in REQUIRED {
            std::fs::write(dir.join(file), file).unwrap();
        }
        let resolver = WeightResolver {
            models_dir: Some(root.path().to_path_buf()),
            offline: true,
        };
        let spec = catalogue::find("minilm").unwrap();
        let first = resolver.resolve(spec).unwrap().revision;
        std::fs::write(dir.join("model.safetensors"), "other weights").unwrap();
        let second = resolver.resolve(spec).unwrap().revision;
        assert!(first.starts_with("local-") && first != second);
    }

    #[test]
    fn snapshot_directory_names_the_commit() {
        let path = Path::new("/cache/models--a--b/snapshots/0123abcd/model.safetensors");
        assert_eq!(snapshot_revision(path).as_deref(), Some("0123abcd"));
        assert_eq!(snapshot_revision(Path::new("/tmp/model.safetensors")), None);
    }
}
