//! `embedfleet bench run`: the fleet perf harness. A dataset (a tier, or a trace), modes (cold,
//! warm), load points (closed-loop concurrencies and batch sizes, open-loop rates), one
//! measurement per mode × point; then the table, `latest.json`, `latest.txt`, `report.html`,
//! and the baseline gate, whose verdict is the exit code (3 on a severe regression).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use embedfleet_client::{ClientError, EmbedClient};

use super::dataset::{Dataset, Tier};
use super::drive::{check_reply, run_point, Budget, RequestSource};
use super::gate::{self, Baseline, Level};
use super::html;
use super::report::{self, RunReport, REPORT_SCHEMA};
use super::resources::Sampler;
use super::stats::{Load, LoopKind, PointResult};
use super::target::{flush_redis, Fleet, TargetArgs};
use super::SevereRegression;
use crate::fleet_args;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Synthetic dataset, and the load it runs unless flags below say otherwise.
    #[arg(long, value_enum, default_value_t = Tier::Small)]
    pub tier: Tier,
    /// A JSONL file of embed.v1 requests (one JSON request per line) replacing the synthetic
    /// dataset; each is sent as recorded (its models, inputs, options), cycling.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Models of the synthetic requests and of the embedded fleet [default: the tier's].
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Cache modes to run, in this order: `cold` (nothing cached: flushed Redis with
    /// --redis-url, inputs no cache has seen) and `warm` (every input primed first).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Cold, Mode::Warm])]
    pub modes: Vec<Mode>,
    /// Closed-loop client counts, swept at the first batch size [default: the tier's].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: Option<Vec<u64>>,
    /// Inputs per request, swept at the first concurrency [default: the tier's].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch: Option<Vec<u64>>,
    /// Open-loop arrival rates in requests/s (at the first batch size); none: no open loop.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Open loop: requests in flight at most; one due past it counts as an error.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_in_flight: u64,
    /// Run only the open-loop points.
    #[arg(long)]
    pub no_closed: bool,
    /// Measured requests per load point [default: the tier's].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub requests: Option<u64>,
    /// Stop a load point after this many seconds even if requests are left.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Unmeasured requests before each load point [default: the tier's].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed of the synthetic texts [default: the tier's fixed seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Do not ask the fleet for its stage timings (reply metadata).
    #[arg(long)]
    pub no_timings: bool,
    /// Interval of the /proc sampling, ms.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub sample_ms: u64,
    /// Directory for latest.json, latest.txt and report.html.
    #[arg(long, default_value = "target/bench-fleet")]
    pub out: PathBuf,
    /// The baseline the run is compared with (skipped, with a note, when the file is absent).
    #[arg(long, default_value = "benches/baseline.json")]
    pub baseline: PathBuf,
    /// Do not compare with the baseline.
    #[arg(long)]
    pub no_gate: bool,
    /// Record this run's figures in the baseline file (groups it did not run are kept).
    #[arg(long)]
    pub write_baseline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    Cold,
    Warm,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Warm => "warm",
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let defaults = args.tier.defaults();
    let models = args
        .models
        .clone()
        .unwrap_or_else(|| defaults.models.split(',').map(String::from).collect());
    fleet_args::model_specs(&models)?;
    let dataset = Arc::new(match &args.trace {
        Some(path) => Dataset::trace(path)?,
        None => Dataset::synthetic(args.tier, models.clone(), args.seed),
    });
    if let Some(d) = args.duration_s {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration-s must be a positive number of seconds, not {d}");
        }
    }
    if let Some(bad) = args.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rate must be positive requests per second, not {bad}");
    }
    let points = load_points(&args, defaults.concurrency, defaults.batch);
    if points.is_empty() {
        bail!("nothing to run: --no-closed needs at least one --rate");
    }
    let mut modes = args.modes.clone();
    modes.sort();
    modes.dedup();
    let budget = Budget {
        requests: args.requests.unwrap_or(defaults.requests),
        duration: args.duration_s.map(Duration::from_secs_f64),
    };
    let warmup = args.warmup.unwrap_or(defaults.warmup);
    let fleet = Fleet::open(&args.target, &models)?;
    let run_id = super::run_id();

    let results = fleet_args::runtime()?.block_on(async {
        let clients = fleet.clients(&args.target).await?;
        probe(&clients[0], &dataset, &fleet.url).await?;
        eprintln!(
            "embedfleet bench run: nats={} dataset={} ({}) modes={} points={} requests={} run={run_id}",
            fleet.url,
            dataset.name(),
            dataset.len(),
            modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(","),
            points.len(),
            budget.requests,
        );
        let mut results = Vec::new();
        for mode in &modes {
            if let (Mode::Cold, Some(url)) = (mode, &args.target.redis_url) {
                flush_redis(url).await?;
            }
            for load in &points {
                let ctx = PointContext {
                    clients: &clients,
                    dataset: &dataset,
                    fleet: &fleet,
                    run_id: &run_id,
                    timed: !args.no_timings,
                    sample: Duration::from_millis(args.sample_ms),
                };
                results.push(ctx.measure(*mode, load, budget, warmup).await);
            }
        }
        anyhow::Ok(results)
    })?;
    let embedded = fleet.embedded();
    // Stop an embedded fleet before writing: its shutdown is not part of any figure.
    drop(fleet);
    finish(&args, &dataset, models, embedded, results)
}

