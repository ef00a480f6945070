//! A small Rust client for the embedfleet `embed.v1` service: one NATS request per
//! [`EmbedRequest`], the reply decoded into an [`EmbedReply`], every failure a typed
//! [`ClientError`].
//!
//! The wire contract (fields, encodings, error kinds) is `embedfleet-proto`'s, described in
//! `docs/protocol.md`; this crate adds only the NATS round trip:
//! - the request goes to [`EMBED_ENDPOINT`] with a `Content-Type` header naming its encoding:
//!   MessagePack by default ([`DEFAULT_ENCODING`]), JSON with [`EmbedClient::with_encoding`];
//!   the reply comes back in the same encoding;
//! - a payload over [`RequestLimits::max_payload_bytes`] is refused before anything is sent;
//! - an error reply (the `Nats-Service-Error` headers, or an [`ErrorBody`] payload) becomes
//!   [`ClientError::Service`] with the server's [`ProtoError`];
//! - nobody subscribed to `embed.v1` is [`ClientError::NoResponders`], no reply in time is
//!   [`ClientError::Timeout`];
//! - the caller's trace, when it has one, travels in a W3C `traceparent` header
//!   ([`trace_context`]), so the fleet's spans join it;
//! - credentials (creds file, nkey, user and password, token) and TLS (private CA, client
//!   certificate) come from [`NatsSecurity`] ([`security`]), by default from the
//!   `EMBEDFLEET_NATS_*` environment variables.
//!
//! # Example
//!
//! ```no_run
//! use embedfleet_client::{ClientError, EmbedClient};
//! use embedfleet_proto::{EmbedRequest, Encoding, EncodingFormat};
//! use std::time::Duration;
//!
//! # async fn example() -> Result<(), ClientError> {
//! // Connect to the fleet's NATS server. Requests go out as MessagePack.
//! let client = EmbedClient::connect("nats://127.0.0.1:4222")
//!     .await?
//!     .with_timeout(Duration::from_secs(10));
//!
//! // The shorthand: one fused vector per text.
//! let vectors = client.embed_texts(&["hello", "world"]).await?;
//! println!("{} vectors of {} floats", vectors.len(), vectors[0].len());
//!
//! // The full request: choose the models and ask for the per-model vectors too.
//! let request = EmbedRequest::texts(["hello"])
//!     .with_models(["minilm", "mpnet"])
//!     .with_partials(true);
//! match client.embed(&request).await {
//!     Ok(reply) => println!("{} tokens", reply.usage.prompt_tokens),
//!     // A typed refusal from the service: branch on its kind.
//!     Err(ClientError::Service(error)) => eprintln!("refused ({}): {}", error.code(), error),
//!     Err(ClientError::NoResponders) => eprintln!("no fleet: start one with `embedfleet serve`"),
//!     Err(other) => return Err(other),
//! }
//!
//! // Matryoshka and compact encodings: the first 256 dimensions (renormalised) as int8 codes.
//! let int8 = client
//!     .embed_texts_as(&["hello"], Some(256), EncodingFormat::Int8)
//!     .await?;
//! println!("{:?}", int8[0].format());
//!
//! // JSON instead, e.g. to read the traffic with `nats sub embed.v1`; the vectors are the same.
//! let json = client.clone().with_encoding(Encoding::Json);
//! println!("{} floats", json.embed_texts(&["hello"]).await?[0].len());
//! # Ok(())
//! # }
//! ```

pub mod security;
pub mod trace_context;

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use embedfleet_proto::{
    EmbedReply, EmbedRequest, Embedding, Encoding, EncodingFormat, ErrorBody, ErrorKind,
    ProtoError, RequestLimits, CONTENT_TYPE, EMBED_ENDPOINT, SERVICE_ERROR, SERVICE_ERROR_CODE,
    TIMEOUT_HEADER, TIMINGS_HEADER,
};
pub use security::{NatsAuth, NatsSecurity, NatsTls, Secret, SecurityError, SecuritySettings};
use tracing::Instrument;

