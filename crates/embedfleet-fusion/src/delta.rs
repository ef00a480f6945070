//! Trained FuseMoE weights as a small file: the seeded base layer plus trained low-rank parts.
//!
//! A full layer for minilm + mpnet holds ~90 M parameters (~350 MB f32), far too much to ship
//! in a repository, and training all of it on a few thousand pairs would overfit anyway. So
//! training keeps the deterministic seeded layer ([`crate::init`]) and learns only:
//!
//! - a shared low-rank map `A·B` (`output × rank_shared` and `rank_shared × input`), added to
//!   every expert's linear map `M`: it re-weights and re-orders the output (Matryoshka);
//! - per expert `e`, a low-rank map `U_e·V_e` (`output × rank_expert`, `rank_expert × input`):
//!   what makes experts differ;
//! - a delta on the router's weight and bias (`experts × gate_hidden`, `experts`);
//! - one scale per slot (`slots`): every expert's map reads model `m`'s block of the input
//!   scaled by `1 + scale[m]`. Two numbers, but the lever that matters most: the seeded layer
//!   weighs every model equally (it preserves the normalised concatenation), and a weaker
//!   model at equal weight pulls the fused vector below the better model alone.
//!
//! Every expert starts as `fc1 = [R; −R]`, `fc2 = [S, −S]` with `S·R = M` and `RᵀR = I`
//! (input no wider than `expert_hidden / 2`), so a change `Δ` of the linear map folds exactly
//! into `fc2` as `fc2 += [Δ·Rᵀ, −Δ·Rᵀ]` (up to the 2 % seeded perturbation of `fc1`): the
//! materialised layer is an ordinary [`FuseMoe`], run by the ordinary forward, with its own
//! version hash (so a new training run changes every fused cache key).
//!
//! File: safetensors with the tensors below (F32) and metadata `fusemoe.config`,
//! `fusemoe.base_seed`, `fusemoe.format = delta-v1` and `fusemoe.version` (the version of the
//! materialised layer, checked on load). [`crate::FuseMoe::load`] reads both this and the full
//! format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::config::FuseMoeConfig;
use crate::error::FusionError;
use crate::init::shared_factors;
use crate::linear::linear_forward;
use crate::model::FuseMoe;

/// Metadata key of the base layer's seed; its presence marks a delta file.
pub const BASE_SEED_KEY: &str = "fusemoe.base_seed";
/// Metadata key of the file format.
pub const FORMAT_KEY: &str = "fusemoe.format";
pub const FORMAT_DELTA_V1: &str = "delta-v1";

/// The trained parts (row-major, PyTorch `[out, in]` orientation).
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaParts {
    pub rank_shared: usize,
    pub rank_expert: usize,
    /// `train.shared.a`: `[output_dim, rank_shared]`.
    pub shared_a: Vec<f32>,
    /// `train.shared.b`: `[rank_shared, input_dim]`.
    pub shared_b: Vec<f32>,
    /// `train.experts.u`: `[experts, output_dim, rank_expert]`.
    pub expert_u: Vec<f32>,
    /// `train.experts.v`: `[experts, rank_expert, input_dim]`.
    pub expert_v: Vec<f32>,
    /// `train.router.weight`: `[experts, gate_hidden]`, added to the seeded router.
    pub router_weight: Vec<f32>,
    /// `train.router.bias`: `[experts]` (softmax gating; ignored by Laplace).
    pub router_bias: Vec<f32>,
    /// `train.slots.scale`: `[slots]`; model `m`'s block of the experts' input is scaled by
    /// `1 + slot_scale[m]`.
    pub slot_scale: Vec<f32>,
}

impl DeltaParts {
    /// All-zero parts: materialise to exactly the seeded layer.
    pub fn zeros(cfg: &FuseMoeConfig, rank_shared: usize, rank_expert: usize) -> DeltaParts {
        let (d, o, e) = (cfg.input_dim(), cfg.output_dim, cfg.num_experts);
        DeltaParts {
            rank_shared,
            rank_expert,
            shared_a: vec![0.0; o * rank_shared],
            shared_b: vec![0.0; rank_shared * d],
            expert_u: vec![0.0; e * o * rank_expert],
            expert_v: vec![0.0; e * rank_expert * d],
            router_weight: vec![0.0; e * cfg.gate_hidden],
            router_bias: vec![0.0; e],
            slot_scale: vec![0.0; cfg.num_slots()],
        }
    }

