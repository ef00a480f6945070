//! The model worker against a real `nats-server -js`: jobs go in through JetStream the way a
//! coordinator publishes them, partials come back on the jobs' reply subjects. The models are
//! [`FixedVectorModel`]s (exact, weight-free) except in one test on the real minilm checkpoint.
//!
//! No assertion depends on speed: waits are generous deadlines for something that must happen.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use embedfleet_fleet::job::{
    self, partial_subject, partial_wildcard, ModelJob, PartialOutcome, PartialResult,
};
use embedfleet_fleet::queues::{ensure_job_stream, ensure_model_consumer};
use embedfleet_fleet::worker::{ModelWorker, WorkerConfig, WorkerError, WorkerReport, WorkerStats};
use embedfleet_fleet::{BatchConfig, QueueConfig};
use embedfleet_models::{
    Device, EmbedOptions, EmbeddingModel, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::{model_job_subject, ErrorKind, JOB_STREAM, NATS_MSG_ID};
use embedfleet_testkit::{FixedVectorModel, NatsServer};

/// The coordinator id of the reply subjects.
const COORDINATOR: &str = "test";
/// Long enough for anything that has to happen on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

fn config() -> WorkerConfig {
    WorkerConfig {
        queues: QueueConfig {
            ack_wait: Duration::from_secs(1),
            max_deliver: 3,
            ..Default::default()
        },
        batch: BatchConfig {
            max_inputs: 64,
            token_budget: 16_384,
            max_wait: Duration::from_millis(300),
            ..BatchConfig::default()
        },
    }
}

/// A server, a connection for the test's side and its JetStream context.
struct Bus {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn bus() -> Bus {
    let server = NatsServer::start().expect("start nats-server");
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    Bus { server, client, js }
}

async fn connect(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url()).await.expect("connect")
}

/// Declares the stream and `model`'s consumer, so jobs published before a worker starts wait
/// for it.
async fn declare(js: &jetstream::Context, model: &str) {
    let stream = ensure_job_stream(js, &config().queues).await.unwrap();
    ensure_model_consumer(&stream, model, &config().queues)
        .await
        .unwrap();
}

/// A worker on its own connection.
struct Running {
    shutdown: CancellationToken,
    stats: Arc<WorkerStats>,
    handle: JoinHandle<Result<WorkerReport, WorkerError>>,
}

async fn start_worker(
    server: &NatsServer,
    models: Vec<Arc<dyn EmbeddingModel>>,
    config: WorkerConfig,
) -> Running {
    let worker = ModelWorker::new(connect(server).await, models, config).unwrap();
    let stats = worker.stats();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    Running {
        shutdown,
        stats,
        handle,
    }
}

impl Running {
    async fn stop(self) -> WorkerReport {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("worker stops")
            .expect("worker task")
            .expect("worker result")
    }
}

fn fixed(name: &str) -> Arc<FixedVectorModel> {
    Arc::new(FixedVectorModel::new(name).unwrap())
}

fn texts(texts: &[&str]) -> Vec<ModelInput> {
    texts
        .iter()
        .map(|t| ModelInput::Text(t.to_string()))
        .collect()
}

fn job(job_id: u64, model: &str, inputs: Vec<ModelInput>) -> ModelJob {
    ModelJob {
        job_id,
        model: model.into(),
        inputs,
        instruction: None,
        input_type: Default::default(),
        truncate: true,
        reply_to: partial_subject(COORDINATOR, job_id),
        deadline_unix_ms: job::unix_ms_now() + 60_000,
    }
}

/// Publishes a job as the coordinator does: JetStream, with a per-job `Nats-Msg-Id`, waiting
/// for the stream's ack. Retries while the server is away (the id makes retries harmless).
async fn publish(js: &jetstream::Context, job: &ModelJob) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            NATS_MSG_ID,
            format!("{COORDINATOR}-{}", job.job_id).as_str(),
        );
        let sent = js
            .publish_with_headers(
                model_job_subject(&job.model),
                headers,
                job::encode(job).into(),
            )
            .await;
        let acked = match sent {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match acked {
            Ok(()) => return,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("publish of job {} failed ({error}); retrying", job.job_id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("publishing job {} failed: {error}", job.job_id),
        }
    }
}

async fn partials_subscription(client: &async_nats::Client) -> async_nats::Subscriber {
    let subscriber = client
        .subscribe(partial_wildcard(COORDINATOR))
        .await
        .unwrap();
    client.flush().await.unwrap();
    subscriber
}

