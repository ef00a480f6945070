//! The FuseMoE weights file (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for
//! Fleximodal Fusion") and the version hash.
//!
//! # File format
//!
//! A safetensors file; weights use PyTorch's `[out_features, in_features]` layout, with
//! `in = Σ input_dims` (experts) and `gate_in = in + slots` (the gate also sees the mask):
//!
//! | tensor | shape |
//! |---|---|
//! | `gate.proj.weight` | `[gate_hidden, gate_in]` |
//! | `gate.proj.bias` | `[gate_hidden]` |
//! | `gate.norm.weight`, `gate.norm.bias` | `[gate_hidden]` (LayerNorm) |
//! | `gate.router.weight` | `[num_experts, gate_hidden]` (logit rows, or Laplace centroids) |
//! | `gate.router.bias` | `[num_experts]`, `softmax` gating only |
//! | `experts.{i}.fc1.weight` | `[expert_hidden, in]` |
//! | `experts.{i}.fc1.bias` | `[expert_hidden]` |
//! | `experts.{i}.fc2.weight` | `[output_dim, expert_hidden]` |
//! | `experts.{i}.fc2.bias` | `[output_dim]` |
//!
//! Metadata: `fusemoe.config` holds the [`FuseMoeConfig`] as JSON (required: the file says what
//! it is), `fusemoe.version` the version hash at save time (optional; when present it must
//! match the loaded tensors, which catches truncated or edited files), and `format: pt` for
//! Hugging Face tooling. [`FuseMoe::save`] writes F32; loading also reads BF16 and F16, which
//! are widened to f32.
//!
//! # Version
//!
//! xxh3-128 over a domain tag, the config JSON and, per tensor in the order of the table,
//! its name, shape and the xxh3-128 of its little-endian f32 bytes (the per-tensor digests
//! run in parallel). Hex, 32 characters.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, View};
use xxhash_rust::xxh3::Xxh3;

use crate::config::{FuseMoeConfig, GatingKind};
use crate::error::FusionError;
use crate::expert::ExpertWeights;
use crate::gate::GateWeights;
use crate::model::FuseMoe;

/// Metadata key of the config JSON.
pub const CONFIG_KEY: &str = "fusemoe.config";
/// Metadata key of the version hash.
pub const VERSION_KEY: &str = "fusemoe.version";
/// Domain tag of the version hash; bump it if the hash's definition changes.
const VERSION_DOMAIN: &[u8] = b"embedfleet-fusemoe-v1\0";

/// Every tensor name and shape `cfg` requires, in canonical order.
pub fn tensor_specs(cfg: &FuseMoeConfig) -> Vec<(String, Vec<usize>)> {
    let (gh, e) = (cfg.gate_hidden, cfg.num_experts);
    let mut specs = vec![
        ("gate.proj.weight".into(), vec![gh, cfg.gate_input_dim()]),
        ("gate.proj.bias".into(), vec![gh]),
        ("gate.norm.weight".into(), vec![gh]),
        ("gate.norm.bias".into(), vec![gh]),
        ("gate.router.weight".into(), vec![e, gh]),
    ];
    if cfg.gating == GatingKind::Softmax {
        specs.push(("gate.router.bias".into(), vec![e]));
    }
    for i in 0..e {
        let p = format!("experts.{i}");
        specs.push((
            format!("{p}.fc1.weight"),
            vec![cfg.expert_hidden, cfg.input_dim()],
        ));
        specs.push((format!("{p}.fc1.bias"), vec![cfg.expert_hidden]));
        specs.push((
            format!("{p}.fc2.weight"),
            vec![cfg.output_dim, cfg.expert_hidden],
        ));
        specs.push((format!("{p}.fc2.bias"), vec![cfg.output_dim]));
    }
    specs
}

/// The model's tensors by name, in canonical order (those it has).
fn named_tensors(model: &FuseMoe) -> Vec<(String, &[f32])> {
    let g = &model.gate;
    let mut tensors: Vec<(String, &[f32])> = vec![
        ("gate.proj.weight".into(), &g.proj_weight),
        ("gate.proj.bias".into(), &g.proj_bias),
        ("gate.norm.weight".into(), &g.norm_weight),
        ("gate.norm.bias".into(), &g.norm_bias),
        ("gate.router.weight".into(), &g.router_weight),
    ];
    if let Some(bias) = &g.router_bias {
        tensors.push(("gate.router.bias".into(), bias));
    }
    for (i, x) in model.experts.iter().enumerate() {
        tensors.push((format!("experts.{i}.fc1.weight"), &x.fc1_weight));
        tensors.push((format!("experts.{i}.fc1.bias"), &x.fc1_bias));
        tensors.push((format!("experts.{i}.fc2.weight"), &x.fc2_weight));
        tensors.push((format!("experts.{i}.fc2.bias"), &x.fc2_bias));
    }
    tensors
}

