//! Finding a model's files: an explicit local directory first, then the Hugging Face cache, then
//! a hub download when the machine is online.
//!
//! Offline machines (CI, air-gapped GPU nodes) run from a local directory that
//! `scripts/fetch-models.sh` fills; online ones use hf-hub exactly as any HF tool would, sharing
//! its cache. When nothing is found, the error lists every place tried.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::catalogue::ModelSpec;
use crate::error::ModelError;

/// The files one checkpoint is loaded from.
///
/// Only `config.json` and the weights are common to every architecture; everything else
/// (tokenizer files of whichever kind the upstream repository ships, sentence-transformers module
/// folders, `spiece.model`, ...) is looked up in `dir` by the architecture that needs it, with
/// [`ModelFiles::file`] or [`ModelFiles::require`], so a missing file is an error naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The checkpoint directory: the local `<models dir>/<name>/`, or the hub snapshot.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: WeightFiles,
    /// Identifies the exact weights: the hub commit, or `local-<xxh3 of the weights>`.
    pub revision: String,
}

/// The weights of a checkpoint, in the first format found of: `model.safetensors`, sharded
/// safetensors (`model.safetensors.index.json`), `pytorch_model.bin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One file or the shards named by the index, memory-mapped.
    Safetensors(Vec<PathBuf>),
    /// A PyTorch pickle (`pytorch_model.bin`), read whole into memory by candle.
    PytorchBin(PathBuf),
}

impl WeightFiles {
    /// Every file holding weights.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            WeightFiles::Safetensors(paths) => paths,
            WeightFiles::PytorchBin(path) => std::slice::from_ref(path),
        }
    }

    /// The file named in errors about the weights as a whole: the first shard or the only file.
    pub fn primary(&self) -> &Path {
        &self.paths()[0]
    }

    /// How many numbers the weights hold, read from the safetensors headers (no tensor is
    /// read); a PyTorch pickle is counted from its size as f32. Used to check a load against a
    /// device's free memory before it starts.
    pub fn parameters(&self) -> Result<u64, ModelError> {
        match self {
            WeightFiles::Safetensors(paths) => {
                paths.iter().map(|path| count_parameters(path)).sum()
            }
            WeightFiles::PytorchBin(path) => Ok(file_size(path)? / 4),
        }
    }

    /// A `VarBuilder` over all the weights, converting to `dtype` on load.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        let corrupt = |e: candle_core::Error| ModelError::CorruptWeights {
            path: self.primary().to_path_buf(),
            reason: e.to_string(),
        };
        match self {
            // SAFETY: the weights are memory-mapped read-only; like every safetensors loader we
            // rely on nobody truncating them while the process runs (checkpoints are immutable).
            WeightFiles::Safetensors(paths) => {
                unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }
                    .map_err(corrupt)
            }
            WeightFiles::PytorchBin(path) => {
                VarBuilder::from_pth(path, dtype, device).map_err(corrupt)
            }
        }
    }
}

impl ModelFiles {
    /// `dir/name` if that file exists.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }

    /// `dir/name`, or a `MissingFile` error naming it and saying what it is for.
    pub fn require(&self, name: &str, needed_for: &str) -> Result<PathBuf, ModelError> {
        self.file(name).ok_or_else(|| ModelError::MissingFile {
            path: self.dir.join(name),
            reason: format!("missing from the checkpoint ({needed_for})"),
        })
    }
}

/// Environment variable naming the directory of local checkpoints, one subdirectory per model.
pub const MODELS_DIR_ENV: &str = "EMBEDFLEET_MODELS_DIR";

