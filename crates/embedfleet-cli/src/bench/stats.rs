//! Latency percentiles and what one load point measured, in the shape `latest.json` stores.
//!
//! Every figure is rounded to three decimals before it is stored, so two runs that measured the
//! same thing write byte-identical files, and maps are `BTreeMap`s so keys come out sorted.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Nearest-rank percentiles of one step's samples, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples the percentiles are over.
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// `None` for no samples. Sorts `samples_ms` in place.
    pub fn of(samples_ms: &mut [f64]) -> Option<Percentiles> {
        if samples_ms.is_empty() {
            return None;
        }
        samples_ms.sort_by(f64::total_cmp);
        let at = |p: f64| round3(nearest_rank(samples_ms, p));
        Some(Percentiles {
            count: samples_ms.len() as u64,
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: round3(samples_ms[samples_ms.len() - 1]),
        })
    }
}

/// The smallest sample with at least `p` % of the samples at or below it (`sorted` is not empty).
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Which loop drove a load point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopKind {
    /// `concurrency` clients, each sending its next request when its last is answered.
    Closed,
    /// Requests sent at a fixed arrival rate whatever the replies do (latency counted from each
    /// request's scheduled send time, so a stalled fleet cannot hide its queue).
    Open,
}

/// The shape of the load at one point of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    #[serde(rename = "loop")]
    pub kind: LoopKind,
    /// Closed loop: clients. Open loop: the cap on requests in flight.
    pub concurrency: usize,
    /// Inputs per request (synthetic datasets; a trace keeps its own).
    pub batch: usize,
    /// Open loop: requests per second offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
}

impl Load {
    /// The point's name in tables, files and baseline keys: `closed-c4-b8`, `open-r20-b1`.
    pub fn label(&self) -> String {
        match (self.kind, self.rate) {
            (LoopKind::Open, Some(rate)) => format!("open-r{}-b{}", trim_float(rate), self.batch),
            _ => format!("closed-c{}-b{}", self.concurrency, self.batch),
        }
    }
}

/// `20` for 20.0, `2.5` for 2.5: labels without trailing zeros.
pub fn trim_float(x: f64) -> String {
    let text = format!("{x:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Raw samples of one load point, as the clients collect them.
#[derive(Debug, Default)]
pub struct Samples {
    /// Round trip of each successful request, ms.
    pub round_trip_ms: Vec<f64>,
    /// The fleet's own stage timings (reply metadata), ms, by step name.
    pub stages_ms: BTreeMap<String, Vec<f64>>,
    /// Failed requests by kind: count and the first message.
    pub errors: BTreeMap<String, (u64, String)>,
    /// Inputs in the successful requests.
    pub items_ok: u64,
    /// Requests sent (successful or not).
    pub sent: u64,
}

impl Samples {
    pub fn record_error(&mut self, kind: String, message: String) {
        self.errors.entry(kind).or_insert((0, message)).0 += 1;
    }
}

/// Peak and mean use of one fleet process over a load point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessUse {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub name: String,
    pub rss_peak_mib: f64,
    pub rss_mean_mib: f64,
    /// 100 = one core busy for the whole interval.
    pub cpu_mean_pct: f64,
    pub cpu_peak_pct: f64,
    /// Samples taken (one per sampling interval).
    pub samples: u64,
}

/// Peak and mean use of one GPU over a load point (NVML, device-wide; `gpu_use.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuUse {
    pub index: u32,
    pub name: String,
    pub memory_total_mib: f64,
    pub memory_used_peak_mib: f64,
    pub memory_used_mean_mib: f64,
    /// Share of time a kernel ran (NVML's utilisation), 0–100.
    pub utilization_mean_pct: f64,
    pub utilization_peak_pct: f64,
    pub samples: u64,
}

/// What one load point of a run measured: one row of the table, one entry of `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    /// `cold` or `warm`.
    pub mode: String,
    pub load: Load,
    /// [`Load::label`], stored so readers need not rebuild it.
    pub label: String,
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub wall_s: f64,
    pub requests_per_s: f64,
    pub items_per_s: f64,
    /// `round_trip` always (when any request succeeded); `cache_get`, `fusion` and
    /// `jobs.<model>` when the fleet reported its timings.
    pub steps: BTreeMap<String, Percentiles>,
    pub resources: Vec<ProcessUse>,
    /// The machine's GPUs, where NVML is present; absent from the JSON otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuUse>,
}

impl PointResult {
    pub fn new(mode: &str, load: Load, mut samples: Samples, wall: Duration) -> PointResult {
        let wall_s = wall.as_secs_f64().max(1e-9);
        let ok = samples.round_trip_ms.len() as u64;
        let mut steps = BTreeMap::new();
        if let Some(p) = Percentiles::of(&mut samples.round_trip_ms) {
            steps.insert("round_trip".to_string(), p);
        }
        for (name, values) in &mut samples.stages_ms {
            if let Some(p) = Percentiles::of(values) {
                steps.insert(name.clone(), p);
            }
        }
        PointResult {
            mode: mode.to_string(),
            label: load.label(),
            load,
            requests: samples.sent,
            ok,
            errors: samples
                .errors
                .iter()
                .map(|(kind, (n, _))| (kind.clone(), *n))
                .collect(),
            wall_s: round3(wall_s),
            requests_per_s: round3(ok as f64 / wall_s),
            items_per_s: round3(samples.items_ok as f64 / wall_s),
            steps,
            resources: Vec::new(),
            gpus: Vec::new(),
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_rounded() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::of(&mut values).expect("samples");
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(p.count, 100);
        let p = Percentiles::of(&mut [1.23456]).expect("one sample");
        assert_eq!((p.p50_ms, p.p99_ms), (1.235, 1.235));
        assert_eq!(Percentiles::of(&mut []), None);
    }

    #[test]
    fn labels_name_the_loop_and_its_parameters() {
        let closed = Load {
            kind: LoopKind::Closed,
            concurrency: 4,
            batch: 8,
            rate: None,
        };
        assert_eq!(closed.label(), "closed-c4-b8");
        let open = Load {
            kind: LoopKind::Open,
            concurrency: 64,
            batch: 1,
            rate: Some(2.5),
        };
        assert_eq!(open.label(), "open-r2.5-b1");
        assert_eq!(trim_float(20.0), "20");
    }

    #[test]
    fn a_point_counts_items_errors_and_steps() {
        let mut samples = Samples {
            round_trip_ms: vec![10.0, 20.0],
            items_ok: 16,
            sent: 3,
            ..Samples::default()
        };
        samples.stages_ms.insert("fusion".into(), vec![1.0, 2.0]);
        samples.record_error("503 timeout".into(), "late".into());
        let load = Load {
            kind: LoopKind::Closed,
            concurrency: 2,
            batch: 8,
            rate: None,
        };
        let point = PointResult::new("cold", load, samples, Duration::from_secs(2));
        assert_eq!((point.requests, point.ok, point.error_count()), (3, 2, 1));
        assert_eq!((point.requests_per_s, point.items_per_s), (1.0, 8.0));
        assert_eq!(point.steps["round_trip"].p50_ms, 10.0);
        assert_eq!(point.steps["fusion"].max_ms, 2.0);
        assert_eq!(point.label, "closed-c2-b8");
    }
}
