//! `embedfleet bench sweep`: capacity planning. Steps the open-loop arrival rate (or the
//! closed-loop concurrency) up by a factor until the round-trip p99 passes a target or errors
//! appear, then prints what the last passing step sustained, per worker, and the replicas a
//! target load needs: the figures for the Helm values (`replicas`) and the KEDA `lagThreshold`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, Tier};
use super::drive::Budget;
use super::html::{self, Chart};
use super::report;
use super::run::{probe, Mode, PointContext};
use super::stats::{round3, Load, LoopKind, PointResult};
use super::target::{Fleet, TargetArgs};
use crate::fleet_args;

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, value_enum, default_value_t = Tier::Small)]
    pub tier: Tier,
    /// JSONL trace of embed.v1 requests replacing the synthetic dataset.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Models of the synthetic requests and of the embedded fleet [default: the tier's].
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// What to step: `rate` (open loop, requests/s) or `concurrency` (closed-loop clients).
    #[arg(long, value_enum, default_value_t = SweepBy::Rate)]
    pub by: SweepBy,
    /// The round-trip p99 a step must stay under, ms.
    #[arg(long)]
    pub target_p99_ms: f64,
    /// First step's rate (requests/s) or concurrency.
    #[arg(long, default_value_t = 1.0)]
    pub start: f64,
    /// Each step multiplies the rate or concurrency by this (> 1).
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_steps: u32,
    /// Seconds of load per step.
    #[arg(long, default_value_t = 10.0)]
    pub step_seconds: f64,
    /// Inputs per request.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch: u64,
    /// Failed requests over requests a step may have and still pass.
    #[arg(long, default_value_t = 0.0)]
    pub max_error_rate: f64,
    /// Run warm (primed cache) instead of cold (every input a miss: what sizes the workers).
    #[arg(long)]
    pub warm: bool,
    /// Worker replicas per model in the fleet under test (an embedded fleet has 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: u64,
    /// Load to size for, in items/s: prints the worker replicas it needs.
    #[arg(long)]
    pub target_load: Option<f64>,
    /// Open loop: requests in flight at most.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_in_flight: u64,
    /// Directory for sweep.json, sweep.txt and sweep.html.
    #[arg(long, default_value = "target/bench-sweep")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepBy {
    Rate,
    Concurrency,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepReport {
    pub dataset: String,
    pub models: Vec<String>,
    pub mode: String,
    pub target_p99_ms: f64,
    pub max_error_rate: f64,
    pub recorded: std::collections::BTreeMap<String, String>,
    pub steps: Vec<PointResult>,
    pub capacity: Option<Capacity>,
}

