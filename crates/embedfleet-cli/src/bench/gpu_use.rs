//! GPU memory and utilisation during a load point, read through NVML (`nvml-wrapper`, which
//! loads `libnvidia-ml.so` at run time): every GPU of the machine the harness runs on, so an
//! embedded fleet's, or an external fleet's when the harness runs on its host. A machine without
//! the NVIDIA driver has no NVML, and the list stays empty; nothing else changes.
//!
//! Device-wide figures, not per process: NVML's per-process accounting needs root on most
//! drivers, and a GPU worker owns its devices anyway.
//!
//! Not run on a GPU yet: this path has only been exercised here, where NVML is absent.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;

use super::stats::{round3, GpuUse};

/// NVML, initialised once per process (`nvmlInit` is slow on some drivers); `None` without it.
fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(nvml) => Some(nvml),
        Err(error) => {
            tracing::debug!(%error, "no NVML: GPU use is not sampled");
            None
        }
    })
    .as_ref()
}

/// One reading of one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub memory_used_mib: f64,
    pub memory_total_mib: f64,
    /// NVML's "percent of time a kernel was running" over its last sample period.
    pub utilization_pct: f64,
}

/// Every GPU's memory and utilisation now; empty without NVML. A device that fails to answer
/// is left out of this reading.
pub fn read_all() -> Vec<GpuReading> {
    let Some(nvml) = nvml() else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok()?;
            let utilization = device.utilization_rates().ok()?;
            Some(GpuReading {
                index,
                name: device.name().unwrap_or_else(|_| "unknown".into()),
                memory_used_mib: memory.used as f64 / (1024.0 * 1024.0),
                memory_total_mib: memory.total as f64 / (1024.0 * 1024.0),
                utilization_pct: utilization.gpu as f64,
            })
        })
        .collect()
}

/// Peak and mean of the readings of each GPU over a point.
#[derive(Default)]
pub struct GpuTracks {
    tracks: std::collections::BTreeMap<u32, Track>,
}

#[derive(Default)]
struct Track {
    name: String,
    total: f64,
    used_sum: f64,
    used_peak: f64,
    util_sum: f64,
    util_peak: f64,
    samples: u64,
}

impl GpuTracks {
    pub fn add(&mut self, readings: Vec<GpuReading>) {
        for r in readings {
            let t = self.tracks.entry(r.index).or_default();
            t.name = r.name;
            t.total = r.memory_total_mib;
            t.used_sum += r.memory_used_mib;
            t.used_peak = t.used_peak.max(r.memory_used_mib);
            t.util_sum += r.utilization_pct;
            t.util_peak = t.util_peak.max(r.utilization_pct);
            t.samples += 1;
        }
    }

    pub fn finish(self) -> Vec<GpuUse> {
        self.tracks
            .into_iter()
            .map(|(index, t)| {
                let n = t.samples.max(1) as f64;
                GpuUse {
                    index,
                    name: t.name,
                    memory_total_mib: round3(t.total),
                    memory_used_peak_mib: round3(t.used_peak),
                    memory_used_mean_mib: round3(t.used_sum / n),
                    utilization_mean_pct: round3(t.util_sum / n),
                    utilization_peak_pct: round3(t.util_peak),
                    samples: t.samples,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(index: u32, used: f64, util: f64) -> GpuReading {
        GpuReading {
            index,
            name: format!("gpu{index}"),
            memory_used_mib: used,
            memory_total_mib: 81_559.0,
            utilization_pct: util,
        }
    }

    #[test]
    fn peaks_and_means_are_per_device() {
        let mut tracks = GpuTracks::default();
        tracks.add(vec![reading(0, 1000.0, 10.0), reading(1, 50.0, 0.0)]);
        tracks.add(vec![reading(0, 3000.0, 90.0)]);
        let used = tracks.finish();
        assert_eq!(used.len(), 2);
        let gpu0 = &used[0];
        assert_eq!(
            (gpu0.index, gpu0.name.as_str(), gpu0.samples),
            (0, "gpu0", 2)
        );
        assert_eq!(gpu0.memory_used_peak_mib, 3000.0);
        assert_eq!(gpu0.memory_used_mean_mib, 2000.0);
        assert_eq!(gpu0.utilization_mean_pct, 50.0);
        assert_eq!(gpu0.utilization_peak_pct, 90.0);
        assert_eq!(gpu0.memory_total_mib, 81_559.0);
        assert_eq!((used[1].samples, used[1].memory_used_peak_mib), (1, 50.0));
    }

    #[test]
    fn readings_are_empty_without_nvml_and_sane_with_it() {
        let readings = read_all();
        if nvml().is_none() {
            assert!(readings.is_empty());
        }
        for r in readings {
            assert!(
                r.memory_total_mib > 0.0 && r.memory_used_mib <= r.memory_total_mib,
                "{r:?}"
            );
            assert!((0.0..=100.0).contains(&r.utilization_pct), "{r:?}");
        }
    }
}
