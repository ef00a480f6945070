//! The FuseMoE forward on an NVIDIA GPU (Han et al., 2024, "FuseMoE: Mixture-of-Experts
//! Transformers for Fleximodal Fusion"), feature `cuda`.
//!
//! The kernels live in `kernels/fusemoe.cu`, embedded with `include_str!` and compiled at run
//! time with NVRTC; cudarc loads libcuda and libnvrtc dynamically, so the crate builds with no
//! CUDA installed. cudarc panics when it first touches a library that is absent, so
//! [`cuda_available`] checks for both libraries before any CUDA call and every entry point
//! returns [`FusionError::CudaUnavailable`] instead.
//!
//! The forward mirrors the CPU path step for step: rows are assembled on the host (same
//! validation, same errors), the gate and the routing run on the device, the routing comes
//! back to the host (a few bytes) so rows can be grouped by expert and capacity-limited with
//! the CPU code, then each used expert runs once over its rows, and one kernel combines and
//! normalises. Weights are uploaded once, as f32 or bf16 ([`WeightPrecision`]); biases, norms
//! and the router stay f32.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use crate::assemble::assemble_row;
use crate::config::{FuseMoeConfig, GatingKind};
use crate::cpu::{limit_capacity, FusedEmbedding};
use crate::error::FusionError;
use crate::gate::Routing;
use crate::model::FuseMoe;

/// The kernels, compiled at run time.
const KERNELS: &str = include_str!("../../../kernels/fusemoe.cu");
/// Must match `LINEAR_WARPS` in the .cu file.
const LINEAR_WARPS: u32 = 8;
/// Must match `BLOCK` in the .cu file.
const BLOCK: u32 = 256;

/// How expert and gate-projection weights are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPrecision {
    /// 4 bytes a weight; matches the CPU within float rounding.
    F32,
    /// 2 bytes a weight: half the memory traffic, which is what bounds a batch-1 fusion;
    /// results match [`FuseMoe::to_bf16_precision`] on the CPU.
    Bf16,
}

/// Whether a CUDA driver and NVRTC can be loaded here. Never panics.
pub fn cuda_available() -> Result<(), FusionError> {
    if !driver_library_present() {
        return Err(FusionError::CudaUnavailable(
            "no CUDA driver library (libcuda) could be loaded".into(),
        ));
    }
    if !nvrtc_library_present() {
        return Err(FusionError::CudaUnavailable(
            "no NVRTC library (libnvrtc) could be loaded".into(),
        ));
    }
    Ok(())
}

// Loaded at run time (this crate built on its own): cudarc panics when it first touches a
// library that is absent, so look before touching.
#[cfg(not(feature = "cuda-linked"))]
fn driver_library_present() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc itself would load.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
#[cfg(not(feature = "cuda-linked"))]
fn nvrtc_library_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
// Linked (built with candle's CUDA backend): the dynamic loader has already found both
// libraries, or the process would not have started.
#[cfg(feature = "cuda-linked")]
fn driver_library_present() -> bool {
    true
}
#[cfg(feature = "cuda-linked")]
fn nvrtc_library_present() -> bool {
    true
}

