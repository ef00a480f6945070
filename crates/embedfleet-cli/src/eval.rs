//! `embedfleet eval`: STS (Spearman ×100 of cosine) on scored pair files and BEIR retrieval
//! (nDCG@10, Recall@100) on corpus/queries/qrels directories, for every model's own partial,
//! their normalised concatenation and the fused vector, as one table on stdout (and JSON with
//! `--json`).
//!
//! Partials come from the partial cache (`fusion_cmd::CacheArgs`), so a second evaluation embeds
//! nothing. Fused vectors come from the real FuseMoE forward. Search is exact (one matrix
//! product per block of queries, `embedfleet_fusion::metrics`). `--dims` adds Matryoshka
//! prefixes of the fused vector; `--binary-rescore` adds sign-bit (Hamming) search over the
//! fused vector with a float rescore of the top 100.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use embedfleet_fusion::metrics::{self, Matrix};
use embedfleet_fusion::{FuseMoe, FuseMoeConfig};
use embedfleet_proto::output::quantize_int8;
use embedfleet_proto::InputType;
use serde::Serialize;

use crate::fusion_cmd::CacheArgs;
use crate::pair_data::{self, BeirSet};
use crate::partial_cache::PartialCache;

#[derive(Args)]
pub struct EvalArgs {
    /// Scored-pair files (JSONL `{"a","b","score"}`), each an STS task.
    #[arg(long)]
    sts: Vec<PathBuf>,
    /// BEIR directories (corpus.jsonl, queries.jsonl, qrels.tsv), each a retrieval task.
    #[arg(long)]
    beir: Vec<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Fusion weights to evaluate; without it, the default for the model set (the shipped
    /// trained weights for minilm + mpnet, else the seeded layer).
    #[arg(long, env = "EMBEDFLEET_FUSION_WEIGHTS")]
    fusion_weights: Option<PathBuf>,
    /// Also evaluate the seeded (untrained) layer.
    #[arg(long)]
    with_seeded: bool,
    /// Matryoshka prefixes of the fused vector to evaluate too, comma-separated.
    #[arg(long, value_delimiter = ',')]
    dims: Vec<usize>,
    /// Retrieval with the fused vector's sign bits, float rescore of the top 100.
    #[arg(long)]
    binary_rescore: bool,
    /// Also score the fused vector as `encoding_format: int8` sends it (integer vectors, the
    /// wire's calibration), at full width and at each of --dims.
    #[arg(long)]
    int8: bool,
    /// Write the table as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One task's texts and gold labels.
enum Task {
    Sts {
        name: String,
        a: Vec<String>,
        b: Vec<String>,
        gold: Vec<f64>,
    },
    Retrieval {
        name: String,
        set: BeirSet,
    },
}

/// A way of turning partials into one vector per text.
#[derive(Clone)]
enum System<'a> {
    Single {
        slot: usize,
        name: String,
    },
    Concatenation,
    Fused {
        label: String,
        layer: &'a FuseMoe,
        dims: Option<usize>,
    },
    /// The fused vector (cut to `dims`) as int8 codes, cast back to floats.
    Int8 {
        label: String,
        layer: &'a FuseMoe,
        dims: Option<usize>,
    },
}

impl System<'_> {
    fn label(&self) -> String {
        match self {
            System::Single { name, .. } => name.clone(),
            System::Concatenation => "concatenation".into(),
            System::Fused {
                label, dims: None, ..
            } => label.clone(),
            System::Fused {
                label,
                dims: Some(d),
                ..
            } => format!("{label} @{d}"),
            System::Int8 { label, dims, .. } => match dims {
                None => format!("{label} int8"),
                Some(d) => format!("{label} int8 @{d}"),
            },
        }
    }
}

#[derive(Serialize)]
struct Row {
    system: String,
    dims: usize,
    /// Task name → metric name → score ×100.
    scores: Vec<(String, String, f64)>,
}

