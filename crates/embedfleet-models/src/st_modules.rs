//! The sentence-transformers module folders of a checkpoint: what `modules.json` says happens
//! after the transformer (pooling, `Dense` heads, `Normalize`), read in both the classic schema
//! (`sentence_transformers.models.Pooling`, `pooling_mode_mean_tokens: true`) and the newer one
//! that sentence-transformers 5+ writes (`sentence_transformers.base.modules.dense.Dense`,
//! `pooling_mode: "mean"`).
//!
//! Only what the catalogue's T5 checkpoints use is implemented: mean pooling, `Dense` heads with
//! `Identity` or `Tanh`, `Normalize`. Anything else is refused at load with an error naming the
//! file, so a checkpoint is never embedded with a step silently skipped.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ModelError;
use crate::resolve::ModelFiles;

/// Activation after a `Dense` head's linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseActivation {
    Identity,
    Tanh,
}

/// One `Dense` module: `activation(x · Wᵀ + b)`.
pub struct DenseHead {
    pub in_features: usize,
    pub out_features: usize,
    pub activation: DenseActivation,
    linear: Linear,
}

impl DenseHead {
    /// `[rows, in_features]` to `[rows, out_features]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.linear.forward(x)?;
        match self.activation {
            DenseActivation::Identity => Ok(y),
            DenseActivation::Tanh => y.tanh(),
        }
    }
}

/// The steps after the transformer, in `modules.json` order.
pub struct SentenceModules {
    /// `max_seq_length` from `sentence_bert_config.json`, when the checkpoint sets one.
    pub max_seq_length: Option<usize>,
    /// The `Dense` heads, applied to the pooled vector in order.
    pub dense: Vec<DenseHead>,
    /// Whether the pipeline ends in `Normalize` (the upstream recipe's own normalisation).
    pub normalize: bool,
}

impl SentenceModules {
    /// Width after the last head, given the transformer's width.
    pub fn output_width(&self, hidden: usize) -> usize {
        self.dense.last().map_or(hidden, |head| head.out_features)
    }

    /// Applies the `Dense` heads to pooled `[rows, hidden]` vectors.
    pub fn project(&self, pooled: &Tensor) -> candle_core::Result<Tensor> {
        self.dense
            .iter()
            .try_fold(pooled.clone(), |x, head| head.forward(&x))
    }

    /// Reads `modules.json` and the module folders it names. `hidden` is the transformer's width,
    /// which the pooling and the first head must agree with.
    pub fn load(files: &ModelFiles, hidden: usize, device: &Device) -> Result<Self, ModelError> {
        let modules_path = files.require(
            "modules.json",
            "the sentence-transformers pipeline: pooling and Dense head",
        )?;
        let entries: Vec<ModuleEntry> = read_json(&modules_path)?;
        let mut modules = SentenceModules {
            max_seq_length: None,
            dense: Vec::new(),
            normalize: false,
        };
        let mut pooled = false;
        let mut width = hidden;
        for entry in entries {
            let bad = |reason: String| ModelError::BadConfig {
                path: modules_path.clone(),
                reason,
            };
            if entry.path.contains("..") || entry.path.starts_with('/') {
                return Err(bad(format!(
                    "module path {:?} leaves the checkpoint",
                    entry.path
                )));
            }
            match entry.kind() {
                "Transformer" => {
                    if !entry.path.is_empty() {
                        return Err(bad(format!(
                            "the transformer is expected at the checkpoint root, not {:?}",
                            entry.path
                        )));
                    }
                    modules.max_seq_length = transformer_max_length(files)?;
                }
                "Pooling" => {
                    let config = files.require(
                        &format!("{}/config.json", entry.path),
                        "the pooling settings named by modules.json",
                    )?;
                    check_mean_pooling(&config, width)?;
                    pooled = true;
                }
                "Dense" => {
                    if !pooled {
                        return Err(bad("a Dense module before the pooling".into()));
                    }
                    let head = load_dense(files, &entry.path, width, device)?;
                    width = head.out_features;
                    modules.dense.push(head);
                }
                "Normalize" => modules.normalize = true,
                other => {
                    return Err(bad(format!(
                        "module type `{other}` ({}) is not supported",
                        entry.module_type
                    )))
                }
            }
        }
        if !pooled {
            return Err(ModelError::BadConfig {
                path: modules_path,
                reason: "no Pooling module".into(),
            });
        }
        Ok(modules)
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    module_type: String,
}

impl ModuleEntry {
    /// The class name, whichever module path the schema uses for it.
    fn kind(&self) -> &str {
        self.module_type.rsplit('.').next().unwrap_or_default()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let bad = |reason: String| ModelError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// `max_seq_length` of `sentence_bert_config.json` (classic); newer saves keep the limit in the
/// tokenizer config instead and leave it out here.
fn transformer_max_length(files: &ModelFiles) -> Result<Option<usize>, ModelError> {
    let Some(path) = files.file("sentence_bert_config.json") else {
        return Ok(None);
    };
    let config: Value = read_json(&path)?;
    Ok(config
        .get("max_seq_length")
        .and_then(Value::as_u64)
        .map(|n| n as usize))
}

/// Accepts mean pooling in either schema and nothing else.
fn check_mean_pooling(path: &Path, hidden: usize) -> Result<(), ModelError> {
    let bad = |reason: String| ModelError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let config: Value = read_json(path)?;
    let width = config
        .get("embedding_dimension")
        .or_else(|| config.get("word_embedding_dimension"))
        .and_then(Value::as_u64);
    if let Some(width) = width.filter(|&w| w as usize != hidden) {
        return Err(bad(format!(
            "pooling is for width {width}, the transformer's is {hidden}"
        )));
    }
    let modes: Vec<String> = match config.get("pooling_mode") {
        Some(Value::String(mode)) => vec![mode.clone()],
        Some(Value::Array(modes)) => modes
            .iter()
            .map(|m| m.as_str().unwrap_or("?").to_string())
            .collect(),
        Some(other) => return Err(bad(format!("pooling_mode {other} is not a mode name"))),
        None => {
            // Classic schema: one boolean per mode; none set means mean (as sentence-transformers
            // reads it).
            let set: Vec<String> = config
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, value)| {
                    key.starts_with("pooling_mode_") && value == &&Value::Bool(true)
                })
                .map(|(key, _)| key.trim_start_matches("pooling_mode_").to_string())
                .collect();
            if set.is_empty() {
                vec!["mean_tokens".into()]
            } else {
                set
            }
        }
    };
    match modes.as_slice() {
        [mode] if mode == "mean" || mode == "mean_tokens" => Ok(()),
        _ => Err(bad(format!(
            "pooling {modes:?} is not supported for this model (only mean)"
        ))),
    }
}

#[derive(Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    #[serde(default = "default_true")]
    bias: bool,
    /// sentence-transformers' default when the key is absent is Tanh.
    #[serde(default)]
    activation_function: Option<String>,
    #[serde(default)]
    use_residual: bool,
    #[serde(default)]
    module_input_name: Option<String>,
}

