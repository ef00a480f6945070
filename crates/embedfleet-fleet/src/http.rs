//! The HTTP listener every role runs (`--http-addr`, default `0.0.0.0:9090`), for Kubernetes
//! probes and Prometheus:
//!
//! - `GET /healthz`: 200 while the process is alive and its async runtime answers (a heartbeat
//!   task ticks on the role's runtime; a runtime stuck for [`STALL_LIMIT`] fails it). Liveness.
//! - `GET /readyz`: 200 when every readiness check passes (NATS connected; a worker's models
//!   loaded and warmed and its consumers bound; a coordinator's fusion layer built and its
//!   endpoint subscribed), else 503 naming the failing checks. Startup and readiness.
//! - `GET /metrics`: the Prometheus text format (0.0.4) of [`crate::metrics`].
//!
//! The listener runs on its own thread with its own small runtime, and is started before the
//! models load: probes get answers (not ready yet) during a model load of minutes, and a
//! runtime stalled by a bug cannot silence the endpoint that reports the stall.
//!
//! HTTP/1.1, one request per connection, parsed with `httparse`. Bounded: at most
//! [`MAX_CONNECTIONS`] connections at once, [`MAX_REQUEST_BYTES`] of request head, and
//! [`IO_TIMEOUT`] per connection, so a slow or hostile client costs a few KiB and one task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Largest request head read; a bigger one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Bound on reading a request and writing its response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the role's runtime may go without a heartbeat before `/healthz` fails.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// Why the listener could not start. One line each.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the HTTP thread: {0}")]
    Thread(#[source] std::io::Error),
}

type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// What `/healthz` and `/readyz` report. Shared between the role (which sets flags and adds
/// checks as it starts) and the listener (which reads them per request).
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the last heartbeat; 0 before the first.
    heartbeat_ms: AtomicU64,
    /// Named readiness checks, in name order so that reports are stable.
    checks: Mutex<BTreeMap<&'static str, Check>>,
}

