//! The client against the real service, all in this process: a testkit `nats-server`, the fleet's
//! coordinator, and a worker hosting the testkit's fixed-vector minilm and mpnet (the default
//! model set). Fixed vectors make every expected fused vector computable here.

use std::sync::Arc;
use std::time::Duration;

use embedfleet_cache::{CacheConfig, VectorCache};
use embedfleet_client::{ClientError, EmbedClient};
use embedfleet_fleet::coordinator::Coordinator;
use embedfleet_fleet::fusion::{catalogue_widths, FusionStage};
use embedfleet_fleet::worker::{run_worker, WorkerConfig};
use embedfleet_fleet::{BatchConfig, CoordinatorConfig, QueueConfig};
use embedfleet_fusion::FuseMoe;
use embedfleet_models::{catalogue, model::l2_normalize, EmbeddingModel, ModelSpec};
use embedfleet_proto::output::int8_scale;
use embedfleet_proto::{
    EmbedRequest, Embedding, Encoding, EncodingFormat, ErrorKind, Input, ProtoError, RequestLimits,
    CONTENT_TYPE, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, EMBED_ENDPOINT, FUSED_MODEL_NAME,
    SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use embedfleet_testkit::{FixedVectorModel, NatsServer};
use futures::StreamExt;
use tokio_util::sync::{CancellationToken, DropGuard};

/// In the catalogue, but hosted by no worker of [`start_fleet`].
const UNSERVED_MODEL: &str = "bge-large";

/// The service on a NATS server, running until dropped.
struct Fleet {
    coordinator: Arc<Coordinator>,
    /// The coordinator's fusion layer for the default set, to compute expected vectors with.
    layer: Arc<FuseMoe>,
    _stop: DropGuard,
}

/// The default model set, minilm + mpnet, in slot order.
fn default_set() -> Vec<&'static ModelSpec> {
    catalogue::in_slot_order(
        CoordinatorConfig::default()
            .default_models
            .iter()
            .map(|name| catalogue::find(name).expect("catalogue model"))
            .collect(),
    )
}

/// Starts a coordinator with `config` and one worker hosting the default set's fixed-vector
/// models on the NATS server at `url`; returns once the coordinator serves `embed.v1`.
async fn start_fleet(url: &str, config: CoordinatorConfig) -> Fleet {
    let connect = || async { async_nats::connect(url).await.expect("connect") };
    let cache = VectorCache::connect(CacheConfig::default())
        .await
        .expect("cache");
    let fusion = FusionStage::seeded();
    // Built up front, as `serve` does, so that no request's deadline pays for it.
    let layer = fusion.layer(&default_set(), &catalogue_widths(&default_set())).expect("fusion layer");
    let coordinator = Coordinator::new(
        connect().await,
        config,
        QueueConfig::default(),
        Arc::new(cache),
        fusion,
    );
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let run = coordinator.clone().run(shutdown.clone(), move || {
        let _ = ready_tx.send(());
    });
    tokio::spawn(async move { run.await.expect("coordinator") });
    ready_rx.await.expect("coordinator ready");

    let models: Vec<Arc<dyn EmbeddingModel>> = default_set()
        .iter()
        .map(|spec| Arc::new(FixedVectorModel::new(spec.name).unwrap()) as Arc<dyn EmbeddingModel>)
        .collect();
    let worker_config = WorkerConfig {
        queues: QueueConfig::default(),
        batch: BatchConfig::default(),
    };
    let worker = run_worker(connect().await, models, worker_config, shutdown.clone());
    tokio::spawn(async move { worker.await.expect("worker") });
    Fleet {
        coordinator,
        layer,
        _stop: shutdown.drop_guard(),
    }
}

