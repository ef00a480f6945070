//! What a run writes: the table on stdout (also `latest.txt`), and `latest.json`, the same
//! figures for tools and for the next run's comparison. Field by field in docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::gate::GateReport;
use super::stats::{LoopKind, PointResult};

/// Bumped when `latest.json`'s shape changes.
pub const REPORT_SCHEMA: u32 = 1;

/// `latest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub schema: u32,
    /// The tier (`small`, `medium`) or `trace:<file>`.
    pub dataset: String,
    /// Texts (synthetic) or requests (trace) in the dataset.
    pub dataset_size: usize,
    pub models: Vec<String>,
    /// `embedded` (this command started `serve`) or `external`.
    pub fleet: String,
    pub encoding: String,
    /// Whether the fleet was asked for its stage timings.
    pub stage_timings: bool,
    /// Machine, date and commit: `cpu_model`, `cores`, `date_utc`, `commit`.
    pub recorded: BTreeMap<String, String>,
    pub points: Vec<PointResult>,
    /// Per mode: where throughput stops growing with concurrency.
    pub knees: Vec<Knee>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
}

/// The knee of a closed-loop concurrency sweep: the last concurrency that still bought at least
/// `KNEE_GAIN` more throughput; past it, clients only queue (latency grows, throughput not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Knee {
    pub mode: String,
    pub batch: usize,
    pub concurrency: usize,
    pub items_per_s: f64,
    pub p99_ms: f64,
    /// False when throughput was still growing at the largest concurrency run.
    pub reached: bool,
}

/// A step up in concurrency that adds less than this fraction of throughput is past the knee.
pub const KNEE_GAIN: f64 = 0.10;

/// The knee of each mode's closed-loop points at their most common batch size.
pub fn knees(points: &[PointResult]) -> Vec<Knee> {
    let mut by_mode: BTreeMap<(&str, usize), Vec<&PointResult>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.load.kind == LoopKind::Closed) {
        by_mode
            .entry((p.mode.as_str(), p.load.batch))
            .or_default()
            .push(p);
    }
    let mut knees = Vec::new();
    for ((mode, batch), mut sweep) in by_mode {
        if sweep.len() < 2 {
            continue;
        }
        sweep.sort_by_key(|p| p.load.concurrency);
        let mut at = sweep.len() - 1;
        let mut reached = false;
        for i in 0..sweep.len() - 1 {
            if sweep[i + 1].items_per_s < sweep[i].items_per_s * (1.0 + KNEE_GAIN) {
                at = i;
                reached = true;
                break;
            }
        }
        let p = sweep[at];
        knees.push(Knee {
            mode: mode.to_string(),
            batch,
            concurrency: p.load.concurrency,
            items_per_s: p.items_per_s,
            p99_ms: p.steps.get("round_trip").map_or(0.0, |s| s.p99_ms),
            reached,
        });
    }
    knees
}

/// A blank line, `header` and `rows`, one per line; nothing when there are no rows (a fleet
/// that sent no timings, no sampled process, no GPU).
fn section(out: &mut String, header: &str, rows: impl Iterator<Item = String>) {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "\n{header}");
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
}

