//! Training on a small synthetic task: the loss falls, the held-out metric rises, a seed fixes
//! the result, trained weights round-trip through the normal weights path, and an empty
//! held-out split is a typed error.
//!
//! The task: each "text" has a 4-d meaning `z` and 8-d nuisance; both models see `[z; nuisance]`
//! through their own random linear map, so the concatenation's cosine mixes meaning and
//! nuisance. Gold scores are cosines of the meanings alone, so a layer that learns to suppress
//! the nuisance ranks pairs better than the untrained (distance-preserving) layer.

use embedfleet_fusion::metrics::{sts_spearman, Matrix};
use embedfleet_fusion::train::{
    train, PairData, Reference, RetrievalExample, RetrievalHeldOut, ScoredExample, TrainEvent,
    TrainOptions, TrainingRows,
};
use embedfleet_fusion::{FuseMoe, FuseMoeConfig, FusionError};
use rand::{Rng, SeedableRng};

const MEANING: usize = 4;
const NUISANCE: usize = 8;

fn config() -> FuseMoeConfig {
    FuseMoeConfig {
        num_experts: 4,
        top_k: 2,
        output_dim: 24,
        expert_hidden: 64,
        gate_hidden: 16,
        ..FuseMoeConfig::for_input_dims(vec![6, 10])
    }
}

struct Task {
    rows: TrainingRows,
    data: PairData,
}

fn synthetic_task(seed: u64) -> Task {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gauss = |rng: &mut rand::rngs::StdRng| -> f32 {
        // Sum of uniforms: close enough to normal for a synthetic task.
        (0..6).map(|_| rng.random::<f32>() - 0.5).sum::<f32>()
    };
    let latent = MEANING + NUISANCE;
    let maps: Vec<Vec<f32>> = config()
        .input_dims
        .iter()
        .map(|&w| (0..w * latent).map(|_| gauss(&mut rng)).collect())
        .collect();
    let mut meanings = Vec::new();
    let mut rows = TrainingRows::new();
    for _ in 0..480 {
        let z: Vec<f32> = (0..MEANING).map(|_| gauss(&mut rng)).collect();
        let n: Vec<f32> = (0..NUISANCE).map(|_| 1.5 * gauss(&mut rng)).collect();
        let full: Vec<f32> = z.iter().chain(&n).copied().collect();
        rows.push(
            maps.iter()
                .map(|m| {
                    Some(
                        m.chunks_exact(latent)
                            .map(|row| row.iter().zip(&full).map(|(a, b)| a * b).sum())
                            .collect(),
                    )
                })
                .collect(),
        );
        meanings.push(z);
    }
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    };
    let pair = |rng: &mut rand::rngs::StdRng, range: std::ops::Range<usize>| {
        let a = rng.random_range(range.clone());
        let b = rng.random_range(range);
        ScoredExample {
            a,
            b,
            score: cos(&meanings[a], &meanings[b]),
        }
    };
    // Rows 0..400 for training pairs, 400..480 for held-out pairs: no text is shared.
    let scored = (0..800).map(|_| pair(&mut rng, 0..400)).collect();
    let held_out_scored = (0..200).map(|_| pair(&mut rng, 400..480)).collect();
    // Retrieval: a text's "query" is itself, its positive the text with the closest meaning.
    let nearest = |i: usize, range: std::ops::Range<usize>| {
        range
            .filter(|&j| j != i)
            .max_by(|&a, &b| {
                cos(&meanings[i], &meanings[a]).total_cmp(&cos(&meanings[i], &meanings[b]))
            })
            .unwrap()
    };
    let retrieval = (0..200)
        .map(|i| RetrievalExample {
            query: i,
            positive: nearest(i, 0..400),
        })
        .collect();
    let held_out_retrieval = Some(RetrievalHeldOut {
        queries: (400..440).collect(),
        corpus: (400..480).collect(),
        relevant: (400..440)
            .map(|i| vec![nearest(i, 400..480) - 400])
            .collect(),
    });
    Task {
        rows,
        data: PairData {
            scored,
            retrieval,
            held_out_scored,
            held_out_retrieval,
        },
    }
}

fn options() -> TrainOptions {
    TrainOptions {
        seed: 3,
        base_seed: 11,
        rank_shared: 8,
        rank_expert: 2,
        max_epochs: 8,
        patience: 8,
        batch_size: 32,
        learning_rate: 1e-2,
        matryoshka_dims: vec![8, 16, 24],
        ..TrainOptions::default()
    }
}

