//! What the CLI's tests share: the `embedfleet` binary with the repository's checkpoints, a run
//! with standard input, and for the fleet tests (`tests/fleet_*.rs`) role child processes, a plain async-nats client speaking `embed.v1`,
//! reply classification and vector checks.
//!
//! The client side is async-nats and serde only, on purpose: the tests prove the wire contract
//! (subjects, headers, payloads) as any NATS client sees it, not through our own client crate.
//!
//! Every bound here is generous: the tests run on a loaded 2-core machine, and they check
//! behaviour (every request answered, and answered right), never speed.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, Message};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use embedfleet_proto::{
    CONTENT_TYPE, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, EMBED_ENDPOINT, SERVICE_ERROR,
    SERVICE_ERROR_CODE, SERVICE_NAME,
};
use embedfleet_testkit::RoleProcess;

/// Width of the fused embedding with the default FuseMoE config.
pub const FUSED_DIM: usize = 1536;
/// Width of minilm's and mpnet's own vectors.
pub const MINILM_DIM: usize = 384;
pub const MPNET_DIM: usize = 768;

/// The repository's checkpoints (`scripts/fetch-models.sh`).
pub fn models_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    assert!(
        dir.join("minilm/model.safetensors").is_file()
            && dir.join("mpnet/model.safetensors").is_file(),
        "no checkpoints in {}: run scripts/fetch-models.sh first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A `--model-dir` for a mix of checkpoints: a temporary directory holding one symlink per
/// `(checkpoint directory, catalogue name)`.
pub fn linked_model_dir(links: &[(&Path, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (target, name) in links {
        std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
    }
    dir
}

/// The binary with the repository's checkpoints, offline, and nothing leaking in from the
/// caller's environment (a NATS or Redis URL, trained fusion weights, a log level).
pub fn embedfleet(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedfleet"));
    command
        .args(args)
        .env("EMBEDFLEET_MODELS_DIR", models_dir())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EMBEDFLEET_FUSION_WEIGHTS")
        .env_remove("EMBEDFLEET_NATS_URL")
        .env_remove("EMBEDFLEET_REDIS_URL")
        .env_remove("EMBEDFLEET_LOG");
    command
}

/// Runs `command` with `stdin` as standard input (empty when `None`) and collects stdout and
/// stderr.
pub fn run_with_stdin(mut command: Command, stdin: Option<&[u8]>) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start embedfleet");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    let input = stdin.unwrap_or_default().to_vec();
    // Written from a thread so a child that answers before reading everything cannot deadlock us.
    let writer = std::thread::spawn(move || {
        // The child may exit early (bad input) and close its end; that is not a test failure.
        let _ = pipe.write_all(&input);
    });
    let output = child.wait_with_output().expect("wait for embedfleet");
    writer.join().expect("stdin writer");
    output
}

/// Starts a role (`serve`, `coordinator`, `worker`) and waits for its ready line; panics with the
/// role's log when it does not get ready.
pub fn start_role(name: &str, args: &[&str]) -> RoleProcess {
    RoleProcess::spawn(name, embedfleet(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that none of `roles` has exited, naming the first that did, with its log.
pub fn assert_all_running(roles: &mut [&mut RoleProcess]) {
    for role in roles.iter_mut() {
        if let Some(status) = role.try_wait() {
            panic!(
                "{} exited ({status}) while it should still serve; its log:\n{}",
                role.name(),
                role.log()
            );
        }
    }
}

/// A NATS client that reconnects forever and leaves request deadlines to the callers.
pub async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name("embedfleet-fleet-test")
        .request_timeout(None)
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// How a request ended, as a NATS client sees it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A reply without service-error headers; the decoded body.
    Ok(Value),
    /// An error reply. Header and body were checked to agree.
    Error {
        code: u16,
        kind: String,
        message: String,
    },
}

impl Outcome {
    /// The successful body; panics with the error otherwise.
    pub fn ok(self, what: &str) -> Value {
        match self {
            Outcome::Ok(body) => body,
            Outcome::Error {
                code,
                kind,
                message,
            } => panic!("{what}: expected success, got {code} {kind}: {message}"),
        }
    }

    /// `(code, kind)` of an error; panics on success.
    pub fn error(&self, what: &str) -> (u16, &str) {
        match self {
            Outcome::Error { code, kind, .. } => (*code, kind.as_str()),
            Outcome::Ok(body) => panic!("{what}: expected an error, got {:.300}", body.to_string()),
        }
    }
}

/// Classifies a reply and checks the error contract: `Nats-Service-Error-Code` carries the code
/// and `Nats-Service-Error` `"<kind>: <message>"`, the kind's code equals the header's; the
/// coordinator sends errors through the micro service error path, with no body (a body, from
/// another implementation, must agree with the headers).
pub fn outcome(message: &Message) -> Outcome {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let msgpack = header(CONTENT_TYPE).is_some_and(|ct| ct.contains("msgpack"));
    let body = || -> Value {
        if msgpack {
            rmp_serde::from_slice(&message.payload)
                .unwrap_or_else(|e| panic!("reply is not MessagePack ({e})"))
        } else {
            serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
                panic!(
                    "reply is not JSON ({e}): {:.300}",
                    String::from_utf8_lossy(&message.payload)
                )
            })
        }
    };
    let Some(code_header) = header(SERVICE_ERROR_CODE) else {
        let body = body();
        assert!(
            body.get("error").is_none(),
            "an error body without the {SERVICE_ERROR_CODE} header: {body}"
        );
        return Outcome::Ok(body);
    };
    let code: u16 = code_header
        .parse()
        .unwrap_or_else(|_| panic!("{SERVICE_ERROR_CODE} is not a number: {code_header:?}"));
    let description = header(SERVICE_ERROR).unwrap_or_default();
    let (kind, text) = description.split_once(": ").unwrap_or_else(|| {
        panic!("{SERVICE_ERROR} should be \"<kind>: <message>\", got {description:?}")
    });
    let parsed: embedfleet_proto::ErrorKind = kind
        .parse()
        .unwrap_or_else(|_| panic!("{SERVICE_ERROR} names no error kind: {description:?}"));
    assert_eq!(
        parsed.code(),
        code,
        "the kind's code and the header's differ"
    );
    if !message.payload.is_empty() {
        let body = body();
        let detail = body
            .get("error")
            .unwrap_or_else(|| panic!("error reply ({code}) with a non-error body: {body}"));
        assert_eq!(
            detail["kind"].as_str(),
            Some(kind),
            "header and body kinds differ"
        );
        assert_eq!(
            detail["code"].as_u64(),
            Some(u64::from(code)),
            "header and body codes differ: {body}"
        );
    }
    Outcome::Error {
        code,
        kind: kind.to_owned(),
        message: text.to_owned(),
    }
}

/// Headers for a payload in `content_type` (none at all when `None`: JSON by default).
pub fn headers(content_type: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(CONTENT_TYPE, ct);
    }
    headers
}

/// Sends one `embed.v1` request and waits up to `timeout` for its reply.
pub async fn request_raw(
    client: &async_nats::Client,
    payload: Vec<u8>,
    content_type: Option<&str>,
    timeout: Duration,
) -> Result<Message, async_nats::RequestError> {
    let request = async_nats::Request::new()
        .headers(headers(content_type))
        .payload(payload.into())
        .timeout(Some(timeout));
    client.send_request(EMBED_ENDPOINT, request).await
}

/// A JSON request; panics when no reply comes (a client-side failure is not an outcome here).
pub async fn request_json(client: &async_nats::Client, body: &Value, timeout: Duration) -> Outcome {
    let payload = serde_json::to_vec(body).expect("encode JSON");
    let reply = request_raw(client, payload, Some(CONTENT_TYPE_JSON), timeout)
        .await
        .unwrap_or_else(|e| panic!("request {:.200}: no reply: {e}", body.to_string()));
    outcome(&reply)
}

/// The same request as MessagePack with named fields, the way `rmp_serde::to_vec_named` writes
/// structs.
pub async fn request_msgpack(
    client: &async_nats::Client,
    body: &Value,
    timeout: Duration,
) -> Outcome {
    let payload = rmp_serde::to_vec_named(body).expect("encode MessagePack");
    let reply = request_raw(client, payload, Some(CONTENT_TYPE_MSGPACK), timeout)
        .await
        .unwrap_or_else(|e| panic!("request {:.200}: no reply: {e}", body.to_string()));
    let is_msgpack = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(CONTENT_TYPE))
        .is_some_and(|ct| ct.as_str().contains("msgpack"));
    assert!(
        is_msgpack,
        "a MessagePack request gets a MessagePack reply (Content-Type {:?})",
        reply.headers.as_ref().and_then(|h| h.get(CONTENT_TYPE))
    );
    outcome(&reply)
}

