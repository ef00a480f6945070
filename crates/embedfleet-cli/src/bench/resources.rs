//! Resource use of the fleet's processes during a load point, sampled from `/proc`: resident
//! memory (`VmRSS`) and CPU time (`utime + stime`) of each process and of its descendants (the
//! embedded `serve` has a child nats-server). Linux only; elsewhere the list stays empty.
//!
//! GPU memory and utilisation are sampled in the same loop, through NVML (`gpu_use.rs`), where
//! the machine has it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gpu_use::{self, GpuTracks};
use super::stats::{round3, GpuUse, ProcessUse};

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, 100 on every Linux the fleet
/// runs on (x86-64, arm64).
const TICKS_PER_SECOND: f64 = 100.0;

/// A background thread sampling until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Resources>,
}

/// What a point used: the fleet's processes, and the machine's GPUs.
#[derive(Default)]
pub struct Resources {
    pub processes: Vec<ProcessUse>,
    pub gpus: Vec<GpuUse>,
}

impl Sampler {
    pub fn start(roots: Vec<u32>, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || sample_until(&roots, interval, &flag));
        Sampler { stop, thread }
    }

    pub fn finish(self) -> Resources {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[derive(Default)]
struct Track {
    name: String,
    last_ticks: Option<(u64, Instant)>,
    rss_sum: f64,
    rss_peak: f64,
    rss_count: u64,
    cpu_sum: f64,
    cpu_peak: f64,
    cpu_count: u64,
}

fn sample_until(roots: &[u32], interval: Duration, stop: &AtomicBool) -> Resources {
    let mut tracks: BTreeMap<u32, Track> = BTreeMap::new();
    let mut gpus = GpuTracks::default();
    loop {
        let now = Instant::now();
        gpus.add(gpu_use::read_all());
        // No pids (an external fleet not named with --sample-pid): no /proc scan either.
        let pids = if roots.is_empty() {
            BTreeSet::new()
        } else {
            with_descendants(roots)
        };
        for pid in pids {
            let Some(stat) = read_stat(pid) else { continue };
            let track = tracks.entry(pid).or_default();
            track.name = stat.name;
            if let Some(rss) = read_rss_mib(pid) {
                track.rss_sum += rss;
                track.rss_count += 1;
                track.rss_peak = track.rss_peak.max(rss);
            }
            if let Some((ticks, at)) = track.last_ticks {
                let seconds = now.duration_since(at).as_secs_f64().max(1e-6);
                let busy = stat.ticks.saturating_sub(ticks) as f64 / TICKS_PER_SECOND;
                let pct = 100.0 * busy / seconds;
                track.cpu_sum += pct;
                track.cpu_count += 1;
                track.cpu_peak = track.cpu_peak.max(pct);
            }
            track.last_ticks = Some((stat.ticks, now));
        }
        // Checked after a sample, so even a short point gets one; sleeps in small steps so
        // `finish` does not wait a whole interval.
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let until = now + interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10).min(interval));
        }
    }
    let processes = tracks
        .into_iter()
        .map(|(pid, t)| ProcessUse {
            pid,
            name: t.name,
            rss_peak_mib: round3(t.rss_peak),
            rss_mean_mib: round3(t.rss_sum / t.rss_count.max(1) as f64),
            cpu_mean_pct: round3(t.cpu_sum / t.cpu_count.max(1) as f64),
            cpu_peak_pct: round3(t.cpu_peak),
            samples: t.rss_count,
        })
        .collect();
    Resources {
        processes,
        gpus: gpus.finish(),
    }
}

/// `roots` and every live process whose parent chain reaches one of them.
fn with_descendants(roots: &[u32]) -> BTreeSet<u32> {
    let mut set: BTreeSet<u32> = roots.iter().copied().collect();
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?.ppid)))
        .collect();
    loop {
        let before = set.len();
        for &(pid, ppid) in &parents {
            if set.contains(&ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

struct Stat {
    name: String,
    ppid: u32,
    /// utime + stime.
    ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `/proc/<pid>/stat`: `pid (comm) state ppid ... utime stime ...`; `comm` may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After `)`: 0 state, 1 ppid, ..., 11 utime, 12 stime.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Stat {
        name,
        ppid,
        ticks: utime + stime,
    })
}

fn read_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss_mib(&status)
}

fn parse_rss_mib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (tokio (rt) w) S 17 4242 4242 0 -1 4194560 500 0 0 0 250 30 0 0 20 0 9";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(
            (stat.name.as_str(), stat.ppid, stat.ticks),
            ("tokio (rt) w", 17, 280)
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn rss_is_read_in_mib() {
        let status = "Name:\tembedfleet\nVmPeak:\t 9000 kB\nVmRSS:\t  204800 kB\n";
        assert_eq!(parse_rss_mib(status), Some(200.0));
        assert_eq!(parse_rss_mib("Name: x\n"), None);
    }

    #[test]
    fn this_process_is_sampled() {
        let sampler = Sampler::start(vec![std::process::id()], Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(70));
        let used = sampler.finish().processes;
        let me = used
            .iter()
            .find(|u| u.pid == std::process::id())
            .expect("own pid sampled");
        assert!(me.rss_peak_mib > 0.0 && me.samples >= 2, "{me:?}");
    }
}
