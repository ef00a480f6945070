//! `embedfleet fusion train`: trains the FuseMoE layer of a model set on pair files.
//!
//! Partials come from the partial cache (filled here if needed, through the same in-process
//! models the pipeline runs); training runs `embedfleet_fusion::train` on the CPU with a
//! progress bar (loss, held-out metric) and writes a small delta weights file (seeded base +
//! trained parts, see `embedfleet_fusion::delta`) that `--fusion-weights` loads, plus
//! `<out>.json` with the options, data files and per-epoch figures.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use embedfleet_fusion::train::{
    self, PairData, Reference, RetrievalExample, RetrievalHeldOut, ScoredExample, TrainEvent,
    TrainOptions, TrainingRows,
};
use embedfleet_fusion::{FuseMoe, FuseMoeConfig};
use embedfleet_proto::InputType;
use serde_json::json;

use crate::fusion_cmd::CacheArgs;
use crate::pair_data::{self, BeirSet};

#[derive(Args)]
pub struct TrainArgs {
    /// Scored training pairs (JSONL `{"a","b","score"}`).
    #[arg(long)]
    scored: Vec<PathBuf>,
    /// Retrieval training pairs (JSONL `{"query","positive","negative"?}`).
    #[arg(long)]
    retrieval: Vec<PathBuf>,
    /// Held-out scored pairs for model selection (early stopping).
    #[arg(long)]
    held_out_scored: Option<PathBuf>,
    /// Held-out BEIR directory for model selection (early stopping).
    #[arg(long)]
    held_out_beir: Option<PathBuf>,
    /// Where the trained weights go (safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    cache: CacheArgs,
    #[arg(long, default_value_t = 14)]
    seed: u64,
    #[arg(long, default_value_t = 12)]
    max_epochs: usize,
    #[arg(long, default_value_t = 3)]
    patience: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// AdamW learning rate of the low-rank parts and the router.
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Rank of the trained change shared by every expert.
    #[arg(long, default_value_t = 256)]
    rank_shared: usize,
    /// Rank of each expert's own trained change.
    #[arg(long, default_value_t = 16)]
    rank_expert: usize,
    /// Matryoshka prefixes trained for.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512,768,1536")]
    matryoshka_dims: Vec<usize>,
    /// Router-bias step towards even expert load after each optimiser step (0: off).
    #[arg(long, default_value_t = 0.005)]
    balance_rate: f64,
    /// Learning rate of the per-model input scales (two numbers for minilm + mpnet).
    #[arg(long, default_value_t = 1e-2)]
    slot_learning_rate: f64,
    /// Weight of the retrieval (contrastive) loss against the scored-pair loss.
    #[arg(long, default_value_t = 1.0)]
    retrieval_weight: f64,
}

/// Texts by (input type, text) → row in the training table.
#[derive(Default)]
struct RowTable {
    index: HashMap<(InputType, String), usize>,
    order: Vec<(InputType, String)>,
}

impl RowTable {
    fn row(&mut self, input_type: InputType, text: &str) -> usize {
        let key = (input_type, text.to_string());
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.order.push(key.clone());
        self.index.insert(key, self.order.len() - 1);
        self.order.len() - 1
    }