/// The human-readable report: points, stage timings, resources, errors, knees, gate.
pub fn table(report: &RunReport) -> String {
    let mut out = String::new();
    let r = &report.recorded;
    let get = |k: &str| r.get(k).map_or("?", String::as_str);
    let _ = writeln!(
        out,
        "embedfleet bench run: dataset={} ({}) models={} fleet={} encoding={}",
        report.dataset,
        report.dataset_size,
        report.models.join(","),
        report.fleet,
        report.encoding
    );
    let _ = writeln!(
        out,
        "machine: {} ({} cores); {} commit {}",
        get("cpu_model"),
        get("cores"),
        get("date_utc"),
        get("commit")
    );
    let _ = writeln!(
        out,
        "\n{:<5} {:<16} {:>8} {:>6} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "mode",
        "load",
        "requests",
        "errors",
        "req/s",
        "items/s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms"
    );
    for p in &report.points {
        let rt = p.steps.get("round_trip");
        let ms = |f: fn(&super::stats::Percentiles) -> f64| {
            rt.map_or("-".to_string(), |s| format!("{:.2}", f(s)))
        };
        let _ = writeln!(
            out,
            "{:<5} {:<16} {:>8} {:>6} {:>9.1} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
            p.mode,
            p.label,
            p.requests,
            p.error_count(),
            p.requests_per_s,
            p.items_per_s,
            ms(|s| s.p50_ms),
            ms(|s| s.p90_ms),
            ms(|s| s.p99_ms),
            ms(|s| s.max_ms),
        );
    }
    let stages = report.points.iter().flat_map(|p| {
        p.steps
            .iter()
            .filter(|(step, _)| step.as_str() != "round_trip")
            .map(move |(step, s)| {
                format!(
                    "{:<5} {:<16} {:<16} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    p.mode, p.label, step, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
                )
            })
    });
    section(
        &mut out,
        &format!(
            "fleet stage timings (reply metadata)\n{:<5} {:<16} {:<16} {:>9} {:>9} {:>9} {:>9}",
            "mode", "load", "step", "p50_ms", "p90_ms", "p99_ms", "max_ms"
        ),
        stages,
    );
    let processes = report.points.iter().flat_map(|p| {
        p.resources.iter().map(move |u| {
            format!(
                "{:<5} {:<16} {:<16} {:>7} {:>8.1}M {:>8.1}M {:>7.1}% {:>7.1}%",
                p.mode,
                p.label,
                u.name,
                u.pid,
                u.rss_peak_mib,
                u.rss_mean_mib,
                u.cpu_mean_pct,
                u.cpu_peak_pct
            )
        })
    });
    section(
        &mut out,
        &format!(
            "fleet processes (/proc)\n{:<5} {:<16} {:<16} {:>7} {:>9} {:>9} {:>8} {:>8}",
            "mode", "load", "process", "pid", "rss_peak", "rss_mean", "cpu_mean", "cpu_peak"
        ),
        processes,
    );
    let gpus = report.points.iter().flat_map(|p| {
        p.gpus.iter().map(move |g| {
            format!(
                "{:<5} {:<16} {:<4} {:<24} {:>9.0}M {:>9.0}M {:>9.0}M {:>7.1}% {:>7.1}%",
                p.mode,
                p.label,
                g.index,
                g.name,
                g.memory_used_peak_mib,
                g.memory_used_mean_mib,
                g.memory_total_mib,
                g.utilization_mean_pct,
                g.utilization_peak_pct
            )
        })
    });
    section(
        &mut out,
        &format!(
            "gpus (NVML)\n{:<5} {:<16} {:<4} {:<24} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "mode",
            "load",
            "gpu",
            "name",
            "mem_peak",
            "mem_mean",
            "mem_total",
            "util_avg",
            "util_max"
        ),
        gpus,
    );
    for p in report.points.iter().filter(|p| p.error_count() > 0) {
        for (kind, n) in &p.errors {
            let _ = writeln!(out, "errors {} {}: {n} x {kind}", p.mode, p.label);
        }
    }
    for k in &report.knees {
        let _ = writeln!(
            out,
            "knee {} b={}: concurrency {} ({:.1} items/s, p99 {:.2} ms){}",
            k.mode,
            k.batch,
            k.concurrency,
            k.items_per_s,
            k.p99_ms,
            if k.reached {
                ""
            } else {
                "; still scaling at the largest concurrency run"
            }
        );
    }
    if let Some(gate) = &report.gate {
        let _ = write!(out, "\n{}", gate.summary());
    }
    out
}

