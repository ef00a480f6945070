//! Logging and trace export of every command: `tracing` to stderr (level by `EMBEDFLEET_LOG`),
//! and, when configured, the spans exported over OTLP (docs/operations.md#traces).
//!
//! Export is off unless the standard variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, or `OTEL_TRACES_EXPORTER=otlp` (which sends to
//! the default `http://localhost:4318`). `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`
//! keep it off. Only OTLP over HTTP with protobuf is built in (no gRPC: tonic would cost CI
//! minutes of compile for a transport every collector also speaks over HTTP); another
//! `OTEL_EXPORTER_OTLP_PROTOCOL` is refused with a one-line error. The exporter reads the rest of
//! the standard settings itself (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, ...). Spans leave in batches from the SDK's own thread, posted
//! with ureq (already built for `fetch`), so a slow collector never holds up a request.
//!
//! With export off no OpenTelemetry layer is installed: the fleet's spans (INFO level) are then
//! disabled at their call sites unless `EMBEDFLEET_LOG` asks for them, and cost nothing.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{bail, Context as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How long one export may take, connection included (OTLP's default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector's reply is a small status message; more than this is not read.
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// The running trace export; [`Telemetry::shutdown`] sends what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (bounded by the export timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "trace export did not shut down cleanly");
            }
        }
    }
}

/// Installs logging and, when configured, trace export for `service` (the role: `embedfleet-
/// coordinator`, ...; `OTEL_SERVICE_NAME` wins). An export setting that cannot be honoured is an
/// error, reported after logging is up.
pub fn init(service: &str) -> anyhow::Result<Telemetry> {
    let env_filter = tracing_subscriber::EnvFilter::try_from_env("EMBEDFLEET_LOG")
        .unwrap_or_else(|_| "warn".into());
    // A per-layer filter, so that `EMBEDFLEET_LOG=warn` quiets stderr without disabling the
    // INFO-level spans the exporter needs.
    let fmt_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(env_filter);
    let provider = match export_settings(&|name: &str| std::env::var(name).ok()) {
        Ok(true) => Some(otlp_provider(service)),
        Ok(false) => None,
        Err(error) => Some(Err(error)),
    }
    .transpose();
    let (provider, failure) = match provider {
        Ok(provider) => (provider, None),
        Err(error) => (None, Some(error)),
    };
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(embedfleet_fleet::trace_context::TRACER_NAME))
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(exported))
    });
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .init();
    if let Some(error) = failure {
        return Err(error);
    }
    if let Some(provider) = &provider {
        // The spans recorded without `tracing` (a job's queue wait) use the global provider.
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(service, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

/// What goes to the exporter: the fleet's spans (INFO) and, as span events, warnings and errors
/// logged inside them; not the DEBUG/TRACE spans some dependencies open per kernel call.
fn exported(metadata: &Metadata<'_>) -> bool {
    if metadata.is_span() {
        *metadata.level() <= Level::INFO
    } else {
        *metadata.level() <= Level::WARN
    }
}

/// Whether the environment (`var`) asks for OTLP trace export; an error for settings this
/// build cannot honour.
fn export_settings(var: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<bool> {
    let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let wanted = match set("OTEL_TRACES_EXPORTER") {
        Some(exporter) => match exporter.trim() {
            "otlp" => true,
            "none" => false,
            other => bail!("OTEL_TRACES_EXPORTER={other}: only `otlp` and `none` are supported"),
        },
        None => {
            set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    };
    if wanted {
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = set(name) {
                if protocol.trim() != "http/protobuf" {
                    bail!(
                        "{name}={protocol}: this build exports OTLP over http/protobuf only \
                         (point it at the collector's HTTP port, 4318)"
                    );
                }
            }
        }
    }
    Ok(wanted)
}

fn otlp_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = otlp_exporter(None)?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The OTLP/HTTP span exporter: to `endpoint` as given, else where the standard variables say.
fn otlp_exporter(endpoint: Option<&str>) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let agent = ureq::AgentBuilder::new().timeout(EXPORT_TIMEOUT).build();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(UreqClient { agent });
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build().context("OTLP trace exporter")
}

/// The exporter's HTTP client: ureq's blocking agent, called on the SDK's batch thread (which
/// runs each export to completion there, so blocking is what it expects).
#[derive(Debug)]
struct UreqClient {
    agent: ureq::Agent,
}

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut call = self
            .agent
            .request(parts.method.as_str(), &parts.uri.to_string());
        for (name, value) in &parts.headers {
            call = call.set(name.as_str(), value.to_str()?);
        }
        let response = match call.send_bytes(&body) {
            // A 4xx/5xx is an answer: the exporter reads its status (and retries 429/503).
            Ok(response) | Err(ureq::Error::Status(_, response)) => response,
            Err(error) => return Err(Box::new(error)),
        };
        let status = response.status();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut bytes)?;
        Ok(Response::builder()
            .status(status)
            .body(Bytes::from(bytes))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> anyhow::Result<bool> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        export_settings(&move |name| {
            vars.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        })
    }

    #[test]
    fn export_is_off_unless_configured() {
        assert!(!settings(&[]).unwrap());
        assert!(!settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).unwrap());
        assert!(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap());
        assert!(settings(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])
        .unwrap());
        assert!(settings(&[("OTEL_TRACES_EXPORTER", "otlp")]).unwrap());
        assert!(!settings(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
        ])
        .unwrap());
        assert!(!settings(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
        ])
        .unwrap());
    }

    /// Accepts one HTTP request on `listener`, answers 200; returns its head and body.
    fn serve_one(listener: std::net::TcpListener) -> (String, Vec<u8>) {
        use std::io::{BufRead, BufReader, Write};
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mut stream = reader.into_inner();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        (head, body)
    }

    #[test]
    fn spans_reach_an_otlp_http_endpoint_as_protobuf() {
        use opentelemetry::trace::Tracer as _;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let collector = std::thread::spawn(move || serve_one(listener));
        let exporter = otlp_exporter(Some(&endpoint)).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter)
            .build();
        provider.tracer("test").in_span("exported-span", |_| {});
        provider.shutdown().unwrap();

        let (head, body) = collector.join().unwrap();
        assert!(head.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/x-protobuf"),
            "{head}"
        );
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let names: Vec<&str> = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|span| span.name.as_str())
            .collect();
        assert_eq!(names, ["exported-span"]);
    }

    #[test]
    fn settings_this_build_cannot_honour_are_one_line_errors() {
        let error = settings(&[("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(
            error.to_string().contains("only `otlp` and `none`"),
            "{error}"
        );
        let error = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("http/protobuf only"), "{error}");
        assert!(!error.to_string().contains('\n'));
        // A protocol setting alone, with export off, is not an error.
        assert!(!settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap());
    }
}
