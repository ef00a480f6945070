//! `nats-server` with JetStream, listening on a free loopback port, its JetStream store in the
//! server's temporary directory so that a [`NatsServer::restart`] keeps streams and consumers.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::binary::ServerBinary;
use crate::process::ServerProcess;
use crate::TestkitError;

/// The NATS server binary and how to get it.
pub const NATS_SERVER: ServerBinary = ServerBinary {
    name: "nats-server",
    package: "nats-server",
    env_var: "EMBEDFLEET_NATS_SERVER",
};

/// Subdirectory of the server's directory that holds the JetStream store.
const STORE_DIR: &str = "jetstream";

/// A child `nats-server -js`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    process: ServerProcess,
}

impl NatsServer {
    /// Starts `nats-server -js -a 127.0.0.1 -p <free port> -sd <tempdir>/jetstream` and waits
    /// (bounded) until it accepts connections. The error names the binary and how to install it
    /// when it is missing.
    pub fn start() -> Result<Self, TestkitError> {
        let process = ServerProcess::start(&NATS_SERVER, nats_args)?;
        Ok(NatsServer { process })
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

fn nats_args(port: u16, dir: &Path) -> Vec<OsString> {
    vec![
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string().into(),
        "-sd".into(),
        dir.join(STORE_DIR).into_os_string(),
    ]
}
