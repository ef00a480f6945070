//! Where models run: `cpu` or `cuda:N` as the CLI spells it, and the memory check a worker makes
//! before it loads a model onto a GPU.
//!
//! A CPU build (the default) has no CUDA code at all: asking it for `cuda:0` is a typed error that
//! says which build to use. A CUDA build (`--features cuda`) on a machine without a usable GPU
//! gets the driver's own reason in the same typed error.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::ModelError;

/// A device as named on the command line: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceName {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl DeviceName {
    /// Opens the device. On a CUDA device this creates the context (hundreds of MiB of device
    /// memory), so a worker opens each device once and shares it.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(ModelError::DeviceUnavailable {
                        device: self.to_string(),
                        reason: "this build has no CUDA support (build with `--features cuda`, \
                                 see scripts/cuda-build.sh)"
                            .into(),
                    });
                }
                Device::new_cuda(ordinal).map_err(|e| ModelError::DeviceUnavailable {
                    device: self.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// The name of an opened device.
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cuda(_) => Self::Cuda(cuda_ordinal(device)),
            _ => Self::Cpu,
        }
    }
}

/// Free and total memory of a GPU in bytes; `None` for the CPU (host memory is the operating
/// system's to manage).
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    cuda_memory(device)
}

/// Refuses a load that would not fit: `need` bytes against what the device has free now.
pub fn check_fits(model: &str, device: &Device, need: u64) -> Result<(), ModelError> {
    match device_memory(device) {
        Some((free, _total)) if need > free as u64 => Err(ModelError::DeviceMemory {
            model: model.to_string(),
            device: DeviceName::of(device).to_string(),
            need_mib: need.div_ceil(1 << 20),
            free_mib: free as u64 >> 20,
        }),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_memory(device: &Device) -> Option<(usize, usize)> {
    let cuda = device.as_cuda_device().ok()?;
    cuda.cuda_stream().context().mem_get_info().ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_device: &Device) -> Option<(usize, usize)> {
    None
}

#[cfg(feature = "cuda")]
fn cuda_ordinal(device: &Device) -> usize {
    device
        .as_cuda_device()
        .map(|cuda| cuda.cuda_stream().context().ordinal())
        .unwrap_or(0)
}

#[cfg(not(feature = "cuda"))]
fn cuda_ordinal(_device: &Device) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, name) in [
            ("cpu", DeviceName::Cpu),
            ("cuda", DeviceName::Cuda(0)),
            ("cuda:3", DeviceName::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceName>().unwrap(), name);
        }
        assert_eq!(DeviceName::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let error = bad.parse::<DeviceName>().unwrap_err();
            assert!(error.contains("cpu, cuda or cuda:N"), "{bad}: {error}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_asked_for_a_gpu_says_which_build_to_use() {
        let error = DeviceName::Cuda(0).open().unwrap_err();
        assert!(matches!(error, ModelError::DeviceUnavailable { .. }));
        assert!(error.to_string().contains("--features cuda"), "{error}");
    }

    #[test]
    fn the_cpu_is_never_short_of_memory() {
        assert_eq!(device_memory(&Device::Cpu), None);
        check_fits("minilm", &Device::Cpu, u64::MAX).unwrap();
    }
}