fn default_true() -> bool {
    true
}

fn load_dense(
    files: &ModelFiles,
    folder: &str,
    width: usize,
    device: &Device,
) -> Result<DenseHead, ModelError> {
    let config_path = files.require(
        &format!("{folder}/config.json"),
        "the Dense head named by modules.json",
    )?;
    let bad = |reason: String| ModelError::BadConfig {
        path: config_path.clone(),
        reason,
    };
    let config: DenseConfig = read_json(&config_path)?;
    if config.in_features != width {
        return Err(bad(format!(
            "in_features {} does not match the {width}-wide input it gets",
            config.in_features
        )));
    }
    if config.use_residual {
        return Err(bad("use_residual is not supported".into()));
    }
    if let Some(name) = config
        .module_input_name
        .filter(|name| name != "sentence_embedding")
    {
        return Err(bad(format!(
            "module_input_name `{name}` is not supported (only sentence_embedding)"
        )));
    }
    let activation = match config.activation_function.as_deref() {
        None => DenseActivation::Tanh,
        Some(name) if name.ends_with(".Identity") => DenseActivation::Identity,
        Some(name) if name.ends_with(".Tanh") => DenseActivation::Tanh,
        Some(other) => {
            return Err(bad(format!(
                "activation_function `{other}` is not supported"
            )))
        }
    };
    let weights = dense_weights(files, folder)?;
    let corrupt = |e: candle_core::Error| ModelError::CorruptWeights {
        path: weights.clone(),
        reason: e.to_string(),
    };
    let vb = if weights.extension().is_some_and(|e| e == "safetensors") {
        // SAFETY: read-only map of an immutable checkpoint file, as for the model's own weights.
        unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
    } else {
        VarBuilder::from_pth(&weights, DType::F32, device)
    }
    .map_err(corrupt)?;
    let shape = (config.out_features, config.in_features);
    let weight = vb.get(shape, "linear.weight").map_err(corrupt)?;
    let bias = if config.bias {
        Some(
            vb.get(config.out_features, "linear.bias")
                .map_err(corrupt)?,
        )
    } else {
        None
    };
    Ok(DenseHead {
        in_features: config.in_features,
        out_features: config.out_features,
        activation,
        linear: Linear::new(weight, bias),
    })
}

/// The head's weights file: `model.safetensors` (newer saves) or `pytorch_model.bin` (classic).
fn dense_weights(files: &ModelFiles, folder: &str) -> Result<PathBuf, ModelError> {
    let safetensors = format!("{folder}/model.safetensors");
    files
        .file(&safetensors)
        .or_else(|| files.file(&format!("{folder}/pytorch_model.bin")))
        .ok_or_else(|| ModelError::MissingFile {
            path: files.dir.join(&safetensors),
            reason: "missing from the checkpoint: the Dense head's weights \
                     (looked for model.safetensors and pytorch_model.bin)"
                .into(),
        })
}
