//! Packing models onto devices.
//!
//! The rule, in order of priority:
//! 1. every model (and every replica) fits where it is put, by the memory rule of
//!    [`crate::memory`]: Σ weights + the largest activation peak + one context ≤ the device's
//!    usable memory (`--memory-fraction` of it);
//! 2. as few devices as possible: the `k` largest devices are tried for k = 1, 2, ...;
//! 3. within those `k`, the expected load is balanced: models go largest first, each to the device
//!    with the least load so far that holds it (load = parameters per replica, since every request
//!    runs every model of the set and replicas share it). First-fit is the fallback when balancing
//!    strands a large model;
//! 4. when nothing fits, models whose dtype the caller did not pin are quantised, largest first,
//!    one step at a time (half → q8_0 → q4k), and the packing is tried again.
//!
//! Replicas of one model always land on different devices. The result is deterministic: ties
//! break by slot order and device index.

use std::collections::BTreeMap;

use embedfleet_models::catalogue::ModelSpec;
use serde::Serialize;

use crate::devices::Device;
use crate::dtype::Dtype;
use crate::memory::{MemoryModel, ModelNeed, GIB};

/// What to plan for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub devices: Vec<Device>,
    /// The models to place, in any order.
    pub models: Vec<&'static ModelSpec>,
    /// Dtypes the caller pinned, by model; a pinned dtype is never changed.
    pub pinned: BTreeMap<&'static str, Dtype>,
    /// Copies of a model, each on its own device (default 1).
    pub replicas: BTreeMap<&'static str, usize>,
    /// Share of each device's memory the plan may fill (headroom for fragmentation).
    pub memory_fraction: f64,
    pub memory: MemoryModel,
}

/// One model replica on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub model: &'static str,
    /// 0-based; 0 for a model with one replica.
    pub replica: usize,
    pub dtype: Dtype,
    pub need: ModelNeed,
}

/// One device and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePlan {
    pub device: Device,
    /// The bytes the plan may fill: `memory_fraction` of the device.
    pub usable: u64,
    pub models: Vec<Assignment>,
}

impl DevicePlan {
    /// Σ weights + largest activation peak + one context; 0 for an unused device.
    pub fn used(&self, memory: &MemoryModel) -> u64 {
        if self.models.is_empty() {
            return 0;
        }
        let weights: u64 = self.models.iter().map(|a| a.need.weights).sum();
        let peak = self
            .models
            .iter()
            .map(|a| a.need.activations)
            .max()
            .unwrap_or(0);
        weights + peak + memory.context_bytes
    }
}

/// A placement of every requested model replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Every device given, in index order; unused ones hold no models.
    pub devices: Vec<DevicePlan>,
    /// Models the planner quantised below their default dtype to make the plan fit.
    pub quantized: Vec<(&'static str, Dtype)>,
    #[serde(skip)]
    pub memory: MemoryModel,
}

impl Plan {
    pub fn used_devices(&self) -> impl Iterator<Item = &DevicePlan> {
        self.devices.iter().filter(|d| !d.models.is_empty())
    }
}

/// Why there is no plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no models to place")]
    NoModels,
    #[error("--memory-fraction {0} is outside (0, 1]")]
    BadFraction(f64),
    #[error(
        "`{model}` needs {need_gib:.2} GiB at {dtype} (weights + activations + context), \
         but the biggest device offers {biggest_gib:.2} GiB"
    )]
    FitsNowhere {
        model: &'static str,
        dtype: Dtype,
        need_gib: f64,
        biggest_gib: f64,
    },
    #[error("`{model}` wants {replicas} replicas on distinct devices, but only {devices} devices are given")]
    TooFewDevicesForReplicas {
        model: &'static str,
        replicas: usize,
        devices: usize,
    },
    #[error(
        "the models do not fit together: at the smallest dtypes allowed they need {need_gib:.2} GiB \
         of weights alone, the devices offer {usable_gib:.2} GiB in all{hint}"
    )]
    DoesNotFit {
        need_gib: f64,
        usable_gib: f64,
        hint: String,
    },
}