impl Fleet {
    /// The fused vector the fleet must give `text` with the default options: the fixed models'
    /// normalised vectors through the same layer.
    fn expected(&self, text: &str) -> Vec<f32> {
        let input = Input::Text(text.to_string());
        let partials: Vec<Vec<f32>> = default_set()
            .iter()
            .map(|spec| {
                let mut vector = FixedVectorModel::new(spec.name)
                    .unwrap()
                    .vector_for(&input, None);
                l2_normalize(&mut vector);
                vector
            })
            .collect();
        let slots: Vec<Option<&[f32]>> = partials.iter().map(|v| Some(v.as_slice())).collect();
        self.layer.fuse(&slots).expect("fuse").embedding
    }
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(worst < tolerance, "{what}: differs by {worst}");
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_vectors_in_both_encodings_once_the_fleet_serves() {
    let server = NatsServer::start().expect("nats-server (apt-get install nats-server)");
    let client = EmbedClient::connect(&server.url()).await.expect("connect");

    let err = client.embed_texts(&["hello"]).await.expect_err("no fleet");
    assert!(matches!(err, ClientError::NoResponders), "{err:?}");

    let fleet = start_fleet(&server.url(), CoordinatorConfig::default()).await;
    let texts = ["the first input", "a second, longer input text", "third"];
    let expected: Vec<Vec<f32>> = texts.iter().map(|t| fleet.expected(t)).collect();

    // The default client speaks MessagePack: a plain subscriber sees each request as sent.
    let mut tap = client
        .nats()
        .subscribe(EMBED_ENDPOINT)
        .await
        .expect("subscribe");
    client.nats().flush().await.expect("flush");
    let vectors = client.embed_texts(&texts).await.expect("embed");
    let sent = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .expect("tapped")
        .expect("a request");
    let content_type = sent.headers.as_ref().and_then(|h| h.get(CONTENT_TYPE));
    assert_eq!(content_type.map(|v| v.as_str()), Some(CONTENT_TYPE_MSGPACK));
    drop(tap);
    assert_eq!(vectors.len(), texts.len());
    for (i, vector) in vectors.iter().enumerate() {
        assert_close(
            vector,
            &expected[i],
            1e-5,
            &format!("embed_texts input {i}"),
        );
    }

    // `truncate: false` skips the cache lookups, so the fleet computes both replies afresh.
    let request = EmbedRequest::texts(texts).with_truncate(false);
    let mut replies = Vec::new();
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let reply = client
            .clone()
            .with_encoding(encoding)
            .embed(&request)
            .await
            .unwrap_or_else(|e| panic!("{encoding:?}: {e}"));
        assert_eq!(reply.model, FUSED_MODEL_NAME);
        assert_eq!(reply.data.len(), texts.len(), "{encoding:?}");
        assert!(reply.usage.prompt_tokens > 0, "{encoding:?}");
        for (i, data) in reply.data.iter().enumerate() {
            let what = format!("{encoding:?} input {i}");
            assert_eq!(data.index, i, "{what}");
            assert!(!data.cached, "{what}");
            let embedding = data.float_embedding().expect("fused vector");
            assert_eq!(embedding.len(), 1536, "{what}");
            assert!((norm(embedding) - 1.0).abs() < 1e-4, "{what}: unit norm");
            assert_close(embedding, &expected[i], 1e-5, &what);
        }
        replies.push(reply);
    }
    for (json, msgpack) in replies[0].data.iter().zip(&replies[1].data) {
        assert_close(
            json.float_embedding().unwrap(),
            msgpack.float_embedding().unwrap(),
            1e-6,
            "JSON against MessagePack",
        );
    }
}

