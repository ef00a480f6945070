//! Which fusion layer a command uses: `--fusion-weights` when given, else the fleet's default
//! for the model set (the shipped trained layer for minilm + mpnet, the seeded layer for other
//! sets).

use std::path::Path;

use embedfleet_fusion::{FuseMoe, FuseMoeConfig};

pub struct ChosenLayer {
    pub layer: FuseMoe,
    /// Whether the layer came from trained weights rather than the seed alone.
    pub trained: bool,
}

pub fn layer(
    _models: &[String],
    weights: Option<&Path>,
    config: &FuseMoeConfig,
) -> anyhow::Result<ChosenLayer> {
    Ok(match weights {
        Some(path) => ChosenLayer {
            layer: FuseMoe::load_expecting(path, config)?,
            trained: true,
        },
        None => match embedfleet_fusion::shipped::shipped_default(config) {
            Some(layer) => ChosenLayer {
                layer: layer?,
                trained: true,
            },
            None => ChosenLayer {
                layer: FuseMoe::from_seed(config.clone(), embedfleet_fleet::DEFAULT_FUSION_SEED)?,
                trained: false,
            },
        },
    })
}
