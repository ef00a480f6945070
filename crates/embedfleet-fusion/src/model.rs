//! [`FuseMoe`]: a loaded or seeded FuseMoE layer (Han et al., 2024, "FuseMoE:
//! Mixture-of-Experts Transformers for Fleximodal Fusion"), its config and its version.
//!
//! Every way in (seed, file) ends in [`FuseMoe::from_parts`], which checks each tensor against
//! the config and computes the version hash once, so a `FuseMoe` that exists is consistent.

use std::path::Path;

use crate::config::FuseMoeConfig;
use crate::error::FusionError;
use crate::expert::ExpertWeights;
use crate::gate::GateWeights;
use crate::init::{initialize, InitOptions};
use crate::weights;

/// A FuseMoE layer ready to fuse on the CPU (see [`FuseMoe::fuse`]) or to upload to a GPU.
#[derive(Clone)]
pub struct FuseMoe {
    pub(crate) config: FuseMoeConfig,
    pub(crate) gate: GateWeights,
    pub(crate) experts: Vec<ExpertWeights>,
    /// Hex xxh3-128 of the config and every tensor; see [`FuseMoe::version`].
    version: String,
}

/// Config and version only: the tensors run to gigabytes.
impl std::fmt::Debug for FuseMoe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMoe")
            .field("config", &self.config)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl FuseMoe {
    /// The deterministic, distance-preserving initialisation (see [`crate::init`]): the same
    /// `cfg` and `seed` give the same weights, and the same version, on every machine.
    pub fn from_seed(cfg: FuseMoeConfig, seed: u64) -> Result<FuseMoe, FusionError> {
        FuseMoe::from_seed_with(cfg, seed, &InitOptions::default())
    }

    /// [`FuseMoe::from_seed`] with explicit initialisation settings.
    pub fn from_seed_with(
        cfg: FuseMoeConfig,
        seed: u64,
        options: &InitOptions,
    ) -> Result<FuseMoe, FusionError> {
        cfg.validate()?;
        if !(options.expert_perturbation.is_finite() && options.expert_perturbation >= 0.0) {
            return Err(FusionError::invalid(
                "expert_perturbation",
                "must be a non-negative finite number",
            ));
        }
        let (gate, experts) = initialize(&cfg, seed, options);
        FuseMoe::from_parts(cfg, gate, experts)
    }

    /// Loads a weights file written by [`FuseMoe::save`] (or by a training run that follows the
    /// tensor names in [`crate::weights`]); the config comes from the file's metadata.
    pub fn load(path: &Path) -> Result<FuseMoe, FusionError> {
        weights::load(path, None)
    }

    /// Loads a weights file and requires its config to equal `expected`
    /// ([`FusionError::ConfigMismatch`] otherwise), e.g. when the active model set is fixed.
    pub fn load_expecting(path: &Path, expected: &FuseMoeConfig) -> Result<FuseMoe, FusionError> {
        weights::load(path, Some(expected))
    }

    /// Writes the layer as safetensors (f32), config and version in the metadata. The file is
    /// written next to `path` and renamed into place, so readers never see half a file.
    pub fn save(&self, path: &Path) -> Result<(), FusionError> {
        weights::save(self, path)
    }

    /// The layer's config.
    pub fn config(&self) -> &FuseMoeConfig {
        &self.config
    }

    /// A stable hash (hex xxh3-128) of the config and every tensor's name, shape and f32
    /// values: equal versions mean equal outputs, so it belongs in the fused-result cache key.
    pub fn version(&self) -> String {
        self.version.clone()
    }

    /// Bytes of one expert's weights and biases (all experts have the same shape): the memory
    /// one expert's batch-1 forward streams.
    pub fn expert_bytes(&self) -> usize {
        self.experts.first().map_or(0, ExpertWeights::num_bytes)
    }

    /// Bytes of the gate's weights and biases.
    pub fn gate_bytes(&self) -> usize {
        let g = &self.gate;
        4 * (g.proj_weight.len()
            + g.proj_bias.len()
            + g.norm_weight.len()
            + g.norm_bias.len()
            + g.router_weight.len()
            + g.router_bias.as_ref().map_or(0, Vec::len))
    }

    /// The same layer with the large matrices (gate projection, expert fc1/fc2 weights)
    /// rounded to bf16 (nearest even) and widened back; biases, norms and the router stay f32.
    /// That is what a bf16 deployment (the GPU path's `WeightPrecision::Bf16`) computes with,
    /// so it is the CPU reference for it. It has its own version.
    pub fn to_bf16_precision(&self) -> Result<FuseMoe, FusionError> {
        let round = |values: &[f32]| -> Vec<f32> {
            values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        let g = &self.gate;
        let gate = GateWeights {
            proj_weight: round(&g.proj_weight),
            ..g.clone()
        };
        let experts = self
            .experts
            .iter()
            .map(|x| ExpertWeights {
                fc1_weight: round(&x.fc1_weight),
                fc2_weight: round(&x.fc2_weight),
                ..x.clone()
            })
            .collect();
        FuseMoe::from_parts(self.config.clone(), gate, experts)
    }

    /// Checks shapes and values against `config` and computes the version.
    pub(crate) fn from_parts(
        config: FuseMoeConfig,
        gate: GateWeights,
        experts: Vec<ExpertWeights>,
    ) -> Result<FuseMoe, FusionError> {
        config.validate()?;
        let mut model = FuseMoe {
            config,
            gate,
            experts,
            version: String::new(),
        };
        weights::check_tensors(&model)?;
        model.version = weights::version_hash(&model);
        Ok(model)
    }
}
