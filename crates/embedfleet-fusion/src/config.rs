//! [`FuseMoeConfig`]: the shape and routing settings of a FuseMoE layer (Han et al., 2024,
//! "FuseMoE: Mixture-of-Experts Transformers for Fleximodal Fusion").
//!
//! The config travels inside every weights file (safetensors metadata) and is part of the
//! version hash, so two nodes that agree on the config and the seed agree on every output bit.

use serde::{Deserialize, Serialize};

use crate::error::FusionError;

/// How the gate turns its hidden state into expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GatingKind {
    /// The specification's router: a linear layer gives one logit per expert; the top-k
    /// logits, divided by the temperature, go through a softmax.
    #[default]
    Softmax,
    /// The FuseMoE paper's Laplace gate: the logit of expert `i` is `−‖h − w_i‖₂`, the distance
    /// of the gate's hidden state to that expert's centroid; top-k, then a softmax over the
    /// chosen k (divided by the temperature). The paper reports it routes more stably than
    /// dot-product gates when modalities are missing.
    Laplace,
}

/// Shape and routing settings of a FuseMoE layer. Every field has the specification's default;
/// only `input_dims` depends on the deployment (which models are active).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseMoeConfig {
    /// Width of each active model's partial vector, one slot per model in catalogue order. The
    /// experts' input width is their sum (13,184 for all 12 models); it is computed from the
    /// active set, never taken from a constant.
    pub input_dims: Vec<usize>,
    /// Number of experts.
    pub num_experts: usize,
    /// Experts run per input; their gate weights are renormalised to sum to 1.
    pub top_k: usize,
    /// Width of the fused embedding.
    pub output_dim: usize,
    /// Hidden width of each expert MLP (fc1 → GELU → fc2).
    pub expert_hidden: usize,
    /// Width of the gate's projection (followed by LayerNorm and GELU). The gate sees the
    /// assembled input plus one presence-mask entry per slot.
    pub gate_hidden: usize,
    /// Which router turns the gate's hidden state into expert scores.
    pub gating: GatingKind,
    /// Softmax temperature over the chosen experts' logits; lower is sharper.
    pub temperature: f32,
    /// Standard deviation of the Gaussian noise added to router logits while training, to
    /// spread load across experts early on. Inference never adds it, so fused vectors stay
    /// deterministic; it is kept here so a training run and its weights file agree on it.
    pub gating_noise_std: f32,
    /// Capacity per expert in a batch, as a multiple of the fair share `rows × top_k /
    /// experts`. Only used when `enforce_capacity` is set.
    pub capacity_factor: f32,
    /// Whether batch forward drops routes beyond an expert's capacity. Off by default: with
    /// capacity limits a row's result depends on its batch-mates, which a content-keyed cache
    /// cannot tolerate; training sets it to mimic the paper's load control.
    pub enforce_capacity: bool,
    /// Weight of the load-balance auxiliary loss in training.
    pub load_balance_coef: f32,
    /// Epsilon of the gate's LayerNorm.
    pub layer_norm_eps: f32,
}

impl Default for FuseMoeConfig {
    fn default() -> Self {
        FuseMoeConfig {
            input_dims: Vec::new(),
            num_experts: 8,
            top_k: 2,
            output_dim: 1536,
            expert_hidden: 4096,
            gate_hidden: 2048,
            gating: GatingKind::Softmax,
            temperature: 1.0,
            gating_noise_std: 1.0,
            capacity_factor: 1.25,
            enforce_capacity: false,
            load_balance_coef: 0.01,
            layer_norm_eps: 1e-5,
        }
    }
}

impl FuseMoeConfig {
    /// The specification's defaults for the given active model widths (catalogue order).
    pub fn for_input_dims(input_dims: impl Into<Vec<usize>>) -> Self {
        FuseMoeConfig {
            input_dims: input_dims.into(),
            ..Default::default()
        }
    }

    /// Number of partial slots (active models).
    pub fn num_slots(&self) -> usize {
        self.input_dims.len()
    }

    /// Width of the experts' input: the sum of the active models' widths.
    pub fn input_dim(&self) -> usize {
        self.input_dims.iter().sum()
    }

    /// Width of the gate's input: the experts' input plus one presence-mask entry per slot.
    pub fn gate_input_dim(&self) -> usize {
        self.input_dim() + self.num_slots()
    }

    /// Offset of each slot in the assembled input row.
    pub fn slot_offsets(&self) -> Vec<usize> {
        let mut offsets = Vec::with_capacity(self.input_dims.len());
        let mut at = 0;
        for &dim in &self.input_dims {
            offsets.push(at);
            at += dim;
        }
        offsets
    }