#[test]
fn training_lowers_the_loss_and_raises_the_held_out_metric() {
    let task = synthetic_task(1);
    let mut losses = Vec::new();
    let outcome = train(
        &config(),
        &task.rows,
        &task.data,
        &options(),
        &mut |event| {
            if let TrainEvent::Epoch { mean_loss, .. } = event {
                losses.push(*mean_loss);
            }
        },
    )
    .unwrap();
    assert!(losses.len() >= 2);
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.95),
        "loss did not fall: {losses:?}"
    );
    let (before, after) = (outcome.untrained, outcome.best);
    assert!(outcome.best_epoch > 0, "no epoch beat the untrained layer");
    assert!(
        after.sts_spearman.unwrap() > before.sts_spearman.unwrap() + 5.0,
        "held-out Spearman {before:?} → {after:?}"
    );
    assert!(after.selection > before.selection);

    // The shipped form (seeded base + parts, materialised and run by the real forward) keeps
    // the gain on the held-out pairs.
    let layer = outcome
        .parts
        .materialize(&config(), options().base_seed)
        .unwrap();
    let seeded = FuseMoe::from_seed(config(), options().base_seed).unwrap();
    let held = &task.data.held_out_scored;
    let spearman = |layer: &FuseMoe| {
        let embed = |rows: Vec<usize>| {
            let slots: Vec<Vec<Option<&[f32]>>> = rows
                .iter()
                .map(|&r| task.rows[r].iter().map(|p| p.as_deref()).collect())
                .collect();
            let fused: Vec<Vec<f32>> = layer
                .fuse_batch(&slots)
                .unwrap()
                .into_iter()
                .map(|f| f.embedding)
                .collect();
            Matrix::from_rows(&fused)
        };
        let gold: Vec<f64> = held.iter().map(|p| p.score as f64).collect();
        sts_spearman(
            &embed(held.iter().map(|p| p.a).collect()),
            &embed(held.iter().map(|p| p.b).collect()),
            &gold,
        )
    };
    let (real_before, real_after) = (spearman(&seeded), spearman(&layer));
    assert!(
        real_after > real_before + 5.0,
        "materialised layer: {real_before} → {real_after}"
    );
    assert!(
        (real_after - after.sts_spearman.unwrap()).abs() < 2.0,
        "the training forward and the real forward disagree: {} vs {real_after}",
        after.sts_spearman.unwrap()
    );
}

/// Spearman ×100 of the held-out pairs under `vector(row)`, computed here from the rows.
fn held_out_spearman(task: &Task, vector: &dyn Fn(usize) -> Vec<f32>) -> f64 {
    let held = &task.data.held_out_scored;
    let matrix =
        |rows: Vec<usize>| Matrix::from_rows(&rows.into_iter().map(vector).collect::<Vec<_>>());
    let gold: Vec<f64> = held.iter().map(|p| p.score as f64).collect();
    sts_spearman(
        &matrix(held.iter().map(|p| p.a).collect()),
        &matrix(held.iter().map(|p| p.b).collect()),
        &gold,
    )
}

#[test]
fn selection_is_the_smallest_margin_over_each_model_alone_and_the_concatenation() {
    let task = synthetic_task(5);
    let opts = TrainOptions {
        max_epochs: 3,
        ..options()
    };
    let mut started = None;
    let outcome = train(&config(), &task.rows, &task.data, &opts, &mut |event| {
        if let TrainEvent::Start { references, .. } = event {
            started = Some(references.clone());
        }
    })
    .unwrap();
    assert_eq!(started.as_ref(), Some(&outcome.references));
    let kinds: Vec<Reference> = outcome.references.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        kinds,
        [
            Reference::Slot(0),
            Reference::Slot(1),
            Reference::Concatenation
        ]
    );

    // Each reference's STS figure is the Spearman of its own vectors, computed independently:
    // a slot's partial, or the two partials normalised and concatenated.
    let unit = |v: &[f32]| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let rows = &task.rows;
    let slot = |s: usize| move |r: usize| rows[r][s].clone().unwrap();
    let concatenation = |r: usize| {
        let mut v = unit(rows[r][0].as_deref().unwrap());
        v.extend(unit(rows[r][1].as_deref().unwrap()));
        v
    };
    let expected = [
        held_out_spearman(&task, &slot(0)),
        held_out_spearman(&task, &slot(1)),
        held_out_spearman(&task, &concatenation),
    ];
    for ((reference, scores), want) in outcome.references.iter().zip(expected) {
        let got = scores.sts_spearman.unwrap();
        assert!((got - want).abs() < 1e-3, "{reference:?}: {got} vs {want}");
        assert!(scores.ndcg_at_10.is_some());
    }

    // selection = min over tasks of (score − the best reference on that task).
    let best = |pick: &dyn Fn(&embedfleet_fusion::train::HeldOutScores) -> f64| {
        outcome
            .references
            .iter()
            .map(|(_, s)| pick(s))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let best_sts = best(&|s| s.sts_spearman.unwrap());
    let best_ndcg = best(&|s| s.ndcg_at_10.unwrap());
    for scores in [outcome.untrained, outcome.best] {
        let margin =
            (scores.sts_spearman.unwrap() - best_sts).min(scores.ndcg_at_10.unwrap() - best_ndcg);
        assert!((scores.selection - margin).abs() < 1e-9, "{scores:?}");
    }
    // The seeded layer preserves the concatenation, so it cannot be far ahead of it.
    assert!(outcome.untrained.selection < 1.0, "{:?}", outcome.untrained);
}

