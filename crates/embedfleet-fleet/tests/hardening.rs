//! The coordinator's hardening against a real nats-server: admission by allow-list, per-model
//! queue bounds, the client's deadline header and errors counted by the micro service, cache
//! repeats in the same shape, fused keys under a rolling upgrade, lost partials asked for again,
//! and the circuit breaker with `fallback: "partial"` under load.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use embedfleet_fleet::coordinator::{BreakerConfig, BreakerState};
use embedfleet_fleet::job::{self, ModelJob};
use embedfleet_fleet::queues::{ensure_job_stream, ensure_model_consumer};
use embedfleet_fleet::{revisions, CoordinatorConfig, QueueConfig};
use embedfleet_proto::{
    model_job_subject, EmbedRequest, ErrorKind, Fallback, JOB_STREAM, TIMEOUT_HEADER,
};
use embedfleet_testkit::FixedVectorModel;
use support::{cached_repeat, queues, spawn_worker, spawn_worker_with, wait_for_revision, Fleet};

fn json(request: &EmbedRequest) -> Vec<u8> {
    serde_json::to_vec(request).unwrap()
}

fn timeout_header(ms: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TIMEOUT_HEADER, ms.to_string().as_str());
    headers
}

fn fixed(names: &[&str]) -> Vec<FixedVectorModel> {
    names
        .iter()
        .map(|name| FixedVectorModel::new(name).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_sets_and_their_subsets_are_fused() {
    let fleet = Fleet::start(
        &["minilm", "mpnet"],
        CoordinatorConfig::default(),
        None,
        Duration::ZERO,
    )
    .await;
    let built = fleet.coordinator.fusion().layers_built();
    // Not a subset of minilm+mpnet: refused before a layer is built or a job sent.
    let error = fleet
        .error(
            json(&EmbedRequest::texts(["a"]).with_models(["minilm", "bge-large"])),
            false,
        )
        .await;
    assert_eq!(error.kind, ErrorKind::BadRequest, "{error}");
    assert!(error.message.contains("not fusable"), "{error}");
    assert_eq!(fleet.coordinator.fusion().layers_built(), built);
    assert_eq!(fleet.coordinator.stats().jobs_published, 0);

    // A subset is fused by the pair's layer, minilm's slot alone present: no new layer.
    let reply = fleet
        .embed(&EmbedRequest::texts(["a"]).with_models(["minilm"]))
        .await;
    assert_eq!(reply.data[0].float_embedding().unwrap().len(), 1536);
    assert!(reply.data[0].experts.is_some());
    assert_eq!(fleet.coordinator.fusion().layers_built(), built);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_outside_the_fleet_is_a_503_at_once_and_a_configured_one_waits() {
    let config = CoordinatorConfig {
        request_timeout: Duration::from_secs(20),
        ..CoordinatorConfig::default()
    };
    // minilm has a worker; mpnet is configured (the default set) with none yet.
    let fleet = Fleet::start_with(fixed(&["minilm"]), config, queues(), None).await;
    let started = std::time::Instant::now();
    let error = fleet
        .error(
            json(
                &EmbedRequest::texts(["a"])
                    .with_models(["codebert"])
                    .with_fuse(false),
            ),
            false,
        )
        .await;
    assert_eq!(error.kind, ErrorKind::NoWorker, "{error}");
    assert!(error.message.contains("codebert"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at once, not at the 20 s deadline"
    );
    assert_eq!(fleet.coordinator.stats().jobs_published, 0);

    // A configured model scaled to zero: the job queues and the request waits for a worker.
    let request = EmbedRequest::texts(["cold start"]);
    let waiting = {
        let client = fleet.client.clone();
        let payload = json(&request);
        tokio::spawn(async move {
            client
                .request(embedfleet_proto::EMBED_ENDPOINT, payload.into())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = CancellationToken::new();
    let mpnet = spawn_worker(
        fleet.nats.url(),
        FixedVectorModel::new("mpnet").unwrap(),
        stop.clone(),
    );
    let reply = waiting.await.unwrap().expect("a reply");
    let reply: embedfleet_proto::EmbedReply =
        serde_json::from_slice(&reply.payload).expect("a success once a worker came");
    assert!(reply.data[0].embedding.is_some());
    stop.cancel();
    mpnet.await.unwrap();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_nobody_serves_fills_its_own_queue_only() {
    let queues = QueueConfig {
        max_jobs_per_model: 3,
        ..queues()
    };
    let fleet = Arc::new(
        Fleet::start_with(
            fixed(&["minilm"]),
            CoordinatorConfig::default(),
            queues,
            None,
        )
        .await,
    );
    // Six requests for mpnet (configured, no worker) at once: three jobs queue, the rest are
    // refused at the per-model bound.
    let mut calls = Vec::new();
    for i in 0..6 {
        let fleet = fleet.clone();
        calls.push(tokio::spawn(async move {
            let request = EmbedRequest::texts([format!("queued {i}")])
                .with_models(["mpnet"])
                .with_fuse(false);
            fleet
                .raw_with(timeout_header(1_500), json(&request), false)
                .await
                .0
        }));
    }
    let mut codes = Vec::new();
    for call in calls {
        codes.push(call.await.unwrap());
    }
    let refused = codes.iter().filter(|&&c| c == Some(429)).count();
    assert_eq!(refused, 3, "{codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Some(429) | Some(503))));
    // minilm's queue is its own.
    let reply = fleet
        .embed(
            &EmbedRequest::texts(["still served"])
                .with_models(["minilm"])
                .with_fuse(false),
        )
        .await;
    assert_eq!(reply.data.len(), 1);
    Arc::try_unwrap(fleet)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_header_reaches_the_job_and_errors_show_in_srv_stats() {
    let config = CoordinatorConfig {
        request_timeout: Duration::from_secs(20),
        ..CoordinatorConfig::default()
    };
    let fleet = Fleet::start_with(fixed(&["minilm"]), config, queues(), None).await;
    let request = EmbedRequest::texts(["nobody serves mpnet yet"])
        .with_models(["mpnet"])
        .with_fuse(false);
    let sent_ms = job::unix_ms_now();
    let started = std::time::Instant::now();
    let error = fleet
        .error_with(timeout_header(700), json(&request), false)
        .await;
    assert_eq!(error.code(), 503, "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the header's 700 ms, not the default 20 s"
    );
    // The job carries the request's deadline.
    let js = jetstream::new(fleet.client.clone());
    let stream = js.get_stream(JOB_STREAM).await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&model_job_subject("mpnet"))
        .await
        .unwrap();
    let job: ModelJob = job::decode(&stored.payload).unwrap();
    assert!(
        job.deadline_unix_ms <= sent_ms + 700 + 1_000,
        "deadline {} ms after the request",
        job.deadline_unix_ms - sent_ms
    );

    let bad = fleet
        .error_with(timeout_header(0), json(&request), false)
        .await;
    assert_eq!(bad.kind, ErrorKind::BadRequest, "{bad}");

    // Both errors went through the micro service's error path.
    let stats = fleet
        .client
        .request("$SRV.STATS.embedfleet", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let endpoint = &stats["endpoints"][0];
    assert_eq!(endpoint["num_errors"], 2, "{stats}");
    assert!(
        endpoint["last_error"].to_string().contains("bad_request"),
        "{stats}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_with_partials_comes_from_the_cache_in_the_same_shape() {
    let fleet = Fleet::start(
        &["minilm", "mpnet"],
        CoordinatorConfig::default(),
        None,
        Duration::ZERO,
    )
    .await;
    let request = EmbedRequest::texts(["same shape", "twice"]).with_partials(true);
    let first = fleet.embed(&request).await;
    let jobs = fleet.coordinator.stats().jobs_published;
    let again = cached_repeat(&fleet, &request).await;
    assert_eq!(fleet.coordinator.stats().jobs_published, jobs, "no new job");
    for (a, b) in first.data.iter().zip(&again.data) {
        assert!(support::close(
            a.float_embedding().unwrap(),
            b.float_embedding().unwrap()
        ));
        assert_eq!(a.experts, b.experts, "the gate's choice comes back too");
        assert_eq!(
            a.partials.as_ref().unwrap().keys().collect::<Vec<_>>(),
            b.partials.as_ref().unwrap().keys().collect::<Vec<_>>()
        );
    }
    // The plain fused repeat carries experts as well.
    let plain = cached_repeat(&fleet, &EmbedRequest::texts(["same shape"])).await;
    assert_eq!(plain.data[0].experts, first.data[0].experts);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fused_vector_is_keyed_by_the_revisions_of_its_partials() {
    // minilm answers fast; mpnet is slow, so a new minilm revision can be announced while a
    // request that already holds minilm's (old) partial waits for mpnet.
    let fleet = Fleet::start_with(
        fixed(&["minilm"]),
        CoordinatorConfig::default(),
        queues(),
        None,
    )
    .await;
    let stop = CancellationToken::new();
    let mpnet = spawn_worker_with(
        fleet.nats.url(),
        Arc::new(
            FixedVectorModel::new("mpnet")
                .unwrap()
                .with_delay(Duration::from_millis(1_500)),
        ),
        queues(),
        stop.clone(),
    );
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm").await;
    let text = "during a rolling upgrade";
    // minilm's partial, cached under its current revision.
    fleet
        .embed(
            &EmbedRequest::texts([text])
                .with_models(["minilm"])
                .with_fuse(false),
        )
        .await;
    let warm = cached_repeat(
        &fleet,
        &EmbedRequest::texts([text])
            .with_models(["minilm"])
            .with_fuse(false),
    )
    .await;
    assert!(warm.data[0].cached);

    let fused = {
        let client = fleet.client.clone();
        let payload = json(&EmbedRequest::texts([text]));
        tokio::spawn(async move {
            client
                .request(embedfleet_proto::EMBED_ENDPOINT, payload.into())
                .await
        })
    };
    // While mpnet works, minilm's new weights are announced.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let js = jetstream::new(fleet.client.clone());
    let announcement = revisions::Announcement {
        revision: "fixed-minilm-v2".into(),
        dim: Some(384),
    };
    revisions::announce(&js, "minilm", &announcement)
        .await
        .unwrap();
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm-v2").await;
    let reply = fused.await.unwrap().unwrap();
    assert!(reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .is_none());
    // Let the fused write land, then ask again: the vector made of minilm's old partial must
    // not answer under the new revision.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hits = fleet.coordinator.stats().fused_hits;
    let after = fleet.embed(&EmbedRequest::texts([text])).await;
    assert!(
        !after.data[0].cached,
        "old-weight vector served under new keys"
    );
    assert_eq!(fleet.coordinator.stats().fused_hits, hits);
    stop.cancel();
    mpnet.await.unwrap();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_lost_after_the_ack_is_asked_for_again() {
    let config = CoordinatorConfig {
        reask_interval: Duration::from_millis(200),
        ..CoordinatorConfig::default()
    };
    // No worker yet: the test plays the worker that acks and loses the partial.
    let fleet = Fleet::start_with(Vec::new(), config, queues(), None).await;
    let js = jetstream::new(fleet.client.clone());
    let stream = ensure_job_stream(&js, &queues()).await.unwrap();
    let consumer = ensure_model_consumer(&stream, "minilm", &queues())
        .await
        .unwrap();
    let request = EmbedRequest::texts(["lost once"])
        .with_models(["minilm"])
        .with_fuse(false);
    let waiting = {
        let client = fleet.client.clone();
        let payload = json(&request);
        tokio::spawn(async move {
            client
                .request_with_headers(
                    embedfleet_proto::EMBED_ENDPOINT,
                    timeout_header(15_000),
                    payload.into(),
                )
                .await
        })
    };
    let mut taken = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap();
    let stolen = taken.next().await.expect("the job").unwrap();
    stolen.double_ack().await.unwrap();

    // A real worker comes; the coordinator sees the job gone without its partial and asks again.
    let stop = CancellationToken::new();
    let worker = spawn_worker(
        fleet.nats.url(),
        FixedVectorModel::new("minilm").unwrap(),
        stop.clone(),
    );
    let reply = waiting.await.unwrap().unwrap();
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .is_none(),
        "{:?}",
        reply.headers
    );
    let reply: embedfleet_proto::EmbedReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.data[0]
        .partials
        .as_ref()
        .unwrap()
        .contains_key("minilm"));
    assert!(fleet.coordinator.stats().reasked_jobs >= 1);
    stop.cancel();
    worker.await.unwrap();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_a_dead_model_and_partial_fallback_answers_without_it() {
    let config = CoordinatorConfig {
        breaker: BreakerConfig {
            failure_threshold: 3,
            // Long enough that the strict request below still finds the breaker open on a
            // loaded machine.
            cool_down: Duration::from_secs(3),
        },
        ..CoordinatorConfig::default()
    };
    let fleet = Arc::new(Fleet::start_with(fixed(&["minilm"]), config, queues(), None).await);
    let stop = CancellationToken::new();
    let mpnet = spawn_worker(
        fleet.nats.url(),
        FixedVectorModel::new("mpnet").unwrap(),
        stop.clone(),
    );
    fleet.embed(&EmbedRequest::texts(["both alive"])).await;
    stop.cancel();
    mpnet.await.unwrap();

    // Load with mpnet gone: every partial-fallback request is answered, fused from minilm.
    let mut calls = Vec::new();
    for i in 0..16 {
        let fleet = fleet.clone();
        calls.push(tokio::spawn(async move {
            let request =
                EmbedRequest::texts([format!("under load {i}")]).with_fallback(Fallback::Partial);
            let (code, reply) = fleet
                .raw_with(timeout_header(1_000), json(&request), false)
                .await;
            assert_eq!(code, None, "{:?}", reply.headers);
            serde_json::from_slice::<embedfleet_proto::EmbedReply>(&reply.payload).unwrap()
        }));
    }
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.degraded, ["mpnet"]);
        assert!(reply.data[0].embedding.is_some());
    }
    let stats = fleet.coordinator.stats();
    assert_eq!(
        stats.breakers.get("mpnet"),
        Some(&BreakerState::Open),
        "{stats:?}"
    );
    assert!(stats.breakers_opened >= 1);
    assert_eq!(stats.degraded, 16);

    // Strict, while open: 503 naming the model, without waiting for the deadline.
    let error = fleet
        .error_with(
            timeout_header(20_000),
            json(&EmbedRequest::texts(["strict"])),
            false,
        )
        .await;
    assert_eq!(error.code(), 503, "{error}");
    assert!(error.message.contains("mpnet") && error.message.contains("circuit breaker"));

    // mpnet comes back: after the cool-down a probe closes the breaker.
    let stop = CancellationToken::new();
    let mpnet = spawn_worker(
        fleet.nats.url(),
        FixedVectorModel::new("mpnet").unwrap(),
        stop.clone(),
    );
    let request = EmbedRequest::texts(["under load 0"]).with_fallback(Fallback::Partial);
    let mut recovered = None;
    for _ in 0..100 {
        let (code, reply) = fleet
            .raw_with(timeout_header(2_000), json(&request), false)
            .await;
        assert_eq!(code, None);
        let reply: embedfleet_proto::EmbedReply = serde_json::from_slice(&reply.payload).unwrap();
        if reply.degraded.is_empty() {
            recovered = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = recovered.expect("the breaker closed again");
    // The degraded vector of this text was not cached as the full result.
    assert!(!recovered.data[0].cached);
    assert_eq!(
        fleet.coordinator.stats().breakers.get("mpnet"),
        Some(&BreakerState::Closed)
    );
    stop.cancel();
    mpnet.await.unwrap();
    Arc::try_unwrap(fleet)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}