    fn texts(&self, input_type: InputType) -> Vec<String> {
        self.order
            .iter()
            .filter(|(t, _)| *t == input_type)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.scored.is_empty() || !args.retrieval.is_empty(),
        "nothing to train on: pass --scored FILE and/or --retrieval FILE"
    );
    anyhow::ensure!(
        args.held_out_scored.is_some() || args.held_out_beir.is_some(),
        "training needs a held-out split for early stopping: pass --held-out-scored FILE and/or \
         --held-out-beir DIR"
    );
    let mut table = RowTable::default();
    let mut data = PairData::default();
    for path in &args.scored {
        for p in pair_data::read_scored(path)? {
            data.scored.push(ScoredExample {
                a: table.row(InputType::Document, &p.a),
                b: table.row(InputType::Document, &p.b),
                score: p.score as f32,
            });
        }
    }
    for path in &args.retrieval {
        for p in pair_data::read_retrieval(path)? {
            data.retrieval.push(RetrievalExample {
                query: table.row(InputType::Query, &p.query),
                positive: table.row(InputType::Document, &p.positive),
            });
        }
    }
    if let Some(path) = &args.held_out_scored {
        for p in pair_data::read_scored(path)? {
            data.held_out_scored.push(ScoredExample {
                a: table.row(InputType::Document, &p.a),
                b: table.row(InputType::Document, &p.b),
                score: p.score as f32,
            });
        }
    }
    if let Some(dir) = &args.held_out_beir {
        let set = BeirSet::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        let positions: HashMap<&str, usize> = set
            .corpus
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let mut held = RetrievalHeldOut {
            corpus: set
                .corpus
                .iter()
                .map(|(_, text)| table.row(InputType::Document, text))
                .collect(),
            ..RetrievalHeldOut::default()
        };
        for (qid, text) in &set.queries {
            held.queries.push(table.row(InputType::Query, text));
            held.relevant.push(
                set.qrels[qid]
                    .iter()
                    .filter(|(_, &g)| g > 0)
                    .filter_map(|(doc, _)| positions.get(doc.as_str()).copied())
                    .collect(),
            );
        }
        data.held_out_retrieval = Some(held);
    }

