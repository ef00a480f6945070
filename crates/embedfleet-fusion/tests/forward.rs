//! CPU forward of FuseMoE: output contract, determinism, batch = single, bad input, gating
//! kinds, capacity limiting.

mod common;

use common::{cosine, norm, small_config, values};
use embedfleet_fusion::{
    assemble::normalized_concatenation, load_balance_loss, FuseMoe, FuseMoeConfig, FusionError,
    GatingKind,
};

fn layer(cfg: FuseMoeConfig) -> FuseMoe {
    FuseMoe::from_seed(cfg, 7).unwrap()
}

#[test]
fn fused_vectors_are_unit_length_finite_and_report_their_routing() {
    let model = layer(small_config(vec![12, 20, 8]));
    let (a, b) = (values(12, 1), values(8, 2));
    let fused = model.fuse(&[Some(&a), None, Some(&b)]).unwrap();
    assert_eq!(fused.embedding.len(), 64);
    assert!(fused.embedding.iter().all(|v| v.is_finite()));
    assert!((norm(&fused.embedding) - 1.0).abs() < 1e-5);
    assert_eq!(fused.selected.len(), 2);
    assert_ne!(fused.selected[0], fused.selected[1]);
    assert_eq!(fused.expert_weights.len(), 8);
    assert!((fused.expert_weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    for (e, &w) in fused.expert_weights.iter().enumerate() {
        assert_eq!(
            w > 0.0,
            fused.selected.contains(&e),
            "expert {e} weight {w}"
        );
    }
    let w = &fused.expert_weights;
    assert!(w[fused.selected[0]] >= w[fused.selected[1]]);
}

#[test]
fn the_same_seed_gives_the_same_bits_and_version() {
    let cfg = small_config(vec![12, 20]);
    let (a, b) = (values(12, 3), values(20, 4));
    let one = FuseMoe::from_seed(cfg.clone(), 99).unwrap();
    let two = FuseMoe::from_seed(cfg.clone(), 99).unwrap();
    let other = FuseMoe::from_seed(cfg, 100).unwrap();
    assert_eq!(one.version(), two.version());
    assert_ne!(one.version(), other.version());
    assert_eq!(one.version().len(), 32);
    let row = [Some(&a[..]), Some(&b[..])];
    assert_eq!(one.fuse(&row).unwrap(), two.fuse(&row).unwrap());
}

/// Pins the initialisation and the version hash: a change of platform, dependency or code
/// that alters any weight bit fails here, before two nodes disagree in production.
#[test]
fn version_of_a_seeded_layer_is_pinned() {
    let model = FuseMoe::from_seed(small_config(vec![12, 20]), 2024).unwrap();
    assert_eq!(model.version(), PINNED_VERSION);
}
const PINNED_VERSION: &str = "104350584f3f1fb7ed13d60b9ea076f1";

#[test]
fn a_batch_gives_each_row_the_bits_it_gets_alone() {
    let model = layer(small_config(vec![12, 20, 8]));
    let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..9)
        .map(|i| (values(12, 10 + i), values(20, 30 + i), values(8, 50 + i)))
        .collect();
    let rows: Vec<Vec<Option<&[f32]>>> = data
        .iter()
        .enumerate()
        .map(|(i, (a, b, c))| match i % 3 {
            0 => vec![Some(&a[..]), Some(&b[..]), Some(&c[..])],
            1 => vec![None, Some(&b[..]), None],
            _ => vec![Some(&a[..]), None, Some(&c[..])],
        })
        .collect();
    let batch = model.fuse_batch(&rows).unwrap();
    assert_eq!(batch.len(), rows.len());
    for (row, fused) in rows.iter().zip(&batch) {
        assert_eq!(&model.fuse(row).unwrap(), fused);
    }
    assert!(model
        .fuse_batch::<Vec<Option<&[f32]>>>(&[])
        .unwrap()
        .is_empty());
}

#[test]
fn bad_input_is_a_typed_error() {
    let model = layer(small_config(vec![4, 3]));
    let good = [1.0f32, 2.0, 3.0];
    let nan = [1.0f32, f32::NAN, 0.0, 1.0];
    let inf = [1.0f32, 0.0, f32::NEG_INFINITY, 1.0];
    let narrow = [1.0f32, 2.0];
    assert!(matches!(
        model.fuse(&[Some(&narrow), Some(&good)]),
        Err(FusionError::SlotWidth {
            slot: 0,
            expected: 4,
            got: 2
        })
    ));
    assert!(matches!(
        model.fuse(&[Some(&nan), Some(&good)]),
        Err(FusionError::NonFinitePartial { slot: 0, index: 1 })
    ));
    assert!(matches!(
        model.fuse(&[Some(&inf), None]),
        Err(FusionError::NonFinitePartial { slot: 0, index: 2 })
    ));
    assert!(matches!(
        model.fuse(&[Some(&good)]),
        Err(FusionError::SlotCount {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        model.fuse(&[None, None]),
        Err(FusionError::NoPartials)
    ));

    // In a batch the error names the row, and is still the caller's fault.
    let rows = vec![vec![None, Some(&good[..])], vec![Some(&nan[..]), None]];
    match model.fuse_batch(&rows) {
        Err(err @ FusionError::BadRow { row: 1, .. }) => assert!(err.is_bad_input()),
        other => panic!("expected BadRow(1), got {other:?}"),
    }
}

#[test]
fn invalid_configs_are_refused_at_construction() {
    for top_k in [0, 9] {
        let cfg = FuseMoeConfig {
            top_k,
            ..small_config(vec![4])
        };
        assert!(matches!(
            FuseMoe::from_seed(cfg, 1),
            Err(FusionError::InvalidConfig { field: "top_k", .. })
        ));
    }
}

#[test]
fn laplace_gating_fuses_and_routes_differently_from_softmax() {
    let softmax = layer(small_config(vec![12, 20]));
    let laplace = layer(FuseMoeConfig {
        gating: GatingKind::Laplace,
        ..small_config(vec![12, 20])
    });
    let mut differs = false;
    for i in 0..6 {
        let (a, b) = (values(12, 70 + i), values(20, 80 + i));
        let row = [Some(&a[..]), Some(&b[..])];
        let fused = laplace.fuse(&row).unwrap();
        assert!((norm(&fused.embedding) - 1.0).abs() < 1e-5);
        assert!((fused.expert_weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        differs |= fused.selected != softmax.fuse(&row).unwrap().selected;
    }
    assert!(differs, "laplace and softmax routed six rows identically");
    assert_ne!(softmax.version(), laplace.version());
}

#[test]
fn every_expert_starts_near_the_shared_map() {
    // With top-1 routing each output is one expert's M·x; whichever expert a row lands on,
    // the result must be close to what any other expert gives (small perturbations only),
    // which shows up as fused cosines tracking input cosines.
    for gating in [GatingKind::Softmax, GatingKind::Laplace] {
        let cfg = FuseMoeConfig {
            top_k: 1,
            gating,
            ..small_config(vec![12, 20])
        };
        fused_cosines_track_input_cosines(&cfg);
    }
}

fn fused_cosines_track_input_cosines(cfg: &FuseMoeConfig) {
    let model = layer(cfg.clone());
    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..10)
        .map(|i| (values(12, i), values(20, 40 + i)))
        .collect();
    let fused: Vec<Vec<f32>> = rows
        .iter()
        .map(|(a, b)| model.fuse(&[Some(a), Some(b)]).unwrap().embedding)
        .collect();
    let inputs: Vec<Vec<f32>> = rows
        .iter()
        .map(|(a, b)| normalized_concatenation(cfg, &[Some(a), Some(b)]).unwrap())
        .collect();
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            let (got, want) = (cosine(&fused[i], &fused[j]), cosine(&inputs[i], &inputs[j]));
            assert!(
                (got - want).abs() < 0.05,
                "pair {i},{j}: fused {got}, inputs {want}"
            );
        }
    }
}

#[test]
fn capacity_limiting_caps_expert_load_and_still_fuses_every_row() {
    let cfg = FuseMoeConfig {
        enforce_capacity: true,
        capacity_factor: 1.0,
        num_experts: 4,
        ..small_config(vec![12])
    };
    let model = layer(cfg.clone());
    let data: Vec<Vec<f32>> = (0..16).map(|i| values(12, 200 + i)).collect();
    let rows: Vec<Vec<Option<&[f32]>>> = data.iter().map(|a| vec![Some(&a[..])]).collect();
    let unlimited = FuseMoe::from_seed(
        FuseMoeConfig {
            enforce_capacity: false,
            ..cfg.clone()
        },
        7,
    )
    .unwrap();
    let free = unlimited.route_batch(&rows).unwrap();
    let capacity = cfg.expert_capacity(rows.len());
    let fused = model.fuse_batch(&rows).unwrap();
    let mut load = [0usize; 4];
    for f in &fused {
        assert!((norm(&f.embedding) - 1.0).abs() < 1e-5);
        assert!((f.expert_weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for &e in &f.selected {
            load[e] += 1;
        }
    }
    // Rows that kept only their top choice over capacity are the only excess allowed.
    let forced = fused.iter().filter(|f| f.selected.len() == 1).count();
    for (e, &l) in load.iter().enumerate() {
        assert!(
            l <= capacity + forced,
            "expert {e} took {l} routes, capacity {capacity}"
        );
    }
    let free_max = {
        let mut free_load = vec![0usize; 4];
        free.iter()
            .flat_map(|r| &r.selected)
            .for_each(|&e| free_load[e] += 1);
        free_load.into_iter().max().unwrap()
    };
    assert!(
        load.iter().max().unwrap() <= &free_max,
        "capacity limiting must not increase the busiest expert's load"
    );
    let loss = load_balance_loss(&cfg, &free);
    assert!(loss > 0.0 && loss <= 0.01 * 4.0, "loss {loss}");
}