/// Plans `request`, or says why it cannot be done.
pub fn plan(request: &PlanRequest) -> Result<Plan, PlanError> {
    if request.models.is_empty() {
        return Err(PlanError::NoModels);
    }
    if !(request.memory_fraction > 0.0 && request.memory_fraction <= 1.0) {
        return Err(PlanError::BadFraction(request.memory_fraction));
    }
    let mut models = request.models.clone();
    models.sort_by_key(|spec| spec.ordinal);
    models.dedup_by_key(|spec| spec.ordinal);
    for spec in &models {
        let replicas = replicas_of(request, spec);
        if replicas > request.devices.len() {
            return Err(PlanError::TooFewDevicesForReplicas {
                model: spec.name,
                replicas,
                devices: request.devices.len(),
            });
        }
    }

    let usable = |device: &Device| (device.bytes as f64 * request.memory_fraction) as u64;
    let biggest = request.devices.iter().map(usable).max().unwrap_or(0);
    let memory = request.memory;
    let alone = |spec: &ModelSpec, dtype: Dtype| {
        let need = memory.need(spec, dtype);
        need.weights + need.activations + memory.context_bytes
    };

    // Start every model at its pinned or default dtype; a model that does not fit even alone on
    // the biggest device is quantised first (if not pinned), or is the error.
    let mut dtypes: BTreeMap<&'static str, Dtype> = BTreeMap::new();
    for spec in &models {
        let pinned = request.pinned.get(spec.name).copied();
        let mut dtype = pinned.unwrap_or_else(|| Dtype::default_for(spec));
        while alone(spec, dtype) > biggest {
            match dtype.smaller().filter(|_| pinned.is_none()) {
                Some(smaller) => dtype = smaller,
                None => {
                    return Err(PlanError::FitsNowhere {
                        model: spec.name,
                        dtype,
                        need_gib: alone(spec, dtype) as f64 / GIB as f64,
                        biggest_gib: biggest as f64 / GIB as f64,
                    })
                }
            }
        }
        dtypes.insert(spec.name, dtype);
    }

    loop {
        if let Some(devices) = pack(request, &models, &dtypes) {
            let quantized = models
                .iter()
                .filter(|spec| {
                    dtypes[spec.name] != Dtype::default_for(spec)
                        && !request.pinned.contains_key(spec.name)
                })
                .map(|spec| (spec.name, dtypes[spec.name]))
                .collect();
            return Ok(Plan {
                devices,
                quantized,
                memory,
            });
        }
        // Quantise the unpinned model with the most weights one step, and try again.
        let next = models
            .iter()
            .filter(|spec| !request.pinned.contains_key(spec.name))
            .filter_map(|spec| dtypes[spec.name].smaller().map(|smaller| (spec, smaller)))
            .max_by_key(|(spec, _)| {
                (
                    memory.need(spec, dtypes[spec.name]).weights,
                    std::cmp::Reverse(spec.ordinal),
                )
            });
        match next {
            Some((spec, smaller)) => {
                dtypes.insert(spec.name, smaller);
            }
            None => return Err(does_not_fit(request, &models, &dtypes)),
        }
    }
}

fn replicas_of(request: &PlanRequest, spec: &ModelSpec) -> usize {
    request.replicas.get(spec.name).copied().unwrap_or(1).max(1)
}