/// How long [`EmbedClient::embed`] waits for a reply unless told otherwise: a little over the
/// coordinator's own default request timeout (30 s), so that a slow fleet answers with its typed
/// `timeout` error before the client gives up on its own.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(35);

/// How [`EmbedClient`] encodes requests (and so gets replies) unless told otherwise.
/// MessagePack carries vectors as 4-byte floats rather than decimal text: a cached batch-32 round
/// trip takes 2.81 ms against 7.84 ms in JSON (`docs/benchmarks.md`, the `coordinator` bench).
pub const DEFAULT_ENCODING: Encoding = Encoding::MsgPack;

/// Why an embed call failed. Every message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The NATS server could not be reached, or refused the credentials or the TLS handshake
    /// ([`EmbedClient::connect`] only).
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The security settings cannot be used (an unreadable file, two authentication modes);
    /// nothing was sent.
    #[error("{0}")]
    Security(#[from] SecurityError),
    /// The encoded request is over the request payload limit (ours, or the NATS server's
    /// `max_payload` when that is lower); nothing was sent.
    #[error("request payload is {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// Nobody subscribes to `embed.v1`: no embedfleet service runs on this NATS server.
    #[error("no responders on {EMBED_ENDPOINT}: no embedfleet service runs on this NATS server")]
    NoResponders,
    /// No reply arrived within the client's timeout.
    #[error("no reply on {EMBED_ENDPOINT} within {0:?}")]
    Timeout(Duration),
    /// The service answered with an error: its kind, code and message.
    #[error("the embedfleet service refused the request: {0}")]
    Service(#[source] ProtoError),
    /// The NATS request itself failed (connection lost, client closed, ...).
    #[error("NATS request on {EMBED_ENDPOINT} failed: {0}")]
    Transport(#[source] async_nats::RequestError),
    /// The request could not be encoded (a bug: every [`EmbedRequest`] encodes).
    #[error("could not encode the request: {0}")]
    Encode(#[source] ProtoError),
    /// The reply is neither an [`EmbedReply`] nor an error, or lacks what was asked for.
    #[error("could not decode the reply: {0}")]
    Decode(#[source] ProtoError),
}

impl ClientError {
    /// The service's error kind, for [`ClientError::Service`]; `None` for client-side failures.
    pub fn service_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Service(error) => Some(error.kind),
            _ => None,
        }
    }
}

/// A handle on the embedfleet service. Cheap to clone: clones share one NATS connection.
#[derive(Debug, Clone)]
pub struct EmbedClient {
    nats: async_nats::Client,
    /// Bounds each request, so a caller never waits on a fleet that has gone quiet.
    timeout: Duration,
    /// How requests are encoded; replies come back the same way.
    encoding: Encoding,
    /// The payload bound checked before sending, so an oversized request fails here, not after
    /// crossing the network.
    limits: RequestLimits,
    /// How long the fleet may work on each request (the `Embedfleet-Timeout-Ms` header); `None`:
    /// the coordinator's own default.
    fleet_deadline: Option<Duration>,
}

impl EmbedClient {
    /// Connects to the NATS server at `url` (`nats://host:port`, or several comma-separated)
    /// with the credentials and TLS settings of the `EMBEDFLEET_NATS_*` environment variables
    /// ([`NatsSecurity::from_env`]; none set: a plain connection).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &NatsSecurity::from_env()?).await
    }

    /// Connects to the NATS server at `url` with `security`'s credentials and TLS settings.
    pub async fn connect_with(url: &str, security: &NatsSecurity) -> Result<Self, ClientError> {
        let options = security
            .apply(async_nats::ConnectOptions::new().name("embedfleet-client"))
            .await?;
        let nats = options
            .connect(url)
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        Ok(EmbedClient::new(nats))
    }

    /// A client on an existing NATS connection, with [`DEFAULT_ENCODING`] (MessagePack),
    /// [`DEFAULT_TIMEOUT`] and the default [`RequestLimits`].
    pub fn new(nats: async_nats::Client) -> Self {
        EmbedClient {
            nats,
            timeout: DEFAULT_TIMEOUT,
            encoding: DEFAULT_ENCODING,
            limits: RequestLimits::default(),
            fleet_deadline: None,
        }
    }

    /// Waits at most `timeout` for each reply.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Lets the fleet work up to `deadline` on each request instead of its default (30 s),
    /// for bulk jobs whose batches queue behind each other: sent as the `Embedfleet-Timeout-Ms`
    /// header, which a coordinator accepts up to its `max_request_timeout` (300 s unless
    /// configured; a longer one is refused with `bad_request`). The client then waits
    /// `deadline` plus 5 s, so the fleet's typed `timeout` error arrives before its own.
    pub fn with_fleet_deadline(mut self, deadline: Duration) -> Self {
        self.fleet_deadline = Some(deadline);
        self.timeout = deadline + Duration::from_secs(5);
        self
    }

    /// Encodes requests (and so gets replies) in `encoding` instead of [`DEFAULT_ENCODING`].
    /// JSON is readable on the wire but larger and slower to decode.
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Checks payloads against `limits` instead of the defaults; match the fleet's settings.
    pub fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The NATS connection underneath.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends `request` to `embed.v1` and waits for the reply.
    pub async fn embed(&self, request: &EmbedRequest) -> Result<EmbedReply, ClientError> {
        self.send(request, HeaderMap::new())
            .await
            .map(|(reply, _)| reply)
    }

    /// Like [`EmbedClient::embed`], and asks the fleet for its stage timings
    /// ([`TIMINGS_HEADER`]): the header's raw value comes back with the reply, `None` when the
    /// fleet sent none (an older coordinator).
    pub async fn embed_timed(
        &self,
        request: &EmbedRequest,
    ) -> Result<(EmbedReply, Option<String>), ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(TIMINGS_HEADER, "1");
        self.send(request, headers).await
    }

    async fn send(
        &self,
        request: &EmbedRequest,
        mut headers: HeaderMap,
    ) -> Result<(EmbedReply, Option<String>), ClientError> {
        let payload = self.encoding.encode(request).map_err(ClientError::Encode)?;
        if self.limits.check_payload_len(payload.len()).is_err() {
            return Err(ClientError::TooLarge {
                bytes: payload.len(),
                limit: self.limits.max_payload_bytes,
            });
        }
        let bytes = payload.len();
        headers.insert(CONTENT_TYPE, self.encoding.content_type());
        if let Some(deadline) = self.fleet_deadline {
            headers.insert(TIMEOUT_HEADER, deadline.as_millis().max(1).to_string());
        }
        let span = tracing::info_span!("embed.v1", otel.kind = "client", bytes);
        self.round_trip(request, headers, payload, bytes)
            .instrument(span)
            .await
    }

    async fn round_trip(
        &self,
        request: &EmbedRequest,
        mut headers: HeaderMap,
        payload: Vec<u8>,
        bytes: usize,
    ) -> Result<(EmbedReply, Option<String>), ClientError> {
        trace_context::inject_current(&mut headers);
        let nats_request = async_nats::Request::new()
            .headers(headers)
            .payload(Bytes::from(payload))
            .timeout(Some(self.timeout));
        let message = self
            .nats
            .send_request(EMBED_ENDPOINT, nats_request)
            .await
            .map_err(|error| match error.kind() {
                RequestErrorKind::NoResponders => ClientError::NoResponders,
                RequestErrorKind::TimedOut => ClientError::Timeout(self.timeout),
                RequestErrorKind::MaxPayloadExceeded => ClientError::TooLarge {
                    bytes,
                    limit: self.nats.server_info().max_payload,
                },
                _ => ClientError::Transport(error),
            })?;
        tracing::trace!(bytes = message.payload.len(), "embed.v1 reply");
        let timings = message
            .headers
            .as_ref()
            .and_then(|h| h.get(TIMINGS_HEADER))
            .map(|v| v.as_str().to_string());
        let reply = decode_reply(self.encoding, message.headers.as_ref(), &message.payload)?;
        conform(reply, request.encoding_format).map(|reply| (reply, timings))
    }

    /// Embeds `texts` with the fleet's default models and returns the fused vector of each, cut
    /// to `dimensions` (renormalised) and in `format` (`data[i].embedding` of the reply).
    pub async fn embed_texts_as(
        &self,
        texts: &[&str],
        dimensions: Option<usize>,
        format: EncodingFormat,
    ) -> Result<Vec<Embedding>, ClientError> {
        let mut request = EmbedRequest::texts(texts.iter().copied()).with_encoding_format(format);
        request.dimensions = dimensions;
        let reply = self.embed(&request).await?;
        fused_embeddings(reply, texts.len())
    }

    /// Embeds `texts` with the fleet's default models and returns the fused vector of each, in
    /// order.
    pub async fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ClientError> {
        let reply = self
            .embed(&EmbedRequest::texts(texts.iter().copied()))
            .await?;
        fused_vectors(reply, texts.len())
    }
}