#[derive(Serialize)]
struct Report {
    models: Vec<String>,
    fusion_version: String,
    rows: Vec<Row>,
    /// Share of routes (top-k choices) per expert over every text evaluated.
    expert_use: Vec<f64>,
    /// With `--int8`: share of full-width int8 components clamped at ±127 (the calibration's
    /// check, docs/protocol.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    int8_clipped: Option<f64>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.sts.is_empty() || !args.beir.is_empty(),
        "nothing to evaluate: pass --sts FILE and/or --beir DIR"
    );
    if let Some(&bad) = args.dims.iter().find(|&&d| d == 0) {
        anyhow::bail!("--dims: {bad} is not a width");
    }
    let mut tasks = Vec::new();
    for path in &args.sts {
        let pairs = pair_data::read_scored(path)?;
        tasks.push(Task::Sts {
            name: file_label(path),
            a: pairs.iter().map(|p| p.a.clone()).collect(),
            b: pairs.iter().map(|p| p.b.clone()).collect(),
            gold: pairs.iter().map(|p| p.score).collect(),
        });
    }
    for dir in &args.beir {
        let set = BeirSet::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        tasks.push(Task::Retrieval {
            name: file_label(dir),
            set,
        });
    }

    let mut cache = args.cache.open()?;
    for task in &tasks {
        match task {
            Task::Sts { name, a, b, .. } => {
                let texts = pair_data::distinct(a.iter().chain(b).map(String::as_str));
                cache.fill(&texts, InputType::Document, name)?;
            }
            Task::Retrieval { name, set } => {
                let queries: Vec<String> = set.queries.iter().map(|(_, t)| t.clone()).collect();
                cache.fill(&queries, InputType::Query, name)?;
                let docs: Vec<String> = set.corpus.iter().map(|(_, t)| t.clone()).collect();
                cache.fill(&docs, InputType::Document, name)?;
            }
        }
    }

    let config = FuseMoeConfig::for_input_dims(cache.dims());
    let names: Vec<String> = cache.specs().iter().map(|s| s.name.to_string()).collect();
    let trained = crate::default_fusion::layer(&names, args.fusion_weights.as_deref(), &config)?;
    let seeded = if args.with_seeded {
        Some(FuseMoe::from_seed(
            config.clone(),
            embedfleet_fleet::DEFAULT_FUSION_SEED,
        )?)
    } else {
        None
    };

    let mut systems: Vec<System> = names
        .iter()
        .enumerate()
        .map(|(slot, name)| System::Single {
            slot,
            name: name.clone(),
        })
        .collect();
    if names.len() > 1 {
        systems.push(System::Concatenation);
    }
    if let Some(layer) = &seeded {
        systems.push(System::Fused {
            label: "fused (seeded)".into(),
            layer,
            dims: None,
        });
    }
    let fused_label = if trained.trained {
        "fused (trained)"
    } else {
        "fused (seeded)"
    };
    if !(args.with_seeded && !trained.trained) {
        systems.push(System::Fused {
            label: fused_label.into(),
            layer: &trained.layer,
            dims: None,
        });
    }
    for &d in &args.dims {
        systems.push(System::Fused {
            label: fused_label.into(),
            layer: &trained.layer,
            dims: Some(d),
        });
    }
    if args.int8 {
        for dims in std::iter::once(None).chain(args.dims.iter().map(|&d| Some(d))) {
            systems.push(System::Int8 {
                label: fused_label.into(),
                layer: &trained.layer,
                dims,
            });
        }
    }

    let mut expert_routes = vec![0usize; config.num_experts];
    // (clipped, total) int8 components of the full-width fused vectors, with --int8.
    let mut clipping = (0usize, 0usize);
    let full_fused = System::Fused {
        label: String::new(),
        layer: &trained.layer,
        dims: None,
    };
    let mut count_clips = |m: &Matrix| {
        if args.int8 {
            for i in 0..m.rows {
                let q = quantize_int8(m.row(i));
                clipping.0 += q.iter().filter(|v| v.unsigned_abs() == 127).count();
                clipping.1 += q.len();
            }
        }
    };
    let mut rows: Vec<Row> = systems
        .iter()
        .map(|s| Row {
            system: s.label(),
            dims: 0,
            scores: Vec::new(),
        })
        .collect();
    let mut binary_row = Row {
        system: format!("{fused_label} binary+rescore"),
        dims: config.output_dim,
        scores: Vec::new(),
    };
    for task in &tasks {
        match task {
            Task::Sts { name, a, b, gold } => {
                let va = Vectors::new(
                    &cache,
                    a,
                    InputType::Document,
                    &trained.layer,
                    &mut expert_routes,
                )?;
                let vb = Vectors::new(
                    &cache,
                    b,
                    InputType::Document,
                    &trained.layer,
                    &mut expert_routes,
                )?;
                count_clips(&va.matrix(&full_fused)?);
                count_clips(&vb.matrix(&full_fused)?);
                for (system, row) in systems.iter().zip(&mut rows) {
                    let (ma, mb) = (va.matrix(system)?, vb.matrix(system)?);
                    row.dims = ma.cols;
                    let score = metrics::sts_spearman(&ma, &mb, gold);
                    row.scores.push((name.clone(), "spearman".into(), score));
                }
            }
            Task::Retrieval { name, set } => {
                let query_texts: Vec<String> = set.queries.iter().map(|(_, t)| t.clone()).collect();
                let doc_texts: Vec<String> = set.corpus.iter().map(|(_, t)| t.clone()).collect();
                let vq = Vectors::new(
                    &cache,
                    &query_texts,
                    InputType::Query,
                    &trained.layer,
                    &mut expert_routes,
                )?;
                let vd = Vectors::new(
                    &cache,
                    &doc_texts,
                    InputType::Document,
                    &trained.layer,
                    &mut expert_routes,
                )?;
                let query_ids: Vec<String> = set.queries.iter().map(|(id, _)| id.clone()).collect();
                let doc_ids: Vec<String> = set.corpus.iter().map(|(id, _)| id.clone()).collect();
                count_clips(&vq.matrix(&full_fused)?);
                count_clips(&vd.matrix(&full_fused)?);
                for (system, row) in systems.iter().zip(&mut rows) {
                    let (mq, md) = (vq.matrix(system)?, vd.matrix(system)?);
                    row.dims = mq.cols;
                    let rankings = metrics::top_k_search(&mq, &md, 100);
                    let s = metrics::retrieval_scores(&rankings, &doc_ids, &query_ids, &set.qrels);
                    row.scores
                        .push((name.clone(), "ndcg@10".into(), s.ndcg_at_10));
                    row.scores
                        .push((name.clone(), "recall@100".into(), s.recall_at_100));
                }
                if args.binary_rescore {
                    let (mq, md) = (vq.matrix(&full_fused)?, vd.matrix(&full_fused)?);
                    let rankings = crate::quantized_search::binary_then_rescore(&mq, &md, 100);
                    let s = metrics::retrieval_scores(&rankings, &doc_ids, &query_ids, &set.qrels);
                    binary_row
                        .scores
                        .push((name.clone(), "ndcg@10".into(), s.ndcg_at_10));
                    binary_row
                        .scores
                        .push((name.clone(), "recall@100".into(), s.recall_at_100));
                }
            }
        }
    }
    if args.binary_rescore && !binary_row.scores.is_empty() {
        rows.push(binary_row);
    }
    let total_routes = expert_routes.iter().sum::<usize>().max(1) as f64;
    let report = Report {
        models: names,
        fusion_version: trained.layer.version(),
        rows,
        expert_use: expert_routes
            .iter()
            .map(|&c| c as f64 / total_routes)
            .collect(),
        int8_clipped: args
            .int8
            .then(|| clipping.0 as f64 / clipping.1.max(1) as f64),
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn file_label(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// One list of texts, as partials and as fused vectors.
struct Vectors {
    /// `partials[slot]`: one row per text, L2-normalised.
    partials: Vec<Matrix>,
    /// Fused vectors by layer version, computed on first use.
    fused: RefCell<HashMap<String, Matrix>>,
    rows: Vec<Vec<Vec<f32>>>,
}

impl Vectors {
    fn new(
        cache: &PartialCache,
        texts: &[String],
        input_type: InputType,
        routed: &FuseMoe,
        expert_routes: &mut [usize],
    ) -> anyhow::Result<Vectors> {
        let rows = cache.rows(texts, input_type)?;
        let slots = cache.dims().len();
        let partials = (0..slots)
            .map(|slot| {
                let vectors: Vec<Vec<f32>> = rows.iter().map(|r| r[slot].clone()).collect();
                Matrix::from_rows(&vectors).prefix_normalized(usize::MAX)
            })
            .collect();
        // Expert use of the layer being evaluated, over every text.
        for chunk in rows.chunks(512) {
            let slots: Vec<Vec<Option<&[f32]>>> = chunk
                .iter()
                .map(|r| r.iter().map(|p| Some(p.as_slice())).collect())
                .collect();
            for routing in routed.route_batch(&slots)? {
                for e in routing.selected {
                    expert_routes[e] += 1;
                }
            }
        }
        Ok(Vectors {
            partials,
            fused: RefCell::new(HashMap::new()),
            rows,
        })
    }

    fn fused(&self, layer: &FuseMoe) -> anyhow::Result<Matrix> {
        let mut data = Vec::new();
        for chunk in self.rows.chunks(256) {
            let slots: Vec<Vec<Option<&[f32]>>> = chunk
                .iter()
                .map(|r| r.iter().map(|p| Some(p.as_slice())).collect())
                .collect();
            for fused in layer.fuse_batch(&slots)? {
                data.extend(fused.embedding);
            }
        }
        Ok(Matrix {
            rows: self.rows.len(),
            cols: layer.config().output_dim,
            data,
        })
    }

    fn matrix(&self, system: &System) -> anyhow::Result<Matrix> {
        Ok(match system {
            System::Single { slot, .. } => self.partials[*slot].clone(),
            System::Concatenation => {
                let rows: Vec<Vec<f32>> = (0..self.rows.len())
                    .map(|i| {
                        self.partials
                            .iter()
                            .flat_map(|m| m.row(i).to_vec())
                            .collect()
                    })
                    .collect();
                Matrix::from_rows(&rows)
            }
            System::Fused { layer, dims, .. } => {
                let key = layer.version();
                let cached = self.fused.borrow().get(&key).cloned();
                let full = match cached {
                    Some(m) => m,
                    None => {
                        let m = self.fused(layer)?;
                        self.fused.borrow_mut().insert(key, m.clone());
                        m
                    }
                };
                match dims {
                    Some(d) => full.prefix_normalized(*d),
                    None => full,
                }
            }
            System::Int8 { label, layer, dims } => {
                let float = self.matrix(&System::Fused {
                    label: label.clone(),
                    layer,
                    dims: *dims,
                })?;
                int8_codes(&float)
            }
        })
    }
}

/// Each row as `encoding_format: int8` sends it (`embedfleet_proto::output`), as floats: cosine
/// and dot-product ranking of the codes is what a client computes.
fn int8_codes(m: &Matrix) -> Matrix {
    let mut data = Vec::with_capacity(m.data.len());
    for i in 0..m.rows {
        data.extend(quantize_int8(m.row(i)).iter().map(|&v| f32::from(v)));
    }
    let codes = Matrix {
        rows: m.rows,
        cols: m.cols,
        data,
    };
    codes.prefix_normalized(m.cols)
}

fn print_table(report: &Report) {
    let mut header = format!("{:<32} {:>5}", "system", "dims");
    let columns: Vec<(String, String)> = report
        .rows
        .iter()
        .flat_map(|r| r.scores.iter().map(|(t, m, _)| (t.clone(), m.clone())))
        .fold(Vec::new(), |mut acc, c| {
            if !acc.contains(&c) {
                acc.push(c);
            }
            acc
        });
    for (task, metric) in &columns {
        header.push_str(&format!(" {:>22}", format!("{task} {metric}")));
    }
    println!("{header}");
    for row in &report.rows {
        let mut line = format!("{:<32} {:>5}", row.system, row.dims);
        for (task, metric) in &columns {
            match row.scores.iter().find(|(t, m, _)| t == task && m == metric) {
                Some((_, _, v)) => line.push_str(&format!(" {v:>22.2}")),
                None => line.push_str(&format!(" {:>22}", "-")),
            }
        }
        println!("{line}");
    }
    let uses: Vec<String> = report
        .expert_use
        .iter()
        .enumerate()
        .map(|(e, u)| format!("{e}:{:.1}%", 100.0 * u))
        .collect();
    println!("expert use (share of routes): {}", uses.join(" "));
    if let Some(share) = report.int8_clipped {
        println!("int8 components clipped at ±127: {:.4}%", 100.0 * share);
    }
    println!("fusion version: {}", report.fusion_version);
}