/// Every required tensor present with the right size and finite values, nothing extra.
pub(crate) fn check_tensors(model: &FuseMoe) -> Result<(), FusionError> {
    let tensors: HashMap<String, &[f32]> = named_tensors(model).into_iter().collect();
    let specs = tensor_specs(&model.config);
    for (name, shape) in &specs {
        let data = tensors
            .get(name)
            .ok_or_else(|| FusionError::MissingTensor { name: name.clone() })?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(FusionError::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                got: vec![data.len()],
            });
        }
    }
    if let Some(extra) = tensors.keys().find(|n| !specs.iter().any(|(s, _)| s == *n)) {
        return Err(FusionError::UnexpectedTensor {
            name: extra.clone(),
        });
    }
    let non_finite = specs.par_iter().find_map_any(|(name, _)| {
        tensors[name]
            .iter()
            .position(|v| !v.is_finite())
            .map(|index| FusionError::NonFiniteWeight {
                name: name.clone(),
                index,
            })
    });
    non_finite.map_or(Ok(()), Err)
}

/// See the module docs.
pub(crate) fn version_hash(model: &FuseMoe) -> String {
    let tensors = named_tensors(model);
    let digests: Vec<u128> = tensors
        .par_iter()
        .map(|(_, data)| {
            let mut hasher = Xxh3::new();
            hasher.update(&le_bytes(data));
            hasher.digest128()
        })
        .collect();
    let mut hasher = Xxh3::new();
    hasher.update(VERSION_DOMAIN);
    hasher.update(config_json(&model.config).as_bytes());
    for ((name, data), digest) in tensors.iter().zip(digests) {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(&(data.len() as u64).to_le_bytes());
        hasher.update(&digest.to_le_bytes());
    }
    format!("{:032x}", hasher.digest128())
}

fn config_json(cfg: &FuseMoeConfig) -> String {
    // Serialising a plain struct of numbers, strings and a Vec cannot fail.
    serde_json::to_string(cfg).unwrap_or_default()
}

/// The little-endian bytes of `data`: borrowed on little-endian machines, converted elsewhere.
fn le_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// An f32 tensor borrowed for safetensors; bytes are produced one tensor at a time while
/// writing, so saving never holds a second copy of the whole model.
struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        le_bytes(self.data)
    }
    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
}