/// Turns a reply message into the reply or the service's error.
///
/// The headers win when present (that is what a NATS micro service sends); the payload's
/// [`ErrorBody`] then refines them, since its `kind` is exact while the header code is not. A
/// payload without headers is still checked for an [`ErrorBody`], for services that only send
/// the body.
fn decode_reply(
    request_encoding: Encoding,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<EmbedReply, ClientError> {
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    // A reply says its encoding; a reply that does not is in the request's.
    let encoding = header(CONTENT_TYPE)
        .map(|ct| Encoding::from_content_type(Some(ct)))
        .unwrap_or(request_encoding);

    if let Some(code) = header(SERVICE_ERROR_CODE) {
        if let Ok(body) = encoding.decode::<ErrorBody>(payload) {
            return Err(ClientError::Service(body.into_error()));
        }
        let code = code.trim().parse::<u16>().unwrap_or(500);
        let description = header(SERVICE_ERROR).unwrap_or("(no description)");
        return Err(ClientError::Service(ProtoError::from_service_error(
            code,
            description,
        )));
    }
    match encoding.decode::<EmbedReply>(payload) {
        Ok(reply) => Ok(reply),
        Err(reply_error) => match encoding.decode::<ErrorBody>(payload) {
            Ok(body) => Err(ClientError::Service(body.into_error())),
            Err(_) => Err(ClientError::Decode(reply_error)),
        },
    }
}

/// A decoded reply's fused vectors as the requested `encoding_format`: an array of integers
/// cannot say on the wire whether it is `int8` or `binary` (see [`Embedding::conform`]).
fn conform(mut reply: EmbedReply, format: EncodingFormat) -> Result<EmbedReply, ClientError> {
    for element in &mut reply.data {
        if let Some(embedding) = element.embedding.take() {
            element.embedding = Some(embedding.conform(format).map_err(ClientError::Decode)?);
        }
    }
    Ok(reply)
}

/// The fused float vectors of a reply to `expected` inputs, in request order.
fn fused_vectors(reply: EmbedReply, expected: usize) -> Result<Vec<Vec<f32>>, ClientError> {
    fused_embeddings(reply, expected)?
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| match embedding {
            Embedding::Float(vector) => Ok(vector),
            other => Err(ClientError::Decode(ProtoError::invalid_payload(format!(
                "input {index}: asked for float vectors, the reply carries {}",
                other.format()
            )))),
        })
        .collect()
}

