//! `embedfleet bench fleet`: a quick side-by-side load test of a running fleet (`embedfleet serve`, or coordinators
//! and workers), for the figures an operator sizes a fleet by.
//!
//! `--clients` tasks, each with its own NATS connection and [`EmbedClient`], share a fixed number
//! of requests of `--batch` texts each:
//! 1. **cold**: every input is new to the fleet (a run id and the request number are in the text,
//!    so a rerun is cold too): cache misses, one job per model, fusion;
//! 2. **warm** (unless `--no-warm`): the same requests again, answered from the fleet's cache;
//! 3. **in-process** (with `--in-process`): the cold pass's inputs through the in-process
//!    [`Pipeline`] with the same models and the same concurrency (one blocking task per request,
//!    `--clients` at once): the denominator of the fleet's overhead.
//!
//! One probe request goes first, so that an unreachable fleet fails at once with one line and no
//! pass pays for a first-request cost (building the fusion layer of a new model set). The result
//! is a table on stdout: requests, errors, throughput, latency percentiles of the successful
//! requests. Progress goes to stderr every 10 %. A failed request is counted in the table, by
//! kind, never a panic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use embedfleet_client::{ClientError, EmbedClient};
use embedfleet_fleet::{Pipeline, PipelineRequest};
use embedfleet_models::{Device, ModelInput, ModelRegistry, WeightResolver};
use embedfleet_proto::{EmbedReply, EmbedRequest, Encoding};

use super::run_id;
use crate::fleet_args;
use crate::security_args::NatsSecurityArgs;

#[derive(Args)]
pub struct FleetBenchArgs {
    /// NATS server of the running fleet, e.g. the URL `embedfleet serve` prints.
    #[arg(long, env = "EMBEDFLEET_NATS_URL")]
    nats_url: String,
    #[command(flatten)]
    nats_security: NatsSecurityArgs,
    /// Concurrent clients, each with its own NATS connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    clients: u64,
    /// Requests per pass, shared by the clients.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    requests: u64,
    /// Texts per request (the fleet takes at most 256 by default).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// Models every request names (and the in-process pass runs), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    models: Vec<String>,
    /// Skip the warm pass (the cold pass's requests again, answered from the cache).
    #[arg(long)]
    no_warm: bool,
    /// Also run the cold pass's inputs through the in-process pipeline at the same
    /// concurrency, and print the fleet/in-process ratios.
    #[arg(long)]
    in_process: bool,
    /// Checkpoints for --in-process (`<dir>/minilm/config.json`, ...).
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    model_dir: Option<PathBuf>,
    /// Send MessagePack instead of JSON (replies come back the same way).
    #[arg(long)]
    msgpack: bool,
    /// Per-request timeout, in milliseconds; a request past it counts as an error.
    #[arg(long, default_value_t = 35_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

pub fn run_fleet(args: FleetBenchArgs) -> anyhow::Result<()> {
    // Unknown model names fail here, with the catalogue's message, not as N error replies.
    fleet_args::model_specs(&args.models)?;
    let workload = Arc::new(Workload {
        run: run_id(),
        batch: args.batch as usize,
        requests: args.requests,
        models: args.models.clone(),
    });
    let encoding = if args.msgpack {
        Encoding::MsgPack
    } else {
        Encoding::Json
    };
    fleet_args::runtime()?.block_on(async {
        let clients = connect_clients(&args, encoding).await?;
        probe(&clients[0], &workload, &args.nats_url).await?;
        // Loaded before any pass, so a missing checkpoint fails before minutes of load, and
        // loading does not share the machine with a fleet pass.
        let pipeline = if args.in_process {
            Some(load_pipeline(&args).await?)
        } else {
            None
        };
        eprintln!(
            "embedfleet bench fleet: nats={} clients={} requests={} batch={} models={} \
             encoding={} run={}",
            args.nats_url,
            args.clients,
            args.requests,
            args.batch,
            args.models.join(","),
            if args.msgpack { "msgpack" } else { "json" },
            workload.run,
        );

        let mut passes = vec![fleet_pass("cold", &clients, &workload).await];
        if !args.no_warm {
            passes.push(fleet_pass("warm", &clients, &workload).await);
        }
        if let Some(pipeline) = pipeline {
            let concurrency = args.clients as usize;
            passes.push(in_process_pass(pipeline, concurrency, &workload).await);
        }
        print!("{}", report(&passes, workload.batch));
        anyhow::Ok(())
    })
}

/// One connection per client: a shared connection would make the client side one socket and one
/// task, which is not what N independent callers look like to the fleet.
async fn connect_clients(
    args: &FleetBenchArgs,
    encoding: Encoding,
) -> anyhow::Result<Vec<EmbedClient>> {
    let security = args.nats_security.security()?;
    let mut clients = Vec::with_capacity(args.clients as usize);
    for _ in 0..args.clients {
        let client = EmbedClient::connect_with(&args.nats_url, &security)
            .await?
            .with_encoding(encoding)
            .with_timeout(Duration::from_millis(args.timeout_ms));
        clients.push(client);
    }
    Ok(clients)
}

/// One request of the workload's shape with an input of its own: the fleet is there, serves the
/// models, and has built the fusion layer of the set before the clock starts.
async fn probe(client: &EmbedClient, workload: &Workload, url: &str) -> anyhow::Result<()> {
    let texts = (0..workload.batch)
        .map(|i| format!("embedfleet bench probe {} {i}", workload.run))
        .collect::<Vec<_>>();
    let request = EmbedRequest::texts(texts).with_models(&workload.models);
    match client.embed(&request).await {
        Ok(reply) => check_reply(&reply, workload.batch).map_err(anyhow::Error::msg),
        Err(ClientError::NoResponders) => bail!(
            "no embedfleet service answers on {url}: start one with `embedfleet serve` (it \
             prints the URL)"
        ),
        Err(error) => Err(error).context("the probe request failed"),
    }
}

async fn load_pipeline(args: &FleetBenchArgs) -> anyhow::Result<Arc<Pipeline>> {
    let resolver = WeightResolver::from_env(args.model_dir.clone());
    let models = args.models.clone();
    eprintln!(
        "embedfleet bench fleet: loading {} in this process for --in-process",
        models.join(",")
    );
    let pipeline = tokio::task::spawn_blocking(move || {
        let registry = Arc::new(ModelRegistry::new(resolver, Device::Cpu));
        let pipeline = Pipeline::new(registry, &models, None)?;
        pipeline.warm_up()?;
        anyhow::Ok(pipeline)
    })
    .await
    .context("loading the in-process pipeline")??;
    Ok(Arc::new(pipeline))
}

/// The texts of every request of a run: varied sentences of everyday length, each made unique
/// by the run id, the request number and its place in the request.
struct Workload {
    run: String,
    batch: usize,
    requests: u64,
    models: Vec<String>,
}

impl Workload {
    fn texts(&self, request: u64) -> Vec<String> {
        (0..self.batch)
            .map(|i| {
                let n = request as usize * self.batch + i;
                let sentence = SENTENCES[n % SENTENCES.len()];
                format!(
                    "{sentence} (bench {} request {request} input {i})",
                    self.run
                )
            })
            .collect()
    }