/// Tries k = 1.. of the largest devices, balanced then first-fit; `None` if no k holds all.
fn pack(
    request: &PlanRequest,
    models: &[&'static ModelSpec],
    dtypes: &BTreeMap<&'static str, Dtype>,
) -> Option<Vec<DevicePlan>> {
    let memory = request.memory;
    let mut items: Vec<(Assignment, u64)> = Vec::new();
    for spec in models {
        let replicas = replicas_of(request, spec);
        let dtype = dtypes[spec.name];
        let need = memory.need(spec, dtype);
        for replica in 0..replicas {
            let load = spec.parameters / replicas as u64;
            items.push((
                Assignment {
                    model: spec.name,
                    replica,
                    dtype,
                    need,
                },
                load,
            ));
        }
    }
    // Largest first; ties by slot order (the models are already in slot order, sort is stable).
    items.sort_by_key(|(a, _)| std::cmp::Reverse(a.need.weights + a.need.activations));

    let mut order: Vec<&Device> = request.devices.iter().collect();
    order.sort_by_key(|d| (std::cmp::Reverse(d.bytes), d.index));
    for k in 1..=order.len() {
        let chosen = &order[..k];
        for balanced in [true, false] {
            if let Some(plans) = try_pack(request, chosen, &items, balanced) {
                let mut all: Vec<DevicePlan> = request
                    .devices
                    .iter()
                    .map(|device| {
                        plans
                            .iter()
                            .find(|p| p.device.index == device.index)
                            .cloned()
                            .unwrap_or_else(|| DevicePlan {
                                device: *device,
                                usable: (device.bytes as f64 * request.memory_fraction) as u64,
                                models: Vec::new(),
                            })
                    })
                    .collect();
                for device in &mut all {
                    device
                        .models
                        .sort_by_key(|a| (crate_ordinal(a.model), a.replica));
                }
                return Some(all);
            }
        }
    }
    None
}

fn crate_ordinal(model: &str) -> u8 {
    embedfleet_models::catalogue::find(model).map_or(u8::MAX, |spec| spec.ordinal)
}

fn try_pack(
    request: &PlanRequest,
    devices: &[&Device],
    items: &[(Assignment, u64)],
    balanced: bool,
) -> Option<Vec<DevicePlan>> {
    let memory = request.memory;
    let mut plans: Vec<(DevicePlan, u64)> = devices
        .iter()
        .map(|device| {
            (
                DevicePlan {
                    device: **device,
                    usable: (device.bytes as f64 * request.memory_fraction) as u64,
                    models: Vec::new(),
                },
                0,
            )
        })
        .collect();
    for (item, load) in items {
        let fits = |plan: &DevicePlan| {
            if plan.models.iter().any(|a| a.model == item.model) {
                return false;
            }
            let mut with = plan.clone();
            with.models.push(item.clone());
            with.used(&memory) <= plan.usable
        };
        let candidates = plans.iter_mut().filter(|(plan, _)| fits(plan));
        let target = if balanced {
            candidates.min_by_key(|(plan, load)| (*load, plan.device.index))
        } else {
            candidates.into_iter().next()
        }?;
        target.0.models.push(item.clone());
        target.1 += load;
    }
    Some(plans.into_iter().map(|(plan, _)| plan).collect())
}

fn does_not_fit(
    request: &PlanRequest,
    models: &[&'static ModelSpec],
    dtypes: &BTreeMap<&'static str, Dtype>,
) -> PlanError {
    let memory = request.memory;
    let need: u64 = models
        .iter()
        .map(|spec| {
            memory.need(spec, dtypes[spec.name]).weights * replicas_of(request, spec) as u64
        })
        .sum();
    let usable: u64 = request
        .devices
        .iter()
        .map(|d| (d.bytes as f64 * request.memory_fraction) as u64)
        .sum();
    let hint = if need > usable {
        "; add devices, or leave models out".to_string()
    } else if !request.pinned.is_empty() {
        "; unpin dtypes (--dtype) so the planner may quantise, lower --token-budget, or raise --memory-fraction".into()
    } else {
        "; the activations of the largest models do not fit beside the weights: lower --token-budget or raise --memory-fraction".into()
    };
    PlanError::DoesNotFit {
        need_gib: need as f64 / GIB as f64,
        usable_gib: usable as f64 / GIB as f64,
        hint,
    }
}