/// The single-file weight formats, in order of preference.
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH_BIN: &str = "pytorch_model.bin";

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
                return checkpoint_dir(&dir);
            }
            tried.push(format!("{} (no such directory)", dir.display()));
        }

        let cache = hf_hub::Cache::from_env();
        let cached = cache.model(spec.hf_repo.to_string());
        // The cache holds files one by one; a snapshot counts when its config and weights are
        // there (what else an architecture needs is checked by that architecture, by name).
        let snapshot = cached
            .get("config.json")
            .and_then(|c| c.parent().map(Path::to_path_buf));
        match snapshot.map(|dir| local_files(&dir)) {
            Some(Ok(files)) => {
                let revision = snapshot_revision(&files.config).unwrap_or_else(|| "main".into());
                return Ok(ModelFiles { revision, ..files });
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

/// The files of one checkpoint directory named outright (it holds `config.json` and the weights,
/// as `<models dir>/<name>/` does), with its `local-<xxh3 of the weights>` revision. A hot swap
/// loads new weights from such a directory.
pub fn checkpoint_dir(dir: &Path) -> Result<ModelFiles, ModelError> {
    let files = local_files(dir)?;
    let revision = format!("local-{}", hash_weights(&files.weights)?);
    Ok(ModelFiles { revision, ..files })
}

/// The files of a checkpoint directory, with an empty revision for the caller to fill.
fn local_files(dir: &Path) -> Result<ModelFiles, ModelError> {
    let missing = |path: PathBuf, reason: &str| ModelError::MissingFile {
        path,
        reason: reason.into(),
    };
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(missing(config, "missing from the model directory"));
    }
    let weights = if dir.join(SAFETENSORS).is_file() {
        WeightFiles::Safetensors(vec![dir.join(SAFETENSORS)])
    } else if dir.join(SAFETENSORS_INDEX).is_file() {
        let shards = shard_names(&dir.join(SAFETENSORS_INDEX))?;
        let paths: Vec<PathBuf> = shards.iter().map(|shard| dir.join(shard)).collect();
        if let Some(absent) = paths.iter().find(|path| !path.is_file()) {
            return Err(missing(
                absent.clone(),
                "a shard named by model.safetensors.index.json is missing",
            ));
        }
        WeightFiles::Safetensors(paths)
    } else if dir.join(PYTORCH_BIN).is_file() {
        WeightFiles::PytorchBin(dir.join(PYTORCH_BIN))
    } else {
        return Err(missing(
            dir.join(SAFETENSORS),
            "weights missing from the model directory (looked for model.safetensors, \
             model.safetensors.index.json, pytorch_model.bin)",
        ));
    };
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        weights,
        revision: String::new(),
    })
}

/// The shard file names of a sharded safetensors checkpoint, in a stable order, once each.
fn shard_names(index: &Path) -> Result<Vec<String>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let bad = |reason: String| ModelError::CorruptWeights {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let shards: std::collections::BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(bad("the weight_map names no shard".into()));
    }
    if let Some(escape) = shards
        .iter()
        .find(|s| s.contains('/') || s.contains('\\') || s.starts_with('.'))
    {
        return Err(bad(format!(
            "shard name {escape:?} points outside the checkpoint"
        )));
    }
    Ok(shards.into_iter().collect())
}

/// xxh3-64 over every weights file: local checkpoints have no commit id, and a cheap full hash
/// (GB/s) is the only revision that changes exactly when the weights do.
fn hash_weights(weights: &WeightFiles) -> Result<String, ModelError> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for path in weights.paths() {
        let unreadable = |e: std::io::Error| ModelError::MissingFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(unreadable)?;
        // SAFETY: read-only map of a file we only read; a concurrent writer would give a wrong
        // hash, never unsoundness in our code, since the bytes are only hashed.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(unreadable)?;
        hasher.update(&map);
    }
    Ok(format!("{:016x}", hasher.digest()))
}

/// The hub cache keeps files under `snapshots/<commit>/`; that commit is the revision.
fn snapshot_revision(file: &Path) -> Option<String> {
    let snapshot = file.parent()?;
    (snapshot.parent()?.file_name()? == "snapshots")
        .then(|| snapshot.file_name()?.to_str().map(String::from))?
}

/// Whether a repository file is worth downloading: configs, tokenizer files, and the
/// sentence-transformers module folders (`1_Pooling/`, `2_Dense/`, ...) with their weights. The
/// model's own weights are picked separately, in one format only.
fn is_support_file(name: &str) -> bool {
    let in_module_folder = name.split_once('/').is_some_and(|(folder, _)| {
        folder
            .split_once('_')
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    });
    let top_level = !name.contains('/');
    let small_kind = [".json", ".txt", ".model"]
        .iter()
        .any(|ext| name.ends_with(ext));
    (top_level && small_kind && name != SAFETENSORS_INDEX)
        || (in_module_folder && !name.ends_with(".onnx"))
}

