//! Names on the bus: service, subjects, stream, consumers and headers.
//!
//! Protocol strings live here as `const`s so that the coordinator, workers, client, Helm chart
//! values and KEDA scaler all agree on one spelling.

/// NATS micro service name; discovery is `$SRV.PING|INFO|STATS.embedfleet`.
pub const SERVICE_NAME: &str = "embedfleet";

/// Service version reported by `$SRV.INFO`: this crate's version, since the crate is the contract.
pub const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The request/reply endpoint clients call. The `v1` is the contract version: an incompatible
/// change gets a new endpoint, served side by side.
pub const EMBED_ENDPOINT: &str = "embed.v1";

/// The `model` of a fused reply.
pub const FUSED_MODEL_NAME: &str = "embedfleet-fusemoe";

/// JetStream work-queue stream holding per-model jobs.
pub const JOB_STREAM: &str = "EMBEDFLEET_JOBS";

/// Prefix of per-model job subjects; one subject per model so that each model has its own
/// consumer and queue depth.
pub const MODEL_JOB_SUBJECT_PREFIX: &str = "embedfleet.v1.model";

/// The subject filter of [`JOB_STREAM`]: every model's job subject.
pub const MODEL_JOB_SUBJECT_WILDCARD: &str = "embedfleet.v1.model.*";

/// The job subject for `model`: `embedfleet.v1.model.<model>`.
///
/// `model` must be a single subject token (see [`is_subject_token`]); catalogue names are.
/// Check client-supplied names against the catalogue before building subjects from them.
pub fn model_job_subject(model: &str) -> String {
    format!("{MODEL_JOB_SUBJECT_PREFIX}.{model}")
}

/// The durable pull-consumer name for `model`: `embedfleet-model-<model>`.
///
/// Stable across releases and restarts: workers bind to it by name, and the KEDA NATS JetStream
/// scaler reads this consumer's pending count to scale the workers of `model`, so the Helm chart
/// spells the same name. Renaming it silently breaks autoscaling.
pub fn model_consumer_name(model: &str) -> String {
    format!("embedfleet-model-{model}")
}

/// Whether `s` can be one subject token and part of a consumer name: non-empty, no `.`, `*`,
/// `>`, whitespace or control characters.
pub fn is_subject_token(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

/// Header naming the payload encoding; see [`crate::Encoding::from_content_type`].
pub const CONTENT_TYPE: &str = "Content-Type";

/// `Content-Type` value for JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// `Content-Type` value for MessagePack payloads.
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";

/// NATS micro error header: the error description (a [`crate::ProtoError`]'s `Display`).
pub const SERVICE_ERROR: &str = "Nats-Service-Error";

/// NATS micro error header: the status code ([`crate::ErrorKind::code`]).
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// Stage timings, for the perf harness (`embedfleet bench`): a request that carries this header
/// (any value) gets it back on a successful reply, `stage=milliseconds` pairs joined by `,`
/// (`cache_get=0.081,jobs.minilm=12.402,fusion=3.120`). A stage that ran more than once is
/// summed; one that did not run is absent. See docs/protocol.md.
pub const TIMINGS_HEADER: &str = "Embedfleet-Timings";

/// JetStream de-duplication header: a publisher that retries a job publish sends the same id, so
/// the stream stores the job once. The id must be per job, not per content: two requests for the
/// same content each need their own partial.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Request header: the request's own timeout in milliseconds (default 30 s, the coordinator's
/// `request_timeout`). Jobs carry the resulting deadline; past it the reply is 503.
pub const TIMEOUT_HEADER: &str = "Embedfleet-Timeout-Ms";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_model_names() {
        assert_eq!(
            model_job_subject("bge-large"),
            "embedfleet.v1.model.bge-large"
        );
        assert_eq!(
            model_consumer_name("bge-large"),
            "embedfleet-model-bge-large"
        );
        assert!(model_job_subject("minilm").starts_with(MODEL_JOB_SUBJECT_PREFIX));
        assert_eq!(
            MODEL_JOB_SUBJECT_WILDCARD.trim_end_matches('*'),
            model_job_subject("")
        );
    }

    #[test]
    fn subject_tokens() {
        assert!(is_subject_token("e5-mistral"));
        for bad in ["", "a.b", "a*", ">", "a b", "a\tb"] {
            assert!(!is_subject_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn version_is_the_crate_version() {
        assert_eq!(SERVICE_VERSION.split('.').count(), 3, "{SERVICE_VERSION}");
    }
}
