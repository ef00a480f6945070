//! `embedfleet embed --nats-url` against a real `nats-server`: the flags become embed.v1 request
//! options, `--batch-size` splits the inputs into requests, the output is the in-process format,
//! and every failure is one `error:` line with exit status 1.
//!
//! Most tests answer `embed.v1` with a stand-in that records what it receives, since only that
//! shows which request options the flags became; one runs the real `serve` and checks that the
//! fleet's vectors are the in-process `embed`'s.

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use embedfleet_proto::{
    EmbedReply, EmbedRequest, EmbeddingData, Encoding, ErrorBody, ProtoError, Usage, CONTENT_TYPE,
    EMBED_ENDPOINT, FUSED_MODEL_NAME, SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use embedfleet_testkit::NatsServer;
use futures::StreamExt;
use serde_json::Value;

mod support;
use support::{cosine, reference_embeddings, run_with_stdin, start_role, vector};

/// Runs the binary with `stdin` and no settings from the caller's environment. Not
/// `support::embedfleet`: these tests need no checkpoints.
fn embedfleet(args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_embedfleet"));
    command
        .args(args)
        .env_remove("EMBEDFLEET_LOG")
        .env_remove("EMBEDFLEET_NATS_URL");
    run_with_stdin(command, Some(stdin))
}

/// Runs the binary off the async runtime, so the stand-in service keeps answering meanwhile.
async fn embedfleet_async(args: Vec<String>, stdin: &'static [u8]) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        embedfleet(&args, stdin)
    })
    .await
    .expect("join")
}

/// Exit status 1, nothing on stdout, one `error:` line on stderr that mentions each needle.
fn assert_one_line_failure(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} in {stderr:?}");
    }
}

/// Answers `embed.v1` with a fused vector `[index, len(text)]` per input, or `unknown_model`
/// when a request names the model `nope`, and keeps every request it was sent.
async fn stand_in_service(url: &str) -> Arc<Mutex<Vec<EmbedRequest>>> {
    let nats = async_nats::connect(url).await.expect("connect");
    let mut requests = nats.subscribe(EMBED_ENDPOINT).await.expect("subscribe");
    nats.flush().await.expect("flush");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let content_type = message
                .headers
                .as_ref()
                .and_then(|h| h.get(CONTENT_TYPE))
                .map(|v| v.as_str().to_string());
            let encoding = Encoding::from_content_type(content_type.as_deref());
            let request: EmbedRequest = encoding.decode(&message.payload).expect("decodes");
            record.lock().expect("lock").push(request.clone());
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, encoding.content_type());
            let payload = if request.models.iter().flatten().any(|m| m == "nope") {
                let error = ProtoError::unknown_model("nope");
                headers.insert(SERVICE_ERROR, error.to_string().as_str());
                headers.insert(SERVICE_ERROR_CODE, error.code().to_string().as_str());
                encoding.encode(&ErrorBody::from(&error)).expect("encode")
            } else {
                let texts = request.input.as_ref().expect("input").as_slice().to_vec();
                let data = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| EmbeddingData::fused(i, vec![i as f32, t.len() as f32]))
                    .collect();
                let reply = EmbedReply::new(FUSED_MODEL_NAME, data, Usage::new(1));
                encoding.encode(&reply).expect("encode")
            };
            let reply_to = message.reply.expect("a request");
            nats.publish_with_headers(reply_to, headers, payload.into())
                .await
                .expect("reply");
        }
    });
    seen
}

#[test]
fn no_service_on_the_server_is_one_line_naming_serve() {
    let server = NatsServer::start().expect("nats-server (apt-get install nats-server)");
    let url = server.url();
    let output = embedfleet(&["embed", "--nats-url", &url, "hello"], b"");
    assert_one_line_failure(
        &output,
        &["no embedfleet service answers", &url, "embedfleet serve"],
    );
}

