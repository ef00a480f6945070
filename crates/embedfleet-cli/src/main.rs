//! `embedfleet`: embeddings from an ensemble of models, in-process or as a NATS fleet.
//!
//! # Layout
//! - `embed.rs`: `embedfleet embed`, on arguments or stdin lines: the in-process pipeline, or a
//!   fleet through embedfleet-client with `--nats-url`.
//! - `models.rs`: `embedfleet models`, the catalogue. `plan.rs`: `embedfleet plan`, placement on GPUs.
//! - `serve.rs`, `coordinator.rs`, `worker.rs`: the fleet roles, one per file; `fleet_args.rs`
//!   holds what they share (flags, runtime, signals); `security_args.rs` the NATS and Redis
//!   credentials and TLS flags of every command that connects; `http_args.rs` their health and
//!   metrics endpoint. `fetch.rs`: checkpoints into a model directory; `probe.rs`: a container health
//!   check. `telemetry.rs`: logging and OTLP trace export. `bench/`: `embedfleet bench` (the
//!   perf harness, capacity sweep and fleet comparison; layout in `bench/mod.rs`).
//!
//! Every failure ends in one line on stderr (`error: ...`) and a non-zero exit; nothing panics
//! on bad input.

mod bench;
mod coordinator;
mod default_fusion;
mod embed;
mod eval;
mod fetch;
mod fleet_args;
mod fusion_cmd;
mod fusion_train;
mod http_args;
mod models;
mod pair_data;
mod partial_cache;
mod partial_fleet;
mod plan;
mod plan_file;
mod probe;
mod quantized_search;
mod security_args;
mod serve;
mod telemetry;
mod worker;

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
    /// Plan where the models go on a set of GPUs, at which dtype: table, worker commands, Helm values.
    Plan(plan::PlanArgs),
    /// Benchmarks: the perf harness (`bench run`), capacity planning (`bench sweep`), and the
    /// fleet-versus-in-process comparison (`bench fleet`).
    Bench(bench::BenchArgs),
    /// Download the checkpoints of --models into --model-dir (what a worker reads).
    Fetch(fetch::FetchArgs),
    /// GET a role's /readyz (or --url) and exit 0 on 200: a health check for containers.
    Probe(probe::ProbeArgs),
    /// Evaluate every model, their concatenation and the fused vector on STS and BEIR sets.
    Eval(eval::EvalArgs),
    /// Fusion training tools: prepare pair data, fill the partial cache, train the layer.
    Fusion(fusion_cmd::FusionArgs),
}

impl Command {
    /// The `service.name` of this command's exported spans (docs/operations.md#traces).
    fn service_name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "embedfleet-serve",
            Command::Coordinator(_) => "embedfleet-coordinator",
            Command::Worker(_) => "embedfleet-worker",
            Command::Embed(_) => "embedfleet-embed",
            _ => "embedfleet",
        }
    }
}

fn main() -> ExitCode {
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
    let telemetry = match telemetry::init(cli.command.service_name()) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Models(args) => models::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fusion(args) => fusion_cmd::run(args),
    };
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`embedfleet models | head -3`): what it wanted was printed.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        // A severe regression is a verdict, not a failure to run: its own code, for CI.
        Err(error) if error.is::<bench::SevereRegression>() => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::from(3)
        }
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
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