#[test]
fn the_same_seed_trains_the_same_parts() {
    let task = synthetic_task(2);
    let opts = TrainOptions {
        max_epochs: 2,
        ..options()
    };
    let run = || train(&config(), &task.rows, &task.data, &opts, &mut |_| {}).unwrap();
    let (a, b) = (run(), run());
    assert_eq!(a.parts, b.parts);
    assert_eq!(a.epoch_losses, b.epoch_losses);
    let other = train(
        &config(),
        &task.rows,
        &task.data,
        &TrainOptions {
            seed: 4,
            ..opts.clone()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_ne!(a.epoch_losses, other.epoch_losses);
}

#[test]
fn trained_weights_round_trip_through_the_weights_path() {
    let task = synthetic_task(3);
    let opts = TrainOptions {
        max_epochs: 2,
        ..options()
    };
    let outcome = train(&config(), &task.rows, &task.data, &opts, &mut |_| {}).unwrap();
    let layer = outcome
        .parts
        .materialize(&config(), opts.base_seed)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.safetensors");
    outcome
        .parts
        .save(&config(), opts.base_seed, &layer.version(), &path)
        .unwrap();
    let loaded = FuseMoe::load_expecting(&path, &config()).unwrap();
    assert_eq!(loaded.version(), layer.version());
    let seeded = FuseMoe::from_seed(config(), opts.base_seed).unwrap();
    assert_ne!(
        loaded.version(),
        seeded.version(),
        "training must change the cache key"
    );
    let row: Vec<Option<&[f32]>> = task.rows[0].iter().map(|p| p.as_deref()).collect();
    assert_eq!(loaded.fuse(&row).unwrap(), layer.fuse(&row).unwrap());

    // A file whose recorded version does not match its tensors is refused.
    outcome
        .parts
        .save(&config(), opts.base_seed, "0".repeat(32).as_str(), &path)
        .unwrap();
    assert!(matches!(
        FuseMoe::load(&path),
        Err(FusionError::Metadata(_))
    ));
}

#[test]
fn zero_parts_materialise_to_the_seeded_layer() {
    let parts = embedfleet_fusion::delta::DeltaParts::zeros(&config(), 4, 2);
    let layer = parts.materialize(&config(), 5).unwrap();
    assert_eq!(
        layer.version(),
        FuseMoe::from_seed(config(), 5).unwrap().version()
    );
}

/// A slot scale of −1 removes that model's block from every expert's map: rows that differ
/// only in slot 0 then fuse to (nearly: the seeded 2 % per-expert perturbation and the gate
/// still see slot 0) the same vector, where the seeded layer tells them apart.
#[test]
fn a_slot_scale_of_minus_one_folds_that_model_out_of_the_experts() {
    let mut parts = embedfleet_fusion::delta::DeltaParts::zeros(&config(), 4, 2);
    parts.slot_scale = vec![-1.0, 0.0];
    let folded = parts.materialize(&config(), 5).unwrap();
    let seeded = FuseMoe::from_seed(config(), 5).unwrap();
    let task = synthetic_task(5);
    let slot1 = task.rows[0][1].as_deref();
    let cosine = |layer: &FuseMoe, other: usize| {
        let a = layer.fuse(&[task.rows[0][0].as_deref(), slot1]).unwrap();
        let b = layer
            .fuse(&[task.rows[other][0].as_deref(), slot1])
            .unwrap();
        a.embedding
            .iter()
            .zip(&b.embedding)
            .map(|(x, y)| x * y)
            .sum::<f32>()
    };
    for other in 1..6 {
        assert!(
            cosine(&seeded, other) < 0.95,
            "the seeded layer reads slot 0"
        );
        assert!(cosine(&folded, other) > 0.99, "slot 0 is folded out");
    }
}

#[test]
fn an_empty_held_out_split_is_a_typed_error() {
    let task = synthetic_task(4);
    let data = PairData {
        held_out_scored: Vec::new(),
        held_out_retrieval: None,
        ..task.data.clone()
    };
    match train(&config(), &task.rows, &data, &options(), &mut |_| {}) {
        Err(FusionError::Training(message)) => assert!(message.contains("held-out")),
        other => panic!("expected a training error, got {:?}", other.map(|o| o.best)),
    }
}