/// Compiles `kernels/fusemoe.cu` with NVRTC and returns the PTX. Needs only libnvrtc, no GPU
/// or driver, so a machine with NVRTC can check the kernels without a device.
pub fn compile_kernels() -> Result<String, FusionError> {
    if !nvrtc_library_present() {
        return Err(FusionError::CudaUnavailable(
            "no NVRTC library (libnvrtc) could be loaded".into(),
        ));
    }
    let options = CompileOptions {
        name: Some("fusemoe.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(KERNELS, options)
        .map(|ptx| ptx.to_src())
        .map_err(|e| FusionError::Cuda(format!("NVRTC compile of kernels/fusemoe.cu: {e:?}")))
}

fn driver(e: cudarc::driver::DriverError) -> FusionError {
    FusionError::Cuda(e.to_string())
}

enum DeviceMatrix {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// One linear layer on the device: `[out_features, in_features]` weight and a bias.
struct DeviceLinear {
    weight: DeviceMatrix,
    bias: CudaSlice<f32>,
    out_features: usize,
    in_features: usize,
}

struct DeviceExpert {
    fc1: DeviceLinear,
    fc2: DeviceLinear,
}

struct Kernels {
    linear_f32: CudaFunction,
    linear_bf16: CudaFunction,
    layer_norm_gelu: CudaFunction,
    laplace_logits: CudaFunction,
    route_top_k: CudaFunction,
    combine_normalize: CudaFunction,
}

/// A FuseMoE layer uploaded to one GPU.
pub struct CudaFuseMoe {
    config: FuseMoeConfig,
    precision: WeightPrecision,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    gate_proj: DeviceLinear,
    norm_weight: CudaSlice<f32>,
    norm_bias: CudaSlice<f32>,
    /// Softmax gating: the router layer (f32). Laplace: the centroids, with a zero bias.
    router: DeviceLinear,
    experts: Vec<DeviceExpert>,
    /// Fill every output buffer with NaN before the kernels run (parity tests: a kernel that
    /// skips an element cannot pass for one that computed it).
    poison_outputs: bool,
}

impl CudaFuseMoe {
    /// Compiles the kernels and uploads `model` to GPU `ordinal`.
    pub fn new(
        model: &FuseMoe,
        precision: WeightPrecision,
        ordinal: usize,
    ) -> Result<CudaFuseMoe, FusionError> {
        cuda_available()?;
        let context = CudaContext::new(ordinal)
            .map_err(|e| FusionError::CudaUnavailable(format!("GPU {ordinal}: {e}")))?;
        let stream = context.default_stream();
        let ptx = compile_kernels()?;
        let module = context.load_module(Ptx::from_src(ptx)).map_err(driver)?;
        let load = |name: &str| module.load_function(name).map_err(driver);
        let kernels = Kernels {
            linear_f32: load("linear_f32")?,
            linear_bf16: load("linear_bf16")?,
            layer_norm_gelu: load("layer_norm_gelu")?,
            laplace_logits: load("laplace_logits")?,
            route_top_k: load("route_top_k")?,
            combine_normalize: load("combine_normalize")?,
        };

        let cfg = model.config().clone();
        let upload = |data: &[f32]| stream.clone_htod(data).map_err(driver);
        let matrix =
            |data: &[f32], precision: WeightPrecision| -> Result<DeviceMatrix, FusionError> {
                Ok(match precision {
                    WeightPrecision::F32 => DeviceMatrix::F32(upload(data)?),
                    WeightPrecision::Bf16 => {
                        let bits: Vec<u16> = data
                            .iter()
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect();
                        DeviceMatrix::Bf16(stream.clone_htod(&bits).map_err(driver)?)
                    }
                })
            };
        let linear =
            |weight: &[f32], bias: &[f32], precision| -> Result<DeviceLinear, FusionError> {
                Ok(DeviceLinear {
                    weight: matrix(weight, precision)?,
                    bias: upload(bias)?,
                    out_features: bias.len(),
                    in_features: weight.len() / bias.len().max(1),
                })
            };
        let gate = &model.gate;
        let zero_bias = vec![0.0f32; cfg.num_experts];
        let router_bias = gate.router_bias.as_deref().unwrap_or(&zero_bias);
        let experts = model
            .experts
            .iter()
            .map(|x| {
                Ok(DeviceExpert {
                    fc1: linear(&x.fc1_weight, &x.fc1_bias, precision)?,
                    fc2: linear(&x.fc2_weight, &x.fc2_bias, precision)?,
                })
            })
            .collect::<Result<Vec<_>, FusionError>>()?;
        Ok(CudaFuseMoe {
            gate_proj: linear(&gate.proj_weight, &gate.proj_bias, precision)?,
            norm_weight: upload(&gate.norm_weight)?,
            norm_bias: upload(&gate.norm_bias)?,
            router: linear(&gate.router_weight, router_bias, WeightPrecision::F32)?,
            experts,
            kernels,
            stream,
            precision,
            config: cfg,
            poison_outputs: false,
        })
    }

    /// The precision the weights were uploaded in.
    pub fn precision(&self) -> WeightPrecision {
        self.precision
    }

    /// See the field; for tests.
    pub fn set_poison_outputs(&mut self, poison: bool) {
        self.poison_outputs = poison;
    }

    /// [`FuseMoe::fuse`] on the GPU.
    pub fn fuse(&self, partials: &[Option<&[f32]>]) -> Result<FusedEmbedding, FusionError> {
        let mut fused = self.fuse_batch(&[partials]).map_err(|e| match e {
            FusionError::BadRow { source, .. } => *source,
            other => other,
        })?;
        fused.pop().ok_or(FusionError::NoPartials)
    }

    /// [`FuseMoe::fuse_batch`] on the GPU.
    pub fn fuse_batch<'p, R>(&self, rows: &[R]) -> Result<Vec<FusedEmbedding>, FusionError>
    where
        R: AsRef<[Option<&'p [f32]>]>,
    {
        let cfg = &self.config;
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let (d, gate_width, out_dim, k) = (
            cfg.input_dim(),
            cfg.gate_input_dim(),
            cfg.output_dim,
            cfg.top_k,
        );

        let mut assembled = vec![0.0f32; n * gate_width];
        for (index, (row, out)) in rows
            .iter()
            .zip(assembled.chunks_exact_mut(gate_width))
            .enumerate()
        {
            assemble_row(cfg, row.as_ref(), out).map_err(|source| FusionError::BadRow {
                row: index,
                source: Box::new(source),
            })?;
        }
        let x = self.stream.clone_htod(&assembled).map_err(driver)?;
        let identity: Vec<i32> = (0..n as i32).collect();
        let identity = self.stream.clone_htod(&identity).map_err(driver)?;

        // Gate: projection, LayerNorm + GELU, router logits, top-k.
        let mut hidden = self.output_buffer(n * cfg.gate_hidden)?;
        self.linear(
            &self.gate_proj,
            &x,
            gate_width,
            &identity,
            n,
            &mut hidden,
            &identity,
            false,
        )?;
        let (width, eps) = (cfg.gate_hidden as i32, cfg.layer_norm_eps);
        let mut launch = self.stream.launch_builder(&self.kernels.layer_norm_gelu);
        launch
            .arg(&mut hidden)
            .arg(&self.norm_weight)
            .arg(&self.norm_bias)
            .arg(&width)
            .arg(&eps);
        // SAFETY: `hidden` holds n rows of gate_hidden floats, the norms gate_hidden each.
        unsafe { launch.launch(blocks(n as u32, BLOCK)) }.map_err(driver)?;

        let mut logits = self.output_buffer(n * cfg.num_experts)?;
        match cfg.gating {
            GatingKind::Softmax => self.linear(
                &self.router,
                &hidden,
                cfg.gate_hidden,
                &identity,
                n,
                &mut logits,
                &identity,
                false,
            )?,
            GatingKind::Laplace => {
                let experts = cfg.num_experts as i32;
                let DeviceMatrix::F32(centroids) = &self.router.weight else {
                    return Err(FusionError::Cuda("router weights must be f32".into()));
                };
                let mut launch = self.stream.launch_builder(&self.kernels.laplace_logits);
                launch
                    .arg(&hidden)
                    .arg(centroids)
                    .arg(&width)
                    .arg(&experts)
                    .arg(&mut logits);
                let config = LaunchConfig {
                    grid_dim: (cfg.num_experts as u32, n as u32, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: grid covers experts × rows; every index stays inside the buffers.
                unsafe { launch.launch(config) }.map_err(driver)?;
            }
        }
        let mut selected = self.stream.alloc_zeros::<i32>(n * k).map_err(driver)?;
        let mut weights = self.stream.alloc_zeros::<f32>(n * k).map_err(driver)?;
        let (rows_i, experts_i, k_i) = (n as i32, cfg.num_experts as i32, k as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.route_top_k);
        launch
            .arg(&logits)
            .arg(&rows_i)
            .arg(&experts_i)
            .arg(&k_i)
            .arg(&cfg.temperature)
            .arg(&mut selected)
            .arg(&mut weights);
        // SAFETY: one thread per row, each writing its own k entries.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(driver)?;

        // Routing to the host: group rows by expert, apply capacity like the CPU does.
        let selected = self.stream.clone_dtoh(&selected).map_err(driver)?;
        let weights = self.stream.clone_dtoh(&weights).map_err(driver)?;
        let mut routes: Vec<Routing> = (0..n)
            .map(|r| Routing {
                selected: selected[r * k..(r + 1) * k]
                    .iter()
                    .map(|&e| e as usize)
                    .collect(),
                weights: weights[r * k..(r + 1) * k].to_vec(),
                probabilities: Vec::new(),
            })
            .collect();
        if routes
            .iter()
            .flat_map(|r| &r.selected)
            .any(|&e| e >= cfg.num_experts)
        {
            return Err(FusionError::Cuda(
                "route_top_k produced an invalid expert".into(),
            ));
        }
        let original = routes.clone();
        if cfg.enforce_capacity {
            limit_capacity(cfg, &mut routes);
        }
        // Slot weights as the combine kernel sees them: 0 for a slot capacity dropped.
        let mut slot_weights = vec![0.0f32; n * k];
        for (r, (route, before)) in routes.iter().zip(&original).enumerate() {
            for (&e, &w) in route.selected.iter().zip(&route.weights) {
                if let Some(s) = before.selected.iter().position(|&x| x == e) {
                    slot_weights[r * k + s] = w;
                }
            }
        }

        // Experts: each used expert runs once over its rows.
        let mut expert_out = self.output_buffer(n * k * out_dim)?;
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows_in, slots_out): (Vec<i32>, Vec<i32>) = (0..n)
                .flat_map(|r| (0..k).map(move |s| (r, s)))
                .filter(|&(r, s)| original[r].selected[s] == e && slot_weights[r * k + s] != 0.0)
                .map(|(r, s)| (r as i32, (r * k + s) as i32))
                .unzip();
            if rows_in.is_empty() {
                continue;
            }
            let m = rows_in.len();
            let rows_in = self.stream.clone_htod(&rows_in).map_err(driver)?;
            let slots_out = self.stream.clone_htod(&slots_out).map_err(driver)?;
            let local: Vec<i32> = (0..m as i32).collect();
            let local = self.stream.clone_htod(&local).map_err(driver)?;
            let hidden_width = expert.fc1.out_features;
            let mut expert_hidden = self.output_buffer(m * hidden_width)?;
            // fc1 reads the first `d` columns of the assembled rows (the mask is the gate's).
            self.linear(
                &expert.fc1,
                &x,
                gate_width,
                &rows_in,
                m,
                &mut expert_hidden,
                &local,
                true,
            )?;
            self.linear(
                &expert.fc2,
                &expert_hidden,
                hidden_width,
                &local,
                m,
                &mut expert_out,
                &slots_out,
                false,
            )?;
            debug_assert_eq!(expert.fc1.in_features, d);
        }

        let slot_weights_device = self.stream.clone_htod(&slot_weights).map_err(driver)?;
        let mut fused = self.output_buffer(n * out_dim)?;
        let (k_i, width_i) = (k as i32, out_dim as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.combine_normalize);
        launch
            .arg(&expert_out)
            .arg(&slot_weights_device)
            .arg(&k_i)
            .arg(&width_i)
            .arg(&mut fused);
        // SAFETY: one block per row over out_dim; slots with weight 0 are not read.
        unsafe { launch.launch(blocks(n as u32, BLOCK)) }.map_err(driver)?;
        let fused = self.stream.clone_dtoh(&fused).map_err(driver)?;

        routes
            .into_iter()
            .zip(fused.chunks_exact(out_dim))
            .map(|(route, embedding)| {
                let norm = embedding
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum::<f64>()
                    .sqrt();
                if !(norm.is_finite() && (norm - 1.0).abs() < 1e-3) {
                    return Err(FusionError::DegenerateOutput { norm: norm as f32 });
                }
                let mut expert_weights = vec![0.0f32; cfg.num_experts];
                for (&e, &w) in route.selected.iter().zip(&route.weights) {
                    expert_weights[e] = w;
                }
                Ok(FusedEmbedding {
                    embedding: embedding.to_vec(),
                    expert_weights,
                    selected: route.selected,
                })
            })
            .collect()
    }

    /// A device buffer for kernel outputs: NaN-filled when poisoning, else uninitialised
    /// (every element is written before it is read).
    fn output_buffer(&self, len: usize) -> Result<CudaSlice<f32>, FusionError> {
        if self.poison_outputs {
            self.stream.clone_htod(&vec![f32::NAN; len]).map_err(driver)
        } else {
            // SAFETY: see the doc comment; f32 has no invalid bit patterns.
            unsafe { self.stream.alloc::<f32>(len) }.map_err(driver)
        }
    }

    /// `out[out_rows[r]] = act(layer(x[x_rows[r]]))` for `m` rows.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        layer: &DeviceLinear,
        x: &CudaSlice<f32>,
        x_stride: usize,
        x_rows: &CudaSlice<i32>,
        m: usize,
        out: &mut CudaSlice<f32>,
        out_rows: &CudaSlice<i32>,
        gelu: bool,
    ) -> Result<(), FusionError> {
        let (m_i, k_i, n_i) = (
            m as i32,
            layer.in_features as i32,
            layer.out_features as i32,
        );
        let (x_stride_i, out_stride_i, gelu_i) =
            (x_stride as i32, layer.out_features as i32, gelu as i32);
        let grid = (layer.out_features as u32).div_ceil(LINEAR_WARPS);
        let config = blocks(grid, LINEAR_WARPS * 32);
        macro_rules! launch_with {
            ($function:expr, $weight:expr) => {{
                let mut launch = self.stream.launch_builder($function);
                launch
                    .arg($weight)
                    .arg(&layer.bias)
                    .arg(x)
                    .arg(&x_stride_i)
                    .arg(x_rows)
                    .arg(&m_i)
                    .arg(&k_i)
                    .arg(&n_i)
                    .arg(out)
                    .arg(&out_stride_i)
                    .arg(out_rows)
                    .arg(&gelu_i);
                // SAFETY: one warp per weight row; `x_rows`/`out_rows` hold m indices whose
                // rows lie inside `x` and `out` (built by the caller from the same shapes).
                unsafe { launch.launch(config) }.map_err(driver)?;
            }};
        }
        match &layer.weight {
            DeviceMatrix::F32(w) => launch_with!(&self.kernels.linear_f32, w),
            DeviceMatrix::Bf16(w) => launch_with!(&self.kernels.linear_bf16, w),
        }
        Ok(())
    }
}

fn blocks(grid: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
