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

    /// [`RedisServer::start`] with the directives of `config` (redis.conf syntax: `requirepass`,
    /// `user`, `tls-cert-file`, ...) read from a file. Files it names must outlive the server.
    pub fn start_with_config(config: &str) -> Result<Self, TestkitError> {
        let process = ServerProcess::start_prepared(&REDIS_SERVER, redis_config_args, |dir| {
            std::fs::write(dir.join(CONFIG_FILE), config)
        })?;
        Ok(RedisServer { process })
    }

    /// [`RedisServer::start_with_config`] listening for TLS only, on the port (`--port 0
    /// --tls-port <port>`); `config` must name the certificate, key and CA (`tls-cert-file`,
    /// `tls-key-file`, `tls-ca-cert-file`). Clients connect with `rediss://`.
    pub fn start_tls(config: &str) -> Result<Self, TestkitError> {
        let process = ServerProcess::start_prepared(&REDIS_SERVER, redis_tls_args, |dir| {
            std::fs::write(dir.join(CONFIG_FILE), config)
        })?;
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

/// The config file of [`RedisServer::start_with_config`], in the server's directory.
const CONFIG_FILE: &str = "redis.conf";

/// `redis-server <dir>/redis.conf` then [`redis_args`]: flags after the file override it.
fn redis_config_args(port: u16, dir: &Path) -> Vec<OsString> {
    let mut args = vec![dir.join(CONFIG_FILE).into_os_string()];
    args.extend(redis_args(port, dir));
    args
}

/// [`redis_config_args`] with the plain port closed and TLS on `port`.
fn redis_tls_args(port: u16, dir: &Path) -> Vec<OsString> {
    let mut args = redis_config_args(0, dir);
    args.extend(["--tls-port".into(), port.to_string().into()]);
    args
}
