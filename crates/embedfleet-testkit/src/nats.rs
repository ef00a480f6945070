//! `nats-server` with JetStream, listening on a free loopback port, its JetStream store in the
//! server's temporary directory so that a [`NatsServer::restart`] keeps streams and consumers.
//!
//! The server reads a small config file for what has no command-line flag: `max_payload`, raised
//! from the 1 MiB default to the fleet's 8 MiB request limit
//! (`embedfleet_proto::RequestLimits::max_payload_bytes`), so tests can send what production
//! accepts.

use std::path::{Path, PathBuf};

use embedfleet_process::nats::{jetstream_args, CONFIG_FILE, STORE_DIR};

use crate::binary::ServerBinary;
use crate::process::ServerProcess;
use crate::TestkitError;

/// The NATS server binary and how to get it.
pub const NATS_SERVER: ServerBinary = ServerBinary {
    name: "nats-server",
    package: "nats-server",
    env_var: "EMBEDFLEET_NATS_SERVER",
};

/// The machine's own `nats-server` (`PATH`, then the system directories), whatever
/// `EMBEDFLEET_NATS_SERVER` says: the tests that prove the fleet still works on an old server
/// (Debian 12's 2.9.10) use it while the rest run on the current one `scripts/test.sh` fetches.
pub const SYSTEM_NATS_SERVER: ServerBinary = ServerBinary {
    name: "nats-server",
    package: "nats-server",
    env_var: "EMBEDFLEET_SYSTEM_NATS_SERVER",
};

/// Largest message the server accepts: 8 MiB (nats' `MB` is 1024 * 1024), the fleet's request
/// limit. Flags given next to `-c` (port, address, JetStream, store) override the file.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;

/// A child `nats-server -js`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    process: ServerProcess,
}

impl NatsServer {
    /// Starts `nats-server -c <tempdir>/nats.conf -js -a 127.0.0.1 -p <free port> -sd
    /// <tempdir>/jetstream` (the config sets `max_payload` to [`MAX_PAYLOAD`]) and waits
    /// (bounded) until it accepts connections. The error names the binary and how to install it
    /// when it is missing.
    pub fn start() -> Result<Self, TestkitError> {
        let process = ServerProcess::start_prepared(&NATS_SERVER, jetstream_args, write_config)?;
        Ok(NatsServer { process })
    }

    /// [`NatsServer::start`] on [`SYSTEM_NATS_SERVER`].
    pub fn start_system() -> Result<Self, TestkitError> {
        let process =
            ServerProcess::start_prepared(&SYSTEM_NATS_SERVER, jetstream_args, write_config)?;
        Ok(NatsServer { process })
    }

    /// [`NatsServer::start`] with the HTTP monitoring endpoint (`/varz`, `/jsz`, what KEDA's
    /// nats-jetstream scaler reads) on another free loopback port, see
    /// [`NatsServer::monitoring_url`].
    pub fn start_with_monitoring() -> Result<Self, TestkitError> {
        let process =
            ServerProcess::start_prepared(&NATS_SERVER, jetstream_args, write_monitoring_config)?;
        Ok(NatsServer { process })
    }

    /// [`NatsServer::start`] with `config` appended to the config file: what a test of
    /// authentication or TLS needs (`authorization { ... }`, `tls { ... }`, `operator: ...`).
    /// Files it names must outlive the server.
    pub fn start_with_config(config: &str) -> Result<Self, TestkitError> {
        let process = ServerProcess::start_prepared(&NATS_SERVER, jetstream_args, |dir| {
            write_config(dir)?;
            let path = dir.join(CONFIG_FILE);
            let base = std::fs::read_to_string(&path)?;
            std::fs::write(path, format!("{base}{config}\n"))
        })?;
        Ok(NatsServer { process })
    }

    /// `http://127.0.0.1:<monitoring port>` of a server from
    /// [`NatsServer::start_with_monitoring`]; `None` for one without monitoring.
    pub fn monitoring_url(&self) -> Option<String> {
        let port = std::fs::read_to_string(self.process.dir().join(MONITOR_PORT_FILE)).ok()?;
        Some(format!("http://127.0.0.1:{}", port.trim()))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The client port, stable across restarts.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// Where JetStream keeps its streams, stable across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.process.dir().join(STORE_DIR)
    }

    /// Kills the server (SIGKILL) and waits until its port refuses connections.
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        self.process.stop()
    }

    /// Starts the server again on the same port with the same store, so a client's reconnect
    /// lands on it and durable streams survive.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.process.restart()
    }

    /// The process underneath: pid, running state, log.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

fn write_config(dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        dir.join(CONFIG_FILE),
        format!("max_payload: {}MB\n", MAX_PAYLOAD >> 20),
    )
}

/// Where [`write_monitoring_config`] records the monitoring port it chose.
const MONITOR_PORT_FILE: &str = "monitor.port";

/// The config of [`write_config`] plus `http: 127.0.0.1:<free port>`; the port is kept in the
/// server's directory, so a restart listens on the same one.
fn write_monitoring_config(dir: &Path) -> std::io::Result<()> {
    let port = crate::port::free_port().map_err(std::io::Error::other)?;
    std::fs::write(
        dir.join(CONFIG_FILE),
        format!(
            "max_payload: {}MB\nhttp: \"127.0.0.1:{port}\"\n",
            MAX_PAYLOAD >> 20
        ),
    )?;
    std::fs::write(dir.join(MONITOR_PORT_FILE), port.to_string())
}