/// What the sweep says about sizing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// The last passing step's label.
    pub at: String,
    pub sustainable_items_per_s: f64,
    pub sustainable_requests_per_s: f64,
    pub workers_under_test: u64,
    pub per_worker_items_per_s: f64,
    pub per_worker_requests_per_s: f64,
    /// Items/s to size for, and the worker replicas per model that takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_load_items_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_needed: Option<u64>,
    /// Jobs pending per replica that one worker clears within the p99 target: KEDA's
    /// `lagThreshold` for the worker's JetStream consumer.
    pub keda_lag_threshold: u64,
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    if !(args.factor.is_finite() && args.factor > 1.0) {
        bail!("--factor must be above 1, not {}", args.factor);
    }
    if !(args.start.is_finite() && args.start > 0.0) {
        bail!("--start must be positive, not {}", args.start);
    }
    if !(args.target_p99_ms.is_finite() && args.target_p99_ms > 0.0) {
        bail!("--target-p99-ms must be positive");
    }
    if !(args.step_seconds.is_finite() && args.step_seconds > 0.0) {
        bail!("--step-seconds must be positive");
    }
    let defaults = args.tier.defaults();
    let models = args
        .models
        .clone()
        .unwrap_or_else(|| defaults.models.split(',').map(String::from).collect());
    fleet_args::model_specs(&models)?;
    let dataset = Arc::new(match &args.trace {
        Some(path) => Dataset::trace(path)?,
        None => Dataset::synthetic(args.tier, models.clone(), None),
    });
    let mode = if args.warm { Mode::Warm } else { Mode::Cold };
    let fleet = Fleet::open(&args.target, &models)?;
    let run_id = super::run_id();
    let steps = fleet_args::runtime()?.block_on(async {
        let clients = fleet.clients(&args.target).await?;
        probe(&clients[0], &dataset, &fleet.url).await?;
        let ctx = PointContext {
            clients: &clients,
            dataset: &dataset,
            fleet: &fleet,
            run_id: &run_id,
            timed: false,
            sample: Duration::from_millis(250),
        };
        let mut steps = Vec::new();
        let mut value = args.start;
        for _ in 0..args.max_steps {
            let (load, budget) = step_load(&args, value);
            let point = ctx.measure(mode, &load, budget, defaults.warmup).await;
            let pass = passes(&point, args.target_p99_ms, args.max_error_rate);
            steps.push(point);
            if !pass {
                break;
            }
            value = next_value(args.by, value, args.factor);
        }
        anyhow::Ok(steps)
    })?;
    drop(fleet);

    let capacity = capacity(&steps, &args);
    let report = SweepReport {
        dataset: dataset.name().to_string(),
        models,
        mode: if args.warm { "warm" } else { "cold" }.to_string(),
        target_p99_ms: args.target_p99_ms,
        max_error_rate: args.max_error_rate,
        recorded: report::recorded(),
        steps,
        capacity,
    };
    let text = table(&report);
    print!("{text}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let chart_target = Some((
        format!("target p99 {} ms", args.target_p99_ms),
        args.target_p99_ms,
    ));
    let x = |p: &PointResult| match args.by {
        SweepBy::Rate => p.load.rate.unwrap_or(0.0),
        SweepBy::Concurrency => p.load.concurrency as f64,
    };
    let x_label = match args.by {
        SweepBy::Rate => "offered requests/s",
        SweepBy::Concurrency => "concurrency",
    };
    let charts = vec![
        Chart {
            title: "round-trip p99 by load".into(),
            x_label: x_label.into(),
            y_label: "ms".into(),
            series: vec![(
                "p99".into(),
                report
                    .steps
                    .iter()
                    .filter_map(|p| Some((x(p), p.steps.get("round_trip")?.p99_ms)))
                    .collect(),
            )],
            target: chart_target,
        },
        Chart {
            title: "throughput by load".into(),
            x_label: x_label.into(),
            y_label: "items/s".into(),
            series: vec![(
                "achieved".into(),
                report.steps.iter().map(|p| (x(p), p.items_per_s)).collect(),
            )],
            target: None,
        },
    ];
    let html = html::page("embedfleet bench sweep", &charts, &text).map_err(anyhow::Error::msg)?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    for (name, body) in [
        ("sweep.json", json),
        ("sweep.txt", text),
        ("sweep.html", html),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, body).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn step_load(args: &SweepArgs, value: f64) -> (Load, Budget) {
    let seconds = Duration::from_secs_f64(args.step_seconds);
    match args.by {
        SweepBy::Rate => (
            Load {
                kind: LoopKind::Open,
                concurrency: args.max_in_flight as usize,
                batch: args.batch as usize,
                rate: Some(round3(value)),
            },
            Budget {
                requests: (value * args.step_seconds).ceil().max(1.0) as u64,
                duration: None,
            },
        ),
        SweepBy::Concurrency => (
            Load {
                kind: LoopKind::Closed,
                concurrency: value.round().max(1.0) as usize,
                batch: args.batch as usize,
                rate: None,
            },
            Budget {
                requests: u64::MAX,
                duration: Some(seconds),
            },
        ),
    }
}

/// Concurrency steps are whole clients and always grow by at least one.
fn next_value(by: SweepBy, value: f64, factor: f64) -> f64 {
    match by {
        SweepBy::Rate => value * factor,
        SweepBy::Concurrency => (value * factor).round().max(value.round() + 1.0),
    }
}

/// A step passes when some request succeeded, p99 is within the target and errors within bound.
fn passes(point: &PointResult, target_p99_ms: f64, max_error_rate: f64) -> bool {
    let error_rate = point.error_count() as f64 / point.requests.max(1) as f64;
    match point.steps.get("round_trip") {
        Some(rt) => rt.p99_ms <= target_p99_ms && error_rate <= max_error_rate,
        None => false,
    }
}

fn capacity(steps: &[PointResult], args: &SweepArgs) -> Option<Capacity> {
    let best = steps
        .iter()
        .filter(|p| passes(p, args.target_p99_ms, args.max_error_rate))
        .max_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s))?;
    let workers = args.workers as f64;
    let per_worker_items = best.items_per_s / workers;
    let per_worker_requests = best.requests_per_s / workers;
    let replicas = args
        .target_load
        .map(|load| (load / per_worker_items.max(1e-9)).ceil().max(1.0) as u64);
    // One job per request per model: a backlog a worker clears within the latency target.
    let lag = (per_worker_requests * args.target_p99_ms / 1000.0)
        .floor()
        .max(1.0) as u64;
    Some(Capacity {
        at: best.label.clone(),
        sustainable_items_per_s: best.items_per_s,
        sustainable_requests_per_s: best.requests_per_s,
        workers_under_test: args.workers,
        per_worker_items_per_s: round3(per_worker_items),
        per_worker_requests_per_s: round3(per_worker_requests),
        target_load_items_per_s: args.target_load,
        replicas_needed: replicas,
        keda_lag_threshold: lag,
    })
}

