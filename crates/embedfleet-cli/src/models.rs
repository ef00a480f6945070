//! `embedfleet models`: the catalogue, as a table or JSON lines.

use std::fmt::Write as _;
use std::io::Write as _;

use clap::Args;
use embedfleet_models::catalogue::{fusion_input_width, Prompting, CATALOGUE};
use embedfleet_models::registry::runs;

#[derive(Args)]
pub struct ModelsArgs {
    /// One JSON object per model instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    // Written in one go, so a closed pipe (`embedfleet models | head -3`) is one error that
    // main treats as a normal end, not a panic in the middle of println!.
    let out = render(&args)?;
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

fn render(args: &ModelsArgs) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    if args.json {
        for spec in CATALOGUE {
            let modalities: Vec<String> = spec.modalities.iter().map(ToString::to_string).collect();
            let line = serde_json::json!({
                "name": spec.name, "ordinal": spec.ordinal, "hf_repo": spec.hf_repo, "dim": spec.dim,
                "max_seq_len": spec.max_seq_len, "pooling": format!("{:?}", spec.pooling).to_lowercase(),
                "architecture": format!("{:?}", spec.architecture), "modalities": modalities,
                "parameters": spec.parameters, "f32_bytes": spec.weight_bytes(4),
                "f16_bytes": spec.weight_bytes(2), "bf16_bytes": spec.weight_bytes(2),
                "runs": runs(spec.architecture), "prompting": prompting(spec.prompting),
                "normalized_upstream": spec.normalized_upstream,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(out);
    }
    // Weight memory per dtype; activations come on top (see docs/architecture.md).
    writeln!(
        out,
        "{:<4} {:<16} {:>5} {:>6} {:<10} {:<12} {:>7} {:>12} {:<4} {:<12}  hf repo",
        "id",
        "name",
        "dim",
        "maxlen",
        "pooling",
        "takes",
        "f32 GiB",
        "f16/bf16 GiB",
        "runs",
        "prompting"
    )?;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    for spec in CATALOGUE {
        let takes: Vec<String> = spec.modalities.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "E{:<3} {:<16} {:>5} {:>6} {:<10} {:<12} {:>7.2} {:>12.2} {:<4} {:<12}  {}",
            spec.ordinal,
            spec.name,
            spec.dim,
            spec.max_seq_len,
            format!("{:?}", spec.pooling).to_lowercase(),
            takes.join(","),
            gib(spec.weight_bytes(4)),
            gib(spec.weight_bytes(2)),
            if runs(spec.architecture) { "yes" } else { "no" },
            prompting(spec.prompting),
            spec.hf_repo
        )?;
    }
    writeln!(
        out,
        "fusion input width with all {} models: {}",
        CATALOGUE.len(),
        fusion_input_width(CATALOGUE)
    )?;
    Ok(out)
}

/// How the model reads `instruction` / `input_type`, in a word (docs/protocol.md has the rules).
fn prompting(prompting: Prompting) -> &'static str {
    match prompting {
        Prompting::Plain => "-",
        Prompting::QueryPrefix(_) => "query-prefix",
        Prompting::Instruction { .. } => "instruction",
        Prompting::InstructedQuery { .. } => "query-task",
    }
}
