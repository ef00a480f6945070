//! Hot swap against a real nats-server, a real coordinator and the real minilm checkpoint: a
//! swap under load loses nothing and every reply comes from exactly one revision; a failed swap
//! leaves the old weights serving; a second swap while one loads is refused.
//!
//! The second revision is a copy of minilm with the signs of 64 of its last LayerNorm's weights
//! flipped: the same architecture and width, other weights (so another `local-` revision), and
//! vectors far enough from the original's that each reply says which weights made it.
//!
//! No assertion depends on speed: waits are generous deadlines for something that must happen.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use embedfleet_fleet::job::{self, ModelJob, PartialOutcome, PartialResult};
use embedfleet_fleet::revisions::{revisions_bucket, Announcement};
use embedfleet_fleet::worker::{
    swap_subject, ModelLoader, ModelWorker, SwapErrorCode, SwapReply, SwapRequest, WorkerConfig,
    WorkerReport,
};
use embedfleet_fleet::{BatchConfig, CoordinatorConfig};
use embedfleet_models::{
    Device, EmbedOptions, EmbeddingModel, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::{model_job_subject, EmbedReply, EmbedRequest, EMBED_ENDPOINT};
use embedfleet_testkit::FixedVectorModel;
use support::{cached_repeat, close, wait_for_revision, Fleet};

/// Long enough for anything that has to happen on a loaded two-core machine (a swap loads and
/// warms a model while the load test keeps both cores busy).
const PATIENCE: Duration = Duration::from_secs(120);
/// Concurrent clients of the load test.
const CLIENTS: usize = 4;
/// Replies the load test collects before the swap, and after it.
const REPLIES_EACH_SIDE: usize = 24;
/// A vector "is" a reference vector at this cosine; the two revisions are much further apart.
const SAME: f32 = 0.9999;

fn models_dir() -> PathBuf {
    std::env::var_os("EMBEDFLEET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn registry() -> Arc<ModelRegistry> {
    Arc::new(ModelRegistry::new(
        WeightResolver {
            models_dir: Some(models_dir()),
            offline: true,
        },
        Device::Cpu,
    ))
}

/// A fresh copy of minilm from the configured directory, or from `dir`.
fn load(registry: &ModelRegistry, dir: Option<&Path>) -> Arc<dyn EmbeddingModel> {
    registry.load_fresh("minilm", dir).unwrap_or_else(|e| {
        panic!("{e}\nrun scripts/fetch-models.sh first (the README's test command does)")
    })
}

fn loader(registry: Arc<ModelRegistry>) -> ModelLoader {
    Arc::new(move |name, dir| registry.load_fresh(name, dir))
}

/// A second revision of minilm in a new directory: every file linked but the weights, which are
/// copied with the signs of the first 64 weights of the last LayerNorm flipped.
fn second_revision(root: &Path) -> PathBuf {
    let source = models_dir().join("minilm");
    let dir = root.join("minilm-v2");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let mut weights = std::fs::read(source.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    let tensor = &header["encoder.layer.5.output.LayerNorm.weight"];
    assert_eq!(tensor["dtype"], "F32");
    let start = 8 + header_len + tensor["data_offsets"][0].as_u64().unwrap() as usize;
    for float in 0..64 {
        // Little-endian f32: the sign bit is the top bit of the fourth byte.
        weights[start + float * 4 + 3] ^= 0x80;
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    dir
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Each text's vector by `model`, run directly.
fn reference(model: &dyn EmbeddingModel, texts: &[String]) -> HashMap<String, Vec<f32>> {
    let inputs: Vec<ModelInput> = texts.iter().map(|t| ModelInput::Text(t.clone())).collect();
    let vectors = model
        .embed_batch(&inputs, &EmbedOptions::default())
        .unwrap();
    texts
        .iter()
        .cloned()
        .zip(vectors.into_iter().map(|e| e.vector))
        .collect()
}

/// Which of the two revisions' vectors `vector` is: "old", "new", or a panic naming `what`.
fn made_by(what: &str, vector: &[f32], old: &[f32], new: &[f32]) -> &'static str {
    let (to_old, to_new) = (cosine(vector, old), cosine(vector, new));
    match (to_old >= SAME, to_new >= SAME) {
        (true, false) => "old",
        (false, true) => "new",
        _ => panic!("{what}: cosine {to_old} to the old weights' vector, {to_new} to the new"),
    }
}

fn worker_config() -> WorkerConfig {
    WorkerConfig {
        queues: support::queues(),
        batch: BatchConfig {
            max_wait: Duration::from_millis(5),
            ..BatchConfig::default()
        },
    }
}

/// A worker hosting `model`, swapping with `loader`, on its own connection.
struct Worker {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<WorkerReport, embedfleet_fleet::worker::WorkerError>>,
    swaps: embedfleet_fleet::worker::HotSwap,
}

async fn start_worker(
    fleet: &Fleet,
    model: Arc<dyn EmbeddingModel>,
    loader: ModelLoader,
) -> Worker {
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let worker = ModelWorker::new(client, vec![model], worker_config())
        .unwrap()
        .with_hot_swap(loader, true);
    let swaps = worker.hot_swap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    Worker {
        shutdown,
        handle,
        swaps,
    }
}

impl Worker {
    async fn stop(self) -> WorkerReport {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("worker stops")
            .expect("worker task")
            .expect("worker result")
    }
}

/// A coordinator fusing minilm alone, no worker yet.
async fn coordinator() -> Fleet {
    let config = CoordinatorConfig {
        default_models: vec!["minilm".into()],
        ..CoordinatorConfig::default()
    };
    Fleet::start_with(Vec::new(), config, support::queues(), None).await
}

/// Sends a swap command over NATS, as an operator would, and reads the typed reply.
async fn swap_command(client: &async_nats::Client, body: &str) -> SwapReply {
    let reply = tokio::time::timeout(
        PATIENCE,
        client.request(swap_subject("minilm"), body.to_string().into()),
    )
    .await
    .expect("a swap reply in time")
    .expect("swap request");
    serde_json::from_slice(&reply.payload).expect("a swap reply decodes")
}

fn swap_body(dir: &Path) -> String {
    serde_json::to_string(&SwapRequest {
        dir: Some(dir.to_path_buf()),
    })
    .unwrap()
}

/// One request through the coordinator; an error reply or no reply is an `Err`.
async fn embed(client: &async_nats::Client, request: &EmbedRequest) -> Result<EmbedReply, String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(EMBED_ENDPOINT, serde_json::to_vec(request).unwrap().into()),
    )
    .await
    .map_err(|_| "no reply within 60 s".to_string())?
    .map_err(|e| e.to_string())?;
    if reply
        .headers
        .as_ref()
        .is_some_and(|h| h.get(embedfleet_proto::SERVICE_ERROR_CODE).is_some())
    {
        return Err(String::from_utf8_lossy(&reply.payload).into_owned());
    }
    serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
}

fn request(text: &str) -> EmbedRequest {
    EmbedRequest::texts([text]).with_partials(true)
}

/// The reply's minilm vector and fused vector of its one input.
fn vectors(reply: &EmbedReply) -> (Vec<f32>, Vec<f32>) {
    let data = &reply.data[0];
    let partial = data.partials.as_ref().expect("partials asked for")["minilm"].clone();
    (
        partial,
        data.float_embedding().expect("fused vector").to_vec(),
    )
}

/// What one load-test request got.
struct Sent {
    text: String,
    /// Sent after the swap command had been answered.
    after_swap: bool,
    reply: Result<EmbedReply, String>,
}

/// Everything published on `subject`, decoded, until the subscription is dropped with the task.
fn spy<T: serde::de::DeserializeOwned + Send + 'static>(
    subscriber: async_nats::Subscriber,
) -> (Arc<Mutex<Vec<T>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        let mut subscriber = subscriber;
        while let Some(message) = subscriber.next().await {
            let decoded: T = job::decode(&message.payload).expect("decodes");
            sink.lock().unwrap().push(decoded);
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_under_load_loses_nothing_and_every_reply_has_one_revision() {
    let registry = registry();
    let temp = tempfile::tempdir().unwrap();
    let new_dir = second_revision(temp.path());
    let serving = load(&registry, None);
    let old_revision = serving.revision().to_string();
    let old_copy = Arc::downgrade(&serving);

    let fleet = coordinator().await;
    // Every job and every partial on the bus, seen by a plain subscriber beside the roles.
    let jobs = fleet
        .client
        .subscribe(model_job_subject("minilm"))
        .await
        .unwrap();
    let partials = fleet
        .client
        .subscribe("embedfleet.v1.partial.>")
        .await
        .unwrap();
    fleet.client.flush().await.unwrap();
    let (jobs_seen, jobs_task) = spy::<ModelJob>(jobs);
    let (partials_seen, partials_task) = spy::<PartialResult>(partials);
    let worker = start_worker(&fleet, serving, loader(registry.clone())).await;

    // A request cached under the old revision, to be asked again after the swap.
    let probe = "a request cached before the swap";
    let probe_before = embed(&fleet.client, &request(probe)).await.unwrap();
    let probe_cached = cached_repeat(&fleet, &request(probe)).await;
    assert!(close(&vectors(&probe_cached).1, &vectors(&probe_before).1));

    // The load: CLIENTS clients, each sending one request after another, every text new (no
    // cache hit), until told to stop.
    let swapped = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let mut clients = Vec::new();
    for client_id in 0..CLIENTS {
        let (client, swapped, stop, sent) = (
            fleet.client.clone(),
            swapped.clone(),
            stop.clone(),
            sent.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let text = format!("client {client_id} sends request number {n} across a swap");
                let after_swap = swapped.load(Ordering::SeqCst);
                let reply = embed(&client, &request(&text)).await;
                sent.lock().unwrap().push(Sent {
                    text,
                    after_swap,
                    reply,
                });
                n += 1;
            }
        }));
    }
    let replies = |after: bool| {
        let sent = sent.lock().unwrap();
        sent.iter().filter(|s| s.after_swap == after).count()
    };
    let wait_for_replies = |after: bool| async move {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while replies(after) < REPLIES_EACH_SIDE {
            assert!(tokio::time::Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    wait_for_replies(false).await;
    let reply = swap_command(&fleet.client, &swap_body(&new_dir)).await;
    swapped.store(true, Ordering::SeqCst);
    let SwapReply::Ok {
        old_revision: reported_old,
        new_revision,
        announced,
        ..
    } = reply
    else {
        panic!("the swap failed: {reply:?}");
    };
    assert_eq!(reported_old, old_revision);
    assert_ne!(new_revision, old_revision);
    assert!(new_revision.starts_with("local-"), "{new_revision}");
    assert!(announced);
    assert_eq!(
        worker.swaps.revision_of("minilm"),
        Some(new_revision.clone())
    );
    wait_for_replies(true).await;
    stop.cancel();
    for client in clients {
        client.await.unwrap();
    }

    // Nothing lost, no error, and each reply is exactly one revision's vector: anything after
    // the swap was answered the new one.
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let texts: Vec<String> = sent.iter().map(|s| s.text.clone()).collect();
    let new_model = load(&registry, Some(&new_dir));
    let old_model = load(&registry, None);
    let (old_vectors, new_vectors) = (
        reference(old_model.as_ref(), &texts),
        reference(new_model.as_ref(), &texts),
    );
    let far_apart = cosine(&old_vectors[&texts[0]], &new_vectors[&texts[0]]);
    assert!(
        far_apart < 0.99,
        "the two revisions are too alike ({far_apart}) to tell apart"
    );
    let mut by_revision: HashMap<&str, usize> = HashMap::new();
    for sent in &sent {
        let reply = sent.reply.as_ref().unwrap_or_else(|error| {
            panic!("request {:?} failed: {error}", sent.text);
        });
        assert_eq!(reply.data.len(), 1);
        assert!(
            !reply.data[0].cached,
            "{}: a new text came from the cache",
            sent.text
        );
        let (partial, _) = vectors(reply);
        let made = made_by(
            &sent.text,
            &partial,
            &old_vectors[&sent.text],
            &new_vectors[&sent.text],
        );
        if sent.after_swap {
            assert_eq!(made, "new", "{} was sent after the swap", sent.text);
        }
        *by_revision.entry(made).or_default() += 1;
    }
    assert!(
        by_revision.get("old").copied().unwrap_or(0) >= 1,
        "{by_revision:?}"
    );
    assert!(by_revision["new"] >= REPLIES_EACH_SIDE, "{by_revision:?}");

    // Every partial the worker sent names one of the two revisions, and its vectors are that
    // revision's, input by input: no batch ran on one copy and was labelled with the other.
    // Every reply needed a partial, so the spy sees at least as many.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while partials_seen.lock().unwrap().len() < sent.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spy missed partials"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    jobs_task.abort();
    partials_task.abort();
    let jobs: HashMap<u64, ModelJob> = jobs_seen
        .lock()
        .unwrap()
        .drain(..)
        .map(|job| (job.job_id, job))
        .collect();
    let partials = std::mem::take(&mut *partials_seen.lock().unwrap());
    let mut revisions_seen = HashSet::new();
    for partial in &partials {
        let Some(job) = jobs.get(&partial.job_id) else {
            continue; // the probe's: its text has no reference vectors here
        };
        let text = job.inputs[0].text().unwrap().to_string();
        let Some(old) = old_vectors.get(&text) else {
            continue;
        };
        let PartialOutcome::Vectors(vectors) = &partial.outcome else {
            panic!("job {} failed: {:?}", partial.job_id, partial.outcome);
        };
        let made = made_by(&text, &vectors[0].vector, old, &new_vectors[&text]);
        let expected = if made == "old" {
            &old_revision
        } else {
            &new_revision
        };
        assert_eq!(
            &partial.revision, expected,
            "{text}: vectors of one revision, labelled another"
        );
        revisions_seen.insert(partial.revision.clone());
    }
    assert_eq!(revisions_seen.len(), 2, "{revisions_seen:?}");

    // The probe again: the coordinator keys by the new revision, so the old fused vector is not
    // served; the new one is computed, then cached under the new revision. (A fresh request
    // first: a coordinator learns revisions from partials too, and the last partial it saw
    // could be an old batch's that ended after the announcement.)
    embed(&fleet.client, &request("one more fresh request"))
        .await
        .unwrap();
    wait_for_revision(&fleet.coordinator, "minilm", &new_revision).await;
    let probe_after = embed(&fleet.client, &request(probe)).await.unwrap();
    assert!(
        !probe_after.data[0].cached,
        "the old revision's fused vector was served"
    );
    let (partial_after, fused_after) = vectors(&probe_after);
    let probe_new = reference(new_model.as_ref(), &[probe.to_string()]);
    assert!(cosine(&partial_after, &probe_new[probe]) >= SAME);
    assert!(!close(&fused_after, &vectors(&probe_before).1));
    let probe_cached_after = cached_repeat(&fleet, &request(probe)).await;
    assert!(close(&vectors(&probe_cached_after).1, &fused_after));

    // The old copy is freed once the batches that held it have ended.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while old_copy.upgrade().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old weights are still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.stop().await;
    assert_eq!(report.jobs_failed, 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_swap_is_a_typed_error_and_the_old_weights_serve_on() {
    let registry = registry();
    let serving = load(&registry, None);
    let old_revision = serving.revision().to_string();
    let fleet = coordinator().await;
    let worker = start_worker(&fleet, serving.clone(), loader(registry.clone())).await;
    let text = "served before and after a failed swap";
    let before = embed(&fleet.client, &request(text)).await.unwrap();

    // A directory that is not there: load_failed, naming what is missing.
    let missing = Path::new("/nonexistent/minilm-v2");
    let reply = swap_command(&fleet.client, &swap_body(missing)).await;
    let SwapReply::Error {
        code,
        message,
        model,
    } = reply
    else {
        panic!("a swap to a missing directory succeeded: {reply:?}");
    };
    assert_eq!(
        (model.as_str(), code),
        ("minilm", SwapErrorCode::LoadFailed)
    );
    assert!(message.contains("config.json"), "{message}");

    // A directory with config.json but corrupt weights: load_failed too.
    let temp = tempfile::tempdir().unwrap();
    let corrupt = temp.path().join("minilm-broken");
    std::fs::create_dir(&corrupt).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(models_dir().join("minilm").join(file), corrupt.join(file)).unwrap();
    }
    std::fs::write(corrupt.join("model.safetensors"), b"not safetensors").unwrap();
    let reply = swap_command(&fleet.client, &swap_body(&corrupt)).await;
    assert!(
        matches!(
            reply,
            SwapReply::Error {
                code: SwapErrorCode::LoadFailed,
                ..
            }
        ),
        "{reply:?}"
    );

    // Not a swap request at all: bad_request.
    let reply = swap_command(&fleet.client, r#"{"directory": "/x"}"#).await;
    assert!(
        matches!(
            reply,
            SwapReply::Error {
                code: SwapErrorCode::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
    // A model this worker does not host, through the worker's own handle (SIGHUP's path).
    let reply = worker.swaps.swap("mpnet", SwapRequest::default()).await;
    assert!(
        matches!(
            reply,
            SwapReply::Error {
                code: SwapErrorCode::UnknownModel,
                ..
            }
        ),
        "{reply:?}"
    );

    // The old weights serve on: same revision, same vectors, for a new text and an old one.
    assert_eq!(
        worker.swaps.revision_of("minilm"),
        Some(old_revision.clone())
    );
    let fresh = "a new text after the failed swaps";
    let after = embed(&fleet.client, &request(fresh)).await.unwrap();
    let expected = reference(serving.as_ref(), &[fresh.to_string(), text.to_string()]);
    assert!(cosine(&vectors(&after).0, &expected[fresh]) >= SAME);
    assert!(cosine(&vectors(&before).0, &expected[text]) >= SAME);
    assert_eq!(fleet.coordinator.revision_of("minilm"), Some(old_revision));
    worker.stop().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_swap_while_one_loads_is_refused_as_in_progress() {
    let registry = registry();
    let fleet = coordinator().await;
    // A loader that waits for the test's word before loading the real checkpoint, so the
    // second command certainly arrives while the first is loading.
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let gated: ModelLoader = Arc::new(move |name, dir| {
        let _ = entered_tx.send(());
        released.lock().unwrap().recv().expect("released");
        registry.load_fresh(name, dir)
    });
    // Served meanwhile by a weight-free stand-in of the same width.
    let stand_in = Arc::new(FixedVectorModel::new("minilm").unwrap());
    let stand_in_revision = stand_in.revision().to_string();
    let worker = start_worker(&fleet, stand_in, gated).await;
    // Answered: the worker is up, and so are its swap subscriptions (made before its loops).
    let reply = embed(&fleet.client, &request("answered by the stand-in"))
        .await
        .unwrap();
    assert!(!vectors(&reply).0.is_empty());

    let client = fleet.client.clone();
    let first = tokio::spawn(async move { swap_command(&client, "").await });
    tokio::time::timeout(PATIENCE, entered.recv())
        .await
        .expect("the first swap starts loading")
        .unwrap();
    let second = swap_command(&fleet.client, "{}").await;
    assert!(
        matches!(
            second,
            SwapReply::Error {
                code: SwapErrorCode::InProgress,
                ..
            }
        ),
        "{second:?}"
    );
    let direct = worker.swaps.swap("minilm", SwapRequest::default()).await;
    assert!(
        matches!(
            direct,
            SwapReply::Error {
                code: SwapErrorCode::InProgress,
                ..
            }
        ),
        "{direct:?}"
    );
    // Still loading: the stand-in answers.
    let reply = embed(
        &fleet.client,
        &request("answered by the stand-in while a swap loads"),
    )
    .await
    .unwrap();
    assert!(!vectors(&reply).0.is_empty());
    assert_eq!(
        worker.swaps.revision_of("minilm"),
        Some(stand_in_revision.clone())
    );

    release.send(()).unwrap();
    let first = first.await.unwrap();
    let SwapReply::Ok {
        old_revision,
        new_revision,
        ..
    } = first
    else {
        panic!("the first swap failed: {first:?}");
    };
    assert_eq!(old_revision, stand_in_revision);
    // The announcement is in the revisions bucket, where coordinators watch it.
    let js = async_nats::jetstream::new(fleet.client.clone());
    let announced = revisions_bucket(&js)
        .await
        .unwrap()
        .get("minilm")
        .await
        .unwrap();
    let announced = Announcement::decode(&announced.expect("an announcement")).unwrap();
    assert_eq!(announced.revision, new_revision);
    assert_eq!(announced.dim, Some(384));

    // The claim ended with the swap: the next one runs (the same checkpoint: nothing switched).
    release.send(()).unwrap();
    let again = swap_command(&fleet.client, "").await;
    assert_eq!(
        again,
        SwapReply::Ok {
            model: "minilm".into(),
            old_revision: new_revision.clone(),
            new_revision: new_revision.clone(),
            announced: true,
        }
    );
    worker.stop().await;
    fleet.stop().await;
}
