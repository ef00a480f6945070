//! `embedfleet bench`: the benchmarks operators run against a fleet.
//!
//! # Layout
//! - `run.rs`: `bench run`, the perf harness: tiers or a trace, cold/warm, closed and open
//!   loop, report files, and the baseline gate that sets the exit code.
//! - `sweep.rs`: `bench sweep`, capacity planning: sustainable throughput per worker, replicas.
//! - `compare.rs`: `bench fleet`, the quick fleet-versus-in-process comparison.
//! - `dataset.rs`: deterministic tiers and `--trace`. `drive.rs`: closed- and open-loop load.
//! - `stats.rs`: percentiles and per-point results. `resources.rs`: `/proc` sampling;
//!   `gpu_use.rs`: GPU memory and utilisation through NVML.
//! - `target.rs`: a running fleet (`--nats-url`) or an embedded `serve`; the Redis flush.
//! - `report.rs`: table, `latest.json`, `latest.txt`. `html.rs`: `report.html` with SVG plots.
//! - `gate.rs`: `benches/baseline.json` and the comparison.
//!
//! Exit codes: 0 (ran; warnings are printed), 1 (could not run: one line on stderr),
//! 2 (bad arguments), 3 (`bench run` found a severe regression against the baseline).

mod compare;
mod dataset;
mod drive;
mod gate;
mod gpu_use;
mod html;
mod report;
mod resources;
mod run;
mod stats;
mod sweep;
mod target;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: BenchTarget,
}

#[derive(Subcommand)]
enum BenchTarget {
    /// The perf harness: a tier (or --trace) against a running fleet (--nats-url) or one it
    /// starts; cold and warm, closed and open loop; writes latest.json, latest.txt and
    /// report.html, and exits 3 on a severe regression against benches/baseline.json.
    Run(run::RunArgs),
    /// Capacity planning: steps the arrival rate (or concurrency) until p99 passes a target or
    /// errors appear; prints sustainable throughput per worker and replicas for a target load.
    Sweep(sweep::SweepArgs),
    /// Quick comparison: N concurrent clients, a cold pass, a warm pass, and optionally the same
    /// workload in this process.
    Fleet(compare::FleetBenchArgs),
}

/// `bench run`'s verdict when the gate finds a severe regression: the command exits 3.
#[derive(Debug)]
pub struct SevereRegression(pub String);

impl std::fmt::Display for SevereRegression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SevereRegression {}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        BenchTarget::Run(args) => run::run(args),
        BenchTarget::Sweep(args) => sweep::run(args),
        BenchTarget::Fleet(args) => compare::run_fleet(args),
    }
}

/// A run id for input texts: pid and clock, base 36, so two runs never share a cold input.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut n = nanos ^ (u64::from(std::process::id()) << 40);
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}