fn download(spec: &ModelSpec) -> Result<ModelFiles, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.model(spec.hf_repo.to_string());
    let info = repo.info().map_err(|e| e.to_string())?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |name: &str| names.contains(&name);
    let mut wanted: Vec<String> = names
        .iter()
        .filter(|n| is_support_file(n))
        .map(|n| n.to_string())
        .collect();
    if has(SAFETENSORS) {
        wanted.push(SAFETENSORS.into());
    } else if has(SAFETENSORS_INDEX) {
        let index = repo.get(SAFETENSORS_INDEX).map_err(|e| e.to_string())?;
        wanted.extend(shard_names(&index).map_err(|e| e.to_string())?);
    } else if has(PYTORCH_BIN) {
        wanted.push(PYTORCH_BIN.into());
    } else {
        return Err(
            "the repository has no model.safetensors, sharded safetensors or pytorch_model.bin"
                .into(),
        );
    }
    let mut config = None;
    for name in &wanted {
        let path = repo.get(name).map_err(|e| format!("{name}: {e}"))?;
        if name == "config.json" {
            config = Some(path);
        }
    }
    let config = config.ok_or("the repository has no config.json")?;
    let dir = config
        .parent()
        .ok_or("hub snapshot has no directory")?
        .to_path_buf();
    let files = local_files(&dir).map_err(|e| e.to_string())?;
    Ok(ModelFiles {
        revision: info.sha.clone(),
        ..files
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
            matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("model.safetensors")),
            "{error}"
        );
    }

    #[test]
    fn revision_of_a_local_directory_follows_the_weights() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("minilm");
        std::fs::create_dir(&dir).unwrap();
        for file in ["config.json", "tokenizer.json", SAFETENSORS] {
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
    fn sharded_checkpoint_lists_every_shard_once_and_a_missing_shard_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(
            dir.join(SAFETENSORS_INDEX),
            r#"{"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("model-00001-of-00002.safetensors"), "x").unwrap();
        let error = local_files(dir).unwrap_err();
        assert!(
            matches!(&error, ModelError::MissingFile { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
            "{error}"
        );
        std::fs::write(dir.join("model-00002-of-00002.safetensors"), "y").unwrap();
        let files = local_files(dir).unwrap();
        assert_eq!(
            files.weights,
            WeightFiles::Safetensors(vec![
                dir.join("model-00001-of-00002.safetensors"),
                dir.join("model-00002-of-00002.safetensors"),
            ])
        );
    }

    #[test]
    fn a_shard_name_outside_the_checkpoint_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let index = root.path().join(SAFETENSORS_INDEX);
        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "../elsewhere.safetensors"}}"#,
        )
        .unwrap();
        assert!(matches!(
            shard_names(&index),
            Err(ModelError::CorruptWeights { .. })
        ));
    }

    #[test]
    fn pytorch_bin_is_found_when_there_is_no_safetensors() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join(PYTORCH_BIN), "pickle").unwrap();
        assert_eq!(
            local_files(dir).unwrap().weights,
            WeightFiles::PytorchBin(dir.join(PYTORCH_BIN))
        );
    }

    #[test]
    fn support_files_are_configs_tokenizers_and_module_folders() {
        for wanted in [
            "config.json",
            "tokenizer.json",
            "vocab.txt",
            "merges.txt",
            "spiece.model",
            "modules.json",
            "1_Pooling/config.json",
            "2_Dense/pytorch_model.bin",
            "2_Dense/config.json",
        ] {
            assert!(is_support_file(wanted), "{wanted}");
        }
        for unwanted in [
            "pytorch_model.bin",
            "tf_model.h5",
            "onnx/model.onnx",
            "README.md",
            SAFETENSORS_INDEX,
            "flax_model.msgpack",
        ] {
            assert!(!is_support_file(unwanted), "{unwanted}");
        }
    }

    #[test]
    fn snapshot_directory_names_the_commit() {
        let path = Path::new("/cache/models--a--b/snapshots/0123abcd/model.safetensors");
        assert_eq!(snapshot_revision(path).as_deref(), Some("0123abcd"));
        assert_eq!(snapshot_revision(Path::new("/tmp/model.safetensors")), None);
    }
}

fn file_size(path: &Path) -> Result<u64, ModelError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| ModelError::MissingFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Elements of every tensor in one safetensors file, from its header alone.
fn count_parameters(path: &Path) -> Result<u64, ModelError> {
    let corrupt = |reason: String| ModelError::CorruptWeights {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| corrupt(e.to_string()))?;
    // SAFETY: read-only map of an immutable checkpoint, as in `var_builder`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| corrupt(e.to_string()))?;
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
    Ok(metadata
        .tensors()
        .values()
        .map(|info| info.shape.iter().product::<usize>() as u64)
        .sum())
}
