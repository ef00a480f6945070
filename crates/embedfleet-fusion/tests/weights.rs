//! The safetensors weights file: round trip, and every way a file can disagree with its
//! config.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{small_config, values};
use embedfleet_fusion::weights::{tensor_specs, CONFIG_KEY, VERSION_KEY};
use embedfleet_fusion::{FuseMoe, FuseMoeConfig, FusionError, GatingKind};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// One tensor of a file: name, dtype, shape, little-endian bytes.
type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Reads every tensor of a saved file, with its metadata.
fn read_file(path: &Path) -> (Vec<RawTensor>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    (tensors, metadata)
}

fn write_file(path: &Path, tensors: &[RawTensor], metadata: HashMap<String, String>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(metadata), path).unwrap();
}

fn saved(cfg: FuseMoeConfig) -> (FuseMoe, tempfile::TempDir, std::path::PathBuf) {
    let model = FuseMoe::from_seed(cfg, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fusemoe.safetensors");
    model.save(&path).unwrap();
    (model, dir, path)
}

/// Rewrites a saved file through `edit`, dropping the recorded version (so only the edit
/// itself can make the load fail).
fn edited(
    path: &Path,
    edit: impl FnOnce(&mut Vec<RawTensor>, &mut HashMap<String, String>),
) -> std::path::PathBuf {
    let (mut tensors, mut metadata) = read_file(path);
    metadata.remove(VERSION_KEY);
    edit(&mut tensors, &mut metadata);
    let out = path.with_file_name("edited.safetensors");
    write_file(&out, &tensors, metadata);
    out
}

#[test]
fn weights_round_trip_with_the_same_version_and_outputs() {
    for gating in [GatingKind::Softmax, GatingKind::Laplace] {
        let cfg = FuseMoeConfig {
            gating,
            ..small_config(vec![12, 20])
        };
        let (model, _dir, path) = saved(cfg.clone());
        let loaded = FuseMoe::load(&path).unwrap();
        assert_eq!(loaded.version(), model.version());
        assert_eq!(loaded.config(), model.config());
        let (a, b) = (values(12, 1), values(20, 2));
        let row = [Some(&a[..]), Some(&b[..])];
        assert_eq!(loaded.fuse(&row).unwrap(), model.fuse(&row).unwrap());
        let reloaded = FuseMoe::load_expecting(&path, &cfg).unwrap();
        assert_eq!(reloaded.version(), model.version());

        let (tensors, metadata) = read_file(&path);
        let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(tensors.len(), tensor_specs(&cfg).len());
        assert!(names.contains(&"gate.proj.weight"));
        assert!(names.contains(&"experts.7.fc2.bias"));
        assert_eq!(
            names.contains(&"gate.router.bias"),
            gating == GatingKind::Softmax
        );
        assert!(metadata.contains_key(CONFIG_KEY));
        assert_eq!(metadata[VERSION_KEY], model.version());
    }
}

#[test]
fn a_file_for_another_config_is_refused_when_a_config_is_expected() {
    let (_, _dir, path) = saved(small_config(vec![12, 20]));
    let expected = FuseMoeConfig {
        top_k: 3,
        ..small_config(vec![12, 20])
    };
    match FuseMoe::load_expecting(&path, &expected) {
        Err(FusionError::ConfigMismatch(why)) => assert!(why.contains("top_k"), "{why}"),
        other => panic!("expected ConfigMismatch, got {other:?}"),
    }
}

#[test]
fn a_tensor_shape_that_disagrees_with_the_config_is_refused() {
    let (_, _dir, path) = saved(small_config(vec![12, 20]));
    let bad = edited(&path, |tensors, _| {
        let fc1 = tensors
            .iter_mut()
            .find(|t| t.0 == "experts.3.fc1.weight")
            .unwrap();
        // Same byte count, transposed shape.
        fc1.2 = vec![fc1.2[1], fc1.2[0]];
    });
    match FuseMoe::load(&bad) {
        Err(FusionError::ShapeMismatch {
            name,
            expected,
            got,
        }) => {
            assert_eq!(name, "experts.3.fc1.weight");
            assert_eq!(expected, vec![96, 32]);
            assert_eq!(got, vec![32, 96]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn metadata_that_disagrees_with_the_tensors_is_refused() {
    let (_, _dir, path) = saved(small_config(vec![12, 20]));
    // The config claims wider inputs than the tensors were built for.
    let wider = edited(&path, |_, metadata| {
        let cfg = serde_json::to_string(&small_config(vec![12, 24])).unwrap();
        metadata.insert(CONFIG_KEY.into(), cfg);
    });
    assert!(matches!(
        FuseMoe::load(&wider),
        Err(FusionError::ShapeMismatch { .. })
    ));
    // The config claims more experts than the file has.
    let more = edited(&path, |_, metadata| {
        let cfg = FuseMoeConfig {
            num_experts: 9,
            ..small_config(vec![12, 20])
        };
        metadata.insert(CONFIG_KEY.into(), serde_json::to_string(&cfg).unwrap());
    });
    match FuseMoe::load(&more) {
        Err(FusionError::ShapeMismatch {
            name,
            expected,
            got,
        }) => {
            assert_eq!(name, "gate.router.weight");
            assert_eq!((expected, got), (vec![9, 32], vec![8, 32]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // A tensor the config needs is gone.
    let missing = edited(&path, |tensors, _| {
        tensors.retain(|t| t.0 != "experts.5.fc1.bias");
    });
    match FuseMoe::load(&missing) {
        Err(FusionError::MissingTensor { name }) => assert_eq!(name, "experts.5.fc1.bias"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // Laplace configs have no router bias, so a softmax file is refused as laplace.
    let laplace = edited(&path, |_, metadata| {
        let cfg = FuseMoeConfig {
            gating: GatingKind::Laplace,
            ..small_config(vec![12, 20])
        };
        metadata.insert(CONFIG_KEY.into(), serde_json::to_string(&cfg).unwrap());
    });
    match FuseMoe::load(&laplace) {
        Err(FusionError::UnexpectedTensor { name }) => assert_eq!(name, "gate.router.bias"),
        other => panic!("expected UnexpectedTensor, got {other:?}"),
    }
    // No config at all, or one that does not parse.
    let none = edited(&path, |_, metadata| {
        metadata.remove(CONFIG_KEY);
    });
    assert!(matches!(
        FuseMoe::load(&none),
        Err(FusionError::Metadata(_))
    ));
    let garbled = edited(&path, |_, metadata| {
        metadata.insert(CONFIG_KEY.into(), "{\"num_experts\": \"eight\"}".into());
    });
    assert!(matches!(
        FuseMoe::load(&garbled),
        Err(FusionError::Metadata(_))
    ));
    // A config that parses but is invalid.
    let top_k = edited(&path, |_, metadata| {
        let cfg = FuseMoeConfig {
            top_k: 0,
            ..small_config(vec![12, 20])
        };
        metadata.insert(CONFIG_KEY.into(), serde_json::to_string(&cfg).unwrap());
    });
    assert!(matches!(
        FuseMoe::load(&top_k),
        Err(FusionError::InvalidConfig { field: "top_k", .. })
    ));
}

#[test]
fn altered_or_non_finite_tensors_are_refused() {
    let (_, _dir, path) = saved(small_config(vec![12, 20]));
    // Flip one weight but keep the recorded version: the hash check catches it.
    let (mut tensors, metadata) = read_file(&path);
    let gate = tensors
        .iter_mut()
        .find(|t| t.0 == "gate.proj.weight")
        .unwrap();
    gate.3[0] ^= 1;
    let tampered = path.with_file_name("tampered.safetensors");
    write_file(&tampered, &tensors, metadata);
    match FuseMoe::load(&tampered) {
        Err(FusionError::Metadata(why)) => assert!(why.contains(VERSION_KEY), "{why}"),
        other => panic!("expected a version Metadata error, got {other:?}"),
    }
    let nan = edited(&path, |tensors, _| {
        let bias = tensors
            .iter_mut()
            .find(|t| t.0 == "experts.0.fc2.bias")
            .unwrap();
        bias.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    match FuseMoe::load(&nan) {
        Err(FusionError::NonFiniteWeight { name, index }) => {
            assert_eq!((name.as_str(), index), ("experts.0.fc2.bias", 2));
        }
        other => panic!("expected NonFiniteWeight, got {other:?}"),
    }
    let wrong_type = edited(&path, |tensors, _| {
        let bias = tensors
            .iter_mut()
            .find(|t| t.0 == "gate.norm.bias")
            .unwrap();
        bias.1 = Dtype::I32;
    });
    assert!(matches!(
        FuseMoe::load(&wrong_type),
        Err(FusionError::UnsupportedDtype { .. })
    ));
    assert!(matches!(
        FuseMoe::load(&path.with_file_name("absent.safetensors")),
        Err(FusionError::Io { .. })
    ));
    std::fs::write(
        path.with_file_name("junk.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    assert!(matches!(
        FuseMoe::load(&path.with_file_name("junk.safetensors")),
        Err(FusionError::Safetensors(_))
    ));
}

#[test]
fn bf16_files_load_as_their_widened_values() {
    let (model, _dir, path) = saved(small_config(vec![12, 20]));
    let halved = edited(&path, |tensors, _| {
        for (_, dtype, _, data) in tensors.iter_mut() {
            *data = data
                .chunks_exact(4)
                .flat_map(|b| {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    half::bf16::from_f32(v).to_le_bytes()
                })
                .collect();
            *dtype = Dtype::BF16;
        }
    });
    let loaded = FuseMoe::load(&halved).unwrap();
    assert_ne!(
        loaded.version(),
        model.version(),
        "rounded weights are other weights"
    );
    let (a, b) = (values(12, 1), values(20, 2));
    let row = [Some(&a[..]), Some(&b[..])];
    let (x, y) = (loaded.fuse(&row).unwrap(), model.fuse(&row).unwrap());
    assert!(common::cosine(&x.embedding, &y.embedding) > 0.99);
}
