//! The regression gate: `benches/baseline.json` holds, per `tier/mode/load/step`, the figures
//! of a reference run and the thresholds a new run is judged by. A run compares itself, prints
//! a summary, and fails (exit 3) only on a severe regression; warnings and missing steps are
//! printed and pass.
//!
//! A latency metric (`p50_ms`, `p99_ms`) regresses at a level when it is both `ratio` times the
//! baseline *and* `abs_ms` above it: the ratio catches a slowdown of a big step, the absolute
//! floor keeps a sub-millisecond step's jitter (0.1 → 0.3 ms) from failing a build. Throughput
//! (`items_per_s`) regresses when the baseline is `ratio` times the current figure. The error
//! rate regresses on any rise (warn) or a rise past `severe_error_rate` (severe).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::stats::{round3, PointResult};

/// Bumped when the file's shape changes; an older file is refused with a message.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub warn_ratio: f64,
    pub severe_ratio: f64,
    pub warn_abs_ms: f64,
    pub severe_abs_ms: f64,
    /// Failed requests over requests, above the baseline's, that is severe.
    pub severe_error_rate: f64,
}

impl Default for Thresholds {
    /// Tolerant enough for a shared 2-core CI machine measured against a baseline from another
    /// run of it: a 2.5× slowdown of a step of 5 ms or more fails; 1.5× warns.
    fn default() -> Self {
        Thresholds {
            warn_ratio: 1.5,
            severe_ratio: 2.5,
            warn_abs_ms: 1.0,
            severe_abs_ms: 5.0,
            severe_error_rate: 0.01,
        }
    }
}

/// One step's reference figures, and thresholds of its own when the defaults do not fit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Thresholds>,
}

/// `benches/baseline.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub schema: u32,
    /// Where and when the figures were measured: machine, date, commit (free-form).
    pub recorded: BTreeMap<String, String>,
    /// For every entry without thresholds of its own.
    pub thresholds: Thresholds,
    /// By `tier/mode/load/step`.
    pub entries: BTreeMap<String, Entry>,
}

impl Baseline {
    pub fn parse(text: &str) -> anyhow::Result<Baseline> {
        let baseline: Baseline = serde_json::from_str(text)?;
        anyhow::ensure!(
            baseline.schema == SCHEMA,
            "baseline schema {} (this embedfleet reads {SCHEMA}); record a new one with \
             --write-baseline",
            baseline.schema
        );
        Ok(baseline)
    }

    /// This baseline with the groups (`tier/mode/load`) that `current` ran replaced by its
    /// figures; other groups, and the thresholds of entries that stay, are kept.
    pub fn updated(
        old: Option<Baseline>,
        current: BTreeMap<String, Entry>,
        recorded: BTreeMap<String, String>,
    ) -> Baseline {
        let (thresholds, mut entries) = match old {
            Some(old) => (old.thresholds, old.entries),
            None => (Thresholds::default(), BTreeMap::new()),
        };
        let groups: BTreeSet<&str> = current.keys().map(|k| group(k)).collect();
        let kept_thresholds: BTreeMap<String, Thresholds> = entries
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.thresholds.clone()?)))
            .collect();
        entries.retain(|key, _| !groups.contains(group(key)));
        for (key, mut entry) in current {
            entry.thresholds = kept_thresholds.get(&key).cloned();
            entries.insert(key, entry);
        }
        Baseline {
            schema: SCHEMA,
            recorded,
            thresholds,
            entries,
        }
    }
}

/// `small/cold/closed-c1-b1/round_trip` → `small/cold/closed-c1-b1`.
fn group(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(group, _)| group)
}

/// The gate's entries of a run: per point, each step's p50/p99, plus `throughput` and `errors`.
pub fn entries_of(tier: &str, points: &[PointResult]) -> BTreeMap<String, Entry> {
    let mut entries = BTreeMap::new();
    let entry = |metrics: &[(&str, f64)]| Entry {
        metrics: metrics.iter().map(|&(m, v)| (m.to_string(), v)).collect(),
        thresholds: None,
    };
    for point in points {
        let prefix = format!("{tier}/{}/{}", point.mode, point.label);
        for (step, p) in &point.steps {
            let metrics = [("p50_ms", p.p50_ms), ("p99_ms", p.p99_ms)];
            entries.insert(format!("{prefix}/{step}"), entry(&metrics));
        }
        let throughput = [("items_per_s", point.items_per_s)];
        entries.insert(format!("{prefix}/throughput"), entry(&throughput));
        let rate = point.error_count() as f64 / point.requests.max(1) as f64;
        entries.insert(
            format!("{prefix}/errors"),
            entry(&[("error_rate", round3(rate))]),
        );
    }
    entries
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Warn,
    Severe,
}

/// One metric of one step, compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub key: String,
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    /// How many times worse (>1) or better (<1) the current figure is.
    pub factor: f64,
    pub level: Level,
}