    fn request(&self, request: u64) -> EmbedRequest {
        EmbedRequest::texts(self.texts(request)).with_models(&self.models)
    }

    fn inputs(&self, request: u64) -> Vec<ModelInput> {
        self.texts(request)
            .into_iter()
            .map(ModelInput::Text)
            .collect()
    }
}

const SENTENCES: [&str; 16] = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Quarterly revenue grew by twelve percent, driven mostly by new subscriptions.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum's new wing displays sculptures from the early bronze age.",
    "Rain is expected across the northern region through the weekend.",
    "She compiled the kernel with debug symbols to trace the memory leak.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The committee postponed the vote until the budget report is finished.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our flight was delayed three hours because of a mechanical inspection.",
    "Which embedding model works best for short multilingual product titles?",
    "The orchestra closed the season with a Mahler symphony.",
    "Replace the air filter every twelve months or fifteen thousand miles.",
    "A distributed queue decouples producers from slow consumers.",
    "The hikers reached the summit just before the storm rolled in.",
    "Interest rates remained unchanged after the central bank's meeting.",
];

/// What one pass measured.
struct PassResult {
    name: &'static str,
    requests: u64,
    /// Latencies of the successful requests.
    latencies: Vec<Duration>,
    /// Failed requests by kind: count and the first message.
    errors: BTreeMap<String, (u64, String)>,
    wall: Duration,
}

impl PassResult {
    fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    /// Successful requests per second over the pass's wall time.
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile of the successful requests' latencies (sorted).
    fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.latencies[rank.clamp(1, n) - 1])
    }
}

