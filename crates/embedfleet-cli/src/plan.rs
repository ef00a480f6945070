//! `embedfleet plan`: where each model goes on a set of GPUs, at which dtype, so that it fits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use embedfleet_models::catalogue::{self, ModelSpec, CATALOGUE};
use embedfleet_models::ModelDtypes;
use embedfleet_placement::{parse_devices, plan, render, MemoryModel, PlanRequest};

#[derive(Args)]
pub struct PlanArgs {
    /// The devices' memory, comma-separated: `80GB,80GB,24GB` (GB = GiB, as nvidia-smi counts).
    #[arg(long)]
    gpus: String,
    /// Models to place, comma-separated (default: all twelve).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Pin dtypes: one for every model (`q8_0`) or per model (`e5-mistral=q4k,minilm=f32`).
    /// Unpinned models start at f16 (T5: bf16) and are quantised, largest first, if needed.
    #[arg(long)]
    dtype: Option<ModelDtypes>,
    /// Copies per model, each on its own device: `minilm=2,mpnet=2`.
    #[arg(long)]
    replicas: Option<String>,
    /// Share of each device's memory the plan may fill.
    #[arg(long, default_value_t = 0.9)]
    memory_fraction: f64,
    /// Most tokens one forward packs on a device (sizes the activations).
    #[arg(long, default_value_t = MemoryModel::default().token_budget)]
    token_budget: u64,
    /// What to print.
    #[arg(long, value_enum, default_value_t = Format::All)]
    format: Format,
    /// Also write the plan as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The table, the worker command lines and the Helm values block.
    All,
    Table,
    Commands,
    Helm,
    Json,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let devices = parse_devices(&args.gpus)
        .map_err(anyhow::Error::msg)
        .context("--gpus")?;
    let models: Vec<&'static ModelSpec> = match &args.models {
        None => CATALOGUE.iter().collect(),
        Some(names) => names
            .iter()
            .map(|name| model(name))
            .collect::<anyhow::Result<_>>()
            .context("--models")?,
    };
    if args.token_budget == 0 {
        bail!("--token-budget must be at least 1");
    }
    // Named models are pinned at their dtype, and with a bare default every model is.
    let dtypes = args.dtype.clone().unwrap_or_default();
    let mut pinned = dtypes.per_model.clone();
    if let Some(default) = dtypes.default {
        for spec in &models {
            pinned.entry(spec.name).or_insert(default);
        }
    }
    for (name, dtype) in &pinned {
        dtype.check_for(model(name)?).context("--dtype")?;
    }
    let mut replicas = BTreeMap::new();
    for (name, count) in pairs(args.replicas.as_deref().unwrap_or("")).context("--replicas")? {
        let count: usize = count.parse().ok().filter(|n| *n >= 1).with_context(|| {
            format!("--replicas: `{name}={count}` is not a count of at least 1")
        })?;
        replicas.insert(name, count);
    }
    let request = PlanRequest {
        devices,
        models,
        pinned,
        replicas,
        memory_fraction: args.memory_fraction,
        memory: MemoryModel {
            token_budget: args.token_budget,
            ..MemoryModel::default()
        },
    };
    let plan = plan(&request)?;
    let json = serde_json::to_string_pretty(&plan)?;
    if let Some(path) = &args.out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    let out = match args.format {
        Format::Table => render::table(&plan),
        Format::Commands => format!("{}\n", render::commands(&plan).join("\n")),
        Format::Helm => render::helm_values(&plan),
        Format::Json => format!("{json}\n"),
        Format::All => format!(
            "{}\n# one worker per device\n{}\n\n# Helm values (deploy/helm/embedfleet)\n{}",
            render::table(&plan),
            render::commands(&plan).join("\n"),
            render::helm_values(&plan)
        ),
    };
    // One write: a closed pipe is an error main ends quietly on, not a println! panic.
    std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes())?;
    Ok(())
}

fn model(name: &str) -> anyhow::Result<&'static ModelSpec> {
    catalogue::find(name).with_context(|| {
        let known: Vec<&str> = CATALOGUE.iter().map(|s| s.name).collect();
        format!("unknown model `{name}` (known: {})", known.join(", "))
    })
}

/// `a=x,b=y` into (catalogue name, value) pairs; an empty string is no pairs.
fn pairs(list: &str) -> anyhow::Result<Vec<(&'static str, &str)>> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (name, value) = item
                .split_once('=')
                .with_context(|| format!("`{item}` is not name=value"))?;
            Ok((model(name.trim())?.name, value.trim()))
        })
        .collect()
}
