//! The client's `traceparent`: the request a real nats-server delivers to `embed.v1` carries the
//! caller's trace (the client's `embed.v1` span, a child of the caller's span) when the caller
//! bridges `tracing` to OpenTelemetry, and no header when it does not. The test answers the
//! request itself, so the header is read exactly as the coordinator receives it.

use async_nats::HeaderMap;
use futures::StreamExt;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use embedfleet_client::trace_context::TRACEPARENT;
use embedfleet_client::EmbedClient;
use embedfleet_proto::{EmbedReply, EmbeddingData, Encoding, Usage, CONTENT_TYPE, EMBED_ENDPOINT};
use embedfleet_testkit::NatsServer;

/// Answers one `embed.v1` request with a one-vector reply; returns the request's headers.
async fn answer_one(nats: async_nats::Client) -> tokio::task::JoinHandle<Option<HeaderMap>> {
    let mut requests = nats.subscribe(EMBED_ENDPOINT).await.unwrap();
    nats.flush().await.unwrap();
    tokio::spawn(async move {
        let request = requests.next().await.expect("a request");
        let reply = EmbedReply::new("m", vec![EmbeddingData::fused(0, vec![1.0])], Usage::new(1));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, Encoding::MsgPack.content_type());
        let body = Encoding::MsgPack.encode(&reply).unwrap();
        nats.publish_with_headers(request.reply.unwrap(), headers, body.into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        request.headers
    })
}

fn traceparent(headers: &Option<HeaderMap>) -> Option<String> {
    headers
        .as_ref()
        .and_then(|h| h.get(TRACEPARENT))
        .map(|v| v.as_str().to_string())
}

// One thread: the subscriber below is this thread's default, and the client runs on it.
#[tokio::test(flavor = "current_thread")]
async fn requests_carry_the_callers_trace_and_nothing_without_one() {
    let server = NatsServer::start().expect("nats-server");
    let nats = async_nats::connect(server.url()).await.unwrap();
    let client = EmbedClient::new(nats.clone());

    // No OpenTelemetry in the caller: no header, the request as before.
    let answered = answer_one(nats.clone()).await;
    client.embed_texts(&["plain"]).await.expect("reply");
    assert_eq!(traceparent(&answered.await.unwrap()), None);

    // A caller that bridges tracing to OpenTelemetry: its trace travels.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);
    let caller = tracing::info_span!("caller");
    let caller_context = caller.context().span().span_context().clone();
    assert!(caller_context.is_valid());

    let answered = answer_one(nats.clone()).await;
    client
        .embed_texts(&["traced"])
        .instrument(caller.clone())
        .await
        .expect("reply");
    let header = traceparent(&answered.await.unwrap()).expect("a traceparent");
    drop(caller);

    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    assert_eq!(parts[0], "00");
    assert_eq!(
        TraceId::from_hex(parts[1]).unwrap(),
        caller_context.trace_id()
    );
    assert_eq!(parts[3], "01", "sampled");
    // The span it names is the client's `embed.v1` span, a child of the caller's.
    let sent_span = SpanId::from_hex(parts[2]).unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let client_span = spans
        .iter()
        .find(|s| s.name == "embed.v1")
        .expect("the client's span");
    assert_eq!(client_span.span_context.span_id(), sent_span);
    assert_eq!(client_span.parent_span_id, caller_context.span_id());
}