/// The comparison of a run with the baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub findings: Vec<Finding>,
    /// Baseline steps (or metrics, `key:metric`) of a group the run covered that it did not
    /// produce: a step that vanished (a fleet no longer reporting a stage) is worth a look.
    pub missing: Vec<String>,
    /// Steps the run produced that the baseline does not have.
    pub new: Vec<String>,
    /// Baseline groups this run did not cover (another tier, mode or load): not compared.
    pub not_run: usize,
}

impl GateReport {
    pub fn worst(&self) -> Level {
        let worst = self
            .findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok);
        if worst == Level::Ok && !self.missing.is_empty() {
            Level::Warn
        } else {
            worst
        }
    }

    /// Findings worse than ok, missing and new steps, and one closing count line.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for f in self.findings.iter().filter(|f| f.level != Level::Ok) {
            let tag = if f.level == Level::Severe {
                "SEVERE"
            } else {
                "warn"
            };
            let _ = writeln!(
                out,
                "{tag:<6} {} {}: {} -> {} ({:.2}x worse)",
                f.key, f.metric, f.baseline, f.current, f.factor
            );
        }
        for key in &self.missing {
            let _ = writeln!(out, "warn   {key}: in the baseline, missing from this run");
        }
        for key in &self.new {
            let _ = writeln!(out, "note   {key}: new (not in the baseline)");
        }
        let count = |level| self.findings.iter().filter(|f| f.level == level).count();
        let _ = writeln!(
            out,
            "gate: {} severe, {} warn, {} missing, {} new, {} ok; {} baseline groups not run",
            count(Level::Severe),
            count(Level::Warn),
            self.missing.len(),
            self.new.len(),
            count(Level::Ok),
            self.not_run
        );
        out
    }
}

pub fn compare(baseline: &Baseline, current: &BTreeMap<String, Entry>) -> GateReport {
    let mut report = GateReport::default();
    let run_groups: BTreeSet<&str> = current.keys().map(|k| group(k)).collect();
    let baseline_groups: BTreeSet<&str> = baseline.entries.keys().map(|k| group(k)).collect();
    report.not_run = baseline_groups.difference(&run_groups).count();
    for (key, reference) in &baseline.entries {
        if !run_groups.contains(group(key)) {
            continue;
        }
        let Some(now) = current.get(key) else {
            report.missing.push(key.clone());
            continue;
        };
        let thresholds = reference
            .thresholds
            .as_ref()
            .unwrap_or(&baseline.thresholds);
        for (metric, &base) in &reference.metrics {
            match now.metrics.get(metric) {
                Some(&value) => report
                    .findings
                    .push(judge(key, metric, base, value, thresholds)),
                None => report.missing.push(format!("{key}:{metric}")),
            }
        }
    }
    report.new = current
        .keys()
        .filter(|k| !baseline.entries.contains_key(*k))
        .cloned()
        .collect();
    report
}