/// A readiness condition the role turns on when it holds, e.g. "models loaded".
#[derive(Clone)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            checks: Mutex::new(BTreeMap::new()),
        })
    }

    /// Adds a readiness check evaluated on every `/readyz`.
    pub fn check(&self, name: &'static str, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.lock().insert(name, Box::new(check));
    }

    /// Adds a readiness condition that fails until the returned flag is set.
    pub fn flag(&self, name: &'static str) -> ReadyFlag {
        let flag = ReadyFlag(Arc::new(AtomicBool::new(false)));
        let read = flag.0.clone();
        self.check(name, move || read.load(Ordering::Acquire));
        flag
    }

    /// Adds "nats connected" for `client`.
    pub fn require_nats(&self, client: &async_nats::Client) {
        let client = client.clone();
        self.check("nats connected", move || {
            client.connection_state() == async_nats::connection::State::Connected
        });
    }

    /// Starts the heartbeat on the current (the role's) runtime; `/healthz` fails when it stops.
    pub fn start_heartbeat(self: &Arc<Self>) {
        let health = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
            loop {
                tick.tick().await;
                let Some(health) = health.upgrade() else {
                    return;
                };
                let now = health.started.elapsed().as_millis().max(1) as u64;
                health.heartbeat_ms.store(now, Ordering::Release);
            }
        });
    }

    /// Checks that fail now, by name.
    pub fn not_ready(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, check)| !check())
            .map(|(name, _)| *name)
            .collect()
    }

    /// Whether the role's runtime answered recently (true before its heartbeat starts: the
    /// process is then still loading, which the startup probe covers).
    pub fn alive(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Acquire);
        last == 0
            || self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
                < STALL_LIMIT
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Check>> {
        // A check that panicked poisoned nothing worth refusing to read.
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running listener; it stops when dropped (and with the process).
pub struct HttpServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpServer {
    /// Binds `addr` now (a taken port fails the role's start, not a later probe) and serves on
    /// a thread of its own. `registry` is what `/metrics` encodes; it can be filled in later
    /// (collectors of a role that does not exist yet at bind time).
    pub fn start(
        addr: SocketAddr,
        health: Arc<Health>,
        registry: Arc<Mutex<Registry>>,
    ) -> Result<Self, HttpError> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| HttpError::Bind { addr, source })?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("embedfleet-http".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "HTTP runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "HTTP listener");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = accept_loop(listener, health, registry) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(HttpError::Thread)?;
        Ok(HttpServer {
            addr: bound,
            stop: Some(stop),
        })
    }

    /// The bound address (the real port when `addr` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, health: Arc<Health>, registry: Arc<Mutex<Registry>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "HTTP accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_TIMEOUT, serve(stream, &health, &registry)).await;
            drop(permit);
        });
    }
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn serve(mut stream: TcpStream, health: &Health, registry: &Mutex<Registry>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let parsed = loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break Ok((
                    request.method.unwrap_or("").to_string(),
                    request.path.unwrap_or("").to_string(),
                ))
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_REQUEST_BYTES => continue,
            Ok(httparse::Status::Partial) => {
                break Err(Response::text(
                    "431 Request Header Fields Too Large",
                    "request head too large\n",
                ))
            }
            Err(error) => break Err(Response::text("400 Bad Request", format!("{error}\n"))),
        }
    };
    let (response, head_only) = match parsed {
        Ok((method, path)) => (route(&method, &path, health, registry), method == "HEAD"),
        Err(response) => (response, false),
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if !head_only {
        out.push_str(&response.body);
    }
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Read what the client still sends until it closes (bounded by the caller's timeout):
    // closing with unread input would reset the connection and could destroy the response.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn route(method: &str, target: &str, health: &Health, registry: &Mutex<Registry>) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text("405 Method Not Allowed", "GET only\n");
    }
    // Query strings are ignored (`/readyz?verbose` is `/readyz`).
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/healthz" | "/livez" => {
            if health.alive() {
                Response::text("200 OK", "ok\n")
            } else {
                Response::text(
                    "503 Service Unavailable",
                    format!("the runtime has not answered for {STALL_LIMIT:?}\n"),
                )
            }
        }
        "/readyz" => match health.not_ready().as_slice() {
            [] => Response::text("200 OK", "ready\n"),
            failing => Response::text(
                "503 Service Unavailable",
                format!("not ready: {}\n", failing.join(", ")),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            let registry = registry.lock().unwrap_or_else(|e| e.into_inner());
            match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
                Ok(()) => Response {
                    status: "200 OK",
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body,
                },
                Err(_) => Response::text("500 Internal Server Error", "encoding metrics\n"),
            }
        }
        _ => Response::text("404 Not Found", "try /healthz, /readyz or /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response[9..12].parse().expect("status");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    #[tokio::test]
    async fn readiness_follows_the_checks_and_metrics_encode() {
        let health = Health::new();
        let loaded = health.flag("models loaded");
        let registry = Arc::new(Mutex::new(crate::metrics::registry(Vec::new())));
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), health.clone(), registry)
            .expect("start");
        let addr = server.addr();

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: models loaded\n"));
        loaded.set(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_string()));
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE te_request_duration histogram"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn garbage_and_oversized_requests_get_an_error_not_a_hang() {
        let server = HttpServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Health::new(),
            Arc::new(Mutex::new(Registry::default())),
        )
        .expect("start");
        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        stream
            .write_all(b"\x00\x01garbage\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");

        let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nx: {}\r\n",
            "a".repeat(MAX_REQUEST_BYTES)
        );
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    }

    #[test]
    fn a_taken_port_is_a_one_line_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = HttpServer::start(
            addr,
            Health::new(),
            Arc::new(Mutex::new(Registry::default())),
        )
        .err()
        .expect("the port is taken");
        let message = error.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(!message.contains('\n'));
    }
}