#[test]
fn no_server_at_the_url_is_one_line() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    drop(server);
    let output = embedfleet(&["embed", "--nats-url", &url, "hello"], b"");
    assert_one_line_failure(&output, &["cannot connect to NATS", &url]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_become_request_options_and_batches_become_requests() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let seen = stand_in_service(&url).await;

    let args = [
        "embed",
        "--nats-url",
        &url,
        "--models",
        "minilm,mpnet",
        "--partials",
        "--no-normalize",
        "--no-truncate",
        "--instruction",
        "query: ",
        "--input-type",
        "query",
        "--batch-size",
        "2",
        "a",
        "bb",
        "ccc",
    ];
    let output = embedfleet_async(args.iter().map(|s| s.to_string()).collect(), b"").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, (line, text)) in lines.iter().zip(["a", "bb", "ccc"]).enumerate() {
        // Numbered across requests, like the in-process path numbers stdin chunks.
        assert_eq!(line["index"], i, "{line}");
        assert_eq!(line["object"], "embedding");
        let within_request = (i % 2) as f64;
        assert_eq!(
            line["embedding"][0].as_f64(),
            Some(within_request),
            "{line}"
        );
        assert_eq!(line["embedding"][1].as_f64(), Some(text.len() as f64));
    }

    let requests = seen.lock().expect("lock").clone();
    assert_eq!(
        requests.len(),
        2,
        "--batch-size 2 splits 3 inputs in 2 requests"
    );
    let first = &requests[0];
    assert_eq!(first.input.as_ref().expect("input").as_slice(), ["a", "bb"]);
    assert_eq!(
        first.models.as_deref(),
        Some(&["minilm".to_string(), "mpnet".to_string()][..])
    );
    assert!(first.fuse && first.return_partials);
    assert!(!first.normalize && !first.truncate);
    assert_eq!(first.instruction.as_deref(), Some("query: "));
    assert_eq!(first.input_type, embedfleet_proto::InputType::Query);

    // Without --models the fleet's own default set applies; --no-fuse maps to `fuse: false`.
    seen.lock().expect("lock").clear();
    let args = vec![
        "embed".to_string(),
        "--nats-url".to_string(),
        url.clone(),
        "--no-fuse".to_string(),
    ];
    let output = embedfleet_async(args, b"x\ny\n").await;
    assert!(output.status.success());
    let requests = seen.lock().expect("lock").clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].models, None);
    assert!(!requests[0].fuse && requests[0].normalize && requests[0].truncate);
    assert_eq!(
        requests[0].input_type,
        embedfleet_proto::InputType::Document
    );
    assert_eq!(
        requests[0].input.as_ref().expect("input").as_slice(),
        ["x", "y"]
    );

    // A refusal from the service is one line with its kind.
    let args = ["embed", "--nats-url", &url, "--models", "nope", "hello"];
    let output = embedfleet_async(args.iter().map(|s| s.to_string()).collect(), b"").await;
    assert_one_line_failure(&output, &["unknown_model", "nope"]);
}

#[test]
fn the_real_fleet_prints_what_the_in_process_embed_prints() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut serve = start_role(
        "serve",
        &["serve", "--nats-url", &url, "--models", "minilm,mpnet"],
    );
    let texts: Vec<String> = ["fleet and library agree", "a second line, a second vector"]
        .map(String::from)
        .to_vec();
    let stdin = texts.join("\n") + "\n";
    let output = run_with_stdin(
        support::embedfleet(&["embed", "--nats-url", &url, "--partials"]),
        Some(stdin.as_bytes()),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\nserve log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        serve.log()
    );
    let fleet: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let local = reference_embeddings(&texts, "minilm,mpnet");
    assert_eq!(fleet.len(), local.len(), "{stdout}");
    for (i, (got, want)) in fleet.iter().zip(&local).enumerate() {
        assert_eq!(got["index"], want["index"]);
        let similarity = cosine(&vector(&got["embedding"]), &vector(&want["embedding"]));
        assert!(similarity > 0.9999, "input {i}: fused cosine {similarity}");
        for model in ["minilm", "mpnet"] {
            let similarity = cosine(
                &vector(&got["partials"][model]),
                &vector(&want["partials"][model]),
            );
            assert!(
                similarity > 0.9999,
                "input {i}: {model} cosine {similarity}"
            );
        }
    }
    serve
        .terminate_within(std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}