/// CPU model, cores, UTC date and commit, for every figure the run writes.
pub fn recorded() -> BTreeMap<String, String> {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit = std::env::var("EMBEDFLEET_COMMIT").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    BTreeMap::from([
        ("cpu_model".to_string(), cpu_model),
        ("cores".to_string(), cores.to_string()),
        ("date_utc".to_string(), utc_now()),
        (
            "commit".to_string(),
            commit.unwrap_or_else(|| "unknown".into()),
        ),
    ])
}

/// `YYYY-MM-DDTHH:MM:SSZ` from the system clock (no date crate for one line).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{Load, Samples};
    use std::time::Duration;

    fn point(mode: &str, concurrency: usize, items: u64) -> PointResult {
        let samples = Samples {
            round_trip_ms: vec![10.0 * concurrency as f64],
            items_ok: items,
            sent: 1,
            ..Samples::default()
        };
        let load = Load {
            kind: LoopKind::Closed,
            concurrency,
            batch: 1,
            rate: None,
        };
        PointResult::new(mode, load, samples, Duration::from_secs(1))
    }

    #[test]
    fn the_knee_is_where_throughput_stops_growing() {
        let points = [
            point("cold", 1, 30),
            point("cold", 4, 90),
            point("cold", 16, 95),
            point("cold", 64, 96),
            point("warm", 1, 100),
            point("warm", 4, 300),
        ];
        let knees = knees(&points);
        assert_eq!(knees.len(), 2);
        assert_eq!((knees[0].mode.as_str(), knees[0].concurrency), ("cold", 4));
        assert!(knees[0].reached);
        assert_eq!((knees[0].items_per_s, knees[0].p99_ms), (90.0, 40.0));
        assert_eq!((knees[1].concurrency, knees[1].reached), (4, false));
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn the_table_has_a_row_per_point_and_the_knee() {
        let report = RunReport {
            schema: REPORT_SCHEMA,
            dataset: "small".into(),
            dataset_size: 64,
            models: vec!["minilm".into()],
            fleet: "embedded".into(),
            encoding: "msgpack".into(),
            stage_timings: true,
            recorded: BTreeMap::new(),
            knees: knees(&[point("cold", 1, 30), point("cold", 4, 31)]),
            points: vec![point("cold", 1, 30), point("cold", 4, 31)],
            gate: None,
        };
        let text = table(&report);
        let row = text
            .lines()
            .find(|l| l.starts_with("cold  closed-c4-b1"))
            .expect("row");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2..6], ["1", "0", "1.0", "31.0"], "{text}");
        assert!(text.contains("knee cold b=1: concurrency 1"), "{text}");
    }

    #[test]
    fn gpu_use_is_reported_where_sampled_and_absent_from_the_json_otherwise() {
        let plain = point("cold", 1, 30);
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("gpus").is_none(), "{json}");
        let mut with_gpu = point("cold", 1, 30);
        with_gpu.gpus = vec![crate::bench::stats::GpuUse {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_mib: 81_559.0,
            memory_used_peak_mib: 9_216.0,
            memory_used_mean_mib: 9_100.0,
            utilization_mean_pct: 41.5,
            utilization_peak_pct: 97.0,
            samples: 12,
        }];
        let json = serde_json::to_value(&with_gpu).unwrap();
        assert_eq!(json["gpus"][0]["memory_used_peak_mib"], 9216.0);
        let back: PointResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, with_gpu);
        let report = RunReport {
            schema: REPORT_SCHEMA,
            dataset: "small".into(),
            dataset_size: 64,
            models: vec!["minilm".into()],
            fleet: "embedded".into(),
            encoding: "msgpack".into(),
            stage_timings: true,
            recorded: BTreeMap::new(),
            knees: Vec::new(),
            points: vec![with_gpu],
            gate: None,
        };
        let text = table(&report);
        let row = text
            .lines()
            .skip_while(|l| !l.starts_with("gpus (NVML)"))
            .find(|l| l.starts_with("cold"))
            .unwrap_or_else(|| panic!("a GPU row: {text}"));
        assert!(
            row.contains("9216M") && row.contains("41.5%") && row.contains("97.0%"),
            "{row}"
        );
    }
}