    /// Checks every field; a layer is only ever built from a validated config.
    pub fn validate(&self) -> Result<(), FusionError> {
        if self.input_dims.is_empty() {
            return Err(FusionError::invalid(
                "input_dims",
                "at least one slot is needed",
            ));
        }
        if let Some(slot) = self.input_dims.iter().position(|&d| d == 0) {
            return Err(FusionError::invalid(
                "input_dims",
                format!("slot {slot} has width 0"),
            ));
        }
        for (field, value) in [
            ("num_experts", self.num_experts),
            ("output_dim", self.output_dim),
            ("expert_hidden", self.expert_hidden),
            ("gate_hidden", self.gate_hidden),
        ] {
            if value == 0 {
                return Err(FusionError::invalid(field, "must be at least 1"));
            }
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return Err(FusionError::invalid(
                "top_k",
                format!(
                    "must be in 1..={} (num_experts), got {}",
                    self.num_experts, self.top_k
                ),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(FusionError::invalid(
                "temperature",
                format!("must be a positive finite number, got {}", self.temperature),
            ));
        }
        if !(self.gating_noise_std.is_finite() && self.gating_noise_std >= 0.0) {
            return Err(FusionError::invalid(
                "gating_noise_std",
                "must be a non-negative finite number",
            ));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(FusionError::invalid(
                "capacity_factor",
                "must be a positive finite number",
            ));
        }
        if !(self.load_balance_coef.is_finite() && self.load_balance_coef >= 0.0) {
            return Err(FusionError::invalid(
                "load_balance_coef",
                "must be a non-negative finite number",
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(FusionError::invalid(
                "layer_norm_eps",
                "must be a positive finite number",
            ));
        }
        Ok(())
    }

    /// Most routes one expert takes from a batch of `rows` rows under capacity limiting:
    /// `ceil(capacity_factor × rows × top_k / num_experts)`, and at least 1.
    pub fn expert_capacity(&self, rows: usize) -> usize {
        let fair_share = (rows * self.top_k) as f64 / self.num_experts as f64;
        ((self.capacity_factor as f64 * fair_share).ceil() as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let cfg = FuseMoeConfig::for_input_dims(vec![384, 768]);
        assert_eq!(cfg.num_experts, 8);
        assert_eq!(cfg.top_k, 2);
        assert_eq!(cfg.output_dim, 1536);
        assert_eq!(cfg.expert_hidden, 4096);
        assert_eq!(cfg.gate_hidden, 2048);
        assert_eq!(cfg.input_dim(), 1152);
        assert_eq!(cfg.gate_input_dim(), 1154);
        assert_eq!(cfg.slot_offsets(), vec![0, 384]);
        cfg.validate().unwrap();
    }

    #[test]
    fn top_k_out_of_range_is_a_typed_error() {
        for top_k in [0, 9] {
            let cfg = FuseMoeConfig {
                top_k,
                ..FuseMoeConfig::for_input_dims(vec![4])
            };
            match cfg.validate() {
                Err(FusionError::InvalidConfig { field: "top_k", .. }) => {}
                other => panic!("top_k {top_k}: expected InvalidConfig(top_k), got {other:?}"),
            }
        }
    }

    #[test]
    fn zero_widths_and_bad_temperature_are_rejected() {
        assert!(FuseMoeConfig::for_input_dims(vec![]).validate().is_err());
        assert!(FuseMoeConfig::for_input_dims(vec![4, 0])
            .validate()
            .is_err());
        let cfg = FuseMoeConfig {
            temperature: 0.0,
            ..FuseMoeConfig::for_input_dims(vec![4])
        };
        assert!(matches!(
            cfg.validate(),
            Err(FusionError::InvalidConfig {
                field: "temperature",
                ..
            })
        ));
    }

    #[test]
    fn config_round_trips_through_json_and_rejects_unknown_fields() {
        let cfg = FuseMoeConfig {
            gating: GatingKind::Laplace,
            ..FuseMoeConfig::for_input_dims(vec![384, 768])
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"gating\":\"laplace\""));
        let back: FuseMoeConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<FuseMoeConfig>(r#"{"experts": 8}"#).is_err());
    }

    #[test]
    fn capacity_is_the_ceiled_fair_share() {
        let cfg = FuseMoeConfig::for_input_dims(vec![4]);
        // 32 rows × 2 routes / 8 experts = 8, × 1.25 = 10.
        assert_eq!(cfg.expert_capacity(32), 10);
        assert_eq!(cfg.expert_capacity(1), 1);
    }
}
