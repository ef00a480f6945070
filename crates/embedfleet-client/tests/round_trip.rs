//! The client against a real `nats-server`, with a stand-in for the service on `embed.v1` that
//! answers the way a NATS micro service does (headers on errors, the request's encoding back).

use std::time::Duration;

use async_nats::HeaderMap;
use embedfleet_client::{ClientError, EmbedClient};
use embedfleet_proto::{
    EmbedReply, EmbedRequest, EmbeddingData, Encoding, ErrorBody, ErrorKind, ProtoError,
    RequestLimits, Usage, CONTENT_TYPE, EMBED_ENDPOINT, FUSED_MODEL_NAME, SERVICE_ERROR,
    SERVICE_ERROR_CODE,
};
use embedfleet_testkit::NatsServer;
use futures::StreamExt;

/// Answers `embed.v1` like the service would: a fused vector `[i, len(text)]` per text input,
/// `unknown_model` for a request naming the model `nope`, and silence for the model `slow`.
async fn stand_in_service(nats: async_nats::Client) {
    let mut requests = nats.subscribe(EMBED_ENDPOINT).await.expect("subscribe");
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let content_type = message
                .headers
                .as_ref()
                .and_then(|h| h.get(CONTENT_TYPE))
                .map(|v| v.as_str().to_string());
            let encoding = Encoding::from_content_type(content_type.as_deref());
            let reply_to = message.reply.clone().expect("a request");
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, encoding.content_type());
            let request: EmbedRequest = encoding.decode(&message.payload).expect("decodes");
            let models = request.models.clone().unwrap_or_default();
            if models.iter().any(|m| m == "slow") {
                continue;
            }
            let payload = if models.iter().any(|m| m == "nope") {
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
                let reply = EmbedReply::new(FUSED_MODEL_NAME, data, Usage::new(7));
                encoding.encode(&reply).expect("encode")
            };
            nats.publish_with_headers(reply_to, headers, payload.into())
                .await
                .expect("reply");
        }
    });
}

#[tokio::test]
async fn embeds_and_reports_every_failure_typed() {
    let server = NatsServer::start().expect("nats-server (apt-get install nats-server)");
    let client = EmbedClient::connect(&server.url())
        .await
        .expect("connect")
        .with_timeout(Duration::from_millis(500));

    // Nobody serves embed.v1 yet.
    let err = client
        .embed_texts(&["hello"])
        .await
        .expect_err("no service");
    assert!(matches!(err, ClientError::NoResponders), "{err:?}");

    stand_in_service(client.nats().clone()).await;
    client.nats().flush().await.expect("flush");

    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let client = client.clone().with_encoding(encoding);
        let vectors = client.embed_texts(&["a", "bcd"]).await.expect("embed");
        assert_eq!(
            vectors,
            vec![vec![0.0, 1.0], vec![1.0, 3.0]],
            "{encoding:?}"
        );

        let err = client
            .embed(&EmbedRequest::texts(["x"]).with_models(["nope"]))
            .await
            .expect_err("unknown model");
        match err {
            ClientError::Service(error) => {
                assert_eq!((error.kind, error.code()), (ErrorKind::UnknownModel, 404));
            }
            other => panic!("expected a service error, got {other:?}"),
        }
    }

    let err = client
        .embed(&EmbedRequest::texts(["x"]).with_models(["slow"]))
        .await
        .expect_err("no reply");
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");

    // Over the payload limit: refused before sending (a stand-in would have answered).
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
