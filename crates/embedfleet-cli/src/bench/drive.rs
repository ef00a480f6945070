//! Load against a fleet: closed loop (N clients, each sending its next request when the last is
//! answered) and open loop (a fixed arrival rate, whatever the replies do). One sample per
//! request: its round trip, the fleet's stage timings when asked for, or the kind of failure.
//!
//! A failed request is a counted sample, never a panic; the work in flight is bounded by the
//! clients (closed) or by the in-flight cap (open: a request due while the cap is full is
//! counted as `client: in-flight cap` instead of queued, so a stalled fleet cannot grow the
//! harness without bound).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embedfleet_client::{ClientError, EmbedClient};
use embedfleet_proto::{EmbedReply, EmbedRequest};
use tokio::time::Instant;

use super::dataset::items;
use super::stats::{millis, Load, LoopKind, Samples};

/// How much of a load point to run: `requests` requests, or until `duration` has passed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub requests: u64,
    pub duration: Option<Duration>,
}

/// Builds request `n` of a load point.
pub type RequestSource = Arc<dyn Fn(u64) -> EmbedRequest + Send + Sync>;

/// Runs one load point; returns its samples and its wall time.
pub async fn run_point(
    clients: &[EmbedClient],
    source: RequestSource,
    load: &Load,
    budget: Budget,
    timed: bool,
) -> (Samples, Duration) {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let started = Instant::now();
    let deadline = budget.duration.map(|d| started + d);
    match (load.kind, load.rate) {
        (LoopKind::Open, Some(rate)) => {
            open_loop(
                clients, source, load, rate, budget, deadline, timed, &samples,
            )
            .await
        }
        _ => closed_loop(clients, source, load, budget, deadline, timed, &samples).await,
    }
    let wall = started.elapsed();
    let samples = std::mem::take(&mut *lock(&samples));
    (samples, wall)
}

async fn closed_loop(
    clients: &[EmbedClient],
    source: RequestSource,
    load: &Load,
    budget: Budget,
    deadline: Option<Instant>,
    timed: bool,
    samples: &Arc<Mutex<Samples>>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..load.concurrency.max(1) {
        let client = clients[c % clients.len()].clone();
        let (next, source, samples) = (next.clone(), source.clone(), samples.clone());
        tasks.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= budget.requests {
                    break;
                }
                let request = source(n);
                let sent = Instant::now();
                let outcome = send(&client, &request, timed).await;
                record(&samples, &request, sent, outcome);
            }
        });
    }
    join(&mut tasks, samples).await;
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    clients: &[EmbedClient],
    source: RequestSource,
    load: &Load,
    rate: f64,
    budget: Budget,
    deadline: Option<Instant>,
    timed: bool,
    samples: &Arc<Mutex<Samples>>,
) {
    let period = Duration::from_secs_f64(1.0 / rate.max(1e-6));
    let cap = Arc::new(tokio::sync::Semaphore::new(load.concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..budget.requests {
        let scheduled = start + period.mul_f64(n as f64);
        if deadline.is_some_and(|d| scheduled >= d) {
            break;
        }
        tokio::time::sleep_until(scheduled).await;
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            let mut samples = lock(samples);
            samples.sent += 1;
            samples.record_error(
                "client: in-flight cap".to_string(),
                format!("{} requests already in flight", load.concurrency),
            );
            continue;
        };
        let client = clients[n as usize % clients.len()].clone();
        let (source, samples) = (source.clone(), samples.clone());
        tasks.spawn(async move {
            let request = source(n);
            let outcome = send(&client, &request, timed).await;
            // From the scheduled time: a late send is latency the caller saw.
            record(&samples, &request, scheduled, outcome);
            drop(permit);
        });
    }
    join(&mut tasks, samples).await;
}

async fn send(
    client: &EmbedClient,
    request: &EmbedRequest,
    timed: bool,
) -> Result<(EmbedReply, Option<String>), ClientError> {
    if timed {
        client.embed_timed(request).await
    } else {
        client.embed(request).await.map(|reply| (reply, None))
    }
}

fn record(
    samples: &Mutex<Samples>,
    request: &EmbedRequest,
    since: Instant,
    outcome: Result<(EmbedReply, Option<String>), ClientError>,
) {
    let latency = millis(since.elapsed());
    let expected = items(request);
    let mut samples = lock(samples);
    samples.sent += 1;
    match outcome {
        Ok((reply, timings)) => match check_reply(&reply, expected, request.fuse) {
            Ok(()) => {
                samples.round_trip_ms.push(latency);
                samples.items_ok += expected as u64;
                for (stage, ms) in parse_timings(timings.as_deref().unwrap_or("")) {
                    samples.stages_ms.entry(stage).or_default().push(ms);
                }
            }
            Err(message) => samples.record_error("bad reply".to_string(), message),
        },
        Err(error) => samples.record_error(client_error_kind(&error), error.to_string()),
    }
}

/// Waits for a point's tasks; a task that died (a bug) is counted, not propagated.
async fn join(tasks: &mut tokio::task::JoinSet<()>, samples: &Mutex<Samples>) {
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            lock(samples).record_error("client task".to_string(), error.to_string());
        }
    }
}

/// A successful reply has one entry per input, each with a fused vector when fusion was asked.
pub fn check_reply(reply: &EmbedReply, inputs: usize, fused: bool) -> Result<(), String> {
    if reply.data.len() != inputs {
        return Err(format!("{} vectors for {inputs} inputs", reply.data.len()));
    }
    if let Some(data) = reply.data.iter().find(|d| fused && d.embedding.is_none()) {
        return Err(format!("no fused vector for input {}", data.index));
    }
    Ok(())
}

/// The kind a failure is counted under in tables and `latest.json`.
pub fn client_error_kind(error: &ClientError) -> String {
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

/// `cache_get=0.081,jobs.minilm=12.4` → pairs; malformed pairs are skipped (the header is
/// diagnostics, not a contract worth failing a run over).
pub fn parse_timings(header: &str) -> Vec<(String, f64)> {
    header
        .split(',')
        .filter_map(|pair| {
            let (stage, ms) = pair.split_once('=')?;
            let ms: f64 = ms.trim().parse().ok()?;
            (!stage.trim().is_empty() && ms.is_finite()).then(|| (stage.trim().to_string(), ms))
        })
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_proto::{EmbeddingData, Usage};

    #[test]
    fn timings_header_parses_and_skips_garbage() {
        let pairs = parse_timings("cache_get=0.081,jobs.minilm=12.4,bad,x=nan,=3,fusion= 2");
        assert_eq!(
            pairs,
            vec![
                ("cache_get".to_string(), 0.081),
                ("jobs.minilm".to_string(), 12.4),
                ("fusion".to_string(), 2.0),
            ]
        );
        assert!(parse_timings("").is_empty());
    }

    #[test]
    fn a_reply_must_answer_every_input() {
        let reply = EmbedReply::new(
            "m",
            vec![EmbeddingData::fused(0, vec![1.0]), EmbeddingData::new(1)],
            Usage::new(2),
        );
        assert_eq!(
            check_reply(&reply, 3, true).unwrap_err(),
            "2 vectors for 3 inputs"
        );
        assert_eq!(
            check_reply(&reply, 2, true).unwrap_err(),
            "no fused vector for input 1"
        );
        assert!(check_reply(&reply, 2, false).is_ok());
    }
}