fn judge(key: &str, metric: &str, base: f64, current: f64, t: &Thresholds) -> Finding {
    let (factor, level) = if metric == "error_rate" {
        let level = if current > base + t.severe_error_rate {
            Level::Severe
        } else if current > base {
            Level::Warn
        } else {
            Level::Ok
        };
        (current / base.max(1e-9), level)
    } else if metric.ends_with("_per_s") {
        // Higher is better: how many times slower the run is.
        let factor = base / current.max(1e-9);
        let level = if factor >= t.severe_ratio {
            Level::Severe
        } else if factor >= t.warn_ratio {
            Level::Warn
        } else {
            Level::Ok
        };
        (factor, level)
    } else {
        let factor = current / base.max(1e-9);
        let grew = current - base;
        let level = if factor >= t.severe_ratio && grew >= t.severe_abs_ms {
            Level::Severe
        } else if factor >= t.warn_ratio && grew >= t.warn_abs_ms {
            Level::Warn
        } else {
            Level::Ok
        };
        (factor, level)
    };
    Finding {
        key: key.to_string(),
        metric: metric.to_string(),
        baseline: base,
        current,
        factor: round3(factor),
        level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A baseline of one point: round trip 40/60 ms, a 12/20 ms fusion step, a 0.1/0.2 ms cache
    /// step, 50 items/s, no errors.
    fn figures(scale: impl Fn(&str) -> f64) -> BTreeMap<String, Entry> {
        let steps: [(&str, &[(&str, f64)]); 5] = [
            ("round_trip", &[("p50_ms", 40.0), ("p99_ms", 60.0)]),
            ("fusion", &[("p50_ms", 12.0), ("p99_ms", 20.0)]),
            ("cache_get", &[("p50_ms", 0.1), ("p99_ms", 0.2)]),
            ("throughput", &[("items_per_s", 50.0)]),
            ("errors", &[("error_rate", 0.0)]),
        ];
        steps
            .iter()
            .map(|(step, metrics)| {
                let entry = Entry {
                    metrics: metrics
                        .iter()
                        .map(|&(m, v)| (m.to_string(), v * scale(step)))
                        .collect(),
                    thresholds: None,
                };
                (format!("small/cold/closed-c1-b1/{step}"), entry)
            })
            .collect()
    }

    fn baseline() -> Baseline {
        Baseline::updated(None, figures(|_| 1.0), BTreeMap::new())
    }

    #[test]
    fn a_planted_3x_slowdown_of_one_step_is_severe() {
        let slow = figures(|step| if step == "fusion" { 3.0 } else { 1.0 });
        let report = compare(&baseline(), &slow);
        assert_eq!(report.worst(), Level::Severe, "{}", report.summary());
        let severe: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| f.level == Level::Severe)
            .collect();
        assert_eq!(severe.len(), 2, "fusion p50 and p99: {severe:?}");
        assert!(severe.iter().all(|f| f.key.ends_with("/fusion")));
        assert!(
            report
                .summary()
                .contains("SEVERE small/cold/closed-c1-b1/fusion p50_ms: 12 -> 36"),
            "{}",
            report.summary()
        );
    }

    #[test]
    fn a_3x_throughput_drop_is_severe_too() {
        let slow = figures(|step| if step == "throughput" { 1.0 / 3.0 } else { 1.0 });
        assert_eq!(compare(&baseline(), &slow).worst(), Level::Severe);
    }

    #[test]
    fn a_5_percent_slowdown_is_not_even_a_warning() {
        let slower = figures(|step| if step == "throughput" { 0.95 } else { 1.05 });
        let report = compare(&baseline(), &slower);
        assert_eq!(report.worst(), Level::Ok, "{}", report.summary());
        assert!(report.summary().contains("0 severe, 0 warn"));
    }

    #[test]
    fn noise_within_thresholds_passes() {
        // ±30 % on the big steps, 3x on a 0.1 ms step: under the 1 ms absolute floor.
        let noisy = figures(|step| match step {
            "round_trip" => 1.3,
            "fusion" => 0.7,
            "cache_get" => 3.0,
            "throughput" => 0.8,
            _ => 1.0,
        });
        let report = compare(&baseline(), &noisy);
        assert_eq!(report.worst(), Level::Ok, "{}", report.summary());
    }

    #[test]
    fn a_missing_step_is_reported_and_warns_without_failing() {
        let mut run = figures(|_| 1.0);
        run.remove("small/cold/closed-c1-b1/fusion");
        run.insert(
            "small/cold/closed-c1-b1/jobs.minilm".into(),
            Entry {
                metrics: BTreeMap::from([("p50_ms".into(), 9.0)]),
                thresholds: None,
            },
        );
        let report = compare(&baseline(), &run);
        assert_eq!(report.missing, ["small/cold/closed-c1-b1/fusion"]);
        assert_eq!(report.new, ["small/cold/closed-c1-b1/jobs.minilm"]);
        assert_eq!(report.worst(), Level::Warn);
        assert!(report
            .summary()
            .contains("fusion: in the baseline, missing"));
    }

    #[test]
    fn errors_that_appear_are_severe_and_groups_not_run_are_skipped() {
        let mut run = figures(|_| 1.0);
        run.get_mut("small/cold/closed-c1-b1/errors")
            .unwrap()
            .metrics
            .insert("error_rate".into(), 0.05);
        assert_eq!(compare(&baseline(), &run).worst(), Level::Severe);

        let other: BTreeMap<String, Entry> = figures(|_| 1.0)
            .into_iter()
            .map(|(k, e)| (k.replace("/cold/", "/warm/"), e))
            .collect();
        let report = compare(&baseline(), &other);
        assert_eq!((report.not_run, report.missing.len()), (1, 0));
    }

    #[test]
    fn per_entry_thresholds_override_and_survive_an_update() {
        let mut base = baseline();
        let strict = Thresholds {
            severe_ratio: 1.04,
            severe_abs_ms: 0.0,
            ..Thresholds::default()
        };
        base.entries
            .get_mut("small/cold/closed-c1-b1/round_trip")
            .unwrap()
            .thresholds = Some(strict.clone());
        let report = compare(&base, &figures(|_| 1.05));
        assert_eq!(report.worst(), Level::Severe);

        let text = serde_json::to_string(&base).unwrap();
        let updated = Baseline::updated(
            Some(Baseline::parse(&text).unwrap()),
            figures(|_| 2.0),
            BTreeMap::new(),
        );
        let entry = &updated.entries["small/cold/closed-c1-b1/round_trip"];
        assert_eq!(entry.metrics["p50_ms"], 80.0);
        assert_eq!(entry.thresholds.as_ref(), Some(&strict));
    }
}