/// Asks until a request succeeds, for up to `within`; returns the reply, or panics with the last
/// outcome. For waiting out a recovery.
pub async fn wait_for_success(
    client: &async_nats::Client,
    body: &Value,
    within: Duration,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let payload = serde_json::to_vec(body).expect("encode JSON");
        let last = match request_raw(client, payload, None, Duration::from_secs(5)).await {
            Ok(reply) => match outcome(&reply) {
                Outcome::Ok(body) => return body,
                error => format!("{error:?}"),
            },
            Err(e) => format!("client error: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("no successful reply within {within:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `data` endpoint stats of the `embedfleet` service (`$SRV.STATS.embedfleet`): the
/// coordinator's counters, with its cache's under `cache`. One object per coordinator that
/// answered within the wait.
pub async fn service_stats(client: &async_nats::Client) -> Vec<Value> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(format!("$SRV.STATS.{SERVICE_NAME}"), inbox, "".into())
        .await
        .expect("publish");
    let mut found = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(2), replies.next()).await {
        let stats: Value = serde_json::from_slice(&reply.payload).expect("stats are JSON");
        for endpoint in stats["endpoints"].as_array().into_iter().flatten() {
            if !endpoint["data"].is_null() {
                found.push(endpoint["data"].clone());
            }
        }
    }
    found
}

pub fn vector(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "expected an array of numbers, got {:.100}",
                value.to_string()
            )
        })
        .iter()
        .map(|x| x.as_f64().expect("vector element is a number") as f32)
        .collect()
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of different widths");
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    dot / (norm(a) * norm(b))
}

