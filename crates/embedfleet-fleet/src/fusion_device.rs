//! Where the coordinator runs FuseMoE: on the CPU, or on a GPU (`--fusion-device cuda:N`, feature
//! `cuda`: the cudarc/NVRTC forward of `embedfleet-fusion`), with the CPU as the fallback when no
//! GPU is found at start. Both give the same vectors within float rounding (the fusion crate's
//! `cuda_parity` test), so the cache keys do not name the device.

use std::sync::Arc;

use embedfleet_fusion::{FuseMoe, FusedEmbedding, FusionError};
use embedfleet_models::DeviceName;

/// The device fusion runs on.
pub struct FusionDevice {
    inner: Inner,
}

enum Inner {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(gpu::GpuLayers),
}

impl FusionDevice {
    pub fn cpu() -> Self {
        FusionDevice { inner: Inner::Cpu }
    }

    /// `cuda:N` when this build has CUDA and the GPU answers now; otherwise the CPU, with a
    /// warning that says why (a coordinator must start either way).
    pub fn open(name: DeviceName) -> Self {
        match name {
            DeviceName::Cpu => Self::cpu(),
            DeviceName::Cuda(ordinal) => match open_gpu(ordinal) {
                Ok(device) => {
                    tracing::info!(device = %name, "FuseMoE runs on the GPU");
                    device
                }
                Err(why) => {
                    tracing::warn!(device = %name, %why, "FuseMoE falls back to the CPU");
                    eprintln!("embedfleet: --fusion-device {name}: {why}; fusing on the CPU");
                    Self::cpu()
                }
            },
        }
    }

    /// Where fusion actually runs (after any fallback).
    pub fn name(&self) -> DeviceName {
        match &self.inner {
            Inner::Cpu => DeviceName::Cpu,
            #[cfg(feature = "cuda")]
            Inner::Cuda(layers) => DeviceName::Cuda(layers.ordinal()),
        }
    }

    /// [`FuseMoe::fuse_batch`] on this device. A layer goes to the GPU on first use and stays
    /// there (a few layers at most: see `gpu::HELD_LAYERS`).
    pub fn fuse_batch(
        &self,
        layer: &Arc<FuseMoe>,
        rows: &[Vec<Option<&[f32]>>],
    ) -> Result<Vec<FusedEmbedding>, FusionError> {
        match &self.inner {
            Inner::Cpu => layer.fuse_batch(rows),
            #[cfg(feature = "cuda")]
            Inner::Cuda(layers) => layers.get(layer)?.fuse_batch(rows),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_ordinal: usize) -> Result<FusionDevice, String> {
    Err("this build has no CUDA support (build with `--features cuda`)".into())
}

#[cfg(feature = "cuda")]
fn open_gpu(ordinal: usize) -> Result<FusionDevice, String> {
    gpu::GpuLayers::open(ordinal).map(|layers| FusionDevice {
        inner: Inner::Cuda(layers),
    })
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Arc, Mutex, PoisonError};

    use embedfleet_fusion::{cuda_available, CudaFuseMoe, FuseMoe, FusionError, WeightPrecision};

    /// Layers kept uploaded. A full 12-model layer is ~2 GB of device memory; a coordinator
    /// fuses a handful of sets, and a set evicted here is uploaded again on its next use.
    const HELD_LAYERS: usize = 4;

    pub struct GpuLayers {
        ordinal: usize,
        /// By layer version, most recently used last.
        held: Mutex<Vec<(String, Arc<CudaFuseMoe>)>>,
    }

    impl GpuLayers {
        /// Checks the driver and that a context opens on `ordinal` (uploading a tiny layer).
        pub fn open(ordinal: usize) -> Result<Self, String> {
            cuda_available().map_err(|e| e.to_string())?;
            let probe = FuseMoe::from_seed(embedfleet_fusion::FuseMoeConfig::for_input_dims(vec![8]), 0)
                .map_err(|e| e.to_string())?;
            CudaFuseMoe::new(&probe, WeightPrecision::F32, ordinal).map_err(|e| e.to_string())?;
            Ok(GpuLayers {
                ordinal,
                held: Mutex::default(),
            })
        }

        pub fn ordinal(&self) -> usize {
            self.ordinal
        }

        /// `layer` on the GPU, uploading it (f32 weights: the bf16 kernels were measured slower,
        /// docs/benchmarks.md#gpu-issue-10) the first time.
        pub fn get(&self, layer: &FuseMoe) -> Result<Arc<CudaFuseMoe>, FusionError> {
            let version = layer.version().to_string();
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = held.iter().position(|(v, _)| *v == version) {
                let entry = held.remove(at);
                let gpu = entry.1.clone();
                held.push(entry);
                return Ok(gpu);
            }
            let gpu = Arc::new(CudaFuseMoe::new(layer, WeightPrecision::F32, self.ordinal)?);
            if held.len() == HELD_LAYERS {
                held.remove(0);
            }
            held.push((version, gpu.clone()));
            Ok(gpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_fusion::FuseMoeConfig;

    #[test]
    fn a_gpu_that_cannot_be_opened_falls_back_to_the_cpu_and_fuses_the_same() {
        let device = FusionDevice::open(DeviceName::Cuda(97));
        assert_eq!(device.name(), DeviceName::Cpu);
        let layer = Arc::new(FuseMoe::from_seed(FuseMoeConfig::for_input_dims(vec![4, 6]), 3).unwrap());
        let (a, b) = (vec![0.5f32; 4], vec![-0.25f32; 6]);
        let rows = vec![vec![Some(&a[..]), Some(&b[..])]];
        let fused = device.fuse_batch(&layer, &rows).unwrap();
        assert_eq!(fused[0].embedding, layer.fuse_batch(&rows).unwrap()[0].embedding);
    }
}