/// The expected vector cut to `dimensions` and renormalised.
fn prefix(vector: &[f32], dimensions: usize) -> Vec<f32> {
    let cut = &vector[..dimensions];
    let n = norm(cut);
    cut.iter().map(|v| v / n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_and_every_encoding_format_on_the_wire() {
    let server = NatsServer::start().expect("nats-server");
    let fleet = start_fleet(&server.url(), CoordinatorConfig::default()).await;
    let client = EmbedClient::connect(&server.url()).await.expect("connect");
    let texts = [
        "matryoshka prefixes",
        "compact encodings of the fused vector",
    ];
    let full: Vec<Vec<f32>> = texts.iter().map(|t| fleet.expected(t)).collect();

    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let client = client.clone().with_encoding(encoding);
        for dimensions in [None, Some(1), Some(64), Some(256), Some(1536)] {
            let width = dimensions.unwrap_or(1536);
            for format in EncodingFormat::ALL {
                let what = format!("{encoding:?} dimensions {dimensions:?} {format}");
                let got = client
                    .embed_texts_as(&texts, dimensions, format)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                for (embedding, expected) in got.iter().zip(&full) {
                    let expected = prefix(expected, width);
                    check_encoded(embedding, &expected, format, &what);
                }
            }
        }
    }
    // The cache keeps the full vector: a cut reply and a full reply of the same text agree.
    let cut = client
        .embed_texts_as(&texts[..1], Some(64), EncodingFormat::Float)
        .await
        .expect("cut");
    let whole = client.embed_texts(&texts[..1]).await.expect("whole");
    assert_eq!(whole[0].len(), 1536);
    assert_close(
        cut[0].as_float().expect("float"),
        &prefix(&whole[0], 64),
        1e-6,
        "cut of the cached vector",
    );

    // Refusals, typed, before any model work.
    let cases = [
        (
            "dimensions 0",
            EmbedRequest::texts(["x"]).with_dimensions(0),
        ),
        (
            "dimensions 1537",
            EmbedRequest::texts(["x"]).with_dimensions(1537),
        ),
        (
            "dimensions without fusion",
            EmbedRequest::texts(["x"])
                .with_fuse(false)
                .with_dimensions(8),
        ),
        (
            "int8 without fusion",
            EmbedRequest::texts(["x"])
                .with_fuse(false)
                .with_encoding_format(EncodingFormat::Int8),
        ),
    ];
    for (what, request) in cases {
        let err = client.embed(&request).await.expect_err(what);
        assert_eq!(
            err.service_kind(),
            Some(ErrorKind::BadRequest),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("dimensions"), "{what}: {err}");
    }
    // A non-integer width cannot be built with `EmbedRequest`; sent raw, it is refused as a
    // payload that does not match the schema, saying why.
    for raw in [
        r#"{"input": "x", "dimensions": 256.5}"#,
        r#"{"input": "x", "dimensions": "256"}"#,
        r#"{"input": "x", "encoding_format": "int4"}"#,
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE, CONTENT_TYPE_JSON);
        let reply = client
            .nats()
            .request_with_headers(EMBED_ENDPOINT, headers, raw.as_bytes().to_vec().into())
            .await
            .expect("reply");
        // Error replies carry the service error headers (kind: message) and no body.
        let headers = reply.headers.expect("service error headers");
        let code = headers.get(SERVICE_ERROR_CODE).expect("code").as_str();
        let description = headers.get(SERVICE_ERROR).expect("description").as_str();
        let error = ProtoError::from_service_error(code.parse().expect("a code"), description);
        assert_eq!(error.kind, ErrorKind::InvalidPayload, "{raw}: {error}");
        let why = if raw.contains("int4") {
            "int4"
        } else {
            "whole number"
        };
        assert!(error.message.contains(why), "{raw}: {error}");
    }
}