/// The next `n` partials, by job id.
async fn partials(sub: &mut async_nats::Subscriber, n: usize) -> HashMap<u64, PartialResult> {
    let mut found = HashMap::new();
    while found.len() < n {
        let message = tokio::time::timeout(PATIENCE, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} partials arrived", found.len()))
            .expect("subscription open");
        let partial: PartialResult = job::decode(&message.payload).expect("partial decodes");
        found.insert(partial.job_id, partial);
    }
    found
}

/// Waits until the work queue holds no job: every job was acked or terminated.
async fn wait_until_stream_empty(js: &jetstream::Context) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut stream = js.get_stream(JOB_STREAM).await.unwrap();
        let left = stream.info().await.unwrap().state.messages;
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} jobs still in the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `partial` carries exactly the fixed model's raw vectors for `job`.
fn assert_fixed_vectors(partial: &PartialResult, model: &FixedVectorModel, job: &ModelJob) {
    assert_eq!(partial.model, job.model);
    assert_eq!(partial.revision, model.revision());
    let PartialOutcome::Vectors(vectors) = &partial.outcome else {
        panic!("job {} failed: {:?}", job.job_id, partial.outcome);
    };
    assert_eq!(vectors.len(), job.inputs.len());
    for (got, input) in vectors.iter().zip(&job.inputs) {
        assert_eq!(
            got.vector,
            model.vector_as(input, job.instruction.as_deref(), job.input_type)
        );
        let words = input.text().unwrap().split_whitespace().count();
        assert_eq!(got.tokens as usize, words + 2);
    }
}