    let mut cache = args.cache.open()?;
    for input_type in [InputType::Document, InputType::Query] {
        cache.fill(&table.texts(input_type), input_type, "training data")?;
    }
    let rows: TrainingRows = table
        .order
        .iter()
        .map(|(input_type, text)| {
            let partials = cache.rows(std::slice::from_ref(text), *input_type)?;
            Ok(partials
                .into_iter()
                .next()
                .unwrap_or_default()
                .into_iter()
                .map(Some)
                .collect())
        })
        .collect::<anyhow::Result<_>>()?;
    let config = FuseMoeConfig::for_input_dims(cache.dims());
    let names: Vec<String> = cache.specs().iter().map(|s| s.name.to_string()).collect();
    let options = TrainOptions {
        seed: args.seed,
        base_seed: embedfleet_fleet::DEFAULT_FUSION_SEED,
        rank_shared: args.rank_shared,
        rank_expert: args.rank_expert,
        max_epochs: args.max_epochs,
        patience: args.patience,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        matryoshka_dims: args.matryoshka_dims.clone(),
        balance_rate: args.balance_rate,
        slot_learning_rate: args.slot_learning_rate,
        retrieval_weight: args.retrieval_weight,
        ..TrainOptions::default()
    };
    eprintln!(
        "training fusion for [{}]: {} scored pairs, {} retrieval pairs, {} rows",
        names.join(", "),
        data.scored.len(),
        data.retrieval.len(),
        rows.len()
    );
    let started = Instant::now();
    let mut bar = ProgressBar::new(args.max_epochs, names.clone());
    let mut epochs = Vec::new();
    let outcome = train::train(&config, &rows, &data, &options, &mut |event| {
        bar.show(event);
        if let TrainEvent::Epoch {
            epoch,
            mean_loss,
            held_out,
            ..
        } = event
        {
            epochs.push(json!({
                "epoch": epoch, "loss": mean_loss,
                "held_out_sts_spearman": held_out.sts_spearman, "held_out_ndcg_at_10": held_out.ndcg_at_10,
                "held_out_selection": held_out.selection,
            }));
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();

    let layer = outcome
        .parts
        .materialize(&config, options.base_seed)
        .context("folding the trained parts into the layer")?;
    outcome
        .parts
        .save(&config, options.base_seed, &layer.version(), &args.out)?;
    // Read back through the normal weights path: what --fusion-weights will load.
    let loaded = FuseMoe::load_expecting(&args.out, &config)?;
    anyhow::ensure!(
        loaded.version() == layer.version(),
        "the saved weights do not load back to the trained layer"
    );
    let log = json!({
        "models": names,
        "slot_scale": outcome.parts.slot_scale,
        "out": args.out,
        "version": layer.version(),
        "seconds": seconds,
        "best_epoch": outcome.best_epoch,
        "references_held_out": outcome.references.iter().map(|(reference, scores)| json!({
            "system": reference_name(*reference, &names),
            "sts_spearman": scores.sts_spearman, "ndcg_at_10": scores.ndcg_at_10,
        })).collect::<Vec<_>>(),
        "selection": "the smallest margin over the best reference per held-out task",
        "untrained_held_out": {"sts_spearman": outcome.untrained.sts_spearman, "ndcg_at_10": outcome.untrained.ndcg_at_10, "selection": outcome.untrained.selection},
        "best_held_out": {"sts_spearman": outcome.best.sts_spearman, "ndcg_at_10": outcome.best.ndcg_at_10, "selection": outcome.best.selection},
        "epochs": epochs,
        "data": {
            "scored": args.scored, "retrieval": args.retrieval,
            "held_out_scored": args.held_out_scored, "held_out_beir": args.held_out_beir,
        },
        "options": {
            "seed": options.seed, "base_seed": options.base_seed, "rank_shared": options.rank_shared,
            "rank_expert": options.rank_expert, "max_epochs": options.max_epochs,
            "patience": options.patience, "batch_size": options.batch_size,
            "learning_rate": options.learning_rate, "weight_decay": options.weight_decay,
            "matryoshka_dims": options.matryoshka_dims, "balance_rate": options.balance_rate,
            "slot_learning_rate": options.slot_learning_rate,
            "retrieval_weight": options.retrieval_weight,
        },
    });
    let log_path = args.out.with_extension("json");
    std::fs::write(&log_path, serde_json::to_string_pretty(&log)?)
        .with_context(|| format!("writing {}", log_path.display()))?;
    println!(
        "best epoch {} of {} in {seconds:.0}s; held-out {} → {}; weights {} (version {}), log {}",
        outcome.best_epoch,
        outcome.epoch_losses.len(),
        describe(&outcome.untrained),
        describe(&outcome.best),
        args.out.display(),
        layer.version(),
        log_path.display()
    );
    Ok(())
}

fn describe(scores: &train::HeldOutScores) -> String {
    let mut parts = Vec::new();
    if let Some(s) = scores.sts_spearman {
        parts.push(format!("STS {s:.2}"));
    }
    if let Some(n) = scores.ndcg_at_10 {
        parts.push(format!("nDCG@10 {n:.2}"));
    }
    format!(
        "{} (margin over the best reference {:+.2})",
        parts.join(" / "),
        scores.selection
    )
}

fn reference_name(reference: Reference, names: &[String]) -> String {
    match reference {
        Reference::Slot(slot) => names[slot].clone(),
        Reference::Concatenation => "concatenation".to_string(),
    }
}

/// One line per epoch, and a live bar on a terminal: `epoch 3/12 [#####.....] loss 1.23`.
struct ProgressBar {
    max_epochs: usize,
    names: Vec<String>,
    steps: usize,
    terminal: bool,
    running_loss: f64,
}

impl ProgressBar {
    fn new(max_epochs: usize, names: Vec<String>) -> Self {
        ProgressBar {
            max_epochs,
            names,
            steps: 1,
            terminal: std::io::stderr().is_terminal(),
            running_loss: 0.0,
        }
    }

    fn show(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Start {
                held_out,
                references,
                steps_per_epoch,
            } => {
                self.steps = (*steps_per_epoch).max(1);
                for (reference, scores) in references {
                    eprintln!(
                        "reference {}: held-out {}",
                        reference_name(*reference, &self.names),
                        describe(scores)
                    );
                }
                eprintln!("epoch 0 (untrained): held-out {}", describe(held_out));
            }
            TrainEvent::Step { epoch, step, loss } => {
                self.running_loss = if *step == 0 {
                    *loss
                } else {
                    0.9 * self.running_loss + 0.1 * loss
                };
                if self.terminal {
                    let filled = (step + 1) * 30 / self.steps;
                    eprint!(
                        "\repoch {epoch}/{} [{}{}] loss {:.4}   ",
                        self.max_epochs,
                        "#".repeat(filled),
                        ".".repeat(30 - filled.min(30)),
                        self.running_loss
                    );
                }
            }
            TrainEvent::Epoch {
                epoch,
                mean_loss,
                held_out,
                best,
            } => {
                if self.terminal {
                    eprint!("\r");
                }
                eprintln!(
                    "epoch {epoch}/{}: loss {mean_loss:.4}, held-out {}{}",
                    self.max_epochs,
                    describe(held_out),
                    if *best { " (best)" } else { "" }
                );
            }
        }
    }
}
