//! Reading a placement plan back (`embedfleet plan --format json --out plan.json`), for
//! `embedfleet serve --plan`: which models go on which GPU, at which dtype.

use std::path::Path;

use anyhow::{bail, Context};
use embedfleet_models::DeviceName;
use serde::Deserialize;

/// The models one device hosts, as the plan placed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceGroup {
    pub device: DeviceName,
    pub models: Vec<String>,
    /// `model=dtype` for each model, in the form `--dtype` takes.
    pub dtypes: Vec<String>,
}

#[derive(Deserialize)]
struct PlanJson {
    devices: Vec<DeviceJson>,
}

#[derive(Deserialize)]
struct DeviceJson {
    device: DeviceIndex,
    models: Vec<AssignmentJson>,
}

#[derive(Deserialize)]
struct DeviceIndex {
    index: usize,
}

#[derive(Deserialize)]
struct AssignmentJson {
    model: String,
    dtype: String,
}

/// The devices of `path` that hold models, each with its models.
pub fn read_plan(path: &Path) -> anyhow::Result<Vec<DeviceGroup>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_plan(&text).with_context(|| format!("plan {}", path.display()))
}

fn parse_plan(text: &str) -> anyhow::Result<Vec<DeviceGroup>> {
    let plan: PlanJson =
        serde_json::from_str(text).context("not a plan written by `embedfleet plan --format json`")?;
    let groups: Vec<DeviceGroup> = plan
        .devices
        .into_iter()
        .filter(|device| !device.models.is_empty())
        .map(|device| DeviceGroup {
            device: DeviceName::Cuda(device.device.index),
            dtypes: device
                .models
                .iter()
                .map(|a| format!("{}={}", a.model, a.dtype))
                .collect(),
            models: device.models.into_iter().map(|a| a.model).collect(),
        })
        .collect();
    if groups.is_empty() {
        bail!("the plan places no models");
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_becomes_one_group_per_used_device() {
        let text = r#"{"devices": [
            {"device": {"index": 0, "bytes": 1}, "usable": 1, "models": [
                {"model": "e5-mistral", "replica": 0, "dtype": "q4k", "need": {}},
                {"model": "minilm", "replica": 0, "dtype": "f16", "need": {}}]},
            {"device": {"index": 1, "bytes": 1}, "usable": 1, "models": []},
            {"device": {"index": 2, "bytes": 1}, "usable": 1, "models": [
                {"model": "minilm", "replica": 1, "dtype": "f16", "need": {}}]}
        ], "quantized": []}"#;
        let groups = parse_plan(text).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].device, DeviceName::Cuda(0));
        assert_eq!(groups[0].models, ["e5-mistral", "minilm"]);
        assert_eq!(groups[0].dtypes, ["e5-mistral=q4k", "minilm=f16"]);
        assert_eq!(groups[1].device, DeviceName::Cuda(2));
    }

    #[test]
    fn an_empty_or_foreign_file_is_a_clear_error() {
        let empty = r#"{"devices": [{"device": {"index": 0}, "models": []}]}"#;
        assert!(parse_plan(empty).unwrap_err().to_string().contains("no models"));
        let foreign = parse_plan(r#"{"models": ["minilm"]}"#).unwrap_err();
        assert!(foreign.to_string().contains("embedfleet plan --format json"), "{foreign}");
    }
}
