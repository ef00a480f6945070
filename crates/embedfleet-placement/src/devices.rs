//! The devices a plan fills, from `--gpus 80GB,80GB,24GB`.

use serde::Serialize;

use crate::memory::GIB;

/// One device of the plan: `cuda:<index>` with its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Device {
    pub index: usize,
    pub bytes: u64,
}

/// Parses a comma-separated list of sizes: `80GB`, `24GiB`, `16384MiB`, `81559MB`.
///
/// GPU memory is sold in binary units under decimal names (an "80GB" card has 80 GiB), so `GB`
/// and `MB` mean GiB and MiB here, as `nvidia-smi` reports them.
pub fn parse_devices(list: &str) -> Result<Vec<Device>, String> {
    let mut devices = Vec::new();
    for (index, item) in list.split(',').map(str::trim).enumerate() {
        let lower = item.to_ascii_lowercase();
        let (number, unit) = lower
            .find(|c: char| c.is_ascii_alphabetic())
            .map(|at| lower.split_at(at))
            .unwrap_or((&lower, "gb"));
        let scale = match unit.trim() {
            "gb" | "gib" | "g" => GIB,
            "mb" | "mib" | "m" => 1 << 20,
            other => {
                return Err(format!(
                    "device {index} `{item}`: unknown unit `{other}` (use GB or MB)"
                ))
            }
        };
        let amount: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("device {index} `{item}`: not a size like 80GB"))?;
        if !(amount.is_finite() && amount > 0.0) {
            return Err(format!(
                "device {index} `{item}`: the size must be positive"
            ));
        }
        devices.push(Device {
            index,
            bytes: (amount * scale as f64) as u64,
        });
    }
    if devices.is_empty() || list.trim().is_empty() {
        return Err("no devices given (e.g. --gpus 80GB,24GB)".into());
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_units_and_indices_in_order() {
        let devices = parse_devices("80GB, 24GiB,16384MiB,0.5g").unwrap();
        let bytes: Vec<u64> = devices.iter().map(|d| d.bytes).collect();
        assert_eq!(bytes, [80 * GIB, 24 * GIB, 16 * GIB, GIB / 2]);
        assert_eq!(devices[2].index, 2);
    }

    #[test]
    fn bad_sizes_name_the_item() {
        for (bad, says) in [
            ("80TB", "unit"),
            ("big", "unit"),
            ("-1GB", "size"),
            ("0GB", "positive"),
            ("", "size"),
        ] {
            let error = parse_devices(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
