//! The W3C `traceparent` header of each request: the caller's trace, so that the fleet's spans
//! (the coordinator's request span, its jobs, the workers' batches) join it.
//!
//! Each request runs in an `embed.v1` client span. When the application bridges `tracing` to
//! OpenTelemetry (`tracing-opentelemetry`'s layer), that span's context is sent; otherwise the
//! OpenTelemetry context current on the task is, when it is part of a trace; otherwise nothing
//! is sent and the fleet starts a trace of its own, exactly as without this module. The fleet's
//! side is `embedfleet_fleet::trace_context` (which reads the header the same way).

use async_nats::HeaderMap;
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header the trace travels in.
pub const TRACEPARENT: &str = "traceparent";

/// Writes the current trace into `headers` (see the module docs); nothing outside a trace.
pub(crate) fn inject_current(headers: &mut HeaderMap) {
    let span_cx = tracing::Span::current().context();
    let cx = if span_cx.span().span_context().is_valid() {
        span_cx
    } else {
        Context::current()
    };
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn the_current_trace_is_sent_and_nothing_outside_one() {
        let mut headers = HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty(), "no trace, no header");

        let caller = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let _current = Context::new().with_remote_span_context(caller).attach();
        inject_current(&mut headers);
        assert_eq!(
            headers.get(TRACEPARENT).map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