/// The fused vectors of a reply to `expected` inputs, in request order.
fn fused_embeddings(reply: EmbedReply, expected: usize) -> Result<Vec<Embedding>, ClientError> {
    if reply.data.len() != expected {
        return Err(ClientError::Decode(ProtoError::invalid_payload(format!(
            "the reply has {} entries for {expected} inputs",
            reply.data.len()
        ))));
    }
    let mut vectors: Vec<Option<Embedding>> = vec![None; expected];
    for data in reply.data {
        let index = data.index;
        let slot = vectors
            .get_mut(index)
            .filter(|slot| slot.is_none())
            .ok_or_else(|| {
                ClientError::Decode(ProtoError::invalid_payload(format!(
                    "the reply's index {index} is out of range or repeated"
                )))
            })?;
        let embedding = data.embedding.ok_or_else(|| {
            ClientError::Decode(ProtoError::invalid_payload(format!(
                "the reply has no fused embedding for input {index}"
            )))
        })?;
        *slot = Some(embedding);
    }
    // Every slot is filled: `expected` distinct in-range indices.
    Ok(vectors.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_proto::{EmbeddingData, Usage, FUSED_MODEL_NAME};

    fn reply(indices: &[usize]) -> EmbedReply {
        let data = indices
            .iter()
            .map(|&i| EmbeddingData::fused(i, vec![i as f32; 3]))
            .collect();
        EmbedReply::new(FUSED_MODEL_NAME, data, Usage::new(4))
    }

    fn error_headers(code: &str, description: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(SERVICE_ERROR_CODE, code);
        headers.insert(SERVICE_ERROR, description);
        headers
    }

    #[test]
    fn a_reply_decodes_in_either_encoding() {
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encoding.encode(&reply(&[0, 1])).expect("encode");
            let decoded = decode_reply(encoding, None, &bytes).expect("decode");
            assert_eq!(decoded, reply(&[0, 1]));
        }
    }

    #[test]
    fn the_reply_content_type_wins_over_the_request_encoding() {
        let bytes = Encoding::MsgPack.encode(&reply(&[0])).expect("encode");
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, Encoding::MsgPack.content_type());
        let decoded = decode_reply(Encoding::Json, Some(&headers), &bytes).expect("decode");
        assert_eq!(decoded, reply(&[0]));
    }

    #[test]
    fn service_headers_with_a_body_take_the_body_kind() {
        let error = ProtoError::new(ErrorKind::UnknownModel, "no model `nope`");
        let body = Encoding::Json
            .encode(&ErrorBody::from(&error))
            .expect("encode");
        let headers = error_headers("404", &error.to_string());
        match decode_reply(Encoding::Json, Some(&headers), &body) {
            Err(ClientError::Service(got)) => assert_eq!(got, error),
            other => panic!("expected a service error, got {other:?}"),
        }
    }

    #[test]
    fn service_headers_alone_are_enough() {
        let headers = error_headers("429", "overloaded: 64 requests in flight");
        match decode_reply(Encoding::Json, Some(&headers), b"") {
            Err(ClientError::Service(got)) => {
                assert_eq!(got.kind, ErrorKind::Overloaded);
                assert_eq!(got.message, "64 requests in flight");
            }
            other => panic!("expected a service error, got {other:?}"),
        }
        let headers = error_headers("503", "something odd");
        let err = decode_reply(Encoding::Json, Some(&headers), b"").expect_err("error");
        assert_eq!(err.service_kind(), Some(ErrorKind::NoWorker));
    }

    #[test]
    fn an_error_body_without_headers_is_a_service_error() {
        let error = ProtoError::empty_input("input[0]: `input` is empty");
        let body = Encoding::MsgPack
            .encode(&ErrorBody::from(&error))
            .expect("encode");
        let err = decode_reply(Encoding::MsgPack, None, &body).expect_err("error");
        assert_eq!(err.service_kind(), Some(ErrorKind::EmptyInput));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = decode_reply(Encoding::Json, None, b"{\"nope\":1}").expect_err("error");
        assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn fused_vectors_come_back_in_request_order() {
        let vectors = fused_vectors(reply(&[1, 0, 2]), 3).expect("vectors");
        assert_eq!(vectors, vec![vec![0.0; 3], vec![1.0; 3], vec![2.0; 3]]);
        for bad in [reply(&[0, 0]), reply(&[0, 2]), reply(&[0])] {
            let err = fused_vectors(bad, 2).expect_err("bad reply");
            assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
        }
        let mut unfused = reply(&[0]);
        unfused.data[0].embedding = None;
        assert!(fused_vectors(unfused, 1).is_err());
    }
}
