//! The CPU forward of FuseMoE (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for
//! Fleximodal Fusion"): assemble → gate → top-k → only the chosen experts → weighted sum →
//! L2-normalise; plus the load-balance loss for training.
//!
//! A batch is grouped by expert: the rows routed to one expert are gathered and run as one
//! matrix product per layer, so each expert's weights stream from memory once per batch.
//! [`FuseMoe::fuse`] is a batch of one, and the kernels give every row the same bits whatever
//! batch it is in (see [`crate::linear`]), so single and batch calls agree exactly.

use crate::config::FuseMoeConfig;
use crate::error::FusionError;
use crate::gate::{route, Routing};
use crate::model::FuseMoe;

/// One fused embedding and how it was routed (the wire reply's `experts`).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedEmbedding {
    /// The fused vector, `output_dim` wide, unit L2 norm.
    pub embedding: Vec<f32>,
    /// Gate weight of every expert; zero for experts that did not run. Sums to 1.
    pub expert_weights: Vec<f32>,
    /// The experts that ran, highest weight first.
    pub selected: Vec<usize>,
}

impl FuseMoe {
    /// Fuses one input's partials: one slot per active model in catalogue order, `None` for a
    /// model that does not take the input's modality.
    pub fn fuse(&self, partials: &[Option<&[f32]>]) -> Result<FusedEmbedding, FusionError> {
        let mut fused = self.fuse_rows(&[partials])?;
        fused.pop().ok_or(FusionError::NoPartials)
    }

    /// Fuses many inputs at once, grouping rows by expert. A bad row fails the batch with
    /// [`FusionError::BadRow`], naming the row.
    pub fn fuse_batch<'p, R>(&self, rows: &[R]) -> Result<Vec<FusedEmbedding>, FusionError>
    where
        R: AsRef<[Option<&'p [f32]>]>,
    {
        let rows: Vec<&[Option<&[f32]>]> = rows.iter().map(AsRef::as_ref).collect();
        self.fuse_rows(&rows).map_err(|e| match e {
            FusionError::BadRow { .. } => e,
            other if other.is_bad_input() => FusionError::BadRow {
                row: 0,
                source: Box::new(other),
            },
            other => other,
        })
    }

    /// The gate's decision for each row, without running the experts (training, inspection).
    pub fn route_batch<'p, R>(&self, rows: &[R]) -> Result<Vec<Routing>, FusionError>
    where
        R: AsRef<[Option<&'p [f32]>]>,
    {
        let rows: Vec<&[Option<&[f32]>]> = rows.iter().map(AsRef::as_ref).collect();
        let assembled = self.assemble(&rows)?;
        Ok(route(&self.config, &self.gate, &assembled, rows.len()))
    }

    /// Assembles every row into one `[rows, gate_input_dim]` buffer (see [`crate::assemble`]).
    fn assemble(&self, rows: &[&[Option<&[f32]>]]) -> Result<Vec<f32>, FusionError> {
        let width = self.config.gate_input_dim();
        let mut assembled = vec![0.0f32; rows.len() * width];
        for (index, (partials, row)) in rows
            .iter()
            .zip(assembled.chunks_exact_mut(width))
            .enumerate()
        {
            crate::assemble::assemble_row(&self.config, partials, row).map_err(|source| {
                if rows.len() == 1 {
                    source
                } else {
                    FusionError::BadRow {
                        row: index,
                        source: Box::new(source),
                    }
                }
            })?;
        }
        Ok(assembled)
    }

    fn fuse_rows(&self, rows: &[&[Option<&[f32]>]]) -> Result<Vec<FusedEmbedding>, FusionError> {
        let cfg = &self.config;
        let (n, d, gate_width, out_dim) = (
            rows.len(),
            cfg.input_dim(),
            cfg.gate_input_dim(),
            cfg.output_dim,
        );
        if n == 0 {
            return Ok(Vec::new());
        }
        let assembled = self.assemble(rows)?;
        let mut routes = route(cfg, &self.gate, &assembled, n);
        if cfg.enforce_capacity {
            limit_capacity(cfg, &mut routes);
        }

        // Per (row, slot) expert output; slot s of row r is `routes[r].selected[s]`.
        let k = cfg.top_k;
        let mut expert_out = vec![0.0f32; n * k * out_dim];
        let mut gathered = Vec::new();
        let mut group_out = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            let members: Vec<(usize, usize)> = routes
                .iter()
                .enumerate()
                .filter_map(|(r, route)| {
                    route.selected.iter().position(|&x| x == e).map(|s| (r, s))
                })
                .collect();
            if members.is_empty() {
                continue;
            }
            gathered.clear();
            for &(r, _) in &members {
                gathered.extend_from_slice(&assembled[r * gate_width..r * gate_width + d]);
            }
            group_out.clear();
            group_out.resize(members.len() * out_dim, 0.0);
            expert.forward(&gathered, members.len(), d, &mut group_out);
            for (&(r, s), y) in members.iter().zip(group_out.chunks_exact(out_dim)) {
                let at = (r * k + s) * out_dim;
                expert_out[at..at + out_dim].copy_from_slice(y);
            }
        }

        routes
            .into_iter()
            .enumerate()
            .map(|(r, route)| {
                let mut fused = vec![0.0f32; out_dim];
                for (s, &weight) in route.weights.iter().enumerate() {
                    let y = &expert_out[(r * k + s) * out_dim..(r * k + s + 1) * out_dim];
                    for (f, &v) in fused.iter_mut().zip(y) {
                        *f += weight * v;
                    }
                }
                normalize(&mut fused)?;
                let mut expert_weights = vec![0.0f32; cfg.num_experts];
                for (&e, &w) in route.selected.iter().zip(&route.weights) {
                    expert_weights[e] = w;
                }
                Ok(FusedEmbedding {
                    embedding: fused,
                    expert_weights,
                    selected: route.selected,
                })
            })
            .collect()
    }
}

/// Scales `v` to unit L2 norm (norm summed in f64, in index order).
fn normalize(v: &mut [f32]) -> Result<(), FusionError> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return Err(FusionError::DegenerateOutput { norm: norm as f32 });
    }
    let inv = 1.0 / norm;
    for x in v.iter_mut() {
        *x = (*x as f64 * inv) as f32;
    }
    Ok(())
}

