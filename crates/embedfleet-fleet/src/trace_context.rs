//! Traces across hops: the W3C `traceparent` (and `tracestate`) header in NATS messages, read
//! and written with OpenTelemetry's [`TraceContextPropagator`], and the helpers the coordinator
//! and the worker use to continue, pass on and link traces.
//!
//! The fleet's spans are ordinary `tracing` spans; they become OpenTelemetry spans only in a
//! process that installs `tracing-opentelemetry`'s layer (the CLI does when OTLP export is
//! configured, see docs/operations.md#traces; tests install one with an in-memory exporter).
//! Without that layer nothing here costs more than a header lookup, and an incoming
//! `traceparent` is still passed on unchanged (the coordinator puts the client's into its jobs),
//! so a worker that does export joins the client's trace even when the coordinator does not.
//!
//! A missing or malformed `traceparent` is never an error: the request starts a new trace.
//! Header sizes are bounded by the NATS server's `max_payload`, as for every header.

use std::time::SystemTime;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C Trace Context header a trace travels in (lower case, as the W3C spells it; a
/// `Traceparent` sent by a client that capitalises header names is read too).
pub const TRACEPARENT: &str = "traceparent";

/// The instrumentation scope of the spans this module records directly (queue wait).
pub const TRACER_NAME: &str = "embedfleet";

/// The trace context `headers` carry: the remote parent of the span that handles the message.
/// No headers, no `traceparent` or a malformed one give an empty context (a new trace).
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(headers) => TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
        None => Context::new(),
    }
}

/// The span context `headers` carry, for a link; `None` when there is none or it is malformed.
pub fn remote_span_context(headers: Option<&HeaderMap>) -> Option<SpanContext> {
    span_context_of(&extract(headers))
}

/// The valid span context of `cx`, if it has one.
pub fn span_context_of(cx: &Context) -> Option<SpanContext> {
    let span = cx.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.clone())
}

/// Writes the current trace into `headers`: the current `tracing` span's context when an
/// OpenTelemetry layer gives it one, else the OpenTelemetry context current on this task (the
/// coordinator runs each request inside the client's, so a coordinator that does not export
/// still passes the client's trace on). Writes nothing when neither is part of a trace.
pub fn inject_current(headers: &mut HeaderMap) {
    let span_cx = tracing::Span::current().context();
    let cx = if span_context_of(&span_cx).is_some() {
        span_cx
    } else {
        Context::current()
    };
    inject(&cx, headers);
}

/// Writes `cx`'s trace into `headers`; nothing when `cx` is not part of a trace.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    if span_context_of(cx).is_some() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Makes `span` a child of the remote span in `parent`. Does nothing when `parent` carries no
/// trace, or without an OpenTelemetry layer (the span then has no OpenTelemetry side at all).
pub fn continue_trace(span: &tracing::Span, parent: &Context) {
    if span_context_of(parent).is_some() {
        // Fails only without the layer, or for a span already started: either way the span
        // simply stays where it is, which is what tracing without a parent means.
        let _ = span.set_parent(parent.clone());
    }
}

/// Records a span that already ended: `name` from `start` to `end`, a child of `parent`. For
/// times measured by someone else, like a job's wait in the JetStream queue (it starts at the
/// server's publish timestamp). Goes through the global tracer provider, which the process's
/// OpenTelemetry setup installs beside the `tracing` layer; nothing is recorded when `parent`
/// carries no trace (a queue wait alone would be a trace of its own, which says nothing).
pub fn record_finished_span(
    name: &'static str,
    parent: &Context,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    if span_context_of(parent).is_none() {
        return;
    }
    use opentelemetry::trace::Span as _;
    let tracer = opentelemetry::global::tracer(TRACER_NAME);
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Consumer)
        .with_start_time(start.min(end))
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    span.end_with_timestamp(end);
}

/// Reads propagation fields from NATS headers. Header names are case-sensitive in NATS; the
/// exact name is tried first, then any spelling of it.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if let Some(value) = self.0.get(key) {
            return Some(value.as_str());
        }
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|(name, _)| AsRef::<str>::as_ref(name))
            .collect()
    }
}

/// Writes propagation fields into NATS headers (the propagator's own names and values, which
/// are always valid header text).
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers_with(name: &str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value);
        headers
    }

    #[test]
    fn traceparent_round_trips_through_nats_headers() {
        let span_context = remote_span_context(Some(&headers_with(TRACEPARENT, PARENT)))
            .expect("a valid traceparent");
        assert_eq!(
            span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            span_context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(span_context.is_sampled());
        assert!(span_context.is_remote());

        // Written back out, it is the same header, `tracestate` included.
        let state = TraceState::from_key_value([("vendor", "x1")]).unwrap();
        let local = SpanContext::new(
            span_context.trace_id(),
            span_context.span_id(),
            TraceFlags::SAMPLED,
            false,
            state,
        );
        let mut out = HeaderMap::new();
        inject(&Context::new().with_remote_span_context(local), &mut out);
        assert_eq!(out.get(TRACEPARENT).unwrap().as_str(), PARENT);
        assert_eq!(out.get("tracestate").unwrap().as_str(), "vendor=x1");
        let back = remote_span_context(Some(&out)).unwrap();
        assert_eq!(back.trace_state().header(), "vendor=x1");
    }

    #[test]
    fn any_spelling_of_the_header_is_read() {
        let span_context = remote_span_context(Some(&headers_with("Traceparent", PARENT)));
        assert!(span_context.is_some());
    }

    /// Malformed as the SDK's propagator judges it. It is lenient about lengths (a short hex
    /// id parses, and a trailing `-` is dropped); such a header still names a valid trace.
    #[test]
    fn missing_or_malformed_traceparents_are_no_trace() {
        assert!(remote_span_context(None).is_none());
        assert!(remote_span_context(Some(&HeaderMap::new())).is_none());
        for garbage in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-not-a-trace-context",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            let headers = headers_with(TRACEPARENT, garbage);
            assert!(remote_span_context(Some(&headers)).is_none(), "{garbage:?}");
        }
    }

    #[test]
    fn nothing_is_written_outside_a_trace() {
        let mut headers = HeaderMap::new();
        inject(&Context::new(), &mut headers);
        inject_current(&mut headers);
        assert!(headers.is_empty());
        // A context current on the task is passed on when no tracing span has one.
        let parent = extract(Some(&headers_with(TRACEPARENT, PARENT)));
        let _attached = parent.attach();
        inject_current(&mut headers);
        assert_eq!(headers.get(TRACEPARENT).unwrap().as_str(), PARENT);
    }
}