/// Checks a successful reply to `n` text inputs: `data` in order, each with a finite, unit-norm
/// fused embedding of [`FUSED_DIM`]; returns `data`.
pub fn check_fused_reply(body: &Value, n: usize) -> Vec<Value> {
    let data = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("reply without data: {:.300}", body.to_string()));
    assert_eq!(data.len(), n, "one data element per input");
    for (i, item) in data.iter().enumerate() {
        assert_eq!(
            item["index"].as_u64(),
            Some(i as u64),
            "data in request order"
        );
        let fused = vector(&item["embedding"]);
        assert_eq!(fused.len(), FUSED_DIM, "fused width");
        assert!(
            fused.iter().all(|x| x.is_finite()),
            "non-finite fused value"
        );
        let n = norm(&fused);
        assert!((n - 1.0).abs() < 1e-3, "fused norm {n}");
    }
    data.clone()
}

/// What `embedfleet embed --partials --models <models>` prints for `texts`, one JSON object per
/// text (fused `embedding` and per-model `partials`), computed in-process in one call.
pub fn reference_embeddings(texts: &[String], models: &str) -> Vec<Value> {
    assert!(
        texts.iter().all(|t| !t.contains('\n')),
        "one input per stdin line"
    );
    let input = texts.join("\n") + "\n";
    let output = run_with_stdin(
        embedfleet(&["embed", "--partials", "--models", models]),
        Some(input.as_bytes()),
    );
    assert!(
        output.status.success(),
        "embedfleet embed failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), texts.len(), "one reference per input");
    lines
}

/// Distinct, ordinary sentences: the cache never answers one for another.
pub fn numbered_sentences(prefix: &str, n: usize) -> Vec<String> {
    const TOPICS: [&str; 8] = [
        "the harbour at dawn",
        "a recipe for lentil soup",
        "the history of printing",
        "training for a marathon",
        "migrating birds over the Alps",
        "a bug in a parser",
        "jazz records from the fifties",
        "the rules of chess",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{prefix} sentence {i} is about {} and the number {}.",
                TOPICS[i % TOPICS.len()],
                i * 7 + 3
            )
        })
        .collect()
}

/// `{"input": text}` with the given extra fields.
pub fn text_request(text: &str, extra: Value) -> Value {
    let mut body = json!({ "input": text });
    if let Value::Object(extra) = extra {
        body.as_object_mut().expect("object").extend(extra);
    }
    body
}

/// Replies collected on per-request inboxes under one wildcard subscription, so that every
/// message a request gets is counted: a second answer to the same request would show up.
pub struct InboxCollector {
    prefix: String,
    state: Arc<Mutex<InboxState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct InboxState {
    /// Every reply seen, by request index.
    replies: HashMap<usize, Vec<Message>>,
    /// The first reply of a request goes to its waiter.
    waiters: HashMap<usize, oneshot::Sender<Message>>,
}

impl InboxCollector {
    pub async fn new(client: &async_nats::Client) -> Self {
        let prefix = client.new_inbox();
        let mut subscription = client
            .subscribe(format!("{prefix}.>"))
            .await
            .expect("subscribe to the inboxes");
        client.flush().await.expect("flush");
        let state = Arc::new(Mutex::new(InboxState::default()));
        let sink = state.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(index) = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                else {
                    continue;
                };
                let mut state = sink.lock().unwrap();
                state
                    .replies
                    .entry(index)
                    .or_default()
                    .push(message.clone());
                if let Some(waiter) = state.waiters.remove(&index) {
                    let _ = waiter.send(message);
                }
            }
        });
        InboxCollector {
            prefix,
            state,
            task,
        }
    }

    /// The reply subject of request `index`.
    pub fn subject(&self, index: usize) -> String {
        format!("{}.{index}", self.prefix)
    }

    /// Registers interest in the first reply of request `index`; call before publishing.
    pub fn expect(&self, index: usize) -> oneshot::Receiver<Message> {
        let (tx, rx) = oneshot::channel();
        self.state.lock().unwrap().waiters.insert(index, tx);
        rx
    }

    /// Publishes request `index` as JSON with its reply going to this collector.
    pub async fn publish(&self, client: &async_nats::Client, index: usize, body: &Value) {
        let payload = serde_json::to_vec(body).expect("encode JSON");
        client
            .publish_with_reply_and_headers(
                EMBED_ENDPOINT,
                self.subject(index),
                headers(Some(CONTENT_TYPE_JSON)),
                payload.into(),
            )
            .await
            .expect("publish a request");
    }

    /// How many replies each request got so far.
    pub fn counts(&self) -> HashMap<usize, usize> {
        self.state
            .lock()
            .unwrap()
            .replies
            .iter()
            .map(|(i, replies)| (*i, replies.len()))
            .collect()
    }
}

impl Drop for InboxCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
