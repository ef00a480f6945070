//! `embedfleet`: embeddings from an ensemble of models, in-process or as a NATS fleet.
//!
//! # Layout
//! - `embed.rs`: `embedfleet embed`, the in-process pipeline on arguments or stdin lines.
//! - `models.rs`: `embedfleet models`, the catalogue.
//!
//! Every failure ends in one line on stderr (`error: ...`) and a non-zero exit; nothing panics
//! on bad input.

mod embed;
mod models;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "embedfleet", version, about = "Embeddings from an ensemble of models, fused with FuseMoE")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed text in this process (no server): one JSON object per input on stdout.
    Embed(embed::EmbedArgs),
    /// List the model catalogue.
    Models(models::ModelsArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EMBEDFLEET_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Models(args) => models::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole cause chain on one line: "a: b: c".
            eprintln!("error: {}", format!("{error:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
