//! The FuseMoE gate (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for
//! Fleximodal Fusion"): `[x ; mask]` → linear projection → LayerNorm → GELU → router →
//! top-k experts with weights that sum to 1.
//!
//! Two routers: `softmax` (a linear layer gives logits) and the paper's `laplace` (logit `i` is
//! `−‖h − w_i‖₂`). Either way the chosen k logits, divided by the temperature, go through a
//! softmax; the full softmax over all experts is kept too, for the load-balance loss.
//! Transcendentals come from `libm` (pure Rust), so routing is the same on every platform.

use crate::config::{FuseMoeConfig, GatingKind};
use crate::linear::linear_forward;

/// Gate parameters, PyTorch layout (`[out, in]` weights).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GateWeights {
    /// `gate.proj.weight`: `[gate_hidden, input_dim + slots]`.
    pub proj_weight: Vec<f32>,
    /// `gate.proj.bias`: `[gate_hidden]`.
    pub proj_bias: Vec<f32>,
    /// `gate.norm.weight`: `[gate_hidden]`.
    pub norm_weight: Vec<f32>,
    /// `gate.norm.bias`: `[gate_hidden]`.
    pub norm_bias: Vec<f32>,
    /// `gate.router.weight`: `[experts, gate_hidden]`; logit rows for `softmax`, expert
    /// centroids for `laplace`.
    pub router_weight: Vec<f32>,
    /// `gate.router.bias`: `[experts]`, `softmax` only (a distance has no bias).
    pub router_bias: Option<Vec<f32>>,
}

/// Where one row goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Chosen experts, highest weight first (ties: lower index first).
    pub selected: Vec<usize>,
    /// Weight of each chosen expert, same order; they sum to 1.
    pub weights: Vec<f32>,
    /// Softmax over all experts' logits (temperature applied), for the load-balance loss.
    pub probabilities: Vec<f32>,
}

/// Exact (erf) GELU, as PyTorch's default `nn.GELU()`.
#[inline]
pub(crate) fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2))
}

/// Routes `rows` assembled rows (`gate_inputs`, each `cfg.gate_input_dim()` wide).
pub(crate) fn route(
    cfg: &FuseMoeConfig,
    gate: &GateWeights,
    gate_inputs: &[f32],
    rows: usize,
) -> Vec<Routing> {
    let hidden = gate_hidden(cfg, gate, gate_inputs, rows);
    let logits = router_logits(cfg, gate, &hidden, rows);
    logits
        .chunks_exact(cfg.num_experts)
        .map(|row_logits| top_k(row_logits, cfg.top_k, cfg.temperature))
        .collect()
}

/// The gate's hidden state (projection → LayerNorm → GELU) of `rows` assembled rows: the
/// router's input, which training keeps fixed and reads once.
pub(crate) fn gate_hidden(
    cfg: &FuseMoeConfig,
    gate: &GateWeights,
    gate_inputs: &[f32],
    rows: usize,
) -> Vec<f32> {
    let in_dim = cfg.gate_input_dim();
    let hidden_dim = cfg.gate_hidden;
    let mut hidden = vec![0.0f32; rows * hidden_dim];
    linear_forward(
        gate_inputs,
        in_dim,
        rows,
        &gate.proj_weight,
        Some(&gate.proj_bias),
        hidden_dim,
        in_dim,
        &mut hidden,
    );
    for h in hidden.chunks_exact_mut(hidden_dim) {
        layer_norm_gelu(h, &gate.norm_weight, &gate.norm_bias, cfg.layer_norm_eps);
    }
    hidden
}

/// LayerNorm (statistics in f64, in index order) followed by GELU, in place.
fn layer_norm_gelu(h: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = h.len() as f64;
    let mean = h.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = h.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv_std = 1.0 / (var + eps as f64).sqrt();
    for ((v, &w), &b) in h.iter_mut().zip(weight).zip(bias) {
        let normed = ((*v as f64 - mean) * inv_std) as f32;
        *v = gelu(normed * w + b);
    }
}

/// One logit per expert per row.
fn router_logits(cfg: &FuseMoeConfig, gate: &GateWeights, hidden: &[f32], rows: usize) -> Vec<f32> {
    let experts = cfg.num_experts;
    let hidden_dim = cfg.gate_hidden;
    let mut logits = vec![0.0f32; rows * experts];
    match cfg.gating {
        GatingKind::Softmax => linear_forward(
            hidden,
            hidden_dim,
            rows,
            &gate.router_weight,
            gate.router_bias.as_deref(),
            experts,
            hidden_dim,
            &mut logits,
        ),
        GatingKind::Laplace => {
            for (h, row_logits) in hidden
                .chunks_exact(hidden_dim)
                .zip(logits.chunks_exact_mut(experts))
            {
                for (logit, centroid) in row_logits
                    .iter_mut()
                    .zip(gate.router_weight.chunks_exact(hidden_dim))
                {
                    let squared: f64 = h
                        .iter()
                        .zip(centroid)
                        .map(|(&a, &b)| {
                            let d = a as f64 - b as f64;
                            d * d
                        })
                        .sum();
                    *logit = -(squared.sqrt() as f32);
                }
            }
        }
    }
    logits
}

/// Picks the `k` largest logits and softmaxes them (and all logits) at `temperature`.
pub(crate) fn top_k(logits: &[f32], k: usize, temperature: f32) -> Routing {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Descending logit, then ascending index: a total order, so ties route the same way
    // everywhere.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(k);
    let weights = softmax(order.iter().map(|&e| logits[e]), temperature);
    let probabilities = softmax(logits.iter().copied(), temperature);
    Routing {
        selected: order,
        weights,
        probabilities,
    }
}

fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .map(|l| libm::exp(((l - max) / temperature) as f64))
        .collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / total) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_odd_up_to_the_identity() {
        // gelu(z) − gelu(−z) = z is what makes the upcycled experts linear at init.
        for z in [-3.0f32, -0.7, 0.0, 0.01, 1.5, 4.0] {
            assert!((gelu(z) - gelu(-z) - z).abs() < 1e-6, "{z}");
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_by_logit_and_weights_sum_to_one() {
        let r = top_k(&[0.1, 2.0, -1.0, 2.0, 1.0], 3, 1.0);
        assert_eq!(r.selected, vec![1, 3, 4]);
        let sum: f32 = r.weights.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert_eq!(r.weights[0], r.weights[1]);
        assert!(r.weights[2] < r.weights[0]);
        assert_eq!(r.probabilities.len(), 5);
        assert!((r.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn lower_temperature_sharpens_the_weights() {
        let warm = top_k(&[1.0, 0.0], 2, 2.0);
        let cold = top_k(&[1.0, 0.0], 2, 0.5);
        assert!(cold.weights[0] > warm.weights[0]);
        let e = std::f32::consts::E;
        assert!((cold.weights[0] - e * e / (e * e + 1.0)).abs() < 1e-6);
    }
}