/// What the tasks of one pass share: the next request number, the results, progress.
struct PassState {
    name: &'static str,
    total: u64,
    next: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    started: Instant,
    latencies: Mutex<Vec<Duration>>,
    errors: Mutex<BTreeMap<String, (u64, String)>>,
}

impl PassState {
    fn new(name: &'static str, total: u64) -> Arc<Self> {
        eprintln!("{name}: {total} requests");
        Arc::new(PassState {
            name,
            total,
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started: Instant::now(),
            latencies: Mutex::new(Vec::with_capacity(total as usize)),
            errors: Mutex::new(BTreeMap::new()),
        })
    }

    /// The next request number to send, until the pass has sent them all.
    fn take(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < self.total).then_some(n)
    }

    fn record(&self, outcome: Result<Duration, (String, String)>) {
        match outcome {
            Ok(latency) => lock(&self.latencies).push(latency),
            Err((kind, message)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                lock(&self.errors).entry(kind).or_insert((0, message)).0 += 1;
            }
        }
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if done * 10 / self.total != (done - 1) * 10 / self.total {
            eprintln!(
                "{}: {:>3}% ({done}/{}, {} errors, {:.1} s)",
                self.name,
                done * 100 / self.total,
                self.total,
                self.failed.load(Ordering::Relaxed),
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&self) -> PassResult {
        let wall = self.started.elapsed();
        let mut latencies = std::mem::take(&mut *lock(&self.latencies));
        latencies.sort_unstable();
        PassResult {
            name: self.name,
            requests: self.total,
            latencies,
            errors: std::mem::take(&mut *lock(&self.errors)),
            wall,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every client sends its next request as soon as its last one is answered.
async fn fleet_pass(
    name: &'static str,
    clients: &[EmbedClient],
    workload: &Arc<Workload>,
) -> PassResult {
    let state = PassState::new(name, workload.requests);
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, state, workload) = (client.clone(), state.clone(), workload.clone());
        tasks.spawn(async move {
            while let Some(n) = state.take() {
                let request = workload.request(n);
                let started = Instant::now();
                let result = client.embed(&request).await;
                let latency = started.elapsed();
                let outcome = match result {
                    Ok(reply) => check_reply(&reply, workload.batch)
                        .map(|()| latency)
                        .map_err(|message| ("bad reply".to_string(), message)),
                    Err(error) => Err((client_error_kind(&error), error.to_string())),
                };
                state.record(outcome);
            }
        });
    }
    join_all(&state, &mut tasks).await;
    state.finish()
}

/// The cold pass's inputs through the pipeline, `concurrency` requests at a time, each on a
/// blocking thread as the fleet's roles run models.
async fn in_process_pass(
    pipeline: Arc<Pipeline>,
    concurrency: usize,
    workload: &Arc<Workload>,
) -> PassResult {
    let state = PassState::new("in-process", workload.requests);
    let request = Arc::new(PipelineRequest {
        fuse: true,
        ..PipelineRequest::default()
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (pipeline, state, workload, request) = (
            pipeline.clone(),
            state.clone(),
            workload.clone(),
            request.clone(),
        );
        tasks.spawn(async move {
            while let Some(n) = state.take() {
                let inputs = workload.inputs(n);
                let (pipeline, request) = (pipeline.clone(), request.clone());
                let started = Instant::now();
                let result =
                    tokio::task::spawn_blocking(move || pipeline.embed(&inputs, &request, 0)).await;
                let latency = started.elapsed();
                let outcome = match result {
                    Ok(Ok(output)) if output.data.len() == workload.batch => Ok(latency),
                    Ok(Ok(output)) => Err((
                        "bad reply".to_string(),
                        format!(
                            "{} vectors for {} inputs",
                            output.data.len(),
                            workload.batch
                        ),
                    )),
                    Ok(Err(error)) => Err((error.kind().to_string(), error.to_string())),
                    Err(join) => Err(("panic".to_string(), join.to_string())),
                };
                state.record(outcome);
            }
        });
    }
    join_all(&state, &mut tasks).await;
    state.finish()
}

/// Waits for a pass's tasks; a task that died (it cannot, short of a bug) costs the requests it
/// had not sent, which then show as missing from the table's counts rather than as a panic.
async fn join_all(state: &PassState, tasks: &mut tokio::task::JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            state.record(Err(("client task".to_string(), error.to_string())));
        }
    }
}

/// A successful reply has one fused vector per input.
fn check_reply(reply: &EmbedReply, batch: usize) -> Result<(), String> {
    if reply.data.len() != batch {
        return Err(format!("{} vectors for {batch} inputs", reply.data.len()));
    }
    if let Some(data) = reply.data.iter().find(|d| d.embedding.is_none()) {
        return Err(format!("no fused vector for input {}", data.index));
    }
    Ok(())
}

fn client_error_kind(error: &ClientError) -> String {
    match error {
        ClientError::Service(error) => format!("{} {}", error.code(), error.kind),
        ClientError::NoResponders => "no responders".into(),
        ClientError::Timeout(_) => "client timeout".into(),
        ClientError::TooLarge { .. } => "too large".into(),
        ClientError::Transport(_) => "transport".into(),
        ClientError::Decode(_) => "decode".into(),
        _ => "other".into(),
    }
}

/// The table, the error breakdown, and the fleet/in-process comparison when both ran.
fn report(passes: &[PassResult], batch: usize) -> String {
    let ms = |d: Option<Duration>| match d {
        Some(d) => format!("{:.2}", d.as_secs_f64() * 1e3),
        None => "-".to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "pass", "requests", "errors", "req/s", "inputs/s", "p50_ms", "p90_ms", "p99_ms", "max_ms"
    );
    for pass in passes {
        let throughput = pass.throughput();
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>7} {:>10.1} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
            pass.name,
            pass.requests,
            pass.error_count(),
            throughput,
            throughput * batch as f64,
            ms(pass.percentile(50.0)),
            ms(pass.percentile(90.0)),
            ms(pass.percentile(99.0)),
            ms(pass.latencies.last().copied()),
        );
    }
    for pass in passes {
        for (kind, (count, first)) in &pass.errors {
            let _ = writeln!(
                out,
                "{} errors: {count} x {kind} (first: {first})",
                pass.name
            );
        }
    }
    let find = |name: &str| passes.iter().find(|p| p.name == name);
    if let (Some(cold), Some(local)) = (find("cold"), find("in-process")) {
        let ratio = cold.throughput() / local.throughput().max(1e-9);
        let p50 = match (cold.percentile(50.0), local.percentile(50.0)) {
            (Some(fleet), Some(local)) => {
                format!(
                    "{:+.2} ms",
                    (fleet.as_secs_f64() - local.as_secs_f64()) * 1e3
                )
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "cold vs in-process: throughput ratio {ratio:.3} (fleet / in-process), \
             p50 difference {p50} (fleet - in-process)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(name: &'static str, millis: &[u64], wall_ms: u64) -> PassResult {
        PassResult {
            name,
            requests: millis.len() as u64,
            latencies: millis.iter().map(|&m| Duration::from_millis(m)).collect(),
            errors: BTreeMap::new(),
            wall: Duration::from_millis(wall_ms),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = pass("cold", &(1..=100).collect::<Vec<_>>(), 1000);
        assert_eq!(p.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(p.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(p.percentile(100.0), Some(Duration::from_millis(100)));
        assert_eq!(
            pass("cold", &[7], 1).percentile(1.0),
            Some(Duration::from_millis(7))
        );
        assert_eq!(pass("cold", &[], 1).percentile(50.0), None);
    }

    #[test]
    fn the_report_compares_cold_with_in_process() {
        let mut cold = pass("cold", &[3, 4, 5, 6], 1000);
        cold.errors.insert("503 timeout".into(), (1, "late".into()));
        let local = pass("in-process", &[1, 2, 3, 4], 500);
        let text = report(&[cold, local], 2);
        assert!(
            text.contains("cold errors: 1 x 503 timeout (first: late)"),
            "{text}"
        );
        assert!(text.contains("throughput ratio 0.500"), "{text}");
        assert!(text.contains("p50 difference +2.00 ms"), "{text}");
        let row = text.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[..3], ["cold", "4", "1"]);
        assert_eq!(cols[4], "8.0", "inputs/s is req/s times the batch");
    }

    #[test]
    fn every_request_of_a_run_has_its_own_texts() {
        let workload = Workload {
            run: "r1".into(),
            batch: 3,
            requests: 10,
            models: vec!["minilm".into()],
        };
        let mut all: Vec<String> = (0..10).flat_map(|n| workload.texts(n)).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 30);
        assert_eq!(workload.texts(4), workload.texts(4));
    }
}