/// `embedding` in `format` against the expected float vector (already cut and renormalised).
fn check_encoded(embedding: &Embedding, expected: &[f32], format: EncodingFormat, what: &str) {
    assert_eq!(embedding.format(), format, "{what}");
    let n = expected.len();
    // Components this close to zero may take either sign after the fleet's own arithmetic.
    let settled = |v: f32| v.abs() > 1e-4;
    match embedding {
        Embedding::Float(v) => {
            assert_close(v, expected, 1e-5, what);
            assert!((norm(v) - 1.0).abs() < 1e-4, "{what}: unit norm");
        }
        Embedding::Base64(text) => {
            let v = Embedding::decode_base64(text).expect("base64");
            assert_close(&v, expected, 1e-5, what);
        }
        Embedding::Int8(q) => {
            let scale = int8_scale(n);
            assert_eq!(q.len(), n, "{what}");
            for (&q, &v) in q.iter().zip(expected) {
                let want = (v * scale).round().clamp(-127.0, 127.0);
                assert!((f32::from(q) - want).abs() <= 1.0, "{what}: {q} for {v}");
            }
        }
        Embedding::Uint8(q) => {
            let scale = int8_scale(n);
            assert_eq!(q.len(), n, "{what}");
            for (&q, &v) in q.iter().zip(expected) {
                let want = (v * scale).round().clamp(-127.0, 127.0) + 128.0;
                assert!((f32::from(q) - want).abs() <= 1.0, "{what}: {q} for {v}");
            }
        }
        Embedding::Binary(_) | Embedding::Ubinary(_) => {
            let bytes: Vec<u8> = match embedding {
                Embedding::Binary(b) => b.iter().map(|&b| (i16::from(b) + 128) as u8).collect(),
                Embedding::Ubinary(b) => b.clone(),
                _ => unreachable!(),
            };
            assert_eq!(bytes.len(), n.div_ceil(8), "{what}");
            for (j, &v) in expected.iter().enumerate() {
                let bit = bytes[j / 8] & (0x80 >> (j % 8)) != 0;
                if settled(v) {
                    assert_eq!(bit, v > 0.0, "{what}: bit {j} of {v}");
                }
            }
            // Padding bits are zero.
            for j in n..bytes.len() * 8 {
                assert_eq!(
                    bytes[j / 8] & (0x80 >> (j % 8)),
                    0,
                    "{what}: padding bit {j}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_refusals_are_typed_service_errors() {
    let server = NatsServer::start().expect("nats-server");
    let fleet = start_fleet(&server.url(), CoordinatorConfig::default()).await;
    let client = EmbedClient::connect(&server.url()).await.expect("connect");

    let too_many = vec!["x"; RequestLimits::default().max_inputs + 1];
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let client = client.clone().with_encoding(encoding);
        let cases = [
            (
                "unknown model",
                EmbedRequest::texts(["x"]).with_models(["nope"]),
                ErrorKind::UnknownModel,
                404,
            ),
            (
                "blank text",
                EmbedRequest::texts(["   "]),
                ErrorKind::EmptyInput,
                400,
            ),
            (
                "too many inputs",
                EmbedRequest::texts(too_many.clone()),
                ErrorKind::TooLarge,
                413,
            ),
        ];
        for (what, request, kind, code) in cases {
            match client.embed(&request).await {
                Err(ClientError::Service(error)) => {
                    assert_eq!((error.kind, error.code()), (kind, code), "{what}: {error}");
                    if kind == ErrorKind::UnknownModel {
                        assert!(error.message.contains("nope"), "{error}");
                    }
                }
                other => panic!("{what} ({encoding:?}): expected a service error, got {other:?}"),
            }
        }
    }

    // Over the client's payload limit: refused before sending, so the fleet never sees it.
    let requests = fleet.coordinator.stats().requests;
    let tight = client.clone().with_limits(RequestLimits {
        max_payload_bytes: 64,
        ..Default::default()
    });
    let err = tight
        .embed_texts(&[&"long text ".repeat(10)])
        .await
        .expect_err("too large");
    assert!(
        matches!(err, ClientError::TooLarge { limit: 64, .. }),
        "{err:?}"
    );
    assert_eq!(fleet.coordinator.stats().requests, requests);

    // Still serving.
    let vectors = client.embed_texts(&["still here"]).await.expect("embed");
    assert_eq!(vectors[0].len(), 1536);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_model_times_out_in_the_client_or_the_coordinator() {
    let request_timeout = Duration::from_secs(2);
    let server = NatsServer::start().expect("nats-server");
    // Configured (so its job queues and waits for a worker) but served by nobody; a model the
    // fleet does not know at all is refused at once instead.
    let config = CoordinatorConfig {
        request_timeout,
        fusable_sets: vec![vec![UNSERVED_MODEL.to_string()]],
        ..CoordinatorConfig::default()
    };
    let _fleet = start_fleet(&server.url(), config).await;
    let client = EmbedClient::connect(&server.url()).await.expect("connect");
    // Unfused: the point is the job nobody takes, not a fusion layer for a new set.
    let request = EmbedRequest::texts(["anyone?"])
        .with_models([UNSERVED_MODEL])
        .with_fuse(false);

    // The client gives up first.
    let short = Duration::from_millis(300);
    let err = client
        .clone()
        .with_timeout(short)
        .embed(&request)
        .await
        .expect_err("no worker");
    assert!(
        matches!(err, ClientError::Timeout(t) if t == short),
        "{err:?}"
    );

    // The coordinator gives up first and says why.
    let err = client
        .clone()
        .with_timeout(request_timeout * 10)
        .embed(&request)
        .await
        .expect_err("no worker");
    match err {
        ClientError::Service(error) => {
            assert_eq!(
                (error.kind, error.code()),
                (ErrorKind::NoWorker, 503),
                "{error}"
            );
            assert!(error.message.contains(UNSERVED_MODEL), "{error}");
        }
        other => panic!("expected a 503 service error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    drop(server);
    let err = EmbedClient::connect(&url)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}
