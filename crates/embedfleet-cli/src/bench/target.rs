//! The fleet under test: a running one (`--nats-url`), or an embedded one this command starts
//! (`embedfleet serve` as a child process, on its own nats-server) and stops when it is done.
//! Also the cold mode's Redis flush.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use embedfleet_client::EmbedClient;
use embedfleet_proto::Encoding;

use crate::security_args::NatsSecurityArgs;

/// How long an embedded `serve` may take to load its models and say it is ready.
const SERVE_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long it gets to stop after SIGTERM before it is killed.
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which fleet, and how to talk to it.
#[derive(Args, Clone)]
pub struct TargetArgs {
    /// NATS server of a running fleet. Without it, the command starts `embedfleet serve
    /// --models <models>` itself (its own nats-server, default settings) and stops it at the end.
    #[arg(long, env = "EMBEDFLEET_NATS_URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,
    /// The fleet's Redis. The cold mode empties it (FLUSHDB) first, so never point this at a
    /// Redis whose contents matter; an embedded fleet is started with it as its cache tier.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Process ids of a running fleet's processes (coordinator, workers) to sample CPU and
    /// memory of, with their children; repeatable. The embedded fleet is sampled without it.
    #[arg(long = "sample-pid")]
    pub sample_pids: Vec<u32>,
    /// NATS connections the load is spread over (each client task uses one, round robin).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub connections: u64,
    /// Send MessagePack (the client's default) instead of JSON.
    #[arg(long)]
    pub json: bool,
    /// Per-request timeout in milliseconds; a request past it counts as an error.
    #[arg(long, default_value_t = 35_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
}

/// A fleet to drive: its URL, and the child process when this command started it.
pub struct Fleet {
    pub url: String,
    /// Roots of the processes to sample.
    pub pids: Vec<u32>,
    serve: Option<Child>,
}

impl Fleet {
    pub fn open(args: &TargetArgs, models: &[String]) -> anyhow::Result<Fleet> {
        match &args.nats_url {
            Some(url) => Ok(Fleet {
                url: url.clone(),
                pids: args.sample_pids.clone(),
                serve: None,
            }),
            None => start_serve(args, models),
        }
    }

    pub fn embedded(&self) -> bool {
        self.serve.is_some()
    }

    pub async fn clients(&self, args: &TargetArgs) -> anyhow::Result<Vec<EmbedClient>> {
        let encoding = if args.json {
            Encoding::Json
        } else {
            Encoding::MsgPack
        };
        let security = args.nats_security.security()?;
        let mut clients = Vec::with_capacity(args.connections as usize);
        for _ in 0..args.connections {
            let client = EmbedClient::connect_with(&self.url, &security)
                .await?
                .with_encoding(encoding)
                .with_timeout(Duration::from_millis(args.timeout_ms));
            clients.push(client);
        }
        Ok(clients)
    }
}

impl Drop for Fleet {
    /// SIGTERM, so `serve` drains and stops its nats-server; SIGKILL only if it hangs.
    fn drop(&mut self) {
        let Some(child) = &mut self.serve else { return };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < SERVE_STOP_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn start_serve(args: &TargetArgs, models: &[String]) -> anyhow::Result<Fleet> {
    let exe = std::env::current_exe().context("cannot find the embedfleet executable")?;
    let mut command = Command::new(exe);
    command.args(["serve", "--models", &models.join(",")]);
    if let Some(redis) = &args.redis_url {
        command.args(["--redis-url", redis]);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = command.spawn().context("cannot start `embedfleet serve`")?;
    eprintln!(
        "embedfleet bench: started `embedfleet serve --models {}` (pid {})",
        models.join(","),
        child.id()
    );
    let stdout = child.stdout.take().context("serve's stdout")?;
    // Lines are read on a thread, so the wait can time out; after the ready line the thread
    // keeps draining, so a chatty serve never blocks on a full pipe.
    let (lines, ready) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let pid = child.id();
    let mut fleet = Fleet {
        url: String::new(),
        pids: vec![pid],
        serve: Some(child),
    };
    let deadline = Instant::now() + SERVE_READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ready.recv_timeout(left) {
            Ok(line) => {
                if let Some(url) = ready_url(&line) {
                    fleet.url = url;
                    return Ok(fleet);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("`embedfleet serve` was not ready within {SERVE_READY_TIMEOUT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("`embedfleet serve` exited before it was ready (its error is above)")
            }
        }
    }
}

/// The URL in serve's ready line: `embedfleet serve ready: nats=<url> models=...`.
fn ready_url(line: &str) -> Option<String> {
    if !line.starts_with("embedfleet serve ready:") {
        return None;
    }
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("nats="))
        .map(str::to_string)
}

/// Empties the fleet's Redis (the cold mode's "fresh cache").
pub async fn flush_redis(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot reach Redis at {url}"))?;
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut connection)
        .await
        .with_context(|| format!("FLUSHDB on {url}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_gives_the_url() {
        let line = "embedfleet serve ready: nats=nats://127.0.0.1:4321 models=minilm";
        assert_eq!(ready_url(line).as_deref(), Some("nats://127.0.0.1:4321"));
        assert_eq!(
            ready_url("embedfleet: started nats-server -js at nats://x"),
            None
        );
    }
}
