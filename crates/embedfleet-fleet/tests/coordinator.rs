//! The coordinator against a real nats-server (and redis-server), with workers hosting the
//! testkit's fixed-vector models, so every expected vector can be computed here: replies in
//! both encodings, fusion equal to the fusion stage run by hand, the cache (fused and partial
//! reuse across model sets), new revisions announced by workers (and not undone by late partials
//! of the old weights), error replies with their codes,
//! 429 under a flood, 503 with no worker.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use embedfleet_fleet::fusion::FusionStage;
use embedfleet_fleet::revisions::{self, Announcement};
use embedfleet_fleet::CoordinatorConfig;
use embedfleet_models::catalogue;
use embedfleet_proto::{EmbedReply, EmbedRequest, Encoding, Input};
use embedfleet_testkit::{FixedVectorModel, RedisServer};
use support::{close, normalized, spawn_worker, wait_for_revision, Fleet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_reply_matches_the_fusion_stage_in_json_and_msgpack() {
    let fleet = Fleet::start(
        &["minilm", "mpnet"],
        CoordinatorConfig::default(),
        None,
        Duration::ZERO,
    )
    .await;
    let texts = ["the first input", "a second, longer input text"];
    let request = EmbedRequest::texts(texts).with_partials(true);
    let reply = fleet.embed(&request).await;
    assert_eq!(reply.model, embedfleet_proto::FUSED_MODEL_NAME);
    assert_eq!(reply.data.len(), 2);

    let specs = catalogue::in_slot_order(vec![
        catalogue::find("minilm").unwrap(),
        catalogue::find("mpnet").unwrap(),
    ]);
    let layer = FusionStage::seeded()
        .layer(&specs, &embedfleet_fleet::fusion::catalogue_widths(&specs))
        .unwrap();
    for (i, text) in texts.iter().enumerate() {
        let input = Input::Text(text.to_string());
        let expected: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| normalized(fleet.model(s.name).vector_for(&input, None)))
            .collect();
        let fused = layer
            .fuse(
                &expected
                    .iter()
                    .map(|v| Some(v.as_slice()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let data = &reply.data[i];
        assert_eq!(data.index, i);
        let embedding = data.float_embedding().expect("fused vector");
        assert_eq!(embedding.len(), 1536);
        assert!(
            close(embedding, &fused.embedding),
            "fused vector of input {i}"
        );
        let partials = data.partials.as_ref().expect("partials asked for");
        assert!(close(&partials["minilm"], &expected[0]));
        assert!(close(&partials["mpnet"], &expected[1]));
        assert!(data.experts.is_some());
    }
    assert!(reply.usage.prompt_tokens > 0);

    // The same request in MessagePack gets a MessagePack reply with the same vectors.
    let payload = rmp_serde::to_vec_named(&request).unwrap();
    let (code, body) = fleet.raw(payload, true).await;
    assert_eq!(code, None);
    let packed: EmbedReply = Encoding::MsgPack.decode(&body).unwrap();
    assert!(close(
        packed.data[1].float_embedding().unwrap(),
        reply.data[1].float_embedding().unwrap()
    ));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_repeats_and_partials_serve_other_model_sets() {
    let redis = RedisServer::start().expect("redis-server");
    let fleet = Fleet::start(
        &["minilm", "mpnet"],
        CoordinatorConfig::default(),
        Some(redis.url()),
        Duration::ZERO,
    )
    .await;
    let request = EmbedRequest::texts(["cache me", "and me"]);
    let first = fleet.embed(&request).await;
    assert!(first.data.iter().all(|d| !d.cached));
    let jobs_after_first = fleet.coordinator.stats().jobs_published;
    assert_eq!(jobs_after_first, 2, "one job per model");

    // Cache writes follow the reply; wait until the fused entries are readable.
    let mut second = fleet.embed(&request).await;
    for _ in 0..50 {
        if second.data.iter().all(|d| d.cached) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        second = fleet.embed(&request).await;
    }
    assert!(
        second.data.iter().all(|d| d.cached),
        "repeat served from cache"
    );
    for (a, b) in first.data.iter().zip(&second.data) {
        assert!(close(
            a.float_embedding().unwrap(),
            b.float_embedding().unwrap()
        ));
    }
    let jobs = fleet.coordinator.stats().jobs_published;

    // A different set over the same text: minilm's partial comes from the cache, no new job.
    let subset = EmbedRequest::texts(["cache me"])
        .with_models(["minilm"])
        .with_partials(true);
    let reply = fleet.embed(&subset).await;
    assert_eq!(
        fleet.coordinator.stats().jobs_published,
        jobs,
        "no job for a cached partial"
    );
    let expected = normalized(
        fleet
            .model("minilm")
            .vector_for(&Input::Text("cache me".into()), None),
    );
    assert!(close(
        &reply.data[0].partials.as_ref().unwrap()["minilm"],
        &expected
    ));
    assert!(fleet.coordinator.stats().partial_hits >= 1);

    // normalize: false is served from the same (raw) partial, at the model's own scale.
    let raw = fleet
        .embed(
            &EmbedRequest::texts(["cache me"])
                .with_models(["minilm"])
                .with_fuse(false)
                .with_normalize(false),
        )
        .await;
    let raw_vector = &raw.data[0].partials.as_ref().unwrap()["minilm"];
    assert!(close(
        raw_vector,
        &fleet
            .model("minilm")
            .vector_for(&Input::Text("cache me".into()), None)
    ));
    assert_eq!(fleet.coordinator.stats().jobs_published, jobs);
    assert!(fleet.coordinator.stats().cache.redis_configured);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_partial_of_the_old_weights_does_not_undo_an_announced_revision() {
    // A short max_request_timeout: how long an announcement outranks partials.
    let grace = Duration::from_secs(2);
    let config = CoordinatorConfig {
        request_timeout: grace,
        max_request_timeout: grace,
        ..CoordinatorConfig::default()
    };
    let fleet = Fleet::start(&["minilm", "mpnet"], config, None, Duration::ZERO).await;
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm").await;

    // A hot swap announced v2 while this worker still answers with v1, as batches in flight at
    // a swap do: their partials arrive after the announcement.
    let js = async_nats::jetstream::new(fleet.client.clone());
    let v2 = Announcement {
        revision: "fixed-minilm-v2".into(),
        dim: Some(384),
    };
    revisions::announce(&js, "minilm", &v2).await.unwrap();
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm-v2").await;
    let reply = fleet
        .embed(&EmbedRequest::texts([
            "answered by the old weights after the swap",
        ]))
        .await;
    assert!(!reply.data[0].cached);
    assert_eq!(
        fleet.coordinator.revision_of("minilm").as_deref(),
        Some("fixed-minilm-v2"),
        "a v1 partial right after the v2 announcement must not switch the keys back"
    );

    // Past the grace, the revision that keeps answering wins: v2's workers are gone (rollback).
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    fleet
        .embed(&EmbedRequest::texts(["answered by the old weights, later"]))
        .await;
    assert_eq!(
        fleet.coordinator.revision_of("minilm").as_deref(),
        Some("fixed-minilm")
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_new_weights_is_used_even_for_cached_content() {
    let fleet = Fleet::start(
        &["mpnet"],
        CoordinatorConfig::default(),
        None,
        Duration::ZERO,
    )
    .await;
    let old_stop = CancellationToken::new();
    let old = spawn_worker(
        fleet.nats.url(),
        FixedVectorModel::new("minilm").unwrap(),
        old_stop.clone(),
    );
    // Announced when the worker binds, before it has answered anything.
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm").await;

    let request = EmbedRequest::texts(["the same text, before and after"]);
    assert!(!fleet.embed(&request).await.data[0].cached);
    let mut again = fleet.embed(&request).await;
    for _ in 0..50 {
        if again.data[0].cached {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = fleet.embed(&request).await;
    }
    assert!(again.data[0].cached, "a repeat is served from the cache");

    // Roll minilm to new weights: the old worker goes, a worker with another revision comes.
    old_stop.cancel();
    old.await.expect("old worker stops");
    let new_model = FixedVectorModel::new("minilm")
        .unwrap()
        .with_revision("fixed-minilm-v2");
    let new_stop = CancellationToken::new();
    let new = spawn_worker(fleet.nats.url(), new_model, new_stop.clone());
    wait_for_revision(&fleet.coordinator, "minilm", "fixed-minilm-v2").await;

    let jobs = fleet.coordinator.stats().jobs_published;
    let after = fleet.embed(&request).await;
    assert!(
        !after.data[0].cached,
        "content cached under the old revision must not answer for the new one"
    );
    assert_eq!(
        fleet.coordinator.stats().jobs_published,
        jobs + 1,
        "one job, for minilm; mpnet's partial is still good"
    );
    new_stop.cancel();
    new.await.expect("new worker stops");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_the_service_stays_up() {
    let fleet = Fleet::start(
        &["minilm", "mpnet"],
        CoordinatorConfig::default(),
        None,
        Duration::ZERO,
    )
    .await;
    let cases: Vec<(&str, Vec<u8>, bool, u16, &str)> = vec![
        ("not json", b"{nope".to_vec(), false, 400, "invalid_payload"),
        (
            "not msgpack",
            vec![0xc1, 0xff, 0x00],
            true,
            400,
            "invalid_payload",
        ),
        (
            "neither input",
            br#"{"fuse":true}"#.to_vec(),
            false,
            400,
            "bad_request",
        ),
        (
            "both inputs",
            br#"{"input":"a","inputs":[{"text":"b"}]}"#.to_vec(),
            false,
            400,
            "bad_request",
        ),
        (
            "empty text",
            br#"{"input":"   "}"#.to_vec(),
            false,
            400,
            "empty_input",
        ),
        (
            "unknown model",
            br#"{"input":"a","models":["nope"]}"#.to_vec(),
            false,
            404,
            "unknown_model",
        ),
        (
            "image to a text model",
            br#"{"inputs":[{"image_b64":"iVBORw0KGgo="}],"models":["minilm"]}"#.to_vec(),
            false,
            422,
            "unsupported_modality",
        ),
        (
            "invalid base64",
            br#"{"inputs":[{"image_b64":"***"}],"models":["minilm"]}"#.to_vec(),
            false,
            400,
            "invalid_base64",
        ),
        (
            "too many inputs",
            serde_json::to_vec(&EmbedRequest::texts(vec!["x"; 257])).unwrap(),
            false,
            413,
            "too_large",
        ),
        (
            "past max length without truncation",
            serde_json::to_vec(
                &EmbedRequest::texts([vec!["word"; 2_000].join(" ")])
                    .with_models(["minilm"])
                    .with_truncate(false),
            )
            .unwrap(),
            false,
            413,
            "input_too_long",
        ),
    ];
    for (what, payload, msgpack, code, kind) in cases {
        let error = fleet.error(payload, msgpack).await;
        assert_eq!(error.code(), code, "{what}: {error:?}");
        assert_eq!(
            serde_json::to_value(error.kind).unwrap(),
            serde_json::json!(kind),
            "{what}"
        );
    }
    // Still serving.
    let reply = fleet.embed(&EmbedRequest::texts(["still here"])).await;
    assert_eq!(reply.data[0].float_embedding().unwrap().len(), 1536);
    let stats = fleet.coordinator.stats();
    assert!(stats.client_errors >= 10, "{stats:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_max_in_flight_gets_429_and_the_rest_succeed() {
    let config = CoordinatorConfig {
        max_in_flight: 2,
        ..CoordinatorConfig::default()
    };
    let fleet = Arc::new(
        Fleet::start(
            &["minilm", "mpnet"],
            config,
            None,
            Duration::from_millis(150),
        )
        .await,
    );
    let mut calls = Vec::new();
    for i in 0..24 {
        let fleet = fleet.clone();
        calls.push(tokio::spawn(async move {
            let request = EmbedRequest::texts([format!("flood {i}")]);
            fleet
                .raw(serde_json::to_vec(&request).unwrap(), false)
                .await
                .0
        }));
    }
    let mut overloaded = 0;
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            None => ok += 1,
            Some(429) => overloaded += 1,
            Some(other) => panic!("unexpected code {other}"),
        }
    }
    assert!(overloaded > 0, "some requests refused");
    assert!(ok >= 2, "admitted requests answered");
    assert_eq!(fleet.coordinator.stats().overloaded, overloaded);
    let reply = fleet.embed(&EmbedRequest::texts(["after the flood"])).await;
    assert_eq!(reply.data.len(), 1);
    Arc::try_unwrap(fleet)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_for_a_model_is_a_503_within_the_deadline() {
    let config = CoordinatorConfig {
        request_timeout: Duration::from_millis(3_000),
        ..CoordinatorConfig::default()
    };
    // A worker for minilm only; the default set also needs mpnet.
    let fleet = Fleet::start(&["minilm"], config, None, Duration::ZERO).await;
    let started = std::time::Instant::now();
    let error = fleet
        .error(
            serde_json::to_vec(&EmbedRequest::texts(["anyone?"])).unwrap(),
            false,
        )
        .await;
    assert_eq!(error.code(), 503, "{error:?}");
    // no_worker names the model nobody serves; on a loaded machine the queue itself may be
    // what ran out of time (timeout), which is the same 503 for the client.
    let kind = serde_json::to_value(error.kind).unwrap();
    assert!(
        (kind == "no_worker" && error.message.contains("mpnet")) || kind == "timeout",
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered near the deadline"
    );
    // minilm alone still works (unfused: the point is the job, not a new fusion layer).
    let reply = fleet
        .embed(
            &EmbedRequest::texts(["anyone?"])
                .with_models(["minilm"])
                .with_fuse(false),
        )
        .await;
    assert_eq!(reply.data.len(), 1);
    fleet.stop().await;
}