/// Capacity limiting ([`FuseMoeConfig::enforce_capacity`]): each expert keeps at most
/// [`FuseMoeConfig::expert_capacity`] routes, the highest-weighted first (ties: earlier row);
/// dropped routes leave the row, and the row's remaining weights are renormalised. A row that
/// would lose every route keeps its top choice over capacity, because a fused vector must
/// come out of every row (the paper's residual path has no counterpart in a fusion layer).
pub(crate) fn limit_capacity(cfg: &FuseMoeConfig, routes: &mut [Routing]) {
    let capacity = cfg.expert_capacity(routes.len());
    let mut keep: Vec<Vec<bool>> = routes
        .iter()
        .map(|r| vec![true; r.selected.len()])
        .collect();
    for e in 0..cfg.num_experts {
        let mut claims: Vec<(usize, usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(r, route)| {
                route
                    .selected
                    .iter()
                    .position(|&x| x == e)
                    .map(|s| (r, s, route.weights[s]))
            })
            .collect();
        claims.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        for &(r, s, _) in claims.iter().skip(capacity) {
            keep[r][s] = false;
        }
    }
    for (route, keep) in routes.iter_mut().zip(keep) {
        let mut kept: Vec<usize> = (0..route.selected.len()).filter(|&s| keep[s]).collect();
        if kept.is_empty() {
            kept.push(0);
        }
        let total: f32 = kept.iter().map(|&s| route.weights[s]).sum();
        route.selected = kept.iter().map(|&s| route.selected[s]).collect();
        route.weights = kept.iter().map(|&s| route.weights[s] / total).collect();
    }
}

/// The Switch-Transformer load-balance loss, `coef · E · Σᵢ fᵢ·Pᵢ`, where `fᵢ` is the share of
/// routes that went to expert `i` and `Pᵢ` the mean gate probability of expert `i`. It is
/// `coef` when load is perfectly even and `coef · E` when one expert takes everything.
pub fn load_balance_loss(cfg: &FuseMoeConfig, routes: &[Routing]) -> f32 {
    let experts = cfg.num_experts;
    let total_routes: usize = routes.iter().map(|r| r.selected.len()).sum();
    if routes.is_empty() || total_routes == 0 {
        return 0.0;
    }
    let mut share = vec![0.0f64; experts];
    let mut mean_prob = vec![0.0f64; experts];
    for route in routes {
        for &e in &route.selected {
            share[e] += 1.0 / total_routes as f64;
        }
        for (p, &q) in mean_prob.iter_mut().zip(&route.probabilities) {
            *p += q as f64 / routes.len() as f64;
        }
    }
    let dot: f64 = share.iter().zip(&mean_prob).map(|(f, p)| f * p).sum();
    (cfg.load_balance_coef as f64 * experts as f64 * dot) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(selected: Vec<usize>, weights: Vec<f32>, experts: usize) -> Routing {
        Routing {
            selected,
            weights,
            probabilities: vec![1.0 / experts as f32; experts],
        }
    }

    #[test]
    fn load_balance_loss_is_coef_when_even_and_coef_times_e_when_collapsed() {
        let cfg = FuseMoeConfig {
            num_experts: 4,
            top_k: 1,
            ..FuseMoeConfig::for_input_dims(vec![2])
        };
        let even: Vec<Routing> = (0..4).map(|e| routing(vec![e], vec![1.0], 4)).collect();
        assert!((load_balance_loss(&cfg, &even) - 0.01).abs() < 1e-7);
        let collapsed: Vec<Routing> = (0..4)
            .map(|_| Routing {
                selected: vec![2],
                weights: vec![1.0],
                probabilities: vec![0.0, 0.0, 1.0, 0.0],
            })
            .collect();
        assert!((load_balance_loss(&cfg, &collapsed) - 0.04).abs() < 1e-7);
    }

    #[test]
    fn capacity_drops_the_weakest_routes_and_renormalises() {
        let cfg = FuseMoeConfig {
            num_experts: 2,
            top_k: 1,
            capacity_factor: 1.0,
            enforce_capacity: true,
            ..FuseMoeConfig::for_input_dims(vec![2])
        };
        // 4 rows × 1 route / 2 experts → capacity 2; all four rows want expert 0.
        let mut routes = vec![
            routing(vec![0], vec![1.0], 2),
            routing(vec![0], vec![1.0], 2),
            routing(vec![0], vec![1.0], 2),
            routing(vec![0], vec![1.0], 2),
        ];
        routes[2].selected = vec![0, 1];
        routes[2].weights = vec![0.6, 0.4];
        limit_capacity(&cfg, &mut routes);
        // Row 2 has the weakest claim on expert 0 (0.6) and loses it, keeping expert 1;
        // rows 0 and 1 win the two slots; row 3 is over capacity but keeps its only route.
        assert_eq!(routes[0].selected, vec![0]);
        assert_eq!(routes[1].selected, vec![0]);
        assert_eq!(routes[2].selected, vec![1]);
        assert_eq!(routes[2].weights, vec![1.0]);
        assert_eq!(routes[3].selected, vec![0]);
    }
}
