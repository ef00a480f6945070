//! The trained default: fusion weights for the default model set (minilm + mpnet), shipped in
//! the repository as a small delta file (see [`crate::delta`]) and used whenever no
//! `--fusion-weights` file is given. How they were made: docs/fusion.md, "The shipped default".
//!
//! The file is found at run time, next to this crate (`weights/minilm-mpnet.safetensors` under
//! the crate directory this binary was built from), or in the directory named by
//! `EMBEDFLEET_FUSION_DEFAULTS_DIR` (for binaries installed away from the source tree, e.g. a
//! container image). Without it, the seeded layer is the default, as before.

use std::path::PathBuf;

use crate::config::FuseMoeConfig;
use crate::error::FusionError;
use crate::model::FuseMoe;

/// Widths of the default set, catalogue order: minilm, mpnet.
pub const DEFAULT_SET_DIMS: [usize; 2] = [384, 768];
/// File name of the shipped default for [`DEFAULT_SET_DIMS`].
pub const DEFAULT_WEIGHTS_FILE: &str = "minilm-mpnet.safetensors";

/// Where the shipped default weights are looked for.
pub fn default_weights_path() -> PathBuf {
    let dir = std::env::var_os("EMBEDFLEET_FUSION_DEFAULTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/weights")));
    dir.join(DEFAULT_WEIGHTS_FILE)
}

/// The shipped trained layer for `config` when there is one (the default set with the
/// specification's other settings, and the file present), else `None`. A file that is there
/// but does not load is an error, not a silent fallback.
pub fn shipped_default(config: &FuseMoeConfig) -> Option<Result<FuseMoe, FusionError>> {
    if *config != FuseMoeConfig::for_input_dims(DEFAULT_SET_DIMS.to_vec()) {
        return None;
    }
    let path = default_weights_path();
    if !path.is_file() {
        return None;
    }
    Some(FuseMoe::load_expecting(&path, config))
}

/// The default layer for `config`: the shipped trained weights where they apply, else the
/// seeded layer from `seed`.
pub fn default_layer(config: FuseMoeConfig, seed: u64) -> Result<FuseMoe, FusionError> {
    match shipped_default(&config) {
        Some(layer) => layer,
        None => FuseMoe::from_seed(config, seed),
    }
}
