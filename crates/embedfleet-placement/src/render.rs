//! A plan as people and tools read it: a table, worker command lines, the chart's values.

use std::fmt::Write;

use crate::memory::GIB;
use crate::plan::{DevicePlan, Plan};

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// One row per model replica, grouped by device, with each device's use against its budget.
pub fn table(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:<6} {:>11} {:>15}",
        "device", "model", "dtype", "weights GiB", "activations GiB"
    );
    for device in &plan.devices {
        let name = format!("cuda:{}", device.device.index);
        if device.models.is_empty() {
            let _ = writeln!(
                out,
                "{name:<8} (unused, {:.1} GiB)",
                gib(device.device.bytes)
            );
            continue;
        }
        for assignment in &device.models {
            let model = match assignment.replica {
                0 => assignment.model.to_string(),
                n => format!("{}#{}", assignment.model, n + 1),
            };
            let _ = writeln!(
                out,
                "{name:<8} {model:<16} {:<6} {:>11.2} {:>15.2}",
                assignment.dtype.as_str(),
                gib(assignment.need.weights),
                gib(assignment.need.activations)
            );
        }
        let used = device.used(&plan.memory);
        let _ = writeln!(
            out,
            "{name:<8} {:<23} {:>11.2} of {:.2} GiB usable ({:.0}%; {:.1} GiB card)",
            "total (+ context)",
            gib(used),
            gib(device.usable),
            100.0 * used as f64 / device.usable.max(1) as f64,
            gib(device.device.bytes)
        );
    }
    for (model, dtype) in &plan.quantized {
        let _ = writeln!(out, "note: {model} quantised to {dtype} to fit");
    }
    out
}

fn dtype_flag(device: &DevicePlan) -> String {
    device
        .models
        .iter()
        .map(|a| format!("{}={}", a.model, a.dtype))
        .collect::<Vec<_>>()
        .join(",")
}

fn model_list(device: &DevicePlan) -> String {
    device
        .models
        .iter()
        .map(|a| a.model)
        .collect::<Vec<_>>()
        .join(",")
}

/// One `embedfleet worker` command per used device.
pub fn commands(plan: &Plan) -> Vec<String> {
    plan.used_devices()
        .map(|device| {
            format!(
                "embedfleet worker --device cuda:{} --models {} --dtype {}",
                device.device.index,
                model_list(device),
                dtype_flag(device)
            )
        })
        .collect()
}

/// The chart's `workerGroups` block: one group per used device, one GPU each, in the format
/// deploy/helm/embedfleet/README.md documents ("Worker groups"), so it pastes into a values file
/// unchanged. Each group's `dtype` is the per-model `--dtype` list of its worker.
pub fn helm_values(plan: &Plan) -> String {
    let mut out = String::from("workerGroups:\n");
    for device in plan.used_devices() {
        let _ = writeln!(out, "  - name: gpu{}", device.device.index);
        let models: Vec<&str> = device.models.iter().map(|a| a.model).collect();
        let _ = writeln!(out, "    models: [{}]", models.join(", "));
        let _ = writeln!(out, "    dtype: \"{}\"", dtype_flag(device));
        let _ = writeln!(
            out,
            "    # planned for a {:.0} GiB device: pin that card with gpu.product",
            gib(device.device.bytes)
        );
        let _ = writeln!(out, "    gpu: {{count: 1, type: nvidia.com/gpu}}");
    }
    out
}
