//! `embedfleet fusion`: prepare labelled pair data, fill the partial cache, and train the
//! FuseMoE layer on pairs (`fusion train`, see `fusion_train.rs`).
//!
//! - `fusion prepare-sts CSV --out F [--held-out F --held-out-fraction X --seed S]`: the STS
//!   Benchmark CSV as scored pairs, optionally with a seeded held-out part for model selection.
//! - `fusion prepare-beir DIR --out-dir D [--validation X --test Y --seed S --max-doc-words N]`:
//!   a BEIR set (queries split by a seeded hash of their id) as training retrieval pairs plus
//!   BEIR directories for the validation and test queries.
//! - `fusion partials`: embeds every text of the given files once into the partial cache.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use embedfleet_proto::InputType;

use crate::pair_data::{self, BeirSet};
use crate::partial_cache::{PartialCache, PartialSource};
use crate::partial_fleet::FleetPartials;
use crate::security_args::NatsSecurityArgs;

#[derive(Args)]
pub struct FusionArgs {
    #[command(subcommand)]
    command: FusionCommand,
}

#[derive(Subcommand)]
enum FusionCommand {
    /// STS Benchmark CSV (sentence1,sentence2,score) → scored-pair JSONL, with a seeded
    /// held-out part.
    PrepareSts(PrepareStsArgs),
    /// BEIR corpus/queries/qrels → training retrieval pairs + validation/test BEIR directories.
    PrepareBeir(PrepareBeirArgs),
    /// Embed every text of pair files and BEIR directories into the partial cache.
    Partials(PartialsArgs),
    /// Train the fusion layer on pair files (partials from the cache).
    Train(crate::fusion_train::TrainArgs),
}

#[derive(Args)]
struct PrepareStsArgs {
    /// The CSV file (no header).
    csv: PathBuf,
    /// Where the (training part of the) pairs go.
    #[arg(long)]
    out: PathBuf,
    /// Where the held-out pairs go; without it, every pair goes to --out.
    #[arg(long)]
    held_out: Option<PathBuf>,
    #[arg(long, default_value_t = 0.1)]
    held_out_fraction: f64,
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Keep at most N pairs, evenly spaced (of the training part, after the seeded split);
    /// bounds embedding time.
    #[arg(long)]
    max_pairs: Option<usize>,
}

#[derive(Args)]
struct PrepareBeirArgs {
    /// BEIR directory (corpus.jsonl and the files below).
    dir: PathBuf,
    /// Queries file inside DIR.
    #[arg(long, default_value = "queries-train.jsonl")]
    queries: String,
    /// Qrels file inside DIR.
    #[arg(long, default_value = "qrels/train.tsv")]
    qrels: String,
    #[arg(long)]
    out_dir: PathBuf,
    /// Share of the queries held out for model selection (early stopping).
    #[arg(long, default_value_t = 0.15)]
    validation: f64,
    /// Share of the queries held out for the final evaluation.
    #[arg(long, default_value_t = 0.25)]
    test: f64,
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Keep the first N words of each document (title + text); bounds embedding time.
    #[arg(long)]
    max_doc_words: Option<usize>,
    /// Keep at most N documents: every document relevant to a query, then an even sample of
    /// the others, evenly spaced; bounds embedding time (retrieval gets easier with fewer distractors).
    #[arg(long)]
    max_corpus: Option<usize>,
}

#[derive(Args)]
pub struct PartialsArgs {
    /// Scored-pair files (JSONL).
    #[arg(long)]
    scored: Vec<PathBuf>,
    /// Retrieval-pair files (JSONL).
    #[arg(long)]
    retrieval: Vec<PathBuf>,
    /// BEIR directories (corpus.jsonl, queries.jsonl, qrels.tsv).
    #[arg(long)]
    beir: Vec<PathBuf>,
    #[command(flatten)]
    pub common: CacheArgs,
}

/// Where partials come from: the models and the cache directory.
#[derive(Args, Clone)]
pub struct CacheArgs {
    /// Models, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    pub models: Vec<String>,
    /// Partial cache directory.
    #[arg(long, default_value = "target/partials")]
    pub cache_dir: PathBuf,
    /// Directory with one checkpoint directory per model.
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Weight dtype of every model (`q8_0`) or per model (`mpnet=q4k`) [default: f32]. Each
    /// dtype has its own partials (the revision names it), so dtypes can be compared.
    #[arg(long, conflicts_with = "nats_url")]
    pub dtype: Option<embedfleet_models::ModelDtypes>,
    /// Compute missing partials on the fleet behind this NATS server (`embedfleet serve`, or
    /// workers on GPUs) instead of in this process; they are cached under the revisions its
    /// workers announce. --model-dir and --dtype are then the fleet's business.
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Credentials and TLS for --nats-url.
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,
}