fn table(report: &SweepReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "embedfleet bench sweep: dataset={} models={} mode={} target p99 {} ms, errors <= {}",
        report.dataset,
        report.models.join(","),
        report.mode,
        report.target_p99_ms,
        report.max_error_rate
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>6} {:>9} {:>10} {:>9} {:>9}  verdict",
        "load", "requests", "errors", "req/s", "items/s", "p50_ms", "p99_ms"
    );
    for p in &report.steps {
        let rt = p.steps.get("round_trip");
        let ok = passes(p, report.target_p99_ms, report.max_error_rate);
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>6} {:>9.1} {:>10.1} {:>9} {:>9}  {}",
            p.label,
            p.requests,
            p.error_count(),
            p.requests_per_s,
            p.items_per_s,
            rt.map_or("-".into(), |s| format!("{:.2}", s.p50_ms)),
            rt.map_or("-".into(), |s| format!("{:.2}", s.p99_ms)),
            if ok { "pass" } else { "FAIL" }
        );
    }
    match &report.capacity {
        None => {
            let _ = writeln!(
                out,
                "capacity: no step passed; lower --start or raise the target"
            );
        }
        Some(c) => {
            let _ = writeln!(
                out,
                "capacity: {:.1} items/s ({:.1} requests/s) sustained at {} with {} worker(s) \
                 per model\nper worker: {:.1} items/s, {:.1} requests/s",
                c.sustainable_items_per_s,
                c.sustainable_requests_per_s,
                c.at,
                c.workers_under_test,
                c.per_worker_items_per_s,
                c.per_worker_requests_per_s
            );
            if let (Some(load), Some(replicas)) = (c.target_load_items_per_s, c.replicas_needed) {
                let _ = writeln!(
                    out,
                    "for {load} items/s: {replicas} worker replicas per model (Helm: replicas / \
                     KEDA maxReplicaCount at least {replicas})"
                );
            }
            let _ = writeln!(
                out,
                "KEDA lagThreshold: {} (pending jobs one worker clears within {} ms)",
                c.keda_lag_threshold, report.target_p99_ms
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Samples;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    fn step(rate: f64, p99: f64, items: u64, errors: u64) -> PointResult {
        let mut samples = Samples {
            round_trip_ms: vec![p99],
            items_ok: items,
            sent: 10,
            ..Samples::default()
        };
        for _ in 0..errors {
            samples.record_error("503 timeout".into(), "late".into());
        }
        let load = Load {
            kind: LoopKind::Open,
            concurrency: 64,
            batch: 1,
            rate: Some(rate),
        };
        PointResult::new("cold", load, samples, Duration::from_secs(1))
    }

    #[test]
    fn capacity_comes_from_the_best_passing_step() {
        let args = Cli::try_parse_from([
            "sweep",
            "--target-p99-ms",
            "100",
            "--workers",
            "2",
            "--target-load",
            "500",
        ])
        .expect("parses")
        .sweep;
        let steps = [
            step(10.0, 40.0, 10, 0),
            step(20.0, 90.0, 20, 0),
            step(40.0, 300.0, 30, 0),
        ];
        assert!(passes(&steps[1], 100.0, 0.0) && !passes(&steps[2], 100.0, 0.0));
        assert!(
            !passes(&step(5.0, 10.0, 5, 1), 100.0, 0.0),
            "errors fail a step"
        );
        let c = capacity(&steps, &args).expect("a step passed");
        assert_eq!(c.at, "open-r20-b1");
        assert_eq!(
            (c.per_worker_items_per_s, c.replicas_needed),
            (10.0, Some(50))
        );
        // 10 requests/s per worker within 100 ms: a backlog of one job.
        assert_eq!(c.keda_lag_threshold, 1);
        assert!(capacity(&steps[2..], &args).is_none());
    }

    #[test]
    fn concurrency_steps_grow_by_whole_clients() {
        assert_eq!(next_value(SweepBy::Concurrency, 1.0, 1.2), 2.0);
        assert_eq!(next_value(SweepBy::Concurrency, 10.0, 1.5), 15.0);
        assert_eq!(next_value(SweepBy::Rate, 10.0, 1.5), 15.0);
    }
}