fn failure(partial: &PartialResult) -> &job::JobFailure {
    match &partial.outcome {
        PartialOutcome::Failed(failure) => failure,
        other => panic!("job {} should have failed: {other:?}", partial.job_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partials_carry_each_models_raw_vectors() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let (minilm, mpnet) = (fixed("minilm"), fixed("mpnet"));
    let worker = start_worker(&bus.server, vec![minilm.clone(), mpnet.clone()], config()).await;

    let plain = job(
        1,
        "minilm",
        texts(&["a first text", "second", "and a third one"]),
    );
    let mut instructed = job(2, "minilm", texts(&["a first text", "query"]));
    instructed.instruction = Some("Represent the query:".into());
    let other_model = job(3, "mpnet", texts(&["a first text"]));
    // Same inputs as job 1, as queries: the input type reaches the model (and keeps the job out
    // of job 1's batch).
    let mut queries = job(
        4,
        "minilm",
        texts(&["a first text", "second", "and a third one"]),
    );
    queries.input_type = embedfleet_proto::InputType::Query;
    for job in [&plain, &instructed, &other_model, &queries] {
        publish(&bus.js, job).await;
    }

    let got = partials(&mut sub, 4).await;
    assert_fixed_vectors(&got[&1], &minilm, &plain);
    assert_fixed_vectors(&got[&2], &minilm, &instructed);
    assert_fixed_vectors(&got[&3], &mpnet, &other_model);
    assert_fixed_vectors(&got[&4], &minilm, &queries);
    assert_ne!(got[&4].outcome, got[&1].outcome);
    wait_until_stream_empty(&bus.js).await;

    let report = worker.stop().await;
    assert_eq!(report.jobs_done, 4);
    assert_eq!(
        report.jobs_failed + report.poison_terminated + report.retries,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_share_one_batch() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    let jobs: Vec<ModelJob> = (1..=5)
        .map(|id| {
            job(
                id,
                "minilm",
                texts(&[&format!("job {id} one"), &format!("job {id} two")]),
            )
        })
        .collect();
    for job in &jobs {
        publish(&bus.js, job).await;
    }

    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;
    let got = partials(&mut sub, jobs.len()).await;
    for job in &jobs {
        assert_fixed_vectors(&got[&job.job_id], &model, job);
    }
    wait_until_stream_empty(&bus.js).await;

    let report = worker.stop().await;
    assert_eq!(report.jobs_done, 5);
    assert_eq!(report.batches, 1, "five queued jobs, one batch");
    assert_eq!(model.calls(), 1);
    assert_eq!(model.largest_batch(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_run_side_by_side_and_no_more() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    let mut config = config();
    config.batch.max_inputs = 1;
    config.batch.batches_in_flight = 2;
    // Far longer than the test needs to look, so "not yet answered" below is not a race.
    let slow = Arc::new(
        FixedVectorModel::new("minilm")
            .unwrap()
            .with_delay(Duration::from_secs(5)),
    );
    let jobs: Vec<ModelJob> = (1..=3)
        .map(|id| job(id, "minilm", texts(&[&format!("job {id}")])))
        .collect();
    for job in &jobs {
        publish(&bus.js, job).await;
    }

    let worker = start_worker(&bus.server, vec![slow.clone()], config).await;
    wait_for("two batches to start", || slow.calls() == 2).await;
    // One batch at a time would have answered the first before starting the second.
    let early = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
    assert!(early.is_err(), "a partial arrived before 5 s: {early:?}");
    assert_eq!(slow.calls(), 2, "the third job waits for a free slot");

    let got = partials(&mut sub, jobs.len()).await;
    for job in &jobs {
        assert_fixed_vectors(&got[&job.job_id], &slow, job);
    }
    wait_until_stream_empty(&bus.js).await;
    let report = worker.stop().await;
    assert_eq!((report.jobs_done, report.batches), (3, 3));
    assert_eq!(slow.largest_batch(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_splits_batches_and_a_big_job_runs_alone() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    // 24 bytes each: 24 / 3 + 2 = 10 estimated tokens, so two never fit a budget of 15.
    let small: Vec<ModelJob> = (1..=3)
        .map(|id| job(id, "minilm", texts(&[&format!("small job number {id:07}")])))
        .collect();
    // About 34 estimated tokens, over the whole budget.
    let big = job(4, "minilm", texts(&[&"big ".repeat(24)]));
    for job in small.iter().chain([&big]) {
        publish(&bus.js, job).await;
    }

    let model = fixed("minilm");
    let mut config = config();
    config.batch.token_budget = 15;
    let worker = start_worker(&bus.server, vec![model.clone()], config).await;
    let got = partials(&mut sub, 4).await;
    for job in small.iter().chain([&big]) {
        assert_fixed_vectors(&got[&job.job_id], &model, job);
    }

    let report = worker.stop().await;
    assert_eq!(report.batches, 4);
    assert_eq!(model.largest_batch(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_input_fails_only_its_own_job() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    let strict = |id, inputs| ModelJob {
        truncate: false,
        ..job(id, "minilm", inputs)
    };
    let long = "word ".repeat(300);
    let good_before = strict(1, texts(&["fine", "also fine"]));
    let too_long = strict(2, texts(&["fine", &long]));
    let good_after = strict(3, texts(&["still fine"]));
    let blank = strict(4, texts(&["ok", "   "]));
    let image = strict(
        5,
        vec![ModelInput::Image {
            bytes: vec![1, 2, 3],
            format: Some("png".into()),
        }],
    );
    for job in [&good_before, &too_long, &good_after, &blank, &image] {
        publish(&bus.js, job).await;
    }

    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;
    let got = partials(&mut sub, 5).await;
    assert_fixed_vectors(&got[&1], &model, &good_before);
    assert_fixed_vectors(&got[&3], &model, &good_after);

    let long_failure = failure(&got[&2]);
    assert_eq!(long_failure.kind, ErrorKind::InputTooLong);
    assert_eq!(long_failure.input, Some(1));
    assert!(
        long_failure.message.contains("input 1 "),
        "{}",
        long_failure.message
    );
    let blank_failure = failure(&got[&4]);
    assert_eq!(blank_failure.kind, ErrorKind::EmptyInput);
    assert_eq!(blank_failure.input, Some(1));
    let image_failure = failure(&got[&5]);
    assert_eq!(image_failure.kind, ErrorKind::UnsupportedModality);
    assert_eq!(image_failure.input, Some(0));
    wait_until_stream_empty(&bus.js).await;

    let report = worker.stop().await;
    assert_eq!((report.jobs_done, report.jobs_failed), (2, 3));
    assert_eq!(report.retries, 0, "bad input is never retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_redelivered_then_terminated_as_poison() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let model = Arc::new(FixedVectorModel::new("minilm").unwrap().failing_on("BOOM"));
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;

    publish(&bus.js, &job(1, "minilm", texts(&["this goes BOOM"]))).await;
    let got = partials(&mut sub, 1).await;
    let poison = failure(&got[&1]);
    assert_eq!(poison.kind, ErrorKind::Internal);
    assert_eq!(poison.input, None);
    assert!(
        poison.message.contains("3 deliveries"),
        "{}",
        poison.message
    );
    wait_until_stream_empty(&bus.js).await;
    // The live counters say the same while the worker still runs.
    assert_eq!(worker.stats.report().poison_terminated, 1);

    let report = worker.stop().await;
    assert_eq!(report.poison_terminated, 1);
    assert_eq!(report.retries, 2, "max_deliver 3: two naks, then the end");
    assert_eq!(model.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_that_clears_is_answered_on_redelivery() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let model = Arc::new(
        FixedVectorModel::new("minilm")
            .unwrap()
            .failing_on_times("BOOM", 1),
    );
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;

    let flaky = job(1, "minilm", texts(&["BOOM once"]));
    publish(&bus.js, &flaky).await;
    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&1], &model, &flaky);
    wait_until_stream_empty(&bus.js).await;

    let report = worker.stop().await;
    assert_eq!((report.retries, report.jobs_done), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_jobs_are_acked_without_running() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    let expired = ModelJob {
        deadline_unix_ms: job::unix_ms_now() - 1_000,
        ..job(1, "minilm", texts(&["nobody waits for this"]))
    };
    let live = job(2, "minilm", texts(&["someone waits for this"]));
    publish(&bus.js, &expired).await;
    publish(&bus.js, &live).await;

    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;
    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&2], &model, &live);
    wait_until_stream_empty(&bus.js).await;

    let report = worker.stop().await;
    assert_eq!((report.expired_skipped, report.jobs_done), (1, 1));
    assert_eq!(
        model.inputs_seen(),
        1,
        "the expired job never reached the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_job_is_terminated() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    bus.js
        .publish(model_job_subject("minilm"), "not msgpack".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let live = job(2, "minilm", texts(&["after the garbage"]));
    publish(&bus.js, &live).await;

    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;
    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&2], &model, &live);
    wait_until_stream_empty(&bus.js).await;
    assert_eq!(worker.stop().await.undecodable, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_running_batch_and_progress_acks_hold_it() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let mut config = config();
    config.queues.ack_wait = Duration::from_secs(2);
    // The batch runs longer than ack_wait: only in-progress acks keep the job from being
    // redelivered to the second worker below.
    let slow = Arc::new(
        FixedVectorModel::new("minilm")
            .unwrap()
            .with_delay(Duration::from_secs(4)),
    );
    let first = start_worker(&bus.server, vec![slow.clone()], config.clone()).await;

    let job = job(1, "minilm", texts(&["take your time"]));
    publish(&bus.js, &job).await;
    wait_for("the batch to start", || slow.calls() == 1).await;

    let idle = fixed("minilm");
    let second = start_worker(&bus.server, vec![idle.clone()], config).await;
    first.shutdown.cancel();

    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&1], &slow, &job);
    let report = tokio::time::timeout(PATIENCE, first.handle)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    assert_eq!((report.jobs_done, report.batches), (1, 1));
    wait_until_stream_empty(&bus.js).await;

    assert_eq!(second.stop().await.batches, 0);
    assert_eq!(idle.calls(), 0, "the job was never redelivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_rides_out_a_server_restart() {
    let mut bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;

    let before = job(1, "minilm", texts(&["before the restart"]));
    publish(&bus.js, &before).await;
    assert_fixed_vectors(&partials(&mut sub, 1).await[&1], &model, &before);

    tokio::task::block_in_place(|| {
        bus.server.stop().expect("stop nats-server");
        bus.server.restart().expect("restart nats-server");
    });

    let after = job(2, "minilm", texts(&["after the restart"]));
    publish(&bus.js, &after).await;
    // At least once: an ack of job 1 still buffered when the server went down is lost with it,
    // so job 1 may be redelivered and answered again. Job 2 must be answered either way.
    let answer = loop {
        let mut got = partials(&mut sub, 1).await;
        if let Some(answer) = got.remove(&2) {
            break answer;
        }
        assert!(got.contains_key(&1), "a partial of an unknown job: {got:?}");
    };
    assert_fixed_vectors(&answer, &model, &after);
    wait_until_stream_empty(&bus.js).await;
    let done = worker.stop().await.jobs_done;
    assert!(
        (2..=3).contains(&done),
        "{done} jobs done: job 1 ran at most twice"
    );
}

fn models_dir() -> PathBuf {
    std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_minilm_partials_match_the_model_run_directly() {
    let registry = ModelRegistry::new(
        WeightResolver {
            models_dir: Some(models_dir()),
            offline: true,
        },
        Device::Cpu,
    );
    let model = registry.get("minilm").unwrap_or_else(|e| {
        panic!("{e}\nrun scripts/fetch-models.sh first (the README's test command does)")
    });
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;

    let inputs = texts(&[
        "The quick brown fox jumps over the lazy dog.",
        "Embeddings map text to vectors.",
        "fn main() { println!(\"hello\"); }",
    ]);
    publish(&bus.js, &job(1, "minilm", inputs.clone())).await;
    let got = partials(&mut sub, 1).await;

    let raw = EmbedOptions {
        normalize: false,
        ..Default::default()
    };
    let direct = model.embed_batch(&inputs, &raw).unwrap();
    assert_eq!(got[&1].revision, model.revision());
    let PartialOutcome::Vectors(vectors) = &got[&1].outcome else {
        panic!("{:?}", got[&1].outcome);
    };
    for (index, (got, want)) in vectors.iter().zip(&direct).enumerate() {
        let similarity = cosine(&got.vector, &want.vector);
        assert!(similarity >= 0.99999, "input {index}: cosine {similarity}");
        assert_eq!(got.tokens as usize, want.tokens);
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_a_foreign_reply_subject_is_refused() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    // What a hostile or broken publisher would aim a worker at.
    let mut foreign = bus.client.subscribe("victim.>").await.unwrap();
    bus.client.flush().await.unwrap();
    declare(&bus.js, "minilm").await;
    let hostile = ModelJob {
        reply_to: "victim.inbox".into(),
        ..job(1, "minilm", texts(&["publish this anywhere"]))
    };
    let live = job(2, "minilm", texts(&["an honest job"]));
    publish(&bus.js, &hostile).await;
    publish(&bus.js, &live).await;

    let model = fixed("minilm");
    let worker = start_worker(&bus.server, vec![model.clone()], config()).await;
    // The honest job queued behind the hostile one is answered, so the hostile one has been
    // dealt with by then.
    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&2], &model, &live);
    wait_until_stream_empty(&bus.js).await;
    bus.client.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), foreign.next())
            .await
            .is_err(),
        "nothing was published on the foreign subject"
    );
    let report = worker.stop().await;
    assert_eq!((report.bad_reply_to, report.jobs_done), (1, 1));
    assert_eq!(model.inputs_seen(), 1, "the hostile job never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_model_call_is_abandoned_and_its_job_served_elsewhere() {
    let bus = bus().await;
    let mut sub = partials_subscription(&bus.client).await;
    declare(&bus.js, "minilm").await;
    let latch = Arc::new(embedfleet_testkit::HangLatch::default());
    let stuck = Arc::new(
        FixedVectorModel::new("minilm")
            .unwrap()
            .hanging_on("hang", latch.clone()),
    );
    let mut watched = config();
    watched.batch.hung_after = Duration::from_millis(300);
    // Long enough that without the watchdog the hung worker would hold the job (with
    // in-progress acks) past this test's patience.
    watched.queues.ack_wait = Duration::from_secs(2);
    let hung = start_worker(&bus.server, vec![stuck.clone()], watched.clone()).await;
    let job = job(1, "minilm", texts(&["hang here"]));
    publish(&bus.js, &job).await;
    let stats = hung.stats.clone();
    wait_for("the watchdog to abandon the batch", || {
        stats.report().batches_abandoned == 1
    })
    .await;
    assert!(!hung.stats.is_ready(), "unready while the call is stuck");

    // A healthy worker takes the job the hung one gave back; the hung one takes nothing.
    let healthy = fixed("minilm");
    let other = start_worker(&bus.server, vec![healthy.clone()], watched).await;
    let got = partials(&mut sub, 1).await;
    assert_fixed_vectors(&got[&1], &healthy, &job);
    assert_eq!(stuck.calls(), 1, "the hung worker pulled nothing more");

    latch.release();
    let stats = hung.stats.clone();
    wait_for("the stuck call to return", || stats.is_ready()).await;
    let report = hung.stop().await;
    assert_eq!(report.jobs_done, 0, "the abandoned batch is never answered");
    assert_eq!(other.stop().await.jobs_done, 1);
}