    fn shapes(&self, cfg: &FuseMoeConfig) -> Vec<(&'static str, Vec<usize>, &Vec<f32>)> {
        let (d, o, e) = (cfg.input_dim(), cfg.output_dim, cfg.num_experts);
        vec![
            ("train.shared.a", vec![o, self.rank_shared], &self.shared_a),
            ("train.shared.b", vec![self.rank_shared, d], &self.shared_b),
            (
                "train.experts.u",
                vec![e, o, self.rank_expert],
                &self.expert_u,
            ),
            (
                "train.experts.v",
                vec![e, self.rank_expert, d],
                &self.expert_v,
            ),
            (
                "train.router.weight",
                vec![e, cfg.gate_hidden],
                &self.router_weight,
            ),
            ("train.router.bias", vec![e], &self.router_bias),
            ("train.slots.scale", vec![cfg.num_slots()], &self.slot_scale),
        ]
    }

    /// The seeded layer with these parts folded in.
    pub fn materialize(&self, cfg: &FuseMoeConfig, seed: u64) -> Result<FuseMoe, FusionError> {
        check_foldable(cfg)?;
        let base = FuseMoe::from_seed(cfg.clone(), seed)?;
        self.fold_into(base, seed)
    }

    pub(crate) fn fold_into(&self, base: FuseMoe, seed: u64) -> Result<FuseMoe, FusionError> {
        let cfg = base.config.clone();
        let (d, o, half) = (cfg.input_dim(), cfg.output_dim, cfg.expert_hidden / 2);
        let (r, _) = shared_factors(&cfg, seed);
        let mut gate = base.gate.clone();
        for (w, dw) in gate.router_weight.iter_mut().zip(&self.router_weight) {
            *w += dw;
        }
        if let Some(bias) = gate.router_bias.as_mut() {
            for (b, db) in bias.iter_mut().zip(&self.router_bias) {
                *b += db;
            }
        }
        // ΔS_e = Δ_e·Rᵀ = [A | U_e] · [B·Rᵀ ; V_e·Rᵀ], every product through `linear_forward`,
        // whose summation order is fixed, so the folded weights (and the version) are the same
        // bits on every machine.
        let (rs, re) = (self.rank_shared, self.rank_expert);
        let k = rs + re;
        let mut br = vec![0.0f32; rs * half];
        linear_forward(&self.shared_b, d, rs, &r, None, half, d, &mut br);
        // The slot scales' change of every expert: ΔS = M·D·Rᵀ, D the per-column scale.
        let slot_delta = self.slot_scale.iter().any(|&v| v != 0.0).then(|| {
            let mut md = seeded_map(&cfg, seed).1;
            let scales = self.column_scales(&cfg);
            for row in md.chunks_exact_mut(d) {
                for (v, sc) in row.iter_mut().zip(&scales) {
                    *v *= sc;
                }
            }
            let mut ds = vec![0.0f32; o * half];
            linear_forward(&md, d, o, &r, None, half, d, &mut ds);
            ds
        });
        let experts = base
            .experts
            .iter()
            .enumerate()
            .map(|(e, expert)| {
                let v = &self.expert_v[e * re * d..(e + 1) * re * d];
                let mut vr = vec![0.0f32; re * half];
                linear_forward(v, d, re, &r, None, half, d, &mut vr);
                // Left factor [A | U_e] (output × k) and right factor transposed (half × k).
                let u = &self.expert_u[e * o * re..(e + 1) * o * re];
                let mut left = Vec::with_capacity(o * k);
                for row in 0..o {
                    left.extend_from_slice(&self.shared_a[row * rs..(row + 1) * rs]);
                    left.extend_from_slice(&u[row * re..(row + 1) * re]);
                }
                let mut right = vec![0.0f32; half * k];
                for a in 0..half {
                    for j in 0..rs {
                        right[a * k + j] = br[j * half + a];
                    }
                    for j in 0..re {
                        right[a * k + rs + j] = vr[j * half + a];
                    }
                }
                let mut delta_s = vec![0.0f32; o * half];
                linear_forward(&left, k, o, &right, None, half, k, &mut delta_s);
                if let Some(slot_delta) = &slot_delta {
                    for (v, sd) in delta_s.iter_mut().zip(slot_delta) {
                        *v += sd;
                    }
                }
                let mut expert = expert.clone();
                let hidden = cfg.expert_hidden;
                for (fc2_row, ds_row) in expert
                    .fc2_weight
                    .chunks_exact_mut(hidden)
                    .zip(delta_s.chunks_exact(half))
                {
                    for (a, &ds) in ds_row.iter().enumerate() {
                        fc2_row[a] += ds;
                        fc2_row[half + a] -= ds;
                    }
                }
                expert
            })
            .collect();
        FuseMoe::from_parts(cfg, gate, experts)
    }