impl CacheArgs {
    pub fn open(&self) -> anyhow::Result<PartialCache> {
        let source = match &self.nats_url {
            Some(url) => PartialSource::Fleet(Box::new(FleetPartials::connect(
                url,
                &self.nats_security.security()?,
            )?)),
            None => PartialSource::InProcess {
                model_dir: self.model_dir.clone(),
                dtypes: self.dtype.clone().unwrap_or_default(),
            },
        };
        PartialCache::open(&self.cache_dir, &self.models, source)
    }
}

pub fn run(args: FusionArgs) -> anyhow::Result<()> {
    match args.command {
        FusionCommand::PrepareSts(a) => prepare_sts(a),
        FusionCommand::PrepareBeir(a) => prepare_beir(a),
        FusionCommand::Partials(a) => partials(a),
        FusionCommand::Train(a) => crate::fusion_train::run(a),
    }
}

fn prepare_sts(args: PrepareStsArgs) -> anyhow::Result<()> {
    let pairs = pair_data::read_sts_csv(&args.csv)?;
    // The sample is drawn after the held-out split, from the training part only, so the
    // held-out pairs do not depend on --max-pairs.
    let sample = |pairs: &[pair_data::ScoredPair]| match args.max_pairs {
        Some(max) => pair_data::even_sample(pairs, max),
        None => pairs.to_vec(),
    };
    let Some(held_out_path) = &args.held_out else {
        let pairs = sample(&pairs);
        pair_data::write_jsonl(&args.out, &pairs)?;
        println!("{} pairs → {}", pairs.len(), args.out.display());
        return Ok(());
    };
    let mut parts = pair_data::seeded_split(
        &pairs,
        |p| format!("{}\u{0}{}", p.a, p.b),
        &[args.held_out_fraction],
        args.seed,
        &args.csv.display().to_string(),
    )?;
    parts[0] = sample(&parts[0]);
    pair_data::write_jsonl(&args.out, &parts[0])?;
    pair_data::write_jsonl(held_out_path, &parts[1])?;
    println!(
        "{} pairs → {} (train {}), {} (held out {})",
        pairs.len(),
        args.out.display(),
        parts[0].len(),
        held_out_path.display(),
        parts[1].len()
    );
    Ok(())
}

fn prepare_beir(args: PrepareBeirArgs) -> anyhow::Result<()> {
    let mut set = BeirSet::load_files(
        &args.dir.join("corpus.jsonl"),
        &args.dir.join(&args.queries),
        &args.dir.join(&args.qrels),
        args.max_doc_words,
    )?;
    if let Some(max) = args.max_corpus {
        set.corpus = pair_data::corpus_sample(&set, max);
    }
    let parts = pair_data::seeded_split(
        &set.queries,
        |(id, _)| id.clone(),
        &[args.validation, args.test],
        args.seed,
        &args.dir.join(&args.queries).display().to_string(),
    )?;
    let train_pairs = pair_data::retrieval_pairs(&set, &parts[0]);
    pair_data::write_jsonl(&args.out_dir.join("train-pairs.jsonl"), &train_pairs)?;
    for (name, queries) in [("validation", &parts[1]), ("test", &parts[2])] {
        pair_data::write_beir(&args.out_dir.join(name), &set.corpus, queries, &set.qrels)?;
    }
    println!(
        "{} documents; queries: train {} ({} pairs), validation {}, test {} → {}",
        set.corpus.len(),
        parts[0].len(),
        train_pairs.len(),
        parts[1].len(),
        parts[2].len(),
        args.out_dir.display()
    );
    Ok(())
}

fn partials(args: PartialsArgs) -> anyhow::Result<()> {
    let mut cache = args.common.open()?;
    for path in &args.scored {
        let pairs = pair_data::read_scored(path)?;
        let texts = pair_data::distinct(pairs.iter().flat_map(|p| [p.a.as_str(), p.b.as_str()]));
        cache.fill(&texts, InputType::Document, &path.display().to_string())?;
    }
    for path in &args.retrieval {
        let pairs = pair_data::read_retrieval(path)?;
        let queries = pair_data::distinct(pairs.iter().map(|p| p.query.as_str()));
        cache.fill(&queries, InputType::Query, &path.display().to_string())?;
        let docs = pair_data::distinct(
            pairs
                .iter()
                .flat_map(|p| std::iter::once(p.positive.as_str()).chain(p.negative.as_deref())),
        );
        cache.fill(&docs, InputType::Document, &path.display().to_string())?;
    }
    for dir in &args.beir {
        let set = BeirSet::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        let queries: Vec<String> = set.queries.iter().map(|(_, t)| t.clone()).collect();
        cache.fill(&queries, InputType::Query, &dir.display().to_string())?;
        let docs: Vec<String> = set.corpus.iter().map(|(_, t)| t.clone()).collect();
        cache.fill(&docs, InputType::Document, &dir.display().to_string())?;
    }
    Ok(())
}
