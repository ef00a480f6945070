//! `--http-addr` / `--no-http` of every fleet role, and the role's side of the HTTP listener
//! (`embedfleet_fleet::http`): the readiness conditions it declares at start and turns on as it
//! comes up, and the collectors `/metrics` reads.
//!
//! The listener starts first, before models load, so a probe gets "not ready: models loaded"
//! during a long load instead of a refused connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Args;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;

use embedfleet_fleet::http::{Health, HttpError, HttpServer, ReadyFlag};

/// Where `/healthz`, `/readyz` and `/metrics` listen when `--http-addr` is not given.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9090";

#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Listen address of /healthz, /readyz and /metrics [default: 0.0.0.0:9090; when the default
    /// port is taken the role runs without them and says so; a given address must bind].
    #[arg(long, env = "EMBEDFLEET_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Run without the HTTP listener.
    #[arg(long, conflicts_with = "http_addr")]
    pub no_http: bool,
}

/// A role's health and metrics endpoint; every method is a no-op when it is off.
pub struct RoleHttp {
    inner: Option<Running>,
}

struct Running {
    _server: HttpServer,
    health: Arc<Health>,
    registry: Arc<Mutex<Registry>>,
    flags: Vec<(&'static str, ReadyFlag)>,
}

impl RoleHttp {
    /// Starts the listener with the readiness `conditions` the role will turn on (plus "nats
    /// connected", which [`RoleHttp::watch_nats`] takes over once the client exists).
    pub fn start(args: &HttpArgs, role: &str, conditions: &[&'static str]) -> anyhow::Result<Self> {
        if args.no_http {
            return Ok(RoleHttp { inner: None });
        }
        let explicit = args.http_addr.is_some();
        let addr = args
            .http_addr
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.parse().expect("a valid default address"));
        let health = Health::new();
        let nats = health.flag("nats connected");
        let mut flags: Vec<_> = conditions
            .iter()
            .map(|&name| (name, health.flag(name)))
            .collect();
        flags.push(("nats connected", nats));
        let registry = Arc::new(Mutex::new(embedfleet_fleet::metrics::registry(Vec::new())));
        match HttpServer::start(addr, health.clone(), registry.clone()) {
            Ok(server) => {
                eprintln!(
                    "embedfleet {role}: health and metrics on http://{}",
                    server.addr()
                );
                Ok(RoleHttp {
                    inner: Some(Running {
                        _server: server,
                        health,
                        registry,
                        flags,
                    }),
                })
            }
            // Two roles on one machine (a laptop, the tests) cannot both have the default port;
            // in a pod it is always free. An address the operator chose must bind.
            Err(HttpError::Bind { source, .. })
                if !explicit && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                eprintln!(
                    "embedfleet {role}: {DEFAULT_HTTP_ADDR} is in use; running without \
                     /healthz, /readyz and /metrics (give --http-addr to choose another)"
                );
                Ok(RoleHttp { inner: None })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Marks the readiness condition `name` as met.
    pub fn ready(&self, name: &'static str) {
        if let Some(running) = &self.inner {
            for (flag_name, flag) in &running.flags {
                if *flag_name == name {
                    flag.set(true);
                }
            }
        }
    }

    /// From now on "nats connected" follows `client`'s connection state, and `/healthz`
    /// watches the role's runtime (call from inside it).
    pub fn watch_nats(&self, client: &async_nats::Client) {
        if let Some(running) = &self.inner {
            running.health.require_nats(client);
            running.health.start_heartbeat();
        }
    }

    /// Adds a collector to `/metrics` (a role's stats, read at scrape time).
    pub fn collect(&self, collector: Box<dyn Collector>) {
        if let Some(running) = &self.inner {
            running
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .register_collector(collector);
        }
    }
}