/// Closed loop: the concurrencies at the first batch size, then the other batch sizes at the
/// first concurrency; open loop: each rate at the first batch size.
fn load_points(args: &RunArgs, tier_c: &[usize], tier_b: &[usize]) -> Vec<Load> {
    let to_usize = |v: &Vec<u64>| v.iter().map(|&x| x as usize).collect::<Vec<_>>();
    let concurrency = args.concurrency.as_ref().map_or(tier_c.to_vec(), to_usize);
    let batch = args.batch.as_ref().map_or(tier_b.to_vec(), to_usize);
    let (c0, b0) = (concurrency[0], batch[0]);
    let mut points = Vec::new();
    let closed = |concurrency, batch| Load {
        kind: LoopKind::Closed,
        concurrency,
        batch,
        rate: None,
    };
    if !args.no_closed {
        for &c in &concurrency {
            points.push(closed(c, b0));
        }
        for &b in batch.iter().skip(1) {
            points.push(closed(c0, b));
        }
    }
    for &rate in &args.rate {
        points.push(Load {
            kind: LoopKind::Open,
            concurrency: args.max_in_flight as usize,
            batch: b0,
            rate: Some(rate),
        });
    }
    points.dedup();
    points
}

/// What every load point of a run shares.
pub struct PointContext<'a> {
    pub clients: &'a [EmbedClient],
    pub dataset: &'a Arc<Dataset>,
    pub fleet: &'a Fleet,
    pub run_id: &'a str,
    pub timed: bool,
    pub sample: Duration,
}

impl PointContext<'_> {
    /// Warm-up (cold: on inputs of their own; warm: the point's own requests, which primes the
    /// cache), then the measured requests with /proc sampling.
    pub async fn measure(
        &self,
        mode: Mode,
        load: &Load,
        budget: Budget,
        warmup: u64,
    ) -> PointResult {
        let label = load.label();
        let salt = match mode {
            Mode::Cold => Some(format!("{}-{label}", self.run_id)),
            Mode::Warm => None,
        };
        // Unmeasured, so closed loop, and at most 16 at once: an open-loop point's in-flight
        // cap (hundreds) is no concurrency to prime a cache with.
        let closed = Load {
            kind: LoopKind::Closed,
            concurrency: load.concurrency.min(16),
            ..load.clone()
        };
        let prime = match mode {
            Mode::Cold => warmup,
            // Every input the point will send, once; the requests cycle through the dataset.
            Mode::Warm => budget.requests.min(self.cycle(load.batch)).max(warmup),
        };
        if prime > 0 {
            let warm_salt = salt.as_ref().map(|s| format!("{s}-warmup"));
            let source = self.source(load.batch, warm_salt);
            let prime_budget = Budget {
                requests: prime,
                duration: None,
            };
            let _ = run_point(self.clients, source, &closed, prime_budget, false).await;
        }
        let sampler = Sampler::start(self.fleet.pids.clone(), self.sample);
        let source = self.source(load.batch, salt);
        let (samples, wall) = run_point(self.clients, source, load, budget, self.timed).await;
        let resources = sampler.finish();
        let mut result = PointResult::new(mode.name(), load.clone(), samples, wall);
        result.resources = resources.processes;
        result.gpus = resources.gpus;
        eprintln!(
            "{:<5} {:<16} {} requests, {} errors, {:.1} items/s",
            result.mode,
            result.label,
            result.requests,
            result.error_count(),
            result.items_per_s
        );
        result
    }

    /// Requests after which the point's requests repeat their inputs.
    fn cycle(&self, batch: usize) -> u64 {
        match &**self.dataset {
            Dataset::Synthetic { texts, .. } => texts.len().div_ceil(batch.max(1)) as u64,
            Dataset::Trace { requests, .. } => requests.len() as u64,
        }
    }

    fn source(&self, batch: usize, salt: Option<String>) -> RequestSource {
        let dataset = self.dataset.clone();
        Arc::new(move |n| dataset.request(n, batch, salt.as_deref()))
    }
}

