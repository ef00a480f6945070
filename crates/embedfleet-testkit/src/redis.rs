//! `redis-server` on a free loopback port with persistence off: tests want an empty cache at
//! start and an outage that loses nothing they care about.

use std::ffi::OsString;
use std::path::Path;

use crate::binary::ServerBinary;
use crate::process::ServerProcess;
use crate::TestkitError;

/// The Redis server binary and how to get it.
pub const REDIS_SERVER: ServerBinary = ServerBinary {
    name: "redis-server",
    package: "redis-server",
    env_var: "EMBEDFLEET_REDIS_SERVER",
};

/// A child `redis-server`, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
}

impl RedisServer {
    /// Starts `redis-server --port <free port> --bind 127.0.0.1 --save "" --appendonly no --dir
    /// <tempdir>` and waits (bounded) until it accepts connections. The error names the binary
    /// and how to install it when it is missing.
    pub fn start() -> Result<Self, TestkitError> {
        let process = ServerProcess::start(&REDIS_SERVER, redis_args)?;
        Ok(RedisServer { process })
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// The port, stable across restarts.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// Kills the server (SIGKILL) and waits until its port refuses connections. With
    /// persistence off, the data is gone.
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        self.process.stop()
    }

    /// Starts the server again, empty, on the same port, so a reconnecting client finds it.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.process.restart()
    }

    /// The process underneath: pid, running state, log.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

fn redis_args(port: u16, dir: &Path) -> Vec<OsString> {
    vec![
        "--port".into(),
        port.to_string().into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        "".into(),
        "--appendonly".into(),
        "no".into(),
        "--dir".into(),
        dir.as_os_str().to_owned(),
    ]
}