    /// `slot_scale` spread over the input's columns (each slot's block gets its value).
    pub(crate) fn column_scales(&self, cfg: &FuseMoeConfig) -> Vec<f32> {
        cfg.input_dims
            .iter()
            .zip(&self.slot_scale)
            .flat_map(|(&width, &scale)| std::iter::repeat_n(scale, width))
            .collect()
    }

    /// Writes the parts and the materialised layer's version.
    pub fn save(
        &self,
        cfg: &FuseMoeConfig,
        seed: u64,
        version: &str,
        path: &Path,
    ) -> Result<(), FusionError> {
        let shapes = self.shapes(cfg);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
            .into_iter()
            .map(|(name, shape, data)| {
                (
                    name.to_string(),
                    shape,
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|view| (name.clone(), view))
                    .map_err(FusionError::from)
            })
            .collect::<Result<_, _>>()?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (FORMAT_KEY.to_string(), FORMAT_DELTA_V1.to_string()),
            (
                crate::weights::CONFIG_KEY.to_string(),
                serde_json::to_string(cfg).unwrap_or_default(),
            ),
            (BASE_SEED_KEY.to_string(), seed.to_string()),
            (crate::weights::VERSION_KEY.to_string(), version.to_string()),
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

    /// Reads the parts of a delta file whose config is `cfg`.
    pub(crate) fn read(
        cfg: &FuseMoeConfig,
        tensors: &SafeTensors<'_>,
    ) -> Result<DeltaParts, FusionError> {
        let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>), FusionError> {
            let view = tensors
                .tensor(name)
                .map_err(|_| FusionError::MissingTensor { name: name.into() })?;
            if view.dtype() != Dtype::F32 {
                return Err(FusionError::UnsupportedDtype {
                    name: name.into(),
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(FusionError::NonFiniteWeight {
                    name: name.into(),
                    index,
                });
            }
            Ok((view.shape().to_vec(), values))
        };
        let (a_shape, shared_a) = tensor("train.shared.a")?;
        let (v_shape, expert_v) = tensor("train.experts.v")?;
        let rank_shared = a_shape.get(1).copied().unwrap_or(0);
        let rank_expert = v_shape.get(1).copied().unwrap_or(0);
        let mut parts = DeltaParts {
            rank_shared,
            rank_expert,
            shared_a,
            shared_b: tensor("train.shared.b")?.1,
            expert_u: tensor("train.experts.u")?.1,
            expert_v,
            router_weight: tensor("train.router.weight")?.1,
            router_bias: tensor("train.router.bias")?.1,
            slot_scale: tensor("train.slots.scale")?.1,
        };
        // Shapes against the config (re-read so the error names the tensor).
        for (name, shape, data) in parts.shapes(cfg) {
            let got = tensor(name)?.0;
            if got != shape || data.len() != shape.iter().product::<usize>() {
                return Err(FusionError::ShapeMismatch {
                    name: name.into(),
                    expected: shape,
                    got,
                });
            }
        }
        if let Some(extra) = tensors
            .names()
            .into_iter()
            .find(|n| !parts.shapes(cfg).iter().any(|(s, _, _)| s == n))
        {
            return Err(FusionError::UnexpectedTensor {
                name: extra.to_string(),
            });
        }
        parts.router_bias.truncate(cfg.num_experts);
        Ok(parts)
    }
}

/// The seeded factor `R` (`half × input`) and the shared map `M = S·R` (`output × input`),
/// computed with `linear_forward`'s fixed summation order (the same bits on every machine).
pub(crate) fn seeded_map(cfg: &FuseMoeConfig, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (d, o, half) = (cfg.input_dim(), cfg.output_dim, cfg.expert_hidden / 2);
    let (r, s) = shared_factors(cfg, seed);
    // linear_forward wants Rᵀ as the weight.
    let mut r_t = vec![0.0f32; d * half];
    for a in 0..half {
        for j in 0..d {
            r_t[j * half + a] = r[a * d + j];
        }
    }
    let mut m = vec![0.0f32; o * d];
    linear_forward(&s, half, o, &r_t, None, d, half, &mut m);
    (r, m)
}

/// Training folds into `fc2` through `Rᵀ`, which needs `R` to have orthonormal columns: true
/// when the input is no wider than half the expert's hidden width (minilm + mpnet: 1,152 ≤
/// 2,048). Wider sets (all twelve models) are not trainable this way yet.
pub fn check_foldable(cfg: &FuseMoeConfig) -> Result<(), FusionError> {
    if cfg.input_dim() > cfg.expert_hidden / 2 {
        return Err(FusionError::invalid(
            "input_dims",
            format!(
                "training needs input width ≤ expert_hidden / 2 ({} > {})",
                cfg.input_dim(),
                cfg.expert_hidden / 2
            ),
        ));
    }
    Ok(())
}