/// One request before the clock starts: the fleet answers, serves the models, and has built the
/// fusion layer of the set.
pub async fn probe(client: &EmbedClient, dataset: &Dataset, url: &str) -> anyhow::Result<()> {
    let request = dataset.request(0, 1, Some("probe"));
    let inputs = super::dataset::items(&request);
    match client.embed(&request).await {
        Ok(reply) => check_reply(&reply, inputs, request.fuse).map_err(anyhow::Error::msg),
        Err(ClientError::NoResponders) => bail!(
            "no embedfleet service answers on {url}: start one with `embedfleet serve` (it \
             prints the URL), or leave out --nats-url to have this command start one"
        ),
        Err(error) => Err(error).context("the probe request failed"),
    }
}

fn finish(
    args: &RunArgs,
    dataset: &Dataset,
    models: Vec<String>,
    embedded: bool,
    points: Vec<PointResult>,
) -> anyhow::Result<()> {
    let tier = dataset.name().to_string();
    let entries = gate::entries_of(&tier, &points);
    let baseline = read_baseline(&args.baseline)?;
    let gate = match (&baseline, args.no_gate) {
        (Some(baseline), false) => Some(gate::compare(baseline, &entries)),
        (None, false) => {
            eprintln!(
                "embedfleet bench run: no baseline at {}; gate skipped",
                args.baseline.display()
            );
            None
        }
        (_, true) => None,
    };
    let mut report = RunReport {
        schema: REPORT_SCHEMA,
        dataset: tier,
        dataset_size: dataset.len(),
        models,
        fleet: if embedded { "embedded" } else { "external" }.to_string(),
        encoding: if args.target.json { "json" } else { "msgpack" }.to_string(),
        stage_timings: !args.no_timings,
        recorded: report::recorded(),
        knees: report::knees(&points),
        points,
        gate,
    };
    let text = report::table(&report);
    print!("{text}");
    write_outputs(&args.out, &report, &text)?;
    if args.write_baseline {
        let updated = Baseline::updated(baseline, entries, report.recorded.clone());
        let json = serde_json::to_string_pretty(&updated)? + "\n";
        std::fs::write(&args.baseline, json)
            .with_context(|| format!("cannot write {}", args.baseline.display()))?;
        eprintln!(
            "embedfleet bench run: baseline written to {}",
            args.baseline.display()
        );
    }
    match report.gate.take() {
        Some(gate) if gate.worst() == Level::Severe && !args.write_baseline => {
            let severe = gate
                .findings
                .iter()
                .filter(|f| f.level == Level::Severe)
                .count();
            Err(SevereRegression(format!(
                "{severe} severe regression(s) against {} (see above)",
                args.baseline.display()
            ))
            .into())
        }
        _ => Ok(()),
    }
}

fn read_baseline(path: &Path) -> anyhow::Result<Option<Baseline>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Baseline::parse(&text)
            .with_context(|| format!("{} is not a baseline", path.display()))
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_outputs(out: &Path, report: &RunReport, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)? + "\n";
    let title = format!("embedfleet bench run: {}", report.dataset);
    let html = html::page(&title, &html::run_charts(report), text).map_err(anyhow::Error::msg)?;
    for (name, body) in [
        ("latest.json", &json),
        ("latest.txt", &text.to_string()),
        ("report.html", &html),
    ] {
        let path = out.join(name);
        std::fs::write(&path, body).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "embedfleet bench run: wrote {0}/latest.json, {0}/latest.txt, {0}/report.html",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(extra.iter().copied()))
            .expect("parses")
            .run
    }

    #[test]
    fn points_sweep_concurrency_then_batch_then_rates() {
        let a = args(&[
            "--concurrency",
            "1,4,16",
            "--batch",
            "1,32",
            "--rate",
            "5,10",
        ]);
        let labels: Vec<String> = load_points(&a, &[9], &[9])
            .iter()
            .map(Load::label)
            .collect();
        assert_eq!(
            labels,
            [
                "closed-c1-b1",
                "closed-c4-b1",
                "closed-c16-b1",
                "closed-c1-b32",
                "open-r5-b1",
                "open-r10-b1"
            ]
        );
        let tier = load_points(&args(&[]), &[1, 4], &[1, 8]);
        let labels: Vec<String> = tier.iter().map(Load::label).collect();
        assert_eq!(labels, ["closed-c1-b1", "closed-c4-b1", "closed-c1-b8"]);
        assert!(load_points(&args(&["--no-closed"]), &[1], &[1]).is_empty());
    }

    #[test]
    fn bad_numbers_are_refused_by_the_parser() {
        let parse =
            |a: &[&str]| Cli::try_parse_from(std::iter::once("run").chain(a.iter().copied()));
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--batch", "1,x"]).is_err());
        assert!(parse(&["--modes", "tepid"]).is_err());
    }
}
