//! `embedfleet`: embeddings from an ensemble of models, in-process or as a NATS fleet.
//!
//! # Layout
//! - `embed.rs`: `embedfleet embed`, on arguments or stdin lines: the in-process pipeline, or a
//!   fleet through embedfleet-client with `--nats-url`.
//! - `models.rs`: `embedfleet models`, the catalogue.
//! - `serve.rs`, `coordinator.rs`, `worker.rs`: the fleet roles, one per file; `fleet_args.rs`
//!   holds what they share (flags, runtime, signals). `bench.rs`: `embedfleet bench fleet`.
//!
//! Every failure ends in one line on stderr (`error: ...`) and a non-zero exit; nothing panics
//! on bad input.

mod bench;
mod coordinator;
mod default_fusion;
mod embed;
mod eval;
mod fleet_args;
mod fusion_cmd;
mod fusion_train;
mod models;
mod pair_data;
mod partial_cache;
mod quantized_search;
mod serve;
mod worker;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "embedfleet",
    version,
    about = "Embeddings from an ensemble of models, fused with FuseMoE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed text, in this process or through a fleet (--nats-url): one JSON object per input.
    Embed(embed::EmbedArgs),
    /// List the model catalogue.
    Models(models::ModelsArgs),
    /// Run the whole fleet in this process: coordinator, fusion and workers for --models.
    Serve(serve::ServeArgs),
    /// Run the embed.v1 coordinator alone (no models) against --nats-url.
    Coordinator(coordinator::CoordinatorRoleArgs),
    /// Run a model worker for --models against --nats-url.
    Worker(worker::WorkerRoleArgs),
    /// Load-test a running fleet (`bench fleet`): throughput and latency, cold and warm.
    Bench(bench::BenchArgs),
    /// Evaluate every model, their concatenation and the fused vector on STS and BEIR sets.
    Eval(eval::EvalArgs),
    /// Fusion training tools: prepare pair data, fill the partial cache, train the layer.
    Fusion(fusion_cmd::FusionArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBEDFLEET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not failures; print them as clap formats them.
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let rendered = error.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{} (see `embedfleet --help`)", first.trim_end());
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Models(args) => models::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fusion(args) => fusion_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, "a: b: c", skipping a cause whose text the message
/// already carries (several error types here embed their source in their own message).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line.replace(['\n', '\r'], " ")
}