pub(crate) fn save(model: &FuseMoe, path: &Path) -> Result<(), FusionError> {
    let shapes: HashMap<String, Vec<usize>> = tensor_specs(&model.config).into_iter().collect();
    let views: Vec<(String, F32View<'_>)> = named_tensors(model)
        .into_iter()
        .map(|(name, data)| {
            let shape = shapes
                .get(&name)
                .cloned()
                .unwrap_or_else(|| vec![data.len()]);
            (name, F32View { shape, data })
        })
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (CONFIG_KEY.to_string(), config_json(&model.config)),
        (VERSION_KEY.to_string(), model.version()),
    ]);
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    safetensors::serialize_to_file(views, Some(metadata), &partial)?;
    std::fs::rename(&partial, path).map_err(|source| FusionError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn load(path: &Path, expected: Option<&FuseMoeConfig>) -> Result<FuseMoe, FusionError> {
    let io_error = |source| FusionError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    // SAFETY: the map is only read, and only while `file` is open in this function; a weights
    // file changed underneath a running load is outside what the fleet does (files are
    // written elsewhere and renamed into place).
    let buffer = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?;

    let (_, header) = SafeTensors::read_metadata(&buffer)?;
    let metadata = header
        .metadata()
        .as_ref()
        .ok_or_else(|| FusionError::Metadata("the file has no metadata".into()))?;
    let json = metadata
        .get(CONFIG_KEY)
        .ok_or_else(|| FusionError::Metadata(format!("no {CONFIG_KEY} entry")))?;
    let cfg: FuseMoeConfig = serde_json::from_str(json)
        .map_err(|e| FusionError::Metadata(format!("{CONFIG_KEY}: {e}")))?;
    cfg.validate()?;
    if let Some(expected) = expected {
        if *expected != cfg {
            return Err(FusionError::ConfigMismatch(describe_difference(
                &cfg, expected,
            )));
        }
    }

    let file_tensors = SafeTensors::deserialize(&buffer)?;
    if let Some(seed) = metadata.get(crate::delta::BASE_SEED_KEY) {
        // A trained delta file: the seeded base layer plus the trained parts (crate::delta).
        let seed: u64 = seed.parse().map_err(|_| {
            FusionError::Metadata(format!("{}: not an integer", crate::delta::BASE_SEED_KEY))
        })?;
        let parts = crate::delta::DeltaParts::read(&cfg, &file_tensors)?;
        let model = parts.materialize(&cfg, seed)?;
        return check_recorded_version(metadata, model);
    }
    let specs = tensor_specs(&cfg);
    if let Some(extra) = file_tensors
        .names()
        .into_iter()
        .find(|n| !specs.iter().any(|(s, _)| s == n))
    {
        return Err(FusionError::UnexpectedTensor {
            name: extra.to_string(),
        });
    }
    // Presence and shapes first, in canonical order, so the error names the first problem;
    // then the (large) conversions in parallel.
    let mut views = Vec::with_capacity(specs.len());
    for (name, shape) in &specs {
        let view = file_tensors
            .tensor(name)
            .map_err(|_| FusionError::MissingTensor { name: name.clone() })?;
        if view.shape() != shape.as_slice() {
            return Err(FusionError::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                got: view.shape().to_vec(),
            });
        }
        views.push((name.clone(), view));
    }
    let mut tensors: HashMap<String, Vec<f32>> = views
        .par_iter()
        .map(|(name, view)| Ok((name.clone(), widen(name, view.dtype(), view.data())?)))
        .collect::<Result<_, FusionError>>()?;

    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| FusionError::MissingTensor { name: name.into() })
    };
    let gate = GateWeights {
        proj_weight: take("gate.proj.weight")?,
        proj_bias: take("gate.proj.bias")?,
        norm_weight: take("gate.norm.weight")?,
        norm_bias: take("gate.norm.bias")?,
        router_weight: take("gate.router.weight")?,
        router_bias: match cfg.gating {
            GatingKind::Softmax => Some(take("gate.router.bias")?),
            GatingKind::Laplace => None,
        },
    };
    let experts = (0..cfg.num_experts)
        .map(|i| {
            Ok(ExpertWeights {
                fc1_weight: take(&format!("experts.{i}.fc1.weight"))?,
                fc1_bias: take(&format!("experts.{i}.fc1.bias"))?,
                fc2_weight: take(&format!("experts.{i}.fc2.weight"))?,
                fc2_bias: take(&format!("experts.{i}.fc2.bias"))?,
            })
        })
        .collect::<Result<Vec<_>, FusionError>>()?;

    let model = FuseMoe::from_parts(cfg, gate, experts)?;
    check_recorded_version(metadata, model)
}

/// The version recorded in the file, when there is one, must be the loaded layer's.
fn check_recorded_version(
    metadata: &HashMap<String, String>,
    model: FuseMoe,
) -> Result<FuseMoe, FusionError> {
    if let Some(recorded) = metadata.get(VERSION_KEY) {
        if *recorded != model.version() {
            return Err(FusionError::Metadata(format!(
                "{VERSION_KEY} is {recorded} but the tensors hash to {}: the file was altered",
                model.version()
            )));
        }
    }
    Ok(model)
}

/// Little-endian F32, BF16 or F16 bytes → f32.
fn widen(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, FusionError> {
    Ok(match dtype {
        Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            // Safetensors data is 8-aligned in a page-aligned map, so this is the usual path.
            Ok(values) if cfg!(target_endian = "little") => values.to_vec(),
            _ => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        },
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(FusionError::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// `field: file X, expected Y` for each differing config field.
fn describe_difference(in_file: &FuseMoeConfig, expected: &FuseMoeConfig) -> String {
    let as_map = |cfg: &FuseMoeConfig| -> BTreeMap<String, serde_json::Value> {
        serde_json::to_value(cfg)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    };
    let (file, want) = (as_map(in_file), as_map(expected));
    let diffs: Vec<String> = want
        .iter()
        .filter(|(key, value)| file.get(*key) != Some(value))
        .map(|(key, value)| {
            let got = file
                .get(key)
                .map_or("absent".to_string(), |v| v.to_string());
            format!("{key}: file {got}, expected {value}")
        })
        .collect();
    diffs.join("; ")
}
